#include "layer_bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "attention/job.h"
#include "attention/rope.h"
#include "backends/registry.h"
#include "core/half.h"
#include "kvcache/session_store.h"
#include "model/layer.h"
#include "model/model.h"

namespace attnserve::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// L1 and L2's layer: Llama-3-8B's attention.
ModelConfig Llama3Layer() {
  ModelConfig c;
  c.family = ModelFamily::kLlama;
  c.model_type = "llama";
  c.num_layers = 1;
  c.hidden_size = 4096;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.causal = true;
  RopeConfig rope;
  rope.theta = 500000.0;
  rope.rotary_dim = 128;
  c.rope = rope;
  return c;
}

std::vector<float> RandomFloats(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// The timed phases of one iteration.
struct Phases {
  double projections = 0;
  double attention = 0;
  double total() const { return projections + attention; }
};

// Runs `iterate` (after one warm-up) until min_time or iters; the iteration
// with the median total.
Phases Time(const LayerBenchOptions& o, const std::function<Phases()>& iterate) {
  iterate();
  std::vector<Phases> runs;
  double spent = 0;
  while (o.iters > 0 ? static_cast<int>(runs.size()) < o.iters
                     : (spent < o.min_time || runs.size() < 3)) {
    runs.push_back(iterate());
    spent += runs.back().total();
  }
  std::sort(runs.begin(), runs.end(),
            [](const Phases& a, const Phases& b) { return a.total() < b.total(); });
  return runs[runs.size() / 2];
}

void Fail(const char* what, const absl::Status& s) {
  std::fprintf(stderr, "attn_bench --layer: %s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

// A prefill of `tokens` tokens through layer 0, as AttendLayer runs it.
Phases Prefill(const LayerBenchOptions& o, const Model& model, Backend& backend, int64_t tokens,
               double* attention_flops) {
  const ModelConfig& c = model.config();
  const std::vector<float> x = RandomFloats(tokens * c.hidden_size, 1);
  LayerInput input;
  input.model = &model;
  input.x = TensorView{DType::kF32, {1, tokens, c.hidden_size},
                       std::string_view(reinterpret_cast<const char*>(x.data()), x.size() * 4)};
  RequestLimits limits;
  limits.max_output_bytes = int64_t{1} << 34;
  return Time(o, [&] {
    absl::StatusOr<std::unique_ptr<LayerCall>> call = LayerCall::Plan(input, limits);
    if (!call.ok()) Fail("plan", call.status());
    std::unique_ptr<AttentionJob> job = (*call)->TakeJob();
    *attention_flops = job->flops - (*call)->projection_flops();
    if (absl::Status s = AllocateOutputs(*job); !s.ok()) Fail("outputs", s);
    if (absl::Status s = backend.Supports(job->params); !s.ok()) Fail("supports", s);
    TaskStage* stage = call->get();
    Phases p;
    auto start = Clock::now();
    if (absl::Status s = stage->Prepare({&stage, 1}); !s.ok()) Fail("projections", s);
    p.projections = Seconds(start);
    start = Clock::now();
    if (absl::Status s = backend.Run({job->params}); !s.ok()) Fail("attention", s);
    p.attention = Seconds(start);
    start = Clock::now();
    if (absl::Status s = stage->Finish({&stage, 1}); !s.ok()) Fail("output projection", s);
    p.projections += Seconds(start);
    return p;
  });
}

// One decode step of `sequences` sessions over `context` cached tokens, as a
// model session's BatchDecode runs it. *kv_bytes: the cache bytes the
// attention reads.
Phases DecodeStep(const LayerBenchOptions& o, const Model& model, Backend& backend,
                  DType cache_dtype, int64_t sequences, int64_t context, double* attention_flops,
                  double* kv_bytes) {
  const ModelConfig& c = model.config();
  const int64_t q_width = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv_width = int64_t{c.num_kv_heads} * c.head_dim;
  SessionStoreOptions so;
  const int64_t block_bytes = so.block_tokens * 2 * kv_width * int64_t(DTypeSize(cache_dtype));
  so.kv_cache_bytes = sequences * ((context + 1) / so.block_tokens + 2) * block_bytes;
  absl::StatusOr<std::unique_ptr<SessionStore>> store = SessionStore::Create(so);
  if (!store.ok()) Fail("session store", store.status());
  SessionConfig config;
  config.num_kv_heads = c.num_kv_heads;
  config.head_dim = c.head_dim;
  config.dtype = cache_dtype;
  config.rope = c.rope;
  const std::vector<float> prefix = RandomFloats(context * kv_width, 2);
  const TensorView prefix_view{
      DType::kF32, {context, c.num_kv_heads, c.head_dim},
      std::string_view(reinterpret_cast<const char*>(prefix.data()), prefix.size() * 4)};
  std::vector<SessionLease> leases;
  for (int64_t s = 0; s < sequences; ++s) {
    absl::StatusOr<SessionStore::Created> created = (*store)->CreateSession(config, "");
    if (!created.ok()) Fail("session", created.status());
    absl::StatusOr<SessionLease> lease = (*store)->Acquire(created->session_id, "");
    if (!lease.ok()) Fail("session", lease.status());
    if (absl::Status st = lease->Append(0, prefix_view, prefix_view); !st.ok()) Fail("prefill", st);
    leases.push_back(*std::move(lease));
  }
  const AttentionWeights& w = model.layer(0).self;
  const std::vector<float> x = RandomFloats(sequences * c.hidden_size, 3);
  std::vector<float> q(sequences * q_width), k(sequences * kv_width), v(sequences * kv_width),
      y(sequences * c.hidden_size), attn(sequences * q_width);
  std::string q_cache(static_cast<size_t>(q_width) * DTypeSize(cache_dtype), '\0');
  std::vector<std::string> queries(sequences, q_cache);
  *kv_bytes = static_cast<double>(sequences) * (context + 1) * 2 * kv_width * DTypeSize(cache_dtype);
  return Time(o, [&] {
    Phases p;
    auto start = Clock::now();
    if (absl::Status s = ProjectQuery(model, w, x.data(), sequences, q.data()); !s.ok()) {
      Fail("projections", s);
    }
    if (absl::Status s = ProjectKeyValue(model, w, x.data(), sequences, k.data(), v.data());
        !s.ok()) {
      Fail("projections", s);
    }
    p.projections = Seconds(start);
    start = Clock::now();
    std::vector<std::unique_ptr<AttentionJob>> jobs;
    std::vector<AttentionParams> params;
    for (int64_t s = 0; s < sequences; ++s) {
      const int64_t position = leases[s].position(0);
      RotateRope(*c.rope, {&position, 1}, c.num_heads, c.head_dim, q.data() + s * q_width);
      ConvertFloats(q.data() + s * q_width, DType::kF32, queries[s].data(), cache_dtype, q_width);
      const auto row = [&](const std::vector<float>& t) {
        return TensorView{DType::kF32, {1, c.num_kv_heads, c.head_dim},
                          std::string_view(reinterpret_cast<const char*>(t.data() + s * kv_width),
                                           kv_width * 4)};
      };
      if (absl::Status st = leases[s].Append(0, row(k), row(v)); !st.ok()) Fail("append", st);
      AttentionRequest request;
      request.query = TensorView{cache_dtype, {1, c.num_heads, c.head_dim}, queries[s]};
      request.paged_kv = leases[s].View(0);
      request.options.causal = true;
      absl::StatusOr<std::unique_ptr<AttentionJob>> job = PrepareAttention(request);
      if (!job.ok()) Fail("plan", job.status());
      *attention_flops = (*job)->flops * sequences;
      params.push_back((*job)->params);
      jobs.push_back(*std::move(job));
    }
    if (absl::Status s = backend.Run(params); !s.ok()) Fail("attention", s);
    p.attention = Seconds(start);
    start = Clock::now();
    for (int64_t s = 0; s < sequences; ++s) {
      ConvertFloats(jobs[s]->output.data.data(), jobs[s]->output.dtype, attn.data() + s * q_width,
                    DType::kF32, q_width);
    }
    if (absl::Status s = ProjectOutput(w, attn.data(), sequences, y.data()); !s.ok()) {
      Fail("output projection", s);
    }
    p.projections += Seconds(start);
    jobs.clear();
    for (SessionLease& lease : leases) lease.Rollback();  // the next step sees the same cache
    return p;
  });
}

}  // namespace

int RunLayerBench(const LayerBenchOptions& o, const MachinePeak& peak) {
  DType weights;
  if (o.dtype == "f32") {
    weights = DType::kF32;
  } else if (o.dtype == "bf16") {
    weights = DType::kBF16;
    if (!CpuHasBf16Matmul()) {
      std::fprintf(stderr,
                   "attn_bench --layer: --dtype=bf16 needs AVX-512 BF16 (the server converts "
                   "BF16 weights to F32 on this CPU); run --dtype=f32\n");
      return 2;
    }
  } else {
    std::fprintf(stderr, "attn_bench --layer: --dtype: expected f32 or bf16, got %s\n",
                 o.dtype.c_str());
    return 2;
  }
  std::unique_ptr<Model> model;
  const bool named = o.layer == "L1" || o.layer == "L2";
  if (named) {
    absl::StatusOr<std::unique_ptr<Model>> made = Model::Random("L", Llama3Layer(), weights, 7);
    if (!made.ok()) Fail("model", made.status());
    model = *std::move(made);
  } else {
    ModelLoadOptions lo;
    lo.allow_bf16 = weights == DType::kBF16;
    absl::StatusOr<std::unique_ptr<Model>> loaded = Model::Load("dir", o.layer, lo);
    if (!loaded.ok()) Fail(o.layer.c_str(), loaded.status());
    model = *std::move(loaded);
  }
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      CreateBackend(o.backend, BackendOptions{.threads = o.threads});
  if (!backend.ok()) Fail("backend", backend.status());

  const ModelConfig& c = model->config();
  const bool decode = o.layer == "L2";
  const int64_t rows = decode ? 16 : (named ? 512 : o.prefill_tokens);
  const int64_t context = decode ? 1024 : 0;
  double attention_flops = 0, kv_bytes = 0;
  const Phases p = decode ? DecodeStep(o, *model, **backend, weights, rows, context,
                                       &attention_flops, &kv_bytes)
                          : Prefill(o, *model, **backend, rows, &attention_flops);
  const double projection_flops = ProjectionFlops(c, rows, rows);
  const double weight_bytes = static_cast<double>(model->weight_bytes());
  const double seconds = p.total();
  const double gflops = (projection_flops + attention_flops) / seconds / 1e9;
  const double proj_gflops = projection_flops / p.projections / 1e9;
  // Bytes a decode step must read: the weights once and the cache once.
  const double gbps = (weight_bytes + kv_bytes) / seconds / 1e9;
  const char* wdtype = DTypeName(model->weights_dtype());
  if (o.json) {
    std::printf(
        "{\"shape\":\"%s\",\"backend\":\"%s\",\"dtype\":\"%s\",\"weights_dtype\":\"%s\","
        "\"threads\":%d,\"hidden\":%d,\"Hq\":%d,\"Hkv\":%d,\"D\":%d,\"rows\":%lld,"
        "\"context\":%lld,\"ms\":%.4f,\"gflops\":%.2f,\"proj_ms\":%.4f,\"attn_ms\":%.4f,"
        "\"proj_gflops\":%.2f,\"proj_peak_fraction\":%.4f,\"peak_gflops\":%.2f,"
        "\"peak_fraction\":%.4f,\"gbps\":%.3f,\"peak_gbps\":%.3f,\"bw_fraction\":%.4f,"
        "\"weight_bytes\":%.0f,\"kv_bytes\":%.0f,\"peak_isa\":\"%s\"}\n",
        named ? o.layer.c_str() : "dir", o.backend.c_str(), o.dtype.c_str(), wdtype, o.threads,
        c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, static_cast<long long>(rows),
        static_cast<long long>(context), seconds * 1e3, gflops, p.projections * 1e3,
        p.attention * 1e3, proj_gflops, proj_gflops / peak.fma_gflops, peak.fma_gflops,
        gflops / peak.fma_gflops, gbps, peak.read_gbps, gbps / peak.read_gbps, weight_bytes,
        kv_bytes, peak.isa.c_str());
  } else {
    std::printf(
        "%s %s weights %s threads=%d: %.3f ms, %.1f GFLOP/s (%.0f%% of %.1f FP32 FMA peak, %s); "
        "projections %.3f ms (%.1f GFLOP/s, %.0f%% of peak), attention %.3f ms; %.2f GB/s over "
        "weights + KV (%.0f%% of %.2f read bandwidth)\n",
        named ? o.layer.c_str() : o.layer.c_str(), o.backend.c_str(), wdtype, o.threads,
        seconds * 1e3, gflops, 100 * gflops / peak.fma_gflops, peak.fma_gflops, peak.isa.c_str(),
        p.projections * 1e3, proj_gflops, 100 * proj_gflops / peak.fma_gflops,
        p.attention * 1e3, gbps, 100 * gbps / peak.read_gbps, peak.read_gbps);
  }
  return 0;
}

}  // namespace attnserve::bench
