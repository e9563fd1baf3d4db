// --attention_stats_sample over gRPC: which requests are sampled (Attend,
// AttendStream items, Decode steps, BatchDecode entries; 1 in N), what
// attnserve_attention_entropy_nats records for them (every row's entropy, the
// session step's layer as a label, at most kMaxEntropyValuesPerRequest values),
// that responses carry entropy only when asked, and that a request the
// backend cannot compute entropy for is served unsampled rather than refused.
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "backends/registry.h"
#include "core/half.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/testing/metrics_scrape.h"

namespace attnserve {
namespace {

using ::attnserve::test_util::SampleValue;

constexpr int64_t kHq = 2, kHkv = 2, kD = 16;

// The cpu backend that refuses outputs.entropy, as the cuda backend does.
class NoEntropyBackend : public Backend {
 public:
  NoEntropyBackend() : inner_(*CreateBackend("cpu")) {
    info_ = inner_->info();
    info_.name = "noentropy";
  }
  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams& params) const override {
    if (params.entropy != nullptr) return absl::UnimplementedError("outputs.entropy");
    return inner_->Supports(params);
  }
  absl::Status Run(absl::Span<const AttentionParams> batch) override { return inner_->Run(batch); }

 private:
  std::unique_ptr<Backend> inner_;
  BackendInfo info_;
};

v1::Tensor F32Tensor(std::vector<int64_t> shape, std::mt19937* rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  v1::Tensor t;
  t.set_dtype(v1::F32);
  for (int64_t d : shape) t.add_shape(d);
  std::string* data = t.mutable_data();
  data->resize(n * 4);
  for (int64_t i = 0; i < n; ++i) StoreFloat(data->data(), DType::kF32, i, rng ? normal(*rng) : 0.f);
  return t;
}

class AttentionStatsTest : public ::testing::Test {
 protected:
  void StartServer(int64_t sample) {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.metrics_listen_address = "";
    options.backend_threads = 2;
    options.sessions.block_tokens = 4;
    options.memory_limit_bytes = int64_t{256} << 20;
    options.attention_stats_sample = sample;
    std::vector<std::unique_ptr<Backend>> backends;
    backends.push_back(*CreateBackend("cpu"));
    backends.push_back(std::make_unique<NoEntropyBackend>());
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(options, std::move(backends));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    stub_ = v1::AttentionService::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", server_->port()), grpc::InsecureChannelCredentials()));
  }

  // An Attend of `lq` queries over `lk` keys; a zero query (every key
  // equally likely: entropy ln lk) unless `random`.
  v1::AttendRequest Request(int64_t lq, int64_t lk, bool random = true, int64_t hq = kHq) {
    v1::AttendRequest r;
    *r.mutable_query() = F32Tensor({1, lq, hq, kD}, random ? &rng_ : nullptr);
    *r.mutable_key() = F32Tensor({1, lk, kHkv, kD}, &rng_);
    *r.mutable_value() = F32Tensor({1, lk, kHkv, kD}, &rng_);
    return r;
  }

  v1::AttendResponse Attend(const v1::AttendRequest& request) {
    grpc::ClientContext context;
    v1::AttendResponse response;
    grpc::Status s = stub_->Attend(&context, request, &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response;
  }

  // attnserve_attention_entropy_nats<suffix>{layer="<layer>"<more>}; 0 when
  // the series does not exist (nothing recorded under that label).
  double Sample(const std::string& suffix, const std::string& layer,
                const std::string& more = "") {
    const double v = SampleValue(server_->metrics().TextFormat(),
                                 absl::StrCat("attnserve_attention_entropy_nats", suffix,
                                              "{layer=\"", layer, "\"", more, "}"));
    return v < 0 ? 0 : v;
  }
  double Count(const std::string& layer = "") { return Sample("_count", layer); }

  std::string CreateSession(int32_t layers) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    req.set_num_kv_heads(kHkv);
    req.set_head_dim(kD);
    req.set_num_layers(layers);
    v1::CreateSessionResponse resp;
    grpc::Status s = stub_->CreateSession(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.session_id();
  }

  // One step of `n` new tokens (Lq = n) on `layer` of session `id`.
  v1::DecodeResponse Decode(const std::string& id, int32_t layer, int64_t n, bool entropy = false) {
    grpc::ClientContext ctx;
    v1::DecodeRequest req;
    req.set_session_id(id);
    req.set_layer(layer);
    *req.mutable_query() = F32Tensor({n, kHq, kD}, &rng_);
    *req.mutable_key() = F32Tensor({n, kHkv, kD}, &rng_);
    *req.mutable_value() = F32Tensor({n, kHkv, kD}, &rng_);
    req.mutable_outputs()->set_entropy(entropy);
    v1::DecodeResponse resp;
    grpc::Status s = stub_->Decode(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }

  std::mt19937 rng_{11};
  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

TEST_F(AttentionStatsTest, EverySampledAttendRecordsEachRowWithoutReturningIt) {
  StartServer(/*sample=*/1);
  EXPECT_EQ(Count(), 0);
  v1::AttendResponse r = Attend(Request(/*lq=*/8, /*lk=*/8));
  EXPECT_FALSE(r.has_entropy()) << "not asked for, so not returned";
  EXPECT_TRUE(r.has_output());
  EXPECT_EQ(Count(), kHq * 8);
  Attend(Request(3, 5));
  EXPECT_EQ(Count(), kHq * 8 + kHq * 3);
}

TEST_F(AttentionStatsTest, RecordsWhatItReturnsWhenAsked) {
  StartServer(1);
  v1::AttendRequest request = Request(6, 12);
  request.mutable_outputs()->set_entropy(true);
  v1::AttendResponse r = Attend(request);
  ASSERT_TRUE(r.has_entropy());
  ASSERT_EQ(r.entropy().data().size(), size_t{kHq * 6 * 4});
  double sum = 0;
  for (int64_t i = 0; i < kHq * 6; ++i) sum += LoadFloat(r.entropy().data().data(), DType::kF32, i);
  EXPECT_EQ(Count(), kHq * 6);
  EXPECT_NEAR(Sample("_sum", ""), sum, 1e-4 * (1 + sum));
}

TEST_F(AttentionStatsTest, BucketsAreInNats) {
  StartServer(1);
  // A zero query weighs its 8 keys equally: ln 8 ≈ 2.08 nats, between the
  // buckets 2 and 3.
  Attend(Request(4, 8, /*random=*/false));
  EXPECT_EQ(Sample("_bucket", "", ",le=\"2\""), 0);
  EXPECT_EQ(Sample("_bucket", "", ",le=\"3\""), kHq * 4);
  EXPECT_NEAR(Sample("_sum", ""), kHq * 4 * std::log(8.0), 1e-3);
  // One key: all the weight on it, entropy 0.
  Attend(Request(5, 1));
  EXPECT_EQ(Sample("_bucket", "", ",le=\"0\""), kHq * 5);
}

TEST_F(AttentionStatsTest, OffRecordsNothing) {
  StartServer(0);
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(Attend(Request(8, 8)).has_entropy());
  const std::string id = CreateSession(1);
  Decode(id, 0, 3);
  EXPECT_EQ(server_->metrics().TextFormat().find("attnserve_attention_entropy_nats_count"),
            std::string::npos);
  // Asking for entropy still works, and is still not recorded.
  v1::AttendRequest request = Request(8, 8);
  request.mutable_outputs()->set_entropy(true);
  EXPECT_TRUE(Attend(request).has_entropy());
  EXPECT_EQ(Count(), 0);
}

TEST_F(AttentionStatsTest, OneInTwoSamplesHalf) {
  StartServer(2);
  constexpr int kCalls = 20;
  for (int i = 0; i < kCalls; ++i) EXPECT_FALSE(Attend(Request(4, 8)).has_entropy());
  // One counter for all requests: exactly every other one when they come
  // one at a time.
  EXPECT_EQ(Count(), kCalls / 2 * kHq * 4);
}

TEST_F(AttentionStatsTest, AttendStreamItemsAreSampled) {
  StartServer(1);
  grpc::ClientContext ctx;
  auto stream = stub_->AttendStream(&ctx);
  for (int i = 0; i < 3; ++i) {
    v1::AttendRequest request = Request(5, 7);
    request.set_request_id(absl::StrCat("r", i));
    ASSERT_TRUE(stream->Write(request));
  }
  stream->WritesDone();
  v1::AttendResponse response;
  int answered = 0;
  while (stream->Read(&response)) {
    EXPECT_FALSE(response.has_entropy());
    ++answered;
  }
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_EQ(answered, 3);
  EXPECT_EQ(Count(), 3 * kHq * 5);
}

TEST_F(AttentionStatsTest, LargeRequestsObserveAStridedSample) {
  StartServer(1);
  // 2 heads × 4096 queries: 8192 values, every second one observed.
  Attend(Request(4096, 4));
  EXPECT_EQ(Count(), 4096);
  EXPECT_LE(Count(), kMaxEntropyValuesPerRequest);
}

TEST_F(AttentionStatsTest, BackendWithoutEntropyServesUnsampled) {
  StartServer(1);
  v1::AttendRequest request = Request(8, 8);
  request.set_backend("noentropy");
  v1::AttendResponse r = Attend(request);
  EXPECT_TRUE(r.has_output());
  EXPECT_FALSE(r.has_entropy());
  EXPECT_EQ(r.backend(), "noentropy");
  // LINEAR attention has no entropy: served, not recorded.
  v1::AttendRequest linear = Request(8, 8);
  linear.mutable_options()->set_variant(v1::LINEAR);
  EXPECT_TRUE(Attend(linear).has_output());
  EXPECT_EQ(Count(), 0);
  // Asking for it on that backend is still the caller's error.
  request.mutable_outputs()->set_entropy(true);
  grpc::ClientContext ctx;
  v1::AttendResponse refused;
  EXPECT_EQ(stub_->Attend(&ctx, request, &refused).error_code(), grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(AttentionStatsTest, SessionStepsRecordTheirLayer) {
  StartServer(1);
  const std::string a = CreateSession(2), b = CreateSession(2);
  // Decode: layer 0 then 1 of one step.
  v1::DecodeResponse d0 = Decode(a, 0, 3);
  EXPECT_FALSE(d0.has_entropy());
  EXPECT_EQ(Count("0"), kHq * 3);
  v1::DecodeResponse d1 = Decode(a, 1, 3, /*entropy=*/true);
  EXPECT_TRUE(d1.has_entropy());
  EXPECT_EQ(Count("1"), kHq * 3);
  EXPECT_EQ(Count(""), 0) << "session steps are labelled by layer";

  // BatchDecode: each entry is a request; both entries on layer 0 of b and
  // of a's next step.
  for (int32_t layer : {0, 1}) {
    grpc::ClientContext ctx;
    v1::BatchDecodeRequest req;
    req.set_layer(layer);
    for (const std::string& id : {a, b}) {
      if (layer == 1 && id == b) continue;
      v1::BatchDecodeEntry* e = req.add_entries();
      e->set_session_id(id);
      *e->mutable_query() = F32Tensor({2, kHq, kD}, &rng_);
      *e->mutable_key() = F32Tensor({2, kHkv, kD}, &rng_);
      *e->mutable_value() = F32Tensor({2, kHkv, kD}, &rng_);
    }
    v1::BatchDecodeResponse resp;
    grpc::Status s = stub_->BatchDecode(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    for (const v1::BatchDecodeResult& result : resp.results()) {
      EXPECT_EQ(result.code(), 0) << result.message();
      EXPECT_FALSE(result.has_entropy());
    }
  }
  EXPECT_EQ(Count("0"), kHq * 3 + 2 * kHq * 2);
  EXPECT_EQ(Count("1"), kHq * 3 + kHq * 2);
}

TEST_F(AttentionStatsTest, LayerLabelsAreBounded) {
  StartServer(0);
  const std::vector<float> values = {0.5f, 1.f, NAN};
  server_->metrics().RecordAttentionEntropy(255, values);
  server_->metrics().RecordAttentionEntropy(256, values);
  server_->metrics().RecordAttentionEntropy(100000, values);
  EXPECT_EQ(Count("255"), 2) << "the NaN is skipped";
  EXPECT_EQ(Count("256+"), 4);
  EXPECT_EQ(Count("256"), 0);
}

}  // namespace
}  // namespace attnserve
