// Metrics: attnserve's Prometheus metrics (names in docs/ARCHITECTURE.md) and, when asked,
// the HTTP endpoint that serves them (GET /metrics). It owns the registry, the
// process_* collector and the exposer, and it is the scheduler's observer, so
// queue and batch metrics come from where they happen. No gRPC here: request
// outcomes are recorded with absl status codes, whose names are gRPC's.
//
// Thread-safe: every method may be called from any thread. Recording costs a
// few atomic operations (series handles are created once, then cached).
#ifndef ATTNSERVE_METRICS_METRICS_H_
#define ATTNSERVE_METRICS_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "backends/backend.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "scheduler/scheduler.h"

namespace attnserve {

struct MetricsOptions {
  // "host:port" for the HTTP endpoint; port 0 picks a free one (see
  // http_port()). Empty: no endpoint (tests scrape with TextFormat()).
  std::string listen_address;
  std::string version = ATTNSERVE_VERSION;  // attnserve_build_info{version}
  std::vector<std::string> backends;        // attnserve_build_info{backends}, comma-joined
  // attnserve_queue_capacity: the scheduler's queue bound in requests
  // (SchedulerOptions::queue_capacity), the denominator of queue saturation.
  // 0: the gauge is not exported.
  int64_t queue_capacity = 0;
  // attnserve_memory_limit_bytes: what requests may reserve (three quarters
  // of --memory_limit_bytes).
  // 0: the budget gauges are not exported.
  int64_t memory_limit_bytes = 0;
  // attnserve_shm_regions and attnserve_shm_bytes (--allow_shared_memory).
  // false: not exported.
  bool shared_memory = false;
};

// Bucket upper bounds, in seconds, for durations from ~20 µs (a tiny request's
// compute) to ~80 s (a long prefill behind a full queue), doubling each time.
std::vector<double> DurationBuckets();
// Upper bounds for requests per batch: 1, 2, 4, ... 1024.
std::vector<double> BatchSizeBuckets();
// Upper bounds, in nats, for attention entropy (−Σ p·ln p of one query row):
// 0 (all weight on one key) up to 12 (ln of ~160k keys, uniform), finer near
// 0 where a collapsed head shows; a row over Lk keys is at most ln(Lk)
// (ln 128 ≈ 4.9, ln 4096 ≈ 8.3, ln 131072 ≈ 11.8).
std::vector<double> EntropyBuckets();

// The most entropy values one sampled request contributes to
// attnserve_attention_entropy_nats; a request with more observes a strided
// sample of them (Metrics::RecordAttentionEntropy).
inline constexpr int64_t kMaxEntropyValuesPerRequest = 4096;
// Model-session layers labelled by number; deeper ones share layer="256+".
inline constexpr int32_t kEntropyLayerLabels = 256;

class Metrics : public SchedulerObserver {
 public:
  // UNAVAILABLE when the endpoint cannot listen on `listen_address`.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const MetricsOptions& options);
  ~Metrics() override;

  // One finished call of `method` ("Attend", "GetServerInfo", one request of
  // "AttendStream") with its status code and receipt-to-answer time.
  // `method` must be one of a small fixed set (a label value).
  void RecordRequest(absl::string_view method, absl::StatusCode code, absl::Duration duration);

  // attnserve_cancelled_requests_total{method}: the client cancelled a call or
  // its deadline passed, counted when the server learns of it (the call is
  // still answered and recorded by RecordRequest later).
  void RecordCancellation(absl::string_view method);

  // attnserve_rejected_requests_total{reason}: a request refused with
  // RESOURCE_EXHAUSTED before it was queued. `reason` is one of "memory" (the
  // memory budget), "queue" (the scheduler queue is full), "cost"
  // (--max_request_flops) or "size" (an output over the server's limits).
  void RecordRejection(absl::string_view reason);

  // attnserve_batch_decode_entries: entries of one BatchDecode message.
  void RecordBatchDecodeEntries(int64_t entries);

  // attnserve_partial_attend_total{peer,code}: one PartialAttend this
  // replica sent a peer for a session split over replicas, by its status
  // code name; attnserve_partial_attend_fanout_seconds: from a step's first
  // PartialAttend sent to its last answer.
  void RecordPartialAttend(absl::string_view peer, absl::StatusCode code);
  void RecordFanout(absl::Duration duration);

  // attnserve_attention_entropy_nats{layer}: the per-row entropies of one
  // request sampled by --attention_stats_sample ([B, Hq, Lq] values, in
  // nats). `layer`: a model-session step's layer (layers from
  // kEntropyLayerLabels on share "256+"); -1 for a stateless Attend (label
  // ""). At most kMaxEntropyValuesPerRequest values are observed: past that,
  // every ⌈n / kMax⌉-th one, from an offset that rotates from one large
  // request to the next so that over many requests every row position is
  // seen. Non-finite values are skipped. One lock per call, not per value.
  void RecordAttentionEntropy(int32_t layer, absl::Span<const float> values);

  // attnserve_memory_reserved_bytes: bytes reserved from the memory budget
  // by requests in flight (MemoryBudget's on_change hook).
  void SetMemoryReserved(int64_t bytes);

  // attnserve_shm_regions: shared-memory regions callers registered;
  // attnserve_shm_bytes: bytes mapped for them (regions unregistered while
  // requests still use them included). SharedMemoryRegistry's on_change.
  void SetSharedMemory(int64_t regions, int64_t mapped_bytes);

  // attnserve_inflight_requests: calls received and not yet answered.
  void RequestStarted() { inflight_->Increment(); }
  void RequestFinished() { inflight_->Decrement(); }

  // Reports attnserve_workspace_bytes{backend} from backend.workspace_bytes()
  // at each scrape, and attnserve_device_memory_bytes{device,state} from
  // backend.device_memory() when it reports a capacity (GPU backends; device
  // is the backend's name, state "used" or "capacity"). `backend` is not
  // owned and must outlive this object.
  void WatchBackend(const Backend* backend);

  // SchedulerObserver.
  void OnBatch(const std::string& backend, int32_t batch_size, double flops,
               absl::Duration compute) override;
  void OnDequeue(absl::Duration queued) override;
  void OnQueueDepth(int64_t depth) override;

  // Every metric in the Prometheus text exposition format, as GET /metrics
  // would return it.
  std::string TextFormat() const;

  // The endpoint's bound port; 0 when there is no endpoint.
  int http_port() const;

  prometheus::Registry& registry() { return *registry_; }

 private:
  Metrics();

  // The series of one method: a counter per status code (created on first
  // use) and the duration histogram.
  struct MethodSeries {
    std::array<std::atomic<prometheus::Counter*>, 17> by_code{};
    prometheus::Histogram* duration = nullptr;
    prometheus::Counter* cancelled = nullptr;
  };
  MethodSeries& SeriesFor(absl::string_view method);

  // Constant after construction.
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_collector_;
  std::shared_ptr<prometheus::Collectable> backend_collector_;
  prometheus::Family<prometheus::Counter>* requests_total_ = nullptr;
  prometheus::Family<prometheus::Histogram>* request_duration_ = nullptr;
  prometheus::Family<prometheus::Counter>* cancelled_total_ = nullptr;
  prometheus::Histogram* queue_duration_ = nullptr;
  prometheus::Family<prometheus::Histogram>* compute_duration_ = nullptr;
  prometheus::Histogram* batch_size_ = nullptr;
  prometheus::Histogram* batch_decode_entries_ = nullptr;
  prometheus::Family<prometheus::Counter>* partial_attend_total_ = nullptr;
  prometheus::Histogram* fanout_duration_ = nullptr;
  prometheus::Gauge* queue_depth_ = nullptr;
  prometheus::Gauge* inflight_ = nullptr;
  prometheus::Family<prometheus::Counter>* flops_total_ = nullptr;
  prometheus::Family<prometheus::Counter>* rejected_total_ = nullptr;
  prometheus::Gauge* memory_reserved_ = nullptr;
  prometheus::Gauge* shm_regions_ = nullptr;  // null: shared memory is off
  prometheus::Gauge* shm_bytes_ = nullptr;
  prometheus::Family<prometheus::Histogram>* entropy_ = nullptr;
  // attnserve_attention_entropy_nats by layer: [0] layer="", [1 + l] layer l,
  // [1 + kEntropyLayerLabels] "256+". Created on first use.
  std::array<std::atomic<prometheus::Histogram*>, kEntropyLayerLabels + 2> entropy_by_layer_{};
  std::atomic<uint64_t> entropy_rotation_{0};  // start offsets of strided samples

  struct BackendSeries {
    prometheus::Histogram* compute = nullptr;
    prometheus::Counter* flops = nullptr;
  };

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<MethodSeries>> methods_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, BackendSeries> backends_ ABSL_GUARDED_BY(mu_);

  // Last: destroyed first, so no scrape runs while the rest is torn down.
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace attnserve

#endif  // ATTNSERVE_METRICS_METRICS_H_
