// Attention layers from weights over gRPC, on the golden models of
// tests/golden/models: concurrent AttendLayer calls share one backend call
// and its projections, the memory budget and the cost limit bound them,
// errors name the field, model sessions batch their steps' projections, and
// a model that does not load stops the server.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/npy.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace attnserve {
namespace {

using ::testing::HasSubstr;

std::string ModelDir(const std::string& name) {
  return (std::filesystem::path(ATTNSERVE_GOLDEN_DIR) / "models" / name).string();
}

Tensor MustRead(const std::string& path) {
  absl::StatusOr<Tensor> t = ReadNpy(path);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : Tensor{};
}

v1::Tensor ToProto(const std::vector<int64_t>& shape, std::string_view f32) {
  v1::Tensor t;
  t.set_dtype(v1::F32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::string(f32));
  return t;
}

// Largest |got - want| over the largest |want|, both F32 bytes.
double RelativeError(std::string_view got, std::string_view want) {
  EXPECT_EQ(got.size(), want.size());
  const size_t n = std::min(got.size(), want.size()) / 4;
  double err = 0, scale = 0;
  for (size_t i = 0; i < n; ++i) {
    float g, w;
    std::memcpy(&g, got.data() + 4 * i, 4);
    std::memcpy(&w, want.data() + 4 * i, 4);
    err = std::max(err, std::abs(static_cast<double>(g) - w));
    scale = std::max(scale, std::abs(static_cast<double>(w)));
  }
  return err / scale;
}

class LayerTest : public ::testing::Test {
 protected:
  void Start(ServerOptions options) {
    options.listen_address = "127.0.0.1:0";
    options.metrics_listen_address = "";
    options.backend_threads = 2;
    options.models = {{"mistral", ModelDir("mistral_window")}, {"bert", ModelDir("bert_cross")}};
    auto server = Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_TRUE(server_->Start().ok());
    stub_ = v1::AttentionService::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", server_->port()), grpc::InsecureChannelCredentials()));
  }

  grpc::Status Layer(const v1::AttendLayerRequest& request, v1::AttendLayerResponse* response) {
    grpc::ClientContext ctx;
    return stub_->AttendLayer(&ctx, request, response);
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

TEST_F(LayerTest, ConcurrentCallsShareOneBackendCallAndMatchTheReference) {
  ServerOptions options;
  options.scheduler.max_queue_delay_us = 300'000;  // room for all four to arrive
  options.scheduler.max_batch_size = 4;
  Start(options);
  const Tensor x = MustRead(ModelDir("mistral_window") + "/x.npy");  // [2, 7, 64]
  const Tensor expected = MustRead(ModelDir("mistral_window") + "/expected_layer1.npy");
  const int64_t row = 7 * 64 * 4;
  // Each batch row twice, as its own call.
  std::vector<v1::AttendLayerResponse> responses(4);
  std::vector<grpc::Status> status(4);
  std::vector<std::thread> callers;
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&, i] {
      v1::AttendLayerRequest request;
      request.set_model("mistral");
      request.set_layer(1);
      *request.mutable_x() = ToProto({7, 64}, std::string_view(x.data).substr((i % 2) * row, row));
      status[i] = Layer(request, &responses[i]);
    });
  }
  for (std::thread& t : callers) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(status[i].ok()) << status[i].error_message();
    EXPECT_EQ(responses[i].timing().batch_size(), 4) << "call " << i;
    EXPECT_LE(RelativeError(responses[i].y().data(),
                            std::string_view(expected.data).substr((i % 2) * row, row)),
              2e-6)
        << "call " << i;
    EXPECT_THAT(responses[i].y().shape(), ::testing::ElementsAre(7, 64));
  }
}

TEST_F(LayerTest, TheMemoryBudgetAndTheCostLimitBoundACall) {
  ServerOptions options;
  options.memory_limit_bytes = int64_t{4} << 20;  // 3 MiB for requests
  options.max_request_flops = 0;
  Start(options);
  v1::AttendLayerRequest request;
  request.set_model("bert");
  // 2048 tokens: a 384 KiB x whose F32 copy, q/k/v, y, outputs and the
  // stage's gathered copies need more than the 3 MiB.
  *request.mutable_x() = ToProto({2048, 48}, std::string(2048 * 48 * 4, '\0'));
  v1::AttendLayerResponse response;
  grpc::Status s = Layer(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("memory"));
  *request.mutable_x() = ToProto({256, 48}, std::string(256 * 48 * 4, '\0'));
  s = Layer(request, &response);
  EXPECT_TRUE(s.ok()) << s.error_message();

  // The cost counts the projections with the attention.
  options = ServerOptions{};
  options.max_request_flops = 3e8;
  Start(options);
  *request.mutable_x() = ToProto({1024, 48}, std::string(1024 * 48 * 4, '\0'));
  s = Layer(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("max_request_flops"));
  *request.mutable_x() = ToProto({256, 48}, std::string(256 * 48 * 4, '\0'));
  s = Layer(request, &response);
  EXPECT_TRUE(s.ok()) << s.error_message();
}

TEST_F(LayerTest, ErrorsNameTheField) {
  Start(ServerOptions{});
  v1::AttendLayerRequest request;
  v1::AttendLayerResponse response;
  request.set_model("nope");
  *request.mutable_x() = ToProto({1, 48}, std::string(48 * 4, '\0'));
  grpc::Status s = Layer(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("expected one of the loaded models mistral, bert"));
  request.set_model("bert");
  request.set_layer(2);
  s = Layer(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("layer: expected a layer in [0, 2)"));
  request.set_layer(0);
  *request.mutable_x() = ToProto({1, 64}, std::string(64 * 4, '\0'));
  s = Layer(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("x.shape: expected [B, L, 48] or [L, 48]"));
  request.set_model("mistral");
  *request.mutable_memory() = ToProto({1, 64}, std::string(64 * 4, '\0'));
  s = Layer(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("memory: expected none"));

  v1::GetServerInfoRequest info_request;
  v1::ServerInfo info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->GetServerInfo(&ctx, info_request, &info).ok());
  ASSERT_EQ(info.models_size(), 2);
  EXPECT_EQ(info.models(0).name(), "mistral");
  EXPECT_EQ(info.models(0).family(), "llama");
  EXPECT_EQ(info.models(0).num_kv_heads(), 2);
  EXPECT_EQ(info.models(0).sliding_window(), 4);
  EXPECT_TRUE(info.models(0).has_rotary());
  EXPECT_EQ(info.models(1).family(), "bert");
  EXPECT_TRUE(info.models(1).cross_attention());
  EXPECT_GT(info.models(1).weight_bytes(), 0);
}

TEST_F(LayerTest, ModelSessionStepsBatchTheirProjections) {
  Start(ServerOptions{});
  const Tensor x = MustRead(ModelDir("mistral_window") + "/x.npy");
  const Tensor expected[2] = {MustRead(ModelDir("mistral_window") + "/expected_layer0.npy"),
                              MustRead(ModelDir("mistral_window") + "/expected_layer1.npy")};
  const int64_t token = 64 * 4, row = 7 * token;
  std::string sessions[2];
  for (std::string& id : sessions) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest request;
    request.set_model("mistral");
    v1::CreateSessionResponse response;
    ASSERT_TRUE(stub_->CreateSession(&ctx, request, &response).ok());
    EXPECT_EQ(response.num_layers(), 2);
    id = response.session_id();
  }
  // Every token of both rows, one BatchDecode per layer-step.
  for (int64_t t = 0; t < 7; ++t) {
    for (int32_t layer = 0; layer < 2; ++layer) {
      v1::BatchDecodeRequest request;
      request.set_layer(layer);
      for (int b = 0; b < 2; ++b) {
        v1::BatchDecodeEntry* e = request.add_entries();
        e->set_session_id(sessions[b]);
        *e->mutable_hidden() =
            ToProto({1, 64}, std::string_view(x.data).substr(b * row + t * token, token));
      }
      grpc::ClientContext ctx;
      v1::BatchDecodeResponse response;
      ASSERT_TRUE(stub_->BatchDecode(&ctx, request, &response).ok());
      for (int b = 0; b < 2; ++b) {
        const v1::BatchDecodeResult& r = response.results(b);
        ASSERT_EQ(r.code(), 0) << r.message();
        EXPECT_LE(RelativeError(r.output().data(), std::string_view(expected[layer].data)
                                                       .substr(b * row + t * token, token)),
                  2e-6)
            << "token " << t << " layer " << layer << " row " << b;
      }
    }
  }
  // A model session takes hidden states, a plain one does not.
  v1::DecodeRequest decode;
  decode.set_session_id(sessions[0]);
  *decode.mutable_query() = ToProto({1, 4, 16}, std::string(4 * 16 * 4, '\0'));
  grpc::ClientContext ctx;
  v1::DecodeResponse response;
  grpc::Status s = stub_->Decode(&ctx, decode, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("hidden: expected the hidden states"));
}

TEST(LayerServerTest, AModelThatDoesNotLoadStopsTheServer) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "attnserve_layer_test_model";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(ModelDir("mistral_window") + "/config.json", dir / "config.json");
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_listen_address = "";
  options.models = {{"broken", dir.string()}};
  auto server = Server::Create(options);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(server.status().message(), HasSubstr("--model=broken="));
  EXPECT_THAT(server.status().message(), HasSubstr("no *.safetensors files"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace attnserve
