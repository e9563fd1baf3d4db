// AttentionJob: a validated attention request, ready for a backend. It owns its
// outputs and any converted inputs (F32 bias, ALiBi slopes) and holds the
// AttentionParams that point into them and into the caller's request bytes.
// PlanAttention is the only place that fills AttentionParams; AllocateOutputs
// adds the output pointers when the job is about to run, so a queued job holds
// no output memory (its bytes are reserved from the memory budget instead).
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
  // A sparse pattern's description (index tensors and global tokens) and
  // the key lists built from it, together.
  int64_t max_sparse_bytes = int64_t{256} << 20;
};

struct AttentionJob {
  AttentionParams params;
  OutputSpec outputs;    // the optional outputs asked for
  // Empty until AllocateOutputs:
  Tensor output;         // [B, Lq, Hq, Dv], request dtype (3-D when the query was 3-D)
  Tensor lse;            // [B, Hq, Lq] F32, when asked
  Tensor entropy;        // [B, Hq, Lq] F32, when asked
  Tensor weights;        // [B, Hq, Lq, Lk] F32, when asked
  Tensor top_k_indices;  // [B, Hq, Lq, k] I32, when asked
  Tensor top_k_weights;  // [B, Hq, Lq, k] F32, when asked
  double flops = 0;      // AttentionRealFlops(params): the floating-point work, for metrics
  double cost = 0;       // AttentionCost(params, outputs): FLOP-equivalents, for limits
  int64_t input_bytes = 0;   // Q, K, V and bias bytes of the request
  int64_t output_bytes = 0;  // all outputs together (the main one included)
  bool query_3d = false;     // the output is 3-D like the query
  // Set: the main output is written here (main_output_bytes(), e.g. a
  // shared-memory region the caller registered) instead of into storage
  // AllocateOutputs allocates; `output` then has its dtype and shape but no
  // data. Not owned; must stay valid until the job is answered.
  char* output_target = nullptr;

  // The main output's bytes: [B, Lq, Hq, Dv] in the request dtype.
  int64_t main_output_bytes() const;
  // What AllocateOutputs allocates: output_bytes less an output_target's.
  int64_t allocated_output_bytes() const;

  // Bytes the job holds of its own besides the outputs (converted inputs).
  int64_t converted_input_bytes() const;

  // `params` as they will run, for Backend::Supports before AllocateOutputs:
  // the output pointers asked for are set to a placeholder (never to be
  // dereferenced), so a backend sees which outputs are wanted.
  AttentionParams planned_params() const;

  // Storage params points into, when the request's own bytes could not be used.
  std::vector<float> bias_f32;
  std::vector<float> alibi_slopes;
  std::vector<int32_t> key_lengths;
  std::vector<int32_t> sparse_offsets;  // SparseParams::list_offsets
  std::vector<int32_t> sparse_units;    // list_units, when not the request's own indices
  std::vector<int32_t> global_tokens;   // sorted
  std::vector<float> sink_logits;
  std::string aligned_copies[3];  // Q, K, V bytes whose address was misaligned
};

// Validates `request` and builds a job whose outputs are not allocated yet
// (params' output pointers are null). The request's tensor bytes must outlive
// the job (params point into them). Errors:
//   INVALID_ARGUMENT   malformed: the message names the field ("query.shape"),
//                      what was expected and what was received;
//   RESOURCE_EXHAUSTED well formed but over `limits`.
absl::StatusOr<std::unique_ptr<AttentionJob>> PlanAttention(const AttentionRequest& request,
                                                            const RequestLimits& limits = {});

// Allocates the planned outputs (zeroed) and points params at them; the main
// output at output_target (zeroed there) when the job has one.
// RESOURCE_EXHAUSTED when the allocation fails; the job is then unchanged.
absl::Status AllocateOutputs(AttentionJob& job);

// PlanAttention then AllocateOutputs: a job ready to run.
absl::StatusOr<std::unique_ptr<AttentionJob>> PrepareAttention(const AttentionRequest& request,
                                                               const RequestLimits& limits = {});

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_JOB_H_
