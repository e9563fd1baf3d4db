// Sparse patterns through PlanAttention/PrepareAttention (attention/sparse.h):
// every malformed description is INVALID_ARGUMENT naming the field and index,
// the expected and the received value; an oversized one is RESOURCE_EXHAUSTED;
// and the counts the cost model uses agree with the mask (KeyVisibleToHead).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/cost.h"
#include "attention/job.h"
#include "attention/params.h"
#include "attention/sparse.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "random_request.h"

namespace attnserve {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// B 2, Lq 10, Lk 13, Hq 4, Hkv 2, D 8. Owns every byte the views point into;
// index tensors are kept in deques of strings so that views stay valid.
class SparseFixture {
 public:
  static constexpr int64_t B = 2, Lq = 10, Lk = 13, Hq = 4, Hkv = 2, D = 8;

  SparseFixture() {
    auto zeros = [](std::string& bytes, std::vector<int64_t> shape) {
      bytes.assign(CheckedElementCount(shape) * 4, '\0');
      return TensorView{DType::kF32, std::move(shape), bytes};
    };
    req.query = zeros(q_, {B, Lq, Hq, D});
    req.key = zeros(k_, {B, Lk, Hkv, D});
    req.value = zeros(v_, {B, Lk, Hkv, D});
  }
  SparseFixture(const SparseFixture&) = delete;
  SparseFixture& operator=(const SparseFixture&) = delete;

  TensorView I32(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
    std::string& bytes = owned_.emplace_back(values.size() * 4, '\0');
    if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
    return TensorView{DType::kI32, std::move(shape), bytes};
  }

  // A valid block mask with R = C = 4: 3 row blocks over 4 key blocks,
  // broadcast over batch rows and heads.
  BlockMaskSpec Mask() {
    BlockMaskSpec bm;
    bm.block_rows = 4;
    bm.block_cols = 4;
    bm.indptr = I32({1, 1, 4}, {0, 2, 3, 5});
    bm.indices = I32({5}, {0, 1, 2, 0, 3});
    return bm;
  }

  // A valid per-key selection [B, Hq, Lq, 3]: two keys and a -1 per row.
  KeySelectionSpec Selection() {
    std::vector<int32_t> v;
    for (int64_t n = 0; n < B * Hq * Lq; ++n) {
      v.insert(v.end(), {int32_t(n % 6), -1, 6 + int32_t(n % 7)});
    }
    KeySelectionSpec ks;
    ks.indices = I32({B, Hq, Lq, 3}, v);
    return ks;
  }

  AttentionRequest req;

 private:
  std::string q_, k_, v_;
  std::deque<std::string> owned_;
};

// INVALID_ARGUMENT whose message is "<field>: expected <...expected...>, got <got>".
void ExpectInvalid(const AttentionRequest& req, const std::string& field,
                   const std::string& expected, const std::string& got) {
  for (bool plan_only : {true, false}) {
    auto job = plan_only ? PlanAttention(req) : PrepareAttention(req);
    ASSERT_FALSE(job.ok()) << "accepted a request with a bad " << field;
    EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument) << job.status();
    EXPECT_THAT(std::string(job.status().message()),
                AllOf(HasSubstr(field + ": expected"), HasSubstr(expected),
                      HasSubstr(", got " + got)));
  }
}

TEST(SparsePlanTest, ValidBlockMaskFillsTheLists) {
  SparseFixture f;
  f.req.sparsity.block_mask = f.Mask();
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  const SparseParams& s = (*job)->params.sparse;
  EXPECT_EQ(s.list_batches, 1);
  EXPECT_EQ(s.list_heads, 1);
  EXPECT_EQ(s.list_head_div, 4);
  EXPECT_EQ(s.list_rows, 3);
  EXPECT_EQ(s.list_row_queries, 4);
  EXPECT_EQ(s.unit_keys, 4);
  EXPECT_EQ(std::vector<int32_t>(s.list_offsets, s.list_offsets + 4),
            (std::vector<int32_t>{0, 2, 3, 5}));
  EXPECT_EQ(std::vector<int32_t>(s.list_units, s.list_units + 5),
            (std::vector<int32_t>{0, 1, 2, 0, 3}));
  // Row 9 is in row block 2 (the padded last one): key blocks 0 and 3.
  const AttentionParams& p = (*job)->params;
  for (int64_t j = 0; j < SparseFixture::Lk; ++j) {
    EXPECT_EQ(KeyVisibleToHead(p, 1, 3, 9, j), j < 4 || j >= 12) << j;
  }
}

// Indices in the caller's shared memory may change under the call: the job
// then keeps a copy, checked, and the kernels read that, never the caller's
// bytes (without copy_indices the aligned request bytes serve as they are).
TEST(SparsePlanTest, IndicesThatMayChangeAreCopiedBeforeTheyAreChecked) {
  for (bool copy : {false, true}) {
    SparseFixture f;
    f.req.sparsity.block_mask = f.Mask();
    f.req.sparsity.block_mask->copy_indices = copy;
    auto job = PrepareAttention(f.req);
    ASSERT_TRUE(job.ok()) << job.status();
    const SparseParams& s = (*job)->params.sparse;
    const auto* request_units =
        reinterpret_cast<const int32_t*>(f.req.sparsity.block_mask->indices.data.data());
    EXPECT_EQ(s.list_units == request_units, !copy) << "copy_indices " << copy;
    EXPECT_EQ(std::vector<int32_t>(s.list_units, s.list_units + 5),
              (std::vector<int32_t>{0, 1, 2, 0, 3}));
    // The caller overwriting its bytes afterwards changes nothing the job holds.
    if (copy) {
      std::memset(const_cast<char*>(f.req.sparsity.block_mask->indices.data.data()), 0x7f, 20);
      EXPECT_EQ(std::vector<int32_t>(s.list_units, s.list_units + 5),
                (std::vector<int32_t>{0, 1, 2, 0, 3}));
    }
  }
}

TEST(SparsePlanTest, RankOneIndptrIsOneSlice) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.indptr = f.I32({4}, {0, 2, 3, 5});
  f.req.sparsity.block_mask = bm;
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ((*job)->params.sparse.list_rows, 3);
}

TEST(SparsePlanTest, IndptrNotMonotone) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.indptr = f.I32({1, 1, 4}, {0, 3, 2, 5});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr[0, 0, 2]", ">= 3 (indptr is monotone)", "2");
}

TEST(SparsePlanTest, FirstSliceNotStartingAtZero) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.indptr = f.I32({1, 1, 4}, {1, 2, 3, 5});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr[0, 0, 0]", "0 (the first slice starts at 0)",
                "1");
}

TEST(SparsePlanTest, NextSliceNotStartingWhereThePreviousEnded) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  // Per batch row: slice [1, 0] starts at 4, but slice [0, 0] ended at 3.
  bm.indptr = f.I32({2, 1, 4}, {0, 1, 2, 3, 4, 4, 5, 5});
  bm.indices = f.I32({5}, {0, 1, 2, 3, 0});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr[1, 0, 0]",
                "3 (where the previous slice ended)", "4");
}

TEST(SparsePlanTest, IndptrNotEndingAtTheLengthOfIndices) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.indptr = f.I32({1, 1, 4}, {0, 2, 3, 4});  // five indices, four used
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr[0, 0, 3]",
                "5 (the length of sparsity.block_mask.indices)", "4");
  bm.indptr = f.I32({1, 1, 4}, {0, 2, 3, 6});  // past the end
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr[0, 0, 3]",
                "<= 5 (the length of sparsity.block_mask.indices)", "6");
  // Per head: the last slice [1, 3] ends short.
  std::vector<int32_t> ip;
  for (int32_t slice = 0; slice < 8; ++slice) ip.insert(ip.end(), {slice, slice, slice, slice + 1});
  ip.back() = 7;
  bm.indptr = f.I32({2, 4, 4}, ip);
  bm.indices = f.I32({8}, {0, 1, 2, 3, 0, 1, 2, 3});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr[1, 3, 3]",
                "8 (the length of sparsity.block_mask.indices)", "7");
}

TEST(SparsePlanTest, BlockIndexOutOfRange) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.indices = f.I32({5}, {0, 1, 2, 0, 4});  // Lk 13 in blocks of 4: blocks 0..3
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indices[4]", "a key block in [0, 4)", "4");
  bm.indices = f.I32({5}, {0, 1, -1, 0, 3});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indices[2]", "a key block in [0, 4)", "-1");
}

TEST(SparsePlanTest, BlocksNotIncreasingWithinARow) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.indices = f.I32({5}, {1, 1, 2, 0, 3});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indices[1]",
                "> 1 (key blocks increase within row block 0 of slice [0, 0])", "1");
  bm.indices = f.I32({5}, {0, 1, 2, 3, 0});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indices[4]",
                "> 3 (key blocks increase within row block 2 of slice [0, 0])", "0");
}

TEST(SparsePlanTest, BlockSizesZero) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.block_rows = 0;
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.block_rows", ">= 1", "0");
  bm = f.Mask();
  bm.block_cols = 0;
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.block_cols", ">= 1", "0");
  bm.block_cols = -3;
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.block_cols", ">= 1", "-3");
}

TEST(SparsePlanTest, IndptrShapeFollowsThePaddingRule) {
  SparseFixture f;
  // Lq 10 in blocks of 4 is ceil(10 / 4) = 3 row blocks: 4 offsets, not 3.
  const std::string expected =
      "[B or 1, Hq or 1, ceil(Lq / block_rows) + 1] = [2 or 1, 4 or 1, 4] (Lq 10 padded to "
      "blocks of 4), or rank 1 [4]";
  BlockMaskSpec bm = f.Mask();
  bm.indptr = f.I32({1, 1, 3}, {0, 2, 5});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr.shape", expected, "[1, 1, 3]");
  bm.indptr = f.I32({1, 2, 4}, {0, 1, 1, 1, 1, 2, 3, 5});  // Hkv heads: not a form
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr.shape", expected, "[1, 2, 4]");
  bm.indptr = f.I32({3, 1, 4}, std::vector<int32_t>(12, 0));
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr.shape", expected, "[3, 1, 4]");
  bm.indptr = f.I32({1, 4}, {0, 2, 3, 5});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr.shape", expected, "[1, 4]");
}

TEST(SparsePlanTest, WrongDtypeOrLength) {
  SparseFixture f;
  std::string floats(16, '\0');
  BlockMaskSpec bm = f.Mask();
  bm.indptr = TensorView{DType::kF32, {1, 1, 4}, floats};
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indptr.dtype", "I32", "F32");
  bm = f.Mask();
  bm.indices = TensorView{DType::kF16, {5}, std::string_view(floats.data(), 10)};
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indices.dtype", "I32", "F16");
  bm = f.Mask();
  bm.indices = TensorView{DType::kI32, {5}, std::string_view(floats.data(), 16)};
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.indices.data", "20 bytes ([5] x I32)", "16 bytes");
  KeySelectionSpec ks = f.Selection();
  ks.indices.dtype = DType::kF32;
  f.req.sparsity.block_mask.reset();
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices.dtype", "I32", "F32");
}

TEST(SparsePlanTest, FullBlocksOverlappingPartialOnes) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();  // row blocks list {0, 1}, {2}, {0, 3}
  bm.full_indptr = f.I32({1, 1, 4}, {0, 1, 2, 3});
  bm.full_indices = f.I32({3}, {2, 3, 1});  // row block 2 lists 1: fine; row block 1 lists 3
  f.req.sparsity.block_mask = bm;
  ASSERT_TRUE(PrepareAttention(f.req).ok());
  bm.full_indices = f.I32({3}, {2, 2, 1});  // row block 1 lists 2 in both
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.full_indices[1]",
                "a block not also in indices for row block 1 of slice [0, 0]", "2");
}

TEST(SparsePlanTest, FullIndptrWithoutFullIndices) {
  SparseFixture f;
  BlockMaskSpec bm = f.Mask();
  bm.full_indptr = f.I32({1, 1, 4}, {0, 0, 0, 0});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.full_indices",
                "set together with sparsity.block_mask.full_indptr", "unset");
  bm = f.Mask();
  bm.full_indices = f.I32({0}, {});
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.full_indptr",
                "set together with sparsity.block_mask.full_indices", "unset");
  bm.full_indptr = f.I32({4}, {0, 0, 0, 0});  // rank 1 against indptr's [1, 1, 4]
  f.req.sparsity.block_mask = bm;
  ExpectInvalid(f.req, "sparsity.block_mask.full_indptr.shape", "[1, 1, 4] (indptr's shape)",
                "[4]");
}

TEST(SparsePlanTest, ValidKeySelectionSortsEachRow) {
  SparseFixture f;
  KeySelectionSpec ks;
  ks.query_block = 3;  // ceil(10 / 3) = 4 index rows
  ks.key_block = 5;    // ceil(13 / 5) = 3 key blocks
  std::vector<int32_t> v;
  for (int n = 0; n < 2 * 2 * 4; ++n) v.insert(v.end(), {2, -1, 0});
  ks.indices = f.I32({2, 2, 4, 3}, v);  // Hkv heads
  f.req.sparsity.key_indices = ks;
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  const AttentionParams& p = (*job)->params;
  EXPECT_EQ(p.sparse.list_heads, 2);
  EXPECT_EQ(p.sparse.list_head_div, 2);
  const KeyList list = SparseKeyList(p, 1, 3, 9);
  EXPECT_EQ(std::vector<int32_t>(list.units, list.units + list.count), (std::vector<int32_t>{0, 2}));
  for (int64_t j = 0; j < SparseFixture::Lk; ++j) {
    EXPECT_EQ(KeyVisibleToHead(p, 1, 3, 9, j), j < 5 || j >= 10) << j;
  }
}

TEST(SparsePlanTest, KeyIndexOutOfRange) {
  SparseFixture f;
  KeySelectionSpec ks = f.Selection();
  std::vector<int32_t> v(2 * 4 * 10 * 3, -1);
  v[((1 * 4 + 2) * 10 + 5) * 3 + 1] = 13;
  ks.indices = f.I32({2, 4, 10, 3}, v);
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices[1, 2, 5, 1]", "-1 or a key in [0, 13)", "13");
  v[((1 * 4 + 2) * 10 + 5) * 3 + 1] = -2;
  ks.indices = f.I32({2, 4, 10, 3}, v);
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices[1, 2, 5, 1]", "-1 or a key in [0, 13)", "-2");
  ks.key_block = 4;  // ceil(13 / 4) = 4 blocks
  v[((1 * 4 + 2) * 10 + 5) * 3 + 1] = 4;
  ks.indices = f.I32({2, 4, 10, 3}, v);
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices[1, 2, 5, 1]",
                "-1 or a key block in [0, 4)", "4");
}

TEST(SparsePlanTest, DuplicateKeyInARowNamesTheSecondOccurrence) {
  SparseFixture f;
  KeySelectionSpec ks;
  std::vector<int32_t> v(1 * 1 * 10 * 4, -1);
  const int32_t row[] = {7, -1, 2, 7};
  std::copy(row, row + 4, v.begin() + 6 * 4);
  ks.indices = f.I32({1, 1, 10, 4}, v);
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices[0, 0, 6, 3]",
                "no duplicate within a row (7 is also at index 0)", "7");
}

TEST(SparsePlanTest, KeySelectionShape) {
  SparseFixture f;
  const std::string expected =
      "[B or 1, Hq or Hkv or 1, ceil(Lq / query_block), k] = [2 or 1, 4 or 2 or 1, 4, k >= 1] "
      "(Lq 10 in blocks of 3)";
  KeySelectionSpec ks;
  ks.query_block = 3;
  ks.indices = f.I32({2, 4, 3, 2}, std::vector<int32_t>(48, -1));  // floor, not ceil
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices.shape", expected, "[2, 4, 3, 2]");
  ks.indices = f.I32({2, 3, 4, 2}, std::vector<int32_t>(48, -1));  // 3 heads
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices.shape", expected, "[2, 3, 4, 2]");
  ks.indices = f.I32({2, 4, 4, 0}, {});  // k = 0
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices.shape", expected, "[2, 4, 4, 0]");
  ks.indices = f.I32({2, 4, 8}, std::vector<int32_t>(64, -1));  // rank 3
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.indices.shape", expected, "[2, 4, 8]");
}

TEST(SparsePlanTest, QueryOrKeyBlockZero) {
  SparseFixture f;
  KeySelectionSpec ks = f.Selection();
  ks.query_block = 0;
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.query_block", ">= 1 (0 on the wire means 1)", "0");
  ks = f.Selection();
  ks.key_block = 0;
  f.req.sparsity.key_indices = ks;
  ExpectInvalid(f.req, "sparsity.key_indices.key_block", ">= 1 (0 on the wire means 1)", "0");
}

TEST(SparsePlanTest, GlobalTokenOutOfRangeOrRepeated) {
  SparseFixture f;
  f.req.sparsity.global_tokens = {3, 13};
  ExpectInvalid(f.req, "sparsity.global_tokens[1]", "a key position in [0, 13)", "13");
  f.req.sparsity.global_tokens = {-1};
  ExpectInvalid(f.req, "sparsity.global_tokens[0]", "a key position in [0, 13)", "-1");
  f.req.sparsity.global_tokens = {5, 2, 9, 5};
  ExpectInvalid(f.req, "sparsity.global_tokens[3]", "distinct positions", "5 again");
  f.req.sparsity.global_tokens = {12, 0, 7};  // any order
  auto job = PrepareAttention(f.req);
  ASSERT_TRUE(job.ok()) << job.status();
  const SparseParams& s = (*job)->params.sparse;
  EXPECT_EQ(std::vector<int32_t>(s.global_tokens, s.global_tokens + s.num_global_tokens),
            (std::vector<int32_t>{0, 7, 12}));
}

TEST(SparsePlanTest, SinkLogitsOnePerQueryHeadAndFinite) {
  SparseFixture f;
  f.req.sparsity.sink_logits = {0.f, 1.f, 2.f};
  ExpectInvalid(f.req, "sparsity.sink_logits", "4 logits (one per query head) or none", "3");
  f.req.sparsity.sink_logits = {0.f, 1.f};  // one per KV head is not a form
  ExpectInvalid(f.req, "sparsity.sink_logits", "4 logits (one per query head) or none", "2");
  f.req.sparsity.sink_logits = {0.f, 1.f, std::numeric_limits<float>::quiet_NaN(), 3.f};
  ExpectInvalid(f.req, "sparsity.sink_logits[2]", "a finite logit", "nan");
  f.req.sparsity.sink_logits = {0.f, -std::numeric_limits<float>::infinity(), 2.f, 3.f};
  ExpectInvalid(f.req, "sparsity.sink_logits[1]", "a finite logit", "-inf");
}

TEST(SparsePlanTest, BlockMaskTogetherWithKeyIndices) {
  SparseFixture f;
  f.req.sparsity.block_mask = f.Mask();
  f.req.sparsity.key_indices = f.Selection();
  ExpectInvalid(f.req, "sparsity.key_indices",
                "unset with block_mask (one key pattern per request)", "both");
}

TEST(SparsePlanTest, NotWithLinearNorWithShardedKeys) {
  SparseFixture f;
  f.req.sparsity.global_tokens = {1};
  f.req.options.variant = Variant::kLinear;
  ExpectInvalid(f.req, "sparsity", "unset with variant LINEAR", "a sparse pattern");
  f.req.options.variant = Variant::kSoftmax;
  f.req.key_offset = 20;
  ExpectInvalid(f.req, "sparsity", "unset with key_offset or total_keys (sharded keys)",
                "a sparse pattern");
  f.req.key_offset = 0;
  f.req.total_keys = 40;
  ExpectInvalid(f.req, "sparsity", "unset with key_offset or total_keys (sharded keys)",
                "a sparse pattern");
}

TEST(SparsePlanTest, DescriptionOverTheLimitIsResourceExhausted) {
  SparseFixture f;
  f.req.sparsity.block_mask = f.Mask();  // 16 + 20 bytes
  f.req.sparsity.global_tokens = {1, 2};  // 16 bytes as int64
  f.req.sparsity.sink_logits = {0.f, 0.f, 0.f, 0.f};  // 16 bytes
  EXPECT_EQ(SparseDescriptionBytes(f.req.sparsity), 68);
  RequestLimits limits;
  limits.max_sparse_bytes = 68;
  EXPECT_TRUE(PlanAttention(f.req, limits).ok());
  limits.max_sparse_bytes = 67;
  for (bool plan_only : {true, false}) {
    auto job = plan_only ? PlanAttention(f.req, limits) : PrepareAttention(f.req, limits);
    ASSERT_FALSE(job.ok());
    EXPECT_EQ(job.status().code(), absl::StatusCode::kResourceExhausted) << job.status();
    EXPECT_THAT(std::string(job.status().message()),
                AllOf(HasSubstr("sparsity"), HasSubstr("68 bytes"), HasSubstr("67 bytes")));
  }
  // Key indices count the same way, and before their contents are checked.
  f.req.sparsity = SparsitySpec();
  f.req.sparsity.key_indices = f.Selection();  // 2 * 4 * 10 * 3 * 4 bytes
  limits.max_sparse_bytes = 959;
  auto job = PlanAttention(f.req, limits);
  EXPECT_EQ(job.status().code(), absl::StatusCode::kResourceExhausted) << job.status();
  limits.max_sparse_bytes = 960;
  EXPECT_TRUE(PlanAttention(f.req, limits).ok());
}

TEST(SparsePlanTest, ConvertedInputBytesCountTheLists) {
  SparseFixture f;
  auto dense = PlanAttention(f.req);
  ASSERT_TRUE(dense.ok());
  const int64_t base = (*dense)->converted_input_bytes();

  // A block mask without full blocks uses the request's own indices: only the
  // offsets (one per row block and one more) are the job's.
  f.req.sparsity.block_mask = f.Mask();
  auto mask = PlanAttention(f.req);
  ASSERT_TRUE(mask.ok()) << mask.status();
  EXPECT_EQ((*mask)->converted_input_bytes(), base + 4 * 4);

  // With full blocks the merged units are the job's too: 5 + 2.
  BlockMaskSpec bm = f.Mask();
  bm.full_indptr = f.I32({1, 1, 4}, {0, 1, 1, 2});
  bm.full_indices = f.I32({2}, {2, 1});
  f.req.sparsity.block_mask = bm;
  f.req.sparsity.global_tokens = {4, 1, 8};
  f.req.sparsity.sink_logits = {0.f, 1.f, 2.f, 3.f};
  auto full = PlanAttention(f.req);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ((*full)->converted_input_bytes(), base + 4 * 4 + 7 * 4 + 3 * 4 + 4 * 4);

  // Key selection: an offset per index row, and the listed keys (not the -1s).
  f.req.sparsity = SparsitySpec();
  f.req.sparsity.key_indices = f.Selection();  // 80 rows of two keys
  auto selection = PlanAttention(f.req);
  ASSERT_TRUE(selection.ok()) << selection.status();
  EXPECT_EQ((*selection)->converted_input_bytes(), base + 81 * 4 + 160 * 4);
}

// The visible pairs counted by brute force over KeyVisibleToHead.
double BruteForcePairs(const AttentionParams& p) {
  double n = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.num_heads_q; ++h)
      for (int64_t i = 0; i < p.seqlen_q; ++i)
        for (int64_t j = 0; j < p.seqlen_k; ++j) n += KeyVisibleToHead(p, b, h, i, j);
  return n;
}

// Random patterns of every form over random shapes and masks.
std::vector<RequestSpec> RandomSpecs(int count) {
  std::mt19937 rng(12345);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<RequestSpec> specs;
  for (int n = 0; n < count; ++n) {
    RequestSpec s;
    s.name = "random" + std::to_string(n);
    s.batch = pick(1, 2);
    s.seqlen_q = pick(1, 40);
    s.seqlen_k = pick(1, 60);
    s.heads_kv = pick(1, 2);
    s.heads_q = s.heads_kv * pick(1, 3);
    s.head_dim = 4;
    s.options.causal = pick(0, 2) == 0;
    s.options.causal_alignment = pick(0, 1) ? CausalAlignment::kTopLeft : CausalAlignment::kBottomRight;
    if (pick(0, 3) == 0) s.options.window_left = pick(0, 10);
    if (!s.options.causal && pick(0, 3) == 0) s.options.window_right = pick(0, 10);
    if (pick(0, 2) == 0) {
      for (int64_t b = 0; b < s.batch; ++b) s.key_lengths.push_back(pick(0, int(s.seqlen_k)));
    }
    SparsePattern& sp = s.sparse;
    switch (pick(0, 2)) {
      case 0:
        sp.block_rows = pick(1, 20);
        sp.block_cols = pick(1, 20);
        sp.per_batch = pick(0, 1);
        sp.per_head = pick(0, 1);
        sp.full_blocks = pick(0, 1);
        sp.density = pick(1, 9) / 10.0;
        break;
      case 1:
        sp.select_k = pick(1, 12);
        sp.query_block = pick(1, 6);
        sp.key_block = pick(1, 6);
        sp.select_heads = static_cast<SparsePattern::Heads>(pick(0, 2));
        sp.select_per_batch = pick(0, 1);
        break;
      default:
        break;
    }
    sp.global_tokens = pick(0, 4);
    sp.sinks = pick(0, 1);
    if (!sp.any()) sp.global_tokens = 1;
    specs.push_back(s);
  }
  return specs;
}

TEST(SparseCountTest, VisiblePairsMatchBruteForceAndBoundTheScores) {
  int with_lists = 0, with_globals = 0;
  for (const RequestSpec& spec : RandomSpecs(300)) {
    SCOPED_TRACE(spec.name);
    RandomRequest r(spec, DType::kF32, 7);
    auto job = PlanAttention(r.request());
    ASSERT_TRUE(job.ok()) << job.status();
    const AttentionParams& p = (*job)->params;
    with_lists += p.sparse.list_offsets != nullptr;
    with_globals += p.sparse.global_tokens != nullptr;
    const double visible = BruteForcePairs(p);
    EXPECT_EQ(CountVisiblePairs(p), visible);
    const double dense = double(p.batch) * p.num_heads_q * p.seqlen_q * p.seqlen_k;
    const double bound = SparseScoresBound(p, dense);
    EXPECT_GE(bound, visible);
    EXPECT_LE(bound, dense);
    // The plan stored the bound the cost model uses.
    EXPECT_GE(p.sparse.score_bound, 0);
    EXPECT_LE(AttentionScores(p), dense);
  }
  EXPECT_GT(with_lists, 150);
  EXPECT_GT(with_globals, 150);
}

TEST(SparseCountTest, DenseParamsCountTheRanges) {
  RequestSpec spec;
  spec.batch = 2;
  spec.seqlen_q = 9;
  spec.seqlen_k = 14;
  spec.heads_q = 2;
  spec.options.causal = true;
  spec.key_lengths = {14, 5};
  RandomRequest r(spec, DType::kF32, 1);
  auto job = PlanAttention(r.request());
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(CountVisiblePairs((*job)->params), BruteForcePairs((*job)->params));
  EXPECT_EQ(SparseScoresBound((*job)->params, 1234.0), 1234.0);
}

}  // namespace
}  // namespace attnserve
