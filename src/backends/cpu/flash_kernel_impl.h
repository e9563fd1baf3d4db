// The body of the tiled attention kernel, written once over a small vector
// interface `T` and instantiated per instruction set (flash_kernel_avx512.cc,
// flash_kernel_avx2.cc). Include only from those files.
//
// T provides: kWidth (floats per vector), kRows/kVecs (register tile of the
// micro-kernel: kRows rows x kVecs vectors of accumulators), a vector type V,
// and Zero, Load, Store, Set1, Fma(a, b, c) = a*b + c, Mul, Add, Max, Exp2
// (for x <= 0; exactly 0 below -126), ZeroIfNegInf, MaskOutside and
// Widen16 (F16/BF16 -> F32 row conversion). For decode tiles also kDecodeKeys
// (keys per score pass), LoadF16/LoadBf16 (W elements), LoadBf16Pair (2W
// elements as even and odd vectors) and StoreDots<kN> (reduces kN x
// kDecodeKeys accumulators into s[r * M + i]).
//
// Layout of one tile (M = lanes rounded up to kWidth):
//   qt[d][lane]    the tile's queries, transposed and pre-scaled
//   s[j][lane]     scores, then probabilities, of one key block
//   ot[dv][lane]   the unnormalised output accumulator
// S = K·Qᵀ broadcasts K elements against lane vectors of qt, and O += Vᵀ·P
// broadcasts V elements against lane vectors of s, so K and V are read in
// place (F32) or after a per-block conversion (F16/BF16), never transposed.
#ifndef ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_IMPL_H_
#define ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_IMPL_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "attention/params.h"
#include "backends/cpu/flash_kernel.h"
#include "backends/cpu/sparse_tile.h"
#include "core/half.h"

namespace attnserve::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;

constexpr int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Entropy in the streaming pass. Per lane, besides the running max m and the
// sum l = Σ 2^(s_j − m) (log2 units), u = Σ 2^(s_j − m)·(s_j − m). When m
// grows to m' by a factor a = 2^(m − m'), u becomes a·(u + l·(m − m')) plus
// the new keys' terms; at the end H = ln 2 · (log2 l − u / l) nats, since
// p_j = 2^(s_j − m) / l. The difference is floored at -1e30 so that a lane
// that saw no key yet (m = -inf, l = 0) adds 0, not NaN.
template <class T>
inline void EntropyRescale(float* u, typename T::V a, typename T::V l_old, typename T::V m_old,
                           typename T::V m_new, typename T::V new_terms) {
  const typename T::V delta = T::Max(T::Sub(m_old, m_new), T::Set1(-1e30f));
  T::Store(u, T::Fma(a, T::Fma(l_old, delta, T::Load(u)), new_terms));
}

// C[r][lane] = (C[r][lane] * cscale[lane] or 0) + Σ_k A(r, k) · B[k][lane] for
// kRows_ x kVecs_ vectors of lanes. A(r, k) = a[r * a_row + k] (kAStridedK ==
// false: rows of A are contiguous along k, e.g. K rows) or a[r + k * a_row]
// (true: A is read down columns, e.g. V for Vᵀ). kScale: cscale is given (a
// separate instantiation, so the accumulators stay in registers on both paths).
template <class T, bool kAStridedK, bool kScale, int kRows_, int kVecs_>
void MicroTile(int64_t kdim, const float* a, int64_t a_row, const float* b, int64_t ldb, float* c,
               int64_t ldc, const float* cscale) {
  using V = typename T::V;
  constexpr int W = T::kWidth;
  // kdim >= 1 always; telling the compiler lets it keep the accumulators in
  // registers from the loop to the stores (otherwise it spills them).
  if (kdim <= 0) __builtin_unreachable();
  V acc[kRows_][kVecs_];
  if constexpr (kScale) {
    for (int v = 0; v < kVecs_; ++v) {
      const V sc = T::Load(cscale + v * W);
      for (int r = 0; r < kRows_; ++r) acc[r][v] = T::Mul(T::Load(c + r * ldc + v * W), sc);
    }
  } else {
    for (int r = 0; r < kRows_; ++r)
      for (int v = 0; v < kVecs_; ++v) acc[r][v] = T::Zero();
  }
  if constexpr (kAStridedK) {
    for (int64_t k = 0; k < kdim; ++k) {
      V bv[kVecs_];
      for (int v = 0; v < kVecs_; ++v) bv[v] = T::Load(b + k * ldb + v * W);
      const float* ak = a + k * a_row;
      for (int r = 0; r < kRows_; ++r) {
        const V av = T::Set1(ak[r]);
        for (int v = 0; v < kVecs_; ++v) acc[r][v] = T::Fma(av, bv[v], acc[r][v]);
      }
    }
  } else {
    const float* ar[kRows_];
    for (int r = 0; r < kRows_; ++r) ar[r] = a + r * a_row;
    for (int64_t k = 0; k < kdim; ++k) {
      V bv[kVecs_];
      for (int v = 0; v < kVecs_; ++v) bv[v] = T::Load(b + k * ldb + v * W);
      for (int r = 0; r < kRows_; ++r) {
        const V av = T::Set1(ar[r][k]);
        for (int v = 0; v < kVecs_; ++v) acc[r][v] = T::Fma(av, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < kRows_; ++r)
    for (int v = 0; v < kVecs_; ++v) T::Store(c + r * ldc + v * W, acc[r][v]);
}

using MicroTileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                             const float*);

template <class T, bool kAStridedK, bool kScale, size_t... kIdx>
constexpr auto MakeMicroTable(std::index_sequence<kIdx...>) {
  return std::array<MicroTileFn, sizeof...(kIdx)>{
      &MicroTile<T, kAStridedK, kScale, kIdx / T::kVecs + 1, kIdx % T::kVecs + 1>...};
}

// C[rows][M] over `kdim`, tiled into register blocks; M is a multiple of kWidth.
template <class T, bool kAStridedK>
void Gemm(int64_t rows, int64_t lanes, int64_t kdim, const float* a, int64_t a_row, const float* b,
          float* c, const float* cscale) {
  static constexpr auto kPlain =
      MakeMicroTable<T, kAStridedK, false>(std::make_index_sequence<T::kRows * T::kVecs>());
  static constexpr auto kScaled =
      MakeMicroTable<T, kAStridedK, true>(std::make_index_sequence<T::kRows * T::kVecs>());
  const auto& table = cscale != nullptr ? kScaled : kPlain;
  constexpr int W = T::kWidth;
  for (int64_t l0 = 0; l0 < lanes; l0 += T::kVecs * W) {
    const int nv = static_cast<int>(std::min<int64_t>(T::kVecs, (lanes - l0) / W));
    const float* cs = cscale != nullptr ? cscale + l0 : nullptr;
    for (int64_t r0 = 0; r0 < rows; r0 += T::kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(T::kRows, rows - r0));
      const float* ar = kAStridedK ? a + r0 : a + r0 * a_row;
      table[(nr - 1) * T::kVecs + (nv - 1)](kdim, ar, a_row, b + l0, lanes, c + r0 * lanes + l0,
                                              lanes, cs);
    }
  }
}

// Copies rows [j0, j0 + rows) of K (or V) of one KV head, or rows keys[0 ..
// rows) when `keys` is given (a sparse tile's gathered chunk), to a
// contiguous F32 block, widening 16-bit types. Rows are addressed one by one,
// so a block may span KV-cache pages; the arithmetic on the staged block is
// the same as on rows read in place.
template <class T, bool kValues>
void StageBlock(const AttentionParams& p, int64_t b, int64_t kv_head, int64_t j0,
                const int32_t* keys, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t j = keys != nullptr ? keys[r] : j0 + r;
    const void* src = kValues ? ValueRow(p, b, j, kv_head) : KeyRow(p, b, j, kv_head);
    if (p.dtype == DType::kF32) {
      std::memcpy(dst + r * cols, src, cols * sizeof(float));
    } else {
      T::Widen16(static_cast<const uint16_t*>(src), p.dtype, cols, dst + r * cols);
    }
  }
}

// Applies softcap, ALiBi and bias to a block of raw scores (scale·q·k) and
// converts them to log2 units. Scalar: these options are rare on the hot path.
// The block's keys are j0 .. j0 + nk, or keys[0 .. nk) when gathered.
void TransformScores(const AttentionParams& p, const FlashTile& t, int64_t j0, const int32_t* keys,
                     int64_t nk, int64_t lanes_padded, float* s) {
  const int lanes = t.num_heads * t.num_rows;
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t key = keys != nullptr ? keys[j] : j0 + j;
      float x = s[j * lanes_padded + lane];
      if (p.softcap > 0.f) x = p.softcap * std::tanh(x / p.softcap);
      x += AlibiBias(p, t.batch, h, i, key) + BiasAt(p, t.batch, h, i, key);
      s[j * lanes_padded + lane] = x * kLog2e;
    }
  }
}

// Prefetches rows [j0, j1) of K (or V) of one KV head into the caches. Rows
// of one head are H·D elements apart (4 KiB for 8 heads of 128 floats), so each
// row sits in its own page and the hardware prefetchers, which stay inside a
// page, cannot run ahead on their own.
template <bool kValues>
void PrefetchRows(const AttentionParams& p, int64_t b, int64_t kv_head, int64_t j0, int64_t j1) {
  const int64_t row_bytes = (kValues ? p.value_dim : p.head_dim) * int64_t(DTypeSize(p.dtype));
  for (int64_t j = j0; j < j1; ++j) {
    const char* row = static_cast<const char*>(kValues ? ValueRow(p, b, j, kv_head)
                                                       : KeyRow(p, b, j, kv_head));
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

// Decode tiles (DecodeTileApplies): one query row, all lanes of one batch
// row, possibly several KV heads. Every lane sees the same key range, and the
// loops walk keys outer (a few at a time), KV head inner, so K and V are read
// in address order (one token's rows of every head are adjacent): each thread
// streams one contiguous region and the hardware prefetchers run ahead. The
// scores of a block are kept keys x lanes for the vertical online softmax,
// and the output accumulates row-major per lane.
//
// The kernels load each K and V element once per group of up to four query
// heads of one KV head and reuse it from a register for all of them, so a
// 16-bit row is widened once, not once per head. The element type is a
// template parameter: no per-row dispatch or call.

// How decode kernels load K and V rows of type kDt: in chunks of kElems
// elements, kVecs vectors each. F32 and F16 chunks are one vector in element
// order. A BF16 chunk is one vector of 2W elements split into its even
// elements (shifted up: a BF16 is the upper half of an F32) and its odd ones
// (masked), one load and two integer operations for 2W elements; the queries
// and the output accumulators are kept in that same order (Position). A row
// whose length is an odd multiple of W ends with one W-element tail vector.
template <class T, DType kDt>
struct RowChunks {
  using V = typename T::V;
  static constexpr int W = T::kWidth;
  static constexpr int kVecs = kDt == DType::kBF16 ? 2 : 1;
  static constexpr int kElems = kVecs * W;

  // Elements of a row of n covered by whole chunks.
  static int64_t Chunked(int64_t n) { return n / kElems * kElems; }

  static void Load(const void* row, int64_t c, V* out) {
    if constexpr (kDt == DType::kF32) {
      out[0] = T::Load(static_cast<const float*>(row) + c);
    } else if constexpr (kDt == DType::kF16) {
      out[0] = T::LoadF16(static_cast<const uint16_t*>(row) + c);
    } else {
      T::LoadBf16Pair(static_cast<const uint16_t*>(row) + c, &out[0], &out[1]);
    }
  }

  static V LoadTail(const void* row, int64_t c) {
    if constexpr (kDt == DType::kF32) return T::Load(static_cast<const float*>(row) + c);
    if constexpr (kDt == DType::kF16) return T::LoadF16(static_cast<const uint16_t*>(row) + c);
    return T::LoadBf16(static_cast<const uint16_t*>(row) + c);
  }

  // Where element d of a row of n sits in the kernels' order.
  static int64_t Position(int64_t d, int64_t n) {
    if (kVecs == 1 || d >= Chunked(n)) return d;
    const int64_t k = d % kElems;
    return d - k + (k % 2) * W + k / 2;
  }
};

// s[r * M + i] = Σ_d k[r][d] · q[i * D + d] for T::kDecodeKeys keys and kN <= 4
// lanes; q in RowChunks order. Each score is its own accumulator reduced by
// the same tree wherever it sits, so a lane's score does not depend on kN.
template <class T, DType kDt, int kN>
[[gnu::always_inline]] inline void DecodeScores(const void* const* k, const float* q, int64_t D, float* s, int64_t M) {
  using V = typename T::V;
  using R = RowChunks<T, kDt>;
  constexpr int W = T::kWidth;
  constexpr int kR = T::kDecodeKeys;
  if (D <= 0) __builtin_unreachable();
  V acc[kN][kR];
  for (int i = 0; i < kN; ++i)
    for (int r = 0; r < kR; ++r) acc[i][r] = T::Zero();
  const int64_t D2 = R::Chunked(D);
  for (int64_t c = 0; c < D2; c += R::kElems) {
    for (int r = 0; r < kR; ++r) {
      V kv[R::kVecs];
      R::Load(k[r], c, kv);
      for (int i = 0; i < kN; ++i)
        for (int u = 0; u < R::kVecs; ++u)
          acc[i][r] = T::Fma(kv[u], T::Load(q + i * D + c + u * W), acc[i][r]);
    }
  }
  if (D2 < D) {
    for (int r = 0; r < kR; ++r) {
      const V kv = R::LoadTail(k[r], D2);
      for (int i = 0; i < kN; ++i) acc[i][r] = T::Fma(kv, T::Load(q + i * D + D2), acc[i][r]);
    }
  }
  T::template StoreDots<kN>(acc, s, M);
}

// o[i * Dv + c] += Σ_r w[r * M + i] · v[r][c] for kR keys and kN <= 4 lanes,
// keys in order; o in RowChunks order.
template <class T, DType kDt, int kN, int kR>
[[gnu::always_inline]] inline void DecodeValues(const void* const* v, const float* w, int64_t M, int64_t Dv, float* o) {
  using V = typename T::V;
  using R = RowChunks<T, kDt>;
  constexpr int W = T::kWidth;
  if (Dv <= 0) __builtin_unreachable();
  // Local copies: the compiler cannot tell the stores to o from the pointers.
  const void* vr[kR];
  for (int r = 0; r < kR; ++r) vr[r] = v[r];
  V pw[kR][kN];
  for (int r = 0; r < kR; ++r)
    for (int i = 0; i < kN; ++i) pw[r][i] = T::Set1(w[r * M + i]);
  const int64_t D2 = R::Chunked(Dv);
  for (int64_t c = 0; c < D2; c += R::kElems) {
    V vv[kR][R::kVecs];
    for (int r = 0; r < kR; ++r) R::Load(vr[r], c, vv[r]);
    for (int i = 0; i < kN; ++i) {
      for (int u = 0; u < R::kVecs; ++u) {
        float* oc = o + i * Dv + c + u * W;
        V acc = T::Load(oc);
        for (int r = 0; r < kR; ++r) acc = T::Fma(pw[r][i], vv[r][u], acc);
        T::Store(oc, acc);
      }
    }
  }
  if (D2 < Dv) {
    V vv[kR];
    for (int r = 0; r < kR; ++r) vv[r] = R::LoadTail(vr[r], D2);
    for (int i = 0; i < kN; ++i) {
      float* oc = o + i * Dv + D2;
      V acc = T::Load(oc);
      for (int r = 0; r < kR; ++r) acc = T::Fma(pw[r][i], vv[r], acc);
      T::Store(oc, acc);
    }
  }
}

// Calls f(std::integral_constant<int, n>) for 1 <= n <= 4.
template <class F>
void WithCount(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

template <class T, DType kDt>
void RunDecodeTileTyped(const AttentionParams& p, const FlashTile& t, float* ws) {
  using V = typename T::V;
  using R = RowChunks<T, kDt>;
  constexpr int W = T::kWidth;
  constexpr int kR = T::kDecodeKeys;
  static_assert(kKeyBlock % kR == 0 && kR <= 4);
  const int lanes = t.num_heads;
  const int64_t M = RoundUp(lanes, W);
  const int64_t D = p.head_dim;
  const int64_t Dv = p.value_dim;
  const int64_t b = t.batch;
  const int64_t G = p.group_size;
  constexpr int64_t es = kDt == DType::kF32 ? 4 : 2;
  const int64_t k_head_bytes = p.k_head_stride * es;
  const int64_t v_head_bytes = p.v_head_stride * es;

  // The generic tile's workspace layout, reused: q [lanes][D], s [block][M],
  // o [lanes][Dv], m, l, alpha, u (the entropy accumulator, where the generic
  // tile keeps its key ranges).
  float* q = ws;
  float* s = q + RoundUp(D * M, 16);
  float* o = s + RoundUp(int64_t{kKeyBlock} * M, 16);
  float* m = o + RoundUp(Dv * M, 16);
  float* l = m + kMaxTileLanes;
  float* alpha = l + kMaxTileLanes;
  float* u = alpha + kMaxTileLanes;
  const bool entropy = p.entropy != nullptr;

  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t q0 = b * p.q_batch_stride + t.row_begin * p.q_row_stride +
                       (t.head_begin + lane) * p.q_head_stride;
    for (int64_t d = 0; d < D; ++d)
      q[lane * D + R::Position(d, D)] = LoadFloat(p.q, p.dtype, q0 + d) * p.scale_log2;
  }
  // Padded lanes score 0 throughout and are never written out.
  for (int64_t j = 0; j < kKeyBlock; ++j)
    for (int64_t lane = lanes; lane < M; ++lane) s[j * M + lane] = 0.f;
  for (int64_t v = 0; v < M; v += W) {
    T::Store(m + v, T::Set1(kNegInf));
    T::Store(l + v, T::Zero());
    T::Store(u + v, T::Zero());
  }
  std::fill(o, o + lanes * Dv, 0.f);

  const KeyRange r = VisibleKeyRange(p, b, t.row_begin);
  const int64_t lo = std::max(r.begin, t.key_begin);
  const int64_t hi = std::min(r.end, t.key_end);
  const int64_t g_first = t.head_begin / G;
  const int64_t g_last = (t.head_begin + lanes - 1) / G;
  // Lanes [lane_begin(g), lane_begin(g + 1)) use KV head g.
  auto lane_begin = [&](int64_t g) {
    return static_cast<int>(std::clamp<int64_t>(g * G - t.head_begin, 0, lanes));
  };

  // Rows of KV head 0 of the block's keys (paged or not, KeyRow/ValueRow
  // resolve each token once); head g is g head strides further. The score
  // pass runs kR keys at a time, so a short last group repeats the last key
  // and its extra scores (rows past nk of s) are never read.
  //
  // Under a sparse pattern the lanes share one key list (the backend plans
  // decode tiles so), so the keys SparseTileKeys yields are exactly the
  // visible ones, contiguous or not; each chunk is addressed key by key.
  const char* krow[kKeyBlock + 4];
  const char* vrow[kKeyBlock];
  const bool sparse = p.sparse.masks();
  std::optional<SparseTileKeys> sparse_keys;
  if (sparse) {
    // Every lane has the row's range (the tile's lanes share one row).
    int32_t range_begin[kMaxTileLanes], range_end[kMaxTileLanes];
    std::fill(range_begin, range_begin + lanes, static_cast<int32_t>(lo < hi ? lo : 0));
    std::fill(range_end, range_end + lanes, static_cast<int32_t>(lo < hi ? hi : 0));
    sparse_keys.emplace(p, t, range_begin, range_end,
                        reinterpret_cast<uint64_t*>(ws + FlashWorkspaceFloats(p) -
                                                    2 * SparseBitmapWords(p)));
  }
  // Sparse chunks are fetched one ahead, so that the next one's rows (of
  // scattered keys, which the hardware prefetchers do not foresee) load
  // while this one computes: its K rows during this chunk's scores, its V
  // rows during this chunk's values, a few keys at a time. Measured on SP3
  // (attn_bench), touching each row's first line raised the read rate by
  // about half over prefetches alone.
  int32_t chunk[2][kKeyBlock];
  int cur = 0;
  int next_nk = sparse ? sparse_keys->Next(chunk[0]) : 0;
  auto prefetch_next = [&](bool values, int from, int to) {
    if (!sparse) return;
    const int64_t row_bytes = (values ? Dv : D) * es;
    const int64_t head_bytes = values ? v_head_bytes : k_head_bytes;
    for (int j = from; j < std::min(to, next_nk); ++j) {
      const char* row = static_cast<const char*>(values ? ValueRow(p, b, chunk[cur][j], 0)
                                                        : KeyRow(p, b, chunk[cur][j], 0));
      for (int64_t g = g_first; g <= g_last; ++g) {
        // A load, not a prefetch, for each row's first line: a prefetch that
        // misses the TLB is dropped, and rows of one KV head are a page apart.
        (void)*reinterpret_cast<const volatile char*>(row + g * head_bytes);
        for (int64_t off = 64; off < row_bytes; off += 64) {
          __builtin_prefetch(row + g * head_bytes + off, 0, 2);
        }
      }
    }
  };
  for (int64_t j0 = lo;;) {
    int nk;
    int32_t* keys = chunk[cur];
    if (sparse) {
      nk = next_nk;
      if (nk == 0) break;
      cur ^= 1;
      next_nk = sparse_keys->Next(chunk[cur]);
    } else {
      if (j0 >= hi) break;
      nk = static_cast<int>(std::min<int64_t>(kKeyBlock, hi - j0));
      for (int j = 0; j < nk; ++j) keys[j] = static_cast<int32_t>(j0 + j);
      j0 += nk;
    }
    for (int j = 0; j < nk; ++j) {
      krow[j] = static_cast<const char*>(KeyRow(p, b, keys[j], 0));
      vrow[j] = static_cast<const char*>(ValueRow(p, b, keys[j], 0));
    }
    for (int j = nk; j % kR != 0; ++j) krow[j] = krow[nk - 1];

    // S = Q·Kᵀ, kR keys outer and KV head inner: address order.
    for (int j = 0; j < nk; j += kR) {
      prefetch_next(false, j, j + kR);
      for (int64_t g = g_first; g <= g_last; ++g) {
        const void* kr[kR];
        for (int x = 0; x < kR; ++x) kr[x] = krow[j + x] + g * k_head_bytes;
        const int lane_end = lane_begin(g + 1);
        for (int lane = lane_begin(g); lane < lane_end; lane += 4) {
          WithCount(lane_end - lane, [&](auto n) {
            DecodeScores<T, kDt, decltype(n)::value>(kr, q + lane * D, D, s + j * M + lane, M);
          });
        }
      }
    }

    prefetch_next(false, (nk + kR - 1) / kR * kR, kKeyBlock);  // a longer next chunk's rest

    // Online softmax over lane vectors (every key of the block is visible).
    for (int64_t v = 0; v < M; v += W) {
      V bmax = T::Set1(kNegInf);
      for (int64_t j = 0; j < nk; ++j) bmax = T::Max(bmax, T::Load(s + j * M + v));
      const V m_old = T::Load(m + v);
      const V m_new = T::Max(m_old, bmax);
      const V a = T::Exp2(T::Sub(m_old, m_new));
      V sum = T::Zero();
      const V l_old = T::Load(l + v);
      if (entropy) {
        V usum = T::Zero();
        for (int64_t j = 0; j < nk; ++j) {
          const V d = T::Sub(T::Load(s + j * M + v), m_new);
          const V e = T::Exp2(d);
          T::Store(s + j * M + v, e);
          sum = T::Add(sum, e);
          usum = T::Fma(e, d, usum);
        }
        EntropyRescale<T>(u + v, a, l_old, m_old, m_new, usum);
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          const V e = T::Exp2(T::Sub(T::Load(s + j * M + v), m_new));
          T::Store(s + j * M + v, e);
          sum = T::Add(sum, e);
        }
      }
      T::Store(l + v, T::Fma(l_old, a, sum));
      T::Store(m + v, m_new);
      T::Store(alpha + v, a);
    }

    // O = diag(alpha)·O + P·V, four keys at a time, KV head inner.
    for (int lane = 0; lane < lanes; ++lane) {
      const V a = T::Set1(alpha[lane]);
      for (int64_t c = 0; c < Dv; c += W) T::Store(o + lane * Dv + c, T::Mul(T::Load(o + lane * Dv + c), a));
    }
    for (int j = 0; j < nk; j += 4) {
      prefetch_next(true, j, j + 4);
      WithCount(nk - j, [&](auto nr) {
        for (int64_t g = g_first; g <= g_last; ++g) {
          const void* vr[decltype(nr)::value];
          for (int x = 0; x < nr; ++x) vr[x] = vrow[j + x] + g * v_head_bytes;
          const int lane_end = lane_begin(g + 1);
          for (int lane = lane_begin(g); lane < lane_end; lane += 4) {
            WithCount(lane_end - lane, [&](auto n) {
              DecodeValues<T, kDt, decltype(n)::value, decltype(nr)::value>(vr, s + j * M + lane, M, Dv, o + lane * Dv);
            });
          }
        }
      });
    }
    prefetch_next(true, (nk + 3) / 4 * 4, kKeyBlock);
  }

  if (t.partial != nullptr) {
    for (int lane = 0; lane < lanes; ++lane) {
      float* out = t.partial + lane * (kPartialHeader + Dv);
      out[0] = m[lane];
      out[1] = l[lane];
      out[2] = entropy ? u[lane] : 0.f;
      for (int64_t dv = 0; dv < Dv; ++dv) out[kPartialHeader + dv] = o[lane * Dv + R::Position(dv, Dv)];
    }
    return;
  }
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane;
    const LaneResult r = FinishLane(p, h, m[lane], l[lane], entropy ? u[lane] : 0.f);
    const int64_t o0 = b * p.o_batch_stride + t.row_begin * p.o_row_stride + h * p.o_head_stride;
    for (int64_t dv = 0; dv < Dv; ++dv)
      StoreFloat(p.o, p.dtype, o0 + dv, o[lane * Dv + R::Position(dv, Dv)] * r.out_scale);
    if (p.lse != nullptr) p.lse[(b * p.num_heads_q + h) * p.seqlen_q + t.row_begin] = r.lse;
    if (entropy) p.entropy[(b * p.num_heads_q + h) * p.seqlen_q + t.row_begin] = r.entropy;
  }
}

template <class T>
void RunDecodeTileImpl(const AttentionParams& p, const FlashTile& t, float* ws) {
  switch (p.dtype) {
    case DType::kF32: RunDecodeTileTyped<T, DType::kF32>(p, t, ws); break;
    case DType::kF16: RunDecodeTileTyped<T, DType::kF16>(p, t, ws); break;
    default: RunDecodeTileTyped<T, DType::kBF16>(p, t, ws); break;
  }
}
template <class T>
void RunFlashTileImpl(const AttentionParams& p, const FlashTile& t, float* ws) {
  if (DecodeTileApplies(p)) {
    RunDecodeTileImpl<T>(p, t, ws);
    return;
  }
  using V = typename T::V;
  constexpr int W = T::kWidth;
  const int lanes = t.num_heads * t.num_rows;
  const int64_t M = RoundUp(lanes, W);
  const int64_t D = p.head_dim;
  const int64_t Dv = p.value_dim;
  const int64_t b = t.batch;
  const int64_t kv_head = t.head_begin / p.group_size;

  float* qt = ws;
  float* s = qt + RoundUp(D * M, 16);
  float* ot = s + RoundUp(int64_t{kKeyBlock} * M, 16);
  float* m = ot + RoundUp(Dv * M, 16);
  float* l = m + kMaxTileLanes;
  float* alpha = l + kMaxTileLanes;
  int32_t* begin = reinterpret_cast<int32_t*>(alpha + kMaxTileLanes);
  int32_t* end = begin + kMaxTileLanes;
  float* u = reinterpret_cast<float*>(end + kMaxTileLanes);  // entropy accumulator
  float* kbuf = u + kMaxTileLanes;
  const bool entropy = p.entropy != nullptr;
  float* vbuf = kbuf + RoundUp(int64_t{kKeyBlock} * D, 16);

  const bool plain = p.softcap == 0.f && p.alibi_slopes == nullptr && p.bias == nullptr;
  const float qscale = plain ? p.scale_log2 : p.scale;

  // Queries, transposed; padded lanes are zero (their scores stay finite and
  // are never written out).
  for (int lane = 0; lane < M; ++lane) {
    if (lane >= lanes) {
      for (int64_t d = 0; d < D; ++d) qt[d * M + lane] = 0.f;
      continue;
    }
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    const int64_t q0 = b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
    for (int64_t d = 0; d < D; ++d) qt[d * M + lane] = LoadFloat(p.q, p.dtype, q0 + d) * qscale;
  }

  // Visible key ranges per lane, clipped to the tile's key range.
  int64_t lo = t.key_end, hi = t.key_begin;
  int64_t max_begin = t.key_begin, min_end = t.key_end;
  for (int lane = 0; lane < M; ++lane) {
    if (lane >= lanes) {
      begin[lane] = 0;
      end[lane] = std::numeric_limits<int32_t>::max();
      continue;
    }
    const KeyRange r = VisibleKeyRange(p, b, t.row_begin + lane % t.num_rows);
    int64_t rb = std::max(r.begin, t.key_begin);
    int64_t re = std::min(r.end, t.key_end);
    if (rb >= re) rb = re = 0;  // fully masked lane: masked in every block
    begin[lane] = static_cast<int32_t>(rb);
    end[lane] = static_cast<int32_t>(re);
    if (rb < re) {
      lo = std::min(lo, rb);
      hi = std::max(hi, re);
    }
    max_begin = std::max(max_begin, rb);
    min_end = std::min(min_end, re);
  }

  for (int64_t v = 0; v < M; v += W) {
    T::Store(m + v, T::Set1(kNegInf));
    T::Store(l + v, T::Zero());
    T::Store(u + v, T::Zero());
  }
  std::fill(ot, ot + Dv * M, 0.f);

  const bool wide = p.dtype == DType::kF32;

  // One block of keys: j0 .. j0 + nk, or keys[0 .. nk) when gathered (a
  // sparse tile's chunk). `full`: every lane sees every key (no mask);
  // otherwise each lane sees the keys in its [begin, end), unless `sparse`
  // is given, whose explicit mask over the chunk's `chunk_keys` then
  // decides. [pf0, pf1): the next contiguous block, prefetched while this
  // one computes.
  auto run_block = [&](int64_t j0, int64_t nk, const int32_t* keys, bool full,
                       SparseTileKeys* sparse, const int32_t* chunk_keys, int64_t pf0,
                       int64_t pf1) {
    // S = K·Qᵀ (keys x lanes).
    const float* kp;
    int64_t k_row;
    if (keys == nullptr && wide && p.kv_blocks == nullptr) {
      kp = static_cast<const float*>(KeyRow(p, b, j0, kv_head));
      k_row = p.k_row_stride;
    } else {
      StageBlock<T, false>(p, b, kv_head, j0, keys, nk, D, kbuf);
      kp = kbuf;
      k_row = D;
    }
    Gemm<T, false>(nk, M, D, kp, k_row, qt, s, nullptr);

    if (!plain) TransformScores(p, t, j0, keys, nk, M, s);
    if (sparse != nullptr) {
      sparse->ApplyMask(chunk_keys, static_cast<int>(nk), s, M);
      full = true;  // masked scores are -inf now
    }

    // Online softmax, one lane vector at a time (all vertical operations).
    for (int64_t v = 0; v < M; v += W) {
      V bmax = T::Set1(kNegInf);
      if (full) {
        for (int64_t j = 0; j < nk; ++j) bmax = T::Max(bmax, T::Load(s + j * M + v));
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          const V x = T::MaskOutside(T::Load(s + j * M + v), static_cast<int32_t>(j0 + j),
                                     begin + v, end + v);
          T::Store(s + j * M + v, x);
          bmax = T::Max(bmax, x);
        }
      }
      const V m_old = T::Load(m + v);
      const V m_new = T::Max(m_old, bmax);
      const V m_use = T::ZeroIfNegInf(m_new);
      const V a = T::Exp2(T::Sub(m_old, m_use));
      V sum0 = T::Zero(), sum1 = T::Zero();
      const V l_old = T::Load(l + v);
      int64_t j = 0;
      if (entropy) {
        // Masked scores are -inf: their e is 0, and d is clamped so that
        // e·d is 0 too (not NaN). The sums of e run in the same order as
        // below, so the output is bitwise the same with or without entropy.
        const V floor = T::Set1(-1e30f);
        V usum = T::Zero();
        for (; j + 1 < nk; j += 2) {
          const V d0 = T::Max(T::Sub(T::Load(s + j * M + v), m_use), floor);
          const V d1 = T::Max(T::Sub(T::Load(s + (j + 1) * M + v), m_use), floor);
          const V e0 = T::Exp2(d0);
          const V e1 = T::Exp2(d1);
          T::Store(s + j * M + v, e0);
          T::Store(s + (j + 1) * M + v, e1);
          sum0 = T::Add(sum0, e0);
          sum1 = T::Add(sum1, e1);
          usum = T::Fma(e0, d0, usum);
          usum = T::Fma(e1, d1, usum);
        }
        if (j < nk) {
          const V d0 = T::Max(T::Sub(T::Load(s + j * M + v), m_use), floor);
          const V e0 = T::Exp2(d0);
          T::Store(s + j * M + v, e0);
          sum0 = T::Add(sum0, e0);
          usum = T::Fma(e0, d0, usum);
          ++j;
        }
        EntropyRescale<T>(u + v, a, l_old, m_old, m_use, usum);
      }
      for (; j + 1 < nk; j += 2) {
        const V e0 = T::Exp2(T::Sub(T::Load(s + j * M + v), m_use));
        const V e1 = T::Exp2(T::Sub(T::Load(s + (j + 1) * M + v), m_use));
        T::Store(s + j * M + v, e0);
        T::Store(s + (j + 1) * M + v, e1);
        sum0 = T::Add(sum0, e0);
        sum1 = T::Add(sum1, e1);
      }
      if (j < nk) {
        const V e0 = T::Exp2(T::Sub(T::Load(s + j * M + v), m_use));
        T::Store(s + j * M + v, e0);
        sum0 = T::Add(sum0, e0);
      }
      T::Store(l + v, T::Fma(l_old, a, T::Add(sum0, sum1)));
      T::Store(m + v, m_new);
      T::Store(alpha + v, a);
    }

    // O = O·diag(alpha) + Vᵀ·P.
    PrefetchRows<true>(p, b, kv_head, pf0, pf1);
    const float* vp;
    int64_t v_row;
    if (keys == nullptr && wide && p.kv_blocks == nullptr) {
      vp = static_cast<const float*>(ValueRow(p, b, j0, kv_head));
      v_row = p.v_row_stride;
    } else {
      StageBlock<T, true>(p, b, kv_head, j0, keys, nk, Dv, vbuf);
      vp = vbuf;
      v_row = Dv;
    }
    Gemm<T, true>(Dv, M, nk, vp, v_row, s, ot, alpha);
  };

  if (p.sparse.masks()) {
    // The union of the lanes' candidate keys, chunk by chunk; one chunk
    // ahead, so its rows can be prefetched.
    uint64_t* bitmap = reinterpret_cast<uint64_t*>(ws + FlashWorkspaceFloats(p) -
                                                   2 * SparseBitmapWords(p));
    SparseTileKeys sparse(p, t, begin, end, bitmap);
    int32_t chunk[2][kKeyBlock];
    int n = sparse.Next(chunk[0]);
    for (int c = 0; n > 0; c ^= 1) {
      const int32_t* keys = chunk[c];
      const int next_n = sparse.Next(chunk[c ^ 1]);
      const bool contiguous = keys[n - 1] - keys[0] == n - 1;
      const bool next_contiguous = next_n > 0 && chunk[c ^ 1][next_n - 1] - chunk[c ^ 1][0] == next_n - 1;
      const int64_t pf0 = next_contiguous ? chunk[c ^ 1][0] : 0;
      const int64_t pf1 = next_contiguous ? pf0 + next_n : 0;
      PrefetchRows<false>(p, b, kv_head, pf0, pf1);
      const SparseTileKeys::Mask mask = sparse.Classify(keys, n);
      if (mask == SparseTileKeys::Mask::kExplicit) {
        run_block(keys[0], n, contiguous ? nullptr : keys, false, &sparse, keys, pf0, pf1);
      } else {
        // Contiguous: the same arithmetic as a dense block.
        run_block(keys[0], n, nullptr, mask == SparseTileKeys::Mask::kNone, nullptr, nullptr, pf0,
                  pf1);
      }
      n = next_n;
    }
  } else {
    // Key blocks are the same whether K/V are contiguous or paged, so a
    // session's decode step is bitwise equal to stateless attention over the
    // same K/V.
    auto block_end = [&](int64_t j0) { return std::min<int64_t>(j0 + kKeyBlock, hi); };
    if (lo < hi) {
      PrefetchRows<false>(p, b, kv_head, lo, block_end(lo));
      PrefetchRows<true>(p, b, kv_head, lo, block_end(lo));
    }
    for (int64_t j0 = lo, j1; j0 < hi; j0 = j1) {
      j1 = block_end(j0);
      // The next block's K and V load while this one computes.
      const int64_t next_end = j1 < hi ? block_end(j1) : j1;
      PrefetchRows<false>(p, b, kv_head, j1, next_end);
      const bool full = max_begin <= j0 && min_end >= j1;
      if (!full) {
        bool any = false;
        for (int lane = 0; lane < lanes && !any; ++lane) {
          any = std::min<int64_t>(end[lane], j1) > std::max<int64_t>(begin[lane], j0);
        }
        if (!any) continue;  // e.g. between two sliding windows of the tile's rows
      }
      run_block(j0, j1 - j0, nullptr, full, nullptr, nullptr, j1, next_end);
    }
  }

  if (t.partial != nullptr) {
    for (int lane = 0; lane < lanes; ++lane) {
      float* out = t.partial + lane * (kPartialHeader + Dv);
      out[0] = m[lane];
      out[1] = l[lane];
      out[2] = entropy ? u[lane] : 0.f;
      for (int64_t dv = 0; dv < Dv; ++dv) out[kPartialHeader + dv] = ot[dv * M + lane];
    }
    return;
  }
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    const LaneResult r = FinishLane(p, h, m[lane], l[lane], entropy ? u[lane] : 0.f);
    const float inv = r.out_scale;
    const int64_t o0 = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    if (p.dtype == DType::kF32) {
      float* o = static_cast<float*>(p.o) + o0;
      for (int64_t dv = 0; dv < Dv; ++dv) o[dv] = ot[dv * M + lane] * inv;
    } else {
      for (int64_t dv = 0; dv < Dv; ++dv) StoreFloat(p.o, p.dtype, o0 + dv, ot[dv * M + lane] * inv);
    }
    if (p.lse != nullptr) p.lse[(b * p.num_heads_q + h) * p.seqlen_q + i] = r.lse;
    if (entropy) p.entropy[(b * p.num_heads_q + h) * p.seqlen_q + i] = r.entropy;
  }
}

}  // namespace
}  // namespace attnserve::cpu

#endif  // ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_IMPL_H_
