// Shared memory over gRPC (--allow_shared_memory): Attend with its inputs in
// a registered region answers bit for bit what it answers inline (F32 and
// BF16), and with outputs.output_shm writes the output there instead of into
// the response; Decode and BatchDecode do the same with their sessions.
// Every bad reference is INVALID_ARGUMENT naming the field, registration
// errors have their codes, another caller's regions are not visible, shm
// bytes are not charged to the memory budget, and a region truncated under a
// request fails that request (FAILED_PRECONDITION) without taking the server
// down.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace attnserve {
namespace {

constexpr int64_t kLq = 24, kLk = 40, kHq = 4, kHkv = 2, kD = 32;

// A POSIX shared-memory object, mapped here as the caller maps it; unmapped
// and unlinked when destroyed.
class ShmObject {
 public:
  ShmObject(const std::string& tag, int64_t bytes)
      : key_(absl::StrCat("/attnserve_it_", tag, "_", getpid())), bytes_(bytes) {
    shm_unlink(key_.c_str());
    fd_ = shm_open(key_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd_, 0) << key_;
    EXPECT_EQ(ftruncate(fd_, bytes), 0);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    EXPECT_NE(p, MAP_FAILED);
    data_ = static_cast<char*>(p);
  }
  ~ShmObject() {
    munmap(data_, bytes_);
    close(fd_);
    shm_unlink(key_.c_str());
  }
  const std::string& key() const { return key_; }
  char* data() { return data_; }
  // Shrinks the object (the caller's mapping here is not used afterwards).
  void Truncate(int64_t bytes) { ASSERT_EQ(ftruncate(fd_, bytes), 0); }

 private:
  std::string key_;
  int64_t bytes_;
  int fd_ = -1;
  char* data_ = nullptr;
};

std::string RandomBytes(std::mt19937& rng, v1::DType dtype, int64_t elements) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::string out;
  for (int64_t i = 0; i < elements; ++i) {
    const float x = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    if (dtype == v1::BF16) {
      const uint16_t half = static_cast<uint16_t>(bits >> 16);
      out.append(reinterpret_cast<const char*>(&half), 2);
    } else {
      out.append(reinterpret_cast<const char*>(&x), 4);
    }
  }
  return out;
}

v1::Tensor Inline(v1::DType dtype, const std::vector<int64_t>& shape, std::string data) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  *t.mutable_data() = std::move(data);
  return t;
}

v1::Tensor InShm(v1::DType dtype, const std::vector<int64_t>& shape, const std::string& region,
                 int64_t offset) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.mutable_shm()->set_region(region);
  t.mutable_shm()->set_offset(offset);
  return t;
}

v1::SharedMemoryRef Ref(const std::string& region, int64_t offset) {
  v1::SharedMemoryRef ref;
  ref.set_region(region);
  ref.set_offset(offset);
  return ref;
}

// Bearer tokens of two callers (server/auth.h's file format).
constexpr char kTokens[] =
    "alice alice-0123456789abcdef\n"
    "bob bob-fedcba9876543210\n";

class ShmTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions options) {
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
  void SetUp() override {
    ServerOptions options;
    options.allow_shared_memory = true;
    StartServer(options);
  }
  void TearDown() override {
    if (server_ != nullptr) {
      grpc::ClientContext context;
      v1::UnregisterSharedMemoryResponse response;
      stub_->UnregisterSharedMemory(&context, v1::UnregisterSharedMemoryRequest(), &response);
    }
  }

  grpc::Status Register(const std::string& name, const std::string& key, int64_t offset,
                        int64_t bytes, const std::string& token = "") {
    grpc::ClientContext context;
    if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    v1::RegisterSharedMemoryRequest request;
    request.set_name(name);
    request.set_key(key);
    request.set_offset(offset);
    request.set_byte_size(bytes);
    v1::RegisterSharedMemoryResponse response;
    return stub_->RegisterSharedMemory(&context, request, &response);
  }
  grpc::Status Unregister(const std::string& name) {
    grpc::ClientContext context;
    v1::UnregisterSharedMemoryRequest request;
    request.set_name(name);
    v1::UnregisterSharedMemoryResponse response;
    return stub_->UnregisterSharedMemory(&context, request, &response);
  }
  grpc::Status Attend(const v1::AttendRequest& request, v1::AttendResponse* response,
                      const std::string& token = "") {
    grpc::ClientContext context;
    if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    return stub_->Attend(&context, request, response);
  }

  // A random causal Attend of `dtype`, inline.
  v1::AttendRequest MakeRequest(v1::DType dtype, int64_t lq = kLq, int64_t lk = kLk) {
    v1::AttendRequest r;
    r.set_backend("cpu");
    *r.mutable_query() = Inline(dtype, {1, lq, kHq, kD}, RandomBytes(rng_, dtype, lq * kHq * kD));
    *r.mutable_key() = Inline(dtype, {1, lk, kHkv, kD}, RandomBytes(rng_, dtype, lk * kHkv * kD));
    *r.mutable_value() =
        Inline(dtype, {1, lk, kHkv, kD}, RandomBytes(rng_, dtype, lk * kHkv * kD));
    r.mutable_options()->set_causal(true);
    return r;
  }

  // `request` with q, k and v moved into region `name` of `object` at
  // `offsets` (their bytes copied there).
  static v1::AttendRequest MovedToShm(const v1::AttendRequest& request, ShmObject& object,
                                      const std::string& name, const int64_t offsets[3]) {
    v1::AttendRequest moved = request;
    v1::Tensor* tensors[3] = {moved.mutable_query(), moved.mutable_key(), moved.mutable_value()};
    for (int i = 0; i < 3; ++i) {
      std::memcpy(object.data() + offsets[i], tensors[i]->data().data(), tensors[i]->data().size());
      tensors[i]->clear_data();
      tensors[i]->mutable_shm()->set_region(name);
      tensors[i]->mutable_shm()->set_offset(offsets[i]);
    }
    return moved;
  }

  // `request` answered `code`, its message containing `part`.
  void ExpectError(const v1::AttendRequest& request, grpc::StatusCode code,
                   const std::string& part, const std::string& token = "") {
    v1::AttendResponse response;
    grpc::Status s = Attend(request, &response, token);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), part))
        << "\"" << s.error_message() << "\" lacks \"" << part << "\"";
  }

  std::mt19937 rng_{20240611};
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

TEST_F(ShmTest, AttendInShmEqualsInlineBitForBit) {
  ShmObject object("attend", 1 << 20);
  ASSERT_TRUE(Register("in", object.key(), 0, 512 << 10).ok());
  ASSERT_TRUE(Register("out", object.key(), 512 << 10, 512 << 10).ok());
  for (v1::DType dtype : {v1::F32, v1::BF16}) {
    SCOPED_TRACE(v1::DType_Name(dtype));
    const v1::AttendRequest request = MakeRequest(dtype);
    v1::AttendResponse inline_response;
    ASSERT_TRUE(Attend(request, &inline_response).ok());
    const std::string& want = inline_response.output().data();
    ASSERT_FALSE(want.empty());

    // The value one byte past a 4-byte boundary: a misaligned input is read too.
    const int64_t q_bytes = request.query().data().size(), k_bytes = request.key().data().size();
    const int64_t offsets[3] = {0, q_bytes, q_bytes + k_bytes + 1};
    v1::AttendRequest shm_request = MovedToShm(request, object, "in", offsets);
    v1::AttendResponse got;
    grpc::Status s = Attend(shm_request, &got);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(got.output().data(), want);

    // The output into "out" at 64: the response carries the reference only.
    *shm_request.mutable_outputs()->mutable_output_shm() = Ref("out", 64);
    std::memset(object.data() + (512 << 10), 0x7f, want.size() + 64);
    v1::AttendResponse written;
    s = Attend(shm_request, &written);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(written.output().data().empty());
    EXPECT_EQ(written.output().shm().region(), "out");
    EXPECT_EQ(written.output().shm().offset(), 64);
    EXPECT_EQ(written.output().dtype(), dtype);
    EXPECT_EQ(std::vector<int64_t>(written.output().shape().begin(), written.output().shape().end()),
              std::vector<int64_t>(inline_response.output().shape().begin(),
                                   inline_response.output().shape().end()));
    EXPECT_EQ(std::string(object.data() + (512 << 10) + 64, want.size()), want);
    EXPECT_EQ(object.data()[(512 << 10) + 63], 0x7f);  // nothing before the place
  }
}

TEST_F(ShmTest, BadReferencesAreInvalidArgumentNamingTheField) {
  ShmObject object("bad", 1 << 17);
  ASSERT_TRUE(Register("in", object.key(), 0, 1 << 17).ok());
  const v1::AttendRequest request = MakeRequest(v1::F32);
  const int64_t q_bytes = request.query().data().size();  // 24 * 4 * 32 * 4 = 12288
  const int64_t offsets[3] = {0, 32768, 65536};
  const v1::AttendRequest good = MovedToShm(request, object, "in", offsets);
  {
    v1::AttendRequest both = good;
    both.mutable_query()->set_data(request.query().data());
    ExpectError(both, grpc::StatusCode::INVALID_ARGUMENT,
                "query: expected its bytes in data or in shm, not both");
  }
  {
    v1::AttendRequest neither = good;
    neither.mutable_query()->clear_shm();
    ExpectError(neither, grpc::StatusCode::INVALID_ARGUMENT, "query");
  }
  {
    v1::AttendRequest unknown = good;
    unknown.mutable_key()->mutable_shm()->set_region("nope");
    ExpectError(unknown, grpc::StatusCode::INVALID_ARGUMENT,
                "key.shm.region: expected a region this caller registered (RegisterSharedMemory), "
                "got 'nope'");
  }
  {
    v1::AttendRequest negative = good;
    negative.mutable_value()->mutable_shm()->set_offset(-8);
    ExpectError(negative, grpc::StatusCode::INVALID_ARGUMENT,
                "value.shm.offset: expected >= 0, got -8");
  }
  {
    v1::AttendRequest past = good;
    past.mutable_query()->mutable_shm()->set_offset((1 << 17) - 4096);
    ExpectError(past, grpc::StatusCode::INVALID_ARGUMENT,
                absl::StrCat("query.shm.offset: expected offset + ", q_bytes,
                             " bytes <= region 'in' size 131072, got offset 126976"));
  }
  {
    v1::AttendRequest huge = good;
    huge.mutable_query()->set_shape(1, int64_t{1} << 40);
    ExpectError(huge, grpc::StatusCode::INVALID_ARGUMENT, "query.shm.offset: expected offset + ");
  }
  {
    v1::AttendRequest out_past = good;
    *out_past.mutable_outputs()->mutable_output_shm() = Ref("in", (1 << 17) - 100);
    ExpectError(out_past, grpc::StatusCode::INVALID_ARGUMENT,
                "outputs.output_shm.offset: expected offset + 12288 bytes (the F32 output) <= "
                "region 'in' size 131072, got offset 130972");
  }
  {
    v1::AttendRequest misaligned = good;
    *misaligned.mutable_outputs()->mutable_output_shm() = Ref("in", 98306);
    ExpectError(misaligned, grpc::StatusCode::INVALID_ARGUMENT,
                "outputs.output_shm.offset: expected the output at a multiple of 4 bytes");
  }
  {
    v1::AttendRequest unknown_out = good;
    *unknown_out.mutable_outputs()->mutable_output_shm() = Ref("gone", 0);
    ExpectError(unknown_out, grpc::StatusCode::INVALID_ARGUMENT, "outputs.output_shm.region");
  }
  {
    // Over the key's bytes (the kernel would read what it writes), also
    // through a second region naming the same object.
    ASSERT_TRUE(Register("alias", object.key(), 32768, 16384).ok());
    for (const v1::SharedMemoryRef& place : {Ref("in", 32768 + 8), Ref("alias", 0)}) {
      v1::AttendRequest over_input = good;
      *over_input.mutable_outputs()->mutable_output_shm() = place;
      ExpectError(over_input, grpc::StatusCode::INVALID_ARGUMENT,
                  absl::StrCat("outputs.output_shm.offset: expected an output place not "
                               "overlapping the input key (bytes [32768, ",
                               32768 + request.key().data().size(), ") of ", object.key(), ")"));
    }
    ASSERT_TRUE(Unregister("alias").ok());
  }
  v1::AttendResponse response;
  EXPECT_TRUE(Attend(good, &response).ok());  // the good one still is
}

TEST_F(ShmTest, RegistrationErrors) {
  ShmObject object("reg", 8192);
  grpc::Status missing =
      Register("in", absl::StrCat("/attnserve_it_missing_", getpid()), 0, 8);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(missing.error_message(), "No such file or directory"))
      << missing.error_message();
  grpc::Status big = Register("in", object.key(), 4096, 8192);
  EXPECT_EQ(big.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << big.error_message();
  grpc::Status bad_name = Register("in/x", object.key(), 0, 8);
  EXPECT_EQ(bad_name.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bad_name.error_message(), "name: expected")) << bad_name.error_message();
  EXPECT_EQ(Register("in", "/../etc/passwd", 0, 8).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Register("in", object.key(), 0, 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  ASSERT_TRUE(Register("in", object.key(), 0, 4096).ok());
  EXPECT_EQ(Register("in", object.key(), 4096, 4096).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  ASSERT_TRUE(Register("in2", object.key(), 4096, 4096).ok());

  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_TRUE(info.limits().allow_shared_memory());
  EXPECT_EQ(info.limits().max_shm_regions(), 64);
  ASSERT_EQ(info.shm_regions_size(), 2);
  EXPECT_EQ(info.shm_regions(0).name(), "in");
  EXPECT_EQ(info.shm_regions(0).key(), object.key());
  EXPECT_EQ(info.shm_regions(1).offset(), 4096);
  EXPECT_EQ(info.shm_regions(1).byte_size(), 4096);

  EXPECT_EQ(Unregister("nope").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(Unregister("in").ok());
  EXPECT_EQ(Unregister("in").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(Unregister("").ok());
  EXPECT_EQ(Unregister("in2").error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ShmTest, CapPerCaller) {
  ServerOptions options;
  options.allow_shared_memory = true;
  options.max_shm_regions = 2;
  StartServer(options);
  ShmObject object("cap", 4096);
  ASSERT_TRUE(Register("a", object.key(), 0, 8).ok());
  ASSERT_TRUE(Register("b", object.key(), 8, 8).ok());
  grpc::Status third = Register("c", object.key(), 16, 8);
  EXPECT_EQ(third.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(third.error_message(), "--max_shm_regions"));
  EXPECT_TRUE(absl::StrContains(server_->metrics().TextFormat(), "attnserve_shm_regions 2"))
      << server_->metrics().TextFormat();
  ASSERT_TRUE(Unregister("a").ok());
  EXPECT_TRUE(Register("c", object.key(), 16, 8).ok());
}

TEST_F(ShmTest, OffByDefault) {
  StartServer(ServerOptions());
  ShmObject object("off", 1 << 17);
  grpc::Status s = Register("in", object.key(), 0, 1 << 17);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "--allow_shared_memory")) << s.error_message();
  const int64_t offsets[3] = {0, 32768, 65536};
  const v1::AttendRequest request = MovedToShm(MakeRequest(v1::F32), object, "in", offsets);
  ExpectError(request, grpc::StatusCode::FAILED_PRECONDITION,
              "query.shm: shared memory is off on this server");
  grpc::ClientContext context;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_FALSE(info.limits().allow_shared_memory());
  EXPECT_EQ(Unregister("").error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_FALSE(absl::StrContains(server_->metrics().TextFormat(), "attnserve_shm_regions"));
}

TEST_F(ShmTest, RegionsBelongToTheCallerIdentity) {
  const std::string tokens =
      absl::StrCat(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp",
                   "/attnserve_shm_tokens_", getpid());
  std::ofstream(tokens) << kTokens;
  ServerOptions options;
  options.allow_shared_memory = true;
  options.auth.auth_tokens_file = tokens;
  StartServer(options);
  std::remove(tokens.c_str());
  ShmObject object("identity", 1 << 17);
  ASSERT_TRUE(Register("in", object.key(), 0, 1 << 17, "alice-0123456789abcdef").ok());
  const int64_t offsets[3] = {0, 32768, 65536};
  const v1::AttendRequest request = MovedToShm(MakeRequest(v1::F32), object, "in", offsets);
  v1::AttendResponse response;
  grpc::Status s = Attend(request, &response, "alice-0123456789abcdef");
  EXPECT_TRUE(s.ok()) << s.error_message();
  ExpectError(request, grpc::StatusCode::INVALID_ARGUMENT,
              "query.shm.region: expected a region this caller registered", "bob-fedcba9876543210");
  // bob may use the same name for his own region.
  EXPECT_TRUE(Register("in", object.key(), 0, 4096, "bob-fedcba9876543210").ok());
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer alice-0123456789abcdef");
  v1::UnregisterSharedMemoryResponse unregistered;
  EXPECT_TRUE(stub_
                  ->UnregisterSharedMemory(&context, v1::UnregisterSharedMemoryRequest(),
                                           &unregistered)
                  .ok());
  grpc::ClientContext bob;
  bob.AddMetadata("authorization", "Bearer bob-fedcba9876543210");
  v1::UnregisterSharedMemoryRequest by_name;
  by_name.set_name("in");
  EXPECT_TRUE(stub_->UnregisterSharedMemory(&bob, by_name, &unregistered).ok());
}

TEST_F(ShmTest, BudgetDoesNotCountShmBytes) {
  // 4 MiB: 3 MiB for requests. Inline, q, k and v of 1 MiB each and the
  // output twice do not fit; in shared memory, only the scratch is reserved.
  ServerOptions options;
  options.allow_shared_memory = true;
  options.memory_limit_bytes = 4 << 20;
  options.max_request_bytes = 16 << 20;
  StartServer(options);
  const int64_t l = 512, h = 4, d = 128;
  const int64_t bytes = l * h * d * 4;  // 1 MiB
  v1::AttendRequest request;
  request.set_backend("cpu");
  *request.mutable_query() = Inline(v1::F32, {1, l, h, d}, RandomBytes(rng_, v1::F32, l * h * d));
  *request.mutable_key() = Inline(v1::F32, {1, l, h, d}, RandomBytes(rng_, v1::F32, l * h * d));
  *request.mutable_value() = Inline(v1::F32, {1, l, h, d}, RandomBytes(rng_, v1::F32, l * h * d));
  v1::AttendResponse response;
  grpc::Status s = Attend(request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();

  ShmObject object("budget", 4 * bytes);
  ASSERT_TRUE(Register("io", object.key(), 0, 4 * bytes).ok());
  const int64_t offsets[3] = {0, bytes, 2 * bytes};
  v1::AttendRequest shm_request = MovedToShm(request, object, "io", offsets);
  *shm_request.mutable_outputs()->mutable_output_shm() = Ref("io", 3 * bytes);
  s = Attend(shm_request, &response);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(response.output().data().empty());
}

TEST_F(ShmTest, TruncatedRegionFailsTheRequestAndTheServerLivesOn) {
  // Requests wait up to 2 s in the queue for a batch: time to truncate the
  // object after the request's references were checked and before the
  // kernel reads them.
  ServerOptions options;
  options.allow_shared_memory = true;
  options.scheduler.max_queue_delay_us = 2'000'000;
  StartServer(options);
  ShmObject object("truncate", 1 << 17);
  ASSERT_TRUE(Register("in", object.key(), 0, 1 << 17).ok());
  const int64_t offsets[3] = {0, 32768, 65536};
  v1::AttendRequest request = MovedToShm(MakeRequest(v1::F32), object, "in", offsets);
  *request.mutable_outputs()->mutable_output_shm() = Ref("in", 98304);

  grpc::Status status;
  std::thread call([&] {
    v1::AttendResponse response;
    status = Attend(request, &response);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  object.Truncate(0);
  call.join();
  // Either the kernel faulted on the truncated pages (the region is then
  // broken) or the check before use saw the object shrunk: both refuse.
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "region 'in'")) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "truncated")) << status.error_message();

  ExpectError(request, grpc::StatusCode::FAILED_PRECONDITION, "region 'in'");  // and after
  ASSERT_TRUE(Unregister("in").ok());

  // Truncated before use: refused at once.
  ShmObject again("truncate2", 1 << 17);
  ASSERT_TRUE(Register("in", again.key(), 0, 1 << 17).ok());
  again.Truncate(4096);
  ExpectError(request, grpc::StatusCode::FAILED_PRECONDITION,
              "region 'in' was truncated to 4096 bytes");
  // The server still serves.
  v1::AttendResponse response;
  EXPECT_TRUE(Attend(MakeRequest(v1::F32), &response).ok());
}

TEST_F(ShmTest, UnregisterWhileInFlightIsSafe) {
  ServerOptions options;
  options.allow_shared_memory = true;
  options.scheduler.max_queue_delay_us = 500'000;
  StartServer(options);
  ShmObject object("inflight", 1 << 17);
  ASSERT_TRUE(Register("in", object.key(), 0, 1 << 17).ok());
  const v1::AttendRequest inline_request = MakeRequest(v1::F32);
  v1::AttendResponse want;
  ASSERT_TRUE(Attend(inline_request, &want).ok());
  const int64_t offsets[3] = {0, 32768, 65536};
  v1::AttendRequest request = MovedToShm(inline_request, object, "in", offsets);
  *request.mutable_outputs()->mutable_output_shm() = Ref("in", 98304);

  grpc::Status status;
  v1::AttendResponse response;
  std::thread call([&] { status = Attend(request, &response); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE(Unregister("in").ok());  // the request, queued, still holds the mapping
  call.join();
  // Queued before the unregister (as the 0.5 s batch wait makes it): it
  // completes into the region it resolved.
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(std::string(object.data() + 98304, want.output().data().size()),
            want.output().data());
  EXPECT_EQ(Attend(request, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

class ShmSessionTest : public ShmTest {
 protected:
  std::string Create() {
    grpc::ClientContext context;
    v1::CreateSessionRequest request;
    request.set_num_kv_heads(kHkv);
    request.set_head_dim(kD);
    request.set_dtype(v1::F32);
    v1::CreateSessionResponse response;
    grpc::Status s = stub_->CreateSession(&context, request, &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response.session_id();
  }

  // A Decode step of `n` tokens, the query in `dtype`, inline.
  v1::DecodeRequest Step(const std::string& id, int64_t n, v1::DType dtype = v1::F32) {
    v1::DecodeRequest r;
    r.set_session_id(id);
    r.set_backend("cpu");
    *r.mutable_query() = Inline(dtype, {n, kHq, kD}, RandomBytes(rng_, dtype, n * kHq * kD));
    *r.mutable_key() = Inline(v1::F32, {n, kHkv, kD}, RandomBytes(rng_, v1::F32, n * kHkv * kD));
    *r.mutable_value() =
        Inline(v1::F32, {n, kHkv, kD}, RandomBytes(rng_, v1::F32, n * kHkv * kD));
    return r;
  }

  // q, k and v of `t` moved into region `name` at `at`, `at` + 16 KiB, + 32 KiB.
  static void MoveToShm(v1::Tensor* q, v1::Tensor* k, v1::Tensor* v, ShmObject& object,
                        const std::string& name, int64_t at) {
    v1::Tensor* tensors[3] = {q, k, v};
    for (int i = 0; i < 3; ++i) {
      const int64_t offset = at + i * 16384;
      std::memcpy(object.data() + offset, tensors[i]->data().data(), tensors[i]->data().size());
      tensors[i]->clear_data();
      *tensors[i]->mutable_shm() = Ref(name, offset);
    }
  }

  grpc::Status Decode(const v1::DecodeRequest& request, v1::DecodeResponse* response) {
    grpc::ClientContext context;
    return stub_->Decode(&context, request, response);
  }
};

TEST_F(ShmSessionTest, DecodeAndBatchDecodeInShmEqualInline) {
  ShmObject object("decode", 1 << 20);
  ASSERT_TRUE(Register("io", object.key(), 0, 1 << 20).ok());
  const std::string inline_id = Create(), shm_id = Create();
  // Steps of 20, 1 and 3 tokens; the last with a BF16 query (the output is
  // converted from the cache's F32, then written to the region).
  int64_t step_number = 0;
  for (auto [n, dtype] : {std::pair{20, v1::F32}, std::pair{1, v1::F32}, std::pair{3, v1::BF16}}) {
    SCOPED_TRACE(step_number);
    v1::DecodeRequest step = Step(inline_id, n, dtype);
    v1::DecodeResponse want, got;
    ASSERT_TRUE(Decode(step, &want).ok());
    step.set_session_id(shm_id);
    MoveToShm(step.mutable_query(), step.mutable_key(), step.mutable_value(), object, "io", 0);
    *step.mutable_outputs()->mutable_output_shm() = Ref("io", 65536);
    grpc::Status s = Decode(step, &got);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(got.output().data().empty());
    EXPECT_EQ(got.output().shm().region(), "io");
    EXPECT_EQ(got.output().dtype(), dtype);
    EXPECT_EQ(got.context_tokens(), want.context_tokens());
    EXPECT_EQ(std::string(object.data() + 65536, want.output().data().size()),
              want.output().data());
    ++step_number;
  }

  // A BatchDecode: the inline session's entry inline, the other's in shm
  // with its output there.
  v1::BatchDecodeRequest batch;
  batch.set_backend("cpu");
  const v1::DecodeRequest a = Step(inline_id, 1);
  for (int i = 0; i < 2; ++i) {
    v1::BatchDecodeEntry* e = batch.add_entries();
    e->set_session_id(i == 0 ? inline_id : shm_id);
    *e->mutable_query() = a.query();
    *e->mutable_key() = a.key();
    *e->mutable_value() = a.value();
  }
  v1::BatchDecodeEntry* e = batch.mutable_entries(1);
  MoveToShm(e->mutable_query(), e->mutable_key(), e->mutable_value(), object, "io", 131072);
  *e->mutable_output_shm() = Ref("io", 262144);
  {
    grpc::ClientContext context;
    v1::BatchDecodeResponse response;
    grpc::Status s = stub_->BatchDecode(&context, batch, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(response.results_size(), 2);
    ASSERT_EQ(response.results(0).code(), 0) << response.results(0).message();
    ASSERT_EQ(response.results(1).code(), 0) << response.results(1).message();
    const std::string& want = response.results(0).output().data();
    ASSERT_FALSE(want.empty());
    EXPECT_TRUE(response.results(1).output().data().empty());
    EXPECT_EQ(response.results(1).output().shm().offset(), 262144);
    EXPECT_EQ(std::string(object.data() + 262144, want.size()), want);
  }

  // The call-wide output_shm is refused; a bad entry fails alone.
  {
    v1::BatchDecodeRequest wrong = batch;
    *wrong.mutable_outputs()->mutable_output_shm() = Ref("io", 0);
    grpc::ClientContext context;
    v1::BatchDecodeResponse response;
    grpc::Status s = stub_->BatchDecode(&context, wrong, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StrContains(s.error_message(), "outputs.output_shm: expected unset"))
        << s.error_message();
  }
  {
    v1::BatchDecodeRequest bad = batch;
    bad.mutable_entries(1)->mutable_key()->mutable_shm()->set_region("nope");
    grpc::ClientContext context;
    v1::BatchDecodeResponse response;
    ASSERT_TRUE(stub_->BatchDecode(&context, bad, &response).ok());
    EXPECT_EQ(response.results(0).code(), 0);
    EXPECT_EQ(response.results(1).code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_TRUE(absl::StrContains(response.results(1).message(), "entries[1].key.shm.region"))
        << response.results(1).message();
  }
  {
    v1::BatchDecodeRequest bad = batch;
    *bad.mutable_entries(1)->mutable_output_shm() = Ref("io", (1 << 20) - 4);
    grpc::ClientContext context;
    v1::BatchDecodeResponse response;
    ASSERT_TRUE(stub_->BatchDecode(&context, bad, &response).ok());
    EXPECT_TRUE(absl::StrContains(response.results(1).message(), "entries[1].output_shm.offset"))
        << response.results(1).message();
  }
  // Decode's own refusals name the field too.
  {
    v1::DecodeRequest step = Step(shm_id, 1);
    *step.mutable_outputs()->mutable_output_shm() = Ref("io", 2);
    v1::DecodeResponse response;
    grpc::Status s = Decode(step, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StrContains(s.error_message(), "outputs.output_shm.offset"))
        << s.error_message();
  }
}

}  // namespace
}  // namespace attnserve
