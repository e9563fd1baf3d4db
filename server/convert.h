// Conversions between the wire API (attnserve.v1 protos) and the core types,
// as the server sees them: wire request in (borrowed, no copies of tensor
// bytes), computed job out (tensor storage moved, no copies).
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

namespace attnserve {

v1::DType DTypeToProto(DType dtype);

// INVALID_ARGUMENT naming `field` ("query.dtype") for DTYPE_UNSPECIFIED, I32
// (output only) or a value this server does not know.
absl::StatusOr<DType> RequestDTypeFromProto(int dtype, absl::string_view field);

// Where a request tensor's bytes are when they are not (only) in its `data`
// field: gRPC's received slices (a message parsed without copying its tensor
// bytes) or a shared-memory region the caller registered (Tensor.shm). One
// source serves one call; the bytes it returns stay valid while it lives.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  // The bytes of `t`, a tensor of the request (`field` names it for errors:
  // "query", "entries[2].key"), or nullopt when they are t.data().
  // INVALID_ARGUMENT naming the field for a reference that cannot be
  // resolved (an unknown region, an offset or size past its end).
  virtual absl::StatusOr<std::optional<std::string_view>> Bytes(const v1::Tensor& t,
                                                                absl::string_view field) const = 0;
};

// A view of `t`'s bytes (no copy): t.data(), or where `source` (if not null)
// finds them. INVALID_ARGUMENT naming `field` for a bad dtype or reference.
// Shapes and sizes are checked later, by their consumer.
absl::StatusOr<TensorView> ViewFromProto(const v1::Tensor& t, absl::string_view field,
                                         const TensorSource* source = nullptr);

// A view of an index tensor's bytes (no copy); INVALID_ARGUMENT naming
// `field` ("sparsity.key_indices.indices") unless its dtype is I32. Shapes and
// values are checked later, by PlanSparsity.
absl::StatusOr<TensorView> IndexViewFromProto(const v1::Tensor& t, absl::string_view field,
                                              const TensorSource* source = nullptr);

// The core view of a sparse pattern: index tensors borrowed from `proto`
// (which must outlive the result and any job planned from it), global tokens
// and sink logits copied. Unset sub-messages stay unset, and so does a
// full_indptr or full_indices with neither shape nor data; query_block and
// key_block 0 mean 1. INVALID_ARGUMENT naming the field
// ("sparsity.block_mask.indptr.dtype"); the pattern itself is checked by
// PlanSparsity.
absl::StatusOr<SparsitySpec> SparsityFromProto(const v1::Sparsity& proto,
                                               const TensorSource* source = nullptr);

// Moves `t`'s storage into `out` (no copy).
void TensorToProto(Tensor& t, v1::Tensor* out);

// INVALID_ARGUMENT naming the field for an unknown enum value.
absl::StatusOr<AttentionOptions> OptionsFromProto(const v1::AttentionOptions& proto);

// The core view of `proto`. Tensor views point into proto's `bytes` fields
// (or where `source` finds them), so `proto` (and `source`) must outlive the
// result and any job prepared from it. Checks only
// what the wire format adds (enum values, the index tensors' dtype); shapes,
// sizes and the sparse pattern are checked by PrepareAttention.
// INVALID_ARGUMENT names the field.
absl::StatusOr<AttentionRequest> RequestFromProto(const v1::AttendRequest& proto,
                                                  const TensorSource* source = nullptr);

// The optional outputs asked of an attention call.
OutputSpec OutputsFromProto(const v1::OutputSpec& proto);

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
