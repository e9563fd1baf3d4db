// BlockPool: the memory behind paged KV caches, under one byte bound.
// Blocks are 64-byte aligned; blocks of one size are recycled through a free
// list, and cached free blocks count against the bound, so the pool never holds
// more than capacity_bytes. Thread-safe.
#ifndef ATTNSERVE_KVCACHE_BLOCK_POOL_H_
#define ATTNSERVE_KVCACHE_BLOCK_POOL_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class BlockPool {
 public:
  explicit BlockPool(int64_t capacity_bytes);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // Returns a block of `bytes` (> 0), or RESOURCE_EXHAUSTED naming the bound
  // when it would take the pool past capacity_bytes. Never blocks.
  absl::StatusOr<void*> Allocate(int64_t bytes);
  // Returns a block from Allocate(bytes) to the pool.
  void Free(void* block, int64_t bytes);

  int64_t capacity_bytes() const { return capacity_; }
  int64_t used_bytes() const;    // handed out
  int64_t cached_bytes() const;  // freed, kept for reuse

 private:
  const int64_t capacity_;
  mutable absl::Mutex mu_;
  int64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cached_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<int64_t, std::vector<void*>> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve

#endif  // ATTNSERVE_KVCACHE_BLOCK_POOL_H_
