#include "metrics/session_metrics.h"

#include "prometheus/family.h"

namespace attnserve {

SessionMetrics::SessionMetrics(prometheus::Registry& registry) {
  auto& cache = prometheus::BuildGauge()
                    .Name("attnserve_kv_cache_bytes")
                    .Help("KV cache memory: bytes in use by sessions, and the --kv_cache_bytes bound")
                    .Register(registry);
  used_bytes_ = &cache.Add({{"state", "used"}});
  capacity_bytes_ = &cache.Add({{"state", "capacity"}});
  sessions_active_ = &prometheus::BuildGauge()
                          .Name("attnserve_sessions_active")
                          .Help("Open KV-cache sessions")
                          .Register(registry)
                          .Add({});
  evictions_ = &prometheus::BuildCounter()
                    .Name("attnserve_kv_evictions_total")
                    .Help("Idle sessions evicted to make room in a full KV cache (--kv_eviction=lru_idle)")
                    .Register(registry)
                    .Add({});
  expirations_ = &prometheus::BuildCounter()
                      .Name("attnserve_kv_expirations_total")
                      .Help("Sessions closed after --session_idle_timeout_s without use")
                      .Register(registry)
                      .Add({});
}

void SessionMetrics::Update(const SessionStats& stats) {
  used_bytes_->Set(static_cast<double>(stats.used_bytes));
  capacity_bytes_->Set(static_cast<double>(stats.capacity_bytes));
  sessions_active_->Set(static_cast<double>(stats.sessions_active));
  absl::MutexLock lock(&mu_);
  if (stats.evictions_total > evictions_seen_) {
    evictions_->Increment(static_cast<double>(stats.evictions_total - evictions_seen_));
    evictions_seen_ = stats.evictions_total;
  }
  if (stats.expirations_total > expirations_seen_) {
    expirations_->Increment(static_cast<double>(stats.expirations_total - expirations_seen_));
    expirations_seen_ = stats.expirations_total;
  }
}

}  // namespace attnserve
