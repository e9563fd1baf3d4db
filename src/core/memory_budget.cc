#include "core/memory_budget.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace attnserve {

MemoryBudget::Reservation& MemoryBudget::Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = other.budget_;
    bytes_ = other.bytes_;
    other.budget_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void MemoryBudget::Reservation::Release() {
  if (budget_ != nullptr) budget_->Return(bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

MemoryBudget::MemoryBudget(int64_t limit_bytes, std::function<void(int64_t)> on_change,
                           std::string origin)
    : limit_bytes_(limit_bytes),
      on_change_(std::move(on_change)),
      origin_(origin.empty() ? absl::StrCat("--memory_limit_bytes=", limit_bytes) : origin) {}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::Reserve(int64_t bytes,
                                                                absl::string_view what) {
  if (bytes < 0) bytes = 0;
  absl::MutexLock lock(&mu_);
  if (bytes > limit_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "memory budget: ", what, " needs ", HumanBytes(bytes), " (", bytes,
        " bytes), more than the whole budget of ", HumanBytes(limit_bytes_), " (", origin_, ")"));
  }
  if (reserved_ + bytes > limit_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "memory budget: ", what, " needs ", HumanBytes(bytes), " (", bytes, " bytes) but ",
        HumanBytes(reserved_), " of the ", HumanBytes(limit_bytes_), " budget (", origin_,
        ") are held by requests in flight; retry later"));
  }
  reserved_ += bytes;
  if (on_change_) on_change_(reserved_);
  return Reservation(this, bytes);
}

int64_t MemoryBudget::reserved_bytes() const {
  absl::MutexLock lock(&mu_);
  return reserved_;
}

void MemoryBudget::Return(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  reserved_ -= bytes;
  if (on_change_) on_change_(reserved_);
}

std::string HumanBytes(int64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double x = static_cast<double>(bytes);
  int unit = 0;
  while ((x >= 1024 || x <= -1024) && unit < 6) {
    x /= 1024;
    ++unit;
  }
  if (unit == 0) return absl::StrCat(bytes, " B");
  return absl::StrFormat("%.4g %s", x, kUnits[unit]);
}

namespace {

// The first line of `path` as a byte count; nullopt-like -1 when the file is
// missing, says "max" (no limit) or holds no number.
int64_t ReadLimitFile(const char* path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return -1;
  int64_t value = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &value) || value <= 0) return -1;
  return value;
}

}  // namespace

SystemMemory DetectSystemMemory() {
  const int64_t physical =
      static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  // cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
  for (const auto& [path, source] : {
           std::pair{"/sys/fs/cgroup/memory.max", "cgroup v2 memory.max"},
           std::pair{"/sys/fs/cgroup/memory/memory.limit_in_bytes", "cgroup v1 memory.limit_in_bytes"},
       }) {
    const int64_t limit = ReadLimitFile(path);
    if (limit > 0 && (physical <= 0 || limit < physical)) return {limit, source};
  }
  return {physical, "physical memory"};
}

absl::StatusOr<int64_t> DefaultMemoryLimit(const SystemMemory& system, int64_t kv_cache_bytes,
                                           std::string* derivation, int64_t model_bytes) {
  const int64_t usable = static_cast<int64_t>(static_cast<double>(system.bytes) *
                                              kDefaultBudgetFraction);
  const int64_t budget = usable - kv_cache_bytes - model_bytes - kProcessBaselineBytes;
  const std::string models =
      model_bytes > 0 ? absl::StrCat(" - model weights (", HumanBytes(model_bytes), ")") : "";
  const std::string how = absl::StrFormat(
      "%.0f%% of %s (%s) - --kv_cache_bytes (%s)%s - %s for the process itself = %s",
      kDefaultBudgetFraction * 100, system.source, HumanBytes(system.bytes),
      HumanBytes(kv_cache_bytes), models, HumanBytes(kProcessBaselineBytes), HumanBytes(budget));
  if (budget < kMinBudgetBytes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "memory_limit_bytes: cannot derive a default: ", how, ", less than the minimum ",
        HumanBytes(kMinBudgetBytes), "; lower --kv_cache_bytes or set --memory_limit_bytes"));
  }
  if (derivation != nullptr) *derivation = how;
  return budget;
}

}  // namespace attnserve
