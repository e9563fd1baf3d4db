// The attnserve Server end to end over gRPC: results against the reference
// kernel, error codes, deadlines, cancellation, streaming, drain, server info,
// health and metrics. Timing-sensitive cases use a backend gated by the test,
// so "still computing" and "still queued" are states the test controls rather
// than guesses about how long something takes.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "attention/job.h"
#include "attention/reference.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "backends/registry.h"
#include "core/half.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "tests/testing/metrics_scrape.h"
#include "server/convert.h"
#include "server/server.h"

namespace attnserve {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// Requests with this many queries block inside the gated backend until the
// test opens the gate; every other request runs at once.
constexpr int64_t kGatedLq = 7;

// The reference backend behind a gate, counting what it computed.
class GatedBackend : public Backend {
 public:
  GatedBackend() : inner_(*CreateBackend("reference")) {
    info_ = inner_->info();
    info_.name = "gated";
  }
  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams& params) const override {
    return inner_->Supports(params);
  }
  absl::Status Run(absl::Span<const AttentionParams> batch) override {
    bool gated = false;
    for (const AttentionParams& p : batch) gated |= p.seqlen_q == kGatedLq;
    if (gated) {
      absl::MutexLock lock(&mu_);
      ++blocked_;
      mu_.Await(absl::Condition(&open_));
      --blocked_;
    }
    absl::Status s = inner_->Run(batch);
    absl::MutexLock lock(&mu_);
    computed_ += static_cast<int>(batch.size());
    return s;
  }

  void Open() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }
  // Blocks until `n` batches wait at the gate.
  void AwaitBlocked(int n) {
    absl::MutexLock lock(&mu_);
    auto reached = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blocked_ >= n; };
    mu_.Await(absl::Condition(&reached));
  }
  int computed() {
    absl::MutexLock lock(&mu_);
    return computed_;
  }

 private:
  std::unique_ptr<Backend> inner_;
  BackendInfo info_;
  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  int blocked_ ABSL_GUARDED_BY(mu_) = 0;
  int computed_ ABSL_GUARDED_BY(mu_) = 0;
};

struct Dims {
  int64_t batch = 1, lq = 8, lk = 8, hq = 2, hkv = 2, d = 16;
};

v1::Tensor RandomTensor(std::mt19937& rng, v1::DType dtype, std::vector<int64_t> shape) {
  std::normal_distribution<float> normal(0.f, 1.f);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  std::string* data = t.mutable_data();
  if (dtype == v1::F32) {
    data->resize(n * 4);
    for (int64_t i = 0; i < n; ++i) {
      const float x = normal(rng);
      std::memcpy(data->data() + i * 4, &x, 4);
    }
  } else {
    data->resize(n * 2);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t h = dtype == v1::F16 ? FloatToHalf(normal(rng)) : FloatToBf16(normal(rng));
      std::memcpy(data->data() + i * 2, &h, 2);
    }
  }
  return t;
}

v1::AttendRequest MakeRequest(std::mt19937& rng, const Dims& d, v1::DType dtype = v1::F32) {
  v1::AttendRequest r;
  *r.mutable_query() = RandomTensor(rng, dtype, {d.batch, d.lq, d.hq, d.d});
  *r.mutable_key() = RandomTensor(rng, dtype, {d.batch, d.lk, d.hkv, d.d});
  *r.mutable_value() = RandomTensor(rng, dtype, {d.batch, d.lk, d.hkv, d.d});
  return r;
}

// What the reference kernel computes for `request`, run here in the test.
std::unique_ptr<AttentionJob> Expected(const v1::AttendRequest& request) {
  absl::StatusOr<AttentionRequest> core = RequestFromProto(request);
  EXPECT_TRUE(core.ok()) << core.status();
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PrepareAttention(*core);
  EXPECT_TRUE(job.ok()) << job.status();
  RunReferenceAttention((*job)->params);
  return *std::move(job);
}

void ExpectTensorNear(const v1::Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.dtype(), DTypeToProto(want.dtype)) << what;
  ASSERT_EQ(std::vector<int64_t>(got.shape().begin(), got.shape().end()), want.shape) << what;
  ASSERT_EQ(got.data().size(), want.data.size()) << what;
  const int64_t n = want.num_elements();
  for (int64_t i = 0; i < n; ++i) {
    const float g = LoadFloat(got.data().data(), want.dtype, i);
    const float w = LoadFloat(want.data.data(), want.dtype, i);
    if (std::isinf(w)) {
      ASSERT_EQ(g, w) << what << " element " << i;
    } else {
      ASSERT_NEAR(g, w, 1e-6f * (1.f + std::fabs(w))) << what << " element " << i;
    }
  }
}

void ExpectMatchesReference(const v1::AttendRequest& request, const v1::AttendResponse& response) {
  std::unique_ptr<AttentionJob> want = Expected(request);
  EXPECT_EQ(response.request_id(), request.request_id());
  ExpectTensorNear(response.output(), want->output, "output");
  if (request.outputs().lse()) ExpectTensorNear(response.lse(), want->lse, "lse");
  if (request.outputs().weights()) ExpectTensorNear(response.weights(), want->weights, "weights");
  if (request.outputs().top_k() > 0) {
    ExpectTensorNear(response.top_k_weights(), want->top_k_weights, "top_k_weights");
    EXPECT_EQ(response.top_k_indices().data(), want->top_k_indices.data);
  }
}

// The value of the sample whose line starts with `series`, or -1.
using ::attnserve::test_util::HttpGetMetrics;
using ::attnserve::test_util::SampleValue;

// Polls `condition` until it holds or 20 s pass (a hung server, not a slow one).
bool Eventually(const std::function<bool()>& condition) {
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (!condition()) {
    if (absl::Now() > give_up) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

class ServerTest : public ::testing::Test {
 protected:
  // Starts a server on an ephemeral port with the gated backend (default) and
  // the reference backend.
  void StartServer(ServerOptions options = {}) {
    options.listen_address = "127.0.0.1:0";
    if (options.metrics_listen_address == ServerOptions{}.metrics_listen_address) {
      options.metrics_listen_address = "";
    }
    auto gated = std::make_unique<GatedBackend>();
    gated_ = gated.get();
    std::vector<std::unique_ptr<Backend>> backends;
    backends.push_back(std::move(gated));
    backends.push_back(*CreateBackend("reference"));
    absl::StatusOr<std::unique_ptr<Server>> server =
        Server::Create(options, std::move(backends));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    ASSERT_GT(server_->port(), 0);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::AttentionService::NewStub(channel_);
  }

  void TearDown() override {
    if (gated_ != nullptr) gated_->Open();  // never leave a worker blocked
    server_.reset();
  }

  grpc::Status Attend(const v1::AttendRequest& request, v1::AttendResponse* response,
                      absl::Duration timeout = absl::Seconds(30)) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return stub_->Attend(&context, request, response);
  }

  // About 5 s of work on the reference backend here (2048 x 2048, D 64).
  v1::AttendRequest ExpensiveReferenceRequest() {
    v1::AttendRequest request = MakeRequest(rng_, {.lq = 2048, .lk = 2048, .d = 64});
    request.set_backend("reference");
    return request;
  }

  // An Attend in flight: `done` is notified with its status.
  struct AsyncCall {
    grpc::ClientContext context;
    v1::AttendRequest request;
    v1::AttendResponse response;
    grpc::Status status;
    absl::Notification done;
  };
  std::unique_ptr<AsyncCall> StartAttend(v1::AttendRequest request,
                                         absl::Duration timeout = absl::InfiniteDuration()) {
    auto call = std::make_unique<AsyncCall>();
    call->request = std::move(request);
    if (timeout != absl::InfiniteDuration()) {
      call->context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    }
    AsyncCall* raw = call.get();
    stub_->async()->Attend(&raw->context, &raw->request, &raw->response, [raw](grpc::Status s) {
      raw->status = s;
      raw->done.Notify();
    });
    return call;
  }

  // An Attend that blocks in the gated backend, holding the (one) worker
  // until the gate opens.
  std::unique_ptr<AsyncCall> BlockTheWorker() {
    std::unique_ptr<AsyncCall> blocker = StartAttend(MakeRequest(rng_, {.lq = kGatedLq}));
    gated_->AwaitBlocked(1);
    return blocker;
  }

  double Metric(absl::string_view series) {
    return SampleValue(server_->metrics().TextFormat(), series);
  }

  HealthCheckResponse::ServingStatus Health() {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    HealthCheckResponse response;
    grpc::Status s = Health::NewStub(channel_)->Check(&context, HealthCheckRequest(), &response);
    return s.ok() ? response.status() : HealthCheckResponse::UNKNOWN;
  }

  std::mt19937 rng_{1234};
  GatedBackend* gated_ = nullptr;
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

TEST_F(ServerTest, AttendMatchesTheReferenceKernel) {
  StartServer();
  struct Case {
    std::string name;
    Dims dims;
    v1::DType dtype = v1::F32;
    std::function<void(v1::AttendRequest&)> edit;
  };
  const std::vector<Case> cases = {
      {"plain", {}, v1::F32, [](v1::AttendRequest&) {}},
      {"causal_gqa_lse",
       {.batch = 2, .lq = 5, .lk = 9, .hq = 4, .hkv = 2, .d = 16},
       v1::F32,
       [](v1::AttendRequest& r) {
         r.mutable_options()->set_causal(true);
         r.mutable_outputs()->set_lse(true);
       }},
      {"window_softcap_alibi_topk",
       {.batch = 1, .lq = 6, .lk = 6, .hq = 2, .hkv = 1, .d = 8},
       v1::F32,
       [](v1::AttendRequest& r) {
         r.mutable_options()->set_window_left(2);
         r.mutable_options()->set_window_right(1);
         r.mutable_options()->set_softcap(5.f);
         r.mutable_options()->add_alibi_slopes(0.5f);
         r.mutable_options()->add_alibi_slopes(0.25f);
         r.mutable_outputs()->set_top_k(3);
         r.mutable_outputs()->set_weights(true);
       }},
      {"bias_key_lengths",
       {.batch = 2, .lq = 3, .lk = 5, .hq = 2, .hkv = 2, .d = 8},
       v1::F32,
       [&](v1::AttendRequest& r) {
         *r.mutable_bias() = RandomTensor(rng_, v1::F32, {1, 2, 3, 5});
         r.add_key_lengths(5);
         r.add_key_lengths(2);
       }},
      {"f16_three_d",
       {},
       v1::F16,
       [](v1::AttendRequest& r) {
         for (v1::Tensor* t : {r.mutable_query(), r.mutable_key(), r.mutable_value()}) {
           t->mutable_shape()->erase(t->mutable_shape()->begin());
         }
       }},
      {"bf16_linear",
       {.batch = 1, .lq = 4, .lk = 4, .hq = 2, .hkv = 2, .d = 8},
       v1::BF16,
       [](v1::AttendRequest& r) {
         r.mutable_options()->set_variant(v1::LINEAR);
         r.mutable_options()->set_causal(true);
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttendRequest request = MakeRequest(rng_, c.dims, c.dtype);
    request.set_request_id(c.name);
    request.set_backend("reference");
    c.edit(request);
    v1::AttendResponse response;
    grpc::Status s = Attend(request, &response);
    ASSERT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
    ExpectMatchesReference(request, response);
    EXPECT_EQ(response.backend(), "reference");
    EXPECT_GE(response.timing().batch_size(), 1);
    EXPECT_GE(response.timing().total_us(),
              response.timing().queue_us() + response.timing().compute_us());
  }
  // The default backend answers requests that name none.
  v1::AttendRequest request = MakeRequest(rng_, {});
  v1::AttendResponse response;
  ASSERT_TRUE(Attend(request, &response).ok());
  EXPECT_EQ(response.backend(), "gated");
  ExpectMatchesReference(request, response);
}

TEST_F(ServerTest, MalformedRequestsAreInvalidArgumentAndTheServerCarriesOn) {
  StartServer();
  struct Case {
    std::string name;
    std::function<void(v1::AttendRequest&)> edit;
    std::string field;  // the message must name it
  };
  const std::vector<Case> cases = {
      {"unknown dtype", [](v1::AttendRequest& r) { r.mutable_query()->set_dtype(v1::DType(9)); },
       "query.dtype"},
      {"unset dtype", [](v1::AttendRequest& r) { r.mutable_key()->clear_dtype(); }, "key.dtype"},
      {"unknown variant",
       [](v1::AttendRequest& r) { r.mutable_options()->set_variant(v1::Variant(7)); },
       "options.variant"},
      {"unknown alignment",
       [](v1::AttendRequest& r) {
         r.mutable_options()->set_causal_alignment(v1::CausalAlignment(3));
       },
       "options.causal_alignment"},
      {"short data", [](v1::AttendRequest& r) { r.mutable_value()->mutable_data()->resize(12); },
       "value"},
      {"heads not divisible",
       [](v1::AttendRequest& r) {
         r.mutable_query()->set_shape(2, 3);
         r.mutable_query()->mutable_data()->resize(1 * 8 * 3 * 16 * 4);
       },
       "query"},
      {"overflowing shape",
       [](v1::AttendRequest& r) {
         r.mutable_query()->set_shape(0, int64_t{1} << 40);
         r.mutable_query()->set_shape(1, int64_t{1} << 40);
       },
       "query"},
      {"missing tensor", [](v1::AttendRequest& r) { r.clear_key(); }, "key"},
      {"priority", [](v1::AttendRequest& r) { r.set_priority(3); }, "priority"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttendRequest request = MakeRequest(rng_, {});
    c.edit(request);
    v1::AttendResponse response;
    grpc::Status s = Attend(request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), c.field)) << s.error_message();

    v1::AttendRequest good = MakeRequest(rng_, {});
    ASSERT_TRUE(Attend(good, &response).ok());
    ExpectMatchesReference(good, response);
  }
  EXPECT_EQ(Metric(R"(attnserve_requests_total{code="INVALID_ARGUMENT",method="Attend"})"),
            cases.size());
  EXPECT_EQ(gated_->computed(), static_cast<int>(cases.size()));
}

TEST_F(ServerTest, BackendSelectionAndLimits) {
  ServerOptions options;
  options.max_request_flops = 1e5;
  options.max_request_bytes = 64 << 10;
  StartServer(options);
  // Cost 2·2·8·8·32 FLOPs + 128 scores x 64 + 256 output elements x 160 +
  // 2 tiles x 16000 = 89344 FLOP-equivalents.
  v1::AttendRequest request = MakeRequest(rng_, {});
  v1::AttendResponse response;

  request.set_backend("tpu");
  grpc::Status s = Attend(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "gated, reference")) << s.error_message();

  request.set_backend("reference");
  EXPECT_TRUE(Attend(request, &response).ok());

  v1::AttendRequest costly = MakeRequest(rng_, {.lq = 32, .lk = 64});  // 720128
  s = Attend(costly, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "1e+05")) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "max_request_flops")) << s.error_message();
  EXPECT_EQ(Metric(R"(attnserve_rejected_requests_total{reason="cost"})"), 1);

  // Over the receive limit: gRPC refuses the message before the service sees it.
  v1::AttendRequest big = MakeRequest(rng_, {.lq = 8, .lk = 512, .hq = 2, .hkv = 2, .d = 16});
  s = Attend(big, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();

  ASSERT_TRUE(Attend(request, &response).ok());
}

TEST_F(ServerTest, ExpiredDeadlineIsAnsweredWithoutCompute) {
  StartServer();  // one worker
  std::unique_ptr<AsyncCall> blocker = BlockTheWorker();

  // Queued behind the blocker until its deadline passes.
  constexpr absl::Duration kTimeout = absl::Milliseconds(300);
  std::unique_ptr<AsyncCall> call = StartAttend(MakeRequest(rng_, {}), kTimeout);
  ASSERT_TRUE(Eventually([&] { return Metric("attnserve_queue_depth") == 1; }));
  // The server received the call before now, so its deadline (receipt + the
  // remaining timeout, give or take gRPC's clock conversion) is before this:
  const absl::Time server_deadline_bound = absl::Now() + kTimeout + absl::Milliseconds(20);
  call->done.WaitForNotification();
  EXPECT_EQ(call->status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  absl::SleepFor(server_deadline_bound - absl::Now());

  gated_->Open();
  blocker->done.WaitForNotification();
  EXPECT_TRUE(blocker->status.ok()) << blocker->status.error_message();
  ASSERT_TRUE(Eventually([&] {
    return Metric(R"(attnserve_requests_total{code="DEADLINE_EXCEEDED",method="Attend"})") == 1;
  }));
  EXPECT_EQ(gated_->computed(), 1);  // the blocker only
}

TEST_F(ServerTest, CancelledCallIsDroppedBeforeCompute) {
  StartServer();
  std::unique_ptr<AsyncCall> blocker = BlockTheWorker();

  std::unique_ptr<AsyncCall> call = StartAttend(MakeRequest(rng_, {}));
  // Admitted: it waits in the queue behind the blocker.
  ASSERT_TRUE(Eventually([&] { return Metric("attnserve_queue_depth") == 1; }));
  call->context.TryCancel();
  call->done.WaitForNotification();
  EXPECT_EQ(call->status.error_code(), grpc::StatusCode::CANCELLED);
  // The server learns of it asynchronously; compute must wait until it has.
  ASSERT_TRUE(Eventually(
      [&] { return Metric(R"(attnserve_cancelled_requests_total{method="Attend"})") == 1; }));

  gated_->Open();
  blocker->done.WaitForNotification();
  ASSERT_TRUE(Eventually([&] {
    return Metric(R"(attnserve_requests_total{code="CANCELLED",method="Attend"})") == 1;
  })) << server_->metrics().TextFormat().substr(0, 3000) << " computed " << gated_->computed();
  EXPECT_EQ(gated_->computed(), 1);
  EXPECT_EQ(Metric("attnserve_inflight_requests"), 0);
}

TEST_F(ServerTest, StreamCarriesManyRequestsInFlight) {
  ServerOptions options;
  options.max_stream_inflight = 8;
  options.scheduler.workers = 2;
  StartServer(options);

  constexpr int kRequests = 120;
  std::vector<v1::AttendRequest> requests;
  for (int i = 0; i < kRequests; ++i) {
    Dims d{.batch = 1 + i % 2, .lq = 1 + i % 5, .lk = 3 + i % 11, .hq = 2, .hkv = 1 + i % 2,
           .d = 8};
    requests.push_back(MakeRequest(rng_, d));
    requests.back().set_request_id(absl::StrCat("r", i));
    requests.back().set_priority(i % 2);
  }

  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  auto stream = stub_->AttendStream(&context);
  std::thread writer([&] {
    for (const auto& r : requests) {
      if (!stream->Write(r)) break;
    }
    stream->WritesDone();
  });
  std::set<std::string> seen;
  v1::AttendResponse response;
  while (stream->Read(&response)) {
    int index = -1;
    ASSERT_TRUE(absl::SimpleAtoi(absl::StripPrefix(response.request_id(), "r"), &index));
    ASSERT_TRUE(index >= 0 && index < kRequests);
    EXPECT_TRUE(seen.insert(response.request_id()).second) << "twice: " << response.request_id();
    ExpectMatchesReference(requests[index], response);
  }
  writer.join();
  grpc::Status s = stream->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(seen.size(), static_cast<size_t>(kRequests));
  EXPECT_EQ(Metric(R"(attnserve_requests_total{code="OK",method="AttendStream"})"), kRequests);
}

TEST_F(ServerTest, StreamAnswersInCompletionOrder) {
  ServerOptions options;
  options.scheduler.workers = 2;
  options.scheduler.max_batch_size = 1;
  StartServer(options);

  grpc::ClientContext context;
  auto stream = stub_->AttendStream(&context);
  v1::AttendRequest slow = MakeRequest(rng_, {.lq = kGatedLq});
  slow.set_request_id("slow");
  v1::AttendRequest fast = MakeRequest(rng_, {});
  fast.set_request_id("fast");
  ASSERT_TRUE(stream->Write(slow));
  gated_->AwaitBlocked(1);
  ASSERT_TRUE(stream->Write(fast));

  v1::AttendResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "fast");
  ExpectMatchesReference(fast, response);

  gated_->Open();
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "slow");
  ExpectMatchesReference(slow, response);
  stream->WritesDone();
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServerTest, InvalidRequestEndsTheStreamNamingIt) {
  StartServer();
  grpc::ClientContext context;
  auto stream = stub_->AttendStream(&context);
  v1::AttendRequest good = MakeRequest(rng_, {});
  good.set_request_id("good");
  ASSERT_TRUE(stream->Write(good));
  v1::AttendResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "good");

  v1::AttendRequest bad = MakeRequest(rng_, {});
  bad.set_request_id("bad-7");
  bad.mutable_query()->set_dtype(v1::I32);
  stream->Write(bad);
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StartsWith(s.error_message(), "request_id 'bad-7': query.dtype"))
      << s.error_message();

  // The server itself is fine.
  ASSERT_TRUE(Attend(good, &response).ok());
}

TEST_F(ServerTest, DrainFinishesAdmittedWorkAndRefusesNewWork) {
  StartServer();
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);

  // One request computing, one queued behind it, one idle stream.
  grpc::ClientContext computing_context, queued_context, stream_context;
  v1::AttendRequest computing = MakeRequest(rng_, {.lq = kGatedLq});
  v1::AttendRequest queued = MakeRequest(rng_, {});
  v1::AttendResponse computing_response, queued_response;
  grpc::Status computing_status, queued_status;
  absl::Notification computing_done, queued_done;
  stub_->async()->Attend(&computing_context, &computing, &computing_response,
                         [&](grpc::Status s) {
                           computing_status = s;
                           computing_done.Notify();
                         });
  gated_->AwaitBlocked(1);
  stub_->async()->Attend(&queued_context, &queued, &queued_response, [&](grpc::Status s) {
    queued_status = s;
    queued_done.Notify();
  });
  ASSERT_TRUE(Eventually([&] { return Metric("attnserve_queue_depth") == 1; }));
  auto idle_stream = stub_->AttendStream(&stream_context);

  absl::Status drained;
  std::thread drainer([&] { drained = server_->Drain(); });
  ASSERT_TRUE(Eventually([&] { return Health() == HealthCheckResponse::NOT_SERVING; }));

  v1::AttendResponse response;
  grpc::Status s = Attend(MakeRequest(rng_, {}), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  // The idle stream is told to go elsewhere.
  EXPECT_FALSE(idle_stream->Read(&response));
  EXPECT_EQ(idle_stream->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);

  gated_->Open();
  drainer.join();
  EXPECT_TRUE(drained.ok()) << drained;
  computing_done.WaitForNotification();
  queued_done.WaitForNotification();
  EXPECT_TRUE(computing_status.ok()) << computing_status.error_message();
  EXPECT_TRUE(queued_status.ok()) << queued_status.error_message();
  ExpectMatchesReference(computing, computing_response);
  ExpectMatchesReference(queued, queued_response);
  EXPECT_EQ(gated_->computed(), 2);
}

TEST_F(ServerTest, GetServerInfoDescribesTheServer) {
  ServerOptions options;
  options.max_request_bytes = 1 << 20;
  StartServer(options);
  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.version(), ATTNSERVE_VERSION);
  EXPECT_EQ(info.default_backend(), "gated");
  ASSERT_EQ(info.backends_size(), 2);
  EXPECT_EQ(info.backends(1).name(), "reference");
  EXPECT_GT(info.backends(1).max_head_dim(), 0);
  EXPECT_GT(info.backends(1).features_size(), 0);
  EXPECT_GE(info.dtypes_size(), 1);
  EXPECT_EQ(info.dtypes(0), v1::F32);
  EXPECT_EQ(info.limits().max_request_bytes(), 1 << 20);
  EXPECT_EQ(info.limits().max_output_bytes(), RequestLimits{}.max_output_bytes);
  EXPECT_EQ(info.limits().max_top_k(), RequestLimits{}.max_top_k);
}

// Server reflection lists the service (what grpcurl relies on). The request
// is encoded by hand: ServerReflectionRequest{list_services: ""} is field 7,
// length-delimited, empty.
TEST_F(ServerTest, ReflectionListsTheService) {
  StartServer();
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  auto call =
      stub.PrepareCall(&context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  auto step = [&](void* tag) {
    void* got = nullptr;
    bool ok = false;
    EXPECT_TRUE(cq.Next(&got, &ok));
    EXPECT_EQ(got, tag);
    return ok;
  };
  int tags[5];
  call->StartCall(&tags[0]);
  ASSERT_TRUE(step(&tags[0]));
  const std::string list_services("\x3a\x00", 2);
  grpc::Slice slice(list_services);
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, &tags[1]);
  ASSERT_TRUE(step(&tags[1]));
  grpc::ByteBuffer reply;
  call->Read(&reply, &tags[2]);
  ASSERT_TRUE(step(&tags[2]));
  call->WritesDone(&tags[3]);
  step(&tags[3]);
  grpc::Status status;
  call->Finish(&status, &tags[4]);
  step(&tags[4]);
  EXPECT_TRUE(status.ok()) << status.error_message();

  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(reply.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_TRUE(absl::StrContains(bytes, "attnserve.v1.AttentionService"));
  EXPECT_TRUE(absl::StrContains(bytes, "grpc.health.v1.Health"));
}

TEST_F(ServerTest, EmptyCreateSessionNamesTheMissingField) {
  StartServer();
  grpc::ClientContext context;
  v1::CreateSessionResponse response;
  grpc::Status s = stub_->CreateSession(&context, v1::CreateSessionRequest(), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "num_kv_heads: expected a value in [1, 1024], got 0");
}

TEST_F(ServerTest, MetricsDescribeTheTraffic) {
  ServerOptions options;
  options.metrics_listen_address = "127.0.0.1:0";
  StartServer(options);
  for (int i = 0; i < 3; ++i) {
    v1::AttendResponse response;
    ASSERT_TRUE(Attend(MakeRequest(rng_, {}), &response).ok());
  }
  v1::AttendRequest bad = MakeRequest(rng_, {});
  bad.mutable_key()->set_dtype(v1::DType(42));
  v1::AttendResponse response;
  EXPECT_FALSE(Attend(bad, &response).ok());

  // GET /metrics on the endpoint's ephemeral port.
  const int port = server_->metrics_port();
  ASSERT_GT(port, 0);
  const std::string text = HttpGetMetrics(port);

  EXPECT_EQ(SampleValue(text, R"(attnserve_requests_total{code="OK",method="Attend"})"), 3);
  EXPECT_EQ(SampleValue(text, R"(attnserve_requests_total{code="INVALID_ARGUMENT",method="Attend"})"),
            1);
  EXPECT_EQ(SampleValue(text, R"(attnserve_request_duration_seconds_count{method="Attend"})"), 4);
  EXPECT_EQ(SampleValue(text, R"(attnserve_queue_duration_seconds_count)"), 3);
  EXPECT_EQ(SampleValue(text, R"(attnserve_compute_duration_seconds_count{backend="gated"})"),
            SampleValue(text, R"(attnserve_batch_size_count)"));
  EXPECT_EQ(SampleValue(text, R"(attnserve_batch_size_sum)"), 3);
  EXPECT_EQ(SampleValue(text, R"(attnserve_flops_total{backend="gated"})"), 3 * 8192.0);
  EXPECT_EQ(SampleValue(text, R"(attnserve_inflight_requests)"), 0);
  EXPECT_EQ(SampleValue(text, R"(attnserve_queue_depth)"), 0);
  EXPECT_EQ(SampleValue(text, R"(attnserve_workspace_bytes{backend="reference"})"), 0);
  EXPECT_EQ(
      SampleValue(text, absl::StrCat(R"(attnserve_build_info{backends="gated,reference",version=")",
                                     ATTNSERVE_VERSION, R"("})")),
      1);
  EXPECT_GT(SampleValue(text, "process_resident_memory_bytes"), 0);
  EXPECT_GT(SampleValue(text, "process_open_fds"), 0);
}

// The memory budget: a request that does not fit is refused at once naming
// the budget, what is held is released when the response is sent.
TEST_F(ServerTest, MemoryBudgetRefusesWhatDoesNotFitAndReleasesAfterTheResponse) {
  ServerOptions options;
  options.memory_limit_bytes = int64_t{8} << 20;
  StartServer(options);
  // Requests reserve from three quarters of it; gRPC's buffers get the rest.
  EXPECT_EQ(Metric("attnserve_memory_limit_bytes"), double(int64_t{6} << 20));
  {
    grpc::ClientContext context;
    v1::ServerInfo info;
    ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
    EXPECT_EQ(info.limits().memory_limit_bytes(), int64_t{6} << 20);
    EXPECT_EQ(info.limits().memory_reserved_bytes(), 0);
    EXPECT_EQ(info.limits().max_request_flops(), ServerOptions().max_request_flops);
  }

  // A 130-byte message asking for a 16 MiB output.
  v1::AttendRequest amplifier;
  *amplifier.mutable_query() = RandomTensor(rng_, v1::F32, {1, 1, 4096, 1});
  *amplifier.mutable_key() = RandomTensor(rng_, v1::F32, {1, 1, 1, 1});
  *amplifier.mutable_value() = RandomTensor(rng_, v1::F32, {1, 1, 1, 1024});
  v1::AttendResponse response;
  grpc::Status s = Attend(amplifier, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "memory budget")) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "--memory_limit_bytes=8388608"))
      << s.error_message();
  EXPECT_EQ(Metric(R"(attnserve_rejected_requests_total{reason="memory"})"), 1);

  // A request in flight holds its bytes until its response is sent.
  std::unique_ptr<AsyncCall> blocker = BlockTheWorker();
  EXPECT_GT(server_->memory_budget().reserved_bytes(), 0);
  EXPECT_GT(Metric("attnserve_memory_reserved_bytes"), 0);
  gated_->Open();
  blocker->done.WaitForNotification();
  ASSERT_TRUE(Eventually([&] { return server_->memory_budget().reserved_bytes() == 0; }));
  EXPECT_EQ(Metric("attnserve_memory_reserved_bytes"), 0);
  ASSERT_TRUE(Attend(MakeRequest(rng_, {}), &response).ok());
}

// An expensive request whose caller gives up stops computing: the next small
// request does not wait for it. The reference backend would need seconds for
// it; the call's deadline is 200 ms.
TEST_F(ServerTest, AbandonedExpensiveRequestFreesItsWorker) {
  ServerOptions options;
  options.max_request_flops = 0;  // no cost limit: it must be stopped, not refused
  StartServer(options);
  v1::AttendResponse response;
  grpc::Status s = Attend(ExpensiveReferenceRequest(), &response, absl::Milliseconds(200));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);

  v1::AttendRequest small = MakeRequest(rng_, {});
  small.set_backend("reference");
  const absl::Time sent = absl::Now();
  ASSERT_TRUE(Attend(small, &response).ok());
  // The expensive one needs ~5 s here; the bound only separates "stopped"
  // from "ran to the end".
  EXPECT_LT(absl::Now() - sent, absl::Seconds(2));
  // The server learns of it from its own deadline or from the client's
  // cancellation, whichever comes first.
  ASSERT_TRUE(Eventually([&] {
    // A series that was never used is absent (-1).
    return std::max(0.0, Metric(R"(attnserve_requests_total{code="DEADLINE_EXCEEDED",method="Attend"})")) +
               std::max(0.0, Metric(R"(attnserve_requests_total{code="CANCELLED",method="Attend"})")) ==
           1;
  }));
}

// The same for AttendStream: cancelling the stream stops the request it has
// computing, and the worker is free for the next call.
TEST_F(ServerTest, CancelledStreamStopsItsRunningRequest) {
  ServerOptions options;
  options.max_request_flops = 0;
  StartServer(options);
  grpc::ClientContext context;
  auto stream = stub_->AttendStream(&context);
  ASSERT_TRUE(stream->Write(ExpensiveReferenceRequest()));
  ASSERT_TRUE(Eventually([&] {
    return Metric("attnserve_inflight_requests") == 1 && Metric("attnserve_queue_depth") == 0;
  }));
  context.TryCancel();
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);

  v1::AttendRequest small = MakeRequest(rng_, {});
  small.set_backend("reference");
  v1::AttendResponse response;
  const absl::Time sent = absl::Now();
  ASSERT_TRUE(Attend(small, &response).ok());
  EXPECT_LT(absl::Now() - sent, absl::Seconds(2));  // not behind ~5 s of work
  ASSERT_TRUE(Eventually(
      [&] { return Metric(R"(attnserve_requests_total{code="CANCELLED",method="AttendStream"})") == 1; }));
}

// Destroying a server whose drain times out while a batch computes: the
// batch is stopped, the worker joined before the service it calls back into
// is destroyed (under ASan a use-after-free otherwise), and the timeout holds.
TEST_F(ServerTest, ShutdownStopsRunningWorkAndJoinsWorkersFirst) {
  ServerOptions options;
  options.max_request_flops = 0;
  options.drain_timeout_s = 0;
  StartServer(options);
  std::unique_ptr<AsyncCall> call = StartAttend(ExpensiveReferenceRequest());
  ASSERT_TRUE(Eventually([&] {
    return Metric("attnserve_inflight_requests") == 1 && Metric("attnserve_queue_depth") == 0;
  }));
  absl::SleepFor(absl::Milliseconds(50));  // into the computation
  const absl::Time start = absl::Now();
  server_.reset();
  gated_ = nullptr;  // it went with the server
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  call->done.WaitForNotification();
  EXPECT_EQ(call->status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << call->status.error_message();
}

TEST(ServerCreateTest, RejectsBadOptionsAndUnknownBackends) {
  ServerOptions options;
  options.metrics_listen_address = "";
  options.max_stream_inflight = 0;
  EXPECT_EQ(Server::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.max_stream_inflight = 4;
  options.backend = "no-such-backend";
  EXPECT_EQ(Server::Create(options).status().code(), absl::StatusCode::kNotFound);
  options.backend = "";
  options.backends = {"reference"};
  options.listen_address = "127.0.0.1:0";
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ((*server)->default_backend(), AvailableBackends().front());
  ASSERT_TRUE((*server)->Start().ok());
  EXPECT_TRUE((*server)->Drain().ok());
}

}  // namespace
}  // namespace attnserve
