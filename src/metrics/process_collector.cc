#include "metrics/process_collector.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace attnserve {
namespace {

// Field numbers of proc(5), counting the pid as field 1 and the command as 2.
constexpr int kUtimeField = 14;
constexpr int kStimeField = 15;
constexpr int kStartTimeField = 22;
constexpr int kVsizeField = 23;
constexpr int kRssField = 24;

bool ReadFile(const char* path, std::string* out) {
  std::ifstream in(path);
  if (!in) return false;
  std::ostringstream text;
  text << in.rdbuf();
  *out = text.str();
  return true;
}

prometheus::MetricFamily OneValue(std::string name, std::string help, prometheus::MetricType type,
                                  double value) {
  prometheus::MetricFamily family;
  family.name = std::move(name);
  family.help = std::move(help);
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(std::move(metric));
  return family;
}

// Seconds since the epoch at boot, from the "btime" line of /proc/stat.
bool BootTimeSeconds(int64_t* btime) {
  std::string text;
  if (!ReadFile("/proc/stat", &text)) return false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, "btime ")) return absl::SimpleAtoi(line, btime);
  }
  return false;
}

// The soft limit from the "Max open files" line of /proc/self/limits.
bool MaxOpenFiles(int64_t* max_fds) {
  std::string text;
  if (!ReadFile("/proc/self/limits", &text)) return false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, "Max open files")) continue;
    std::vector<absl::string_view> words = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    return !words.empty() && absl::SimpleAtoi(words[0], max_fds);
  }
  return false;
}

}  // namespace

absl::StatusOr<ProcessStat> ParseProcStat(absl::string_view line, int64_t clock_ticks_per_s,
                                          int64_t page_size_bytes) {
  const size_t close = line.rfind(')');
  if (close == absl::string_view::npos) {
    return absl::InvalidArgumentError("proc stat: expected '(comm)' in the line, got none");
  }
  // Fields after the command start at field 3 (state).
  std::vector<absl::string_view> fields =
      absl::StrSplit(line.substr(close + 1), ' ', absl::SkipWhitespace());
  auto field = [&](int number, int64_t* value) -> absl::Status {
    const size_t index = static_cast<size_t>(number - 3);
    if (index >= fields.size()) {
      return absl::InvalidArgumentError(absl::StrCat("proc stat: expected at least ", number,
                                                     " fields, got ", fields.size() + 2));
    }
    if (!absl::SimpleAtoi(fields[index], value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("proc stat field ", number, ": expected an integer, got '", fields[index], "'"));
    }
    return absl::OkStatus();
  };
  int64_t utime = 0, stime = 0, start = 0, vsize = 0, rss = 0;
  for (auto [number, value] : {std::pair{kUtimeField, &utime}, std::pair{kStimeField, &stime},
                               std::pair{kStartTimeField, &start}, std::pair{kVsizeField, &vsize},
                               std::pair{kRssField, &rss}}) {
    if (absl::Status s = field(number, value); !s.ok()) return s;
  }
  ProcessStat stat;
  const double ticks = static_cast<double>(clock_ticks_per_s);
  stat.cpu_seconds = static_cast<double>(utime + stime) / ticks;
  stat.start_time_seconds = static_cast<double>(start) / ticks;
  stat.virtual_memory_bytes = vsize;
  stat.resident_memory_bytes = rss * page_size_bytes;
  return stat;
}

std::vector<prometheus::MetricFamily> ProcessCollector::Collect() const {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> families;

  std::string line;
  if (ReadFile("/proc/self/stat", &line)) {
    absl::StatusOr<ProcessStat> stat =
        ParseProcStat(line, sysconf(_SC_CLK_TCK), sysconf(_SC_PAGESIZE));
    if (stat.ok()) {
      families.push_back(OneValue("process_cpu_seconds_total",
                                  "Total user and system CPU time spent in seconds.",
                                  MetricType::Counter, stat->cpu_seconds));
      families.push_back(OneValue("process_resident_memory_bytes", "Resident memory size in bytes.",
                                  MetricType::Gauge,
                                  static_cast<double>(stat->resident_memory_bytes)));
      families.push_back(OneValue("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                  MetricType::Gauge,
                                  static_cast<double>(stat->virtual_memory_bytes)));
      int64_t btime = 0;
      if (BootTimeSeconds(&btime)) {
        families.push_back(OneValue("process_start_time_seconds",
                                    "Start time of the process since unix epoch in seconds.",
                                    MetricType::Gauge,
                                    static_cast<double>(btime) + stat->start_time_seconds));
      }
    }
  }

  std::error_code error;
  int64_t open_fds = 0;
  for (std::filesystem::directory_iterator it("/proc/self/fd", error), end; !error && it != end;
       it.increment(error)) {
    ++open_fds;
  }
  if (!error) {
    // The iterator's own descriptor is counted too; it is gone once the loop ends.
    families.push_back(OneValue("process_open_fds", "Number of open file descriptors.",
                                MetricType::Gauge, static_cast<double>(open_fds - 1)));
  }
  int64_t max_fds = 0;
  if (MaxOpenFiles(&max_fds)) {
    families.push_back(OneValue("process_max_fds", "Maximum number of open file descriptors.",
                                MetricType::Gauge, static_cast<double>(max_fds)));
  }
  return families;
}

}  // namespace attnserve
