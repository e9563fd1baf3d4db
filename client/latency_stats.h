// LatencyStats: the latencies and outcomes of a load run, and the summary
// attnctl bench prints (throughput, percentiles, errors by status code).
// Thread-safe: recorders on gRPC threads, a reader for the progress line.
#ifndef ATTNSERVE_CLIENT_LATENCY_STATS_H_
#define ATTNSERVE_CLIENT_LATENCY_STATS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace attnserve::client {

// Nearest-rank percentile (q in [0, 1]) of `values`, which it sorts; 0 if empty.
double Percentile(std::vector<double>& values, double q);

struct LatencySummary {
  int64_t ok = 0;
  int64_t errors_total = 0;
  std::map<std::string, int64_t> errors;  // status code name -> count
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, p999_ms = 0, mean_ms = 0, max_ms = 0;
  // Latency of failed calls (e.g. rejections under overload).
  double error_p50_ms = 0, error_p99_ms = 0;
  // Averages of the server's own timing over successful calls.
  double server_queue_us = 0, server_compute_us = 0, server_batch_size = 0;
};

class LatencyStats {
 public:
  // Records a successful call with its latency and the server's timing.
  void RecordOk(double latency_ms, int64_t queue_us, int64_t compute_us, int32_t batch_size);
  // Records a failed call under its status code name.
  void RecordError(absl::StatusCode code, double latency_ms);
  // Records a failure that never reached the server, under `name`.
  void RecordError(const std::string& name, double latency_ms);

  // Everything recorded so far.
  LatencySummary Summary() const;
  // What was recorded since the previous call of SummarizeInterval.
  LatencySummary SummarizeInterval();

 private:
  LatencySummary SummarizeRange(size_t ok_from, size_t err_from,
                                const std::map<std::string, int64_t>* errors_base) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::vector<double> ok_ms_ ABSL_GUARDED_BY(mu_);
  std::vector<double> error_ms_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> errors_ ABSL_GUARDED_BY(mu_);
  double sum_queue_us_ ABSL_GUARDED_BY(mu_) = 0;
  double sum_compute_us_ ABSL_GUARDED_BY(mu_) = 0;
  double sum_batch_size_ ABSL_GUARDED_BY(mu_) = 0;
  // Where the previous interval ended.
  size_t interval_ok_ ABSL_GUARDED_BY(mu_) = 0;
  size_t interval_err_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, int64_t> interval_errors_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_LATENCY_STATS_H_
