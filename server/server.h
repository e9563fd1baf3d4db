// Server: the whole attnserve process minus flag parsing — backends, scheduler,
// metrics, the gRPC service with health checking and reflection — so main()
// and the integration tests run the same thing. Life cycle: Create() builds
// everything without listening, Start() binds and serves, Drain() shuts down
// gracefully (health NOT_SERVING, new calls UNAVAILABLE, admitted work
// finishes within drain_timeout_s), Wait() blocks until that is done.
//
// Thread safety: Drain(), Wait() and the accessors may be called from any
// thread once Start() returned; Create and Start from one thread.
#ifndef ATTNSERVE_SERVER_SERVER_H_
#define ATTNSERVE_SERVER_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "attention/job.h"
#include "absl/synchronization/notification.h"
#include "backends/backend.h"
#include "core/memory_budget.h"
#include "core/shared_memory.h"
#include "grpcpp/server.h"
#include "kvcache/session_store.h"
#include "metrics/session_metrics.h"
#include "metrics/metrics.h"
#include "model/model.h"
#include "scheduler/scheduler.h"
#include "server/auth.h"
#include "server/service.h"
#include "server/shards.h"

namespace attnserve {

struct ServerOptions {
  std::string listen_address = "0.0.0.0:50051";  // port 0 picks a free port (see port())
  // The HTTP /metrics endpoint; port 0 picks a free port; empty: none.
  std::string metrics_listen_address = "0.0.0.0:9464";
  // The default backend (requests with an empty `backend`); empty: the first
  // of AvailableBackends().
  std::string backend;
  // More backends requests may name. Empty: every available backend; those
  // that cannot start on this machine (no GPU) are skipped with a log line.
  // Named explicitly, a backend that cannot start fails Create().
  std::vector<std::string> backends;
  int backend_threads = 0;  // BackendOptions::threads; 0 = one per core
  int64_t gpu_memory_bytes = 0;  // BackendOptions::gpu_memory_bytes; 0 = 90% of free device memory
  int64_t max_request_bytes = int64_t{64} << 20;  // gRPC receive limit per message
  // Cost (FLOP-equivalents, attention/cost.h) per request; 0 = no limit.
  double max_request_flops = 1e12;
  // The memory budget every request reserves from (core/memory_budget.h);
  // 0 = derived from the cgroup or physical memory minus
  // sessions.kv_cache_bytes (DefaultMemoryLimit). A quarter of it bounds
  // gRPC's transport buffers (grpc::ResourceQuota); requests reserve from the
  // other three quarters.
  int64_t memory_limit_bytes = 0;
  int32_t max_stream_inflight = 64;               // per AttendStream call
  // 1 in this many requests (Attend, AttendStream items, Decode steps,
  // BatchDecode entries) computes its attention entropy, asked for or not,
  // into attnserve_attention_entropy_nats; 0 = off.
  int64_t attention_stats_sample = 0;
  SchedulerOptions scheduler;
  SessionStoreOptions sessions;  // KV-cache sessions (--kv_cache_bytes, ...)
  RequestLimits limits;  // --max_sparse_bytes sets limits.max_sparse_bytes
  int64_t drain_timeout_s = 30;  // how long Drain() lets admitted work finish
  // Attend without copies of the tensors' bytes (AttentionServiceImpl::Options::zero_copy);
  // false only to measure what the copies cost (bench/serving_bench.sh transport).
  bool zero_copy = true;
  AuthOptions auth;              // TLS, mutual TLS, bearer tokens (server/auth.h)
  // --model=NAME=DIR: models loaded at start, for AttendLayer and model
  // sessions (model/model.h). A model that does not load stops Create.
  struct ModelSpec {
    std::string name;
    std::string dir;
  };
  std::vector<ModelSpec> models;
  // Sessions split over replicas (server/shards.h): --peers, --replica_id,
  // the token this replica presents to its peers and the CA it checks them
  // with (empty: plaintext), and the caller names allowed PartialAttend when
  // authentication is on (--peer_callers).
  ShardOptions shards;
  std::vector<std::string> peer_callers = {"peer"};
  // Shared memory for co-located callers (RegisterSharedMemory, Tensor.shm):
  // off unless --allow_shared_memory, since the server then maps objects its
  // callers name; --max_shm_regions per caller identity.
  bool allow_shared_memory = false;
  int32_t max_shm_regions = 64;
};

class Server {
 public:
  // Creates the backends named by `options`, the metrics (and their endpoint),
  // the scheduler, the service and the credentials (reading the TLS and token
  // files). INVALID_ARGUMENT for bad options or auth files, the
  // registry's NOT_FOUND / FAILED_PRECONDITION for a backend, UNAVAILABLE when
  // the metrics address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);
  // The same with backends the caller made (tests); backends[0] is the
  // default, options.backend and options.backends are ignored.
  static absl::StatusOr<std::unique_ptr<Server>> Create(
      const ServerOptions& options, std::vector<std::unique_ptr<Backend>> backends);

  // Drains (if Start() ran and Drain() did not) and releases everything.
  ~Server();

  // Binds listen_address and starts serving; health is SERVING afterwards.
  // UNAVAILABLE when the address cannot be bound. Call once.
  absl::Status Start();

  // Graceful shutdown: health turns NOT_SERVING, new requests and streams get
  // UNAVAILABLE, admitted requests finish (up to drain_timeout_s; the rest
  // are answered UNAVAILABLE), then gRPC shuts down. Blocks until done. OK if
  // everything admitted finished in time, else DEADLINE_EXCEEDED. Idempotent.
  absl::Status Drain();

  // Blocks until Drain() has shut the gRPC server down.
  void Wait();

  int port() const { return port_; }  // the bound gRPC port, after Start()
  int metrics_port() const { return metrics_->http_port(); }  // 0: no endpoint
  SessionStore& sessions() { return *sessions_; }
  // What requests reserve from: three quarters of memory_limit_bytes.
  MemoryBudget& memory_budget() { return *memory_budget_; }
  // How the memory budget was chosen and split, for the start-up log line.
  const std::string& memory_limit_derivation() const { return memory_limit_derivation_; }
  const std::string& default_backend() const { return backends_.front()->info().name; }
  std::vector<std::string> backend_names() const;
  Metrics& metrics() { return *metrics_; }

 private:
  explicit Server(const ServerOptions& options) : options_(options) {}

  const ServerOptions options_;
  // Declared in dependency order: destroyed from the gRPC server down to the
  // backends, so nothing is used after it is gone. The destructor first
  // joins the scheduler's workers, whose callbacks use the service.
  std::vector<std::unique_ptr<Backend>> backends_;
  std::vector<std::unique_ptr<Model>> models_;
  std::unique_ptr<ShardCoordinator> shards_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<MemoryBudget> memory_budget_;  // for requests
  std::unique_ptr<SharedMemoryRegistry> shared_memory_;  // null: shared memory is off
  int64_t transport_bytes_ = 0;                   // gRPC's ResourceQuota
  std::string memory_limit_derivation_;
  std::unique_ptr<SessionStore> sessions_;
  std::unique_ptr<SessionMetrics> session_metrics_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<AttentionServiceImpl> service_;
  std::shared_ptr<grpc::ServerCredentials> credentials_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  // Expires idle sessions and refreshes the session metrics once a second.
  absl::Notification stop_sweeper_;
  std::thread sweeper_;

  absl::Mutex drain_mu_;
  bool drained_ ABSL_GUARDED_BY(drain_mu_) = false;
  absl::Status drain_status_ ABSL_GUARDED_BY(drain_mu_);
};

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_SERVER_H_
