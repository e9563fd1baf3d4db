// AttentionRequest: one attention call as the core sees it, independent of the
// wire format (the gRPC adapter fills it from the proto). Borrowed views only.
// Value type; thread-compatible.
#ifndef ATTNSERVE_ATTENTION_REQUEST_H_
#define ATTNSERVE_ATTENTION_REQUEST_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "core/tensor.h"

namespace attnserve {

enum class Variant : uint8_t { kSoftmax = 0, kLinear = 1 };
// Where the causal diagonal sits when Lq != Lk. kBottomRight: query i sees
// keys j <= i + Lk - Lq (FlashAttention >= 2.1); kTopLeft: j <= i (PyTorch's
// is_causal).
enum class CausalAlignment : uint8_t { kBottomRight = 0, kTopLeft = 1 };

struct AttentionOptions {
  float scale = 0.f;  // 0 means 1/sqrt(head_dim)
  bool causal = false;
  CausalAlignment causal_alignment = CausalAlignment::kBottomRight;
  int32_t window_left = -1;   // -1: unbounded
  int32_t window_right = -1;  // -1: unbounded
  float softcap = 0.f;        // 0: off
  std::vector<float> alibi_slopes;  // empty or one per query head
  Variant variant = Variant::kSoftmax;
};

struct OutputSpec {
  bool lse = false;
  bool entropy = false;  // −Σ p·ln p per query and head
  bool weights = false;
  int32_t top_k = 0;  // 0: off
};

// K/V already held by the server in paged blocks (a KV-cache session).
// Each block holds K [block_tokens, Hkv, D] followed by V [block_tokens, Hkv, Dv].
struct PagedKvView {
  DType dtype = DType::kF32;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t value_dim = 0;
  int32_t block_tokens = 0;
  int64_t length = 0;                  // tokens
  const void* const* blocks = nullptr;  // ceil(length / block_tokens) blocks
};

// Sparse attention (AttentionRequest::sparsity). Index tensors are I32 views
// into the caller's bytes. A query row's visible keys are, in this order:
//   1. keys inside the row's range (key_lengths, causal, window) that its
//      block_mask row lists, or its key_indices row selects (every key of the
//      range when neither is given);
//   2. united with the global tokens: a global key is seen by every query
//      row, a global query row sees every key; both within key_lengths and,
//      with causal, not after the query's diagonal (the window does not apply).
// Sink logits then add exp(sink_logits[h]) to the softmax denominator.
struct BlockMaskSpec {
  int32_t block_rows = 0;  // R: query block q covers rows [q·R, (q+1)·R)
  int32_t block_cols = 0;  // C: key block c covers keys [c·C, (c+1)·C)
  // [B or 1, Hq or 1, ceil(Lq / R) + 1]: row block q of slice (b, h) lists
  // indices[indptr[b, h, q] .. indptr[b, h, q + 1]), increasing key-block
  // numbers below ceil(Lk / C). Slices follow one another in `indices`: the
  // first starts at 0, each next where the previous ended, the last at nnz.
  TensorView indptr;
  TensorView indices;  // [nnz]
  // Optional, same layout: blocks the caller knows to be fully visible
  // (FlexAttention's full blocks). They join the pattern (the union of both
  // is visible) and must not repeat a block of `indices` in the same row.
  std::optional<TensorView> full_indptr;
  std::optional<TensorView> full_indices;
  // The index bytes may change while the call runs (they lie in the caller's
  // shared memory): the planner checks and keeps a copy of its own, so the
  // kernels never read a block number that was not checked.
  bool copy_indices = false;
};

// Per query (or query block), the keys (or key blocks) to attend: DSA-, NSA-
// and MoBA-style selection. -1 pads; no duplicates in a row; any order.
struct KeySelectionSpec {
  TensorView indices;       // [B or 1, Hq or Hkv or 1, ceil(Lq / query_block), k]
  int32_t query_block = 1;  // query rows per index row
  int32_t key_block = 1;    // keys per index (index c selects keys [c·kb, (c+1)·kb))
};

struct SparsitySpec {
  std::optional<BlockMaskSpec> block_mask;
  std::optional<KeySelectionSpec> key_indices;  // not together with block_mask
  std::vector<int64_t> global_tokens;  // key positions, distinct, within [0, Lk)
  std::vector<float> sink_logits;      // empty or one per query head, finite

  bool empty() const {
    return !block_mask.has_value() && !key_indices.has_value() && global_tokens.empty() &&
           sink_logits.empty();
  }
};

struct AttentionRequest {
  TensorView query;  // [B, Lq, Hq, D] or [Lq, Hq, D]
  TensorView key;    // [B, Lk, Hkv, D]
  TensorView value;  // [B, Lk, Hkv, Dv]
  // Instead of key/value (which must then be empty): a session's cache.
  // Requires batch 1 and the cache's dtype for the query.
  std::optional<PagedKvView> paged_kv;
  std::optional<TensorView> bias;   // broadcastable to [B, Hq, Lq, Lk]
  std::vector<int32_t> key_lengths;  // empty or one per batch row
  // Sharded keys (one part of a longer sequence, for merging by lse): the
  // keys are positions [key_offset, key_offset + Lk) of a sequence of
  // total_keys (0: key_offset + Lk, the last part). Not with key_lengths.
  int64_t key_offset = 0;
  int64_t total_keys = 0;
  AttentionOptions options;
  SparsitySpec sparsity;
  OutputSpec outputs;
};

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_REQUEST_H_
