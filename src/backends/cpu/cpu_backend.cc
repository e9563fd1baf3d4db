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
  FlashTile tile;               // kFlash; kScalarHead uses tile.batch and tile.head_begin
  int64_t partial_offset = -1;  // floats into the partials buffer; -1: final output
};

struct Merge {
  int32_t job;
  FlashTile tile;
  int num_chunks;
  int64_t partial_offset;  // the first chunk's partials
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
    info_.features = {"causal", "window", "softcap", "alibi", "bias", "key_lengths",
                      "gqa",    "linear", "lse",     "weights", "top_k"};
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
    merges_.clear();
    int64_t partial_floats = 0;
    int64_t scratch_floats = 0;
    for (int32_t job = 0; job < static_cast<int32_t>(batch.size()); ++job) {
      const AttentionParams& p = batch[job];
      if (tile_fn_ == nullptr || NeedsScalarPath(p)) {
        for (int32_t b = 0; b < p.batch; ++b) {
          for (int32_t h = 0; h < p.num_heads_q; ++h) {
            WorkItem w{ItemKind::kScalarHead, job, {}, -1};
            w.tile.batch = b;
            w.tile.head_begin = h;
            items_.push_back(w);
          }
        }
        continue;
      }
      scratch_floats = std::max(scratch_floats, cpu::FlashWorkspaceFloats(p));
      PlanFlash(job, p, &partial_floats);
    }
    if (items_.empty()) return absl::OkStatus();

    float* partials = partials_.Reserve(partial_floats);
    for (WorkItem& w : items_) {
      if (w.partial_offset >= 0) w.tile.partial = partials + w.partial_offset;
    }
    for (Merge& m : merges_) m.tile.partial = partials + m.partial_offset;
    for (ScratchBuffer& s : thread_scratch_) s.Reserve(scratch_floats);
    UpdateWorkspaceBytes();

    pool_.ParallelFor(static_cast<int64_t>(items_.size()), [&](int64_t n, int thread) {
      const WorkItem& w = items_[n];
      const AttentionParams& p = batch[w.job];
      if (w.kind == ItemKind::kScalarHead) {
        cpu::RunScalarHead(p, w.tile.batch, w.tile.head_begin);
      } else {
        tile_fn_(p, w.tile, thread_scratch_[thread].Reserve(0));
      }
    });
    pool_.ParallelFor(static_cast<int64_t>(merges_.size()), [&](int64_t n, int) {
      const Merge& m = merges_[n];
      cpu::MergePartials(batch[m.job], m.tile, m.tile.partial, m.num_chunks);
    });
    return absl::OkStatus();
  }

  int64_t workspace_bytes() const override {
    return workspace_bytes_.load(std::memory_order_relaxed);
  }

 private:
  // Splits request `job` into tiles. Everything here depends on the request's
  // shape alone (never on the batch or the thread count).
  void PlanFlash(int32_t job, const AttentionParams& p, int64_t* partial_floats)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // A tile holds up to 64 lanes: the whole GQA group of a KV head (up to 64
    // heads) times as many query rows as fit, so K/V is read once per group.
    // Decode tiles take every head of the batch row instead (up to 64), so a
    // thread streams the row's K and V in address order.
    const int32_t heads = std::min<int32_t>(
        cpu::DecodeTileApplies(p) ? p.num_heads_q : p.group_size, cpu::kMaxTileLanes);
    const int32_t rows = std::max<int32_t>(1, std::min<int32_t>(cpu::kMaxTileLanes / heads, p.seqlen_q));
    const int32_t row_tiles = (p.seqlen_q + rows - 1) / rows;
    const bool split = row_tiles == 1 && p.seqlen_k >= 2 * kSplitKeys;
    const int32_t chunks = split ? static_cast<int32_t>((p.seqlen_k + kSplitKeys - 1) / kSplitKeys) : 1;
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
          if (!split) {
            items_.push_back({ItemKind::kFlash, job, tile});
            continue;
          }
          const int64_t lane_floats =
              int64_t{tile.num_heads} * tile.num_rows * (cpu::kPartialHeader + p.value_dim);
          merges_.push_back({job, tile, chunks, *partial_floats});
          for (int32_t c = 0; c < chunks; ++c) {
            FlashTile part = tile;
            part.key_begin = c * kSplitKeys;
            part.key_end = std::min<int64_t>(p.seqlen_k, (c + 1) * kSplitKeys);
            items_.push_back({ItemKind::kFlash, job, part, *partial_floats});
            *partial_floats += lane_floats;
          }
        }
      }
    }
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
  std::vector<WorkItem> items_ ABSL_GUARDED_BY(mu_);
  std::vector<Merge> merges_ ABSL_GUARDED_BY(mu_);
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
