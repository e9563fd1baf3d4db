// Linear (model/linear.h) against a direct matmul: F32 and BF16 weights,
// biases, several row counts, and Linears of the same shape kept apart.
#include "model/linear.h"

#include <cmath>
#include <random>
#include <vector>

#include "core/half.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(gen);
  return v;
}

// y = x·Wᵀ + b in double, from the values as `dtype` rounds them.
std::vector<double> Expected(const std::vector<float>& x, const std::vector<float>& w,
                             const std::vector<float>& b, int64_t rows, int64_t out, int64_t in,
                             DType dtype) {
  auto round = [dtype](float v) {
    return dtype == DType::kBF16 ? Bf16ToFloat(FloatToBf16(v)) : v;
  };
  std::vector<double> y(static_cast<size_t>(rows * out));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < in; ++i) {
        s += static_cast<double>(round(x[r * in + i])) * round(w[o * in + i]);
      }
      y[r * out + o] = s;
    }
  }
  return y;
}

TEST(LinearTest, MatchesADirectMatmul) {
  const int64_t out = 48, in = 80;
  for (DType compute : {DType::kF32, DType::kBF16}) {
    if (compute == DType::kBF16 && !CpuHasBf16Matmul()) continue;
    for (bool bias : {false, true}) {
      const std::vector<float> w = Random(out * in, 1), b = bias ? Random(out, 2) : std::vector<float>{};
      absl::StatusOr<std::unique_ptr<Linear>> linear =
          Linear::Create(DType::kF32, w.data(), bias ? b.data() : nullptr, out, in, compute);
      ASSERT_TRUE(linear.ok()) << linear.status();
      for (int64_t rows : {1, 7, 64, 130}) {
        const std::vector<float> x = Random(rows * in, 3 + rows);
        std::vector<float> y(static_cast<size_t>(rows * out));
        ASSERT_TRUE((*linear)->Run(x.data(), rows, y.data()).ok());
        const std::vector<double> want = Expected(x, w, b, rows, out, in, compute);
        for (size_t i = 0; i < y.size(); ++i) {
          ASSERT_NEAR(y[i], want[i], 1e-4) << DTypeName(compute) << " rows " << rows << " at " << i;
        }
      }
    }
  }
}

TEST(LinearTest, LinearsOfOneShapeKeepTheirOwnWeights) {
  const int64_t out = 32, in = 64;
  const std::vector<float> w1 = Random(out * in, 10), w2 = Random(out * in, 11);
  auto a = Linear::Create(DType::kF32, w1.data(), nullptr, out, in, DType::kF32);
  auto b = Linear::Create(DType::kF32, w2.data(), nullptr, out, in, DType::kF32);
  ASSERT_TRUE(a.ok() && b.ok());
  const std::vector<float> x = Random(2 * in, 12);
  std::vector<float> ya(2 * out), yb(2 * out);
  ASSERT_TRUE((*a)->Run(x.data(), 2, ya.data()).ok());
  ASSERT_TRUE((*b)->Run(x.data(), 2, yb.data()).ok());
  const std::vector<double> wa = Expected(x, w1, {}, 2, out, in, DType::kF32);
  const std::vector<double> wb = Expected(x, w2, {}, 2, out, in, DType::kF32);
  for (size_t i = 0; i < ya.size(); ++i) {
    ASSERT_NEAR(ya[i], wa[i], 1e-4) << i;
    ASSERT_NEAR(yb[i], wb[i], 1e-4) << i;
  }
}

TEST(LinearTest, BadArgumentsAreRefused) {
  const float w = 1.f;
  EXPECT_EQ(Linear::Create(DType::kI32, &w, nullptr, 1, 1, DType::kF32).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Linear::Create(DType::kF32, &w, nullptr, 1, 1, DType::kF16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Linear::Create(DType::kF32, &w, nullptr, 0, 1, DType::kF32).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve
