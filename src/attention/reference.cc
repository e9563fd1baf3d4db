// The reference kernel computes one (batch, query head, query row) at a time:
// it builds the row's unnormalised weights over all Lk keys in double, then
// writes the output and every optional output from that one vector, so the
// outputs cannot disagree with each other. Masking, alignment and biases come
// from the helpers in params.h, which every fast kernel uses too.
#include "attention/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "core/half.h"

namespace attnserve {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// One query row's weights: `weight[j]` is the unnormalised weight of key j
// (0 for a masked key), `attended[j]` says whether key j takes part at all
// (visible and not biased to -inf; its weight may still underflow to 0),
// `log_normaliser` is log Σ_j weight[j] in the variant's own units (see
// below), and the row is fully masked when no key takes part.
struct RowWeights {
  std::vector<double> weight;  // normalised to probabilities by Normalise()
  std::vector<char> attended;
  double sink_weight = 0;      // the sink's weight, on the scale of `weight`
  double log_normaliser = kNegInf;
  bool fully_masked = true;
};

double LoadQ(const AttentionParams& p, int64_t b, int64_t i, int64_t h, int64_t d) {
  return LoadFloat(p.q, p.dtype, b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride + d);
}

double LoadK(const AttentionParams& p, int64_t b, int64_t j, int64_t h, int64_t d) {
  return LoadFloat(KeyRow(p, b, j, h), p.dtype, d);
}

double LoadV(const AttentionParams& p, int64_t b, int64_t j, int64_t h, int64_t d) {
  return LoadFloat(ValueRow(p, b, j, h), p.dtype, d);
}

// Softmax: score s_j = scale·q·k_j, soft-capped, plus ALiBi and bias; keys
// that are not visible (KeyVisibleToHead) or have a -inf score are masked.
// The weights are exp(s_j - max) and the log-normaliser is the row's
// log-sum-exp, the sink (if any) counted as one more score.
RowWeights SoftmaxRow(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  const int64_t kv_head = h / p.group_size;
  RowWeights row;
  row.weight.assign(p.seqlen_k, 0.0);
  row.attended.assign(p.seqlen_k, 0);
  std::vector<double> score(p.seqlen_k, kNegInf);
  // A sparse pattern may show keys outside the range (global tokens): walk
  // every key and ask the mask.
  const bool sparse = p.sparse.masks();
  const KeyRange range = sparse ? KeyRange{0, p.seqlen_k} : VisibleKeyRange(p, b, i);
  double max_score = kNegInf;
  for (int64_t j = range.begin; j < range.end; ++j) {
    if (sparse && !KeyVisibleToHead(p, b, h, i, j)) continue;
    double s = 0;
    for (int64_t d = 0; d < p.head_dim; ++d) s += LoadQ(p, b, i, h, d) * LoadK(p, b, j, kv_head, d);
    s *= static_cast<double>(p.scale);
    if (p.softcap > 0.f) {
      const double cap = p.softcap;
      s = cap * std::tanh(s / cap);
    }
    s += static_cast<double>(AlibiBias(p, b, h, i, j));
    s += static_cast<double>(BiasAt(p, b, h, i, j));
    score[j] = s;
    max_score = std::max(max_score, s);
  }
  const double sink = p.sparse.sink_logits != nullptr ? p.sparse.sink_logits[h] : kNegInf;
  if (max_score == kNegInf) {  // no key, or every visible key biased to -inf
    row.log_normaliser = sink;  // the sink alone takes the row's mass
    return row;
  }
  max_score = std::max(max_score, sink);

  double sum = 0;
  for (int64_t j = range.begin; j < range.end; ++j) {
    if (score[j] == kNegInf) continue;
    row.attended[j] = 1;
    row.weight[j] = std::exp(score[j] - max_score);
    sum += row.weight[j];
  }
  if (sink != kNegInf) {
    row.sink_weight = std::exp(sink - max_score);
    sum += row.sink_weight;
  }
  row.log_normaliser = max_score + std::log(sum);
  row.fully_masked = false;
  return row;
}

// φ(x) = elu(x) + 1: x + 1 for x > 0, exp(x) otherwise; always positive.
double Phi(double x) { return x > 0 ? x + 1 : std::exp(x); }

// LINEAR: weight_j = φ(q)·φ(k_j) over the visible keys (so causal is a prefix
// sum and key_lengths cut the sum). The log-normaliser is log Σ_j weight_j,
// the analogue of the softmax's log-sum-exp.
RowWeights LinearRow(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  const int64_t kv_head = h / p.group_size;
  RowWeights row;
  row.weight.assign(p.seqlen_k, 0.0);
  row.attended.assign(p.seqlen_k, 0);
  const KeyRange range = VisibleKeyRange(p, b, i);
  double sum = 0;
  for (int64_t j = range.begin; j < range.end; ++j) {
    double w = 0;
    for (int64_t d = 0; d < p.head_dim; ++d) {
      w += Phi(LoadQ(p, b, i, h, d)) * Phi(LoadK(p, b, j, kv_head, d));
    }
    row.weight[j] = w;
    row.attended[j] = 1;
    sum += w;
  }
  if (sum > 0) {  // only underflow of every φ product makes a non-empty row sum to 0
    row.log_normaliser = std::log(sum);
    row.fully_masked = false;
  }
  return row;
}

void Normalise(RowWeights& row) {
  if (row.fully_masked) return;
  const double total =
      std::accumulate(row.weight.begin(), row.weight.end(), 0.0) + row.sink_weight;
  for (double& w : row.weight) w /= total;
  row.sink_weight /= total;
}

// Top-k over the attended keys: decreasing weight, ties broken by the lower
// index; the tail past those keys is index -1, weight 0.
void WriteTopK(const AttentionParams& p, const RowWeights& row, int64_t out_offset) {
  std::vector<int32_t> keys;
  for (int32_t j = 0; j < p.seqlen_k; ++j) {
    if (row.attended[j] && !row.fully_masked) keys.push_back(j);
  }
  std::stable_sort(keys.begin(), keys.end(),
                   [&](int32_t a, int32_t b) { return row.weight[a] > row.weight[b]; });
  for (int64_t r = 0; r < p.top_k; ++r) {
    const bool present = r < static_cast<int64_t>(keys.size());
    p.top_k_indices[out_offset + r] = present ? keys[r] : -1;
    p.top_k_weights[out_offset + r] = present ? static_cast<float>(row.weight[keys[r]]) : 0.f;
  }
}

void ComputeRow(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  RowWeights row = p.variant == Variant::kLinear ? LinearRow(p, b, h, i) : SoftmaxRow(p, b, h, i);
  Normalise(row);

  const int64_t kv_head = h / p.group_size;
  const int64_t o_offset = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  for (int64_t d = 0; d < p.value_dim; ++d) {
    double acc = 0;
    for (int64_t j = 0; j < p.seqlen_k; ++j) {
      if (row.weight[j] != 0) acc += row.weight[j] * LoadV(p, b, j, kv_head, d);
    }
    StoreFloat(p.o, p.dtype, o_offset + d, static_cast<float>(acc));
  }

  const int64_t row_index = (b * p.num_heads_q + h) * p.seqlen_q + i;
  if (p.lse != nullptr) p.lse[row_index] = static_cast<float>(row.log_normaliser);
  if (p.entropy != nullptr) {
    // H = −Σ p·ln p over the attended keys and the sink, directly from the
    // probabilities.
    double h_nats = row.sink_weight > 0 ? -row.sink_weight * std::log(row.sink_weight) : 0;
    for (int64_t j = 0; j < p.seqlen_k; ++j) {
      const double w = row.weight[j];
      if (w > 0) h_nats -= w * std::log(w);
    }
    p.entropy[row_index] = row.fully_masked ? 0.f : static_cast<float>(h_nats);
  }
  if (p.weights != nullptr) {
    for (int64_t j = 0; j < p.seqlen_k; ++j) {
      p.weights[row_index * p.seqlen_k + j] = static_cast<float>(row.weight[j]);
    }
  }
  if (p.top_k > 0 && p.top_k_indices != nullptr && p.top_k_weights != nullptr) {
    WriteTopK(p, row, row_index * p.top_k);
  }
}

}  // namespace

void RunReferenceAttention(const AttentionParams& params) {
  for (int64_t b = 0; b < params.batch; ++b) {
    for (int64_t h = 0; h < params.num_heads_q; ++h) {
      for (int64_t i = 0; i < params.seqlen_q; ++i) {
        if (StopRequested(params)) return;  // nobody waits for the result any more
        ComputeRow(params, b, h, i);
      }
    }
  }
}

}  // namespace attnserve
