// RandomRequest: an AttentionRequest filled with seeded random data, owning the
// bytes its TensorViews point into. Shared by the backend conformance and batch
// invariance suites. Deterministic for a given (spec, dtype, seed).
#ifndef ATTNSERVE_TESTS_UNIT_RANDOM_REQUEST_H_
#define ATTNSERVE_TESTS_UNIT_RANDOM_REQUEST_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention/request.h"
#include "core/half.h"
#include "core/tensor.h"

namespace attnserve {

struct RequestSpec {
  std::string name;
  int64_t batch = 1;
  int64_t seqlen_q = 1;
  int64_t seqlen_k = 1;
  int64_t heads_q = 1;
  int64_t heads_kv = 1;
  int64_t head_dim = 32;
  int64_t value_dim = 0;  // 0: head_dim
  bool rank3 = false;     // 3-D tensors (batch must be 1)
  AttentionOptions options;
  std::optional<std::vector<int64_t>> bias_shape;
  // Some bias entries become -inf: every 7th element, and the first Lk elements
  // (so the first row of the first bias slice is fully masked).
  bool bias_masks = false;
  std::vector<int32_t> key_lengths;
  int64_t key_offset = 0;  // sharded keys (AttentionRequest::key_offset)
  int64_t total_keys = 0;
  OutputSpec outputs;

  // Feature names (BackendInfo::features) the spec exercises.
  std::vector<std::string> Features() const {
    std::vector<std::string> f;
    if (options.causal) f.push_back("causal");
    if (options.window_left >= 0 || options.window_right >= 0) f.push_back("window");
    if (options.softcap > 0) f.push_back("softcap");
    if (!options.alibi_slopes.empty()) f.push_back("alibi");
    if (bias_shape.has_value()) f.push_back("bias");
    if (!key_lengths.empty()) f.push_back("key_lengths");
    if (key_offset != 0 || total_keys != 0) f.push_back("key_offset");
    if (heads_q != heads_kv) f.push_back("gqa");
    if (options.variant == Variant::kLinear) f.push_back("linear");
    if (outputs.lse) f.push_back("lse");
    if (outputs.entropy) f.push_back("entropy");
    if (outputs.weights) f.push_back("weights");
    if (outputs.top_k > 0) f.push_back("top_k");
    return f;
  }
};

class RandomRequest {
 public:
  RandomRequest(const RequestSpec& spec, DType dtype, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    auto shape = [&](int64_t l, int64_t h, int64_t d) {
      return spec.rank3 ? std::vector<int64_t>{l, h, d}
                        : std::vector<int64_t>{spec.batch, l, h, d};
    };
    auto fill = [&](std::string& bytes, std::vector<int64_t> dims) {
      const int64_t n = CheckedElementCount(dims);
      bytes.assign(n * DTypeSize(dtype), '\0');
      for (int64_t i = 0; i < n; ++i) StoreFloat(bytes.data(), dtype, i, normal(rng));
      return TensorView{dtype, std::move(dims), bytes};
    };
    const int64_t dv = spec.value_dim > 0 ? spec.value_dim : spec.head_dim;
    req_.query = fill(q_, shape(spec.seqlen_q, spec.heads_q, spec.head_dim));
    req_.key = fill(k_, shape(spec.seqlen_k, spec.heads_kv, spec.head_dim));
    req_.value = fill(v_, shape(spec.seqlen_k, spec.heads_kv, dv));
    if (spec.bias_shape.has_value()) {
      TensorView bias = fill(bias_, *spec.bias_shape);
      if (spec.bias_masks) {
        const int64_t n = CheckedElementCount(*spec.bias_shape);
        const float neg_inf = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) {
          if (i % 7 == 3 || i < spec.seqlen_k) StoreFloat(bias_.data(), dtype, i, neg_inf);
        }
      }
      req_.bias = bias;
    }
    req_.key_lengths = spec.key_lengths;
    req_.key_offset = spec.key_offset;
    req_.total_keys = spec.total_keys;
    req_.options = spec.options;
    req_.outputs = spec.outputs;
  }

  // Not copyable: the request's views point into this object.
  RandomRequest(const RandomRequest&) = delete;
  RandomRequest& operator=(const RandomRequest&) = delete;

  const AttentionRequest& request() const { return req_; }

 private:
  std::string q_, k_, v_, bias_;
  AttentionRequest req_;
};

// ALiBi slopes as in the ALiBi paper: 2^(-8(h+1)/H).
inline std::vector<float> AlibiSlopes(int64_t heads) {
  std::vector<float> s(heads);
  for (int64_t h = 0; h < heads; ++h) {
    s[h] = static_cast<float>(std::exp2(-8.0 * double(h + 1) / double(heads)));
  }
  return s;
}

}  // namespace attnserve

#endif  // ATTNSERVE_TESTS_UNIT_RANDOM_REQUEST_H_
