// AttnClient's session calls, ModelSession and RunSessionLoad (attnctl bench
// --sessions) against an in-process fake of the session RPCs, on an
// ephemeral port. The fake refuses overlapping steps of one session
// (ABORTED), layers out of order and stale expected_context_tokens
// (FAILED_PRECONDITION), as attnserve does, and records message sizes, how
// many steps ran at once and whether steps of two layers ever overlapped.
#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/model_session.h"
#include "client/session_load.h"
#include "client/shapes.h"

namespace attnserve::client {
namespace {

using ::testing::HasSubstr;

class FakeSessionService final : public v1::AttentionService::Service {
 public:
  static constexpr int64_t kMaxRequestBytes = 40 << 10;

  grpc::Status CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest* request,
                             v1::CreateSessionResponse* response) override {
    absl::MutexLock lock(&mu_);
    if (created_ >= create_limit_) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "KV cache full");
    }
    const std::string id = absl::StrCat("s", created_++);
    State state{request->num_kv_heads(), request->dtype()};
    state.layer_tokens.assign(std::max(request->num_layers(), 1), 0);
    sessions_[id] = state;
    last_create_ = *request;
    response->set_session_id(id);
    response->set_capacity_tokens(1 << 20);
    response->set_block_tokens(16);
    response->set_num_layers(std::max(request->num_layers(), 1));
    return grpc::Status::OK;
  }

  // Appends the key's tokens to the layer and echoes the query as the output.
  grpc::Status Decode(grpc::ServerContext*, const v1::DecodeRequest* request,
                      v1::DecodeResponse* response) override {
    {
      absl::MutexLock lock(&mu_);
      max_message_bytes_ = std::max<int64_t>(max_message_bytes_, request->ByteSizeLong());
      auto it = sessions_.find(request->session_id());
      if (it == sessions_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "session_id");
      if (it->second.busy) {
        ++overlaps_;
        return grpc::Status(grpc::StatusCode::ABORTED, "another Decode of the session runs");
      }
      it->second.busy = true;
      max_running_ = std::max(max_running_, ++running_);
      // Single-token steps (the tests' decode; prefill chunks are longer) of
      // two layers running at once: a model-shaped load that does not finish
      // a layer-step before the next.
      if (request->key().shape(0) == 1) {
        if (++running_decodes_ > 1 && request->layer() != running_layer_) ++layer_overlaps_;
        running_layer_ = request->layer();
      }
    }
    // Long enough that overlapping steps of one session would be seen.
    absl::SleepFor(absl::Milliseconds(2));
    absl::MutexLock lock(&mu_);
    State& s = sessions_[request->session_id()];
    s.busy = false;
    --running_;
    if (request->key().shape(0) == 1) --running_decodes_;
    ++decode_calls_;
    absl::StatusOr<int64_t> tokens =
        StepLocked(s, request->layer(), request->key().shape(0),
                   request->has_expected_context_tokens()
                       ? std::optional<int64_t>(request->expected_context_tokens())
                       : std::nullopt);
    if (!tokens.ok()) {
      return grpc::Status(static_cast<grpc::StatusCode>(tokens.status().code()),
                          std::string(tokens.status().message()));
    }
    response->set_request_id(request->request_id());
    *response->mutable_output() = request->query();
    response->set_context_tokens(*tokens);
    response->mutable_timing()->set_batch_size(1);
    return grpc::Status::OK;
  }

  // Steps every entry as Decode does, each with its own result; backend
  // "fail" fails the whole call.
  grpc::Status BatchDecode(grpc::ServerContext*, const v1::BatchDecodeRequest* request,
                           v1::BatchDecodeResponse* response) override {
    absl::MutexLock lock(&mu_);
    ++batch_calls_;
    last_batch_ = *request;
    batch_sizes_.push_back(request->entries_size());
    if (request->backend() == "fail") {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full");
    }
    response->set_request_id(request->request_id());
    response->set_backend("echo");
    response->mutable_timing()->set_batch_size(request->entries_size());
    for (int i = 0; i < request->entries_size(); ++i) {
      const v1::BatchDecodeEntry& e = request->entries(i);
      v1::BatchDecodeResult* r = response->add_results();
      auto it = sessions_.find(e.session_id());
      absl::StatusOr<int64_t> tokens =
          it == sessions_.end()
              ? absl::NotFoundError(absl::StrCat("entries[", i, "].session_id: unknown"))
              : StepLocked(it->second, request->layer(), e.key().shape(0),
                           e.has_expected_context_tokens()
                               ? std::optional<int64_t>(e.expected_context_tokens())
                               : std::nullopt);
      if (!tokens.ok()) {
        r->set_code(static_cast<int>(tokens.status().code()));
        r->set_message(absl::StrCat("entries[", i, "]: ", tokens.status().message()));
        continue;
      }
      *r->mutable_output() = e.query();
      r->set_context_tokens(*tokens);
    }
    return grpc::Status::OK;
  }

  grpc::Status ForkSession(grpc::ServerContext*, const v1::ForkSessionRequest* request,
                           v1::ForkSessionResponse* response) override {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(request->session_id());
    if (it == sessions_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "session_id");
    if (request->tokens() > it->second.layer_tokens[0]) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "tokens: past the parent");
    }
    State fork = it->second;
    fork.layer_tokens.assign(fork.layer_tokens.size(), request->tokens());
    fork.next_layer = 0;
    fork.steps = 0;
    const std::string id = absl::StrCat("s", created_++);
    sessions_[id] = fork;
    response->set_session_id(id);
    response->set_context_tokens(request->tokens());
    response->set_shared_tokens(request->tokens() / 16 * 16);
    return grpc::Status::OK;
  }

  grpc::Status CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest* request,
                            v1::CloseSessionResponse*) override {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(request->session_id());
    if (it == sessions_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "session_id");
    closed_steps_.push_back(it->second.steps);
    sessions_.erase(it);
    return grpc::Status::OK;
  }

  grpc::Status GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                             v1::ServerInfo* info) override {
    info->mutable_limits()->set_max_request_bytes(kMaxRequestBytes);
    return grpc::Status::OK;
  }

  struct State {
    int32_t num_kv_heads = 0;
    v1::DType dtype = v1::DTYPE_UNSPECIFIED;
    std::vector<int64_t> layer_tokens;  // tokens of each layer's cache
    int32_t next_layer = 0;             // the only layer that may step now
    int64_t steps = 0;
    bool busy = false;
  };

  // attnserve's rules for one step: the layer in range and next in order,
  // expected_context_tokens (if set) equal to the layer's tokens. Returns
  // the layer's tokens after the append.
  absl::StatusOr<int64_t> StepLocked(State& s, int32_t layer, int64_t new_tokens,
                                     std::optional<int64_t> expected)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int32_t layers = static_cast<int32_t>(s.layer_tokens.size());
    if (layer < 0 || layer >= layers) {
      return absl::InvalidArgumentError(absl::StrCat("layer: expected in [0, ", layers,
                                                     "), got ", layer));
    }
    if (layer != s.next_layer) {
      ++out_of_order_;
      return absl::FailedPreconditionError(
          absl::StrCat("layer: expected ", s.next_layer, ", got ", layer));
    }
    int64_t& tokens = s.layer_tokens[layer];
    if (expected.has_value() && *expected != tokens) {
      ++stale_;
      return absl::FailedPreconditionError(absl::StrCat(
          "expected_context_tokens: expected ", tokens, ", got ", *expected));
    }
    tokens += new_tokens;
    s.next_layer = (layer + 1) % layers;
    ++s.steps;
    return tokens;
  }

  absl::Mutex mu_;
  int create_limit_ ABSL_GUARDED_BY(mu_) = 1 << 30;
  int created_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, State> sessions_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> closed_steps_ ABSL_GUARDED_BY(mu_);  // steps of each closed session
  int64_t max_message_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t overlaps_ ABSL_GUARDED_BY(mu_) = 0;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  int max_running_ ABSL_GUARDED_BY(mu_) = 0;
  int running_decodes_ ABSL_GUARDED_BY(mu_) = 0;   // single-token steps running
  int32_t running_layer_ ABSL_GUARDED_BY(mu_) = 0;  // the layer of the last one
  int64_t layer_overlaps_ ABSL_GUARDED_BY(mu_) = 0;  // Decodes of two layers at once
  int64_t out_of_order_ ABSL_GUARDED_BY(mu_) = 0;    // steps refused for their layer
  int64_t stale_ ABSL_GUARDED_BY(mu_) = 0;           // ... for expected_context_tokens
  int64_t decode_calls_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batch_calls_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int> batch_sizes_ ABSL_GUARDED_BY(mu_);  // entries of each BatchDecode
  v1::CreateSessionRequest last_create_ ABSL_GUARDED_BY(mu_);
  v1::BatchDecodeRequest last_batch_ ABSL_GUARDED_BY(mu_);
};

class SessionLoadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    absl::StatusOr<std::unique_ptr<AttnClient>> client =
        AttnClient::Create(absl::StrCat("127.0.0.1:", port));
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
  }

  void TearDown() override {
    client_.reset();
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  }

  // Small dims: 128 bytes of K/V per token in F32.
  static SessionLoadOptions SmallOptions() {
    SessionLoadOptions o;
    o.sessions = 6;
    o.concurrency = 3;
    o.context_tokens = 1000;
    o.heads_q = 4;
    o.heads_kv = 2;
    o.head_dim = 8;
    o.cache_dtype = DType::kBF16;
    o.duration = absl::Milliseconds(300);
    o.max_request_bytes = FakeSessionService::kMaxRequestBytes;
    return o;
  }

  FakeSessionService service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<AttnClient> client_;
};

TEST_F(SessionLoadTest, SessionCallsRoundTrip) {
  SessionSpec spec;
  spec.num_kv_heads = 2;
  spec.head_dim = 8;
  spec.cache_dtype = DType::kBF16;
  absl::StatusOr<CreatedSession> s = client_->CreateSession(spec);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->block_tokens, 16);
  {
    absl::MutexLock lock(&service_.mu_);
    EXPECT_EQ(service_.sessions_[s->session_id].dtype, v1::BF16);
  }

  const Tensor q = RandomTensor(DType::kF32, {3, 4, 8}, 1);
  const Tensor kv = RandomTensor(DType::kF32, {3, 2, 8}, 2);
  DecodeStep step{q.view(), kv.view(), kv.view(), {}, false};
  CallOptions call;
  call.request_id = "r1";
  absl::StatusOr<DecodeResult> r = client_->Decode(s->session_id, step, call);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->request_id, "r1");
  EXPECT_EQ(r->context_tokens, 3);
  EXPECT_EQ(r->output.shape, q.shape);
  EXPECT_EQ(r->output.data, q.data);
  EXPECT_FALSE(r->lse.has_value());
  r = client_->Decode(s->session_id, step);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->context_tokens, 6);

  ASSERT_TRUE(client_->CloseSession(s->session_id).ok());
  EXPECT_EQ(client_->Decode(s->session_id, step).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->CloseSession(s->session_id).code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionLoadTest, LayersForkAndBatchDecodeRoundTrip) {
  SessionSpec spec;
  spec.num_kv_heads = 2;
  spec.head_dim = 8;
  spec.num_layers = 2;
  spec.rotary.emplace();
  spec.rotary->set_rotary_dim(4);
  spec.rotary->set_scaling(v1::RotaryEmbedding::NTK);
  spec.rotary->set_factor(2.f);
  spec.window_tokens = 64;
  absl::StatusOr<CreatedSession> parent = client_->CreateSession(spec);
  ASSERT_TRUE(parent.ok()) << parent.status();
  EXPECT_EQ(parent->num_layers, 2);
  {
    absl::MutexLock lock(&service_.mu_);
    EXPECT_EQ(service_.last_create_.num_layers(), 2);
    EXPECT_EQ(service_.last_create_.rotary().rotary_dim(), 4);
    EXPECT_EQ(service_.last_create_.rotary().scaling(), v1::RotaryEmbedding::NTK);
    EXPECT_EQ(service_.last_create_.window_tokens(), 64);
  }

  const Tensor q = RandomTensor(DType::kF32, {1, 4, 8}, 1);
  const Tensor kv3 = RandomTensor(DType::kF32, {3, 2, 8}, 2);
  const Tensor kv1 = RandomTensor(DType::kF32, {1, 2, 8}, 3);
  DecodeStep step{q.view(), kv3.view(), kv3.view(), {}, false};
  for (int32_t layer : {0, 1}) {
    step.layer = layer;
    step.expected_context_tokens = 0;
    absl::StatusOr<DecodeResult> r = client_->Decode(parent->session_id, step);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->context_tokens, 3);
  }
  // The server checks expected_context_tokens against the layer's cache.
  step.layer = 0;
  step.expected_context_tokens = 0;
  EXPECT_EQ(client_->Decode(parent->session_id, step).status().code(),
            absl::StatusCode::kFailedPrecondition);

  absl::StatusOr<ForkedSession> fork = client_->ForkSession(parent->session_id, 2);
  ASSERT_TRUE(fork.ok()) << fork.status();
  EXPECT_EQ(fork->context_tokens, 2);
  EXPECT_EQ(fork->shared_tokens, 0);
  EXPECT_EQ(client_->ForkSession(parent->session_id, 4).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Layer 0 for both; the fork is first, so it is entry 0.
  DecodeStep one{q.view(), kv1.view(), kv1.view(), {}, false};
  std::vector<SessionStep> steps = {{fork->session_id, one}, {parent->session_id, one}};
  steps[0].step.expected_context_tokens = 2;
  steps[1].step.expected_context_tokens = 3;
  absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> results =
      client_->BatchDecode(0, steps);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 2u);
  ASSERT_TRUE((*results)[0].ok()) << (*results)[0].status();
  ASSERT_TRUE((*results)[1].ok()) << (*results)[1].status();
  EXPECT_EQ((*results)[0]->context_tokens, 3);
  EXPECT_EQ((*results)[1]->context_tokens, 4);
  EXPECT_EQ((*results)[1]->output.data, q.data);
  EXPECT_EQ((*results)[0]->timing.batch_size, 2);
  {
    absl::MutexLock lock(&service_.mu_);
    EXPECT_EQ(service_.last_batch_.layer(), 0);
    ASSERT_EQ(service_.last_batch_.entries_size(), 2);
    EXPECT_EQ(service_.last_batch_.entries(0).session_id(), fork->session_id);
    EXPECT_EQ(service_.last_batch_.entries(0).expected_context_tokens(), 2);
    EXPECT_EQ(service_.last_batch_.entries(1).session_id(), parent->session_id);
  }

  // Layer 1 for the parent only, then layer 1 again: the second entry fails
  // alone (out of order), the first succeeds.
  const std::string fork_id = fork->session_id;
  steps = {{fork_id, one}, {parent->session_id, one}};
  results = client_->BatchDecode(1, steps);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_TRUE((*results)[0].ok());
  EXPECT_TRUE((*results)[1].ok());
  steps = {{"nope", one}, {parent->session_id, one}};
  results = client_->BatchDecode(1, steps);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_EQ((*results)[0].status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*results)[1].status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT((*results)[1].status().message(), HasSubstr("entries[1]"));

  // A failure of the whole call is the outer status.
  CallOptions fail;
  fail.backend = "fail";
  EXPECT_EQ(client_->BatchDecode(0, steps, fail).status().code(),
            absl::StatusCode::kResourceExhausted);

  // The async form answers once, with the response.
  absl::StatusOr<v1::BatchDecodeRequest> request = ToProto(0, {{fork_id, one}}, {});
  ASSERT_TRUE(request.ok());
  absl::Notification done;
  absl::StatusOr<v1::BatchDecodeResponse> async_response;
  client_->BatchDecodeAsync(*request, [&](absl::StatusOr<v1::BatchDecodeResponse> r) {
    async_response = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  ASSERT_TRUE(async_response.ok()) << async_response.status();
  ASSERT_EQ(async_response->results_size(), 1);
  EXPECT_EQ(async_response->results(0).context_tokens(), 4) << "3 after two layers, + 1";
}

TEST_F(SessionLoadTest, ModelSessionStepsEveryLayerInOneBatchDecode) {
  SessionSpec spec;
  spec.num_kv_heads = 2;
  spec.head_dim = 8;
  spec.num_layers = 3;
  absl::StatusOr<std::unique_ptr<ModelSession>> model =
      ModelSession::Create(client_.get(), 2, spec);
  ASSERT_TRUE(model.ok()) << model.status();
  ModelSession& m = **model;
  EXPECT_EQ(m.num_sequences(), 2);
  EXPECT_EQ(m.num_layers(), 3);

  const Tensor q = RandomTensor(DType::kF32, {1, 4, 8}, 1);
  const Tensor kv4 = RandomTensor(DType::kF32, {4, 2, 8}, 2);
  const Tensor kv1 = RandomTensor(DType::kF32, {1, 2, 8}, 3);
  const std::vector<SequenceStep> prefill(2, SequenceStep{q.view(), kv4.view(), kv4.view()});
  for (int32_t layer = 0; layer < 3; ++layer) {
    absl::StatusOr<std::vector<Tensor>> out = m.StepLayer(layer, prefill);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->size(), 2u);
    EXPECT_EQ((*out)[1].data, q.data);
  }
  EXPECT_EQ(m.tokens(0, 2), 4);
  {
    absl::MutexLock lock(&service_.mu_);
    EXPECT_EQ(service_.batch_calls_, 3) << "one BatchDecode per layer-step";
    EXPECT_EQ(service_.decode_calls_, 0);
    EXPECT_EQ(service_.last_batch_.layer(), 2);
    EXPECT_EQ(service_.last_batch_.entries(1).session_id(), m.session_id(1));
    EXPECT_EQ(service_.last_batch_.entries(1).expected_context_tokens(), 0);
  }

  // A fork continues from the shared prefix in every layer.
  absl::StatusOr<int> fork = m.Fork(0, 3);
  ASSERT_TRUE(fork.ok()) << fork.status();
  EXPECT_EQ(*fork, 2);
  EXPECT_EQ(m.tokens(2, 1), 3);
  EXPECT_EQ(m.Fork(7, 1).status().code(), absl::StatusCode::kInvalidArgument);

  const std::vector<SequenceStep> decode(3, SequenceStep{q.view(), kv1.view(), kv1.view()});
  absl::StatusOr<std::vector<Tensor>> out = m.StepLayer(0, decode);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(m.tokens(0, 0), 5);
  EXPECT_EQ(m.tokens(2, 0), 4);
  {
    absl::MutexLock lock(&service_.mu_);
    ASSERT_EQ(service_.last_batch_.entries_size(), 3);
    EXPECT_EQ(service_.last_batch_.entries(0).expected_context_tokens(), 4);
    EXPECT_EQ(service_.last_batch_.entries(2).expected_context_tokens(), 3);
  }

  // Skipping layer 1 fails every entry; the error names the first sequence.
  out = m.StepLayer(2, decode);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(out.status().message(),
              HasSubstr(absl::StrCat("sequence 0 (session ", m.session_id(0), ")")));
  EXPECT_EQ(m.StepLayer(1, prefill).status().code(), absl::StatusCode::kInvalidArgument)
      << "one step per sequence";
  EXPECT_EQ(m.StepLayer(3, decode).status().code(), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(m.Close().ok());
  EXPECT_EQ(m.num_sequences(), 0);
  absl::MutexLock lock(&service_.mu_);
  EXPECT_TRUE(service_.sessions_.empty());
}

TEST_F(SessionLoadTest, ModelSessionClosesWhatItOpenedOnFailureAndDestruction) {
  {
    absl::MutexLock lock(&service_.mu_);
    service_.create_limit_ = 2;
  }
  SessionSpec spec;
  spec.num_kv_heads = 2;
  spec.head_dim = 8;
  absl::StatusOr<std::unique_ptr<ModelSession>> model =
      ModelSession::Create(client_.get(), 3, spec);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(model.status().message(), HasSubstr("sequence 2"));
  {
    absl::MutexLock lock(&service_.mu_);
    EXPECT_TRUE(service_.sessions_.empty());
    service_.create_limit_ = 1 << 30;
  }
  model = ModelSession::Create(client_.get(), 2, spec);
  ASSERT_TRUE(model.ok()) << model.status();
  model->reset();
  absl::MutexLock lock(&service_.mu_);
  EXPECT_TRUE(service_.sessions_.empty());
}

TEST_F(SessionLoadTest, PrefillsInChunksThenStepsEachSessionOneAtATime) {
  const SessionLoadOptions o = SmallOptions();
  absl::StatusOr<SessionLoadReport> report = RunSessionLoad({client_.get()}, o);
  ASSERT_TRUE(report.ok()) << report.status();

  // 128 bytes per token; chunks keep under half of 40 KiB with the query.
  const int64_t chunk = (FakeSessionService::kMaxRequestBytes / 2 - 4 * 8 * 4) / 128;
  EXPECT_EQ(report->prefill_tokens, 6 * 1000);
  EXPECT_EQ(report->prefill_calls, 6 * ((1000 + chunk - 1) / chunk));
  EXPECT_GT(report->latency.ok, 0);
  EXPECT_TRUE(report->latency.errors.empty());
  EXPECT_EQ(report->sent, report->latency.ok);
  EXPECT_GT(report->tokens_per_s, 0);
  EXPECT_DOUBLE_EQ(report->tokens_per_s, report->steps_per_s);
  EXPECT_GT(report->context_tokens_max, 1000);
  EXPECT_FALSE(report->interrupted);
  EXPECT_EQ(report->close_errors, 0);

  absl::MutexLock lock(&service_.mu_);
  EXPECT_LE(service_.max_message_bytes_, FakeSessionService::kMaxRequestBytes / 2 + 256);
  EXPECT_EQ(service_.overlaps_, 0);
  EXPECT_EQ(service_.max_running_, 3);
  EXPECT_TRUE(service_.sessions_.empty()) << "every session is closed at the end";
  ASSERT_EQ(service_.closed_steps_.size(), 6u);
  // Round-robin: each session stepped (prefill calls aside) about equally.
  const auto [fewest, most] =
      std::minmax_element(service_.closed_steps_.begin(), service_.closed_steps_.end());
  EXPECT_GT(*fewest, (1000 + chunk - 1) / chunk);
  EXPECT_LE(*most - *fewest, 2);
}

TEST_F(SessionLoadTest, DecodeTokensPerStepCountInTokensPerSecond) {
  SessionLoadOptions o = SmallOptions();
  o.context_tokens = 0;
  o.decode_tokens = 3;
  absl::StatusOr<SessionLoadReport> report = RunSessionLoad({client_.get()}, o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->prefill_calls, 0);
  EXPECT_NEAR(report->tokens_per_s, 3 * report->steps_per_s, 1e-9);
  EXPECT_EQ(report->context_tokens_max % 3, 0);
}

TEST_F(SessionLoadTest, PrefillFailureClosesTheOpenedSessions) {
  {
    absl::MutexLock lock(&service_.mu_);
    service_.create_limit_ = 4;
  }
  absl::StatusOr<SessionLoadReport> report = RunSessionLoad({client_.get()}, SmallOptions());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(report.status().message(), HasSubstr("CreateSession"));
  absl::MutexLock lock(&service_.mu_);
  EXPECT_TRUE(service_.sessions_.empty());
  EXPECT_EQ(service_.closed_steps_.size(), 4u);
}

TEST_F(SessionLoadTest, InterruptStopsEarlyAndCloses) {
  SessionLoadOptions o = SmallOptions();
  o.duration = absl::Seconds(60);
  std::atomic<bool> interrupted{false};
  o.interrupted = &interrupted;
  std::thread interrupter([&interrupted] {
    absl::SleepFor(absl::Milliseconds(300));
    interrupted.store(true);
  });
  const absl::Time start = absl::Now();
  absl::StatusOr<SessionLoadReport> report = RunSessionLoad({client_.get()}, o);
  interrupter.join();
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_TRUE(report->interrupted);
  absl::MutexLock lock(&service_.mu_);
  EXPECT_TRUE(service_.sessions_.empty());
}

TEST_F(SessionLoadTest, ModelShapedLoadStepsLayersInOrderBatchedOrNot) {
  for (bool batched : {false, true}) {
    SCOPED_TRACE(batched ? "batched" : "one Decode per session");
    SessionLoadOptions o = SmallOptions();
    o.context_tokens = 40;
    o.layers = 3;
    o.batched = batched;
    o.concurrency = 4;  // of 6 sessions: the layer-step waits for the last two
    absl::StatusOr<SessionLoadReport> report = RunSessionLoad({client_.get()}, o);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_TRUE(report->latency.errors.empty());
    EXPECT_EQ(report->sessions_dropped, 0);
    // Whole-model tokens: every session, every token through all 3 layers.
    EXPECT_GT(report->tokens, 0);
    EXPECT_EQ(report->tokens % 6, 0);
    EXPECT_EQ(report->latency.ok, report->tokens * 3);
    EXPECT_EQ(report->layer_steps, report->tokens / 6 * 3);
    EXPECT_NEAR(report->tokens_per_s, report->tokens / report->elapsed_s, 1e-6);
    EXPECT_GT(report->layer_p50_ms, 0);
    EXPECT_LE(report->layer_p50_ms, report->layer_p99_ms);
    EXPECT_EQ(report->prefill_tokens, 6 * 40);
    EXPECT_EQ(report->context_tokens_max, 40 + report->tokens / 6);

    absl::MutexLock lock(&service_.mu_);
    EXPECT_EQ(service_.out_of_order_, 0);
    EXPECT_EQ(service_.stale_, 0);
    EXPECT_EQ(service_.layer_overlaps_, 0);
    EXPECT_EQ(service_.last_create_.num_layers(), 3);
    if (batched) {
      EXPECT_EQ(service_.batch_calls_, report->layer_steps);
      EXPECT_THAT(service_.batch_sizes_, ::testing::Each(6));
    } else {
      EXPECT_EQ(service_.batch_calls_, 0);
      EXPECT_LE(service_.max_running_, 4);
    }
    EXPECT_TRUE(service_.sessions_.empty());
    service_.batch_calls_ = 0;
    service_.batch_sizes_.clear();
  }
}

TEST_F(SessionLoadTest, ModelShapedLoadDropsSessionsWhoseStepFails) {
  SessionLoadOptions o = SmallOptions();
  o.context_tokens = 0;
  o.layers = 2;
  o.batched = true;
  o.duration = absl::Seconds(5);
  std::atomic<bool> interrupted{false};
  o.interrupted = &interrupted;
  std::thread closer([&] {
    // Closes one session behind the run's back once it is decoding.
    absl::SleepFor(absl::Milliseconds(100));
    {
      absl::MutexLock lock(&service_.mu_);
      service_.sessions_.erase("s3");
    }
    absl::SleepFor(absl::Milliseconds(100));
    interrupted.store(true);
  });
  absl::StatusOr<SessionLoadReport> report = RunSessionLoad({client_.get()}, o);
  closer.join();
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->interrupted);
  EXPECT_EQ(report->sessions_dropped, 1);
  EXPECT_EQ(report->latency.errors.at("NOT_FOUND"), 1);
  EXPECT_EQ(report->close_errors, 1);
}

TEST(SessionLoadOptionsTest, RejectsOutOfRange) {
  SessionLoadOptions o;
  o.sessions = 2;
  o.concurrency = 3;
  EXPECT_THAT(ValidateSessionLoadOptions(o).message(), HasSubstr("concurrency"));
  o.concurrency = 2;
  o.heads_q = 12;
  o.heads_kv = 8;
  EXPECT_THAT(ValidateSessionLoadOptions(o).message(), HasSubstr("hq"));
  o.heads_q = 32;
  o.context_tokens = -1;
  EXPECT_THAT(ValidateSessionLoadOptions(o).message(), HasSubstr("context"));
  o.context_tokens = 0;
  o.decode_tokens = 0;
  EXPECT_THAT(ValidateSessionLoadOptions(o).message(), HasSubstr("decode_tokens"));
  o.decode_tokens = 1;
  o.cache_dtype = DType::kI32;
  EXPECT_THAT(ValidateSessionLoadOptions(o).message(), HasSubstr("cache_dtype"));
  o.cache_dtype = DType::kBF16;
  EXPECT_TRUE(ValidateSessionLoadOptions(o).ok());
  o.layers = 0;
  EXPECT_THAT(ValidateSessionLoadOptions(o).message(), HasSubstr("layers: expected >= 1, got 0"));
  o.layers = 32;
  o.batched = true;
  EXPECT_TRUE(o.model_shaped());
  EXPECT_TRUE(ValidateSessionLoadOptions(o).ok());
  o.layers = 1;
  EXPECT_TRUE(o.model_shaped()) << "--batched alone is a one-layer model";
  o.batched = false;
  EXPECT_FALSE(o.model_shaped());
}

}  // namespace
}  // namespace attnserve::client
