// AttnClient's session calls and RunSessionLoad (attnctl bench --sessions)
// against an in-process fake of the session RPCs, on an ephemeral port. The
// fake refuses overlapping steps of one session (ABORTED, as attnserve does)
// and records message sizes and how many steps ran at once.
#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/client.h"
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
    sessions_[id] = State{request->num_kv_heads(), request->dtype()};
    response->set_session_id(id);
    response->set_capacity_tokens(1 << 20);
    response->set_block_tokens(16);
    return grpc::Status::OK;
  }

  // Appends the key's tokens and echoes the query as the output.
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
    }
    // Long enough that overlapping steps of one session would be seen.
    absl::SleepFor(absl::Milliseconds(2));
    absl::MutexLock lock(&mu_);
    State& s = sessions_[request->session_id()];
    s.tokens += request->key().shape(0);
    ++s.steps;
    s.busy = false;
    --running_;
    response->set_request_id(request->request_id());
    *response->mutable_output() = request->query();
    response->set_context_tokens(s.tokens);
    response->mutable_timing()->set_batch_size(1);
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
    int64_t tokens = 0;
    int64_t steps = 0;
    bool busy = false;
  };

  absl::Mutex mu_;
  int create_limit_ ABSL_GUARDED_BY(mu_) = 1 << 30;
  int created_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, State> sessions_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> closed_steps_ ABSL_GUARDED_BY(mu_);  // steps of each closed session
  int64_t max_message_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t overlaps_ ABSL_GUARDED_BY(mu_) = 0;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  int max_running_ ABSL_GUARDED_BY(mu_) = 0;
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
}

}  // namespace
}  // namespace attnserve::client
