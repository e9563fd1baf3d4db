// The sparse benchmark shapes of attn_bench (SP1-SP3, bench/README.md "Sparse
// shapes"): the seeded patterns they run, the bytes a pattern makes a kernel
// read, and the check that a backend's sparse output is the reference
// kernel's on a few query rows, so that a benchmark cannot time a wrong
// kernel. Free functions; thread-compatible.
//
// Randomness comes from std::mt19937's raw output (fixed by the C++
// standard), reduced with %, so a seed gives the same pattern with any
// standard library.
#ifndef ATTNSERVE_BENCH_SPARSE_SHAPES_H_
#define ATTNSERVE_BENCH_SPARSE_SHAPES_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "attention/params.h"
#include "attention/request.h"
#include "core/tensor.h"

namespace attnserve::bench {

// A sparse pattern's index tensors, owned; spec() views them.
struct SparsePattern {
  std::string description;  // one line, for the report
  // A block mask (block_rows > 0): indptr [1, Hq or 1, rows + 1], indices
  // [nnz]. Otherwise a key selection: indices [1, H, rows, k].
  int32_t block_rows = 0;
  int32_t block_cols = 0;
  int32_t query_block = 1;
  int32_t key_block = 1;
  Tensor indptr;
  Tensor indices;

  // Views into this pattern: valid while it lives and is not moved.
  SparsitySpec spec() const;
};

// Dims of the request a pattern is drawn for (causal self-attention for SP1
// and SP2, Lq == Lk; a decode step for SP3).
struct SparseShapeDims {
  int64_t hq = 0, hkv = 0, lq = 0, lk = 0;
};

// The pattern of sparse shape `id` (SP1, SP2, SP3) for `dims`, or nullopt
// when `id` is not a sparse shape. `per_head`: SP1 draws its random blocks
// per query head instead of once for all heads.
std::optional<SparsePattern> MakeSparsePattern(const std::string& id, const SparseShapeDims& dims,
                                               uint32_t seed, bool per_head);

// SP1: BigBird-like block mask over causal self-attention of `seqlen`
// tokens. Row block r lists the diagonal block and the window_blocks - 1
// before it, the first global_blocks key blocks, and random_blocks others
// below the diagonal (distinct, not already listed; all there are when
// fewer), i.e. only blocks the causal mask does not hide entirely.
struct BigBirdOptions {
  int32_t block = 64;
  int32_t window_blocks = 3;
  int32_t global_blocks = 2;
  int32_t random_blocks = 3;
};
SparsePattern BigBirdBlockMask(int64_t heads, int64_t seqlen, const BigBirdOptions& options,
                               uint32_t seed);

// SP2: DSA-style per-query selection over causal self-attention, one row per
// query shared by every head ([1, 1, seqlen, keys]): query i takes all its
// i + 1 causal keys when they are at most `keys` (padded with -1), else the
// `recent` keys up to its diagonal plus keys - recent drawn uniformly
// without replacement from the older ones.
SparsePattern RecentPlusRandomKeys(int64_t seqlen, int32_t keys, int32_t recent, uint32_t seed);

// SP3: top-k key-block selection for one decode step over `context` keys,
// one row per KV head ([1, kv_heads, 1, blocks]): the last key block, which
// holds the newest token, plus blocks - 1 others drawn uniformly without
// replacement.
SparsePattern DecodeKeyBlocks(int64_t kv_heads, int64_t context, int32_t key_block, int32_t blocks,
                              uint32_t seed);

// Bytes of K and V a kernel must read for `p`: per batch row and KV head,
// the keys of every unit that some list of its query heads selects (every
// key within the key length when `p` has no lists).
int64_t ListedKvBytes(const AttentionParams& p);

// Recomputes a few query rows of the finished job `ran` (its output filled)
// with the reference kernel and compares: causal self-attention is cut into
// three slices of `slice_rows` rows (first, middle, last; each starting on
// a list row's first query), which see only the keys up to their last row;
// any other request is checked whole.
// Returns the largest |got - want| over the root mean square of the checked
// reference outputs; INTERNAL naming the worst element when an element is
// over atol·rms + rtol·|want| (F32: 1e-3, 1e-4; F16 and BF16: 2e-2, 1e-2).
// A block the kernel missed moves an output by about a quarter of the rms.
absl::StatusOr<double> CheckAgainstReference(const AttentionParams& ran, int64_t slice_rows);

}  // namespace attnserve::bench

#endif  // ATTNSERVE_BENCH_SPARSE_SHAPES_H_
