// AVX2+FMA instantiation of the tiled attention kernel (flash_kernel_impl.h),
// for CPUs without AVX-512. Compiled with -mavx2 -mfma -mf16c; only called
// after a CPUID check.
#include <immintrin.h>

#include "backends/cpu/flash_kernel_impl.h"

namespace attnserve::cpu {
namespace {

struct Avx2 {
  static constexpr int kWidth = 8;
  // 4 x 3 accumulators + 3 B vectors + 1 broadcast = 16 ymm registers.
  static constexpr int kRows = 4;
  static constexpr int kVecs = 3;
  using V = __m256;

  static V Zero() { return _mm256_setzero_ps(); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static float ReduceAdd(V a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }

  // As Avx512::Exp2; the power of two is built in the exponent bits.
  static V Exp2(V x) {
    const V live = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
    const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(x, n);
    V q = _mm256_set1_ps(1.5403530393381606e-4f);
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.3333558146428443e-3f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(9.618129107628477e-3f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(5.550410866482158e-2f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.2402265069591007f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.6931471805599453f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(q, _mm256_castsi256_ps(e)), live);
  }

  static V ZeroIfNegInf(V x) {
    const V inf = _mm256_cmp_ps(x, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ);
    return _mm256_andnot_ps(inf, x);
  }

  static V MaskOutside(V s, int32_t j, const int32_t* begin, const int32_t* end) {
    const __m256i jv = _mm256_set1_epi32(j);
    const __m256i before = _mm256_cmpgt_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(begin)), jv);
    const __m256i inside = _mm256_cmpgt_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(end)), jv);
    const __m256 keep = _mm256_castsi256_ps(_mm256_andnot_si256(before, inside));
    return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), s, keep);
  }

  // Decode tiles: 2 keys x up to 4 lanes = 8 score accumulators (of 16 ymm).
  static constexpr int kDecodeKeys = 2;

  static V LoadF16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V LoadBf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // 16 BF16 values: elements 0, 2, .., 14 to *even and 1, 3, .., 15 to *odd.
  static void LoadBf16Pair(const uint16_t* p, V* even, V* odd) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xFFFF0000u))));
  }

  template <int kN>
  [[gnu::always_inline]] static void StoreDots(const V (&acc)[kN][kDecodeKeys], float* s, int64_t M) {
    for (int i = 0; i < kN; ++i)
      for (int r = 0; r < kDecodeKeys; ++r) s[r * M + i] = ReduceAdd(acc[i][r]);
  }

  static void Widen16(const uint16_t* src, DType dtype, int64_t n, float* dst) {
    int64_t i = 0;
    if (dtype == DType::kF16) {
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                      reinterpret_cast<const __m128i*>(src + i))));
      }
      for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
    } else {
      for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
      for (; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
    }
  }
};

}  // namespace

void RunFlashTileAvx2(const AttentionParams& params, const FlashTile& tile, float* workspace) {
  RunFlashTileImpl<Avx2>(params, tile, workspace);
}

}  // namespace attnserve::cpu
