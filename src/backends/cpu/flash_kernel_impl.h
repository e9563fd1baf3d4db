// The body of the tiled attention kernel, written once over a small vector
// interface `T` and instantiated per instruction set (flash_kernel_avx512.cc,
// flash_kernel_avx2.cc). Include only from those files.
//
// T provides: kWidth (floats per vector), kRows/kVecs (register tile of the
// micro-kernel: kRows rows x kVecs vectors of accumulators), a vector type V,
// and Zero, Load, Store, Set1, Fma(a, b, c) = a*b + c, Mul, Add, Max, Exp2
// (for x <= 0; exactly 0 below -126), ZeroIfNegInf, MaskOutside and
// Widen16 (F16/BF16 -> F32 row conversion).
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
#include <utility>

#include "attention/params.h"
#include "backends/cpu/flash_kernel.h"
#include "core/half.h"

namespace attnserve::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

constexpr int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// Copies rows [j0, j0 + rows) of K (or V) of one KV head to a contiguous F32
// block, widening 16-bit types. Rows are addressed one by one, so a block may
// span KV-cache pages; the arithmetic on the staged block is the same as on
// rows read in place.
template <class T, bool kValues>
void StageBlock(const AttentionParams& p, int64_t b, int64_t kv_head, int64_t j0, int64_t rows,
                int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const void* src = kValues ? ValueRow(p, b, j0 + r, kv_head) : KeyRow(p, b, j0 + r, kv_head);
    if (p.dtype == DType::kF32) {
      std::memcpy(dst + r * cols, src, cols * sizeof(float));
    } else {
      T::Widen16(static_cast<const uint16_t*>(src), p.dtype, cols, dst + r * cols);
    }
  }
}

// Applies softcap, ALiBi and bias to a block of raw scores (scale·q·k) and
// converts them to log2 units. Scalar: these options are rare on the hot path.
void TransformScores(const AttentionParams& p, const FlashTile& t, int64_t j0, int64_t nk,
                     int64_t lanes_padded, float* s) {
  const int lanes = t.num_heads * t.num_rows;
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    for (int64_t j = 0; j < nk; ++j) {
      float x = s[j * lanes_padded + lane];
      if (p.softcap > 0.f) x = p.softcap * std::tanh(x / p.softcap);
      x += AlibiBias(p, t.batch, h, i, j0 + j) + BiasAt(p, t.batch, h, i, j0 + j);
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
// loops walk key j outer, KV head inner, so K and V are read in address order
// (one token's rows of every head are adjacent): each thread streams one
// contiguous region and the hardware prefetchers run ahead. Dot products run
// along D (queries row-major), the scores of a block are kept keys x lanes for
// the vertical online softmax, and the output accumulates row-major per lane.

// out[i] = Σ_d k[d] · q[i * D + d] for kN query rows.
template <class T, int kN>
void DecodeDots(const float* k, const float* q, int64_t D, float* out) {
  using V = typename T::V;
  constexpr int W = T::kWidth;
  V acc[kN];
  for (int i = 0; i < kN; ++i) acc[i] = T::Zero();
  for (int64_t c = 0; c < D; c += W) {
    const V kv = T::Load(k + c);
    for (int i = 0; i < kN; ++i) acc[i] = T::Fma(kv, T::Load(q + i * D + c), acc[i]);
  }
  for (int i = 0; i < kN; ++i) out[i] = T::ReduceAdd(acc[i]);
}

// o[i * Dv + c] += Σ_r w[r][i] · v[r][c] for kN lanes and kR value rows.
template <class T, int kR>
void DecodeAccumulate(const float* const* v, const float* w, int64_t w_row, int n, int64_t Dv,
                      float* o) {
  using V = typename T::V;
  constexpr int W = T::kWidth;
  for (int i = 0; i < n; ++i) {
    V p[kR];
    for (int r = 0; r < kR; ++r) p[r] = T::Set1(w[r * w_row + i]);
    float* oi = o + i * Dv;
    for (int64_t c = 0; c < Dv; c += W) {
      V acc = T::Load(oi + c);
      for (int r = 0; r < kR; ++r) acc = T::Fma(p[r], T::Load(v[r] + c), acc);
      T::Store(oi + c, acc);
    }
  }
}

template <class T>
void RunDecodeTileImpl(const AttentionParams& p, const FlashTile& t, float* ws) {
  using V = typename T::V;
  constexpr int W = T::kWidth;
  const int lanes = t.num_heads;
  const int64_t M = RoundUp(lanes, W);
  const int64_t D = p.head_dim;
  const int64_t Dv = p.value_dim;
  const int64_t b = t.batch;
  const int64_t G = p.group_size;

  // The generic tile's workspace layout, reused: q [lanes][D], s [block][M],
  // o [lanes][Dv], m, l, alpha, then row buffers for widened K and V.
  float* q = ws;
  float* s = q + RoundUp(D * M, 16);
  float* o = s + RoundUp(int64_t{kKeyBlock} * M, 16);
  float* m = o + RoundUp(Dv * M, 16);
  float* l = m + kMaxTileLanes;
  float* alpha = l + kMaxTileLanes;
  float* kbuf = alpha + 3 * kMaxTileLanes;
  float* vbuf = kbuf + RoundUp(int64_t{kKeyBlock} * D, 16);
  const bool wide = p.dtype == DType::kF32;

  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t q0 = b * p.q_batch_stride + t.row_begin * p.q_row_stride +
                       (t.head_begin + lane) * p.q_head_stride;
    for (int64_t d = 0; d < D; ++d) q[lane * D + d] = LoadFloat(p.q, p.dtype, q0 + d) * p.scale_log2;
  }
  // Padded lanes score 0 throughout and are never written out.
  for (int64_t j = 0; j < kKeyBlock; ++j)
    for (int64_t lane = lanes; lane < M; ++lane) s[j * M + lane] = 0.f;
  for (int64_t v = 0; v < M; v += W) {
    T::Store(m + v, T::Set1(kNegInf));
    T::Store(l + v, T::Zero());
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
  auto key_row = [&](int64_t j, int64_t g) -> const float* {
    if (wide) return static_cast<const float*>(KeyRow(p, b, j, g));
    T::Widen16(static_cast<const uint16_t*>(KeyRow(p, b, j, g)), p.dtype, D, kbuf);
    return kbuf;
  };
  auto value_row = [&](int64_t j, int64_t g, int r) -> const float* {
    if (wide) return static_cast<const float*>(ValueRow(p, b, j, g));
    T::Widen16(static_cast<const uint16_t*>(ValueRow(p, b, j, g)), p.dtype, Dv, vbuf + r * Dv);
    return vbuf + r * Dv;
  };

  for (int64_t j0 = lo, j1; j0 < hi; j0 = j1) {
    j1 = std::min<int64_t>(j0 + kKeyBlock, hi);
    const int64_t nk = j1 - j0;

    // S = Q·Kᵀ, key j outer and KV head inner: address order.
    for (int64_t j = j0; j < j1; ++j) {
      float* sj = s + (j - j0) * M;
      for (int64_t g = g_first; g <= g_last; ++g) {
        const float* kr = key_row(j, g);
        int lane = lane_begin(g);
        const int lane_end = lane_begin(g + 1);
        for (; lane + 4 <= lane_end; lane += 4) DecodeDots<T, 4>(kr, q + lane * D, D, sj + lane);
        for (; lane < lane_end; ++lane) DecodeDots<T, 1>(kr, q + lane * D, D, sj + lane);
      }
    }

    // Online softmax over lane vectors (every key of the block is visible).
    for (int64_t v = 0; v < M; v += W) {
      V bmax = T::Set1(kNegInf);
      for (int64_t j = 0; j < nk; ++j) bmax = T::Max(bmax, T::Load(s + j * M + v));
      const V m_old = T::Load(m + v);
      const V m_new = T::Max(m_old, bmax);
      const V a = T::Exp2(T::Sub(m_old, m_new));
      V sum = T::Zero();
      for (int64_t j = 0; j < nk; ++j) {
        const V e = T::Exp2(T::Sub(T::Load(s + j * M + v), m_new));
        T::Store(s + j * M + v, e);
        sum = T::Add(sum, e);
      }
      T::Store(l + v, T::Fma(T::Load(l + v), a, sum));
      T::Store(m + v, m_new);
      T::Store(alpha + v, a);
    }

    // O = diag(alpha)·O + P·V, four keys at a time, KV head inner.
    for (int lane = 0; lane < lanes; ++lane) {
      const V a = T::Set1(alpha[lane]);
      for (int64_t c = 0; c < Dv; c += W) T::Store(o + lane * Dv + c, T::Mul(T::Load(o + lane * Dv + c), a));
    }
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      for (int64_t g = g_first; g <= g_last; ++g) {
        const float* vr[4] = {value_row(j, g, 0), value_row(j + 1, g, 1), value_row(j + 2, g, 2),
                              value_row(j + 3, g, 3)};
        const int lb = lane_begin(g);
        DecodeAccumulate<T, 4>(vr, s + (j - j0) * M + lb, M, lane_begin(g + 1) - lb, Dv,
                               o + lb * Dv);
      }
    }
    for (; j < j1; ++j) {
      for (int64_t g = g_first; g <= g_last; ++g) {
        const float* vr[1] = {value_row(j, g, 0)};
        const int lb = lane_begin(g);
        DecodeAccumulate<T, 1>(vr, s + (j - j0) * M + lb, M, lane_begin(g + 1) - lb, Dv,
                               o + lb * Dv);
      }
    }
  }

  if (t.partial != nullptr) {
    for (int lane = 0; lane < lanes; ++lane) {
      float* out = t.partial + lane * (kPartialHeader + Dv);
      out[0] = m[lane];
      out[1] = l[lane];
      std::copy(o + lane * Dv, o + (lane + 1) * Dv, out + kPartialHeader);
    }
    return;
  }
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane;
    const float inv = l[lane] > 0.f ? 1.f / l[lane] : 0.f;
    const int64_t o0 = b * p.o_batch_stride + t.row_begin * p.o_row_stride + h * p.o_head_stride;
    for (int64_t dv = 0; dv < Dv; ++dv) StoreFloat(p.o, p.dtype, o0 + dv, o[lane * Dv + dv] * inv);
    if (p.lse != nullptr) {
      p.lse[(b * p.num_heads_q + h) * p.seqlen_q + t.row_begin] =
          l[lane] > 0.f ? (m[lane] + std::log2(l[lane])) * kLn2 : kNegInf;
    }
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
  float* kbuf = reinterpret_cast<float*>(end + kMaxTileLanes);
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
  }
  std::fill(ot, ot + Dv * M, 0.f);

  const bool wide = p.dtype == DType::kF32;

  // Key blocks are the same whether K/V are contiguous or paged, so a session's
  // decode step is bitwise equal to stateless attention over the same K/V.
  auto block_end = [&](int64_t j0) { return std::min<int64_t>(j0 + kKeyBlock, hi); };
  if (lo < hi) {
    PrefetchRows<false>(p, b, kv_head, lo, block_end(lo));
    PrefetchRows<true>(p, b, kv_head, lo, block_end(lo));
  }
  for (int64_t j0 = lo, j1; j0 < hi; j0 = j1) {
    j1 = block_end(j0);
    const int64_t nk = j1 - j0;
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

    // S = K·Qᵀ (keys x lanes).
    const float* kp;
    int64_t k_row;
    if (wide && p.kv_blocks == nullptr) {
      kp = static_cast<const float*>(KeyRow(p, b, j0, kv_head));
      k_row = p.k_row_stride;
    } else {
      StageBlock<T, false>(p, b, kv_head, j0, nk, D, kbuf);
      kp = kbuf;
      k_row = D;
    }
    Gemm<T, false>(nk, M, D, kp, k_row, qt, s, nullptr);

    if (!plain) TransformScores(p, t, j0, nk, M, s);

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
      int64_t j = 0;
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
      T::Store(l + v, T::Fma(T::Load(l + v), a, T::Add(sum0, sum1)));
      T::Store(m + v, m_new);
      T::Store(alpha + v, a);
    }

    // O = O·diag(alpha) + Vᵀ·P.
    PrefetchRows<true>(p, b, kv_head, j1, next_end);
    const float* vp;
    int64_t v_row;
    if (wide && p.kv_blocks == nullptr) {
      vp = static_cast<const float*>(ValueRow(p, b, j0, kv_head));
      v_row = p.v_row_stride;
    } else {
      StageBlock<T, true>(p, b, kv_head, j0, nk, Dv, vbuf);
      vp = vbuf;
      v_row = Dv;
    }
    Gemm<T, true>(Dv, M, nk, vp, v_row, s, ot, alpha);
  }

  if (t.partial != nullptr) {
    for (int lane = 0; lane < lanes; ++lane) {
      float* out = t.partial + lane * (kPartialHeader + Dv);
      out[0] = m[lane];
      out[1] = l[lane];
      for (int64_t dv = 0; dv < Dv; ++dv) out[kPartialHeader + dv] = ot[dv * M + lane];
    }
    return;
  }
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    const float inv = l[lane] > 0.f ? 1.f / l[lane] : 0.f;
    const int64_t o0 = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    if (p.dtype == DType::kF32) {
      float* o = static_cast<float*>(p.o) + o0;
      for (int64_t dv = 0; dv < Dv; ++dv) o[dv] = ot[dv * M + lane] * inv;
    } else {
      for (int64_t dv = 0; dv < Dv; ++dv) StoreFloat(p.o, p.dtype, o0 + dv, ot[dv * M + lane] * inv);
    }
    if (p.lse != nullptr) {
      p.lse[(b * p.num_heads_q + h) * p.seqlen_q + i] =
          l[lane] > 0.f ? (m[lane] + std::log2(l[lane])) * kLn2 : kNegInf;
    }
  }
}

}  // namespace
}  // namespace attnserve::cpu

#endif  // ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_IMPL_H_
