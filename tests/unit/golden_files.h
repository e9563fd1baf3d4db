// Reading the golden data under tests/golden/ (see its README): the case
// directories of one kind, a case.txt of key=value options, .npy tensors,
// option values, and the attention cases of cases/ and sparse/ as requests
// with their expected outputs. Failures are reported as gtest failures.
#ifndef ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_
#define ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "attention/request.h"
#include "core/half.h"
#include "core/npy.h"
#include "core/tensor.h"
#include "gtest/gtest.h"

namespace attnserve::golden {

// tests/golden/<kind> ("cases", "rope").
inline std::filesystem::path Dir(const std::string& kind) {
  return std::filesystem::path(ATTNSERVE_GOLDEN_DIR) / kind;
}

// The case directories under Dir(kind), sorted.
inline std::vector<std::string> CaseNames(const std::string& kind) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(Dir(kind), ec)) {
    if (entry.is_directory()) names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// A case.txt: one key=value per line.
inline std::map<std::string, std::string> ReadOptions(const std::filesystem::path& path) {
  std::map<std::string, std::string> options;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    EXPECT_NE(eq, std::string::npos) << path << ": line without '=': " << line;
    if (eq == std::string::npos) continue;
    options[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return options;
}

inline Tensor MustRead(const std::filesystem::path& path) {
  absl::StatusOr<Tensor> t = ReadNpy(path.string());
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : Tensor{};
}

inline double ToDouble(const std::string& s) {
  double d = 0;
  EXPECT_TRUE(absl::SimpleAtod(s, &d)) << "not a number: '" << s << "'";
  return d;
}

inline int32_t ToInt(const std::string& s) {
  int32_t i = 0;
  EXPECT_TRUE(absl::SimpleAtoi(s, &i)) << "not an integer: '" << s << "'";
  return i;
}

// core/npy has no int64 dtype, so a positions.npy (1-D <i8) is parsed here:
// the magic, a version 1 (uint16 header length) or 2/3 (uint32) header, then
// little-endian int64 data.
inline std::vector<int64_t> ReadPositions(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    ADD_FAILURE() << path << ": not a .npy file";
    return {};
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    header_start = 10;
  } else {
    for (int i = 3; i >= 0; --i) {
      header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    }
    header_start = 12;
  }
  if (header_start + header_len > bytes.size()) {
    ADD_FAILURE() << path << ": truncated header";
    return {};
  }
  const std::string header = bytes.substr(header_start, header_len);
  EXPECT_NE(header.find("'descr': '<i8'"), std::string::npos) << path;
  EXPECT_NE(header.find("'fortran_order': False"), std::string::npos) << path;
  const size_t shape_at = header.find("'shape': (");
  int64_t count = -1;
  if (shape_at != std::string::npos) {
    const size_t from = shape_at + std::strlen("'shape': (");
    const size_t comma = header.find(',', from);
    EXPECT_TRUE(absl::SimpleAtoi(header.substr(from, comma - from), &count)) << header;
    EXPECT_EQ(header.substr(comma, 2), ",)") << path << ": expected a 1-D shape, got " << header;
  }
  const size_t data_start = header_start + header_len;
  EXPECT_EQ(static_cast<int64_t>(bytes.size() - data_start), count * 8) << path;
  if (count < 0 || static_cast<int64_t>(bytes.size() - data_start) != count * 8) return {};
  std::vector<int64_t> positions(count);
  std::memcpy(positions.data(), bytes.data() + data_start, count * 8);  // little-endian host
  return positions;
}

// An attention case of cases/ or sparse/: inputs, options, the sparse pattern
// and the expected outputs, as read from disk.
struct AttentionCase {
  std::map<std::string, std::string> options;
  Tensor q, k, v;
  std::optional<Tensor> bias;
  // Sparse cases: the pattern's I32 tensors by file stem (block_indptr,
  // block_indices, full_indptr, full_indices, key_indices), the global
  // tokens and the sink logits, and the dense mask (mask.npy) they stand for.
  std::map<std::string, Tensor> pattern;
  std::vector<int64_t> global_tokens;
  std::vector<float> sink_logits;
  std::optional<Tensor> mask;
  std::map<std::string, Tensor> expected;  // file stem -> tensor
};

inline AttentionCase ReadAttentionCase(const std::filesystem::path& dir) {
  AttentionCase c;
  c.options = ReadOptions(dir / "case.txt");
  c.q = MustRead(dir / "q.npy");
  c.k = MustRead(dir / "k.npy");
  c.v = MustRead(dir / "v.npy");
  auto has = [&](const std::string& stem) { return std::filesystem::exists(dir / (stem + ".npy")); };
  if (has("bias")) c.bias = MustRead(dir / "bias.npy");
  for (const char* stem :
       {"block_indptr", "block_indices", "full_indptr", "full_indices", "key_indices"}) {
    if (has(stem)) c.pattern[stem] = MustRead(dir / (std::string(stem) + ".npy"));
  }
  if (has("global_tokens")) c.global_tokens = ReadPositions(dir / "global_tokens.npy");
  if (has("sink_logits")) {
    const Tensor sinks = MustRead(dir / "sink_logits.npy");
    EXPECT_EQ(sinks.dtype, DType::kF32);
    const float* x = sinks.data_as<float>();
    c.sink_logits.assign(x, x + sinks.num_elements());
  }
  if (has("mask")) c.mask = MustRead(dir / "mask.npy");
  for (const char* stem : {"out", "lse", "entropy", "weights", "topk_idx", "topk_w"}) {
    if (has(stem)) c.expected[stem] = MustRead(dir / (std::string(stem) + ".npy"));
  }
  return c;
}

template <typename T>
std::vector<T> ToList(const std::string& s) {
  std::vector<T> out;
  if (s.empty()) return out;
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    if constexpr (std::is_same_v<T, float>) {
      out.push_back(static_cast<float>(ToDouble(std::string(part))));
    } else {
      out.push_back(ToInt(std::string(part)));
    }
  }
  return out;
}

// Builds the request the case describes; its views point into `c`. Every key
// of case.txt must be known, so the generator and the tests cannot drift
// apart silently.
inline AttentionRequest BuildRequest(const AttentionCase& c) {
  AttentionRequest r;
  r.query = c.q.view();
  r.key = c.k.view();
  r.value = c.v.view();
  if (c.bias) r.bias = c.bias->view();
  int32_t block_rows = 0, block_cols = 0, query_block = 1, key_block = 1;
  for (const auto& [key, value] : c.options) {
    if (key == "dtype") {
      // The inputs' own dtype (<f4 or <f2) carries it; checked below.
      EXPECT_EQ(DTypeName(c.q.dtype), value == "f16" ? "F16" : "F32");
    } else if (key == "variant") {
      EXPECT_TRUE(value == "softmax" || value == "linear") << value;
      r.options.variant = value == "linear" ? Variant::kLinear : Variant::kSoftmax;
    } else if (key == "scale") {
      r.options.scale = static_cast<float>(ToDouble(value));
    } else if (key == "causal") {
      r.options.causal = ToInt(value) != 0;
    } else if (key == "alignment") {
      EXPECT_TRUE(value == "bottom_right" || value == "top_left") << value;
      r.options.causal_alignment =
          value == "top_left" ? CausalAlignment::kTopLeft : CausalAlignment::kBottomRight;
    } else if (key == "window_left") {
      r.options.window_left = ToInt(value);
    } else if (key == "window_right") {
      r.options.window_right = ToInt(value);
    } else if (key == "softcap") {
      r.options.softcap = static_cast<float>(ToDouble(value));
    } else if (key == "alibi_slopes") {
      r.options.alibi_slopes = ToList<float>(value);
    } else if (key == "key_lengths") {
      r.key_lengths = ToList<int32_t>(value);
    } else if (key == "top_k") {
      r.outputs.top_k = ToInt(value);
    } else if (key == "lse") {
      r.outputs.lse = ToInt(value) != 0;
    } else if (key == "entropy") {
      r.outputs.entropy = ToInt(value) != 0;
    } else if (key == "weights") {
      r.outputs.weights = ToInt(value) != 0;
    } else if (key == "block_rows") {
      block_rows = ToInt(value);
    } else if (key == "block_cols") {
      block_cols = ToInt(value);
    } else if (key == "query_block") {
      query_block = ToInt(value);
    } else if (key == "key_block") {
      key_block = ToInt(value);
    } else {
      ADD_FAILURE() << "unknown case.txt key '" << key << "'";
    }
  }
  auto pattern = [&](const char* stem) -> std::optional<TensorView> {
    auto it = c.pattern.find(stem);
    if (it == c.pattern.end()) return std::nullopt;
    return it->second.view();
  };
  EXPECT_EQ(block_rows > 0, pattern("block_indptr").has_value());
  if (block_rows > 0 && pattern("block_indptr") && pattern("block_indices")) {
    BlockMaskSpec bm;
    bm.block_rows = block_rows;
    bm.block_cols = block_cols;
    bm.indptr = *pattern("block_indptr");
    bm.indices = *pattern("block_indices");
    bm.full_indptr = pattern("full_indptr");
    bm.full_indices = pattern("full_indices");
    r.sparsity.block_mask = bm;
  }
  if (auto indices = pattern("key_indices")) {
    r.sparsity.key_indices = KeySelectionSpec{*indices, query_block, key_block};
  }
  r.sparsity.global_tokens = c.global_tokens;
  r.sparsity.sink_logits = c.sink_logits;
  return r;
}

// Compares `got` (any dtype) with `want` (read from <f8 as F32) elementwise:
// |got - want| <= rtol·|want| + atol, infinities must match exactly.
inline void ExpectClose(const std::string& what, const Tensor& got, const Tensor& want,
                        double rtol, double atol) {
  ASSERT_EQ(got.shape, want.shape) << what << ": shape " << ShapeString(got.shape) << " vs golden "
                                   << ShapeString(want.shape);
  const int64_t n = want.num_elements();
  int failures = 0;
  for (int64_t i = 0; i < n && failures < 10; ++i) {
    const double g = LoadFloat(got.data.data(), got.dtype, i);
    const double w = LoadFloat(want.data.data(), want.dtype, i);
    const bool ok = std::isinf(w) ? g == w : std::abs(g - w) <= rtol * std::abs(w) + atol;
    if (!ok) {
      ++failures;
      ADD_FAILURE() << what << "[" << i << "]: got " << g << ", golden " << w;
    }
  }
}

inline void ExpectEqualInts(const std::string& what, const Tensor& got, const Tensor& want) {
  ASSERT_EQ(got.dtype, DType::kI32);
  ASSERT_EQ(want.dtype, DType::kI32);
  ASSERT_EQ(got.shape, want.shape) << what;
  const int64_t n = want.num_elements();
  int failures = 0;
  for (int64_t i = 0; i < n && failures < 10; ++i) {
    if (got.data_as<int32_t>()[i] != want.data_as<int32_t>()[i]) {
      ++failures;
      ADD_FAILURE() << what << "[" << i << "]: got " << got.data_as<int32_t>()[i] << ", golden "
                    << want.data_as<int32_t>()[i];
    }
  }
}

}  // namespace attnserve::golden

#endif  // ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_
