// The CUDA flash-attention forward kernel: the per-request parameters it reads
// on the device (DeviceJob), the unit of work of one thread block (WorkItem)
// and the host-side launchers. Shared by the .cu kernels and the host backend,
// so it holds plain structs only (no CUDA or Abseil types).
//
// One launch runs a whole batch: block n computes work item n, one
// (request, batch row, query head, 64-query tile). The kernel reads K/V of the
// query head's KV head (h / group_size) in place, so GQA costs no copies.
//
// Thread safety: the launchers only enqueue work on the stream they are given.
#ifndef ATTNSERVE_BACKENDS_CUDA_FLASH_KERNEL_H_
#define ATTNSERVE_BACKENDS_CUDA_FLASH_KERNEL_H_

#include <cstdint>

#include "core/dtype.h"

// Keeps this header free of cuda_runtime.h for the host files that include it.
struct CUstream_st;

namespace attnserve::cuda {

// Query rows per work item (4 warps x 16 rows).
inline constexpr int kQueryTile = 64;
// The kernel's compiled head dims; a request runs on the smallest one >= both
// its head_dim and value_dim (smaller dims are zero-padded in shared memory).
inline constexpr int kMaxHeadDim = 256;
constexpr int KernelHeadDim(int head_dim, int value_dim) {
  const int d = head_dim > value_dim ? head_dim : value_dim;
  return d <= 64 ? 64 : d <= 128 ? 128 : d <= kMaxHeadDim ? kMaxHeadDim : 0;
}

// One request as the kernel sees it. Q/K/V are in the compute dtype (F16 or
// BF16) with element strides; each row's head_dim elements are contiguous and
// every row starts 16-byte aligned (the backend guarantees it, repacking when
// the request's own layout does not allow it). Everything else mirrors
// AttentionParams (src/attention/params.h), with device pointers.
struct DeviceJob {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;

  void* o = nullptr;  // [B, Lq, Hq, Dv] in out_dtype
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  float* lse = nullptr;  // [B, Hq, Lq] or null

  const float* bias = nullptr;  // F32, broadcast by zero strides, or null
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;
  const float* alibi_slopes = nullptr;  // [Hq] or null
  const int32_t* key_lengths = nullptr;  // [B] or null

  int32_t seqlen_q = 0;
  int32_t seqlen_k = 0;
  int32_t num_heads_q = 0;
  int32_t group_size = 1;
  int32_t head_dim = 0;
  int32_t value_dim = 0;
  int32_t window_left = -1;   // causal is folded into window_right = 0
  int32_t window_right = -1;
  float scale = 0.f;
  float scale_log2 = 0.f;
  float softcap = 0.f;
  int32_t bottom_right = 1;
  DType out_dtype = DType::kF32;
};

// Work item: which (job, batch row, query head, query tile) block n computes.
struct WorkItem {
  int32_t job = 0;
  int32_t batch = 0;
  int32_t head = 0;
  int32_t q_tile = 0;  // rows [q_tile * kQueryTile, +kQueryTile)
};

// Launches one block per work item; `jobs` and `items` are device arrays.
// `compute_dtype` is kF16 or kBF16 (the dtype of every job's Q/K/V) and
// `kernel_head_dim` a value of KernelHeadDim() covering every job. Returns the
// launch's cudaError_t as an int (0 = success).
int LaunchFlashForward(DType compute_dtype, int kernel_head_dim, const DeviceJob* jobs,
                       const WorkItem* items, int64_t num_items, CUstream_st* stream);

// Sets the kernels' dynamic shared memory limits; call once per device before
// launching. Returns a cudaError_t as an int.
int PrepareFlashKernels();

// Converts a contiguous [rows, dim] tensor of `src_dtype` (F32/F16/BF16) to
// `dst_dtype` (F16/BF16) with rows of `dst_dim` >= dim elements, zero-padded.
// Returns the launch's cudaError_t as an int.
int LaunchConvertRows(DType src_dtype, const void* src, DType dst_dtype, void* dst, int64_t rows,
                      int32_t dim, int32_t dst_dim, CUstream_st* stream);

}  // namespace attnserve::cuda

#endif  // ATTNSERVE_BACKENDS_CUDA_FLASH_KERNEL_H_
