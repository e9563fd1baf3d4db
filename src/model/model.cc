// Loading a model directory: config.json decides the family, sizes and RoPE;
// the safetensors files supply the attention tensors, found by the names
// Hugging Face's modeling code gives them. Loading checks every tensor it
// will use (present, shape, dtype) before it copies any, so a bad directory
// fails fast and names what is wrong.
#include "model/model.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "core/half.h"
#include "model/safetensors.h"

namespace attnserve {
namespace {

using Json = nlohmann::json;

// Bounds that no current model reaches, so a typo cannot ask for terabytes.
constexpr int64_t kMaxHiddenSize = 65536;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeadDim = 1024;  // JobOptions::max_head_dim's default
constexpr int64_t kMaxPositions = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------
// config.json

// Reads the keys of one JSON object, with errors that name the file and the
// key ("<path>: rope_scaling.factor: expected a number >= 1, got 0.5").
// Absent and null keys are alike: both leave the default.
class ConfigReader {
 public:
  ConfigReader(const Json& object, const std::string& path, std::string scope = "")
      : object_(object), path_(path), scope_(std::move(scope)) {}

  bool Has(absl::string_view key) const { return Get(key) != nullptr; }

  absl::Status Invalid(absl::string_view key, absl::string_view expected) const {
    const Json* value = Get(key);
    std::string got = value == nullptr ? "nothing" : value->dump();
    constexpr size_t kMaxShown = 80;
    if (got.size() > kMaxShown) got = absl::StrCat(got.substr(0, kMaxShown), "...");
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": ", scope_, key, ": expected ", expected, ", got ", got));
  }

  // An integer in [lo, hi]; left alone when absent unless `required`.
  absl::Status Int(absl::string_view key, int64_t lo, int64_t hi, int32_t& out,
                   bool required = false) const {
    const Json* value = Get(key);
    if (value == nullptr && !required) return absl::OkStatus();
    const std::string expected = absl::StrCat("an integer in [", lo, ", ", hi, "]");
    if (value == nullptr || !value->is_number_integer()) return Invalid(key, expected);
    // Unsigned values past int64's range are out of range whatever `hi` is.
    if (value->is_number_unsigned() &&
        value->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Invalid(key, expected);
    }
    const int64_t v = value->get<int64_t>();
    if (v < lo || v > hi) return Invalid(key, expected);
    out = static_cast<int32_t>(v);
    return absl::OkStatus();
  }

  absl::Status Number(absl::string_view key, double& out, bool required = false) const {
    const Json* value = Get(key);
    if (value == nullptr && !required) return absl::OkStatus();
    if (value == nullptr || !value->is_number()) return Invalid(key, "a number");
    out = value->get<double>();
    return absl::OkStatus();
  }

  absl::Status Bool(absl::string_view key, bool& out) const {
    const Json* value = Get(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_boolean()) return Invalid(key, "true or false");
    out = value->get<bool>();
    return absl::OkStatus();
  }

  absl::Status String(absl::string_view key, std::string& out) const {
    const Json* value = Get(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_string()) return Invalid(key, "a string");
    out = value->get<std::string>();
    return absl::OkStatus();
  }

  const Json* Get(absl::string_view key) const {
    const auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

 private:
  const Json& object_;
  const std::string& path_;
  std::string scope_;  // "rope_scaling." for keys of that object
};

absl::Status ParseFamily(const ConfigReader& reader, ModelConfig& config) {
  static constexpr std::pair<const char*, ModelFamily> kFamilies[] = {
      {"llama", ModelFamily::kLlama}, {"mistral", ModelFamily::kLlama},
      {"qwen2", ModelFamily::kLlama}, {"qwen3", ModelFamily::kLlama},
      {"bert", ModelFamily::kBert},   {"roberta", ModelFamily::kBert},
  };
  const Json* type = reader.Get("model_type");
  if (type != nullptr && type->is_string()) {
    for (const auto& [name, family] : kFamilies) {
      if (name == type->get<std::string>()) {
        config.model_type = name;
        config.family = family;
        return absl::OkStatus();
      }
    }
  }
  return reader.Invalid("model_type", "one of llama, mistral, qwen2, qwen3, bert, roberta");
}

absl::Status ParseSizes(const ConfigReader& reader, ModelConfig& config) {
  if (absl::Status s = reader.Int("hidden_size", 1, kMaxHiddenSize, config.hidden_size, true);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = reader.Int("num_attention_heads", 1, kMaxHeads, config.num_heads, true);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = reader.Int("num_hidden_layers", 1, kMaxLayers, config.num_layers, true);
      !s.ok()) {
    return s;
  }

  config.num_kv_heads = config.num_heads;
  if (config.family == ModelFamily::kLlama) {
    if (absl::Status s =
            reader.Int("num_key_value_heads", 1, config.num_heads, config.num_kv_heads);
        !s.ok()) {
      return s;
    }
    if (config.num_heads % config.num_kv_heads != 0) {
      return reader.Invalid(
          "num_key_value_heads",
          absl::StrCat("a divisor of num_attention_heads (", config.num_heads, ")"));
    }
  }

  if (reader.Has("head_dim")) {
    if (absl::Status s = reader.Int("head_dim", 1, kMaxHeadDim, config.head_dim); !s.ok()) return s;
  } else {
    if (config.hidden_size % config.num_heads != 0) {
      return reader.Invalid("hidden_size",
                            absl::StrCat("a multiple of num_attention_heads (", config.num_heads,
                                         ") when head_dim is absent"));
    }
    config.head_dim = config.hidden_size / config.num_heads;
    if (config.head_dim > kMaxHeadDim) {
      return reader.Invalid(
          "hidden_size",
          absl::StrCat("at most ", kMaxHeadDim, " per head (hidden_size / num_attention_heads)"));
    }
  }

  config.norm_eps = 1e-6;
  if (absl::Status s = reader.Number("rms_norm_eps", config.norm_eps); !s.ok()) return s;
  if (!(config.norm_eps > 0 && config.norm_eps < 1)) {
    return reader.Invalid("rms_norm_eps", "a number in (0, 1)");
  }
  return absl::OkStatus();
}

// rope_scaling's "rope_type" (or its older name "type") and its parameters.
absl::Status ParseRopeScaling(const ConfigReader& reader, const std::string& path,
                              RopeConfig& rope) {
  const Json* scaling = reader.Get("rope_scaling");
  if (scaling == nullptr) return absl::OkStatus();
  if (!scaling->is_object()) return reader.Invalid("rope_scaling", "an object or null");
  const ConfigReader inner(*scaling, path, "rope_scaling.");

  std::string type;
  const char* type_key = inner.Has("rope_type") || !inner.Has("type") ? "rope_type" : "type";
  if (absl::Status s = inner.String(type_key, type); !s.ok()) return s;
  if (type == "default") return absl::OkStatus();
  if (type == "linear") {
    rope.scaling = RopeScaling::kLinear;
  } else if (type == "dynamic") {
    rope.scaling = RopeScaling::kDynamic;
  } else if (type == "llama3") {
    rope.scaling = RopeScaling::kLlama3;
  } else {
    return inner.Invalid(type_key, "one of default, linear, dynamic, llama3");
  }

  if (absl::Status s = inner.Number("factor", rope.factor, true); !s.ok()) return s;
  if (!(rope.factor >= 1)) return inner.Invalid("factor", "a number >= 1");
  if (rope.scaling == RopeScaling::kLinear) return absl::OkStatus();

  if (inner.Has("original_max_position_embeddings")) {
    if (absl::Status s = inner.Int("original_max_position_embeddings", 1, kMaxPositions,
                                   rope.original_max_positions);
        !s.ok()) {
      return s;
    }
  } else if (rope.scaling == RopeScaling::kDynamic && reader.Has("max_position_embeddings")) {
    if (absl::Status s =
            reader.Int("max_position_embeddings", 1, kMaxPositions, rope.original_max_positions);
        !s.ok()) {
      return s;
    }
  } else {
    return inner.Invalid("original_max_position_embeddings",
                         rope.scaling == RopeScaling::kDynamic
                             ? "a positive integer (here or as max_position_embeddings)"
                             : "a positive integer");
  }
  if (rope.scaling == RopeScaling::kDynamic) return absl::OkStatus();

  if (absl::Status s = inner.Number("low_freq_factor", rope.low_freq_factor, true); !s.ok()) {
    return s;
  }
  return inner.Number("high_freq_factor", rope.high_freq_factor, true);
}

absl::Status ParseRope(const ConfigReader& reader, const std::string& path, ModelConfig& config) {
  RopeConfig rope;
  rope.style = RopeStyle::kNeox;  // Hugging Face's rotate_half pairs the halves
  if (absl::Status s = reader.Number("rope_theta", rope.theta); !s.ok()) return s;
  if (!(rope.theta > 1)) return reader.Invalid("rope_theta", "a number > 1");
  if (absl::Status s = ParseRopeScaling(reader, path, rope); !s.ok()) return s;

  double partial = 1.0;
  if (absl::Status s = reader.Number("partial_rotary_factor", partial); !s.ok()) return s;
  if (!(partial > 0 && partial <= 1)) {
    return reader.Invalid("partial_rotary_factor", "a number in (0, 1]");
  }
  rope.rotary_dim =
      static_cast<int32_t>(config.head_dim * partial);  // truncated, as transformers does
  if (rope.rotary_dim == 0) {  // which ValidateRope would read as "all of head_dim"
    return reader.Invalid("partial_rotary_factor",
                          absl::StrCat("a number in (0, 1] leaving at least one pair of ",
                                       config.head_dim, " dims to rotate"));
  }

  const std::string field = absl::StrCat(path, ": rope");
  if (absl::Status s = ValidateRope(rope, config.head_dim, field.c_str()); !s.ok()) return s;
  config.rope = rope;
  return absl::OkStatus();
}

absl::Status ParseLlamaAttention(const ConfigReader& reader, const std::string& path,
                                 ModelConfig& config) {
  bool attention_bias = false;
  if (absl::Status s = reader.Bool("attention_bias", attention_bias); !s.ok()) return s;
  // Qwen2 has q/k/v biases whatever attention_bias says, and never an o bias.
  const bool qwen2 = config.model_type == "qwen2";
  config.qkv_bias = qwen2 || attention_bias;
  config.o_bias = !qwen2 && attention_bias;
  config.qk_norm = config.model_type == "qwen3";
  config.causal = true;

  // Only Mistral's modeling code reads sliding_window unconditionally; Qwen2
  // writes one that use_sliding_window usually switches off.
  if (config.model_type == "mistral") {
    if (absl::Status s = reader.Int("sliding_window", 0, std::numeric_limits<int32_t>::max(),
                                    config.sliding_window);
        !s.ok()) {
      return s;
    }
  }
  return ParseRope(reader, path, config);
}

absl::Status ParseBertAttention(const ConfigReader& reader, ModelConfig& config) {
  config.qkv_bias = true;
  config.o_bias = true;
  config.causal = false;
  std::string position = "absolute";
  if (absl::Status s = reader.String("position_embedding_type", position); !s.ok()) return s;
  if (position != "absolute") {
    // relative_key and relative_key_query add a learned distance term to the scores.
    return reader.Invalid("position_embedding_type",
                          "\"absolute\" (relative positions are not supported)");
  }
  return reader.Bool("add_cross_attention", config.cross_attention);
}

// ---------------------------------------------------------------------------
// Tensors

// A tensor and the file it is in, across a model's files.
struct TensorRef {
  const SafetensorsEntry* entry = nullptr;
  const SafetensorsFile* file = nullptr;
};

// Every tensor of a directory's *.safetensors files, by name. Owns the
// mappings.
class TensorIndex {
 public:
  static absl::StatusOr<TensorIndex> Open(const std::string& dir) {
    std::vector<std::string> paths;
    std::error_code ec;
    for (const auto& item : std::filesystem::directory_iterator(dir, ec)) {
      std::error_code file_ec;
      if (item.path().extension() == ".safetensors" && item.is_regular_file(file_ec)) {
        paths.push_back(item.path().string());
      }
    }
    if (ec) {
      return absl::FailedPreconditionError(absl::StrCat(dir, ": cannot list: ", ec.message()));
    }
    if (paths.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(dir, ": no *.safetensors files"));
    }
    std::sort(paths.begin(), paths.end());

    TensorIndex index;
    for (const std::string& path : paths) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
      if (!file.ok()) return file.status();
      for (const auto& [name, entry] : (*file)->tensors()) {
        const auto [it, added] = index.tensors_.try_emplace(name, TensorRef{&entry, file->get()});
        if (!added) {
          return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor ", name, ": in both ",
                                                         it->second.file->path(), " and ", path));
        }
      }
      index.files_.push_back(*std::move(file));
    }
    return index;
  }

  const TensorRef* Find(const std::string& name) const {
    const auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  absl::flat_hash_map<std::string, TensorRef> tensors_;  // entries point into files_
};

std::optional<DType> FloatDType(const std::string& name) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (name == DTypeName(t)) return t;
  }
  return std::nullopt;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The names of one attention block's tensors, without ".weight"/".bias".
struct AttentionNames {
  std::string q, k, v, o;
  std::string q_norm, k_norm;  // empty when the model has none
};

AttentionNames LlamaNames(const std::string& prefix, int32_t layer, bool qk_norm) {
  const std::string base = absl::StrCat(prefix, "layers.", layer, ".self_attn.");
  AttentionNames names{base + "q_proj", base + "k_proj", base + "v_proj", base + "o_proj", "", ""};
  if (qk_norm) {
    names.q_norm = base + "q_norm";
    names.k_norm = base + "k_norm";
  }
  return names;
}

// `block` is "attention" or "crossattention".
AttentionNames BertNames(const std::string& prefix, int32_t layer, absl::string_view block) {
  const std::string base = absl::StrCat(prefix, "encoder.layer.", layer, ".", block, ".");
  return {
      base + "self.query", base + "self.key", base + "self.value", base + "output.dense", "", ""};
}

// The prefix ("model.", "bert.", ...) under which layer 0's query weight is
// stored; the first candidate when none is, so that the missing-tensor error
// names the usual spelling.
std::string DetectPrefix(const TensorIndex& index, const ModelConfig& config) {
  std::vector<std::string> candidates;
  if (config.family == ModelFamily::kLlama) {
    candidates = {"model.", ""};
  } else if (config.model_type == "roberta") {
    candidates = {"roberta.", "bert.", ""};
  } else {
    candidates = {"bert.", "roberta.", ""};
  }
  for (const std::string& prefix : candidates) {
    const AttentionNames names = config.family == ModelFamily::kLlama
                                     ? LlamaNames(prefix, 0, false)
                                     : BertNames(prefix, 0, "attention");
    if (index.Find(names.q + ".weight") != nullptr) return prefix;
  }
  return candidates.front();
}

// A tensor that must be there with this shape and a float dtype.
absl::StatusOr<TensorRef> Require(const TensorIndex& index, const std::string& dir,
                                  const std::string& name, const std::vector<int64_t>& shape) {
  const TensorRef* ref = index.Find(name);
  if (ref == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor ", name, ": missing"));
  }
  const std::string& path = ref->file->path();
  if (ref->entry->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, ": expected shape ",
                                                   ShapeString(shape), ", got ",
                                                   ShapeString(ref->entry->shape)));
  }
  if (!FloatDType(ref->entry->dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": tensor ", name, ": expected dtype F32, F16 or BF16, got ", ref->entry->dtype));
  }
  return *ref;
}

// One projection's tensors, checked, not yet copied.
struct ProjectionTensors {
  std::string name;  // without ".weight"
  TensorRef weight;
  TensorRef bias;  // entry null when there is none
  DType dtype = DType::kF32;
  int64_t out = 0, in = 0;
};

absl::StatusOr<ProjectionTensors> FindProjection(const TensorIndex& index, const std::string& dir,
                                                 const std::string& name, int64_t out, int64_t in,
                                                 bool bias) {
  ProjectionTensors p{name, {}, {}, DType::kF32, out, in};
  absl::StatusOr<TensorRef> weight = Require(index, dir, name + ".weight", {out, in});
  if (!weight.ok()) return weight.status();
  p.weight = *weight;
  p.dtype = *FloatDType(p.weight.entry->dtype);
  if (!bias) return p;

  absl::StatusOr<TensorRef> b = Require(index, dir, name + ".bias", {out});
  if (!b.ok()) return b.status();
  if (b->entry->dtype != p.weight.entry->dtype) {
    // Linear takes weight and bias in one source dtype.
    return absl::InvalidArgumentError(
        absl::StrCat(b->file->path(), ": tensor ", name, ".bias: dtype ", b->entry->dtype,
                     " differs from ", name, ".weight's ", p.weight.entry->dtype));
  }
  p.bias = *b;
  return p;
}

// One attention block's tensors, checked.
struct AttentionTensors {
  ProjectionTensors q, k, v, o;
  TensorRef q_norm, k_norm;  // entries null without qk_norm
};

absl::StatusOr<AttentionTensors> FindAttention(const TensorIndex& index, const std::string& dir,
                                               const AttentionNames& names,
                                               const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = int64_t{config.num_heads} * config.head_dim;
  const int64_t kv_out = int64_t{config.num_kv_heads} * config.head_dim;
  AttentionTensors t;
  const struct {
    ProjectionTensors* dst;
    const std::string& name;
    int64_t out, in;
    bool bias;
  } projections[] = {{&t.q, names.q, q_out, hidden, config.qkv_bias},
                     {&t.k, names.k, kv_out, hidden, config.qkv_bias},
                     {&t.v, names.v, kv_out, hidden, config.qkv_bias},
                     {&t.o, names.o, hidden, q_out, config.o_bias}};
  for (const auto& p : projections) {
    absl::StatusOr<ProjectionTensors> found =
        FindProjection(index, dir, p.name, p.out, p.in, p.bias);
    if (!found.ok()) return found.status();
    *p.dst = *std::move(found);
  }
  if (!names.q_norm.empty()) {
    for (const auto& [dst, name] :
         {std::pair{&t.q_norm, &names.q_norm}, std::pair{&t.k_norm, &names.k_norm}}) {
      absl::StatusOr<TensorRef> norm = Require(index, dir, *name + ".weight", {config.head_dim});
      if (!norm.ok()) return norm.status();
      *dst = *norm;
    }
  }
  return t;
}

// Keeps `status`'s code, with `context` in front of its message.
absl::Status WithContext(const absl::Status& status, absl::string_view context) {
  return absl::Status(status.code(), absl::StrCat(context, status.message()));
}

absl::StatusOr<std::unique_ptr<Linear>> MakeLinear(const ProjectionTensors& p, DType compute) {
  absl::StatusOr<std::unique_ptr<Linear>> linear =
      Linear::Create(p.dtype, p.weight.entry->data, p.bias.entry ? p.bias.entry->data : nullptr,
                     p.out, p.in, compute);
  if (!linear.ok()) {
    return WithContext(linear.status(),
                       absl::StrCat(p.weight.file->path(), ": tensor ", p.name, ".weight: "));
  }
  return linear;
}

std::vector<float> ToFloats(const TensorRef& ref) {
  const SafetensorsEntry& e = *ref.entry;
  const DType dtype = *FloatDType(e.dtype);
  std::vector<float> out(static_cast<size_t>(e.bytes / static_cast<int64_t>(DTypeSize(dtype))));
  ConvertFloats(e.data, dtype, out.data(), DType::kF32, static_cast<int64_t>(out.size()));
  return out;
}

absl::StatusOr<AttentionWeights> BuildAttention(const AttentionTensors& t, DType compute) {
  AttentionWeights w;
  for (const auto& [dst, src] : {std::pair{&w.q, &t.q}, std::pair{&w.k, &t.k},
                                 std::pair{&w.v, &t.v}, std::pair{&w.o, &t.o}}) {
    absl::StatusOr<std::unique_ptr<Linear>> linear = MakeLinear(*src, compute);
    if (!linear.ok()) return linear.status();
    *dst = *std::move(linear);
  }
  if (t.q_norm.entry != nullptr) {
    w.q_norm = ToFloats(t.q_norm);
    w.k_norm = ToFloats(t.k_norm);
  }
  return w;
}

// ---------------------------------------------------------------------------
// Random weights

// SplitMix64 (Steele, Lea and Flood, 2014): a few arithmetic operations per
// 64 bits, so the tens of millions of values a 7B-sized layer needs take tens
// of milliseconds; every seed gives a different stream.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // n values uniform in [-bound, bound), two 24-bit draws per call.
  void FillUniform(float bound, float* out, int64_t n) {
    constexpr float kUnit = 1.0f / (1 << 23);  // maps [0, 2^24) to [0, 2)
    for (int64_t i = 0; i < n; i += 2) {
      const uint64_t r = Next();
      out[i] = (static_cast<float>(r >> 40) * kUnit - 1.0f) * bound;
      if (i + 1 < n) out[i + 1] = (static_cast<float>((r >> 16) & 0xffffff) * kUnit - 1.0f) * bound;
    }
  }

 private:
  uint64_t state_;
};

absl::StatusOr<std::unique_ptr<Linear>> RandomLinear(SplitMix64& rng, int64_t out, int64_t in,
                                                     bool bias, DType compute,
                                                     std::vector<float>& scratch) {
  const float bound = 1.0f / std::sqrt(static_cast<float>(in));
  scratch.resize(static_cast<size_t>(out * in + (bias ? out : 0)));
  rng.FillUniform(bound, scratch.data(), static_cast<int64_t>(scratch.size()));
  return Linear::Create(DType::kF32, scratch.data(), bias ? scratch.data() + out * in : nullptr,
                        out, in, compute);
}

absl::StatusOr<AttentionWeights> RandomAttention(SplitMix64& rng, const ModelConfig& config,
                                                 DType compute, std::vector<float>& scratch) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_out = int64_t{config.num_heads} * config.head_dim;
  const int64_t kv_out = int64_t{config.num_kv_heads} * config.head_dim;
  AttentionWeights w;
  const struct {
    std::unique_ptr<Linear>* dst;
    int64_t out, in;
    bool bias;
  } projections[] = {{&w.q, q_out, hidden, config.qkv_bias},
                     {&w.k, kv_out, hidden, config.qkv_bias},
                     {&w.v, kv_out, hidden, config.qkv_bias},
                     {&w.o, hidden, q_out, config.o_bias}};
  for (const auto& p : projections) {
    absl::StatusOr<std::unique_ptr<Linear>> linear =
        RandomLinear(rng, p.out, p.in, p.bias, compute, scratch);
    if (!linear.ok()) return linear.status();
    *p.dst = *std::move(linear);
  }
  if (config.qk_norm) {
    for (std::vector<float>* norm : {&w.q_norm, &w.k_norm}) {
      norm->resize(static_cast<size_t>(config.head_dim));
      rng.FillUniform(0.1f, norm->data(), config.head_dim);
      for (float& x : *norm) x += 1.0f;  // near the identity, as trained norms are
    }
  }
  return w;
}

absl::Status CheckRandomConfig(ModelConfig& config, DType weights) {
  const auto invalid = [](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("random model: ", what));
  };
  const struct {
    const char* name;
    int32_t value;
    int64_t max;
  } sizes[] = {{"num_layers", config.num_layers, kMaxLayers},
               {"hidden_size", config.hidden_size, kMaxHiddenSize},
               {"num_heads", config.num_heads, kMaxHeads},
               {"num_kv_heads", config.num_kv_heads, kMaxHeads},
               {"head_dim", config.head_dim, kMaxHeadDim}};
  for (const auto& s : sizes) {
    if (s.value < 1 || s.value > s.max) {
      return invalid(
          absl::StrCat(s.name, ": expected an integer in [1, ", s.max, "], got ", s.value));
    }
  }
  if (config.num_heads % config.num_kv_heads != 0) {
    return invalid(absl::StrCat("num_kv_heads: expected a divisor of num_heads (", config.num_heads,
                                "), got ", config.num_kv_heads));
  }
  if (config.sliding_window < 0) {
    return invalid(absl::StrCat("sliding_window: expected >= 0, got ", config.sliding_window));
  }
  if (weights != DType::kF32 && weights != DType::kBF16) {
    return invalid(absl::StrCat("weights: expected F32 or BF16, got ", DTypeName(weights)));
  }
  if (config.rope) return ValidateRope(*config.rope, config.head_dim, "random model: rope");
  return absl::OkStatus();
}

int64_t AttentionBytes(const AttentionWeights& w) {
  int64_t bytes = 0;
  for (const Linear* linear : {w.q.get(), w.k.get(), w.v.get(), w.o.get()}) {
    if (linear != nullptr) bytes += linear->bytes();
  }
  return bytes + static_cast<int64_t>((w.q_norm.size() + w.k_norm.size()) * sizeof(float));
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::FailedPreconditionError(absl::StrCat(path, ": cannot read"));
  return text;
}

}  // namespace

const char* ModelFamilyName(ModelFamily family) {
  switch (family) {
    case ModelFamily::kLlama:
      return "llama";
    case ModelFamily::kBert:
      return "bert";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& path) {
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  const ConfigReader reader(root, path);

  ModelConfig config;
  if (absl::Status s = ParseFamily(reader, config); !s.ok()) return s;
  if (absl::Status s = ParseSizes(reader, config); !s.ok()) return s;
  absl::Status s = config.family == ModelFamily::kLlama ? ParseLlamaAttention(reader, path, config)
                                                        : ParseBertAttention(reader, config);
  if (!s.ok()) return s;
  return config;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& name, const std::string& dir,
                                                   const ModelLoadOptions& options) {
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  absl::StatusOr<std::string> config_text = ReadFile(config_path);
  if (!config_text.ok()) return config_text.status();
  absl::StatusOr<ModelConfig> config = ParseModelConfig(*config_text, config_path);
  if (!config.ok()) return config.status();

  absl::StatusOr<TensorIndex> index = TensorIndex::Open(dir);
  if (!index.ok()) return index.status();

  // Check every tensor before copying any.
  const std::string prefix = DetectPrefix(*index, *config);
  std::vector<AttentionTensors> self(config->num_layers), cross;
  for (int32_t l = 0; l < config->num_layers; ++l) {
    const AttentionNames names = config->family == ModelFamily::kLlama
                                     ? LlamaNames(prefix, l, config->qk_norm)
                                     : BertNames(prefix, l, "attention");
    absl::StatusOr<AttentionTensors> t = FindAttention(*index, dir, names, *config);
    if (!t.ok()) return t.status();
    self[l] = *std::move(t);
    if (config->cross_attention) {
      absl::StatusOr<AttentionTensors> c =
          FindAttention(*index, dir, BertNames(prefix, l, "crossattention"), *config);
      if (!c.ok()) return c.status();
      cross.push_back(*std::move(c));
    }
  }

  bool all_bf16 = true;
  for (const auto* blocks : {&self, &cross}) {
    for (const AttentionTensors& t : *blocks) {
      for (const ProjectionTensors* p : {&t.q, &t.k, &t.v, &t.o}) {
        all_bf16 &= p->dtype == DType::kBF16;
      }
    }
  }
  const DType compute =
      all_bf16 && options.allow_bf16 && CpuHasBf16Matmul() ? DType::kBF16 : DType::kF32;

  std::unique_ptr<Model> model(new Model());
  model->name_ = name;
  model->config_ = *std::move(config);
  model->weights_dtype_ = compute;
  model->layers_.resize(self.size());
  for (size_t l = 0; l < self.size(); ++l) {
    absl::StatusOr<AttentionWeights> w = BuildAttention(self[l], compute);
    if (!w.ok()) return w.status();
    model->layers_[l].self = *std::move(w);
    if (!cross.empty()) {
      absl::StatusOr<AttentionWeights> c = BuildAttention(cross[l], compute);
      if (!c.ok()) return c.status();
      model->layers_[l].cross = *std::move(c);
    }
  }
  return model;  // the mappings close with `index`; the Linears hold copies
}

absl::StatusOr<std::unique_ptr<Model>> Model::Random(const std::string& name,
                                                     const ModelConfig& config, DType weights,
                                                     uint64_t seed) {
  std::unique_ptr<Model> model(new Model());
  model->name_ = name;
  model->config_ = config;
  model->weights_dtype_ = weights;
  if (absl::Status s = CheckRandomConfig(model->config_, weights); !s.ok()) return s;

  SplitMix64 rng(seed);
  std::vector<float> scratch;
  model->layers_.resize(static_cast<size_t>(config.num_layers));
  for (LayerWeights& layer : model->layers_) {
    absl::StatusOr<AttentionWeights> self = RandomAttention(rng, model->config_, weights, scratch);
    if (!self.ok()) return self.status();
    layer.self = *std::move(self);
    if (config.cross_attention) {
      absl::StatusOr<AttentionWeights> cross =
          RandomAttention(rng, model->config_, weights, scratch);
      if (!cross.ok()) return cross.status();
      layer.cross = *std::move(cross);
    }
  }
  return model;
}

int64_t Model::weight_bytes() const {
  int64_t bytes = 0;
  for (const LayerWeights& layer : layers_) {
    bytes += AttentionBytes(layer.self);
    if (layer.cross) bytes += AttentionBytes(*layer.cross);
  }
  return bytes;
}

}  // namespace attnserve
