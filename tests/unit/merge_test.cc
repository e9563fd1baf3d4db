// MergeAttentionStates: attention split along the keys into contiguous parts,
// each part computed by the reference backend as sharded keys (key_offset,
// total_keys) with its lse, merges back into the unsplit request's output and
// lse over the option matrix; fully masked parts and rows, associativity,
// bitwise determinism, the tensor overload's checks; and PrepareAttention's
// refusal of malformed key_offset / total_keys.
#include "attention/merge.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention/job.h"
#include "backends/registry.h"
#include "core/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "random_request.h"

namespace attnserve {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// F32 tolerances: output relative to max|V|, lse absolute.
constexpr double kOutputTolerance = 1e-5;
constexpr double kLseTolerance = 1e-5;

Backend& Reference() {
  static Backend* const backend = [] {
    auto created = CreateBackend("reference", {});
    EXPECT_TRUE(created.ok()) << created.status();
    return created->release();
  }();
  return *backend;
}

// Prepares `request` and runs it on the reference backend.
std::unique_ptr<AttentionJob> RunReference(const AttentionRequest& request) {
  auto job = PrepareAttention(request);
  EXPECT_TRUE(job.ok()) << job.status();
  if (!job.ok()) return nullptr;
  const AttentionParams params = (*job)->params;
  EXPECT_TRUE(Reference().Run({&params, 1}).ok());
  return *std::move(job);
}

// Rows [begin, end) of axis Lk (rank - 3) of a [B, Lk, H, D] or [Lk, H, D]
// tensor, copied into `bytes`.
TensorView SliceKeys(const TensorView& t, int64_t begin, int64_t end, std::string& bytes) {
  const int64_t r = t.rank();
  const int64_t outer = r == 4 ? t.shape[0] : 1;
  const int64_t rows = t.shape[r - 3];
  const int64_t row_bytes = t.shape[r - 2] * t.shape[r - 1] * DTypeSize(t.dtype);
  bytes.clear();
  for (int64_t b = 0; b < outer; ++b) {
    bytes.append(t.data.substr((b * rows + begin) * row_bytes, (end - begin) * row_bytes));
  }
  std::vector<int64_t> shape = t.shape;
  shape[r - 3] = end - begin;
  return TensorView{t.dtype, std::move(shape), bytes};
}

// Keys [begin, end) of `full` as a request of their own: sharded keys of a
// sequence of full's Lk, with the lse asked for. Owns the K/V bytes its
// views point into, so it is not copyable.
class KeyPart {
 public:
  KeyPart(const AttentionRequest& full, int64_t begin, int64_t end) : req_(full) {
    req_.key = SliceKeys(full.key, begin, end, k_);
    req_.value = SliceKeys(full.value, begin, end, v_);
    req_.key_offset = begin;
    req_.total_keys = full.key.shape[full.key.rank() - 3];
    req_.outputs.lse = true;
  }
  KeyPart(const KeyPart&) = delete;
  KeyPart& operator=(const KeyPart&) = delete;

  const AttentionRequest& request() const { return req_; }

 private:
  std::string k_, v_;
  AttentionRequest req_;
};

// Cut points of `parts` contiguous non-empty ranges of [0, lk), random.
std::vector<int64_t> RandomCuts(int64_t lk, int64_t parts, std::mt19937_64& rng) {
  std::vector<int64_t> inner(lk - 1);
  for (int64_t j = 0; j < lk - 1; ++j) inner[j] = j + 1;
  std::shuffle(inner.begin(), inner.end(), rng);
  std::vector<int64_t> cuts(inner.begin(), inner.begin() + (parts - 1));
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(lk);
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

StateDims DimsOf(const AttentionRequest& r) {
  const int64_t qr = r.query.rank();
  return StateDims{qr == 4 ? r.query.shape[0] : 1, r.query.shape[qr - 3],
                   static_cast<int32_t>(r.query.shape[qr - 2]),
                   static_cast<int32_t>(r.value.shape[r.value.rank() - 1])};
}

double MaxAbs(const TensorView& t) {
  double m = 0;
  const int64_t n = static_cast<int64_t>(t.data.size() / DTypeSize(t.dtype));
  for (int64_t i = 0; i < n; ++i)
    m = std::max(m, std::abs(double{LoadFloat(t.data.data(), t.dtype, i)}));
  return m;
}

// One split request: the parts' jobs, computed by the reference.
struct Split {
  std::vector<std::unique_ptr<KeyPart>> parts;
  std::vector<std::unique_ptr<AttentionJob>> jobs;
  std::vector<AttentionState> states;
  int fully_masked_parts = 0;  // parts whose every row has lse −inf
};

Split ComputeParts(const AttentionRequest& full, const std::vector<int64_t>& cuts) {
  Split split;
  for (size_t p = 0; p + 1 < cuts.size(); ++p) {
    split.parts.push_back(std::make_unique<KeyPart>(full, cuts[p], cuts[p + 1]));
    split.jobs.push_back(RunReference(split.parts.back()->request()));
    if (split.jobs.back() == nullptr) return split;
    const AttentionJob& job = *split.jobs.back();
    split.states.push_back({job.output.data_as<float>(), job.lse.data_as<float>()});
    const float* lse = job.lse.data_as<float>();
    split.fully_masked_parts +=
        std::all_of(lse, lse + job.lse.num_elements(), [](float l) { return l == -kInf; });
  }
  return split;
}

struct Errors {
  double output = 0;  // max |got − want| / max|V|
  double lse = 0;     // max |got − want| over finite lse
  int masked_rows = 0;
};

// Compares merged (output, lse) to the unsplit job. Fully masked rows must
// be exactly lse −inf and output 0.
Errors Compare(const float* output, const float* lse, const AttentionJob& want,
               const StateDims& dims, double v_scale) {
  Errors e;
  const float* want_o = want.output.data_as<float>();
  const float* want_lse = want.lse.data_as<float>();
  for (int64_t b = 0; b < dims.batch; ++b) {
    for (int64_t h = 0; h < dims.heads; ++h) {
      for (int64_t i = 0; i < dims.seqlen_q; ++i) {
        const int64_t li = (b * dims.heads + h) * dims.seqlen_q + i;
        const int64_t oi = ((b * dims.seqlen_q + i) * dims.heads + h) * dims.value_dim;
        if (want_lse[li] == -kInf) {
          ++e.masked_rows;
          EXPECT_EQ(lse[li], -kInf) << "row b=" << b << " h=" << h << " i=" << i;
          for (int32_t d = 0; d < dims.value_dim; ++d) {
            EXPECT_EQ(std::bit_cast<uint32_t>(output[oi + d]), 0u) << "masked row i=" << i;
          }
          continue;
        }
        e.lse = std::max(e.lse, std::abs(double{lse[li]} - want_lse[li]));
        for (int32_t d = 0; d < dims.value_dim; ++d) {
          e.output =
              std::max(e.output, std::abs(double{output[oi + d]} - want_o[oi + d]) / v_scale);
        }
      }
    }
  }
  return e;
}

struct Case {
  RequestSpec spec;
  bool expect_masked_part = false;  // some split has a fully masked part
  bool expect_masked_rows = false;  // the unsplit request has fully masked rows
};

RequestSpec Spec(std::string name, int64_t lq, int64_t lk, int64_t hq = 4, int64_t hkv = 2) {
  RequestSpec s;
  s.name = std::move(name);
  s.batch = 2;
  s.seqlen_q = lq;
  s.seqlen_k = lk;
  s.heads_q = hq;
  s.heads_kv = hkv;
  s.head_dim = 16;
  s.outputs.lse = true;
  return s;
}

std::vector<Case> Cases() {
  std::vector<Case> c;
  c.push_back({Spec("full_lq_lt_lk", 9, 40)});
  c.push_back({Spec("full_lq_eq_lk", 24, 24)});
  RequestSpec s = Spec("causal_bottom_right_lq_lt_lk", 7, 50);
  s.options.causal = true;
  c.push_back({s});
  s = Spec("causal_top_left_lq_lt_lk", 7, 50);  // keys >= 7 seen by no query
  s.options.causal = true;
  s.options.causal_alignment = CausalAlignment::kTopLeft;
  c.push_back({s, /*expect_masked_part=*/true});
  s = Spec("causal_lq_eq_lk", 33, 33);
  s.options.causal = true;
  c.push_back({s});
  s = Spec("causal_bottom_right_lq_gt_lk", 20, 12);  // rows 0..7 see no key
  s.options.causal = true;
  c.push_back({s, false, /*expect_masked_rows=*/true});
  s = Spec("sliding_window_causal", 40, 40);  // keys i-5..i: parts masked for most rows
  s.options.window_left = 5;
  s.options.window_right = 0;
  c.push_back({s});
  s = Spec("window_both_sides_lq_lt_lk", 16, 48);  // keys i+29..i+36: keys < 29 seen by none
  s.options.window_left = 3;
  s.options.window_right = 4;
  c.push_back({s, true});
  s = Spec("alibi_causal", 12, 45);
  s.options.causal = true;
  s.options.alibi_slopes = AlibiSlopes(s.heads_q);
  c.push_back({s});
  s = Spec("alibi_window_top_left", 12, 45);  // keys i-8..i+2: keys > 13 seen by none
  s.options.window_left = 8;
  s.options.window_right = 2;
  s.options.causal_alignment = CausalAlignment::kTopLeft;
  s.options.alibi_slopes = AlibiSlopes(s.heads_q);
  c.push_back({s, true});
  s = Spec("softcap", 10, 30);
  s.options.softcap = 5.f;
  c.push_back({s});
  s = Spec("gqa_6_to_2_causal_dv24", 9, 37, 6, 2);
  s.value_dim = 24;
  s.options.causal = true;
  c.push_back({s});
  s = Spec("mqa_rank3", 5, 31, 4, 1);
  s.batch = 1;
  s.rank3 = true;
  s.options.scale = 0.5f;
  c.push_back({s});
  return c;
}

TEST(MergeTest, SplitRequestsMergeToTheUnsplitOutputAndLse) {
  Errors worst;
  int fully_masked_parts = 0, merges = 0;
  for (const Case& c : Cases()) {
    int masked_parts_of_case = 0;
    for (uint64_t seed = 0; seed < 10; ++seed) {
      RandomRequest full(c.spec, DType::kF32, 7000 + seed);
      std::mt19937_64 rng(seed);
      const int64_t lk = c.spec.seqlen_k;
      const int64_t n = std::min<int64_t>(1 + seed % 5, lk);
      const std::vector<int64_t> cuts = RandomCuts(lk, n, rng);
      SCOPED_TRACE(absl::StrCat(c.spec.name, " seed ", seed, " cuts ", absl::StrJoin(cuts, ",")));

      std::unique_ptr<AttentionJob> want = RunReference(full.request());
      ASSERT_NE(want, nullptr);
      Split split = ComputeParts(full.request(), cuts);
      ASSERT_EQ(split.states.size(), static_cast<size_t>(n));
      masked_parts_of_case += split.fully_masked_parts;

      const StateDims dims = DimsOf(full.request());
      std::vector<float> output(want->output.num_elements());
      std::vector<float> lse(want->lse.num_elements());
      MergeAttentionStates(split.states, dims, output.data(), lse.data());
      const Errors e =
          Compare(output.data(), lse.data(), *want, dims, MaxAbs(full.request().value));
      EXPECT_LE(e.output, kOutputTolerance);
      EXPECT_LE(e.lse, kLseTolerance);
      if (c.expect_masked_rows) {
        EXPECT_GT(e.masked_rows, 0);
      }
      worst.output = std::max(worst.output, e.output);
      worst.lse = std::max(worst.lse, e.lse);
      worst.masked_rows += e.masked_rows;
      ++merges;
    }
    if (c.expect_masked_part) {
      EXPECT_GT(masked_parts_of_case, 0) << c.spec.name;
    }
    fully_masked_parts += masked_parts_of_case;
  }
  std::printf(
      "[ MergeTest ] %d merges of 1..5 parts (%d parts fully masked, %d rows fully "
      "masked): max output error %.3g x max|V|, max lse error %.3g\n",
      merges, fully_masked_parts, worst.masked_rows, worst.output, worst.lse);
}

// A split of a request whose early keys are all after the queries (top-left
// causal): the later parts see nothing, so their lse is −inf throughout and
// merging them changes no bit.
TEST(MergeTest, FullyMaskedPartsChangeNothing) {
  RequestSpec spec = Spec("causal_top_left", 6, 30);
  spec.options.causal = true;
  spec.options.causal_alignment = CausalAlignment::kTopLeft;
  RandomRequest full(spec, DType::kF32, 11);
  Split split = ComputeParts(full.request(), {0, 6, 18, 30});
  ASSERT_EQ(split.states.size(), 3u);
  EXPECT_EQ(split.fully_masked_parts, 2);
  const StateDims dims = DimsOf(full.request());
  const AttentionJob& first = *split.jobs[0];
  std::vector<float> output(first.output.num_elements());
  std::vector<float> lse(first.lse.num_elements());
  MergeAttentionStates(split.states, dims, output.data(), lse.data());
  EXPECT_EQ(std::memcmp(output.data(), first.output.data.data(), first.output.data.size()), 0);
  EXPECT_EQ(std::memcmp(lse.data(), first.lse.data.data(), first.lse.data.size()), 0);
}

// Rows that see no key in any part merge to lse −inf and output 0: with
// bottom-right causal and Lq > Lk, rows 0..13 see nothing, and the window
// leaves each later row keys in one or two of the parts only.
TEST(MergeTest, FullyMaskedRowsMergeToMinusInfAndZero) {
  RequestSpec spec = Spec("masked_rows", 24, 10);
  spec.options.causal = true;
  spec.options.window_left = 2;
  RandomRequest full(spec, DType::kF32, 12);
  std::unique_ptr<AttentionJob> want = RunReference(full.request());
  ASSERT_NE(want, nullptr);
  Split split = ComputeParts(full.request(), {0, 3, 4, 9, 10});
  ASSERT_EQ(split.states.size(), 4u);
  const StateDims dims = DimsOf(full.request());
  std::vector<float> output(want->output.num_elements());
  std::vector<float> lse(want->lse.num_elements());
  MergeAttentionStates(split.states, dims, output.data(), lse.data());
  const Errors e = Compare(output.data(), lse.data(), *want, dims, MaxAbs(full.request().value));
  EXPECT_EQ(e.masked_rows, 2 * 4 * 14);  // rows 0..13 of every batch row and head
  EXPECT_LE(e.output, kOutputTolerance);
  EXPECT_LE(e.lse, kLseTolerance);
}

TEST(MergeTest, EmptyStatesMergeWithoutNaN) {
  const StateDims dims{1, 1, 1, 3};
  // An empty part's output is never read: garbage in it stays out.
  const float garbage[] = {kNaN, kInf, -kInf};
  const float empty_lse[] = {-kInf};
  const AttentionState empties[] = {{garbage, empty_lse}, {garbage, empty_lse}};
  float output[3] = {1, 2, 3};
  float lse[1] = {7};
  MergeAttentionStates(empties, dims, output, lse);
  EXPECT_EQ(lse[0], -kInf);
  EXPECT_THAT(output, ::testing::ElementsAre(0.f, 0.f, 0.f));

  // No parts at all: the empty state too.
  MergeAttentionStates({}, dims, output, lse);
  EXPECT_EQ(lse[0], -kInf);
  EXPECT_THAT(output, ::testing::ElementsAre(0.f, 0.f, 0.f));

  // An empty part is the identity, bit for bit.
  const float v[] = {0.1f, -2.5f, 3e-7f};
  const float s[] = {1.2345f};
  const AttentionState with_empty[] = {{garbage, empty_lse}, {v, s}, {garbage, empty_lse}};
  MergeAttentionStates(with_empty, dims, output, lse);
  EXPECT_EQ(lse[0], s[0]);
  EXPECT_EQ(std::memcmp(output, v, sizeof v), 0);

  // A NaN lse is not hidden behind an empty neighbour.
  const float nan_lse[] = {kNaN};
  const AttentionState with_nan[] = {{garbage, empty_lse}, {v, nan_lse}};
  MergeAttentionStates(with_nan, dims, output, lse);
  EXPECT_TRUE(std::isnan(lse[0]));
  EXPECT_TRUE(std::isnan(output[0]));
}

// The formula on numbers: e^0 = 1 and e^(ln 3) = 3 of weight merge to ln 4
// with weights 1/4 and 3/4.
TEST(MergeTest, WorkedExample) {
  const StateDims dims{1, 1, 1, 2};
  const float va[] = {1.f, -4.f};
  const float vb[] = {5.f, 4.f};
  const float sa[] = {0.f};
  const float sb[] = {static_cast<float>(std::log(3.0))};
  const AttentionState parts[] = {{va, sa}, {vb, sb}};
  float output[2];
  float lse[1];
  MergeAttentionStates(parts, dims, output, lse);
  EXPECT_NEAR(lse[0], std::log(4.0), 1e-7);
  EXPECT_NEAR(output[0], 4.f, 1e-6);
  EXPECT_NEAR(output[1], 2.f, 1e-6);
}

// ((a ⊕ b) ⊕ c), (a ⊕ (b ⊕ c)) and the one-pass merge of all three agree
// within rounding; the pairwise chain of two parts is the n-way merge, bit
// for bit.
TEST(MergeTest, AssociativeWithinRounding) {
  RequestSpec spec = Spec("alibi_causal", 12, 45);
  spec.options.causal = true;
  spec.options.alibi_slopes = AlibiSlopes(spec.heads_q);
  RandomRequest full(spec, DType::kF32, 13);
  Split split = ComputeParts(full.request(), {0, 10, 30, 45});
  ASSERT_EQ(split.states.size(), 3u);
  const StateDims dims = DimsOf(full.request());
  const AttentionJob& a = *split.jobs[0];
  const AttentionJob& b = *split.jobs[1];
  const size_t no = a.output.num_elements(), nl = a.lse.num_elements();

  std::vector<float> left_o(a.output.data_as<float>(), a.output.data_as<float>() + no);
  std::vector<float> left_l(a.lse.data_as<float>(), a.lse.data_as<float>() + nl);
  MergeAttentionStateInto(split.states[1], dims, left_o.data(), left_l.data());
  std::vector<float> ab_o = left_o, ab_l = left_l;
  MergeAttentionStateInto(split.states[2], dims, left_o.data(), left_l.data());

  std::vector<float> right_o(b.output.data_as<float>(), b.output.data_as<float>() + no);
  std::vector<float> right_l(b.lse.data_as<float>(), b.lse.data_as<float>() + nl);
  MergeAttentionStateInto(split.states[2], dims, right_o.data(), right_l.data());
  std::vector<float> a_bc_o(a.output.data_as<float>(), a.output.data_as<float>() + no);
  std::vector<float> a_bc_l(a.lse.data_as<float>(), a.lse.data_as<float>() + nl);
  MergeAttentionStateInto({right_o.data(), right_l.data()}, dims, a_bc_o.data(), a_bc_l.data());

  std::vector<float> all_o(no), all_l(nl);
  MergeAttentionStates(split.states, dims, all_o.data(), all_l.data());

  const double v_scale = MaxAbs(full.request().value);
  double max_o = 0, max_l = 0;
  for (size_t i = 0; i < no; ++i) {
    max_o = std::max({max_o, std::abs(double{left_o[i]} - a_bc_o[i]) / v_scale,
                      std::abs(double{left_o[i]} - all_o[i]) / v_scale});
  }
  for (size_t i = 0; i < nl; ++i) {
    max_l = std::max(
        {max_l, std::abs(double{left_l[i]} - a_bc_l[i]), std::abs(double{left_l[i]} - all_l[i])});
  }
  EXPECT_LE(max_o, 1e-6);
  EXPECT_LE(max_l, 1e-6);
  std::printf("[ MergeTest ] groupings differ by %.3g x max|V| (output), %.3g (lse)\n", max_o,
              max_l);

  std::vector<float> two_o(no), two_l(nl);
  MergeAttentionStates({split.states.data(), 2}, dims, two_o.data(), two_l.data());
  EXPECT_EQ(std::memcmp(two_o.data(), ab_o.data(), no * 4), 0);
  EXPECT_EQ(std::memcmp(two_l.data(), ab_l.data(), nl * 4), 0);
}

// The same parts merge to the same bits, again and on another thread.
TEST(MergeTest, BitwiseDeterministic) {
  RequestSpec spec = Spec("window_softcap", 17, 64, 6, 3);
  spec.options.window_left = 20;
  spec.options.window_right = 3;
  spec.options.softcap = 8.f;
  RandomRequest full(spec, DType::kF32, 14);
  Split split = ComputeParts(full.request(), {0, 5, 21, 22, 50, 64});
  ASSERT_EQ(split.states.size(), 5u);
  const StateDims dims = DimsOf(full.request());
  const size_t no = split.jobs[0]->output.num_elements(), nl = split.jobs[0]->lse.num_elements();
  std::vector<float> o1(no), l1(nl), o2(no), l2(nl), o3(no), l3(nl);
  MergeAttentionStates(split.states, dims, o1.data(), l1.data());
  MergeAttentionStates(split.states, dims, o2.data(), l2.data());
  std::thread other([&] { MergeAttentionStates(split.states, dims, o3.data(), l3.data()); });
  other.join();
  EXPECT_EQ(std::memcmp(o1.data(), o2.data(), no * 4), 0);
  EXPECT_EQ(std::memcmp(l1.data(), l2.data(), nl * 4), 0);
  EXPECT_EQ(std::memcmp(o1.data(), o3.data(), no * 4), 0);
  EXPECT_EQ(std::memcmp(l1.data(), l3.data(), nl * 4), 0);
}

// The outputs may be one of the parts' buffers.
TEST(MergeTest, OutputMayBeAPartsBuffer) {
  RequestSpec spec = Spec("causal", 8, 20);
  spec.options.causal = true;
  RandomRequest full(spec, DType::kF32, 15);
  Split split = ComputeParts(full.request(), {0, 7, 13, 20});
  const StateDims dims = DimsOf(full.request());
  const size_t no = split.jobs[0]->output.num_elements(), nl = split.jobs[0]->lse.num_elements();
  std::vector<float> want_o(no), want_l(nl);
  MergeAttentionStates(split.states, dims, want_o.data(), want_l.data());
  float* o1 = split.jobs[1]->output.mutable_data<float>();
  float* l1 = split.jobs[1]->lse.mutable_data<float>();
  MergeAttentionStates(split.states, dims, o1, l1);
  EXPECT_EQ(std::memcmp(o1, want_o.data(), no * 4), 0);
  EXPECT_EQ(std::memcmp(l1, want_l.data(), nl * 4), 0);
}

// The tensor overload: 16-bit outputs, unaligned bytes, the output dtype,
// and errors naming the part and field.
class MergeTensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    RequestSpec spec = Spec("causal", 6, 21);
    spec.options.causal = true;
    full_ = std::make_unique<RandomRequest>(spec, DType::kF32, 16);
    split_ = ComputeParts(full_->request(), {0, 8, 15, 21});
    ASSERT_EQ(split_.states.size(), 3u);
    for (const auto& job : split_.jobs) views_.push_back({job->output.view(), job->lse.view()});
  }
  std::unique_ptr<RandomRequest> full_;
  Split split_;
  std::vector<AttentionStateView> views_;
};

TEST_F(MergeTensorsTest, MatchesThePointerMerge) {
  const StateDims dims = DimsOf(full_->request());
  const size_t no = split_.jobs[0]->output.num_elements();
  const size_t nl = split_.jobs[0]->lse.num_elements();
  std::vector<float> want_o(no), want_l(nl);
  MergeAttentionStates(split_.states, dims, want_o.data(), want_l.data());

  absl::StatusOr<MergedAttention> merged = MergeAttentionStates(views_);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->output.dtype, DType::kF32);
  EXPECT_EQ(merged->output.shape, split_.jobs[0]->output.shape);
  EXPECT_EQ(merged->lse.shape, split_.jobs[0]->lse.shape);
  EXPECT_EQ(std::memcmp(merged->output.data.data(), want_o.data(), no * 4), 0);
  EXPECT_EQ(std::memcmp(merged->lse.data.data(), want_l.data(), nl * 4), 0);

  // Unaligned wire bytes read the same.
  std::vector<std::string> shifted(2 * views_.size());
  std::vector<AttentionStateView> unaligned = views_;
  for (size_t i = 0; i < views_.size(); ++i) {
    shifted[2 * i].assign(1, '\0');
    shifted[2 * i].append(views_[i].output.data);
    shifted[2 * i + 1].assign(1, '\0');
    shifted[2 * i + 1].append(views_[i].lse.data);
    unaligned[i].output.data = std::string_view(shifted[2 * i]).substr(1);
    unaligned[i].lse.data = std::string_view(shifted[2 * i + 1]).substr(1);
  }
  absl::StatusOr<MergedAttention> again = MergeAttentionStates(unaligned);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->output.data, merged->output.data);
  EXPECT_EQ(again->lse.data, merged->lse.data);

  // Rounded once to the dtype asked for.
  absl::StatusOr<MergedAttention> bf16 = MergeAttentionStates(views_, DType::kBF16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(bf16->output.dtype, DType::kBF16);
  for (size_t i = 0; i < no; ++i) {
    ASSERT_EQ(LoadFloat(bf16->output.data.data(), DType::kBF16, i),
              Bf16ToFloat(FloatToBf16(want_o[i])));
  }
  EXPECT_EQ(bf16->lse.data, merged->lse.data);
}

TEST_F(MergeTensorsTest, SixteenBitOutputsAreWidened) {
  std::vector<std::string> halves(views_.size());
  std::vector<AttentionStateView> f16 = views_;
  std::vector<std::vector<float>> rounded(views_.size());
  std::vector<AttentionState> states(views_.size());
  for (size_t i = 0; i < views_.size(); ++i) {
    const int64_t n = split_.jobs[i]->output.num_elements();
    halves[i].resize(n * 2);
    rounded[i].resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const float x = split_.jobs[i]->output.data_as<float>()[j];
      StoreFloat(halves[i].data(), DType::kF16, j, x);
      rounded[i][j] = LoadFloat(halves[i].data(), DType::kF16, j);
    }
    f16[i].output = TensorView{DType::kF16, views_[i].output.shape, halves[i]};
    states[i] = {rounded[i].data(), split_.states[i].lse};
  }
  const size_t no = rounded[0].size(), nl = split_.jobs[0]->lse.num_elements();
  std::vector<float> want_o(no), want_l(nl);
  MergeAttentionStates(states, DimsOf(full_->request()), want_o.data(), want_l.data());
  absl::StatusOr<MergedAttention> merged = MergeAttentionStates(f16, DType::kF16);
  ASSERT_TRUE(merged.ok()) << merged.status();
  for (size_t i = 0; i < no; ++i) {
    ASSERT_EQ(LoadFloat(merged->output.data.data(), DType::kF16, i),
              HalfToFloat(FloatToHalf(want_o[i])));
  }
}

void ExpectInvalid(absl::Span<const AttentionStateView> parts, const std::string& field,
                   const std::string& got, DType output_dtype = DType::kF32) {
  absl::StatusOr<MergedAttention> merged = MergeAttentionStates(parts, output_dtype);
  ASSERT_FALSE(merged.ok()) << "accepted a bad " << field;
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(merged.status().message()),
              AllOf(HasSubstr(field + ": expected"), HasSubstr("got " + got)));
}

TEST_F(MergeTensorsTest, MismatchesNameThePartAndField) {
  ExpectInvalid({}, "parts", "none");
  ExpectInvalid(views_, "output_dtype", "I32", DType::kI32);

  std::vector<AttentionStateView> bad = views_;
  bad[1].output.shape = {2, 6, 2, 32};
  ExpectInvalid(bad, "parts[1].output.shape", "[2, 6, 2, 32]");

  bad = views_;
  bad[2].output.dtype = DType::kF16;
  ExpectInvalid(bad, "parts[2].output.dtype", "F16");

  bad = views_;
  bad[0].output.dtype = DType::kI32;
  ExpectInvalid(bad, "parts[0].output.dtype", "I32");

  bad = views_;
  bad[0].output.shape = {2, 6, 4 * 16};
  for (auto& v : bad) v.output.shape = bad[0].output.shape;
  ExpectInvalid(bad, "parts[0].lse.shape", "[2, 4, 6]");  // read as [Lq=2, Hq=6, Dv=64]

  bad = views_;
  bad[2].lse.dtype = DType::kBF16;
  ExpectInvalid(bad, "parts[2].lse.dtype", "BF16");

  bad = views_;
  bad[1].lse.shape = {2, 4, 7};
  ExpectInvalid(bad, "parts[1].lse.shape", "[2, 4, 7]");

  bad = views_;
  bad[2].lse.data = bad[2].lse.data.substr(4);
  ExpectInvalid(bad, "parts[2].lse.data", absl::StrCat(bad[2].lse.data.size(), " bytes"));

  bad = views_;
  bad[1].output.data = bad[1].output.data.substr(1);
  ExpectInvalid(bad, "parts[1].output.data", absl::StrCat(bad[1].output.data.size(), " bytes"));

  bad = views_;
  bad[0].output.shape = {6, 4};
  for (auto& v : bad) v.output.shape = bad[0].output.shape;
  ExpectInvalid(bad, "parts[0].output.shape", "[6, 4]");
}

// PrepareAttention's checks of sharded keys.
TEST(MergeTest, PrepareRefusesMalformedShards) {
  RequestSpec spec = Spec("shard", 4, 10);
  RandomRequest base(spec, DType::kF32, 17);
  const auto expect_invalid = [](const AttentionRequest& r, const std::string& field,
                                 const std::string& got) {
    auto job = PrepareAttention(r);
    ASSERT_FALSE(job.ok()) << "accepted a bad " << field;
    EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument) << job.status();
    EXPECT_THAT(std::string(job.status().message()),
                AllOf(HasSubstr(field + ": expected"), HasSubstr("got " + got)));
  };
  AttentionRequest r = base.request();
  r.key_offset = -1;
  expect_invalid(r, "key_offset", "-1");

  r = base.request();
  r.key_offset = 5;
  r.total_keys = 14;  // keys 5..14 need 15
  expect_invalid(r, "total_keys", "14");
  r.total_keys = 15;
  EXPECT_TRUE(PrepareAttention(r).ok());
  r.total_keys = 0;  // the last part
  EXPECT_TRUE(PrepareAttention(r).ok());

  r = base.request();
  r.total_keys = 9;  // less than Lk itself
  expect_invalid(r, "total_keys", "9");

  r = base.request();
  r.key_offset = 3;
  r.key_lengths = {10, 10};
  expect_invalid(r, "key_lengths", "2 lengths");
  r.key_offset = 0;
  r.total_keys = 20;
  expect_invalid(r, "key_lengths", "2 lengths");
}

}  // namespace
}  // namespace attnserve
