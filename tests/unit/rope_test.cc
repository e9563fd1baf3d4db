// Rotary position embedding: RotateRope against PyTorch-computed golden data
// (tests/golden/rope/, see tests/golden/README.md), ValidateRope's errors and
// defaults, the scalings' frequencies, and properties any rotation must have.
#include "attention/rope.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <numbers>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/npy.h"
#include "core/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/golden_files.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// Golden cases
// ---------------------------------------------------------------------------

using golden::MustRead;
using golden::ReadOptions;
using golden::ToDouble;
using golden::ToInt;
using golden::ReadPositions;

std::filesystem::path RopeDir() { return golden::Dir("rope"); }
std::vector<std::string> RopeCaseNames() { return golden::CaseNames("rope"); }


// The config case.txt describes. Every key must be known, so the generator
// and this test cannot drift apart silently.
RopeConfig ConfigFromOptions(const std::map<std::string, std::string>& options) {
  RopeConfig config;
  for (const auto& [key, value] : options) {
    if (key == "theta") {
      config.theta = ToDouble(value);
    } else if (key == "rotary_dim") {
      config.rotary_dim = ToInt(value);
    } else if (key == "style") {
      EXPECT_TRUE(value == "neox" || value == "gptj") << value;
      config.style = value == "gptj" ? RopeStyle::kGptj : RopeStyle::kNeox;
    } else if (key == "scaling") {
      static const std::map<std::string, RopeScaling> kScalings = {
          {"none", RopeScaling::kNone},
          {"linear", RopeScaling::kLinear},
          {"ntk", RopeScaling::kNtk},
          {"dynamic", RopeScaling::kDynamic},
          {"llama3", RopeScaling::kLlama3}};
      const auto it = kScalings.find(value);
      EXPECT_NE(it, kScalings.end()) << "unknown scaling '" << value << "'";
      if (it != kScalings.end()) config.scaling = it->second;
    } else if (key == "factor") {
      config.factor = ToDouble(value);
    } else if (key == "original_max_positions") {
      config.original_max_positions = ToInt(value);
    } else if (key == "low_freq_factor") {
      config.low_freq_factor = ToDouble(value);
    } else if (key == "high_freq_factor") {
      config.high_freq_factor = ToDouble(value);
    } else {
      ADD_FAILURE() << "unknown case.txt key '" << key << "'";
    }
  }
  return config;
}

class RopeGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(RopeGoldenTest, MatchesGolden) {
  const std::filesystem::path dir = RopeDir() / GetParam();
  RopeConfig config = ConfigFromOptions(ReadOptions(dir / "case.txt"));
  Tensor x = MustRead(dir / "x.npy");
  const Tensor want = MustRead(dir / "out.npy");  // <f8, read as F32
  const std::vector<int64_t> positions = ReadPositions(dir / "positions.npy");
  ASSERT_FALSE(HasFailure());
  ASSERT_EQ(x.dtype, DType::kF32);
  ASSERT_EQ(x.shape.size(), 3u) << ShapeString(x.shape);
  ASSERT_EQ(want.shape, x.shape);
  ASSERT_EQ(static_cast<int64_t>(positions.size()), x.shape[0]);
  const int32_t heads = static_cast<int32_t>(x.shape[1]);
  const int32_t head_dim = static_cast<int32_t>(x.shape[2]);

  ASSERT_TRUE(ValidateRope(config, head_dim).ok()) << ValidateRope(config, head_dim);
  RotateRope(config, positions, heads, head_dim, x.mutable_data<float>());

  constexpr double kRtol = 1e-5, kAtol = 1e-5;
  const float* got = x.data_as<float>();
  const float* expected = want.data_as<float>();
  int failures = 0;
  for (int64_t i = 0; i < x.num_elements() && failures < 10; ++i) {
    if (!(std::abs(got[i] - expected[i]) <= kRtol * std::abs(expected[i]) + kAtol)) {
      ++failures;
      const int64_t t = i / (heads * head_dim);
      ADD_FAILURE() << "out[" << t << ", " << i / head_dim % heads << ", " << i % head_dim
                    << "] (position " << positions[t] << "): got " << got[i] << ", golden "
                    << expected[i];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, RopeGoldenTest, ::testing::ValuesIn(RopeCaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

TEST(RopeGoldenDataTest, CasesArePresent) {
  // The generator writes about ten cases; far fewer means the data is missing.
  EXPECT_GE(RopeCaseNames().size(), 8u) << "RoPE golden cases not found under " << RopeDir();
}

// ---------------------------------------------------------------------------
// ValidateRope
// ---------------------------------------------------------------------------

absl::Status Validate(RopeConfig config, int32_t head_dim = 128) {
  return ValidateRope(config, head_dim);
}

void ExpectInvalid(const absl::Status& status, absl::string_view field) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(std::string(field) + ": expected"))
      << status;
}

TEST(RopeValidateTest, AcceptsDefaultsAndFillsThem) {
  RopeConfig config;
  config.theta = 0;  // the wire's "unset"
  config.low_freq_factor = 0;
  config.high_freq_factor = 0;
  config.factor = 0;  // ignored without scaling
  ASSERT_TRUE(ValidateRope(config, 64).ok()) << ValidateRope(config, 64);
  EXPECT_EQ(config.theta, 10000.0);
  EXPECT_EQ(config.rotary_dim, 64);
  EXPECT_EQ(config.low_freq_factor, 1.0);
  EXPECT_EQ(config.high_freq_factor, 4.0);

  // Already resolved: a second call changes nothing.
  const RopeConfig before = config;
  ASSERT_TRUE(ValidateRope(config, 64).ok());
  EXPECT_EQ(config.rotary_dim, before.rotary_dim);
  EXPECT_EQ(config.theta, before.theta);
}

TEST(RopeValidateTest, Llama3FillsFreqFactorDefaults) {
  RopeConfig config;
  config.scaling = RopeScaling::kLlama3;
  config.factor = 8;
  config.original_max_positions = 8192;
  config.low_freq_factor = 0;
  config.high_freq_factor = -1;
  ASSERT_TRUE(ValidateRope(config, 128).ok()) << ValidateRope(config, 128);
  EXPECT_EQ(config.low_freq_factor, 1.0);
  EXPECT_EQ(config.high_freq_factor, 4.0);
}

TEST(RopeValidateTest, RotaryDim) {
  RopeConfig config;
  config.rotary_dim = 7;
  const absl::Status odd = Validate(config);
  ExpectInvalid(odd, "rotary.rotary_dim");
  EXPECT_EQ(odd.message(),
            "rotary.rotary_dim: expected an even value in [2, 128] (head_dim), got 7");

  config.rotary_dim = 130;
  ExpectInvalid(Validate(config), "rotary.rotary_dim");
  config.rotary_dim = -2;
  ExpectInvalid(Validate(config), "rotary.rotary_dim");

  config.rotary_dim = 2;
  EXPECT_TRUE(Validate(config).ok());
  config.rotary_dim = 128;
  EXPECT_TRUE(Validate(config).ok());

  // 0 means head_dim, which must then be even: the message says so.
  config.rotary_dim = 0;
  const absl::Status odd_head = Validate(config, 7);
  ExpectInvalid(odd_head, "rotary.rotary_dim");
  EXPECT_THAT(std::string(odd_head.message()), HasSubstr("head_dim 7"));

  // NTK and DYNAMIC raise to rd / (rd - 2): a single pair has no such base.
  config.rotary_dim = 2;
  config.scaling = RopeScaling::kNtk;
  config.factor = 2;
  ExpectInvalid(Validate(config), "rotary.rotary_dim");
  config.rotary_dim = 4;
  EXPECT_TRUE(Validate(config).ok());
}

TEST(RopeValidateTest, Theta) {
  for (double theta : {1.0, 0.5, -10000.0, std::numeric_limits<double>::quiet_NaN(),
                       std::numeric_limits<double>::infinity()}) {
    RopeConfig config;
    config.theta = theta;
    ExpectInvalid(Validate(config), "rotary.theta");
  }
  RopeConfig config;
  config.theta = 1.5;
  EXPECT_TRUE(Validate(config).ok());
}

TEST(RopeValidateTest, Factor) {
  for (RopeScaling scaling :
       {RopeScaling::kLinear, RopeScaling::kNtk, RopeScaling::kDynamic, RopeScaling::kLlama3}) {
    RopeConfig config;
    config.scaling = scaling;
    config.original_max_positions = 4096;
    config.factor = 0.5;
    ExpectInvalid(Validate(config), "rotary.factor");
    config.factor = 0;
    ExpectInvalid(Validate(config), "rotary.factor");
    config.factor = 1;
    EXPECT_TRUE(Validate(config).ok()) << Validate(config);
  }
  // Any float must be finite, even one the scaling ignores.
  RopeConfig config;
  config.factor = std::numeric_limits<double>::quiet_NaN();
  ExpectInvalid(Validate(config), "rotary.factor");
  config.factor = 1;
  config.low_freq_factor = std::numeric_limits<double>::infinity();
  ExpectInvalid(Validate(config), "rotary.low_freq_factor");
  config.low_freq_factor = 1;
  config.high_freq_factor = -std::numeric_limits<double>::infinity();
  ExpectInvalid(Validate(config), "rotary.high_freq_factor");
}

TEST(RopeValidateTest, OriginalMaxPositions) {
  for (RopeScaling scaling : {RopeScaling::kDynamic, RopeScaling::kLlama3}) {
    RopeConfig config;
    config.scaling = scaling;
    config.factor = 2;
    ExpectInvalid(Validate(config), "rotary.original_max_positions");
    config.original_max_positions = -1;
    ExpectInvalid(Validate(config), "rotary.original_max_positions");
    config.original_max_positions = 1;
    EXPECT_TRUE(Validate(config).ok()) << Validate(config);
  }
  // The other scalings do not read it.
  RopeConfig config;
  config.scaling = RopeScaling::kLinear;
  config.factor = 2;
  EXPECT_TRUE(Validate(config).ok());
}

TEST(RopeValidateTest, Llama3FreqFactorsOrdered) {
  RopeConfig config;
  config.scaling = RopeScaling::kLlama3;
  config.factor = 8;
  config.original_max_positions = 8192;
  config.low_freq_factor = 4;
  config.high_freq_factor = 2;
  ExpectInvalid(Validate(config), "rotary.low_freq_factor");
  config.high_freq_factor = 4;  // equal is not enough
  ExpectInvalid(Validate(config), "rotary.low_freq_factor");
  config.low_freq_factor = 5;
  config.high_freq_factor = 0;  // the default 4
  ExpectInvalid(Validate(config), "rotary.low_freq_factor");
  config.low_freq_factor = 2;
  config.high_freq_factor = 3;
  EXPECT_TRUE(Validate(config).ok());
}

TEST(RopeValidateTest, EnumsAndFieldPrefix) {
  RopeConfig config;
  config.style = static_cast<RopeStyle>(5);
  ExpectInvalid(Validate(config), "rotary.style");
  config.style = RopeStyle::kGptj;
  config.scaling = static_cast<RopeScaling>(9);
  ExpectInvalid(Validate(config), "rotary.scaling");

  RopeConfig bad_theta;
  bad_theta.theta = 0.5;
  ExpectInvalid(ValidateRope(bad_theta, 64, "session.rotary"), "session.rotary.theta");
}

// ---------------------------------------------------------------------------
// Inverse frequencies
// ---------------------------------------------------------------------------

RopeConfig Resolved(RopeConfig config, int32_t head_dim) {
  const absl::Status status = ValidateRope(config, head_dim);
  EXPECT_TRUE(status.ok()) << status;
  return config;
}

void ExpectNear(const std::vector<double>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-15 * std::abs(want[i])) << "inv_freq[" << i << "]";
  }
}

TEST(RopeFrequenciesTest, Unscaled) {
  RopeConfig config;
  config.rotary_dim = 8;
  const std::vector<double> f = RopeInverseFrequencies(Resolved(config, 16), 0);
  ExpectNear(f, {1.0, 0.1, 0.01, 0.001});  // 10000^(-2i/8)
}

TEST(RopeFrequenciesTest, LinearDividesByFactor) {
  RopeConfig none;
  none.rotary_dim = 16;
  RopeConfig linear = none;
  linear.scaling = RopeScaling::kLinear;
  linear.factor = 4;
  std::vector<double> want = RopeInverseFrequencies(Resolved(none, 16), 0);
  for (double& f : want) f /= 4;
  ExpectNear(RopeInverseFrequencies(Resolved(linear, 16), 0), want);
}

TEST(RopeFrequenciesTest, NtkChangesTheBase) {
  // rd 4: theta' = 10000 · 2^(4/2) = 40000, so inv_freq = {1, 1/200}.
  RopeConfig config;
  config.rotary_dim = 4;
  config.scaling = RopeScaling::kNtk;
  config.factor = 2;
  ExpectNear(RopeInverseFrequencies(Resolved(config, 8), 0), {1.0, 1.0 / 200});
}

TEST(RopeFrequenciesTest, DynamicScalesOnlyPastTheOriginalContext) {
  RopeConfig dynamic;
  dynamic.scaling = RopeScaling::kDynamic;
  dynamic.factor = 2;
  dynamic.original_max_positions = 64;
  dynamic = Resolved(dynamic, 16);
  RopeConfig none;
  none = Resolved(none, 16);
  const std::vector<double> unscaled = RopeInverseFrequencies(none, 0);
  ExpectNear(RopeInverseFrequencies(dynamic, 0), unscaled);
  ExpectNear(RopeInverseFrequencies(dynamic, 63), unscaled);  // n = 64: the boundary

  // n = 128: base 2·128/64 − (2 − 1) = 3, the same as NTK with factor 3.
  RopeConfig ntk = none;
  ntk.scaling = RopeScaling::kNtk;
  ntk.factor = 3;
  ExpectNear(RopeInverseFrequencies(dynamic, 127), RopeInverseFrequencies(ntk, 0));
}

TEST(RopeFrequenciesTest, Llama3Bands) {
  RopeConfig config;
  config.theta = 500000;
  config.scaling = RopeScaling::kLlama3;
  config.factor = 8;
  config.original_max_positions = 8192;
  config = Resolved(config, 128);
  RopeConfig none = config;
  none.scaling = RopeScaling::kNone;
  const std::vector<double> scaled = RopeInverseFrequencies(config, 0);
  const std::vector<double> unscaled = RopeInverseFrequencies(none, 0);
  ASSERT_EQ(scaled.size(), 64u);
  int kept = 0, divided = 0, blended = 0;
  for (size_t i = 0; i < scaled.size(); ++i) {
    const double wavelen = 2 * std::numbers::pi / unscaled[i];
    if (wavelen < 8192.0 / 4) {
      EXPECT_EQ(scaled[i], unscaled[i]) << i;
      ++kept;
    } else if (wavelen > 8192.0 / 1) {
      EXPECT_DOUBLE_EQ(scaled[i], unscaled[i] / 8) << i;
      ++divided;
    } else {
      EXPECT_LT(scaled[i], unscaled[i]) << i;
      EXPECT_GT(scaled[i], unscaled[i] / 8) << i;
      ++blended;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
}

// ---------------------------------------------------------------------------
// Properties of the rotation
// ---------------------------------------------------------------------------

std::vector<float> RandomValues(int64_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t state = seed;
  for (float& x : v) {
    state = state * 1664525u + 1013904223u;  // a fixed LCG: deterministic data
    x = static_cast<float>(state >> 8) / float(1 << 24) * 2.f - 1.f;
  }
  return v;
}

// Configs the properties are checked for: both styles, partial and full, and
// every scaling whose frequencies do not depend on the call's positions.
std::vector<RopeConfig> PropertyConfigs(int32_t head_dim) {
  std::vector<RopeConfig> configs;
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptj}) {
    for (int32_t rd : {head_dim, head_dim / 2}) {
      for (RopeScaling scaling :
           {RopeScaling::kNone, RopeScaling::kLinear, RopeScaling::kNtk, RopeScaling::kLlama3}) {
        RopeConfig c;
        c.style = style;
        c.rotary_dim = rd;
        c.scaling = scaling;
        c.factor = scaling == RopeScaling::kNone ? 1 : 4;
        c.original_max_positions = 256;
        configs.push_back(Resolved(c, head_dim));
      }
    }
  }
  return configs;
}

std::string Describe(const RopeConfig& c) {
  return "style " + std::to_string(static_cast<int>(c.style)) + ", rotary_dim " +
         std::to_string(c.rotary_dim) + ", scaling " + std::to_string(static_cast<int>(c.scaling));
}

constexpr int32_t kHeads = 3;
constexpr int32_t kHeadDim = 64;

TEST(RopeRotateTest, PositionZeroIsTheIdentity) {
  for (const RopeConfig& c : PropertyConfigs(kHeadDim)) {
    const std::vector<float> x = RandomValues(2 * kHeads * kHeadDim, 7);
    std::vector<float> y = x;
    const std::vector<int64_t> positions = {0, 0};
    RotateRope(c, positions, kHeads, kHeadDim, y.data());
    EXPECT_EQ(y, x) << Describe(c);
  }
}

TEST(RopeRotateTest, DimsPastRotaryDimUnchanged) {
  for (const RopeConfig& c : PropertyConfigs(kHeadDim)) {
    const std::vector<float> x = RandomValues(4 * kHeads * kHeadDim, 11);
    std::vector<float> y = x;
    const std::vector<int64_t> positions = {3, 100000, 1, 77};
    RotateRope(c, positions, kHeads, kHeadDim, y.data());
    int changed = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const int32_t dim = static_cast<int32_t>(i % kHeadDim);
      if (dim >= c.rotary_dim) {
        EXPECT_EQ(y[i], x[i]) << Describe(c) << " element " << i;
      } else {
        changed += y[i] != x[i];
      }
    }
    EXPECT_GT(changed, 0) << Describe(c);
  }
}

TEST(RopeRotateTest, NormsPreserved) {
  for (const RopeConfig& c : PropertyConfigs(kHeadDim)) {
    const std::vector<float> x = RandomValues(3 * kHeads * kHeadDim, 13);
    std::vector<float> y = x;
    const std::vector<int64_t> positions = {5, 123456789, 4095};
    RotateRope(c, positions, kHeads, kHeadDim, y.data());
    for (int64_t row = 0; row < 3 * kHeads; ++row) {
      double before = 0, after = 0;
      for (int32_t d = 0; d < kHeadDim; ++d) {
        before += double{x[row * kHeadDim + d]} * x[row * kHeadDim + d];
        after += double{y[row * kHeadDim + d]} * y[row * kHeadDim + d];
      }
      EXPECT_NEAR(std::sqrt(after), std::sqrt(before), 1e-5 * std::sqrt(before))
          << Describe(c) << " row " << row;
    }
  }
}

// q at position p and k at position p - d: their rotated dot product.
double RotatedDot(const RopeConfig& c, const std::vector<float>& q, const std::vector<float>& k,
                  int64_t p, int64_t d) {
  std::vector<float> both = q;  // [2, 1, D]: token 0 is q, token 1 is k
  both.insert(both.end(), k.begin(), k.end());
  const std::vector<int64_t> positions = {p, p - d};
  RotateRope(c, positions, 1, kHeadDim, both.data());
  double dot = 0;
  for (int32_t i = 0; i < kHeadDim; ++i) dot += double{both[i]} * both[kHeadDim + i];
  return dot;
}

TEST(RopeRotateTest, DotProductDependsOnlyOnTheDistance) {
  const std::vector<float> q = RandomValues(kHeadDim, 17);
  const std::vector<float> k = RandomValues(kHeadDim, 19);
  for (const RopeConfig& c : PropertyConfigs(kHeadDim)) {
    for (int64_t d : {0, 1, 5, 300}) {
      const double near = RotatedDot(c, q, k, 400, d);
      const double far = RotatedDot(c, q, k, 20000, d);
      EXPECT_NEAR(near, far, 1e-4) << Describe(c) << " distance " << d;
    }
    // And it does depend on the distance: the rotation is not a no-op.
    EXPECT_GT(std::abs(RotatedDot(c, q, k, 400, 0) - RotatedDot(c, q, k, 400, 1)), 1e-3)
        << Describe(c);
  }
}

TEST(RopeRotateTest, HeadsShareTheRotation) {
  // Every head of a token turns by the same angles: rotating heads one at a
  // time gives the same result as rotating them together.
  for (const RopeConfig& c : PropertyConfigs(kHeadDim)) {
    const std::vector<int64_t> positions = {9, 70000};
    const std::vector<float> x = RandomValues(2 * kHeads * kHeadDim, 23);
    std::vector<float> together = x;
    RotateRope(c, positions, kHeads, kHeadDim, together.data());
    for (int32_t h = 0; h < kHeads; ++h) {
      for (size_t t = 0; t < positions.size(); ++t) {
        const int64_t at = (static_cast<int64_t>(t) * kHeads + h) * kHeadDim;
        std::vector<float> alone(x.begin() + at, x.begin() + at + kHeadDim);
        RotateRope(c, absl::MakeConstSpan(&positions[t], 1), 1, kHeadDim, alone.data());
        EXPECT_TRUE(std::equal(alone.begin(), alone.end(), together.begin() + at))
            << Describe(c) << " head " << h << " token " << t;
      }
    }
  }
}

}  // namespace
}  // namespace attnserve
