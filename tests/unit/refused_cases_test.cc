// RefusedCases, which the conformance and batch-invariance suites use to judge
// Supports() refusals: a refusal is counted and listed, and refusing a case
// whose dtype and features the backend claims is a test failure.
#include "refused_cases.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest-spi.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

// Claims what it is told to, and refuses LINEAR whatever it claims.
class LinearRefusingBackend final : public Backend {
 public:
  explicit LinearRefusingBackend(std::vector<std::string> features) {
    info_.name = "fake";
    info_.dtypes = {DType::kF32};
    info_.features = std::move(features);
    info_.max_head_dim = 128;
  }
  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams& p) const override {
    if (p.variant == Variant::kLinear) return absl::UnimplementedError("fake: no LINEAR here");
    return absl::OkStatus();
  }
  absl::Status Run(absl::Span<const AttentionParams>) override { return absl::OkStatus(); }

 private:
  BackendInfo info_;
};

RequestSpec LinearCausalSpec() {
  RequestSpec spec;
  spec.name = "linear_causal";
  spec.options.variant = Variant::kLinear;
  spec.options.causal = true;
  return spec;
}

AttentionParams LinearParams() {
  AttentionParams p;
  p.variant = Variant::kLinear;
  p.causal = true;
  return p;
}

TEST(RefusedCasesTest, AcceptedCaseIsNotCounted) {
  const LinearRefusingBackend backend({"causal"});
  RefusedCases refused;
  RequestSpec spec;
  spec.name = "plain";
  EXPECT_TRUE(refused.Check(backend, spec, DType::kF32, AttentionParams{}));
  EXPECT_EQ(refused.count(), 0u);
  EXPECT_EQ(refused.Summary(), "0 refused by Supports()");
}

TEST(RefusedCasesTest, RefusingAClaimedCaseFailsNamingBackendCaseAndMessage) {
  const LinearRefusingBackend backend({"causal", "linear"});
  RefusedCases refused;
  bool ran = true;
  EXPECT_NONFATAL_FAILURE(
      ran = refused.Check(backend, LinearCausalSpec(), DType::kF32, LinearParams()),
      "backend fake refuses case linear_causal F32");
  EXPECT_FALSE(ran);
  EXPECT_EQ(refused.count(), 1u);
  EXPECT_THAT(refused.Summary(), HasSubstr("1 refused by Supports(): linear_causal F32 (all "
                                           "claimed; fake: no LINEAR here)"));
}

TEST(RefusedCasesTest, RefusingAnUnclaimedCaseIsCountedAndListed) {
  const LinearRefusingBackend backend({"causal"});
  RefusedCases refused;
  EXPECT_FALSE(refused.Check(backend, LinearCausalSpec(), DType::kF32, LinearParams()));
  EXPECT_EQ(refused.count(), 1u);
  EXPECT_EQ(refused.Summary(),
            "1 refused by Supports(): linear_causal F32 (not claimed: linear; fake: no LINEAR "
            "here)");
}

TEST(RefusedCasesTest, UnclaimedFeaturesListsFeaturesDTypeAndHeadDim) {
  BackendInfo info;
  info.dtypes = {DType::kF32};
  info.features = {"causal", "lse"};
  info.max_head_dim = 64;
  RequestSpec spec = LinearCausalSpec();
  spec.heads_q = 4;
  spec.heads_kv = 2;
  spec.head_dim = 64;
  spec.value_dim = 80;
  spec.outputs.lse = true;
  EXPECT_THAT(UnclaimedFeatures(info, spec, DType::kBF16),
              ::testing::ElementsAre("gqa", "linear", "BF16", "head_dim"));
  spec.options.variant = Variant::kSoftmax;
  spec.heads_kv = 4;
  spec.value_dim = 0;
  EXPECT_THAT(UnclaimedFeatures(info, spec, DType::kF32), ::testing::IsEmpty());
}

}  // namespace
}  // namespace attnserve
