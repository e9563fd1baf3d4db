// The cpu backend's simple path: one (batch row, query head) at a time, all
// query rows, computing every output the params ask for (output, lse, weights,
// top_k) for both variants (SOFTMAX and LINEAR). It serves the rarely used
// outputs and LINEAR, and every request on CPUs without AVX2. Scores are
// accumulated in double, so it is as exact as the reference kernel.
//
// Thread-safe: a pure function of its arguments.
#ifndef ATTNSERVE_BACKENDS_CPU_SCALAR_ATTENTION_H_
#define ATTNSERVE_BACKENDS_CPU_SCALAR_ATTENTION_H_

#include <cstdint>

#include "attention/params.h"

namespace attnserve::cpu {

// Computes query head `head` of batch row `batch`, every query row.
void RunScalarHead(const AttentionParams& params, int64_t batch, int64_t head);

}  // namespace attnserve::cpu

#endif  // ATTNSERVE_BACKENDS_CPU_SCALAR_ATTENTION_H_
