#include "wire/convert.h"

#include <string>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/errors.h"

namespace attnserve {
namespace {

absl::StatusOr<std::string_view> TensorBytes(const v1::Tensor& t, absl::string_view field,
                                             const TensorSource* source) {
  if (source != nullptr) {
    absl::StatusOr<std::optional<std::string_view>> bytes = source->Bytes(t, field);
    if (!bytes.ok()) return bytes.status();
    if (bytes->has_value()) return **bytes;
  }
  return std::string_view(t.data().data(), t.data().size());
}

}  // namespace

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v1::F32;
    case DType::kF16:
      return v1::F16;
    case DType::kBF16:
      return v1::BF16;
    case DType::kI32:
      return v1::I32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> DTypeFromProto(int dtype, absl::string_view field) {
  switch (dtype) {
    case v1::F32:
      return DType::kF32;
    case v1::F16:
      return DType::kF16;
    case v1::BF16:
      return DType::kBF16;
    case v1::I32:
      return DType::kI32;
    default:
      return InvalidField(field, "F32, F16, BF16 or I32", absl::StrCat(dtype));
  }
}

absl::StatusOr<DType> RequestDTypeFromProto(int dtype, absl::string_view field) {
  if (dtype == v1::DTYPE_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": expected F32, F16 or BF16, got DTYPE_UNSPECIFIED (unset)"));
  }
  if (dtype == v1::I32) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": expected F32, F16 or BF16, got I32 (output only)"));
  }
  absl::StatusOr<DType> known = DTypeFromProto(dtype, field);
  if (known.ok()) return known;
  return InvalidField(field, "F32 (1), F16 (2) or BF16 (3)", absl::StrCat(dtype));
}

namespace {

// `t` as a view of `dtype` (already checked): its shape, and its bytes where
// TensorBytes finds them.
absl::StatusOr<TensorView> View(const v1::Tensor& t, DType dtype, absl::string_view field,
                                const TensorSource* source) {
  absl::StatusOr<std::string_view> bytes = TensorBytes(t, field, source);
  if (!bytes.ok()) return bytes.status();
  TensorView view;
  view.dtype = dtype;
  view.shape.assign(t.shape().begin(), t.shape().end());
  view.data = *bytes;
  return view;
}

}  // namespace

absl::StatusOr<TensorView> ViewFromProto(const v1::Tensor& t, absl::string_view field,
                                         const TensorSource* source) {
  absl::StatusOr<DType> dtype = RequestDTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype"));
  if (!dtype.ok()) return dtype.status();
  return View(t, *dtype, field, source);
}

absl::StatusOr<TensorView> IndexViewFromProto(const v1::Tensor& t, absl::string_view field,
                                              const TensorSource* source) {
  if (t.dtype() != v1::I32) {
    const std::string& name = v1::DType_Name(t.dtype());
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: expected I32, got ",
                                                   t.dtype() == v1::DTYPE_UNSPECIFIED
                                                       ? "DTYPE_UNSPECIFIED (unset)"
                                                   : name.empty() ? absl::StrCat(t.dtype())
                                                                  : name));
  }
  return View(t, DType::kI32, field, source);
}

void ViewToProto(const TensorView& view, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(view.dtype));
  out->mutable_shape()->Assign(view.shape.begin(), view.shape.end());
  out->set_data(view.data.data(), view.data.size());
}

void TensorToProto(Tensor& t, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(t.dtype));
  out->mutable_shape()->Add(t.shape.begin(), t.shape.end());
  out->set_data(std::move(t.data));
}

void OptionsToProto(const AttentionOptions& o, v1::AttentionOptions* po) {
  po->set_scale(o.scale);
  po->set_causal(o.causal);
  po->set_causal_alignment(o.causal_alignment == CausalAlignment::kTopLeft ? v1::TOP_LEFT
                                                                           : v1::BOTTOM_RIGHT);
  // -1 is "unbounded" in the core; on the wire that is simply unset.
  if (o.window_left >= 0) po->set_window_left(o.window_left);
  if (o.window_right >= 0) po->set_window_right(o.window_right);
  po->set_softcap(o.softcap);
  po->mutable_alibi_slopes()->Assign(o.alibi_slopes.begin(), o.alibi_slopes.end());
  po->set_variant(o.variant == Variant::kLinear ? v1::LINEAR : v1::SOFTMAX);
}

absl::StatusOr<AttentionOptions> OptionsFromProto(const v1::AttentionOptions& o) {
  AttentionOptions opt;
  opt.scale = o.scale();
  opt.causal = o.causal();
  switch (o.causal_alignment()) {
    case v1::BOTTOM_RIGHT:
      opt.causal_alignment = CausalAlignment::kBottomRight;
      break;
    case v1::TOP_LEFT:
      opt.causal_alignment = CausalAlignment::kTopLeft;
      break;
    default:
      return InvalidField("options.causal_alignment", "BOTTOM_RIGHT (0) or TOP_LEFT (1)",
                          absl::StrCat(o.causal_alignment()));
  }
  opt.window_left = o.has_window_left() ? o.window_left() : -1;
  opt.window_right = o.has_window_right() ? o.window_right() : -1;
  opt.softcap = o.softcap();
  opt.alibi_slopes.assign(o.alibi_slopes().begin(), o.alibi_slopes().end());
  switch (o.variant()) {
    case v1::SOFTMAX:
      opt.variant = Variant::kSoftmax;
      break;
    case v1::LINEAR:
      opt.variant = Variant::kLinear;
      break;
    default:
      return InvalidField("options.variant", "SOFTMAX (0) or LINEAR (1)",
                          absl::StrCat(o.variant()));
  }
  return opt;
}

void OutputsToProto(const OutputSpec& outputs, v1::OutputSpec* out) {
  out->set_lse(outputs.lse);
  out->set_entropy(outputs.entropy);
  out->set_weights(outputs.weights);
  out->set_top_k(outputs.top_k);
}

OutputSpec OutputsFromProto(const v1::OutputSpec& proto) {
  OutputSpec outputs;
  outputs.lse = proto.lse();
  outputs.entropy = proto.entropy();
  outputs.weights = proto.weights();
  outputs.top_k = proto.top_k();
  return outputs;
}

void SparsityToProto(const SparsitySpec& sparsity, v1::Sparsity* out) {
  if (sparsity.block_mask.has_value()) {
    const BlockMaskSpec& m = *sparsity.block_mask;
    v1::BlockMask* pm = out->mutable_block_mask();
    pm->set_block_rows(m.block_rows);
    pm->set_block_cols(m.block_cols);
    ViewToProto(m.indptr, pm->mutable_indptr());
    ViewToProto(m.indices, pm->mutable_indices());
    if (m.full_indptr.has_value()) ViewToProto(*m.full_indptr, pm->mutable_full_indptr());
    if (m.full_indices.has_value()) ViewToProto(*m.full_indices, pm->mutable_full_indices());
  }
  if (sparsity.key_indices.has_value()) {
    const KeySelectionSpec& k = *sparsity.key_indices;
    v1::KeySelection* pk = out->mutable_key_indices();
    ViewToProto(k.indices, pk->mutable_indices());
    pk->set_query_block(k.query_block);
    pk->set_key_block(k.key_block);
  }
  out->mutable_global_tokens()->Assign(sparsity.global_tokens.begin(),
                                       sparsity.global_tokens.end());
  out->mutable_sink_logits()->Assign(sparsity.sink_logits.begin(), sparsity.sink_logits.end());
}

absl::StatusOr<SparsitySpec> SparsityFromProto(const v1::Sparsity& proto,
                                               const TensorSource* source) {
  SparsitySpec spec;
  if (proto.has_block_mask()) {
    const v1::BlockMask& bm = proto.block_mask();
    BlockMaskSpec mask;
    mask.block_rows = bm.block_rows();
    mask.block_cols = bm.block_cols();
    mask.copy_indices = bm.indptr().has_shm() || bm.indices().has_shm() ||
                        bm.full_indptr().has_shm() || bm.full_indices().has_shm();
    for (auto [tensor, field, view] :
         {std::tuple{&bm.indptr(), "sparsity.block_mask.indptr", &mask.indptr},
          std::tuple{&bm.indices(), "sparsity.block_mask.indices", &mask.indices}}) {
      absl::StatusOr<TensorView> v = IndexViewFromProto(*tensor, field, source);
      if (!v.ok()) return v.status();
      *view = *std::move(v);
    }
    // The full blocks are absent when unset or empty (no shape, no data):
    // some clients write every field.
    for (auto [has, tensor, field, view] :
         {std::tuple{bm.has_full_indptr(), &bm.full_indptr(), "sparsity.block_mask.full_indptr",
                     &mask.full_indptr},
          std::tuple{bm.has_full_indices(), &bm.full_indices(), "sparsity.block_mask.full_indices",
                     &mask.full_indices}}) {
      if (!has || (tensor->shape_size() == 0 && tensor->data().empty() && !tensor->has_shm())) {
        continue;
      }
      absl::StatusOr<TensorView> v = IndexViewFromProto(*tensor, field, source);
      if (!v.ok()) return v.status();
      *view = *std::move(v);
    }
    spec.block_mask = std::move(mask);
  }
  if (proto.has_key_indices()) {
    const v1::KeySelection& ks = proto.key_indices();
    KeySelectionSpec selection;
    absl::StatusOr<TensorView> indices =
        IndexViewFromProto(ks.indices(), "sparsity.key_indices.indices", source);
    if (!indices.ok()) return indices.status();
    selection.indices = *std::move(indices);
    selection.query_block = ks.query_block() == 0 ? 1 : ks.query_block();
    selection.key_block = ks.key_block() == 0 ? 1 : ks.key_block();
    spec.key_indices = std::move(selection);
  }
  spec.global_tokens.assign(proto.global_tokens().begin(), proto.global_tokens().end());
  spec.sink_logits.assign(proto.sink_logits().begin(), proto.sink_logits().end());
  return spec;
}

}  // namespace attnserve
