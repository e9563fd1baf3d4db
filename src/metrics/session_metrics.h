// SessionMetrics: the KV-cache series of docs/ARCHITECTURE.md —
// attnserve_kv_cache_bytes{state="used|capacity|shared"},
// attnserve_kv_blocks_shared, attnserve_sessions_active,
// attnserve_session_forks_total, attnserve_kv_evictions_total{reason} (plus
// attnserve_kv_expirations_total) — set from SessionStore::stats() whenever
// the caller reports them.
// Thread-safe.
#ifndef ATTNSERVE_METRICS_SESSION_METRICS_H_
#define ATTNSERVE_METRICS_SESSION_METRICS_H_

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/session_store.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace attnserve {

class SessionMetrics {
 public:
  // Registers the series in `registry`, which must outlive this object.
  explicit SessionMetrics(prometheus::Registry& registry);

  // Sets the series from `stats` (counters move by the difference).
  void Update(const SessionStats& stats);

 private:
  prometheus::Gauge* used_bytes_;
  prometheus::Gauge* capacity_bytes_;
  prometheus::Gauge* shared_bytes_;
  prometheus::Gauge* shared_blocks_;
  prometheus::Gauge* sessions_active_;
  prometheus::Counter* forks_;
  prometheus::Counter* evicted_lru_;      // {reason="lru_idle"}
  prometheus::Counter* evicted_expired_;  // {reason="expired"}
  prometheus::Counter* evicted_window_;   // {reason="window"}
  prometheus::Counter* expirations_;

  absl::Mutex mu_;
  SessionStats seen_ ABSL_GUARDED_BY(mu_);  // the counters as last reported
};

}  // namespace attnserve

#endif  // ATTNSERVE_METRICS_SESSION_METRICS_H_
