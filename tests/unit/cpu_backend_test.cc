// The cpu backend against the reference kernel over the option matrix, plus
// its own promises: batch invariance (alone vs batched, 1 vs 2 threads,
// bitwise) and bounded workspace.
#include "backends/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/job.h"
#include "attention/reference.h"
#include "backends/cpu/thread_pool.h"
#include "core/half.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

struct Case {
  std::string name;
  int B = 1, Lq = 8, Lk = 8, Hq = 2, Hkv = 2, D = 32, Dv = -1;
  DType dtype = DType::kF32;
  AttentionOptions options;
  bool bias = false;  // a [B, 1, Lq, Lk] bias with some -inf entries
  std::vector<int32_t> key_lengths;
  OutputSpec outputs{.lse = true, .entropy = true};
};

// Owns the bytes of one random request.
struct Inputs {
  std::string q, k, v, bias;
  AttentionRequest request;
};

std::string RandomTensor(DType dtype, int64_t n, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::string bytes(n * DTypeSize(dtype), '\0');
  for (int64_t i = 0; i < n; ++i) StoreFloat(bytes.data(), dtype, i, dist(rng));
  return bytes;
}

std::unique_ptr<Inputs> MakeInputs(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  auto in = std::make_unique<Inputs>();
  const int Dv = c.Dv < 0 ? c.D : c.Dv;
  in->q = RandomTensor(c.dtype, int64_t{c.B} * c.Lq * c.Hq * c.D, rng, -2.f, 2.f);
  in->k = RandomTensor(c.dtype, int64_t{c.B} * c.Lk * c.Hkv * c.D, rng, -2.f, 2.f);
  in->v = RandomTensor(c.dtype, int64_t{c.B} * c.Lk * c.Hkv * Dv, rng);
  AttentionRequest& r = in->request;
  r.query = TensorView{c.dtype, {c.B, c.Lq, c.Hq, c.D}, in->q};
  r.key = TensorView{c.dtype, {c.B, c.Lk, c.Hkv, c.D}, in->k};
  r.value = TensorView{c.dtype, {c.B, c.Lk, c.Hkv, Dv}, in->v};
  if (c.bias) {
    const int64_t n = int64_t{c.B} * c.Lq * c.Lk;
    in->bias = RandomTensor(c.dtype, n, rng);
    for (int64_t i = 0; i < n; i += 7) StoreFloat(in->bias.data(), c.dtype, i, -INFINITY);
    r.bias = TensorView{c.dtype, {c.B, 1, c.Lq, c.Lk}, in->bias};
  }
  r.key_lengths = c.key_lengths;
  r.options = c.options;
  r.outputs = c.outputs;
  return in;
}

std::unique_ptr<AttentionJob> Prepare(const Inputs& in) {
  auto job = PrepareAttention(in.request);
  EXPECT_TRUE(job.ok()) << job.status();
  return job.ok() ? *std::move(job) : nullptr;
}

std::unique_ptr<Backend> MakeCpu(int threads) {
  auto backend = CreateCpuBackend(BackendOptions{.threads = threads});
  EXPECT_TRUE(backend.ok()) << backend.status();
  return *std::move(backend);
}

void ExpectNear(const std::string& what, const Tensor& got, const Tensor& want, double atol,
                double rtol) {
  ASSERT_EQ(got.num_elements(), want.num_elements()) << what;
  int reported = 0;
  for (int64_t i = 0; i < got.num_elements(); ++i) {
    const double g = LoadFloat(got.data.data(), got.dtype, i);
    const double w = LoadFloat(want.data.data(), want.dtype, i);
    if (std::isinf(w) || std::isinf(g)) {
      EXPECT_EQ(g, w) << what << " element " << i;
      continue;
    }
    const bool ok = std::abs(g - w) <= atol + rtol * std::abs(w);
    if (!ok && reported++ < 5) ADD_FAILURE() << what << " element " << i << ": " << g << " vs " << w;
  }
}

void ExpectSameAsReference(const Case& c, std::string_view isa) {
  SCOPED_TRACE(c.name + " on " + std::string(isa));
  auto in = MakeInputs(c, 1234);
  auto want = Prepare(*in);
  auto got = Prepare(*in);
  ASSERT_TRUE(want && got);
  RunReferenceAttention(want->params);
  auto created = CreateCpuBackendWithIsa(BackendOptions{.threads = 2}, isa);
  if (absl::IsFailedPrecondition(created.status())) GTEST_SKIP() << created.status();
  ASSERT_TRUE(created.ok()) << created.status();
  std::unique_ptr<Backend> backend = *std::move(created);
  ASSERT_TRUE(backend->Supports(got->params).ok());
  ASSERT_TRUE(backend->Run({got->params}).ok());

  // FP32 inputs: the kernel accumulates in float; 16-bit outputs are rounded.
  const bool f32 = c.dtype == DType::kF32;
  const double atol = f32 ? 2e-5 : 1e-2;
  const double rtol = f32 ? 1e-4 : 1e-2;
  ExpectNear("output", got->output, want->output, atol, rtol);
  if (c.outputs.lse) ExpectNear("lse", got->lse, want->lse, atol, rtol);
  if (c.outputs.entropy) ExpectNear("entropy", got->entropy, want->entropy, atol, rtol);
  if (c.outputs.weights) ExpectNear("weights", got->weights, want->weights, atol, rtol);
  if (c.outputs.top_k > 0) {
    ExpectNear("top_k_weights", got->top_k_weights, want->top_k_weights, atol, rtol);
    // Indices may differ only where weights tie within rounding; the inputs are
    // random, so demand equality.
    EXPECT_EQ(got->top_k_indices.data, want->top_k_indices.data);
  }
}

std::vector<Case> Matrix() {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(std::move(c)); };
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    const std::string t(DTypeName(dt));
    for (int D : {32, 64, 80, 128, 256}) {
      add({.name = t + " plain D" + std::to_string(D), .B = 2, .Lq = 37, .Lk = 70, .Hq = 4,
           .Hkv = 2, .D = D, .dtype = dt});
    }
    add({.name = t + " causal square", .B = 1, .Lq = 131, .Lk = 131, .Hq = 2, .Hkv = 1, .D = 64,
         .dtype = dt, .options = {.causal = true}});
  }
  add({.name = "causal bottom-right Lq<Lk", .Lq = 19, .Lk = 150, .Hq = 3, .Hkv = 3, .D = 48,
       .options = {.causal = true}});
  add({.name = "causal top-left Lq<Lk", .Lq = 19, .Lk = 150, .Hq = 3, .Hkv = 3, .D = 48,
       .options = {.causal = true, .causal_alignment = CausalAlignment::kTopLeft}});
  add({.name = "causal bottom-right Lq>Lk (first rows empty)", .Lq = 90, .Lk = 33, .Hq = 2,
       .Hkv = 1, .D = 32, .options = {.causal = true}});
  add({.name = "sliding window", .B = 2, .Lq = 200, .Lk = 200, .Hq = 2, .Hkv = 2, .D = 64,
       .options = {.window_left = 20, .window_right = 5}});
  add({.name = "causal + window left", .Lq = 300, .Lk = 300, .Hq = 4, .Hkv = 1, .D = 32,
       .options = {.causal = true, .window_left = 70}});
  add({.name = "softcap", .Lq = 33, .Lk = 77, .Hq = 2, .Hkv = 1, .D = 64,
       .options = {.scale = 0.5f, .softcap = 5.f}});
  add({.name = "alibi causal", .Lq = 45, .Lk = 90, .Hq = 4, .Hkv = 2, .D = 32,
       .options = {.causal = true, .alibi_slopes = {0.5f, 0.25f, 0.125f, 0.0625f}}});
  add({.name = "bias with -inf", .B = 2, .Lq = 21, .Lk = 67, .Hq = 2, .Hkv = 2, .D = 32,
       .bias = true});
  add({.name = "key_lengths incl. 0", .B = 3, .Lq = 17, .Lk = 100, .Hq = 2, .Hkv = 1, .D = 64,
       .key_lengths = {100, 0, 41}});
  add({.name = "key_lengths causal", .B = 2, .Lq = 17, .Lk = 100, .Hq = 2, .Hkv = 1, .D = 64,
       .options = {.causal = true}, .key_lengths = {60, 5}});
  add({.name = "Lk = 1", .B = 2, .Lq = 9, .Lk = 1, .Hq = 2, .Hkv = 1, .D = 32});
  add({.name = "Lq = Lk = 1", .Lq = 1, .Lk = 1, .Hq = 1, .Hkv = 1, .D = 80});
  add({.name = "Dv != D", .Lq = 10, .Lk = 50, .Hq = 2, .Hkv = 2, .D = 32, .Dv = 80});
  add({.name = "odd head dim", .Lq = 10, .Lk = 50, .Hq = 2, .Hkv = 2, .D = 33, .Dv = 7});
  add({.name = "MQA, many heads", .Lq = 5, .Lk = 70, .Hq = 80, .Hkv = 1, .D = 32});
  add({.name = "decode GQA split keys", .B = 3, .Lq = 1, .Lk = 2500, .Hq = 8, .Hkv = 2, .D = 64,
       .key_lengths = {2500, 1030, 0}});
  add({.name = "decode causal split keys", .Lq = 3, .Lk = 2100, .Hq = 4, .Hkv = 4, .D = 32,
       .options = {.causal = true, .window_left = 1500}});
  // Decode tiles span KV heads: 72 heads in tiles of 64 cut KV head 7's group.
  add({.name = "decode tiles across groups", .B = 2, .Lq = 1, .Lk = 300, .Hq = 72, .Hkv = 8,
       .D = 32, .Dv = 48, .options = {.window_left = 200}, .key_lengths = {300, 5}});
  add({.name = "decode F16 split keys causal", .Lq = 1, .Lk = 2200, .Hq = 6, .Hkv = 3, .D = 16,
       .dtype = DType::kF16, .options = {.causal = true}});
  add({.name = "decode BF16 split keys", .B = 2, .Lq = 1, .Lk = 3000, .Hq = 4, .Hkv = 1, .D = 128,
       .dtype = DType::kBF16});
  // 16-bit decode: groups of 9 heads (lanes 4 + 4 + 1 per KV head), a key
  // count that leaves partial key groups, and rows that end in a half chunk
  // (48 and 80 are odd multiples of 16).
  for (DType dt : {DType::kF16, DType::kBF16}) {
    add({.name = std::string("decode ") + DTypeName(dt) + " groups of 9, odd chunks", .B = 2,
         .Lq = 1, .Lk = 301, .Hq = 72, .Hkv = 8, .D = 48, .Dv = 80, .dtype = dt,
         .key_lengths = {301, 7}});
  }
  add({.name = "weights + top_k", .B = 2, .Lq = 7, .Lk = 40, .Hq = 2, .Hkv = 1, .D = 32,
       .options = {.causal = true}, .outputs = {.lse = true, .entropy = true, .weights = true, .top_k = 5}});
  add({.name = "top_k past visible keys", .Lq = 6, .Lk = 12, .Hq = 1, .Hkv = 1, .D = 32,
       .options = {.causal = true}, .key_lengths = {8}, .outputs = {.top_k = 12}});
  add({.name = "linear", .B = 2, .Lq = 20, .Lk = 30, .Hq = 4, .Hkv = 2, .D = 32,
       .options = {.variant = Variant::kLinear}, .outputs = {}});
  add({.name = "linear causal key_lengths", .B = 2, .Lq = 30, .Lk = 30, .Hq = 2, .Hkv = 1,
       .D = 32, .options = {.causal = true, .variant = Variant::kLinear},
       .key_lengths = {30, 11}, .outputs = {}});
  return cases;
}

// Every kernel variant this CPU can run: the default one and the fallbacks.
class CpuBackendIsaTest : public ::testing::TestWithParam<const char*> {};

TEST_P(CpuBackendIsaTest, MatchesReferenceOverOptionMatrix) {
  for (const Case& c : Matrix()) ExpectSameAsReference(c, GetParam());
}

// Asking for entropy changes no other output by a bit (a sampled request
// answers exactly as it would unsampled), on every path: flash tiles with a
// bias and a causal mask, decode tiles, and split key ranges.
TEST_P(CpuBackendIsaTest, EntropyLeavesTheOtherOutputsBitwiseEqual) {
  auto created = CreateCpuBackendWithIsa(BackendOptions{.threads = 2}, GetParam());
  if (!created.ok()) GTEST_SKIP() << created.status();
  for (Case c : {Case{.name = "flash bias causal", .B = 2, .Lq = 64, .Lk = 300, .Hq = 4,
                      .Hkv = 2, .D = 32, .options = {.causal = true}, .bias = true},
                 Case{.name = "decode", .B = 1, .Lq = 1, .Lk = 5000, .Hq = 8, .Hkv = 2,
                      .D = 64}}) {
    SCOPED_TRACE(c.name);
    c.outputs = {.lse = true};
    auto plain_in = MakeInputs(c, 11);
    c.outputs.entropy = true;
    auto entropy_in = MakeInputs(c, 11);
    auto plain = Prepare(*plain_in);
    auto with_entropy = Prepare(*entropy_in);
    ASSERT_TRUE(plain && with_entropy);
    ASSERT_TRUE((*created)->Run({plain->params}).ok());
    ASSERT_TRUE((*created)->Run({with_entropy->params}).ok());
    EXPECT_EQ(plain->output.data, with_entropy->output.data);
    EXPECT_EQ(plain->lse.data, with_entropy->lse.data);
  }
}

// A key chunk whose max lies far below the row's (a mask written as a huge
// negative bias) adds nothing to the merged entropy, and no NaN.
TEST(CpuBackendTest, EntropyOfSplitKeysWithAHugeNegativeBias) {
  Case c{.name = "split, -1e38 bias", .B = 1, .Lq = 1, .Lk = 4096, .Hq = 2, .Hkv = 1, .D = 32,
         .bias = true, .outputs = {.entropy = true}};
  auto in = MakeInputs(c, 13);
  for (int64_t j = 0; j < 1024; ++j) StoreFloat(in->bias.data(), DType::kF32, j, -1e38f);
  auto job = Prepare(*in);
  ASSERT_TRUE(job);
  ASSERT_TRUE(MakeCpu(2)->Run({job->params}).ok());
  auto ref = PrepareAttention(in->request);
  ASSERT_TRUE(ref.ok());
  RunReferenceAttention((*ref)->params);
  ExpectNear("entropy", job->entropy, (*ref)->entropy, 1e-4, 1e-4);
}

// Sparse patterns on every kernel variant, against the reference: random
// block masks (broadcast or per head, block sizes that do and do not divide
// the lengths), key selections (per key or block, head dim 1, Hkv or Hq, with
// -1 padding), global tokens and sinks, over prefill, decode and split-key
// shapes with causal, windows and key_lengths. The conformance suite runs the
// default variant over the full option matrix; this covers the others.
TEST_P(CpuBackendIsaTest, SparsePatternsMatchReference) {
  auto created = CreateCpuBackendWithIsa(BackendOptions{.threads = 2}, GetParam());
  if (absl::IsFailedPrecondition(created.status())) GTEST_SKIP() << created.status();
  ASSERT_TRUE(created.ok()) << created.status();
  std::unique_ptr<Backend> backend = *std::move(created);
  std::mt19937 rng(2024);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto i32 = [](std::vector<int64_t> shape, const std::vector<int32_t>& v) {
    Tensor t = Tensor::Zeros(DType::kI32, std::move(shape));
    if (!v.empty()) std::memcpy(t.data.data(), v.data(), v.size() * sizeof(int32_t));
    return t;
  };
  for (int n = 0; n < 60; ++n) {
    const bool decode = n % 4 == 0;
    Case c{.name = "sparse " + std::to_string(n), .B = uniform(1, 2), .Lq = decode ? 1 : uniform(1, 130),
           .Lk = decode ? uniform(1, 2600) : uniform(1, 180), .Hkv = uniform(1, 3),
           .D = decode ? 64 : 16 * uniform(1, 3), .dtype = n % 3 == 0 ? DType::kBF16 : DType::kF32};
    c.Hq = c.Hkv * uniform(1, 4);
    c.options.causal = uniform(0, 1) == 1;
    if (uniform(0, 3) == 0) c.options.window_left = uniform(0, 40);
    if (uniform(0, 3) == 0) {
      for (int b = 0; b < c.B; ++b) c.key_lengths.push_back(uniform(0, c.Lk));
    }
    SCOPED_TRACE(absl::StrCat(c.name, " on ", GetParam(), ": B ", c.B, " Lq ", c.Lq, " Lk ", c.Lk,
                              " Hq ", c.Hq, " Hkv ", c.Hkv, " D ", c.D, " ", DTypeName(c.dtype)));
    auto in = MakeInputs(c, 500 + n);
    SparsitySpec& sp = in->request.sparsity;
    Tensor indptr, indices, selection;
    if (n % 2 == 0) {
      const int R = uniform(1, 70), C = std::vector<int>{1, 7, 16, 64, 100}[uniform(0, 4)];
      const int rows = (c.Lq + R - 1) / R, cols = (c.Lk + C - 1) / C;
      const int Bm = uniform(0, 1) ? c.B : 1, Hm = uniform(0, 1) ? c.Hq : 1;
      std::vector<int32_t> ip, ix;
      for (int slice = 0; slice < Bm * Hm; ++slice) {
        for (int r = 0; r < rows; ++r) {
          ip.push_back(static_cast<int32_t>(ix.size()));
          for (int col = 0; col < cols; ++col) {
            if (uniform(0, 99) < 40) ix.push_back(col);
          }
        }
        ip.push_back(static_cast<int32_t>(ix.size()));
      }
      indptr = i32({Bm, Hm, rows + 1}, ip);
      indices = i32({static_cast<int64_t>(ix.size())}, ix);
      sp.block_mask = BlockMaskSpec{.block_rows = R, .block_cols = C, .indptr = indptr.view(),
                                    .indices = indices.view()};
    } else {
      const int qb = uniform(1, 20), kb = std::vector<int>{1, 1, 4, 64}[uniform(0, 3)];
      const int rows = (c.Lq + qb - 1) / qb, units = (c.Lk + kb - 1) / kb;
      const int Hi = std::vector<int>{1, c.Hkv, c.Hq}[uniform(0, 2)];
      const int k = uniform(1, std::min(units, 40));
      std::vector<int32_t> idx;
      std::vector<int32_t> perm(units);
      for (int row = 0; row < c.B * Hi * rows; ++row) {
        for (int u = 0; u < units; ++u) perm[u] = u;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int x = 0; x < k; ++x) idx.push_back(uniform(0, 5) == 0 ? -1 : perm[x]);
      }
      selection = i32({c.B, Hi, rows, k}, idx);
      sp.key_indices = KeySelectionSpec{.indices = selection.view(), .query_block = qb, .key_block = kb};
    }
    if (uniform(0, 2) == 0) {
      std::set<int64_t> tokens;
      for (int x = uniform(1, 5); x > 0; --x) tokens.insert(uniform(0, c.Lk - 1));
      sp.global_tokens.assign(tokens.begin(), tokens.end());
    }
    if (uniform(0, 2) == 0) {
      for (int h = 0; h < c.Hq; ++h) sp.sink_logits.push_back(static_cast<float>(uniform(-3, 3)));
    }
    auto want = Prepare(*in);
    auto got = Prepare(*in);
    ASSERT_TRUE(want && got);
    RunReferenceAttention(want->params);
    ASSERT_TRUE(backend->Supports(got->params).ok());
    ASSERT_TRUE(backend->Run({got->params}).ok());
    const bool f32 = c.dtype == DType::kF32;
    ExpectNear("output", got->output, want->output, f32 ? 2e-5 : 1e-2, f32 ? 1e-4 : 1e-2);
    ExpectNear("lse", got->lse, want->lse, f32 ? 2e-5 : 1e-2, f32 ? 1e-4 : 1e-2);
    ExpectNear("entropy", got->entropy, want->entropy, f32 ? 2e-5 : 1e-2, f32 ? 1e-4 : 1e-2);
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, CpuBackendIsaTest, ::testing::Values("avx512", "avx2", "scalar"));

TEST(CpuBackendTest, FullyMaskedRowsGiveZeroAndNegInfLse) {
  Case c{.name = "all masked", .B = 2, .Lq = 4, .Lk = 16, .Hq = 2, .Hkv = 1, .D = 32,
         .key_lengths = {0, 0}};
  auto in = MakeInputs(c, 7);
  auto job = Prepare(*in);
  ASSERT_TRUE(job);
  ASSERT_TRUE(MakeCpu(2)->Run({job->params}).ok());
  for (int64_t i = 0; i < job->output.num_elements(); ++i) {
    ASSERT_EQ(LoadFloat(job->output.data.data(), DType::kF32, i), 0.f);
  }
  for (int64_t i = 0; i < job->lse.num_elements(); ++i) {
    ASSERT_EQ(job->lse.data_as<float>()[i], -INFINITY);
  }
}

// A request's output is bitwise the same alone or batched, with 1 or 2 threads.
TEST(CpuBackendTest, BatchInvariantAcrossBatchesAndThreadCounts) {
  const std::vector<Case> cases = {
      {.name = "prefill", .B = 2, .Lq = 100, .Lk = 100, .Hq = 4, .Hkv = 2, .D = 64,
       .options = {.causal = true}},
      {.name = "decode", .B = 3, .Lq = 1, .Lk = 3000, .Hq = 8, .Hkv = 2, .D = 64},
      {.name = "bf16", .B = 1, .Lq = 70, .Lk = 90, .Hq = 2, .Hkv = 2, .D = 128,
       .dtype = DType::kBF16},
      {.name = "weights", .B = 1, .Lq = 5, .Lk = 30, .Hq = 2, .Hkv = 2, .D = 32,
       .outputs = {.lse = true, .weights = true}},
  };
  std::vector<std::unique_ptr<Inputs>> inputs;
  for (size_t n = 0; n < cases.size(); ++n) inputs.push_back(MakeInputs(cases[n], 100 + n));

  auto one = MakeCpu(1);
  auto two = MakeCpu(2);
  std::vector<std::unique_ptr<AttentionJob>> alone;
  for (const auto& in : inputs) {
    alone.push_back(Prepare(*in));
    ASSERT_TRUE(one->Run({alone.back()->params}).ok());
  }
  for (Backend* backend : {one.get(), two.get()}) {
    // Batched, in reverse order and with a duplicate.
    std::vector<std::unique_ptr<AttentionJob>> batched;
    std::vector<AttentionParams> params;
    for (size_t n = inputs.size(); n-- > 0;) batched.push_back(Prepare(*inputs[n]));
    batched.push_back(Prepare(*inputs[1]));
    for (const auto& job : batched) params.push_back(job->params);
    ASSERT_TRUE(backend->Run(params).ok());
    for (size_t n = 0; n < inputs.size(); ++n) {
      const AttentionJob& got = *batched[inputs.size() - 1 - n];
      SCOPED_TRACE(cases[n].name);
      EXPECT_TRUE(got.output.data == alone[n]->output.data);
      EXPECT_TRUE(got.lse.data == alone[n]->lse.data);
      EXPECT_TRUE(got.weights.data == alone[n]->weights.data);
    }
    EXPECT_TRUE(batched.back()->output.data == alone[1]->output.data);
  }
}

TEST(CpuBackendTest, WorkspaceIsIndependentOfSequenceLength) {
  auto backend = MakeCpu(2);
  Case c{.name = "long", .Lq = 2048, .Lk = 2048, .Hq = 1, .Hkv = 1, .D = 64,
         .options = {.causal = true}};
  auto in = MakeInputs(c, 3);
  auto job = Prepare(*in);
  ASSERT_TRUE(backend->Run({job->params}).ok());
  // A few tiles per thread: far below one Lq x Lk score matrix (16 MiB here).
  EXPECT_GT(backend->workspace_bytes(), 0);
  EXPECT_LT(backend->workspace_bytes(), 1 << 20);
}

// A stopped request is cut short between work items; the others in its
// batch are bitwise what they are alone (batch invariance holds with a stop).
TEST(CpuBackendTest, StoppedRequestLeavesTheRestOfTheBatchUnchanged) {
  auto backend = MakeCpu(2);
  const std::vector<Case> cases = {
      {.name = "prefill", .B = 2, .Lq = 300, .Lk = 300, .Hq = 4, .Hkv = 2, .D = 64},
      {.name = "decode", .B = 2, .Lq = 1, .Lk = 5000, .Hq = 8, .Hkv = 2, .D = 64},
      {.name = "top_k", .B = 1, .Lq = 40, .Lk = 500, .Hq = 2, .Hkv = 2, .D = 32,
       .outputs = {.top_k = 4}},
  };
  for (size_t stopped = 0; stopped < cases.size(); ++stopped) {
    SCOPED_TRACE(cases[stopped].name);
    std::vector<std::unique_ptr<Inputs>> inputs;
    std::vector<std::unique_ptr<AttentionJob>> alone, batched;
    std::vector<AttentionParams> params;
    for (size_t n = 0; n < cases.size(); ++n) {
      inputs.push_back(MakeInputs(cases[n], 200 + n));
      alone.push_back(Prepare(*inputs[n]));
      ASSERT_TRUE(backend->Run({alone[n]->params}).ok());
      batched.push_back(Prepare(*inputs[n]));
      params.push_back(batched[n]->params);
    }
    // Stops at its third poll: some of its items ran, the rest are skipped.
    std::atomic<int> polls{0};
    CancelToken token([&] { return ++polls >= 3; });
    params[stopped].cancel = &token;
    ASSERT_TRUE(backend->Run(params).ok());
    EXPECT_TRUE(token.stopped());
    for (size_t n = 0; n < cases.size(); ++n) {
      if (n == stopped) continue;
      EXPECT_TRUE(batched[n]->output.data == alone[n]->output.data) << cases[n].name;
      EXPECT_TRUE(batched[n]->lse.data == alone[n]->lse.data) << cases[n].name;
    }
  }
}

// The split-key partials are capped per thread, whatever Hq, Lk and Dv: a
// decode-shaped request with 65536 query heads, 16384 keys and Dv = 1024 once
// needed 4.3 GB of partials. The cap runs split tiles in waves, which must not
// change any result.
TEST(CpuBackendTest, SplitKeyPartialsAreCappedPerThread) {
  auto one = MakeCpu(1);
  auto two = MakeCpu(2);
  {
    const int64_t Hq = 65536, Lk = 16384, Dv = 1024;
    std::string q(Hq * 2, '\0'), k(Lk * 2, '\0'), v(Lk * Dv * 2, '\0');
    AttentionRequest r;
    r.query = TensorView{DType::kF16, {1, 1, Hq, 1}, q};
    r.key = TensorView{DType::kF16, {1, Lk, 1, 1}, k};
    r.value = TensorView{DType::kF16, {1, Lk, 1, Dv}, v};
    auto job = PlanAttention(r);
    ASSERT_TRUE(job.ok()) << job.status();
    // 2 MiB of partials per thread, each thread's tile workspace (< 1 MiB)
    // and the plan (8192 chunk items).
    EXPECT_LE(two->ScratchBytes((*job)->planned_params()),
              2 * ((int64_t{2} << 20) + (1 << 20)) + (int64_t{2} << 20));
  }
  // Eight 64-head decode tiles of 4 chunks x 1026 floats per lane, 1 MB of
  // partials each: one thread runs them in eight waves, two threads in three.
  Case c{.name = "waves", .Lq = 1, .Lk = 4096, .Hq = 512, .Hkv = 1, .D = 16, .Dv = 1024};
  auto in = MakeInputs(c, 7);
  auto a = Prepare(*in);
  auto b = Prepare(*in);
  ASSERT_TRUE(one->Run({a->params}).ok());
  ASSERT_TRUE(two->Run({b->params}).ok());
  EXPECT_TRUE(a->output.data == b->output.data);
  EXPECT_TRUE(a->lse.data == b->lse.data);
  EXPECT_LE(one->workspace_bytes(), (int64_t{2} << 20) + (1 << 20));
}

// LINEAR by running key sums over long sequences: the sums must stay as exact
// as the reference's per-row weights (the conformance F32 tolerance), with
// padded keys, GQA, causal in both alignments, and the rows that bottom-right
// alignment with a short key_length leaves fully masked (output 0).
TEST(CpuBackendTest, LinearLongSequencesMatchReference) {
  const AttentionOptions linear = {.variant = Variant::kLinear};
  const AttentionOptions causal_br = {.causal = true, .variant = Variant::kLinear};
  const AttentionOptions causal_tl = {.causal = true,
                                      .causal_alignment = CausalAlignment::kTopLeft,
                                      .variant = Variant::kLinear};
  // Sized for the quadratic reference: about half a second in Release.
  const std::vector<Case> cases = {
      {.name = "non-causal", .B = 2, .Lq = 384, .Lk = 384, .Hq = 2, .Hkv = 1, .D = 16,
       .options = linear, .key_lengths = {384, 200}, .outputs = {}},
      {.name = "causal bottom-right", .B = 2, .Lq = 768, .Lk = 768, .Hq = 2, .Hkv = 1, .D = 16,
       .options = causal_br, .key_lengths = {768, 400}, .outputs = {}},
      {.name = "causal top-left Lq < Lk, Dv != D", .B = 1, .Lq = 256, .Lk = 768, .Hq = 2,
       .Hkv = 1, .D = 16, .Dv = 24, .options = causal_tl, .outputs = {}},
  };
  auto backend = MakeCpu(2);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto in = MakeInputs(c, 4096);
    auto want = Prepare(*in);
    auto got = Prepare(*in);
    ASSERT_TRUE(want && got);
    RunReferenceAttention(want->params);
    ASSERT_TRUE(backend->Run({got->params}).ok());
    ExpectNear("output", got->output, want->output, 1e-5, 1e-5);
  }
}

// Longer still, where the reference cannot afford every row: with bottom-right
// alignment a request of only the last query rows sees the same keys as those
// rows of the full request, so the reference checks the rows whose running
// sums cover the most keys (4000 of 4096 here).
TEST(CpuBackendTest, LinearLastRowsOfLongSequenceMatchReference) {
  constexpr int kLastRows = 8;
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "non-causal");
    const Case c{.name = "linear 4096", .B = 1, .Lq = 4096, .Lk = 4096, .Hq = 4, .Hkv = 2,
                 .D = 16, .options = {.causal = causal, .variant = Variant::kLinear},
                 .key_lengths = {4000}, .outputs = {}};
    auto in = MakeInputs(c, 77);
    auto got = Prepare(*in);
    ASSERT_TRUE(got);
    ASSERT_TRUE(MakeCpu(2)->Run({got->params}).ok());

    const int64_t row_bytes = int64_t{c.Hq} * c.D * DTypeSize(c.dtype);
    AttentionRequest last = in->request;
    last.query = TensorView{c.dtype, {c.B, kLastRows, c.Hq, c.D},
                            std::string_view(in->q).substr((c.Lq - kLastRows) * row_bytes)};
    auto want = PrepareAttention(last);
    ASSERT_TRUE(want.ok()) << want.status();
    RunReferenceAttention((*want)->params);

    Tensor got_last = (*want)->output;
    const int64_t out_row_bytes = int64_t{c.Hq} * c.D * DTypeSize(c.dtype);
    got_last.data = got->output.data.substr((c.Lq - kLastRows) * out_row_bytes);
    ExpectNear("output", got_last, (*want)->output, 1e-5, 1e-5);
  }
}

TEST(CpuBackendTest, InfoAndSupports) {
  auto backend = MakeCpu(2);
  EXPECT_EQ(backend->info().name, "cpu");
  AttentionParams p;
  p.dtype = DType::kI32;
  EXPECT_EQ(backend->Supports(p).code(), absl::StatusCode::kUnimplemented);
  p.dtype = DType::kBF16;
  p.head_dim = p.value_dim = 256;
  EXPECT_TRUE(backend->Supports(p).ok());
  EXPECT_EQ(CreateCpuBackend(BackendOptions{.threads = -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ThreadPoolTest, RunsEveryItemOnceAndReusesThreads) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.num_threads(), 3);
  for (int round = 0; round < 50; ++round) {
    std::vector<std::atomic<int>> hits(257);
    pool.ParallelFor(257, [&](int64_t i, int thread) {
      EXPECT_GE(thread, 0);
      EXPECT_LT(thread, 3);
      hits[i].fetch_add(1);
    });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
  }
}

}  // namespace
}  // namespace attnserve
