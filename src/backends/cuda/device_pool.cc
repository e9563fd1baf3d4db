#include "backends/cuda/device_pool.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"

namespace attnserve::cuda {

DevicePool::~DevicePool() {
  absl::MutexLock lock(&mu_);
  ReleaseCachedLocked();
  for (const auto& [block, size] : in_use_) cudaFree(block);
}

int64_t DevicePool::RoundUp(int64_t bytes) {
  // Small blocks to 1 MiB, larger ones to 1/8 of their power of two: at most
  // 12.5% waste, and a request reuses any cached block of its class.
  constexpr int64_t kMin = int64_t{1} << 20;
  if (bytes <= kMin) return kMin;
  int64_t pow2 = kMin;
  while (pow2 < bytes) pow2 <<= 1;
  const int64_t step = pow2 / 8;
  return (bytes + step - 1) / step * step;
}

absl::StatusOr<void*> DevicePool::Allocate(int64_t bytes) {
  if (bytes <= 0) bytes = 1;
  const int64_t size = RoundUp(bytes);
  absl::MutexLock lock(&mu_);
  // A cached block of the same class (or up to twice the size) is reused as is.
  auto it = cached_.lower_bound(size);
  if (it != cached_.end() && it->first <= 2 * size) {
    void* block = it->second;
    const int64_t block_size = it->first;
    cached_.erase(it);
    in_use_[block] = block_size;
    in_use_bytes_ += block_size;
    return block;
  }
  if (size > limit_bytes_ - in_use_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cuda device memory: ", size, " bytes needed, ", limit_bytes_ - in_use_bytes_,
        " of the pool's ", limit_bytes_, " bytes free (--gpu_memory_bytes)"));
  }
  if (reserved_bytes_ + size > limit_bytes_) ReleaseCachedLocked();
  void* block = nullptr;
  cudaError_t err = cudaMalloc(&block, static_cast<size_t>(size));
  if (err != cudaSuccess) {
    // Another process may hold device memory; drop our cache and retry once.
    cudaGetLastError();
    ReleaseCachedLocked();
    err = cudaMalloc(&block, static_cast<size_t>(size));
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat("cuda device memory: cudaMalloc of ", size,
                                                     " bytes failed: ", cudaGetErrorString(err)));
  }
  reserved_bytes_ += size;
  in_use_[block] = size;
  in_use_bytes_ += size;
  return block;
}

void DevicePool::Free(void* block) {
  if (block == nullptr) return;
  absl::MutexLock lock(&mu_);
  auto it = in_use_.find(block);
  if (it == in_use_.end()) return;
  cached_.emplace(it->second, block);
  in_use_bytes_ -= it->second;
  in_use_.erase(it);
}

void DevicePool::ReleaseCachedLocked() {
  for (const auto& [size, block] : cached_) {
    cudaFree(block);
    reserved_bytes_ -= size;
  }
  cached_.clear();
}

int64_t DevicePool::reserved_bytes() const {
  absl::MutexLock lock(&mu_);
  return reserved_bytes_;
}

int64_t DevicePool::in_use_bytes() const {
  absl::MutexLock lock(&mu_);
  return in_use_bytes_;
}

}  // namespace attnserve::cuda
