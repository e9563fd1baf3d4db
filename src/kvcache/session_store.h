// SessionStore: KV-cache sessions for decode. A session keeps one sequence's
// K/V on the server in paged blocks from a shared, bounded BlockPool, one
// paged cache per model layer; a decode step appends new K/V to one layer
// (converted to the cache dtype, keys rotated when the session has RoPE) and
// attends over that layer's cache. Ids are 128-bit random; a session belongs
// to the identity that created it and is invisible (NOT_FOUND) to others.
//
// Layers step in order: layer l may append its step t only after layer l-1
// did (layer 0: after the last layer did step t-1), so every layer holds the
// same tokens between steps. ForkSession shares a prefix: the full blocks are
// shared (reference-counted in the pool, counted once) and the partial block
// is copied. A session with window_tokens keeps its first sink blocks and the
// blocks holding its last window_tokens tokens, freeing those in between
// (attention sinks, StreamingLLM).
//
// Thread safety: all methods are thread-safe. A SessionLease pins one session
// for one decode step; a session has at most one lease at a time. Leases must
// not outlive the store (the server destroys the store only after every
// scheduled step is done).
#ifndef ATTNSERVE_KVCACHE_SESSION_STORE_H_
#define ATTNSERVE_KVCACHE_SESSION_STORE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attention/request.h"
#include "attention/rope.h"
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
  int64_t max_tokens = 0;  // per layer; 0 = as many as the cache holds (at most 2^31 - 1)
  int32_t num_layers = 1;  // one paged cache each
  // Keys are rotated at their positions on append (the caller rotates the
  // queries with the same settings, see SessionLease::position).
  std::optional<RopeConfig> rope;
  // window_tokens > 0: keep the first ceil(sink_tokens / block_tokens)
  // blocks and every block holding one of the last window_tokens tokens.
  int64_t sink_tokens = 0;
  int64_t window_tokens = 0;
  // The model (--model) whose attention module the session is: its steps
  // take hidden states, projected by the server. Empty: steps take q/k/v.
  // The store keeps the name only; the fields above come from the model.
  std::string model;
};

struct SessionStats {
  int64_t sessions_active = 0;
  int64_t used_bytes = 0;
  int64_t pinned_bytes = 0;  // of used_bytes, held by leased sessions: no eviction frees them
  int64_t shared_bytes = 0;  // of used_bytes, blocks held by more than one session
  int64_t shared_blocks = 0;
  int64_t capacity_bytes = 0;
  int64_t evictions_total = 0;    // idle sessions evicted for room (lru_idle)
  int64_t expirations_total = 0;  // idle sessions past idle_timeout
  int64_t window_blocks_freed_total = 0;  // blocks freed as sinks sessions' windows moved
  int64_t forks_total = 0;
};

class SessionStore;
struct Session;

// Pins a session for one decode step (RAII): appends go through it, and its
// PagedKvView stays valid until the lease is destroyed.
class SessionLease {
 public:
  SessionLease(SessionLease&&) = default;
  SessionLease& operator=(SessionLease&&) = delete;
  // Keeps the last Append (frees the blocks its window moved past).
  ~SessionLease();

  const SessionConfig& config() const;
  const std::string& session_id() const;
  // Tokens in `layer`'s cache (what View(layer) holds).
  int64_t length(int32_t layer = 0) const;
  // Tokens `layer` has seen: length() plus those its window dropped. The
  // position of the next token (RoPE).
  int64_t position(int32_t layer = 0) const;
  // Tokens dropped from between the sinks and the window so far. With RoPE
  // the sink keys are held rotated at (their position + dropped): the
  // distances between a query and every kept key are then those within the
  // kept cache, as StreamingLLM assigns positions.
  int64_t dropped(int32_t layer = 0) const;

  // Appends K [n, Hkv, D] and V [n, Hkv, Dv] (any input dtype; converted to the
  // cache dtype; keys rotated at positions position(layer) + i when the
  // session has RoPE) to `layer`, then moves a window past blocks it no
  // longer covers (they are freed when the lease ends). All or nothing:
  // INVALID_ARGUMENT for a bad layer or shapes, FAILED_PRECONDITION for a
  // layer out of order, RESOURCE_EXHAUSTED when max_tokens or the cache bound
  // would be passed (after evicting idle sessions under kLruIdle); the cache
  // is then unchanged.
  absl::Status Append(int32_t layer, const TensorView& key, const TensorView& value);

  // Append's checks that need no change to the cache: the layer and its
  // order, the shapes of the new K/V and max_tokens. Returns the number of
  // new tokens. Errors as Append.
  absl::StatusOr<int64_t> CheckAppend(int32_t layer, const TensorView& key,
                                      const TensorView& value) const;

  // Undoes the last Append of this lease (a step that failed) when it
  // succeeded and no other Append passed its checks since: the layer's cache
  // is as it was before it. No-op otherwise.
  void Rollback();

  // Drops tokens of `layer` past `length` (<= length(layer)) and returns
  // blocks no longer needed. Not for windowed sessions whose window moved.
  // A shared block left partly filled is copied by the next Append.
  void Truncate(int32_t layer, int64_t length);

  // The layer's cache, for AttentionRequest::paged_kv.
  PagedKvView View(int32_t layer = 0) const;

 private:
  friend class SessionStore;
  SessionLease(SessionStore* store, std::shared_ptr<Session> session);
  void ReleaseDropped();
  SessionStore* store_;
  std::shared_ptr<Session> session_;
  // The last Append, for Rollback.
  struct Undo {
    int32_t layer = -1;  // -1: nothing to undo
    int64_t length = 0;
    int64_t dropped = 0;
    size_t blocks = 0;                 // blocks the layer had before the append
    std::vector<void*> window_blocks;  // blocks the window moved past, not yet freed
    std::string sinks;  // the sink rows (cache dtype) before the window moved them
  };
  Undo undo_;
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

  struct Forked {
    std::string session_id;
    int64_t shared_tokens = 0;  // in shared full blocks; the rest were copied
  };
  // A new session of `owner` with the settings of `session_id` and the first
  // `tokens` tokens of each of its layers: full blocks shared, the partial
  // block copied. NOT_FOUND as for Acquire; ABORTED while a step holds the
  // parent; INVALID_ARGUMENT for tokens < 1; FAILED_PRECONDITION when tokens
  // pass a layer's length or the parent has window_tokens;
  // RESOURCE_EXHAUSTED for the copies or max_sessions.
  absl::StatusOr<Forked> Fork(const std::string& session_id, int64_t tokens,
                              const std::string& owner);

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
  // Returns the blocks of `layer` of pinned `s` past the first `keep` to the
  // pool. Called by the holder of the lease on `s`.
  void FreeBlocks(Session& s, int32_t layer, size_t keep) ABSL_LOCKS_EXCLUDED(mu_);
  // Frees a block AllocateBlock gave a pinned session that never held it.
  void FreeUnheld(void* block, int64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Frees blocks a pinned session no longer holds (its window moved past them).
  void FreeDetached(Session& s, const std::vector<void*>& blocks) ABSL_LOCKS_EXCLUDED(mu_);
  // Validates `c` and fills its defaults.
  absl::Status ValidateConfig(SessionConfig& c) const;
  // Creates the session object of `c` (not yet in the table), without blocks.
  absl::StatusOr<std::shared_ptr<Session>> NewSession(const SessionConfig& c,
                                                      const std::string& owner) const;
  // Puts `s` in the table under a new id, or RESOURCE_EXHAUSTED (its blocks
  // are then released).
  absl::Status Insert(std::shared_ptr<Session> s) ABSL_LOCKS_EXCLUDED(mu_);
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
  int64_t window_blocks_freed_total_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t forks_total_ ABSL_GUARDED_BY(mu_) = 0;
  // Bytes held by pinned sessions, closed ones included, except blocks ever
  // shared (the pool's ever_shared_bytes counts those once). A lease holder
  // changes its session's blocks without mu_, so the store must not read a
  // pinned session's blocks; the holder reports each block it takes or
  // returns here.
  int64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve

#endif  // ATTNSERVE_KVCACHE_SESSION_STORE_H_
