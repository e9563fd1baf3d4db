// AttnClient, AttendStream and the load generator against an in-process fake
// attnserve (echoing the query as the output), on an ephemeral loopback port;
// AttendLayer and model sessions against the same fake (echoing the hidden
// states as y).
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/load_generator.h"
#include "client/model_session.h"
#include "client/shapes.h"

namespace attnserve::client {
namespace {

using ::testing::HasSubstr;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

// Echoes the query as the output. backend "slow" waits 300 ms first; backend
// "fail" answers RESOURCE_EXHAUSTED. On AttendStream, ids starting with
// "hold" wait until a request "release" arrives, then come back after it in
// reverse order; the first failing request ends the stream, as attnserve does.
class FakeAttentionService final : public v1::AttentionService::Service {
 public:
  grpc::Status Attend(grpc::ServerContext* context, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override {
    if (request->query().dtype() == v1::DTYPE_UNSPECIFIED) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "query.dtype: expected F32, F16 or BF16, got DTYPE_UNSPECIFIED");
    }
    if (request->backend() == "slow") {
      const absl::Time until = absl::Now() + absl::Milliseconds(300);
      while (absl::Now() < until && !context->IsCancelled()) absl::SleepFor(absl::Milliseconds(5));
    }
    if (request->backend() == "fail") {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full");
    }
    Echo(*request, response);
    return grpc::Status::OK;
  }

  grpc::Status AttendStream(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::AttendResponse, v1::AttendRequest>* stream) override {
    v1::AttendRequest request;
    std::vector<v1::AttendRequest> held;
    while (stream->Read(&request)) {
      if (request.backend() == "fail" || request.request_id() == "fail") {
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            absl::StrCat("request_id '", request.request_id(), "': queue full"));
      }
      if (absl::StartsWith(request.request_id(), "hold")) {
        held.push_back(request);
        continue;
      }
      v1::AttendResponse response;
      Echo(request, &response);
      stream->Write(response);
      if (request.request_id() == "release") {
        for (auto it = held.rbegin(); it != held.rend(); ++it) {
          Echo(*it, &response);
          stream->Write(response);
        }
        held.clear();
      }
    }
    return grpc::Status::OK;
  }

  grpc::Status GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                             v1::ServerInfo* info) override {
    info->set_version("fake-1");
    info->set_default_backend("echo");
    return grpc::Status::OK;
  }

  // The one model, kModel (kModelLayers layers): AttendLayer echoes x as y,
  // with an lse of zeros [B, 1, L] when asked; other models are NOT_FOUND.
  static constexpr char kModel[] = "tiny";
  static constexpr int kModelLayers = 2;

  grpc::Status AttendLayer(grpc::ServerContext*, const v1::AttendLayerRequest* request,
                           v1::AttendLayerResponse* response) override {
    {
      absl::MutexLock lock(&mu_);
      last_layer_request_ = *request;
    }
    if (request->model() != kModel) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("model: expected one of the loaded models tiny, got \"",
                                       request->model(), "\""));
    }
    response->set_request_id(request->request_id());
    *response->mutable_y() = request->x();
    if (request->outputs().lse() && request->x().shape_size() == 3) {
      v1::Tensor* lse = response->mutable_lse();
      lse->set_dtype(v1::F32);
      lse->add_shape(request->x().shape(0));
      lse->add_shape(1);
      lse->add_shape(request->x().shape(1));
      lse->set_data(std::string(request->x().shape(0) * request->x().shape(1) * 4, '\0'));
    }
    response->set_backend("echo");
    response->mutable_timing()->set_compute_us(9);
    return grpc::Status::OK;
  }

  // Sessions: a model session (of kModel only) has its layers; Decode and
  // BatchDecode echo each step's hidden states (or query) as its output and
  // count its rows as appended tokens.
  grpc::Status CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest* request,
                             v1::CreateSessionResponse* response) override {
    absl::MutexLock lock(&mu_);
    last_create_ = *request;
    if (!request->model().empty() && request->model() != kModel) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "model: not loaded");
    }
    response->set_session_id(absl::StrCat("s", ++sessions_created_));
    response->set_num_layers(request->model().empty() ? std::max(request->num_layers(), 1)
                                                      : kModelLayers);
    return grpc::Status::OK;
  }

  grpc::Status CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest*,
                            v1::CloseSessionResponse*) override {
    return grpc::Status::OK;
  }

  grpc::Status Decode(grpc::ServerContext*, const v1::DecodeRequest* request,
                      v1::DecodeResponse* response) override {
    {
      absl::MutexLock lock(&mu_);
      last_decode_ = *request;
    }
    const v1::Tensor& input = request->has_hidden() ? request->hidden() : request->query();
    *response->mutable_output() = input;
    response->set_context_tokens(request->expected_context_tokens() + input.shape(0));
    return grpc::Status::OK;
  }

  grpc::Status BatchDecode(grpc::ServerContext*, const v1::BatchDecodeRequest* request,
                           v1::BatchDecodeResponse* response) override {
    {
      absl::MutexLock lock(&mu_);
      last_batch_ = *request;
    }
    for (const v1::BatchDecodeEntry& entry : request->entries()) {
      const v1::Tensor& input = entry.has_hidden() ? entry.hidden() : entry.query();
      v1::BatchDecodeResult* result = response->add_results();
      *result->mutable_output() = input;
      result->set_context_tokens(entry.expected_context_tokens() + input.shape(0));
    }
    return grpc::Status::OK;
  }

  v1::AttendLayerRequest last_layer_request() {
    absl::MutexLock lock(&mu_);
    return last_layer_request_;
  }
  v1::CreateSessionRequest last_create() {
    absl::MutexLock lock(&mu_);
    return last_create_;
  }
  v1::DecodeRequest last_decode() {
    absl::MutexLock lock(&mu_);
    return last_decode_;
  }
  v1::BatchDecodeRequest last_batch() {
    absl::MutexLock lock(&mu_);
    return last_batch_;
  }

 private:
  absl::Mutex mu_;
  v1::AttendLayerRequest last_layer_request_ ABSL_GUARDED_BY(mu_);
  v1::CreateSessionRequest last_create_ ABSL_GUARDED_BY(mu_);
  v1::DecodeRequest last_decode_ ABSL_GUARDED_BY(mu_);
  v1::BatchDecodeRequest last_batch_ ABSL_GUARDED_BY(mu_);
  int sessions_created_ ABSL_GUARDED_BY(mu_) = 0;

  static void Echo(const v1::AttendRequest& request, v1::AttendResponse* response) {
    response->set_request_id(request.request_id());
    *response->mutable_output() = request.query();
    response->set_backend("echo");
    response->mutable_timing()->set_batch_size(1);
    response->mutable_timing()->set_compute_us(7);
  }
};

class FakeHealthService final : public grpc::health::v1::Health::Service {
 public:
  grpc::Status Check(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest* request,
                     HealthResponse* response) override {
    if (!request->service().empty() && request->service() != "attnserve.v1.AttentionService") {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service");
    }
    response->set_status(status.load());
    return grpc::Status::OK;
  }

  std::atomic<HealthResponse::ServingStatus> status{HealthResponse::SERVING};
};

class FakeServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    builder.RegisterService(&health_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    absl::StatusOr<std::unique_ptr<AttnClient>> client =
        AttnClient::Create(absl::StrCat("127.0.0.1:", port));
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);

    query_ = RandomTensor(DType::kF32, {1, 4, 2, 8}, 1);
    key_ = RandomTensor(DType::kF32, {1, 6, 2, 8}, 2);
    request_.query = query_.view();
    request_.key = key_.view();
    request_.value = key_.view();
  }

  void TearDown() override {
    client_.reset();
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  }

  static CallOptions Call(std::string id, std::string backend = "",
                          absl::Duration deadline = absl::ZeroDuration()) {
    CallOptions call;
    call.request_id = std::move(id);
    call.backend = std::move(backend);
    call.deadline = deadline;
    return call;
  }

  v1::AttendRequest WireRequest(std::string id, std::string backend = "") {
    return ToProto(request_, Call(std::move(id), std::move(backend)));
  }

  FakeAttentionService service_;
  FakeHealthService health_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<AttnClient> client_;
  Tensor query_, key_;
  AttentionRequest request_;
};

TEST_F(FakeServerTest, CreateRejectsBadOptions) {
  EXPECT_EQ(AttnClient::Create("").status().code(), absl::StatusCode::kInvalidArgument);
  ClientOptions o;
  o.max_message_bytes = 0;
  EXPECT_THAT(AttnClient::Create("localhost:1", o).status().message(),
              HasSubstr("max_message_bytes"));
}

TEST_F(FakeServerTest, AttendReturnsOwnedOutputs) {
  absl::StatusOr<AttendResult> r = client_->Attend(request_, Call("a"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->request_id, "a");
  EXPECT_EQ(r->backend, "echo");
  EXPECT_EQ(r->output.shape, query_.shape);
  EXPECT_EQ(r->output.data, query_.data);
  EXPECT_EQ(r->timing.compute_us, 7);
}

TEST_F(FakeServerTest, ServerErrorsAndDeadlinesBecomeAbslStatus) {
  v1::AttendRequest bad = WireRequest("b");
  bad.mutable_query()->set_dtype(v1::DTYPE_UNSPECIFIED);
  absl::StatusOr<v1::AttendResponse> r = client_->Attend(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("query.dtype"));

  absl::StatusOr<AttendResult> slow =
      client_->Attend(request_, Call("s", "slow", absl::Milliseconds(50)));
  EXPECT_EQ(slow.status().code(), absl::StatusCode::kDeadlineExceeded);

  // The channel still works afterwards.
  EXPECT_TRUE(client_->Attend(request_).ok());
}

TEST_F(FakeServerTest, ServerInfoAndHealth) {
  absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->version(), "fake-1");

  EXPECT_EQ(client_->CheckHealth().value(), ServingStatus::kServing);
  EXPECT_EQ(client_->CheckHealth("attnserve.v1.AttentionService").value(),
            ServingStatus::kServing);
  EXPECT_EQ(client_->CheckHealth("other").value(), ServingStatus::kServiceUnknown);
  health_.status = HealthResponse::NOT_SERVING;
  EXPECT_EQ(client_->CheckHealth().value(), ServingStatus::kNotServing);
  EXPECT_EQ(client_->WaitForServing(absl::Milliseconds(200)).code(),
            absl::StatusCode::kDeadlineExceeded);

  std::thread flip([this] {
    absl::SleepFor(absl::Milliseconds(150));
    health_.status = HealthResponse::SERVING;
  });
  EXPECT_TRUE(client_->WaitForServing(absl::Seconds(5)).ok());
  flip.join();
}

TEST_F(FakeServerTest, AttendAsyncRunsEveryCallbackOnce) {
  constexpr int kCalls = 64;
  const v1::AttendRequest request = WireRequest("async");
  absl::BlockingCounter pending(kCalls);
  std::atomic<int> ok{0};
  for (int i = 0; i < kCalls; ++i) {
    client_->AttendAsync(request, [&](absl::StatusOr<v1::AttendResponse> r) {
      if (r.ok() && r->output().data() == query_.data) ok.fetch_add(1);
      pending.DecrementCount();
    });
  }
  pending.Wait();
  EXPECT_EQ(ok.load(), kCalls);
}

TEST_F(FakeServerTest, StreamMatchesOutOfOrderResponsesById) {
  std::unique_ptr<AttendStream> stream = client_->OpenStream();
  const v1::AttendRequest a = WireRequest("hold-a");
  const v1::AttendRequest b = WireRequest("hold-b");
  const v1::AttendRequest release = WireRequest("release");
  absl::Mutex mu;
  std::vector<std::string> order;
  absl::BlockingCounter pending(3);
  auto expect_id = [&](std::string id) {
    return [&, id](absl::StatusOr<v1::AttendResponse> r) {
      EXPECT_TRUE(r.ok()) << r.status();
      if (r.ok()) {
        EXPECT_EQ(r->request_id(), id);
      }
      {
        absl::MutexLock lock(&mu);
        order.push_back(id);
      }
      pending.DecrementCount();
    };
  };
  ASSERT_TRUE(stream->Send(&a, expect_id("hold-a")).ok());
  ASSERT_TRUE(stream->Send(&b, expect_id("hold-b")).ok());
  ASSERT_TRUE(stream->Send(&release, expect_id("release")).ok());
  pending.Wait();
  EXPECT_EQ(stream->outstanding(), 0);
  EXPECT_TRUE(stream->Finish().ok());
  // The server answered in the order release, hold-b, hold-a; callbacks may
  // run concurrently, so only the matching by id is checked.
  EXPECT_THAT(order, ::testing::UnorderedElementsAre("release", "hold-b", "hold-a"));
}

TEST_F(FakeServerTest, StreamRejectsDuplicateIdsAndFailsPendingWhenTheStreamEnds) {
  std::unique_ptr<AttendStream> stream = client_->OpenStream();
  const v1::AttendRequest held = WireRequest("hold-1");
  const v1::AttendRequest fail = WireRequest("fail");
  absl::BlockingCounter pending(2);
  std::vector<absl::Status> statuses(2);
  ASSERT_TRUE(stream
                  ->Send(&held,
                         [&](absl::StatusOr<v1::AttendResponse> r) {
                           statuses[0] = r.status();
                           pending.DecrementCount();
                         })
                  .ok());
  bool duplicate_called = false;
  absl::Status duplicate = stream->Send(
      &held, [&](absl::StatusOr<v1::AttendResponse>) { duplicate_called = true; });
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(duplicate.message(), HasSubstr("hold-1"));

  ASSERT_TRUE(stream
                  ->Send(&fail,
                         [&](absl::StatusOr<v1::AttendResponse> r) {
                           statuses[1] = r.status();
                           pending.DecrementCount();
                         })
                  .ok());
  pending.Wait();
  EXPECT_EQ(statuses[0].code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(stream->Finish().code(), absl::StatusCode::kResourceExhausted);

  EXPECT_EQ(stream->Send(&held, [&](absl::StatusOr<v1::AttendResponse>) { duplicate_called = true; })
                .code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(duplicate_called);
}

TEST_F(FakeServerTest, DestroyingAnUnfinishedStreamCancelsIt) {
  const v1::AttendRequest held = WireRequest("hold-forever");
  absl::Status status;
  {
    std::unique_ptr<AttendStream> stream = client_->OpenStream();
    ASSERT_TRUE(
        stream->Send(&held, [&](absl::StatusOr<v1::AttendResponse> r) { status = r.status(); })
            .ok());
  }
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled);
}

TEST_F(FakeServerTest, LoadOptionsAreValidated) {
  LoadOptions o;
  o.concurrency = 0;
  EXPECT_THAT(ValidateLoadOptions(o).message(), HasSubstr("concurrency"));
  o = LoadOptions();
  o.duration = absl::ZeroDuration();
  EXPECT_THAT(ValidateLoadOptions(o).message(), HasSubstr("duration"));
  o = LoadOptions();
  o.rate_qps = -1;
  EXPECT_THAT(ValidateLoadOptions(o).message(), HasSubstr("rate"));
  EXPECT_FALSE(RunLoad({}, WireRequest(""), LoadOptions()).ok());
}

TEST_F(FakeServerTest, ClosedLoopUnaryAndStream) {
  const v1::AttendRequest request = WireRequest("");
  for (bool stream : {false, true}) {
    SCOPED_TRACE(stream ? "stream" : "unary");
    LoadOptions o;
    o.concurrency = 4;
    o.stream = stream;
    o.streams = 2;
    o.duration = absl::Milliseconds(300);
    int progress_calls = 0;
    o.progress_interval = absl::Milliseconds(100);
    absl::StatusOr<LoadReport> r = RunLoad({client_.get()}, request, o,
                                           [&](const LoadProgress&) { ++progress_calls; });
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_GT(r->latency.ok, 0);
    EXPECT_EQ(r->latency.errors_total, 0);
    EXPECT_EQ(r->sent, r->latency.ok);
    EXPECT_GT(r->qps, 0);
    EXPECT_LE(r->latency.p50_ms, r->latency.p99_ms);
    EXPECT_DOUBLE_EQ(r->latency.server_batch_size, 1);
    EXPECT_GE(progress_calls, 1);
  }
}

TEST_F(FakeServerTest, OpenLoopSendsAtTheRequestedRate) {
  LoadOptions o;
  o.rate_qps = 400;
  o.duration = absl::Milliseconds(500);
  absl::StatusOr<LoadReport> r = RunLoad({client_.get()}, WireRequest(""), o);
  ASSERT_TRUE(r.ok()) << r.status();
  // Poisson arrivals: 200 expected, standard deviation ~14.
  EXPECT_GT(r->sent, 130);
  EXPECT_LT(r->sent, 270);
  EXPECT_EQ(r->latency.ok, r->sent);
}

TEST_F(FakeServerTest, ErrorsAreCountedByCodeAndStreamsReopen) {
  for (bool stream : {false, true}) {
    SCOPED_TRACE(stream ? "stream" : "unary");
    LoadOptions o;
    o.concurrency = 2;
    o.stream = stream;
    o.duration = absl::Seconds(1);
    absl::StatusOr<LoadReport> r = RunLoad({client_.get()}, WireRequest("", "fail"), o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->latency.ok, 0);
    // More errors than calls in flight: on a stream, only after reopening it.
    EXPECT_GT(r->latency.errors.at("RESOURCE_EXHAUSTED"), 2);
    EXPECT_EQ(r->latency.errors.size(), 1u);
  }
}

TEST_F(FakeServerTest, AttendLayerSendsEveryFieldAndOwnsTheResult) {
  const Tensor x = RandomTensor(DType::kF16, {2, 3, 8}, 3);
  const Tensor memory = RandomTensor(DType::kF16, {2, 5, 8}, 4);
  LayerRequest request;
  request.model = "tiny";
  request.layer = 1;
  request.x = x.view();
  request.memory = memory.view();
  request.positions = {4, 5, 9};
  request.causal = false;
  request.options.scale = 0.25f;
  request.options.window_left = 2;
  request.key_lengths = {5, 3};
  request.outputs.lse = true;
  request.outputs.top_k = 2;
  absl::StatusOr<LayerResult> r = client_->AttendLayer(request, Call("layer-1", "cpu"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->request_id, "layer-1");
  EXPECT_EQ(r->backend, "echo");
  EXPECT_EQ(r->timing.compute_us, 9);
  EXPECT_EQ(r->y.dtype, DType::kF16);
  EXPECT_EQ(r->y.shape, x.shape);
  EXPECT_EQ(r->y.data, x.data);
  ASSERT_TRUE(r->lse.has_value());
  EXPECT_EQ(r->lse->shape, (std::vector<int64_t>{2, 1, 3}));
  EXPECT_FALSE(r->weights.has_value());
  EXPECT_FALSE(r->entropy.has_value());

  const v1::AttendLayerRequest sent = service_.last_layer_request();
  EXPECT_EQ(sent.model(), "tiny");
  EXPECT_EQ(sent.layer(), 1);
  EXPECT_EQ(sent.x().dtype(), v1::F16);
  EXPECT_THAT(sent.x().shape(), ::testing::ElementsAre(2, 3, 8));
  EXPECT_EQ(sent.memory().data(), memory.data);
  EXPECT_THAT(sent.positions(), ::testing::ElementsAre(4, 5, 9));
  ASSERT_TRUE(sent.has_causal());
  EXPECT_FALSE(sent.causal());
  EXPECT_FLOAT_EQ(sent.options().scale(), 0.25f);
  EXPECT_EQ(sent.options().window_left(), 2);
  EXPECT_FALSE(sent.options().has_window_right());
  EXPECT_THAT(sent.key_lengths(), ::testing::ElementsAre(5, 3));
  EXPECT_TRUE(sent.outputs().lse());
  EXPECT_EQ(sent.outputs().top_k(), 2);
  EXPECT_EQ(sent.backend(), "cpu");

  // Unset causal and memory stay unset on the wire (the model's defaults).
  request.causal.reset();
  request.memory.reset();
  ASSERT_TRUE(client_->AttendLayer(request).ok());
  EXPECT_FALSE(service_.last_layer_request().has_causal());
  EXPECT_FALSE(service_.last_layer_request().has_memory());
}

TEST_F(FakeServerTest, AttendLayerOfAnUnknownModelIsNotFound) {
  const Tensor x = RandomTensor(DType::kF32, {3, 8}, 5);
  LayerRequest request;
  request.model = "other";
  request.x = x.view();
  absl::StatusOr<LayerResult> r = client_->AttendLayer(request);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("model"));
}

TEST_F(FakeServerTest, ModelSessionsSendHiddenStatesOnly) {
  SessionSpec spec;
  spec.model = "tiny";
  spec.cache_dtype = DType::kBF16;
  absl::StatusOr<std::unique_ptr<ModelSession>> model =
      ModelSession::Create(client_.get(), 2, spec);
  ASSERT_TRUE(model.ok()) << model.status();
  const v1::CreateSessionRequest created = service_.last_create();
  EXPECT_EQ(created.model(), "tiny");
  EXPECT_EQ(created.num_layers(), 0);  // the model's
  EXPECT_EQ(created.num_kv_heads(), 0);
  EXPECT_EQ(created.dtype(), v1::BF16);
  // The layer count is the server's answer, the model's.
  EXPECT_EQ((*model)->num_layers(), FakeAttentionService::kModelLayers);

  const Tensor a = RandomTensor(DType::kF32, {4, 8}, 6);
  const Tensor b = RandomTensor(DType::kF16, {4, 8}, 7);
  std::vector<SequenceStep> steps(2);
  steps[0].hidden = a.view();
  steps[1].hidden = b.view();
  absl::StatusOr<std::vector<Tensor>> outputs = (*model)->StepLayer(0, steps);
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  EXPECT_EQ((*outputs)[0].data, a.data);
  EXPECT_EQ((*outputs)[1].data, b.data);
  EXPECT_EQ((*model)->tokens(1, 0), 4);
  const v1::BatchDecodeRequest batch = service_.last_batch();
  ASSERT_EQ(batch.entries_size(), 2);
  for (const v1::BatchDecodeEntry& entry : batch.entries()) {
    EXPECT_TRUE(entry.has_hidden());
    EXPECT_FALSE(entry.has_query());
    EXPECT_FALSE(entry.has_key());
    EXPECT_FALSE(entry.has_value());
    EXPECT_EQ(entry.expected_context_tokens(), 0);
  }

  // A Decode of hidden states; query/key/value set beside it are sent too,
  // for the server to refuse.
  DecodeStep step;
  step.hidden = a.view();
  step.layer = 1;
  absl::StatusOr<DecodeResult> r = client_->Decode((*model)->session_id(0), step);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->output.data, a.data);
  v1::DecodeRequest sent = service_.last_decode();
  EXPECT_EQ(sent.layer(), 1);
  EXPECT_TRUE(sent.has_hidden());
  EXPECT_FALSE(sent.has_query());
  step.query = b.view();
  ASSERT_TRUE(client_->Decode((*model)->session_id(0), step).ok());
  sent = service_.last_decode();
  EXPECT_TRUE(sent.has_hidden());
  EXPECT_TRUE(sent.has_query());
  EXPECT_FALSE(sent.has_key());

  SessionSpec unknown;
  unknown.model = "other";
  EXPECT_EQ(ModelSession::Create(client_.get(), 1, unknown).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace attnserve::client
