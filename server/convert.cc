#include "server/convert.h"

#include <algorithm>
#include <new>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/errors.h"
#include "core/half.h"

namespace attnserve {

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
      return InvalidField(absl::StrCat(field, ".style"), "NEOX (0) or GPTJ (1)",
                          absl::StrCat(proto.style()));
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
      return InvalidField(absl::StrCat(field, ".scaling"), "NONE, LINEAR, NTK, DYNAMIC or LLAMA3",
                          absl::StrCat(proto.scaling()));
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
