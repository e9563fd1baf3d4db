// AttentionJob: a validated attention request, ready for a backend. It owns its
// outputs and any converted inputs (F32 bias, ALiBi slopes) and holds the
// AttentionParams that point into them and into the caller's request bytes.
// PrepareAttention is the only place that fills AttentionParams.
//
// Thread-compatible: a job is filled by one thread, run by a backend, then read
// by one thread.
#ifndef ATTNSERVE_ATTENTION_JOB_H_
#define ATTNSERVE_ATTENTION_JOB_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention/params.h"
#include "attention/request.h"
#include "core/tensor.h"

namespace attnserve {

// Bounds that keep a single request from exhausting memory. Violations are
// RESOURCE_EXHAUSTED (the request is well formed but too big).
struct RequestLimits {
  int64_t max_output_bytes = int64_t{256} << 20;   // attention output
  int64_t max_weights_bytes = int64_t{64} << 20;   // the optional `weights` output
  int32_t max_top_k = 1024;
  int32_t max_head_dim = 1024;
};

struct AttentionJob {
  AttentionParams params;
  Tensor output;         // [B, Lq, Hq, Dv], request dtype (3-D when the query was 3-D)
  Tensor lse;            // [B, Hq, Lq] F32, when asked
  Tensor weights;        // [B, Hq, Lq, Lk] F32, when asked
  Tensor top_k_indices;  // [B, Hq, Lq, k] I32, when asked
  Tensor top_k_weights;  // [B, Hq, Lq, k] F32, when asked
  double flops = 0;      // AttentionFlops(params)
  int64_t input_bytes = 0;

  // Storage params points into, when the request's own bytes could not be used.
  std::vector<float> bias_f32;
  std::vector<float> alibi_slopes;
  std::vector<int32_t> key_lengths;
  std::string aligned_copies[3];  // Q, K, V bytes whose address was misaligned
};

// Validates `request` and builds a job. The request's tensor bytes must outlive
// the job (params point into them). Errors:
//   INVALID_ARGUMENT   malformed: the message names the field ("query.shape"),
//                      what was expected and what was received;
//   RESOURCE_EXHAUSTED well formed but over `limits`.
absl::StatusOr<std::unique_ptr<AttentionJob>> PrepareAttention(const AttentionRequest& request,
                                                               const RequestLimits& limits = {});

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_JOB_H_
