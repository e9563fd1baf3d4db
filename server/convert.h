// Conversions between the wire API (attnserve.v1 protos) and the core types,
// as the server sees them: wire request in (borrowed, no copies of tensor
// bytes), computed job out (tensor storage moved, no copies). Built on the
// conversions the client shares (wire/convert.h: dtypes, tensors, options,
// outputs, sparsity, TensorSource).
// Pure functions; thread-safe.
#ifndef ATTNSERVE_SERVER_CONVERT_H_
#define ATTNSERVE_SERVER_CONVERT_H_

#include <optional>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "attention/job.h"
#include "attention/request.h"
#include "attention/rope.h"
#include "attnserve/v1/attention.pb.h"
#include "backends/backend.h"
#include "core/dtype.h"
#include "model/model.h"
#include "wire/convert.h"

namespace attnserve {

// The core view of `proto`. Tensor views point into proto's `bytes` fields
// (or where `source` finds them), so `proto` (and `source`) must outlive the
// result and any job prepared from it. Checks only
// what the wire format adds (enum values, the index tensors' dtype); shapes,
// sizes and the sparse pattern are checked by PrepareAttention.
// INVALID_ARGUMENT names the field.
absl::StatusOr<AttentionRequest> RequestFromProto(const v1::AttendRequest& proto,
                                                  const TensorSource* source = nullptr);

// Moves the job's optional outputs (lse, entropy, weights, top-k) into
// `response`, those the job computed (the storage is moved, not copied).
template <typename Response>
void OptionalOutputsToProto(AttentionJob& job, Response* response) {
  if (job.params.lse != nullptr) TensorToProto(job.lse, response->mutable_lse());
  if (job.params.entropy != nullptr) TensorToProto(job.entropy, response->mutable_entropy());
  if (job.params.weights != nullptr) TensorToProto(job.weights, response->mutable_weights());
  if (job.params.top_k > 0) {
    TensorToProto(job.top_k_indices, response->mutable_top_k_indices());
    TensorToProto(job.top_k_weights, response->mutable_top_k_weights());
  }
}

// Moves the job's output tensors into `response` (the storage is moved, not
// copied). Optional outputs are set only when the job computed them.
void JobToProto(AttentionJob& job, v1::AttendResponse* response);

// The rotary settings of `proto` (theta 0 = 10000); INVALID_ARGUMENT naming
// `field` for an unknown enum value. Checked against the head dim later, by
// ValidateRope.
absl::StatusOr<RopeConfig> RopeFromProto(const v1::RotaryEmbedding& proto,
                                         absl::string_view field = "rotary");

// Rotates `t` ([rows · tokens, heads, head_dim] elements in any input dtype)
// into `*out` in `out_dtype`, token i of the whole tensor at positions[i];
// `max_position` is the call's last position (DYNAMIC scaling). `config` must
// have passed ValidateRope. RESOURCE_EXHAUSTED when memory for the copy runs
// out.
absl::Status RotatedCopy(const RopeConfig& config, const TensorView& t, int32_t heads,
                         int32_t head_dim, absl::Span<const int64_t> positions,
                         int64_t max_position, DType out_dtype, std::string* out);

void BackendInfoToProto(const BackendInfo& info, v1::BackendDescription* out);
void RopeToProto(const RopeConfig& config, v1::RotaryEmbedding* out);
void ModelToProto(const Model& model, v1::ModelDescription* out);

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_CONVERT_H_
