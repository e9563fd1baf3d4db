// BlockPool bounds, SessionStore lifecycle (ownership, expiry, eviction), and
// paged decode over a session equal to stateless attention over the same K/V.
#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attention/job.h"
#include "attention/reference.h"
#include "core/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvcache/block_pool.h"
#include "kvcache/session_store.h"
#include "scheduler/fake_clock.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

TEST(BlockPoolTest, NeverPassesItsBound) {
  BlockPool pool(1000);
  std::vector<void*> blocks;
  for (int i = 0; i < 4; ++i) {
    auto b = pool.Allocate(250);
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(*b) % 64, 0u);
    blocks.push_back(*b);
  }
  auto full = pool.Allocate(1);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("--kv_cache_bytes=1000"));
  pool.Free(blocks.back(), 250);
  blocks.pop_back();
  EXPECT_EQ(pool.used_bytes(), 750);
  EXPECT_EQ(pool.cached_bytes(), 250);
  // A different size reclaims the cached block rather than passing the bound.
  auto other = pool.Allocate(200);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(pool.used_bytes() + pool.cached_bytes(), 950);
  pool.Free(*other, 200);
  for (void* b : blocks) pool.Free(b, 250);
}

std::string RandomBytes(int64_t n_floats, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::string s(n_floats * 4, '\0');
  for (int64_t i = 0; i < n_floats; ++i) {
    const float x = dist(rng);
    std::memcpy(&s[i * 4], &x, 4);
  }
  return s;
}

class SessionStoreTest : public ::testing::Test {
 protected:
  std::unique_ptr<SessionStore> MakeStore(int64_t bytes, EvictionPolicy policy,
                                          int32_t block_tokens = 4) {
    SessionStoreOptions o;
    o.kv_cache_bytes = bytes;
    o.block_tokens = block_tokens;
    o.eviction = policy;
    o.idle_timeout = absl::Seconds(60);
    o.min_block_bytes = 0;  // the tests count exact block bytes
    auto s = SessionStore::Create(o, &clock_);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  FakeClock clock_;
};

SessionConfig Config(int hkv = 2, int d = 8, DType dtype = DType::kF32) {
  SessionConfig c;
  c.num_kv_heads = hkv;
  c.head_dim = d;
  c.dtype = dtype;
  return c;
}

// Appends n tokens of random K/V (F32) to a session.
absl::Status AppendTokens(SessionLease& lease, int64_t n, uint32_t seed) {
  const SessionConfig& c = lease.config();
  std::string k = RandomBytes(n * c.num_kv_heads * c.head_dim, seed);
  std::string v = RandomBytes(n * c.num_kv_heads * c.value_dim, seed + 1);
  return lease.Append(0, TensorView{DType::kF32, {n, c.num_kv_heads, c.head_dim}, k},
                      TensorView{DType::kF32, {n, c.num_kv_heads, c.value_dim}, v});
}

TEST_F(SessionStoreTest, IdsAreRandomAndBoundToTheirOwner) {
  auto store = MakeStore(1 << 20, EvictionPolicy::kReject);
  auto a = store->CreateSession(Config(), "alice");
  auto b = store->CreateSession(Config(), "alice");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->session_id.size(), 32u);  // 128 bits, hex
  EXPECT_NE(a->session_id, b->session_id);
  EXPECT_EQ(store->Acquire(a->session_id, "mallory").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->Close(a->session_id, "mallory").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->Acquire(a->session_id, "alice").ok());
  EXPECT_EQ(store->Acquire("nonexistent", "alice").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, OneLeaseAtATime) {
  auto store = MakeStore(1 << 20, EvictionPolicy::kReject);
  auto a = store->CreateSession(Config(), "");
  ASSERT_TRUE(a.ok());
  {
    auto lease = store->Acquire(a->session_id, "");
    ASSERT_TRUE(lease.ok());
    EXPECT_EQ(store->Acquire(a->session_id, "").status().code(), absl::StatusCode::kAborted);
  }
  EXPECT_TRUE(store->Acquire(a->session_id, "").ok());
}

TEST_F(SessionStoreTest, FullCacheRejectsThenRecoversAfterClose) {
  // Block = 4 tokens x 2 heads x (8 + 8) x 4 bytes = 512 bytes; room for 4.
  auto store = MakeStore(2048, EvictionPolicy::kReject);
  auto a = store->CreateSession(Config(), "");
  ASSERT_TRUE(a.ok());
  {
    auto lease = store->Acquire(a->session_id, "");
    ASSERT_TRUE(lease.ok());
    ASSERT_TRUE(AppendTokens(*lease, 12, 1).ok());  // 3 blocks
    EXPECT_EQ(lease->length(), 12);
  }
  auto b = store->CreateSession(Config(), "");  // the 4th block
  ASSERT_TRUE(b.ok());
  auto c = store->CreateSession(Config(), "");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  {
    auto lease = store->Acquire(a->session_id, "");
    ASSERT_TRUE(lease.ok());
    absl::Status s = AppendTokens(*lease, 1, 2);
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(lease->length(), 12);  // unchanged
  }
  EXPECT_EQ(store->stats().used_bytes, 2048);
  ASSERT_TRUE(store->Close(a->session_id, "").ok());
  EXPECT_EQ(store->stats().used_bytes, 512);
  EXPECT_TRUE(store->CreateSession(Config(), "").ok());
  EXPECT_EQ(store->Acquire(a->session_id, "").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, LruIdleEvictsTheLeastRecentlyUsedIdleSession) {
  auto store = MakeStore(1024, EvictionPolicy::kLruIdle);  // room for 2 blocks
  auto a = store->CreateSession(Config(), "");
  clock_.Advance(absl::Seconds(1));
  auto b = store->CreateSession(Config(), "");
  ASSERT_TRUE(a.ok() && b.ok());
  clock_.Advance(absl::Seconds(1));
  ASSERT_TRUE(store->Acquire(a->session_id, "").ok());  // a is now more recent than b
  clock_.Advance(absl::Seconds(1));
  auto c = store->CreateSession(Config(), "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(store->stats().evictions_total, 1);
  EXPECT_EQ(store->Acquire(b->session_id, "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->Acquire(a->session_id, "").ok());
}

TEST_F(SessionStoreTest, LruIdleEvictsNothingForAnAppendThatCannotFit) {
  auto store = MakeStore(2048, EvictionPolicy::kLruIdle);  // 4 blocks of 512 bytes
  auto victim = store->CreateSession(Config(), "");
  auto big = store->CreateSession(Config(), "");
  ASSERT_TRUE(victim.ok() && big.ok());
  auto lease = store->Acquire(big->session_id, "");
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(AppendTokens(*lease, 20, 1).code(), absl::StatusCode::kResourceExhausted);  // 5 blocks
  EXPECT_EQ(store->stats().evictions_total, 0);
  EXPECT_TRUE(AppendTokens(*lease, 16, 2).ok());  // 4 blocks: evicts the victim
  EXPECT_EQ(store->stats().evictions_total, 1);
}

// A session closed during its decode step keeps its blocks until the lease
// ends, so no eviction can free them: an append that needs them evicts nothing.
TEST_F(SessionStoreTest, LruIdleCountsTheBlocksOfASessionClosedInUse) {
  auto store = MakeStore(2048, EvictionPolicy::kLruIdle);  // 4 blocks of 512 bytes
  auto closed = store->CreateSession(Config(), "");
  auto idle = store->CreateSession(Config(), "");
  auto big = store->CreateSession(Config(), "");
  ASSERT_TRUE(closed.ok() && idle.ok() && big.ok());
  {
    auto closing = store->Acquire(closed->session_id, "");
    ASSERT_TRUE(closing.ok());
    ASSERT_TRUE(AppendTokens(*closing, 8, 1).ok());  // 2 blocks: the cache is full
    ASSERT_TRUE(store->Close(closed->session_id, "").ok());
    auto lease = store->Acquire(big->session_id, "");
    ASSERT_TRUE(lease.ok());
    // 2 more blocks for `big` make 5 with the closed session's 2.
    absl::Status s = AppendTokens(*lease, 12, 2);
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(s.message()), HasSubstr("even after evicting every idle session"));
    EXPECT_EQ(store->stats().evictions_total, 0);
    EXPECT_EQ(lease->length(), 0);
  }
  EXPECT_TRUE(store->Acquire(idle->session_id, "").ok());
  EXPECT_EQ(store->stats().used_bytes, 2 * 512);  // the closed session's blocks are back
}

TEST_F(SessionStoreTest, TinyBlocksAreCountedAtTheMinimumSize) {
  SessionStoreOptions o;
  o.kv_cache_bytes = 3 * 4096;
  o.block_tokens = 1;
  auto store = *SessionStore::Create(o, &clock_);
  SessionConfig tiny = Config(1, 1, DType::kF16);  // 4 bytes of K/V per block
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(store->CreateSession(tiny, "").ok());
  EXPECT_EQ(store->stats().used_bytes, 3 * 4096);
  EXPECT_EQ(store->CreateSession(tiny, "").status().code(), absl::StatusCode::kResourceExhausted);
  SessionConfig huge = Config();
  huge.max_tokens = int64_t{1} << 31;
  EXPECT_EQ(store->CreateSession(huge, "").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionStoreTest, PinnedSessionsAreNeverEvicted) {
  auto store = MakeStore(1024, EvictionPolicy::kLruIdle);
  auto a = store->CreateSession(Config(), "");
  auto b = store->CreateSession(Config(), "");
  ASSERT_TRUE(a.ok() && b.ok());
  auto la = store->Acquire(a->session_id, "");
  auto lb = store->Acquire(b->session_id, "");
  ASSERT_TRUE(la.ok() && lb.ok());
  auto c = store->CreateSession(Config(), "");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(SessionStoreTest, IdleSessionsExpire) {
  auto store = MakeStore(1 << 20, EvictionPolicy::kReject);
  auto a = store->CreateSession(Config(), "");
  auto b = store->CreateSession(Config(), "");
  ASSERT_TRUE(a.ok() && b.ok());
  clock_.Advance(absl::Seconds(45));
  ASSERT_TRUE(store->Acquire(b->session_id, "").ok());  // b used at t=45
  clock_.Advance(absl::Seconds(30));                      // a idle 75 s, b 30 s
  EXPECT_EQ(store->ExpireIdle(), 1);
  EXPECT_EQ(store->Acquire(a->session_id, "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->Acquire(b->session_id, "").ok());
  EXPECT_EQ(store->stats().sessions_active, 1);
  EXPECT_EQ(store->stats().expirations_total, 1);
}

TEST_F(SessionStoreTest, MaxTokensAndBadShapes) {
  auto store = MakeStore(1 << 20, EvictionPolicy::kReject);
  SessionConfig c = Config();
  c.max_tokens = 5;
  auto a = store->CreateSession(c, "");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->capacity_tokens, 5);
  auto lease = store->Acquire(a->session_id, "");
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(AppendTokens(*lease, 5, 3).ok());
  EXPECT_EQ(AppendTokens(*lease, 1, 4).code(), absl::StatusCode::kResourceExhausted);
  std::string k(4 * 3 * 8, '\0');
  absl::Status s = lease->Append(0, TensorView{DType::kF32, {1, 3, 8}, k},
                                 TensorView{DType::kF32, {1, 3, 8}, k});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("key.shape: expected [n, 2, 8]"));
  SessionConfig bad = Config();
  bad.num_kv_heads = 0;
  EXPECT_EQ(store->CreateSession(bad, "").status().code(), absl::StatusCode::kInvalidArgument);
}

// Decoding token by token over a session gives bitwise the same result as a
// stateless attention over the concatenated K/V (F32 cache), and within
// rounding for a BF16 cache.
void CheckDecodeMatchesStateless(DType cache_dtype) {
  const int64_t hq = 4, hkv = 2, d = 16, steps = 11, prefill = 6;
  const int64_t total = prefill + steps;
  std::string k_all = RandomBytes(total * hkv * d, 10);
  std::string v_all = RandomBytes(total * hkv * d, 11);
  std::string q_all = RandomBytes(total * hq * d, 12);
  FakeClock clock;
  SessionStoreOptions o;
  o.block_tokens = 4;
  auto store = *SessionStore::Create(o, &clock);
  auto created = store->CreateSession(Config(hkv, d, cache_dtype), "");
  ASSERT_TRUE(created.ok());

  // Cache-dtype copies of K/V/Q as the stateless request sees them.
  auto to_cache = [&](const std::string& f32, int64_t n) {
    std::string out(n * DTypeSize(cache_dtype), '\0');
    for (int64_t i = 0; i < n; ++i) {
      StoreFloat(out.data(), cache_dtype, i, LoadFloat(f32.data(), DType::kF32, i));
    }
    return out;
  };
  int64_t done = 0;
  for (int64_t n : std::vector<int64_t>{prefill, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}) {
    auto lease = store->Acquire(created->session_id, "");
    ASSERT_TRUE(lease.ok());
    const int64_t kb = hkv * d * 4, qb = hq * d * 4;
    ASSERT_TRUE(lease->Append(0, TensorView{DType::kF32, {n, hkv, d}, std::string_view(k_all).substr(done * kb, n * kb)},
                              TensorView{DType::kF32, {n, hkv, d}, std::string_view(v_all).substr(done * kb, n * kb)})
                    .ok());
    std::string q = to_cache(q_all.substr(done * qb, n * qb), n * hq * d);
    AttentionRequest paged_req;
    paged_req.query = TensorView{cache_dtype, {n, hq, d}, q};
    paged_req.paged_kv = lease->View();
    paged_req.options.causal = true;
    auto paged = PrepareAttention(paged_req);
    ASSERT_TRUE(paged.ok()) << paged.status();
    RunReferenceAttention((*paged)->params);

    const int64_t len = done + n;
    std::string k = to_cache(k_all.substr(0, len * kb), len * hkv * d);
    std::string v = to_cache(v_all.substr(0, len * kb), len * hkv * d);
    AttentionRequest flat_req;
    flat_req.query = TensorView{cache_dtype, {n, hq, d}, q};
    flat_req.key = TensorView{cache_dtype, {len, hkv, d}, k};
    flat_req.value = TensorView{cache_dtype, {len, hkv, d}, v};
    flat_req.options.causal = true;
    auto flat = PrepareAttention(flat_req);
    ASSERT_TRUE(flat.ok()) << flat.status();
    RunReferenceAttention((*flat)->params);
    EXPECT_EQ((*paged)->output.data, (*flat)->output.data) << "step with " << len << " tokens";
    done = len;
  }
}

TEST(PagedDecodeTest, MatchesStatelessAttentionF32) { CheckDecodeMatchesStateless(DType::kF32); }
TEST(PagedDecodeTest, MatchesStatelessAttentionBF16) { CheckDecodeMatchesStateless(DType::kBF16); }

TEST_F(SessionStoreTest, ManySessionsConcurrently) {
  auto store = MakeStore(1 << 22, EvictionPolicy::kLruIdle);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        auto a = store->CreateSession(Config(), "");
        if (!a.ok()) continue;
        for (int step = 0; step < 5; ++step) {
          auto lease = store->Acquire(a->session_id, "");
          if (!lease.ok()) break;  // evicted by another thread
          (void)AppendTokens(*lease, 3, t * 1000 + i);
        }
        (void)store->Close(a->session_id, "");
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(store->stats().sessions_active, 0);
  EXPECT_EQ(store->stats().used_bytes, 0);
}

// One thread grows and truncates a leased session while another appends to a
// second one under lru_idle (each append asks CouldFit, most evict idle
// sessions). The store must count pinned bytes without reading the first
// session's blocks, and the count must stay exact: every append that fits
// after evicting every idle session succeeds, a snapshot never shows more
// pinned bytes than used ones, and the count returns to zero.
TEST_F(SessionStoreTest, PinnedBytesStayExactWhileLeaseHoldersAppend) {
  constexpr int64_t kBlock = 512;                              // 4 tokens of Config()
  auto store = MakeStore(64 * kBlock, EvictionPolicy::kLruIdle);
  auto grower = store->CreateSession(Config(), "");
  auto appender = store->CreateSession(Config(), "");
  ASSERT_TRUE(grower.ok() && appender.ok());
  auto grower_lease = store->Acquire(grower->session_id, "");
  ASSERT_TRUE(grower_lease.ok());
  std::atomic<bool> done{false};
  std::atomic<int> grower_steps{0};
  std::atomic<int> grower_failures{0};
  std::thread grow([&, lease = *std::move(grower_lease)]() mutable {
    for (int i = 0; !done.load(std::memory_order_relaxed); ++i) {
      // Up to 10 blocks, then back to 1: the blocks vector grows and shrinks.
      if (!AppendTokens(lease, 1 + i % 40, i).ok()) grower_failures.fetch_add(1);
      lease.Truncate(0, 0);
      grower_steps.fetch_add(1);
    }
  });
  while (grower_steps.load() == 0) std::this_thread::yield();  // make sure the two overlap
  for (int round = 0; round < 300; ++round) {
    // Idle victims, older than the appender, so eviction takes them first.
    for (int i = 0; i < 8; ++i) (void)store->CreateSession(Config(), "");
    clock_.Advance(absl::Seconds(1));
    auto lease = store->Acquire(appender->session_id, "");
    ASSERT_TRUE(lease.ok());
    // 40 blocks: with the grower's at most 10, it always fits after eviction.
    absl::Status s = AppendTokens(*lease, 160, round);
    ASSERT_TRUE(s.ok()) << "round " << round << ": " << s;
    const SessionStats st = store->stats();
    ASSERT_GE(st.pinned_bytes, 40 * kBlock);
    ASSERT_LE(st.pinned_bytes, st.used_bytes);
    ASSERT_LE(st.used_bytes, st.capacity_bytes);
    lease->Truncate(0, 0);
    clock_.Advance(absl::Seconds(1));
  }
  done = true;
  grow.join();
  EXPECT_EQ(grower_failures.load(), 0);
  EXPECT_GT(store->stats().evictions_total, 0);
  EXPECT_EQ(store->stats().pinned_bytes, 0);
  auto a = store->Acquire(grower->session_id, "");
  auto b = store->Acquire(appender->session_id, "");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(store->stats().pinned_bytes, 2 * kBlock);  // one block each after Truncate(0)
}

}  // namespace
}  // namespace attnserve
