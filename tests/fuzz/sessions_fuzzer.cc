// Fuzz target for SessionStore (the KV cache behind sessions): the input is a
// store configuration followed by a sequence of operations (create, acquire,
// append, truncate, release, close, advance the clock, expire), decoded with
// FuzzedDataProvider. A model of the store predicts each result from the
// documented behaviour; any crash, sanitizer report or disagreement aborts.
//
// Evictions pick among equally idle sessions in hash order, so the model does
// not know which session an eviction took until it next touches it (NOT_FOUND);
// it counts such losses and is exact again once every loss is accounted for.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
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

void ExpectCode(const absl::Status& status, std::initializer_list<absl::StatusCode> allowed,
                const std::string& where) {
  for (absl::StatusCode code : allowed) {
    if (status.code() == code) return;
  }
  Fail(absl::StrCat(where, ": unexpected ", status.ToString()));
}

bool IsInputDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// What the model knows about one session it created.
struct ModelSession {
  std::string id;
  SessionConfig config;  // value_dim resolved
  int64_t block_bytes = 0;
  int64_t length = 0;
  std::string keys;    // expected K rows in the cache dtype, `length` of them
  std::string values;  // expected V rows
  absl::Time last_used;
  bool closed = false;  // Close answered OK
  bool lost = false;    // evicted or expired, and the model knows it
  std::optional<SessionLease> lease;

  int64_t key_row_bytes() const {
    return int64_t{config.num_kv_heads} * config.head_dim * int64_t(DTypeSize(config.dtype));
  }
  int64_t value_row_bytes() const {
    return int64_t{config.num_kv_heads} * config.value_dim * int64_t(DTypeSize(config.dtype));
  }
};

class SessionsFuzz {
 public:
  explicit SessionsFuzz(FuzzedDataProvider& in) : in_(in) {}

  void Run() {
    if (!CreateStore()) return;
    for (int op = 0; op < kMaxOps && in_.remaining_bytes() > 0; ++op) {
      switch (in_.ConsumeIntegralInRange<int>(0, 8)) {
        case 0: CreateSession(); break;
        case 1: Acquire(); break;
        case 2: case 3: Append(); break;
        case 4: Truncate(); break;
        case 5: Release(); break;
        case 6: Close(); break;
        case 7: AdvanceClock(); break;
        case 8: ExpireIdle(); break;
      }
      CheckStats();
    }
    // Leases end before the store does (the store's documented contract).
    for (auto& s : sessions_) s->lease.reset();
    CheckStats();
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
      ExpectCode(store.status(), {absl::StatusCode::kInvalidArgument}, "Create(invalid options)");
      return false;
    }
    if (!store.ok()) Fail(absl::StrCat("Create(valid options): ", store.status().ToString()));
    store_ = *std::move(store);
    options_ = o;
    return true;
  }

  // An index into sessions_, or nullptr for an id the store never issued.
  ModelSession* PickSession() {
    const size_t i = in_.ConsumeIntegralInRange<size_t>(0, sessions_.size());
    return i < sessions_.size() ? sessions_[i].get() : nullptr;
  }
  const std::string& PickOwner() { return in_.ConsumeIntegralInRange(0, 7) == 0 ? kStranger : kOwner; }

  int64_t Losses() const {
    const SessionStats st = store_->stats();
    return st.evictions_total + st.expirations_total;
  }
  // Evictions or expirations the model has not yet tied to a session.
  int64_t UnattributedLosses() const { return Losses() - attributed_losses_; }

  void MarkLost(ModelSession& s, const char* how) {
    if (UnattributedLosses() <= 0) {
      Fail(absl::StrCat(how, ": session ", s.id, " is gone but the store reports no eviction or "
                        "expiry that could explain it"));
    }
    s.lost = true;
    ++attributed_losses_;
  }

  static int64_t Blocks(const ModelSession& s, int32_t block_tokens) {
    return std::max<int64_t>(1, (s.length + block_tokens - 1) / block_tokens);
  }
  // Whether the session still holds pool memory, as far as the model knows.
  static bool HoldsMemory(const ModelSession& s) { return !s.lost && (!s.closed || s.lease); }

  // Bytes no eviction can free: every leased session's blocks.
  int64_t PinnedBytes() const {
    int64_t bytes = 0;
    for (const auto& s : sessions_) {
      if (s->lease) bytes += Blocks(*s, options_.block_tokens) * s->block_bytes;
    }
    return bytes;
  }
  int64_t PinnedOpenSessions() const {
    int64_t n = 0;
    for (const auto& s : sessions_) n += s->lease && !s->closed;
    return n;
  }

  void CreateSession() {
    SessionConfig c;
    c.num_kv_heads = in_.ConsumeIntegralInRange<int32_t>(-1, 4);
    const int32_t head_dim = in_.ConsumeIntegralInRange<int32_t>(-1, 9);
    c.head_dim = head_dim == 9 ? 1025 : head_dim;
    const int32_t value_dim = in_.ConsumeIntegralInRange<int32_t>(-1, 9);
    c.value_dim = value_dim == 9 ? 1025 : value_dim;
    c.dtype = in_.PickValueInArray({DType::kF32, DType::kF16, DType::kBF16, DType::kI32});
    const int64_t max_tokens = in_.ConsumeIntegralInRange<int64_t>(-1, 41);
    c.max_tokens = max_tokens == 41 ? int64_t{1} << 31 : max_tokens;

    SessionConfig resolved = c;
    if (resolved.value_dim == 0) resolved.value_dim = resolved.head_dim;
    const auto in_range = [](int64_t x) { return x >= 1 && x <= 1024; };
    const bool valid = in_range(resolved.num_kv_heads) && in_range(resolved.head_dim) &&
                       in_range(resolved.value_dim) && IsInputDType(c.dtype) &&
                       c.max_tokens >= 0 && c.max_tokens <= std::numeric_limits<int32_t>::max();
    const SessionStats before = store_->stats();
    auto created = store_->CreateSession(c, kOwner);
    if (!valid) {
      ExpectCode(created.status(), {absl::StatusCode::kInvalidArgument}, "CreateSession(invalid)");
      return;
    }
    auto s = std::make_unique<ModelSession>();
    s->config = resolved;
    s->block_bytes = std::max<int64_t>(
        options_.min_block_bytes, int64_t{options_.block_tokens} * resolved.num_kv_heads *
                                      (resolved.head_dim + resolved.value_dim) *
                                      int64_t(DTypeSize(c.dtype)));
    // Documented: a session starts with one block; a full cache refuses it
    // (after evicting idle sessions under lru_idle), as does max_sessions.
    const bool at_max = before.sessions_active >= options_.max_sessions;
    std::optional<bool> want_ok;
    if (options_.eviction == EvictionPolicy::kReject) {
      want_ok = !at_max && before.used_bytes + s->block_bytes <= options_.kv_cache_bytes;
    } else if (PinnedBytes() + s->block_bytes > options_.kv_cache_bytes) {
      want_ok = false;
    } else if (!at_max) {
      want_ok = true;
    } else if (before.sessions_active == PinnedOpenSessions()) {
      want_ok = false;  // at max_sessions with nothing idle to evict
    }
    if (!created.ok()) {
      ExpectCode(created.status(), {absl::StatusCode::kResourceExhausted}, "CreateSession(valid)");
    }
    if (want_ok.has_value() && *want_ok != created.ok()) {
      Fail(absl::StrCat("CreateSession: ", created.ok() ? "OK" : created.status().ToString(),
                        ", expected ", *want_ok ? "OK" : "RESOURCE_EXHAUSTED", " (used ",
                        before.used_bytes, " of ", options_.kv_cache_bytes, ", block ",
                        s->block_bytes, ", pinned ", PinnedBytes(), ", sessions ",
                        before.sessions_active, " of ", options_.max_sessions, ")"));
    }
    if (!created.ok()) return;
    if (created->capacity_tokens < (c.max_tokens > 0 ? c.max_tokens : options_.block_tokens) ||
        (c.max_tokens > 0 && created->capacity_tokens != c.max_tokens)) {
      Fail(absl::StrCat("CreateSession: capacity_tokens ", created->capacity_tokens));
    }
    for (const auto& other : sessions_) {
      if (other->id == created->session_id) Fail("CreateSession: a session id was issued twice");
    }
    s->id = created->session_id;
    s->last_used = clock_.Now();
    sessions_.push_back(std::move(s));
    ++created_;
  }

  void Acquire() {
    ModelSession* s = PickSession();
    const std::string& owner = PickOwner();
    auto lease = store_->Acquire(s != nullptr ? s->id : "00112233445566778899aabbccddeeff", owner);
    if (s == nullptr || owner != kOwner || s->closed || s->lost) {
      ExpectCode(lease.status(), {absl::StatusCode::kNotFound}, "Acquire(unknown, foreign or gone)");
      return;
    }
    if (s->lease) {  // a pinned session is never evicted or expired
      ExpectCode(lease.status(), {absl::StatusCode::kAborted}, "Acquire(leased)");
      return;
    }
    if (!lease.ok()) {
      ExpectCode(lease.status(), {absl::StatusCode::kNotFound}, "Acquire");
      MarkLost(*s, "Acquire");
      return;
    }
    s->lease.emplace(*std::move(lease));
    s->last_used = clock_.Now();
    CheckContents(*s, "Acquire");
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
    const int64_t tokens = in_.ConsumeIntegralInRange<int32_t>(0, kMaxTokensPerAppend);
    const int key_defect = in_.ConsumeIntegralInRange(0, 15);
    const int value_defect = in_.ConsumeIntegralInRange(0, 15);
    const int64_t value_tokens = in_.ConsumeIntegralInRange(0, 15) == 0 ? tokens + 1 : tokens;
    const Input key = MakeInput(tokens, c.num_kv_heads, c.head_dim, key_defect);
    const Input value = MakeInput(value_tokens, c.num_kv_heads, c.value_dim, value_defect);
    const bool valid = key.valid && value.valid && value_tokens == tokens;

    // CheckAppend: Append's checks without the cache, so the same verdict on
    // shapes and max_tokens, and no change.
    const int64_t limit = c.max_tokens > 0 ? c.max_tokens : std::numeric_limits<int32_t>::max();
    const absl::StatusOr<int64_t> checked = s->lease->CheckAppend(0, key.view, value.view);
    const bool want_checked = valid && s->length + tokens <= limit;
    if (!valid) {
      ExpectCode(checked.status(), {absl::StatusCode::kInvalidArgument}, "CheckAppend(invalid)");
    } else if (!want_checked) {
      ExpectCode(checked.status(), {absl::StatusCode::kResourceExhausted}, "CheckAppend(too long)");
    } else if (!checked.ok() || *checked != tokens) {
      Fail(absl::StrCat("CheckAppend(", tokens, " tokens): ",
                        checked.ok() ? absl::StrCat(*checked) : checked.status().ToString()));
    }
    CheckContents(*s, "CheckAppend");

    const SessionStats before = store_->stats();
    const absl::Status status = s->lease->Append(0, key.view, value.view);
    const SessionStats after = store_->stats();
    const std::string where = absl::StrCat("Append(", tokens, " tokens to ", s->length, ")");
    if (!valid) {
      ExpectCode(status, {absl::StatusCode::kInvalidArgument}, where);
    } else {
      // Documented: RESOURCE_EXHAUSTED past max_tokens, or when the blocks do
      // not fit (after evicting every idle session under lru_idle).
      const int64_t new_length = s->length + tokens;
      const int64_t need_bytes =
          std::max<int64_t>(0, (new_length + options_.block_tokens - 1) / options_.block_tokens -
                                   Blocks(*s, options_.block_tokens)) *
          s->block_bytes;
      const int64_t in_use = options_.eviction == EvictionPolicy::kReject ? before.used_bytes
                                                                          : PinnedBytes();
      const bool want_ok = new_length <= limit && in_use + need_bytes <= options_.kv_cache_bytes;
      if (!status.ok()) ExpectCode(status, {absl::StatusCode::kResourceExhausted}, where);
      if (want_ok != status.ok()) {
        Fail(absl::StrCat(where, ": ", status.ToString(), ", expected ",
                          want_ok ? "OK" : "RESOURCE_EXHAUSTED", " (limit ", limit, ", ",
                          need_bytes, " more bytes, ", in_use, " of ", options_.kv_cache_bytes,
                          " in use or pinned)"));
      }
      // An append that cannot fit must not evict anybody on its way to failing.
      if (!status.ok() && after.evictions_total != before.evictions_total) {
        Fail(absl::StrCat(where, ": failed with ", status.ToString(), " after evicting ",
                          after.evictions_total - before.evictions_total, " idle sessions"));
      }
    }
    if (status.ok()) {
      AppendConverted(s->keys, key, tokens * c.num_kv_heads * c.head_dim, c.dtype);
      AppendConverted(s->values, value, tokens * c.num_kv_heads * c.value_dim, c.dtype);
      s->length += tokens;
    }
    CheckContents(*s, where.c_str());
  }

  ModelSession* PickLeased() {
    std::vector<ModelSession*> leased;
    for (auto& s : sessions_) {
      if (s->lease) leased.push_back(s.get());
    }
    if (leased.empty()) return nullptr;
    return leased[in_.ConsumeIntegralInRange<size_t>(0, leased.size() - 1)];
  }

  void Truncate() {
    ModelSession* s = PickLeased();
    if (s == nullptr) return;
    const int64_t length = in_.ConsumeIntegralInRange<int64_t>(-1, s->length + 1);
    s->lease->Truncate(0, length);
    if (length >= 0 && length < s->length) {
      s->length = length;
      s->keys.resize(length * s->key_row_bytes());
      s->values.resize(length * s->value_row_bytes());
    }
    CheckContents(*s, "Truncate");
  }

  void Release() {
    ModelSession* s = PickLeased();
    if (s == nullptr) return;
    s->lease.reset();
    s->last_used = clock_.Now();
  }

  void Close() {
    ModelSession* s = PickSession();
    const std::string& owner = PickOwner();
    const absl::Status status =
        store_->Close(s != nullptr ? s->id : "not-a-session-id", owner);
    if (s == nullptr || owner != kOwner || s->closed || s->lost) {
      ExpectCode(status, {absl::StatusCode::kNotFound}, "Close(unknown, foreign or gone)");
      return;
    }
    if (status.ok()) {
      s->closed = true;
      ++closed_;
      return;
    }
    ExpectCode(status, {absl::StatusCode::kNotFound}, "Close");
    if (s->lease) Fail("Close: a leased session was gone");
    MarkLost(*s, "Close");
  }

  void AdvanceClock() {
    const int64_t limit = absl::ToInt64Seconds(options_.idle_timeout) * 2;
    clock_.Advance(absl::Seconds(in_.ConsumeIntegralInRange<int64_t>(0, limit)));
  }

  void ExpireIdle() {
    // Documented: sessions idle for longer than idle_timeout are closed; a
    // leased one is not idle.
    const absl::Time now = clock_.Now();
    std::vector<ModelSession*> idle;
    for (auto& s : sessions_) {
      if (!s->closed && !s->lost && !s->lease && now - s->last_used > options_.idle_timeout) {
        idle.push_back(s.get());
      }
    }
    const SessionStats before = store_->stats();
    const int64_t unattributed = UnattributedLosses();
    const int64_t n = store_->ExpireIdle();
    const SessionStats after = store_->stats();
    if (after.expirations_total != before.expirations_total + n) {
      Fail(absl::StrCat("ExpireIdle returned ", n, " but expirations_total went from ",
                        before.expirations_total, " to ", after.expirations_total));
    }
    // Each idle session expired now, unless an unattributed eviction took it earlier.
    const int64_t expected = static_cast<int64_t>(idle.size());
    if (n > expected || n < expected - unattributed) {
      Fail(absl::StrCat("ExpireIdle expired ", n, " sessions; the model has ", expected,
                        " idle past the timeout and ", unattributed, " unexplained losses"));
    }
    for (ModelSession* s : idle) s->lost = true;
    attributed_losses_ += expected;
  }

  // The session's cache, through its lease, against the model's copy.
  void CheckContents(const ModelSession& s, const char* where) {
    if (s.lease->length() != s.length) {
      Fail(absl::StrCat(where, ": length ", s.lease->length(), ", expected ", s.length));
    }
    const PagedKvView v = s.lease->View();
    if (v.length != s.length || v.dtype != s.config.dtype || v.num_kv_heads != s.config.num_kv_heads ||
        v.head_dim != s.config.head_dim || v.value_dim != s.config.value_dim ||
        v.block_tokens != options_.block_tokens) {
      Fail(absl::StrCat(where, ": the paged view disagrees with the session's config"));
    }
    const int64_t k_row = s.key_row_bytes(), v_row = s.value_row_bytes();
    const int64_t v_offset = int64_t{v.block_tokens} * k_row;
    for (int64_t t = 0; t < s.length; ++t) {
      const char* block = static_cast<const char*>(v.blocks[t / v.block_tokens]);
      const int64_t row = t % v.block_tokens;
      if (std::memcmp(block + row * k_row, s.keys.data() + t * k_row, k_row) != 0 ||
          std::memcmp(block + v_offset + row * v_row, s.values.data() + t * v_row, v_row) != 0) {
        Fail(absl::StrCat(where, ": token ", t, " of session ", s.id, " changed in the cache"));
      }
    }
  }

  void CheckStats() {
    const SessionStats st = store_->stats();
    if (st.capacity_bytes != options_.kv_cache_bytes || st.used_bytes < 0 ||
        st.used_bytes > st.capacity_bytes) {
      Fail(absl::StrCat("stats: used ", st.used_bytes, " of ", st.capacity_bytes, " bytes"));
    }
    if (st.sessions_active > options_.max_sessions) {
      Fail(absl::StrCat("stats: ", st.sessions_active, " sessions, max ", options_.max_sessions));
    }
    if (st.pinned_bytes != PinnedBytes() || st.pinned_bytes > st.used_bytes) {
      Fail(absl::StrCat("stats: pinned_bytes ", st.pinned_bytes, " of used ", st.used_bytes,
                        ", the model's leased sessions hold ", PinnedBytes()));
    }
    // Every session leaves by Close, eviction or expiry, and is counted once.
    const int64_t losses = st.evictions_total + st.expirations_total;
    if (st.sessions_active != created_ - closed_ - losses || attributed_losses_ > losses) {
      Fail(absl::StrCat("stats: ", st.sessions_active, " sessions active after ", created_,
                        " created, ", closed_, " closed, ", losses, " evicted or expired (",
                        attributed_losses_, " seen)"));
    }
    int64_t model_bytes = 0;
    for (const auto& s : sessions_) {
      if (HoldsMemory(*s)) model_bytes += Blocks(*s, options_.block_tokens) * s->block_bytes;
    }
    // Exact while the model knows every loss; a bound otherwise.
    if (losses == attributed_losses_ ? st.used_bytes != model_bytes : st.used_bytes > model_bytes) {
      Fail(absl::StrCat("stats: used_bytes ", st.used_bytes, ", the model's sessions hold ",
                        model_bytes, " (", losses - attributed_losses_, " unexplained losses)"));
    }
  }

  FuzzedDataProvider& in_;
  FakeClock clock_;
  SessionStoreOptions options_;
  std::unique_ptr<SessionStore> store_;
  // Declared after the store: leases end first.
  std::vector<std::unique_ptr<ModelSession>> sessions_;
  int64_t created_ = 0;
  int64_t closed_ = 0;             // Close answered OK
  int64_t attributed_losses_ = 0;  // evictions and expirations tied to a session
};

}  // namespace
}  // namespace attnserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  attnserve::SessionsFuzz(in).Run();
  return 0;
}
