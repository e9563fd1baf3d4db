// ProcessCollector: the standard Prometheus process_* metrics (resident and
// virtual memory, CPU seconds, open file descriptors, start time), read from
// /proc/self at scrape time so they cost nothing between scrapes.
//
// Thread-safe: Collect() keeps no state and may run on any thread.
#ifndef ATTNSERVE_METRICS_PROCESS_COLLECTOR_H_
#define ATTNSERVE_METRICS_PROCESS_COLLECTOR_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace attnserve {

// What /proc/self/stat says, converted to base units.
struct ProcessStat {
  double cpu_seconds = 0;        // user + system
  double start_time_seconds = 0; // since boot; add the boot time for the epoch
  int64_t virtual_memory_bytes = 0;
  int64_t resident_memory_bytes = 0;
};

// Parses the one line of /proc/<pid>/stat (proc(5)). The command name may hold
// spaces and parentheses, so fields are counted after its last ')'.
// INVALID_ARGUMENT when the line is cut short or a field is not a number.
absl::StatusOr<ProcessStat> ParseProcStat(absl::string_view line, int64_t clock_ticks_per_s,
                                          int64_t page_size_bytes);

class ProcessCollector : public prometheus::Collectable {
 public:
  // Families: process_cpu_seconds_total, process_resident_memory_bytes,
  // process_virtual_memory_bytes, process_open_fds, process_max_fds,
  // process_start_time_seconds. A file that cannot be read leaves its families
  // out of this scrape rather than reporting a wrong zero.
  std::vector<prometheus::MetricFamily> Collect() const override;
};

}  // namespace attnserve

#endif  // ATTNSERVE_METRICS_PROCESS_COLLECTOR_H_
