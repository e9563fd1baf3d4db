#include "metrics/session_metrics.h"

#include "prometheus/family.h"

namespace attnserve {

namespace {

// Moves `counter` by how far `now` is past `*seen`.
void Advance(prometheus::Counter* counter, int64_t now, int64_t* seen) {
  if (now > *seen) {
    counter->Increment(static_cast<double>(now - *seen));
    *seen = now;
  }
}

}  // namespace

SessionMetrics::SessionMetrics(prometheus::Registry& registry) {
  auto& cache = prometheus::BuildGauge()
                    .Name("attnserve_kv_cache_bytes")
                    .Help("KV cache memory: bytes in use by sessions, of them in blocks shared by "
                          "more than one session (each counted once), and the --kv_cache_bytes bound")
                    .Register(registry);
  used_bytes_ = &cache.Add({{"state", "used"}});
  capacity_bytes_ = &cache.Add({{"state", "capacity"}});
  shared_bytes_ = &cache.Add({{"state", "shared"}});
  shared_blocks_ = &prometheus::BuildGauge()
                        .Name("attnserve_kv_blocks_shared")
                        .Help("KV cache blocks held by more than one session (ForkSession)")
                        .Register(registry)
                        .Add({});
  sessions_active_ = &prometheus::BuildGauge()
                          .Name("attnserve_sessions_active")
                          .Help("Open KV-cache sessions")
                          .Register(registry)
                          .Add({});
  forks_ = &prometheus::BuildCounter()
                .Name("attnserve_session_forks_total")
                .Help("Sessions created by ForkSession")
                .Register(registry)
                .Add({});
  auto& evictions = prometheus::BuildCounter()
                        .Name("attnserve_kv_evictions_total")
                        .Help("KV cache evictions: idle sessions evicted to make room "
                              "(reason=lru_idle, --kv_eviction=lru_idle), idle sessions expired "
                              "(reason=expired), blocks freed as a sinks session's window moved "
                              "(reason=window)")
                        .Register(registry);
  evicted_lru_ = &evictions.Add({{"reason", "lru_idle"}});
  evicted_expired_ = &evictions.Add({{"reason", "expired"}});
  evicted_window_ = &evictions.Add({{"reason", "window"}});
  expirations_ = &prometheus::BuildCounter()
                      .Name("attnserve_kv_expirations_total")
                      .Help("Sessions closed after --session_idle_timeout_s without use")
                      .Register(registry)
                      .Add({});
}

void SessionMetrics::Update(const SessionStats& stats) {
  used_bytes_->Set(static_cast<double>(stats.used_bytes));
  capacity_bytes_->Set(static_cast<double>(stats.capacity_bytes));
  shared_bytes_->Set(static_cast<double>(stats.shared_bytes));
  shared_blocks_->Set(static_cast<double>(stats.shared_blocks));
  sessions_active_->Set(static_cast<double>(stats.sessions_active));
  absl::MutexLock lock(&mu_);
  Advance(evicted_lru_, stats.evictions_total, &seen_.evictions_total);
  const int64_t expired_before = seen_.expirations_total;
  Advance(evicted_expired_, stats.expirations_total, &seen_.expirations_total);
  int64_t expired_seen = expired_before;
  Advance(expirations_, stats.expirations_total, &expired_seen);
  Advance(evicted_window_, stats.window_blocks_freed_total, &seen_.window_blocks_freed_total);
  Advance(forks_, stats.forks_total, &seen_.forks_total);
}

}  // namespace attnserve
