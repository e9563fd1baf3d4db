// KV-cache sessions over gRPC: decode steps equal stateless attention over the
// concatenated K/V, failures leave the cache unchanged, the cache bound holds
// and recovers, and many sessions decode concurrently.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/half.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace attnserve {
namespace {

constexpr int64_t kHq = 4, kHkv = 2, kD = 32;

// Random F32 values as the bytes of `dtype` (rounded), so both the session and
// the stateless request see exactly the same numbers.
std::string RandomBytes(std::mt19937& rng, int64_t n, DType dtype) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::string s(n * DTypeSize(dtype), '\0');
  for (int64_t i = 0; i < n; ++i) StoreFloat(s.data(), dtype, i, dist(rng));
  return s;
}

v1::Tensor MakeTensor(v1::DType dtype, std::vector<int64_t> shape, std::string data) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::move(data));
  return t;
}

class SessionTest : public ::testing::Test {
 public:
  void StartServer(ServerOptions options = {}) {
    options.listen_address = "127.0.0.1:0";
    options.metrics_listen_address = "";
    options.backend_threads = 2;
    auto server = Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::AttentionService::NewStub(channel_);
  }

  grpc::Status Create(v1::DType dtype, std::string* id, int64_t max_tokens = 0) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    req.set_num_kv_heads(kHkv);
    req.set_head_dim(kD);
    req.set_dtype(dtype);
    req.set_max_tokens(max_tokens);
    v1::CreateSessionResponse resp;
    grpc::Status s = stub_->CreateSession(&ctx, req, &resp);
    if (s.ok()) *id = resp.session_id();
    return s;
  }

  grpc::Status Decode(const std::string& id, const v1::Tensor& q, const v1::Tensor& k,
                      const v1::Tensor& v, v1::DecodeResponse* resp) {
    grpc::ClientContext ctx;
    v1::DecodeRequest req;
    req.set_session_id(id);
    *req.mutable_query() = q;
    *req.mutable_key() = k;
    *req.mutable_value() = v;
    req.mutable_outputs()->set_lse(true);
    return stub_->Decode(&ctx, req, resp);
  }

  grpc::Status Close(const std::string& id) {
    grpc::ClientContext ctx;
    v1::CloseSessionRequest req;
    req.set_session_id(id);
    v1::CloseSessionResponse resp;
    return stub_->CloseSession(&ctx, req, &resp);
  }

  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

// Prefill then single-token steps; each step's output must equal a causal
// Attend over all K/V so far (bitwise for F32, within rounding for BF16).
void RunDecodeMatchesAttend(SessionTest* t, v1::DType wire_dtype, DType dtype, bool bitwise,
                            const std::string& backend) {
  std::mt19937 rng(7);
  std::string id;
  ASSERT_TRUE(t->Create(wire_dtype, &id).ok());
  std::string k_all, v_all;
  int64_t total = 0;
  for (int64_t n : {45, 1, 1, 1, 3, 1, 1}) {
    std::string q = RandomBytes(rng, n * kHq * kD, dtype);
    std::string k = RandomBytes(rng, n * kHkv * kD, dtype);
    std::string v = RandomBytes(rng, n * kHkv * kD, dtype);
    k_all += k;
    v_all += v;
    total += n;
    v1::DecodeRequest dreq;
    v1::DecodeResponse dresp;
    {
      grpc::ClientContext ctx;
      dreq.set_session_id(id);
      dreq.set_backend(backend);
      *dreq.mutable_query() = MakeTensor(wire_dtype, {n, kHq, kD}, q);
      *dreq.mutable_key() = MakeTensor(wire_dtype, {n, kHkv, kD}, k);
      *dreq.mutable_value() = MakeTensor(wire_dtype, {n, kHkv, kD}, v);
      dreq.mutable_outputs()->set_lse(true);
      grpc::Status s = t->stub_->Decode(&ctx, dreq, &dresp);
      ASSERT_TRUE(s.ok()) << s.error_message();
    }
    EXPECT_EQ(dresp.context_tokens(), total);
    v1::AttendRequest areq;
    areq.set_backend(backend);
    *areq.mutable_query() = MakeTensor(wire_dtype, {n, kHq, kD}, q);
    *areq.mutable_key() = MakeTensor(wire_dtype, {total, kHkv, kD}, k_all);
    *areq.mutable_value() = MakeTensor(wire_dtype, {total, kHkv, kD}, v_all);
    areq.mutable_options()->set_causal(true);
    areq.mutable_outputs()->set_lse(true);
    v1::AttendResponse aresp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(t->stub_->Attend(&ctx, areq, &aresp).ok());
    ASSERT_EQ(dresp.output().data().size(), aresp.output().data().size());
    if (bitwise) {
      // Compared as bytes, reported as a count (not a dump).
      EXPECT_TRUE(dresp.output().data() == aresp.output().data())
          << "output differs at " << total << " tokens";
      EXPECT_TRUE(dresp.lse().data() == aresp.lse().data()) << "lse differs at " << total;
    } else {
      const int64_t count = n * kHq * kD;
      for (int64_t i = 0; i < count; ++i) {
        const float a = LoadFloat(dresp.output().data().data(), dtype, i);
        const float b = LoadFloat(aresp.output().data().data(), dtype, i);
        ASSERT_NEAR(a, b, 1e-2f + 1e-2f * std::fabs(b)) << "element " << i;
      }
    }
  }
  EXPECT_TRUE(t->Close(id).ok());
}

TEST_F(SessionTest, DecodeStepsEqualStatelessAttendF32) {
  StartServer();
  for (const std::string& backend : {"cpu", "reference"}) {
    SCOPED_TRACE(backend);
    RunDecodeMatchesAttend(this, v1::F32, DType::kF32, /*bitwise=*/true, backend);
  }
}

TEST_F(SessionTest, DecodeStepsMatchStatelessAttendBF16) {
  StartServer();
  RunDecodeMatchesAttend(this, v1::BF16, DType::kBF16, /*bitwise=*/false, "");
}

TEST_F(SessionTest, BackendsWithoutPagedKvSayUnimplemented) {
  StartServer();
  std::string id;
  ASSERT_TRUE(Create(v1::F32, &id).ok());
  grpc::ClientContext ctx;
  v1::DecodeRequest req;
  req.set_session_id(id);
  req.set_backend("onednn");
  *req.mutable_query() = MakeTensor(v1::F32, {1, kHq, kD}, std::string(kHq * kD * 4, '\0'));
  *req.mutable_key() = MakeTensor(v1::F32, {1, kHkv, kD}, std::string(kHkv * kD * 4, '\0'));
  *req.mutable_value() = MakeTensor(v1::F32, {1, kHkv, kD}, std::string(kHkv * kD * 4, '\0'));
  v1::DecodeResponse resp;
  grpc::Status s = stub_->Decode(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
  EXPECT_EQ(server_->sessions().stats().sessions_active, 1);
}

TEST_F(SessionTest, F32QueriesOverABF16Cache) {
  StartServer();
  std::string id;
  ASSERT_TRUE(Create(v1::BF16, &id).ok());
  std::mt19937 rng(3);
  v1::DecodeResponse resp;
  grpc::Status s = Decode(id, MakeTensor(v1::F32, {2, kHq, kD}, RandomBytes(rng, 2 * kHq * kD, DType::kF32)),
                          MakeTensor(v1::F32, {2, kHkv, kD}, RandomBytes(rng, 2 * kHkv * kD, DType::kF32)),
                          MakeTensor(v1::F32, {2, kHkv, kD}, RandomBytes(rng, 2 * kHkv * kD, DType::kF32)),
                          &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.output().dtype(), v1::F32);
  EXPECT_EQ(resp.output().data().size(), 2u * kHq * kD * 4);
}

TEST_F(SessionTest, FailedStepLeavesTheCacheUnchanged) {
  StartServer();
  std::string id;
  ASSERT_TRUE(Create(v1::F32, &id).ok());
  std::mt19937 rng(5);
  auto step = [&](int64_t n, int64_t q_heads, v1::DecodeResponse* resp) {
    return Decode(id, MakeTensor(v1::F32, {n, q_heads, kD}, RandomBytes(rng, n * q_heads * kD, DType::kF32)),
                  MakeTensor(v1::F32, {n, kHkv, kD}, RandomBytes(rng, n * kHkv * kD, DType::kF32)),
                  MakeTensor(v1::F32, {n, kHkv, kD}, RandomBytes(rng, n * kHkv * kD, DType::kF32)), resp);
  };
  v1::DecodeResponse resp;
  ASSERT_TRUE(step(5, kHq, &resp).ok());
  EXPECT_EQ(resp.context_tokens(), 5);
  grpc::Status bad = step(2, 3, &resp);  // 3 query heads do not divide over 2 kv heads
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.error_message().find("query.shape"), std::string::npos) << bad.error_message();
  ASSERT_TRUE(step(1, kHq, &resp).ok());
  EXPECT_EQ(resp.context_tokens(), 6);  // the failed step appended nothing

  // A retry guarded by expected_context_tokens is refused once the step landed.
  auto guarded = [&](int64_t expected) {
    grpc::ClientContext ctx;
    v1::DecodeRequest req;
    req.set_session_id(id);
    req.set_expected_context_tokens(expected);
    *req.mutable_query() = MakeTensor(v1::F32, {1, kHq, kD}, RandomBytes(rng, kHq * kD, DType::kF32));
    *req.mutable_key() = MakeTensor(v1::F32, {1, kHkv, kD}, RandomBytes(rng, kHkv * kD, DType::kF32));
    *req.mutable_value() = *req.mutable_key();
    return stub_->Decode(&ctx, req, &resp);
  };
  ASSERT_TRUE(guarded(6).ok());
  EXPECT_EQ(resp.context_tokens(), 7);
  grpc::Status again = guarded(6);
  EXPECT_EQ(again.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(again.error_message().find("holds 7 tokens"), std::string::npos) << again.error_message();
}

TEST_F(SessionTest, UnknownClosedAndBadRequests) {
  StartServer();
  v1::DecodeResponse resp;
  v1::Tensor q = MakeTensor(v1::F32, {1, kHq, kD}, std::string(kHq * kD * 4, '\0'));
  v1::Tensor kv = MakeTensor(v1::F32, {1, kHkv, kD}, std::string(kHkv * kD * 4, '\0'));
  EXPECT_EQ(Decode("0123", q, kv, kv, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  std::string id;
  ASSERT_TRUE(Create(v1::F16, &id).ok());
  EXPECT_EQ(id.size(), 32u);
  ASSERT_TRUE(Decode(id, q, kv, kv, &resp).ok());
  ASSERT_TRUE(Close(id).ok());
  EXPECT_EQ(Decode(id, q, kv, kv, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Close(id).error_code(), grpc::StatusCode::NOT_FOUND);

  grpc::ClientContext ctx;
  v1::CreateSessionRequest bad;
  bad.set_num_kv_heads(0);
  bad.set_head_dim(kD);
  v1::CreateSessionResponse created;
  grpc::Status s = stub_->CreateSession(&ctx, bad, &created);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("num_kv_heads"), std::string::npos);
}

TEST_F(SessionTest, FullCacheIsRejectedThenRecovers) {
  ServerOptions options;
  options.sessions.block_tokens = 16;
  // One block: 16 tokens x 2 heads x (32 + 32) dims x 4 bytes = 8 KiB; room for 4.
  options.sessions.kv_cache_bytes = 4 * 8192;
  StartServer(options);
  std::vector<std::string> ids(4);
  for (auto& id : ids) ASSERT_TRUE(Create(v1::F32, &id).ok());
  std::string extra;
  grpc::Status full = Create(v1::F32, &extra);
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(full.error_message().find("kv_cache_bytes"), std::string::npos) << full.error_message();

  v1::GetServerInfoRequest info_req;
  v1::ServerInfo info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->GetServerInfo(&ctx, info_req, &info).ok());
  EXPECT_EQ(info.sessions().active(), 4);
  EXPECT_EQ(info.sessions().kv_cache_used_bytes(), 4 * 8192);
  EXPECT_EQ(info.sessions().kv_cache_capacity_bytes(), 4 * 8192);

  const std::string metrics = server_->metrics().TextFormat();
  EXPECT_NE(metrics.find("attnserve_sessions_active 4"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("attnserve_kv_cache_bytes{state=\"used\"} 32768"), std::string::npos);
  EXPECT_NE(metrics.find("attnserve_kv_cache_bytes{state=\"capacity\"} 32768"), std::string::npos);
  EXPECT_NE(metrics.find("attnserve_requests_total{code=\"RESOURCE_EXHAUSTED\",method=\"CreateSession\"} 1"),
            std::string::npos);

  ASSERT_TRUE(Close(ids[0]).ok());
  EXPECT_TRUE(Create(v1::F32, &extra).ok());
}

// With bearer tokens on, a session belongs to the token that created it; to
// any other caller it does not exist.
TEST_F(SessionTest, SessionsAreBoundToTheirCreator) {
  char path[] = "/tmp/attnserve_session_tokens_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string tokens = "alice alice-token-0123456789\nbob bob-token-0123456789ab\n";
  ASSERT_EQ(write(fd, tokens.data(), tokens.size()), static_cast<ssize_t>(tokens.size()));
  close(fd);
  ServerOptions options;
  options.auth.auth_tokens_file = path;
  StartServer(options);
  unlink(path);

  auto call = [&](const char* token, auto rpc, const auto& request, auto* response) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", std::string("Bearer ") + token);
    return ((*stub_).*rpc)(&ctx, request, response);
  };
  v1::CreateSessionRequest create;
  create.set_num_kv_heads(kHkv);
  create.set_head_dim(kD);
  v1::CreateSessionResponse created;
  ASSERT_TRUE(call("alice-token-0123456789", &v1::AttentionService::Stub::CreateSession, create,
                   &created)
                  .ok());
  v1::DecodeRequest decode;
  decode.set_session_id(created.session_id());
  *decode.mutable_query() = MakeTensor(v1::F32, {1, kHq, kD}, std::string(kHq * kD * 4, '\0'));
  *decode.mutable_key() = MakeTensor(v1::F32, {1, kHkv, kD}, std::string(kHkv * kD * 4, '\0'));
  *decode.mutable_value() = *decode.mutable_key();
  v1::DecodeResponse decoded;
  EXPECT_EQ(call("bob-token-0123456789ab", &v1::AttentionService::Stub::Decode, decode, &decoded)
                .error_code(),
            grpc::StatusCode::NOT_FOUND);
  v1::CloseSessionRequest close_req;
  close_req.set_session_id(created.session_id());
  v1::CloseSessionResponse closed;
  EXPECT_EQ(call("bob-token-0123456789ab", &v1::AttentionService::Stub::CloseSession, close_req,
                 &closed)
                .error_code(),
            grpc::StatusCode::NOT_FOUND);
  grpc::Status mine =
      call("alice-token-0123456789", &v1::AttentionService::Stub::Decode, decode, &decoded);
  EXPECT_TRUE(mine.ok()) << mine.error_message();
  EXPECT_EQ(decoded.context_tokens(), 1);
  EXPECT_TRUE(call("alice-token-0123456789", &v1::AttentionService::Stub::CloseSession, close_req,
                   &closed)
                  .ok());
}

TEST_F(SessionTest, LruIdleEvictsInsteadOfRejecting) {
  ServerOptions options;
  options.sessions.block_tokens = 16;
  options.sessions.kv_cache_bytes = 2 * 8192;
  options.sessions.eviction = EvictionPolicy::kLruIdle;
  StartServer(options);
  std::string a, b, c;
  ASSERT_TRUE(Create(v1::F32, &a).ok());
  ASSERT_TRUE(Create(v1::F32, &b).ok());
  ASSERT_TRUE(Create(v1::F32, &c).ok());  // evicts a, the least recently used
  EXPECT_EQ(Close(a).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(Close(b).ok());
  EXPECT_EQ(server_->sessions().stats().evictions_total, 1);
  EXPECT_NE(server_->metrics().TextFormat().find("attnserve_kv_evictions_total{reason=\"lru_idle\"} 1"), std::string::npos);
}

// A Decode is checked whole before it touches the cache: a bad query or a
// step over the cost limit must not append, nor evict another caller's idle
// session to make room under lru_idle.
TEST_F(SessionTest, DecodeValidatesEverythingBeforeItAppendsOrEvicts) {
  ServerOptions options;
  options.sessions.block_tokens = 16;
  options.sessions.kv_cache_bytes = 2 * 8192;  // two blocks
  options.sessions.eviction = EvictionPolicy::kLruIdle;
  options.max_request_flops = 2e5;
  StartServer(options);
  std::mt19937 rng(3);
  std::string idle, busy;
  ASSERT_TRUE(Create(v1::F32, &idle).ok());
  ASSERT_TRUE(Create(v1::F32, &busy).ok());
  auto tokens = [&](int64_t n, int64_t heads, int64_t dim) {
    return MakeTensor(v1::F32, {n, heads, dim}, RandomBytes(rng, n * heads * dim, DType::kF32));
  };
  v1::DecodeResponse resp;
  ASSERT_TRUE(Decode(idle, tokens(1, kHq, kD), tokens(16, kHkv, kD), tokens(16, kHkv, kD), &resp)
                  .ok());
  // 17 tokens need a second block for `busy`: only evicting `idle` frees one.
  grpc::Status s = Decode(busy, tokens(1, kHq, kD + 1), tokens(17, kHkv, kD),
                          tokens(17, kHkv, kD), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("query.shape"), std::string::npos) << s.error_message();
  // 17 causal queries over 17 keys: 2·4·17·17·64 / 2 FLOPs, 578 scores x 64,
  // 2176 output elements x 160 and 2 tiles x 16000 = 491136 > 2e5. One query
  // costs ~6.5e4.
  s = Decode(busy, tokens(17, kHq, kD), tokens(17, kHkv, kD), tokens(17, kHkv, kD), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("max_request_flops"), std::string::npos) << s.error_message();
  EXPECT_EQ(server_->sessions().stats().evictions_total, 0);
  // Both sessions are as they were: `busy` empty, `idle` with its 16 tokens.
  ASSERT_TRUE(Decode(busy, tokens(1, kHq, kD), tokens(1, kHkv, kD), tokens(1, kHkv, kD), &resp)
                  .ok());
  EXPECT_EQ(resp.context_tokens(), 1);
  ASSERT_TRUE(Decode(idle, tokens(1, kHq, kD), tokens(1, kHkv, kD), tokens(1, kHkv, kD), &resp)
                  .ok());
  EXPECT_EQ(resp.context_tokens(), 17);
}

// A Decode whose caller gives up while it computes stops, and leaves the
// cache as it was: the next step sees the old length.
TEST_F(SessionTest, AbandonedDecodeStopsAndLeavesTheCacheAsItWas) {
  ServerOptions options;
  options.max_request_flops = 0;  // it must be stopped, not refused
  StartServer(options);
  std::mt19937 rng(5);
  auto tokens = [&](int64_t n, int64_t heads) {
    return MakeTensor(v1::F32, {n, heads, kD}, RandomBytes(rng, n * heads * kD, DType::kF32));
  };
  std::string id;
  ASSERT_TRUE(Create(v1::F32, &id).ok());
  v1::DecodeResponse resp;
  ASSERT_TRUE(Decode(id, tokens(4096, kHq), tokens(4096, kHkv), tokens(4096, kHkv), &resp).ok());
  ASSERT_EQ(resp.context_tokens(), 4096);

  // 1024 new tokens over 5120 on the reference backend: seconds of work.
  v1::DecodeRequest step;
  step.set_session_id(id);
  step.set_backend("reference");
  *step.mutable_query() = tokens(1024, kHq);
  *step.mutable_key() = tokens(1024, kHkv);
  *step.mutable_value() = tokens(1024, kHkv);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(200)));
  const grpc::Status s = stub_->Decode(&ctx, step, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();

  // The server may still be stopping the step: retry until the lease is free.
  v1::DecodeRequest next;
  next.set_session_id(id);
  next.set_expected_context_tokens(4096);
  *next.mutable_query() = tokens(1, kHq);
  *next.mutable_key() = tokens(1, kHkv);
  *next.mutable_value() = tokens(1, kHkv);
  const absl::Time give_up = absl::Now() + absl::Seconds(2);  // the step alone needs more
  grpc::Status last;
  do {
    grpc::ClientContext next_ctx;
    last = stub_->Decode(&next_ctx, next, &resp);
  } while (last.error_code() == grpc::StatusCode::ABORTED && absl::Now() < give_up);
  ASSERT_TRUE(last.ok()) << last.error_message();
  EXPECT_EQ(resp.context_tokens(), 4097);
}

TEST_F(SessionTest, ManySessionsDecodeConcurrently) {
  ServerOptions options;
  options.scheduler.max_queue_delay_us = 2000;
  StartServer(options);
  constexpr int kSessions = 24, kSteps = 6;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < kSessions; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::string id;
      if (!Create(v1::BF16, &id).ok()) return;
      for (int step = 0; step < kSteps; ++step) {
        const int64_t n = step == 0 ? 20 : 1;
        v1::DecodeResponse resp;
        grpc::Status s =
            Decode(id, MakeTensor(v1::F32, {n, kHq, kD}, RandomBytes(rng, n * kHq * kD, DType::kF32)),
                   MakeTensor(v1::F32, {n, kHkv, kD}, RandomBytes(rng, n * kHkv * kD, DType::kF32)),
                   MakeTensor(v1::F32, {n, kHkv, kD}, RandomBytes(rng, n * kHkv * kD, DType::kF32)),
                   &resp);
        if (!s.ok() || resp.context_tokens() != 20 + step) return;
      }
      if (Close(id).ok()) ok.fetch_add(1);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), kSessions);
  EXPECT_EQ(server_->sessions().stats().sessions_active, 0);
  EXPECT_EQ(server_->sessions().stats().used_bytes, 0);
}

}  // namespace
}  // namespace attnserve
