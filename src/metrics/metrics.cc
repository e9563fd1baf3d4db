#include "metrics/metrics.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "metrics/process_collector.h"
#include "prometheus/text_serializer.h"

namespace attnserve {
namespace {

// attnserve_workspace_bytes{backend} and attnserve_device_memory_bytes{device,state},
// read from the backends at scrape time.
class BackendCollector : public prometheus::Collectable {
 public:
  void Watch(const Backend* backend) {
    absl::MutexLock lock(&mu_);
    backends_.push_back(backend);
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily workspace;
    workspace.name = "attnserve_workspace_bytes";
    workspace.help = "Scratch memory a backend holds, in bytes.";
    workspace.type = prometheus::MetricType::Gauge;
    prometheus::MetricFamily device;
    device.name = "attnserve_device_memory_bytes";
    device.help = "Device (GPU) memory a backend holds (state=used) and may hold (state=capacity).";
    device.type = prometheus::MetricType::Gauge;
    absl::MutexLock lock(&mu_);
    if (backends_.empty()) return {};
    for (const Backend* backend : backends_) {
      prometheus::ClientMetric metric;
      metric.label.push_back({"backend", backend->info().name});
      metric.gauge.value = static_cast<double>(backend->workspace_bytes());
      workspace.metric.push_back(std::move(metric));

      const DeviceMemory memory = backend->device_memory();
      if (memory.capacity_bytes <= 0) continue;  // no device
      for (const auto& [state, bytes] : {std::pair{"used", memory.used_bytes},
                                         std::pair{"capacity", memory.capacity_bytes}}) {
        prometheus::ClientMetric m;
        m.label.push_back({"device", backend->info().name});
        m.label.push_back({"state", state});
        m.gauge.value = static_cast<double>(bytes);
        device.metric.push_back(std::move(m));
      }
    }
    std::vector<prometheus::MetricFamily> families;
    families.push_back(std::move(workspace));
    if (!device.metric.empty()) families.push_back(std::move(device));
    return families;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<const Backend*> backends_ ABSL_GUARDED_BY(mu_);
};

std::vector<double> Doubling(double first, int count) {
  std::vector<double> bounds;
  bounds.reserve(count);
  for (double b = first; static_cast<int>(bounds.size()) < count; b *= 2) bounds.push_back(b);
  return bounds;
}

}  // namespace

// 20 µs · 2^22 ≈ 84 s.
std::vector<double> DurationBuckets() { return Doubling(20e-6, 23); }
std::vector<double> BatchSizeBuckets() { return Doubling(1, 11); }
std::vector<double> EntropyBuckets() {
  return {0, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12};
}

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      process_collector_(std::make_shared<ProcessCollector>()),
      backend_collector_(std::make_shared<BackendCollector>()) {
  requests_total_ = &prometheus::BuildCounter()
                         .Name("attnserve_requests_total")
                         .Help("Requests answered, by RPC method and gRPC status code.")
                         .Register(*registry_);
  request_duration_ = &prometheus::BuildHistogram()
                           .Name("attnserve_request_duration_seconds")
                           .Help("Time from receiving a request to answering it, by RPC method.")
                           .Register(*registry_);
  cancelled_total_ = &prometheus::BuildCounter()
                         .Name("attnserve_cancelled_requests_total")
                         .Help("Calls cancelled by the client or past their deadline, by method.")
                         .Register(*registry_);
  queue_duration_ = &prometheus::BuildHistogram()
                         .Name("attnserve_queue_duration_seconds")
                         .Help("Time a request waited in the scheduler queue before compute.")
                         .Register(*registry_)
                         .Add({}, DurationBuckets());
  compute_duration_ = &prometheus::BuildHistogram()
                           .Name("attnserve_compute_duration_seconds")
                           .Help("Duration of one backend call (a whole batch), by backend.")
                           .Register(*registry_);
  batch_size_ = &prometheus::BuildHistogram()
                     .Name("attnserve_batch_size")
                     .Help("Requests per backend call (a BatchDecode counts its entries).")
                     .Register(*registry_)
                     .Add({}, BatchSizeBuckets());
  batch_decode_entries_ = &prometheus::BuildHistogram()
                               .Name("attnserve_batch_decode_entries")
                               .Help("Entries (sessions) per BatchDecode message.")
                               .Register(*registry_)
                               .Add({}, BatchSizeBuckets());
  partial_attend_total_ = &prometheus::BuildCounter()
                              .Name("attnserve_partial_attend_total")
                              .Help("PartialAttend calls this replica sent its peers for "
                                    "sessions split over replicas, by peer and status code.")
                              .Register(*registry_);
  fanout_duration_ = &prometheus::BuildHistogram()
                          .Name("attnserve_partial_attend_fanout_seconds")
                          .Help("A sharded session step's fan-out: from its first PartialAttend "
                                "sent to its last answer.")
                          .Register(*registry_)
                          .Add({}, DurationBuckets());
  queue_depth_ = &prometheus::BuildGauge()
                      .Name("attnserve_queue_depth")
                      .Help("Requests admitted to the scheduler and not yet started.")
                      .Register(*registry_)
                      .Add({});
  inflight_ = &prometheus::BuildGauge()
                   .Name("attnserve_inflight_requests")
                   .Help("Requests received and not yet answered.")
                   .Register(*registry_)
                   .Add({});
  flops_total_ = &prometheus::BuildCounter()
                      .Name("attnserve_flops_total")
                      .Help("Floating-point operations of the attention products computed "
                            "(2*B*Hq*Lq*Lk*(D+Dv), causal self-attention halved), by backend.")
                      .Register(*registry_);
  rejected_total_ = &prometheus::BuildCounter()
                         .Name("attnserve_rejected_requests_total")
                         .Help("Requests refused with RESOURCE_EXHAUSTED before they were queued, "
                               "by reason: memory, queue, cost, size.")
                         .Register(*registry_);
  for (const char* reason : {"memory", "queue", "cost", "size"}) rejected_total_->Add({{"reason", reason}});
  entropy_ = &prometheus::BuildHistogram()
                  .Name("attnserve_attention_entropy_nats")
                  .Help("Attention entropy (-sum p ln p per query row and head, nats) of the "
                        "requests sampled by --attention_stats_sample, by model-session layer "
                        "(\"\" for Attend); at most 4096 values per request.")
                  .Register(*registry_);
}

void Metrics::RecordAttentionEntropy(int32_t layer, absl::Span<const float> values) {
  const size_t slot = layer < 0 ? 0 : 1 + static_cast<size_t>(std::min(layer, kEntropyLayerLabels));
  prometheus::Histogram* histogram = entropy_by_layer_[slot].load(std::memory_order_acquire);
  if (histogram == nullptr) {
    const std::string label = layer < 0                       ? std::string()
                              : layer >= kEntropyLayerLabels ? absl::StrCat(kEntropyLayerLabels, "+")
                                                              : absl::StrCat(layer);
    // Family::Add returns the existing series for equal labels, so racing
    // threads store the same pointer.
    histogram = &entropy_->Add({{"layer", label}}, EntropyBuckets());
    entropy_by_layer_[slot].store(histogram, std::memory_order_release);
  }
  static const std::vector<double> kBounds = EntropyBuckets();
  const int64_t n = static_cast<int64_t>(values.size());
  int64_t stride = 1, start = 0;
  if (n > kMaxEntropyValuesPerRequest) {
    stride = (n + kMaxEntropyValuesPerRequest - 1) / kMaxEntropyValuesPerRequest;
    start = static_cast<int64_t>(entropy_rotation_.fetch_add(1, std::memory_order_relaxed) %
                                 static_cast<uint64_t>(stride));
  }
  // Bucketed here, added under the histogram's lock once.
  std::vector<double> counts(kBounds.size() + 1, 0.0);
  double sum = 0;
  for (int64_t i = start; i < n; i += stride) {
    const float v = values[i];
    if (!std::isfinite(v)) continue;
    const double x = std::max(0.0, static_cast<double>(v));  // rounding can leave -0.0000001
    // The first bound >= x, as Histogram::Observe (and Prometheus' le) has it.
    const size_t bucket = static_cast<size_t>(
        std::lower_bound(kBounds.begin(), kBounds.end(), x) - kBounds.begin());
    counts[bucket] += 1;
    sum += x;
  }
  histogram->ObserveMultiple(counts, sum);
}

void Metrics::RecordRejection(absl::string_view reason) {
  rejected_total_->Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::RecordBatchDecodeEntries(int64_t entries) {
  batch_decode_entries_->Observe(static_cast<double>(entries));
}

void Metrics::RecordPartialAttend(absl::string_view peer, absl::StatusCode code) {
  partial_attend_total_
      ->Add({{"peer", std::string(peer)}, {"code", absl::StatusCodeToString(code)}})
      .Increment();
}

void Metrics::RecordFanout(absl::Duration duration) {
  fanout_duration_->Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::SetMemoryReserved(int64_t bytes) {
  if (memory_reserved_ != nullptr) memory_reserved_->Set(static_cast<double>(bytes));
}

void Metrics::SetSharedMemory(int64_t regions, int64_t mapped_bytes) {
  if (shm_regions_ == nullptr) return;
  shm_regions_->Set(static_cast<double>(regions));
  shm_bytes_->Set(static_cast<double>(mapped_bytes));
}

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const MetricsOptions& options) {
  std::unique_ptr<Metrics> metrics(new Metrics());
  prometheus::BuildGauge()
      .Name("attnserve_build_info")
      .Help("Always 1; the labels say which attnserve build is running.")
      .Register(*metrics->registry_)
      .Add({{"version", options.version}, {"backends", absl::StrJoin(options.backends, ",")}})
      .Set(1);
  if (options.queue_capacity > 0) {
    prometheus::BuildGauge()
        .Name("attnserve_queue_capacity")
        .Help("Requests the scheduler queue admits before answering RESOURCE_EXHAUSTED.")
        .Register(*metrics->registry_)
        .Add({})
        .Set(static_cast<double>(options.queue_capacity));
  }
  if (options.memory_limit_bytes > 0) {
    prometheus::BuildGauge()
        .Name("attnserve_memory_limit_bytes")
        .Help("The memory budget requests reserve from (three quarters of "
              "--memory_limit_bytes; the rest bounds gRPC's buffers).")
        .Register(*metrics->registry_)
        .Add({})
        .Set(static_cast<double>(options.memory_limit_bytes));
    metrics->memory_reserved_ = &prometheus::BuildGauge()
                                     .Name("attnserve_memory_reserved_bytes")
                                     .Help("Bytes of the memory budget reserved by requests in "
                                           "flight (inputs, outputs, scratch, responses).")
                                     .Register(*metrics->registry_)
                                     .Add({});
  }
  if (options.shared_memory) {
    metrics->shm_regions_ = &prometheus::BuildGauge()
                                 .Name("attnserve_shm_regions")
                                 .Help("Shared-memory regions callers registered "
                                       "(RegisterSharedMemory).")
                                 .Register(*metrics->registry_)
                                 .Add({});
    metrics->shm_bytes_ = &prometheus::BuildGauge()
                               .Name("attnserve_shm_bytes")
                               .Help("Bytes of callers' shared-memory objects mapped by the "
                                     "server, unregistered regions still in use included.")
                               .Register(*metrics->registry_)
                               .Add({});
  }
  if (!options.listen_address.empty()) {
    try {
      metrics->exposer_ = std::make_unique<prometheus::Exposer>(options.listen_address);
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("metrics endpoint: cannot listen on '",
                                                 options.listen_address, "': ", e.what()));
    }
    metrics->exposer_->RegisterCollectable(metrics->registry_);
    metrics->exposer_->RegisterCollectable(metrics->process_collector_);
    metrics->exposer_->RegisterCollectable(metrics->backend_collector_);
  }
  return metrics;
}

Metrics::~Metrics() { exposer_.reset(); }

Metrics::MethodSeries& Metrics::SeriesFor(absl::string_view method) {
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = methods_.find(method);
    if (it != methods_.end()) return *it->second;
  }
  absl::MutexLock lock(&mu_);
  std::unique_ptr<MethodSeries>& series = methods_[method];
  if (series == nullptr) {
    series = std::make_unique<MethodSeries>();
    series->duration = &request_duration_->Add({{"method", std::string(method)}}, DurationBuckets());
    series->cancelled = &cancelled_total_->Add({{"method", std::string(method)}});
  }
  return *series;
}

void Metrics::RecordRequest(absl::string_view method, absl::StatusCode code,
                            absl::Duration duration) {
  MethodSeries& series = SeriesFor(method);
  const size_t index = static_cast<size_t>(code);
  prometheus::Counter* counter = nullptr;
  if (index < series.by_code.size()) {
    counter = series.by_code[index].load(std::memory_order_acquire);
    if (counter == nullptr) {
      // Family::Add returns the existing series for equal labels, so racing
      // threads store the same pointer.
      counter = &requests_total_->Add(
          {{"method", std::string(method)}, {"code", absl::StatusCodeToString(code)}});
      series.by_code[index].store(counter, std::memory_order_release);
    }
  } else {
    counter = &requests_total_->Add(
        {{"method", std::string(method)}, {"code", absl::StatusCodeToString(code)}});
  }
  counter->Increment();
  series.duration->Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::RecordCancellation(absl::string_view method) {
  SeriesFor(method).cancelled->Increment();
}

void Metrics::WatchBackend(const Backend* backend) {
  static_cast<BackendCollector*>(backend_collector_.get())->Watch(backend);
}

void Metrics::OnBatch(const std::string& backend, int32_t batch_size, double flops,
                      absl::Duration compute) {
  BackendSeries series;
  {
    absl::MutexLock lock(&mu_);
    BackendSeries& slot = backends_[backend];
    if (slot.compute == nullptr) {
      slot.compute = &compute_duration_->Add({{"backend", backend}}, DurationBuckets());
      slot.flops = &flops_total_->Add({{"backend", backend}});
    }
    series = slot;
  }
  series.compute->Observe(absl::ToDoubleSeconds(compute));
  series.flops->Increment(flops);
  batch_size_->Observe(batch_size);
}

void Metrics::OnDequeue(absl::Duration queued) {
  queue_duration_->Observe(absl::ToDoubleSeconds(queued));
}

void Metrics::OnQueueDepth(int64_t depth) { queue_depth_->Set(static_cast<double>(depth)); }

std::string Metrics::TextFormat() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  for (const auto* collectable : {process_collector_.get(), backend_collector_.get()}) {
    std::vector<prometheus::MetricFamily> more = collectable->Collect();
    families.insert(families.end(), std::make_move_iterator(more.begin()),
                    std::make_move_iterator(more.end()));
  }
  return prometheus::TextSerializer().Serialize(families);
}

int Metrics::http_port() const {
  if (exposer_ == nullptr) return 0;
  std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

}  // namespace attnserve
