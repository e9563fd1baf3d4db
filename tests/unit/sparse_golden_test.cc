// Sparse attention against PyTorch-computed golden data (tests/golden/sparse/,
// see tests/golden/README.md): block masks, key selection, global tokens and
// sink logits, alone and with the dense options. Each case's dense mask,
// built in Python from the documented semantics, must be KeyVisibleToHead's;
// the reference kernel and the cpu backend must reproduce the outputs.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "attention/job.h"
#include "attention/params.h"
#include "attention/reference.h"
#include "attention/sparse.h"
#include "backends/registry.h"
#include "gtest/gtest.h"
#include "tests/unit/golden_files.h"

namespace attnserve {
namespace {

using golden::AttentionCase;
using golden::ExpectClose;
using golden::ExpectEqualInts;

std::vector<std::string> CaseNames() { return golden::CaseNames("sparse"); }

// Tolerances: the reference as for the dense golden cases (float64 inside,
// F32 outputs); the cpu backend computes in F32, as in the conformance suite.
struct Tolerance {
  double out_rtol, rtol, atol;
};
constexpr Tolerance kReferenceTolerance{1e-5, 1e-5, 1e-6};
constexpr Tolerance kCpuTolerance{1e-5, 1e-5, 1e-5};

void ExpectOutputs(const AttentionCase& c, const AttentionRequest& request, const AttentionJob& job,
                   Tolerance tol) {
  ExpectClose("out", job.output, c.expected.at("out"), tol.out_rtol, tol.atol);
  for (const char* stem : {"lse", "entropy", "weights"}) {
    const bool asked = std::string(stem) == "lse"       ? request.outputs.lse
                       : std::string(stem) == "entropy" ? request.outputs.entropy
                                                        : request.outputs.weights;
    EXPECT_EQ(asked, c.expected.count(stem) > 0) << stem;
    if (!asked || !c.expected.count(stem)) continue;
    const Tensor& got = std::string(stem) == "lse"       ? job.lse
                        : std::string(stem) == "entropy" ? job.entropy
                                                         : job.weights;
    ExpectClose(stem, got, c.expected.at(stem), tol.rtol, tol.atol);
  }
  EXPECT_EQ(request.outputs.top_k > 0, c.expected.count("topk_idx") > 0);
  if (request.outputs.top_k > 0 && c.expected.count("topk_idx")) {
    ExpectEqualInts("topk_idx", job.top_k_indices, c.expected.at("topk_idx"));
    ExpectClose("topk_w", job.top_k_weights, c.expected.at("topk_w"), tol.rtol, tol.atol);
  }
}

class SparseGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    c_ = golden::ReadAttentionCase(golden::Dir("sparse") / GetParam());
    ASSERT_FALSE(HasFailure());
    ASSERT_TRUE(c_.expected.count("out")) << GetParam() << " has no out.npy";
    ASSERT_TRUE(c_.mask.has_value()) << GetParam() << " has no mask.npy";
    request_ = golden::BuildRequest(c_);
    ASSERT_FALSE(HasFailure());
    ASSERT_FALSE(request_.sparsity.empty()) << GetParam() << " describes no sparse pattern";
  }

  AttentionCase c_;
  AttentionRequest request_;
};

TEST_P(SparseGoldenTest, MaskIsKeyVisibleToHead) {
  auto job = PlanAttention(request_);
  ASSERT_TRUE(job.ok()) << job.status();
  const AttentionParams& p = (*job)->params;
  const Tensor& mask = *c_.mask;
  ASSERT_EQ(mask.shape, (std::vector<int64_t>{p.batch, p.num_heads_q, p.seqlen_q, p.seqlen_k}));
  const int32_t* want = mask.data_as<int32_t>();
  int failures = 0;
  double visible = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.num_heads_q; ++h)
      for (int64_t i = 0; i < p.seqlen_q; ++i)
        for (int64_t j = 0; j < p.seqlen_k && failures < 10; ++j) {
          const int32_t w = want[((b * p.num_heads_q + h) * p.seqlen_q + i) * p.seqlen_k + j];
          visible += w;
          if (KeyVisibleToHead(p, b, h, i, j) != (w != 0)) {
            ++failures;
            ADD_FAILURE() << "[b " << b << ", h " << h << ", i " << i << ", j " << j
                          << "]: KeyVisibleToHead " << KeyVisibleToHead(p, b, h, i, j)
                          << ", golden mask " << w;
          }
        }
  EXPECT_EQ(CountVisiblePairs(p), visible);
}

TEST_P(SparseGoldenTest, ReferenceMatchesGolden) {
  auto job = PrepareAttention(request_);
  ASSERT_TRUE(job.ok()) << job.status();
  RunReferenceAttention((*job)->params);
  ExpectOutputs(c_, request_, **job, kReferenceTolerance);
}

TEST_P(SparseGoldenTest, CpuBackendMatchesGolden) {
  auto backend = CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto job = PrepareAttention(request_);
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE((*backend)->Supports((*job)->params).ok());
  ASSERT_TRUE((*backend)->Run(absl::MakeConstSpan(&(*job)->params, 1)).ok());
  ExpectOutputs(c_, request_, **job, kCpuTolerance);
}

INSTANTIATE_TEST_SUITE_P(Cases, SparseGoldenTest, ::testing::ValuesIn(CaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(SparseGoldenDataTest, CasesArePresent) {
  EXPECT_GE(CaseNames().size(), 10u) << "sparse golden cases not found under "
                                     << golden::Dir("sparse");
}

}  // namespace
}  // namespace attnserve
