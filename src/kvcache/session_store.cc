#include "kvcache/session_store.h"

#include <sys/random.h>

#include <cerrno>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/half.h"

namespace attnserve {

struct Session {
  std::string id;
  std::string owner;
  SessionConfig config;
  int32_t block_tokens = 0;
  int64_t block_bytes = 0;  // K then V for block_tokens rows
  // Guarded by SessionStore::mu_.
  bool pinned = false;
  bool closed = false;
  absl::Time last_used;
  // Touched only by the holder of the lease, or under mu_ when not pinned: the
  // store never reads them while the session is pinned (it counts pinned
  // sessions' blocks in SessionStore::pinned_bytes_ instead).
  int64_t length = 0;
  std::vector<void*> blocks;

  int64_t held_bytes() const { return static_cast<int64_t>(blocks.size()) * block_bytes; }
};

namespace {

absl::Status Invalid(absl::string_view field, absl::string_view expected, absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": expected ", expected, ", got ", got));
}

// 128 bits from the kernel's CSPRNG, hex-encoded: unguessable session ids.
absl::StatusOr<std::string> NewSessionId() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (errno != EINTR && errno != EAGAIN) {
      return absl::InternalError(absl::StrCat("getrandom failed: errno ", errno));
    }
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

bool IsInputDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Shape [n, H, D] or [1, n, H, D] -> {n, H, D}; errors name `field`.
absl::StatusOr<std::array<int64_t, 3>> TokenDims(absl::string_view field, const TensorView& t,
                                                 int64_t heads, int64_t dim) {
  const std::string want = absl::StrCat("[n, ", heads, ", ", dim, "] (or with a leading batch of 1)");
  if (!IsInputDType(t.dtype)) {
    return Invalid(absl::StrCat(field, ".dtype"), "F32, F16 or BF16", DTypeName(t.dtype));
  }
  std::vector<int64_t> s = t.shape;
  if (s.size() == 4 && s[0] == 1) s.erase(s.begin());
  if (s.size() != 3 || s[0] < 1 || s[0] > (int64_t{1} << 24) || s[1] != heads || s[2] != dim) {
    return Invalid(absl::StrCat(field, ".shape"), want, ShapeString(t.shape));
  }
  const int64_t bytes = s[0] * s[1] * s[2] * static_cast<int64_t>(DTypeSize(t.dtype));
  if (static_cast<int64_t>(t.data.size()) != bytes) {
    return Invalid(absl::StrCat(field, ".data"), absl::StrCat(bytes, " bytes"),
                   absl::StrCat(t.data.size(), " bytes"));
  }
  return std::array<int64_t, 3>{s[0], s[1], s[2]};
}

// Copies `count` elements, converting from `from` to `to`.
void ConvertRow(const char* src, DType from, char* dst, DType to, int64_t count) {
  if (from == to) {
    std::memcpy(dst, src, count * DTypeSize(to));
    return;
  }
  for (int64_t i = 0; i < count; ++i) StoreFloat(dst, to, i, LoadFloat(src, from, i));
}

}  // namespace

// ---------------------------------------------------------------------------
// SessionLease

SessionLease::SessionLease(SessionStore* store, std::shared_ptr<Session> session)
    : store_(store), session_(std::move(session)) {}

SessionLease::~SessionLease() {
  if (session_ != nullptr) store_->Unpin(*session_);
}

const SessionConfig& SessionLease::config() const { return session_->config; }
int64_t SessionLease::length() const { return session_->length; }

PagedKvView SessionLease::View() const {
  const Session& s = *session_;
  PagedKvView v;
  v.dtype = s.config.dtype;
  v.num_kv_heads = s.config.num_kv_heads;
  v.head_dim = s.config.head_dim;
  v.value_dim = s.config.value_dim;
  v.block_tokens = s.block_tokens;
  v.length = s.length;
  v.blocks = s.blocks.data();
  return v;
}

absl::StatusOr<int64_t> SessionLease::CheckAppend(const TensorView& key,
                                                  const TensorView& value) const {
  const Session& s = *session_;
  const SessionConfig& c = s.config;
  auto kd = TokenDims("key", key, c.num_kv_heads, c.head_dim);
  if (!kd.ok()) return kd.status();
  auto vd = TokenDims("value", value, c.num_kv_heads, c.value_dim);
  if (!vd.ok()) return vd.status();
  const int64_t n = (*kd)[0];
  if ((*vd)[0] != n) {
    return Invalid("value.shape", absl::StrCat(n, " tokens like the key"), ShapeString(value.shape));
  }
  const int64_t limit = c.max_tokens > 0 ? c.max_tokens : std::numeric_limits<int32_t>::max();
  if (s.length + n > limit) {
    return absl::ResourceExhaustedError(absl::StrCat("session ", s.id, " holds ", s.length,
                                                     " tokens; ", n, " more pass its max_tokens ",
                                                     limit));
  }
  return n;
}

absl::Status SessionLease::Append(const TensorView& key, const TensorView& value) {
  Session& s = *session_;
  const SessionConfig& c = s.config;
  absl::StatusOr<int64_t> checked = CheckAppend(key, value);
  if (!checked.ok()) return checked.status();
  const int64_t n = *checked;
  const int64_t new_length = s.length + n;
  // Under lru_idle, evict nothing for an append that could never fit.
  const int64_t need_blocks =
      (new_length + s.block_tokens - 1) / s.block_tokens - static_cast<int64_t>(s.blocks.size());
  if (need_blocks > 0 && !store_->CouldFit(need_blocks * s.block_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache full: ", need_blocks * s.block_bytes, " more bytes for session ", s.id,
        " do not fit in --kv_cache_bytes=", store_->options_.kv_cache_bytes,
        " even after evicting every idle session"));
  }
  // Allocate every block first so a failure leaves the cache unchanged.
  const int64_t need = (new_length + s.block_tokens - 1) / s.block_tokens;
  const size_t had = s.blocks.size();
  while (static_cast<int64_t>(s.blocks.size()) < need) {
    auto block = store_->AllocateBlock(s.block_bytes, &s);
    if (!block.ok()) {
      store_->FreeBlocks(s, had);
      return block.status();
    }
    s.blocks.push_back(*block);
  }
  const size_t es = DTypeSize(c.dtype);
  const int64_t k_row = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t v_row = int64_t{c.num_kv_heads} * c.value_dim;
  const int64_t v_offset = int64_t{s.block_tokens} * k_row;  // elements
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = s.length + t;
    char* block = static_cast<char*>(s.blocks[pos / s.block_tokens]);
    const int64_t row = pos % s.block_tokens;
    ConvertRow(key.data.data() + t * k_row * DTypeSize(key.dtype), key.dtype,
               block + row * k_row * es, c.dtype, k_row);
    ConvertRow(value.data.data() + t * v_row * DTypeSize(value.dtype), value.dtype,
               block + (v_offset + row * v_row) * es, c.dtype, v_row);
  }
  s.length = new_length;
  return absl::OkStatus();
}

void SessionLease::Truncate(int64_t length) {
  Session& s = *session_;
  if (length < 0 || length >= s.length) return;
  s.length = length;
  // Keep at least one block: a session always owns one (see CreateSession).
  const size_t keep = std::max<size_t>(1, (length + s.block_tokens - 1) / s.block_tokens);
  if (s.blocks.size() > keep) store_->FreeBlocks(s, keep);
}

// ---------------------------------------------------------------------------
// SessionStore

absl::StatusOr<std::unique_ptr<SessionStore>> SessionStore::Create(
    const SessionStoreOptions& options, Clock* clock) {
  if (options.kv_cache_bytes < 0) {
    return Invalid("kv_cache_bytes", ">= 0", absl::StrCat(options.kv_cache_bytes));
  }
  if (options.block_tokens < 1 || options.block_tokens > 4096) {
    return Invalid("kv_block_tokens", "a value in [1, 4096]", absl::StrCat(options.block_tokens));
  }
  if (options.idle_timeout <= absl::ZeroDuration()) {
    return Invalid("session_idle_timeout_s", "> 0", absl::FormatDuration(options.idle_timeout));
  }
  if (options.min_block_bytes < 0) {
    return Invalid("min_block_bytes", ">= 0", absl::StrCat(options.min_block_bytes));
  }
  if (options.max_sessions < 1) {
    return Invalid("max_sessions", ">= 1", absl::StrCat(options.max_sessions));
  }
  return std::unique_ptr<SessionStore>(new SessionStore(options, clock));
}

SessionStore::SessionStore(const SessionStoreOptions& options, Clock* clock)
    : options_(options), clock_(clock), pool_(options.kv_cache_bytes) {}

SessionStore::~SessionStore() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, s] : sessions_) ReleaseLocked(*s);
  sessions_.clear();
}

absl::StatusOr<SessionStore::Created> SessionStore::CreateSession(const SessionConfig& config,
                                                                  const std::string& owner) {
  SessionConfig c = config;
  if (c.value_dim == 0) c.value_dim = c.head_dim;
  if (c.num_kv_heads < 1 || c.num_kv_heads > 1024) {
    return Invalid("num_kv_heads", "a value in [1, 1024]", absl::StrCat(c.num_kv_heads));
  }
  if (c.head_dim < 1 || c.head_dim > 1024) {
    return Invalid("head_dim", "a value in [1, 1024]", absl::StrCat(c.head_dim));
  }
  if (c.value_dim < 1 || c.value_dim > 1024) {
    return Invalid("value_dim", "0 (= head_dim) or a value in [1, 1024]",
                   absl::StrCat(config.value_dim));
  }
  if (!IsInputDType(c.dtype)) return Invalid("dtype", "F32, F16 or BF16", DTypeName(c.dtype));
  if (c.max_tokens < 0 || c.max_tokens > std::numeric_limits<int32_t>::max()) {
    return Invalid("max_tokens", "a value in [0, 2147483647] (0 = as many as fit)",
                   absl::StrCat(c.max_tokens));
  }

  auto s = std::make_shared<Session>();
  s->owner = owner;
  s->config = c;
  s->block_tokens = options_.block_tokens;
  s->block_bytes = std::max<int64_t>(
      options_.min_block_bytes, int64_t{options_.block_tokens} * c.num_kv_heads *
                                    (c.head_dim + c.value_dim) *
                                    static_cast<int64_t>(DTypeSize(c.dtype)));
  absl::StatusOr<std::string> id = NewSessionId();
  if (!id.ok()) return id.status();
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions &&
        !(options_.eviction == EvictionPolicy::kLruIdle && EvictOneIdleLocked(nullptr))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("sessions: the server holds its maximum of ", options_.max_sessions));
    }
  }
  // A session starts with one block, so a full cache refuses new sessions.
  auto block = AllocateBlock(s->block_bytes, nullptr);
  if (!block.ok()) return block.status();
  s->blocks.push_back(*block);

  Created out;
  {
    absl::MutexLock lock(&mu_);
    // Checked again: concurrent creates may have filled the table meanwhile.
    // (A 128-bit id never collides in practice; the check keeps it certain.)
    if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions ||
        sessions_.contains(*id)) {
      pool_.Free(s->blocks.front(), s->block_bytes);
      return absl::ResourceExhaustedError(
          absl::StrCat("sessions: the server holds its maximum of ", options_.max_sessions));
    }
    s->id = *std::move(id);
    s->last_used = clock_->Now();
    sessions_[s->id] = s;
    out.session_id = s->id;
  }
  const int64_t free_blocks = (pool_.capacity_bytes() - pool_.used_bytes()) / s->block_bytes;
  out.capacity_tokens = c.max_tokens > 0 ? c.max_tokens : (free_blocks + 1) * s->block_tokens;
  return out;
}

absl::StatusOr<SessionLease> SessionStore::Acquire(const std::string& session_id,
                                                   const std::string& owner) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session_id);
  // A foreign session looks exactly like an unknown one.
  if (it == sessions_.end() || it->second->owner != owner) {
    return absl::NotFoundError("session_id: unknown, closed, expired or evicted session");
  }
  Session& s = *it->second;
  if (s.pinned) {
    return absl::AbortedError(absl::StrCat("session ", session_id,
                                           " is busy with another decode step; retry after it"));
  }
  s.pinned = true;
  s.last_used = clock_->Now();
  pinned_bytes_ += s.held_bytes();  // not pinned until now: nobody else changes its blocks
  return SessionLease(this, it->second);
}

absl::Status SessionStore::Close(const std::string& session_id, const std::string& owner) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session_id);
  if (it == sessions_.end() || it->second->owner != owner) {
    return absl::NotFoundError("session_id: unknown, closed, expired or evicted session");
  }
  std::shared_ptr<Session> s = it->second;
  sessions_.erase(it);
  s->closed = true;
  if (!s->pinned) ReleaseLocked(*s);  // else the lease releases it
  return absl::OkStatus();
}

int64_t SessionStore::ExpireIdle() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_->Now();
  int64_t n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    Session& s = *it->second;
    if (!s.pinned && now - s.last_used > options_.idle_timeout) {
      s.closed = true;
      ReleaseLocked(s);
      sessions_.erase(it++);
      ++n;
    } else {
      ++it;
    }
  }
  expirations_total_ += n;
  return n;
}

SessionStats SessionStore::stats() const {
  SessionStats st;
  {
    absl::MutexLock lock(&mu_);
    st.sessions_active = static_cast<int64_t>(sessions_.size());
    st.evictions_total = evictions_total_;
    st.expirations_total = expirations_total_;
    st.pinned_bytes = pinned_bytes_;
    // Read under mu_ too, so that pinned_bytes <= used_bytes in one snapshot.
    st.used_bytes = pool_.used_bytes();
  }
  st.capacity_bytes = pool_.capacity_bytes();
  return st;
}

absl::StatusOr<void*> SessionStore::AllocateBlock(int64_t bytes, const Session* requester) {
  while (true) {
    auto block = pool_.Allocate(bytes);
    if (block.ok()) {
      if (requester != nullptr) {
        absl::MutexLock lock(&mu_);
        pinned_bytes_ += bytes;
      }
      return block;
    }
    if (options_.eviction != EvictionPolicy::kLruIdle) return block;
    absl::MutexLock lock(&mu_);
    if (!EvictOneIdleLocked(requester)) return block.status();
  }
}

void SessionStore::FreeBlocks(Session& s, size_t keep) {
  absl::MutexLock lock(&mu_);
  while (s.blocks.size() > keep) {
    pool_.Free(s.blocks.back(), s.block_bytes);
    pinned_bytes_ -= s.block_bytes;
    s.blocks.pop_back();
  }
}

bool SessionStore::CouldFit(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  return pinned_bytes_ + bytes <= pool_.capacity_bytes();
}

bool SessionStore::EvictOneIdleLocked(const Session* spare) {
  auto victim = sessions_.end();
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    const Session& s = *it->second;
    if (s.pinned || &s == spare) continue;
    if (victim == sessions_.end() || s.last_used < victim->second->last_used) victim = it;
  }
  if (victim == sessions_.end()) return false;
  victim->second->closed = true;
  ReleaseLocked(*victim->second);
  sessions_.erase(victim);
  ++evictions_total_;
  return true;
}

void SessionStore::ReleaseLocked(Session& s) {
  for (void* b : s.blocks) pool_.Free(b, s.block_bytes);
  s.blocks.clear();
  s.length = 0;
}

void SessionStore::Unpin(Session& s) {
  absl::MutexLock lock(&mu_);
  pinned_bytes_ -= s.held_bytes();  // the caller holds the lease: nobody else changes them
  s.pinned = false;
  s.last_used = clock_->Now();
  if (s.closed) ReleaseLocked(s);
}

}  // namespace attnserve
