// attnserve: the attention gRPC service. Parses flags, builds the Server, waits
// for SIGTERM/SIGINT, then drains gracefully and exits 0.
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_join.h"
#include "core/openmp_waits.h"
#include "server/server.h"

namespace {
const attnserve::ServerOptions kDefaults;
const attnserve::SchedulerOptions kSchedulerDefaults;
const attnserve::SessionStoreOptions kSessionDefaults;
}  // namespace

ABSL_FLAG(std::string, listen, kDefaults.listen_address, "gRPC address, host:port");
ABSL_FLAG(std::string, metrics_listen, kDefaults.metrics_listen_address,
          "Prometheus /metrics HTTP address, host:port; empty disables it");
ABSL_FLAG(std::string, backend, "",
          "default backend for requests that name none; empty: the first available "
          "(cpu when compiled in, else reference)");
ABSL_FLAG(std::vector<std::string>, backends, {},
          "comma-separated backends requests may also name; empty: every available one");
ABSL_FLAG(int, threads, 0, "threads per backend; 0 = one per core");
ABSL_FLAG(int64_t, gpu_memory_bytes, 0,
          "device memory the cuda backend's pool may hold, in bytes; 0 = 90% of free memory");
ABSL_FLAG(int, workers, kSchedulerDefaults.workers, "scheduler executor threads");
ABSL_FLAG(int64_t, max_request_bytes, kDefaults.max_request_bytes,
          "largest request message accepted, in bytes");
ABSL_FLAG(double, max_request_flops, kDefaults.max_request_flops,
          "largest request accepted, in FLOP-equivalents of the cost model (the products' "
          "FLOPs plus the per-score and output-path work); 0 = no limit");
ABSL_FLAG(int64_t, memory_limit_bytes, kDefaults.memory_limit_bytes,
          "memory budget for everything requests hold outside the KV cache (inputs, outputs, "
          "scratch, responses), in bytes; a request that does not fit gets RESOURCE_EXHAUSTED. "
          "0 = 85% of the cgroup (or physical) memory minus --kv_cache_bytes minus the --model "
          "weights minus 256 MiB");
ABSL_FLAG(int64_t, max_sparse_bytes, kDefaults.limits.max_sparse_bytes,
          "largest sparse pattern a request may describe (Sparsity: its index tensors, global "
          "tokens and sink logits), in bytes, at most 2 GiB; past it RESOURCE_EXHAUSTED");
ABSL_FLAG(bool, allow_shared_memory, kDefaults.allow_shared_memory,
          "let co-located callers register POSIX shared-memory objects "
          "(RegisterSharedMemory) and pass tensors in them; the server maps the objects they "
          "name, with its own permissions");
ABSL_FLAG(int32_t, max_shm_regions, kDefaults.max_shm_regions,
          "shared-memory regions each caller identity may hold (> 0)");
ABSL_FLAG(bool, zero_copy, kDefaults.zero_copy,
          "Attend parses tensors in place in gRPC's received buffers and sends outputs without "
          "a serialized copy; false: protobuf copies them (a benchmark knob)");
ABSL_FLAG(int, max_stream_inflight, kDefaults.max_stream_inflight,
          "requests in flight per AttendStream call");
ABSL_FLAG(int64_t, attention_stats_sample, kDefaults.attention_stats_sample,
          "1 in N requests (Attend, AttendStream items, Decode steps, BatchDecode entries) "
          "computes its attention entropy, asked for or not, into the "
          "attnserve_attention_entropy_nats histogram (at most 4096 values per request); "
          "0 = off");
ABSL_FLAG(int64_t, queue_capacity, kSchedulerDefaults.queue_capacity,
          "admitted requests waiting for compute; beyond it RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, queue_capacity_bytes, kSchedulerDefaults.queue_capacity_bytes,
          "input bytes of the waiting requests; beyond it RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_batch_size, kSchedulerDefaults.max_batch_size, "requests per backend call");
ABSL_FLAG(double, max_batch_flops, kSchedulerDefaults.max_batch_flops,
          "cost per backend call, in FLOP-equivalents (see --max_request_flops)");
ABSL_FLAG(int64_t, max_queue_delay_us, kSchedulerDefaults.max_queue_delay_us,
          "longest wait for a batch to fill, in microseconds");
ABSL_FLAG(int64_t, kv_cache_bytes, kSessionDefaults.kv_cache_bytes,
          "bound on the memory of all KV-cache sessions, in bytes");
ABSL_FLAG(int, kv_block_tokens, kSessionDefaults.block_tokens, "tokens per KV-cache block");
ABSL_FLAG(int64_t, session_idle_timeout_s, absl::ToInt64Seconds(kSessionDefaults.idle_timeout),
          "sessions unused this long are closed, in seconds");
ABSL_FLAG(std::string, kv_eviction, "reject",
          "when the KV cache is full: reject (RESOURCE_EXHAUSTED) or lru_idle (evict the least "
          "recently used idle session)");
ABSL_FLAG(int64_t, max_sessions, kSessionDefaults.max_sessions, "open sessions at most");
ABSL_FLAG(int64_t, drain_timeout_s, kDefaults.drain_timeout_s,
          "on SIGTERM, how long admitted requests may take to finish, in seconds");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain to serve TLS with (needs --tls_key); empty: plaintext");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; set: require client certificates signed by it (mutual TLS; needs "
          "--tls_cert)");
ABSL_FLAG(std::string, model, "",
          "NAME=DIR: load the attention weights of a Hugging Face-style model directory "
          "(config.json and *.safetensors; families llama, mistral, qwen2, qwen3, bert, roberta) "
          "as NAME, for AttendLayer and model sessions. Repeat the flag for more models");
ABSL_FLAG(std::vector<std::string>, peers, {},
          "replicas a session may be split over (CreateSession.shards): comma-separated "
          "host:port, or dns:NAME:PORT for every A/AAAA record of NAME (a Kubernetes headless "
          "Service); may include this replica");
ABSL_FLAG(std::string, replica_id, "", "this replica's name (ServerInfo); empty: the host name");
ABSL_FLAG(std::string, peer_token_file, "",
          "file holding the bearer token this replica presents to its peers (PartialAttend, "
          "CreateSession, CloseSession of shards); empty: none");
ABSL_FLAG(std::string, peer_tls_ca, "",
          "PEM CA bundle to call peers over TLS with; empty: plaintext");
ABSL_FLAG(std::vector<std::string>, peer_callers, {"peer"},
          "with authentication on, the caller names (--auth_tokens_file names) allowed to call "
          "PartialAttend; peers present --peer_token_file's token (not a client certificate)");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "file of 'name token' lines ('#' comments); set: every call but health and reflection "
          "needs metadata 'authorization: Bearer <token>' with one of them, else UNAUTHENTICATED");

namespace {

// Every --model value, in order (absl keeps only the last of a repeated flag).
std::vector<std::string> ModelFlags(int argc, char** argv) {
  std::vector<std::string> values;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") break;
    for (const char* prefix : {"--model=", "-model="}) {
      if (arg.rfind(prefix, 0) == 0) values.push_back(arg.substr(std::string(prefix).size()));
    }
    if ((arg == "--model" || arg == "-model") && i + 1 < argc) values.push_back(argv[++i]);
  }
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  attnserve::PreferSleepingOpenMpWaits(argv);
  absl::SetProgramUsageMessage("attnserve: attention as a gRPC service. Flags: --helpfull");
  const std::vector<std::string> model_flags = ModelFlags(argc, argv);
  absl::ParseCommandLine(argc, argv);

  // Tensors of 1 MiB and more get their own mappings, returned to the system
  // when freed. glibc would otherwise raise this threshold after the first
  // large free and keep later large request buffers in its heap, so a burst
  // of big requests (a prefill) would stay in the RSS for good; with it, RSS
  // follows live memory (the KV cache bound plus what is in flight).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  // Below that size, freed memory stays in the heap up to 8 MiB past its top
  // (glibc's default is 128 KiB). At 128 KiB every S1 request (768 KiB in,
  // 256 KiB out) handed its pages back and faulted fresh zeroed ones in for
  // the next: a third of the server's CPU beyond the attention (bench/README.md,
  // "Transport").
  mallopt(M_TRIM_THRESHOLD, 8 << 20);

  // Every mapped shared-memory region keeps its object's descriptor open
  // (up to 1024 mappings, --allow_shared_memory) beside the connections':
  // the soft limit on open files (often 1024) goes up to the hard one.
  if (struct rlimit files;
      getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }

  // Block the shutdown signals before any thread starts, so every thread
  // inherits the mask and only sigwait() below receives them.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGTERM);
  sigaddset(&shutdown_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  attnserve::ServerOptions options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.metrics_listen_address = absl::GetFlag(FLAGS_metrics_listen);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.backends = absl::GetFlag(FLAGS_backends);
  options.backend_threads = absl::GetFlag(FLAGS_threads);
  options.gpu_memory_bytes = absl::GetFlag(FLAGS_gpu_memory_bytes);
  options.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  options.max_request_flops = absl::GetFlag(FLAGS_max_request_flops);
  options.memory_limit_bytes = absl::GetFlag(FLAGS_memory_limit_bytes);
  options.limits.max_sparse_bytes = absl::GetFlag(FLAGS_max_sparse_bytes);
  options.max_stream_inflight = absl::GetFlag(FLAGS_max_stream_inflight);
  options.zero_copy = absl::GetFlag(FLAGS_zero_copy);
  options.allow_shared_memory = absl::GetFlag(FLAGS_allow_shared_memory);
  options.max_shm_regions = absl::GetFlag(FLAGS_max_shm_regions);
  options.attention_stats_sample = absl::GetFlag(FLAGS_attention_stats_sample);
  options.scheduler.workers = absl::GetFlag(FLAGS_workers);
  options.scheduler.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  options.scheduler.queue_capacity_bytes = absl::GetFlag(FLAGS_queue_capacity_bytes);
  options.scheduler.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  options.scheduler.max_batch_flops = absl::GetFlag(FLAGS_max_batch_flops);
  options.scheduler.max_queue_delay_us = absl::GetFlag(FLAGS_max_queue_delay_us);
  options.drain_timeout_s = absl::GetFlag(FLAGS_drain_timeout_s);
  options.auth.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.auth.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.auth.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.auth.auth_tokens_file = absl::GetFlag(FLAGS_auth_tokens_file);
  options.sessions.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  options.sessions.block_tokens = absl::GetFlag(FLAGS_kv_block_tokens);
  options.sessions.idle_timeout = absl::Seconds(absl::GetFlag(FLAGS_session_idle_timeout_s));
  options.sessions.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  for (const std::string& value : model_flags) {
    const size_t eq = value.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == value.size()) {
      std::fprintf(stderr, "attnserve: --model: expected NAME=DIR, got \"%s\"\n", value.c_str());
      return 1;
    }
    options.models.push_back({value.substr(0, eq), value.substr(eq + 1)});
  }
  options.shards.peers = absl::GetFlag(FLAGS_peers);
  options.shards.replica_id = absl::GetFlag(FLAGS_replica_id);
  if (options.shards.replica_id.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) == 0) options.shards.replica_id = host;
  }
  for (auto [flag, out] : {std::pair{&FLAGS_peer_token_file, &options.shards.peer_token},
                           std::pair{&FLAGS_peer_tls_ca, &options.shards.peer_tls_ca_pem}}) {
    const std::string path = absl::GetFlag(*flag);
    if (path.empty()) continue;
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    if (!in.good() && !in.eof()) {
      std::fprintf(stderr, "attnserve: cannot read %s\n", path.c_str());
      return 1;
    }
    *out = std::string(absl::StripAsciiWhitespace(text.str()));
    if (out == &options.shards.peer_tls_ca_pem) *out = text.str();
  }
  options.peer_callers = absl::GetFlag(FLAGS_peer_callers);
  const std::string eviction = absl::GetFlag(FLAGS_kv_eviction);
  if (eviction == "lru_idle") {
    options.sessions.eviction = attnserve::EvictionPolicy::kLruIdle;
  } else if (eviction != "reject") {
    std::fprintf(stderr, "attnserve: --kv_eviction: expected reject or lru_idle, got \"%s\"\n",
                 eviction.c_str());
    return 1;
  }

  absl::StatusOr<std::unique_ptr<attnserve::Server>> server = attnserve::Server::Create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "attnserve: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (absl::Status s = (*server)->Start(); !s.ok()) {
    std::fprintf(stderr, "attnserve: %s\n", s.ToString().c_str());
    return 1;
  }
  const std::string metrics =
      options.metrics_listen_address.empty()
          ? std::string("off")
          : options.metrics_listen_address + " (port " +
                std::to_string((*server)->metrics_port()) + ")";
  std::fprintf(stderr,
               "attnserve %s listening on %s (port %d, %s), metrics on %s, backends %s "
               "(default %s), %d workers\n",
               ATTNSERVE_VERSION, options.listen_address.c_str(), (*server)->port(),
               attnserve::DescribeAuth(options.auth).c_str(), metrics.c_str(),
               absl::StrJoin((*server)->backend_names(), ",").c_str(),
               (*server)->default_backend().c_str(), options.scheduler.workers);

  for (const attnserve::ServerOptions::ModelSpec& spec : options.models) {
    std::fprintf(stderr, "attnserve: model %s loaded from %s\n", spec.name.c_str(),
                 spec.dir.c_str());
  }
  std::fprintf(stderr, "attnserve: memory budget: %s\n",
               (*server)->memory_limit_derivation().c_str());

  int signal_number = 0;
  sigwait(&shutdown_signals, &signal_number);
  std::fprintf(stderr, "attnserve: %s received, draining (up to %llds)\n",
               signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
               static_cast<long long>(options.drain_timeout_s));
  absl::Status drained = (*server)->Drain();
  std::fprintf(stderr, "attnserve: drained%s%s\n", drained.ok() ? "" : ": ",
               drained.ok() ? "" : drained.ToString().c_str());
  server->reset();
  return 0;
}
