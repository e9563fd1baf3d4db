// The cuda backend against the reference kernel over the option matrix (F16,
// BF16 and F32 requests; head dims 64, 128, 80, 256 and odd ones), plus its
// own promises: batch invariance, what it refuses, and the device-memory pool.
// Without a GPU (or without the backend compiled in) every test skips with a
// message saying so.
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/job.h"
#include "attention/reference.h"
#include "backends/registry.h"
#include "core/half.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

// Creates the cuda backend or says why the tests cannot run here.
absl::StatusOr<std::unique_ptr<Backend>> MakeCuda(const BackendOptions& options = {}) {
  return CreateBackend("cuda", options);
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto backend = MakeCuda();
    if (absl::IsNotFound(backend.status())) {
      GTEST_SKIP() << "cuda backend not compiled in (no nvcc at build time): cuda backend tests "
                      "skipped";
    }
    if (absl::IsFailedPrecondition(backend.status())) {
      GTEST_SKIP() << "no CUDA device: cuda backend tests skipped (" << backend.status() << ")";
    }
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
  }

  std::unique_ptr<Backend> backend_;
};

struct Case {
  std::string name;
  int B = 1, Lq = 64, Lk = 64, Hq = 2, Hkv = 2, D = 64, Dv = -1;
  AttentionOptions options = {};
  int bias_rank = 0;  // 0: none; 4: [B, Hq, Lq, Lk]; 2: [Lq, Lk] broadcast. Some entries -inf.
  std::vector<int32_t> key_lengths = {};
  float magnitude = 2.f;  // Q and K are uniform in [-magnitude, magnitude]
};

// Owns the bytes of one random request.
struct Inputs {
  std::string q, k, v, bias;
  AttentionRequest request;
};

std::string RandomBytes(DType dtype, int64_t n, std::mt19937& rng, float magnitude) {
  std::uniform_real_distribution<float> dist(-magnitude, magnitude);
  std::string bytes(n * DTypeSize(dtype), '\0');
  for (int64_t i = 0; i < n; ++i) StoreFloat(bytes.data(), dtype, i, dist(rng));
  return bytes;
}

std::unique_ptr<Inputs> MakeInputs(const Case& c, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  auto in = std::make_unique<Inputs>();
  const int Dv = c.Dv < 0 ? c.D : c.Dv;
  in->q = RandomBytes(dtype, int64_t{c.B} * c.Lq * c.Hq * c.D, rng, c.magnitude);
  in->k = RandomBytes(dtype, int64_t{c.B} * c.Lk * c.Hkv * c.D, rng, c.magnitude);
  in->v = RandomBytes(dtype, int64_t{c.B} * c.Lk * c.Hkv * Dv, rng, 1.f);
  AttentionRequest& r = in->request;
  r.query = TensorView{dtype, {c.B, c.Lq, c.Hq, c.D}, in->q};
  r.key = TensorView{dtype, {c.B, c.Lk, c.Hkv, c.D}, in->k};
  r.value = TensorView{dtype, {c.B, c.Lk, c.Hkv, Dv}, in->v};
  if (c.bias_rank != 0) {
    std::vector<int64_t> shape = {c.Lq, c.Lk};
    if (c.bias_rank == 4) shape = {c.B, c.Hq, c.Lq, c.Lk};
    const int64_t n = CheckedElementCount(shape);
    in->bias = RandomBytes(dtype, n, rng, 1.f);
    for (int64_t i = 3; i < n; i += 11) StoreFloat(in->bias.data(), dtype, i, -INFINITY);
    r.bias = TensorView{dtype, shape, in->bias};
  }
  r.key_lengths = c.key_lengths;
  r.options = c.options;
  r.outputs.lse = true;
  return in;
}

std::unique_ptr<AttentionJob> Prepare(const Inputs& in) {
  auto job = PrepareAttention(in.request);
  EXPECT_TRUE(job.ok()) << job.status();
  return job.ok() ? *std::move(job) : nullptr;
}

// |got - want| <= atol + rtol * |want| for every output element; lse within
// atol, and -inf exactly where the reference has -inf.
void ExpectClose(const AttentionJob& got, const AttentionJob& want, double atol, double rtol,
                 const std::string& what) {
  const int64_t n = want.output.num_elements();
  ASSERT_EQ(got.output.num_elements(), n);
  int failures = 0;
  for (int64_t i = 0; i < n && failures < 5; ++i) {
    const double g = LoadFloat(got.output.data.data(), got.output.dtype, i);
    const double w = LoadFloat(want.output.data.data(), want.output.dtype, i);
    if (!(std::abs(g - w) <= atol + rtol * std::abs(w))) {
      ADD_FAILURE() << what << ": output[" << i << "] = " << g << ", reference " << w;
      ++failures;
    }
  }
  const int64_t m = want.lse.num_elements();
  ASSERT_EQ(got.lse.num_elements(), m);
  for (int64_t i = 0; i < m && failures < 10; ++i) {
    const float g = got.lse.data_as<float>()[i];
    const float w = want.lse.data_as<float>()[i];
    const bool ok = std::isinf(w) ? g == w : std::abs(g - w) <= atol + rtol * std::abs(w);
    if (!ok) {
      ADD_FAILURE() << what << ": lse[" << i << "] = " << g << ", reference " << w;
      ++failures;
    }
  }
}

AttentionOptions Causal(CausalAlignment alignment = CausalAlignment::kBottomRight) {
  AttentionOptions o;
  o.causal = true;
  o.causal_alignment = alignment;
  return o;
}

std::vector<Case> OptionMatrix() {
  std::vector<Case> cases;
  cases.push_back({.name = "plain_d64"});
  cases.push_back({.name = "plain_d128_odd", .Lq = 77, .Lk = 131, .D = 128});
  cases.push_back({.name = "causal_d128_bottom_right", .Lq = 100, .Lk = 300, .D = 128,
                   .options = Causal()});
  cases.push_back({.name = "causal_top_left", .Lq = 130, .Lk = 77,
                   .options = Causal(CausalAlignment::kTopLeft)});
  cases.push_back({.name = "causal_self_long", .Lq = 333, .Lk = 333, .options = Causal()});
  {
    Case c{.name = "window_d80", .Lq = 90, .Lk = 150, .D = 80};
    c.options.window_left = 17;
    c.options.window_right = 5;
    cases.push_back(c);
  }
  {
    Case c{.name = "causal_window_left", .Lq = 200, .Lk = 200, .options = Causal()};
    c.options.window_left = 40;
    cases.push_back(c);
  }
  cases.push_back({.name = "gqa_d256", .Lq = 70, .Lk = 70, .Hq = 8, .Hkv = 2, .D = 256});
  cases.push_back({.name = "mqa_decode", .B = 3, .Lq = 1, .Lk = 517, .Hq = 4, .Hkv = 1,
                   .D = 128});
  {
    Case c{.name = "softcap", .Lq = 65, .Lk = 129, .magnitude = 4.f};
    c.options.softcap = 5.f;
    cases.push_back(c);
  }
  {
    Case c{.name = "alibi_causal_d128", .Lq = 96, .Lk = 160, .Hq = 4, .Hkv = 2, .D = 128,
           .options = Causal()};
    c.options.alibi_slopes = {0.5f, 0.25f, 0.125f, 0.0625f};
    cases.push_back(c);
  }
  cases.push_back({.name = "bias_full", .B = 2, .Lq = 33, .Lk = 70, .bias_rank = 4});
  cases.push_back({.name = "bias_broadcast_causal", .Lq = 70, .Lk = 70, .options = Causal(),
                   .bias_rank = 2});
  cases.push_back({.name = "key_lengths", .B = 3, .Lq = 40, .Lk = 129, .Hq = 4, .Hkv = 2,
                   .options = Causal(), .key_lengths = {37, 0, 129}});
  cases.push_back({.name = "dv_differs_odd_dims", .Lq = 50, .Lk = 90, .D = 36, .Dv = 20});
  cases.push_back({.name = "odd_head_dim", .Lq = 19, .Lk = 23, .D = 33, .Dv = 33});
  {
    Case c{.name = "everything", .B = 2, .Lq = 81, .Lk = 97, .Hq = 6, .Hkv = 3, .D = 96,
           .options = Causal(), .bias_rank = 4, .key_lengths = {97, 60}};
    c.options.window_left = 30;
    c.options.softcap = 20.f;
    c.options.alibi_slopes = {0.3f, 0.2f, 0.1f, 0.05f, 0.02f, 0.01f};
    cases.push_back(c);
  }
  return cases;
}

class CudaOptionMatrixTest : public CudaBackendTest,
                             public ::testing::WithParamInterface<Case> {};

TEST_P(CudaOptionMatrixTest, MatchesReference) {
  const Case& c = GetParam();
  // 16-bit requests: inputs are exact in the kernel; P is rounded to the
  // input type before P·V and the output is stored in it, so ~2^-8 (BF16) /
  // 2^-11 (F16) relative. F32 requests are computed in F16 on the device.
  const struct {
    DType dtype;
    double atol, rtol;
  } configs[] = {{DType::kBF16, 1e-2, 1e-2}, {DType::kF16, 3e-3, 3e-3}, {DType::kF32, 5e-3, 5e-3}};
  for (const auto& cfg : configs) {
    auto in = MakeInputs(c, cfg.dtype, 1234);
    auto want = Prepare(*in);
    auto got = Prepare(*in);
    ASSERT_TRUE(want && got);
    RunReferenceAttention(want->params);
    ASSERT_TRUE(backend_->Supports(got->params).ok()) << backend_->Supports(got->params);
    ASSERT_TRUE(backend_->Run({got->params}).ok());
    ExpectClose(*got, *want, cfg.atol, cfg.rtol, absl::StrCat(c.name, " ", DTypeName(cfg.dtype)));
  }
}

INSTANTIATE_TEST_SUITE_P(Options, CudaOptionMatrixTest, ::testing::ValuesIn(OptionMatrix()),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

TEST_F(CudaBackendTest, F32BeyondHalfRangeRunsInBf16) {
  // Q holds values past F16's 65504: the backend must switch to BF16, not
  // produce infinities. Large K would saturate the softmax, so V carries them.
  Case c{.name = "large", .Lq = 20, .Lk = 30};
  auto in = MakeInputs(c, DType::kF32, 7);
  float* v = reinterpret_cast<float*>(in->v.data());
  v[0] = 1e6f;
  v[5] = -3e5f;
  auto want = Prepare(*in);
  auto got = Prepare(*in);
  ASSERT_TRUE(want && got);
  RunReferenceAttention(want->params);
  ASSERT_TRUE(backend_->Run({got->params}).ok());
  ExpectClose(*got, *want, 2e-2, 2e-2, "F32 with |v| > 65504");
}

TEST_F(CudaBackendTest, BatchedEqualsAloneBitwise) {
  const std::vector<Case> cases = {
      {.name = "a", .Lq = 70, .Lk = 90, .options = Causal()},
      {.name = "b", .B = 2, .Lq = 5, .Lk = 200, .Hq = 4, .Hkv = 1, .D = 128},
      {.name = "c", .Lq = 64, .Lk = 64, .D = 80, .bias_rank = 2},
  };
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    std::vector<std::unique_ptr<Inputs>> inputs;
    std::vector<std::unique_ptr<AttentionJob>> alone, batched;
    std::vector<AttentionParams> batch;
    for (size_t i = 0; i < cases.size(); ++i) {
      inputs.push_back(MakeInputs(cases[i], dtype, 100 + i));
      alone.push_back(Prepare(*inputs.back()));
      batched.push_back(Prepare(*inputs.back()));
      ASSERT_TRUE(alone.back() && batched.back());
      ASSERT_TRUE(backend_->Run({alone.back()->params}).ok());
      batch.push_back(batched.back()->params);
    }
    ASSERT_TRUE(backend_->Run(batch).ok());
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_EQ(alone[i]->output.data, batched[i]->output.data) << cases[i].name;
      EXPECT_EQ(alone[i]->lse.data, batched[i]->lse.data) << cases[i].name;
    }
  }
}

TEST_F(CudaBackendTest, RefusesWhatItCannotRun) {
  Case c{.name = "refused", .Lq = 4, .Lk = 4};
  auto in = MakeInputs(c, DType::kBF16, 1);
  in->request.outputs.weights = true;
  auto job = Prepare(*in);
  ASSERT_TRUE(job);
  EXPECT_TRUE(absl::IsUnimplemented(backend_->Supports(job->params)));

  in->request.outputs.weights = false;
  in->request.outputs.top_k = 2;
  job = Prepare(*in);
  ASSERT_TRUE(job);
  EXPECT_TRUE(absl::IsUnimplemented(backend_->Supports(job->params)));

  in->request.outputs = {};
  in->request.options.variant = Variant::kLinear;
  job = Prepare(*in);
  ASSERT_TRUE(job);
  EXPECT_TRUE(absl::IsUnimplemented(backend_->Supports(job->params)));

  Case wide{.name = "wide", .Lq = 2, .Lk = 2, .D = 320};
  auto wide_in = MakeInputs(wide, DType::kBF16, 1);
  job = Prepare(*wide_in);
  ASSERT_TRUE(job);
  EXPECT_TRUE(absl::IsUnimplemented(backend_->Supports(job->params)));
}

TEST_F(CudaBackendTest, DeviceMemoryIsPooledAndBounded) {
  auto small = MakeCuda(BackendOptions{.gpu_memory_bytes = int64_t{4} << 20});
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ((*small)->device_memory().capacity_bytes, int64_t{4} << 20);

  Case fits{.name = "fits", .Lq = 64, .Lk = 64};
  auto in = MakeInputs(fits, DType::kF16, 3);
  auto job = Prepare(*in);
  ASSERT_TRUE(job);
  ASSERT_TRUE((*small)->Run({job->params}).ok());
  const DeviceMemory used = (*small)->device_memory();
  EXPECT_GT(used.used_bytes, 0);
  EXPECT_LE(used.used_bytes, used.capacity_bytes);
  EXPECT_GT((*small)->workspace_bytes(), 0);

  // ~8 MiB of K/V cannot fit under a 4 MiB limit.
  Case big{.name = "big", .Lq = 16, .Lk = 16384, .Hq = 2, .Hkv = 2, .D = 64};
  auto big_in = MakeInputs(big, DType::kF16, 4);
  auto big_job = Prepare(*big_in);
  ASSERT_TRUE(big_job);
  EXPECT_TRUE(absl::IsResourceExhausted((*small)->Run({big_job->params})));
  // The pool still serves requests that fit.
  EXPECT_TRUE((*small)->Run({job->params}).ok());
}

}  // namespace
}  // namespace attnserve
