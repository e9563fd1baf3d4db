// Sparse attention over gRPC. On Attend: block masks, key selection, global
// tokens and sink logits computed by cpu equal reference, and a block mask or
// key selection equals the same pattern sent as a dense bias of 0 / -inf (an
// independent check of the pattern's meaning); every malformed pattern is
// INVALID_ARGUMENT naming the field and index; the size limits hold. On
// sessions: a Decode step with key selection equals Attend over the same K/V,
// a BatchDecode equals its entries' Decodes, and a bad entry fails alone.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <utility>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace attnserve {
namespace {

constexpr int64_t kB = 2, kLq = 13, kLk = 29, kHq = 4, kHkv = 2, kD = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

v1::Tensor F32Tensor(const std::vector<int64_t>& shape, const std::vector<float>& values) {
  v1::Tensor t;
  t.set_dtype(v1::F32);
  for (int64_t d : shape) t.add_shape(d);
  t.mutable_data()->assign(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  return t;
}

v1::Tensor I32Tensor(const std::vector<int64_t>& shape, const std::vector<int32_t>& values) {
  v1::Tensor t;
  t.set_dtype(v1::I32);
  for (int64_t d : shape) t.add_shape(d);
  t.mutable_data()->assign(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  return t;
}

std::vector<float> Floats(const v1::Tensor& t) {
  std::vector<float> out(t.data().size() / 4);
  std::memcpy(out.data(), t.data().data(), out.size() * 4);
  return out;
}

std::vector<float> RandomFloats(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element-wise |got - want| <= tol, infinities equal.
void ExpectNear(const v1::Tensor& got, const v1::Tensor& want, float tol, const std::string& what) {
  ASSERT_EQ(std::vector<int64_t>(got.shape().begin(), got.shape().end()),
            std::vector<int64_t>(want.shape().begin(), want.shape().end()))
      << what;
  const std::vector<float> g = Floats(got), w = Floats(want);
  ASSERT_EQ(g.size(), w.size()) << what;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isinf(w[i])) {
      ASSERT_EQ(g[i], w[i]) << what << " element " << i;
    } else {
      ASSERT_NEAR(g[i], w[i], tol) << what << " element " << i;
    }
  }
}

// Which keys each (batch row, query head, query) sees: [B, Hq, Lq, Lk].
struct VisibleKeys {
  int64_t B = 0, Hq = 0, Lq = 0, Lk = 0;
  std::vector<uint8_t> seen;
  uint8_t& at(int64_t b, int64_t h, int64_t i, int64_t j) {
    return seen[((b * Hq + h) * Lq + i) * Lk + j];
  }
  // The pattern as an additive bias, 0 where seen and -inf elsewhere.
  v1::Tensor Bias() const {
    std::vector<float> bias(seen.size());
    for (size_t n = 0; n < seen.size(); ++n) bias[n] = seen[n] ? 0.f : -kInf;
    return F32Tensor({B, Hq, Lq, Lk}, bias);
  }
};

// A random block mask: each (slice, row block, key block) is left out,
// listed in `indices` or listed as a full block, and the keys it makes
// visible. `slices_b`, `slices_h`: indptr's first two dims (1 broadcasts);
// `rank1` sends the one slice's indptr as [R + 1].
struct RandomBlockMask {
  v1::BlockMask proto;
  VisibleKeys visible;
};

RandomBlockMask MakeBlockMask(std::mt19937& rng, int64_t B, int64_t Hq, int64_t Lq, int64_t Lk,
                              int32_t R, int32_t C, int64_t slices_b, int64_t slices_h,
                              bool with_full, bool rank1 = false) {
  const int64_t rows = CeilDiv(Lq, R), cols = CeilDiv(Lk, C);
  std::uniform_int_distribution<int> kind(0, with_full ? 2 : 1);
  std::vector<int> table(slices_b * slices_h * rows * cols);
  for (int& t : table) t = kind(rng);
  // Each slice's rows + 1 offsets: where its first row block starts (where
  // the previous slice ended), then where each row block ends.
  std::vector<int32_t> indptr, indices, full_indptr, full_indices;
  for (int64_t s = 0; s < slices_b * slices_h; ++s) {
    indptr.push_back(static_cast<int32_t>(indices.size()));
    full_indptr.push_back(static_cast<int32_t>(full_indices.size()));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const int k = table[(s * rows + r) * cols + c];
        if (k == 1) indices.push_back(static_cast<int32_t>(c));
        if (k == 2) full_indices.push_back(static_cast<int32_t>(c));
      }
      indptr.push_back(static_cast<int32_t>(indices.size()));
      full_indptr.push_back(static_cast<int32_t>(full_indices.size()));
    }
  }
  RandomBlockMask m;
  m.proto.set_block_rows(R);
  m.proto.set_block_cols(C);
  const std::vector<int64_t> indptr_shape =
      rank1 ? std::vector<int64_t>{rows + 1} : std::vector<int64_t>{slices_b, slices_h, rows + 1};
  *m.proto.mutable_indptr() = I32Tensor(indptr_shape, indptr);
  *m.proto.mutable_indices() = I32Tensor({static_cast<int64_t>(indices.size())}, indices);
  if (with_full) {
    *m.proto.mutable_full_indptr() = I32Tensor(indptr_shape, full_indptr);
    *m.proto.mutable_full_indices() =
        I32Tensor({static_cast<int64_t>(full_indices.size())}, full_indices);
  }
  m.visible = {B, Hq, Lq, Lk, std::vector<uint8_t>(B * Hq * Lq * Lk, 0)};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t s = (slices_b == 1 ? 0 : b) * slices_h + (slices_h == 1 ? 0 : h);
      for (int64_t i = 0; i < Lq; ++i) {
        for (int64_t j = 0; j < Lk; ++j) {
          m.visible.at(b, h, i, j) = table[(s * rows + i / R) * cols + j / C] != 0;
        }
      }
    }
  }
  return m;
}

// A random key selection: per index row up to k distinct keys (or key
// blocks) in random order, padded with -1. `heads`: Hq, Hkv or 1;
// `batches`: B or 1.
struct RandomSelection {
  v1::KeySelection proto;
  VisibleKeys visible;
};

RandomSelection MakeSelection(std::mt19937& rng, int64_t B, int64_t Hq, int64_t Lq, int64_t Lk,
                              int64_t batches, int64_t heads, int32_t query_block,
                              int32_t key_block, int64_t k) {
  const int64_t rows = CeilDiv(Lq, query_block), units = CeilDiv(Lk, key_block);
  std::vector<int32_t> values;
  std::vector<std::vector<int32_t>> chosen;
  std::vector<int32_t> all(units);
  std::iota(all.begin(), all.end(), 0);
  std::uniform_int_distribution<int64_t> count(0, std::min(k, units));
  for (int64_t n = 0; n < batches * heads * rows; ++n) {
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> row(all.begin(), all.begin() + count(rng));
    chosen.push_back(row);
    row.resize(k, -1);
    std::shuffle(row.begin(), row.end(), rng);
    values.insert(values.end(), row.begin(), row.end());
  }
  RandomSelection s;
  *s.proto.mutable_indices() = I32Tensor({batches, heads, rows, k}, values);
  // 1 is sent as 0 (the wire's default) half of the time.
  s.proto.set_query_block(query_block == 1 && rng() % 2 == 0 ? 0 : query_block);
  s.proto.set_key_block(key_block == 1 && rng() % 2 == 0 ? 0 : key_block);
  s.visible = {B, Hq, Lq, Lk, std::vector<uint8_t>(B * Hq * Lq * Lk, 0)};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t list_head = h / (Hq / heads);
      for (int64_t i = 0; i < Lq; ++i) {
        const std::vector<int32_t>& row =
            chosen[((batches == 1 ? 0 : b) * heads + list_head) * rows + i / query_block];
        for (int32_t u : row) {
          for (int64_t j = int64_t{u} * key_block; j < std::min<int64_t>(Lk, (u + 1) * key_block);
               ++j) {
            s.visible.at(b, h, i, j) = 1;
          }
        }
      }
    }
  }
  return s;
}

class SparseTest : public ::testing::Test {
 protected:
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

  void SetUp() override { StartServer(); }

  // Random q/k/v [kB, kLq, kHq, kD] / [kB, kLk, kHkv, kD], asking for lse.
  v1::AttendRequest MakeRequest(bool causal) {
    v1::AttendRequest r;
    *r.mutable_query() = F32Tensor({kB, kLq, kHq, kD}, RandomFloats(rng_, kB * kLq * kHq * kD));
    *r.mutable_key() = F32Tensor({kB, kLk, kHkv, kD}, RandomFloats(rng_, kB * kLk * kHkv * kD));
    *r.mutable_value() = F32Tensor({kB, kLk, kHkv, kD}, RandomFloats(rng_, kB * kLk * kHkv * kD));
    r.mutable_options()->set_causal(causal);
    r.mutable_outputs()->set_lse(true);
    return r;
  }

  grpc::Status Attend(v1::AttendRequest request, const std::string& backend,
                      v1::AttendResponse* response) {
    request.set_backend(backend);
    grpc::ClientContext context;
    return stub_->Attend(&context, request, response);
  }

  // `request` on cpu equals it on reference within 1e-5 (output and lse);
  // returns the cpu response.
  v1::AttendResponse ExpectCpuMatchesReference(const v1::AttendRequest& request,
                                               const std::string& what) {
    v1::AttendResponse cpu, reference;
    grpc::Status s = Attend(request, "cpu", &cpu);
    EXPECT_TRUE(s.ok()) << what << ": " << s.error_message();
    s = Attend(request, "reference", &reference);
    EXPECT_TRUE(s.ok()) << what << ": " << s.error_message();
    ExpectNear(cpu.output(), reference.output(), 1e-5f, what + " output");
    ExpectNear(cpu.lse(), reference.lse(), 1e-5f, what + " lse");
    return cpu;
  }

  // The sparse request equals the same request with `visible` as a dense
  // bias instead (both on cpu).
  void ExpectMatchesDenseBias(const v1::AttendRequest& sparse, const v1::AttendResponse& got,
                              const VisibleKeys& visible, const std::string& what) {
    v1::AttendRequest dense = sparse;
    dense.clear_sparsity();
    *dense.mutable_bias() = visible.Bias();
    v1::AttendResponse want;
    grpc::Status s = Attend(dense, "cpu", &want);
    ASSERT_TRUE(s.ok()) << what << ": " << s.error_message();
    ExpectNear(got.output(), want.output(), 1e-5f, what + " output vs dense bias");
    ExpectNear(got.lse(), want.lse(), 1e-5f, what + " lse vs dense bias");
  }

  // INVALID_ARGUMENT whose message contains each of `parts`.
  void ExpectInvalid(const v1::AttendRequest& request, const std::vector<std::string>& parts,
                     const std::string& backend = "cpu") {
    v1::AttendResponse response;
    grpc::Status s = Attend(request, backend, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    for (const std::string& part : parts) {
      EXPECT_TRUE(absl::StrContains(s.error_message(), part))
          << "\"" << s.error_message() << "\" lacks \"" << part << "\"";
    }
  }

  std::mt19937 rng_{20240611};
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

TEST_F(SparseTest, BlockMaskEqualsReferenceAndDenseBias) {
  struct Case {
    std::string name;
    int32_t R, C;
    int64_t slices_b, slices_h;
    bool full, rank1;
  };
  for (const Case& c : std::vector<Case>{{"broadcast", 4, 5, 1, 1, false, false},
                                         {"broadcast_full", 4, 5, 1, 1, true, false},
                                         {"rank1_full", 3, 8, 1, 1, true, true},
                                         {"per_head", 3, 4, kB, kHq, false, false},
                                         {"per_head_full", 5, 3, kB, kHq, true, false},
                                         {"per_row", 1, 1, kB, 1, true, false}}) {
    for (bool causal : {false, true}) {
      const std::string what = absl::StrCat(c.name, causal ? " causal" : "");
      v1::AttendRequest request = MakeRequest(causal);
      RandomBlockMask mask =
          MakeBlockMask(rng_, kB, kHq, kLq, kLk, c.R, c.C, c.slices_b, c.slices_h, c.full, c.rank1);
      *request.mutable_sparsity()->mutable_block_mask() = mask.proto;
      v1::AttendResponse got = ExpectCpuMatchesReference(request, what);
      ExpectMatchesDenseBias(request, got, mask.visible, what);
    }
  }
}

TEST_F(SparseTest, EmptyFullBlocksAreUnset) {
  // Some clients write every field: an empty full_indptr / full_indices
  // (no shape, no data) is no full blocks.
  v1::AttendRequest request = MakeRequest(false);
  RandomBlockMask mask = MakeBlockMask(rng_, kB, kHq, kLq, kLk, 4, 4, 1, 1, false);
  *request.mutable_sparsity()->mutable_block_mask() = mask.proto;
  request.mutable_sparsity()->mutable_block_mask()->mutable_full_indptr();
  request.mutable_sparsity()->mutable_block_mask()->mutable_full_indices()->set_dtype(v1::I32);
  v1::AttendResponse got = ExpectCpuMatchesReference(request, "empty full blocks");
  ExpectMatchesDenseBias(request, got, mask.visible, "empty full blocks");
}

TEST_F(SparseTest, KeySelectionEqualsReferenceAndDenseBias) {
  struct Case {
    int64_t batches, heads;
    int32_t query_block, key_block;
    int64_t k;
  };
  for (const Case& c : std::vector<Case>{{kB, kHq, 1, 1, 6},
                                         {kB, kHkv, 1, 1, 9},
                                         {1, 1, 1, 1, 4},
                                         {kB, kHkv, 4, 8, 2},
                                         {kB, kHq, 3, 4, 5},
                                         {1, kHkv, 2, 16, 1},
                                         {kB, 1, 5, 3, 7}}) {
    for (bool causal : {false, true}) {
      const std::string what =
          absl::StrCat("indices [", c.batches, ", ", c.heads, ", ., ", c.k, "] query_block ",
                       c.query_block, " key_block ", c.key_block, causal ? " causal" : "");
      v1::AttendRequest request = MakeRequest(causal);
      RandomSelection selection = MakeSelection(rng_, kB, kHq, kLq, kLk, c.batches, c.heads,
                                                c.query_block, c.key_block, c.k);
      *request.mutable_sparsity()->mutable_key_indices() = selection.proto;
      v1::AttendResponse got = ExpectCpuMatchesReference(request, what);
      ExpectMatchesDenseBias(request, got, selection.visible, what);
    }
  }
}

TEST_F(SparseTest, GlobalTokensEqualReference) {
  for (bool causal : {false, true}) {
    for (int pattern = 0; pattern < 3; ++pattern) {
      const std::string what = absl::StrCat("global tokens, pattern ", pattern,
                                            causal ? " causal" : "");
      v1::AttendRequest request = MakeRequest(causal);
      v1::Sparsity* sparsity = request.mutable_sparsity();
      // Keys 0 and Lk - 1 (the last query's own position, bottom-right),
      // and one in the middle, in no order.
      for (int64_t g : {kLk - 1, int64_t{0}, int64_t{17}}) sparsity->add_global_tokens(g);
      if (pattern == 1) {
        *sparsity->mutable_key_indices() =
            MakeSelection(rng_, kB, kHq, kLq, kLk, kB, kHkv, 2, 4, 3).proto;
      } else if (pattern == 2) {
        *sparsity->mutable_block_mask() =
            MakeBlockMask(rng_, kB, kHq, kLq, kLk, 4, 4, 1, kHq, true).proto;
      }
      ExpectCpuMatchesReference(request, what);
    }
  }
}

TEST_F(SparseTest, SinkLogitsAddToTheDenominator) {
  const std::vector<float> sinks = {0.5f, -1.f, 2.f, 0.f};
  for (bool causal : {false, true}) {
    v1::AttendRequest dense = MakeRequest(causal);
    v1::AttendRequest sunk = dense;
    for (float s : sinks) sunk.mutable_sparsity()->add_sink_logits(s);
    v1::AttendResponse plain, with_sinks;
    ASSERT_TRUE(Attend(dense, "cpu", &plain).ok());
    with_sinks = ExpectCpuMatchesReference(sunk, causal ? "sinks causal" : "sinks");
    // A sink is one more outcome: lse' = log(e^lse + e^sink[h]), and every
    // output scales by e^(lse - lse').
    const std::vector<float> lse = Floats(plain.lse()), lse_sunk = Floats(with_sinks.lse());
    const std::vector<float> out = Floats(plain.output()), out_sunk = Floats(with_sinks.output());
    for (int64_t b = 0; b < kB; ++b) {
      for (int64_t h = 0; h < kHq; ++h) {
        for (int64_t i = 0; i < kLq; ++i) {
          const int64_t at = (b * kHq + h) * kLq + i;
          const double want = std::log(std::exp(double(lse[at])) + std::exp(double(sinks[h])));
          ASSERT_NEAR(lse_sunk[at], want, 1e-5) << "lse [" << b << ", " << h << ", " << i << "]";
          const double ratio = std::exp(double(lse[at]) - want);
          for (int64_t d = 0; d < kD; ++d) {
            const int64_t o = ((b * kLq + i) * kHq + h) * kD + d;
            ASSERT_NEAR(out_sunk[o], out[o] * ratio, 1e-5) << "output element " << o;
          }
        }
      }
    }
    // With a pattern too.
    *sunk.mutable_sparsity()->mutable_key_indices() =
        MakeSelection(rng_, kB, kHq, kLq, kLk, 1, kHq, 1, 2, 5).proto;
    ExpectCpuMatchesReference(sunk, causal ? "sinks and selection causal" : "sinks and selection");
  }
}

TEST_F(SparseTest, AttendStreamCarriesSparsity) {
  v1::AttendRequest request = MakeRequest(false);
  RandomSelection selection = MakeSelection(rng_, kB, kHq, kLq, kLk, kB, kHkv, 1, 1, 5);
  *request.mutable_sparsity()->mutable_key_indices() = selection.proto;
  request.set_backend("cpu");
  request.set_request_id("s1");
  grpc::ClientContext context;
  auto stream = stub_->AttendStream(&context);
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->WritesDone());
  v1::AttendResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "s1");
  grpc::Status s = stream->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  ExpectMatchesDenseBias(request, response, selection.visible, "AttendStream");
}

TEST_F(SparseTest, OnednnAnswersUnimplemented) {
  v1::AttendRequest request = MakeRequest(false);
  *request.mutable_sparsity()->mutable_key_indices() =
      MakeSelection(rng_, kB, kHq, kLq, kLk, kB, kHq, 1, 1, 3).proto;
  v1::AttendResponse response;
  grpc::Status s = Attend(request, "onednn", &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
}

TEST_F(SparseTest, MalformedPatternsNameTheFieldAndIndex) {
  // A block mask over Lq 13 in row blocks of 4 (4 rows, indptr of 5) and Lk
  // 29 in key blocks of 8 (4 key blocks), one slice.
  auto with_mask = [&](std::vector<int64_t> indptr_shape, std::vector<int32_t> indptr,
                       std::vector<int32_t> indices, int32_t block_rows = 4) {
    v1::AttendRequest r = MakeRequest(false);
    v1::BlockMask* m = r.mutable_sparsity()->mutable_block_mask();
    m->set_block_rows(block_rows);
    m->set_block_cols(8);
    *m->mutable_indptr() = I32Tensor(indptr_shape, indptr);
    *m->mutable_indices() = I32Tensor({static_cast<int64_t>(indices.size())}, indices);
    return r;
  };
  const std::string ip = "sparsity.block_mask.indptr";
  const std::string ix = "sparsity.block_mask.indices";
  ExpectInvalid(with_mask({1, 1, 5}, {0, 2, 1, 3, 4}, {0, 1, 2, 3}),
                {ip + "[0, 0, 2]", "monotone"});
  ExpectInvalid(with_mask({5}, {0, 1, 2, 3, 3}, {0, 1, 2, 3}),
                {ip + "[0, 0, 4]", "4 (the length of " + ix + ")", "got 3"});
  ExpectInvalid(with_mask({1, 1, 5}, {0, 1, 2, 3, 4}, {0, 1, 4, 3}), {ix + "[2]", "[0, 4)"});
  ExpectInvalid(with_mask({1, 1, 5}, {0, 2, 2, 3, 4}, {1, 1, 0, 0}),
                {ix + "[1]", "increase within row block 0"});
  ExpectInvalid(with_mask({1, 1, 5}, {0, 1, 2, 3, 4}, {0, 1, 2, 3}, 0),
                {"sparsity.block_mask.block_rows", ">= 1", "got 0"});
  ExpectInvalid(with_mask({1, 1, 4}, {0, 1, 2, 3}, {0, 1, 2}), {ip + ".shape", "[1, 1, 4]"});
  ExpectInvalid(with_mask({kB, 3, 5}, std::vector<int32_t>(kB * 3 * 5, 0), {}),
                {ip + ".shape", "[2, 3, 5]"});
  {
    v1::AttendRequest r = with_mask({1, 1, 5}, {0, 1, 2, 3, 4}, {0, 1, 2, 3});
    r.mutable_sparsity()->mutable_block_mask()->mutable_indptr()->set_dtype(v1::F32);
    ExpectInvalid(r, {ip + ".dtype: expected I32, got F32"});
  }
  {
    v1::AttendRequest r = with_mask({1, 1, 5}, {0, 1, 2, 3, 4}, {0, 1, 2, 3});
    r.mutable_sparsity()->mutable_block_mask()->mutable_indices()->set_dtype(
        v1::DTYPE_UNSPECIFIED);
    ExpectInvalid(r, {ix + ".dtype: expected I32, got DTYPE_UNSPECIFIED"});
  }
  {
    v1::AttendRequest r = with_mask({1, 1, 5}, {0, 1, 2, 3, 4}, {0, 1, 2, 3});
    *r.mutable_sparsity()->mutable_key_indices() =
        MakeSelection(rng_, kB, kHq, kLq, kLk, 1, 1, 1, 1, 2).proto;
    ExpectInvalid(r, {"sparsity.key_indices", "unset with block_mask"});
  }

  // Key selection [1, 1, Lq, 2] of single keys.
  auto with_selection = [&](std::vector<int32_t> values, int32_t key_block = 1) {
    v1::AttendRequest r = MakeRequest(false);
    v1::KeySelection* k = r.mutable_sparsity()->mutable_key_indices();
    *k->mutable_indices() = I32Tensor({1, 1, kLq, 2}, values);
    k->set_key_block(key_block);
    return r;
  };
  std::vector<int32_t> good(kLq * 2, -1);
  {
    std::vector<int32_t> v = good;
    v[7 * 2 + 1] = kLk;
    ExpectInvalid(with_selection(v), {"sparsity.key_indices.indices[0, 0, 7, 1]", "[0, 29)"});
    v[7 * 2 + 1] = 4;
    ExpectInvalid(with_selection(v, 8), {"sparsity.key_indices.indices[0, 0, 7, 1]", "[0, 4)"});
    v[7 * 2 + 1] = -2;
    ExpectInvalid(with_selection(v), {"sparsity.key_indices.indices[0, 0, 7, 1]", "got -2"});
  }
  {
    std::vector<int32_t> v = good;
    v[5 * 2] = 3;
    v[5 * 2 + 1] = 3;
    ExpectInvalid(with_selection(v), {"sparsity.key_indices.indices[0, 0, 5, 1]", "duplicate"});
  }
  {
    v1::AttendRequest r = with_selection(good);
    r.mutable_sparsity()->mutable_key_indices()->mutable_indices()->set_dtype(v1::BF16);
    ExpectInvalid(r, {"sparsity.key_indices.indices.dtype: expected I32, got BF16"});
  }

  {
    v1::AttendRequest r = MakeRequest(false);
    for (float s : {0.f, 1.f, 2.f}) r.mutable_sparsity()->add_sink_logits(s);
    ExpectInvalid(r, {"sparsity.sink_logits", "4 logits", "got 3"});
  }
  {
    v1::AttendRequest r = MakeRequest(false);
    for (int64_t g : {3, 29}) r.mutable_sparsity()->add_global_tokens(g);
    ExpectInvalid(r, {"sparsity.global_tokens[1]", "[0, 29)", "got 29"});
  }
  {
    v1::AttendRequest r = MakeRequest(false);
    for (int64_t g : {3, 5, 3}) r.mutable_sparsity()->add_global_tokens(g);
    ExpectInvalid(r, {"sparsity.global_tokens[2]", "distinct"});
  }
  {
    v1::AttendRequest r = with_selection(good);
    r.mutable_options()->set_variant(v1::LINEAR);
    r.mutable_outputs()->set_lse(false);
    ExpectInvalid(r, {"sparsity: expected unset with variant LINEAR"});
  }
}

TEST_F(SparseTest, DescriptionOverMaxSparseBytesIsResourceExhausted) {
  ServerOptions options;
  options.limits.max_sparse_bytes = 8192;
  StartServer(options);  // in place of SetUp's
  {
    grpc::ClientContext context;
    v1::ServerInfo info;
    ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
    EXPECT_EQ(info.limits().max_sparse_bytes(), 8192);
  }
  // 1024 queries of one head over 1024 keys, each selecting every key: 4 MiB
  // of indices.
  constexpr int64_t n = 1024;
  v1::AttendRequest big;
  *big.mutable_query() = F32Tensor({1, n, 1, 1}, RandomFloats(rng_, n));
  *big.mutable_key() = F32Tensor({1, n, 1, 1}, RandomFloats(rng_, n));
  *big.mutable_value() = F32Tensor({1, n, 1, 1}, RandomFloats(rng_, n));
  std::vector<int32_t> all(n * n);
  for (int64_t i = 0; i < n * n; ++i) all[i] = static_cast<int32_t>(i % n);
  *big.mutable_sparsity()->mutable_key_indices()->mutable_indices() = I32Tensor({1, 1, n, n}, all);
  v1::AttendResponse response;
  grpc::Status s = Attend(big, "cpu", &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(absl::StartsWith(s.error_message(), "sparsity: ")) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "limit of 8192 bytes")) << s.error_message();
  // 4 KiB of indices are under it.
  v1::AttendRequest small = big;
  *small.mutable_sparsity()->mutable_key_indices()->mutable_indices() =
      I32Tensor({1, 1, n, 1}, std::vector<int32_t>(n, 0));
  s = Attend(small, "cpu", &response);
  EXPECT_TRUE(s.ok()) << s.error_message();
}

// The key lists a pattern is converted to are reserved from the memory
// budget with the rest of the request: a key selection that would fit
// without them is refused, naming the budget, with the lists counted.
TEST(SparseLimitsTest, KeyListsAreReservedFromTheMemoryBudget) {
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_listen_address = "";
  options.backend_threads = 2;
  options.memory_limit_bytes = int64_t{20} << 20;  // 15 MiB for requests, 5 for gRPC's buffers
  options.limits.max_sparse_bytes = int64_t{1} << 30;
  auto server = Server::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  auto stub = v1::AttentionService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", (*server)->port()), grpc::InsecureChannelCredentials()));
  // 128 heads of 128 queries, each selecting all 48 keys: 3 MiB of indices
  // in a 3.1 MiB message, copied into 3 MiB of sorted lists (and 64 KiB of
  // offsets); values of dim 156: a 9.75 MiB output, counted once (Attend
  // sends it without a serialized copy). 12.8 MiB without the lists, 15.9 MiB
  // with them.
  constexpr int64_t kHeads = 128, kQueries = 128, kKeys = 48, kValueDim = 156;
  std::mt19937 rng(9);
  v1::AttendRequest request;
  request.set_backend("reference");
  *request.mutable_query() =
      F32Tensor({1, kQueries, kHeads, 1}, RandomFloats(rng, kQueries * kHeads));
  *request.mutable_key() = F32Tensor({1, kKeys, 1, 1}, RandomFloats(rng, kKeys));
  *request.mutable_value() =
      F32Tensor({1, kKeys, 1, kValueDim}, RandomFloats(rng, kKeys * kValueDim));
  std::vector<int32_t> every_key(kHeads * kQueries * kKeys);
  for (size_t i = 0; i < every_key.size(); ++i) every_key[i] = static_cast<int32_t>(i % kKeys);
  *request.mutable_sparsity()->mutable_key_indices()->mutable_indices() =
      I32Tensor({1, kHeads, kQueries, kKeys}, every_key);
  grpc::ClientContext context;
  v1::AttendResponse response;
  grpc::Status s = stub->Attend(&context, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "memory budget")) << s.error_message();
  const int64_t output_bytes = kQueries * kHeads * kValueDim * 4;
  const int64_t list_bytes = (kHeads * kQueries + 1) * 4 + kHeads * kQueries * kKeys * 4;
  EXPECT_TRUE(absl::StrContains(s.error_message(),
                                absl::StrCat("outputs ", output_bytes + list_bytes)))
      << s.error_message();
  EXPECT_EQ((*server)->memory_budget().reserved_bytes(), 0);
  ASSERT_TRUE((*server)->Drain().ok());
}

// Sessions of kHkv heads of dim kD; steps of kHq query heads.
class SparseSessionTest : public SparseTest {
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

  // A step of `n` new tokens: query [n, Hq, D], key and value [n, Hkv, D].
  struct Step {
    std::vector<float> q, k, v;
    int64_t n = 0;
  };
  Step MakeStep(int64_t n) {
    return {RandomFloats(rng_, n * kHq * kD), RandomFloats(rng_, n * kHkv * kD),
            RandomFloats(rng_, n * kHkv * kD), n};
  }

  v1::DecodeRequest DecodeOf(const std::string& id, const Step& step) {
    v1::DecodeRequest r;
    r.set_session_id(id);
    r.set_backend("cpu");
    *r.mutable_query() = F32Tensor({step.n, kHq, kD}, step.q);
    *r.mutable_key() = F32Tensor({step.n, kHkv, kD}, step.k);
    *r.mutable_value() = F32Tensor({step.n, kHkv, kD}, step.v);
    r.mutable_outputs()->set_lse(true);
    return r;
  }

  v1::DecodeResponse Decode(const v1::DecodeRequest& request) {
    grpc::ClientContext context;
    v1::DecodeResponse response;
    grpc::Status s = stub_->Decode(&context, request, &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response;
  }

  // The same step as a causal Attend over every token so far (`k_all`,
  // `v_all`), with `sparsity`.
  v1::AttendResponse AttendOver(const Step& step, const std::vector<float>& k_all,
                                const std::vector<float>& v_all, const v1::Sparsity& sparsity) {
    const int64_t total = static_cast<int64_t>(k_all.size()) / (kHkv * kD);
    v1::AttendRequest r;
    r.set_backend("cpu");
    *r.mutable_query() = F32Tensor({1, step.n, kHq, kD}, step.q);
    *r.mutable_key() = F32Tensor({1, total, kHkv, kD}, k_all);
    *r.mutable_value() = F32Tensor({1, total, kHkv, kD}, v_all);
    r.mutable_options()->set_causal(true);
    r.mutable_outputs()->set_lse(true);
    *r.mutable_sparsity() = sparsity;
    v1::AttendResponse response;
    grpc::Status s = Attend(r, "cpu", &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response;
  }

  // Key blocks of 16 per KV head for a step of `n` queries over `total` keys.
  v1::Sparsity BlockSelection(int64_t n, int64_t total, int32_t query_block, int64_t k) {
    v1::Sparsity sparsity;
    *sparsity.mutable_key_indices() =
        MakeSelection(rng_, 1, kHq, n, total, 1, kHkv, query_block, 16, k).proto;
    return sparsity;
  }

  static void Append(const Step& step, std::vector<float>* k_all, std::vector<float>* v_all) {
    k_all->insert(k_all->end(), step.k.begin(), step.k.end());
    v_all->insert(v_all->end(), step.v.begin(), step.v.end());
  }
};

TEST_F(SparseSessionTest, DecodeWithKeySelectionEqualsAttend) {
  const std::string id = Create();
  std::vector<float> k_all, v_all;
  const Step prefill = MakeStep(100);
  Append(prefill, &k_all, &v_all);
  Decode(DecodeOf(id, prefill));
  for (int64_t n : {1, 1, 5, 1, 37}) {
    const Step step = MakeStep(n);
    Append(step, &k_all, &v_all);
    const int64_t total = static_cast<int64_t>(k_all.size()) / (kHkv * kD);
    v1::Sparsity sparsity = BlockSelection(n, total, n > 1 ? 2 : 1, 3);
    if (n == 5) {
      sparsity.add_global_tokens(0);
      for (int64_t h = 0; h < kHq; ++h) sparsity.add_sink_logits(0.25f * h);
    }
    v1::DecodeRequest request = DecodeOf(id, step);
    *request.mutable_sparsity() = sparsity;
    const v1::DecodeResponse decoded = Decode(request);
    EXPECT_EQ(decoded.context_tokens(), total);
    const v1::AttendResponse attended = AttendOver(step, k_all, v_all, sparsity);
    // Output [n, Hq, D] against [1, n, Hq, D]: compare the values.
    v1::Tensor output = attended.output();
    output.clear_shape();
    for (int64_t d : {n, kHq, kD}) output.add_shape(d);
    ExpectNear(decoded.output(), output, 1e-6f, absl::StrCat("step of ", n, " output"));
    ExpectNear(decoded.lse(), attended.lse(), 1e-6f, absl::StrCat("step of ", n, " lse"));
  }
}

TEST_F(SparseSessionTest, BatchDecodeEqualsDecodesAndABadEntryFailsAlone) {
  // Sessions a and b for the BatchDecode, a2 and b2 for the Decodes, with the
  // same prefills.
  const std::string a = Create(), b = Create(), a2 = Create(), b2 = Create();
  const Step prefill_a = MakeStep(70), prefill_b = MakeStep(45);
  for (const auto& [id, step] : {std::pair{a, &prefill_a}, std::pair{b, &prefill_b},
                                 std::pair{a2, &prefill_a}, std::pair{b2, &prefill_b}}) {
    Decode(DecodeOf(id, *step));
  }
  const Step step_a = MakeStep(1), step_b = MakeStep(1);
  v1::Sparsity sparsity_a = BlockSelection(1, 71, 1, 2);
  v1::Sparsity sparsity_b;
  *sparsity_b.mutable_block_mask() = MakeBlockMask(rng_, 1, kHq, 1, 46, 1, 8, 1, kHq, true).proto;
  sparsity_b.add_global_tokens(3);

  v1::BatchDecodeRequest batch;
  batch.set_backend("cpu");
  batch.mutable_outputs()->set_lse(true);
  for (const auto& [id, step, sparsity] :
       {std::tuple{a, &step_a, &sparsity_a}, std::tuple{b, &step_b, &sparsity_b}}) {
    v1::BatchDecodeEntry* e = batch.add_entries();
    e->set_session_id(id);
    *e->mutable_query() = F32Tensor({1, kHq, kD}, step->q);
    *e->mutable_key() = F32Tensor({1, kHkv, kD}, step->k);
    *e->mutable_value() = F32Tensor({1, kHkv, kD}, step->v);
    *e->mutable_sparsity() = *sparsity;
  }
  v1::BatchDecodeResponse batched;
  {
    grpc::ClientContext context;
    grpc::Status s = stub_->BatchDecode(&context, batch, &batched);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(batched.results_size(), 2);
  for (const auto& [i, id, step, sparsity] : {std::tuple{0, a2, &step_a, &sparsity_a},
                                              std::tuple{1, b2, &step_b, &sparsity_b}}) {
    const v1::BatchDecodeResult& result = batched.results(i);
    ASSERT_EQ(result.code(), 0) << result.message();
    v1::DecodeRequest request = DecodeOf(id, *step);
    *request.mutable_sparsity() = *sparsity;
    const v1::DecodeResponse decoded = Decode(request);
    EXPECT_EQ(result.context_tokens(), decoded.context_tokens());
    ExpectNear(result.output(), decoded.output(), 1e-6f, absl::StrCat("entries[", i, "] output"));
    ExpectNear(result.lse(), decoded.lse(), 1e-6f, absl::StrCat("entries[", i, "] lse"));
  }

  // entries[1]'s key block 3 is past its cache of 47 tokens after the append
  // (3 blocks of 16):
  // it fails alone and keeps its cache; entries[0] is served.
  const Step next_a = MakeStep(1), next_b = MakeStep(1);
  v1::BatchDecodeRequest bad = batch;
  for (auto [e, step] : {std::pair{bad.mutable_entries(0), &next_a},
                         std::pair{bad.mutable_entries(1), &next_b}}) {
    *e->mutable_query() = F32Tensor({1, kHq, kD}, step->q);
    *e->mutable_key() = F32Tensor({1, kHkv, kD}, step->k);
    *e->mutable_value() = F32Tensor({1, kHkv, kD}, step->v);
  }
  *bad.mutable_entries(0)->mutable_sparsity() = BlockSelection(1, 72, 1, 2);
  bad.mutable_entries(1)->clear_sparsity();
  *bad.mutable_entries(1)->mutable_sparsity()->mutable_key_indices()->mutable_indices() =
      I32Tensor({1, kHkv, 1, 2}, {0, -1, 2, 3});
  bad.mutable_entries(1)->mutable_sparsity()->mutable_key_indices()->set_key_block(16);
  v1::BatchDecodeResponse answered;
  {
    grpc::ClientContext context;
    grpc::Status s = stub_->BatchDecode(&context, bad, &answered);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(answered.results_size(), 2);
  EXPECT_EQ(answered.results(0).code(), 0) << answered.results(0).message();
  EXPECT_EQ(answered.results(0).context_tokens(), 72);
  EXPECT_EQ(answered.results(1).code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_TRUE(absl::StartsWith(answered.results(1).message(),
                               "entries[1].sparsity.key_indices.indices[0, 1, 0, 1]"))
      << answered.results(1).message();
  // b's cache is as it was: a step that expects 47 tokens is served.
  v1::DecodeRequest after = DecodeOf(b, next_b);
  after.set_expected_context_tokens(46);
  EXPECT_EQ(Decode(after).context_tokens(), 47);

  // A wire error (dtype) is prefixed the same way.
  v1::BatchDecodeRequest wrong_dtype = bad;
  wrong_dtype.mutable_entries(0)->clear_sparsity();
  wrong_dtype.mutable_entries(1)->set_session_id(b2);
  wrong_dtype.mutable_entries(1)->mutable_sparsity()->mutable_key_indices()->mutable_indices()
      ->set_dtype(v1::F32);
  {
    grpc::ClientContext context;
    v1::BatchDecodeResponse response;
    grpc::Status s = stub_->BatchDecode(&context, wrong_dtype, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(response.results_size(), 2);
    EXPECT_EQ(response.results(0).code(), 0) << response.results(0).message();
    EXPECT_EQ(response.results(1).message(),
              "entries[1].sparsity.key_indices.indices.dtype: expected I32, got F32");
  }
}

TEST_F(SparseSessionTest, BadDecodeSparsityLeavesTheCache) {
  const std::string id = Create();
  Decode(DecodeOf(id, MakeStep(20)));
  v1::DecodeRequest request = DecodeOf(id, MakeStep(2));
  request.mutable_sparsity()->add_global_tokens(22);  // the cache will hold 22 tokens
  grpc::ClientContext context;
  v1::DecodeResponse response;
  grpc::Status s = stub_->Decode(&context, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StartsWith(s.error_message(), "sparsity.global_tokens[0]: expected a key "
                                                  "position in [0, 22)"))
      << s.error_message();
  request.mutable_sparsity()->set_global_tokens(0, 21);
  request.set_expected_context_tokens(20);
  EXPECT_EQ(Decode(request).context_tokens(), 22);
}

TEST_F(SparseSessionTest, SessionSplitOverReplicasRefusesSparsity) {
  // A second server coordinates a session over one shard held by the first.
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_listen_address = "";
  options.backend_threads = 2;
  options.shards.peers = {absl::StrCat("127.0.0.1:", server_->port())};
  options.shards.replica_id = "coordinator";
  auto coordinator = Server::Create(options);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  ASSERT_TRUE((*coordinator)->Start().ok());
  auto stub = v1::AttentionService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*coordinator)->port()),
                          grpc::InsecureChannelCredentials()));
  v1::CreateSessionRequest create;
  create.set_num_kv_heads(kHkv);
  create.set_head_dim(kD);
  create.set_dtype(v1::F32);
  create.set_shards(1);
  v1::CreateSessionResponse created;
  {
    grpc::ClientContext context;
    grpc::Status s = stub->CreateSession(&context, create, &created);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  const Step step = MakeStep(3);
  v1::DecodeRequest request = DecodeOf(created.session_id(), step);
  request.mutable_sparsity()->add_global_tokens(0);
  {
    grpc::ClientContext context;
    v1::DecodeResponse response;
    grpc::Status s = stub->Decode(&context, request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(s.error_message(),
              "sparsity: expected unset for a session split over replicas (shards), got "
              "global_tokens");
  }
  v1::BatchDecodeRequest batch;
  v1::BatchDecodeEntry* e = batch.add_entries();
  e->set_session_id(created.session_id());
  *e->mutable_query() = request.query();
  *e->mutable_key() = request.key();
  *e->mutable_value() = request.value();
  *e->mutable_sparsity()->mutable_key_indices() =
      MakeSelection(rng_, 1, kHq, 3, 3, 1, 1, 1, 1, 1).proto;
  {
    grpc::ClientContext context;
    v1::BatchDecodeResponse response;
    grpc::Status s = stub->BatchDecode(&context, batch, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StartsWith(s.error_message(), "entries[0].sparsity: expected unset"))
        << s.error_message();
  }
  // An empty Sparsity is no pattern: the step is served.
  request.clear_sparsity();
  request.mutable_sparsity();
  {
    grpc::ClientContext context;
    v1::DecodeResponse response;
    grpc::Status s = stub->Decode(&context, request, &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_TRUE((*coordinator)->Drain().ok());
}

}  // namespace
}  // namespace attnserve
