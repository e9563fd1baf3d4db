#include "attention/sparse.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "attention/params.h"
#include "core/errors.h"
#include "core/tensor.h"

namespace attnserve {
namespace {

constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

// Where empty lists point (SparseParams::list_units is never null when
// list_offsets is set).
constexpr int32_t kNoUnits[1] = {0};

const int32_t* UnitsOrEmpty(const std::vector<int32_t>& units) {
  return units.empty() ? kNoUnits : units.data();
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most keys one list of `s` covers.
int64_t MaxListKeys(const SparseParams& s, int64_t lists) {
  int64_t units = 0;
  for (int64_t n = 0; n < lists; ++n) {
    units = std::max<int64_t>(units, s.list_offsets[n + 1] - s.list_offsets[n]);
  }
  return units * s.unit_keys;
}


// "name[i, j, k]"
std::string Indexed(absl::string_view name, std::initializer_list<int64_t> index) {
  return absl::StrCat(name, "[", absl::StrJoin(index, ", "), "]");
}

// An I32 tensor's elements: checks dtype and byte length; copies the rare
// buffer whose address is not 4-byte aligned into `copy`, and any buffer
// with `always_copy` (bytes that may change under the call).
absl::StatusOr<const int32_t*> I32Elements(const TensorView& t, absl::string_view field,
                                           std::vector<int32_t>& copy, bool always_copy = false) {
  if (t.dtype != DType::kI32) {
    return InvalidField(absl::StrCat(field, ".dtype"), "I32", DTypeName(t.dtype));
  }
  const int64_t n = CheckedElementCount(t.shape, int64_t{1} << 40);
  if (n < 0) return InvalidField(absl::StrCat(field, ".shape"), "dims >= 0", ShapeString(t.shape));
  if (static_cast<int64_t>(t.data.size()) != n * 4) {
    return InvalidField(absl::StrCat(field, ".data"),
                        absl::StrCat(n * 4, " bytes (", ShapeString(t.shape), " x I32)"),
                        absl::StrCat(t.data.size(), " bytes"));
  }
  if (n == 0) return kNoUnits;
  if (!always_copy && reinterpret_cast<uintptr_t>(t.data.data()) % alignof(int32_t) == 0) {
    return reinterpret_cast<const int32_t*>(t.data.data());
  }
  copy.resize(n);
  std::memcpy(copy.data(), t.data.data(), n * 4);
  return copy.data();
}

// One BSR (indptr + indices) checked against the grid; `prefix` is
// "sparsity.block_mask." or the same with "full_".
struct Bsr {
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  int64_t nnz = 0;
};

absl::StatusOr<Bsr> CheckBsr(const TensorView& indptr_t, const TensorView& indices_t,
                             absl::string_view indptr_name, absl::string_view indices_name,
                             int64_t Bm, int64_t Hm, int64_t rows, int64_t cols,
                             std::vector<int32_t>& indptr_copy, std::vector<int32_t>& indices_copy,
                             bool always_copy) {
  auto ip = I32Elements(indptr_t, indptr_name, indptr_copy, always_copy);
  if (!ip.ok()) return ip.status();
  if (indices_t.rank() != 1) {
    return InvalidField(absl::StrCat(indices_name, ".shape"), "rank 1 [nnz]",
                        ShapeString(indices_t.shape));
  }
  auto ix = I32Elements(indices_t, indices_name, indices_copy, always_copy);
  if (!ix.ok()) return ix.status();
  Bsr bsr{*ip, *ix, indices_t.shape[0]};
  int64_t prev_end = 0;
  for (int64_t b = 0; b < Bm; ++b) {
    for (int64_t h = 0; h < Hm; ++h) {
      const int32_t* row = bsr.indptr + (b * Hm + h) * (rows + 1);
      if (row[0] != prev_end) {
        return InvalidField(Indexed(indptr_name, {b, h, 0}),
                            b == 0 && h == 0
                                ? std::string("0 (the first slice starts at 0)")
                                : absl::StrCat(prev_end, " (where the previous slice ended)"),
                            absl::StrCat(row[0]));
      }
      for (int64_t r = 1; r <= rows; ++r) {
        if (row[r] < row[r - 1]) {
          return InvalidField(Indexed(indptr_name, {b, h, r}),
                              absl::StrCat(">= ", row[r - 1], " (indptr is monotone)"),
                              absl::StrCat(row[r]));
        }
        if (row[r] > bsr.nnz) {
          return InvalidField(Indexed(indptr_name, {b, h, r}),
                              absl::StrCat("<= ", bsr.nnz, " (the length of ", indices_name, ")"),
                              absl::StrCat(row[r]));
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = row[r]; k < row[r + 1]; ++k) {
          const int32_t c = bsr.indices[k];
          if (c < 0 || c >= cols) {
            return InvalidField(Indexed(indices_name, {k}),
                                absl::StrCat("a key block in [0, ", cols, ")"), absl::StrCat(c));
          }
          if (k > row[r] && c <= bsr.indices[k - 1]) {
            return InvalidField(
                Indexed(indices_name, {k}),
                absl::StrCat("> ", bsr.indices[k - 1], " (key blocks increase within row block ", r,
                             " of slice [", b, ", ", h, "])"),
                absl::StrCat(c));
          }
        }
      }
      prev_end = row[rows];
    }
  }
  if (prev_end != bsr.nnz) {
    return InvalidField(Indexed(indptr_name, {Bm - 1, Hm - 1, rows}),
                        absl::StrCat(bsr.nnz, " (the length of ", indices_name, ")"),
                        absl::StrCat(prev_end));
  }
  return bsr;
}

absl::Status PlanBlockMask(const BlockMaskSpec& bm, const SparseDims& d, AttentionJob& job) {
  const std::string pre = "sparsity.block_mask.";
  if (bm.block_rows < 1) {
    return InvalidField(pre + "block_rows", ">= 1", absl::StrCat(bm.block_rows));
  }
  if (bm.block_cols < 1) {
    return InvalidField(pre + "block_cols", ">= 1", absl::StrCat(bm.block_cols));
  }
  const int64_t rows = CeilDiv(d.Lq, bm.block_rows);
  const int64_t cols = CeilDiv(d.Lk, bm.block_cols);
  const TensorView& ip = bm.indptr;
  int64_t Bm = 1, Hm = 1;
  const std::string expected_shape = absl::StrCat(
      "[B or 1, Hq or 1, ceil(Lq / block_rows) + 1] = [", d.B, " or 1, ", d.Hq, " or 1, ",
      rows + 1, "] (Lq ", d.Lq, " padded to blocks of ", bm.block_rows,
      "), or rank 1 [", rows + 1, "]");
  if (ip.rank() == 1 && ip.shape[0] == rows + 1) {
  } else if (ip.rank() == 3 && (ip.shape[0] == 1 || ip.shape[0] == d.B) &&
             (ip.shape[1] == 1 || ip.shape[1] == d.Hq) && ip.shape[2] == rows + 1) {
    Bm = ip.shape[0];
    Hm = ip.shape[1];
  } else {
    return InvalidField(pre + "indptr.shape", expected_shape, ShapeString(ip.shape));
  }
  std::vector<int32_t> ip_copy, ix_copy, fip_copy, fix_copy;
  auto bsr = CheckBsr(ip, bm.indices, pre + "indptr", pre + "indices", Bm, Hm, rows, cols, ip_copy,
                      ix_copy, bm.copy_indices);
  if (!bsr.ok()) return bsr.status();
  if (bm.full_indptr.has_value() != bm.full_indices.has_value()) {
    return InvalidField(
        pre + (bm.full_indptr.has_value() ? "full_indices" : "full_indptr"),
        "set together with " + pre + (bm.full_indptr.has_value() ? "full_indptr" : "full_indices"),
        "unset");
  }
  Bsr full;
  if (bm.full_indptr.has_value()) {
    if (bm.full_indptr->shape != ip.shape) {
      return InvalidField(pre + "full_indptr.shape", ShapeString(ip.shape) + " (indptr's shape)",
                          ShapeString(bm.full_indptr->shape));
    }
    auto f = CheckBsr(*bm.full_indptr, *bm.full_indices, pre + "full_indptr", pre + "full_indices",
                      Bm, Hm, rows, cols, fip_copy, fix_copy, bm.copy_indices);
    if (!f.ok()) return f.status();
    full = *f;
  }

  SparseParams& s = job.params.sparse;
  const int64_t lists = Bm * Hm * rows;
  job.sparse_offsets.assign(lists + 1, 0);
  if (full.indptr == nullptr && ix_copy.empty()) {
    // The request's own indices serve as the units.
    for (int64_t slice = 0; slice < Bm * Hm; ++slice) {
      for (int64_t r = 0; r < rows; ++r) {
        job.sparse_offsets[slice * rows + r] = bsr->indptr[slice * (rows + 1) + r];
      }
    }
    job.sparse_offsets[lists] = static_cast<int32_t>(bsr->nnz);
    s.list_units = bsr->indices;
  } else {
    job.sparse_units.reserve(bsr->nnz + full.nnz);
    for (int64_t slice = 0; slice < Bm * Hm; ++slice) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = slice * (rows + 1) + r;
        job.sparse_offsets[slice * rows + r] = static_cast<int32_t>(job.sparse_units.size());
        const int32_t* a = bsr->indices + bsr->indptr[at];
        const int32_t* a_end = bsr->indices + bsr->indptr[at + 1];
        const int32_t* f = full.indptr != nullptr ? full.indices + full.indptr[at] : nullptr;
        const int32_t* f_end = full.indptr != nullptr ? full.indices + full.indptr[at + 1] : nullptr;
        while (a != a_end || f != f_end) {
          if (f == f_end || (a != a_end && *a < *f)) {
            job.sparse_units.push_back(*a++);
          } else if (a == a_end || *f < *a) {
            job.sparse_units.push_back(*f++);
          } else {
            return InvalidField(Indexed(pre + "full_indices", {f - full.indices}),
                                absl::StrCat("a block not also in indices for row block ", r,
                                             " of slice [", slice / Hm, ", ", slice % Hm, "]"),
                                absl::StrCat(*f));
          }
        }
      }
    }
    job.sparse_offsets[lists] = static_cast<int32_t>(job.sparse_units.size());
    s.list_units = UnitsOrEmpty(job.sparse_units);
  }
  s.list_offsets = job.sparse_offsets.data();
  s.list_batches = static_cast<int32_t>(Bm);
  s.list_heads = static_cast<int32_t>(Hm);
  s.list_head_div = static_cast<int32_t>(d.Hq / Hm);
  s.list_rows = static_cast<int32_t>(rows);
  s.list_row_queries = bm.block_rows;
  s.unit_keys = bm.block_cols;
  s.max_list_keys = MaxListKeys(s, lists);
  return absl::OkStatus();
}

absl::Status PlanKeySelection(const KeySelectionSpec& ks, const SparseDims& d, AttentionJob& job) {
  const std::string pre = "sparsity.key_indices.";
  if (ks.query_block < 1) {
    return InvalidField(pre + "query_block", ">= 1 (0 on the wire means 1)",
                        absl::StrCat(ks.query_block));
  }
  if (ks.key_block < 1) {
    return InvalidField(pre + "key_block", ">= 1 (0 on the wire means 1)",
                        absl::StrCat(ks.key_block));
  }
  const int64_t rows = CeilDiv(d.Lq, ks.query_block);
  const int64_t units = CeilDiv(d.Lk, ks.key_block);
  const TensorView& t = ks.indices;
  if (t.rank() != 4 || (t.shape[0] != d.B && t.shape[0] != 1) ||
      (t.shape[1] != d.Hq && t.shape[1] != d.Hkv && t.shape[1] != 1) || t.shape[2] != rows ||
      t.shape[3] < 1 || t.shape[3] > kMaxDim) {
    return InvalidField(pre + "indices.shape",
                        absl::StrCat("[B or 1, Hq or Hkv or 1, ceil(Lq / query_block), k] = [", d.B,
                                     " or 1, ", d.Hq, " or ", d.Hkv, " or 1, ", rows,
                                     ", k >= 1] (Lq ", d.Lq, " in blocks of ", ks.query_block, ")"),
                        ShapeString(t.shape));
  }
  std::vector<int32_t> copy;
  auto data = I32Elements(t, pre + "indices", copy);
  if (!data.ok()) return data.status();
  const int64_t Bi = t.shape[0], Hi = t.shape[1], k = t.shape[3];
  const int64_t lists = Bi * Hi * rows;
  job.sparse_offsets.assign(lists + 1, 0);
  job.sparse_units.clear();
  // Exactly the entries kept (selections are often mostly -1 padding): the
  // memory budget counts the lists' size.
  job.sparse_units.reserve(lists * k - std::count(*data, *data + lists * k, -1));
  for (int64_t n = 0; n < lists; ++n) {
    job.sparse_offsets[n] = static_cast<int32_t>(job.sparse_units.size());
    const int32_t* row = *data + n * k;
    const size_t first = job.sparse_units.size();
    for (int64_t c = 0; c < k; ++c) {
      const int32_t u = row[c];
      if (u == -1) continue;
      if (u < 0 || u >= units) {
        return InvalidField(Indexed(pre + "indices", {n / (Hi * rows), n / rows % Hi, n % rows, c}),
                            absl::StrCat("-1 or a ", ks.key_block == 1 ? "key" : "key block",
                                         " in [0, ", units, ")"),
                            absl::StrCat(u));
      }
      job.sparse_units.push_back(u);
    }
    std::sort(job.sparse_units.begin() + first, job.sparse_units.end());
    auto dup = std::adjacent_find(job.sparse_units.begin() + first, job.sparse_units.end());
    if (dup != job.sparse_units.end()) {
      const int32_t value = *dup;
      int64_t at = -1, again = -1;
      for (int64_t c = 0; c < k && again < 0; ++c) {
        if (row[c] != value) continue;
        (at < 0 ? at : again) = c;
      }
      return InvalidField(
          Indexed(pre + "indices", {n / (Hi * rows), n / rows % Hi, n % rows, again}),
          absl::StrCat("no duplicate within a row (", value, " is also at index ", at, ")"),
          absl::StrCat(value));
    }
  }
  job.sparse_offsets[lists] = static_cast<int32_t>(job.sparse_units.size());
  SparseParams& s = job.params.sparse;
  s.list_offsets = job.sparse_offsets.data();
  s.list_units = UnitsOrEmpty(job.sparse_units);
  s.list_batches = static_cast<int32_t>(Bi);
  s.list_heads = static_cast<int32_t>(Hi);
  s.list_head_div = static_cast<int32_t>(d.Hq / Hi);
  s.list_rows = static_cast<int32_t>(rows);
  s.list_row_queries = ks.query_block;
  s.unit_keys = ks.key_block;
  s.max_list_keys = MaxListKeys(s, lists);
  return absl::OkStatus();
}

}  // namespace

int64_t SparseDescriptionBytes(const SparsitySpec& spec) {
  int64_t bytes = static_cast<int64_t>(spec.global_tokens.size() * 8 + spec.sink_logits.size() * 4);
  if (spec.block_mask.has_value()) {
    const BlockMaskSpec& bm = *spec.block_mask;
    bytes += static_cast<int64_t>(bm.indptr.data.size() + bm.indices.data.size());
    if (bm.full_indptr.has_value()) bytes += static_cast<int64_t>(bm.full_indptr->data.size());
    if (bm.full_indices.has_value()) bytes += static_cast<int64_t>(bm.full_indices->data.size());
  }
  if (spec.key_indices.has_value()) bytes += static_cast<int64_t>(spec.key_indices->indices.data.size());
  return bytes;
}

absl::Status PlanSparsity(const SparsitySpec& spec, const SparseDims& d,
                          const RequestLimits& limits, AttentionJob& job) {
  if (spec.empty()) return absl::OkStatus();
  const AttentionParams& p = job.params;
  if (p.variant == Variant::kLinear) {
    return InvalidField("sparsity", "unset with variant LINEAR", "a sparse pattern");
  }
  if (p.total_keys != 0) {
    return InvalidField("sparsity", "unset with key_offset or total_keys (sharded keys)",
                        "a sparse pattern");
  }
  if (spec.block_mask.has_value() && spec.key_indices.has_value()) {
    return InvalidField("sparsity.key_indices",
                        "unset with block_mask (one key pattern per request)", "both");
  }
  // The lists built below are at most the description's size (plus one
  // offset per list), so this bounds both.
  // The lists' offsets are int32: whatever the configured limit, a pattern
  // stays under 2^31 bytes (2^29 units).
  const int64_t limit = std::min<int64_t>(limits.max_sparse_bytes, int64_t{1} << 31);
  const int64_t bytes = SparseDescriptionBytes(spec);
  if (bytes > limit) {
    return absl::ResourceExhaustedError(absl::StrCat("sparsity: the pattern's description is ",
                                                     bytes, " bytes, over the server's limit of ",
                                                     limit, " bytes"));
  }
  if (spec.block_mask.has_value()) {
    if (absl::Status s = PlanBlockMask(*spec.block_mask, d, job); !s.ok()) return s;
  }
  if (spec.key_indices.has_value()) {
    if (absl::Status s = PlanKeySelection(*spec.key_indices, d, job); !s.ok()) return s;
  }
  if (!spec.global_tokens.empty()) {
    std::vector<int32_t>& g = job.global_tokens;
    g.clear();
    for (size_t n = 0; n < spec.global_tokens.size(); ++n) {
      const int64_t x = spec.global_tokens[n];
      if (x < 0 || x >= d.Lk) {
        return InvalidField(Indexed("sparsity.global_tokens", {static_cast<int64_t>(n)}),
                            absl::StrCat("a key position in [0, ", d.Lk, ")"), absl::StrCat(x));
      }
      g.push_back(static_cast<int32_t>(x));
    }
    std::sort(g.begin(), g.end());
    auto dup = std::adjacent_find(g.begin(), g.end());
    if (dup != g.end()) {
      const int64_t value = *dup;
      int64_t again = -1;
      for (size_t n = 0, seen = 0; n < spec.global_tokens.size(); ++n) {
        if (spec.global_tokens[n] == value && seen++ == 1) again = static_cast<int64_t>(n);
      }
      return InvalidField(Indexed("sparsity.global_tokens", {again}), "distinct positions",
                          absl::StrCat(value, " again"));
    }
    job.params.sparse.global_tokens = g.data();
    job.params.sparse.num_global_tokens = static_cast<int32_t>(g.size());
  }
  if (!spec.sink_logits.empty()) {
    if (static_cast<int64_t>(spec.sink_logits.size()) != d.Hq) {
      return InvalidField("sparsity.sink_logits",
                          absl::StrCat(d.Hq, " logits (one per query head) or none"),
                          absl::StrCat(spec.sink_logits.size()));
    }
    for (size_t h = 0; h < spec.sink_logits.size(); ++h) {
      if (!std::isfinite(spec.sink_logits[h])) {
        return InvalidField(Indexed("sparsity.sink_logits", {static_cast<int64_t>(h)}),
                            "a finite logit", absl::StrCat(spec.sink_logits[h]));
      }
    }
    job.sink_logits = spec.sink_logits;
    job.params.sparse.sink_logits = job.sink_logits.data();
  }
  return absl::OkStatus();
}

double CountVisiblePairs(const AttentionParams& p) {
  const SparseParams& s = p.sparse;
  double total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = KeyLength(p, b);
    for (int64_t h = 0; h < p.num_heads_q; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        const KeyRange r = VisibleKeyRange(p, b, i);
        const int64_t diag = i + DiagonalOffset(p, b);
        if (GlobalToken(p, diag)) {
          total += p.causal ? std::clamp<int64_t>(diag + 1, 0, len) : len;
          continue;
        }
        int64_t n = 0;
        KeyList list;
        if (s.list_offsets != nullptr) {
          list = SparseKeyList(p, b, h, i);
          for (int32_t c = 0; c < list.count; ++c) {
            const int64_t k0 = int64_t{list.units[c]} * s.unit_keys;
            n += std::max<int64_t>(0, std::min(k0 + s.unit_keys, r.end) - std::max(k0, r.begin));
          }
        } else {
          n = r.empty() ? 0 : r.end - r.begin;
        }
        for (int32_t g = 0; g < s.num_global_tokens; ++g) {
          const int64_t j = s.global_tokens[g];
          if (j >= len || (p.causal && j > diag)) continue;
          const bool counted = j >= r.begin && j < r.end &&
                               (s.list_offsets == nullptr ||
                                SortedContains(list.units, list.count, j / s.unit_keys));
          if (!counted) ++n;
        }
        total += n;
      }
    }
  }
  return total;
}

int32_t SparseTileListFactor(const AttentionParams& p) {
  const SparseParams& s = p.sparse;
  if (s.list_offsets == nullptr) return 1;
  // 64 rows starting anywhere in a list row span at most this many list rows.
  return std::min<int32_t>((63 + s.list_row_queries - 1) / s.list_row_queries + 1, s.list_rows);
}

double SparseScoresBound(const AttentionParams& p, double dense_scores) {
  const SparseParams& s = p.sparse;
  if (!s.masks()) return dense_scores;
  if (s.list_offsets == nullptr) return dense_scores;  // global tokens only: ranges still walked
  const int64_t lists = int64_t{s.list_batches} * s.list_heads * s.list_rows;
  const double listed_units = s.list_offsets[lists];
  // Tiles of up to 64 query rows walk the union of their rows' lists.
  double bound = listed_units * s.unit_keys * s.list_row_queries * s.list_head_div *
                 (s.list_batches == 1 ? p.batch : 1) * SparseTileListFactor(p);
  // A global key is one more score per query; a global query row makes its
  // whole tile (up to 64 rows) walk every key.
  bound += double(s.num_global_tokens) * p.batch * p.num_heads_q *
           (double(p.seqlen_q) + std::min(64.0, double(p.seqlen_q)) * p.seqlen_k);
  return std::min(bound, dense_scores);
}

}  // namespace attnserve
