// Batch invariance (docs/ARCHITECTURE.md, kernel boundary): for every registered backend a
// request's outputs are bitwise the same whether it runs alone or inside
// batches of any composition and order, and whatever the backend's thread count.
// A case the backend's Supports() refuses is left out of the batches; it is
// counted and listed, and is a failure when the backend's BackendInfo claims
// the dtype and every feature the case uses (RefusedCases).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/job.h"
#include "core/cancel_token.h"
#include "backends/registry.h"
#include "gtest/gtest.h"
#include "random_request.h"
#include "refused_cases.h"

namespace attnserve {
namespace {

// A mix of shapes, options, sparse patterns and dtypes. Heads and batch rows
// give a threaded backend several work items per request; window_long is long
// enough that tiled backends split its query rows too.
std::vector<RequestSpec> Specs() {
  std::vector<RequestSpec> specs;
  RequestSpec s;
  s.name = "gqa_causal_lse";
  s.batch = 2;
  s.seqlen_q = 33;
  s.seqlen_k = 65;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.head_dim = 64;
  s.options.causal = true;
  s.outputs.lse = true;
  specs.push_back(s);

  s = RequestSpec();
  s.name = "window_long";
  s.seqlen_q = 270;
  s.seqlen_k = 1000;
  s.heads_q = 1;
  s.heads_kv = 1;
  s.head_dim = 32;
  s.options.window_left = 100;
  s.options.window_right = 20;
  specs.push_back(s);

  s = RequestSpec();
  s.name = "decode_key_lengths";
  s.batch = 3;
  s.seqlen_q = 1;
  s.seqlen_k = 130;
  s.heads_q = 8;
  s.heads_kv = 1;
  s.head_dim = 128;
  s.key_lengths = {130, 0, 77};
  s.outputs.top_k = 4;
  specs.push_back(s);

  s = RequestSpec();
  s.name = "linear_causal";
  s.seqlen_q = 65;
  s.seqlen_k = 65;
  s.heads_q = 4;
  s.heads_kv = 4;
  s.head_dim = 32;
  s.options.variant = Variant::kLinear;
  s.options.causal = true;
  specs.push_back(s);

  s = RequestSpec();
  s.name = "bias_alibi_softcap_weights";
  s.batch = 2;
  s.seqlen_q = 17;
  s.seqlen_k = 40;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.head_dim = 32;
  s.options.softcap = 10.f;
  s.options.alibi_slopes = AlibiSlopes(4);
  s.bias_shape = std::vector<int64_t>{2, 1, 17, 40};
  s.bias_masks = true;
  s.outputs.weights = true;
  specs.push_back(s);

  // Sparse patterns: a block mask per head with full blocks, global tokens
  // and sinks; a key selection per KV head over query blocks; and a decode
  // row over keys enough for key chunks.
  s = RequestSpec();
  s.name = "sparse_block_mask_global_sinks";
  s.batch = 2;
  s.seqlen_q = 40;
  s.seqlen_k = 70;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.head_dim = 32;
  s.options.causal = true;
  s.sparse.block_rows = 16;
  s.sparse.block_cols = 16;
  s.sparse.per_head = true;
  s.sparse.full_blocks = true;
  s.sparse.global_tokens = 3;
  s.sparse.sinks = true;
  s.outputs.lse = true;
  s.outputs.entropy = true;
  specs.push_back(s);

  s = RequestSpec();
  s.name = "sparse_key_indices_key_lengths";
  s.batch = 2;
  s.seqlen_q = 21;
  s.seqlen_k = 50;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.head_dim = 32;
  s.key_lengths = {50, 0};
  s.sparse.select_k = 12;
  s.sparse.query_block = 4;
  s.sparse.select_heads = SparsePattern::Heads::kKv;
  s.outputs.weights = true;
  s.outputs.top_k = 3;
  specs.push_back(s);

  s = RequestSpec();
  s.name = "sparse_decode_long";
  s.seqlen_q = 1;
  s.seqlen_k = 2100;
  s.heads_q = 16;
  s.heads_kv = 4;
  s.head_dim = 64;
  s.sparse.block_rows = 1;
  s.sparse.block_cols = 64;
  s.sparse.per_head = true;
  s.sparse.global_tokens = 4;
  s.sparse.sinks = true;
  s.outputs.lse = true;
  specs.push_back(s);
  return specs;
}

// Every output's bytes, to compare bitwise.
std::vector<std::string> OutputBytes(const AttentionJob& job) {
  return {job.output.data,  job.lse.data,           job.entropy.data,
          job.weights.data, job.top_k_indices.data, job.top_k_weights.data};
}

struct Workload {
  std::vector<std::unique_ptr<RandomRequest>> requests;  // one per (spec, dtype)
  std::vector<std::string> names;
  std::vector<RequestSpec> specs;  // of each request
  std::vector<DType> dtypes;       // of each request
};

Workload MakeWorkload(uint64_t seed) {
  Workload w;
  const std::vector<RequestSpec> specs = Specs();
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (size_t i = 0; i < specs.size(); ++i) {
      w.requests.push_back(std::make_unique<RandomRequest>(specs[i], dtype, seed + i));
      w.names.push_back(absl::StrCat(specs[i].name, "/", DTypeName(dtype)));
      w.specs.push_back(specs[i]);
      w.dtypes.push_back(dtype);
    }
  }
  return w;
}

class BatchInvarianceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto one = CreateBackend(GetParam(), BackendOptions{.threads = 1});
    if (one.status().code() == absl::StatusCode::kFailedPrecondition) {
      GTEST_SKIP() << "backend " << GetParam() << " cannot start here: " << one.status();
    }
    ASSERT_TRUE(one.ok()) << one.status();
    auto two = CreateBackend(GetParam(), BackendOptions{.threads = 2});
    ASSERT_TRUE(two.ok()) << two.status();
    single_thread_ = *std::move(one);
    two_threads_ = *std::move(two);
    CheckRefusals();
  }

  // The batches below leave out the requests a backend refuses, so every test
  // first asks both instances about every (spec, dtype) of the workload:
  // refusals are counted and printed, and refusing a claimed case fails.
  void CheckRefusals() {
    const Workload w = MakeWorkload(0);
    for (const Backend* backend : {single_thread_.get(), two_threads_.get()}) {
      RefusedCases refused;
      for (size_t i = 0; i < w.requests.size(); ++i) {
        auto job = PrepareAttention(w.requests[i]->request());
        ASSERT_TRUE(job.ok()) << w.names[i] << ": " << job.status();
        refused.Check(*backend, w.specs[i], w.dtypes[i], (*job)->params);
      }
      std::printf("[ %s, %s ] %zu of %zu cases run, %s\n", GetParam().c_str(),
                  backend == single_thread_.get() ? "1 thread" : "2 threads",
                  w.requests.size() - refused.count(), w.requests.size(),
                  refused.Summary().c_str());
    }
  }

  // Runs `indices` of `w` as one batch; returns the outputs per index (empty
  // for a request the backend refuses; CheckRefusals has judged those).
  // `stop_first`, if set, is the first request's cancel token.
  std::vector<std::vector<std::string>> RunBatch(Backend& backend, const Workload& w,
                                                 const std::vector<size_t>& indices,
                                                 const CancelToken* stop_first = nullptr) {
    std::vector<std::unique_ptr<AttentionJob>> jobs;
    std::vector<AttentionParams> batch;
    std::vector<size_t> ran;
    for (size_t i : indices) {
      auto job = PrepareAttention(w.requests[i]->request());
      EXPECT_TRUE(job.ok()) << w.names[i] << ": " << job.status();
      if (!job.ok() || !backend.Supports((*job)->params).ok()) continue;
      batch.push_back((*job)->params);
      jobs.push_back(*std::move(job));
      ran.push_back(i);
    }
    if (stop_first != nullptr && !batch.empty()) batch.front().cancel = stop_first;
    EXPECT_TRUE(backend.Run(batch).ok());
    std::vector<std::vector<std::string>> out(w.requests.size());
    for (size_t j = 0; j < jobs.size(); ++j) out[ran[j]] = OutputBytes(*jobs[j]);
    return out;
  }

  std::unique_ptr<Backend> single_thread_;
  std::unique_ptr<Backend> two_threads_;
};

void ExpectSameBytes(const Workload& w, const std::vector<std::vector<std::string>>& alone,
                     const std::vector<std::vector<std::string>>& batched, const std::string& how) {
  for (size_t i = 0; i < w.requests.size(); ++i) {
    if (alone[i].empty() || batched[i].empty()) continue;
    static const char* kOutputs[] = {"output",        "lse",          "entropy", "weights",
                                     "top_k_indices", "top_k_weights"};
    for (size_t o = 0; o < alone[i].size(); ++o) {
      EXPECT_TRUE(alone[i][o] == batched[i][o])
          << w.names[i] << ": " << kOutputs[o] << " differs bitwise " << how;
    }
  }
}

TEST_P(BatchInvarianceTest, AloneEqualsAnyBatchComposition) {
  const Workload w = MakeWorkload(7);
  const Workload others = MakeWorkload(99);  // same shapes, different data
  const size_t n = w.requests.size();

  std::vector<std::vector<std::string>> alone(n);
  for (size_t i = 0; i < n; ++i) alone[i] = RunBatch(*two_threads_, w, {i})[i];

  std::vector<size_t> all(n), reversed(n);
  for (size_t i = 0; i < n; ++i) all[i] = i, reversed[i] = n - 1 - i;
  ExpectSameBytes(w, alone, RunBatch(*two_threads_, w, all), "in a batch of all");
  ExpectSameBytes(w, alone, RunBatch(*two_threads_, w, reversed), "in the reversed batch");
  std::vector<size_t> odd, repeated;
  for (size_t i = 1; i < n; i += 2) odd.push_back(i);
  ExpectSameBytes(w, alone, RunBatch(*two_threads_, w, odd), "in a batch of every other");
  for (size_t i = 0; i < n; ++i) repeated.insert(repeated.end(), {i, (i + 3) % n, i});
  ExpectSameBytes(w, alone, RunBatch(*two_threads_, w, repeated), "beside repeats");

  // Batched with other requests' data: merge both workloads into one batch.
  std::vector<std::vector<std::string>> with_others;
  {
    std::vector<std::unique_ptr<AttentionJob>> jobs;
    std::vector<AttentionParams> batch;
    std::vector<size_t> ran;
    for (size_t i = 0; i < n; ++i) {
      for (const Workload* source : {&others, &w}) {
        auto job = PrepareAttention(source->requests[n - 1 - i]->request());
        ASSERT_TRUE(job.ok()) << job.status();
        if (!two_threads_->Supports((*job)->params).ok()) continue;
        batch.push_back((*job)->params);
        jobs.push_back(*std::move(job));
        ran.push_back(source == &w ? n - 1 - i : n);  // n: a request of `others`
      }
    }
    ASSERT_TRUE(two_threads_->Run(batch).ok());
    with_others.assign(n, {});
    for (size_t j = 0; j < jobs.size(); ++j) {
      if (ran[j] < n) with_others[ran[j]] = OutputBytes(*jobs[j]);
    }
  }
  ExpectSameBytes(w, alone, with_others, "interleaved with other requests");
}

// A request stopped through its cancel token (its caller left) changes
// nothing for the others in its batch, and the backend noticed the stop.
TEST_P(BatchInvarianceTest, StoppedRequestLeavesTheOthersUnchanged) {
  const Workload w = MakeWorkload(31);
  std::vector<size_t> all(w.requests.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  const auto full = RunBatch(*two_threads_, w, all);
  CancelToken stop([] { return true; });
  auto stopped = RunBatch(*two_threads_, w, all, &stop);
  EXPECT_TRUE(stop.stopped()) << GetParam() << " never polled the cancel token";
  // The first request the backend ran was stopped: its outputs are unspecified.
  for (size_t i = 0; i < all.size(); ++i) {
    if (full[i].empty()) continue;
    stopped[i] = full[i];
    break;
  }
  ExpectSameBytes(w, full, stopped, "beside a stopped request");
}

TEST_P(BatchInvarianceTest, OneThreadEqualsTwoThreads) {
  const Workload w = MakeWorkload(11);
  std::vector<size_t> all(w.requests.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  ExpectSameBytes(w, RunBatch(*single_thread_, w, all), RunBatch(*two_threads_, w, all),
                  "with 2 threads than with 1");
}

// Backend methods may be called from several threads at once (backend.h):
// concurrent runs on one instance give the same bytes as serial runs.
TEST_P(BatchInvarianceTest, ConcurrentRunsEqualSerialRuns) {
  const Workload w = MakeWorkload(23);
  const size_t n = w.requests.size();
  std::vector<size_t> first, second;
  for (size_t i = 0; i < n; ++i) (i % 2 == 0 ? first : second).push_back(i);
  const auto serial_first = RunBatch(*two_threads_, w, first);
  const auto serial_second = RunBatch(*two_threads_, w, second);
  std::vector<std::vector<std::string>> concurrent_first, concurrent_second;
  {
    std::thread a([&] { concurrent_first = RunBatch(*two_threads_, w, first); });
    std::thread b([&] { concurrent_second = RunBatch(*two_threads_, w, second); });
    a.join();
    b.join();
  }
  ExpectSameBytes(w, serial_first, concurrent_first, "when run concurrently");
  ExpectSameBytes(w, serial_second, concurrent_second, "when run concurrently");
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BatchInvarianceTest,
                         ::testing::ValuesIn(AvailableBackends()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace attnserve
