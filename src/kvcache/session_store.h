// SessionStore: KV-cache sessions for decode. A session keeps one sequence's
// K/V on the server in paged blocks from a shared, bounded BlockPool; a decode
// step appends new K/V (converted to the cache dtype) and attends over the
// whole cache. Ids are 128-bit random; a session belongs to the identity that
// created it and is invisible (NOT_FOUND) to others.
//
// Thread safety: all methods are thread-safe. A SessionLease pins one session
// for one decode step; a session has at most one lease at a time. Leases must
// not outlive the store (the server destroys the store only after every
// scheduled step is done).
#ifndef ATTNSERVE_KVCACHE_SESSION_STORE_H_
#define ATTNSERVE_KVCACHE_SESSION_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attention/request.h"
#include "core/tensor.h"
#include "kvcache/block_pool.h"
#include "scheduler/clock.h"

namespace attnserve {

enum class EvictionPolicy : uint8_t {
  kReject,   // a full cache answers RESOURCE_EXHAUSTED
  kLruIdle,  // a full cache evicts the least recently used idle session
};

struct SessionStoreOptions {
  int64_t kv_cache_bytes = int64_t{1} << 30;
  int32_t block_tokens = 16;
  absl::Duration idle_timeout = absl::Minutes(10);  // idle sessions expire after this
  EvictionPolicy eviction = EvictionPolicy::kReject;
  int64_t max_sessions = 100000;
  // Blocks smaller than this are allocated (and counted) at this size, so
  // allocator overhead on tiny blocks (a session of 1 head x 1 dim) cannot
  // take real memory past kv_cache_bytes. 0 in tests that count exact bytes.
  int64_t min_block_bytes = 4096;
};

struct SessionConfig {
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t value_dim = 0;  // 0 = head_dim
  DType dtype = DType::kF32;
  int64_t max_tokens = 0;  // 0 = as many as the cache holds (at most 2^31 - 1)
};

struct SessionStats {
  int64_t sessions_active = 0;
  int64_t used_bytes = 0;
  int64_t pinned_bytes = 0;  // of used_bytes, held by leased sessions: no eviction frees them
  int64_t capacity_bytes = 0;
  int64_t evictions_total = 0;
  int64_t expirations_total = 0;
};

class SessionStore;
struct Session;

// Pins a session for one decode step (RAII): appends go through it, and its
// PagedKvView stays valid until the lease is destroyed.
class SessionLease {
 public:
  SessionLease(SessionLease&&) = default;
  SessionLease& operator=(SessionLease&&) = delete;
  ~SessionLease();

  const SessionConfig& config() const;
  int64_t length() const;  // tokens in the cache

  // Appends K [n, Hkv, D] and V [n, Hkv, Dv] (any input dtype; converted to the
  // cache dtype). All or nothing: INVALID_ARGUMENT for bad shapes,
  // RESOURCE_EXHAUSTED when max_tokens or the cache bound would be passed
  // (after evicting idle sessions under kLruIdle); the cache is then unchanged.
  absl::Status Append(const TensorView& key, const TensorView& value);

  // Append's checks that need no change to the cache: the shapes of the new
  // K/V and max_tokens. Returns the number of new tokens. INVALID_ARGUMENT or
  // RESOURCE_EXHAUSTED as Append.
  absl::StatusOr<int64_t> CheckAppend(const TensorView& key, const TensorView& value) const;

  // Drops tokens past `length` (<= length()), e.g. to undo the append of a
  // decode step that failed, and returns blocks no longer needed.
  void Truncate(int64_t length);

  // The whole cache, for AttentionRequest::paged_kv.
  PagedKvView View() const;

 private:
  friend class SessionStore;
  SessionLease(SessionStore* store, std::shared_ptr<Session> session);
  SessionStore* store_;
  std::shared_ptr<Session> session_;
};

class SessionStore {
 public:
  // INVALID_ARGUMENT for out-of-range options. `clock` is not owned.
  static absl::StatusOr<std::unique_ptr<SessionStore>> Create(const SessionStoreOptions& options,
                                                              Clock* clock = Clock::Real());
  ~SessionStore();

  struct Created {
    std::string session_id;
    int64_t capacity_tokens = 0;  // max_tokens, or what the free cache holds now
  };
  // INVALID_ARGUMENT for a bad config; RESOURCE_EXHAUSTED when the cache cannot
  // hold one more block (after eviction under kLruIdle) or max_sessions is reached.
  absl::StatusOr<Created> CreateSession(const SessionConfig& config, const std::string& owner);

  // Pins a session for a decode step. NOT_FOUND for an unknown, expired,
  // evicted or foreign session; ABORTED when another step holds it.
  absl::StatusOr<SessionLease> Acquire(const std::string& session_id, const std::string& owner);

  // NOT_FOUND as for Acquire. A session in use is closed when its lease ends.
  absl::Status Close(const std::string& session_id, const std::string& owner);

  // Closes sessions idle for longer than idle_timeout. Returns how many.
  int64_t ExpireIdle();

  SessionStats stats() const;
  const SessionStoreOptions& options() const { return options_; }

 private:
  friend class SessionLease;
  SessionStore(const SessionStoreOptions& options, Clock* clock);
  // A block for `requester`, a pinned session (counted in pinned_bytes_), or
  // for a session not yet in the table (nullptr). Under kLruIdle evicts idle
  // sessions other than `requester` until the block fits.
  absl::StatusOr<void*> AllocateBlock(int64_t bytes, const Session* requester)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Returns the blocks of pinned `s` past the first `keep` to the pool. Called
  // by the holder of the lease on `s`.
  void FreeBlocks(Session& s, size_t keep) ABSL_LOCKS_EXCLUDED(mu_);
  // Whether `bytes` more for a pinned session could fit if every idle session
  // were evicted.
  bool CouldFit(int64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  bool EvictOneIdleLocked(const Session* spare) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseLocked(Session& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unpin(Session& s) ABSL_LOCKS_EXCLUDED(mu_);

  const SessionStoreOptions options_;
  Clock* const clock_;
  BlockPool pool_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  int64_t evictions_total_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t expirations_total_ ABSL_GUARDED_BY(mu_) = 0;
  // Bytes held by pinned sessions, closed ones included. A lease holder changes
  // its session's blocks without mu_, so the store must not read a pinned
  // session's blocks; the holder reports each block it takes or returns here.
  int64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve

#endif  // ATTNSERVE_KVCACHE_SESSION_STORE_H_
