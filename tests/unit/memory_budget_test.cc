#include "core/memory_budget.h"

#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(MemoryBudgetTest, ReservationsHoldBytesUntilReleased) {
  std::vector<int64_t> seen;
  MemoryBudget budget(1000, [&](int64_t reserved) { seen.push_back(reserved); });
  auto a = budget.Reserve(600, "a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(budget.reserved_bytes(), 600);
  {
    auto b = budget.Reserve(400, "b");
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(budget.reserved_bytes(), 1000);
  }  // b released
  EXPECT_EQ(budget.reserved_bytes(), 600);
  MemoryBudget::Reservation moved = *std::move(a);
  EXPECT_EQ(moved.bytes(), 600);
  EXPECT_EQ(budget.reserved_bytes(), 600);  // a move does not release
  moved.Release();
  moved.Release();  // idempotent
  EXPECT_EQ(budget.reserved_bytes(), 0);
  EXPECT_THAT(seen, ElementsAre(600, 1000, 600, 0));
}

TEST(MemoryBudgetTest, RequestThatDoesNotFitIsRefusedNamingTheBudget) {
  MemoryBudget budget(1000);
  auto held = budget.Reserve(700, "held");
  ASSERT_TRUE(held.ok());
  auto refused = budget.Reserve(400, "this request");
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              AllOf(HasSubstr("memory budget"), HasSubstr("this request needs"),
                    HasSubstr("400 bytes"), HasSubstr("--memory_limit_bytes=1000"),
                    HasSubstr("retry later")));
  EXPECT_EQ(budget.reserved_bytes(), 700);  // a refusal reserves nothing

  auto too_big = budget.Reserve(1001, "a huge request");
  ASSERT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(too_big.status().message()), HasSubstr("more than the whole budget"));
}

TEST(MemoryBudgetTest, DefaultLimitSubtractsTheKvCacheAndTheProcess) {
  std::string how;
  const SystemMemory system{int64_t{8} << 30, "cgroup v2 memory.max"};
  auto limit = DefaultMemoryLimit(system, int64_t{2} << 30, &how);
  ASSERT_TRUE(limit.ok()) << limit.status();
  const int64_t want = static_cast<int64_t>((int64_t{8} << 30) * kDefaultBudgetFraction) -
                       (int64_t{2} << 30) - kProcessBaselineBytes;
  EXPECT_EQ(*limit, want);
  EXPECT_THAT(how, AllOf(HasSubstr("85%"), HasSubstr("cgroup v2 memory.max"), HasSubstr("8 GiB"),
                         HasSubstr("--kv_cache_bytes (2 GiB)")));

  // A KV cache that takes (nearly) everything leaves no budget: say so.
  auto none = DefaultMemoryLimit(system, int64_t{7} << 30, &how);
  ASSERT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(none.status().message()),
              AllOf(HasSubstr("--kv_cache_bytes"), HasSubstr("--memory_limit_bytes")));
}

TEST(MemoryBudgetTest, SystemMemoryIsDetected) {
  const SystemMemory m = DetectSystemMemory();
  EXPECT_GT(m.bytes, int64_t{64} << 20);
  EXPECT_FALSE(m.source.empty());
}

TEST(MemoryBudgetTest, HumanBytes) {
  EXPECT_EQ(HumanBytes(17), "17 B");
  EXPECT_EQ(HumanBytes(int64_t{3} << 20), "3 MiB");
  EXPECT_EQ(HumanBytes(int64_t{3} << 29), "1.5 GiB");
}

}  // namespace
}  // namespace attnserve
