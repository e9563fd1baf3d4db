// AttnClient::ShardedAttend over three in-process servers: keys split across
// them as sharded keys and merged by lse equal one Attend of the whole
// request (causal in both alignments, windows, ALiBi, softcap, GQA, a bias cut
// with the keys, 3-D tensors, 16-bit dtypes, more targets than keys, a
// request that is itself a shard); the merge is bitwise repeatable; what
// cannot be merged is refused before any call; a failing part is named.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "backends/registry.h"
#include "client/client.h"
#include "core/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/unit/random_request.h"

namespace attnserve {
namespace {

using client::AttendResult;
using client::AttnClient;
using client::CallOptions;
using ::testing::AllOf;
using ::testing::HasSubstr;

// Largest |got − want| over max|V| (outputs), and over finite lse; lse −inf
// and output 0 must match exactly where the whole request has them.
struct Errors {
  double output = 0;
  double lse = 0;
};

double MaxAbs(const TensorView& t) {
  double m = 0;
  const int64_t n = static_cast<int64_t>(t.data.size() / DTypeSize(t.dtype));
  for (int64_t i = 0; i < n; ++i) {
    m = std::max(m, std::abs(double{LoadFloat(t.data.data(), t.dtype, i)}));
  }
  return m;
}

Errors Compare(const AttendResult& got, const AttendResult& want, double v_scale) {
  Errors e;
  EXPECT_EQ(got.output.dtype, want.output.dtype);
  EXPECT_EQ(got.output.shape, want.output.shape);
  if (got.output.data.size() != want.output.data.size()) return e;
  const int64_t n = want.output.num_elements();
  for (int64_t i = 0; i < n; ++i) {
    const double g = LoadFloat(got.output.data.data(), got.output.dtype, i);
    const double w = LoadFloat(want.output.data.data(), want.output.dtype, i);
    e.output = std::max(e.output, std::abs(g - w) / v_scale);
  }
  EXPECT_EQ(got.lse.has_value(), want.lse.has_value());
  if (!got.lse.has_value() || !want.lse.has_value()) return e;
  EXPECT_EQ(got.lse->shape, want.lse->shape);
  for (int64_t i = 0; i < want.lse->num_elements(); ++i) {
    const float g = got.lse->data_as<float>()[i];
    const float w = want.lse->data_as<float>()[i];
    if (std::isinf(w)) {
      EXPECT_EQ(g, w) << "lse " << i;
      continue;
    }
    e.lse = std::max(e.lse, std::abs(double{g} - w));
  }
  return e;
}

class ShardedAttendTest : public ::testing::Test {
 protected:
  // Three servers: reference, cpu, reference.
  void SetUp() override {
    for (const char* backend : {"reference", "cpu", "reference"}) {
      ServerOptions options;
      options.listen_address = "127.0.0.1:0";
      options.metrics_listen_address = "";
      std::vector<std::unique_ptr<Backend>> backends;
      auto created = CreateBackend(backend, BackendOptions{.threads = 2});
      ASSERT_TRUE(created.ok()) << created.status();
      backends.push_back(*std::move(created));
      absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(options, std::move(backends));
      ASSERT_TRUE(server.ok()) << server.status();
      ASSERT_TRUE((*server)->Start().ok());
      auto c = AttnClient::Create(absl::StrCat("127.0.0.1:", (*server)->port()));
      ASSERT_TRUE(c.ok()) << c.status();
      servers_.push_back(*std::move(server));
      clients_.push_back(*std::move(c));
      targets_.push_back(clients_.back().get());
    }
  }

  // ShardedAttend over the three against one Attend on the first (reference).
  Errors ExpectLikeOneAttend(const RandomRequest& r, double output_tolerance,
                             double lse_tolerance = 1e-5) {
    absl::StatusOr<AttendResult> one = targets_[0]->Attend(r.request());
    EXPECT_TRUE(one.ok()) << one.status();
    CallOptions call;
    call.request_id = "s";
    absl::StatusOr<AttendResult> sharded = AttnClient::ShardedAttend(targets_, r.request(), call);
    EXPECT_TRUE(sharded.ok()) << sharded.status();
    if (!one.ok() || !sharded.ok()) return {};
    EXPECT_EQ(sharded->request_id, "s");
    const Errors e = Record(Compare(*sharded, *one, MaxAbs(r.request().value)));
    EXPECT_LE(e.output, output_tolerance);
    EXPECT_LE(e.lse, lse_tolerance);
    return e;
  }

  Errors Record(const Errors& e) {
    worst_.output = std::max(worst_.output, e.output);
    worst_.lse = std::max(worst_.lse, e.lse);
    ++compared_;
    return e;
  }

  void TearDown() override {
    if (compared_ > 0) {
      std::printf(
          "[ ShardedAttend ] %d results: max output error %.3g x max|V|, max lse "
          "error %.3g\n",
          compared_, worst_.output, worst_.lse);
    }
    targets_.clear();
    clients_.clear();
    servers_.clear();
  }

  std::vector<std::unique_ptr<Server>> servers_;
  std::vector<std::unique_ptr<AttnClient>> clients_;
  std::vector<AttnClient*> targets_;
  Errors worst_;
  int compared_ = 0;
};

RequestSpec Spec(std::string name, int64_t lq, int64_t lk, int64_t hq = 4, int64_t hkv = 2) {
  RequestSpec s;
  s.name = std::move(name);
  s.batch = 2;
  s.seqlen_q = lq;
  s.seqlen_k = lk;
  s.heads_q = hq;
  s.heads_kv = hkv;
  s.head_dim = 32;
  s.outputs.lse = true;
  return s;
}

TEST_F(ShardedAttendTest, EqualsOneAttendOverTheOptions) {
  std::vector<RequestSpec> specs;
  specs.push_back(Spec("plain_gqa", 9, 40));
  RequestSpec s = Spec("causal_bottom_right", 7, 50);
  s.options.causal = true;
  specs.push_back(s);
  s = Spec("causal_top_left", 7, 50);  // the later parts see nothing
  s.options.causal = true;
  s.options.causal_alignment = CausalAlignment::kTopLeft;
  specs.push_back(s);
  s = Spec("causal_square", 30, 30);
  s.options.causal = true;
  specs.push_back(s);
  s = Spec("causal_rows_masked", 20, 12);  // rows 0..7 see no key
  s.options.causal = true;
  specs.push_back(s);
  s = Spec("window_alibi_softcap", 16, 48, 6, 3);
  s.options.window_left = 6;
  s.options.window_right = 2;
  s.options.softcap = 7.f;
  s.options.alibi_slopes = AlibiSlopes(s.heads_q);
  specs.push_back(s);
  s = Spec("full_width_bias", 8, 33);
  s.bias_shape = std::vector<int64_t>{2, 4, 8, 33};
  s.bias_masks = true;  // with -inf entries and a fully masked row
  specs.push_back(s);
  s = Spec("broadcast_bias", 8, 33);
  s.bias_shape = std::vector<int64_t>{4, 1, 1};
  specs.push_back(s);
  s = Spec("rank3_mqa_dv", 5, 31, 4, 1);
  s.batch = 1;
  s.rank3 = true;
  s.value_dim = 24;
  specs.push_back(s);
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    RandomRequest r(specs[i], DType::kF32, 100 + i);
    ExpectLikeOneAttend(r, 1e-5);
  }
}

TEST_F(ShardedAttendTest, SixteenBitPartsAgreeWithinTheirRounding) {
  RequestSpec s = Spec("causal", 10, 45);
  s.options.causal = true;
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    RandomRequest r(s, dtype, 200);
    // Each part's output is rounded to the dtype before the merge, the merge
    // once more: about two roundings (2^-11 for F16, 2^-8 for BF16).
    ExpectLikeOneAttend(r, dtype == DType::kF16 ? 2e-3 : 1.6e-2);
  }
}

TEST_F(ShardedAttendTest, MoreTargetsThanKeys) {
  RandomRequest r(Spec("two_keys", 3, 2), DType::kF32, 300);
  ExpectLikeOneAttend(r, 1e-5);
  RandomRequest one(Spec("one_key", 3, 1), DType::kF32, 301);
  ExpectLikeOneAttend(one, 1e-5);
}

// A request that is itself keys [40, 80) of 120 is cut inside that range.
TEST_F(ShardedAttendTest, AShardIsCutWithinItsPlace) {
  RequestSpec s = Spec("shard", 6, 40);
  s.options.causal = true;
  s.options.window_left = 50;
  RandomRequest r(s, DType::kF32, 400);
  AttentionRequest shard = r.request();
  shard.key_offset = 40;
  shard.total_keys = 120;
  // The whole shard on one server, through the wire request (ToProto leaves
  // key_offset / total_keys to the caller).
  v1::AttendRequest wire = client::ToProto(shard, {});
  wire.set_key_offset(40);
  wire.set_total_keys(120);
  absl::StatusOr<v1::AttendResponse> one = targets_[0]->Attend(wire);
  ASSERT_TRUE(one.ok()) << one.status();
  absl::StatusOr<AttendResult> want = client::FromProto(*std::move(one));
  ASSERT_TRUE(want.ok()) << want.status();
  absl::StatusOr<AttendResult> got = AttnClient::ShardedAttend(targets_, shard);
  ASSERT_TRUE(got.ok()) << got.status();
  const Errors e = Record(Compare(*got, *want, MaxAbs(shard.value)));
  EXPECT_LE(e.output, 1e-5);
  EXPECT_LE(e.lse, 1e-5);
}

TEST_F(ShardedAttendTest, RepeatsBitwiseAndReportsTheParts) {
  RequestSpec s = Spec("window", 12, 64);
  s.options.window_left = 9;
  RandomRequest r(s, DType::kF32, 500);
  absl::StatusOr<AttendResult> a = AttnClient::ShardedAttend(targets_, r.request());
  absl::StatusOr<AttendResult> b = AttnClient::ShardedAttend(targets_, r.request());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->output.data, b->output.data);
  EXPECT_EQ(a->lse->data, b->lse->data);
  EXPECT_EQ(a->backend, "reference,cpu");
  EXPECT_GT(a->timing.total_us, 0);

  // Without outputs.lse the merge still runs on the parts' lse, and none is
  // returned.
  AttentionRequest no_lse = r.request();
  no_lse.outputs.lse = false;
  absl::StatusOr<AttendResult> c = AttnClient::ShardedAttend(targets_, no_lse);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->lse.has_value());
  EXPECT_EQ(c->output.data, a->output.data);
}

void ExpectInvalid(absl::Span<AttnClient* const> targets, const AttentionRequest& request,
                   const std::string& field, const std::string& got) {
  absl::StatusOr<AttendResult> r = AttnClient::ShardedAttend(targets, request);
  ASSERT_FALSE(r.ok()) << "accepted a bad " << field;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(field + ": expected"), HasSubstr("got " + got)));
}

TEST_F(ShardedAttendTest, RefusesWhatDoesNotMerge) {
  RandomRequest r(Spec("base", 4, 20), DType::kF32, 600);
  ExpectInvalid({}, r.request(), "targets", "none");
  std::vector<AttnClient*> with_null = {targets_[0], nullptr};
  ExpectInvalid(with_null, r.request(), "targets[1]", "null");

  AttentionRequest bad = r.request();
  bad.key_lengths = {20, 10};
  ExpectInvalid(targets_, bad, "key_lengths", "2 lengths");
  bad = r.request();
  bad.outputs.weights = true;
  ExpectInvalid(targets_, bad, "outputs.weights", "true");
  bad = r.request();
  bad.outputs.entropy = true;
  ExpectInvalid(targets_, bad, "outputs.entropy", "true");
  bad = r.request();
  bad.outputs.top_k = 3;
  ExpectInvalid(targets_, bad, "outputs.top_k", "3");
  bad = r.request();
  bad.options.variant = Variant::kLinear;
  ExpectInvalid(targets_, bad, "options.variant", "LINEAR");
  bad = r.request();
  bad.value.shape[1] = 19;
  ExpectInvalid(targets_, bad, "value.shape", "[2, 19, 2, 32]");
  bad = r.request();
  bad.key.data = bad.key.data.substr(4);
  ExpectInvalid(targets_, bad, "key.data", absl::StrCat(bad.key.data.size(), " bytes"));

  RequestSpec s = Spec("bias", 4, 20);
  s.bias_shape = std::vector<int64_t>{2, 4, 4, 20};
  RandomRequest biased(s, DType::kF32, 601);
  bad = biased.request();
  bad.bias->shape = {2, 4, 8, 10};  // same bytes, the wrong last dim
  ExpectInvalid(targets_, bad, "bias.shape", "[2, 4, 8, 10]");
}

// A part's error fails the call with its code and names the part and target.
TEST_F(ShardedAttendTest, AFailingPartIsNamed) {
  RandomRequest r(Spec("base", 4, 30), DType::kF32, 700);

  // A target that is gone: its address refuses the connection.
  const std::string gone = absl::StrCat("127.0.0.1:", servers_[2]->port());
  servers_[2].reset();
  CallOptions call;
  call.deadline = absl::Seconds(5);
  absl::StatusOr<AttendResult> result = AttnClient::ShardedAttend(targets_, r.request(), call);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr(absl::StrCat("part 2 of 3 (targets[2] ", gone, ", keys [20, 30)): ")));

  // The servers' own refusal (NOT_FOUND: a backend they do not have) comes
  // back with its code, from the first part in target order.
  call.backend = "no-such";
  result = AttnClient::ShardedAttend(targets_, r.request(), call);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound) << result.status();
  EXPECT_THAT(std::string(result.status().message()),
              AllOf(HasSubstr(absl::StrCat("part 0 of 3 (targets[0] ", targets_[0]->target(),
                                           ", keys [0, 10)): ")),
                    HasSubstr("no-such")));
}

}  // namespace
}  // namespace attnserve
