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

#include "attention/params.h"

namespace attnserve {

// FLOP-equivalents per visible score on the tiled path besides the dot
// products: scaling, masking, the running max, exp2 and the rescale. Measured
// as the time of a D = Dv = 1 request over that of D = Dv = 64 (attn_bench
// --shape=custom --lq=2048 --lk=2048 --hq=8 --d=1 versus --d=64, see the README).
inline constexpr double kScoreFlops = 24;

// How much slower the scalar path (double accumulation, one query row at a
// time), which computes `weights`, `top_k` and LINEAR, runs per operation than
// the tiled kernel (attn_bench --weights versus the same shape without).
inline constexpr double kScalarPathFactor = 24;

// Extra FLOP-equivalents per visible score for a bias tensor (one strided
// F32 read) and for top-k selection (a bounded heap, ~log2(k) compares), on
// top of the scalar path.
inline constexpr double kBiasFlopsPerScore = 2;
inline constexpr double kTopKFlopsPerScorePerLevel = 4;

// Scores a request computes: B·Hq·Lq·Lk, halved for causal self-attention
// (the same convention as AttentionFlops).
inline double AttentionScores(const AttentionParams& p) {
  double s = double(p.batch) * p.num_heads_q * double(p.seqlen_q) * double(p.seqlen_k);
  if (p.causal && p.seqlen_q == p.seqlen_k) s /= 2;
  return s;
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

// FLOP-equivalents of the whole request: the products, the per-score softmax
// work, and the slower paths' factors. `outputs` are the optional outputs
// asked for (params' output pointers may not be set yet).
inline double AttentionCost(const AttentionParams& p, const OutputSpec& outputs) {
  if (p.variant == Variant::kLinear) return AttentionRealFlops(p) * kScalarPathFactor;
  const double scores = AttentionScores(p);
  double cost = AttentionRealFlops(p) + scores * kScoreFlops;
  if (p.bias != nullptr) cost += scores * kBiasFlopsPerScore;
  if (outputs.weights || outputs.top_k > 0) cost *= kScalarPathFactor;
  if (outputs.top_k > 0) {
    int levels = 1;
    while ((1 << levels) < outputs.top_k && levels < 31) ++levels;
    cost += scores * kTopKFlopsPerScorePerLevel * levels * kScalarPathFactor;
  }
  return cost;
}

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_COST_H_
