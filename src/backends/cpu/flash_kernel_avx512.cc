// AVX-512 instantiation of the tiled attention kernel (flash_kernel_impl.h).
// Compiled with -mavx512f/bw/vl/dq/bf16; only called after a CPUID check.
#include <immintrin.h>

// GCC 12's AVX-512 headers build some intrinsics from an "undefined" vector,
// which -W(maybe-)uninitialized reports inside the headers (e.g.
// _mm512_shuffle_f32x4); nothing here reads an uninitialised value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "backends/cpu/flash_kernel_impl.h"

namespace attnserve::cpu {
namespace {

struct Avx512 {
  static constexpr int kWidth = 16;
  // 6 x 4 accumulators + 4 B vectors + 1 broadcast = 29 of 32 zmm registers.
  static constexpr int kRows = 6;
  static constexpr int kVecs = 4;
  using V = __m512;

  static V Zero() { return _mm512_setzero_ps(); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static float ReduceAdd(V a) { return _mm512_reduce_add_ps(a); }

  // 2^x for x <= 0: 2^round(x) · p(x - round(x)), p the degree-6 Taylor
  // polynomial of 2^f on [-1/2, 1/2] (relative error < 1.3e-7); 0 below -126
  // so masked scores contribute exactly nothing and no denormals appear.
  static V Exp2(V x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, n);
    V q = _mm512_set1_ps(1.5403530393381606e-4f);
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.3333558146428443e-3f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(9.618129107628477e-3f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(5.550410866482158e-2f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.2402265069591007f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.6931471805599453f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(live, q, n);
  }

  static V ZeroIfNegInf(V x) {
    const __mmask16 inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(inf, x, _mm512_setzero_ps());
  }

  // -inf where key j is outside [begin, end) of the lane.
  static V MaskOutside(V s, int32_t j, const int32_t* begin, const int32_t* end) {
    const __m512i jv = _mm512_set1_epi32(j);
    const __mmask16 keep =
        _mm512_cmp_epi32_mask(jv, _mm512_loadu_si512(begin), _MM_CMPINT_NLT) &
        _mm512_cmp_epi32_mask(jv, _mm512_loadu_si512(end), _MM_CMPINT_LT);
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(kNegInf), s);
  }

  // Decode tiles: 4 keys x up to 4 lanes = 16 score accumulators, 4 K or V
  // rows in registers per step.
  static constexpr int kDecodeKeys = 4;

  static V LoadF16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V LoadBf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // 32 BF16 values: elements 0, 2, .., 30 to *even and 1, 3, .., 31 to *odd.
  static void LoadBf16Pair(const uint16_t* p, V* even, V* odd) {
    const __m512i w = _mm512_loadu_si512(p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u))));
  }

  // s[r * M + i] = the sum of acc[i][r]'s elements for r < 4, i < kN. The 16
  // sums come out of one transposing tree (each element of every accumulator
  // goes through the same additions, so a sum does not depend on its slot):
  // halves, then quarters, then pairs within 128-bit lanes, leaving the sum of
  // accumulator 4i + r in element 4r + i.
  template <int kN>
  [[gnu::always_inline]] static void StoreDots(const V (&acc)[kN][4], float* s, int64_t M) {
    V x[16];
    for (int i = 0; i < 4; ++i)
      for (int r = 0; r < 4; ++r) x[4 * i + r] = i < kN ? acc[i < kN ? i : 0][r] : Zero();
    V a[8];
    for (int k = 0; k < 8; ++k) {
      a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
    }
    V c[4];
    for (int k = 0; k < 4; ++k) {
      c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
    }
    // c[k]'s 128-bit lane q holds 4 partial sums of accumulator 4k + q.
    V e[2];
    for (int k = 0; k < 2; ++k) {
      e[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0x88),
                           _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0xDD));
    }
    const V y = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
    constexpr __mmask16 kLanes = (1u << kN) - 1;
    for (int r = 0; r < 4; ++r) {
      _mm512_mask_storeu_ps(s + r * M - 4 * r, static_cast<__mmask16>(kLanes << (4 * r)), y);
    }
  }

  static void Widen16(const uint16_t* src, DType dtype, int64_t n, float* dst) {
    int64_t i = 0;
    if (dtype == DType::kF16) {
      for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                      reinterpret_cast<const __m256i*>(src + i))));
      }
      for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
    } else {
      for (; i + 16 <= n; i += 16) {
        const __m512i w = _mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      }
      for (; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
    }
  }
};

}  // namespace

void RunFlashTileAvx512(const AttentionParams& params, const FlashTile& tile, float* workspace) {
  RunFlashTileImpl<Avx512>(params, tile, workspace);
}

}  // namespace attnserve::cpu
