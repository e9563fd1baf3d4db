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
  OutputSpec outputs;
};

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_REQUEST_H_
