#include "backends/cpu/scalar_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/base/internal/raw_logging.h"
#include "core/half.h"

namespace attnserve::cpu {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Rows between two polls of the cancel token: a row is Lk keys of work, so a
// stopped request leaves within a few rows.
constexpr int64_t kRowsPerStopCheck = 8;

// elu(x) + 1, the LINEAR feature map.
double Phi(double x) { return x > 0 ? x + 1 : std::exp(x); }

// Per-row scratch, reused across the rows of one head.
struct Row {
  std::vector<double> q;       // [head_dim]
  std::vector<double> weight;  // [seqlen_k], unnormalised, 0 where masked
  std::vector<char> attended;  // [seqlen_k]
  std::vector<int32_t> order;  // top-k candidates
  double log_normaliser = kNegInf;
  double sink = 0;             // the sink's probability
};

// SOFTMAX: fills row.weight/attended/log_normaliser for query row i; false
// when the row is fully masked.
bool Weigh(const AttentionParams& p, int64_t b, int64_t h, int64_t i, Row& row) {
  const int64_t kv = h / p.group_size;
  const int64_t q0 = b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
  for (int64_t d = 0; d < p.head_dim; ++d) row.q[d] = LoadFloat(p.q, p.dtype, q0 + d);
  std::fill(row.weight.begin(), row.weight.end(), 0.0);
  std::fill(row.attended.begin(), row.attended.end(), 0);
  // A sparse pattern may show keys outside the range (global tokens).
  const bool sparse = p.sparse.masks();
  const KeyRange range = sparse ? KeyRange{0, p.seqlen_k} : VisibleKeyRange(p, b, i);
  double max_score = kNegInf;
  for (int64_t j = range.begin; j < range.end; ++j) {
    if (sparse && !KeyVisibleToHead(p, b, h, i, j)) continue;
    const void* krow = KeyRow(p, b, j, kv);
    double dot = 0;
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
  const double sink = p.sparse.sink_logits != nullptr ? p.sparse.sink_logits[h] : kNegInf;
  row.sink = 0;
  if (max_score == kNegInf) {
    std::fill(row.weight.begin(), row.weight.end(), 0.0);
    row.log_normaliser = sink;  // the sink alone takes the row's mass
    return false;
  }
  max_score = std::max(max_score, sink);
  double sum = 0;
  for (int64_t j = range.begin; j < range.end; ++j) {
    row.weight[j] = row.attended[j] ? std::exp(row.weight[j] - max_score) : 0.0;
    sum += row.weight[j];
  }
  if (sink != kNegInf) {
    row.sink = std::exp(sink - max_score);
    sum += row.sink;
  }
  row.log_normaliser = max_score + std::log(sum);
  for (int64_t j = range.begin; j < range.end; ++j) row.weight[j] /= sum;
  row.sink /= sum;
  return true;
}

}  // namespace

void RunLinearHead(const AttentionParams& p, int64_t b, int64_t h) {
  // Windows are rejected for LINEAR, so every visible range starts at key 0
  // and its end never decreases from one query row to the next.
  ABSL_RAW_CHECK(p.window_left < 0, "LINEAR attention takes no sliding window");
  const int64_t kv = h / p.group_size;
  const int64_t dk = p.head_dim;
  const int64_t dv = p.value_dim;
  std::vector<double> key_value_sum(dk * dv, 0.0);  // S = Σ_j φ(k_j) v_jᵀ, [dk, dv] row-major
  std::vector<double> key_sum(dk, 0.0);             // z = Σ_j φ(k_j)
  std::vector<double> phi(dk);
  std::vector<double> value(dv);
  std::vector<double> numerator(dv);
  int64_t keys_summed = 0;  // S and z cover keys [0, keys_summed)
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    if (i % kRowsPerStopCheck == 0 && StopRequested(p)) return;
    const KeyRange range = VisibleKeyRange(p, b, i);
    for (; keys_summed < range.end; ++keys_summed) {
      if (keys_summed % 1024 == 0 && StopRequested(p)) return;
      const void* krow = KeyRow(p, b, keys_summed, kv);
      const void* vrow = ValueRow(p, b, keys_summed, kv);
      for (int64_t d = 0; d < dk; ++d) {
        phi[d] = Phi(LoadFloat(krow, p.dtype, d));
        key_sum[d] += phi[d];
      }
      for (int64_t e = 0; e < dv; ++e) value[e] = LoadFloat(vrow, p.dtype, e);
      for (int64_t d = 0; d < dk; ++d) {
        double* s = key_value_sum.data() + d * dv;
        for (int64_t e = 0; e < dv; ++e) s[e] += phi[d] * value[e];
      }
    }

    // An empty range leaves S and z at 0 (no key was summed yet), so the
    // denominator is 0 and the row's output 0, as for a fully masked row.
    const int64_t q0 = b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
    double denominator = 0;
    std::fill(numerator.begin(), numerator.end(), 0.0);
    for (int64_t d = 0; d < dk; ++d) {
      const double phi_q = Phi(LoadFloat(p.q, p.dtype, q0 + d));
      denominator += phi_q * key_sum[d];
      const double* s = key_value_sum.data() + d * dv;
      for (int64_t e = 0; e < dv; ++e) numerator[e] += phi_q * s[e];
    }
    // As in the reference, a row whose φ products all underflow counts as
    // fully masked.
    const bool live = denominator > 0;
    const int64_t o0 = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    for (int64_t e = 0; e < dv; ++e) {
      StoreFloat(p.o, p.dtype, o0 + e, live ? static_cast<float>(numerator[e] / denominator) : 0.f);
    }
    if (p.lse != nullptr) {
      p.lse[(b * p.num_heads_q + h) * p.seqlen_q + i] =
          live ? static_cast<float>(std::log(denominator)) : -INFINITY;
    }
  }
}

void RunScalarHead(const AttentionParams& p, int64_t b, int64_t h, int64_t row_begin,
                   int64_t row_end) {
  if (p.variant == Variant::kLinear) {
    RunLinearHead(p, b, h);
    return;
  }
  const int64_t kv = h / p.group_size;
  Row row;
  row.q.resize(p.head_dim);
  row.weight.resize(p.seqlen_k);
  row.attended.resize(p.seqlen_k);
  std::vector<double> acc(p.value_dim);
  const int64_t end = row_end < 0 ? p.seqlen_q : row_end;
  for (int64_t i = row_begin; i < end; ++i) {
    if ((i - row_begin) % kRowsPerStopCheck == 0 && StopRequested(p)) return;
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
    if (p.lse != nullptr) p.lse[r] = static_cast<float>(row.log_normaliser);
    if (p.entropy != nullptr) {
      double h_nats = live && row.sink > 0 ? -row.sink * std::log(row.sink) : 0;
      for (int64_t j = 0; live && j < p.seqlen_k; ++j) {
        if (row.weight[j] > 0) h_nats -= row.weight[j] * std::log(row.weight[j]);
      }
      p.entropy[r] = static_cast<float>(h_nats);
    }
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
