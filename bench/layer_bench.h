// attn_bench --layer: one attention layer from weights (model/layer.h),
// projections and attention, timed the way the server runs it.
//   L1   a Llama-3-8B-like layer (hidden 4096, 32/8 heads, D 128, RoPE θ
//        500000), prefill of 512 tokens, causal (AttendLayer's path)
//   L2   the same layer, one decode step of 16 sequences over 1024 cached
//        tokens each (a model session's BatchDecode path: one matmul per
//        projection over the 16 rows, appends to paged caches, attention)
//   DIR  a model directory (--model's format): layer 0, a prefill of --lq
//        tokens
#ifndef ATTNSERVE_BENCH_LAYER_BENCH_H_
#define ATTNSERVE_BENCH_LAYER_BENCH_H_

#include <string>

#include "machine_peak.h"

namespace attnserve::bench {

struct LayerBenchOptions {
  std::string layer;        // L1, L2 or a directory
  std::string dtype;        // f32 or bf16: the weights (BF16 needs AVX-512 BF16) and L2's cache
  std::string backend;      // the attention's backend
  int threads = 0;
  int prefill_tokens = 512;  // DIR: --lq
  int iters = 0;             // 0: as many as fit in min_time (at least 3)
  double min_time = 1.0;
  bool json = false;
};

// Prints the result (text or one JSON line); returns the process exit code.
int RunLayerBench(const LayerBenchOptions& options, const MachinePeak& peak);

}  // namespace attnserve::bench

#endif  // ATTNSERVE_BENCH_LAYER_BENCH_H_
