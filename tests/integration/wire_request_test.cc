// WireAttendRequest (server/wire_request.h) against protobuf's own parse: the
// same message for every way gRPC could have cut the bytes into slices, the
// tensors' bytes as views into those slices, and malformed bytes refused
// (INVALID_ARGUMENT) where protobuf refuses them.
#include "server/wire_request.h"

#include <algorithm>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "attnserve/v1/attention.pb.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

v1::Tensor MakeTensor(std::mt19937& rng, v1::DType dtype, std::vector<int64_t> shape,
                      size_t bytes) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  std::string data(bytes, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  t.set_data(data);
  return t;
}

v1::AttendRequest MakeRequest(size_t tensor_bytes) {
  std::mt19937 rng(7);
  v1::AttendRequest r;
  r.set_request_id("req-1");
  *r.mutable_query() = MakeTensor(rng, v1::F32, {1, 4, 2, 8}, tensor_bytes);
  *r.mutable_key() = MakeTensor(rng, v1::F16, {1, 4, 2, 8}, tensor_bytes / 2);
  *r.mutable_value() = MakeTensor(rng, v1::BF16, {1, 4, 2, 8}, tensor_bytes / 2 + 3);
  *r.mutable_bias() = MakeTensor(rng, v1::F32, {4, 4}, 64);
  r.mutable_options()->set_causal(true);
  r.mutable_options()->set_scale(0.25f);
  r.add_key_lengths(3);
  r.mutable_outputs()->set_lse(true);
  r.set_backend("cpu");
  r.set_priority(1);
  r.add_query_positions(5);
  r.mutable_sparsity()->add_global_tokens(1);
  *r.mutable_sparsity()->mutable_key_indices()->mutable_indices() =
      MakeTensor(rng, v1::I32, {1, 1, 1}, 4);
  return r;
}

// The bytes cut into chunks at `cuts` (sorted offsets).
std::vector<absl::string_view> Cut(const std::string& bytes, const std::vector<size_t>& cuts) {
  std::vector<absl::string_view> chunks;
  size_t from = 0;
  for (size_t c : cuts) {
    chunks.emplace_back(bytes.data() + from, c - from);
    from = c;
  }
  chunks.emplace_back(bytes.data() + from, bytes.size() - from);
  return chunks;
}

// What `wire` holds, its scanned tensors' bytes put back into the message.
v1::AttendRequest Restored(const WireAttendRequest& wire) {
  const v1::AttendRequest& parsed = wire.request();
  v1::AttendRequest r = parsed;
  for (auto [has, tensor, field, out] :
       {std::tuple{parsed.has_query(), &parsed.query(), "query", &v1::AttendRequest::mutable_query},
        std::tuple{parsed.has_key(), &parsed.key(), "key", &v1::AttendRequest::mutable_key},
        std::tuple{parsed.has_value(), &parsed.value(), "value", &v1::AttendRequest::mutable_value},
        std::tuple{parsed.has_bias(), &parsed.bias(), "bias", &v1::AttendRequest::mutable_bias}}) {
    if (!has) continue;
    absl::StatusOr<std::optional<std::string_view>> bytes = wire.Bytes(*tensor, field);
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    if (!bytes.ok() || !bytes->has_value()) continue;
    EXPECT_TRUE(tensor->data().empty()) << field;  // not held twice
    (r.*out)()->set_data(std::string(**bytes));
  }
  return r;
}

// Parses `bytes` both ways (cut at `cuts`) and checks they agree.
void ExpectAgrees(const std::string& bytes, const std::vector<size_t>& cuts) {
  v1::AttendRequest expected;
  const bool parsed = expected.ParseFromString(bytes);
  std::vector<absl::string_view> chunks = Cut(bytes, cuts);
  WireAttendRequest wire;
  absl::Status s = wire.Parse(chunks);
  ASSERT_EQ(s.ok(), parsed) << s;
  if (!parsed) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  EXPECT_EQ(wire.wire_bytes(), static_cast<int64_t>(bytes.size()));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(Restored(wire), expected))
      << Restored(wire).ShortDebugString().substr(0, 500) << "\nvs\n"
      << expected.ShortDebugString().substr(0, 500);
}

TEST(WireRequestTest, OneChunkGivesViewsIntoIt) {
  const std::string bytes = MakeRequest(4096).SerializeAsString();
  absl::string_view chunk(bytes);
  WireAttendRequest wire;
  ASSERT_TRUE(wire.Parse({&chunk, 1}).ok());
  absl::StatusOr<std::optional<std::string_view>> q = wire.Bytes(wire.request().query(), "query");
  ASSERT_TRUE(q.ok() && q->has_value());
  EXPECT_GE((*q)->data(), bytes.data());
  EXPECT_LT((*q)->data(), bytes.data() + bytes.size());
  EXPECT_EQ((*q)->size(), 4096u);
  EXPECT_LT(wire.copied_bytes(),
            256);  // shapes, options, sparsity: no tensor bytes
  ExpectAgrees(bytes, {});
}

TEST(WireRequestTest, EveryCutAgreesWithProtobuf) {
  const std::string bytes = MakeRequest(40).SerializeAsString();
  for (size_t cut = 0; cut <= bytes.size(); ++cut) ExpectAgrees(bytes, {cut});
  std::mt19937 rng(3);
  for (int i = 0; i < 200; ++i) {
    std::vector<size_t> cuts;
    for (int k = 0; k < 6; ++k) cuts.push_back(rng() % (bytes.size() + 1));
    std::sort(cuts.begin(), cuts.end());
    ExpectAgrees(bytes, cuts);
  }
}

TEST(WireRequestTest, StraddlingTensorIsGathered) {
  const std::string bytes = MakeRequest(1 << 16).SerializeAsString();
  std::vector<size_t> cuts;
  for (size_t c = 16384; c < bytes.size(); c += 16384) cuts.push_back(c);
  std::vector<absl::string_view> chunks = Cut(bytes, cuts);
  WireAttendRequest wire;
  ASSERT_TRUE(wire.Parse(chunks).ok());
  EXPECT_GE(wire.copied_bytes(), 1 << 16);
  ExpectAgrees(bytes, cuts);
}

TEST(WireRequestTest, RepeatedTensorsMergeAsProtobufDoes) {
  std::mt19937 rng(1);
  v1::AttendRequest first;
  *first.mutable_query() = MakeTensor(rng, v1::F32, {2, 2}, 16);
  v1::AttendRequest second;
  second.mutable_query()->add_shape(3);  // merged: shape 2, 2, 3; data kept
  v1::AttendRequest third;
  *third.mutable_key() = MakeTensor(rng, v1::F16, {1}, 8);
  v1::AttendRequest fourth;
  fourth.mutable_key()->set_data("later data wins");
  ExpectAgrees(first.SerializeAsString() + second.SerializeAsString() + third.SerializeAsString() +
                   fourth.SerializeAsString(),
               {});
}

TEST(WireRequestTest, UnknownFieldsAndWireTypesPassThrough) {
  std::string bytes = MakeRequest(32).SerializeAsString();
  // An unknown varint field 99, fixed32 field 100, fixed64 field 101, bytes
  // field 102; query (2) as a varint (protobuf keeps it as an unknown field).
  bytes += std::string("\x98\x06\x2a", 3);
  bytes += std::string("\xa5\x06\x01\x02\x03\x04", 6);
  bytes += std::string("\xa9\x06\x01\x02\x03\x04\x05\x06\x07\x08", 10);
  bytes += std::string("\xb2\x06\x02hi", 5);
  bytes += std::string("\x10\x05", 2);
  // A 5-byte tag whose last byte has bits past 32: protobuf keeps the low 32
  // (field 889130291, a varint).
  bytes += std::string("\x98\x86\x80\x80\x7a\x01", 6);
  // An unknown field inside a tensor: key { 9: 7 }.
  bytes += std::string("\x1a\x02\x48\x07", 4);
  ExpectAgrees(bytes, {});
  ExpectAgrees(bytes, {bytes.size() - 3});
}

TEST(WireRequestTest, GroupsFallBackToProtobuf) {
  std::string bytes = MakeRequest(32).SerializeAsString();
  bytes += std::string("\xa3\x06\x08\x01\xa4\x06", 6);  // group 100 { 1: 1 }
  ExpectAgrees(bytes, {10});
}

TEST(WireRequestTest, MalformedBytesAreInvalidArgument) {
  const std::string good = MakeRequest(32).SerializeAsString();
  const std::vector<std::string> bad = {
      std::string("\x12\x80", 2),                   // truncated length varint
      std::string("\x12\x05\x0a\x01", 4),           // length past the end
      std::string("\x12\x04\x1a\x09xy\x00", 6),     // tensor data past its tensor
      std::string("\x12\x02\x08", 3).substr(0, 3),  // truncated varint in a tensor
      std::string("\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                  12),                     // 11-byte varint
      std::string("\x02\x00", 2),          // field number 0
      std::string("\x12\x01\x0f", 3),      // wire type 7 inside a tensor
      std::string("\x0a\x02\xff\xfe", 4),  // request_id not UTF-8
      good.substr(0, good.size() - 1),     // cut short
  };
  for (const std::string& bytes : bad) {
    ExpectAgrees(bytes, {});
    ExpectAgrees(bytes, {1});
  }
  // Every prefix of a good message.
  for (size_t n = 0; n < good.size(); ++n) ExpectAgrees(good.substr(0, n), {n / 2});
}

TEST(WireRequestTest, ShmTensorsAreLeftToNext) {
  // A source that answers every tensor with "shm".
  class Fixed : public TensorSource {
   public:
    absl::StatusOr<std::optional<std::string_view>> Bytes(const v1::Tensor& t,
                                                          absl::string_view) const override {
      if (!t.has_shm()) return std::nullopt;
      return std::string_view("shm");
    }
  };
  Fixed next;
  v1::AttendRequest r = MakeRequest(16);
  r.mutable_key()->clear_data();
  r.mutable_key()->mutable_shm()->set_region("region");
  r.mutable_value()->mutable_shm()->set_region("region");  // and data: next judges both
  const std::string bytes = r.SerializeAsString();
  absl::string_view chunk(bytes);
  WireAttendRequest wire(&next);
  ASSERT_TRUE(wire.Parse({&chunk, 1}).ok());
  EXPECT_EQ(**wire.Bytes(wire.request().key(), "key"), "shm");
  EXPECT_EQ(**wire.Bytes(wire.request().value(), "value"), "shm");
  EXPECT_EQ(wire.request().value().data(),
            r.value().data());  // put back for next to see
  EXPECT_EQ((**wire.Bytes(wire.request().query(), "query")).size(), 16u);
}

}  // namespace
}  // namespace attnserve
