// Tensor::Zeros and CheckedElementCount: storage always matches the shape, and
// a shape whose element or byte count does not fit (or that has a negative dim)
// aborts instead of yielding a tensor with too little data.
#include "core/tensor.h"

#include <cstdint>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(TensorZerosTest, StorageMatchesShapeAndDType) {
  const Tensor f32 = Tensor::Zeros(DType::kF32, {2, 3, 4});
  EXPECT_EQ(f32.num_elements(), 24);
  EXPECT_EQ(f32.data.size(), 24u * 4);
  EXPECT_EQ(f32.data, std::string(24 * 4, '\0'));

  EXPECT_EQ(Tensor::Zeros(DType::kBF16, {5, 7}).data.size(), 35u * 2);
  EXPECT_EQ(Tensor::Zeros(DType::kI32, {3}).data.size(), 3u * 4);
  // A scalar has one element.
  EXPECT_EQ(Tensor::Zeros(DType::kF16, {}).data.size(), 2u);
}

TEST(TensorZerosTest, ZeroDimGivesEmptyDataWhateverTheOtherDims) {
  const Tensor t = Tensor::Zeros(DType::kF32, {INT64_MAX, 0, INT64_MAX});
  EXPECT_EQ(t.num_elements(), 0);
  EXPECT_TRUE(t.data.empty());
}

TEST(TensorZerosDeathTest, NegativeDimAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(Tensor::Zeros(DType::kF32, {2, -1, 3}), "Tensor::Zeros: shape \\[2, -1, 3\\]");
}

TEST(TensorZerosDeathTest, ElementCountOverflowAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(Tensor::Zeros(DType::kF32, {int64_t{1} << 32, int64_t{1} << 32}),
               "Tensor::Zeros: shape .* x F32");
}

// The element count fits in int64 but the byte count does not: 2^62 F32
// elements are 2^64 bytes (0 in size_t arithmetic), 2^62 BF16 elements 2^63.
TEST(TensorZerosDeathTest, ByteCountOverflowAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(Tensor::Zeros(DType::kF32, {int64_t{1} << 62}), "Tensor::Zeros: shape .* x F32");
  EXPECT_DEATH(Tensor::Zeros(DType::kBF16, {int64_t{1} << 31, int64_t{1} << 31}),
               "Tensor::Zeros: shape .* x BF16");
}

TEST(CheckedElementCountTest, CountsOrReportsOverflow) {
  EXPECT_EQ(CheckedElementCount({}), 1);
  EXPECT_EQ(CheckedElementCount({2, 3, 4}), 24);
  EXPECT_EQ(CheckedElementCount({2, -3}), -1);
  EXPECT_EQ(CheckedElementCount({int64_t{1} << 32, int64_t{1} << 32}), -1);
  EXPECT_EQ(CheckedElementCount({int64_t{1} << 32, int64_t{1} << 32, 0}), 0);
  EXPECT_EQ(CheckedElementCount({10, 10}, 100), 100);
  EXPECT_EQ(CheckedElementCount({10, 11}, 100), -1);
}

}  // namespace
}  // namespace attnserve
