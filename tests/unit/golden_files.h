// Reading the golden data under tests/golden/ (see its README): the case
// directories of one kind, a case.txt of key=value options, .npy tensors,
// and option values. Failures are reported as gtest failures.
#ifndef ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_
#define ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "core/npy.h"
#include "core/tensor.h"
#include "gtest/gtest.h"

namespace attnserve::golden {

// tests/golden/<kind> ("cases", "rope").
inline std::filesystem::path Dir(const std::string& kind) {
  return std::filesystem::path(ATTNSERVE_GOLDEN_DIR) / kind;
}

// The case directories under Dir(kind), sorted.
inline std::vector<std::string> CaseNames(const std::string& kind) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(Dir(kind), ec)) {
    if (entry.is_directory()) names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// A case.txt: one key=value per line.
inline std::map<std::string, std::string> ReadOptions(const std::filesystem::path& path) {
  std::map<std::string, std::string> options;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    EXPECT_NE(eq, std::string::npos) << path << ": line without '=': " << line;
    if (eq == std::string::npos) continue;
    options[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return options;
}

inline Tensor MustRead(const std::filesystem::path& path) {
  absl::StatusOr<Tensor> t = ReadNpy(path.string());
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : Tensor{};
}

inline double ToDouble(const std::string& s) {
  double d = 0;
  EXPECT_TRUE(absl::SimpleAtod(s, &d)) << "not a number: '" << s << "'";
  return d;
}

inline int32_t ToInt(const std::string& s) {
  int32_t i = 0;
  EXPECT_TRUE(absl::SimpleAtoi(s, &i)) << "not an integer: '" << s << "'";
  return i;
}

// core/npy has no int64 dtype, so a positions.npy (1-D <i8) is parsed here:
// the magic, a version 1 (uint16 header length) or 2/3 (uint32) header, then
// little-endian int64 data.
inline std::vector<int64_t> ReadPositions(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    ADD_FAILURE() << path << ": not a .npy file";
    return {};
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    header_start = 10;
  } else {
    for (int i = 3; i >= 0; --i) {
      header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    }
    header_start = 12;
  }
  if (header_start + header_len > bytes.size()) {
    ADD_FAILURE() << path << ": truncated header";
    return {};
  }
  const std::string header = bytes.substr(header_start, header_len);
  EXPECT_NE(header.find("'descr': '<i8'"), std::string::npos) << path;
  EXPECT_NE(header.find("'fortran_order': False"), std::string::npos) << path;
  const size_t shape_at = header.find("'shape': (");
  int64_t count = -1;
  if (shape_at != std::string::npos) {
    const size_t from = shape_at + std::strlen("'shape': (");
    const size_t comma = header.find(',', from);
    EXPECT_TRUE(absl::SimpleAtoi(header.substr(from, comma - from), &count)) << header;
    EXPECT_EQ(header.substr(comma, 2), ",)") << path << ": expected a 1-D shape, got " << header;
  }
  const size_t data_start = header_start + header_len;
  EXPECT_EQ(static_cast<int64_t>(bytes.size() - data_start), count * 8) << path;
  if (count < 0 || static_cast<int64_t>(bytes.size() - data_start) != count * 8) return {};
  std::vector<int64_t> positions(count);
  std::memcpy(positions.data(), bytes.data() + data_start, count * 8);  // little-endian host
  return positions;
}

}  // namespace attnserve::golden

#endif  // ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_
