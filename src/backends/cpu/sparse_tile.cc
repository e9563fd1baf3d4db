#include "backends/cpu/sparse_tile.h"

#include <algorithm>
#include <limits>

namespace attnserve::cpu {

int64_t SparseBitmapWords(const AttentionParams& p) {
  if (!p.sparse.masks()) return 0;
  return (int64_t{p.seqlen_k} + 63) / 64 + 1;
}

SparseTileKeys::SparseTileKeys(const AttentionParams& p, const FlashTile& t, const int32_t* begin,
                               const int32_t* end, uint64_t* words)
    : p_(p), words_(words) {
  const SparseParams& s = p.sparse;
  lanes_ = t.num_heads * t.num_rows;
  base_ = t.key_begin;
  limit_ = std::max(base_, std::min<int64_t>(t.key_end, KeyLength(p, t.batch)));
  std::fill(words_, words_ + (limit_ - base_ + 63) / 64, uint64_t{0});
  next_ = base_;

  // Lanes sharing a list set its units once, over the union of their ranges.
  struct Group {
    bool has_list;
    const int32_t* units;
    int32_t count;
    int64_t begin, end;
  };
  Group groups[kMaxTileLanes];
  int num_groups = 0;
  int64_t max_diag = std::numeric_limits<int64_t>::min();
  int64_t global_row_end = base_;  // global rows see keys [base_, this)
  for (int lane = 0; lane < lanes_; ++lane) {
    Lane& L = lane_[lane];
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    L.begin = begin[lane];
    L.end = end[lane];
    L.diag = i + DiagonalOffset(p, t.batch);
    max_diag = std::max(max_diag, L.diag);
    L.global_row = GlobalToken(p, L.diag);
    if (L.global_row) {
      any_global_row_ = true;
      global_row_end = std::max(global_row_end, p.causal ? std::min(limit_, L.diag + 1) : limit_);
    }
    if (s.list_offsets != nullptr) {
      const KeyList list = SparseKeyList(p, t.batch, h, i);
      L.has_list = true;
      L.units = list.units;
      L.count = list.count;
    }
    if (L.begin >= L.end) continue;
    int g = 0;
    // (An empty list may start where the next one does: compare counts too.)
    while (g < num_groups && (groups[g].units != L.units || groups[g].count != L.count)) ++g;
    if (g == num_groups) groups[num_groups++] = Group{L.has_list, L.units, L.count, L.begin, L.end};
    groups[g].begin = std::min<int64_t>(groups[g].begin, L.begin);
    groups[g].end = std::max<int64_t>(groups[g].end, L.end);
  }
  for (int g = 0; g < num_groups; ++g) {
    const Group& G = groups[g];
    if (!G.has_list) {
      SetBits(G.begin, G.end);
      continue;
    }
    const int64_t U = s.unit_keys;
    const int32_t* u = std::lower_bound(G.units, G.units + G.count, G.begin / U);
    const int32_t* const u_end = G.units + G.count;
    if (U == 1) {  // single keys (per-key selection): one bit each
      const int64_t lo = std::max(G.begin, base_), hi = std::min(G.end, limit_);
      for (; u != u_end && *u < hi; ++u) {
        if (*u >= lo) words_[(*u - base_) >> 6] |= uint64_t{1} << ((*u - base_) & 63);
      }
      continue;
    }
    for (; u != u_end && *u * U < G.end; ++u) {
      SetBits(std::max<int64_t>(*u * U, G.begin), std::min<int64_t>((*u + 1) * U, G.end));
    }
  }
  SetBits(base_, global_row_end);
  if (s.global_tokens != nullptr) {
    const int32_t* first = std::lower_bound(s.global_tokens, s.global_tokens + s.num_global_tokens, base_);
    global_cursor_ = static_cast<int32_t>(first - s.global_tokens);
    for (const int32_t* g = first; g != s.global_tokens + s.num_global_tokens && *g < limit_; ++g) {
      if (!p.causal || *g <= max_diag) SetBits(*g, *g + 1);
    }
  }
}

void SparseTileKeys::SetBits(int64_t j0, int64_t j1) {
  j0 = std::max(j0, base_);
  j1 = std::min(j1, limit_);
  if (j0 >= j1) return;
  const int64_t a = j0 - base_, e = j1 - base_;  // bits [a, e)
  const int64_t wa = a >> 6, we = (e - 1) >> 6;
  const uint64_t head = ~uint64_t{0} << (a & 63);
  const uint64_t tail = ~uint64_t{0} >> (63 - ((e - 1) & 63));
  if (wa == we) {
    words_[wa] |= head & tail;
    return;
  }
  words_[wa] |= head;
  for (int64_t w = wa + 1; w < we; ++w) words_[w] = ~uint64_t{0};
  words_[we] |= tail;
}

int SparseTileKeys::Next(int32_t* keys) {
  int n = 0;
  int64_t pos = next_;
  while (pos < limit_ && n < kKeyBlock) {
    const int64_t w = (pos - base_) >> 6;
    uint64_t bits = words_[w] & (~uint64_t{0} << ((pos - base_) & 63));
    while (bits != 0 && n < kKeyBlock) {
      keys[n++] = static_cast<int32_t>(base_ + w * 64 + __builtin_ctzll(bits));
      bits &= bits - 1;
    }
    pos = n == kKeyBlock ? int64_t{keys[n - 1]} + 1 : base_ + (w + 1) * 64;
  }
  next_ = pos;
  return n;
}

SparseTileKeys::Mask SparseTileKeys::Classify(const int32_t* keys, int n) {
  const SparseParams& s = p_.sparse;
  chunk_globals_ = 0;
  if (s.global_tokens != nullptr) {
    const int32_t* g = s.global_tokens;
    int32_t& c = global_cursor_;
    for (int k = 0; k < n; ++k) {
      while (c < s.num_global_tokens && g[c] < keys[k]) ++c;
      if (c < s.num_global_tokens && g[c] == keys[k]) chunk_globals_ |= uint64_t{1} << k;
    }
  }
  const int64_t j0 = keys[0], j1 = int64_t{keys[n - 1]} + 1;
  if (j1 - j0 != n) return Mask::kExplicit;  // gathered keys
  bool all_visible = true;
  bool ranges_decide = chunk_globals_ == 0 && !any_global_row_;
  const int64_t U = s.unit_keys;
  for (int lane = 0; lane < lanes_; ++lane) {
    Lane& L = lane_[lane];
    bool listed = true;
    if (L.has_list) {
      const int64_t u0 = j0 / U, u1 = (j1 - 1) / U;
      while (L.cursor < L.count && L.units[L.cursor] < u0) ++L.cursor;
      // Units are distinct and increasing: u0..u1 are all listed when the
      // entry u1 - u0 places on is u1.
      const int64_t k = L.cursor + (u1 - u0);
      listed = k < L.count && L.units[L.cursor] == u0 && L.units[k] == u1;
    }
    const bool in_range = L.begin <= j0 && j1 <= L.end;
    const bool sees_all = (listed && in_range) ||
                          (L.global_row && (!p_.causal || j1 - 1 <= L.diag));
    all_visible = all_visible && sees_all;
    ranges_decide = ranges_decide && listed;
  }
  if (all_visible) return Mask::kNone;
  return ranges_decide ? Mask::kRange : Mask::kExplicit;
}

namespace {

// Bits [a, b) of a 64-bit word (0 <= a, b <= 64).
uint64_t BitRange(int64_t a, int64_t b) {
  a = std::clamp<int64_t>(a, 0, 64);
  b = std::clamp<int64_t>(b, 0, 64);
  if (a >= b) return 0;
  const uint64_t upto_b = b == 64 ? ~uint64_t{0} : (uint64_t{1} << b) - 1;
  return upto_b & (~uint64_t{0} << a);
}

}  // namespace

uint64_t SparseTileKeys::ListedBits(Lane& L, const int32_t* keys, int n, bool contiguous) {
  const int64_t U = p_.sparse.unit_keys;
  if (!L.has_list) return BitRange(0, n);
  const int64_t j0 = keys[0];
  while (L.cursor < L.count && (int64_t{L.units[L.cursor]} + 1) * U <= j0) ++L.cursor;
  uint64_t bits = 0;
  if (contiguous) {
    // Units overlapping [j0, j0 + n), each a run of bits.
    for (int32_t c = L.cursor; c < L.count && int64_t{L.units[c]} * U < j0 + n; ++c) {
      const int64_t u0 = int64_t{L.units[c]} * U - j0;
      bits |= U == 1 ? uint64_t{1} << u0 : BitRange(u0, u0 + U);
    }
    return bits;
  }
  // Gathered keys: walk the keys and the units together.
  for (int32_t k = 0, c = L.cursor; k < n && c < L.count;) {
    const int64_t first = int64_t{L.units[c]} * U;
    if (first + U <= keys[k]) {
      ++c;
    } else if (first > keys[k]) {
      ++k;
    } else {
      bits |= uint64_t{1} << k++;
    }
  }
  return bits;
}

void SparseTileKeys::ApplyMask(const int32_t* keys, int n, float* s, int64_t M) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t j0 = keys[0];
  const bool contiguous = int64_t{keys[n - 1]} - j0 == n - 1;
  const uint64_t all = BitRange(0, n);
  for (int lane = 0; lane < lanes_; ++lane) {
    Lane& L = lane_[lane];
    // Bit k: keys[k] is visible to the lane.
    uint64_t in_range, before_diag;
    if (contiguous) {
      in_range = BitRange(L.begin - j0, L.end - j0);
      before_diag = p_.causal ? BitRange(0, L.diag - j0 + 1) : all;
    } else {
      in_range = before_diag = 0;
      for (int k = 0; k < n; ++k) {
        in_range |= uint64_t{keys[k] >= L.begin && keys[k] < L.end} << k;
        before_diag |= uint64_t{!p_.causal || keys[k] <= L.diag} << k;
      }
    }
    uint64_t visible = in_range != 0 ? in_range & ListedBits(L, keys, n, contiguous) : 0;
    visible |= (L.global_row ? all : chunk_globals_) & before_diag;
    for (uint64_t hidden = all & ~visible; hidden != 0; hidden &= hidden - 1) {
      s[__builtin_ctzll(hidden) * M + lane] = kNegInf;
    }
  }
}

}  // namespace attnserve::cpu
