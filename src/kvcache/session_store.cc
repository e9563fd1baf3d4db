#include "kvcache/session_store.h"

#include <sys/random.h>

#include <cerrno>

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/errors.h"
#include "core/half.h"

namespace attnserve {

// One layer's paged cache.
struct LayerCache {
  int64_t length = 0;   // tokens held (what the view shows)
  int64_t dropped = 0;  // tokens a window freed from between the sinks and the window
  std::vector<void*> blocks;
  // Per block: ever shared with another session. Such blocks are counted by
  // the pool (ever_shared_bytes), not in the session's own bytes.
  std::vector<uint8_t> shared;
  // RoPE with a window and sinks: the sink tokens' keys unrotated (F32
  // [sink_blocks * block_tokens, Hkv, D]), to rotate them again as the window
  // moves. From the pool; null otherwise.
  void* sink_keys = nullptr;
};

struct Session {
  std::string id;
  std::string owner;
  SessionConfig config;
  int32_t block_tokens = 0;
  int64_t block_bytes = 0;      // K then V for block_tokens rows
  int32_t sink_blocks = 0;      // blocks a window never frees
  int64_t sink_keys_bytes = 0;  // of each layer's sink_keys (0: none)
  // Guarded by SessionStore::mu_.
  bool pinned = false;
  bool closed = false;
  absl::Time last_used;
  // Touched only by the holder of the lease, or under mu_ when not pinned: the
  // store never reads them while the session is pinned (it counts pinned
  // sessions' blocks in SessionStore::pinned_bytes_ instead).
  std::vector<LayerCache> layers;
  int64_t own_blocks = 0;  // blocks never shared, over all layers

  int64_t held_bytes() const {
    return own_blocks * block_bytes + sink_keys_bytes * static_cast<int64_t>(layers.size());
  }
  bool windowed() const { return config.window_tokens > 0; }
  int64_t sink_region_tokens() const { return int64_t{sink_blocks} * block_tokens; }
};

namespace {

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

constexpr int32_t kMaxLayers = 1024;

bool IsInputDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Shape [n, H, D] or [1, n, H, D] -> {n, H, D}; errors name `field`.
absl::StatusOr<std::array<int64_t, 3>> TokenDims(absl::string_view field, const TensorView& t,
                                                 int64_t heads, int64_t dim) {
  const std::string want = absl::StrCat("[n, ", heads, ", ", dim, "] (or with a leading batch of 1)");
  if (!IsInputDType(t.dtype)) {
    return InvalidField(absl::StrCat(field, ".dtype"), "F32, F16 or BF16", DTypeName(t.dtype));
  }
  std::vector<int64_t> s = t.shape;
  if (s.size() == 4 && s[0] == 1) s.erase(s.begin());
  if (s.size() != 3 || s[0] < 1 || s[0] > (int64_t{1} << 24) || s[1] != heads || s[2] != dim) {
    return InvalidField(absl::StrCat(field, ".shape"), want, ShapeString(t.shape));
  }
  const int64_t bytes = s[0] * s[1] * s[2] * static_cast<int64_t>(DTypeSize(t.dtype));
  if (static_cast<int64_t>(t.data.size()) != bytes) {
    return InvalidField(absl::StrCat(field, ".data"), absl::StrCat(bytes, " bytes"),
                        absl::StrCat(t.data.size(), " bytes"));
  }
  return std::array<int64_t, 3>{s[0], s[1], s[2]};
}


}  // namespace

// ---------------------------------------------------------------------------
// SessionLease

SessionLease::SessionLease(SessionStore* store, std::shared_ptr<Session> session)
    : store_(store), session_(std::move(session)) {}

SessionLease::~SessionLease() {
  if (session_ == nullptr) return;
  ReleaseDropped();
  store_->Unpin(*session_);
}

void SessionLease::ReleaseDropped() {
  if (undo_.window_blocks.empty()) return;
  store_->FreeDetached(*session_, undo_.window_blocks);
  undo_.window_blocks.clear();
}

const SessionConfig& SessionLease::config() const { return session_->config; }
const std::string& SessionLease::session_id() const { return session_->id; }

int64_t SessionLease::length(int32_t layer) const { return session_->layers[layer].length; }
int64_t SessionLease::dropped(int32_t layer) const { return session_->layers[layer].dropped; }
int64_t SessionLease::position(int32_t layer) const {
  const LayerCache& l = session_->layers[layer];
  return l.length + l.dropped;
}

PagedKvView SessionLease::View(int32_t layer) const {
  const Session& s = *session_;
  const LayerCache& l = s.layers[layer];
  PagedKvView v;
  v.dtype = s.config.dtype;
  v.num_kv_heads = s.config.num_kv_heads;
  v.head_dim = s.config.head_dim;
  v.value_dim = s.config.value_dim;
  v.block_tokens = s.block_tokens;
  v.length = l.length;
  v.blocks = l.blocks.data();
  return v;
}

namespace {

// Blocks a window moves past when a layer holds `length` tokens.
int64_t WindowBlocksToDrop(const Session& s, int64_t length) {
  if (!s.windowed()) return 0;
  const int64_t beyond = length - s.sink_region_tokens() - s.config.window_tokens;
  return beyond >= s.block_tokens ? beyond / s.block_tokens : 0;
}

}  // namespace

absl::StatusOr<int64_t> SessionLease::CheckAppend(int32_t layer, const TensorView& key,
                                                  const TensorView& value) const {
  const Session& s = *session_;
  const SessionConfig& c = s.config;
  if (layer < 0 || layer >= c.num_layers) {
    return InvalidField("layer", absl::StrCat("a value in [0, ", c.num_layers, ") (num_layers)"),
                        absl::StrCat(layer));
  }
  auto kd = TokenDims("key", key, c.num_kv_heads, c.head_dim);
  if (!kd.ok()) return kd.status();
  auto vd = TokenDims("value", value, c.num_kv_heads, c.value_dim);
  if (!vd.ok()) return vd.status();
  const int64_t n = (*kd)[0];
  if ((*vd)[0] != n) {
    return InvalidField("value.shape", absl::StrCat(n, " tokens like the key"),
                        ShapeString(value.shape));
  }
  if (c.num_layers > 1) {
    const int64_t seen = position(layer);
    if (layer == 0) {
      const int64_t last = position(c.num_layers - 1);
      if (seen != last) {
        return absl::FailedPreconditionError(absl::StrCat(
            "layer: layer 0 starts a new step but the previous step is unfinished: layer 0 holds ",
            seen, " tokens, layer ", c.num_layers - 1, " holds ", last,
            "; layers step in order 0..", c.num_layers - 1));
      }
    } else {
      const int64_t before = position(layer - 1);
      if (seen + n != before) {
        return absl::FailedPreconditionError(absl::StrCat(
            "layer: layer ", layer, " holds ", seen, " tokens and would hold ", seen + n,
            " after this step, but layer ", layer - 1, " holds ", before,
            "; layers step in order 0..", c.num_layers - 1, ", each with the same new tokens"));
      }
    }
  }
  const LayerCache& l = s.layers[layer];
  const int64_t kept = l.length + n - WindowBlocksToDrop(s, l.length + n) * s.block_tokens;
  const int64_t limit = c.max_tokens > 0 ? c.max_tokens : std::numeric_limits<int32_t>::max();
  if (kept > limit || l.length + l.dropped + n > (int64_t{1} << 40)) {
    return absl::ResourceExhaustedError(absl::StrCat("session ", s.id, " holds ", l.length,
                                                     " tokens in layer ", layer, "; ", n,
                                                     " more pass its max_tokens ", limit));
  }
  return n;
}

absl::Status SessionLease::Append(int32_t layer, const TensorView& key, const TensorView& value) {
  Session& s = *session_;
  const SessionConfig& c = s.config;
  absl::StatusOr<int64_t> checked = CheckAppend(layer, key, value);
  if (!checked.ok()) return checked.status();
  // The previous append of this lease is kept: from here on it cannot be undone.
  ReleaseDropped();
  undo_.layer = -1;
  const int64_t n = *checked;
  LayerCache& l = s.layers[layer];
  const int64_t new_length = l.length + n;
  // The new rows must not go into a block another session holds (a Truncate
  // can leave one as the last block): it is copied first.
  const size_t first = static_cast<size_t>(l.length / s.block_tokens);
  const bool copy_first = first < l.blocks.size() && l.shared[first];
  // Under lru_idle, evict nothing for an append that could never fit.
  const int64_t need = (new_length + s.block_tokens - 1) / s.block_tokens -
                       static_cast<int64_t>(l.blocks.size()) + (copy_first ? 1 : 0);
  if (need > 0 && store_->options_.eviction == EvictionPolicy::kLruIdle &&
      !store_->CouldFit(need * s.block_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache full: ", need * s.block_bytes, " more bytes for session ", s.id,
        " do not fit in --kv_cache_bytes=", store_->options_.kv_cache_bytes,
        " even after evicting every idle session"));
  }
  // Everything that allocates comes before the first change to the layer, so
  // that a failure (RESOURCE_EXHAUSTED) leaves it as it was: the rotated
  // keys, the room for the new block pointers and for the window's, and the
  // sink keys rotated for the window's new place (with the rows they replace,
  // for Rollback).
  const int64_t k_row = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t v_row = int64_t{c.num_kv_heads} * c.value_dim;
  const size_t es = DTypeSize(c.dtype);
  const int64_t drop = WindowBlocksToDrop(s, new_length);
  const int64_t sink_rows = drop > 0 && l.sink_keys != nullptr ? s.sink_region_tokens() : 0;
  std::vector<float> rotated;  // the new keys, when the session has RoPE
  std::vector<float> sinks;    // the sink keys at (position + dropped after this append)
  std::string old_sinks;       // the sink rows as the cache holds them now
  try {
    const size_t blocks_after =
        static_cast<size_t>((new_length + s.block_tokens - 1) / s.block_tokens);
    l.blocks.reserve(blocks_after);
    l.shared.reserve(blocks_after);
    undo_.window_blocks.reserve(static_cast<size_t>(drop));
    if (c.rope.has_value()) {
      rotated.resize(n * k_row);
      for (int64_t i = 0; i < n * k_row; ++i) rotated[i] = LoadFloat(key.data.data(), key.dtype, i);
      if (l.sink_keys != nullptr && l.length < s.sink_region_tokens()) {
        // Keep the sink tokens' keys unrotated, to rotate them again later
        // (rows past the layer's length: no change to what it holds).
        const int64_t rows = std::min(n, s.sink_region_tokens() - l.length);
        std::memcpy(static_cast<float*>(l.sink_keys) + l.length * k_row, rotated.data(),
                    rows * k_row * sizeof(float));
      }
      std::vector<int64_t> positions(n);
      for (int64_t i = 0; i < n; ++i) positions[i] = l.length + l.dropped + i;
      RotateRope(*c.rope, positions, c.num_kv_heads, c.head_dim, rotated.data());
    }
    if (sink_rows > 0) {
      const float* unrotated = static_cast<const float*>(l.sink_keys);
      sinks.assign(unrotated, unrotated + sink_rows * k_row);
      std::vector<int64_t> positions(sink_rows);
      const int64_t dropped = l.dropped + drop * s.block_tokens;
      for (int64_t j = 0; j < sink_rows; ++j) positions[j] = j + dropped;
      RotateRope(*c.rope, positions, c.num_kv_heads, c.head_dim, sinks.data());
      const int64_t held = std::min(l.length, sink_rows);
      old_sinks.resize(held * k_row * es);
      for (int64_t j = 0; j < held; ++j) {
        std::memcpy(old_sinks.data() + j * k_row * es,
                    static_cast<const char*>(l.blocks[j / s.block_tokens]) +
                        (j % s.block_tokens) * k_row * es,
                    k_row * es);
      }
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory appending to the session");
  }
  // Allocate every block first so a failure leaves the cache unchanged.
  void* copy = nullptr;
  if (copy_first) {
    auto block = store_->AllocateBlock(s.block_bytes, &s);
    if (!block.ok()) return block.status();
    copy = *block;
  }
  const size_t had = l.blocks.size();
  while (static_cast<int64_t>(l.blocks.size()) * s.block_tokens < new_length) {
    auto block = store_->AllocateBlock(s.block_bytes, &s);
    if (!block.ok()) {
      store_->FreeBlocks(s, layer, had);
      if (copy != nullptr) store_->FreeUnheld(copy, s.block_bytes);
      return block.status();
    }
    l.blocks.push_back(*block);  // reserved: no allocation
    l.shared.push_back(0);
    ++s.own_blocks;
  }
  if (copy != nullptr) {
    std::memcpy(copy, l.blocks[first], static_cast<size_t>(s.block_bytes));
    store_->pool_.Free(l.blocks[first], s.block_bytes);  // one holder fewer
    l.blocks[first] = copy;
    l.shared[first] = 0;
    ++s.own_blocks;
  }
  undo_.layer = layer;
  undo_.length = l.length;
  undo_.dropped = l.dropped;
  undo_.blocks = had;
  const int64_t v_offset = int64_t{s.block_tokens} * k_row;  // elements
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = l.length + t;
    char* block = static_cast<char*>(l.blocks[pos / s.block_tokens]);
    const int64_t row = pos % s.block_tokens;
    if (c.rope.has_value()) {
      ConvertFloats(reinterpret_cast<const char*>(rotated.data() + t * k_row), DType::kF32,
                 block + row * k_row * es, c.dtype, k_row);
    } else {
      ConvertFloats(key.data.data() + t * k_row * DTypeSize(key.dtype), key.dtype,
                 block + row * k_row * es, c.dtype, k_row);
    }
    ConvertFloats(value.data.data() + t * v_row * DTypeSize(value.dtype), value.dtype,
               block + (v_offset + row * v_row) * es, c.dtype, v_row);
  }
  l.length = new_length;
  // Move the window: the blocks past it leave the view now and are freed
  // when the lease ends (Rollback puts them back), and the sinks move to
  // their new positions.
  if (drop > 0) {
    auto from = l.blocks.begin() + s.sink_blocks;
    undo_.window_blocks.assign(from, from + drop);  // reserved: no allocation
    l.blocks.erase(from, from + drop);
    l.shared.erase(l.shared.begin() + s.sink_blocks, l.shared.begin() + s.sink_blocks + drop);
    l.length -= drop * s.block_tokens;
    l.dropped += drop * s.block_tokens;
    for (int64_t j = 0; j < sink_rows; ++j) {
      char* block = static_cast<char*>(l.blocks[j / s.block_tokens]);
      ConvertFloats(reinterpret_cast<const char*>(sinks.data() + j * k_row), DType::kF32,
                 block + (j % s.block_tokens) * k_row * es, c.dtype, k_row);
    }
    undo_.sinks = std::move(old_sinks);
  }
  return absl::OkStatus();
}

void SessionLease::Rollback() {
  if (session_ == nullptr || undo_.layer < 0) return;
  Session& s = *session_;
  LayerCache& l = s.layers[undo_.layer];
  if (!undo_.window_blocks.empty()) {
    // Erased from the same vectors: their capacity holds them again.
    l.blocks.insert(l.blocks.begin() + s.sink_blocks, undo_.window_blocks.begin(),
                    undo_.window_blocks.end());
    l.shared.insert(l.shared.begin() + s.sink_blocks, undo_.window_blocks.size(), 0);
    undo_.window_blocks.clear();
    l.dropped = undo_.dropped;
    // The sink rows as they were.
    const SessionConfig& c = s.config;
    const int64_t row_bytes = int64_t{c.num_kv_heads} * c.head_dim * DTypeSize(c.dtype);
    const int64_t rows = static_cast<int64_t>(undo_.sinks.size()) / row_bytes;
    for (int64_t j = 0; j < rows; ++j) {
      std::memcpy(static_cast<char*>(l.blocks[j / s.block_tokens]) + (j % s.block_tokens) * row_bytes,
                  undo_.sinks.data() + j * row_bytes, row_bytes);
    }
  }
  undo_.sinks.clear();
  l.length = undo_.length;
  if (l.blocks.size() > undo_.blocks) store_->FreeBlocks(s, undo_.layer, undo_.blocks);
  undo_.layer = -1;
}

void SessionLease::Truncate(int32_t layer, int64_t length) {
  Session& s = *session_;
  LayerCache& l = s.layers[layer];
  if (length < 0 || length >= l.length) return;
  l.length = length;
  undo_.layer = -1;
  // Keep at least one block: a session always owns one (see CreateSession).
  const size_t keep = std::max<size_t>(1, (length + s.block_tokens - 1) / s.block_tokens);
  if (l.blocks.size() > keep) store_->FreeBlocks(s, layer, keep);
}

// ---------------------------------------------------------------------------
// SessionStore

absl::StatusOr<std::unique_ptr<SessionStore>> SessionStore::Create(
    const SessionStoreOptions& options, Clock* clock) {
  if (options.kv_cache_bytes < 0) {
    return InvalidField("kv_cache_bytes", ">= 0", absl::StrCat(options.kv_cache_bytes));
  }
  if (options.block_tokens < 1 || options.block_tokens > 4096) {
    return InvalidField("kv_block_tokens", "a value in [1, 4096]",
                        absl::StrCat(options.block_tokens));
  }
  if (options.idle_timeout <= absl::ZeroDuration()) {
    return InvalidField("session_idle_timeout_s", "> 0",
                        absl::FormatDuration(options.idle_timeout));
  }
  if (options.min_block_bytes < 0) {
    return InvalidField("min_block_bytes", ">= 0", absl::StrCat(options.min_block_bytes));
  }
  if (options.max_sessions < 1) {
    return InvalidField("max_sessions", ">= 1", absl::StrCat(options.max_sessions));
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

absl::Status SessionStore::ValidateConfig(SessionConfig& c) const {
  const int32_t value_dim = c.value_dim;
  if (c.value_dim == 0) c.value_dim = c.head_dim;
  if (c.num_kv_heads < 1 || c.num_kv_heads > 1024) {
    return InvalidField("num_kv_heads", "a value in [1, 1024]", absl::StrCat(c.num_kv_heads));
  }
  if (c.head_dim < 1 || c.head_dim > 1024) {
    return InvalidField("head_dim", "a value in [1, 1024]", absl::StrCat(c.head_dim));
  }
  if (c.value_dim < 1 || c.value_dim > 1024) {
    return InvalidField("value_dim", "0 (= head_dim) or a value in [1, 1024]",
                        absl::StrCat(value_dim));
  }
  if (!IsInputDType(c.dtype)) return InvalidField("dtype", "F32, F16 or BF16", DTypeName(c.dtype));
  if (c.max_tokens < 0 || c.max_tokens > std::numeric_limits<int32_t>::max()) {
    return InvalidField("max_tokens", "a value in [0, 2147483647] (0 = as many as fit)",
                        absl::StrCat(c.max_tokens));
  }
  if (c.num_layers == 0) c.num_layers = 1;
  if (c.num_layers < 1 || c.num_layers > kMaxLayers) {
    return InvalidField("num_layers", absl::StrCat("0 (= 1) or a value in [1, ", kMaxLayers, "]"),
                        absl::StrCat(c.num_layers));
  }
  if (c.window_tokens < 0 || c.window_tokens > std::numeric_limits<int32_t>::max()) {
    return InvalidField("window_tokens", "a value in [0, 2147483647] (0 = keep every token)",
                        absl::StrCat(c.window_tokens));
  }
  if (c.sink_tokens < 0 || c.sink_tokens > (c.window_tokens > 0 ? 65536 : 0)) {
    return InvalidField("sink_tokens",
                        c.window_tokens > 0 ? "a value in [0, 65536]" : "0 without window_tokens",
                        absl::StrCat(c.sink_tokens));
  }
  if (c.rope.has_value()) {
    if (absl::Status st = ValidateRope(*c.rope, c.head_dim, "rotary"); !st.ok()) return st;
    if (c.window_tokens > 0 && c.rope->scaling == RopeScaling::kDynamic) {
      return InvalidField(
          "rotary.scaling",
          "not DYNAMIC with window_tokens (its frequencies change with the position, "
          "so the sinks cannot keep their distances)",
          "DYNAMIC");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Session>> SessionStore::NewSession(const SessionConfig& c,
                                                                  const std::string& owner) const {
  auto s = std::make_shared<Session>();
  s->owner = owner;
  s->config = c;
  s->block_tokens = options_.block_tokens;
  s->block_bytes = std::max<int64_t>(
      options_.min_block_bytes, int64_t{options_.block_tokens} * c.num_kv_heads *
                                    (c.head_dim + c.value_dim) *
                                    static_cast<int64_t>(DTypeSize(c.dtype)));
  if (c.window_tokens > 0) {
    s->sink_blocks =
        static_cast<int32_t>((c.sink_tokens + options_.block_tokens - 1) / options_.block_tokens);
    if (c.rope.has_value() && s->sink_blocks > 0) {
      s->sink_keys_bytes = s->sink_region_tokens() * c.num_kv_heads * c.head_dim *
                           static_cast<int64_t>(sizeof(float));
    }
  }
  s->layers.resize(c.num_layers);
  return s;
}

absl::Status SessionStore::Insert(std::shared_ptr<Session> s) {
  absl::StatusOr<std::string> id = NewSessionId();
  absl::MutexLock lock(&mu_);
  // Checked again: concurrent creates may have filled the table meanwhile.
  // (A 128-bit id never collides in practice; the check keeps it certain.)
  if (!id.ok() || static_cast<int64_t>(sessions_.size()) >= options_.max_sessions ||
      sessions_.contains(*id)) {
    ReleaseLocked(*s);
    if (!id.ok()) return id.status();
    return absl::ResourceExhaustedError(
        absl::StrCat("sessions: the server holds its maximum of ", options_.max_sessions));
  }
  s->id = *std::move(id);
  s->last_used = clock_->Now();
  sessions_[s->id] = std::move(s);
  return absl::OkStatus();
}

absl::StatusOr<SessionStore::Created> SessionStore::CreateSession(const SessionConfig& config,
                                                                  const std::string& owner) {
  SessionConfig c = config;
  if (absl::Status st = ValidateConfig(c); !st.ok()) return st;
  absl::StatusOr<std::shared_ptr<Session>> made = NewSession(c, owner);
  if (!made.ok()) return made.status();
  std::shared_ptr<Session> s = *std::move(made);
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions &&
        !(options_.eviction == EvictionPolicy::kLruIdle && EvictOneIdleLocked(nullptr))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("sessions: the server holds its maximum of ", options_.max_sessions));
    }
  }
  // A session starts with one block per layer (and its sink copies), so a
  // full cache refuses new sessions.
  for (LayerCache& l : s->layers) {
    auto block = AllocateBlock(s->block_bytes, nullptr);
    if (block.ok() && s->sink_keys_bytes > 0) {
      auto sink = AllocateBlock(s->sink_keys_bytes, nullptr);
      if (sink.ok()) {
        l.sink_keys = *sink;
      } else {
        pool_.Free(*block, s->block_bytes);
        block = sink.status();
      }
    }
    if (!block.ok()) {
      absl::MutexLock lock(&mu_);
      ReleaseLocked(*s);
      return block.status();
    }
    l.blocks.push_back(*block);
    l.shared.push_back(0);
    ++s->own_blocks;
  }
  if (absl::Status st = Insert(s); !st.ok()) return st;
  Created out;
  out.session_id = s->id;
  const int64_t free_blocks = (pool_.capacity_bytes() - pool_.used_bytes()) / s->block_bytes;
  out.capacity_tokens =
      c.max_tokens > 0 ? c.max_tokens : (free_blocks / c.num_layers + 1) * s->block_tokens;
  return out;
}

absl::StatusOr<SessionStore::Forked> SessionStore::Fork(const std::string& session_id,
                                                        int64_t tokens, const std::string& owner) {
  absl::StatusOr<SessionLease> lease = Acquire(session_id, owner);
  if (!lease.ok()) return lease.status();
  Session& parent = *lease->session_;
  const SessionConfig& c = parent.config;
  if (parent.windowed()) {
    return absl::FailedPreconditionError(
        "session_id: a session with window_tokens is not forked (its window frees and its sinks "
        "rewrite blocks a fork would share)");
  }
  int64_t shortest = std::numeric_limits<int64_t>::max();
  for (const LayerCache& l : parent.layers) shortest = std::min(shortest, l.length);
  if (tokens < 1)
    return InvalidField("tokens", absl::StrCat("a value in [1, ", shortest, "]"),
                        absl::StrCat(tokens));
  if (tokens > shortest) {
    return absl::FailedPreconditionError(absl::StrCat(
        "tokens: expected at most the session's length ", shortest, ", got ", tokens));
  }
  absl::StatusOr<std::shared_ptr<Session>> made = NewSession(c, owner);
  if (!made.ok()) return made.status();
  std::shared_ptr<Session> child = *std::move(made);
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions &&
        !(options_.eviction == EvictionPolicy::kLruIdle && EvictOneIdleLocked(&parent))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("sessions: the server holds its maximum of ", options_.max_sessions));
    }
  }
  const int64_t full = tokens / parent.block_tokens;
  const int64_t rest = tokens % parent.block_tokens;
  const size_t es = DTypeSize(c.dtype);
  const int64_t k_row = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t v_row = int64_t{c.num_kv_heads} * c.value_dim;
  int64_t newly_shared = 0;
  for (size_t li = 0; li < parent.layers.size(); ++li) {
    LayerCache& from = parent.layers[li];
    LayerCache& to = child->layers[li];
    for (int64_t b = 0; b < full; ++b) {
      pool_.Share(from.blocks[b], parent.block_bytes);
      to.blocks.push_back(from.blocks[b]);
      to.shared.push_back(1);
      if (!from.shared[b]) {
        from.shared[b] = 1;
        ++newly_shared;
      }
    }
    if (rest > 0) {
      auto block = AllocateBlock(parent.block_bytes, nullptr);
      if (!block.ok()) {
        absl::MutexLock lock(&mu_);
        ReleaseLocked(*child);
        // The parent's blocks stay marked shared: they are counted as shared
        // bytes (conservatively) until freed.
        parent.own_blocks -= newly_shared;
        pinned_bytes_ -= newly_shared * parent.block_bytes;
        return block.status();
      }
      const char* src = static_cast<const char*>(from.blocks[full]);
      char* dst = static_cast<char*>(*block);
      const int64_t v_offset = int64_t{parent.block_tokens} * k_row * es;
      std::memcpy(dst, src, rest * k_row * es);
      std::memcpy(dst + v_offset, src + v_offset, rest * v_row * es);
      to.blocks.push_back(*block);
      to.shared.push_back(0);
      ++child->own_blocks;
    }
    to.length = tokens;
  }
  {
    absl::MutexLock lock(&mu_);
    parent.own_blocks -= newly_shared;
    pinned_bytes_ -= newly_shared * parent.block_bytes;
  }
  if (absl::Status st = Insert(child); !st.ok()) return st;
  {
    absl::MutexLock lock(&mu_);
    ++forks_total_;
  }
  return Forked{child->id, full * parent.block_tokens};
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
    st.window_blocks_freed_total = window_blocks_freed_total_;
    st.forks_total = forks_total_;
    // Read under mu_ too, so that pinned_bytes <= used_bytes in one snapshot.
    st.used_bytes = pool_.used_bytes();
    st.pinned_bytes = std::min(pinned_bytes_, st.used_bytes);
    st.shared_bytes = pool_.shared_bytes();
    st.shared_blocks = pool_.shared_blocks();
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

void SessionStore::FreeBlocks(Session& s, int32_t layer, size_t keep) {
  LayerCache& l = s.layers[layer];
  absl::MutexLock lock(&mu_);
  while (l.blocks.size() > keep) {
    pool_.Free(l.blocks.back(), s.block_bytes);
    if (!l.shared.back()) {
      pinned_bytes_ -= s.block_bytes;
      --s.own_blocks;
    }
    l.blocks.pop_back();
    l.shared.pop_back();
  }
}

void SessionStore::FreeUnheld(void* block, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  pool_.Free(block, bytes);
  pinned_bytes_ -= bytes;
}

void SessionStore::FreeDetached(Session& s, const std::vector<void*>& blocks) {
  absl::MutexLock lock(&mu_);
  for (void* b : blocks) {
    pool_.Free(b, s.block_bytes);  // a windowed session's blocks are never shared
    pinned_bytes_ -= s.block_bytes;
    --s.own_blocks;
  }
  window_blocks_freed_total_ += static_cast<int64_t>(blocks.size());
}

bool SessionStore::CouldFit(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  const int64_t capacity = pool_.capacity_bytes();
  const int64_t used = pool_.used_bytes();
  // Room now, or room once every idle session is gone: what pinned sessions
  // hold stays, and (at first, conservatively) so does every block ever
  // shared.
  if (used + bytes <= capacity) return true;
  const int64_t ever_shared = pool_.ever_shared_bytes();
  if (pinned_bytes_ + ever_shared + bytes <= capacity) return true;
  if (ever_shared == 0) return false;
  // Exactly: what evicting every idle session frees. Their own blocks and
  // sink copies, and each block ever shared that idle sessions alone hold
  // (all its references theirs). Only when the cache is full and forks hold
  // blocks.
  int64_t freeable = 0;
  absl::flat_hash_map<void*, std::pair<int32_t, int64_t>> idle_refs;  // block -> (refs, bytes)
  for (const auto& [id, s] : sessions_) {
    if (s->pinned) continue;
    freeable += s->held_bytes();
    for (const LayerCache& l : s->layers) {
      for (size_t b = 0; b < l.blocks.size(); ++b) {
        if (!l.shared[b]) continue;
        auto& [refs, block_bytes] = idle_refs[l.blocks[b]];
        ++refs;
        block_bytes = s->block_bytes;
      }
    }
  }
  for (const auto& [block, held] : idle_refs) {
    if (pool_.references(block) == held.first) freeable += held.second;
  }
  return used - freeable + bytes <= capacity;
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
  for (LayerCache& l : s.layers) {
    for (void* b : l.blocks) pool_.Free(b, s.block_bytes);
    if (l.sink_keys != nullptr) pool_.Free(l.sink_keys, s.sink_keys_bytes);
    l = LayerCache();
  }
  s.own_blocks = 0;
}

void SessionStore::Unpin(Session& s) {
  absl::MutexLock lock(&mu_);
  pinned_bytes_ -= s.held_bytes();  // the caller holds the lease: nobody else changes them
  s.pinned = false;
  s.last_used = clock_->Now();
  if (s.closed) ReleaseLocked(s);
}

}  // namespace attnserve
