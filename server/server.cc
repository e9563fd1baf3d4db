#include "server/server.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "backends/registry.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/server_builder.h"
#include "server/auth.h"

namespace attnserve {
namespace {

absl::Status CheckOptions(const ServerOptions& o) {
  auto positive = [](absl::string_view field, double value) -> absl::Status {
    if (value > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(field, ": expected > 0, got ", value));
  };
  if (absl::Status s = positive("max_request_bytes", static_cast<double>(o.max_request_bytes));
      !s.ok()) {
    return s;
  }
  if (absl::Status s = positive("max_stream_inflight", o.max_stream_inflight); !s.ok()) return s;
  if (absl::Status s = positive("max_shm_regions", o.max_shm_regions); !s.ok()) return s;
  if (o.limits.max_sparse_bytes <= 0 || o.limits.max_sparse_bytes > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_sparse_bytes: expected > 0 and at most 2147483648 (2 GiB), got ",
        o.limits.max_sparse_bytes));
  }
  if (o.max_request_flops < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_request_flops: expected >= 0 (0 = no limit), got ", o.max_request_flops));
  }
  if (o.memory_limit_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory_limit_bytes: expected >= 0 (0 = derived from the machine), got ",
        o.memory_limit_bytes));
  }
  if (o.attention_stats_sample < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention_stats_sample: expected >= 0 (0 = off), got ", o.attention_stats_sample));
  }
  if (o.drain_timeout_s < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("drain_timeout_s: expected >= 0, got ", o.drain_timeout_s));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::unique_ptr<Backend>>> CreateBackends(const ServerOptions& o) {
  const std::vector<std::string> available = AvailableBackends();
  if (available.empty()) return absl::InternalError("no backends are compiled in");
  const std::string default_name = o.backend.empty() ? available.front() : o.backend;
  const BackendOptions backend_options{.threads = o.backend_threads,
                                       .gpu_memory_bytes = o.gpu_memory_bytes};

  std::vector<std::unique_ptr<Backend>> backends;
  absl::StatusOr<std::unique_ptr<Backend>> first = CreateBackend(default_name, backend_options);
  if (!first.ok()) return first.status();
  backends.push_back(*std::move(first));

  const bool all = o.backends.empty();
  for (const std::string& name : all ? available : o.backends) {
    if (name == default_name) continue;
    if (std::any_of(backends.begin(), backends.end(),
                    [&](const auto& b) { return b->info().name == name; })) {
      continue;
    }
    absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(name, backend_options);
    if (!backend.ok()) {
      if (!all) return backend.status();
      std::fprintf(stderr, "attnserve: backend %s skipped: %s\n", name.c_str(),
                   backend.status().ToString().c_str());
      continue;
    }
    backends.push_back(*std::move(backend));
  }
  return backends;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  absl::StatusOr<std::vector<std::unique_ptr<Backend>>> backends = CreateBackends(options);
  if (!backends.ok()) return backends.status();
  return Create(options, *std::move(backends));
}

absl::StatusOr<std::unique_ptr<Server>> Server::Create(
    const ServerOptions& options, std::vector<std::unique_ptr<Backend>> backends) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  if (backends.empty()) return absl::InvalidArgumentError("backends: expected at least one, got 0");
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      CreateServerCredentials(options.auth);
  if (!credentials.ok()) return credentials.status();
  std::vector<std::unique_ptr<Model>> models;
  int64_t model_bytes = 0;
  for (const ServerOptions::ModelSpec& spec : options.models) {
    if (spec.name.empty() || std::any_of(models.begin(), models.end(), [&](const auto& m) {
          return m->name() == spec.name;
        })) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--model: expected NAME=DIR with a unique, non-empty NAME, got \"", spec.name, "=",
          spec.dir, "\""));
    }
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(spec.name, spec.dir);
    if (!model.ok()) {
      return absl::Status(model.status().code(),
                          absl::StrCat("--model=", spec.name, "=", spec.dir, ": ",
                                       model.status().message()));
    }
    model_bytes += (*model)->weight_bytes();
    models.push_back(*std::move(model));
  }
  int64_t memory_limit = options.memory_limit_bytes;
  std::string derivation = absl::StrCat("--memory_limit_bytes=", HumanBytes(memory_limit));
  if (memory_limit == 0) {
    absl::StatusOr<int64_t> derived =
        DefaultMemoryLimit(DetectSystemMemory(), options.sessions.kv_cache_bytes, &derivation,
                           model_bytes);
    if (!derived.ok()) return derived.status();
    memory_limit = *derived;
  }
  // A quarter of the budget bounds gRPC's own buffers (grpc::ResourceQuota,
  // set in Start); requests reserve from the rest.
  const int64_t transport = memory_limit / 4;
  const int64_t for_requests = memory_limit - transport;
  std::unique_ptr<Server> server(new Server(options));
  server->transport_bytes_ = transport;
  server->backends_ = std::move(backends);
  server->models_ = std::move(models);
  server->credentials_ = *std::move(credentials);

  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(
      {.listen_address = options.metrics_listen_address,
       .backends = server->backend_names(),
       .queue_capacity = options.scheduler.queue_capacity,
       .memory_limit_bytes = for_requests,
       .shared_memory = options.allow_shared_memory});
  if (!metrics.ok()) return metrics.status();
  server->metrics_ = *std::move(metrics);
  for (const auto& backend : server->backends_) server->metrics_->WatchBackend(backend.get());
  Metrics* metrics_raw = server->metrics_.get();
  server->memory_budget_ = std::make_unique<MemoryBudget>(
      for_requests, [metrics_raw](int64_t reserved) { metrics_raw->SetMemoryReserved(reserved); },
      absl::StrCat("--memory_limit_bytes=", memory_limit, " less a quarter for gRPC's buffers"));
  if (options.allow_shared_memory) {
    server->shared_memory_ = std::make_unique<SharedMemoryRegistry>(SharedMemoryOptions{
        .max_regions_per_caller = options.max_shm_regions,
        .on_change = [metrics_raw](int64_t regions, int64_t bytes) {
          metrics_raw->SetSharedMemory(regions, bytes);
        }});
  }
  server->memory_limit_derivation_ =
      absl::StrCat(derivation, "; ", HumanBytes(for_requests), " for requests, ",
                   HumanBytes(transport), " for gRPC's transport buffers");

  absl::StatusOr<std::unique_ptr<SessionStore>> sessions =
      SessionStore::Create(options.sessions, Clock::Real());
  if (!sessions.ok()) return sessions.status();
  server->sessions_ = *std::move(sessions);
  server->session_metrics_ = std::make_unique<SessionMetrics>(server->metrics_->registry());
  server->session_metrics_->Update(server->sessions_->stats());

  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
      Scheduler::Create(options.scheduler, Clock::Real(), server->metrics_.get());
  if (!scheduler.ok()) return scheduler.status();
  server->scheduler_ = *std::move(scheduler);

  AttentionServiceImpl::Options service_options;
  for (const auto& backend : server->backends_) service_options.backends.push_back(backend.get());
  service_options.scheduler = server->scheduler_.get();
  service_options.metrics = server->metrics_.get();
  service_options.limits = options.limits;
  service_options.max_request_bytes = options.max_request_bytes;
  service_options.max_request_flops = options.max_request_flops;
  service_options.max_stream_inflight = options.max_stream_inflight;
  service_options.memory_budget = server->memory_budget_.get();
  service_options.sessions = server->sessions_.get();
  service_options.session_metrics = server->session_metrics_.get();
  service_options.caller_identity = CallerIdentity;
  service_options.attention_stats_sample = options.attention_stats_sample;
  for (const auto& model : server->models_) service_options.models.push_back(model.get());
  ShardOptions shard_options = options.shards;
  shard_options.idle_timeout = options.sessions.idle_timeout;
  server->shards_ = std::make_unique<ShardCoordinator>(shard_options, server->metrics_.get());
  service_options.shards = server->shards_.get();
  service_options.auth_enabled =
      !options.auth.auth_tokens_file.empty() || !options.auth.tls_client_ca_file.empty();
  service_options.peer_callers = options.peer_callers;
  service_options.replica_id = options.shards.replica_id;
  service_options.zero_copy = options.zero_copy;
  service_options.shared_memory = server->shared_memory_.get();
  server->service_ = std::make_unique<AttentionServiceImpl>(std::move(service_options));

  Server* raw = server.get();
  server->sweeper_ = std::thread([raw] {
    while (!raw->stop_sweeper_.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      raw->sessions_->ExpireIdle();
      raw->shards_->ExpireIdle();
      raw->session_metrics_->Update(raw->sessions_->stats());
    }
  });
  return server;
}

Server::~Server() {
  if (server_ != nullptr) Drain().IgnoreError();
  stop_sweeper_.Notify();
  if (sweeper_.joinable()) sweeper_.join();
  // The scheduler's workers call into the service (and through it gRPC):
  // join them first, while both are alive. A timed-out drain has stopped
  // their running batches (cancel tokens), so this does not wait long.
  scheduler_.reset();
  // Fan-outs of sessions split over replicas finish their calls through the
  // service too: wait for them next.
  shards_.reset();
  server_.reset();
  service_.reset();
}

std::vector<std::string> Server::backend_names() const {
  std::vector<std::string> names;
  for (const auto& backend : backends_) names.push_back(backend->info().name);
  return names;
}

absl::Status Server::Start() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen_address, credentials_, &port_);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(
      static_cast<int>(std::min<int64_t>(options_.max_request_bytes, INT_MAX)));
  // gRPC's own buffers (messages being received, responses being sent) are
  // bounded too, by their quarter of the memory budget.
  grpc::ResourceQuota quota("attnserve");
  quota.Resize(static_cast<size_t>(transport_bytes_));
  builder.SetResourceQuota(quota);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on '", options_.listen_address, "' for gRPC",
        options_.auth.tls_cert_file.empty()
            ? ""
            : " (or the TLS certificate, key or client CA is not valid; gRPC logs why)"));
  }
  server_->GetHealthCheckService()->SetServingStatus(true);
  return absl::OkStatus();
}

absl::Status Server::Drain() {
  absl::MutexLock lock(&drain_mu_);
  if (drained_ || server_ == nullptr) return drain_status_;
  drained_ = true;
  const absl::Time start = absl::Now();
  const absl::Duration timeout = absl::Seconds(options_.drain_timeout_s);

  server_->GetHealthCheckService()->SetServingStatus(false);
  service_->StartDrain();
  drain_status_ = scheduler_->Drain(timeout);
  // Every admitted call has its answer now; give the writes what is left of
  // the timeout (at least a second), after which gRPC cancels what remains
  // (idle streams have already been finished by StartDrain).
  const absl::Duration grace = std::max(timeout - (absl::Now() - start), absl::Seconds(1));
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  return drain_status_;
}

void Server::Wait() {
  if (server_ != nullptr) server_->Wait();
}

}  // namespace attnserve
