// The conversions between the wire API (attnserve.v1 protos) and the core's
// value types that the server and the client both need, each written once:
// dtypes, tensors, attention options, output specs and sparse patterns, in
// both directions. The server's adapter (server/convert.h) and the client's
// (client/convert.h) build their requests and responses from these.
// Needs only the generated messages and attnserve_tensor (no kernels).
// Pure functions; thread-safe.
#ifndef ATTNSERVE_WIRE_CONVERT_H_
#define ATTNSERVE_WIRE_CONVERT_H_

#include <optional>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "attention/request.h"
#include "attnserve/v1/attention.pb.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace attnserve {

v1::DType DTypeToProto(DType dtype);

// Any dtype of the wire, I32 included (responses: top-k indices).
// INVALID_ARGUMENT naming `field` ("output.dtype") for DTYPE_UNSPECIFIED or
// an unknown value.
absl::StatusOr<DType> DTypeFromProto(int dtype, absl::string_view field);

// A request tensor's dtype. INVALID_ARGUMENT naming `field` ("query.dtype")
// for DTYPE_UNSPECIFIED, I32 (output only) or an unknown value.
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

// Copies the view's dtype, shape and bytes into `out`.
void ViewToProto(const TensorView& view, v1::Tensor* out);

// Moves `t`'s storage into `out` (no copy).
void TensorToProto(Tensor& t, v1::Tensor* out);

// The wire form of the options: -1 windows (unbounded) become unset fields.
void OptionsToProto(const AttentionOptions& options, v1::AttentionOptions* out);
// The core form: unset windows become -1. INVALID_ARGUMENT naming the field
// for an unknown enum value.
absl::StatusOr<AttentionOptions> OptionsFromProto(const v1::AttentionOptions& proto);

// The optional outputs asked of an attention call.
void OutputsToProto(const OutputSpec& outputs, v1::OutputSpec* out);
OutputSpec OutputsFromProto(const v1::OutputSpec& proto);

// The wire form of a sparse attention: index tensors copied, an unset
// block_mask / key_indices left unset. Not validated (the server does,
// naming sparsity.block_mask.indptr[...] and the like).
void SparsityToProto(const SparsitySpec& sparsity, v1::Sparsity* out);
// The core view of a sparse pattern: index tensors borrowed from `proto`
// (which must outlive the result and any job planned from it), global tokens
// and sink logits copied. Unset sub-messages stay unset, and so does a
// full_indptr or full_indices with neither shape nor data; query_block and
// key_block 0 mean 1. INVALID_ARGUMENT naming the field
// ("sparsity.block_mask.indptr.dtype"); the pattern itself is checked by
// PlanSparsity.
absl::StatusOr<SparsitySpec> SparsityFromProto(const v1::Sparsity& proto,
                                               const TensorSource* source = nullptr);

}  // namespace attnserve

#endif  // ATTNSERVE_WIRE_CONVERT_H_
