#include "sparse_shapes.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "attention/reference.h"
#include "core/half.h"

namespace attnserve::bench {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Draws `count` distinct values of [0, n) into `out` (Floyd's algorithm:
// `count` draws, whatever n). `taken` has n entries, all false, and is left so.
void DrawDistinct(std::mt19937& rng, int64_t n, int64_t count, std::vector<uint8_t>& taken,
                  std::vector<int32_t>& out) {
  const size_t first = out.size();
  for (int64_t j = n - count; j < n; ++j) {
    const int64_t t = static_cast<int64_t>(rng() % static_cast<uint64_t>(j + 1));
    const int64_t pick = taken[t] ? j : t;
    taken[pick] = 1;
    out.push_back(static_cast<int32_t>(pick));
  }
  for (size_t n_out = first; n_out < out.size(); ++n_out) taken[out[n_out]] = 0;
}

Tensor I32Tensor(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  Tensor t = Tensor::Zeros(DType::kI32, std::move(shape));
  std::copy(values.begin(), values.end(), t.mutable_data<int32_t>());
  return t;
}

// Rows [row0, row0 + rows) of a request as a request of their own, writing
// its own output; with cut_keys (causal self-attention only) it keeps the
// keys up to its last row, so that the diagonal stays where it was.
struct RowSlice {
  AttentionParams params;
  std::vector<int32_t> list_offsets;
  std::vector<int32_t> list_units;
  std::string output;
};

void MakeSlice(const AttentionParams& p, int64_t row0, int64_t rows, bool cut_keys,
               RowSlice& slice) {
  AttentionParams& s = slice.params;
  s = p;
  const int64_t es = static_cast<int64_t>(DTypeSize(p.dtype));
  s.q = static_cast<const char*>(p.q) + row0 * p.q_row_stride * es;
  s.seqlen_q = static_cast<int32_t>(rows);
  if (cut_keys) s.seqlen_k = static_cast<int32_t>(row0 + rows);
  slice.output.assign(static_cast<size_t>(p.batch * rows * p.num_heads_q * p.value_dim * es), '\0');
  s.o = slice.output.data();
  s.o_head_stride = p.value_dim;
  s.o_row_stride = int64_t{p.num_heads_q} * p.value_dim;
  s.o_batch_stride = rows * s.o_row_stride;
  s.lse = s.entropy = s.weights = s.top_k_weights = nullptr;
  s.top_k_indices = nullptr;
  s.top_k = 0;
  s.cancel = nullptr;
  const SparseParams& sp = p.sparse;
  if (sp.list_offsets == nullptr) return;
  // The lists of the slice's rows, in the same order (batch, head, row).
  const int64_t r0 = row0 / sp.list_row_queries;
  const int64_t r1 = CeilDiv(row0 + rows, sp.list_row_queries);
  for (int64_t lb = 0; lb < sp.list_batches; ++lb) {
    for (int64_t lh = 0; lh < sp.list_heads; ++lh) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = (lb * sp.list_heads + lh) * sp.list_rows + r;
        slice.list_offsets.push_back(static_cast<int32_t>(slice.list_units.size()));
        slice.list_units.insert(slice.list_units.end(), sp.list_units + sp.list_offsets[n],
                                sp.list_units + sp.list_offsets[n + 1]);
      }
    }
  }
  slice.list_offsets.push_back(static_cast<int32_t>(slice.list_units.size()));
  s.sparse.list_offsets = slice.list_offsets.data();
  s.sparse.list_units = slice.list_units.data();
  s.sparse.list_rows = static_cast<int32_t>(r1 - r0);
}

}  // namespace

SparsitySpec SparsePattern::spec() const {
  SparsitySpec spec;
  if (block_rows > 0) {
    BlockMaskSpec bm;
    bm.block_rows = block_rows;
    bm.block_cols = block_cols;
    bm.indptr = indptr.view();
    bm.indices = indices.view();
    spec.block_mask = std::move(bm);
  } else {
    spec.key_indices = KeySelectionSpec{indices.view(), query_block, key_block};
  }
  return spec;
}

SparsePattern BigBirdBlockMask(int64_t heads, int64_t seqlen, const BigBirdOptions& o,
                               uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t rows = CeilDiv(seqlen, o.block);
  std::vector<int32_t> indptr, indices, row;
  std::vector<uint8_t> listed(rows, 0);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      indptr.push_back(static_cast<int32_t>(indices.size()));
      row.clear();
      for (int64_t c = std::max<int64_t>(0, r - o.window_blocks + 1); c <= r; ++c) row.push_back(c);
      for (int64_t c = 0; c < std::min<int64_t>(o.global_blocks, r + 1); ++c) {
        if (std::find(row.begin(), row.end(), c) == row.end()) row.push_back(c);
      }
      for (int32_t c : row) listed[c] = 1;
      // Blocks below the diagonal not listed yet: r of them minus those listed.
      const int64_t below = r - static_cast<int64_t>(std::count_if(
                                    row.begin(), row.end(), [&](int32_t c) { return c < r; }));
      for (int64_t drawn = 0; drawn < std::min<int64_t>(o.random_blocks, below); ++drawn) {
        int64_t c;
        do {
          c = static_cast<int64_t>(rng() % static_cast<uint64_t>(r));
        } while (listed[c]);
        listed[c] = 1;
        row.push_back(static_cast<int32_t>(c));
      }
      for (int32_t c : row) listed[c] = 0;
      std::sort(row.begin(), row.end());
      indices.insert(indices.end(), row.begin(), row.end());
    }
    indptr.push_back(static_cast<int32_t>(indices.size()));  // each slice ends where the next starts
  }
  SparsePattern pattern;
  pattern.description = absl::StrFormat(
      "BigBird-like block mask, blocks of %d: window %d, global %d, random %d per row block, %s",
      o.block, o.window_blocks, o.global_blocks, o.random_blocks,
      heads == 1 ? "shared by all heads" : "one per head");
  pattern.block_rows = o.block;
  pattern.block_cols = o.block;
  const int64_t nnz = static_cast<int64_t>(indices.size());
  pattern.indptr = I32Tensor({1, heads, rows + 1}, indptr);
  pattern.indices = I32Tensor({nnz}, indices);
  return pattern;
}

SparsePattern RecentPlusRandomKeys(int64_t seqlen, int32_t keys, int32_t recent, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> values;
  values.reserve(static_cast<size_t>(seqlen * keys));
  std::vector<uint8_t> taken(seqlen, 0);
  for (int64_t i = 0; i < seqlen; ++i) {
    const size_t first = values.size();
    if (i + 1 <= keys) {
      for (int64_t j = 0; j <= i; ++j) values.push_back(static_cast<int32_t>(j));
    } else {
      for (int64_t j = i - recent + 1; j <= i; ++j) values.push_back(static_cast<int32_t>(j));
      DrawDistinct(rng, i + 1 - recent, keys - recent, taken, values);
    }
    values.resize(first + keys, -1);
  }
  SparsePattern pattern;
  pattern.description =
      absl::StrFormat("DSA-style key selection, %d keys per query: the %d most recent and %d "
                      "drawn from the older ones, shared by all heads",
                      keys, recent, keys - recent);
  pattern.indices = I32Tensor({1, 1, seqlen, keys}, values);
  return pattern;
}

SparsePattern DecodeKeyBlocks(int64_t kv_heads, int64_t context, int32_t key_block, int32_t blocks,
                              uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t units = CeilDiv(context, key_block);
  std::vector<int32_t> values;
  std::vector<uint8_t> taken(units, 0);
  for (int64_t g = 0; g < kv_heads; ++g) {
    const size_t first = values.size();
    values.push_back(static_cast<int32_t>(units - 1));
    DrawDistinct(rng, units - 1, std::min<int64_t>(blocks - 1, units - 1), taken, values);
    values.resize(first + blocks, -1);
  }
  SparsePattern pattern;
  pattern.description = absl::StrFormat(
      "top-k key blocks, %d blocks of %d keys per KV head: the last and %d drawn from the others",
      blocks, key_block, blocks - 1);
  pattern.key_block = key_block;
  pattern.indices = I32Tensor({1, kv_heads, 1, blocks}, values);
  return pattern;
}

std::optional<SparsePattern> MakeSparsePattern(const std::string& id, const SparseShapeDims& dims,
                                               uint32_t seed, bool per_head) {
  if (id == "SP1") return BigBirdBlockMask(per_head ? dims.hq : 1, dims.lq, BigBirdOptions{}, seed);
  if (id == "SP2") return RecentPlusRandomKeys(dims.lq, 2048, 512, seed);
  if (id == "SP3") return DecodeKeyBlocks(dims.hkv, dims.lk, 64, 32, seed);
  return std::nullopt;
}

int64_t ListedKvBytes(const AttentionParams& p) {
  const int64_t row_bytes =
      (int64_t{p.head_dim} + p.value_dim) * static_cast<int64_t>(DTypeSize(p.dtype));
  const SparseParams& s = p.sparse;
  int64_t keys = 0;
  if (s.list_offsets == nullptr) {
    for (int64_t b = 0; b < p.batch; ++b) keys += int64_t{KeyLength(p, b)} * p.num_heads_kv;
    return keys * row_bytes;
  }
  const int64_t units = CeilDiv(p.seqlen_k, s.unit_keys);
  std::vector<uint8_t> seen(units);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = KeyLength(p, b);
    const int64_t lb = s.list_batches == 1 ? 0 : b;
    for (int64_t g = 0; g < p.num_heads_kv; ++g) {
      std::fill(seen.begin(), seen.end(), 0);
      // The list heads of g's query heads, each once.
      const int64_t lh0 = g * p.group_size / s.list_head_div;
      const int64_t lh1 = ((g + 1) * p.group_size - 1) / s.list_head_div;
      for (int64_t lh = lh0; lh <= lh1; ++lh) {
        for (int64_t r = 0; r < s.list_rows; ++r) {
          const int64_t n = (lb * s.list_heads + lh) * s.list_rows + r;
          for (int32_t c = s.list_offsets[n]; c < s.list_offsets[n + 1]; ++c) {
            seen[s.list_units[c]] = 1;
          }
        }
      }
      for (int64_t u = 0; u < units; ++u) {
        if (seen[u]) keys += std::max<int64_t>(0, std::min((u + 1) * s.unit_keys, len) - u * s.unit_keys);
      }
    }
  }
  return keys * row_bytes;
}

absl::StatusOr<double> CheckAgainstReference(const AttentionParams& ran, int64_t slice_rows) {
  const bool cut = ran.causal && ran.bottom_right && ran.seqlen_q == ran.seqlen_k &&
                   ran.key_lengths == nullptr && ran.total_keys == 0;
  std::vector<std::pair<int64_t, int64_t>> slices;  // (first row, rows)
  if (cut) {
    // A slice starts on a list row's first query, so that its lists are
    // whole lists of `ran`.
    const int64_t unit = ran.sparse.list_offsets != nullptr ? ran.sparse.list_row_queries : 1;
    const int64_t rows = std::min<int64_t>(ran.seqlen_q, slice_rows);
    const int64_t last = (ran.seqlen_q - rows) / unit * unit;
    for (int64_t row0 : {int64_t{0}, last / 2 / unit * unit, last}) {
      if (slices.empty() || row0 != slices.back().first) {
        slices.emplace_back(row0, std::min(rows, ran.seqlen_q - row0));
      }
    }
  } else {
    slices.emplace_back(0, ran.seqlen_q);
  }
  const int64_t es = static_cast<int64_t>(DTypeSize(ran.dtype));
  const double atol = ran.dtype == DType::kF32 ? 1e-3 : 2e-2;
  const double rtol = ran.dtype == DType::kF32 ? 1e-4 : 1e-2;
  // Reference outputs first, for the rms the tolerance scales with.
  std::vector<RowSlice> refs(slices.size());
  double sum_sq = 0;
  int64_t count = 0;
  for (size_t n = 0; n < slices.size(); ++n) {
    MakeSlice(ran, slices[n].first, slices[n].second, cut, refs[n]);
    RunReferenceAttention(refs[n].params);
    const int64_t elements = static_cast<int64_t>(refs[n].output.size()) / es;
    for (int64_t e = 0; e < elements; ++e) {
      const double w = LoadFloat(refs[n].output.data(), ran.dtype, e);
      sum_sq += w * w;
    }
    count += elements;
  }
  const double rms = std::sqrt(sum_sq / std::max<int64_t>(count, 1));
  double worst = 0;
  for (size_t n = 0; n < slices.size(); ++n) {
    const AttentionParams& s = refs[n].params;
    for (int64_t b = 0; b < ran.batch; ++b) {
      for (int64_t i = 0; i < s.seqlen_q; ++i) {
        for (int64_t h = 0; h < ran.num_heads_q; ++h) {
          for (int64_t d = 0; d < ran.value_dim; ++d) {
            const double want = LoadFloat(
                s.o, ran.dtype, b * s.o_batch_stride + i * s.o_row_stride + h * s.o_head_stride + d);
            const int64_t row = slices[n].first + i;
            const double got = LoadFloat(ran.o, ran.dtype,
                                         b * ran.o_batch_stride + row * ran.o_row_stride +
                                             h * ran.o_head_stride + d);
            const double err = std::fabs(got - want);
            worst = std::max(worst, rms > 0 ? err / rms : err);
            if (!(err <= atol * rms + rtol * std::fabs(want))) {  // NaN fails too
              return absl::InternalError(absl::StrFormat(
                  "sparse output differs from the reference kernel at [b %d, row %d, head %d, "
                  "d %d]: got %.6g, want %.6g (rms of the checked outputs %.3g, atol %.0e x rms, "
                  "rtol %.0e)",
                  b, row, h, d, got, want, rms, atol, rtol));
            }
          }
        }
      }
    }
  }
  return worst;
}

}  // namespace attnserve::bench
