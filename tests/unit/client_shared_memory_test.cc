// SharedMemoryRegion (create, open, views, unlink) and the wire form of calls
// whose tensors lie in shared memory (CallOptions::shm, SessionStep::shm):
// references instead of bytes, outputs read back from the response. Then
// AttnClient and a load run with LoadShmRegions against an in-process fake
// server that maps the caller's objects and echoes the query into the output.
#include "client/shared_memory.h"

#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/convert.h"
#include "client/load_generator.h"
#include "client/load_shm.h"
#include "client/shapes.h"

namespace attnserve::client {
namespace {

using ::testing::HasSubstr;

bool ShmExists(const std::string& key) { return std::filesystem::exists("/dev/shm" + key); }

TensorView F32View(const std::vector<float>& values, std::vector<int64_t> shape) {
  return TensorView{DType::kF32, std::move(shape),
                    std::string_view(reinterpret_cast<const char*>(values.data()),
                                     values.size() * sizeof(float))};
}

TEST(SharedMemoryRegionTest, CreateMapsZeroedBytesWithTheModeAndUnlinksOnDestruction) {
  const std::string key = SharedMemoryRegion::UniqueKey("attn_test");
  {
    absl::StatusOr<SharedMemoryRegion> region = SharedMemoryRegion::Create(key, 4096, 0600);
    ASSERT_TRUE(region.ok()) << region.status();
    EXPECT_EQ(region->key(), key);
    EXPECT_EQ(region->byte_size(), 4096);
    EXPECT_TRUE(region->owner());
    EXPECT_TRUE(ShmExists(key));
    struct stat st;
    ASSERT_EQ(stat(("/dev/shm" + key).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    for (char c : region->bytes()) ASSERT_EQ(c, 0);

    // A second Create of the name is refused and leaves the first alone.
    absl::StatusOr<SharedMemoryRegion> again = SharedMemoryRegion::Create(key, 16);
    EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
    EXPECT_THAT(again.status().message(), HasSubstr(key));
    EXPECT_TRUE(ShmExists(key));

    // Moved, the mapping and the ownership go along.
    region->bytes()[7] = 42;
    SharedMemoryRegion moved = *std::move(region);
    EXPECT_EQ(moved.bytes()[7], 42);
    EXPECT_TRUE(moved.owner());
  }
  EXPECT_FALSE(ShmExists(key));
}

TEST(SharedMemoryRegionTest, OpenSeesTheOwnersBytesAndDoesNotUnlink) {
  const std::string key = SharedMemoryRegion::UniqueKey("attn_test");
  absl::StatusOr<SharedMemoryRegion> owner = SharedMemoryRegion::Create(key, 256);
  ASSERT_TRUE(owner.ok()) << owner.status();
  std::memcpy(owner->bytes().data() + 100, "hello", 5);
  {
    absl::StatusOr<SharedMemoryRegion> other = SharedMemoryRegion::Open(key);
    ASSERT_TRUE(other.ok()) << other.status();
    EXPECT_FALSE(other->owner());
    EXPECT_EQ(other->byte_size(), 256);
    EXPECT_EQ(std::string(other->bytes().data() + 100, 5), "hello");
    other->bytes()[0] = 'x';
  }
  EXPECT_TRUE(ShmExists(key));
  EXPECT_EQ(owner->bytes()[0], 'x');
  ASSERT_TRUE(owner->Unlink().ok());
  EXPECT_FALSE(ShmExists(key));
  EXPECT_FALSE(owner->owner());

  absl::StatusOr<SharedMemoryRegion> gone = SharedMemoryRegion::Open(key);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
}

TEST(SharedMemoryRegionTest, BadKeysAndSizesAreRefusedNamingTheField) {
  for (const char* key : {"", "/", "noslash", "/a/b", "/sp ace", "/.."}) {
    absl::StatusOr<SharedMemoryRegion> r = SharedMemoryRegion::Create(key, 16);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_THAT(r.status().message(), HasSubstr("key: expected")) << key;
  }
  EXPECT_FALSE(CheckShmKey("/" + std::string(255, 'a')).ok());
  EXPECT_TRUE(CheckShmKey("/" + std::string(254, 'a')).ok());
  absl::StatusOr<SharedMemoryRegion> empty =
      SharedMemoryRegion::Create(SharedMemoryRegion::UniqueKey("attn_test"), 0);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("byte_size"));
}

TEST(SharedMemoryRegionTest, WriteViewAndReadStayInsideTheRegion) {
  absl::StatusOr<SharedMemoryRegion> region =
      SharedMemoryRegion::Create(SharedMemoryRegion::UniqueKey("attn_test"), 64);
  ASSERT_TRUE(region.ok()) << region.status();
  const std::vector<float> values = {1.5f, -2.f, 3.25f, 4.f};
  absl::StatusOr<TensorView> written = region->Write(16, F32View(values, {2, 2}));
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(written->data.data(), region->bytes().data() + 16);
  EXPECT_EQ(written->shape, (std::vector<int64_t>{2, 2}));

  absl::StatusOr<Tensor> read = region->Read(16, DType::kF32, {4});
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(0, std::memcmp(read->data.data(), values.data(), 16));

  // Exactly to the end fits; one element more, or a negative offset, does not.
  EXPECT_TRUE(region->View(48, DType::kF32, {4}).ok());
  for (int64_t offset : {int64_t{52}, int64_t{-4}, int64_t{65}}) {
    absl::StatusOr<TensorView> v = region->View(offset, DType::kF32, {4});
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument) << offset;
    EXPECT_THAT(v.status().message(), HasSubstr("offset: expected room for 16 bytes"));
  }
  EXPECT_FALSE(region->Write(0, F32View(values, {3})).ok());  // bytes do not match the shape
  EXPECT_FALSE(region->View(0, DType::kF32, {-1}).ok());
}

TEST(ClientShmConvertTest, AttendTensorsInSharedMemoryAreReferencesWithoutBytes) {
  const std::vector<float> q(2 * 3 * 4, 1.f), k(2 * 5 * 4, 2.f), bias(5, 0.f);
  AttentionRequest request;
  request.query = F32View(q, {1, 2, 3, 4});
  request.key = F32View(k, {1, 5, 2, 4});
  request.value = F32View(k, {1, 5, 2, 4});
  request.bias = F32View(bias, {5});
  CallOptions call;
  call.shm.query = ShmRef{"in", 0};
  call.shm.value = ShmRef{"in", 4096};
  call.shm.output = ShmRef{"out", 128};
  const v1::AttendRequest wire = ToProto(request, call);

  EXPECT_TRUE(wire.query().data().empty());
  EXPECT_EQ(wire.query().dtype(), v1::F32);
  EXPECT_THAT(wire.query().shape(), ::testing::ElementsAre(1, 2, 3, 4));
  EXPECT_EQ(wire.query().shm().region(), "in");
  EXPECT_EQ(wire.query().shm().offset(), 0);
  EXPECT_EQ(wire.value().shm().offset(), 4096);
  EXPECT_TRUE(wire.value().data().empty());
  // Tensors not named stay in the message.
  EXPECT_FALSE(wire.key().has_shm());
  EXPECT_EQ(wire.key().data().size(), k.size() * 4);
  EXPECT_FALSE(wire.bias().has_shm());
  EXPECT_EQ(wire.outputs().output_shm().region(), "out");
  EXPECT_EQ(wire.outputs().output_shm().offset(), 128);

  // Without shm the request is what it always was.
  const v1::AttendRequest inline_wire = ToProto(request, CallOptions{});
  EXPECT_FALSE(inline_wire.query().has_shm());
  EXPECT_FALSE(inline_wire.outputs().has_output_shm());
}

TEST(ClientShmConvertTest, OutputInSharedMemoryComesBackAsDtypeShapeAndPlace) {
  v1::AttendResponse response;
  response.mutable_output()->set_dtype(v1::BF16);
  response.mutable_output()->add_shape(2);
  response.mutable_output()->add_shape(8);
  response.mutable_output()->mutable_shm()->set_region("out");
  response.mutable_output()->mutable_shm()->set_offset(64);
  absl::StatusOr<AttendResult> result = FromProto(std::move(response));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.dtype, DType::kBF16);
  EXPECT_EQ(result->output.shape, (std::vector<int64_t>{2, 8}));
  EXPECT_TRUE(result->output.data.empty());
  ASSERT_TRUE(result->output_shm.has_value());
  EXPECT_EQ(result->output_shm->region, "out");
  EXPECT_EQ(result->output_shm->offset, 64);

  // An inline output has no place.
  v1::AttendResponse plain;
  plain.mutable_output()->set_dtype(v1::F32);
  plain.mutable_output()->add_shape(1);
  plain.mutable_output()->set_data(std::string(4, '\0'));
  absl::StatusOr<AttendResult> inline_result = FromProto(std::move(plain));
  ASSERT_TRUE(inline_result.ok()) << inline_result.status();
  EXPECT_FALSE(inline_result->output_shm.has_value());

  // Bytes beside a reference are malformed.
  v1::DecodeResponse both;
  both.mutable_output()->set_dtype(v1::F32);
  both.mutable_output()->add_shape(1);
  both.mutable_output()->set_data(std::string(4, '\0'));
  both.mutable_output()->mutable_shm()->set_region("out");
  absl::StatusOr<DecodeResult> bad = FromProto(std::move(both));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("output.data: expected none beside shm"));
}

TEST(ClientShmConvertTest, DecodeAndBatchEntriesCarryTheirOwnReferences) {
  const std::vector<float> q(4, 1.f), kv(8, 2.f);
  DecodeStep step;
  step.query = F32View(q, {1, 1, 4});
  step.key = F32View(kv, {1, 2, 4});
  step.value = F32View(kv, {1, 2, 4});
  CallOptions call;
  call.shm.key = ShmRef{"kv", 32};
  call.shm.output = ShmRef{"out", 0};
  const v1::DecodeRequest decode = ToProto("s1", step, call);
  EXPECT_EQ(decode.key().shm().region(), "kv");
  EXPECT_TRUE(decode.key().data().empty());
  EXPECT_EQ(decode.query().data().size(), 16u);
  EXPECT_EQ(decode.outputs().output_shm().region(), "out");

  std::vector<SessionStep> steps(2);
  for (int i = 0; i < 2; ++i) {
    steps[i].session_id = absl::StrCat("s", i);
    steps[i].step = step;
    steps[i].shm.query = ShmRef{"in", i * 16};
    steps[i].shm.output = ShmRef{"out", i * 64};
  }
  absl::StatusOr<v1::BatchDecodeRequest> batch = ToProto(0, steps, CallOptions{});
  ASSERT_TRUE(batch.ok()) << batch.status();
  for (int i = 0; i < 2; ++i) {
    const v1::BatchDecodeEntry& e = batch->entries(i);
    EXPECT_EQ(e.query().shm().offset(), i * 16);
    EXPECT_TRUE(e.query().data().empty());
    EXPECT_FALSE(e.key().has_shm());
    EXPECT_EQ(e.output_shm().region(), "out");
    EXPECT_EQ(e.output_shm().offset(), i * 64);
  }
  EXPECT_FALSE(batch->outputs().has_output_shm());

  // The batch's CallOptions::shm has no entry to belong to.
  absl::StatusOr<v1::BatchDecodeRequest> refused = ToProto(0, steps, call);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("call.shm"));
}

TEST(ClientShmConvertTest, BatchResultsKeepEachEntrysOutputPlace) {
  v1::BatchDecodeResponse response;
  for (int i = 0; i < 2; ++i) {
    v1::Tensor* out = response.add_results()->mutable_output();
    out->set_dtype(v1::F32);
    out->add_shape(1);
    out->add_shape(4);
    out->mutable_shm()->set_region("out");
    out->mutable_shm()->set_offset(i * 64);
  }
  absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> results =
      FromProto(std::move(response), 2);
  ASSERT_TRUE(results.ok()) << results.status();
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE((*results)[i].ok()) << (*results)[i].status();
    EXPECT_EQ((*results)[i]->output_shm->offset, i * 64);
    EXPECT_TRUE((*results)[i]->output.data.empty());
  }
}

// Maps what callers register (one caller) and answers Attend with the
// query as the output, read from and written to the regions when the
// request names them.
class FakeShmService final : public v1::AttentionService::Service {
 public:
  grpc::Status RegisterSharedMemory(grpc::ServerContext*,
                                    const v1::RegisterSharedMemoryRequest* request,
                                    v1::RegisterSharedMemoryResponse*) override {
    absl::StatusOr<SharedMemoryRegion> region = SharedMemoryRegion::Open(request->key());
    if (!region.ok()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          std::string(region.status().message()));
    }
    absl::MutexLock lock(&mu_);
    if (regions_.contains(request->name())) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, request->name());
    }
    regions_.emplace(request->name(), *std::move(region));
    ++registered_;
    return grpc::Status::OK;
  }

  grpc::Status UnregisterSharedMemory(grpc::ServerContext*,
                                      const v1::UnregisterSharedMemoryRequest* request,
                                      v1::UnregisterSharedMemoryResponse*) override {
    absl::MutexLock lock(&mu_);
    if (regions_.erase(request->name()) == 0) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, request->name());
    }
    return grpc::Status::OK;
  }

  grpc::Status Attend(grpc::ServerContext*, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override {
    absl::MutexLock lock(&mu_);
    const v1::Tensor& q = request->query();
    std::string bytes = q.data();
    if (q.has_shm()) {
      auto it = regions_.find(q.shm().region());
      if (it == regions_.end()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "query");
      const int64_t n = CheckedElementCount({q.shape().begin(), q.shape().end()}) * 4;
      bytes.assign(it->second.bytes().data() + q.shm().offset(), n);
    }
    v1::Tensor* out = response->mutable_output();
    out->set_dtype(q.dtype());
    *out->mutable_shape() = q.shape();
    if (request->outputs().has_output_shm()) {
      const v1::SharedMemoryRef& at = request->outputs().output_shm();
      auto it = regions_.find(at.region());
      if (it == regions_.end()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "output");
      std::memcpy(it->second.bytes().data() + at.offset(), bytes.data(), bytes.size());
      *out->mutable_shm() = at;
    } else {
      out->set_data(bytes);
    }
    return grpc::Status::OK;
  }

  int64_t regions() {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(regions_.size());
  }
  int64_t registered() {
    absl::MutexLock lock(&mu_);
    return registered_;
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, SharedMemoryRegion> regions_ ABSL_GUARDED_BY(mu_);
  int64_t registered_ ABSL_GUARDED_BY(mu_) = 0;
};

class ClientShmFakeServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    for (int i = 0; i < 2; ++i) {
      ClientOptions options;
      options.dedicated_connection = true;
      absl::StatusOr<std::unique_ptr<AttnClient>> c =
          AttnClient::Create(absl::StrCat("127.0.0.1:", port), options);
      ASSERT_TRUE(c.ok()) << c.status();
      clients_.push_back(*std::move(c));
    }
  }

  void TearDown() override {
    clients_.clear();
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  }

  FakeShmService service_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::unique_ptr<AttnClient>> clients_;
};

TEST_F(ClientShmFakeServerTest, AttendReadsInputsFromAndWritesTheOutputToTheRegion) {
  AttnClient& client = *clients_[0];
  absl::StatusOr<SharedMemoryRegion> region =
      SharedMemoryRegion::Create(SharedMemoryRegion::UniqueKey("attn_test"), 1024);
  ASSERT_TRUE(region.ok()) << region.status();
  ASSERT_TRUE(client.RegisterSharedMemory("io", *region).ok());
  EXPECT_EQ(client.RegisterSharedMemory("io", *region).code(), absl::StatusCode::kAlreadyExists);

  const Tensor q = RandomTensor(DType::kF32, {1, 2, 2, 4}, 7);
  const Tensor k = RandomTensor(DType::kF32, {1, 3, 2, 4}, 8);
  absl::StatusOr<TensorView> q_in_region = region->Write(0, q.view());
  ASSERT_TRUE(q_in_region.ok()) << q_in_region.status();
  AttentionRequest request;
  request.query = *q_in_region;
  request.key = k.view();
  request.value = k.view();
  CallOptions call;
  call.shm.query = ShmRef{"io", 0};
  call.shm.output = ShmRef{"io", 512};
  absl::StatusOr<AttendResult> result = client.Attend(request, call);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(result->output_shm.has_value());
  EXPECT_EQ(result->output_shm->offset, 512);
  EXPECT_TRUE(result->output.data.empty());
  absl::StatusOr<TensorView> out =
      region->View(result->output_shm->offset, result->output.dtype, result->output.shape);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->data, q.data);

  ASSERT_TRUE(client.UnregisterSharedMemory("io").ok());
  EXPECT_EQ(client.UnregisterSharedMemory("io").code(), absl::StatusCode::kNotFound);
}

TEST_F(ClientShmFakeServerTest, LoadRunRegistersOneRegionPerConnectionAndReleasesThem) {
  const Tensor q = RandomTensor(DType::kF32, {1, 4, 2, 8}, 1);
  const Tensor k = RandomTensor(DType::kF32, {1, 6, 2, 8}, 2);
  AttentionRequest request;
  request.query = q.view();
  request.key = k.view();
  request.value = k.view();
  const v1::AttendRequest wire = ToProto(request, CallOptions{});
  std::vector<AttnClient*> clients = {clients_[0].get(), clients_[1].get()};
  absl::StatusOr<std::unique_ptr<LoadShmRegions>> shm = LoadShmRegions::Create(clients, wire);
  ASSERT_TRUE(shm.ok()) << shm.status();
  EXPECT_EQ(service_.regions(), 2);
  const std::vector<v1::AttendRequest>& requests = (*shm)->requests();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_NE(requests[0].query().shm().region(), requests[1].query().shm().region());
  for (const v1::AttendRequest& r : requests) {
    for (const v1::Tensor* t : {&r.query(), &r.key(), &r.value()}) {
      EXPECT_TRUE(t->has_shm());
      EXPECT_TRUE(t->data().empty());
      EXPECT_EQ(t->shm().offset() % 64, 0);
    }
    EXPECT_EQ(r.outputs().output_shm().region(), r.query().shm().region());
    EXPECT_GE(r.outputs().output_shm().offset(), r.value().shm().offset() + 6 * 2 * 8 * 4);
  }

  LoadOptions options;
  options.concurrency = 4;
  options.duration = absl::Milliseconds(200);
  absl::StatusOr<LoadReport> report = RunLoad(clients, requests, options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GT(report->latency.ok, 0);
  EXPECT_EQ(report->latency.errors_total, 0);

  ASSERT_TRUE((*shm)->Release().ok());
  EXPECT_EQ(service_.regions(), 0);
  EXPECT_TRUE((*shm)->Release().ok());  // idempotent

  // Mismatched counts are refused.
  EXPECT_EQ(RunLoad(clients, std::vector<v1::AttendRequest>(1), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve::client
