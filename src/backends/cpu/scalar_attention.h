// The cpu backend's simple path: one (batch row, query head) at a time, all
// query rows. SOFTMAX computes every output the params ask for (output, lse,
// weights, top_k) from each row's weights over the keys; LINEAR uses running
// key sums instead, O((Lq + Lk)·D·Dv) per head rather than O(Lq·Lk·(D + Dv)). It
// serves the rarely used outputs and LINEAR, and every request on CPUs
// without AVX2. Sums are accumulated in double, so it is as exact as the
// reference kernel.
//
// Thread-safe: a pure function of its arguments.
#ifndef ATTNSERVE_BACKENDS_CPU_SCALAR_ATTENTION_H_
#define ATTNSERVE_BACKENDS_CPU_SCALAR_ATTENTION_H_

#include <cstdint>

#include "attention/params.h"

namespace attnserve::cpu {

// Computes query rows [row_begin, row_end) (row_end -1: to the last) of query
// head `head` of batch row `batch`; LINEAR params go to RunLinearHead, which
// computes every row. Stops early once StopRequested(params).
void RunScalarHead(const AttentionParams& params, int64_t batch, int64_t head,
                   int64_t row_begin = 0, int64_t row_end = -1);

// LINEAR (φ = elu + 1) for query head `head` of batch row `batch`: output row i
// is φ(q_i)ᵀS / φ(q_i)ᵀz, with S = Σ_j φ(k_j) v_jᵀ and z = Σ_j φ(k_j) over the
// keys row i sees. The rows are walked in order and S, z extended by the keys
// each row newly sees: once, by all keys of the batch row, without causal; a
// prefix per row with it. A row that sees no key gets output 0. Writes the
// output and, if asked, lse = log φ(q_i)ᵀz (-inf for such a row); LINEAR has
// no weights or top_k (PrepareAttention rejects them). Params must have no
// window (PrepareAttention rejects one for LINEAR). Stops early once
// StopRequested(params).
void RunLinearHead(const AttentionParams& params, int64_t batch, int64_t head);

}  // namespace attnserve::cpu

#endif  // ATTNSERVE_BACKENDS_CPU_SCALAR_ATTENTION_H_
