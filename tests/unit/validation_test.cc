// PrepareAttention: every malformed request is INVALID_ARGUMENT naming the
// field, the expected and the received value; oversized ones are
// RESOURCE_EXHAUSTED; well-formed ones fill AttentionParams consistently.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "attention/cost.h"
#include "attention/job.h"
#include "core/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// Owns the bytes that the request's TensorViews point into.
struct Fixture {
  std::string q, k, v, bias;
  AttentionRequest req;

  Fixture(std::vector<int64_t> qs, std::vector<int64_t> ks, std::vector<int64_t> vs,
          DType dtype = DType::kF32) {
    auto fill = [&](std::string& buf, const std::vector<int64_t>& shape) {
      buf.assign(CheckedElementCount(shape) * DTypeSize(dtype), '\0');
      return TensorView{dtype, shape, buf};
    };
    req.query = fill(q, qs);
    req.key = fill(k, ks);
    req.value = fill(v, vs);
  }
  void SetBias(std::vector<int64_t> shape, DType dtype = DType::kF32) {
    bias.assign(CheckedElementCount(shape) * DTypeSize(dtype), '\0');
    req.bias = TensorView{dtype, std::move(shape), bias};
  }
};

Fixture Basic() { return Fixture({2, 5, 4, 8}, {2, 7, 2, 8}, {2, 7, 2, 6}); }

// Checks code and that the message names the field and mentions both values.
void ExpectInvalid(const Fixture& f, const std::string& field, const std::string& expected,
                   const std::string& got) {
  auto job = PrepareAttention(f.req);
  ASSERT_FALSE(job.ok()) << "accepted a request with a bad " << field;
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument) << job.status();
  EXPECT_THAT(std::string(job.status().message()),
              AllOf(HasSubstr(field + ": expected"), HasSubstr(expected), HasSubstr("got " + got)));
}

TEST(ValidationTest, WellFormedRequestFillsParams) {
  Fixture f = Basic();
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  const AttentionParams& p = (*job)->params;
  EXPECT_EQ(p.batch, 2);
  EXPECT_EQ(p.seqlen_q, 5);
  EXPECT_EQ(p.seqlen_k, 7);
  EXPECT_EQ(p.num_heads_q, 4);
  EXPECT_EQ(p.num_heads_kv, 2);
  EXPECT_EQ(p.group_size, 2);
  EXPECT_EQ(p.head_dim, 8);
  EXPECT_EQ(p.value_dim, 6);
  EXPECT_FLOAT_EQ(p.scale, 1.f / std::sqrt(8.f));
  EXPECT_FLOAT_EQ(p.scale_log2, p.scale * 1.44269504f);
  EXPECT_EQ(p.q_row_stride, 4 * 8);
  EXPECT_EQ(p.k_row_stride, 2 * 8);
  EXPECT_EQ(p.v_row_stride, 2 * 6);
  EXPECT_EQ(p.o_batch_stride, 5 * 4 * 6);
  EXPECT_EQ((*job)->output.shape, (std::vector<int64_t>{2, 5, 4, 6}));
  EXPECT_EQ((*job)->output.data.size(), 2u * 5 * 4 * 6 * 4);
  EXPECT_EQ(p.window_left, -1);
  EXPECT_EQ(p.window_right, -1);
  // The products' FLOPs, 2·B·Hq·Lq·Lk·(D + Dv), and the cost adds the
  // per-score softmax work (attention/cost.h).
  EXPECT_DOUBLE_EQ((*job)->flops, 2.0 * 2 * 4 * 5 * 7 * (8 + 6));
  EXPECT_DOUBLE_EQ((*job)->cost, 2.0 * 2 * 4 * 5 * 7 * (8 + 6) + 2 * 4 * 5 * 7 * kScoreFlops +
                                     2 * 5 * 4 * 6 * kOutputFlopsPerElement +
                                     2 * 2 * kTileFlops);  // B x Hkv tiles of 2 x 5 lanes
  EXPECT_EQ((*job)->output_bytes, 2 * 5 * 4 * 6 * 4);
}

TEST(ValidationTest, PlanAllocatesNoOutputsUntilAllocateOutputs) {
  Fixture f = Basic();
  f.req.outputs.lse = true;
  f.req.outputs.top_k = 3;
  auto job = PlanAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_TRUE((*job)->output.data.empty());
  EXPECT_EQ((*job)->params.o, nullptr);
  EXPECT_EQ((*job)->params.lse, nullptr);
  // Output F32 [2,5,4,6], lse [2,4,5], top-k indices and weights [2,4,5,3].
  EXPECT_EQ((*job)->output_bytes, 2 * 5 * 4 * 6 * 4 + 2 * 4 * 5 * 4 + 2 * 4 * 5 * 3 * 8);
  // Backends see which outputs are wanted before they exist.
  const AttentionParams planned = (*job)->planned_params();
  EXPECT_NE(planned.lse, nullptr);
  EXPECT_NE(planned.top_k_indices, nullptr);
  EXPECT_EQ(planned.weights, nullptr);
  // The scalar path that computes top-k costs more per score.
  EXPECT_GT((*job)->cost, kScalarPathFactor * (*job)->flops);

  ASSERT_TRUE(AllocateOutputs(**job).ok());
  EXPECT_EQ((*job)->output.data.size() + (*job)->lse.data.size() +
                (*job)->top_k_indices.data.size() + (*job)->top_k_weights.data.size(),
            static_cast<size_t>((*job)->output_bytes));
  EXPECT_EQ((*job)->params.o, (*job)->output.data.data());
  EXPECT_NE((*job)->params.lse, nullptr);
}

TEST(ValidationTest, ThreeDimensionalRequestIsBatchOne) {
  Fixture f({5, 4, 8}, {7, 2, 8}, {7, 2, 8}, DType::kBF16);
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ((*job)->params.batch, 1);
  EXPECT_EQ((*job)->output.shape, (std::vector<int64_t>{5, 4, 8}));
  EXPECT_EQ((*job)->output.dtype, DType::kBF16);
}

TEST(ValidationTest, CausalFoldsIntoWindow) {
  Fixture f = Basic();
  f.req.options.causal = true;
  f.req.options.window_left = 3;
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ((*job)->params.window_right, 0);
  EXPECT_EQ((*job)->params.window_left, 3);
  EXPECT_TRUE((*job)->params.causal);
}

TEST(ValidationTest, WrongRank) {
  Fixture f({5, 8}, {7, 2, 8}, {7, 2, 8});
  ExpectInvalid(f, "query.shape", "rank 4", "rank 2 [5, 8]");
  Fixture g({1, 2, 5, 4, 8}, {7, 2, 8}, {7, 2, 8});
  ExpectInvalid(g, "query.shape", "rank 4", "rank 5");
}

TEST(ValidationTest, KeyRankDiffersFromQuery) {
  Fixture f({1, 5, 4, 8}, {7, 4, 8}, {7, 4, 8});
  ExpectInvalid(f, "key.shape", "rank 4 like the query", "rank 3");
}

TEST(ValidationTest, MismatchedBatch) {
  Fixture f({2, 5, 4, 8}, {3, 7, 4, 8}, {3, 7, 4, 8});
  ExpectInvalid(f, "key.shape", "batch 2", "3");
}

TEST(ValidationTest, MismatchedHeadDim) {
  Fixture f({2, 5, 4, 8}, {2, 7, 4, 16}, {2, 7, 4, 8});
  ExpectInvalid(f, "key.shape", "head_dim 8", "16");
}

TEST(ValidationTest, MismatchedValue) {
  Fixture f({2, 5, 4, 8}, {2, 7, 4, 8}, {2, 6, 4, 8});
  ExpectInvalid(f, "value.shape", "[2, 7, 4, Dv]", "[2, 6, 4, 8]");
  Fixture g({2, 5, 4, 8}, {2, 7, 4, 8}, {2, 7, 2, 8});
  ExpectInvalid(g, "value.shape", "[2, 7, 4, Dv]", "[2, 7, 2, 8]");
}

TEST(ValidationTest, HeadsNotDivisible) {
  Fixture f({2, 5, 6, 8}, {2, 7, 4, 8}, {2, 7, 4, 8});
  ExpectInvalid(f, "key.shape", "dividing the query's 6 heads", "4");
}

TEST(ValidationTest, DataLengthDoesNotMatchShape) {
  Fixture f = Basic();
  f.q.pop_back();
  f.req.query.data = f.q;
  ExpectInvalid(f, "query.data", std::to_string(2 * 5 * 4 * 8 * 4) + " bytes",
                std::to_string(2 * 5 * 4 * 8 * 4 - 1) + " bytes");
  Fixture g = Basic();
  g.v += "xx";
  g.req.value.data = g.v;
  ExpectInvalid(g, "value.data", "bytes", std::to_string(2 * 7 * 2 * 6 * 4 + 2) + " bytes");
}

TEST(ValidationTest, DataLengthChecksDtypeSize) {
  Fixture f = Basic();  // F32 bytes, but declared F16: twice too long
  f.req.query.dtype = DType::kF16;
  f.req.key.dtype = DType::kF16;
  f.req.value.dtype = DType::kF16;
  ExpectInvalid(f, "query.data", "x F16", std::to_string(2 * 5 * 4 * 8 * 4) + " bytes");
}

TEST(ValidationTest, UnknownOrOutputOnlyDtype) {
  Fixture f = Basic();
  f.req.query.dtype = DType::kI32;
  ExpectInvalid(f, "query.dtype", "F32, F16 or BF16", "I32");
  Fixture g = Basic();
  g.req.query.dtype = static_cast<DType>(9);
  ExpectInvalid(g, "query.dtype", "F32, F16 or BF16", "?");
}

TEST(ValidationTest, MixedDtypes) {
  Fixture f = Basic();
  f.req.key.dtype = DType::kBF16;
  ExpectInvalid(f, "key.dtype", "F32 (the query's dtype)", "BF16");
}

TEST(ValidationTest, NegativeAndZeroDims) {
  Fixture f = Basic();
  f.req.query.shape = {2, -5, 4, 8};
  ExpectInvalid(f, "query.shape", "every dim in [1,", "[2, -5, 4, 8]");
  Fixture g = Basic();
  g.req.key.shape = {2, 0, 2, 8};
  ExpectInvalid(g, "key.shape", "every dim in [1,", "[2, 0, 2, 8]");
}

TEST(ValidationTest, AbsurdSizesWhoseProductOverflows) {
  Fixture f = Basic();
  f.req.query.shape = {2147483647, 2147483647, 2147483647, 8};
  ExpectInvalid(f, "query.shape", "at most 2^60 elements", "[2147483647, 2147483647");
  Fixture g = Basic();
  g.req.value.shape = {2, 7, 2, int64_t{1} << 40};
  ExpectInvalid(g, "value.shape", "every dim in [1, 2147483647]", "[2, 7, 2, 1099511627776]");
}

TEST(ValidationTest, BiasNotBroadcastable) {
  Fixture f = Basic();
  f.SetBias({5, 6});  // Lk is 7
  ExpectInvalid(f, "bias.shape", "broadcastable to [2, 4, 5, 7] [B, Hq, Lq, Lk]", "[5, 6]");
  Fixture g = Basic();
  g.SetBias({1, 1, 1, 1, 7});
  ExpectInvalid(g, "bias.shape", "rank <= 4", "rank 5");
  Fixture h = Basic();
  h.SetBias({3, 1, 1, 7});  // batch is 2
  ExpectInvalid(h, "bias.shape", "broadcastable", "[3, 1, 1, 7] (dim 0 is 3)");
}

TEST(ValidationTest, BiasBroadcastStrides) {
  Fixture f = Basic();
  f.SetBias({4, 1, 7});  // [Hq, 1, Lk]
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  const AttentionParams& p = (*job)->params;
  EXPECT_EQ(p.bias_batch_stride, 0);
  EXPECT_EQ(p.bias_head_stride, 7);
  EXPECT_EQ(p.bias_row_stride, 0);
  EXPECT_EQ(p.bias_col_stride, 1);
}

TEST(ValidationTest, BiasWithWrongDtypeOrLengthOrNaN) {
  Fixture f = Basic();
  f.SetBias({5, 7}, DType::kF16);
  ExpectInvalid(f, "bias.dtype", "F32 (the query's dtype)", "F16");
  Fixture g = Basic();
  g.SetBias({5, 7});
  g.bias.resize(3);
  g.req.bias->data = g.bias;
  ExpectInvalid(g, "bias.data", "140 bytes", "3 bytes");
  Fixture h = Basic();
  h.SetBias({1});
  const float nan = std::numeric_limits<float>::quiet_NaN();
  h.bias.assign(reinterpret_cast<const char*>(&nan), 4);
  h.req.bias->data = h.bias;
  ExpectInvalid(h, "bias.data", "finite values or -inf", "nan");
}

TEST(ValidationTest, MinusInfinityBiasIsAMask) {
  Fixture f = Basic();
  f.SetBias({1});
  const float ninf = -std::numeric_limits<float>::infinity();
  f.bias.assign(reinterpret_cast<const char*>(&ninf), 4);
  f.req.bias->data = f.bias;
  EXPECT_TRUE(PrepareAttention(f.req).ok());
}

TEST(ValidationTest, WindowAndCausalContradictions) {
  Fixture f = Basic();
  f.req.options.causal = true;
  f.req.options.window_right = 2;
  ExpectInvalid(f, "options.window_right", "with causal", "2");
  Fixture g = Basic();
  g.req.options.window_left = -2;
  ExpectInvalid(g, "options.window_left", ">= 0, or -1", "-2");
  Fixture h = Basic();
  h.req.options.window_right = -7;
  ExpectInvalid(h, "options.window_right", ">= 0, or -1", "-7");
}

TEST(ValidationTest, BadScalars) {
  Fixture f = Basic();
  f.req.options.scale = std::numeric_limits<float>::infinity();
  ExpectInvalid(f, "options.scale", "a finite number", "inf");
  Fixture g = Basic();
  g.req.options.softcap = -1;
  ExpectInvalid(g, "options.softcap", ">= 0", "-1");
}

TEST(ValidationTest, AlibiSlopesCount) {
  Fixture f = Basic();
  f.req.options.alibi_slopes = {0.5f, 0.25f};
  ExpectInvalid(f, "options.alibi_slopes", "4 slopes", "2");
}

TEST(ValidationTest, KeyLengthsOutOfRange) {
  Fixture f = Basic();
  f.req.key_lengths = {3, 8};
  ExpectInvalid(f, "key_lengths[1]", "[0, 7]", "8");
  Fixture g = Basic();
  g.req.key_lengths = {3, -1};
  ExpectInvalid(g, "key_lengths[1]", "[0, 7]", "-1");
  Fixture h = Basic();
  h.req.key_lengths = {3};
  ExpectInvalid(h, "key_lengths", "2 lengths", "1");
  Fixture ok = Basic();
  ok.req.key_lengths = {0, 7};
  EXPECT_TRUE(PrepareAttention(ok.req).ok());
}

TEST(ValidationTest, TopKOutOfRange) {
  Fixture f = Basic();
  f.req.outputs.top_k = 8;
  ExpectInvalid(f, "outputs.top_k", "0 (off) to Lk = 7", "8");
  Fixture g = Basic();
  g.req.outputs.top_k = -1;
  ExpectInvalid(g, "outputs.top_k", "0 (off) to Lk = 7", "-1");
}

TEST(ValidationTest, LinearRejectsSoftmaxOnlyOptions) {
  Fixture f = Basic();
  f.req.options.variant = Variant::kLinear;
  f.req.options.softcap = 30;
  ExpectInvalid(f, "options.softcap", "unset with variant LINEAR", "30");
  Fixture g = Basic();
  g.req.options.variant = Variant::kLinear;
  g.req.outputs.lse = true;
  ExpectInvalid(g, "outputs.lse", "unset with variant LINEAR", "true");
  Fixture ok = Basic();
  ok.req.options.variant = Variant::kLinear;
  ok.req.options.causal = true;
  EXPECT_TRUE(PrepareAttention(ok.req).ok());
}

TEST(ValidationTest, LimitsAreResourceExhausted) {
  Fixture f = Basic();
  RequestLimits limits;
  limits.max_output_bytes = 100;
  auto job = PrepareAttention(f.req, limits);
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(job.status().message()), HasSubstr("limit of 100 bytes"));

  Fixture g = Basic();
  g.req.outputs.weights = true;
  limits = RequestLimits{};
  limits.max_weights_bytes = 64;
  job = PrepareAttention(g.req, limits);
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(job.status().message()), HasSubstr("outputs.weights"));
}

TEST(ValidationTest, HeadDimLimit) {
  Fixture f({1, 1, 1, 2048}, {1, 1, 1, 2048}, {1, 1, 1, 8});
  ExpectInvalid(f, "query.shape", "head_dim <= 1024", "2048");
}

TEST(ValidationTest, MisalignedInputIsCopied) {
  Fixture f = Basic();
  std::string shifted = " " + f.q;
  f.req.query.data = std::string_view(shifted).substr(1);
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*job)->params.q) % 4, 0u);
}

}  // namespace
}  // namespace attnserve
