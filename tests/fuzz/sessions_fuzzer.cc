// Fuzz target for SessionStore (the KV cache behind sessions): the input is a
// store configuration followed by a sequence of operations (create, acquire,
// append to a layer, truncate, rollback, release, close, fork, advance the
// clock, expire), decoded with FuzzedDataProvider. A model of the store
// predicts each result from the documented behaviour, and after every
// operation every statistic; any crash, sanitizer report or disagreement
// aborts.
//
// The model mirrors the pool block by block: each layer of a model session
// lists model block ids, and each block has a reference count (a fork shares
// the parent's full blocks) and an ever-shared mark (what the store's
// conservative CouldFit counts as unfreeable), so used_bytes, shared_bytes,
// shared_blocks and pinned_bytes are exact, and so is every eviction: the
// fuzzer moves its clock by 1 ns before each operation that can touch a
// session, so no two sessions are ever last used at the same instant and the
// least recently used idle session is always one session (the store breaks
// ties in hash order, which no model could follow). The first time a lease's
// view shows a block, the model records its address: a block shared by two
// sessions must show the same address in both, distinct live blocks distinct
// ones.
//
// Sessions have 1 to 3 layers (plus invalid counts), optionally RoPE (the
// model rotates its copy with RotateRope at the positions it expects, so it
// checks the positions the store uses, not the rotation itself) and optionally
// a sinks window (the model drops the same blocks, checks the kept rows and,
// with RoPE, the sink keys rewritten at position + dropped).
//
// Decoding: every choice whose range depends on the model's state (a session,
// a leased session, a layer, a token count) reads one byte and takes it modulo
// the choices, so tests/fuzz/make_corpus.py can write scripted seeds without
// replaying the model. Keep the two in step when changing the decoding.
//
// SESSIONS_FUZZER_TRACE=1 in the environment prints each operation and its
// result to stderr (to read a reproducer).
//
// Two store bugs this fuzzer found are covered by its model since their fixes:
// a Rollback after a failed Append (an Append that passes its checks makes
// the previous one final), and an Append into a block a fork shares after a
// Truncate (the block is copied first).
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "attention/rope.h"
#include "core/half.h"
#include "core/tensor.h"
#include "kvcache/session_store.h"
#include "scheduler/fake_clock.h"

namespace attnserve {
namespace {

constexpr int kMaxOps = 200;
constexpr int32_t kMaxTokensPerAppend = 40;
const std::string kOwner = "alice";
const std::string kStranger = "mallory";

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "sessions_fuzzer: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

bool Tracing() {
  static const bool on = std::getenv("SESSIONS_FUZZER_TRACE") != nullptr;
  return on;
}

void Trace(const std::string& line) {
  if (Tracing()) std::fprintf(stderr, "  %s\n", line.c_str());
}

void ExpectCode(const absl::Status& status, absl::StatusCode want, const std::string& where) {
  if (status.code() != want) {
    Fail(absl::StrCat(where, ": got ", status.ToString(), ", expected ",
                      absl::StatusCodeToString(want)));
  }
}

bool IsInputDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One pool allocation as the model sees it.
struct ModelBlock {
  int32_t refs = 1;
  bool ever_shared = false;  // shared once and still held (BlockPool::ever_shared_bytes)
  int64_t bytes = 0;
  const void* address = nullptr;  // where the store put it, once a view has shown it
};

// One layer of a model session.
struct ModelLayer {
  int64_t length = 0;   // rows the view shows
  int64_t dropped = 0;  // rows a window freed
  std::string keys;     // expected K rows in the cache dtype (rotated with RoPE)
  std::string values;   // expected V rows
  std::vector<float> raw_keys;  // with RoPE: each row's K in F32 before rotation
  std::vector<int64_t> blocks;  // model block ids, in order
  int64_t sink_keys = 0;        // model block id of the unrotated sink copy (RoPE + sinks)

  int64_t position() const { return length + dropped; }
};

// What the model knows about one session it created or forked.
struct ModelSession {
  std::string id;
  SessionConfig config;  // resolved: value_dim, num_layers, rope
  int64_t block_bytes = 0;
  int64_t sink_blocks = 0;
  int64_t sink_keys_bytes = 0;
  std::vector<ModelLayer> layers;
  absl::Time last_used;
  bool closed = false;   // Close answered OK
  bool lost = false;     // evicted or expired
  bool forking = false;  // pinned by a Fork in progress
  std::optional<SessionLease> lease;
  // The lease's last Append, for Rollback: its layer (-1: none) as it was.
  int32_t undo_layer = -1;
  ModelLayer undo_before;
  std::vector<int64_t> detached;  // blocks the lease's last Append's window moved past

  bool in_table() const { return !closed && !lost; }
  bool pinned() const { return lease.has_value() || forking; }
  bool windowed() const { return config.window_tokens > 0; }
  int64_t k_row() const { return int64_t{config.num_kv_heads} * config.head_dim; }
  int64_t v_row() const { return int64_t{config.num_kv_heads} * config.value_dim; }
  int64_t key_row_bytes() const { return k_row() * int64_t(DTypeSize(config.dtype)); }
  int64_t value_row_bytes() const { return v_row() * int64_t(DTypeSize(config.dtype)); }
  int64_t shortest() const {
    int64_t n = std::numeric_limits<int64_t>::max();
    for (const ModelLayer& l : layers) n = std::min(n, l.length);
    return layers.empty() ? 0 : n;
  }
};

class SessionsFuzz {
 public:
  explicit SessionsFuzz(FuzzedDataProvider& in) : in_(in) {}

  void Run() {
    if (!CreateStore()) return;
    for (int op = 0; op < kMaxOps && in_.remaining_bytes() > 0; ++op) {
      switch (in_.ConsumeIntegralInRange<int>(0, 10)) {
        case 0: CreateSession(); break;
        case 1: Acquire(); break;
        case 2: case 3: Append(); break;
        case 4: Truncate(); break;
        case 5: Release(); break;
        case 6: Close(); break;
        case 7: AdvanceClock(); break;
        case 8: ExpireIdle(); break;
        case 9: Rollback(); break;
        case 10: Fork(); break;
      }
      CheckStats();
    }
    // Leases end before the store does (the store's documented contract).
    for (auto& s : sessions_) {
      if (s->lease) EndLease(*s);
    }
    CheckStats();
    // Closing every session returns every block: no reference is left over.
    for (auto& s : sessions_) {
      if (!s->in_table()) continue;
      ExpectCode(store_->Close(s->id, kOwner), absl::StatusCode::kOk, "Close(at the end)");
      s->closed = true;
      ++closed_;
      ReleaseSession(*s);
    }
    CheckStats();
    if (used_ != 0 || !blocks_.empty()) Fail("the model holds blocks after every session closed");
  }

 private:
  bool CreateStore() {
    SessionStoreOptions o;
    o.kv_cache_bytes = in_.ConsumeIntegralInRange<int64_t>(-1, 1 << 16);
    const int32_t block_tokens = in_.ConsumeIntegralInRange<int32_t>(0, 17);
    o.block_tokens = block_tokens == 17 ? 4097 : block_tokens;
    o.idle_timeout = absl::Seconds(in_.ConsumeIntegralInRange<int>(-1, 10));
    o.eviction = in_.ConsumeBool() ? EvictionPolicy::kLruIdle : EvictionPolicy::kReject;
    o.max_sessions = in_.ConsumeIntegralInRange<int64_t>(0, 6);
    o.min_block_bytes = in_.PickValueInArray<int64_t>({0, 0, 64, 4096, -1});
    const bool valid = o.kv_cache_bytes >= 0 && o.block_tokens >= 1 && o.block_tokens <= 4096 &&
                       o.idle_timeout > absl::ZeroDuration() && o.min_block_bytes >= 0 &&
                       o.max_sessions >= 1;
    auto store = SessionStore::Create(o, &clock_);
    if (!valid) {
      ExpectCode(store.status(), absl::StatusCode::kInvalidArgument, "Create(invalid options)");
      return false;
    }
    if (!store.ok()) Fail(absl::StrCat("Create(valid options): ", store.status().ToString()));
    store_ = *std::move(store);
    options_ = o;
    Trace(absl::StrCat("store: ", o.kv_cache_bytes, " bytes, block_tokens ", o.block_tokens,
                       ", idle ", absl::FormatDuration(o.idle_timeout), ", ",
                       o.eviction == EvictionPolicy::kLruIdle ? "lru_idle" : "reject",
                       ", max_sessions ", o.max_sessions, ", min_block_bytes ",
                       o.min_block_bytes));
    return true;
  }

  // --- Decoding helpers -----------------------------------------------------

  // One byte, modulo n (> 0).
  size_t Pick(size_t n) { return in_.ConsumeIntegral<uint8_t>() % n; }
  // A session the model knows, or nullptr for an id the store never issued.
  ModelSession* PickSession() {
    const size_t i = Pick(sessions_.size() + 1);
    return i < sessions_.size() ? sessions_[i].get() : nullptr;
  }
  const std::string& PickOwner() {
    return in_.ConsumeIntegralInRange(0, 7) == 0 ? kStranger : kOwner;
  }
  ModelSession* PickLeased() {
    std::vector<ModelSession*> leased;
    for (auto& s : sessions_) {
      if (s->lease) leased.push_back(s.get());
    }
    if (leased.empty()) return nullptr;
    return leased[Pick(leased.size())];
  }
  // Moves the clock by 1 ns: no two operations touch sessions at one instant.
  void Tick() { clock_.Advance(absl::Nanoseconds(1)); }

  // --- The model's pool -----------------------------------------------------

  // BlockPool::Allocate: refused when the bytes in use would pass the bound
  // (cached free blocks are given back first, so they never refuse).
  std::optional<int64_t> PoolAllocate(int64_t bytes) {
    if (used_ + bytes > options_.kv_cache_bytes) return std::nullopt;
    const int64_t id = next_block_++;
    blocks_[id].bytes = bytes;
    used_ += bytes;
    return id;
  }
  void PoolShare(int64_t id) {
    ModelBlock& b = Block(id);
    ++b.refs;
    b.ever_shared = true;
  }
  void PoolFree(int64_t id) {
    ModelBlock& b = Block(id);
    if (--b.refs > 0) return;
    if (b.address != nullptr) addresses_.erase(b.address);
    used_ -= b.bytes;
    blocks_.erase(id);
  }
  ModelBlock& Block(int64_t id) {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) Fail(absl::StrCat("model: block ", id, " is not live"));
    return it->second;
  }

  // SessionStore::ReleaseLocked.
  void ReleaseSession(ModelSession& s) {
    for (ModelLayer& l : s.layers) {
      for (int64_t b : l.blocks) PoolFree(b);
      if (l.sink_keys != 0) PoolFree(l.sink_keys);
      l = ModelLayer();
    }
  }

  // EvictOneIdleLocked: the least recently used idle session but `spare`.
  bool EvictOne(const ModelSession* spare) {
    ModelSession* victim = nullptr;
    bool tie = false;
    for (auto& s : sessions_) {
      if (!s->in_table() || s->pinned() || s.get() == spare) continue;
      if (victim == nullptr || s->last_used < victim->last_used) {
        victim = s.get();
        tie = false;
      } else if (s->last_used == victim->last_used) {
        tie = true;
      }
    }
    if (victim == nullptr) return false;
    if (tie) Fail("model: two idle sessions were last used at one instant (the fuzzer avoids it)");
    Trace(absl::StrCat("  evicts ", Name(*victim)));
    ReleaseSession(*victim);
    victim->lost = true;
    ++evictions_;
    return true;
  }

  // SessionStore::AllocateBlock: under lru_idle, evicts until the block fits.
  std::optional<int64_t> AllocateBlock(int64_t bytes, const ModelSession* requester) {
    while (true) {
      if (std::optional<int64_t> id = PoolAllocate(bytes)) return id;
      if (options_.eviction != EvictionPolicy::kLruIdle || !EvictOne(requester)) {
        return std::nullopt;
      }
    }
  }

  int64_t TableSize() const {
    int64_t n = 0;
    for (const auto& s : sessions_) n += s->in_table();
    return n;
  }
  // What pinned sessions hold besides ever-shared blocks (SessionStore::pinned_bytes_).
  int64_t PinnedBytes() const {
    int64_t bytes = 0;
    for (const auto& s : sessions_) {
      if (!s->pinned()) continue;
      int64_t own = static_cast<int64_t>(s->detached.size());
      for (const ModelLayer& l : s->layers) {
        for (int64_t b : l.blocks) own += !blocks_.at(b).ever_shared;
      }
      bytes += own * s->block_bytes + s->sink_keys_bytes * s->config.num_layers;
    }
    return bytes;
  }
  int64_t EverSharedBytes() const {
    int64_t bytes = 0;
    for (const auto& [id, b] : blocks_) bytes += b.ever_shared ? b.bytes : 0;
    return bytes;
  }
  // SessionStore::CouldFit: room now, or once every idle session is gone:
  // first counting every ever-shared block as staying, then exactly (an
  // ever-shared block goes when idle sessions hold all its references).
  bool CouldFit(int64_t bytes) const {
    const int64_t capacity = options_.kv_cache_bytes;
    if (used_ + bytes <= capacity) return true;
    const int64_t ever_shared = EverSharedBytes();
    if (PinnedBytes() + ever_shared + bytes <= capacity) return true;
    if (ever_shared == 0) return false;
    int64_t freeable = 0;
    std::map<int64_t, int32_t> idle_refs;  // ever-shared block -> idle holders
    for (const auto& s : sessions_) {
      if (!s->in_table() || s->pinned()) continue;
      int64_t own = 0;
      for (const ModelLayer& l : s->layers) {
        for (int64_t b : l.blocks) {
          if (blocks_.at(b).ever_shared) {
            ++idle_refs[b];
          } else {
            ++own;
          }
        }
      }
      freeable += own * s->block_bytes + s->sink_keys_bytes * s->config.num_layers;
    }
    for (const auto& [b, holders] : idle_refs) {
      if (blocks_.at(b).refs == holders) freeable += blocks_.at(b).bytes;
    }
    return used_ - freeable + bytes <= capacity;
  }

  std::string Name(const ModelSession& s) const {
    for (size_t i = 0; i < sessions_.size(); ++i) {
      if (sessions_[i].get() == &s) return absl::StrCat("s", i);
    }
    return "s?";
  }

  // --- Windows and RoPE -----------------------------------------------------

  int64_t SinkRegion(const ModelSession& s) const { return s.sink_blocks * options_.block_tokens; }
  // Blocks a window moves past when a layer holds `length` tokens.
  int64_t WindowBlocksToDrop(const ModelSession& s, int64_t length) const {
    if (!s.windowed()) return 0;
    const int64_t beyond = length - SinkRegion(s) - s.config.window_tokens;
    return beyond >= options_.block_tokens ? beyond / options_.block_tokens : 0;
  }
  // Rows `first`.. of `l` rotated at their positions (row i at i + dropped)
  // from raw_keys, one RotateRope call per row, into keys.
  void RotateRows(const ModelSession& s, ModelLayer& l, int64_t first, int64_t count) {
    const SessionConfig& c = s.config;
    const int64_t k_row = s.k_row();
    for (int64_t j = first; j < first + count; ++j) {
      std::vector<float> row(l.raw_keys.begin() + j * k_row, l.raw_keys.begin() + (j + 1) * k_row);
      const int64_t position = j + l.dropped;
      RotateRope(*c.rope, {&position, 1}, c.num_kv_heads, c.head_dim, row.data());
      for (int64_t e = 0; e < k_row; ++e) {
        StoreFloat(l.keys.data() + j * s.key_row_bytes(), c.dtype, e, row[e]);
      }
    }
  }

  // --- Operations -------------------------------------------------------------

  void CreateSession() {
    Tick();
    SessionConfig c;
    c.num_kv_heads = in_.ConsumeIntegralInRange<int32_t>(-1, 4);
    const int32_t head_dim = in_.ConsumeIntegralInRange<int32_t>(-1, 9);
    c.head_dim = head_dim == 9 ? 1025 : head_dim;
    const int32_t value_dim = in_.ConsumeIntegralInRange<int32_t>(-1, 9);
    c.value_dim = value_dim == 9 ? 1025 : value_dim;
    c.dtype = in_.PickValueInArray({DType::kF32, DType::kF16, DType::kBF16, DType::kI32});
    const int64_t max_tokens = in_.ConsumeIntegralInRange<int64_t>(-1, 41);
    c.max_tokens = max_tokens == 41 ? int64_t{1} << 31 : max_tokens;
    c.num_layers = in_.PickValueInArray<int32_t>({1, 1, 2, 3, 3, 0, -1, 1025});
    const int window_mode = in_.ConsumeIntegralInRange(0, 7);
    if (window_mode == 5) {
      c.sink_tokens = 3;  // sinks without a window: invalid
    } else if (window_mode >= 6) {
      const int64_t window = in_.ConsumeIntegralInRange<int64_t>(-1, 25);
      c.window_tokens = window == 25 ? int64_t{1} << 31 : window;
      const int64_t sinks = in_.ConsumeIntegralInRange<int64_t>(-1, 21);
      c.sink_tokens = sinks == 21 ? 65537 : sinks;
    }
    if (in_.ConsumeIntegralInRange(0, 7) >= 5) {
      RopeConfig r;
      r.style = in_.ConsumeBool() ? RopeStyle::kGptj : RopeStyle::kNeox;
      r.scaling = in_.PickValueInArray(
          {RopeScaling::kNone, RopeScaling::kLinear, RopeScaling::kNtk, RopeScaling::kDynamic});
      r.rotary_dim = in_.PickValueInArray<int32_t>({0, 2, 3, 4});
      r.theta = in_.PickValueInArray<double>({10000.0, 0.0, 0.5, 500000.0});
      r.factor = in_.PickValueInArray<double>({1.0, 2.0, 0.5});
      r.original_max_positions = 16;
      c.rope = r;
    }

    SessionConfig resolved = c;
    if (resolved.value_dim == 0) resolved.value_dim = resolved.head_dim;
    if (resolved.num_layers == 0) resolved.num_layers = 1;
    const auto in_range = [](int64_t x) { return x >= 1 && x <= 1024; };
    bool valid = in_range(resolved.num_kv_heads) && in_range(resolved.head_dim) &&
                 in_range(resolved.value_dim) && IsInputDType(c.dtype) && c.max_tokens >= 0 &&
                 c.max_tokens <= std::numeric_limits<int32_t>::max() &&
                 in_range(resolved.num_layers) && c.window_tokens >= 0 &&
                 c.window_tokens <= std::numeric_limits<int32_t>::max() && c.sink_tokens >= 0 &&
                 c.sink_tokens <= (c.window_tokens > 0 ? 65536 : 0);
    if (valid && resolved.rope.has_value()) {
      // RoPE's own rules are ValidateRope's (tested with it); the store's is
      // that DYNAMIC cannot keep the sinks' distances.
      valid = ValidateRope(*resolved.rope, resolved.head_dim).ok() &&
              !(c.window_tokens > 0 && resolved.rope->scaling == RopeScaling::kDynamic);
    }
    auto created = store_->CreateSession(c, kOwner);
    const std::string where = absl::StrCat(
        "CreateSession(heads ", c.num_kv_heads, ", dims ", c.head_dim, "/", c.value_dim, ", ",
        DTypeName(c.dtype), ", max_tokens ", c.max_tokens, ", layers ", c.num_layers, ", window ",
        c.window_tokens, ", sinks ", c.sink_tokens, c.rope.has_value() ? ", rope" : "", ")");
    if (!valid) {
      ExpectCode(created.status(), absl::StatusCode::kInvalidArgument, where);
      Trace(absl::StrCat(where, ": INVALID_ARGUMENT"));
      return;
    }
    auto s = std::make_unique<ModelSession>();
    s->config = resolved;
    const int64_t bt = options_.block_tokens;
    s->block_bytes = std::max<int64_t>(
        options_.min_block_bytes, bt * resolved.num_kv_heads *
                                      (resolved.head_dim + resolved.value_dim) *
                                      int64_t(DTypeSize(c.dtype)));
    if (c.window_tokens > 0) {
      s->sink_blocks = CeilDiv(c.sink_tokens, bt);
      if (c.rope.has_value() && s->sink_blocks > 0) {
        s->sink_keys_bytes = s->sink_blocks * bt * s->k_row() * int64_t{sizeof(float)};
      }
    }
    // Documented: a session starts with one block per layer (and its sink
    // copies); a full cache refuses it after evicting idle sessions under
    // lru_idle, as does max_sessions.
    bool ok = true;
    if (TableSize() >= options_.max_sessions &&
        !(options_.eviction == EvictionPolicy::kLruIdle && EvictOne(nullptr))) {
      ok = false;
    }
    if (ok) {
      s->layers.resize(resolved.num_layers);
      for (ModelLayer& l : s->layers) {
        std::optional<int64_t> block = AllocateBlock(s->block_bytes, nullptr);
        if (block && s->sink_keys_bytes > 0) {
          if (std::optional<int64_t> sink = AllocateBlock(s->sink_keys_bytes, nullptr)) {
            l.sink_keys = *sink;
          } else {
            PoolFree(*block);
            block.reset();
          }
        }
        if (!block) {
          ReleaseSession(*s);
          ok = false;
          break;
        }
        l.blocks.push_back(*block);
      }
    }
    if (ok != created.ok()) {
      Fail(absl::StrCat(where, ": ", created.ok() ? "OK" : created.status().ToString(),
                        ", expected ", ok ? "OK" : "RESOURCE_EXHAUSTED", " (used ", used_, " of ",
                        options_.kv_cache_bytes, ", block ", s->block_bytes, ", pinned ",
                        PinnedBytes(), ", sessions ", TableSize(), " of ", options_.max_sessions,
                        ")"));
    }
    if (!created.ok()) {
      ExpectCode(created.status(), absl::StatusCode::kResourceExhausted, where);
      Trace(absl::StrCat(where, ": RESOURCE_EXHAUSTED"));
      return;
    }
    const int64_t free_blocks = (options_.kv_cache_bytes - used_) / s->block_bytes;
    const int64_t capacity =
        c.max_tokens > 0 ? c.max_tokens : (free_blocks / resolved.num_layers + 1) * bt;
    if (created->capacity_tokens != capacity) {
      Fail(absl::StrCat(where, ": capacity_tokens ", created->capacity_tokens, ", expected ",
                        capacity));
    }
    AddSession(std::move(s), created->session_id);
    Trace(absl::StrCat(where, ": OK ", Name(*sessions_.back())));
  }

  void AddSession(std::unique_ptr<ModelSession> s, const std::string& id) {
    for (const auto& other : sessions_) {
      if (other->id == id) Fail("a session id was issued twice");
    }
    s->id = id;
    s->last_used = clock_.Now();
    sessions_.push_back(std::move(s));
    ++created_;
  }

  void Acquire() {
    Tick();
    ModelSession* s = PickSession();
    const std::string& owner = PickOwner();
    auto lease = store_->Acquire(s != nullptr ? s->id : "00112233445566778899aabbccddeeff", owner);
    const std::string where =
        absl::StrCat("Acquire(", s != nullptr ? Name(*s) : "unknown", ", ", owner, ")");
    Trace(absl::StrCat(where, ": ", lease.status().ToString()));
    if (s == nullptr || owner != kOwner || !s->in_table()) {
      ExpectCode(lease.status(), absl::StatusCode::kNotFound, where);
      return;
    }
    if (s->pinned()) {
      ExpectCode(lease.status(), absl::StatusCode::kAborted, where);
      return;
    }
    ExpectCode(lease.status(), absl::StatusCode::kOk, where);
    s->lease.emplace(*std::move(lease));
    s->last_used = clock_.Now();
    s->undo_layer = -1;
    CheckContents(*s, where);
  }

  // The layer a well-behaved model steps next: the first that lags the one
  // before it, else layer 0.
  static int32_t NextLayer(const ModelSession& s) {
    for (size_t l = 1; l < s.layers.size(); ++l) {
      if (s.layers[l].position() != s.layers[l - 1].position()) return static_cast<int32_t>(l);
    }
    return 0;
  }

  // A K or V tensor of `tokens` rows, mostly well formed.
  struct Input {
    TensorView view;
    std::string bytes;
    bool valid = true;
  };
  Input MakeInput(int64_t tokens, int32_t heads, int32_t dim, int defect) {
    Input t;
    t.view.dtype = in_.PickValueInArray({DType::kF32, DType::kF16, DType::kBF16});
    t.view.shape = {tokens, heads, dim};
    switch (defect) {
      case 1: t.view.shape[1] += 1; t.valid = false; break;
      case 2: t.view.shape[2] += 1; t.valid = false; break;
      case 3: t.view.shape.insert(t.view.shape.begin(), 1); break;  // [1, n, H, D] is allowed
      case 4: t.view.shape.insert(t.view.shape.begin(), 2); t.valid = false; break;
      case 5: t.view.dtype = DType::kI32; t.valid = false; break;
      default: break;
    }
    if (tokens < 1) t.valid = false;
    int64_t bytes = std::max<int64_t>(0, CheckedElementCount(t.view.shape)) *
                    int64_t(DTypeSize(t.view.dtype));
    if (defect == 6 && bytes > 0) {
      --bytes;
      t.valid = false;
    }
    t.bytes = in_.ConsumeBytesAsString(static_cast<size_t>(bytes));
    t.bytes.resize(static_cast<size_t>(bytes), '\0');
    t.view.data = t.bytes;
    return t;
  }

  static void AppendConverted(std::string& out, const Input& t, int64_t elements, DType to) {
    const size_t start = out.size();
    out.resize(start + elements * DTypeSize(to));
    for (int64_t e = 0; e < elements; ++e) {
      StoreFloat(out.data() + start, to, e, LoadFloat(t.bytes.data(), t.view.dtype, e));
    }
    if (t.view.dtype == to) std::memcpy(out.data() + start, t.bytes.data(), elements * DTypeSize(to));
  }

  void Append() {
    ModelSession* s = PickLeased();
    if (s == nullptr) return;
    const SessionConfig& c = s->config;
    const int32_t num_layers = c.num_layers;
    // Mostly the layer a model would step next (with the tokens its step
    // needs), else any layer, out of range included.
    const uint8_t mode = in_.ConsumeIntegral<uint8_t>();
    const bool in_order = mode < 192;
    const int32_t layer = in_order ? NextLayer(*s) : static_cast<int32_t>((mode - 192) % (num_layers + 2)) - 1;
    int64_t tokens = in_.ConsumeIntegralInRange<int32_t>(0, kMaxTokensPerAppend);
    if (in_order && layer > 0) {
      const int64_t lag = s->layers[layer - 1].position() - s->layers[layer].position();
      if (lag >= 1 && lag <= kMaxTokensPerAppend) tokens = lag;
    }
    const int key_defect = in_.ConsumeIntegralInRange(0, 15);
    const int value_defect = in_.ConsumeIntegralInRange(0, 15);
    const int64_t value_tokens = in_.ConsumeIntegralInRange(0, 15) == 0 ? tokens + 1 : tokens;
    const Input key = MakeInput(tokens, c.num_kv_heads, c.head_dim, key_defect);
    const Input value = MakeInput(value_tokens, c.num_kv_heads, c.value_dim, value_defect);
    const bool valid = key.valid && value.valid && value_tokens == tokens;
    const std::string where = absl::StrCat("Append(", Name(*s), ", layer ", layer, ", ", tokens,
                                           " tokens", valid ? "" : ", malformed", ")");

    // Documented: INVALID_ARGUMENT for a bad layer or shapes,
    // FAILED_PRECONDITION for a layer out of order (layer l steps after l - 1
    // with the same tokens; layer 0 after the last layer), RESOURCE_EXHAUSTED
    // past max_tokens (what the window keeps counts).
    const int64_t limit = c.max_tokens > 0 ? c.max_tokens : std::numeric_limits<int32_t>::max();
    absl::StatusCode want = absl::StatusCode::kOk;
    if (layer < 0 || layer >= num_layers || !valid) {
      want = absl::StatusCode::kInvalidArgument;
    } else if (num_layers > 1 &&
               (layer == 0 ? s->layers[0].position() != s->layers[num_layers - 1].position()
                           : s->layers[layer].position() + tokens !=
                                 s->layers[layer - 1].position())) {
      want = absl::StatusCode::kFailedPrecondition;
    } else {
      const int64_t grown = s->layers[layer].length + tokens;
      if (grown - WindowBlocksToDrop(*s, grown) * options_.block_tokens > limit) {
        want = absl::StatusCode::kResourceExhausted;
      }
    }
    // CheckAppend: the same verdict without the cache, and no change.
    const absl::StatusOr<int64_t> checked = s->lease->CheckAppend(layer, key.view, value.view);
    ExpectCode(checked.status(), want, absl::StrCat("Check", where));
    if (checked.ok() && *checked != tokens) {
      Fail(absl::StrCat("Check", where, ": ", *checked, " tokens"));
    }
    CheckContents(*s, absl::StrCat("Check", where));

    const absl::Status status = s->lease->Append(layer, key.view, value.view);
    if (want != absl::StatusCode::kOk) {
      ExpectCode(status, want, where);
      Trace(absl::StrCat(where, ": ", status.ToString()));
      CheckContents(*s, where);
      return;
    }
    // The checks passed: the previous Append of the lease is kept (its window's
    // blocks are freed; Rollback has nothing to undo until this one
    // succeeds), then the blocks are allocated, all or none: first a copy of
    // the block the new rows start in when it was ever shared (a Truncate can
    // leave one last), then the new ones.
    ReleaseDetached(*s);
    s->undo_layer = -1;
    ModelLayer& l = s->layers[layer];
    const int64_t bt = options_.block_tokens;
    const int64_t new_length = l.length + tokens;
    const size_t first = static_cast<size_t>(l.length / bt);
    const bool copy_first = first < l.blocks.size() && Block(l.blocks[first]).ever_shared;
    const int64_t grow = CeilDiv(new_length, bt) - static_cast<int64_t>(l.blocks.size());
    const int64_t need = grow + (copy_first ? 1 : 0);
    bool ok = true;
    std::vector<int64_t> fresh;
    std::optional<int64_t> copy;
    if (need > 0 && options_.eviction == EvictionPolicy::kLruIdle &&
        !CouldFit(need * s->block_bytes)) {
      ok = false;  // refused without evicting anybody
    } else {
      if (copy_first) {
        copy = AllocateBlock(s->block_bytes, s);
        ok = copy.has_value();
      }
      for (int64_t i = 0; i < grow && ok; ++i) {
        if (std::optional<int64_t> b = AllocateBlock(s->block_bytes, s)) {
          fresh.push_back(*b);
        } else {
          for (int64_t f : fresh) PoolFree(f);
          if (copy.has_value()) PoolFree(*copy);
          ok = false;
        }
      }
    }
    Trace(absl::StrCat(where, ": ", status.ToString()));
    if (ok != status.ok()) {
      Fail(absl::StrCat(where, ": ", status.ToString(), ", expected ",
                        ok ? "OK" : "RESOURCE_EXHAUSTED", " (", std::max<int64_t>(need, 0),
                        " more blocks of ", s->block_bytes, " bytes; used ", used_, " of ",
                        options_.kv_cache_bytes, ", pinned ", PinnedBytes(), ", ever shared ",
                        EverSharedBytes(), ")"));
    }
    if (!ok) {
      ExpectCode(status, absl::StatusCode::kResourceExhausted, where);
      CheckContents(*s, where);
      return;
    }
    if (copy.has_value()) {
      PoolFree(l.blocks[first]);
      l.blocks[first] = *copy;
    }
    ModelLayer before = l;
    l.blocks.insert(l.blocks.end(), fresh.begin(), fresh.end());
    const int64_t k_elements = tokens * s->k_row();
    if (c.rope.has_value()) {
      // Rotated at positions position() + i, in one call as the store does
      // (DYNAMIC depends on the call's last position).
      std::vector<float> rows(k_elements);
      for (int64_t e = 0; e < k_elements; ++e) rows[e] = LoadFloat(key.bytes.data(), key.view.dtype, e);
      l.raw_keys.insert(l.raw_keys.end(), rows.begin(), rows.end());
      std::vector<int64_t> positions(tokens);
      for (int64_t i = 0; i < tokens; ++i) positions[i] = l.position() + i;
      RotateRope(*c.rope, positions, c.num_kv_heads, c.head_dim, rows.data());
      const size_t start = l.keys.size();
      l.keys.resize(start + tokens * s->key_row_bytes());
      for (int64_t e = 0; e < k_elements; ++e) StoreFloat(l.keys.data() + start, c.dtype, e, rows[e]);
    } else {
      AppendConverted(l.keys, key, k_elements, c.dtype);
    }
    AppendConverted(l.values, value, tokens * s->v_row(), c.dtype);
    l.length = new_length;
    // The window moves past whole blocks between the sinks and its last
    // window_tokens tokens; they leave the view now and are freed when the
    // lease ends or its next Append passes its checks.
    const int64_t drop = WindowBlocksToDrop(*s, l.length);
    if (drop > 0) {
      const auto first = l.blocks.begin() + s->sink_blocks;
      s->detached.assign(first, first + drop);
      l.blocks.erase(first, first + drop);
      const int64_t row0 = SinkRegion(*s), rows = drop * bt;
      l.keys.erase(row0 * s->key_row_bytes(), rows * s->key_row_bytes());
      l.values.erase(row0 * s->value_row_bytes(), rows * s->value_row_bytes());
      if (c.rope.has_value()) {
        l.raw_keys.erase(l.raw_keys.begin() + row0 * s->k_row(),
                         l.raw_keys.begin() + (row0 + rows) * s->k_row());
      }
      l.length -= rows;
      l.dropped += rows;
      // With RoPE the sink keys are rewritten at (position + dropped).
      if (c.rope.has_value()) RotateRows(*s, l, 0, std::min(l.length, SinkRegion(*s)));
      Trace(absl::StrCat("  the window drops ", drop, " blocks"));
    }
    s->undo_layer = layer;
    s->undo_before = std::move(before);
    CheckContents(*s, where);
  }

  // Frees the blocks the lease's last Append's window moved past.
  void ReleaseDetached(ModelSession& s) {
    for (int64_t b : s.detached) PoolFree(b);
    window_freed_ += static_cast<int64_t>(s.detached.size());
    s.detached.clear();
  }

  void Rollback() {
    ModelSession* s = PickLeased();
    if (s == nullptr) return;
    const std::string where = absl::StrCat("Rollback(", Name(*s), ", layer ", s->undo_layer, ")");
    Trace(where);
    s->lease->Rollback();
    if (s->undo_layer < 0) {
      CheckContents(*s, where);  // nothing to undo
      return;
    }
    ModelLayer& l = s->layers[s->undo_layer];
    // The blocks the Append took (in the layer or past its window) go back.
    const std::set<int64_t> kept(s->undo_before.blocks.begin(), s->undo_before.blocks.end());
    for (int64_t b : l.blocks) {
      if (!kept.count(b)) PoolFree(b);
    }
    for (int64_t b : s->detached) {
      if (!kept.count(b)) PoolFree(b);
    }
    s->detached.clear();
    l = std::move(s->undo_before);
    s->undo_before = ModelLayer();
    s->undo_layer = -1;
    CheckContents(*s, where);
  }

  void Truncate() {
    ModelSession* s = PickLeased();
    if (s == nullptr) return;
    const int32_t layer = static_cast<int32_t>(Pick(s->layers.size()));
    const uint8_t raw = in_.ConsumeIntegral<uint8_t>();
    ModelLayer& l = s->layers[layer];
    // Documented: not for windowed sessions whose window moved.
    if (l.dropped > 0) return;
    const int64_t length = static_cast<int64_t>(raw % (l.length + 3)) - 1;
    const std::string where = absl::StrCat("Truncate(", Name(*s), ", layer ", layer, ", ", length,
                                           " of ", l.length, ")");
    Trace(where);
    s->lease->Truncate(layer, length);
    if (length >= 0 && length < l.length) {
      l.length = length;
      l.keys.resize(length * s->key_row_bytes());
      l.values.resize(length * s->value_row_bytes());
      if (s->config.rope.has_value()) l.raw_keys.resize(length * s->k_row());
      // A session keeps one block per layer, even when empty.
      const size_t keep = std::max<int64_t>(1, CeilDiv(length, options_.block_tokens));
      while (l.blocks.size() > keep) {
        PoolFree(l.blocks.back());
        l.blocks.pop_back();
      }
      s->undo_layer = -1;  // nothing to roll back past a truncation
    }
    CheckContents(*s, where);
  }

  // The lease ends: the last Append's window blocks are freed, the session
  // is idle from now, and a closed one is released.
  void EndLease(ModelSession& s) {
    s.lease.reset();
    ReleaseDetached(s);
    s.last_used = clock_.Now();
    s.undo_layer = -1;
    s.undo_before = ModelLayer();
    if (s.closed) ReleaseSession(s);
  }

  void Release() {
    Tick();
    ModelSession* s = PickLeased();
    if (s == nullptr) return;
    Trace(absl::StrCat("Release(", Name(*s), ")"));
    EndLease(*s);
  }

  void Close() {
    ModelSession* s = PickSession();
    const std::string& owner = PickOwner();
    const absl::Status status = store_->Close(s != nullptr ? s->id : "not-a-session-id", owner);
    const std::string where =
        absl::StrCat("Close(", s != nullptr ? Name(*s) : "unknown", ", ", owner, ")");
    Trace(absl::StrCat(where, ": ", status.ToString()));
    if (s == nullptr || owner != kOwner || !s->in_table()) {
      ExpectCode(status, absl::StatusCode::kNotFound, where);
      return;
    }
    ExpectCode(status, absl::StatusCode::kOk, where);
    s->closed = true;
    ++closed_;
    if (!s->pinned()) ReleaseSession(*s);  // else when its lease ends
  }

  void Fork() {
    Tick();
    ModelSession* s = PickSession();
    const std::string& owner = PickOwner();
    const int64_t shortest = s != nullptr ? s->shortest() : 0;
    const int64_t tokens = static_cast<int64_t>(Pick(shortest + 3)) - 1;  // [-1, shortest + 1]
    auto forked = store_->Fork(s != nullptr ? s->id : "00112233445566778899aabbccddeeff", tokens,
                               owner);
    const std::string where = absl::StrCat("Fork(", s != nullptr ? Name(*s) : "unknown", ", ",
                                           tokens, " of ", shortest, ", ", owner, ")");
    Trace(absl::StrCat(where, ": ", forked.status().ToString()));
    if (s == nullptr || owner != kOwner || !s->in_table()) {
      ExpectCode(forked.status(), absl::StatusCode::kNotFound, where);
      return;
    }
    if (s->pinned()) {
      ExpectCode(forked.status(), absl::StatusCode::kAborted, where);
      return;
    }
    // The fork pins the parent for its duration: it is used now.
    s->last_used = clock_.Now();
    if (s->windowed()) {
      ExpectCode(forked.status(), absl::StatusCode::kFailedPrecondition, where);
      return;
    }
    if (tokens < 1) {
      ExpectCode(forked.status(), absl::StatusCode::kInvalidArgument, where);
      return;
    }
    if (tokens > shortest) {
      ExpectCode(forked.status(), absl::StatusCode::kFailedPrecondition, where);
      return;
    }
    // Full blocks shared, the partial block copied (evicting under lru_idle),
    // max_sessions as for CreateSession.
    s->forking = true;
    bool ok = true;
    if (TableSize() >= options_.max_sessions &&
        !(options_.eviction == EvictionPolicy::kLruIdle && EvictOne(s))) {
      ok = false;
    }
    auto child = std::make_unique<ModelSession>();
    child->config = s->config;
    child->block_bytes = s->block_bytes;
    const int64_t bt = options_.block_tokens;
    const int64_t full = tokens / bt, rest = tokens % bt;
    if (ok) {
      child->layers.resize(s->layers.size());
      for (size_t li = 0; li < s->layers.size() && ok; ++li) {
        const ModelLayer& from = s->layers[li];
        ModelLayer& to = child->layers[li];
        for (int64_t b = 0; b < full; ++b) {
          PoolShare(from.blocks[b]);
          to.blocks.push_back(from.blocks[b]);
        }
        if (rest > 0) {
          if (std::optional<int64_t> copy = AllocateBlock(s->block_bytes, nullptr)) {
            to.blocks.push_back(*copy);
          } else {
            ReleaseSession(*child);
            ok = false;
            break;
          }
        }
        to.length = tokens;
        to.keys = from.keys.substr(0, tokens * s->key_row_bytes());
        to.values = from.values.substr(0, tokens * s->value_row_bytes());
        if (s->config.rope.has_value()) {
          to.raw_keys.assign(from.raw_keys.begin(), from.raw_keys.begin() + tokens * s->k_row());
        }
      }
    }
    s->forking = false;
    if (ok != forked.ok()) {
      Fail(absl::StrCat(where, ": ", forked.status().ToString(), ", expected ",
                        ok ? "OK" : "RESOURCE_EXHAUSTED", " (used ", used_, " of ",
                        options_.kv_cache_bytes, ", sessions ", TableSize(), ")"));
    }
    if (!ok) {
      ExpectCode(forked.status(), absl::StatusCode::kResourceExhausted, where);
      return;
    }
    if (forked->shared_tokens != full * bt) {
      Fail(absl::StrCat(where, ": shared_tokens ", forked->shared_tokens, ", expected ", full * bt));
    }
    ++forks_;
    AddSession(std::move(child), forked->session_id);
    ModelSession& c = *sessions_.back();
    Trace(absl::StrCat("  child ", Name(c)));
    // Parent and child were both last used now: touch the child a moment
    // later (reading its cache) so that an eviction never has to choose
    // between two sessions used at one instant.
    Tick();
    auto lease = store_->Acquire(c.id, kOwner);
    ExpectCode(lease.status(), absl::StatusCode::kOk, absl::StrCat("Acquire(", Name(c), ")"));
    c.lease.emplace(*std::move(lease));
    c.last_used = clock_.Now();
    CheckContents(c, where);
    EndLease(c);
  }

  void AdvanceClock() {
    const int64_t limit = absl::ToInt64Seconds(options_.idle_timeout) * 2;
    if (in_.ConsumeBool()) {
      // To a session's last use plus a whole number of seconds: reaches
      // idle_timeout exactly.
      ModelSession* s = PickSession();
      const int64_t seconds = in_.ConsumeIntegralInRange<int64_t>(0, limit);
      if (s == nullptr) return;
      const absl::Time target = s->last_used + absl::Seconds(seconds);
      if (target > clock_.Now()) clock_.Advance(target - clock_.Now());
    } else {
      clock_.Advance(absl::Seconds(in_.ConsumeIntegralInRange<int64_t>(0, limit)));
    }
  }

  void ExpireIdle() {
    // Documented: sessions idle for longer than idle_timeout are closed; a
    // leased one is not idle.
    const absl::Time now = clock_.Now();
    std::vector<ModelSession*> idle;
    for (auto& s : sessions_) {
      if (s->in_table() && !s->pinned() && now - s->last_used > options_.idle_timeout) {
        idle.push_back(s.get());
      }
    }
    const int64_t n = store_->ExpireIdle();
    Trace(absl::StrCat("ExpireIdle: ", n));
    if (n != static_cast<int64_t>(idle.size())) {
      Fail(absl::StrCat("ExpireIdle expired ", n, " sessions, expected ", idle.size()));
    }
    for (ModelSession* s : idle) {
      ReleaseSession(*s);
      s->lost = true;
    }
    expirations_ += n;
  }

  // Every layer of the session, through its lease, against the model's copy.
  void CheckContents(const ModelSession& s, const std::string& where) {
    const SessionLease& lease = *s.lease;
    if (lease.config().num_layers != s.config.num_layers) {
      Fail(absl::StrCat(where, ": num_layers ", lease.config().num_layers));
    }
    for (int32_t li = 0; li < s.config.num_layers; ++li) {
      const ModelLayer& l = s.layers[li];
      if (lease.length(li) != l.length || lease.dropped(li) != l.dropped ||
          lease.position(li) != l.position()) {
        Fail(absl::StrCat(where, ": layer ", li, " of ", Name(s), " has length ", lease.length(li),
                          ", dropped ", lease.dropped(li), ", position ", lease.position(li),
                          "; expected ", l.length, ", ", l.dropped, ", ", l.position()));
      }
      const PagedKvView v = lease.View(li);
      if (v.length != l.length || v.dtype != s.config.dtype ||
          v.num_kv_heads != s.config.num_kv_heads || v.head_dim != s.config.head_dim ||
          v.value_dim != s.config.value_dim || v.block_tokens != options_.block_tokens) {
        Fail(absl::StrCat(where, ": the paged view of layer ", li,
                          " disagrees with the session's config"));
      }
      // Blocks: the same address wherever the model shares one, distinct
      // addresses for distinct live blocks.
      const int64_t shown = CeilDiv(l.length, v.block_tokens);
      for (int64_t b = 0; b < shown; ++b) {
        ModelBlock& mb = Block(l.blocks[b]);
        const void* address = v.blocks[b];
        if (mb.address == nullptr) {
          auto [it, inserted] = addresses_.emplace(address, l.blocks[b]);
          if (!inserted) {
            Fail(absl::StrCat(where, ": block ", b, " of layer ", li, " of ", Name(s),
                              " is at the address of another live block"));
          }
          mb.address = address;
        } else if (mb.address != address) {
          Fail(absl::StrCat(where, ": block ", b, " of layer ", li, " of ", Name(s),
                            mb.refs > 1 ? " is shared but not the same block in every session"
                                        : " moved"));
        }
      }
      const int64_t k_row = s.key_row_bytes(), v_row = s.value_row_bytes();
      const int64_t v_offset = int64_t{v.block_tokens} * k_row;
      for (int64_t t = 0; t < l.length; ++t) {
        const char* block = static_cast<const char*>(v.blocks[t / v.block_tokens]);
        const int64_t row = t % v.block_tokens;
        if (std::memcmp(block + row * k_row, l.keys.data() + t * k_row, k_row) != 0) {
          Fail(absl::StrCat(where, ": the key of token ", t, " of layer ", li, " of ", Name(s),
                            " is not what was appended", s.config.rope ? " (rotated)" : ""));
        }
        if (std::memcmp(block + v_offset + row * v_row, l.values.data() + t * v_row, v_row) != 0) {
          Fail(absl::StrCat(where, ": the value of token ", t, " of layer ", li, " of ", Name(s),
                            " is not what was appended"));
        }
      }
    }
  }

  void CheckStats() {
    const SessionStats st = store_->stats();
    int64_t shared_blocks = 0, shared_bytes = 0;
    for (const auto& [id, b] : blocks_) {
      if (b.refs >= 2) {
        ++shared_blocks;
        shared_bytes += b.bytes;
      }
    }
    const SessionStats want{
        .sessions_active = TableSize(),
        .used_bytes = used_,
        .pinned_bytes = std::min(PinnedBytes(), used_),
        .shared_bytes = shared_bytes,
        .shared_blocks = shared_blocks,
        .capacity_bytes = options_.kv_cache_bytes,
        .evictions_total = evictions_,
        .expirations_total = expirations_,
        .window_blocks_freed_total = window_freed_,
        .forks_total = forks_,
    };
    const auto line = [](const SessionStats& x) {
      return absl::StrCat("sessions ", x.sessions_active, ", used ", x.used_bytes, ", pinned ",
                          x.pinned_bytes, ", shared ", x.shared_bytes, " in ", x.shared_blocks,
                          " blocks, capacity ", x.capacity_bytes, ", evictions ",
                          x.evictions_total, ", expirations ", x.expirations_total,
                          ", window blocks freed ", x.window_blocks_freed_total, ", forks ",
                          x.forks_total);
    };
    if (line(st) != line(want)) {
      Fail(absl::StrCat("stats: ", line(st), "; expected ", line(want)));
    }
    // Every session leaves by Close, eviction or expiry, and is counted once.
    if (st.sessions_active != created_ - closed_ - st.evictions_total - st.expirations_total ||
        st.used_bytes > st.capacity_bytes || st.pinned_bytes > st.used_bytes ||
        st.shared_bytes > st.used_bytes) {
      Fail(absl::StrCat("stats: inconsistent: ", line(st), " after ", created_, " created and ",
                        closed_, " closed"));
    }
  }

  FuzzedDataProvider& in_;
  FakeClock clock_;
  SessionStoreOptions options_;
  std::unique_ptr<SessionStore> store_;
  // Declared after the store: leases end first.
  std::vector<std::unique_ptr<ModelSession>> sessions_;
  // The model's pool.
  std::map<int64_t, ModelBlock> blocks_;
  std::map<const void*, int64_t> addresses_;  // of live blocks a view has shown
  int64_t next_block_ = 1;
  int64_t used_ = 0;
  int64_t created_ = 0;  // sessions created or forked
  int64_t closed_ = 0;   // Close answered OK
  int64_t evictions_ = 0;
  int64_t expirations_ = 0;
  int64_t forks_ = 0;
  int64_t window_freed_ = 0;
};

}  // namespace
}  // namespace attnserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  attnserve::SessionsFuzz(in).Run();
  return 0;
}
