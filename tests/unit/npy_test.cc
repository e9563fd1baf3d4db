// .npy reading and writing: round trips through files, the header forms NumPy
// writes (v1/v2/v3, scalars, 1-D), and rejection of malformed files.
#include "core/npy.h"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

// Builds .npy bytes by hand: magic, version, length field, header, data.
std::string NpyBytes(int major, std::string header, const std::string& data, bool pad = true) {
  const size_t len_width = major == 1 ? 2 : 4;
  if (pad) {
    const size_t unpadded = 8 + len_width + header.size() + 1;
    header.append((64 - unpadded % 64) % 64, ' ');
    header += '\n';
  }
  std::string out = "\x93NUMPY";
  out += static_cast<char>(major);
  out += '\0';
  for (size_t i = 0; i < len_width; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

template <typename T>
std::string Bytes(std::initializer_list<T> values) {
  std::string s(values.size() * sizeof(T), '\0');
  std::memcpy(s.data(), values.begin(), s.size());
  return s;
}

std::string TempPath(const std::string& name) {
  return (std::filesystem::path(::testing::TempDir()) / name).string();
}

TEST(NpyTest, RoundTripsEveryDTypeThroughAFile) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kI32}) {
    Tensor t = Tensor::Zeros(dtype, {2, 3, 4});
    for (size_t i = 0; i < t.data.size(); ++i) t.data[i] = static_cast<char>(i * 7 + 1);
    const std::string path = TempPath("round_trip.npy");
    ASSERT_TRUE(WriteNpy(path, t).ok());
    absl::StatusOr<Tensor> back = ReadNpy(path);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->dtype, dtype);
    EXPECT_EQ(back->shape, t.shape);
    EXPECT_EQ(back->data, t.data);
  }
}

TEST(NpyTest, WritesHeaderPaddedTo64Bytes) {
  Tensor t = Tensor::Zeros(DType::kF32, {5});
  const std::string path = TempPath("padded.npy");
  ASSERT_TRUE(WriteNpy(path, t).ok());
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GE(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
  EXPECT_EQ((10 + header_len) % 64, 0u);
  EXPECT_EQ(bytes[10 + header_len - 1], '\n');
  EXPECT_THAT(bytes.substr(10, header_len), HasSubstr("'shape': (5,)"));
  EXPECT_THAT(bytes.substr(10, header_len), HasSubstr("'descr': '<f4'"));
  EXPECT_EQ(bytes.size(), 10 + header_len + 20);
}

TEST(NpyTest, ScalarAndEmptyShapes) {
  Tensor scalar = Tensor::Zeros(DType::kF32, {});
  const float pi = 3.25f;
  std::memcpy(scalar.data.data(), &pi, 4);
  const std::string path = TempPath("scalar.npy");
  ASSERT_TRUE(WriteNpy(path, scalar).ok());
  absl::StatusOr<Tensor> back = ReadNpy(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->shape.empty());
  EXPECT_EQ(back->data_as<float>()[0], pi);

  absl::StatusOr<Tensor> empty =
      ParseNpy(NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", ""));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->shape, (std::vector<int64_t>{0, 3}));
  EXPECT_TRUE(empty->data.empty());
}

TEST(NpyTest, BF16IsWrittenAsF32) {
  Tensor t = Tensor::Zeros(DType::kBF16, {2});
  const uint16_t values[2] = {0x3fc0, 0xc000};  // 1.5, -2
  std::memcpy(t.data.data(), values, 4);
  const std::string path = TempPath("bf16.npy");
  ASSERT_TRUE(WriteNpy(path, t).ok());
  absl::StatusOr<Tensor> back = ReadNpy(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->dtype, DType::kF32);
  EXPECT_EQ(back->data_as<float>()[0], 1.5f);
  EXPECT_EQ(back->data_as<float>()[1], -2.f);
}

TEST(NpyTest, ReadsVersions2And3AndF64) {
  for (int major : {2, 3}) {
    absl::StatusOr<Tensor> t = ParseNpy(NpyBytes(
        major, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", Bytes<int32_t>({7, -9})));
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->dtype, DType::kI32);
    EXPECT_EQ(t->data_as<int32_t>()[1], -9);
  }
  // Key order and spacing vary between writers; f8 is narrowed to F32.
  absl::StatusOr<Tensor> f64 = ParseNpy(NpyBytes(
      1, "{'shape':(1,2),'fortran_order':False,'descr':'<f8'}", Bytes<double>({0.5, -1e300})));
  ASSERT_TRUE(f64.ok()) << f64.status();
  EXPECT_EQ(f64->dtype, DType::kF32);
  EXPECT_EQ(f64->shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(f64->data_as<float>()[0], 0.5f);
  EXPECT_EQ(f64->data_as<float>()[1], -std::numeric_limits<float>::infinity());
  // i8 (NumPy's default integer) is narrowed to I32 when every value fits.
  absl::StatusOr<Tensor> i64 = ParseNpy(NpyBytes(
      1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", Bytes<int64_t>({5, -1, 2147483647})));
  ASSERT_TRUE(i64.ok()) << i64.status();
  EXPECT_EQ(i64->dtype, DType::kI32);
  EXPECT_EQ(i64->data_as<int32_t>()[1], -1);
  EXPECT_EQ(i64->data_as<int32_t>()[2], 2147483647);
  absl::StatusOr<Tensor> wide = ParseNpy(NpyBytes(
      1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", Bytes<int64_t>({1, int64_t{1} << 40})));
  ASSERT_FALSE(wide.ok());
  EXPECT_THAT(std::string(wide.status().message()), HasSubstr("1099511627776 at element 1"));
}

TEST(NpyTest, RejectsMalformedFiles) {
  const std::string f4x2 = Bytes<float>({1.f, 2.f});
  struct Bad {
    std::string bytes;
    std::string message;
  };
  const Bad cases[] = {
      {"", "magic"},
      {"\x93NUMPX\x01\x00", "magic"},
      {NpyBytes(4, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", f4x2), "version"},
      {NpyBytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", f4x2), "'>f4'"},
      {NpyBytes(1, "{'descr': '<u1', 'fortran_order': False, 'shape': (2,), }", f4x2), "'<u1'"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", f4x2),
       "fortran_order"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", f4x2),
       "expected 12 bytes"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", f4x2),
       "expected 4 bytes"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", f4x2), "shape"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': [2], }", f4x2), "shape"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, }", f4x2), "lacks"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", f4x2),
       "'x'"},
      {NpyBytes(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", f4x2),
       "structured"},
      {NpyBytes(1, "'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", f4x2), "'{'"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } junk", f4x2),
       "trailing"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,) 'x'", f4x2), "','"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, "
                   "99999999999), }",
                f4x2),
       "elements"},
      {NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
                f4x2),
       "shape"},
      // Header length pointing past the end of the file.
      {std::string("\x93NUMPY\x01\x00\xff\x7f{'descr'", 18), "header length"},
      {std::string("\x93NUMPY\x02\x00\xff\xff\xff\x7f", 12), "header length"},
      {std::string("\x93NUMPY\x02\x00\x01", 9), "truncated"},
  };
  for (const Bad& bad : cases) {
    absl::StatusOr<Tensor> t = ParseNpy(bad.bytes);
    ASSERT_FALSE(t.ok()) << bad.message;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_THAT(std::string(t.status().message()), HasSubstr(bad.message)) << t.status();
  }
}

TEST(NpyTest, EveryTruncationAndHeaderByteFlipFailsCleanly) {
  const std::string good =
      NpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }", Bytes<float>({1, 2}));
  ASSERT_TRUE(ParseNpy(good).ok());
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_EQ(ParseNpy(good.substr(0, n)).status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
  // Any byte of the header replaced: either still a valid file or an error, never a crash.
  for (size_t i = 0; i < good.size() - 8; ++i) {
    for (char c : {'\0', '(', ')', ',', '\'', '9', '{', '}', '\xff'}) {
      std::string bytes = good;
      bytes[i] = c;
      absl::StatusOr<Tensor> t = ParseNpy(bytes);
      if (t.ok()) {
        EXPECT_EQ(t->data.size(), static_cast<size_t>(t->num_elements()) * DTypeSize(t->dtype));
      }
    }
  }
}

TEST(NpyTest, MissingFileIsNotFoundAndMessageNamesThePath) {
  absl::StatusOr<Tensor> t = ReadNpy(TempPath("does_not_exist.npy"));
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("does_not_exist.npy"));

  const std::string path = TempPath("bad.npy");
  std::ofstream(path, std::ios::binary) << "not numpy";
  t = ReadNpy(path);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("bad.npy"));
}

TEST(NpyTest, WriteRejectsInconsistentTensorAndUnwritablePath) {
  Tensor t = Tensor::Zeros(DType::kF32, {2});
  t.data.resize(3);
  EXPECT_EQ(WriteNpy(TempPath("x.npy"), t).code(), absl::StatusCode::kInvalidArgument);
  Tensor ok = Tensor::Zeros(DType::kF32, {2});
  EXPECT_FALSE(WriteNpy("/nonexistent-dir/x.npy", ok).ok());
}

}  // namespace
}  // namespace attnserve
