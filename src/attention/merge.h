// MergeAttentionStates: softmax attention over a key sequence split into
// contiguous parts, computed part by part (each with its log-sum-exp), and
// combined here into the attention over all the keys, exactly up to rounding.
// Pure functions of their arguments: thread-safe, and bitwise deterministic.
//
// A part's state is its output o_p [B, Lq, Hq, Dv] and its lse s_p [B, Hq,
// Lq] (natural log: s_p = ln Σ_j exp(score_j) over the part's visible keys).
// Per query row and head the merge is
//   m = max_p s_p,  s = m + ln Σ_p exp(s_p − m),  o = Σ_p exp(s_p − s) · o_p.
// A part that sees no key of a row has s_p = −inf and contributes nothing
// (its o_p is not read, so it may hold anything); a row that no part sees
// gets s = −inf and o = 0, as attnserve answers for a fully masked row. No
// NaN comes from −inf − −inf. A NaN lse makes its row's outputs NaN.
//
// Base of the lse: attnserve's `lse` output, PyTorch's and FlashAttention's
// are natural logs. FlashInfer's merge_state and its kernels' lse use base 2
// by default; multiply a base-2 lse by ln 2 before merging it here.
//
// Sharding an AttendRequest by keys: send each part key_offset / total_keys
// (AttentionRequest) so that causal masks, windows and ALiBi count positions
// in the whole sequence, ask for outputs.lse, then merge the answers in any
// fixed order. Only the output and lse merge here; weights, top-k and
// entropy are not combined.
#ifndef ATTNSERVE_ATTENTION_MERGE_H_
#define ATTNSERVE_ATTENTION_MERGE_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/tensor.h"

namespace attnserve {

// One part's result, F32, contiguous, borrowed: output [B, Lq, Hq, Dv] and
// lse [B, Hq, Lq] (the layouts of AttentionJob::output and ::lse).
struct AttentionState {
  const float* output = nullptr;
  const float* lse = nullptr;
};

struct StateDims {
  int64_t batch = 0;
  int64_t seqlen_q = 0;
  int32_t heads = 0;      // query heads, Hq
  int32_t value_dim = 0;  // Dv
};

// Merges `parts` into out_output [B, Lq, Hq, Dv] and out_lse [B, Hq, Lq].
// Each row is computed in double from all the parts at once (the maximum lse
// first, then the sums in part order) and rounded to float once, so the
// result does not depend on how the parts are grouped beyond that rounding,
// and equals the pairwise chain ((p0 ⊕ p1) ⊕ p2) ⊕ ... within it. The
// outputs may be the buffers of one of the parts (every element is read
// before it is written); otherwise they must not overlap the inputs. No
// parts: out_output 0 and out_lse −inf. A single part is copied bit for bit.
void MergeAttentionStates(absl::Span<const AttentionState> parts, const StateDims& dims,
                          float* out_output, float* out_lse);

// (acc_output, acc_lse) ⊕= part, in place: MergeAttentionStates of
// {acc, part} into acc, so a running merge over parts p1, p2, ... started
// from p0 (or from the empty state: output 0, lse −inf) is the pairwise chain.
void MergeAttentionStateInto(const AttentionState& part, const StateDims& dims, float* acc_output,
                             float* acc_lse);

// One part's result as tensors, borrowed: output [B, Lq, Hq, Dv] (or [Lq, Hq,
// Dv], batch 1) in F32, F16 or BF16, and lse [B, Hq, Lq] in F32. The bytes
// may be unaligned (wire bytes).
struct AttentionStateView {
  TensorView output;
  TensorView lse;
};

// Owned result of merging tensors: output shaped as the parts' outputs, in
// the dtype asked for; lse [B, Hq, Lq] F32.
struct MergedAttention {
  Tensor output;
  Tensor lse;
};

// MergeAttentionStates over tensors. 16-bit outputs are widened to F32 before
// the merge; the merged output is rounded once to `output_dtype` (F32, F16 or
// BF16). INVALID_ARGUMENT, naming the part and field ("parts[2].lse.shape:
// expected [1, 4, 7], got [1, 4, 8]"), when there are no parts, when a part's
// output differs from parts[0]'s in dtype or shape, when an lse is not F32
// [B, Hq, Lq] of that output, when a tensor's bytes do not match its shape,
// or for an output_dtype other than F32, F16 or BF16.
absl::StatusOr<MergedAttention> MergeAttentionStates(absl::Span<const AttentionStateView> parts,
                                                     DType output_dtype = DType::kF32);

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_MERGE_H_
