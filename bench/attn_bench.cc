// attn_bench: times one attention shape on one backend and reports it against
// what this machine can do (docs/ARCHITECTURE.md "Benchmark shapes and FLOPs").
//
//   attn_bench --shape=P1 --backend=cpu --dtype=f32 --threads=2 --json
//
// Inputs are random and go through PrepareAttention like a served request;
// backends are created by name. FLOPs are AttentionFlops (4·B·Hq·Lq·Lk·D,
// halved for causal Lq == Lk); bytes count Q, K, V and the output once.
//
//   attn_bench --layer=L1 --dtype=bf16 --json
//
// times an attention layer from weights (projections + attention; see
// layer_bench.h): L1, L2 or a model directory.
//
//   attn_bench --shape=P4 --paged --layers=8 --sessions=16 --context=1024 --dtype=bf16 --json
//
// times the kernel of one model layer-step, the batch of
// `attnctl bench --sessions=16 --context=1024 --layers=8 --batched`: every
// sequence keeps one paged cache per layer, and a layer-step is one backend
// call over the batch's decode jobs of one layer, the layers taken in turn.
//
//   attn_bench --shape=SP1 --json
//
// times a sparse shape (SP1-SP3, sparse_shapes.h) and, in the same run, the
// dense request it thins out; its output is checked against the reference
// kernel on a few rows first.
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "attention/job.h"
#include "attention/sparse.h"
#include "backends/cpu/cpu_backend.h"
#include "backends/registry.h"
#include "core/half.h"
#include "core/openmp_waits.h"
#include "kvcache/session_store.h"
#include "layer_bench.h"
#include "machine_peak.h"
#include "sparse_shapes.h"

ABSL_FLAG(std::string, shape, "P1",
          "P1, P2, P3, P4, S1, the sparse SP1, SP2, SP3, or custom (use --b --hq ... )");
ABSL_FLAG(int, b, 1, "batch (custom shape)");
ABSL_FLAG(int, hq, 8, "query heads (custom shape)");
ABSL_FLAG(int, hkv, 8, "KV heads (custom shape)");
ABSL_FLAG(int, lq, 512, "query length (custom shape)");
ABSL_FLAG(int, lk, 512, "key length (custom shape)");
ABSL_FLAG(int, d, 64, "head dim (custom shape)");
ABSL_FLAG(bool, causal, false, "causal (custom shape)");
ABSL_FLAG(int, dv, 0, "value head dim; 0 = the head dim (any shape)");
ABSL_FLAG(bool, weights, false, "also compute the weights output (the scalar path)");
ABSL_FLAG(int, top_k, 0, "also compute the top-k output with this k (the scalar path)");
ABSL_FLAG(bool, linear, false, "variant LINEAR instead of SOFTMAX");
ABSL_FLAG(bool, entropy, false,
          "also compute outputs.entropy, and time the same batch without it in the same run "
          "(alternating): the JSON adds ms_without_entropy and entropy_overhead");
ABSL_FLAG(bool, bias, false, "add a [B, Hq, Lq, Lk] bias tensor");
ABSL_FLAG(std::string, backend, "cpu", "backend name (see the registry)");
ABSL_FLAG(std::string, isa, "",
          "with --backend=cpu: force its kernel variant (avx512, avx2 or scalar); empty = the best");
ABSL_FLAG(std::string, dtype, "f32", "f32, f16 or bf16");
ABSL_FLAG(int, threads, 0, "backend threads; 0 = one per hardware thread");
ABSL_FLAG(int, iters, 0, "timed iterations; 0 = as many as fit in --min_time");
ABSL_FLAG(double, min_time, 1.0, "seconds to time when --iters is 0");
ABSL_FLAG(bool, paged, false,
          "keep K/V in KV-cache sessions (one per batch row, paged blocks) and run the batch "
          "of decode-style jobs as the server's Decode does");
ABSL_FLAG(int, kv_block_tokens, 16, "tokens per KV-cache block with --paged");
ABSL_FLAG(int, layers, 1,
          "with --paged: model layers, each with its own paged cache per batch row; an "
          "iteration is one layer-step (one backend call over the batch's jobs of one layer), "
          "cycling through the layers so their caches are not all hot");
ABSL_FLAG(int, sessions, 0,
          "batch rows (sequences), overriding the shape's B (0: the shape's); as attnctl bench "
          "--sessions");
ABSL_FLAG(int64_t, context, 0,
          "keys per batch row, overriding the shape's Lk (0: the shape's); as attnctl bench "
          "--context");
ABSL_FLAG(bool, json, false, "print one JSON line instead of text");
ABSL_FLAG(std::string, layer, "",
          "time an attention layer from weights instead: L1 (Llama-3-8B-like layer, prefill of "
          "512 tokens), L2 (its decode step, 16 sequences x 1024 context) or a model directory "
          "(layer 0, prefill of --lq tokens); --dtype f32 or bf16 (the weights)");
ABSL_FLAG(double, peak_gflops, 0,
          "use this FP32 FMA peak (GFLOP/s) instead of measuring it (e.g. under a profiler)");
ABSL_FLAG(double, peak_gbps, 0, "use this read bandwidth (GB/s) instead of measuring it");
ABSL_FLAG(uint32_t, sparse_seed, 1, "seed of the sparse shapes' random blocks and keys");
ABSL_FLAG(bool, sparse_per_head, false,
          "SP1: draw the random blocks per query head (indptr [1, Hq, rows + 1]) instead of "
          "once for all heads");

namespace attnserve {
namespace {

struct Shape {
  std::string id;
  int b, hq, hkv, lq, lk, d;
  bool causal;
  bool paged;  // K/V in KV-cache sessions whatever --paged says
};

// SP1 and SP2 thin out P3; SP3 is one decode step over a 32k-token session.
constexpr Shape kShapes[] = {
    {"P1", 4, 12, 12, 512, 512, 64, false, false},  {"P2", 1, 32, 8, 2048, 2048, 128, true, false},
    {"P3", 1, 8, 8, 8192, 8192, 64, true, false},   {"P4", 16, 32, 8, 1, 4096, 128, false, false},
    {"S1", 1, 8, 8, 128, 128, 64, false, false},    {"SP1", 1, 8, 8, 8192, 8192, 64, true, false},
    {"SP2", 1, 8, 8, 8192, 8192, 64, true, false},  {"SP3", 1, 32, 8, 1, 32768, 128, false, true},
};

std::string RandomBytes(DType dtype, int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::string bytes(n * DTypeSize(dtype), '\0');
  for (int64_t i = 0; i < n; ++i) StoreFloat(bytes.data(), dtype, i, dist(rng));
  return bytes;
}

// Linux: writing 5 to clear_refs resets the VmHWM high-water mark.
void ResetPeakRss() {
  if (FILE* f = std::fopen("/proc/self/clear_refs", "w")) {
    std::fputs("5", f);
    std::fclose(f);
  }
}

// VmHWM from /proc/self/status (bytes), or ru_maxrss where that is missing.
int64_t PeakRssBytes() {
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long long kib = -1;
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      if (std::sscanf(line, "VmHWM: %lld kB", &kib) == 1) break;
    }
    std::fclose(f);
    if (kib >= 0) return kib * 1024;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return int64_t{usage.ru_maxrss} * 1024;
}

int Main() {
  Shape shape{"custom",
              absl::GetFlag(FLAGS_b),
              absl::GetFlag(FLAGS_hq),
              absl::GetFlag(FLAGS_hkv),
              absl::GetFlag(FLAGS_lq),
              absl::GetFlag(FLAGS_lk),
              absl::GetFlag(FLAGS_d),
              absl::GetFlag(FLAGS_causal),
              false};
  const std::string id = absl::GetFlag(FLAGS_shape);
  if (id != "custom") {
    const Shape* found = nullptr;
    for (const Shape& s : kShapes) {
      if (s.id == id) found = &s;
    }
    if (found == nullptr) {
      std::fprintf(stderr, "--shape: expected P1, P2, P3, P4, S1, SP1, SP2, SP3 or custom, got %s\n",
                   id.c_str());
      return 2;
    }
    shape = *found;
  }
  if (absl::GetFlag(FLAGS_sessions) < 0 || absl::GetFlag(FLAGS_context) < 0 ||
      absl::GetFlag(FLAGS_context) > INT32_MAX) {
    std::fprintf(stderr, "--sessions, --context: expected >= 0 (0: the shape's), got %d, %lld\n",
                 absl::GetFlag(FLAGS_sessions),
                 static_cast<long long>(absl::GetFlag(FLAGS_context)));
    return 2;
  }
  if (absl::GetFlag(FLAGS_context) > 0 && (id == "SP1" || id == "SP2")) {
    std::fprintf(stderr, "--context: SP1 and SP2 are self-attention (Lq = Lk); not with %s\n",
                 id.c_str());
    return 2;
  }
  if (absl::GetFlag(FLAGS_sessions) > 0) shape.b = absl::GetFlag(FLAGS_sessions);
  if (absl::GetFlag(FLAGS_context) > 0) shape.lk = static_cast<int>(absl::GetFlag(FLAGS_context));
  // A sparse shape's pattern; its request is timed beside the same request
  // without it (the dense jobs).
  const std::optional<bench::SparsePattern> pattern = bench::MakeSparsePattern(
      shape.id, {shape.hq, shape.hkv, shape.lq, shape.lk}, absl::GetFlag(FLAGS_sparse_seed),
      absl::GetFlag(FLAGS_sparse_per_head));
  const int layers = absl::GetFlag(FLAGS_layers);
  const bool paged = absl::GetFlag(FLAGS_paged) || shape.paged;
  if (layers < 1 || (layers > 1 && !paged)) {
    std::fprintf(stderr, "--layers: expected >= 1, and > 1 only with --paged, got %d%s\n", layers,
                 paged ? "" : " without --paged");
    return 2;
  }
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  DType dtype;
  if (dtype_name == "f32") {
    dtype = DType::kF32;
  } else if (dtype_name == "f16") {
    dtype = DType::kF16;
  } else if (dtype_name == "bf16") {
    dtype = DType::kBF16;
  } else {
    std::fprintf(stderr, "--dtype: expected f32, f16 or bf16, got %s\n", dtype_name.c_str());
    return 2;
  }
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  if (!absl::GetFlag(FLAGS_layer).empty()) {
    bench::LayerBenchOptions lo;
    lo.layer = absl::GetFlag(FLAGS_layer);
    lo.dtype = dtype_name;
    lo.backend = absl::GetFlag(FLAGS_backend);
    lo.threads = threads;
    lo.prefill_tokens = absl::GetFlag(FLAGS_lq);
    lo.iters = absl::GetFlag(FLAGS_iters);
    lo.min_time = absl::GetFlag(FLAGS_min_time);
    lo.json = absl::GetFlag(FLAGS_json);
    bench::MachinePeak layer_peak;
    if (absl::GetFlag(FLAGS_peak_gflops) > 0 && absl::GetFlag(FLAGS_peak_gbps) > 0) {
      layer_peak = {absl::GetFlag(FLAGS_peak_gflops), absl::GetFlag(FLAGS_peak_gbps), "given"};
    } else {
      layer_peak = bench::MeasureMachinePeak(threads);
    }
    return bench::RunLayerBench(lo, layer_peak);
  }

  bench::MachinePeak peak;
  if (absl::GetFlag(FLAGS_peak_gflops) > 0 && absl::GetFlag(FLAGS_peak_gbps) > 0) {
    peak.fma_gflops = absl::GetFlag(FLAGS_peak_gflops);
    peak.read_gbps = absl::GetFlag(FLAGS_peak_gbps);
    peak.isa = "given";
  } else {
    peak = bench::MeasureMachinePeak(threads);
  }
  // The bandwidth probe's array is freed by now; start the peak-RSS count
  // afresh so it reports the attention run alone.
  ResetPeakRss();

  const int dv = absl::GetFlag(FLAGS_dv) > 0 ? absl::GetFlag(FLAGS_dv) : shape.d;
  std::mt19937 rng(42);
  const std::string q = RandomBytes(dtype, int64_t{shape.b} * shape.lq * shape.hq * shape.d, rng);
  const std::string k = RandomBytes(dtype, int64_t{shape.b} * shape.lk * shape.hkv * shape.d, rng);
  const std::string v = RandomBytes(dtype, int64_t{shape.b} * shape.lk * shape.hkv * dv, rng);
  const std::string bias =
      absl::GetFlag(FLAGS_bias)
          ? RandomBytes(dtype, int64_t{shape.b} * shape.hq * shape.lq * shape.lk, rng)
          : std::string();
  RequestLimits limits;
  limits.max_output_bytes = int64_t{1} << 34;
  limits.max_weights_bytes = int64_t{1} << 34;
  // The jobs of one backend call; with --paged, one such batch per layer.
  std::vector<std::vector<std::unique_ptr<AttentionJob>>> layer_jobs(layers);
  std::vector<std::vector<std::unique_ptr<AttentionJob>>> dense_jobs(layers);
  // Prepares `request` into `layer`'s batch: with a sparse shape's pattern,
  // and without it into dense_jobs.
  auto prepare = [&](AttentionRequest request, int layer) {
    if (pattern.has_value()) {
      auto dense = PrepareAttention(request, limits);
      if (!dense.ok()) {
        std::fprintf(stderr, "PrepareAttention (dense): %s\n", dense.status().ToString().c_str());
        return false;
      }
      dense_jobs[layer].push_back(*std::move(dense));
      request.sparsity = pattern->spec();
    }
    auto job = PrepareAttention(request, limits);
    if (!job.ok()) {
      std::fprintf(stderr, "PrepareAttention: %s\n", job.status().ToString().c_str());
      return false;
    }
    layer_jobs[layer].push_back(*std::move(job));
    return true;
  };
  std::unique_ptr<SessionStore> store;
  std::vector<SessionLease> leases;
  if (!paged) {
    AttentionRequest request;
    request.query = TensorView{dtype, {shape.b, shape.lq, shape.hq, shape.d}, q};
    request.key = TensorView{dtype, {shape.b, shape.lk, shape.hkv, shape.d}, k};
    request.value = TensorView{dtype, {shape.b, shape.lk, shape.hkv, dv}, v};
    request.options.causal = shape.causal;
    if (absl::GetFlag(FLAGS_linear)) request.options.variant = Variant::kLinear;
    if (!bias.empty()) request.bias = TensorView{dtype, {shape.b, shape.hq, shape.lq, shape.lk}, bias};
    request.outputs.weights = absl::GetFlag(FLAGS_weights);
    request.outputs.top_k = absl::GetFlag(FLAGS_top_k);
    request.outputs.entropy = absl::GetFlag(FLAGS_entropy);
    if (!prepare(std::move(request), 0)) return 1;
  } else {
    if (dv != shape.d || !bias.empty() || absl::GetFlag(FLAGS_linear) ||
        absl::GetFlag(FLAGS_weights) || absl::GetFlag(FLAGS_top_k) > 0) {
      std::fprintf(stderr, "--paged takes none of --dv, --bias, --linear, --weights, --top_k\n");
      return 2;
    }
    // One session per batch row with one paged cache per layer, each layer
    // filled with that row's K/V, as a prefill would; then per layer one job
    // per session, a layer's jobs all in one backend call.
    SessionStoreOptions so;
    so.block_tokens = absl::GetFlag(FLAGS_kv_block_tokens);
    const int64_t row_bytes = int64_t{shape.hkv} * shape.d * int64_t(DTypeSize(dtype));
    const int64_t blocks = (int64_t{shape.lk} + so.block_tokens - 1) / so.block_tokens;
    const int64_t block_bytes =
        std::max<int64_t>(so.block_tokens * 2 * row_bytes, so.min_block_bytes);
    so.kv_cache_bytes = int64_t{shape.b} * layers * (blocks + 1) * block_bytes;
    auto created_store = SessionStore::Create(so);
    if (!created_store.ok()) {
      std::fprintf(stderr, "SessionStore: %s\n", created_store.status().ToString().c_str());
      return 1;
    }
    store = *std::move(created_store);
    SessionConfig config;
    config.num_kv_heads = shape.hkv;
    config.head_dim = shape.d;
    config.dtype = dtype;
    config.num_layers = layers;
    const int64_t kv_row = int64_t{shape.lk} * row_bytes;
    const int64_t q_row = int64_t{shape.lq} * shape.hq * shape.d * int64_t(DTypeSize(dtype));
    for (int b = 0; b < shape.b; ++b) {
      auto created = store->CreateSession(config, "");
      auto lease = created.ok() ? store->Acquire(created->session_id, "")
                                : absl::StatusOr<SessionLease>(created.status());
      // Layers in order, as the store requires; every layer gets the same
      // K/V bytes but its own blocks.
      absl::Status appended = lease.status();
      for (int layer = 0; layer < layers && appended.ok(); ++layer) {
        appended = lease->Append(layer,
                                 TensorView{dtype, {shape.lk, shape.hkv, shape.d},
                                            std::string_view(k).substr(b * kv_row, kv_row)},
                                 TensorView{dtype, {shape.lk, shape.hkv, shape.d},
                                            std::string_view(v).substr(b * kv_row, kv_row)});
      }
      if (!appended.ok()) {
        std::fprintf(stderr, "session: %s\n", appended.ToString().c_str());
        return 1;
      }
      for (int layer = 0; layer < layers; ++layer) {
        AttentionRequest request;
        request.query = TensorView{dtype, {shape.lq, shape.hq, shape.d},
                                   std::string_view(q).substr(b * q_row, q_row)};
        request.paged_kv = lease->View(layer);
        request.options.causal = shape.causal;
        request.outputs.entropy = absl::GetFlag(FLAGS_entropy);
        if (!prepare(std::move(request), layer)) return 1;
      }
      leases.push_back(*std::move(lease));
    }
  }
  const std::string backend_name = absl::GetFlag(FLAGS_backend);
  const std::string isa = absl::GetFlag(FLAGS_isa);
  auto backend = isa.empty() || backend_name != "cpu"
                     ? CreateBackend(backend_name, BackendOptions{.threads = threads})
                     : CreateCpuBackendWithIsa(BackendOptions{.threads = threads}, isa);
  if (!backend.ok()) {
    std::fprintf(stderr, "CreateBackend: %s\n", backend.status().ToString().c_str());
    return 1;
  }
  // One backend call's params per layer; flops, cost and bytes are one
  // call's (every layer's batch has the same shape).
  std::vector<std::vector<AttentionParams>> layer_params(layers);
  std::vector<std::vector<AttentionParams>> dense_params(layers);
  double flops = 0;
  double cost = 0;
  int64_t output_bytes = 0;
  for (int layer = 0; layer < layers; ++layer) {
    for (const auto& job : layer_jobs[layer]) {
      if (absl::Status s = (*backend)->Supports(job->params); !s.ok()) {
        std::fprintf(stderr, "Supports: %s\n", s.ToString().c_str());
        return 1;
      }
      layer_params[layer].push_back(job->params);
      if (layer > 0) continue;
      flops += job->flops;
      cost += job->cost;
      output_bytes += static_cast<int64_t>(job->output.data.size());
    }
    for (const auto& job : dense_jobs[layer]) dense_params[layer].push_back(job->params);
  }
  // A sparse shape's work: the visible pairs' FLOPs (2·pairs·(D + Dv)), and
  // the bytes it must read, K/V of the listed blocks only.
  double pairs = 0;
  double dense_pairs = 0;
  int64_t kv_read_bytes = 0;
  if (pattern.has_value()) {
    for (const auto& job : layer_jobs[0]) {
      pairs += CountVisiblePairs(job->params);
      kv_read_bytes += bench::ListedKvBytes(job->params);
    }
    for (const auto& job : dense_jobs[0]) dense_pairs += CountVisiblePairs(job->params);
    flops = 2 * pairs * (double(shape.d) + dv);
  }

  using Clock = std::chrono::steady_clock;
  auto process_cpu_seconds = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
  };
  // With --entropy, the same batches without it, timed alternately with them.
  const bool entropy = absl::GetFlag(FLAGS_entropy);
  std::vector<std::vector<AttentionParams>> plain_params = layer_params;
  for (auto& batch : plain_params) {
    for (AttentionParams& p : batch) p.entropy = nullptr;
  }
  // Runs the next layer's batch (the layers in turn); CPU seconds of the
  // timed batches (not of those timed beside them) add up in cpu_total.
  int next_layer = 0;
  int next_dense_layer = 0;
  double cpu_total = 0;
  auto run_params = [&](const std::vector<AttentionParams>& params) -> double {
    const auto start = Clock::now();
    if (absl::Status s = (*backend)->Run(params); !s.ok()) {
      std::fprintf(stderr, "Run: %s\n", s.ToString().c_str());
      std::exit(1);
    }
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  auto run_once = [&]() -> double {
    const double cpu_start = process_cpu_seconds();
    const double t = run_params(layer_params[next_layer]);
    cpu_total += process_cpu_seconds() - cpu_start;
    next_layer = (next_layer + 1) % layers;
    return t;
  };
  auto run_dense = [&]() -> double {
    const double t = run_params(dense_params[next_dense_layer]);
    next_dense_layer = (next_dense_layer + 1) % layers;
    return t;
  };
  std::vector<double> plain_times;
  auto run_plain = [&]() { plain_times.push_back(run_params(plain_params[next_layer])); };
  // Warm-up, every layer once: workspace, page faults, caches.
  for (int layer = 0; layer < layers; ++layer) run_once();
  cpu_total = 0;
  // The scratch of the timed batches, before the dense ones can grow it.
  const int64_t workspace = (*backend)->workspace_bytes();
  if (entropy) {
    run_plain();
    plain_times.clear();
  }
  // A sparse shape: is its output right (layer 0's jobs, run just now)?
  double check_error = 0;
  double check_seconds = 0;
  if (pattern.has_value()) {
    const auto check_start = Clock::now();
    for (const AttentionParams& p : layer_params[0]) {
      absl::StatusOr<double> error = bench::CheckAgainstReference(p, 16);
      if (!error.ok()) {
        std::fprintf(stderr, "%s: %s\n", shape.id.c_str(), error.status().ToString().c_str());
        return 1;
      }
      check_error = std::max(check_error, *error);
    }
    check_seconds = std::chrono::duration<double>(Clock::now() - check_start).count();
    for (int layer = 0; layer < layers; ++layer) run_dense();
  }
  const int fixed_iters = absl::GetFlag(FLAGS_iters);
  const double min_time = absl::GetFlag(FLAGS_min_time);
  auto more = [&](const std::vector<double>& t, double total) {
    return fixed_iters > 0 ? static_cast<int>(t.size()) < fixed_iters
                           : (total < min_time || t.size() < 3);
  };
  std::vector<double> times;
  std::vector<double> dense_times;  // a sparse shape's dense batches, interleaved
  double total = 0;
  double dense_total = 0;
  while (more(times, total) || (pattern.has_value() && more(dense_times, dense_total))) {
    if (more(times, total)) {
      if (entropy) run_plain();  // the same layer's batch, without entropy
      times.push_back(run_once());
      total += times.back();
    }
    if (pattern.has_value() && more(dense_times, dense_total)) {
      dense_times.push_back(run_dense());
      dense_total += dense_times.back();
    }
  }
  // CPU seconds per iteration and thread: what the wall time would be on an
  // otherwise idle machine (pool threads spin only briefly, so this is close).
  const double cpu_seconds = cpu_total / times.size() / threads;
  // The median: robust against a neighbour stealing a core for one run.
  auto median = [](std::vector<double> t) {
    std::sort(t.begin(), t.end());
    return t.empty() ? 0.0 : t[t.size() / 2];
  };
  const double seconds = median(times);
  const double plain_seconds = median(plain_times);
  const double dense_seconds = median(dense_times);

  const double bytes = static_cast<double>(q.size() + k.size() + v.size() + output_bytes);
  const double gflops = flops / seconds / 1e9;
  // The cost model's FLOP-equivalents (attention/cost.h) per second: about
  // the tiled path's GFLOP/s whatever the options, when the model is right.
  const double cost_gflops = cost / seconds / 1e9;
  const double gbps = bytes / seconds / 1e9;
  // Sparse shapes: bw_fraction is over the bytes the pattern makes a kernel
  // read (Q, the listed blocks' K/V, the output), not over all of K and V.
  const double bytes_read = static_cast<double>(q.size() + kv_read_bytes + output_bytes);
  const double read_gbps = pattern.has_value() ? bytes_read / seconds / 1e9 : gbps;
  const int64_t peak_rss_bytes = PeakRssBytes();

  std::string options;  // the non-default paths, for the report
  if (absl::GetFlag(FLAGS_linear)) options += "linear,";
  if (!bias.empty()) options += "bias,";
  if (absl::GetFlag(FLAGS_weights)) options += "weights,";
  if (absl::GetFlag(FLAGS_top_k) > 0) options += absl::StrCat("top_k=", absl::GetFlag(FLAGS_top_k), ",");
  if (entropy) options += "entropy,";
  if (!options.empty()) options.pop_back();
  // --paged: an iteration is one layer-step, which moves every batch row's
  // Lq tokens through one layer; a whole-model token takes `layers` of them.
  const double tokens_per_s = static_cast<double>(shape.b) * shape.lq / (seconds * layers);
  const std::string paged_json =
      paged ? absl::StrFormat(",\"layers\":%d,\"layer_step_ms\":%.4f,\"tokens_per_s\":%.2f",
                              layers, seconds * 1e3, tokens_per_s)
            : "";
  const std::string entropy_json =
      entropy ? absl::StrFormat(",\"ms_without_entropy\":%.4f,\"entropy_overhead\":%.4f",
                                plain_seconds * 1e3, seconds / plain_seconds - 1)
              : "";
  const std::string entropy_text =
      entropy ? absl::StrFormat(", without entropy %.3f ms (entropy costs %+.1f%%)",
                                plain_seconds * 1e3, 100 * (seconds / plain_seconds - 1))
              : "";
  const std::string paged_text =
      paged ? absl::StrFormat(", %d layer(s): %.3f ms per layer-step, %.1f whole-model tokens/s",
                              layers, seconds * 1e3, tokens_per_s)
            : "";
  // A sparse shape against its dense request: density is the fraction of
  // the dense request's visible pairs it keeps, efficiency the fraction of
  // the dense kernel's rate per visible pair it reaches.
  const double density = pattern.has_value() ? pairs / dense_pairs : 1;
  const double speedup = pattern.has_value() ? dense_seconds / seconds : 1;
  const std::string sparse_json =
      pattern.has_value()
          ? absl::StrFormat(",\"pattern\":\"%s\",\"seed\":%u,\"pairs\":%.0f,\"density\":%.5f,"
                            "\"dense_ms\":%.4f,\"speedup\":%.3f,\"efficiency\":%.3f,"
                            "\"bytes_read\":%.0f,\"read_gbps\":%.3f,\"check_max_err\":%.2e,"
                            "\"check_ms\":%.1f",
                            pattern->description, absl::GetFlag(FLAGS_sparse_seed), pairs, density,
                            dense_seconds * 1e3, speedup, speedup * density, bytes_read, read_gbps,
                            check_error, check_seconds * 1e3)
          : "";
  const std::string sparse_text =
      pattern.has_value()
          ? absl::StrFormat(
                "\n  %s: density %.4f; dense %.3f ms, speedup %.2fx, efficiency %.2f; reads %.1f "
                "MiB, %.2f GB/s (%.0f%% of read bandwidth); output within %.1e x rms of the "
                "reference",
                pattern->description, density, dense_seconds * 1e3, speedup, speedup * density,
                bytes_read / (1 << 20), read_gbps, 100 * read_gbps / peak.read_gbps, check_error)
          : "";
  if (absl::GetFlag(FLAGS_json)) {
    std::printf(
        "{\"shape\":\"%s\",\"backend\":\"%s\",\"dtype\":\"%s\",\"threads\":%d,\"B\":%d,\"Hq\":%d,"
        "\"Hkv\":%d,\"Lq\":%d,\"Lk\":%d,\"D\":%d,\"causal\":%s,\"iters\":%zu,\"ms\":%.4f,"
        "\"cpu_ms\":%.4f,"
        "\"gflops\":%.2f,\"peak_gflops\":%.2f,\"peak_fraction\":%.4f,\"gbps\":%.3f,"
        "\"peak_gbps\":%.3f,\"bw_fraction\":%.4f,\"workspace_bytes\":%lld,"
        "\"peak_rss_bytes\":%lld,\"peak_isa\":\"%s\",\"paged\":%s,\"Dv\":%d,\"cost\":%.6g,"
        "\"cost_gflops\":%.2f,\"options\":\"%s\"%s%s%s}\n",
        shape.id.c_str(), backend_name.c_str(), dtype_name.c_str(), threads, shape.b, shape.hq, shape.hkv, shape.lq,
        shape.lk, shape.d, shape.causal ? "true" : "false", times.size(), seconds * 1e3, cpu_seconds * 1e3, gflops,
        peak.fma_gflops, gflops / peak.fma_gflops, gbps, peak.read_gbps, read_gbps / peak.read_gbps,
        static_cast<long long>(workspace), static_cast<long long>(peak_rss_bytes),
        peak.isa.c_str(), paged ? "true" : "false", dv, cost, cost_gflops, options.c_str(),
        paged_json.c_str(), entropy_json.c_str(), sparse_json.c_str());
  } else {
    std::printf(
        "%s%s %s %s threads=%d: %.3f ms (cpu %.3f ms), %.1f GFLOP/s (%.0f%% of %.1f FP32 FMA peak, %s), "
        "%.2f GB/s (%.0f%% of %.2f read bandwidth), workspace %lld B, peak RSS %lld MiB, "
        "cost %.4g (%.1f G/s)%s%s%s%s%s\n",
        shape.id.c_str(), paged ? " paged" : "", backend_name.c_str(), dtype_name.c_str(), threads,
        seconds * 1e3, cpu_seconds * 1e3, gflops, 100 * gflops / peak.fma_gflops, peak.fma_gflops, peak.isa.c_str(), gbps,
        100 * gbps / peak.read_gbps, peak.read_gbps, static_cast<long long>(workspace),
        static_cast<long long>(peak_rss_bytes >> 20), cost, cost_gflops, options.empty() ? "" : " ",
        options.c_str(), paged_text.c_str(), entropy_text.c_str(), sparse_text.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace attnserve

int main(int argc, char** argv) {
  attnserve::PreferSleepingOpenMpWaits(argv);  // as the server runs
  absl::SetProgramUsageMessage("Times one attention shape on one backend.");
  absl::ParseCommandLine(argc, argv);
  return attnserve::Main();
}
