#include "server/convert.h"

#include <algorithm>
#include <new>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/half.h"

namespace attnserve {
namespace {

absl::Status UnknownEnum(absl::string_view field, absl::string_view expected, int got) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": expected ", expected, ", got ", got));
}

}  // namespace

absl::StatusOr<RopeConfig> RopeFromProto(const v1::RotaryEmbedding& proto,
                                         absl::string_view field) {
  RopeConfig c;
  c.theta = proto.theta() == 0 ? 10000.0 : proto.theta();
  c.rotary_dim = proto.rotary_dim();
  switch (proto.style()) {
    case v1::RotaryEmbedding::NEOX:
      c.style = RopeStyle::kNeox;
      break;
    case v1::RotaryEmbedding::GPTJ:
      c.style = RopeStyle::kGptj;
      break;
    default:
      return UnknownEnum(absl::StrCat(field, ".style"), "NEOX (0) or GPTJ (1)", proto.style());
  }
  switch (proto.scaling()) {
    case v1::RotaryEmbedding::NONE:
      c.scaling = RopeScaling::kNone;
      break;
    case v1::RotaryEmbedding::LINEAR:
      c.scaling = RopeScaling::kLinear;
      break;
    case v1::RotaryEmbedding::NTK:
      c.scaling = RopeScaling::kNtk;
      break;
    case v1::RotaryEmbedding::DYNAMIC:
      c.scaling = RopeScaling::kDynamic;
      break;
    case v1::RotaryEmbedding::LLAMA3:
      c.scaling = RopeScaling::kLlama3;
      break;
    default:
      return UnknownEnum(absl::StrCat(field, ".scaling"), "NONE, LINEAR, NTK, DYNAMIC or LLAMA3",
                         proto.scaling());
  }
  c.factor = proto.factor() == 0 ? 1.0 : proto.factor();
  c.original_max_positions = proto.original_max_positions();
  c.low_freq_factor = proto.low_freq_factor();    // <= 0: ValidateRope's default
  c.high_freq_factor = proto.high_freq_factor();
  return c;
}

absl::Status RotatedCopy(const RopeConfig& config, const TensorView& t, int32_t heads,
                         int32_t head_dim, absl::Span<const int64_t> positions,
                         int64_t max_position, DType out_dtype, std::string* out) {
  const int64_t row = int64_t{heads} * head_dim;
  const int64_t tokens = static_cast<int64_t>(positions.size());
  std::vector<float> x;
  try {
    out->assign(tokens * row * DTypeSize(out_dtype), '\0');
    x.resize(std::min<int64_t>(tokens, 4096) * row);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory for the rotated copy of a tensor");
  }
  // In chunks of at most 4096 tokens, so the F32 buffer stays small.
  for (int64_t first = 0; first < tokens; first += 4096) {
    const int64_t n = std::min<int64_t>(4096, tokens - first);
    for (int64_t i = 0; i < n * row; ++i) x[i] = LoadFloat(t.data.data(), t.dtype, first * row + i);
    RotateRope(config, positions.subspan(first, n), heads, head_dim, x.data(), max_position);
    for (int64_t i = 0; i < n * row; ++i) StoreFloat(out->data(), out_dtype, first * row + i, x[i]);
  }
  return absl::OkStatus();
}

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

absl::StatusOr<TensorView> ViewFromProto(const v1::Tensor& t, absl::string_view field,
                                         const TensorSource* source) {
  absl::StatusOr<DType> dtype = RequestDTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype"));
  if (!dtype.ok()) return dtype.status();
  absl::StatusOr<std::string_view> bytes = TensorBytes(t, field, source);
  if (!bytes.ok()) return bytes.status();
  TensorView view;
  view.dtype = *dtype;
  view.shape.assign(t.shape().begin(), t.shape().end());
  view.data = *bytes;
  return view;
}

absl::StatusOr<TensorView> IndexViewFromProto(const v1::Tensor& t, absl::string_view field,
                                              const TensorSource* source) {
  if (t.dtype() != v1::I32) {
    const std::string& name = v1::DType_Name(t.dtype());
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".dtype: expected I32, got ",
        t.dtype() == v1::DTYPE_UNSPECIFIED ? "DTYPE_UNSPECIFIED (unset)"
        : name.empty()                      ? absl::StrCat(t.dtype())
                                            : name));
  }
  absl::StatusOr<std::string_view> bytes = TensorBytes(t, field, source);
  if (!bytes.ok()) return bytes.status();
  TensorView view;
  view.dtype = DType::kI32;
  view.shape.assign(t.shape().begin(), t.shape().end());
  view.data = *bytes;
  return view;
}

absl::StatusOr<SparsitySpec> SparsityFromProto(const v1::Sparsity& proto,
                                               const TensorSource* source) {
  SparsitySpec spec;
  if (proto.has_block_mask()) {
    const v1::BlockMask& bm = proto.block_mask();
    BlockMaskSpec mask;
    mask.block_rows = bm.block_rows();
    mask.block_cols = bm.block_cols();
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
          std::tuple{bm.has_full_indices(), &bm.full_indices(),
                     "sparsity.block_mask.full_indices", &mask.full_indices}}) {
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

void TensorToProto(Tensor& t, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(t.dtype));
  out->mutable_shape()->Add(t.shape.begin(), t.shape.end());
  out->set_data(std::move(t.data));
}

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

absl::StatusOr<DType> RequestDTypeFromProto(int dtype, absl::string_view field) {
  switch (dtype) {
    case v1::F32:
      return DType::kF32;
    case v1::F16:
      return DType::kF16;
    case v1::BF16:
      return DType::kBF16;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": expected F32, F16 or BF16, got DTYPE_UNSPECIFIED (unset)"));
    case v1::I32:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": expected F32, F16 or BF16, got I32 (output only)"));
    default:
      return UnknownEnum(field, "F32 (1), F16 (2) or BF16 (3)", dtype);
  }
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
      return UnknownEnum("options.causal_alignment", "BOTTOM_RIGHT (0) or TOP_LEFT (1)",
                         o.causal_alignment());
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
      return UnknownEnum("options.variant", "SOFTMAX (0) or LINEAR (1)", o.variant());
  }
  return opt;
}

absl::StatusOr<AttentionRequest> RequestFromProto(const v1::AttendRequest& proto,
                                                  const TensorSource* source) {
  AttentionRequest request;
  for (auto [tensor, field, view] :
       {std::tuple{&proto.query(), "query", &request.query},
        std::tuple{&proto.key(), "key", &request.key},
        std::tuple{&proto.value(), "value", &request.value}}) {
    absl::StatusOr<TensorView> v = ViewFromProto(*tensor, field, source);
    if (!v.ok()) return v.status();
    *view = *std::move(v);
  }
  if (proto.has_bias()) {
    absl::StatusOr<TensorView> bias = ViewFromProto(proto.bias(), "bias", source);
    if (!bias.ok()) return bias.status();
    request.bias = *std::move(bias);
  }
  request.key_lengths.assign(proto.key_lengths().begin(), proto.key_lengths().end());
  request.key_offset = proto.key_offset();
  request.total_keys = proto.total_keys();

  absl::StatusOr<AttentionOptions> options = OptionsFromProto(proto.options());
  if (!options.ok()) return options.status();
  request.options = *std::move(options);

  if (proto.has_sparsity()) {
    absl::StatusOr<SparsitySpec> sparsity = SparsityFromProto(proto.sparsity(), source);
    if (!sparsity.ok()) return sparsity.status();
    request.sparsity = *std::move(sparsity);
  }

  request.outputs = OutputsFromProto(proto.outputs());
  return request;
}

OutputSpec OutputsFromProto(const v1::OutputSpec& proto) {
  OutputSpec outputs;
  outputs.lse = proto.lse();
  outputs.entropy = proto.entropy();
  outputs.weights = proto.weights();
  outputs.top_k = proto.top_k();
  return outputs;
}

void JobToProto(AttentionJob& job, v1::AttendResponse* response) {
  TensorToProto(job.output, response->mutable_output());
  OptionalOutputsToProto(job, response);
}

void BackendInfoToProto(const BackendInfo& info, v1::BackendDescription* out) {
  out->set_name(info.name);
  out->set_description(info.description);
  for (DType d : info.dtypes) out->add_dtypes(DTypeToProto(d));
  for (const std::string& f : info.features) out->add_features(f);
  out->set_max_head_dim(info.max_head_dim);
}

void RopeToProto(const RopeConfig& config, v1::RotaryEmbedding* out) {
  out->set_theta(static_cast<float>(config.theta));
  out->set_rotary_dim(config.rotary_dim);
  out->set_style(config.style == RopeStyle::kGptj ? v1::RotaryEmbedding::GPTJ
                                                  : v1::RotaryEmbedding::NEOX);
  switch (config.scaling) {
    case RopeScaling::kNone:
      out->set_scaling(v1::RotaryEmbedding::NONE);
      break;
    case RopeScaling::kLinear:
      out->set_scaling(v1::RotaryEmbedding::LINEAR);
      break;
    case RopeScaling::kNtk:
      out->set_scaling(v1::RotaryEmbedding::NTK);
      break;
    case RopeScaling::kDynamic:
      out->set_scaling(v1::RotaryEmbedding::DYNAMIC);
      break;
    case RopeScaling::kLlama3:
      out->set_scaling(v1::RotaryEmbedding::LLAMA3);
      break;
  }
  if (config.scaling != RopeScaling::kNone) out->set_factor(static_cast<float>(config.factor));
  out->set_original_max_positions(config.original_max_positions);
  if (config.scaling == RopeScaling::kLlama3) {
    out->set_low_freq_factor(static_cast<float>(config.low_freq_factor));
    out->set_high_freq_factor(static_cast<float>(config.high_freq_factor));
  }
}

void ModelToProto(const Model& model, v1::ModelDescription* out) {
  const ModelConfig& c = model.config();
  out->set_name(model.name());
  out->set_family(ModelFamilyName(c.family));
  out->set_model_type(c.model_type);
  out->set_num_layers(c.num_layers);
  out->set_hidden_size(c.hidden_size);
  out->set_num_heads(c.num_heads);
  out->set_num_kv_heads(c.num_kv_heads);
  out->set_head_dim(c.head_dim);
  out->set_dtype(DTypeToProto(model.weights_dtype()));
  out->set_cross_attention(c.cross_attention);
  out->set_causal(c.causal);
  out->set_sliding_window(c.sliding_window);
  out->set_qk_norm(c.qk_norm);
  if (c.rope.has_value()) RopeToProto(*c.rope, out->mutable_rotary());
  out->set_weight_bytes(model.weight_bytes());
}

}  // namespace attnserve
