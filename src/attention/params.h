// AttentionParams: the one plain struct every attention kernel takes. Filled in
// exactly one place (PrepareAttention, after validation); kernels only read it.
// Pointers are not owned: an AttentionJob keeps the memory alive.
//
// Masking semantics live here too (KeyVisible / VisibleKeyRange), so the
// reference kernel and every fast kernel agree on them by construction.
#ifndef ATTNSERVE_ATTENTION_PARAMS_H_
#define ATTNSERVE_ATTENTION_PARAMS_H_

#include <algorithm>
#include <cstdint>

#include "attention/request.h"
#include "core/cancel_token.h"
#include "core/dtype.h"

namespace attnserve {

// Sparse attention as kernels see it (see SparsitySpec in request.h for the
// semantics). A block mask and a key selection both become key lists: list
// (b, h, r) holds increasing unit numbers, unit u covering keys
// [u·unit_keys, (u+1)·unit_keys), for query rows [r·list_row_queries,
// (r+1)·list_row_queries) of batch row b and query head h.
struct SparseParams {
  // Null: no key lists (every key of the row's range is a candidate).
  // Otherwise list n = (lb · list_heads + lh) · list_rows + r, with lb = b
  // (or 0 when list_batches is 1) and lh = h / list_head_div, spans
  // list_units[list_offsets[n] .. list_offsets[n + 1]).
  const int32_t* list_offsets = nullptr;
  const int32_t* list_units = nullptr;
  int32_t list_batches = 0;
  int32_t list_heads = 0;
  int32_t list_head_div = 1;  // query heads per list head
  int32_t list_rows = 0;
  int32_t list_row_queries = 1;
  int32_t unit_keys = 1;
  int64_t max_list_keys = 0;  // the most keys one list covers (count · unit_keys)

  // Global key positions, increasing; null when there are none.
  const int32_t* global_tokens = nullptr;
  int32_t num_global_tokens = 0;

  // Per query head, a logit added to the softmax denominator; null: none.
  const float* sink_logits = nullptr;

  // >= 0: an upper bound of the scores a tiled kernel computes (the cost
  // model's count, SparseScoresBound in sparse.h); -1: dense.
  double score_bound = -1;

  bool any() const {
    return list_offsets != nullptr || global_tokens != nullptr || sink_logits != nullptr;
  }
  // Whether some keys of a row's range may be invisible (lists), or keys
  // outside it visible (global tokens). Sinks alone mask nothing.
  bool masks() const { return list_offsets != nullptr || global_tokens != nullptr; }
};

// The units (increasing) a key list selects.
struct KeyList {
  const int32_t* units = nullptr;
  int32_t count = 0;
};

struct AttentionParams {
  // Inputs, in `dtype`. Strides are in elements. Layout [B, L, H, D].
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;

  // Output [B, Lq, Hq, Dv] in `dtype`.
  void* o = nullptr;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  DType dtype = DType::kF32;
  Variant variant = Variant::kSoftmax;

  int32_t batch = 0;
  int32_t seqlen_q = 0;
  int32_t seqlen_k = 0;
  int32_t num_heads_q = 0;
  int32_t num_heads_kv = 0;
  int32_t head_dim = 0;
  int32_t value_dim = 0;
  int32_t group_size = 0;  // num_heads_q / num_heads_kv; kv head = q head / group_size

  float scale = 0.f;       // resolved (never 0)
  float scale_log2 = 0.f;  // scale * log2(e), for exp2-based softmax
  float softcap = 0.f;     // 0: off; else s = softcap * tanh(s / softcap)

  // Masking. `causal` is folded into window_right (0 when causal), so kernels
  // only need the window; `causal` stays for LINEAR and for statistics.
  bool causal = false;
  bool bottom_right = true;  // diagonal alignment, see DiagonalOffset()
  int32_t window_left = -1;  // -1: unbounded
  int32_t window_right = -1; // -1: unbounded

  const float* alibi_slopes = nullptr;  // [num_heads_q] or null

  // Additive bias as F32, broadcast by zero strides, indexed
  // b * bias_batch_stride + h * bias_head_stride + i * bias_row_stride + j * bias_col_stride.
  const float* bias = nullptr;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;

  const int32_t* key_lengths = nullptr;  // [batch] or null: keys >= length are padding

  // Sharded keys: these are keys [key_offset, key_offset + seqlen_k) of a
  // sequence of total_keys, and causal alignment, windows and ALiBi count
  // positions in that sequence (see DiagonalOffset). total_keys 0: not
  // sharded (never set together with key_lengths).
  int64_t key_offset = 0;
  int64_t total_keys = 0;

  // Paged K/V (KV-cache sessions; batch == 1). When kv_blocks is set, k and v
  // are unused: key row j lives in block kv_blocks[j / kv_block_tokens], its K
  // at element (j % kv_block_tokens) * k_row_stride + h * k_head_stride from
  // the block start and its V at v_block_offset + (j % kv_block_tokens) *
  // v_row_stride + h * v_head_stride. Use KeyRow()/ValueRow() to address them.
  const void* const* kv_blocks = nullptr;
  int32_t kv_block_tokens = 0;
  int64_t v_block_offset = 0;  // elements

  SparseParams sparse;

  // Optional outputs (F32 / I32), contiguous.
  float* lse = nullptr;      // [B, Hq, Lq], natural log; -inf for a fully masked row
  float* entropy = nullptr;  // [B, Hq, Lq], −Σ p·ln p in nats; 0 for a fully masked row
  float* weights = nullptr;  // [B, Hq, Lq, Lk], probabilities (0 where masked)
  int32_t top_k = 0;
  int32_t* top_k_indices = nullptr;  // [B, Hq, Lq, top_k]; -1 past the visible keys
  float* top_k_weights = nullptr;    // [B, Hq, Lq, top_k]; 0 past the visible keys

  // Polled by backends between work items; null: never stops. Not owned.
  const CancelToken* cancel = nullptr;
};

// Whether a backend should skip the rest of this job (see CancelToken).
inline bool StopRequested(const AttentionParams& p) {
  return p.cancel != nullptr && p.cancel->StopRequested();
}

// Keys of batch row b: key_lengths[b] if given, else seqlen_k. It is the row's
// Lk for alignment and ALiBi too, as in FlashAttention's varlen kernels.
inline int32_t KeyLength(const AttentionParams& p, int64_t b) {
  return p.key_lengths != nullptr ? p.key_lengths[b] : p.seqlen_k;
}

// Offset of the diagonal: query i is aligned with key i + DiagonalOffset.
// With sharded keys the query sits where it does in the whole sequence
// (bottom-right: the last query at total_keys - 1) and keys are counted from
// the shard's first, key_offset.
inline int64_t DiagonalOffset(const AttentionParams& p, int64_t b) {
  if (p.total_keys > 0) return (p.bottom_right ? p.total_keys - p.seqlen_q : 0) - p.key_offset;
  return p.bottom_right ? int64_t{KeyLength(p, b)} - p.seqlen_q : 0;
}

// Half-open range [begin, end) of keys query row i of batch b may see; empty
// (begin >= end) when the row is fully masked.
struct KeyRange {
  int64_t begin = 0;
  int64_t end = 0;
  bool empty() const { return begin >= end; }
};

inline KeyRange VisibleKeyRange(const AttentionParams& p, int64_t b, int64_t i) {
  const int64_t len = KeyLength(p, b);
  const int64_t diag = i + DiagonalOffset(p, b);
  int64_t begin = 0;
  int64_t end = len;
  if (p.window_left >= 0) begin = std::max<int64_t>(begin, diag - p.window_left);
  if (p.window_right >= 0) end = std::min<int64_t>(end, diag + p.window_right + 1);
  return KeyRange{begin, std::max(begin, end)};
}

inline bool KeyVisible(const AttentionParams& p, int64_t b, int64_t i, int64_t j) {
  const KeyRange r = VisibleKeyRange(p, b, i);
  return j >= r.begin && j < r.end;
}

// ALiBi bias for head h, query i, key j (0 when ALiBi is off).
inline float AlibiBias(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.alibi_slopes == nullptr) return 0.f;
  const int64_t dist = i + DiagonalOffset(p, b) - j;
  return -p.alibi_slopes[h] * static_cast<float>(dist < 0 ? -dist : dist);
}

inline float BiasAt(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.bias == nullptr) return 0.f;
  return p.bias[b * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_row_stride +
                j * p.bias_col_stride];
}

// Address of K[b, j, h, 0] (in dtype), contiguous or paged.
inline const void* KeyRow(const AttentionParams& p, int64_t b, int64_t j, int64_t h) {
  const size_t es = DTypeSize(p.dtype);
  if (p.kv_blocks != nullptr) {
    const char* block = static_cast<const char*>(p.kv_blocks[j / p.kv_block_tokens]);
    return block + ((j % p.kv_block_tokens) * p.k_row_stride + h * p.k_head_stride) * es;
  }
  return static_cast<const char*>(p.k) +
         (b * p.k_batch_stride + j * p.k_row_stride + h * p.k_head_stride) * es;
}

// Address of V[b, j, h, 0] (in dtype), contiguous or paged.
inline const void* ValueRow(const AttentionParams& p, int64_t b, int64_t j, int64_t h) {
  const size_t es = DTypeSize(p.dtype);
  if (p.kv_blocks != nullptr) {
    const char* block = static_cast<const char*>(p.kv_blocks[j / p.kv_block_tokens]);
    return block +
           (p.v_block_offset + (j % p.kv_block_tokens) * p.v_row_stride + h * p.v_head_stride) * es;
  }
  return static_cast<const char*>(p.v) +
         (b * p.v_batch_stride + j * p.v_row_stride + h * p.v_head_stride) * es;
}

// The key list of query row i of head h in batch row b (only when
// p.sparse.list_offsets is set).
inline KeyList SparseKeyList(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  const SparseParams& s = p.sparse;
  const int64_t lb = s.list_batches == 1 ? 0 : b;
  const int64_t n = (lb * s.list_heads + h / s.list_head_div) * s.list_rows + i / s.list_row_queries;
  return KeyList{s.list_units + s.list_offsets[n], s.list_offsets[n + 1] - s.list_offsets[n]};
}

inline bool SortedContains(const int32_t* values, int32_t count, int64_t x) {
  return std::binary_search(values, values + count, x);
}

inline bool GlobalToken(const AttentionParams& p, int64_t position) {
  return p.sparse.global_tokens != nullptr &&
         SortedContains(p.sparse.global_tokens, p.sparse.num_global_tokens, position);
}

// Whether key j is visible to query row i of head h in batch row b: the one
// definition of the mask, sparse patterns included (the reference kernel uses
// it per key; fast kernels use VisibleKeyRange and the lists, and must agree).
inline bool KeyVisibleToHead(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (j < 0 || j >= KeyLength(p, b)) return false;
  const SparseParams& s = p.sparse;
  if (s.global_tokens != nullptr) {
    const int64_t diag = i + DiagonalOffset(p, b);
    if ((GlobalToken(p, j) || GlobalToken(p, diag)) && (!p.causal || j <= diag)) return true;
  }
  if (!KeyVisible(p, b, i, j)) return false;
  if (s.list_offsets == nullptr) return true;
  const KeyList list = SparseKeyList(p, b, h, i);
  return SortedContains(list.units, list.count, j / s.unit_keys);
}

// Causal self-attention, whose scores are counted half: Lq == Lk, and the keys
// are the whole sequence (not a shard of it, which may see all its keys).
inline bool CausalSquare(const AttentionParams& p) {
  return p.causal && p.seqlen_q == p.seqlen_k &&
         (p.total_keys == 0 || (p.key_offset == 0 && p.total_keys == p.seqlen_k));
}

// Useful FLOPs of one request, 4·B·Hq·Lq·Lk·D, halved for causal self-attention
// (CausalSquare), as docs/ARCHITECTURE.md defines them for benchmarks and cost budgets.
inline double AttentionFlops(const AttentionParams& p) {
  double f = 4.0 * p.batch * p.num_heads_q * double(p.seqlen_q) * p.seqlen_k * p.head_dim;
  if (CausalSquare(p)) f /= 2;
  return f;
}

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_PARAMS_H_
