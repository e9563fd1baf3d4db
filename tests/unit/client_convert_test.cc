// Tests of the client's proto <-> core conversions, shapes and latency stats:
// no server involved.
#include <cmath>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "client/convert.h"
#include "client/latency_stats.h"
#include "client/shapes.h"
#include "core/half.h"

namespace attnserve::client {
namespace {

using ::testing::HasSubstr;

TEST(ClientConvertTest, RequestCarriesEveryOption) {
  Tensor q = RandomTensor(DType::kF16, {2, 3, 4, 8}, 1);
  Tensor k = RandomTensor(DType::kF16, {2, 5, 2, 8}, 2);
  Tensor bias = RandomTensor(DType::kF16, {5}, 3);
  AttentionRequest r;
  r.query = q.view();
  r.key = k.view();
  r.value = k.view();
  r.bias = bias.view();
  r.key_lengths = {5, 3};
  r.options.scale = 0.25f;
  r.options.causal = true;
  r.options.causal_alignment = CausalAlignment::kTopLeft;
  r.options.window_left = 4;  // window_right stays -1: unbounded, so unset on the wire
  r.options.softcap = 30.f;
  r.options.alibi_slopes = {0.5f, 0.25f, 0.125f, 0.0625f};
  r.outputs = {.lse = true, .weights = false, .top_k = 2};
  CallOptions call{.request_id = "r1", .backend = "cpu", .priority = 1};

  const v1::AttendRequest p = ToProto(r, call);
  EXPECT_EQ(p.request_id(), "r1");
  EXPECT_EQ(p.backend(), "cpu");
  EXPECT_EQ(p.priority(), 1);
  EXPECT_EQ(p.query().dtype(), v1::F16);
  EXPECT_THAT(p.query().shape(), ::testing::ElementsAre(2, 3, 4, 8));
  EXPECT_EQ(p.query().data(), q.data);
  EXPECT_EQ(p.bias().data(), bias.data);
  EXPECT_THAT(p.key_lengths(), ::testing::ElementsAre(5, 3));
  EXPECT_FLOAT_EQ(p.options().scale(), 0.25f);
  EXPECT_TRUE(p.options().causal());
  EXPECT_EQ(p.options().causal_alignment(), v1::TOP_LEFT);
  EXPECT_TRUE(p.options().has_window_left());
  EXPECT_EQ(p.options().window_left(), 4);
  EXPECT_FALSE(p.options().has_window_right());
  EXPECT_FLOAT_EQ(p.options().softcap(), 30.f);
  EXPECT_EQ(p.options().alibi_slopes_size(), 4);
  EXPECT_EQ(p.options().variant(), v1::SOFTMAX);
  EXPECT_TRUE(p.outputs().lse());
  EXPECT_EQ(p.outputs().top_k(), 2);
}

TEST(ClientConvertTest, ResponseTensorsAreMovedOutAndChecked) {
  Tensor out = RandomTensor(DType::kBF16, {1, 2, 3, 4}, 7);
  v1::AttendResponse resp;
  resp.set_request_id("x");
  resp.set_backend("cpu");
  ToProto(out.view(), resp.mutable_output());
  Tensor lse = Tensor::Zeros(DType::kF32, {1, 3, 2});
  ToProto(lse.view(), resp.mutable_lse());
  resp.mutable_timing()->set_batch_size(4);

  absl::StatusOr<AttendResult> r = FromProto(std::move(resp));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->output.dtype, DType::kBF16);
  EXPECT_EQ(r->output.shape, out.shape);
  EXPECT_EQ(r->output.data, out.data);
  ASSERT_TRUE(r->lse.has_value());
  EXPECT_EQ(r->lse->shape, lse.shape);
  EXPECT_FALSE(r->weights.has_value());
  EXPECT_FALSE(r->top_k_indices.has_value());
  EXPECT_EQ(r->timing.batch_size, 4);
  EXPECT_EQ(r->backend, "cpu");
}

TEST(ClientConvertTest, MalformedResponseTensorNamesTheField) {
  v1::AttendResponse resp;
  resp.mutable_output()->set_dtype(v1::F32);
  resp.mutable_output()->add_shape(2);
  resp.mutable_output()->add_shape(3);
  resp.mutable_output()->set_data(std::string(20, '\0'));
  absl::StatusOr<AttendResult> r = FromProto(std::move(resp));
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("output.data: expected 24 bytes"));
  EXPECT_THAT(r.status().message(), HasSubstr("got 20"));

  v1::Tensor t;
  t.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(FromProto(t, "lse").status().message(), HasSubstr("lse.dtype"));
  t.set_dtype(v1::F32);
  t.add_shape(-1);
  EXPECT_THAT(FromProto(t, "lse").status().message(), HasSubstr("lse.shape"));
}

TEST(ClientConvertTest, GrpcStatusKeepsCodeAndMessage) {
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
  absl::Status s = FromGrpcStatus(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full"));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "queue full");
}

TEST(ClientShapesTest, BenchmarkIdsAndExplicitDims) {
  absl::StatusOr<AttentionShape> p2 = ParseAttentionShape("p2");
  ASSERT_TRUE(p2.ok());
  EXPECT_EQ(p2->heads_q, 32);
  EXPECT_EQ(p2->heads_kv, 8);
  EXPECT_EQ(p2->seqlen_k, 2048);
  EXPECT_TRUE(p2->causal);
  // 4·B·Hq·Lq·Lk·D, halved for causal self-attention.
  EXPECT_DOUBLE_EQ(p2->flops(true), 2.0 * 32 * 2048.0 * 2048 * 128);

  absl::StatusOr<AttentionShape> s = ParseAttentionShape("2, 16, 8, 32, 2, 64");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->query_shape(), (std::vector<int64_t>{2, 16, 8, 64}));
  EXPECT_EQ(s->key_shape(), (std::vector<int64_t>{2, 32, 2, 64}));
  EXPECT_FALSE(s->causal);

  EXPECT_THAT(ParseAttentionShape("P9").status().message(), HasSubstr("got \"P9\""));
  EXPECT_FALSE(ParseAttentionShape("1,2,3,4,5").ok());
  EXPECT_FALSE(ParseAttentionShape("1,2,0,4,5,6").ok());
  EXPECT_THAT(ParseAttentionShape("1,2,6,4,4,8").status().message(),
              HasSubstr("Hq=6 Hkv=4"));
}

TEST(ClientShapesTest, RandomTensorsAreDeterministicAndConvertible) {
  Tensor a = RandomTensor(DType::kF32, {3, 5}, 42);
  EXPECT_EQ(a.data, RandomTensor(DType::kF32, {3, 5}, 42).data);
  EXPECT_NE(a.data, RandomTensor(DType::kF32, {3, 5}, 43).data);
  absl::StatusOr<Tensor> b = ConvertTensor(a, DType::kBF16);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(b->data.size(), 15u * 2);
  for (int i = 0; i < 15; ++i) {
    const float x = a.data_as<float>()[i];
    EXPECT_EQ(b->data_as<uint16_t>()[i], FloatToBf16(x));
    EXPECT_LE(std::abs(LoadFloat(b->data.data(), DType::kBF16, i) - x), std::abs(x) / 128);
  }
  EXPECT_EQ(ParseDType("BF16").value(), DType::kBF16);
  EXPECT_FALSE(ParseDType("f64").ok());
}

TEST(LatencyStatsTest, NearestRankPercentiles) {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);
  EXPECT_EQ(Percentile(v, 0.50), 50);
  EXPECT_EQ(Percentile(v, 0.99), 99);
  EXPECT_EQ(Percentile(v, 0.999), 100);
  EXPECT_EQ(Percentile(v, 0.0), 1);
  std::vector<double> empty;
  EXPECT_EQ(Percentile(empty, 0.5), 0);
}

TEST(LatencyStatsTest, SummaryCountsErrorsByCodeAndIntervalsDoNotOverlap) {
  LatencyStats stats;
  for (int i = 1; i <= 10; ++i) stats.RecordOk(i, 100, 200, 4);
  stats.RecordError(absl::StatusCode::kResourceExhausted, 0.5);
  stats.RecordError(absl::StatusCode::kResourceExhausted, 1.5);
  LatencySummary first = stats.SummarizeInterval();
  EXPECT_EQ(first.ok, 10);
  EXPECT_EQ(first.p50_ms, 5);
  EXPECT_EQ(first.errors.at("RESOURCE_EXHAUSTED"), 2);

  stats.RecordOk(100, 100, 200, 4);
  stats.RecordError(absl::StatusCode::kDeadlineExceeded, 9);
  LatencySummary second = stats.SummarizeInterval();
  EXPECT_EQ(second.ok, 1);
  EXPECT_EQ(second.p50_ms, 100);
  EXPECT_EQ(second.errors.size(), 1u);
  EXPECT_EQ(second.errors.at("DEADLINE_EXCEEDED"), 1);

  LatencySummary all = stats.Summary();
  EXPECT_EQ(all.ok, 11);
  EXPECT_EQ(all.errors_total, 3);
  EXPECT_EQ(all.max_ms, 100);
  EXPECT_EQ(all.p99_ms, 100);
  EXPECT_DOUBLE_EQ(all.server_batch_size, 4);
  EXPECT_DOUBLE_EQ(all.server_compute_us, 200);
}

}  // namespace
}  // namespace attnserve::client
