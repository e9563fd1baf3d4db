// The attention tier over gRPC: BatchDecode equals per-session Decode and
// judges each entry alone, ForkSession shares a prefix, RoPE on sessions
// equals RoPE on stateless Attend, BatchDecodeStream, and the tier metrics.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/rope.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/half.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kHq = 4, kHkv = 2, kD = 16;

std::string RandomF32(std::mt19937& rng, int64_t n) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::string s(n * 4, '\0');
  for (int64_t i = 0; i < n; ++i) StoreFloat(s.data(), DType::kF32, i, dist(rng));
  return s;
}

v1::Tensor T(std::vector<int64_t> shape, std::string data) {
  v1::Tensor t;
  t.set_dtype(v1::F32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::move(data));
  return t;
}

// One step's tensors for one sequence: n new tokens, Lq = n.
struct StepData {
  v1::Tensor q, k, v;
};
StepData MakeStep(std::mt19937& rng, int64_t n) {
  return {T({n, kHq, kD}, RandomF32(rng, n * kHq * kD)), T({n, kHkv, kD}, RandomF32(rng, n * kHkv * kD)),
          T({n, kHkv, kD}, RandomF32(rng, n * kHkv * kD))};
}

class ModelTierTest : public ::testing::Test {
 public:
  void SetUp() override {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.metrics_listen_address = "";
    options.backend_threads = 2;
    options.sessions.block_tokens = 4;
    options.memory_limit_bytes = int64_t{256} << 20;
    auto server = Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::AttentionService::NewStub(channel_);
  }

  std::string Create(int32_t layers, bool rope = false) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    req.set_num_kv_heads(kHkv);
    req.set_head_dim(kD);
    req.set_num_layers(layers);
    if (rope) req.mutable_rotary()->set_theta(10000);
    v1::CreateSessionResponse resp;
    grpc::Status s = stub_->CreateSession(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.num_layers(), layers);
    return resp.session_id();
  }

  grpc::Status Decode(const std::string& id, int32_t layer, const StepData& d,
                      v1::DecodeResponse* resp) {
    grpc::ClientContext ctx;
    v1::DecodeRequest req;
    req.set_session_id(id);
    req.set_layer(layer);
    *req.mutable_query() = d.q;
    *req.mutable_key() = d.k;
    *req.mutable_value() = d.v;
    return stub_->Decode(&ctx, req, resp);
  }

  static v1::BatchDecodeEntry Entry(const std::string& id, const StepData& d) {
    v1::BatchDecodeEntry e;
    e.set_session_id(id);
    *e.mutable_query() = d.q;
    *e.mutable_key() = d.k;
    *e.mutable_value() = d.v;
    return e;
  }

  grpc::Status Batch(const v1::BatchDecodeRequest& req, v1::BatchDecodeResponse* resp) {
    grpc::ClientContext ctx;
    return stub_->BatchDecode(&ctx, req, resp);
  }

  grpc::Status Fork(const std::string& id, int64_t tokens, v1::ForkSessionResponse* resp) {
    grpc::ClientContext ctx;
    v1::ForkSessionRequest req;
    req.set_session_id(id);
    req.set_tokens(tokens);
    return stub_->ForkSession(&ctx, req, resp);
  }

  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

TEST_F(ModelTierTest, BatchDecodeEqualsDecodePerSession) {
  constexpr int kSeqs = 3, kLayers = 2;
  std::vector<std::string> batched, single;
  for (int i = 0; i < kSeqs; ++i) {
    batched.push_back(Create(kLayers));
    single.push_back(Create(kLayers));
  }
  std::mt19937 rng(3);
  for (int64_t n : {6, 1, 1, 2, 1}) {
    for (int layer = 0; layer < kLayers; ++layer) {
      v1::BatchDecodeRequest req;
      req.set_layer(layer);
      req.set_request_id("step");
      req.mutable_outputs()->set_lse(true);
      std::vector<StepData> steps;
      for (int i = 0; i < kSeqs; ++i) {
        steps.push_back(MakeStep(rng, n + i));  // ragged: each its own length
        *req.add_entries() = Entry(batched[i], steps.back());
      }
      v1::BatchDecodeResponse resp;
      ASSERT_TRUE(Batch(req, &resp).ok());
      EXPECT_EQ(resp.request_id(), "step");
      ASSERT_EQ(resp.results_size(), kSeqs);
      EXPECT_EQ(resp.timing().batch_size(), kSeqs);  // one backend call
      for (int i = 0; i < kSeqs; ++i) {
        const v1::BatchDecodeResult& r = resp.results(i);
        ASSERT_EQ(r.code(), 0) << r.message();
        v1::DecodeResponse want;
        ASSERT_TRUE(Decode(single[i], layer, steps[i], &want).ok());
        EXPECT_EQ(r.output().data(), want.output().data()) << "entry " << i << " layer " << layer;
        EXPECT_EQ(r.context_tokens(), want.context_tokens());
        EXPECT_EQ(r.lse().shape_size(), 3);
      }
    }
  }
}

TEST_F(ModelTierTest, EachEntryIsJudgedAloneAndFailuresChangeNothing) {
  const std::string a = Create(2), b = Create(2), c = Create(2);
  std::mt19937 rng(5);
  // Step 1 on layer 0 for a and b only: c has not stepped.
  {
    v1::BatchDecodeRequest req;
    req.set_layer(0);
    *req.add_entries() = Entry(a, MakeStep(rng, 2));
    *req.add_entries() = Entry(b, MakeStep(rng, 2));
    v1::BatchDecodeResponse resp;
    ASSERT_TRUE(Batch(req, &resp).ok());
    for (const auto& r : resp.results()) ASSERT_EQ(r.code(), 0) << r.message();
  }
  v1::BatchDecodeRequest req;
  req.set_layer(1);
  *req.add_entries() = Entry(a, MakeStep(rng, 2));                // good
  *req.add_entries() = Entry("0123456789abcdef", MakeStep(rng, 2));  // unknown
  *req.add_entries() = Entry(a, MakeStep(rng, 2));                // a again
  *req.add_entries() = Entry(c, MakeStep(rng, 2));                // layer 0 not done
  StepData bad = MakeStep(rng, 2);
  bad.k = T({2, kHkv + 1, kD}, RandomF32(rng, 2 * (kHkv + 1) * kD));
  *req.add_entries() = Entry(b, bad);                               // wrong heads
  v1::BatchDecodeResponse resp;
  ASSERT_TRUE(Batch(req, &resp).ok());
  ASSERT_EQ(resp.results_size(), 5);
  EXPECT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
  EXPECT_EQ(resp.results(0).context_tokens(), 2);
  EXPECT_EQ(resp.results(1).code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(resp.results(1).message(), HasSubstr("entries[1].session_id"));
  EXPECT_EQ(resp.results(2).code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(resp.results(2).message(), HasSubstr("entries[2].session_id"));
  EXPECT_EQ(resp.results(3).code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(resp.results(3).message(), HasSubstr("entries[3].layer"));
  EXPECT_EQ(resp.results(4).code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(resp.results(4).message(), HasSubstr("entries[4].key.shape"));
  // b's layer 1 is unchanged: its correct step still lands.
  v1::BatchDecodeRequest again;
  again.set_layer(1);
  v1::BatchDecodeEntry e = Entry(b, MakeStep(rng, 2));
  e.set_expected_context_tokens(0);
  *again.add_entries() = e;
  ASSERT_TRUE(Batch(again, &resp).ok());
  EXPECT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
  EXPECT_EQ(resp.results(0).context_tokens(), 2);

  // Entries of different head counts in one call.
  const std::string d = Create(1), f = Create(1);
  v1::BatchDecodeRequest mixed;
  *mixed.add_entries() = Entry(d, MakeStep(rng, 1));
  StepData other = MakeStep(rng, 1);
  other.q = T({1, 2 * kHq, kD}, RandomF32(rng, 2 * kHq * kD));
  *mixed.add_entries() = Entry(f, other);
  ASSERT_TRUE(Batch(mixed, &resp).ok());
  EXPECT_EQ(resp.results(0).code(), 0);
  EXPECT_EQ(resp.results(1).code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(resp.results(1).message(), HasSubstr("like entries[0]"));

  v1::BatchDecodeRequest empty;
  EXPECT_EQ(Batch(empty, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ModelTierTest, ABatchOverTheMemoryBudgetChangesNoCache) {
  // 16 entries of 4096 tokens: a 32 MiB message and as much again for the
  // outputs, over a 16 MiB memory limit (gRPC's quarter refuses the message
  // before the handler's reservation would); the call is refused whole.
  server_.reset();
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_listen_address = "";
  options.backend_threads = 2;
  options.memory_limit_bytes = int64_t{16} << 20;
  options.max_request_bytes = int64_t{128} << 20;
  server_ = *Server::Create(options);
  ASSERT_TRUE(server_->Start().ok());
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(128 << 20);
  channel_ = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                       grpc::InsecureChannelCredentials(), args);
  stub_ = v1::AttentionService::NewStub(channel_);
  std::mt19937 rng(9);
  const StepData big = MakeStep(rng, 4096);
  v1::BatchDecodeRequest req;
  for (int i = 0; i < 16; ++i) *req.add_entries() = Entry(Create(1), big);
  const int64_t used = server_->sessions().stats().used_bytes;
  v1::BatchDecodeResponse resp;
  grpc::Status s = Batch(req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(server_->sessions().stats().used_bytes, used);
  // Every session still holds nothing: a one-token step lands at 0.
  v1::BatchDecodeRequest small;
  v1::BatchDecodeEntry e = Entry(req.entries(0).session_id(), MakeStep(rng, 1));
  e.set_expected_context_tokens(0);
  *small.add_entries() = e;
  ASSERT_TRUE(Batch(small, &resp).ok());
  EXPECT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
}

TEST_F(ModelTierTest, ForkSharesThePrefix) {
  const std::string parent = Create(2);
  std::mt19937 rng(11);
  const StepData prompt = MakeStep(rng, 10);
  v1::DecodeResponse resp;
  ASSERT_TRUE(Decode(parent, 0, prompt, &resp).ok());
  ASSERT_TRUE(Decode(parent, 1, prompt, &resp).ok());
  v1::ForkSessionResponse forked;
  ASSERT_TRUE(Fork(parent, 10, &forked).ok());
  EXPECT_EQ(forked.context_tokens(), 10);
  EXPECT_EQ(forked.shared_tokens(), 8);
  // The same next step on parent and fork gives the same answer.
  const StepData next = MakeStep(rng, 1);
  for (int layer = 0; layer < 2; ++layer) {
    v1::DecodeResponse from_parent, from_fork;
    ASSERT_TRUE(Decode(parent, layer, next, &from_parent).ok());
    ASSERT_TRUE(Decode(forked.session_id(), layer, next, &from_fork).ok());
    EXPECT_EQ(from_parent.output().data(), from_fork.output().data());
  }
  v1::ForkSessionResponse beyond;
  grpc::Status s = Fork(parent, 12, &beyond);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("tokens"));
  EXPECT_EQ(Fork("nope", 1, &beyond).error_code(), grpc::StatusCode::NOT_FOUND);

  grpc::ClientContext ctx;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.sessions().kv_blocks_shared(), 4);  // 2 full blocks x 2 layers
  EXPECT_GT(info.sessions().kv_cache_shared_bytes(), 0);
  const std::string metrics = server_->metrics().TextFormat();
  EXPECT_THAT(metrics, HasSubstr("attnserve_session_forks_total 1"));
  EXPECT_THAT(metrics, HasSubstr("attnserve_kv_blocks_shared 4"));
  EXPECT_THAT(metrics, HasSubstr("attnserve_kv_cache_bytes{state=\"shared\"}"));
}

// Rotates `data` ([tokens, heads, kD] F32) at `positions` as a caller would.
std::string Rotated(std::string data, int64_t heads, std::vector<int64_t> positions) {
  RopeConfig rope;
  EXPECT_TRUE(ValidateRope(rope, kD).ok());
  RotateRope(rope, positions, static_cast<int32_t>(heads), kD, reinterpret_cast<float*>(data.data()));
  return data;
}

TEST_F(ModelTierTest, RopeOnSessionsEqualsRopeOnAttendAndCallerRotation) {
  const std::string id = Create(1, /*rope=*/true);
  std::mt19937 rng(13);
  std::string k_all, v_all;
  int64_t total = 0;
  for (int64_t n : {5, 1, 2}) {
    const StepData d = MakeStep(rng, n);
    v1::DecodeResponse got;
    ASSERT_TRUE(Decode(id, 0, d, &got).ok());
    k_all += d.k.data();
    v_all += d.v.data();
    total += n;
    // The same over Attend, with the server rotating...
    v1::AttendRequest attend;
    *attend.mutable_query() = d.q;
    *attend.mutable_key() = T({total, kHkv, kD}, k_all);
    *attend.mutable_value() = T({total, kHkv, kD}, v_all);
    attend.mutable_options()->set_causal(true);
    attend.mutable_rotary()->set_theta(10000);
    v1::AttendResponse want;
    {
      grpc::ClientContext ctx;
      ASSERT_TRUE(stub_->Attend(&ctx, attend, &want).ok());
    }
    EXPECT_EQ(got.output().data(), want.output().data()) << total;
    // ...and with the caller rotating.
    std::vector<int64_t> kpos(total), qpos(n);
    for (int64_t i = 0; i < total; ++i) kpos[i] = i;
    for (int64_t i = 0; i < n; ++i) qpos[i] = total - n + i;
    v1::AttendRequest plain = attend;
    plain.clear_rotary();
    *plain.mutable_query() = T({n, kHq, kD}, Rotated(d.q.data(), kHq, qpos));
    *plain.mutable_key() = T({total, kHkv, kD}, Rotated(k_all, kHkv, kpos));
    v1::AttendResponse manual;
    {
      grpc::ClientContext ctx;
      ASSERT_TRUE(stub_->Attend(&ctx, plain, &manual).ok());
    }
    EXPECT_EQ(manual.output().data(), want.output().data());
  }
  // Positions that do not fit the tokens.
  v1::AttendRequest attend;
  const StepData d = MakeStep(rng, 3);
  *attend.mutable_query() = d.q;
  *attend.mutable_key() = d.k;
  *attend.mutable_value() = d.v;
  attend.mutable_rotary()->set_theta(10000);
  attend.add_query_positions(1);
  v1::AttendResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = stub_->Attend(&ctx, attend, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("query_positions"));
  // Rotary settings that contradict the head dim.
  grpc::ClientContext ctx2;
  v1::CreateSessionRequest req;
  req.set_num_kv_heads(kHkv);
  req.set_head_dim(kD);
  req.mutable_rotary()->set_rotary_dim(kD + 2);
  v1::CreateSessionResponse created;
  s = stub_->CreateSession(&ctx2, req, &created);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("rotary.rotary_dim"));
}

TEST_F(ModelTierTest, BatchDecodeStreamAnswersEveryLayerStep) {
  const std::string a = Create(2), b = Create(2);
  std::mt19937 rng(17);
  grpc::ClientContext ctx;
  auto stream = stub_->BatchDecodeStream(&ctx);
  for (int layer = 0; layer < 2; ++layer) {
    v1::BatchDecodeRequest req;
    req.set_request_id(absl::StrCat("layer", layer));
    req.set_layer(layer);
    *req.add_entries() = Entry(a, MakeStep(rng, 3));
    *req.add_entries() = Entry(b, MakeStep(rng, 3));
    ASSERT_TRUE(stream->Write(req));
    v1::BatchDecodeResponse resp;
    ASSERT_TRUE(stream->Read(&resp));  // layer 1 needs layer 0's answer first
    EXPECT_EQ(resp.request_id(), absl::StrCat("layer", layer));
    ASSERT_EQ(resp.results_size(), 2);
    for (const auto& r : resp.results()) EXPECT_EQ(r.code(), 0) << r.message();
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_THAT(server_->metrics().TextFormat(), HasSubstr("attnserve_batch_decode_entries_count 2"));
}

TEST_F(ModelTierTest, AMalformedRotatedQueryFailsAloneAndFreesItsSession) {
  const std::string id = Create(1, /*rope=*/true);
  std::mt19937 rng(19);
  StepData bad = MakeStep(rng, 1);
  bad.q = T({int64_t{1} << 50, 0, kD}, "");  // no bytes for no elements
  v1::DecodeResponse resp;
  grpc::Status s = Decode(id, 0, bad, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("query.shape"));
  // The session is free again, and unchanged.
  ASSERT_TRUE(Decode(id, 0, MakeStep(rng, 2), &resp).ok());
  EXPECT_EQ(resp.context_tokens(), 2);
  v1::BatchDecodeRequest req;
  *req.add_entries() = Entry(id, bad);
  v1::BatchDecodeResponse batch;
  ASSERT_TRUE(Batch(req, &batch).ok());
  EXPECT_EQ(batch.results(0).code(), grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(Decode(id, 0, MakeStep(rng, 1), &resp).ok());
  EXPECT_EQ(resp.context_tokens(), 3);
}

TEST_F(ModelTierTest, AttendRopeDefaultsFollowKeyLengthsAndDynamicScalesTheWholeCall) {
  std::mt19937 rng(23);
  // Two rows, the second padded: its queries end at its own last key.
  const int64_t lq = 2, lk = 6;
  v1::AttendRequest req;
  *req.mutable_query() = T({2, lq, kHq, kD}, RandomF32(rng, 2 * lq * kHq * kD));
  *req.mutable_key() = T({2, lk, kHkv, kD}, RandomF32(rng, 2 * lk * kHkv * kD));
  *req.mutable_value() = T({2, lk, kHkv, kD}, RandomF32(rng, 2 * lk * kHkv * kD));
  req.add_key_lengths(6);
  req.add_key_lengths(4);
  req.mutable_options()->set_causal(true);
  req.mutable_rotary()->set_theta(10000);
  v1::AttendResponse by_default, explicit_positions;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Attend(&ctx, req, &by_default).ok());
  }
  for (int64_t p : {4, 5, 2, 3}) req.add_query_positions(p);
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Attend(&ctx, req, &explicit_positions).ok());
  }
  EXPECT_EQ(by_default.output().data(), explicit_positions.output().data());

  // DYNAMIC over 5000 keys: one base for the whole call (the server rotates
  // in pieces of 4096 tokens).
  const int64_t n = 5000;
  v1::AttendRequest dyn;
  *dyn.mutable_query() = T({1, 1, 1, kD}, RandomF32(rng, kD));
  *dyn.mutable_key() = T({1, n, 1, kD}, RandomF32(rng, n * kD));
  *dyn.mutable_value() = T({1, n, 1, kD}, RandomF32(rng, n * kD));
  v1::RotaryEmbedding* r = dyn.mutable_rotary();
  r->set_scaling(v1::RotaryEmbedding::DYNAMIC);
  r->set_factor(4);
  r->set_original_max_positions(1024);
  v1::AttendResponse got;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Attend(&ctx, dyn, &got).ok());
  }
  RopeConfig rope;
  rope.scaling = RopeScaling::kDynamic;
  rope.factor = 4;
  rope.original_max_positions = 1024;
  ASSERT_TRUE(ValidateRope(rope, kD).ok());
  std::vector<int64_t> kpos(n);
  for (int64_t i = 0; i < n; ++i) kpos[i] = i;
  std::string k = dyn.key().data(), q = dyn.query().data();
  RotateRope(rope, kpos, 1, kD, reinterpret_cast<float*>(k.data()));
  RotateRope(rope, std::vector<int64_t>{n - 1}, 1, kD, reinterpret_cast<float*>(q.data()), n - 1);
  v1::AttendRequest manual = dyn;
  manual.clear_rotary();
  manual.mutable_key()->set_data(k);
  manual.mutable_query()->set_data(q);
  v1::AttendResponse want;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Attend(&ctx, manual, &want).ok());
  }
  EXPECT_EQ(got.output().data(), want.output().data());
}

TEST_F(ModelTierTest, EntropyOverSessionsEqualsEntropyOverAttend) {
  const std::string a = Create(1), b = Create(1);
  std::mt19937 rng(29);
  std::string k_all, v_all;
  int64_t total = 0;
  for (int64_t n : {7, 1, 3}) {
    const StepData d = MakeStep(rng, n);
    k_all += d.k.data();
    v_all += d.v.data();
    total += n;
    v1::DecodeRequest dreq;
    dreq.set_session_id(a);
    *dreq.mutable_query() = d.q;
    *dreq.mutable_key() = d.k;
    *dreq.mutable_value() = d.v;
    dreq.mutable_outputs()->set_entropy(true);
    v1::DecodeResponse decoded;
    {
      grpc::ClientContext ctx;
      ASSERT_TRUE(stub_->Decode(&ctx, dreq, &decoded).ok());
    }
    v1::BatchDecodeRequest breq;
    breq.mutable_outputs()->set_entropy(true);
    *breq.add_entries() = Entry(b, d);
    v1::BatchDecodeResponse batched;
    ASSERT_TRUE(Batch(breq, &batched).ok());
    ASSERT_EQ(batched.results(0).code(), 0) << batched.results(0).message();
    v1::AttendRequest attend;
    *attend.mutable_query() = d.q;
    *attend.mutable_key() = T({total, kHkv, kD}, k_all);
    *attend.mutable_value() = T({total, kHkv, kD}, v_all);
    attend.mutable_options()->set_causal(true);
    attend.mutable_outputs()->set_entropy(true);
    v1::AttendResponse want;
    {
      grpc::ClientContext ctx;
      ASSERT_TRUE(stub_->Attend(&ctx, attend, &want).ok());
    }
    ASSERT_EQ(want.entropy().shape_size(), 3);
    EXPECT_EQ(want.entropy().shape(1), kHq);
    EXPECT_EQ(want.entropy().shape(2), n);
    EXPECT_EQ(decoded.entropy().data(), want.entropy().data());
    EXPECT_EQ(batched.results(0).entropy().data(), want.entropy().data());
    EXPECT_FALSE(decoded.has_lse());  // only what was asked
  }
}

}  // namespace
}  // namespace attnserve
