#include "backends/onednn/onednn_backend.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <list>
#include <numeric>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/half.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace attnserve {
namespace {

using dnnl::memory;
using Dims = memory::dims;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A work item computes `rows` query rows of the `group_size` query heads sharing
// one kv head, stacked into one matrix so K and V are read once per group. Its
// score tile is (rows·group) x (a span of keys); rows is chosen so a full-length
// tile holds about 2^18 floats (1 MiB, L2-sized): Lk = 512, no GQA gives 512
// rows; Lk = 2048 with 4 heads per group gives 32. It depends on the request's
// shape only, never on the batch or the thread count.
constexpr int64_t kTileFloats = int64_t{1} << 18;
// Key spans are rounded up to a multiple of this, so causal chunks (whose span
// grows with the row) share a few primitive shapes instead of one each.
constexpr int64_t kKeySpanQuantum = 64;
constexpr size_t kPrimitiveCacheCapacity = 256;

int64_t ChunkRows(const AttentionParams& p) {
  const int64_t rows = std::max<int64_t>(
      1, kTileFloats / (int64_t{std::max<int32_t>(p.seqlen_k, 1)} * p.group_size));
  return std::min<int64_t>(rows, p.seqlen_q);
}

// ---------------------------------------------------------------------------
// Primitive cache: a small LRU keyed by everything a primitive bakes in.

enum class PrimitiveKind : uint8_t { kScores, kOutput, kSoftmax };

struct PrimitiveKey {
  PrimitiveKind kind = PrimitiveKind::kScores;
  int64_t m = 0, n = 0, k = 0;           // dst m x n, reduction k
  int64_t ld_src = 0, ld_wei = 0, ld_dst = 0;
  float softcap = 0.f;
  bool has_tile = false;

  bool operator==(const PrimitiveKey& o) const {
    return kind == o.kind && m == o.m && n == o.n && k == o.k && ld_src == o.ld_src &&
           ld_wei == o.ld_wei && ld_dst == o.ld_dst && softcap == o.softcap &&
           has_tile == o.has_tile;
  }
  template <typename H>
  friend H AbslHashValue(H h, const PrimitiveKey& key) {
    return H::combine(std::move(h), key.kind, key.m, key.n, key.k, key.ld_src, key.ld_wei,
                      key.ld_dst, key.softcap, key.has_tile);
  }
};

struct CachedPrimitive {
  dnnl::primitive primitive;
  size_t scratchpad_bytes = 0;
};

class PrimitiveCache {
 public:
  explicit PrimitiveCache(size_t capacity) : capacity_(capacity) {}

  // Returns the cached primitive for `key`, or nullptr.
  std::shared_ptr<const CachedPrimitive> Find(const PrimitiveKey& key) {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }

  // Inserts `value` unless another thread did first; returns the cached one.
  std::shared_ptr<const CachedPrimitive> Insert(const PrimitiveKey& key,
                                                std::shared_ptr<const CachedPrimitive> value) {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(key);
    if (it != index_.end()) return it->second->second;
    lru_.emplace_front(key, std::move(value));
    index_[key] = lru_.begin();
    if (lru_.size() > capacity_) {
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
    return lru_.front().second;
  }

 private:
  using Entry = std::pair<PrimitiveKey, std::shared_ptr<const CachedPrimitive>>;
  const size_t capacity_;
  absl::Mutex mu_;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mu_);  // most recent first
  absl::flat_hash_map<PrimitiveKey, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------
// Per-run state.

// F32 views of one request's tensors: the caller's memory for F32, else the
// converted copies in `storage`. Strides are in elements; the last dim is dense.
struct F32Request {
  const AttentionParams* p = nullptr;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* o = nullptr;
  int64_t q_bs = 0, q_rs = 0, q_hs = 0;
  int64_t k_bs = 0, k_rs = 0, k_hs = 0;
  int64_t v_bs = 0, v_rs = 0, v_hs = 0;
  int64_t o_bs = 0, o_rs = 0, o_hs = 0;
  bool convert_inputs = false;   // F16/BF16, or LINEAR (φ applied while converting)
  bool convert_output = false;   // F16/BF16
  std::vector<float> q_storage, k_storage, v_storage, o_storage;
  int64_t chunk_rows = 0;
};

struct WorkItem {
  int32_t request = 0;
  int32_t b = 0;
  int32_t kv_head = 0;
  int32_t row0 = 0;
  int32_t rows = 0;
};

// Scratch of one OpenMP worker; reused across runs.
struct ThreadScratch {
  std::vector<float> q_rows, o_rows, scores, probs, tile;
  std::vector<KeyRange> ranges;
  std::vector<float> row_max;
  std::vector<int32_t> row_argmax;
  std::vector<int32_t> order;
  std::vector<uint8_t> scratchpad;

  int64_t bytes() const {
    return int64_t(q_rows.capacity() + o_rows.capacity() + scores.capacity() +
                   probs.capacity() + tile.capacity() + row_max.capacity()) *
               4 +
           int64_t(ranges.capacity() * sizeof(KeyRange)) +
           int64_t(row_argmax.capacity() + order.capacity()) * 4 +
           int64_t(scratchpad.capacity());
  }
};

float Phi(float x) { return x > 0 ? x + 1 : std::exp(x); }

// Converts [B, L, H, D] of `dtype` with strides to dense F32, applying φ if asked.
void ConvertTensor(const void* src, DType dtype, int64_t b, int64_t rows, int64_t heads,
                   int64_t dim, int64_t bs, int64_t rs, int64_t hs, bool phi, float* dst) {
  float* out = dst + b * rows * heads * dim;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = b * bs + i * rs + h * hs;
      for (int64_t d = 0; d < dim; ++d) {
        const float x = LoadFloat(src, dtype, base + d);
        *out++ = phi ? Phi(x) : x;
      }
    }
  }
}

class OnednnBackend final : public Backend {
 public:
  OnednnBackend(dnnl::engine engine, int threads)
      : engine_(std::move(engine)), threads_(threads), cache_(kPrimitiveCacheCapacity) {
    info_.name = "onednn";
    info_.description = absl::StrCat("oneDNN ", DNNL_VERSION_MAJOR, ".", DNNL_VERSION_MINOR,
                                     " matmul + softmax primitives (F32 compute), ", threads,
                                     " threads");
    info_.dtypes = {DType::kF32, DType::kF16, DType::kBF16};
    info_.features = {"causal", "window", "softcap", "alibi",   "bias", "key_lengths", "key_offset",
                      "gqa",    "linear", "lse",     "entropy",     "weights", "top_k"};
    info_.max_head_dim = kMaxHeadDim;
  }

  const BackendInfo& info() const override { return info_; }

  absl::Status Supports(const AttentionParams& p) const override {
    if (p.sparse.any()) {
      return absl::UnimplementedError(
          "onednn: sparse attention (sparsity) is not supported; use the cpu backend");
    }
    if (p.kv_blocks != nullptr) {
      return absl::UnimplementedError(
          "onednn: paged K/V (session decode) is not supported; use the cpu backend");
    }
    if (p.dtype != DType::kF32 && p.dtype != DType::kF16 && p.dtype != DType::kBF16) {
      return absl::UnimplementedError(
          absl::StrCat("onednn: dtype F32, F16 or BF16 expected, got ", DTypeName(p.dtype)));
    }
    if (p.head_dim > kMaxHeadDim || p.value_dim > kMaxHeadDim) {
      return absl::UnimplementedError(absl::StrCat("onednn: head_dim and value_dim <= ",
                                                   kMaxHeadDim, " expected, got ", p.head_dim,
                                                   " and ", p.value_dim));
    }
    if (p.variant == Variant::kLinear &&
        (p.lse != nullptr || p.weights != nullptr || p.top_k > 0)) {
      return absl::UnimplementedError(
          "onednn: variant LINEAR has no lse, weights or top_k outputs");
    }
    return absl::OkStatus();
  }

  absl::Status Run(absl::Span<const AttentionParams> batch) override;

  // F32 copies of 16-bit (or LINEAR's φ-mapped) inputs and of a 16-bit
  // output, plus per thread a work item's score, bias and probability tiles.
  int64_t ScratchBytes(const AttentionParams& p) const override {
    const int64_t B = p.batch, Lq = p.seqlen_q, Lk = p.seqlen_k, Hq = p.num_heads_q,
                  Hkv = p.num_heads_kv, D = p.head_dim, Dv = p.value_dim;
    int64_t floats = 0;
    if (p.dtype != DType::kF32 || p.variant == Variant::kLinear) {
      floats += B * (Lq * Hq * D + Lk * Hkv * (D + Dv));
    }
    if (p.dtype != DType::kF32) floats += B * Lq * Hq * Dv;
    const int64_t tile = std::max(kTileFloats, ChunkRows(p) * p.group_size * std::max<int64_t>(Lk, 1));
    floats += int64_t{threads_} * 3 * tile;
    return floats * int64_t{sizeof(float)};
  }

  int64_t workspace_bytes() const override {
    return scratch_bytes_.load(std::memory_order_relaxed) +
           transient_bytes_.load(std::memory_order_relaxed);
  }

 private:
  static constexpr int32_t kMaxHeadDim = 1024;

  std::shared_ptr<const CachedPrimitive> GetPrimitive(const PrimitiveKey& key);
  void ComputeItem(const F32Request& r, const WorkItem& item, ThreadScratch& ts,
                   dnnl::stream& stream);
  void Execute(const CachedPrimitive& prim, std::unordered_map<int, memory> args,
               ThreadScratch& ts, dnnl::stream& stream);

  std::vector<std::unique_ptr<ThreadScratch>> TakeScratch(int n);
  void ReturnScratch(std::vector<std::unique_ptr<ThreadScratch>> scratch);

  // Constant after construction.
  BackendInfo info_;
  const dnnl::engine engine_;
  const int threads_;

  PrimitiveCache cache_;  // internally synchronised
  std::atomic<int64_t> scratch_bytes_{0};    // held by free_scratch_ and running workers
  std::atomic<int64_t> transient_bytes_{0};  // converted copies of running requests

  absl::Mutex mu_;
  std::vector<std::unique_ptr<ThreadScratch>> free_scratch_ ABSL_GUARDED_BY(mu_);
};

std::shared_ptr<const CachedPrimitive> OnednnBackend::GetPrimitive(const PrimitiveKey& key) {
  if (auto found = cache_.Find(key)) return found;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto value = std::make_shared<CachedPrimitive>();
  const auto f32 = memory::data_type::f32;
  if (key.kind == PrimitiveKind::kSoftmax) {
    const memory::desc md({key.m, key.n}, f32, Dims{key.n, 1});
    dnnl::softmax_v2_forward::desc desc(dnnl::prop_kind::forward_inference,
                                        dnnl::algorithm::softmax_accurate, md, md, 1);
    dnnl::softmax_v2_forward::primitive_desc pd(desc, attr, engine_);
    value->scratchpad_bytes = pd.scratchpad_desc().get_size();
    value->primitive = dnnl::softmax_v2_forward(pd);
  } else {
    const memory::desc src({key.m, key.k}, f32, Dims{key.ld_src, 1});
    // Scores: weights are Kᵀ read in place from K rows ([k, n] with row stride
    // 1). Output: weights are V rows ([k, n] dense along n).
    const memory::desc wei =
        key.kind == PrimitiveKind::kScores
            ? memory::desc({key.k, key.n}, f32, Dims{1, key.ld_wei})
            : memory::desc({key.k, key.n}, f32, Dims{key.ld_wei, 1});
    const memory::desc dst({key.m, key.n}, f32, Dims{key.ld_dst, 1});
    if (key.kind == PrimitiveKind::kScores) {
      attr.set_output_scales(0, {DNNL_RUNTIME_F32_VAL});
      dnnl::post_ops ops;
      if (key.softcap > 0.f) {  // cap·tanh(s/cap); the 1/cap is folded into the scale
        ops.append_eltwise(1.f, dnnl::algorithm::eltwise_tanh, 0.f, 0.f);
        ops.append_eltwise(1.f, dnnl::algorithm::eltwise_linear, key.softcap, 0.f);
      }
      if (key.has_tile) ops.append_binary(dnnl::algorithm::binary_add, dst);
      attr.set_post_ops(ops);
    }
    dnnl::matmul::desc desc(src, wei, dst);
    dnnl::matmul::primitive_desc pd(desc, attr, engine_);
    value->scratchpad_bytes = pd.scratchpad_desc().get_size();
    value->primitive = dnnl::matmul(pd);
  }
  return cache_.Insert(key, std::move(value));
}

void OnednnBackend::Execute(const CachedPrimitive& prim, std::unordered_map<int, memory> args,
                            ThreadScratch& ts, dnnl::stream& stream) {
  if (prim.scratchpad_bytes > 0) {
    if (ts.scratchpad.size() < prim.scratchpad_bytes) {
      const int64_t before = ts.bytes();
      ts.scratchpad.resize(prim.scratchpad_bytes);
      scratch_bytes_.fetch_add(ts.bytes() - before, std::memory_order_relaxed);
    }
    const memory::desc md({static_cast<int64_t>(prim.scratchpad_bytes)}, memory::data_type::u8,
                          Dims{1});
    args.emplace(DNNL_ARG_SCRATCHPAD, memory(md, engine_, ts.scratchpad.data()));
  }
  prim.primitive.execute(stream, args);
  stream.wait();
}

template <typename T>
void Grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

void OnednnBackend::ComputeItem(const F32Request& r, const WorkItem& item, ThreadScratch& ts,
                                dnnl::stream& stream) {
  const AttentionParams& p = *r.p;
  const int64_t b = item.b;
  const int64_t m = item.rows;
  const int64_t group = p.group_size;
  const int64_t rows = m * group;  // matrix row (i, g) = i * group + g
  const int64_t lk = p.seqlen_k;
  const int64_t dk = p.head_dim;
  const int64_t dv = p.value_dim;
  const bool linear = p.variant == Variant::kLinear;
  const int64_t h0 = int64_t{item.kv_head} * group;
  // Row of lse/weights/top-k ([B, Hq, Lq]) for matrix row (i, g).
  auto stat_row = [&](int64_t i, int64_t g) {
    return (b * p.num_heads_q + h0 + g) * p.seqlen_q + item.row0 + i;
  };

  // Keys any row of the chunk sees, then widened to a quantum of the span.
  Grow(ts.ranges, m);
  int64_t kb = lk, ke = 0;
  for (int64_t i = 0; i < m; ++i) {
    ts.ranges[i] = VisibleKeyRange(p, b, item.row0 + i);
    if (ts.ranges[i].empty()) continue;
    kb = std::min(kb, ts.ranges[i].begin);
    ke = std::max(ke, ts.ranges[i].end);
  }
  if (kb >= ke) {  // every row fully masked: output 0, lse -inf, no weights
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t g = 0; g < group; ++g) {
        std::fill_n(r.o + b * r.o_bs + (item.row0 + i) * r.o_rs + (h0 + g) * r.o_hs, dv, 0.f);
        const int64_t row = stat_row(i, g);
        if (p.lse != nullptr) p.lse[row] = kNegInf;
        if (p.entropy != nullptr) p.entropy[row] = 0.f;
        if (p.weights != nullptr) std::fill_n(p.weights + row * lk, lk, 0.f);
        if (p.top_k > 0) {
          std::fill_n(p.top_k_indices + row * p.top_k, p.top_k, -1);
          std::fill_n(p.top_k_weights + row * p.top_k, p.top_k, 0.f);
        }
      }
    }
    return;
  }
  const int64_t n = std::min(lk, (ke - kb + kKeySpanQuantum - 1) / kKeySpanQuantum * kKeySpanQuantum);
  kb = std::min(kb, lk - n);
  bool masked = false;
  for (int64_t i = 0; i < m; ++i) {
    masked |= ts.ranges[i].begin > kb || ts.ranges[i].end < kb + n;
  }
  const bool has_tile = !linear && (masked || p.bias != nullptr || p.alibi_slopes != nullptr);
  const bool need_scan = has_tile || p.lse != nullptr || p.entropy != nullptr || p.top_k > 0;

  PrimitiveKey sk;
  sk.kind = PrimitiveKind::kScores;
  sk.m = rows;
  sk.n = n;
  sk.k = dk;
  sk.ld_src = dk;
  sk.ld_wei = r.k_rs;
  sk.ld_dst = n;
  sk.softcap = linear ? 0.f : p.softcap;
  sk.has_tile = has_tile;
  const auto scores_prim = GetPrimitive(sk);
  std::shared_ptr<const CachedPrimitive> softmax_prim;
  if (!linear) {
    PrimitiveKey xk;
    xk.kind = PrimitiveKind::kSoftmax;
    xk.m = rows;
    xk.n = n;
    softmax_prim = GetPrimitive(xk);
  }
  PrimitiveKey ok;
  ok.kind = PrimitiveKind::kOutput;
  ok.m = rows;
  ok.n = dv;
  ok.k = n;
  ok.ld_src = n;
  ok.ld_wei = r.v_rs;
  ok.ld_dst = dv;
  const auto output_prim = GetPrimitive(ok);

  const int64_t before = ts.bytes();
  Grow(ts.q_rows, rows * dk);
  Grow(ts.o_rows, rows * dv);
  Grow(ts.scores, rows * n);
  Grow(ts.probs, rows * n);
  if (has_tile) Grow(ts.tile, rows * n);
  Grow(ts.row_max, rows);
  Grow(ts.row_argmax, rows);
  if (p.top_k > 0) Grow(ts.order, n);
  scratch_bytes_.fetch_add(ts.bytes() - before, std::memory_order_relaxed);

  // The group's query heads share K and V: stack their rows into one matrix.
  for (int64_t i = 0; i < m; ++i) {
    const float* q = r.q + b * r.q_bs + (item.row0 + i) * r.q_rs + h0 * r.q_hs;
    for (int64_t g = 0; g < group; ++g) {
      std::memcpy(ts.q_rows.data() + (i * group + g) * dk, q + g * r.q_hs, dk * sizeof(float));
    }
  }

  if (has_tile) {  // masks (-inf), ALiBi and the bias as one additive tile
    for (int64_t i = 0; i < m; ++i) {
      const int64_t qi = item.row0 + i;
      const KeyRange& range = ts.ranges[i];
      for (int64_t g = 0; g < group; ++g) {
        float* t = ts.tile.data() + (i * group + g) * n;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key = kb + j;
          t[j] = key >= range.begin && key < range.end
                     ? AlibiBias(p, b, h0 + g, qi, key) + BiasAt(p, b, h0 + g, qi, key)
                     : kNegInf;
        }
      }
    }
  }

  const auto f32 = memory::data_type::f32;
  const memory::desc scores_md({rows, n}, f32, Dims{n, 1});
  float scale = linear ? 1.f : (p.softcap > 0.f ? p.scale / p.softcap : p.scale);

  // S = scale·Q·Kᵀ (+ softcap, + tile).
  {
    const float* k = r.k + b * r.k_bs + kb * r.k_rs + int64_t{item.kv_head} * r.k_hs;
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(memory::desc({rows, dk}, f32, Dims{dk, 1}), engine_,
                              ts.q_rows.data())},
        {DNNL_ARG_WEIGHTS, memory(memory::desc({dk, n}, f32, Dims{1, r.k_rs}), engine_,
                                  const_cast<float*>(k))},
        {DNNL_ARG_DST, memory(scores_md, engine_, ts.scores.data())},
        {DNNL_ARG_ATTR_OUTPUT_SCALES, memory(memory::desc({1}, f32, Dims{1}), engine_, &scale)},
    };
    if (has_tile) {
      const int post_op = p.softcap > 0.f ? 2 : 0;  // after tanh and the cap multiply
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(post_op) | DNNL_ARG_SRC_1,
                   memory(scores_md, engine_, ts.tile.data()));
    }
    Execute(*scores_prim, std::move(args), ts, stream);
  }

  if (linear) {
    // Weights are φ(q)·φ(k) over the visible keys, normalised per row.
    for (int64_t row = 0; row < rows; ++row) {
      const KeyRange& range = ts.ranges[row / group];
      const float* s = ts.scores.data() + row * n;
      float* pr = ts.probs.data() + row * n;
      const int64_t lo = range.empty() ? 0 : range.begin - kb;
      const int64_t hi = range.empty() ? 0 : range.end - kb;
      double sum = 0;
      for (int64_t j = lo; j < hi; ++j) sum += s[j];
      std::fill_n(pr, n, 0.f);
      if (sum > 0) {
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = lo; j < hi; ++j) pr[j] = s[j] * inv;
      }
    }
  } else {
    if (need_scan) {
      for (int64_t row = 0; row < rows; ++row) {
        const float* s = ts.scores.data() + row * n;
        const float* best = std::max_element(s, s + n);
        ts.row_max[row] = *best;
        ts.row_argmax[row] = static_cast<int32_t>(best - s);
      }
    }
    Execute(*softmax_prim,
            {{DNNL_ARG_SRC, memory(scores_md, engine_, ts.scores.data())},
             {DNNL_ARG_DST, memory(scores_md, engine_, ts.probs.data())}},
            ts, stream);
    for (int64_t row = 0; row < rows && (need_scan || p.weights != nullptr); ++row) {
      float* pr = ts.probs.data() + row * n;
      const int64_t out_row = stat_row(row / group, row % group);
      const bool fully_masked = need_scan && ts.row_max[row] == kNegInf;
      if (fully_masked) std::fill_n(pr, n, 0.f);  // softmax of all -inf is NaN
      if (p.lse != nullptr) {
        // P at the arg-max is exp(0)/Σ, so lse = max + log Σ = max - log P[argmax].
        p.lse[out_row] =
            fully_masked ? kNegInf : ts.row_max[row] - std::log(pr[ts.row_argmax[row]]);
      }
      if (p.entropy != nullptr) {
        // From the probabilities of the row: −Σ p·ln p.
        double h_nats = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (pr[j] > 0.f) h_nats -= static_cast<double>(pr[j]) * std::log(static_cast<double>(pr[j]));
        }
        p.entropy[out_row] = static_cast<float>(h_nats);
      }
      if (p.top_k > 0) {
        const float* s = ts.scores.data() + row * n;
        int32_t count = 0;
        for (int32_t j = 0; j < n; ++j) {
          if (!fully_masked && s[j] != kNegInf) ts.order[count++] = j;
        }
        const int32_t take = std::min<int32_t>(count, p.top_k);
        std::partial_sort(ts.order.begin(), ts.order.begin() + take, ts.order.begin() + count,
                          [pr](int32_t a, int32_t c) {
                            return pr[a] > pr[c] || (pr[a] == pr[c] && a < c);
                          });
        for (int32_t t = 0; t < p.top_k; ++t) {
          const bool present = t < take;
          p.top_k_indices[out_row * p.top_k + t] =
              present ? static_cast<int32_t>(kb + ts.order[t]) : -1;
          p.top_k_weights[out_row * p.top_k + t] = present ? pr[ts.order[t]] : 0.f;
        }
      }
      if (p.weights != nullptr) {
        float* w = p.weights + out_row * lk;
        std::fill_n(w, kb, 0.f);
        std::memcpy(w + kb, pr, n * sizeof(float));
        std::fill(w + kb + n, w + lk, 0.f);
      }
    }
  }

  // O = P·V, then each row back to its (query row, head).
  {
    const float* v = r.v + b * r.v_bs + kb * r.v_rs + int64_t{item.kv_head} * r.v_hs;
    Execute(*output_prim,
            {{DNNL_ARG_SRC, memory(scores_md, engine_, ts.probs.data())},
             {DNNL_ARG_WEIGHTS, memory(memory::desc({n, dv}, f32, Dims{r.v_rs, 1}), engine_,
                                       const_cast<float*>(v))},
             {DNNL_ARG_DST,
              memory(memory::desc({rows, dv}, f32, Dims{dv, 1}), engine_, ts.o_rows.data())}},
            ts, stream);
  }
  for (int64_t i = 0; i < m; ++i) {
    float* o = r.o + b * r.o_bs + (item.row0 + i) * r.o_rs + h0 * r.o_hs;
    for (int64_t g = 0; g < group; ++g) {
      std::memcpy(o + g * r.o_hs, ts.o_rows.data() + (i * group + g) * dv, dv * sizeof(float));
    }
  }
}

std::vector<std::unique_ptr<ThreadScratch>> OnednnBackend::TakeScratch(int n) {
  std::vector<std::unique_ptr<ThreadScratch>> taken;
  absl::MutexLock lock(&mu_);
  while (static_cast<int>(taken.size()) < n && !free_scratch_.empty()) {
    taken.push_back(std::move(free_scratch_.back()));
    free_scratch_.pop_back();
  }
  while (static_cast<int>(taken.size()) < n) taken.push_back(std::make_unique<ThreadScratch>());
  return taken;
}

void OnednnBackend::ReturnScratch(std::vector<std::unique_ptr<ThreadScratch>> scratch) {
  absl::MutexLock lock(&mu_);
  for (auto& s : scratch) free_scratch_.push_back(std::move(s));
}

absl::Status OnednnBackend::Run(absl::Span<const AttentionParams> batch) {
  // Views and conversion plan per request.
  std::vector<F32Request> requests(batch.size());
  struct Conversion {
    int32_t request;
    int32_t b;
  };
  std::vector<Conversion> conversions;
  std::vector<WorkItem> items;
  int64_t transient = 0;
  for (size_t ri = 0; ri < batch.size(); ++ri) {
    const AttentionParams& p = batch[ri];
    F32Request& r = requests[ri];
    r.p = &p;
    r.convert_inputs = p.dtype != DType::kF32 || p.variant == Variant::kLinear;
    r.convert_output = p.dtype != DType::kF32;
    const int64_t B = p.batch, Lq = p.seqlen_q, Lk = p.seqlen_k, Hq = p.num_heads_q,
                  Hkv = p.num_heads_kv, D = p.head_dim, Dv = p.value_dim;
    if (r.convert_inputs) {
      r.q_storage.resize(B * Lq * Hq * D);
      r.k_storage.resize(B * Lk * Hkv * D);
      r.v_storage.resize(B * Lk * Hkv * Dv);
      r.q = r.q_storage.data();
      r.k = r.k_storage.data();
      r.v = r.v_storage.data();
      r.q_hs = D, r.q_rs = Hq * D, r.q_bs = Lq * Hq * D;
      r.k_hs = D, r.k_rs = Hkv * D, r.k_bs = Lk * Hkv * D;
      r.v_hs = Dv, r.v_rs = Hkv * Dv, r.v_bs = Lk * Hkv * Dv;
      for (int32_t b = 0; b < p.batch; ++b) conversions.push_back({int32_t(ri), b});
    } else {
      r.q = static_cast<const float*>(p.q);
      r.k = static_cast<const float*>(p.k);
      r.v = static_cast<const float*>(p.v);
      r.q_hs = p.q_head_stride, r.q_rs = p.q_row_stride, r.q_bs = p.q_batch_stride;
      r.k_hs = p.k_head_stride, r.k_rs = p.k_row_stride, r.k_bs = p.k_batch_stride;
      r.v_hs = p.v_head_stride, r.v_rs = p.v_row_stride, r.v_bs = p.v_batch_stride;
    }
    if (r.convert_output) {
      r.o_storage.resize(B * Lq * Hq * Dv);
      r.o = r.o_storage.data();
      r.o_hs = Dv, r.o_rs = Hq * Dv, r.o_bs = Lq * Hq * Dv;
    } else {
      r.o = static_cast<float*>(p.o);
      r.o_hs = p.o_head_stride, r.o_rs = p.o_row_stride, r.o_bs = p.o_batch_stride;
    }
    transient += int64_t(r.q_storage.size() + r.k_storage.size() + r.v_storage.size() +
                         r.o_storage.size()) *
                 4;
    r.chunk_rows = ChunkRows(p);
    for (int32_t b = 0; b < p.batch; ++b) {
      for (int32_t kvh = 0; kvh < p.num_heads_kv; ++kvh) {
        for (int64_t i0 = 0; i0 < Lq; i0 += r.chunk_rows) {
          items.push_back({int32_t(ri), b, kvh, int32_t(i0),
                           int32_t(std::min<int64_t>(r.chunk_rows, Lq - i0))});
        }
      }
    }
  }
  transient_bytes_.fetch_add(transient, std::memory_order_relaxed);

  const int64_t parallelism = std::max<int64_t>(
      1, std::max<int64_t>(static_cast<int64_t>(items.size()), int64_t(conversions.size())));
  const int workers = static_cast<int>(std::min<int64_t>(threads_, parallelism));
  std::vector<std::unique_ptr<ThreadScratch>> scratch = TakeScratch(workers);

  absl::Mutex error_mu;
  absl::Status error;  // first failure, guarded by error_mu
  auto fail = [&](absl::Status s) {
    absl::MutexLock lock(&error_mu);
    if (error.ok()) error = std::move(s);
  };

#pragma omp parallel num_threads(workers)
  {
    // oneDNN sizes its kernels by omp_get_max_threads(): one worker per primitive
    // keeps every result independent of the thread count and of the batch.
    omp_set_num_threads(1);
    ThreadScratch& ts = *scratch[omp_get_thread_num()];
    std::unique_ptr<dnnl::stream> stream;
    try {
      stream = std::make_unique<dnnl::stream>(engine_);
    } catch (const dnnl::error& e) {
      fail(absl::InternalError(absl::StrCat("onednn: cannot create a stream: ", e.what())));
    }

#pragma omp for schedule(dynamic, 1)
    for (size_t c = 0; c < conversions.size(); ++c) {
      F32Request& r = requests[conversions[c].request];
      const AttentionParams& p = *r.p;
      const int64_t b = conversions[c].b;
      const bool phi = p.variant == Variant::kLinear;
      ConvertTensor(p.q, p.dtype, b, p.seqlen_q, p.num_heads_q, p.head_dim, p.q_batch_stride,
                    p.q_row_stride, p.q_head_stride, phi, r.q_storage.data());
      ConvertTensor(p.k, p.dtype, b, p.seqlen_k, p.num_heads_kv, p.head_dim, p.k_batch_stride,
                    p.k_row_stride, p.k_head_stride, phi, r.k_storage.data());
      ConvertTensor(p.v, p.dtype, b, p.seqlen_k, p.num_heads_kv, p.value_dim, p.v_batch_stride,
                    p.v_row_stride, p.v_head_stride, false, r.v_storage.data());
    }

#pragma omp for schedule(dynamic, 1)
    for (size_t w = 0; w < items.size(); ++w) {
      if (stream == nullptr) continue;
      const F32Request& r = requests[items[w].request];
      if (StopRequested(*r.p)) continue;  // nobody waits for this request any more
      try {
        ComputeItem(r, items[w], ts, *stream);
      } catch (const dnnl::error& e) {
        fail(absl::InternalError(absl::StrCat("onednn: primitive failed: ", e.what())));
      } catch (const std::bad_alloc&) {
        fail(absl::ResourceExhaustedError("onednn: out of memory for the workspace"));
      }
    }

#pragma omp for schedule(dynamic, 1)
    for (size_t ri = 0; ri < requests.size(); ++ri) {
      const F32Request& r = requests[ri];
      if (!r.convert_output) continue;
      const AttentionParams& p = *r.p;
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t i = 0; i < p.seqlen_q; ++i) {
          for (int64_t h = 0; h < p.num_heads_q; ++h) {
            const float* src = r.o + b * r.o_bs + i * r.o_rs + h * r.o_hs;
            const int64_t dst = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
            for (int64_t d = 0; d < p.value_dim; ++d) StoreFloat(p.o, p.dtype, dst + d, src[d]);
          }
        }
      }
    }
  }

  ReturnScratch(std::move(scratch));
  transient_bytes_.fetch_sub(transient, std::memory_order_relaxed);
  return error;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateOnednnBackend(const BackendOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads: expected >= 0 (0 = one per core), got ", options.threads));
  }
  int threads = options.threads;
  if (threads == 0) threads = std::max(1, omp_get_num_procs());
  try {
    dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return std::make_unique<OnednnBackend>(std::move(engine), threads);
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("onednn: cannot create a CPU engine: ", e.what()));
  }
}

}  // namespace attnserve
