// Tests of the client's proto <-> core conversions, shapes and latency stats:
// no server involved.
#include <cmath>
#include <cstring>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
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
  EXPECT_FALSE(p.outputs().entropy());
  EXPECT_EQ(p.outputs().top_k(), 2);
}

TEST(ClientConvertTest, AttendRequestAsksForEntropyAndWeights) {
  Tensor q = RandomTensor(DType::kF32, {1, 3, 2, 8}, 1);
  AttentionRequest r;
  r.query = q.view();
  r.key = q.view();
  r.value = q.view();
  r.outputs.entropy = true;
  r.outputs.weights = true;
  const v1::AttendRequest p = ToProto(r, {});
  EXPECT_TRUE(p.outputs().entropy());
  EXPECT_TRUE(p.outputs().weights());
  EXPECT_FALSE(p.outputs().lse());
  EXPECT_EQ(p.outputs().top_k(), 0);
}

TEST(ClientConvertTest, AttendResponseEntropyIsMovedOutAndChecked) {
  v1::AttendResponse resp;
  ToProto(RandomTensor(DType::kF32, {1, 3, 2, 8}, 1).view(), resp.mutable_output());
  const Tensor entropy = RandomTensor(DType::kF32, {1, 2, 3}, 2);
  ToProto(entropy.view(), resp.mutable_entropy());
  absl::StatusOr<AttendResult> r = FromProto(v1::AttendResponse(resp));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->entropy.has_value());
  EXPECT_EQ(r->entropy->shape, entropy.shape);
  EXPECT_EQ(r->entropy->data, entropy.data);
  EXPECT_FALSE(r->lse.has_value());

  resp.mutable_entropy()->mutable_data()->resize(4);  // 1 float for 6
  EXPECT_THAT(FromProto(std::move(resp)).status().message(), HasSubstr("entropy.data"));
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

TEST(ClientConvertTest, SessionSpecCarriesLayersRotaryAndSinks) {
  SessionSpec spec;
  spec.num_kv_heads = 8;
  spec.head_dim = 128;
  spec.cache_dtype = DType::kBF16;
  spec.num_layers = 32;
  spec.sink_tokens = 4;
  spec.window_tokens = 1024;
  v1::CreateSessionRequest p = ToProto(spec);
  EXPECT_EQ(p.num_layers(), 32);
  EXPECT_EQ(p.sink_tokens(), 4);
  EXPECT_EQ(p.window_tokens(), 1024);
  EXPECT_EQ(p.dtype(), v1::BF16);
  EXPECT_FALSE(p.has_rotary()) << "no rotary unless asked";

  v1::RotaryEmbedding rope;
  rope.set_theta(500000.f);
  rope.set_rotary_dim(64);
  rope.set_style(v1::RotaryEmbedding::GPTJ);
  rope.set_scaling(v1::RotaryEmbedding::LLAMA3);
  rope.set_factor(8.f);
  rope.set_original_max_positions(8192);
  rope.set_low_freq_factor(1.f);
  rope.set_high_freq_factor(4.f);
  spec.rotary = rope;
  p = ToProto(spec);
  ASSERT_TRUE(p.has_rotary());
  EXPECT_FLOAT_EQ(p.rotary().theta(), 500000.f);
  EXPECT_EQ(p.rotary().rotary_dim(), 64);
  EXPECT_EQ(p.rotary().style(), v1::RotaryEmbedding::GPTJ);
  EXPECT_EQ(p.rotary().scaling(), v1::RotaryEmbedding::LLAMA3);
  EXPECT_FLOAT_EQ(p.rotary().factor(), 8.f);
  EXPECT_EQ(p.rotary().original_max_positions(), 8192);
  EXPECT_FLOAT_EQ(p.rotary().high_freq_factor(), 4.f);

  v1::CreateSessionResponse response;
  response.set_session_id("s");
  response.set_num_layers(32);
  EXPECT_EQ(FromProto(response).num_layers, 32);
  v1::ForkSessionResponse forked;
  forked.set_session_id("f");
  forked.set_context_tokens(40);
  forked.set_shared_tokens(32);
  const ForkedSession f = FromProto(forked);
  EXPECT_EQ(f.session_id, "f");
  EXPECT_EQ(f.context_tokens, 40);
  EXPECT_EQ(f.shared_tokens, 32);
}

TEST(ClientConvertTest, DecodeStepCarriesLayerAndExpectedTokens) {
  const Tensor q = RandomTensor(DType::kF32, {1, 4, 8}, 1);
  const Tensor kv = RandomTensor(DType::kF32, {1, 2, 8}, 2);
  DecodeStep step{q.view(), kv.view(), kv.view(), {}, true};
  v1::DecodeRequest p = ToProto("s1", step, {});
  EXPECT_EQ(p.layer(), 0);
  EXPECT_FALSE(p.has_expected_context_tokens()) << "unset unless asked";
  step.layer = 5;
  step.expected_context_tokens = 0;  // 0 is a value, not "unset"
  p = ToProto("s1", step, {});
  EXPECT_EQ(p.layer(), 5);
  ASSERT_TRUE(p.has_expected_context_tokens());
  EXPECT_EQ(p.expected_context_tokens(), 0);
  EXPECT_TRUE(p.outputs().lse());
  EXPECT_FALSE(p.outputs().entropy());
  step.entropy = true;
  EXPECT_TRUE(ToProto("s1", step, {}).outputs().entropy());
}

// An I32 tensor of `values` shaped `shape`.
Tensor IndexTensor(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  Tensor t = Tensor::Zeros(DType::kI32, std::move(shape));
  std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

std::vector<int32_t> Indices(const v1::Tensor& t) {
  std::vector<int32_t> out(t.data().size() / 4);
  std::memcpy(out.data(), t.data().data(), t.data().size());
  return out;
}

TEST(ClientConvertTest, AttendRequestCarriesBlockMaskGlobalTokensAndSinks) {
  const Tensor q = RandomTensor(DType::kF32, {1, 6, 2, 8}, 1);
  AttentionRequest r;
  r.query = q.view();
  r.key = q.view();
  r.value = q.view();
  EXPECT_FALSE(ToProto(r, {}).has_sparsity()) << "a dense request sends no sparsity";

  // Rows in blocks of 4, keys in blocks of 2; per head: head 0 sees key
  // blocks {0} then {0, 1}, head 1 {1} then {2}, and block 2 of row block 1
  // of head 0 is known to be full.
  const Tensor indptr = IndexTensor({1, 2, 3}, {0, 1, 3, 3, 4, 5});
  const Tensor indices = IndexTensor({5}, {0, 0, 1, 1, 2});
  const Tensor full_indptr = IndexTensor({1, 2, 3}, {0, 0, 1, 1, 1, 1});
  const Tensor full_indices = IndexTensor({1}, {2});
  r.sparsity.block_mask = BlockMaskSpec{.block_rows = 4,
                                        .block_cols = 2,
                                        .indptr = indptr.view(),
                                        .indices = indices.view(),
                                        .full_indptr = full_indptr.view(),
                                        .full_indices = full_indices.view()};
  r.sparsity.global_tokens = {0, 5};
  r.sparsity.sink_logits = {0.5f, -1.f};

  const v1::AttendRequest p = ToProto(r, {});
  ASSERT_TRUE(p.has_sparsity());
  const v1::Sparsity& s = p.sparsity();
  ASSERT_TRUE(s.has_block_mask());
  EXPECT_FALSE(s.has_key_indices());
  EXPECT_EQ(s.block_mask().block_rows(), 4);
  EXPECT_EQ(s.block_mask().block_cols(), 2);
  EXPECT_EQ(s.block_mask().indptr().dtype(), v1::I32);
  EXPECT_THAT(s.block_mask().indptr().shape(), ::testing::ElementsAre(1, 2, 3));
  EXPECT_THAT(Indices(s.block_mask().indptr()), ::testing::ElementsAre(0, 1, 3, 3, 4, 5));
  EXPECT_THAT(Indices(s.block_mask().indices()), ::testing::ElementsAre(0, 0, 1, 1, 2));
  EXPECT_THAT(s.block_mask().indices().shape(), ::testing::ElementsAre(5));
  EXPECT_THAT(Indices(s.block_mask().full_indptr()), ::testing::ElementsAre(0, 0, 1, 1, 1, 1));
  EXPECT_THAT(Indices(s.block_mask().full_indices()), ::testing::ElementsAre(2));
  EXPECT_THAT(s.global_tokens(), ::testing::ElementsAre(0, 5));
  EXPECT_THAT(s.sink_logits(), ::testing::ElementsAre(0.5f, -1.f));

  // Without full blocks, their fields stay unset; sinks alone are sparsity too.
  r.sparsity.block_mask->full_indptr.reset();
  r.sparsity.block_mask->full_indices.reset();
  EXPECT_FALSE(ToProto(r, {}).sparsity().block_mask().has_full_indptr());
  EXPECT_FALSE(ToProto(r, {}).sparsity().block_mask().has_full_indices());
  r.sparsity = SparsitySpec();
  r.sparsity.sink_logits = {0.f, 0.f};
  const v1::AttendRequest sinks = ToProto(r, {});
  ASSERT_TRUE(sinks.has_sparsity());
  EXPECT_FALSE(sinks.sparsity().has_block_mask());
  EXPECT_THAT(sinks.sparsity().sink_logits(), ::testing::ElementsAre(0.f, 0.f));
}

TEST(ClientConvertTest, DecodeAndBatchStepsCarryTheirOwnKeySelection) {
  const Tensor q = RandomTensor(DType::kF32, {1, 4, 8}, 1);
  const Tensor kv = RandomTensor(DType::kF32, {1, 2, 8}, 2);
  // [B = 1, Hkv = 2, ceil(Lq / query_block) = 1, k = 2]: key blocks of 16.
  const Tensor selected = IndexTensor({1, 2, 1, 2}, {0, 3, 1, -1});
  DecodeStep step;
  step.query = q.view();
  step.key = kv.view();
  step.value = kv.view();
  EXPECT_FALSE(ToProto("s1", step, {}).has_sparsity());
  step.sparsity.key_indices =
      KeySelectionSpec{.indices = selected.view(), .query_block = 1, .key_block = 16};
  const v1::DecodeRequest p = ToProto("s1", step, {});
  ASSERT_TRUE(p.sparsity().has_key_indices());
  EXPECT_THAT(p.sparsity().key_indices().indices().shape(), ::testing::ElementsAre(1, 2, 1, 2));
  EXPECT_THAT(Indices(p.sparsity().key_indices().indices()),
              ::testing::ElementsAre(0, 3, 1, -1));
  EXPECT_EQ(p.sparsity().key_indices().query_block(), 1);
  EXPECT_EQ(p.sparsity().key_indices().key_block(), 16);
  EXPECT_FALSE(p.sparsity().has_block_mask());

  // In a BatchDecode each entry has its own pattern (options stay shared).
  std::vector<SessionStep> steps = {{"a", step}, {"b", step}};
  steps[1].step.sparsity = SparsitySpec();
  steps[1].step.sparsity.global_tokens = {3};
  absl::StatusOr<v1::BatchDecodeRequest> batch = ToProto(0, steps, {});
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->entries_size(), 2);
  EXPECT_TRUE(batch->entries(0).sparsity().has_key_indices());
  EXPECT_EQ(batch->entries(0).sparsity().key_indices().key_block(), 16);
  EXPECT_FALSE(batch->entries(1).sparsity().has_key_indices());
  EXPECT_THAT(batch->entries(1).sparsity().global_tokens(), ::testing::ElementsAre(3));
}

TEST(ClientConvertTest, DecodeResponseEntropyIsMovedOut) {
  v1::DecodeResponse resp;
  ToProto(RandomTensor(DType::kF32, {1, 4, 8}, 1).view(), resp.mutable_output());
  absl::StatusOr<DecodeResult> none = FromProto(v1::DecodeResponse(resp));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->entropy.has_value());
  const Tensor entropy = RandomTensor(DType::kF32, {1, 4, 1}, 2);
  ToProto(entropy.view(), resp.mutable_entropy());
  absl::StatusOr<DecodeResult> r = FromProto(std::move(resp));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->entropy.has_value());
  EXPECT_EQ(r->entropy->data, entropy.data);
}

TEST(ClientConvertTest, BatchDecodeRequestKeepsEntryOrderAndSharesTheOptions) {
  std::vector<Tensor> qs, kvs;
  std::vector<SessionStep> steps;
  for (int i = 0; i < 3; ++i) {
    qs.push_back(RandomTensor(DType::kBF16, {1, 4, 8}, 10 + i));
    kvs.push_back(RandomTensor(DType::kBF16, {1, 2, 8}, 20 + i));
  }
  for (int i = 0; i < 3; ++i) {
    DecodeStep step{qs[i].view(), kvs[i].view(), kvs[i].view(), {}, false};
    step.options.softcap = 30.f;
    step.options.window_left = 128;
    step.layer = 99;  // not read: the batch's layer is the argument
    if (i != 1) step.expected_context_tokens = 100 + i;
    steps.push_back(SessionStep{absl::StrCat("s", 2 - i), step});
  }
  CallOptions call{.request_id = "b1", .backend = "cpu", .priority = 1};
  absl::StatusOr<v1::BatchDecodeRequest> p = ToProto(3, steps, call);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->request_id(), "b1");
  EXPECT_EQ(p->backend(), "cpu");
  EXPECT_EQ(p->priority(), 1);
  EXPECT_EQ(p->layer(), 3);
  EXPECT_FLOAT_EQ(p->options().softcap(), 30.f);
  EXPECT_EQ(p->options().window_left(), 128);
  EXPECT_FALSE(p->outputs().lse());
  ASSERT_EQ(p->entries_size(), 3);
  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(i);
    const v1::BatchDecodeEntry& e = p->entries(i);
    EXPECT_EQ(e.session_id(), absl::StrCat("s", 2 - i));
    EXPECT_EQ(e.query().data(), qs[i].data);
    EXPECT_EQ(e.query().dtype(), v1::BF16);
    EXPECT_EQ(e.key().data(), kvs[i].data);
    EXPECT_EQ(e.value().data(), kvs[i].data);
    EXPECT_EQ(e.has_expected_context_tokens(), i != 1);
    if (i != 1) EXPECT_EQ(e.expected_context_tokens(), 100 + i);
  }

  // One options message and one lse per batch: a step that differs is refused.
  std::vector<SessionStep> mixed = steps;
  mixed[2].step.options.softcap = 0.f;
  EXPECT_THAT(ToProto(0, mixed, {}).status().message(), HasSubstr("steps[2].step.options"));
  mixed = steps;
  mixed[1].step.lse = true;
  EXPECT_THAT(ToProto(0, mixed, {}).status().message(), HasSubstr("steps[1].step.lse"));
  mixed = steps;
  mixed[2].step.entropy = true;
  EXPECT_THAT(ToProto(0, mixed, {}).status().message(), HasSubstr("steps[2].step.entropy"));
  mixed = steps;
  for (SessionStep& s : mixed) s.step.entropy = true;
  absl::StatusOr<v1::BatchDecodeRequest> with_entropy = ToProto(0, mixed, {});
  ASSERT_TRUE(with_entropy.ok()) << with_entropy.status();
  EXPECT_TRUE(with_entropy->outputs().entropy());
  EXPECT_FALSE(p->outputs().entropy());
  EXPECT_THAT(ToProto(0, {}, {}).status().message(), HasSubstr("steps: expected at least one"));
}

TEST(ClientConvertTest, BatchDecodeResultsAreOnePerEntryWithTheirOwnErrors) {
  const Tensor out = RandomTensor(DType::kF32, {1, 4, 8}, 7);
  v1::BatchDecodeResponse response;
  response.set_request_id("b1");
  response.set_backend("cpu");
  response.mutable_timing()->set_batch_size(2);
  v1::BatchDecodeResult* ok = response.add_results();
  ToProto(out.view(), ok->mutable_output());
  ok->set_context_tokens(17);
  const Tensor entropy = RandomTensor(DType::kF32, {1, 4, 1}, 8);
  ToProto(entropy.view(), ok->mutable_entropy());
  v1::BatchDecodeResult* failed = response.add_results();
  failed->set_code(9);  // FAILED_PRECONDITION
  failed->set_message("entries[1].layer: expected 2, got 3");
  v1::BatchDecodeResult* bad = response.add_results();
  bad->mutable_output()->set_dtype(v1::F32);
  bad->mutable_output()->add_shape(4);  // no data

  absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> r =
      FromProto(v1::BatchDecodeResponse(response), 3);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 3u);
  ASSERT_TRUE((*r)[0].ok()) << (*r)[0].status();
  EXPECT_EQ((*r)[0]->output.data, out.data);
  EXPECT_EQ((*r)[0]->context_tokens, 17);
  EXPECT_EQ((*r)[0]->request_id, "b1");
  EXPECT_EQ((*r)[0]->backend, "cpu");
  EXPECT_EQ((*r)[0]->timing.batch_size, 2);
  EXPECT_FALSE((*r)[0]->lse.has_value());
  ASSERT_TRUE((*r)[0]->entropy.has_value());
  EXPECT_EQ((*r)[0]->entropy->data, entropy.data);
  EXPECT_EQ((*r)[1].status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT((*r)[1].status().message(), HasSubstr("entries[1].layer"));
  EXPECT_THAT((*r)[2].status().message(), HasSubstr("results[2].output.data"));

  EXPECT_EQ(FromProto(v1::BatchDecodeResponse(response), 2).status().code(),
            absl::StatusCode::kInternal);
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
