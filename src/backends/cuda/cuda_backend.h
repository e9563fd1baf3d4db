// The `cuda` backend: softmax attention on an NVIDIA GPU (compute capability
// 8.0 or newer) with our own tensor-core flash-attention kernel
// (flash_kernel.h). A Run() copies its batch's inputs to the device through
// pinned staging memory, runs the whole batch in one kernel launch per
// (compute dtype, head-dim class) and copies the outputs back.
//
// F16/BF16 requests are computed in their own dtype; F32 requests are
// converted on the device to F16 (to BF16 when an input is beyond F16's range)
// and accumulated in FP32, so their results are close to, not exactly, FP32.
//
// Thread-safe: concurrent Run() calls each take their own stream and staging
// buffer; device memory comes from one pool bounded by
// BackendOptions::gpu_memory_bytes. This header needs no CUDA headers.
#ifndef ATTNSERVE_BACKENDS_CUDA_CUDA_BACKEND_H_
#define ATTNSERVE_BACKENDS_CUDA_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "backends/backend.h"

namespace attnserve {

// FAILED_PRECONDITION "no CUDA device ..." when the runtime finds no device
// (no driver, or cudaGetDeviceCount returns 0) or the device is older than
// compute capability 8.0; INVALID_ARGUMENT for a negative gpu_memory_bytes.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options);

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_CUDA_CUDA_BACKEND_H_
