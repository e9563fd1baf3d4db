#include "client/shapes.h"

#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/half.h"

namespace attnserve::client {
namespace {

// The benchmark table of docs/ARCHITECTURE.md.
const AttentionShape kBenchmarkShapes[] = {
    {"P1", 4, 512, 12, 512, 12, 64, false},
    {"P2", 1, 2048, 32, 2048, 8, 128, true},
    {"P3", 1, 8192, 8, 8192, 8, 64, true},
    {"P4", 16, 1, 32, 4096, 8, 128, false},
    {"S1", 1, 128, 8, 128, 8, 64, false},
};

constexpr int64_t kMaxDim = int64_t{1} << 24;

}  // namespace

double AttentionShape::flops(bool causal_mask) const {
  double f = 4.0 * batch * heads_q * double(seqlen_q) * seqlen_k * head_dim;
  if (causal_mask && seqlen_q == seqlen_k) f /= 2;
  return f;
}

absl::StatusOr<AttentionShape> ParseAttentionShape(absl::string_view spec) {
  const std::string upper = absl::AsciiStrToUpper(spec);
  for (const AttentionShape& s : kBenchmarkShapes) {
    if (s.name == upper) return s;
  }
  std::vector<absl::string_view> parts = absl::StrSplit(spec, ',');
  std::vector<int64_t> dims;
  for (absl::string_view p : parts) {
    int64_t d = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(p), &d) || d <= 0 || d > kMaxDim) {
      dims.clear();
      break;
    }
    dims.push_back(d);
  }
  if (dims.size() != 6) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shape: expected a benchmark id (P1, P2, P3, P4, S1) or six positive integers "
        "B,Lq,Hq,Lk,Hkv,D (each <= ",
        kMaxDim, "), got \"", spec, "\""));
  }
  AttentionShape s{std::string(spec), dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], false};
  if (s.heads_q % s.heads_kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shape: expected Hq divisible by Hkv, got Hq=", s.heads_q, " Hkv=", s.heads_kv));
  }
  return s;
}

Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, uint64_t seed) {
  Tensor t = Tensor::Zeros(dtype, std::move(shape));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  const int64_t n = t.num_elements();
  for (int64_t i = 0; i < n; ++i) StoreFloat(t.data.data(), dtype, i, uniform(rng));
  return t;
}

absl::StatusOr<Tensor> ConvertTensor(const Tensor& t, DType dtype) {
  if (t.dtype == DType::kI32 || dtype == DType::kI32) {
    return absl::InvalidArgumentError(absl::StrCat("dtype: expected F32, F16 or BF16, got ",
                                                   std::string(DTypeName(DType::kI32))));
  }
  if (t.dtype == dtype) return t;
  Tensor out = Tensor::Zeros(dtype, t.shape);
  const int64_t n = t.num_elements();
  for (int64_t i = 0; i < n; ++i) {
    StoreFloat(out.data.data(), dtype, i, LoadFloat(t.data.data(), t.dtype, i));
  }
  return out;
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "f32" || lower == "float32") return DType::kF32;
  if (lower == "f16" || lower == "float16") return DType::kF16;
  if (lower == "bf16" || lower == "bfloat16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype: expected f32, f16 or bf16, got \"", name, "\""));
}

}  // namespace attnserve::client
