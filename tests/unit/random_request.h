// RandomRequest: an AttentionRequest filled with seeded random data, owning the
// bytes its TensorViews point into, sparse patterns included. Shared by the
// backend conformance and batch invariance suites. Deterministic for a given
// (spec, dtype, seed).
#ifndef ATTNSERVE_TESTS_UNIT_RANDOM_REQUEST_H_
#define ATTNSERVE_TESTS_UNIT_RANDOM_REQUEST_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention/request.h"
#include "core/half.h"
#include "core/tensor.h"

namespace attnserve {

// A sparse pattern (AttentionRequest::sparsity) that RandomRequest draws from
// its seed: which forms, and the knobs of each. All off by default.
struct SparsePattern {
  enum class Heads { kQuery, kKv, kOne };  // an index tensor's head dim: Hq, Hkv or 1

  // Block mask, when block_rows > 0: each (row block, key block) is listed
  // with probability `density`, except that one row block in four lists none.
  int32_t block_rows = 0;
  int32_t block_cols = 0;
  bool per_batch = false;    // indptr [B, ., .] (else [1, ., .])
  bool per_head = false;     // indptr [., Hq, .] (else [., 1, .])
  bool rank1 = false;        // indptr [rows + 1] (one slice for all)
  bool full_blocks = false;  // about half the listed blocks move to full_indptr/full_indices
  // Key selection, when select_k > 0: index rows of select_k entries, up to a
  // third of them -1, the rest distinct units (keys, or blocks of key_block
  // keys) in random order; every entry -1 when density is 0.
  int32_t select_k = 0;
  int32_t query_block = 1;
  int32_t key_block = 1;
  Heads select_heads = Heads::kQuery;
  bool select_per_batch = true;  // [B, ...] (else [1, ...])
  double density = 0.4;
  // Distinct key positions in random order, half of them on query rows'
  // diagonals (so that some query rows are global too).
  int32_t global_tokens = 0;
  bool sinks = false;  // one logit per query head, uniform in [-1, 3]

  bool any() const { return block_rows > 0 || select_k > 0 || global_tokens > 0 || sinks; }
};

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
  SparsePattern sparse;

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
    if (sparse.block_rows > 0) f.push_back("block_mask");
    if (sparse.select_k > 0) f.push_back("key_indices");
    if (sparse.global_tokens > 0) f.push_back("global_tokens");
    if (sparse.sinks) f.push_back("sink_logits");
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
    // The pattern has a generator of its own, so a spec's Q, K, V and bias do
    // not depend on its pattern.
    if (spec.sparse.any()) DrawSparsity(spec, seed ^ 0x5bd1e995u);
  }

  // Not copyable: the request's views point into this object.
  RandomRequest(const RandomRequest&) = delete;
  RandomRequest& operator=(const RandomRequest&) = delete;

  const AttentionRequest& request() const { return req_; }

 private:
  static TensorView I32View(std::string& bytes, std::vector<int64_t> shape,
                            const std::vector<int32_t>& values) {
    bytes.assign(values.size() * sizeof(int32_t), '\0');
    if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
    return TensorView{DType::kI32, std::move(shape), bytes};
  }

  void DrawSparsity(const RequestSpec& spec, uint64_t seed) {
    const SparsePattern& sp = spec.sparse;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    const int64_t B = spec.rank3 ? 1 : spec.batch, Lq = spec.seqlen_q, Lk = spec.seqlen_k;
    const int64_t Hq = spec.heads_q, Hkv = spec.heads_kv;
    SparsitySpec& out = req_.sparsity;
    if (sp.block_rows > 0) {
      const int64_t rows = (Lq + sp.block_rows - 1) / sp.block_rows;
      const int64_t cols = (Lk + sp.block_cols - 1) / sp.block_cols;
      const int64_t Bm = sp.per_batch ? B : 1, Hm = sp.per_head ? Hq : 1;
      std::vector<int32_t> indptr{0}, indices, full_indptr{0}, full_indices;
      for (int64_t slice = 0; slice < Bm * Hm; ++slice) {
        // Slices follow one another: each starts where the previous ended.
        if (slice > 0) indptr.push_back(indptr.back()), full_indptr.push_back(full_indptr.back());
        for (int64_t r = 0; r < rows; ++r) {
          const bool empty = (r + slice) % 4 == 3;
          for (int32_t c = 0; c < cols; ++c) {
            if (empty || uniform(rng) >= sp.density) continue;
            (sp.full_blocks && uniform(rng) < 0.5 ? full_indices : indices).push_back(c);
          }
          indptr.push_back(static_cast<int32_t>(indices.size()));
          full_indptr.push_back(static_cast<int32_t>(full_indices.size()));
        }
      }
      const std::vector<int64_t> shape =
          sp.rank1 ? std::vector<int64_t>{rows + 1} : std::vector<int64_t>{Bm, Hm, rows + 1};
      BlockMaskSpec bm;
      bm.block_rows = sp.block_rows;
      bm.block_cols = sp.block_cols;
      bm.indptr = I32View(bm_indptr_, shape, indptr);
      bm.indices = I32View(bm_indices_, {static_cast<int64_t>(indices.size())}, indices);
      if (sp.full_blocks) {
        bm.full_indptr = I32View(bm_full_indptr_, shape, full_indptr);
        bm.full_indices =
            I32View(bm_full_indices_, {static_cast<int64_t>(full_indices.size())}, full_indices);
      }
      out.block_mask = std::move(bm);
    }
    if (sp.select_k > 0) {
      const int64_t rows = (Lq + sp.query_block - 1) / sp.query_block;
      const int64_t units = (Lk + sp.key_block - 1) / sp.key_block;
      const int64_t Bi = sp.select_per_batch ? B : 1;
      const int64_t Hi = sp.select_heads == SparsePattern::Heads::kQuery ? Hq
                         : sp.select_heads == SparsePattern::Heads::kKv  ? Hkv
                                                                         : 1;
      const int64_t k = sp.select_k;
      std::vector<int32_t> values;
      std::vector<int32_t> pool(units);
      for (int64_t n = 0; n < Bi * Hi * rows; ++n) {
        const int64_t pad = std::uniform_int_distribution<int64_t>(0, k / 3)(rng);
        const int64_t chosen = sp.density > 0 ? std::min(k - pad, units) : 0;
        for (int64_t u = 0; u < units; ++u) pool[u] = static_cast<int32_t>(u);
        std::vector<int32_t> row(k, -1);
        for (int64_t c = 0; c < chosen; ++c) {  // a partial Fisher-Yates draw
          const int64_t pick = std::uniform_int_distribution<int64_t>(c, units - 1)(rng);
          std::swap(pool[c], pool[pick]);
          row[c] = pool[c];
        }
        std::shuffle(row.begin(), row.end(), rng);
        values.insert(values.end(), row.begin(), row.end());
      }
      KeySelectionSpec ks;
      ks.query_block = sp.query_block;
      ks.key_block = sp.key_block;
      ks.indices = I32View(key_indices_, {Bi, Hi, rows, k}, values);
      out.key_indices = std::move(ks);
    }
    if (sp.global_tokens > 0) {
      const bool top_left = spec.options.causal_alignment == CausalAlignment::kTopLeft;
      std::vector<int64_t>& g = out.global_tokens;
      const int64_t want = std::min<int64_t>(sp.global_tokens, Lk);
      for (int64_t draw = 0; static_cast<int64_t>(g.size()) < want; ++draw) {
        int64_t x = std::uniform_int_distribution<int64_t>(0, Lk - 1)(rng);
        if (draw % 2 == 1) {  // on the diagonal of a random query row
          const int64_t i = std::uniform_int_distribution<int64_t>(0, Lq - 1)(rng);
          x = std::clamp<int64_t>(i + (top_left ? 0 : Lk - Lq), 0, Lk - 1);
        }
        if (std::find(g.begin(), g.end(), x) == g.end()) g.push_back(x);
      }
    }
    if (sp.sinks) {
      std::uniform_real_distribution<float> logit(-1.f, 3.f);
      for (int64_t h = 0; h < Hq; ++h) out.sink_logits.push_back(logit(rng));
    }
  }

  std::string q_, k_, v_, bias_;
  std::string bm_indptr_, bm_indices_, bm_full_indptr_, bm_full_indices_, key_indices_;
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
