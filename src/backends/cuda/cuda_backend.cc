// Run() in four steps, all on the calling thread's stream:
//   1. plan: per request the compute dtype, whether Q/K/V need repacking
//      (F32, or a head dim that is not a multiple of 8, which would break the
//      kernel's 16-byte row loads) and the byte offsets of every buffer in one
//      upload region, one device-only region and one download region;
//   2. copy every input into pinned staging and upload it in one cudaMemcpy;
//   3. repack where needed, then launch the kernel once per group of requests
//      sharing (compute dtype, kernel head dim): one launch for a uniform batch;
//   4. download the outputs in one copy, wait, scatter them to the params.
#include "backends/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "backends/cuda/device_pool.h"
#include "backends/cuda/flash_kernel.h"

namespace attnserve {
namespace {

using cuda::DeviceJob;
using cuda::DevicePool;
using cuda::WorkItem;

constexpr int64_t kAlign = 256;
// Bits of the largest float that converts to a finite F16 (FloatToHalf in
// core/half.h rounds |x| >= 65520 to infinity).
constexpr uint32_t kF16OverflowBits = 0x477ff000u;

int64_t AlignUp(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

absl::Status CudaError(cudaError_t err, absl::string_view what) {
  return absl::InternalError(absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorName(err), " (",
                                          cudaGetErrorString(err), ")"));
}

// Copies n F32 words and returns the largest |x| as bits (NaN compares above
// infinity), so F32 inputs are scanned for F16 range while they are staged.
uint32_t CopyF32MaxAbsBits(void* dst, const void* src, int64_t n) {
  const uint32_t* s = static_cast<const uint32_t*>(src);
  uint32_t* d = static_cast<uint32_t*>(dst);
  uint32_t max_bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = s[i];
    d[i] = w;
    max_bits = std::max(max_bits, w & 0x7fffffffu);
  }
  return max_bits;
}

// Elements the bias spans: 1 + the largest offset BiasAt() can form.
int64_t BiasSpan(const AttentionParams& p) {
  const int64_t dims[4] = {p.batch, p.num_heads_q, p.seqlen_q, p.seqlen_k};
  const int64_t strides[4] = {p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride,
                              p.bias_col_stride};
  int64_t span = 1;
  for (int a = 0; a < 4; ++a) span += (dims[a] - 1) * strides[a];
  return span;
}

// A pinned host buffer that only grows. Owned by one Slot.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  absl::Status Reserve(int64_t bytes, std::atomic<int64_t>& total) {
    if (bytes <= capacity_) return absl::OkStatus();
    int64_t want = std::max<int64_t>(bytes, int64_t{1} << 20);
    want = std::max(want, capacity_ * 2);
    if (data_ != nullptr) cudaFreeHost(data_);
    total -= capacity_;
    data_ = nullptr;
    capacity_ = 0;
    const cudaError_t err = cudaMallocHost(&data_, static_cast<size_t>(want));
    if (err != cudaSuccess) {
      cudaGetLastError();
      data_ = nullptr;
      return absl::ResourceExhaustedError(absl::StrCat(
          "cuda backend: pinned staging of ", want, " bytes failed: ", cudaGetErrorString(err)));
    }
    capacity_ = want;
    total += capacity_;
    return absl::OkStatus();
  }
  char* data() const { return static_cast<char*>(data_); }

 private:
  void* data_ = nullptr;
  int64_t capacity_ = 0;
};

// What one concurrent Run() needs for itself: a stream and pinned staging.
struct Slot {
  cudaStream_t stream = nullptr;
  PinnedBuffer staging;
  ~Slot() {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

// Where one request's buffers live: offsets in the upload region (U), the
// device-only region (W) or the download region (D); -1 when absent.
struct RequestPlan {
  DType compute = DType::kBF16;
  bool repack = false;
  int32_t kernel_dim = 0;
  int32_t packed_dim_k = 0;  // head_dim rounded up to 8 (repacked Q/K rows)
  int32_t packed_dim_v = 0;  // value_dim rounded up to 8
  int64_t q_bytes = 0, k_bytes = 0, v_bytes = 0;
  int64_t q = -1, k = -1, v = -1;           // U: the request's bytes
  int64_t bias = -1, slopes = -1, lens = -1;  // U
  int64_t bias_elems = 0;
  int64_t q16 = -1, k16 = -1, v16 = -1;     // W: repacked Q/K/V
  int64_t o = -1, lse = -1;                 // D
  int64_t o_bytes = 0, lse_bytes = 0;
  int64_t first_item = 0, num_items = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const cudaDeviceProp& prop, int64_t pool_limit)
      : device_(device), pool_(pool_limit) {
    info_.name = "cuda";
    info_.description = absl::StrCat(
        "flash attention on ", prop.name, " (sm_", prop.major, prop.minor,
        ", tensor cores, FP32 accumulation); F32 requests are converted on the device to F16 "
        "(BF16 when an input exceeds F16 range), so F32 results agree with the reference to about "
        "1e-3 relative rather than exactly");
    info_.dtypes = {DType::kF32, DType::kF16, DType::kBF16};
    info_.features = {"causal", "window", "softcap", "alibi", "bias", "key_lengths", "gqa", "lse"};
    info_.max_head_dim = cuda::kMaxHeadDim;
    info_.f32_inputs_exact = false;  // F32 runs on tensor cores from F16/BF16 copies
  }

  const BackendInfo& info() const override { return info_; }

  absl::Status Supports(const AttentionParams& p) const override {
    auto unimplemented = [](absl::string_view what) {
      return absl::UnimplementedError(absl::StrCat("cuda backend: ", what, " is not supported"));
    };
    if (p.variant != Variant::kSoftmax) return unimplemented("variant LINEAR");
    if (p.kv_blocks != nullptr) return unimplemented("paged K/V (session decode)");
    if (p.total_keys > 0) return unimplemented("key_offset/total_keys (sharded keys)");
    if (p.sparse.any()) return unimplemented("sparse attention (sparsity)");
    if (p.weights != nullptr) return unimplemented("outputs.weights");
    if (p.entropy != nullptr) return unimplemented("outputs.entropy");
    if (p.top_k != 0) return unimplemented("outputs.top_k");
    if (p.dtype != DType::kF32 && p.dtype != DType::kF16 && p.dtype != DType::kBF16) {
      return unimplemented(absl::StrCat("dtype ", DTypeName(p.dtype)));
    }
    if (p.head_dim > cuda::kMaxHeadDim || p.value_dim > cuda::kMaxHeadDim) {
      return unimplemented(absl::StrCat("head_dim ", p.head_dim, " / value_dim ", p.value_dim,
                                        " (at most ", cuda::kMaxHeadDim, ")"));
    }
    // The upload copies each tensor as one block, so it must be the dense
    // [B, L, H, D] layout PrepareAttention produces.
    const bool dense =
        p.q_head_stride == p.head_dim && p.q_row_stride == int64_t{p.num_heads_q} * p.head_dim &&
        p.q_batch_stride == p.seqlen_q * p.q_row_stride && p.k_head_stride == p.head_dim &&
        p.k_row_stride == int64_t{p.num_heads_kv} * p.head_dim &&
        p.k_batch_stride == p.seqlen_k * p.k_row_stride && p.v_head_stride == p.value_dim &&
        p.v_row_stride == int64_t{p.num_heads_kv} * p.value_dim &&
        p.v_batch_stride == p.seqlen_k * p.v_row_stride && p.o_head_stride == p.value_dim &&
        p.o_row_stride == int64_t{p.num_heads_q} * p.value_dim &&
        p.o_batch_stride == p.seqlen_q * p.o_row_stride;
    if (!dense) return unimplemented("a non-dense Q/K/V/output layout");
    return absl::OkStatus();
  }

  absl::Status Run(absl::Span<const AttentionParams> all) override {
    // A kernel launch is not interrupted; jobs already stopped are not launched.
    std::vector<AttentionParams> live;
    live.reserve(all.size());
    for (const AttentionParams& p : all) {
      if (!StopRequested(p)) live.push_back(p);
    }
    const absl::Span<const AttentionParams> batch(live);
    if (batch.empty()) return absl::OkStatus();
    const cudaError_t err = cudaSetDevice(device_);
    if (err != cudaSuccess) return CudaError(err, "cudaSetDevice");
    std::unique_ptr<Slot> slot;
    {
      absl::MutexLock lock(&mu_);
      if (!free_slots_.empty()) {
        slot = std::move(free_slots_.back());
        free_slots_.pop_back();
      }
    }
    if (slot == nullptr) {
      slot = std::make_unique<Slot>();
      const cudaError_t e = cudaStreamCreateWithFlags(&slot->stream, cudaStreamNonBlocking);
      if (e != cudaSuccess) return CudaError(e, "cudaStreamCreate");
    }
    absl::Status status = RunOnSlot(batch, *slot);
    // A batch too big for the pool at once runs request by request: results
    // are batch-invariant, so only the time changes.
    if (absl::IsResourceExhausted(status) && batch.size() > 1) {
      status = absl::OkStatus();
      for (size_t i = 0; i < batch.size() && status.ok(); ++i) {
        status = RunOnSlot(batch.subspan(i, 1), *slot);
      }
    }
    absl::MutexLock lock(&mu_);
    free_slots_.push_back(std::move(slot));
    return status;
  }

  // Pinned host staging: the request's inputs (bias as F32) going up and its
  // outputs coming down, each rounded up to the staging alignment; the
  // staging buffer of a slot grows by doubling, hence twice that.
  int64_t ScratchBytes(const AttentionParams& p) const override {
    const int64_t elem = static_cast<int64_t>(DTypeSize(p.dtype));
    const int64_t q_rows = int64_t{p.batch} * p.seqlen_q * p.num_heads_q;
    const int64_t kv_rows = int64_t{p.batch} * p.seqlen_k * p.num_heads_kv;
    int64_t bytes = q_rows * (p.head_dim + p.value_dim) * elem +
                    kv_rows * (p.head_dim + p.value_dim) * elem + (int64_t{64} << 10);
    if (p.bias != nullptr) bytes += BiasSpan(p) * 4;
    if (p.lse != nullptr) bytes += int64_t{p.batch} * p.num_heads_q * p.seqlen_q * 4;
    return 2 * bytes;
  }

  int64_t workspace_bytes() const override {
    return pinned_bytes_.load(std::memory_order_relaxed) + pool_.reserved_bytes();
  }

  DeviceMemory device_memory() const override {
    return DeviceMemory{pool_.reserved_bytes(), pool_.limit_bytes()};
  }

 private:
  absl::Status RunOnSlot(absl::Span<const AttentionParams> batch, Slot& slot);

  const int device_;
  BackendInfo info_;
  DevicePool pool_;
  std::atomic<int64_t> pinned_bytes_{0};
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Slot>> free_slots_ ABSL_GUARDED_BY(mu_);
};

absl::Status CudaBackend::RunOnSlot(absl::Span<const AttentionParams> batch, Slot& slot) {
  const int64_t n = static_cast<int64_t>(batch.size());
  std::vector<RequestPlan> plans(n);

  // --- 1. Plan --------------------------------------------------------------------
  // Upload region: [jobs | items | per-request inputs]; the jobs and items are
  // written last (they hold device pointers) but laid out first.
  int64_t num_items = 0;
  for (int64_t r = 0; r < n; ++r) {
    const AttentionParams& p = batch[r];
    const int64_t q_tiles = (int64_t{p.seqlen_q} + cuda::kQueryTile - 1) / cuda::kQueryTile;
    plans[r].num_items = int64_t{p.batch} * p.num_heads_q * q_tiles;
    num_items += plans[r].num_items;
  }
  int64_t upload = 0;
  const int64_t jobs_offset = upload;
  upload = AlignUp(upload + n * static_cast<int64_t>(sizeof(DeviceJob)));
  const int64_t items_offset = upload;
  upload = AlignUp(upload + num_items * static_cast<int64_t>(sizeof(WorkItem)));
  int64_t scratch = 0;
  int64_t download = 0;
  for (int64_t r = 0; r < n; ++r) {
    const AttentionParams& p = batch[r];
    RequestPlan& plan = plans[r];
    const int64_t elem = static_cast<int64_t>(DTypeSize(p.dtype));
    const int64_t q_rows = int64_t{p.batch} * p.seqlen_q * p.num_heads_q;
    const int64_t kv_rows = int64_t{p.batch} * p.seqlen_k * p.num_heads_kv;
    plan.q_bytes = q_rows * p.head_dim * elem;
    plan.k_bytes = kv_rows * p.head_dim * elem;
    plan.v_bytes = kv_rows * p.value_dim * elem;
    plan.kernel_dim = cuda::KernelHeadDim(p.head_dim, p.value_dim);
    plan.repack = p.dtype == DType::kF32 || p.head_dim % 8 != 0 || p.value_dim % 8 != 0;
    plan.packed_dim_k = (p.head_dim + 7) / 8 * 8;
    plan.packed_dim_v = (p.value_dim + 7) / 8 * 8;
    plan.q = upload;
    upload = AlignUp(upload + plan.q_bytes);
    plan.k = upload;
    upload = AlignUp(upload + plan.k_bytes);
    plan.v = upload;
    upload = AlignUp(upload + plan.v_bytes);
    if (p.bias != nullptr) {
      plan.bias_elems = BiasSpan(p);
      plan.bias = upload;
      upload = AlignUp(upload + plan.bias_elems * 4);
    }
    if (p.alibi_slopes != nullptr) {
      plan.slopes = upload;
      upload = AlignUp(upload + int64_t{p.num_heads_q} * 4);
    }
    if (p.key_lengths != nullptr) {
      plan.lens = upload;
      upload = AlignUp(upload + int64_t{p.batch} * 4);
    }
    if (plan.repack) {
      plan.q16 = scratch;
      scratch = AlignUp(scratch + q_rows * plan.packed_dim_k * 2);
      plan.k16 = scratch;
      scratch = AlignUp(scratch + kv_rows * plan.packed_dim_k * 2);
      plan.v16 = scratch;
      scratch = AlignUp(scratch + kv_rows * plan.packed_dim_v * 2);
    }
    plan.o_bytes = q_rows * p.value_dim * elem;
    plan.o = download;
    download = AlignUp(download + plan.o_bytes);
    if (p.lse != nullptr) {
      plan.lse_bytes = int64_t{p.batch} * p.num_heads_q * p.seqlen_q * 4;
      plan.lse = download;
      download = AlignUp(download + plan.lse_bytes);
    }
  }

  absl::Status s = slot.staging.Reserve(upload + download, pinned_bytes_);
  if (!s.ok()) return s;
  absl::StatusOr<void*> device_block = pool_.Allocate(upload + scratch + download);
  if (!device_block.ok()) return device_block.status();
  char* const dev = static_cast<char*>(*device_block);
  char* const dev_upload = dev;
  char* const dev_scratch = dev + upload;
  char* const dev_download = dev + upload + scratch;
  char* const host_upload = slot.staging.data();
  char* const host_download = slot.staging.data() + upload;
  // Returns the block on every path, after the stream has stopped using it
  // (an error return may leave copies or kernels in flight).
  struct BlockReturn {
    DevicePool& pool;
    void* block;
    cudaStream_t stream;
    ~BlockReturn() {
      cudaStreamSynchronize(stream);
      pool.Free(block);
    }
  } block_return{pool_, dev, slot.stream};

  // --- 2. Stage the inputs and describe the jobs -------------------------------------
  std::vector<DeviceJob> jobs(n);
  for (int64_t r = 0; r < n; ++r) {
    const AttentionParams& p = batch[r];
    RequestPlan& plan = plans[r];
    plan.compute = p.dtype;
    if (p.dtype == DType::kF32) {
      const uint32_t max_bits =
          std::max({CopyF32MaxAbsBits(host_upload + plan.q, p.q, plan.q_bytes / 4),
                    CopyF32MaxAbsBits(host_upload + plan.k, p.k, plan.k_bytes / 4),
                    CopyF32MaxAbsBits(host_upload + plan.v, p.v, plan.v_bytes / 4)});
      plan.compute = max_bits < kF16OverflowBits ? DType::kF16 : DType::kBF16;
    } else {
      std::memcpy(host_upload + plan.q, p.q, plan.q_bytes);
      std::memcpy(host_upload + plan.k, p.k, plan.k_bytes);
      std::memcpy(host_upload + plan.v, p.v, plan.v_bytes);
    }
    DeviceJob& job = jobs[r];
    if (plan.repack) {
      job.q = dev_scratch + plan.q16;
      job.k = dev_scratch + plan.k16;
      job.v = dev_scratch + plan.v16;
      job.q_head_stride = plan.packed_dim_k;
      job.k_head_stride = plan.packed_dim_k;
      job.v_head_stride = plan.packed_dim_v;
    } else {
      job.q = dev_upload + plan.q;
      job.k = dev_upload + plan.k;
      job.v = dev_upload + plan.v;
      job.q_head_stride = p.head_dim;
      job.k_head_stride = p.head_dim;
      job.v_head_stride = p.value_dim;
    }
    job.q_row_stride = job.q_head_stride * p.num_heads_q;
    job.q_batch_stride = job.q_row_stride * p.seqlen_q;
    job.k_row_stride = job.k_head_stride * p.num_heads_kv;
    job.k_batch_stride = job.k_row_stride * p.seqlen_k;
    job.v_row_stride = job.v_head_stride * p.num_heads_kv;
    job.v_batch_stride = job.v_row_stride * p.seqlen_k;
    job.o = dev_download + plan.o;
    job.o_batch_stride = p.o_batch_stride;
    job.o_row_stride = p.o_row_stride;
    job.o_head_stride = p.o_head_stride;
    job.out_dtype = p.dtype;
    if (plan.lse >= 0) job.lse = reinterpret_cast<float*>(dev_download + plan.lse);
    if (plan.bias >= 0) {
      std::memcpy(host_upload + plan.bias, p.bias, plan.bias_elems * 4);
      job.bias = reinterpret_cast<const float*>(dev_upload + plan.bias);
      job.bias_batch_stride = p.bias_batch_stride;
      job.bias_head_stride = p.bias_head_stride;
      job.bias_row_stride = p.bias_row_stride;
      job.bias_col_stride = p.bias_col_stride;
    }
    if (plan.slopes >= 0) {
      std::memcpy(host_upload + plan.slopes, p.alibi_slopes, int64_t{p.num_heads_q} * 4);
      job.alibi_slopes = reinterpret_cast<const float*>(dev_upload + plan.slopes);
    }
    if (plan.lens >= 0) {
      std::memcpy(host_upload + plan.lens, p.key_lengths, int64_t{p.batch} * 4);
      job.key_lengths = reinterpret_cast<const int32_t*>(dev_upload + plan.lens);
    }
    job.seqlen_q = p.seqlen_q;
    job.seqlen_k = p.seqlen_k;
    job.num_heads_q = p.num_heads_q;
    job.group_size = p.group_size;
    job.head_dim = plan.repack ? plan.packed_dim_k : p.head_dim;
    job.value_dim = p.value_dim;
    job.window_left = p.window_left;
    job.window_right = p.window_right;
    job.scale = p.scale;
    job.scale_log2 = p.scale_log2;
    job.softcap = p.softcap;
    job.bottom_right = p.bottom_right ? 1 : 0;
  }

  // Work items, grouped by (compute dtype, kernel head dim) so each group is
  // one launch; within a request the query tiles go last-first, so the
  // longest causal tiles start first and the short ones fill the tail.
  std::map<std::pair<int, int>, std::vector<int64_t>> groups;
  for (int64_t r = 0; r < n; ++r) {
    groups[{static_cast<int>(plans[r].compute), plans[r].kernel_dim}].push_back(r);
  }
  auto* items = reinterpret_cast<WorkItem*>(host_upload + items_offset);
  struct Launch {
    DType dtype;
    int dim;
    int64_t first;
    int64_t count;
  };
  std::vector<Launch> launches;
  int64_t next_item = 0;
  for (const auto& [key, members] : groups) {
    const int64_t first = next_item;
    for (int64_t r : members) {
      const AttentionParams& p = batch[r];
      const int32_t q_tiles = (p.seqlen_q + cuda::kQueryTile - 1) / cuda::kQueryTile;
      for (int32_t t = q_tiles - 1; t >= 0; --t) {
        for (int32_t b = 0; b < p.batch; ++b) {
          for (int32_t h = 0; h < p.num_heads_q; ++h) {
            items[next_item++] = WorkItem{static_cast<int32_t>(r), b, h, t};
          }
        }
      }
    }
    launches.push_back(
        Launch{static_cast<DType>(key.first), key.second, first, next_item - first});
  }
  std::memcpy(host_upload + jobs_offset, jobs.data(), n * sizeof(DeviceJob));

  // --- 3. Upload, repack, compute ------------------------------------------------------
  cudaStream_t stream = slot.stream;
  cudaError_t err = cudaMemcpyAsync(dev_upload, host_upload, static_cast<size_t>(upload),
                                    cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) return CudaError(err, "upload");
  for (int64_t r = 0; r < n; ++r) {
    const AttentionParams& p = batch[r];
    const RequestPlan& plan = plans[r];
    if (!plan.repack) continue;
    const int64_t q_rows = int64_t{p.batch} * p.seqlen_q * p.num_heads_q;
    const int64_t kv_rows = int64_t{p.batch} * p.seqlen_k * p.num_heads_kv;
    const struct {
      int64_t src, dst, rows;
      int32_t dim, packed;
    } tensors[3] = {{plan.q, plan.q16, q_rows, p.head_dim, plan.packed_dim_k},
                    {plan.k, plan.k16, kv_rows, p.head_dim, plan.packed_dim_k},
                    {plan.v, plan.v16, kv_rows, p.value_dim, plan.packed_dim_v}};
    for (const auto& t : tensors) {
      err = static_cast<cudaError_t>(cuda::LaunchConvertRows(p.dtype, dev_upload + t.src,
                                                             plan.compute, dev_scratch + t.dst,
                                                             t.rows, t.dim, t.packed, stream));
      if (err != cudaSuccess) return CudaError(err, "convert inputs");
    }
  }
  const auto* dev_jobs = reinterpret_cast<const DeviceJob*>(dev_upload + jobs_offset);
  const auto* dev_items = reinterpret_cast<const WorkItem*>(dev_upload + items_offset);
  for (const Launch& l : launches) {
    err = static_cast<cudaError_t>(
        cuda::LaunchFlashForward(l.dtype, l.dim, dev_jobs, dev_items + l.first, l.count, stream));
    if (err != cudaSuccess) return CudaError(err, "flash attention launch");
  }

  // --- 4. Download and scatter -------------------------------------------------------------
  err = cudaMemcpyAsync(host_download, dev_download, static_cast<size_t>(download),
                        cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return CudaError(err, "download");
  err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return CudaError(err, "flash attention");
  for (int64_t r = 0; r < n; ++r) {
    const AttentionParams& p = batch[r];
    const RequestPlan& plan = plans[r];
    std::memcpy(p.o, host_download + plan.o, plan.o_bytes);
    if (plan.lse >= 0) std::memcpy(p.lse, host_download + plan.lse, plan.lse_bytes);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options) {
  if (options.gpu_memory_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpu_memory_bytes: expected >= 0 (0 = 90% of free device memory), got ",
        options.gpu_memory_bytes));
  }
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear, so later runtime calls do not report it
    return absl::FailedPreconditionError(absl::StrCat(
        "no CUDA device (cudaGetDeviceCount: ",
        err != cudaSuccess ? cudaGetErrorString(err) : "0 devices", ")"));
  }
  constexpr int kDevice = 0;
  cudaDeviceProp prop{};
  err = cudaGetDeviceProperties(&prop, kDevice);
  if (err != cudaSuccess) return CudaError(err, "cudaGetDeviceProperties");
  if (prop.major < 8) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device of compute capability 8.0 or newer (", prop.name, " is ",
                     prop.major, ".", prop.minor, ")"));
  }
  err = cudaSetDevice(kDevice);
  if (err != cudaSuccess) return CudaError(err, "cudaSetDevice");
  err = static_cast<cudaError_t>(cuda::PrepareFlashKernels());
  if (err != cudaSuccess) return CudaError(err, "kernel set-up");
  size_t free_bytes = 0, total_bytes = 0;
  err = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (err != cudaSuccess) return CudaError(err, "cudaMemGetInfo");
  const int64_t limit = options.gpu_memory_bytes > 0
                            ? options.gpu_memory_bytes
                            : static_cast<int64_t>(static_cast<double>(free_bytes) * 0.9);
  return std::make_unique<CudaBackend>(kDevice, prop, limit);
}

}  // namespace attnserve
