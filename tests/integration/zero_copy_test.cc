// Attend's zero-copy path (server/wire_request.h, server/wire_response.h)
// against the protobuf path (--zero_copy=false): two servers, the same
// requests, bit-identical responses, for every input dtype, with bias,
// sparsity, optional outputs, tensors large enough to span many HTTP/2
// frames, unknown fields in the request, and malformed bytes (refused
// INVALID_ARGUMENT by both).
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/half.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace attnserve {
namespace {

constexpr char kAttendMethod[] = "/attnserve.v1.AttentionService/Attend";

struct Served {
  std::unique_ptr<Server> server;
  std::shared_ptr<grpc::Channel> channel;
};

Served Start(bool zero_copy) {
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_listen_address = "";
  options.backend_threads = 2;
  options.zero_copy = zero_copy;
  Served s;
  auto server = Server::Create(options);
  EXPECT_TRUE(server.ok()) << server.status();
  s.server = *std::move(server);
  EXPECT_TRUE(s.server->Start().ok());
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  s.channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", s.server->port()),
                                        grpc::InsecureChannelCredentials(), args);
  return s;
}

// `n` values in the dtype's encoding, drawn from N(0, 1).
std::string RandomBytes(std::mt19937& rng, v1::DType dtype, int64_t n) {
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t size = dtype == v1::F32 ? 4 : 2;
  std::string out(static_cast<size_t>(n) * size, '\0');
  for (int64_t i = 0; i < n; ++i) {
    const float x = normal(rng);
    if (dtype == v1::F32) {
      std::memcpy(&out[i * 4], &x, 4);
    } else {
      const uint16_t h = dtype == v1::F16 ? FloatToHalf(x) : FloatToBf16(x);
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

v1::Tensor MakeTensor(std::mt19937& rng, v1::DType dtype, std::vector<int64_t> shape) {
  v1::Tensor t;
  t.set_dtype(dtype);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  t.set_data(RandomBytes(rng, dtype, n));
  return t;
}

v1::AttendRequest MakeRequest(v1::DType dtype, int64_t batch, int64_t lq, int64_t lk, int64_t hq,
                              int64_t hkv, int64_t d, uint32_t seed = 1) {
  std::mt19937 rng(seed);
  v1::AttendRequest r;
  r.set_request_id("zero-copy");
  *r.mutable_query() = MakeTensor(rng, dtype, {batch, lq, hq, d});
  *r.mutable_key() = MakeTensor(rng, dtype, {batch, lk, hkv, d});
  *r.mutable_value() = MakeTensor(rng, dtype, {batch, lk, hkv, d});
  return r;
}

// The call's status, and its response's bytes as they came.
struct RawResult {
  grpc::Status status;
  std::string bytes;
};

RawResult CallRaw(grpc::Channel* channel, const std::string& request_bytes) {
  grpc::GenericStub stub(channel->shared_from_this());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  RawResult result;
  absl::Notification done;
  stub.UnaryCall(&context, kAttendMethod, grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   result.status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  if (result.status.ok()) {
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(response.Dump(&slices).ok());
    for (const grpc::Slice& s : slices) {
      result.bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  return result;
}

class ZeroCopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    zero_copy_ = Start(true);
    copying_ = Start(false);
  }

  // Sends `bytes` to both servers; the responses must match field for field
  // (timing aside) and the output tensors bit for bit.
  void ExpectSame(const std::string& bytes) {
    RawResult a = CallRaw(zero_copy_.channel.get(), bytes);
    RawResult b = CallRaw(copying_.channel.get(), bytes);
    ASSERT_EQ(a.status.error_code(), b.status.error_code())
        << a.status.error_message() << " | " << b.status.error_message();
    ASSERT_TRUE(a.status.ok()) << a.status.error_message();
    v1::AttendResponse ra, rb;
    ASSERT_TRUE(ra.ParseFromString(a.bytes));
    ASSERT_TRUE(rb.ParseFromString(b.bytes));
    ra.clear_timing();
    rb.clear_timing();
    EXPECT_GT(ra.output().data().size(), 0u);
    EXPECT_EQ(ra.output().data(), rb.output().data());
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(ra, rb));
    // What the typed stub gets is the same message.
    v1::AttendRequest request;
    ASSERT_TRUE(request.ParseFromString(bytes));
    auto stub = v1::AttentionService::NewStub(zero_copy_.channel);
    grpc::ClientContext context;
    v1::AttendResponse typed;
    ASSERT_TRUE(stub->Attend(&context, request, &typed).ok());
    typed.clear_timing();
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(typed, rb));
  }

  // Sends malformed `bytes`: both servers refuse them INVALID_ARGUMENT.
  void ExpectRefused(const std::string& bytes) {
    for (Served* s : {&zero_copy_, &copying_}) {
      RawResult r = CallRaw(s->channel.get(), bytes);
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
          << r.status.error_message();
    }
  }

  Served zero_copy_;
  Served copying_;
};

TEST_F(ZeroCopyTest, EveryDtypeGivesTheSameBits) {
  for (v1::DType dtype : {v1::F32, v1::F16, v1::BF16}) {
    SCOPED_TRACE(v1::DType_Name(dtype));
    ExpectSame(MakeRequest(dtype, 2, 64, 96, 4, 2, 64).SerializeAsString());
  }
}

TEST_F(ZeroCopyTest, BiasAndOptionalOutputs) {
  std::mt19937 rng(5);
  v1::AttendRequest r = MakeRequest(v1::F32, 1, 32, 48, 4, 4, 32);
  *r.mutable_bias() = MakeTensor(rng, v1::F32, {1, 4, 32, 48});
  r.mutable_options()->set_causal(true);
  r.mutable_outputs()->set_lse(true);
  r.mutable_outputs()->set_weights(true);
  r.mutable_outputs()->set_entropy(true);
  r.mutable_outputs()->set_top_k(4);
  ExpectSame(r.SerializeAsString());
}

TEST_F(ZeroCopyTest, Sparsity) {
  v1::AttendRequest r = MakeRequest(v1::BF16, 1, 64, 64, 2, 2, 64);
  v1::KeySelection* ks = r.mutable_sparsity()->mutable_key_indices();
  ks->mutable_indices()->set_dtype(v1::I32);
  for (int64_t d : {1, 1, 64, 4}) ks->mutable_indices()->add_shape(d);
  std::string indices;
  for (int i = 0; i < 64; ++i) {
    for (int32_t k : {i % 64, (i + 1) % 64, (i + 7) % 64, (i + 30) % 64})
      indices.append(reinterpret_cast<const char*>(&k), 4);
  }
  ks->mutable_indices()->set_data(indices);
  r.mutable_sparsity()->add_global_tokens(0);
  ExpectSame(r.SerializeAsString());
}

TEST_F(ZeroCopyTest, LargeTensorsSpanManyFrames) {
  // 4 MiB each of key and value: hundreds of 16 KiB HTTP/2 frames.
  ExpectSame(MakeRequest(v1::F32, 1, 64, 1024, 8, 8, 128).SerializeAsString());
}

TEST_F(ZeroCopyTest, UnknownAndRepeatedFields) {
  v1::AttendRequest r = MakeRequest(v1::F16, 1, 16, 16, 2, 2, 32);
  std::string bytes = r.SerializeAsString();
  bytes += std::string("\x98\x06\x2a", 3);    // unknown varint field 99
  bytes += std::string("\xb2\x06\x02hi", 5);  // unknown bytes field 102
  bytes += std::string("\x12\x02\x48\x07",
                       4);  // query { 9: 7 }: unknown inside a tensor
  v1::AttendRequest options;
  options.mutable_options()->set_scale(0.5f);  // a second occurrence, merged
  bytes += options.SerializeAsString();
  ExpectSame(bytes);
}

TEST_F(ZeroCopyTest, MalformedBytesAreInvalidArgument) {
  const std::string good = MakeRequest(v1::F32, 1, 8, 8, 2, 2, 16).SerializeAsString();
  ExpectRefused(good.substr(0, good.size() - 7));                    // cut short
  ExpectRefused(good + std::string("\x08\xff\xff\xff", 4));          // truncated varint
  ExpectRefused(good + std::string("\x12\x7f\x1a\x04\x61\x62", 6));  // length past the end
  ExpectRefused(good + std::string("\x12\x03\x1a\x05\x00", 5));      // data past its tensor
  ExpectRefused(std::string("\x0a\x02\xff\xfe", 4) + good);          // request_id not UTF-8
  // A wrong wire type for a tensor field is an unknown field to protobuf:
  // both servers then see no query and say so.
  for (Served* s : {&zero_copy_, &copying_}) {
    RawResult r = CallRaw(s->channel.get(), std::string("\x10\x05", 2));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
}

}  // namespace
}  // namespace attnserve
