#include "backends/cpu/scalar_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/half.h"

namespace attnserve::cpu {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// elu(x) + 1, the LINEAR feature map.
double Phi(double x) { return x > 0 ? x + 1 : std::exp(x); }

// Per-row scratch, reused across the rows of one head.
struct Row {
  std::vector<double> q;       // [head_dim], φ applied for LINEAR
  std::vector<double> weight;  // [seqlen_k], unnormalised, 0 where masked
  std::vector<char> attended;  // [seqlen_k]
  std::vector<int32_t> order;  // top-k candidates
  double log_normaliser = kNegInf;
};

// Fills row.weight/attended/log_normaliser for query row i; false when the row
// is fully masked.
bool Weigh(const AttentionParams& p, int64_t b, int64_t h, int64_t i, Row& row) {
  const int64_t kv = h / p.group_size;
  const bool linear = p.variant == Variant::kLinear;
  const int64_t q0 = b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
  for (int64_t d = 0; d < p.head_dim; ++d) {
    const double x = LoadFloat(p.q, p.dtype, q0 + d);
    row.q[d] = linear ? Phi(x) : x;
  }
  std::fill(row.weight.begin(), row.weight.end(), 0.0);
  std::fill(row.attended.begin(), row.attended.end(), 0);
  const KeyRange range = VisibleKeyRange(p, b, i);
  double max_score = kNegInf;
  for (int64_t j = range.begin; j < range.end; ++j) {
    const void* krow = KeyRow(p, b, j, kv);
    double dot = 0;
    if (linear) {
      for (int64_t d = 0; d < p.head_dim; ++d) dot += row.q[d] * Phi(LoadFloat(krow, p.dtype, d));
      row.weight[j] = dot;
      row.attended[j] = 1;
      continue;
    }
    for (int64_t d = 0; d < p.head_dim; ++d) dot += row.q[d] * LoadFloat(krow, p.dtype, d);
    double s = dot * p.scale;
    if (p.softcap > 0.f) s = p.softcap * std::tanh(s / p.softcap);
    s += AlibiBias(p, b, h, i, j);
    s += BiasAt(p, b, h, i, j);
    row.weight[j] = s;  // the score, for now
    if (s != kNegInf) {
      row.attended[j] = 1;
      max_score = std::max(max_score, s);
    }
  }
  double sum = 0;
  if (linear) {
    for (int64_t j = range.begin; j < range.end; ++j) sum += row.weight[j];
    if (!(sum > 0)) return false;
    row.log_normaliser = std::log(sum);
  } else {
    if (max_score == kNegInf) {
      std::fill(row.weight.begin(), row.weight.end(), 0.0);
      return false;
    }
    for (int64_t j = range.begin; j < range.end; ++j) {
      row.weight[j] = row.attended[j] ? std::exp(row.weight[j] - max_score) : 0.0;
      sum += row.weight[j];
    }
    row.log_normaliser = max_score + std::log(sum);
  }
  for (int64_t j = range.begin; j < range.end; ++j) row.weight[j] /= sum;
  return true;
}

}  // namespace

void RunScalarHead(const AttentionParams& p, int64_t b, int64_t h) {
  const int64_t kv = h / p.group_size;
  Row row;
  row.q.resize(p.head_dim);
  row.weight.resize(p.seqlen_k);
  row.attended.resize(p.seqlen_k);
  std::vector<double> acc(p.value_dim);
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    const bool live = Weigh(p, b, h, i, row);
    std::fill(acc.begin(), acc.end(), 0.0);
    if (live) {
      for (int64_t j = 0; j < p.seqlen_k; ++j) {
        if (row.weight[j] == 0) continue;
        const void* vrow = ValueRow(p, b, j, kv);
        for (int64_t d = 0; d < p.value_dim; ++d) {
          acc[d] += row.weight[j] * LoadFloat(vrow, p.dtype, d);
        }
      }
    }
    const int64_t o0 = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    for (int64_t d = 0; d < p.value_dim; ++d) {
      StoreFloat(p.o, p.dtype, o0 + d, static_cast<float>(acc[d]));
    }

    const int64_t r = (b * p.num_heads_q + h) * p.seqlen_q + i;
    if (p.lse != nullptr) p.lse[r] = live ? static_cast<float>(row.log_normaliser) : -INFINITY;
    if (p.weights != nullptr) {
      for (int64_t j = 0; j < p.seqlen_k; ++j) {
        p.weights[r * p.seqlen_k + j] = live ? static_cast<float>(row.weight[j]) : 0.f;
      }
    }
    if (p.top_k > 0 && p.top_k_indices != nullptr && p.top_k_weights != nullptr) {
      // Attended keys by decreasing weight, ties to the lower index.
      row.order.clear();
      if (live) {
        for (int32_t j = 0; j < p.seqlen_k; ++j) {
          if (row.attended[j]) row.order.push_back(j);
        }
      }
      const int64_t k = std::min<int64_t>(p.top_k, row.order.size());
      std::partial_sort(row.order.begin(), row.order.begin() + k, row.order.end(),
                        [&](int32_t a, int32_t c) {
                          return row.weight[a] > row.weight[c] ||
                                 (row.weight[a] == row.weight[c] && a < c);
                        });
      for (int64_t n = 0; n < p.top_k; ++n) {
        const bool present = n < k;
        p.top_k_indices[r * p.top_k + n] = present ? row.order[n] : -1;
        p.top_k_weights[r * p.top_k + n] = present ? static_cast<float>(row.weight[row.order[n]]) : 0.f;
      }
    }
  }
}

}  // namespace attnserve::cpu
