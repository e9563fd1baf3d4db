#include "kvcache/block_pool.h"

#include <cstdlib>
#include <new>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {
constexpr size_t kAlignment = 64;
}  // namespace

BlockPool::BlockPool(int64_t capacity_bytes) : capacity_(capacity_bytes) {}

BlockPool::~BlockPool() {
  absl::MutexLock lock(&mu_);
  for (auto& [bytes, blocks] : free_) {
    for (void* b : blocks) ::operator delete(b, std::align_val_t(kAlignment));
  }
}

absl::StatusOr<void*> BlockPool::Allocate(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  auto it = free_.find(bytes);
  if (it != free_.end() && !it->second.empty()) {
    void* b = it->second.back();
    it->second.pop_back();
    cached_ -= bytes;
    used_ += bytes;
    return b;
  }
  // Give cached blocks of other sizes back to the system before refusing.
  for (auto f = free_.begin(); f != free_.end() && used_ + cached_ + bytes > capacity_; ++f) {
    while (!f->second.empty() && used_ + cached_ + bytes > capacity_) {
      ::operator delete(f->second.back(), std::align_val_t(kAlignment));
      f->second.pop_back();
      cached_ -= f->first;
    }
  }
  if (used_ + cached_ + bytes > capacity_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: ", used_, " of --kv_cache_bytes=", capacity_,
                     " bytes in use, a block needs ", bytes));
  }
  void* b = ::operator new(static_cast<size_t>(bytes), std::align_val_t(kAlignment), std::nothrow);
  if (b == nullptr) return absl::ResourceExhaustedError("KV cache: the system is out of memory");
  used_ += bytes;
  return b;
}

void BlockPool::Free(void* block, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (auto it = refs_.find(block); it != refs_.end()) {
    if (--it->second >= 1) {
      if (it->second == 1) {
        --shared_blocks_;
        shared_bytes_ -= bytes;
      }
      return;
    }
    refs_.erase(it);
    ever_shared_bytes_ -= bytes;
  }
  used_ -= bytes;
  cached_ += bytes;
  free_[bytes].push_back(block);
}

void BlockPool::Share(void* block, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = refs_.try_emplace(block, 1);
  if (inserted) ever_shared_bytes_ += bytes;
  if (++it->second == 2) {
    ++shared_blocks_;
    shared_bytes_ += bytes;
  }
}

int32_t BlockPool::references(void* block) const {
  absl::MutexLock lock(&mu_);
  auto it = refs_.find(block);
  return it == refs_.end() ? 1 : it->second;
}

int64_t BlockPool::shared_blocks() const {
  absl::MutexLock lock(&mu_);
  return shared_blocks_;
}

int64_t BlockPool::shared_bytes() const {
  absl::MutexLock lock(&mu_);
  return shared_bytes_;
}

int64_t BlockPool::ever_shared_bytes() const {
  absl::MutexLock lock(&mu_);
  return ever_shared_bytes_;
}

int64_t BlockPool::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_;
}

int64_t BlockPool::cached_bytes() const {
  absl::MutexLock lock(&mu_);
  return cached_;
}

}  // namespace attnserve
