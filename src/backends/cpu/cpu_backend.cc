#include "backends/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "attention/sparse.h"
#include "backends/cpu/flash_kernel.h"
#include "backends/cpu/scalar_attention.h"
#include "backends/cpu/thread_pool.h"

namespace attnserve {
namespace {

using cpu::FlashTile;

// Keys per chunk when a decode-like request splits its key range. With
// P4 (Lk = 4096) that is 4 chunks per head group: enough parallelism for a
// batch of one, and each chunk still streams 1024 keys (0.5 MiB of F32 K and
// V at D = 128) per tile set-up.
constexpr int64_t kSplitKeys = 1024;

// A tile over more keys than this is split into key chunks even when the
// request has many query tiles, so that no work item runs for long: a stopped
// request (see CancelToken) frees its thread within one item: a tile of
// at most 64 lanes over at most 64K keys (chunks of split tiles are shorter;
// under a sparse pattern, at most 64K listed keys).
constexpr int64_t kMaxTileKeys = 65536;

// Partial results of one split tile stay under this many bytes: past it the
// tile gets fewer, longer chunks (a multiple of kSplitKeys keys each). The
// split is thus a function of the request's shape alone, and the partials
// buffer never holds more than kPartialBytesPerThread per pool thread
// (split tiles run in waves that fit), whatever Hq, Lk and Dv are.
constexpr int64_t kMaxTilePartialBytes = int64_t{2} << 20;
constexpr int64_t kPartialBytesPerThread = int64_t{2} << 20;

// Work-item lists longer than this are released after a batch rather than
// kept for the next one (a request of millions of tiny heads would otherwise
// leave hundreds of MB behind).
constexpr size_t kKeptItems = size_t{1} << 16;

// How a tile's keys are split: `num_chunks` chunks of `chunk_keys` keys (the
// last one shorter); one chunk means no split.
struct KeySplit {
  int32_t num_chunks = 1;
  int64_t chunk_keys = 0;
};

KeySplit SplitFor(const AttentionParams& p, int32_t row_tiles, int64_t lanes) {
  // Under key lists (and no global tokens, which may show a row every key) a
  // tile visits at most the union of its rows' lists: split by that, so that
  // a chunk still holds about kSplitKeys of the keys it visits.
  int64_t visited = p.seqlen_k;
  if (p.sparse.list_offsets != nullptr && p.sparse.global_tokens == nullptr) {
    visited = std::clamp<int64_t>(p.sparse.max_list_keys * SparseTileListFactor(p), 1, p.seqlen_k);
  }
  const bool split = (row_tiles == 1 && visited >= 2 * kSplitKeys) || visited > kMaxTileKeys;
  if (!split) return {1, p.seqlen_k};
  const int64_t lane_bytes = lanes * (cpu::kPartialHeader + p.value_dim) * int64_t{sizeof(float)};
  const int64_t max_chunks = std::max<int64_t>(2, kMaxTilePartialBytes / lane_bytes);
  int64_t chunk_keys = kSplitKeys * ((p.seqlen_k + visited - 1) / visited);
  if ((p.seqlen_k + chunk_keys - 1) / chunk_keys > max_chunks) {
    const int64_t blocks = (p.seqlen_k + kSplitKeys - 1) / kSplitKeys;
    chunk_keys = (blocks + max_chunks - 1) / max_chunks * kSplitKeys;
  }
  return {static_cast<int32_t>((p.seqlen_k + chunk_keys - 1) / chunk_keys), chunk_keys};
}

// Scores per work item of the scalar path (query rows x keys).
constexpr int64_t kScalarScoresPerItem = int64_t{1} << 20;

// Scalar-path scratch per thread: a row of scores, flags and top-k
// candidates over the keys, and LINEAR's D x Dv summary, all in double.
int64_t ScalarScratchBytes(const AttentionParams& p) {
  return int64_t{p.seqlen_k} * 24 + (int64_t{p.head_dim} + 1) * (p.value_dim + 1) * 8 + 4096;
}

// 64-byte aligned float scratch that only grows.
class ScratchBuffer {
 public:
  float* Reserve(int64_t floats) {
    if (floats > size_) {
      data_.reset(static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t{64})));
      size_ = floats;
    }
    return data_.get();
  }
  int64_t bytes() const { return size_ * static_cast<int64_t>(sizeof(float)); }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  std::unique_ptr<float[], Free> data_;
  int64_t size_ = 0;
};

enum class ItemKind : uint8_t { kFlash, kScalarHead };

struct WorkItem {
  ItemKind kind;
  int32_t job;
  FlashTile tile;               // kFlash; kScalarHead uses batch, head_begin and the rows
  int64_t partial_offset = -1;  // floats into the partials buffer; -1: final output
};

// A tile whose keys are split: its chunks run as separate work items into
// partial results, then MergePartials combines them in chunk order.
struct SplitTile {
  int32_t job;
  FlashTile tile;
  KeySplit split;
  int64_t partial_floats;  // all chunks' partials
};

bool NeedsScalarPath(const AttentionParams& p) {
  return p.variant == Variant::kLinear || p.weights != nullptr || p.top_k > 0;
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, cpu::FlashTileFn tile_fn, const char* isa)
      : pool_(threads), tile_fn_(tile_fn), thread_scratch_(pool_.num_threads()) {
    info_.name = "cpu";
    info_.description = absl::StrCat("attnserve tiled flash attention (", isa, ", ",
                                     pool_.num_threads(), " threads)");
    info_.dtypes = {DType::kF32, DType::kF16, DType::kBF16};
    info_.features = {"causal", "window", "softcap", "alibi", "bias", "key_lengths", "key_offset",
                      "gqa",    "linear", "lse",     "entropy",     "weights", "top_k",
                      "block_mask", "key_indices", "global_tokens", "sink_logits"};
    info_.max_head_dim = 1024;
  }

  const BackendInfo& info() const override { return info_; }

  absl::Status Supports(const AttentionParams& p) const override {
    if (p.dtype != DType::kF32 && p.dtype != DType::kF16 && p.dtype != DType::kBF16) {
      return absl::UnimplementedError(
          absl::StrCat("cpu backend: dtype expected F32, F16 or BF16, got ", DTypeName(p.dtype)));
    }
    if (p.head_dim > info_.max_head_dim || p.value_dim > info_.max_head_dim) {
      return absl::UnimplementedError(absl::StrCat("cpu backend: head_dim expected <= ",
                                                   info_.max_head_dim, ", got ",
                                                   std::max(p.head_dim, p.value_dim)));
    }
    return absl::OkStatus();
  }

  absl::Status Run(absl::Span<const AttentionParams> batch) override {
    absl::MutexLock lock(&mu_);
    items_.clear();
    splits_.clear();
    int64_t scratch_floats = 0;
    for (int32_t job = 0; job < static_cast<int32_t>(batch.size()); ++job) {
      const AttentionParams& p = batch[job];
      if (tile_fn_ == nullptr || NeedsScalarPath(p)) {
        PlanScalar(job, p);
        continue;
      }
      scratch_floats = std::max(scratch_floats, cpu::FlashWorkspaceFloats(p));
      PlanFlash(job, p);
    }
    if (items_.empty() && splits_.empty()) return absl::OkStatus();
    for (ScratchBuffer& s : thread_scratch_) s.Reserve(scratch_floats);

    RunItems(batch, items_);
    // Split tiles in waves whose partials fit the per-thread cap (at least
    // one tile per wave; SplitFor keeps a tile's partials under its own cap).
    const int64_t wave_cap_floats =
        kPartialBytesPerThread / int64_t{sizeof(float)} * pool_.num_threads();
    for (size_t first = 0; first < splits_.size();) {
      size_t end = first;
      int64_t wave_floats = 0;
      while (end < splits_.size() &&
             (end == first || wave_floats + splits_[end].partial_floats <= wave_cap_floats)) {
        wave_floats += splits_[end].partial_floats;
        ++end;
      }
      float* partials = partials_.Reserve(wave_floats);
      wave_items_.clear();
      int64_t offset = 0;
      for (size_t t = first; t < end; ++t) {
        SplitTile& st = splits_[t];
        st.tile.partial = partials + offset;
        const int64_t chunk_floats = st.partial_floats / st.split.num_chunks;
        for (int32_t c = 0; c < st.split.num_chunks; ++c) {
          WorkItem w{ItemKind::kFlash, st.job, st.tile, offset + c * chunk_floats};
          w.tile.key_begin = c * st.split.chunk_keys;
          w.tile.key_end = std::min<int64_t>(batch[st.job].seqlen_k, (c + 1) * st.split.chunk_keys);
          w.tile.partial = partials + w.partial_offset;
          wave_items_.push_back(w);
        }
        offset += st.partial_floats;
      }
      RunItems(batch, wave_items_);
      std::atomic<bool> out_of_memory{false};
      pool_.ParallelFor(static_cast<int64_t>(end - first), [&](int64_t n, int) {
        const SplitTile& st = splits_[first + n];
        const AttentionParams& p = batch[st.job];
        if (StopRequested(p) || out_of_memory.load(std::memory_order_relaxed)) return;
        try {
          cpu::MergePartials(p, st.tile, st.tile.partial, st.split.num_chunks);
        } catch (const std::bad_alloc&) {
          out_of_memory.store(true, std::memory_order_relaxed);
        }
      });
      if (out_of_memory.load()) throw std::bad_alloc();
      first = end;
    }
    UpdateWorkspaceBytes();
    ReleaseLongLists();
    return absl::OkStatus();
  }

  // Per thread: the tile workspace (or the scalar path's rows); the split-key
  // partials, up to their cap; and the plan: a work item per tile or chunk.
  int64_t ScratchBytes(const AttentionParams& p) const override {
    const int64_t threads = pool_.num_threads();
    constexpr int64_t kItemBytes = sizeof(WorkItem);
    if (tile_fn_ == nullptr || NeedsScalarPath(p)) {
      const int64_t rows = ScalarRowsPerItem(p);
      const int64_t items = int64_t{p.batch} * p.num_heads_q * ((p.seqlen_q + rows - 1) / rows);
      return threads * ScalarScratchBytes(p) + items * kItemBytes;
    }
    int64_t partial_bytes = 0;
    int64_t items = 0;
    ForEachTile(p, [&](const FlashTile&, const KeySplit& split, int64_t lanes) {
      items += split.num_chunks;
      if (split.num_chunks > 1) {
        partial_bytes += split.num_chunks * lanes * (cpu::kPartialHeader + p.value_dim) * 4;
      }
    });
    return threads * cpu::FlashWorkspaceFloats(p) * int64_t{sizeof(float)} +
           std::min(partial_bytes, kPartialBytesPerThread * threads) +
           items * (kItemBytes + int64_t{sizeof(SplitTile)});
  }

  int64_t workspace_bytes() const override {
    return workspace_bytes_.load(std::memory_order_relaxed);
  }

 private:
  // Calls fn(tile, split, lanes) for every tile of request `p`, in the order
  // work is handed out. Everything here depends on the request's shape alone
  // (never on the batch or the thread count).
  template <typename Fn>
  static void ForEachTile(const AttentionParams& p, Fn fn) {
    // A tile holds up to 64 lanes: the whole GQA group of a KV head (up to 64
    // heads) times as many query rows as fit, so K/V is read once per group.
    // Decode tiles take every head of the batch row instead (up to 64), so a
    // thread streams the row's K and V in address order.
    // Under key lists a decode tile takes the heads that share one list
    // (its lanes must see the same keys).
    int32_t decode_heads = p.num_heads_q;
    if (p.sparse.list_offsets != nullptr) {
      // A divisor of the list's heads, so that no tile spans two lists.
      decode_heads = p.sparse.list_head_div;
      for (int32_t d = cpu::kMaxTileLanes; decode_heads > cpu::kMaxTileLanes; --d) {
        if (p.sparse.list_head_div % d == 0) decode_heads = d;
      }
    }
    const int32_t heads = std::min<int32_t>(
        cpu::DecodeTileApplies(p) ? decode_heads : p.group_size, cpu::kMaxTileLanes);
    const int32_t rows = std::max<int32_t>(1, std::min<int32_t>(cpu::kMaxTileLanes / heads, p.seqlen_q));
    const int32_t row_tiles = (p.seqlen_q + rows - 1) / rows;
    const KeySplit split = SplitFor(p, row_tiles, int64_t{heads} * rows);
    for (int32_t b = 0; b < p.batch; ++b) {
      for (int32_t h0 = 0; h0 < p.num_heads_q; h0 += heads) {
        const int32_t nh = std::min(heads, p.num_heads_q - h0);
        // Later query rows see more keys under causal masks: hand them out first.
        for (int32_t t = row_tiles - 1; t >= 0; --t) {
          FlashTile tile;
          tile.batch = b;
          tile.head_begin = h0;
          tile.num_heads = nh;
          tile.row_begin = t * rows;
          tile.num_rows = std::min(rows, p.seqlen_q - t * rows);
          tile.key_begin = 0;
          tile.key_end = p.seqlen_k;
          fn(tile, split, int64_t{tile.num_heads} * tile.num_rows);
        }
      }
    }
  }

  // Splits request `job` into work items (unsplit tiles) and split tiles.
  void PlanFlash(int32_t job, const AttentionParams& p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ForEachTile(p, [&](const FlashTile& tile, const KeySplit& split, int64_t lanes) {
      if (split.num_chunks == 1) {
        items_.push_back({ItemKind::kFlash, job, tile});
        return;
      }
      splits_.push_back({job, tile, split,
                         split.num_chunks * lanes * (cpu::kPartialHeader + p.value_dim)});
    });
  }

  // One item per (batch row, query head) for LINEAR (its prefix sums walk
  // the rows in order); per (batch row, query head, block of query rows)
  // otherwise, so that no item runs long and small batches still fill the
  // threads.
  void PlanScalar(int32_t job, const AttentionParams& p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int32_t rows = ScalarRowsPerItem(p);
    for (int32_t b = 0; b < p.batch; ++b) {
      for (int32_t h = 0; h < p.num_heads_q; ++h) {
        for (int32_t r = 0; r < p.seqlen_q; r += rows) {
          WorkItem w{ItemKind::kScalarHead, job, {}, -1};
          w.tile.batch = b;
          w.tile.head_begin = h;
          w.tile.row_begin = r;
          w.tile.num_rows = std::min(rows, p.seqlen_q - r);
          items_.push_back(w);
        }
      }
    }
  }

  static int32_t ScalarRowsPerItem(const AttentionParams& p) {
    if (p.variant == Variant::kLinear) return p.seqlen_q;
    return static_cast<int32_t>(std::clamp<int64_t>(
        kScalarScoresPerItem / std::max<int64_t>(p.seqlen_k, 1), 1, p.seqlen_q));
  }

  void ReleaseLongLists() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (items_.capacity() > kKeptItems) std::vector<WorkItem>().swap(items_);
    if (splits_.capacity() > kKeptItems) std::vector<SplitTile>().swap(splits_);
    if (wave_items_.capacity() > kKeptItems) std::vector<WorkItem>().swap(wave_items_);
  }

  // Runs `items` on the pool, skipping those of stopped requests. Throws
  // std::bad_alloc (on the calling thread) when an item ran out of memory.
  void RunItems(absl::Span<const AttentionParams> batch, const std::vector<WorkItem>& items)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::atomic<bool> out_of_memory{false};
    pool_.ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t n, int thread) {
      const WorkItem& w = items[n];
      const AttentionParams& p = batch[w.job];
      if (StopRequested(p) || out_of_memory.load(std::memory_order_relaxed)) return;
      try {
        if (w.kind == ItemKind::kScalarHead) {
          cpu::RunScalarHead(p, w.tile.batch, w.tile.head_begin, w.tile.row_begin,
                             w.tile.row_begin + w.tile.num_rows);
        } else {
          tile_fn_(p, w.tile, thread_scratch_[thread].Reserve(0));
        }
      } catch (const std::bad_alloc&) {
        out_of_memory.store(true, std::memory_order_relaxed);  // a pool thread must not throw
      }
    });
    if (out_of_memory.load()) throw std::bad_alloc();
  }

  void UpdateWorkspaceBytes() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int64_t bytes = partials_.bytes();
    for (const ScratchBuffer& s : thread_scratch_) bytes += s.bytes();
    workspace_bytes_.store(bytes, std::memory_order_relaxed);
  }

  BackendInfo info_;
  ThreadPool pool_;
  const cpu::FlashTileFn tile_fn_;

  absl::Mutex mu_;
  std::vector<ScratchBuffer> thread_scratch_ ABSL_GUARDED_BY(mu_);  // one per pool thread
  ScratchBuffer partials_ ABSL_GUARDED_BY(mu_);
  std::vector<WorkItem> items_ ABSL_GUARDED_BY(mu_);       // unsplit tiles, scalar heads
  std::vector<SplitTile> splits_ ABSL_GUARDED_BY(mu_);      // tiles split over keys
  std::vector<WorkItem> wave_items_ ABSL_GUARDED_BY(mu_);  // the chunks of one wave
  std::atomic<int64_t> workspace_bytes_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackendWithIsa(const BackendOptions& options,
                                                                 std::string_view isa) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads: expected >= 0, got ", options.threads));
  }
  static constexpr const char* kIsas[] = {"avx512", "avx2", "scalar"};
  const char* name = nullptr;
  for (const char* known : kIsas) {
    if (isa == known) name = known;
  }
  if (name == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "isa: expected avx512, avx2 or scalar, got \"", absl::string_view(isa.data(), isa.size()), "\""));
  }
  cpu::FlashTileFn fn = nullptr;
  if (!cpu::FlashTileFnForIsa(name, &fn)) {
    return absl::FailedPreconditionError(absl::StrCat("isa: this CPU cannot run ", name));
  }
  int threads = options.threads;
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  return std::unique_ptr<Backend>(new CpuBackend(threads, fn, name));
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options) {
  const char* isa = "scalar";
  cpu::SelectFlashTileFn(&isa);
  return CreateCpuBackendWithIsa(options, isa);
}

}  // namespace attnserve
