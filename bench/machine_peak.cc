#include "machine_peak.h"

#include <algorithm>
#include <time.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace attnserve::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Runs body(thread) on `threads` threads at once and returns the wall seconds.
template <class Body>
double RunOnThreads(int threads, Body body) {
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back([&, t] { body(t); });
  body(0);
  for (std::thread& th : pool) th.join();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Each thread's rate is taken over its own CPU time, so a busy neighbour
// process that takes turns on the cores does not lower the measured peak; the
// machine's peak is the sum over threads (one per core).
double MeasureFma(int threads, double (*loop)(long)) {
  loop(1 << 20);  // warm up the clocks
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const long iterations = 20'000'000;
    std::vector<double> rate(threads);
    RunOnThreads(threads, [&](int t) {
      const double start = ThreadCpuSeconds();
      const double flops = loop(iterations);
      rate[t] = flops / (ThreadCpuSeconds() - start);
    });
    double total = 0;
    for (double r : rate) total += r;
    best = std::max(best, total / 1e9);
  }
  return best;
}

// Sums a 1 GiB array (well past the last-level cache of most machines; on
// machines with a larger cache this measures that cache instead).
double MeasureRead(int threads) {
  const size_t n = (size_t{1} << 30) / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> data(new uint64_t[n]);
  // Touch every page in parallel so first-touch costs stay out of the timing.
  RunOnThreads(threads, [&](int t) {
    const size_t begin = n * t / threads, end = n * (t + 1) / threads;
    for (size_t i = begin; i < end; ++i) data[i] = i;
  });
  // A scalar loop is ALU-bound near 12 GB/s per core on machines whose
  // memory delivers more; the wide loop is not.
  const bool wide = __builtin_cpu_supports("avx512f");
  double best = 0;
  for (int round = 0; round < 5; ++round) {
    std::vector<uint64_t> sums(threads);
    std::vector<double> cpu(threads);
    RunOnThreads(threads, [&](int t) {
      const double start = ThreadCpuSeconds();
      const size_t begin = n * t / threads, end = n * (t + 1) / threads;
      if (wide) {
        sums[t] = ReadSumAvx512(data.get() + begin, end - begin);
      } else {
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (size_t i = begin; i + 4 <= end; i += 4) {
          a0 += data[i];
          a1 += data[i + 1];
          a2 += data[i + 2];
          a3 += data[i + 3];
        }
        sums[t] = a0 + a1 + a2 + a3;
      }
      cpu[t] = ThreadCpuSeconds() - start;
    });
    volatile uint64_t sink = sums[0];
    (void)sink;
    // The threads share the memory system, so the rate is over the slowest.
    const double s = *std::max_element(cpu.begin(), cpu.end());
    best = std::max(best, static_cast<double>(n * sizeof(uint64_t)) / s / 1e9);
  }
  return best;
}

}  // namespace

MachinePeak MeasureMachinePeak(int threads) {
  MachinePeak peak;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    peak.isa = "avx512";
    peak.fma_gflops = MeasureFma(threads, &FmaLoopAvx512);
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    peak.isa = "avx2";
    peak.fma_gflops = MeasureFma(threads, &FmaLoopAvx2);
  }
  peak.read_gbps = MeasureRead(threads);
  return peak;
}

}  // namespace attnserve::bench
