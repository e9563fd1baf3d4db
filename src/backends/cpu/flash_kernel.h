// The tiled (flash-style) softmax attention kernel of the cpu backend: the unit
// of work it runs (FlashTile), the per-thread scratch it needs, and the
// instruction-set variants chosen at run time from CPUID.
//
// A tile is a set of "lanes", each lane one (query head, query row) pair of one
// batch row; all heads of a tile share one KV head (decode tiles excepted), so K and V are read once
// for the whole GQA group. The kernel keeps the scores of one key block
// transposed (keys x lanes), so the softmax statistics of every lane are plain
// vertical vector operations, and it never holds more than one key block of
// scores: the workspace is O(tile), independent of Lq and Lk.
//
// Thread safety: the kernels are pure functions of their arguments; each
// thread passes its own workspace.
#ifndef ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_H_
#define ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_H_

#include <cstdint>
#include <string_view>

#include "attention/params.h"

namespace attnserve::cpu {

// At most this many lanes per tile (4 AVX-512 vectors): enough to reuse each
// loaded K/V element 64 times, small enough that a 64-key block of scores
// (16 KiB) stays in L1.
inline constexpr int kMaxTileLanes = 64;
// Keys per block of the online softmax.
inline constexpr int kKeyBlock = 64;

struct FlashTile {
  int32_t batch = 0;
  int32_t head_begin = 0;  // query heads [head_begin, head_begin + num_heads), one KV head
  int32_t num_heads = 0;
  int32_t row_begin = 0;  // query rows [row_begin, row_begin + num_rows)
  int32_t num_rows = 0;   // lane l is head head_begin + l / num_rows, row row_begin + l % num_rows
  // Keys considered, on top of the masks: the whole row, or one chunk of a
  // split key range.
  int64_t key_begin = 0;
  int64_t key_end = 0;
  // Null: write the final output (and lse, entropy). Otherwise a partial
  // result per lane, kPartialHeader + value_dim floats each: the running max
  // (log2 units), the sum of exponentials, the entropy accumulator (see
  // EntropyRescale in flash_kernel_impl.h; 0 when not asked) and the
  // unnormalised output, merged later by MergePartials.
  float* partial = nullptr;
};

inline constexpr int kPartialHeader = 3;

// Whether tiles of `params` are decode tiles: one query row (Lq = 1), no
// score transform, head and value dims multiples of 16. A decode tile's lanes
// are its heads, which may span several KV heads (the kernel walks every KV
// head of the batch row per key so K and V stream in address order).
bool DecodeTileApplies(const AttentionParams& params);

// Floats of scratch one thread needs for a tile of `params` (64-byte aligned).
int64_t FlashWorkspaceFloats(const AttentionParams& params);

using FlashTileFn = void (*)(const AttentionParams& params, const FlashTile& tile, float* workspace);

// Instruction-set variants, each compiled in its own translation unit.
void RunFlashTileAvx512(const AttentionParams& params, const FlashTile& tile, float* workspace);
void RunFlashTileAvx2(const AttentionParams& params, const FlashTile& tile, float* workspace);

// The best variant this CPU runs, or null when it has neither AVX-512 nor
// AVX2+FMA (the caller then uses the scalar path). `isa` names it.
FlashTileFn SelectFlashTileFn(const char** isa);

// Whether this CPU runs the variant named "avx512", "avx2" or "scalar"; sets
// *fn (null for "scalar"). False for an unknown name or a missing feature.
bool FlashTileFnForIsa(std::string_view isa, FlashTileFn* fn);

// A lane's final statistics from its running max m (log2 units), its sum of
// exponentials l and its entropy accumulator u (see EntropyRescale in
// flash_kernel_impl.h), with the head's sink logit (SparseParams::
// sink_logits) counted as one more outcome when there is one.
struct LaneResult {
  float out_scale = 0.f;  // multiplies the unnormalised output
  float lse = 0.f;        // natural log; -inf when the lane saw nothing
  float entropy = 0.f;    // nats; 0 when the lane saw nothing
};
LaneResult FinishLane(const AttentionParams& params, int64_t head, float m, float l, float u);

// Combines the partial results of `num_chunks` chunks of one tile (laid out
// chunk after chunk, each `lanes` partials) in chunk order and writes the
// final output and lse of the tile's lanes.
void MergePartials(const AttentionParams& params, const FlashTile& tile, const float* partials,
                   int num_chunks);

}  // namespace attnserve::cpu

#endif  // ATTNSERVE_BACKENDS_CPU_FLASH_KERNEL_H_
