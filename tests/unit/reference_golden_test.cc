// The reference kernel against PyTorch-computed golden data (tests/golden/,
// see its README), plus direct checks of semantics whose answer is known
// without a second implementation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention/job.h"
#include "attention/reference.h"
#include "core/half.h"
#include "core/npy.h"
#include "gtest/gtest.h"
#include "tests/unit/golden_files.h"

namespace attnserve {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// Golden cases
// ---------------------------------------------------------------------------

using golden::AttentionCase;
using golden::BuildRequest;
using golden::ExpectClose;
using golden::ExpectEqualInts;

std::filesystem::path CasesDir() { return golden::Dir("cases"); }
std::vector<std::string> CaseNames() { return golden::CaseNames("cases"); }

class ReferenceGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ReferenceGoldenTest, MatchesGolden) {
  const std::filesystem::path dir = CasesDir() / GetParam();
  AttentionCase c = golden::ReadAttentionCase(dir);
  ASSERT_FALSE(HasFailure());
  ASSERT_TRUE(c.expected.count("out")) << dir << " has no out.npy";

  const AttentionRequest request = BuildRequest(c);
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PrepareAttention(request);
  ASSERT_TRUE(job.ok()) << job.status();
  RunReferenceAttention((*job)->params);

  // The output is stored in the request dtype: F16 adds its own rounding
  // (2^-11 relative); every other output is F32.
  const double out_rtol = c.q.dtype == DType::kF16 ? 1e-3 : 1e-5;
  constexpr double kRtol = 1e-5, kAtol = 1e-6;
  ExpectClose("out", (*job)->output, c.expected["out"], out_rtol, kAtol);

  const bool want_lse = c.expected.count("lse") > 0;
  EXPECT_EQ(request.outputs.lse, want_lse);
  if (want_lse) ExpectClose("lse", (*job)->lse, c.expected["lse"], kRtol, kAtol);
  const bool want_entropy = c.expected.count("entropy") > 0;
  EXPECT_EQ(request.outputs.entropy, want_entropy);
  if (want_entropy) {
    ExpectClose("entropy", (*job)->entropy, c.expected["entropy"], kRtol, kAtol);
  }
  const bool want_weights = c.expected.count("weights") > 0;
  EXPECT_EQ(request.outputs.weights, want_weights);
  if (want_weights) ExpectClose("weights", (*job)->weights, c.expected["weights"], kRtol, kAtol);
  const bool want_top_k = c.expected.count("topk_idx") > 0;
  EXPECT_EQ(request.outputs.top_k > 0, want_top_k);
  if (want_top_k) {
    ExpectEqualInts("topk_idx", (*job)->top_k_indices, c.expected["topk_idx"]);
    ExpectClose("topk_w", (*job)->top_k_weights, c.expected["topk_w"], kRtol, kAtol);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ReferenceGoldenTest, ::testing::ValuesIn(CaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(ReferenceGoldenDataTest, CasesArePresent) {
  // The generator writes about forty cases; far fewer means the data is missing.
  EXPECT_GE(CaseNames().size(), 30u) << "golden cases not found under " << CasesDir();
}

// ---------------------------------------------------------------------------
// Direct semantics checks
// ---------------------------------------------------------------------------

// Owns the tensors of a small F32 request built in code.
struct SmallRequest {
  Tensor q, k, v;
  std::optional<Tensor> bias;
  AttentionRequest request;

  SmallRequest(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv,
               uint32_t seed = 1) {
    q = Tensor::Zeros(DType::kF32, {B, Lq, Hq, D});
    k = Tensor::Zeros(DType::kF32, {B, Lk, Hkv, D});
    v = Tensor::Zeros(DType::kF32, {B, Lk, Hkv, Dv});
    uint32_t state = seed;
    for (Tensor* t : {&q, &k, &v}) {
      float* p = t->mutable_data<float>();
      for (int64_t i = 0; i < t->num_elements(); ++i) {
        state = state * 1664525u + 1013904223u;  // a fixed LCG: deterministic data
        p[i] = static_cast<float>(state >> 8) / float(1 << 24) * 2.f - 1.f;
      }
    }
    Bind();
  }

  void Bind() {
    request.query = q.view();
    request.key = k.view();
    request.value = v.view();
    if (bias) request.bias = bias->view();
  }

  std::unique_ptr<AttentionJob> Run() {
    Bind();
    absl::StatusOr<std::unique_ptr<AttentionJob>> job = PrepareAttention(request);
    EXPECT_TRUE(job.ok()) << job.status();
    if (!job.ok()) return nullptr;
    RunReferenceAttention((*job)->params);
    return *std::move(job);
  }
};

TEST(ReferenceSemanticsTest, FullyMaskedRowGivesZeroOutputAndNegInfLse) {
  SmallRequest r(2, 3, 4, 2, 2, 4, 3);
  r.request.key_lengths = {4, 0};  // batch row 1 has no keys at all
  r.request.outputs = {.lse = true, .weights = true, .top_k = 2};
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  const float* o = job->output.data_as<float>();
  for (int64_t i = 3 * 2 * 3; i < 2 * 3 * 2 * 3; ++i) EXPECT_EQ(o[i], 0.f) << i;
  for (int64_t i = 0; i < 3 * 2 * 3; ++i) EXPECT_NE(o[i], 0.f) << i;
  const float* lse = job->lse.data_as<float>();
  for (int64_t i = 0; i < 6; ++i) EXPECT_TRUE(std::isfinite(lse[i])) << i;
  for (int64_t i = 6; i < 12; ++i) EXPECT_EQ(lse[i], -kInf) << i;
  for (int64_t i = 6 * 4; i < 12 * 4; ++i) EXPECT_EQ(job->weights.data_as<float>()[i], 0.f);
  for (int64_t i = 6 * 2; i < 12 * 2; ++i) {
    EXPECT_EQ(job->top_k_indices.data_as<int32_t>()[i], -1);
    EXPECT_EQ(job->top_k_weights.data_as<float>()[i], 0.f);
  }
}

TEST(ReferenceSemanticsTest, RowMaskedByBiasCountsAsFullyMasked) {
  SmallRequest r(1, 2, 3, 1, 1, 4, 2);
  r.bias = Tensor::Zeros(DType::kF32, {2, 3});
  float* bias = r.bias->mutable_data<float>();
  for (int j = 0; j < 3; ++j) bias[j] = -kInf;  // query row 0 sees nothing
  bias[3 + 1] = -kInf;                            // query row 1 loses key 1
  r.request.outputs = {.lse = true, .weights = true, .top_k = 3};
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  EXPECT_EQ(job->output.data_as<float>()[0], 0.f);
  EXPECT_EQ(job->output.data_as<float>()[1], 0.f);
  EXPECT_EQ(job->lse.data_as<float>()[0], -kInf);
  EXPECT_TRUE(std::isfinite(job->lse.data_as<float>()[1]));
  const float* w = job->weights.data_as<float>();
  EXPECT_EQ(w[3 + 1], 0.f);
  EXPECT_NEAR(w[3] + w[5], 1.f, 1e-6);
  const int32_t* idx = job->top_k_indices.data_as<int32_t>();
  EXPECT_EQ(idx[0], -1);
  EXPECT_EQ(idx[3 + 2], -1);  // only two keys attended in row 1
  EXPECT_TRUE((idx[3] == 0 && idx[4] == 2) || (idx[3] == 2 && idx[4] == 0));
}

TEST(ReferenceSemanticsTest, SingleVisibleKeyCopiesItsValue) {
  // Causal bottom-right with Lq = Lk: query 0 sees only key 0.
  SmallRequest r(1, 3, 3, 1, 1, 4, 5);
  r.request.options.causal = true;
  r.request.outputs.lse = true;
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  const float* o = job->output.data_as<float>();
  const float* v = r.v.data_as<float>();
  for (int d = 0; d < 5; ++d) EXPECT_EQ(o[d], v[d]);
  // lse of a single key is its score.
  double s = 0;
  for (int d = 0; d < 4; ++d) s += double(r.q.data_as<float>()[d]) * r.k.data_as<float>()[d];
  EXPECT_NEAR(job->lse.data_as<float>()[0], s * 0.5, 1e-6);
}

TEST(ReferenceSemanticsTest, ZeroQueryAttendsUniformly) {
  SmallRequest r(1, 1, 5, 1, 1, 3, 2);
  std::fill_n(r.q.mutable_data<float>(), 3, 0.f);
  r.request.outputs = {.lse = true, .weights = true};
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  for (int j = 0; j < 5; ++j) EXPECT_NEAR(job->weights.data_as<float>()[j], 0.2f, 1e-7);
  EXPECT_NEAR(job->lse.data_as<float>()[0], std::log(5.0), 1e-6);
  for (int d = 0; d < 2; ++d) {
    double mean = 0;
    for (int j = 0; j < 5; ++j) mean += r.v.data_as<float>()[j * 2 + d] / 5.0;
    EXPECT_NEAR(job->output.data_as<float>()[d], mean, 1e-6);
  }
}

TEST(ReferenceSemanticsTest, GqaMatchesRepeatedKvHeads) {
  SmallRequest gqa(2, 4, 5, 4, 2, 3, 3);
  SmallRequest mha(2, 4, 5, 4, 4, 3, 3);
  mha.q = gqa.q;
  // Query heads 2g and 2g+1 read kv head g.
  for (Tensor* dst : {&mha.k, &mha.v}) {
    const Tensor& src = dst == &mha.k ? gqa.k : gqa.v;
    const int64_t e = src.shape[3];
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t j = 0; j < 5; ++j)
        for (int64_t h = 0; h < 4; ++h)
          for (int64_t d = 0; d < e; ++d)
            dst->mutable_data<float>()[((b * 5 + j) * 4 + h) * e + d] =
                src.data_as<float>()[((b * 5 + j) * 2 + h / 2) * e + d];
  }
  gqa.request.options.causal = mha.request.options.causal = true;
  auto a = gqa.Run();
  auto b = mha.Run();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(a->output.data, b->output.data);
}

TEST(ReferenceSemanticsTest, ThreeDimensionalQueryIsBatchOfOne) {
  SmallRequest four(1, 3, 4, 2, 2, 4, 4);
  SmallRequest three(1, 3, 4, 2, 2, 4, 4);
  for (Tensor* t : {&three.q, &three.k, &three.v}) t->shape.erase(t->shape.begin());
  auto a = four.Run();
  auto b = three.Run();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->output.shape, (std::vector<int64_t>{3, 2, 4}));
  EXPECT_EQ(a->output.data, b->output.data);
}

TEST(ReferenceSemanticsTest, TopKTiesPreferTheLowerIndex) {
  SmallRequest r(1, 1, 4, 1, 1, 2, 1);
  float* k = r.k.mutable_data<float>();
  // Keys 3 and 1 identical (highest score), keys 0 and 2 identical (lower).
  k[0] = k[4] = 0.f;
  k[1] = k[5] = 0.f;
  k[2] = k[6] = 1.f;
  k[3] = k[7] = 1.f;
  r.q.mutable_data<float>()[0] = 1.f;
  r.q.mutable_data<float>()[1] = 1.f;
  r.request.outputs.top_k = 4;
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  const int32_t* idx = job->top_k_indices.data_as<int32_t>();
  EXPECT_EQ(std::vector<int32_t>(idx, idx + 4), (std::vector<int32_t>{1, 3, 0, 2}));
  const float* w = job->top_k_weights.data_as<float>();
  EXPECT_EQ(w[0], w[1]);
  EXPECT_EQ(w[2], w[3]);
  EXPECT_GT(w[1], w[2]);
}

TEST(ReferenceSemanticsTest, SoftcapBoundsTheScores) {
  SmallRequest r(1, 2, 6, 1, 1, 4, 2);
  for (int i = 0; i < 8; ++i) r.q.mutable_data<float>()[i] *= 100.f;
  r.request.options.softcap = 1.f;
  r.request.outputs = {.lse = true, .weights = true};
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  // Scores lie in (-1, 1): weights within a factor e^2 of each other.
  const float* w = job->weights.data_as<float>();
  for (int i = 0; i < 12; ++i) {
    EXPECT_GT(w[i], 1.0 / 6 / std::exp(2.0));
    EXPECT_LT(w[i], 1.0 / 6 * std::exp(2.0));
  }
  for (int i = 0; i < 2; ++i) EXPECT_LT(job->lse.data_as<float>()[i], std::log(6.0) + 1);
}

TEST(ReferenceSemanticsTest, LinearCausalFirstRowCopiesFirstValue) {
  SmallRequest r(1, 3, 3, 2, 1, 4, 3);
  r.request.options.variant = Variant::kLinear;
  r.request.options.causal = true;
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  const float* o = job->output.data_as<float>();
  const float* v = r.v.data_as<float>();
  for (int h = 0; h < 2; ++h)
    for (int d = 0; d < 3; ++d) EXPECT_FLOAT_EQ(o[h * 3 + d], v[d]);
}

TEST(ReferenceSemanticsTest, LinearEmptyRowIsZero) {
  SmallRequest r(2, 2, 3, 1, 1, 4, 3);
  r.request.options.variant = Variant::kLinear;
  r.request.key_lengths = {0, 3};
  auto job = r.Run();
  ASSERT_NE(job, nullptr);
  const float* o = job->output.data_as<float>();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(o[i], 0.f);
  for (int i = 6; i < 12; ++i) EXPECT_NE(o[i], 0.f);
}

TEST(ReferenceSemanticsTest, HalfPrecisionOutputIsTheRoundedF32Result) {
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    SmallRequest wide(1, 3, 5, 2, 2, 4, 4);
    SmallRequest narrow(1, 3, 5, 2, 2, 4, 4);
    // Round the inputs to the narrow type, and give the F32 request the same values.
    for (Tensor* t : {&narrow.q, &narrow.k, &narrow.v}) {
      Tensor n = Tensor::Zeros(dtype, t->shape);
      for (int64_t i = 0; i < t->num_elements(); ++i) {
        StoreFloat(n.data.data(), dtype, i, t->data_as<float>()[i]);
      }
      *t = std::move(n);
    }
    using Pair = std::pair<const Tensor*, Tensor*>;
    for (auto [src, dst] : {Pair{&narrow.q, &wide.q}, Pair{&narrow.k, &wide.k}, Pair{&narrow.v, &wide.v}}) {
      for (int64_t i = 0; i < src->num_elements(); ++i) {
        dst->mutable_data<float>()[i] = LoadFloat(src->data.data(), dtype, i);
      }
    }
    auto a = wide.Run();
    auto b = narrow.Run();
    ASSERT_NE(a, nullptr);
    ASSERT_NE(b, nullptr);
    ASSERT_EQ(b->output.dtype, dtype);
    for (int64_t i = 0; i < a->output.num_elements(); ++i) {
      Tensor rounded = Tensor::Zeros(dtype, {1});
      StoreFloat(rounded.data.data(), dtype, 0, a->output.data_as<float>()[i]);
      EXPECT_EQ(LoadFloat(b->output.data.data(), dtype, i), LoadFloat(rounded.data.data(), dtype, 0))
          << DTypeName(dtype) << " " << i;
    }
  }
}

}  // namespace
}  // namespace attnserve
