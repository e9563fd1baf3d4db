// The cost model: what one attention request costs to compute, in
// FLOP-equivalents, whatever path a backend takes for it. Admission
// (--max_request_flops) and the batcher's budget (--max_batch_flops) count
// this, so a request cannot buy minutes of compute with a small message.
//
// A FLOP-equivalent is the time the cpu backend's tiled kernel takes for one
// floating-point operation of Q·Kᵀ or P·V. Work that runs slower per operation
// (the softmax of each score, the scalar path that computes weights and top-k,
// reading a bias) is charged the FLOPs that take the same time there; the
// constants below were measured with attn_bench (see each one).
//
// Thread-compatible: pure functions.
#ifndef ATTNSERVE_ATTENTION_COST_H_
#define ATTNSERVE_ATTENTION_COST_H_

#include <algorithm>
#include <cmath>

#include "attention/params.h"

namespace attnserve {

// The constants were fitted to one attn_bench run on a 2-core AMD EPYC (Zen 3,
// AVX2), B 1, Hq 8, threads 2, where the tiled path ran Q·Kᵀ and P·V at about
// 78 GFLOP/s (a loaded machine; the ratios are what matter):
//   attn_bench --shape=custom --hq=8 --hkv=8 --lq=2048 --lk=2048 --d=64|16|1 [--bias]
//   attn_bench --shape=custom --hq=8 --hkv=8 --lq=128 --lk=2048 --d=64|1 --weights|--top_k=64
//   attn_bench --shape=custom --hq=8 --hkv=8 --lq=8192 --lk=8192 --d=64 --linear
// The README's cost-model section has the table.

// FLOP-equivalents per visible score on the tiled path besides the dot
// products: scaling, masking, the running max, exp2 and the rescale. Per
// score the tiled path took 0.85 ns at D = 1 and 4.07 ns at D = 64: a line
// of 0.0128 ns per FLOP plus 0.80 ns, i.e. 62 FLOPs' worth.
inline constexpr double kScoreFlops = 64;

// Per visible score with a bias tensor (one strided F32 read and add): the
// D = 64 run took 8.5 ns per score with a [B, Hq, Lq, Lk] bias, 4.1 without.
inline constexpr double kBiasFlopsPerScore = 320;

// The scalar path (double accumulation, one query row at a time), which
// computes `weights` and `top_k`: 328 ns per score at D = 64 and 34 ns at
// D = 1, i.e. 90 times the tiled path's time per FLOP of the products plus
// 2300 FLOPs' worth per score (softmax in double, the weights row, top-k
// selection: with k = 64 it cost no more than the weights).
inline constexpr double kScalarPathFactor = 90;
inline constexpr double kScalarScoreFlops = 2300;

// Per element of the output [B, Lq, Hq, Dv]: zeroing it, the per-lane
// accumulators and the final write (with the 16-bit conversion). A request of
// 65536 heads over one key with Dv = 1024 (a 128 MiB F16 output from a 130 KB
// message) took 5.4 ns per output element in F16 and 2.3 ns in F32, while
// the D = 64 reference shape ran at 33.6 G FLOP-equivalents/s in the same
// (loaded) run:
//   attn_bench --shape=custom --hq=65536 --hkv=1 --lq=1 --lk=1 --d=1 --dv=1024 --dtype=f16
inline constexpr double kOutputFlopsPerElement = 160;

// Per tile of work: the cpu backend runs a (batch row, KV head) group's query
// heads and rows in tiles of up to 64 lanes, each with a fixed set-up (zeroing
// its accumulators, loading its queries, the final write). Requests of many
// tiny heads are nothing but set-up: 1M heads with Lq = Lk = D = 1 (F16) took
// 116 ms, 116 ns per tile, where the D = 64 reference shape ran at 131 G
// FLOP-equivalents/s in the same (quiet) run:
//   attn_bench --shape=custom --hq=1000000 --hkv=1000000 --lq=1 --lk=1 --d=1 --dtype=f16
inline constexpr double kTileFlops = 16000;

// LINEAR by running sums (the cpu backend) ran its 4·(Lq + Lk)·D·Dv FLOPs per
// head at 3.2 GFLOP/s: 24 times slower per FLOP.
inline constexpr double kLinearFactor = 24;

// Scores a request computes: B·Hq·Lq·Lk, halved for causal self-attention
// (the same convention as AttentionFlops); for a sparse pattern, at most its
// bound (SparseScoresBound in sparse.h).
inline double DenseAttentionScores(const AttentionParams& p) {
  double s = double(p.batch) * p.num_heads_q * double(p.seqlen_q) * double(p.seqlen_k);
  if (CausalSquare(p)) s /= 2;
  return s;
}
inline double AttentionScores(const AttentionParams& p) {
  const double s = DenseAttentionScores(p);
  return p.sparse.score_bound >= 0 ? std::min(s, p.sparse.score_bound) : s;
}

// Elements of the output [B, Lq, Hq, Dv].
inline double AttentionOutputElements(const AttentionParams& p) {
  return double(p.batch) * p.seqlen_q * p.num_heads_q * p.value_dim;
}

// Tiles of up to 64 lanes (query head x query row) per (batch row, KV head).
inline double AttentionTiles(const AttentionParams& p) {
  const double lanes = double(p.group_size) * p.seqlen_q;
  return double(p.batch) * p.num_heads_kv * std::ceil(lanes / 64);
}

// The real floating-point work of the products, 2·B·Hq·Lq·Lk·(D + Dv)
// (causal self-attention halved); for LINEAR with prefix sums,
// 4·B·Hq·(Lq + Lk)·D·Dv.
inline double AttentionRealFlops(const AttentionParams& p) {
  if (p.variant == Variant::kLinear) {
    return 4.0 * p.batch * p.num_heads_q * (double(p.seqlen_q) + p.seqlen_k) * p.head_dim *
           p.value_dim;
  }
  return 2.0 * AttentionScores(p) * (double(p.head_dim) + p.value_dim);
}

// FLOP-equivalents of the whole request: the products, the per-score work,
// and the slower paths' factors. `outputs` are the optional outputs asked for
// (params' output pointers may not be set yet).
inline double AttentionCost(const AttentionParams& p, const OutputSpec& outputs) {
  if (p.variant == Variant::kLinear) {
    return AttentionRealFlops(p) * kLinearFactor +
           AttentionOutputElements(p) * kOutputFlopsPerElement + AttentionTiles(p) * kTileFlops;
  }
  const double scores = AttentionScores(p);
  double cost;
  if (outputs.weights || outputs.top_k > 0) {
    // The scalar path asks every key of every row whether it is visible, so
    // a sparse pattern saves it only the products.
    cost = AttentionRealFlops(p) * kScalarPathFactor + DenseAttentionScores(p) * kScalarScoreFlops;
  } else {
    cost = AttentionRealFlops(p) + scores * kScoreFlops;
  }
  if (p.bias != nullptr) cost += scores * kBiasFlopsPerScore;
  return cost + AttentionOutputElements(p) * kOutputFlopsPerElement +
         AttentionTiles(p) * kTileFlops;
}

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_COST_H_
