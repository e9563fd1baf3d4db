// Model sessions in the SessionStore: layers stepping in order, RoPE keys,
// ForkSession's shared blocks, sinks windows, and Rollback.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention/rope.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvcache/session_store.h"
#include "scheduler/fake_clock.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

constexpr int kHkv = 2;
constexpr int kD = 8;
constexpr int kBlockTokens = 4;
// A block: 4 tokens x 2 heads x (8 + 8) dims x 4 bytes.
constexpr int64_t kBlockBytes = kBlockTokens * kHkv * 2 * kD * 4;

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

TensorView View(const std::vector<float>& x, int64_t tokens) {
  return TensorView{DType::kF32, {tokens, kHkv, kD},
                    std::string_view(reinterpret_cast<const char*>(x.data()), x.size() * 4)};
}

// Token `t` of `layer`'s cache: its key row (kHkv * kD floats).
std::vector<float> KeyRow(const SessionLease& lease, int32_t layer, int64_t t) {
  const PagedKvView v = lease.View(layer);
  const float* block = static_cast<const float*>(v.blocks[t / v.block_tokens]);
  const float* row = block + (t % v.block_tokens) * kHkv * kD;
  return std::vector<float>(row, row + kHkv * kD);
}

std::vector<float> ValueRow(const SessionLease& lease, int32_t layer, int64_t t) {
  const PagedKvView v = lease.View(layer);
  const float* block = static_cast<const float*>(v.blocks[t / v.block_tokens]);
  const float* row = block + int64_t{v.block_tokens} * kHkv * kD + (t % v.block_tokens) * kHkv * kD;
  return std::vector<float>(row, row + kHkv * kD);
}

class ModelSessionsTest : public ::testing::Test {
 protected:
  std::unique_ptr<SessionStore> MakeStore(int64_t bytes,
                                          EvictionPolicy policy = EvictionPolicy::kReject) {
    SessionStoreOptions o;
    o.kv_cache_bytes = bytes;
    o.block_tokens = kBlockTokens;
    o.eviction = policy;
    o.min_block_bytes = 0;
    auto s = SessionStore::Create(o, &clock_);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  static SessionConfig Config(int32_t layers = 1) {
    SessionConfig c;
    c.num_kv_heads = kHkv;
    c.head_dim = kD;
    c.num_layers = layers;
    return c;
  }
  // Appends `n` tokens (keys from `seed`, values from seed + 1) to `layer`.
  static absl::Status Append(SessionLease& lease, int32_t layer, int64_t n, uint32_t seed) {
    const std::vector<float> k = Random(n * kHkv * kD, seed);
    const std::vector<float> v = Random(n * kHkv * kD, seed + 1);
    return lease.Append(layer, View(k, n), View(v, n));
  }
  FakeClock clock_;
};

TEST_F(ModelSessionsTest, LayersStepInOrder) {
  auto store = MakeStore(1 << 20);
  auto created = store->CreateSession(Config(3), "");
  ASSERT_TRUE(created.ok()) << created.status();
  auto lease = *store->Acquire(created->session_id, "");
  // Layer 1 before layer 0 of the first step.
  absl::Status early = Append(lease, 1, 2, 1);
  EXPECT_EQ(early.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(early.message(), HasSubstr("layer 1 holds 0 tokens"));
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(Append(lease, layer, 2, 1).ok());
  // A new step: layer 0, then skipping layer 1.
  ASSERT_TRUE(Append(lease, 0, 1, 2).ok());
  absl::Status skipped = Append(lease, 2, 1, 2);
  EXPECT_EQ(skipped.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(skipped.message(), HasSubstr("layer 1 holds 2"));
  // Layer 0 again before the step finished.
  EXPECT_EQ(Append(lease, 0, 1, 2).code(), absl::StatusCode::kFailedPrecondition);
  // A different number of new tokens than layer 0 took.
  EXPECT_EQ(Append(lease, 1, 2, 2).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(Append(lease, 1, 1, 2).ok());
  ASSERT_TRUE(Append(lease, 2, 1, 2).ok());
  for (int layer = 0; layer < 3; ++layer) EXPECT_EQ(lease.length(layer), 3);
  absl::Status out_of_range = Append(lease, 3, 1, 2);
  EXPECT_EQ(out_of_range.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out_of_range.message(), HasSubstr("layer: expected a value in [0, 3)"));
}

TEST_F(ModelSessionsTest, LayersShareTheCacheBound) {
  // Room for 4 blocks: a 3-layer session takes 3 at once.
  auto store = MakeStore(4 * kBlockBytes);
  ASSERT_TRUE(store->CreateSession(Config(3), "").ok());
  EXPECT_EQ(store->stats().used_bytes, 3 * kBlockBytes);
  EXPECT_EQ(store->CreateSession(Config(2), "").status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store->stats().used_bytes, 3 * kBlockBytes);  // nothing half-created stays
}

TEST_F(ModelSessionsTest, RollbackUndoesTheLastAppend) {
  auto store = MakeStore(1 << 20);
  auto created = *store->CreateSession(Config(2), "");
  auto lease = *store->Acquire(created.session_id, "");
  ASSERT_TRUE(Append(lease, 0, 3, 1).ok());
  const int64_t used = store->stats().used_bytes;
  const std::vector<float> row = KeyRow(lease, 0, 2);
  ASSERT_TRUE(Append(lease, 1, 3, 1).ok());
  ASSERT_TRUE(Append(lease, 0, 6, 7).ok());  // a second block
  EXPECT_GT(store->stats().used_bytes, used + kBlockBytes - 1);
  lease.Rollback();
  EXPECT_EQ(lease.length(0), 3);
  EXPECT_EQ(KeyRow(lease, 0, 2), row);
  EXPECT_EQ(store->stats().used_bytes, used);  // layer 1's append needed no block
  lease.Rollback();  // only the last append
  EXPECT_EQ(lease.length(1), 3);
}

TEST_F(ModelSessionsTest, ForkSharesFullBlocksAndCopiesThePartialOne) {
  auto store = MakeStore(1 << 20);
  auto parent = *store->CreateSession(Config(2), "alice");
  {
    auto lease = *store->Acquire(parent.session_id, "alice");
    for (int layer = 0; layer < 2; ++layer) ASSERT_TRUE(Append(lease, layer, 10, 5 + layer).ok());
  }
  const int64_t before = store->stats().used_bytes;  // 3 blocks per layer
  EXPECT_EQ(before, 6 * kBlockBytes);
  auto forked = store->Fork(parent.session_id, 10, "alice");
  ASSERT_TRUE(forked.ok()) << forked.status();
  EXPECT_EQ(forked->shared_tokens, 8);
  SessionStats st = store->stats();
  EXPECT_EQ(st.used_bytes, before + 2 * kBlockBytes);  // one copied block per layer
  EXPECT_EQ(st.shared_blocks, 4);
  EXPECT_EQ(st.shared_bytes, 4 * kBlockBytes);
  EXPECT_EQ(st.forks_total, 1);
  // The fork is another owner's NOT_FOUND, and holds the parent's tokens.
  EXPECT_EQ(store->Fork(parent.session_id, 1, "mallory").status().code(),
            absl::StatusCode::kNotFound);
  {
    auto p = *store->Acquire(parent.session_id, "alice");
    auto c = *store->Acquire(forked->session_id, "alice");
    for (int layer = 0; layer < 2; ++layer) {
      EXPECT_EQ(c.length(layer), 10);
      for (int t = 0; t < 10; ++t) {
        EXPECT_EQ(KeyRow(c, layer, t), KeyRow(p, layer, t));
        EXPECT_EQ(ValueRow(c, layer, t), ValueRow(p, layer, t));
      }
    }
    // Appends go to each session's own blocks.
    const std::vector<float> parent_row = KeyRow(p, 0, 9);
    ASSERT_TRUE(Append(c, 0, 3, 99).ok());
    EXPECT_EQ(KeyRow(p, 0, 9), parent_row);
    EXPECT_EQ(p.length(0), 10);
  }
  // Closing the parent keeps the shared blocks for the fork.
  ASSERT_TRUE(store->Close(parent.session_id, "alice").ok());
  st = store->stats();
  EXPECT_EQ(st.shared_blocks, 0);
  EXPECT_EQ(st.used_bytes, 2 * 2 * kBlockBytes + 2 * kBlockBytes + kBlockBytes);
  ASSERT_TRUE(store->Close(forked->session_id, "alice").ok());
  EXPECT_EQ(store->stats().used_bytes, 0);
}

TEST_F(ModelSessionsTest, ForkErrorsNameTheField) {
  auto store = MakeStore(1 << 20);
  auto parent = *store->CreateSession(Config(2), "");
  {
    auto lease = *store->Acquire(parent.session_id, "");
    ASSERT_TRUE(Append(lease, 0, 5, 1).ok());
    ASSERT_TRUE(Append(lease, 1, 5, 1).ok());
    ASSERT_TRUE(Append(lease, 0, 1, 1).ok());  // layer 0 holds 6, layer 1 holds 5
    absl::StatusOr<SessionStore::Forked> busy = store->Fork(parent.session_id, 1, "");
    EXPECT_EQ(busy.status().code(), absl::StatusCode::kAborted);
  }
  absl::StatusOr<SessionStore::Forked> beyond = store->Fork(parent.session_id, 6, "");
  EXPECT_EQ(beyond.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(beyond.status().message(), HasSubstr("tokens: expected at most the session's length 5"));
  EXPECT_EQ(store->Fork(parent.session_id, 0, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Fork("unknown", 1, "").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ModelSessionsTest, ManyForksOfALongSessionCostNoCopies) {
  // 4096 tokens fill whole blocks: 100 forks share all of them.
  auto store = MakeStore(int64_t{64} << 20);
  auto parent = *store->CreateSession(Config(1), "");
  {
    auto lease = *store->Acquire(parent.session_id, "");
    ASSERT_TRUE(Append(lease, 0, 4096, 3).ok());
  }
  const int64_t before = store->stats().used_bytes;
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(store->Fork(parent.session_id, 4096, "").ok());
  EXPECT_EQ(store->stats().used_bytes, before);
  EXPECT_EQ(store->stats().shared_bytes, before);
}

TEST_F(ModelSessionsTest, EvictionNeverFreesABlockAnotherSessionUses) {
  auto store = MakeStore(8 * kBlockBytes, EvictionPolicy::kLruIdle);
  auto parent = *store->CreateSession(Config(1), "");
  std::vector<float> rows;
  {
    auto lease = *store->Acquire(parent.session_id, "");
    ASSERT_TRUE(Append(lease, 0, 10, 11).ok());  // 3 blocks
    rows = KeyRow(lease, 0, 5);
  }
  auto child = *store->Fork(parent.session_id, 8, "");  // shares 2
  clock_.Advance(absl::Seconds(1));
  {
    auto lease = *store->Acquire(child.session_id, "");
    // 6 more blocks: the cache holds 8; the idle parent is evicted for room
    // (its own block is freed), and the blocks the fork shares stay.
    ASSERT_TRUE(Append(lease, 0, 24, 12).ok());
    EXPECT_EQ(store->stats().evictions_total, 1);
    EXPECT_EQ(KeyRow(lease, 0, 5), rows);
  }
  EXPECT_EQ(store->Acquire(parent.session_id, "").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ModelSessionsTest, RopeRotatesKeysAtTheirPositions) {
  auto store = MakeStore(1 << 20);
  SessionConfig c = Config(1);
  c.rope = RopeConfig{};
  auto created = *store->CreateSession(c, "");
  auto lease = *store->Acquire(created.session_id, "");
  const std::vector<float> k1 = Random(3 * kHkv * kD, 21), k2 = Random(2 * kHkv * kD, 22);
  const std::vector<float> v1 = Random(3 * kHkv * kD, 23), v2 = Random(2 * kHkv * kD, 24);
  ASSERT_TRUE(lease.Append(0, View(k1, 3), View(v1, 3)).ok());
  ASSERT_TRUE(lease.Append(0, View(k2, 2), View(v2, 2)).ok());
  std::vector<float> want(k1);
  want.insert(want.end(), k2.begin(), k2.end());
  RopeConfig rope;
  ASSERT_TRUE(ValidateRope(rope, kD).ok());
  RotateRope(rope, std::vector<int64_t>{0, 1, 2, 3, 4}, kHkv, kD, want.data());
  for (int t = 0; t < 5; ++t) {
    const std::vector<float> got = KeyRow(lease, 0, t);
    for (int i = 0; i < kHkv * kD; ++i) EXPECT_FLOAT_EQ(got[i], want[t * kHkv * kD + i]) << t;
  }
  EXPECT_EQ(ValueRow(lease, 0, 4), std::vector<float>(v2.begin() + kHkv * kD, v2.end()));
}

TEST_F(ModelSessionsTest, WindowKeepsSinksAndTheLastTokensInBoundedMemory) {
  auto store = MakeStore(1 << 20);
  SessionConfig c = Config(1);
  c.sink_tokens = 3;    // one block
  c.window_tokens = 6;  // two or three blocks
  c.rope = RopeConfig{};
  auto created = *store->CreateSession(c, "");
  std::vector<float> keys;  // every key appended, unrotated
  int64_t peak = 0;
  for (int t = 0; t < 60; ++t) {
    auto lease = *store->Acquire(created.session_id, "");
    const std::vector<float> k = Random(kHkv * kD, 100 + t);
    const std::vector<float> v = Random(kHkv * kD, 200 + t);
    keys.insert(keys.end(), k.begin(), k.end());
    ASSERT_TRUE(lease.Append(0, View(k, 1), View(v, 1)).ok()) << t;
    const int64_t seen = t + 1;
    EXPECT_EQ(lease.position(0), seen);
    const int64_t kept = lease.length(0);
    EXPECT_LE(kept, kBlockTokens + 6 + kBlockTokens - 1);
    if (seen > kBlockTokens + 6) EXPECT_GE(kept - kBlockTokens, 6);  // the window is whole
    // The kept keys: the sink block rotated at (j + dropped), the window's
    // tokens at their own positions.
    RopeConfig rope;
    ASSERT_TRUE(ValidateRope(rope, kD).ok());
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t token = j < kBlockTokens ? j : j + lease.dropped(0);
      std::vector<float> want(keys.begin() + token * kHkv * kD,
                              keys.begin() + (token + 1) * kHkv * kD);
      const int64_t pos = j < kBlockTokens ? j + lease.dropped(0) : token;
      RotateRope(rope, std::vector<int64_t>{pos}, kHkv, kD, want.data());
      const std::vector<float> got = KeyRow(lease, 0, j);
      for (int i = 0; i < kHkv * kD; ++i) ASSERT_NEAR(got[i], want[i], 1e-5) << t << " " << j;
    }
    if (t == 40) {
      // A failed step puts the window back where it was.
      const int64_t length = lease.length(0), dropped = lease.dropped(0);
      const std::vector<float> sink = KeyRow(lease, 0, 1);
      const std::vector<float> more = Random(4 * kHkv * kD, 7);
      ASSERT_TRUE(lease.Append(0, View(more, 4), View(more, 4)).ok());
      EXPECT_GT(lease.dropped(0), dropped);
      lease.Rollback();
      EXPECT_EQ(lease.length(0), length);
      EXPECT_EQ(lease.dropped(0), dropped);
      const std::vector<float> back = KeyRow(lease, 0, 1);
      for (int i = 0; i < kHkv * kD; ++i) ASSERT_NEAR(back[i], sink[i], 1e-5);
    }
    peak = std::max(peak, store->stats().used_bytes);
  }
  // Blocks: 1 sink + at most 3 window + 1 growing, plus the sink keys' copy.
  EXPECT_LE(peak, 5 * kBlockBytes + kBlockTokens * kHkv * kD * 4);
  EXPECT_GT(store->stats().window_blocks_freed_total, 10);
}

TEST_F(ModelSessionsTest, ConfigErrorsNameTheField) {
  auto store = MakeStore(1 << 20);
  SessionConfig c = Config(1);
  c.rope = RopeConfig{};
  c.rope->rotary_dim = 3;
  EXPECT_THAT(store->CreateSession(c, "").status().message(), HasSubstr("rotary.rotary_dim"));
  c = Config(1);
  c.sink_tokens = 4;
  EXPECT_THAT(store->CreateSession(c, "").status().message(),
              HasSubstr("sink_tokens: expected 0 without window_tokens"));
  c = Config(1);
  c.window_tokens = 8;
  c.rope = RopeConfig{};
  c.rope->scaling = RopeScaling::kDynamic;
  c.rope->factor = 2;
  c.rope->original_max_positions = 16;
  EXPECT_THAT(store->CreateSession(c, "").status().message(), HasSubstr("rotary.scaling"));
  c = Config(5000);
  EXPECT_THAT(store->CreateSession(c, "").status().message(), HasSubstr("num_layers"));
  c = Config(1);
  c.window_tokens = 8;
  auto windowed = *store->CreateSession(c, "");
  EXPECT_EQ(store->Fork(windowed.session_id, 1, "").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ModelSessionsTest, AnAppendAfterATruncateCopiesASharedBlock) {
  auto store = MakeStore(1 << 20);
  auto parent = *store->CreateSession(Config(1), "");
  std::vector<float> rows;
  {
    auto lease = *store->Acquire(parent.session_id, "");
    ASSERT_TRUE(Append(lease, 0, 8, 31).ok());
    rows = KeyRow(lease, 0, 2);
  }
  auto child = *store->Fork(parent.session_id, 8, "");
  {
    auto lease = *store->Acquire(child.session_id, "");
    lease.Truncate(0, 2);               // inside the first shared block
    ASSERT_TRUE(Append(lease, 0, 3, 32).ok());  // rows 2..4: into a copy
    EXPECT_NE(KeyRow(lease, 0, 2), rows);
  }
  auto lease = *store->Acquire(parent.session_id, "");
  EXPECT_EQ(KeyRow(lease, 0, 2), rows);
}

TEST_F(ModelSessionsTest, AFailedAppendMakesThePreviousOneFinal) {
  // Two-token blocks; a window of 2 tokens and no sinks.
  SessionStoreOptions o;
  o.kv_cache_bytes = 6 * 2 * kHkv * 2 * kD * 4;  // six blocks
  o.block_tokens = 2;
  o.min_block_bytes = 0;
  auto store = *SessionStore::Create(o, &clock_);
  SessionConfig c = Config(1);
  c.window_tokens = 2;
  auto created = *store->CreateSession(c, "");
  auto lease = *store->Acquire(created.session_id, "");
  ASSERT_TRUE(Append(lease, 0, 3, 1).ok());
  ASSERT_TRUE(Append(lease, 0, 3, 2).ok());  // the window moves
  const int64_t length = lease.length(0), dropped = lease.dropped(0);
  ASSERT_GT(dropped, 0);
  EXPECT_EQ(Append(lease, 0, 12, 3).code(), absl::StatusCode::kResourceExhausted);
  lease.Rollback();  // nothing to undo: the failed append changed nothing
  EXPECT_EQ(lease.length(0), length);
  EXPECT_EQ(lease.dropped(0), dropped);
}

TEST_F(ModelSessionsTest, EvictionFreesBlocksOnceSharedWhoseOtherHoldersAreGone) {
  // 8 blocks. The parent's 3 blocks were shared with a fork that is closed
  // since: the idle parent holds them alone, so evicting it makes room.
  auto store = MakeStore(8 * kBlockBytes, EvictionPolicy::kLruIdle);
  auto parent = *store->CreateSession(Config(1), "");
  {
    auto lease = *store->Acquire(parent.session_id, "");
    ASSERT_TRUE(Append(lease, 0, 12, 41).ok());  // 3 blocks
  }
  auto fork = *store->Fork(parent.session_id, 12, "");
  ASSERT_TRUE(store->Close(fork.session_id, "").ok());
  clock_.Advance(absl::Seconds(1));
  auto other = *store->CreateSession(Config(1), "");  // a 4th block
  auto lease = *store->Acquire(other.session_id, "");
  ASSERT_TRUE(Append(lease, 0, 24, 42).ok()) << "6 blocks: 5 more than it has";
  EXPECT_EQ(store->stats().evictions_total, 1);
}

}  // namespace
}  // namespace attnserve
