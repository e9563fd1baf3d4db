// The keys a tile of the tiled kernel visits under a sparse pattern (block
// masks, key selection, global tokens; see SparseParams in
// attention/params.h), and the per-lane masks of each chunk of them.
//
// A tile's lanes may have different key lists (per-head patterns, several
// query blocks or per-query selections in one tile). The tile walks the
// union of its lanes' candidate keys in increasing order, in chunks of up to
// kKeyBlock keys, contiguous or gathered; each chunk is then classified:
// every lane sees every key (no mask), the lanes' ranges alone decide (the
// dense kernel's range mask), or an explicit per-lane mask is needed. Work is
// thus proportional to the union of the listed blocks, and masks are
// evaluated only in chunks that need them.
//
// Thread-compatible: one object per tile, on the stack of the thread that
// runs the tile; the bitmap lives in that thread's workspace.
#ifndef ATTNSERVE_BACKENDS_CPU_SPARSE_TILE_H_
#define ATTNSERVE_BACKENDS_CPU_SPARSE_TILE_H_

#include <cstdint>

#include "attention/params.h"
#include "backends/cpu/flash_kernel.h"

namespace attnserve::cpu {

// 64-bit words of bitmap scratch a sparse tile of `p` needs.
int64_t SparseBitmapWords(const AttentionParams& p);

class SparseTileKeys {
 public:
  enum class Mask : uint8_t {
    kNone,      // every lane sees every key of the chunk
    kRange,     // each lane sees the chunk's keys inside its [begin, end)
    kExplicit,  // call ApplyMask
  };

  // `begin`/`end`: each lane's visible key range (window, causal, length),
  // clipped to the tile's key range, as the tiled kernel computed it.
  // `words`: SparseBitmapWords(p) words of scratch.
  SparseTileKeys(const AttentionParams& p, const FlashTile& t, const int32_t* begin,
                 const int32_t* end, uint64_t* words);

  // The next chunk: its keys, increasing, in keys[0 .. n); returns n (0 when
  // the tile is done). Keys are the union of the lanes' candidates, so with a
  // single list (or a decode tile, whose lanes share one) every key of a
  // chunk is visible to every lane.
  int Next(int32_t* keys);

  // What a chunk (just returned by Next) needs masked. Call once per chunk,
  // in order.
  Mask Classify(const int32_t* keys, int n);

  // Sets s[k * M + lane] to -inf for every lane that does not see keys[k].
  void ApplyMask(const int32_t* keys, int n, float* s, int64_t M);

 private:
  struct Lane {
    bool has_list = false;           // false: no lists (every key of the range)
    const int32_t* units = nullptr;  // the lane's list
    int32_t count = 0;
    int32_t cursor = 0;  // first unit not below the current chunk's
    int32_t begin = 0, end = 0;
    int64_t diag = 0;          // the query's position among the keys
    bool global_row = false;   // a global query: sees every key up to diag
  };

  void SetBits(int64_t j0, int64_t j1);
  // Bit k: keys[k] lies in a unit of the lane's list. Advances the lane's
  // cursor (chunks come in increasing key order).
  uint64_t ListedBits(Lane& lane, const int32_t* keys, int n, bool contiguous);

  const AttentionParams& p_;
  int lanes_ = 0;
  Lane lane_[kMaxTileLanes];
  bool any_global_row_ = false;
  int64_t base_ = 0;   // key of bit 0
  int64_t limit_ = 0;  // keys [base_, limit_) are tracked
  uint64_t* words_ = nullptr;
  int64_t next_ = 0;          // Next resumes at this key
  int32_t global_cursor_ = 0;  // first global token not below the current chunk
  uint64_t chunk_globals_ = 0;  // bit k: keys[k] of the current chunk is a global token
};

}  // namespace attnserve::cpu

#endif  // ATTNSERVE_BACKENDS_CPU_SPARSE_TILE_H_
