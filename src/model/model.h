// Model: the attention weights of a Hugging Face-style model directory
// (config.json and *.safetensors), loaded once at start-up, for AttendLayer
// and model sessions (docs: README, "Layers and models").
//
// Families:
//   llama  config model_type llama, mistral, qwen2, qwen3: GQA, RoPE with the
//          config's rope_theta and rope_scaling, optional q/k/v (and o) bias,
//          optional per-head q/k RMSNorm (qwen3), causal; mistral's
//          sliding_window.
//   bert   model_type bert, roberta: MHA with biases, no RoPE, bidirectional;
//          with add_cross_attention, each layer also has cross-attention
//          weights (keys and values projected from an encoder's output).
// Only the attention tensors are read; the others are ignored.
//
// Immutable after Load; thread-safe.
#ifndef ATTNSERVE_MODEL_MODEL_H_
#define ATTNSERVE_MODEL_MODEL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention/rope.h"
#include "core/dtype.h"
#include "model/linear.h"

namespace attnserve {

enum class ModelFamily : uint8_t { kLlama = 0, kBert = 1 };

const char* ModelFamilyName(ModelFamily family);  // "llama", "bert"

struct ModelConfig {
  ModelFamily family = ModelFamily::kLlama;
  std::string model_type;  // config.json's, e.g. "qwen3"
  int32_t num_layers = 0;
  int32_t hidden_size = 0;
  int32_t num_heads = 0;     // Hq
  int32_t num_kv_heads = 0;  // Hkv (bert: Hq)
  int32_t head_dim = 0;      // D (config head_dim, else hidden_size / num_heads)
  bool qkv_bias = false;     // q/k/v projections have biases
  bool o_bias = false;       // the output projection has a bias
  bool qk_norm = false;      // RMSNorm over each head's q and k (before RoPE)
  double norm_eps = 1e-6;    // rms_norm_eps
  std::optional<RopeConfig> rope;  // llama family; validated for head_dim
  int32_t sliding_window = 0;      // mistral: a query sees the last this-many keys; 0: all
  bool causal = false;             // llama: true; bert: false
  bool cross_attention = false;    // bert with add_cross_attention
};

// Parses config.json's text. INVALID_ARGUMENT naming `path` and the key for
// an unknown family (model_type), a missing or out-of-range size, an
// unsupported rope_scaling or position_embedding_type.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& path);

// One attention block's weights: projections out = x · Wᵀ + b.
struct AttentionWeights {
  std::unique_ptr<Linear> q;  // [Hq·D, hidden]
  std::unique_ptr<Linear> k;  // [Hkv·D, hidden]
  std::unique_ptr<Linear> v;  // [Hkv·D, hidden]
  std::unique_ptr<Linear> o;  // [hidden, Hq·D]
  std::vector<float> q_norm;  // [D] when config.qk_norm
  std::vector<float> k_norm;  // [D] when config.qk_norm
};

struct LayerWeights {
  AttentionWeights self;
  std::optional<AttentionWeights> cross;  // when config.cross_attention
};

struct ModelLoadOptions {
  // BF16 weights stay BF16 (BF16 matmuls, F32 accumulation) when the CPU has
  // AVX-512 BF16; otherwise, and for F16 weights, they are converted to F32.
  bool allow_bf16 = true;
};

class Model {
 public:
  // Loads `dir`/config.json and every `dir`/*.safetensors. Errors name the
  // file and the tensor: FAILED_PRECONDITION for a file that cannot be read,
  // INVALID_ARGUMENT for a bad config, a missing tensor or one of the wrong
  // shape or dtype.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& name,
                                                     const std::string& dir,
                                                     const ModelLoadOptions& options = {});
  // Random weights (uniform in ±1/sqrt(in)), for benchmarks and tests.
  // `weights` is the compute dtype (F32 or BF16). INVALID_ARGUMENT for a bad
  // config.
  static absl::StatusOr<std::unique_ptr<Model>> Random(const std::string& name,
                                                       const ModelConfig& config, DType weights,
                                                       uint64_t seed);

  const std::string& name() const { return name_; }
  const ModelConfig& config() const { return config_; }
  DType weights_dtype() const { return weights_dtype_; }  // F32 or BF16, as computed
  const LayerWeights& layer(int32_t index) const { return layers_[index]; }
  int64_t weight_bytes() const;  // everything held

 private:
  Model() = default;
  std::string name_;
  ModelConfig config_;
  DType weights_dtype_ = DType::kF32;
  std::vector<LayerWeights> layers_;
};

}  // namespace attnserve

#endif  // ATTNSERVE_MODEL_MODEL_H_
