// What this machine can physically do, measured at start-up so that a
// benchmark's fractions mean the same on any machine: the FP32 FMA peak
// (register-resident FMA chains, widest vector ISA, all threads) and the
// memory read bandwidth (a large array, all threads). Not thread-safe: call
// from one thread while nothing else runs.
#ifndef ATTNSERVE_BENCH_MACHINE_PEAK_H_
#define ATTNSERVE_BENCH_MACHINE_PEAK_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace attnserve::bench {

struct MachinePeak {
  double fma_gflops = 0;  // FP32, 2 FLOPs per FMA lane
  double read_gbps = 0;   // 1e9 bytes per second
  std::string isa;        // the ISA the FMA loop used
};

MachinePeak MeasureMachinePeak(int threads);

// Per-ISA FMA loops (machine_peak_avx512.cc / machine_peak_avx2.cc): run
// `iterations` rounds and return the FLOPs done.
double FmaLoopAvx512(long iterations);
// Sums n words with 512-bit loads (the read-bandwidth probe on AVX-512).
uint64_t ReadSumAvx512(const uint64_t* data, size_t n);
double FmaLoopAvx2(long iterations);

}  // namespace attnserve::bench

#endif  // ATTNSERVE_BENCH_MACHINE_PEAK_H_
