// dot_peak: one core's peak for the two AVX-512 dot-product instructions a
// BF16 attention kernel could use, in FLOPs per second of thread CPU time:
// VFMADD231PS (FP32, 16 lanes x 2 FLOPs) and VDPBF16PS (BF16 pairs into FP32,
// 16 lanes x 4 FLOPs). BF16 inputs only beat the FP32 kernel on compute when
// the second is well above the first. Prints one JSON line.
#include <time.h>

#include <cstdio>

#include "machine_peak.h"

namespace attnserve::bench {
namespace {

// 16 independent VDPBF16PS chains; returns the FLOPs done.
double Bf16DotLoop(long iterations) {
  if (iterations <= 0) return 0;
  long n = iterations;
  __asm__ volatile(
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
      "vmovaps %%zmm0, %%zmm1\n\t vmovaps %%zmm0, %%zmm2\n\t vmovaps %%zmm0, %%zmm3\n\t"
      "vmovaps %%zmm0, %%zmm4\n\t vmovaps %%zmm0, %%zmm5\n\t vmovaps %%zmm0, %%zmm6\n\t"
      "vmovaps %%zmm0, %%zmm7\n\t vmovaps %%zmm0, %%zmm8\n\t vmovaps %%zmm0, %%zmm9\n\t"
      "vmovaps %%zmm0, %%zmm10\n\t vmovaps %%zmm0, %%zmm11\n\t vmovaps %%zmm0, %%zmm12\n\t"
      "vmovaps %%zmm0, %%zmm13\n\t vmovaps %%zmm0, %%zmm14\n\t vmovaps %%zmm0, %%zmm15\n\t"
      "vmovaps %%zmm0, %%zmm30\n\t vmovaps %%zmm0, %%zmm31\n\t"
      "1:\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm0\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm1\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm2\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm3\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm4\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm5\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm6\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm7\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm8\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm9\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm10\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm11\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm12\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm13\n\t"
      "vdpbf16ps %%zmm30, %%zmm31, %%zmm14\n\t vdpbf16ps %%zmm30, %%zmm31, %%zmm15\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : [n] "+r"(n)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm30", "xmm31", "cc");
  return 4.0 * 16 * 16 * static_cast<double>(iterations);
}

double ThreadSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Best GFLOP/s of a few runs of `loop` (each ~0.2 s on a 3 GHz core).
double BestGflops(double (*loop)(long)) {
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double start = ThreadSeconds();
    const double flops = loop(20'000'000);
    const double seconds = ThreadSeconds() - start;
    if (seconds > 0 && flops / seconds / 1e9 > best) best = flops / seconds / 1e9;
  }
  return best;
}

}  // namespace
}  // namespace attnserve::bench

int main() {
  using namespace attnserve::bench;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) {
    std::fprintf(stderr, "dot_peak: needs AVX-512\n");
    return 1;
  }
  const double fp32 = BestGflops(&FmaLoopAvx512);
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("{\"fp32_fma_gflops\":%.1f,\"bf16_dot_gflops\":null}\n", fp32);
    return 0;
  }
  const double bf16 = BestGflops(&Bf16DotLoop);
  std::printf("{\"fp32_fma_gflops\":%.1f,\"bf16_dot_gflops\":%.1f,\"bf16_over_fp32\":%.2f}\n", fp32,
              bf16, bf16 / fp32);
  return 0;
}
