#include "client/latency_stats.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"

namespace attnserve::client {

double Percentile(std::vector<double>& values, double q) {
  if (values.empty()) return 0;
  const size_t n = values.size();
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(n)));
  rank = std::clamp<size_t>(rank, 1, n);
  std::nth_element(values.begin(), values.begin() + (rank - 1), values.end());
  return values[rank - 1];
}

void LatencyStats::RecordOk(double latency_ms, int64_t queue_us, int64_t compute_us,
                            int32_t batch_size) {
  absl::MutexLock lock(&mu_);
  ok_ms_.push_back(latency_ms);
  sum_queue_us_ += static_cast<double>(queue_us);
  sum_compute_us_ += static_cast<double>(compute_us);
  sum_batch_size_ += batch_size;
}

void LatencyStats::RecordError(absl::StatusCode code, double latency_ms) {
  RecordError(absl::StatusCodeToString(code), latency_ms);
}

void LatencyStats::RecordError(const std::string& name, double latency_ms) {
  absl::MutexLock lock(&mu_);
  error_ms_.push_back(latency_ms);
  ++errors_[name];
}

LatencySummary LatencyStats::Summary() const {
  absl::MutexLock lock(&mu_);
  return SummarizeRange(0, 0, nullptr);
}

LatencySummary LatencyStats::SummarizeInterval() {
  absl::MutexLock lock(&mu_);
  LatencySummary s = SummarizeRange(interval_ok_, interval_err_, &interval_errors_);
  interval_ok_ = ok_ms_.size();
  interval_err_ = error_ms_.size();
  interval_errors_ = errors_;
  return s;
}

LatencySummary LatencyStats::SummarizeRange(
    size_t ok_from, size_t err_from, const std::map<std::string, int64_t>* errors_base) const {
  LatencySummary s;
  std::vector<double> ok(ok_ms_.begin() + ok_from, ok_ms_.end());
  std::vector<double> err(error_ms_.begin() + err_from, error_ms_.end());
  s.ok = static_cast<int64_t>(ok.size());
  s.errors_total = static_cast<int64_t>(err.size());
  for (const auto& [name, count] : errors_) {
    int64_t base = 0;
    if (errors_base != nullptr) {
      auto it = errors_base->find(name);
      if (it != errors_base->end()) base = it->second;
    }
    if (count > base) s.errors[name] = count - base;
  }
  if (!ok.empty()) {
    double sum = 0;
    for (double v : ok) sum += v;
    s.mean_ms = sum / static_cast<double>(ok.size());
    s.max_ms = *std::max_element(ok.begin(), ok.end());
    s.p50_ms = Percentile(ok, 0.50);
    s.p90_ms = Percentile(ok, 0.90);
    s.p99_ms = Percentile(ok, 0.99);
    s.p999_ms = Percentile(ok, 0.999);
    if (errors_base == nullptr) {
      // Server timing averages are reported for whole runs only.
      const double n = static_cast<double>(ok_ms_.size());
      s.server_queue_us = sum_queue_us_ / n;
      s.server_compute_us = sum_compute_us_ / n;
      s.server_batch_size = sum_batch_size_ / n;
    }
  }
  s.error_p50_ms = Percentile(err, 0.50);
  s.error_p99_ms = Percentile(err, 0.99);
  return s;
}

}  // namespace attnserve::client
