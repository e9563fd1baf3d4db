// AVX-512 instantiation of the tiled attention kernel (flash_kernel_impl.h).
// Compiled with -mavx512f/bw/vl/dq/bf16; only called after a CPUID check.
#include <immintrin.h>

// GCC 12's AVX-512 headers build some intrinsics from an "undefined" vector,
// which -Wmaybe-uninitialized reports inside the headers; nothing here reads
// an uninitialised value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

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
