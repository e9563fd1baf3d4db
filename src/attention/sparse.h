// Sparse attention patterns: validation of a request's SparsitySpec and the
// key lists kernels read (SparseParams in params.h), plus the counts that
// benchmarks and the cost model need.
//
// Thread-compatible free functions.
#ifndef ATTNSERVE_ATTENTION_SPARSE_H_
#define ATTNSERVE_ATTENTION_SPARSE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "attention/job.h"
#include "attention/request.h"

namespace attnserve {

// The request dims a pattern is checked against.
struct SparseDims {
  int64_t B = 0, Lq = 0, Hq = 0, Lk = 0, Hkv = 0;
};

// Checks `spec` against `dims` and fills job.params.sparse, keeping what it
// points to in the job (sparse_offsets, sparse_units, global_tokens,
// sink_logits). Errors: INVALID_ARGUMENT naming the field and index (e.g.
// "sparsity.block_mask.indices[7]"), expected and received;
// RESOURCE_EXHAUSTED when the description alone is over
// limits.max_sparse_bytes. Needs job.params' dims and masks filled first.
absl::Status PlanSparsity(const SparsitySpec& spec, const SparseDims& dims,
                          const RequestLimits& limits, AttentionJob& job);

// Bytes of the description a request carries (index tensors, global tokens
// and sinks), as the limit counts them.
int64_t SparseDescriptionBytes(const SparsitySpec& spec);

// Query-key pairs visible under `p`'s masks, counted exactly over every batch
// row, head and query row (O(rows · list length)); for dense `p`, the visible
// pairs of the ranges alone.
double CountVisiblePairs(const AttentionParams& p);

// How many key lists a tile of up to 64 query rows walks the union of, at
// most (1 without lists).
int32_t SparseTileListFactor(const AttentionParams& p);

// An upper bound of the scores a tiled kernel computes for `p` (the cost
// model's count): the listed pairs times SparseTileListFactor (a tile walks
// the union of its rows' lists), plus the global tokens' keys and their rows'
// tiles. Never more than the dense count.
double SparseScoresBound(const AttentionParams& p, double dense_scores);

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_SPARSE_H_
