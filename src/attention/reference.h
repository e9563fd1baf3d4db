// The reference attention kernel: exact (double accumulation), simple, slow.
// It implements the whole semantics table of docs/ARCHITECTURE.md and is the oracle every
// other kernel is tested against. Thread-safe (no shared state).
#ifndef ATTNSERVE_ATTENTION_REFERENCE_H_
#define ATTNSERVE_ATTENTION_REFERENCE_H_

#include "attention/params.h"

namespace attnserve {

// Computes one request: writes params.o and every optional output that
// params points to (lse, weights, top_k).
void RunReferenceAttention(const AttentionParams& params);

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_REFERENCE_H_
