// Reading the golden data under tests/golden/ (see its README): the case
// directories of one kind, a case.txt of key=value options, .npy tensors,
// and option values. Failures are reported as gtest failures.
#ifndef ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_
#define ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
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

}  // namespace attnserve::golden

#endif  // ATTNSERVE_TESTS_UNIT_GOLDEN_FILES_H_
