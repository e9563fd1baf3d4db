// BlockPool: the memory behind paged KV caches, under one byte bound.
// Blocks are 64-byte aligned; blocks of one size are recycled through a free
// list, and cached free blocks count against the bound, so the pool never holds
// more than capacity_bytes. A block may be shared (Share): it then has one
// reference per holder, counts once against the bound, and goes back to the
// pool when the last holder frees it. Thread-safe.
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
  // Drops one reference to a block from Allocate(bytes); the last returns it
  // to the pool.
  void Free(void* block, int64_t bytes);
  // Adds a reference to a block from Allocate(bytes): one more holder.
  void Share(void* block, int64_t bytes);
  // The block's holders now (1 unless shared).
  int32_t references(void* block) const;

  int64_t capacity_bytes() const { return capacity_; }
  int64_t used_bytes() const;    // handed out
  int64_t cached_bytes() const;  // freed, kept for reuse
  // Blocks with more than one holder now, and their bytes (counted once).
  int64_t shared_blocks() const;
  int64_t shared_bytes() const;
  // Bytes of blocks that were ever shared and are still held (a superset of
  // shared_bytes(): a block stays here after its other holders freed it).
  int64_t ever_shared_bytes() const;

 private:
  const int64_t capacity_;
  mutable absl::Mutex mu_;
  int64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cached_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<int64_t, std::vector<void*>> free_ ABSL_GUARDED_BY(mu_);
  // References of blocks ever shared and still held; a block not here has one.
  absl::flat_hash_map<void*, int32_t> refs_ ABSL_GUARDED_BY(mu_);
  int64_t shared_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t shared_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t ever_shared_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve

#endif  // ATTNSERVE_KVCACHE_BLOCK_POOL_H_
