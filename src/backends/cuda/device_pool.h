// DevicePool: a caching allocator of device memory with a hard byte limit, so
// a burst of large batches gets RESOURCE_EXHAUSTED instead of a device OOM.
// Freed blocks are kept for reuse (cudaMalloc/cudaFree synchronise the device,
// so the steady state must not call them); when a new allocation would pass
// the limit, the cached blocks are released first.
//
// Thread-safe. The caller must have made the pool's device current.
#ifndef ATTNSERVE_BACKENDS_CUDA_DEVICE_POOL_H_
#define ATTNSERVE_BACKENDS_CUDA_DEVICE_POOL_H_

#include <cstdint>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve::cuda {

class DevicePool {
 public:
  explicit DevicePool(int64_t limit_bytes) : limit_bytes_(limit_bytes) {}
  ~DevicePool();
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;

  // Returns a block of at least `bytes` (256-byte aligned). RESOURCE_EXHAUSTED
  // when it cannot fit under the limit even after releasing the cache, or when
  // the device itself has no memory left (cudaMalloc fails).
  absl::StatusOr<void*> Allocate(int64_t bytes);

  // Returns a block from Allocate to the cache. Never blocks on the device;
  // the caller must have finished every use of the block (stream synchronised).
  void Free(void* block);

  int64_t limit_bytes() const { return limit_bytes_; }
  // Bytes held from the device (in use + cached).
  int64_t reserved_bytes() const;
  // Bytes handed out and not yet freed.
  int64_t in_use_bytes() const;

 private:
  // Rounds up so that blocks of similar sizes are interchangeable.
  static int64_t RoundUp(int64_t bytes);
  void ReleaseCachedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t limit_bytes_;
  mutable absl::Mutex mu_;
  std::multimap<int64_t, void*> cached_ ABSL_GUARDED_BY(mu_);  // size -> block
  std::map<void*, int64_t> in_use_ ABSL_GUARDED_BY(mu_);       // block -> size
  int64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_use_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve::cuda

#endif  // ATTNSERVE_BACKENDS_CUDA_DEVICE_POOL_H_
