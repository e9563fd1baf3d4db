// Loading models: SafetensorsFile's parsing and its refusal of malformed
// headers, ParseModelConfig over the families and their options, Model::Load
// over tiny model directories written here (and the golden ones under
// tests/golden/models/), and Model::Random.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "core/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/linear.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tests/unit/golden_files.h"

namespace attnserve {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// Writing test files

// A fresh, empty directory for the running test.
std::filesystem::path TestDir() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                    "model_load_test" /
                                    absl::StrCat(info->test_suite_name(), ".", info->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteFile(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// A safetensors file: the header length as 8 little-endian bytes, the header,
// the data.
std::string SafetensorsBytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xff);
  }
  return out + header + data;
}

struct TensorSpec {
  std::string name;
  std::string dtype;  // "F32", "BF16", ... as written in the header
  std::vector<int64_t> shape;
  std::string bytes;
};

// `values` stored as `dtype` (F32, F16 or BF16).
std::string Encode(const std::vector<float>& values, DType dtype) {
  std::string bytes(values.size() * DTypeSize(dtype), '\0');
  ConvertFloats(values.data(), DType::kF32, bytes.data(), dtype,
                static_cast<int64_t>(values.size()));
  return bytes;
}

// The tensors one after another, named in a header in the same order.
std::string SafetensorsBytes(const std::vector<TensorSpec>& tensors) {
  std::vector<std::string> entries;
  std::string data;
  for (const TensorSpec& t : tensors) {
    entries.push_back(absl::StrCat("\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[",
                                   absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", data.size(),
                                   ",", data.size() + t.bytes.size(), "]}"));
    data += t.bytes;
  }
  entries.push_back("\"__metadata__\":{\"format\":\"pt\"}");
  return SafetensorsBytes(absl::StrCat("{", absl::StrJoin(entries, ","), "}"), data);
}

// Values exact in BF16 and F16 (multiples of 1/64 in [-0.25, 0.25]), different
// for each `seed`, so every tensor of a test model is recognisable.
std::vector<float> Values(int64_t count, int seed) {
  std::vector<float> v(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    v[i] = static_cast<float>((i * 7 + seed * 13) % 33 - 16) / 64.0f;
  }
  return v;
}

// The attention tensors of a model with `config`, under Hugging Face's names,
// with the float value of each kept for checking what was loaded.
class ModelTensors {
 public:
  ModelTensors(const ModelConfig& config, const std::string& prefix, DType dtype)
      : config_(config), dtype_(dtype) {
    for (int32_t l = 0; l < config.num_layers; ++l) {
      if (config.family == ModelFamily::kLlama) {
        AddBlock(absl::StrCat(prefix, "layers.", l, ".self_attn."), "q_proj", "k_proj", "v_proj",
                 "o_proj");
      } else {
        for (const char* block : {"attention", "crossattention"}) {
          if (block == std::string("crossattention") && !config.cross_attention) continue;
          AddBlock(absl::StrCat(prefix, "encoder.layer.", l, ".", block, "."), "self.query",
                   "self.key", "self.value", "output.dense");
        }
      }
    }
  }

  // Adds a tensor no loader reads.
  void AddOther(const std::string& name, std::vector<int64_t> shape,
                const std::string& dtype = "F32") {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    const int64_t size = dtype == "F32" ? 4 : dtype == "I64" ? 8 : 2;
    specs_.push_back(
        {name, dtype, std::move(shape), std::string(static_cast<size_t>(count * size), '\x01')});
  }

  // Replaces a tensor's dtype, shape or bytes, for the error cases.
  TensorSpec& Spec(const std::string& name) {
    for (TensorSpec& t : specs_) {
      if (t.name == name) return t;
    }
    ADD_FAILURE() << "no tensor " << name;
    return specs_.front();
  }
  void Remove(const std::string& name) {
    std::erase_if(specs_, [&](const TensorSpec& t) { return t.name == name; });
  }

  const std::vector<TensorSpec>& specs() const { return specs_; }
  const std::vector<float>& Floats(const std::string& name) const { return floats_.at(name); }

  // Writes config.json and model.safetensors with every tensor.
  void WriteTo(const std::filesystem::path& dir, const std::string& config_json) const {
    WriteFile(dir / "config.json", config_json);
    WriteFile(dir / "model.safetensors", SafetensorsBytes(specs_));
  }

 private:
  void AddBlock(const std::string& base, const char* q, const char* k, const char* v,
                const char* o) {
    const int64_t hidden = config_.hidden_size;
    const int64_t q_out = int64_t{config_.num_heads} * config_.head_dim;
    const int64_t kv_out = int64_t{config_.num_kv_heads} * config_.head_dim;
    const struct {
      const char* name;
      int64_t out, in;
      bool bias;
    } projections[] = {{q, q_out, hidden, config_.qkv_bias},
                       {k, kv_out, hidden, config_.qkv_bias},
                       {v, kv_out, hidden, config_.qkv_bias},
                       {o, hidden, q_out, config_.o_bias}};
    for (const auto& p : projections) {
      Add(absl::StrCat(base, p.name, ".weight"), {p.out, p.in});
      if (p.bias) Add(absl::StrCat(base, p.name, ".bias"), {p.out});
    }
    if (config_.qk_norm) {
      Add(base + "q_norm.weight", {config_.head_dim});
      Add(base + "k_norm.weight", {config_.head_dim});
    }
  }

  void Add(const std::string& name, std::vector<int64_t> shape) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    std::vector<float> values = Values(count, static_cast<int>(specs_.size()) + 1);
    specs_.push_back({name, DTypeName(dtype_), std::move(shape), Encode(values, dtype_)});
    floats_[name] = std::move(values);
  }

  ModelConfig config_;
  DType dtype_;
  std::vector<TensorSpec> specs_;
  std::map<std::string, std::vector<float>> floats_;
};

ModelConfig MustParse(const std::string& json) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, "test/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? *config : ModelConfig{};
}

// Runs `linear` on the identity, whose row j is then column j of W plus b,
// and compares with `weight` [out, in] and `bias` (empty: none).
void ExpectHolds(const Linear& linear, const std::vector<float>& weight,
                 const std::vector<float>& bias) {
  const int64_t out = linear.out_features(), in = linear.in_features();
  ASSERT_EQ(static_cast<int64_t>(weight.size()), out * in);
  ASSERT_EQ(linear.has_bias(), !bias.empty());
  std::vector<float> x(static_cast<size_t>(in * in), 0.0f), y(static_cast<size_t>(in * out));
  for (int64_t j = 0; j < in; ++j) x[j * in + j] = 1.0f;
  ASSERT_TRUE(linear.Run(x.data(), in, y.data()).ok());
  for (int64_t j = 0; j < in; ++j) {
    for (int64_t o = 0; o < out; ++o) {
      const float want = weight[o * in + j] + (bias.empty() ? 0.0f : bias[o]);
      ASSERT_FLOAT_EQ(y[j * out + o], want) << "row " << o << ", column " << j;
    }
  }
}

// ---------------------------------------------------------------------------
// SafetensorsFile

TEST(SafetensorsTest, ReadsDtypeShapeAndBytes) {
  const std::filesystem::path path = TestDir() / "t.safetensors";
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  WriteFile(path, SafetensorsBytes({{"a", "F32", {2, 3}, Encode(a, DType::kF32)},
                                    {"b.weight", "BF16", {2}, Encode({0.5f, -2.0f}, DType::kBF16)},
                                    {"scalar", "I64", {}, std::string(8, '\0')},
                                    {"empty", "F16", {0, 3}, ""}}));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path.string());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path.string());
  EXPECT_EQ((*file)->tensors().size(), 4u);  // not __metadata__

  const SafetensorsEntry* e = (*file)->Find("a");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype, "F32");
  EXPECT_EQ(e->shape, (std::vector<int64_t>{2, 3}));
  ASSERT_EQ(e->bytes, 24);
  std::vector<float> back(6);
  std::memcpy(back.data(), e->data, 24);
  EXPECT_EQ(back, a);

  e = (*file)->Find("b.weight");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->bytes, 4);
  EXPECT_EQ(LoadFloat(e->data, DType::kBF16, 1), -2.0f);
  EXPECT_EQ((*file)->Find("scalar")->shape, std::vector<int64_t>{});
  EXPECT_EQ((*file)->Find("empty")->bytes, 0);
  EXPECT_EQ((*file)->Find("missing"), nullptr);
}

TEST(SafetensorsTest, UnknownDtypesAreKeptWithoutASizeCheck) {
  // Sub-byte and newer dtypes: the loader reads their bytes only if it uses them.
  const std::filesystem::path path = TestDir() / "t.safetensors";
  WriteFile(path,
            SafetensorsBytes("{\"packed\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}",
                             std::string(2, '\0')));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path.string());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("packed")->bytes, 2);
}

TEST(SafetensorsTest, UnreadableFileIsFailedPrecondition) {
  const std::string missing = (TestDir() / "absent.safetensors").string();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(missing);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(file.status().message(), HasSubstr(missing));

  const std::string dir = TestDir().string();
  file = SafetensorsFile::Open(dir);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(file.status().message(), HasSubstr(dir));
}

TEST(SafetensorsTest, RejectsMalformedFiles) {
  // A header whose length field is `length` rather than its own size.
  const auto with_length = [](uint64_t length, const std::string& rest) {
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((length >> (8 * i)) & 0xff);
    return out + rest;
  };
  const auto one = [](const std::string& entry, size_t data_bytes = 24) {
    return SafetensorsBytes(absl::StrCat("{\"t\":", entry, "}"), std::string(data_bytes, '\0'));
  };
  const struct {
    const char* what;
    std::string bytes;
    std::vector<std::string> message;
  } cases[] = {
      {"empty file", "", {"shorter than the 8-byte header length"}},
      {"seven bytes", "1234567", {"7 bytes"}},
      {"header past the end", with_length(100, "{}"), {"header length 100"}},
      {"absurd header length",
       with_length(uint64_t{1} << 63, "{}"),
       {"header length 9223372036854775808"}},
      {"not JSON", SafetensorsBytes("{\"t\": [", ""), {"not JSON"}},
      {"not an object", SafetensorsBytes("[1, 2]", ""), {"not a JSON object"}},
      {"entry not an object", one("3"), {"tensor t: expected an object"}},
      {"no dtype", one(R"({"shape":[6],"data_offsets":[0,24]})"), {"tensor t: dtype: missing"}},
      {"dtype not a string",
       one(R"({"dtype":4,"shape":[6],"data_offsets":[0,24]})"),
       {"tensor t: dtype"}},
      {"no shape", one(R"({"dtype":"F32","data_offsets":[0,24]})"), {"tensor t: shape: missing"}},
      {"shape not an array",
       one(R"({"dtype":"F32","shape":6,"data_offsets":[0,24]})"),
       {"tensor t: shape"}},
      {"negative dim",
       one(R"({"dtype":"F32","shape":[-6],"data_offsets":[0,24]})"),
       {"tensor t: shape: expected non-negative integers"}},
      {"fractional dim",
       one(R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,24]})"),
       {"tensor t: shape"}},
      {"dim past int64",
       one(R"({"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,24]})"),
       {"tensor t: shape"}},
      {"overflowing shape",
       one(R"({"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,24]})"),
       {"tensor t: shape: element count overflows"}},
      {"overflowing bytes",
       one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,24]})"),
       {"tensor t:", "bytes for F64"}},
      {"no offsets", one(R"({"dtype":"F32","shape":[6]})"), {"tensor t: data_offsets: missing"}},
      {"one offset",
       one(R"({"dtype":"F32","shape":[6],"data_offsets":[24]})"),
       {"tensor t: data_offsets"}},
      {"negative offset",
       one(R"({"dtype":"F32","shape":[6],"data_offsets":[-4,20]})"),
       {"tensor t: data_offsets"}},
      {"end past the data",
       one(R"({"dtype":"F32","shape":[6],"data_offsets":[0,24]})", 20),
       {"tensor t: data_offsets: [0, 24] is not a byte range within the data (20 bytes)"}},
      {"begin after end",
       one(R"({"dtype":"F32","shape":[0],"data_offsets":[8,4]})"),
       {"tensor t: data_offsets: [8, 4]"}},
      {"too few bytes",
       one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,20]})"),
       {"tensor t: 20 bytes for F32 [2, 3], expected 6 elements x 4 bytes"}},
      {"BF16 counted as F32",
       one(R"({"dtype":"BF16","shape":[6],"data_offsets":[0,24]})"),
       {"tensor t: 24 bytes for BF16 [6]"}},
      {"metadata not an object", SafetensorsBytes(R"({"__metadata__":[1]})", ""), {"__metadata__"}},
  };
  const std::filesystem::path dir = TestDir();
  int index = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string path = (dir / absl::StrCat("case", index++, ".safetensors")).string();
    WriteFile(path, c.bytes);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_THAT(file.status().message(), HasSubstr(path));
    for (const std::string& part : c.message) EXPECT_THAT(file.status().message(), HasSubstr(part));
  }
}

// ---------------------------------------------------------------------------
// ParseModelConfig

constexpr char kLlamaConfig[] = R"({
  "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
  "num_hidden_layers": 32, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"
})";

TEST(ModelConfigTest, FamilyNames) {
  EXPECT_STREQ(ModelFamilyName(ModelFamily::kLlama), "llama");
  EXPECT_STREQ(ModelFamilyName(ModelFamily::kBert), "bert");
}

TEST(ModelConfigTest, LlamaDefaults) {
  const ModelConfig c = MustParse(kLlamaConfig);
  EXPECT_EQ(c.family, ModelFamily::kLlama);
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 32);  // num_key_value_heads absent: MHA
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.head_dim, 128);  // hidden_size / num_attention_heads
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-6);
  EXPECT_TRUE(c.causal);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_FALSE(c.cross_attention);
  ASSERT_TRUE(c.rope.has_value());
  EXPECT_DOUBLE_EQ(c.rope->theta, 10000.0);
  EXPECT_EQ(c.rope->rotary_dim, 128);
  EXPECT_EQ(c.rope->style, RopeStyle::kNeox);
  EXPECT_EQ(c.rope->scaling, RopeScaling::kNone);
}

TEST(ModelConfigTest, LlamaGqaBiasEpsAndTheta) {
  const ModelConfig c = MustParse(R"({
    "model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 16, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "attention_bias": true, "rope_scaling": null})");
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.o_bias);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope->theta, 500000.0);
  EXPECT_EQ(c.rope->scaling, RopeScaling::kNone);
}

TEST(ModelConfigTest, MistralSlidingWindow) {
  const std::string base =
      R"("model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "head_dim": 128)";
  EXPECT_EQ(MustParse(absl::StrCat("{", base, R"(, "sliding_window": 4096})")).sliding_window,
            4096);
  EXPECT_EQ(MustParse(absl::StrCat("{", base, R"(, "sliding_window": null})")).sliding_window, 0);
  EXPECT_EQ(MustParse(absl::StrCat("{", base, "}")).sliding_window, 0);
  // Only Mistral's: Qwen2 writes one that use_sliding_window switches off.
  EXPECT_EQ(MustParse(R"({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 1, "sliding_window": 32768, "use_sliding_window": false})")
                .sliding_window,
            0);
}

TEST(ModelConfigTest, Qwen2HasQkvBiasesOnly) {
  const ModelConfig c = MustParse(R"({"model_type": "qwen2", "hidden_size": 896,
    "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
    "rope_theta": 1000000.0, "attention_bias": true})");
  EXPECT_EQ(c.family, ModelFamily::kLlama);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
}

TEST(ModelConfigTest, Qwen3HasQkNormAndItsOwnHeadDim) {
  const ModelConfig c = MustParse(R"({"model_type": "qwen3", "hidden_size": 1024,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "num_hidden_layers": 28, "attention_bias": false, "rope_scaling": null})");
  EXPECT_EQ(c.head_dim, 128);  // not 1024 / 16
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.rope->rotary_dim, 128);
}

TEST(ModelConfigTest, RopeScalingVariants) {
  const struct {
    const char* what;
    std::string extra;  // keys added to a llama config
    RopeScaling scaling;
    double factor;
    int32_t original_max_positions;
    double low, high;
  } cases[] = {
      {"absent", "", RopeScaling::kNone, 1, 0, 1, 4},
      {"null", R"("rope_scaling": null)", RopeScaling::kNone, 1, 0, 1, 4},
      {"default", R"("rope_scaling": {"rope_type": "default"})", RopeScaling::kNone, 1, 0, 1, 4},
      {"linear", R"("rope_scaling": {"rope_type": "linear", "factor": 2.0})", RopeScaling::kLinear,
       2, 0, 1, 4},
      {"legacy type key", R"("rope_scaling": {"type": "linear", "factor": 4})",
       RopeScaling::kLinear, 4, 0, 1, 4},
      {"dynamic",
       R"("rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048})",
       RopeScaling::kDynamic, 2, 2048, 1, 4},
      {"dynamic from max_position_embeddings",
       R"("rope_scaling": {"rope_type": "dynamic", "factor": 3.0}, "max_position_embeddings": 4096)",
       RopeScaling::kDynamic, 3, 4096, 1, 4},
      {"llama3",
       R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})",
       RopeScaling::kLlama3, 8, 8192, 1, 4},
      {"llama3 other bands",
       R"("rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
          "high_freq_factor": 8.0, "original_max_position_embeddings": 8192})",
       RopeScaling::kLlama3, 32, 8192, 2, 8},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    std::string json = R"({"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
                           "num_hidden_layers": 2)";
    if (!c.extra.empty()) absl::StrAppend(&json, ", ", c.extra);
    json += "}";
    const ModelConfig config = MustParse(json);
    ASSERT_TRUE(config.rope.has_value());
    EXPECT_EQ(config.rope->scaling, c.scaling);
    EXPECT_DOUBLE_EQ(config.rope->factor, c.factor);
    EXPECT_EQ(config.rope->original_max_positions, c.original_max_positions);
    EXPECT_DOUBLE_EQ(config.rope->low_freq_factor, c.low);
    EXPECT_DOUBLE_EQ(config.rope->high_freq_factor, c.high);
  }
}

TEST(ModelConfigTest, PartialRotaryFactorShortensTheRotaryDims) {
  const ModelConfig c = MustParse(R"({"model_type": "llama", "hidden_size": 512,
    "num_attention_heads": 4, "num_hidden_layers": 1, "partial_rotary_factor": 0.25})");
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope->rotary_dim, 32);
}

TEST(ModelConfigTest, BertAndRoberta) {
  for (const char* type : {"bert", "roberta"}) {
    SCOPED_TRACE(type);
    const ModelConfig c =
        MustParse(absl::StrCat(R"({"model_type": ")", type, R"(", "hidden_size": 768,
      "num_attention_heads": 12, "num_hidden_layers": 12, "num_key_value_heads": 4,
      "position_embedding_type": "absolute", "layer_norm_eps": 1e-12})"));
    EXPECT_EQ(c.family, ModelFamily::kBert);
    EXPECT_EQ(c.model_type, type);
    EXPECT_EQ(c.num_kv_heads, 12);  // bert attention is MHA
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_TRUE(c.qkv_bias);
    EXPECT_TRUE(c.o_bias);
    EXPECT_FALSE(c.qk_norm);
    EXPECT_FALSE(c.rope.has_value());
    EXPECT_FALSE(c.causal);
    EXPECT_FALSE(c.cross_attention);
  }
  EXPECT_TRUE(MustParse(R"({"model_type": "bert", "hidden_size": 48, "num_attention_heads": 4,
    "num_hidden_layers": 2, "is_decoder": true, "add_cross_attention": true})")
                  .cross_attention);
}

TEST(ModelConfigTest, RejectsBadConfigs) {
  const std::string llama = R"("model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2)";
  const std::string bert = R"("model_type": "bert", "hidden_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2)";
  // Replaces `key`'s value in a llama config, or adds the key.
  const auto llama_with = [&](const std::string& keys) {
    return absl::StrCat("{", llama, ", ", keys, "}");
  };
  const struct {
    const char* what;
    std::string json;
    std::string message;
  } cases[] = {
      {"not JSON", "{\"model_type\": ", "test/config.json: not JSON"},
      {"not an object", "[]", "test/config.json: not a JSON object"},
      {"unknown family", R"({"model_type": "gpt2"})",
       R"(test/config.json: model_type: expected one of llama, mistral, qwen2, qwen3, bert, roberta, got "gpt2")"},
      {"no model_type", "{}", "model_type: expected one of"},
      {"model_type not a string", R"({"model_type": 3})",
       "model_type: expected one of llama, mistral, qwen2, qwen3, bert, roberta, got 3"},
      {"no hidden_size",
       R"({"model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2})",
       "test/config.json: hidden_size: expected an integer in [1, 65536], got nothing"},
      {"hidden_size a string",
       R"({"model_type": "llama", "hidden_size": "64", "num_attention_heads": 4,
         "num_hidden_layers": 2})",
       "hidden_size: expected an integer in [1, 65536], got \"64\""},
      {"hidden_size fractional",
       R"({"model_type": "llama", "hidden_size": 64.5, "num_attention_heads": 4,
         "num_hidden_layers": 2})",
       "hidden_size: expected an integer"},
      {"hidden_size too large",
       R"({"model_type": "llama", "hidden_size": 131072, "num_attention_heads": 4,
         "num_hidden_layers": 2})",
       "hidden_size: expected an integer in [1, 65536], got 131072"},
      {"zero heads", R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0,
         "num_hidden_layers": 2})",
       "num_attention_heads: expected an integer in [1, 1024], got 0"},
      {"negative layers", R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": -1})",
       "num_hidden_layers: expected an integer in [1, 1024], got -1"},
      {"huge layers", R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 18446744073709551615})",
       "num_hidden_layers: expected an integer in [1, 1024]"},
      {"kv heads not dividing", llama_with(R"("num_key_value_heads": 3)"),
       "num_key_value_heads: expected a divisor of num_attention_heads (4), got 3"},
      {"more kv heads than heads", llama_with(R"("num_key_value_heads": 8)"),
       "num_key_value_heads: expected an integer in [1, 4], got 8"},
      {"hidden not divisible",
       R"({"model_type": "llama", "hidden_size": 66, "num_attention_heads": 4,
         "num_hidden_layers": 2})",
       "hidden_size: expected a multiple of num_attention_heads (4) when head_dim is absent, got "
       "66"},
      {"head_dim zero", llama_with(R"("head_dim": 0)"),
       "head_dim: expected an integer in [1, 1024], got 0"},
      {"eps negative", llama_with(R"("rms_norm_eps": -1e-6)"),
       "rms_norm_eps: expected a number in (0, 1)"},
      {"eps a string", llama_with(R"("rms_norm_eps": "1e-6")"), "rms_norm_eps: expected a number"},
      {"attention_bias a string", llama_with(R"("attention_bias": "yes")"),
       "attention_bias: expected true or false, got \"yes\""},
      {"theta too small", llama_with(R"("rope_theta": 1)"),
       "rope_theta: expected a number > 1, got 1"},
      {"rope_scaling a string", llama_with(R"("rope_scaling": "linear")"),
       "rope_scaling: expected an object or null, got \"linear\""},
      {"yarn", llama_with(R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})"),
       "test/config.json: rope_scaling.rope_type: expected one of default, linear, dynamic, "
       "llama3, got \"yarn\""},
      {"legacy longrope", llama_with(R"("rope_scaling": {"type": "longrope", "factor": 4.0})"),
       "rope_scaling.type: expected one of default, linear, dynamic, llama3, got \"longrope\""},
      {"no rope_type", llama_with(R"("rope_scaling": {"factor": 4.0})"),
       "rope_scaling.rope_type: expected one of default, linear, dynamic, llama3, got nothing"},
      {"linear without factor", llama_with(R"("rope_scaling": {"rope_type": "linear"})"),
       "rope_scaling.factor: expected a number, got nothing"},
      {"factor below 1", llama_with(R"("rope_scaling": {"rope_type": "linear", "factor": 0.5})"),
       "rope_scaling.factor: expected a number >= 1, got 0.5"},
      {"dynamic without a length",
       llama_with(R"("rope_scaling": {"rope_type": "dynamic", "factor": 2})"),
       "rope_scaling.original_max_position_embeddings: expected a positive integer"},
      {"llama3 without bands",
       llama_with(
           R"("rope_scaling": {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 8192})"),
       "rope_scaling.low_freq_factor: expected a number, got nothing"},
      {"llama3 bands reversed",
       llama_with(R"("rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                      "high_freq_factor": 1, "original_max_position_embeddings": 8192})"),
       "test/config.json: rope."},
      {"partial_rotary_factor zero", llama_with(R"("partial_rotary_factor": 0)"),
       "partial_rotary_factor: expected a number in (0, 1]"},
      {"no rotary dims left", llama_with(R"("partial_rotary_factor": 0.01)"),
       "partial_rotary_factor: expected a number in (0, 1] leaving at least one pair of 16 dims to "
       "rotate"},
      {"odd rotary dims", llama_with(R"("partial_rotary_factor": 0.35)"),
       "test/config.json: rope.rotary_dim"},
      {"sliding_window negative",
       R"({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
          "sliding_window": -4})",
       "sliding_window: expected an integer in [0, 2147483647], got -4"},
      {"relative positions",
       absl::StrCat("{", bert, R"(, "position_embedding_type": "relative_key"})"),
       "test/config.json: position_embedding_type: expected \"absolute\""},
      {"add_cross_attention a number", absl::StrCat("{", bert, R"(, "add_cross_attention": 1})"),
       "add_cross_attention: expected true or false, got 1"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    absl::StatusOr<ModelConfig> config = ParseModelConfig(c.json, "test/config.json");
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(config.status().message(), HasSubstr("test/config.json: "));
    EXPECT_THAT(config.status().message(), HasSubstr(c.message));
  }
}

// ---------------------------------------------------------------------------
// Model::Load

// Two layers, GQA (2 query heads per key head), q/k/v and o biases.
constexpr char kTinyLlama[] = R"({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
  "num_key_value_heads": 1, "num_hidden_layers": 2, "attention_bias": true})";
constexpr char kTinyQwen3[] = R"({"model_type": "qwen3", "hidden_size": 8, "num_attention_heads": 2,
  "num_key_value_heads": 1, "head_dim": 6, "num_hidden_layers": 2})";
constexpr char kTinyBertCross[] =
    R"({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
  "num_hidden_layers": 2, "add_cross_attention": true})";

// Every projection and norm of `w` holds the values `tensors` has under `base`.
void ExpectBlockHolds(const AttentionWeights& w, const ModelTensors& tensors,
                      const ModelConfig& config, const std::string& base,
                      const std::vector<std::string>& projections) {
  const Linear* linears[] = {w.q.get(), w.k.get(), w.v.get(), w.o.get()};
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(projections[i]);
    ASSERT_NE(linears[i], nullptr);
    const bool bias = i < 3 ? config.qkv_bias : config.o_bias;
    ExpectHolds(*linears[i], tensors.Floats(base + projections[i] + ".weight"),
                bias ? tensors.Floats(base + projections[i] + ".bias") : std::vector<float>{});
  }
  if (config.qk_norm) {
    EXPECT_EQ(w.q_norm, tensors.Floats(base + "q_norm.weight"));
    EXPECT_EQ(w.k_norm, tensors.Floats(base + "k_norm.weight"));
  } else {
    EXPECT_TRUE(w.q_norm.empty());
    EXPECT_TRUE(w.k_norm.empty());
  }
}

void ExpectLlamaHolds(const Model& model, const ModelTensors& tensors, const std::string& prefix) {
  for (int32_t l = 0; l < model.config().num_layers; ++l) {
    SCOPED_TRACE(absl::StrCat("layer ", l));
    ExpectBlockHolds(model.layer(l).self, tensors, model.config(),
                     absl::StrCat(prefix, "layers.", l, ".self_attn."),
                     {"q_proj", "k_proj", "v_proj", "o_proj"});
    EXPECT_FALSE(model.layer(l).cross.has_value());
  }
}

TEST(ModelLoadTest, LoadsLlamaAndIgnoresOtherTensors) {
  const std::filesystem::path dir = TestDir();
  const ModelConfig config = MustParse(kTinyLlama);
  ModelTensors tensors(config, "model.", DType::kF32);
  tensors.AddOther("model.embed_tokens.weight", {16, 8});
  tensors.AddOther("model.layers.0.mlp.gate_proj.weight", {32, 8});
  tensors.AddOther("model.layers.0.self_attn.rotary_emb.inv_freq", {2},
                   "I64");  // not float: ignored too
  tensors.WriteTo(dir, kTinyLlama);

  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("tiny", dir.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const Model& m = **model;
  EXPECT_EQ(m.name(), "tiny");
  EXPECT_EQ(m.config().model_type, "llama");
  EXPECT_EQ(m.config().num_kv_heads, 1);
  EXPECT_EQ(m.config().head_dim, 4);
  EXPECT_EQ(m.weights_dtype(), DType::kF32);
  const AttentionWeights& w = m.layer(1).self;
  EXPECT_EQ(w.q->out_features(), 8);
  EXPECT_EQ(w.q->in_features(), 8);
  EXPECT_EQ(w.k->out_features(), 4);
  EXPECT_EQ(w.v->out_features(), 4);
  EXPECT_EQ(w.o->out_features(), 8);
  EXPECT_EQ(w.o->in_features(), 8);
  ExpectLlamaHolds(m, tensors, "model.");

  int64_t bytes = 0;
  for (int32_t l = 0; l < 2; ++l) {
    for (const Linear* p : {m.layer(l).self.q.get(), m.layer(l).self.k.get(),
                            m.layer(l).self.v.get(), m.layer(l).self.o.get()}) {
      bytes += p->bytes();
    }
  }
  EXPECT_EQ(m.weight_bytes(), bytes);
  EXPECT_GE(bytes, 2 * (8 * 8 + 4 * 8 * 2 + 8 * 8 + 8 + 4 + 4 + 8) * 4);
}

TEST(ModelLoadTest, LoadsQwen3NormsAsFloatsWithoutThePrefix) {
  const std::filesystem::path dir = TestDir();
  const ModelConfig config = MustParse(kTinyQwen3);
  ModelTensors tensors(config, "", DType::kF16);
  tensors.AddOther("lm_head.weight", {10, 8});
  tensors.WriteTo(dir, kTinyQwen3);

  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("qwen", dir.string());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->weights_dtype(), DType::kF32);  // F16 is always converted
  EXPECT_EQ((*model)->layer(0).self.q->out_features(), 12);
  EXPECT_EQ((*model)->layer(0).self.q_norm.size(), 6u);
  ExpectLlamaHolds(**model, tensors, "");
  const int64_t norms = 2 * 2 * 6 * 4;
  int64_t linears = 0;
  for (int32_t l = 0; l < 2; ++l) {
    const AttentionWeights& w = (*model)->layer(l).self;
    linears += w.q->bytes() + w.k->bytes() + w.v->bytes() + w.o->bytes();
  }
  EXPECT_EQ((*model)->weight_bytes(), linears + norms);
}

TEST(ModelLoadTest, LoadsAModelSplitOverFiles) {
  const std::filesystem::path dir = TestDir();
  const ModelConfig config = MustParse(kTinyLlama);
  ModelTensors tensors(config, "model.", DType::kBF16);
  std::vector<TensorSpec> first, second;
  for (const TensorSpec& t : tensors.specs()) {
    (t.name.starts_with("model.layers.0.") ? first : second).push_back(t);
  }
  WriteFile(dir / "config.json", kTinyLlama);
  WriteFile(dir / "model-00001-of-00002.safetensors", SafetensorsBytes(first));
  WriteFile(dir / "model-00002-of-00002.safetensors", SafetensorsBytes(second));
  WriteFile(dir / "model.safetensors.index.json", "{}");  // not needed: every file is read

  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("split", dir.string());
  ASSERT_TRUE(model.ok()) << model.status();
  ExpectLlamaHolds(**model, tensors, "model.");
}

TEST(ModelLoadTest, LoadsBertWithCrossAttention) {
  for (const char* prefix : {"bert.", ""}) {
    SCOPED_TRACE(prefix);
    const std::filesystem::path dir = TestDir();
    const ModelConfig config = MustParse(kTinyBertCross);
    ModelTensors tensors(config, prefix, DType::kF32);
    tensors.AddOther(absl::StrCat(prefix, "encoder.layer.0.attention.output.LayerNorm.weight"),
                     {8});
    tensors.AddOther(absl::StrCat(prefix, "embeddings.word_embeddings.weight"), {20, 8});
    tensors.WriteTo(dir, kTinyBertCross);

    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bert", dir.string());
    ASSERT_TRUE(model.ok()) << model.status();
    EXPECT_EQ((*model)->config().family, ModelFamily::kBert);
    for (int32_t l = 0; l < 2; ++l) {
      SCOPED_TRACE(absl::StrCat("layer ", l));
      const LayerWeights& layer = (*model)->layer(l);
      ExpectBlockHolds(layer.self, tensors, config,
                       absl::StrCat(prefix, "encoder.layer.", l, ".attention."),
                       {"self.query", "self.key", "self.value", "output.dense"});
      ASSERT_TRUE(layer.cross.has_value());
      ExpectBlockHolds(*layer.cross, tensors, config,
                       absl::StrCat(prefix, "encoder.layer.", l, ".crossattention."),
                       {"self.query", "self.key", "self.value", "output.dense"});
    }
  }
}

TEST(ModelLoadTest, Bf16WeightsStayBf16WhereTheCpuHasBf16Matmuls) {
  const std::filesystem::path dir = TestDir();
  const ModelConfig config = MustParse(kTinyLlama);
  ModelTensors tensors(config, "model.", DType::kBF16);
  tensors.WriteTo(dir, kTinyLlama);

  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bf16", dir.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const DType expected = CpuHasBf16Matmul() ? DType::kBF16 : DType::kF32;
  EXPECT_EQ((*model)->weights_dtype(), expected);
  EXPECT_EQ((*model)->layer(0).self.q->dtype(), expected);
  ExpectLlamaHolds(**model, tensors, "model.");  // the values are exact in BF16

  model = Model::Load("bf16", dir.string(), ModelLoadOptions{.allow_bf16 = false});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->weights_dtype(), DType::kF32);
  EXPECT_EQ((*model)->layer(0).self.q->dtype(), DType::kF32);

  // One F32 weight among BF16 ones: all F32.
  ModelTensors mixed(config, "model.", DType::kBF16);
  TensorSpec& v = mixed.Spec("model.layers.1.self_attn.v_proj.weight");
  v.dtype = "F32";
  v.bytes = Encode(mixed.Floats(v.name), DType::kF32);
  TensorSpec& vb = mixed.Spec("model.layers.1.self_attn.v_proj.bias");
  vb.dtype = "F32";
  vb.bytes = Encode(mixed.Floats(vb.name), DType::kF32);
  mixed.WriteTo(dir, kTinyLlama);
  model = Model::Load("mixed", dir.string());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->weights_dtype(), DType::kF32);
  ExpectLlamaHolds(**model, mixed, "model.");
}

TEST(ModelLoadTest, UnreadableDirectoryIsFailedPrecondition) {
  const std::filesystem::path dir = TestDir();
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("none", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(model.status().message(), HasSubstr((dir / "config.json").string()));

  WriteFile(dir / "config.json", kTinyLlama);
  model = Model::Load("none", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(model.status().message(),
              AllOf(HasSubstr(dir.string()), HasSubstr("no *.safetensors files")));

  // A .safetensors name on something that is not a file is not a weights file.
  std::filesystem::create_directory(dir / "odd.safetensors");
  model = Model::Load("none", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ModelLoadTest, BadConfigNamesTheConfigFile) {
  const std::filesystem::path dir = TestDir();
  ModelTensors(MustParse(kTinyLlama), "model.", DType::kF32)
      .WriteTo(dir, R"({"model_type": "gpt_neox", "hidden_size": 8})");
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bad", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr(absl::StrCat((dir / "config.json").string(),
                                                               ": model_type: expected one of")));
}

TEST(ModelLoadTest, MalformedSafetensorsNamesTheFile) {
  const std::filesystem::path dir = TestDir();
  ModelTensors(MustParse(kTinyLlama), "model.", DType::kF32).WriteTo(dir, kTinyLlama);
  WriteFile(dir / "extra.safetensors", SafetensorsBytes("{not json", ""));
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bad", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr((dir / "extra.safetensors").string()));
}

TEST(ModelLoadTest, RejectsMissingMisshapenAndMistypedTensors) {
  const std::filesystem::path dir = TestDir();
  const std::string file = (dir / "model.safetensors").string();
  const ModelConfig config = MustParse(kTinyLlama);
  const std::string k = "model.layers.1.self_attn.k_proj.weight";
  const struct {
    const char* what;
    void (*change)(ModelTensors&);
    std::string message;
  } cases[] = {
      {"missing weight",
       [](ModelTensors& t) { t.Remove("model.layers.1.self_attn.k_proj.weight"); },
       absl::StrCat(dir.string(), ": tensor ", k, ": missing")},
      {"missing bias", [](ModelTensors& t) { t.Remove("model.layers.0.self_attn.o_proj.bias"); },
       absl::StrCat(dir.string(), ": tensor model.layers.0.self_attn.o_proj.bias: missing")},
      {"transposed",
       [](ModelTensors& t) {
         t.Spec("model.layers.1.self_attn.k_proj.weight").shape = {8, 4};
       },
       absl::StrCat(file, ": tensor ", k, ": expected shape [4, 8], got [8, 4]")},
      {"bias of the wrong length",
       [](ModelTensors& t) {
         TensorSpec& b = t.Spec("model.layers.0.self_attn.q_proj.bias");
         b.shape = {4};
         b.bytes.resize(16);
       },
       absl::StrCat(file,
                    ": tensor model.layers.0.self_attn.q_proj.bias: expected shape [8], got [4]")},
      {"integer weight",
       [](ModelTensors& t) {
         TensorSpec& s = t.Spec("model.layers.1.self_attn.k_proj.weight");
         s.dtype = "I32";
       },
       absl::StrCat(file, ": tensor ", k, ": expected dtype F32, F16 or BF16, got I32")},
      {"bias in another dtype",
       [](ModelTensors& t) {
         TensorSpec& b = t.Spec("model.layers.0.self_attn.v_proj.bias");
         b.dtype = "F16";
         b.bytes.resize(b.bytes.size() / 2);
       },
       absl::StrCat(file,
                    ": tensor model.layers.0.self_attn.v_proj.bias: dtype F16 differs from "
                    "model.layers.0.self_attn.v_proj.weight's F32")},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    ModelTensors tensors(config, "model.", DType::kF32);
    c.change(tensors);
    tensors.WriteTo(dir, kTinyLlama);
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bad", dir.string());
    ASSERT_FALSE(model.ok());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(model.status().message(), HasSubstr(c.message));
  }
}

TEST(ModelLoadTest, MissingNormNamesIt) {
  const std::filesystem::path dir = TestDir();
  ModelTensors tensors(MustParse(kTinyQwen3), "model.", DType::kBF16);
  tensors.Remove("model.layers.1.self_attn.k_norm.weight");
  tensors.WriteTo(dir, kTinyQwen3);
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bad", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr(absl::StrCat(dir.string(),
                                     ": tensor model.layers.1.self_attn.k_norm.weight: missing")));
}

TEST(ModelLoadTest, MissingCrossAttentionNamesIt) {
  const std::filesystem::path dir = TestDir();
  ModelTensors tensors(MustParse(kTinyBertCross), "roberta.", DType::kF32);
  tensors.Remove("roberta.encoder.layer.1.crossattention.output.dense.bias");
  tensors.WriteTo(dir, absl::StrReplaceAll(kTinyBertCross, {{"\"bert\"", "\"roberta\""}}));
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("bad", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      model.status().message(),
      HasSubstr("tensor roberta.encoder.layer.1.crossattention.output.dense.bias: missing"));
}

TEST(ModelLoadTest, NoTensorsAtAllNamesTheUsualSpelling) {
  const std::filesystem::path dir = TestDir();
  WriteFile(dir / "config.json", kTinyLlama);
  WriteFile(dir / "model.safetensors", SafetensorsBytes(std::vector<TensorSpec>{}));
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("empty", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr(absl::StrCat(dir.string(),
                                     ": tensor model.layers.0.self_attn.q_proj.weight: missing")));
}

TEST(ModelLoadTest, TensorInTwoFilesNamesBoth) {
  const std::filesystem::path dir = TestDir();
  ModelTensors tensors(MustParse(kTinyLlama), "model.", DType::kF32);
  tensors.WriteTo(dir, kTinyLlama);
  WriteFile(dir / "more.safetensors",
            SafetensorsBytes({tensors.Spec("model.layers.1.self_attn.o_proj.weight")}));
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("twice", dir.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              AllOf(HasSubstr("tensor model.layers.1.self_attn.o_proj.weight"),
                    HasSubstr((dir / "model.safetensors").string()),
                    HasSubstr((dir / "more.safetensors").string())));
}

// Every case under tests/golden/models/ (written by generate.py) loads with
// the configuration its config.json describes.
TEST(ModelLoadTest, GoldenModelsLoad) {
  struct Expected {
    ModelFamily family;
    int32_t hidden, heads, kv_heads, head_dim;
    bool qkv_bias, o_bias, qk_norm;
    int32_t sliding_window;
    RopeScaling scaling;
    bool cross;
    DType stored;
  };
  const std::map<std::string, Expected> expected = {
      {"mistral_window",
       {ModelFamily::kLlama, 64, 4, 2, 16, false, false, false, 4, RopeScaling::kNone, false,
        DType::kF32}},
      {"llama3_scaled",
       {ModelFamily::kLlama, 64, 4, 1, 16, true, true, false, 0, RopeScaling::kLlama3, false,
        DType::kF32}},
      {"qwen3_qknorm_bf16",
       {ModelFamily::kLlama, 64, 4, 2, 32, false, false, true, 0, RopeScaling::kNone, false,
        DType::kBF16}},
      {"qwen2_bias_f16_sharded",
       {ModelFamily::kLlama, 64, 4, 2, 16, true, false, false, 0, RopeScaling::kNone, false,
        DType::kF16}},
      {"bert_cross",
       {ModelFamily::kBert, 48, 4, 4, 12, true, true, false, 0, RopeScaling::kNone, true,
        DType::kF32}},
  };
  const std::vector<std::string> names = golden::CaseNames("models");
  if (names.empty()) GTEST_SKIP() << "no golden models under " << golden::Dir("models");
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const std::filesystem::path dir = golden::Dir("models") / name;
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(name, dir.string());
    ASSERT_TRUE(model.ok()) << model.status();
    const ModelConfig& c = (*model)->config();
    EXPECT_EQ(c.num_layers, 2);
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const LayerWeights& layer = (*model)->layer(l);
      EXPECT_EQ(layer.self.q->out_features(), int64_t{c.num_heads} * c.head_dim);
      EXPECT_EQ(layer.self.k->out_features(), int64_t{c.num_kv_heads} * c.head_dim);
      EXPECT_EQ(layer.self.o->in_features(), int64_t{c.num_heads} * c.head_dim);
      EXPECT_EQ(layer.cross.has_value(), c.cross_attention);
    }
    const auto it = expected.find(name);
    if (it == expected.end()) continue;  // a newer case: loading is the check
    const Expected& e = it->second;
    EXPECT_EQ(c.family, e.family);
    EXPECT_EQ(c.hidden_size, e.hidden);
    EXPECT_EQ(c.num_heads, e.heads);
    EXPECT_EQ(c.num_kv_heads, e.kv_heads);
    EXPECT_EQ(c.head_dim, e.head_dim);
    EXPECT_EQ(c.qkv_bias, e.qkv_bias);
    EXPECT_EQ(c.o_bias, e.o_bias);
    EXPECT_EQ(c.qk_norm, e.qk_norm);
    EXPECT_EQ(c.sliding_window, e.sliding_window);
    EXPECT_EQ(c.causal, e.family == ModelFamily::kLlama);
    EXPECT_EQ(c.cross_attention, e.cross);
    EXPECT_EQ(c.rope.has_value(), e.family == ModelFamily::kLlama);
    if (c.rope) {
      EXPECT_EQ(c.rope->scaling, e.scaling);
    }
    const bool bf16 = e.stored == DType::kBF16 && CpuHasBf16Matmul();
    EXPECT_EQ((*model)->weights_dtype(), bf16 ? DType::kBF16 : DType::kF32);
  }
}

// ---------------------------------------------------------------------------
// Model::Random

TEST(ModelLoadTest, RandomMakesTheConfiguredShapes) {
  ModelConfig config =
      MustParse(R"({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 3})");
  config.qk_norm = true;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Random("random", config, DType::kF32, 7);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->name(), "random");
  EXPECT_EQ((*model)->weights_dtype(), DType::kF32);
  int64_t bytes = 0;
  for (int32_t l = 0; l < 3; ++l) {
    const LayerWeights& layer = (*model)->layer(l);
    EXPECT_EQ(layer.self.q->out_features(), 128);
    EXPECT_EQ(layer.self.q->in_features(), 64);
    EXPECT_EQ(layer.self.k->out_features(), 32);
    EXPECT_EQ(layer.self.v->out_features(), 32);
    EXPECT_EQ(layer.self.o->out_features(), 64);
    EXPECT_EQ(layer.self.o->in_features(), 128);
    EXPECT_TRUE(layer.self.q->has_bias());
    EXPECT_FALSE(layer.self.o->has_bias());
    ASSERT_EQ(layer.self.q_norm.size(), 16u);
    for (float g : layer.self.q_norm) EXPECT_NEAR(g, 1.0f, 0.1f);
    EXPECT_FALSE(layer.cross.has_value());
    bytes += layer.self.q->bytes() + layer.self.k->bytes() + layer.self.v->bytes() +
             layer.self.o->bytes();
  }
  EXPECT_EQ((*model)->weight_bytes(), bytes + 3 * 2 * 16 * 4);

  // Outputs stay within what ±1/sqrt(in) weights allow: |y| <= sum |x| / sqrt(in) + |b|.
  std::vector<float> x(64, 1.0f), y(128);
  ASSERT_TRUE((*model)->layer(0).self.q->Run(x.data(), 1, y.data()).ok());
  for (float v : y) EXPECT_LE(std::abs(v), 64 / 8.0f + 0.125f);
}

TEST(ModelLoadTest, RandomIsDeterministicPerSeed) {
  const ModelConfig config = MustParse(kTinyBertCross);
  const auto output = [&](uint64_t seed) {
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Random("r", config, DType::kF32, seed);
    EXPECT_TRUE(model.ok()) << model.status();
    EXPECT_TRUE((*model)->layer(1).cross.has_value());
    std::vector<float> x(8, 0.5f), y(8);
    EXPECT_TRUE((*model)->layer(1).cross->v->Run(x.data(), 1, y.data()).ok());
    return y;
  };
  EXPECT_EQ(output(1), output(1));
  EXPECT_NE(output(1), output(2));
}

TEST(ModelLoadTest, RandomKeepsBf16WeightsWhereTheCpuHasBf16Matmuls) {
  if (!CpuHasBf16Matmul()) GTEST_SKIP() << "no AVX-512 BF16 on this CPU";
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::Random("r", MustParse(kTinyLlama), DType::kBF16, 1);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->weights_dtype(), DType::kBF16);
  EXPECT_EQ((*model)->layer(0).self.q->dtype(), DType::kBF16);
}

TEST(ModelLoadTest, RandomRejectsBadConfigs) {
  const ModelConfig good = MustParse(kTinyLlama);
  const struct {
    const char* what;
    void (*change)(ModelConfig&);
    DType weights;
    const char* message;
  } cases[] = {
      {"no layers", [](ModelConfig& c) { c.num_layers = 0; }, DType::kF32, "num_layers"},
      {"no hidden size", [](ModelConfig& c) { c.hidden_size = 0; }, DType::kF32, "hidden_size"},
      {"kv heads not dividing", [](ModelConfig& c) { c.num_kv_heads = 3; }, DType::kF32,
       "num_kv_heads"},
      {"no head_dim", [](ModelConfig& c) { c.head_dim = -1; }, DType::kF32, "head_dim"},
      {"odd rotary dims", [](ModelConfig& c) { c.rope->rotary_dim = 3; }, DType::kF32,
       "rope.rotary_dim"},
      {"F16 weights", [](ModelConfig&) {}, DType::kF16, "weights: expected F32 or BF16, got F16"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    ModelConfig config = good;
    c.change(config);
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Random("r", config, c.weights, 1);
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(model.status().message(), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace attnserve
