// F16 and BF16 conversions: exhaustive round trips of every 16-bit pattern,
// rounding of halfway cases to even, overflow, subnormals and NaN.
#include "core/half.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

bool IsHalfNan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

// The value of a binary16 pattern computed from its definition, independent of
// the bit manipulation in HalfToFloat.
double HalfValue(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exp == 0x1f) return mant ? std::nan("") : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}

TEST(HalfTest, EveryF16ValueConvertsExactlyAndRoundTrips) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfToFloat(h);
    if (IsHalfNan(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << bits;
      EXPECT_TRUE(IsHalfNan(FloatToHalf(f))) << std::hex << bits;
      EXPECT_EQ(FloatToHalf(f) & 0x8000u, h & 0x8000u) << "sign of NaN " << std::hex << bits;
      continue;
    }
    EXPECT_EQ(static_cast<double>(f), HalfValue(h)) << std::hex << bits;
    EXPECT_EQ(FloatToHalf(f), h) << std::hex << bits;  // also keeps the sign of zero
  }
}

TEST(HalfTest, F16RoundsHalfwayCasesToEven) {
  // Every pair of adjacent finite halves (a, b): the midpoint rounds to the even
  // one, and the floats just inside it round to the nearer one.
  for (uint32_t bits = 0; bits < 0x7bff; ++bits) {
    for (uint32_t sign : {0u, 0x8000u}) {
      const uint16_t a = static_cast<uint16_t>(bits | sign);
      const uint16_t b = static_cast<uint16_t>((bits + 1) | sign);
      const float fa = HalfToFloat(a), fb = HalfToFloat(b);
      const float mid = static_cast<float>((double(fa) + double(fb)) / 2);  // exact in float
      ASSERT_EQ(double(mid), (double(fa) + double(fb)) / 2);
      const uint16_t even = (a & 1u) == 0 ? a : b;
      EXPECT_EQ(FloatToHalf(mid), even) << std::hex << bits << " sign " << sign;
      EXPECT_EQ(FloatToHalf(std::nextafter(mid, fa)), a) << std::hex << bits;
      EXPECT_EQ(FloatToHalf(std::nextafter(mid, fb)), b) << std::hex << bits;
    }
  }
}

TEST(HalfTest, F16OverflowAndInfinity) {
  constexpr float kMax = 65504.f;
  EXPECT_EQ(FloatToHalf(kMax), 0x7bffu);
  EXPECT_EQ(FloatToHalf(-kMax), 0xfbffu);
  // 65520 is halfway between the largest half and 2^16: ties to even -> inf.
  EXPECT_EQ(FloatToHalf(65520.f), 0x7c00u);
  EXPECT_EQ(FloatToHalf(std::nextafter(65520.f, 0.f)), 0x7bffu);
  EXPECT_EQ(FloatToHalf(1e6f), 0x7c00u);
  EXPECT_EQ(FloatToHalf(-1e30f), 0xfc00u);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::max()), 0x7c00u);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xfc00u);
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7c00u)));
}

TEST(HalfTest, F16Subnormals) {
  const float min_subnormal = std::ldexp(1.f, -24);
  EXPECT_EQ(FloatToHalf(min_subnormal), 0x0001u);
  EXPECT_EQ(HalfToFloat(0x0001u), min_subnormal);
  EXPECT_EQ(HalfToFloat(0x03ffu), std::ldexp(1023.f, -24));  // largest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.f, -14)), 0x0400u);     // smallest normal
  // Half of the smallest subnormal is a tie with zero: rounds to even (zero).
  EXPECT_EQ(FloatToHalf(std::ldexp(1.f, -25)), 0x0000u);
  EXPECT_EQ(FloatToHalf(std::nextafter(std::ldexp(1.f, -25), 1.f)), 0x0001u);
  EXPECT_EQ(FloatToHalf(-std::ldexp(1.f, -25)), 0x8000u);
  // 1.5 * 2^-24 is a tie between 1 and 2 subnormal units: rounds to 2.
  EXPECT_EQ(FloatToHalf(std::ldexp(3.f, -25)), 0x0002u);
  // Float subnormals are far below the half range.
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::denorm_min()), 0x0000u);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::denorm_min()), 0x8000u);
}

TEST(HalfTest, F16NanStaysNan) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(IsHalfNan(FloatToHalf(nan)));
  EXPECT_TRUE(IsHalfNan(FloatToHalf(-nan)));
  // A NaN whose payload sits only in the low float bits must not become inf.
  EXPECT_TRUE(IsHalfNan(FloatToHalf(std::bit_cast<float>(0x7f800001u))));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00u)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7c01u)));
}

TEST(Bf16Test, EveryBf16ValueConvertsExactlyAndRoundTrips) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = Bf16ToFloat(h);
    EXPECT_EQ(std::bit_cast<uint32_t>(f), bits << 16) << std::hex << bits;
    if (IsBf16Nan(h)) {
      EXPECT_TRUE(std::isnan(f));
      EXPECT_TRUE(IsBf16Nan(FloatToBf16(f))) << std::hex << bits;
    } else {
      EXPECT_EQ(FloatToBf16(f), h) << std::hex << bits;
    }
  }
}

TEST(Bf16Test, RoundsHalfwayCasesToEven) {
  // For every bf16 pattern below inf: the float halfway to the next pattern
  // rounds to the even one, one float ulp either side rounds to the nearer.
  for (uint32_t bits = 0; bits < 0x7f7f; ++bits) {
    for (uint32_t sign : {0u, 0x8000u}) {
      const uint32_t a = bits | sign;
      const uint32_t mid_bits = ((bits << 16) | 0x8000u) | (sign << 16);
      const float mid = std::bit_cast<float>(mid_bits);
      const uint16_t even = (a & 1u) == 0 ? static_cast<uint16_t>(a) : static_cast<uint16_t>(a + 1);
      EXPECT_EQ(FloatToBf16(mid), even) << std::hex << bits;
      EXPECT_EQ(FloatToBf16(std::bit_cast<float>(mid_bits - 1)), a) << std::hex << bits;
      EXPECT_EQ(FloatToBf16(std::bit_cast<float>(mid_bits + 1)), a + 1) << std::hex << bits;
    }
  }
}

TEST(Bf16Test, OverflowSubnormalsAndNan) {
  // Largest finite bf16 is 0x7f7f; the float halfway above it ties to even -> inf.
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x7f7f8000u)), 0x7f80u);
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x7f7f7fffu)), 0x7f7fu);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80u);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80u);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80u);
  // bf16 shares float's exponent: float subnormals round like any other value.
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x00010000u)), 0x0001u);
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x00008000u)), 0x0000u);  // tie -> even (zero)
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x00018000u)), 0x0002u);  // tie -> even (2)
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(std::numeric_limits<float>::quiet_NaN())));
  // Payload only in the truncated bits: must stay NaN, not round to inf.
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(std::bit_cast<float>(0x7f800001u))));
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(std::bit_cast<float>(0xff80ffffu))));
}

TEST(LoadStoreTest, GoThroughTheDTypeConversions) {
  uint16_t h[2] = {};
  StoreFloat(h, DType::kF16, 1, 1.5f);
  EXPECT_EQ(h[1], 0x3e00u);
  EXPECT_EQ(LoadFloat(h, DType::kF16, 1), 1.5f);
  StoreFloat(h, DType::kBF16, 0, -2.f);
  EXPECT_EQ(h[0], 0xc000u);
  EXPECT_EQ(LoadFloat(h, DType::kBF16, 0), -2.f);
  float f[1] = {};
  StoreFloat(f, DType::kF32, 0, 0.1f);
  EXPECT_EQ(LoadFloat(f, DType::kF32, 0), 0.1f);
}

}  // namespace
}  // namespace attnserve
