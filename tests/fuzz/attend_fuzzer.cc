// Fuzz target for the request path, as the server runs it minus gRPC: input
// bytes are parsed as an attnserve.v1.AttendRequest, converted
// (RequestFromProto), validated (PrepareAttention) and, when small enough to
// take well under a millisecond, computed by the reference and the cpu backend.
//
// Sparse patterns (AttentionRequest::sparsity) are drawn from bytes of the
// input (see SparseFromBytes): block masks, key selections, global tokens and
// sinks, mostly valid for the request's dims and sometimes broken on purpose,
// so that PlanSparsity's checks and the sparse kernels are fuzzed too.
//
// Any crash, sanitizer report or broken invariant aborts. The invariants are
// the ones the API guarantees for every input, not tolerances tuned to random
// data: errors carry a documented code; outputs have their documented shapes;
// with inputs of bounded magnitude (so no score can overflow) outputs are
// finite, within the range of V, zero with lse -inf exactly on fully masked
// rows, weights are probabilities of attended keys, top-k lists are sorted
// attended keys; and where the scores are small enough for F32 rounding to be
// bounded, the cpu backend agrees with the reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>
#include <google/protobuf/stubs/logging.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "attention/job.h"
#include "attention/params.h"
#include "attention/request.h"
#include "attention/sparse.h"
#include "attnserve/v1/attention.pb.h"
#include "backends/backend.h"
#include "backends/cpu/cpu_backend.h"
#include "backends/reference_backend.h"
#include "core/half.h"
#include "server/convert.h"
#include "server/wire_request.h"

namespace attnserve {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Limits well below the server's defaults, so that small inputs reach the
// RESOURCE_EXHAUSTED paths too.
RequestLimits FuzzLimits() {
  RequestLimits limits;
  limits.max_output_bytes = int64_t{1} << 20;
  limits.max_weights_bytes = int64_t{1} << 20;
  limits.max_top_k = 256;
  return limits;
}

// Requests over this many multiply-adds (of either backend) are validated but
// not computed. 2^18 keeps every input under about a millisecond with ASan.
constexpr double kMaxWork = 1 << 18;

// Magnitudes under which no score, weight or sum can overflow (F32 max is
// 3.4e38): |q·k·scale| <= 1e4 * 1e4 * 1024 * 1e4 = 1e15, ALiBi <= 1e4 * 2^18.
// LINEAR needs a tighter bound: φ(x) = exp(x) for x <= 0 must not underflow.
constexpr double kMaxSoftmaxInput = 1e4;
constexpr double kMaxLinearInput = 16;
constexpr double kMaxBias = 1e6;

// Below these, F32 rounding moves a score by at most 1024 * 6e-8 * 64 = 4e-3,
// so a weight by under 1% and an output by under 2% of max|V|.
constexpr double kMaxTameScore = 64;
constexpr double kMaxTameBias = 1e3;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "attend_fuzzer: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

void ExpectCode(const absl::Status& status, std::initializer_list<absl::StatusCode> allowed,
                const char* where) {
  for (absl::StatusCode code : allowed) {
    if (status.code() == code) return;
  }
  Fail(absl::StrCat(where, " returned an undocumented code: ", status.ToString()));
}

Backend& ReferenceBackend() {
  static Backend* const backend = [] {
    auto b = CreateReferenceBackend(BackendOptions{});
    if (!b.ok()) Fail(absl::StrCat("reference backend: ", b.status().ToString()));
    return b->release();
  }();
  return *backend;
}

Backend& CpuBackend() {
  static Backend* const backend = [] {
    BackendOptions options;
    options.threads = 1;  // runs on the fuzzing thread: no pool hand-offs per input
    auto b = CreateCpuBackend(options);
    if (!b.ok()) Fail(absl::StrCat("cpu backend: ", b.status().ToString()));
    return b->release();
  }();
  return *backend;
}

// Largest |x| over a request tensor; infinity if any element is not finite.
double MaxAbs(const TensorView& t) {
  double m = 0;
  const int64_t n = static_cast<int64_t>(t.data.size() / DTypeSize(t.dtype));
  for (int64_t i = 0; i < n; ++i) {
    const double x = LoadFloat(t.data.data(), t.dtype, i);
    if (!std::isfinite(x)) return kInf;
    m = std::max(m, std::abs(x));
  }
  return m;
}

// What the checks need to know about a validated request.
struct Shape {
  int64_t B, Lq, Lk, Hq, Hkv, D, Dv;
  bool linear;
};

Shape ShapeOf(const AttentionParams& p) {
  return Shape{p.batch,        p.seqlen_q,  p.seqlen_k, p.num_heads_q,
               p.num_heads_kv, p.head_dim,  p.value_dim, p.variant == Variant::kLinear};
}

// Multiply-adds of the more expensive backend, plus the outputs' size.
double Work(const Shape& s, int32_t top_k) {
  const double rows = double(s.B) * s.Hq * s.Lq;
  double work = rows * s.Lk * (s.D + s.Dv + 1) + rows * (s.Dv + top_k);
  // The cpu backend's LINEAR path keeps Σ φ(k) vᵀ, a D x Dv matrix, per head.
  if (s.linear) work += double(s.B) * s.Hq * (s.Lq + s.Lk) * double(s.D) * s.Dv;
  return work;
}

// Keys query row (b, h, i) attends: visible and not biased to -inf. A sparse
// pattern may show keys outside the row's range (global tokens): every key is
// then put to KeyVisibleToHead.
std::vector<char> Attended(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  std::vector<char> attended(p.seqlen_k, 0);
  const bool sparse = p.sparse.masks();
  const KeyRange r = sparse ? KeyRange{0, p.seqlen_k} : VisibleKeyRange(p, b, i);
  for (int64_t j = r.begin; j < r.end; ++j) {
    if (sparse && !KeyVisibleToHead(p, b, h, i, j)) continue;
    attended[j] = p.variant == Variant::kLinear || BiasAt(p, b, h, i, j) != -kInf;
  }
  return attended;
}

void CheckShape(const Tensor& t, DType dtype, std::vector<int64_t> shape, const char* name) {
  if (t.dtype != dtype || t.shape != shape ||
      static_cast<int64_t>(t.data.size()) != CheckedElementCount(shape) * int64_t(DTypeSize(dtype))) {
    Fail(absl::StrCat(name, ": ", DTypeName(t.dtype), " ", ShapeString(t.shape), " with ",
                      t.data.size(), " bytes, expected ", DTypeName(dtype), " ",
                      ShapeString(shape)));
  }
}

// The documented shapes of every output the request asked for.
void CheckShapes(const AttentionJob& job, const AttentionRequest& request) {
  const Shape s = ShapeOf(job.params);
  std::vector<int64_t> out = {s.B, s.Lq, s.Hq, s.Dv};
  if (request.query.rank() == 3) out.erase(out.begin());
  CheckShape(job.output, request.query.dtype, out, "output");
  if (request.outputs.lse) CheckShape(job.lse, DType::kF32, {s.B, s.Hq, s.Lq}, "lse");
  if (request.outputs.entropy) CheckShape(job.entropy, DType::kF32, {s.B, s.Hq, s.Lq}, "entropy");
  if (request.outputs.weights) {
    CheckShape(job.weights, DType::kF32, {s.B, s.Hq, s.Lq, s.Lk}, "weights");
  }
  if (request.outputs.top_k > 0) {
    const std::vector<int64_t> k = {s.B, s.Hq, s.Lq, request.outputs.top_k};
    CheckShape(job.top_k_indices, DType::kI32, k, "top_k_indices");
    CheckShape(job.top_k_weights, DType::kF32, k, "top_k_weights");
  }
}

struct Bounds {
  bool bounded = false;  // no score or sum can overflow: the outputs are finite
  bool tame = false;     // scores small: the cpu backend must agree with the reference
  double max_v = 0;
};

Bounds BoundsOf(const AttentionJob& job, const AttentionRequest& request) {
  const AttentionParams& p = job.params;
  const bool linear = p.variant == Variant::kLinear;
  const double q = MaxAbs(request.query), k = MaxAbs(request.key), v = MaxAbs(request.value);
  double bias = 0;
  for (float x : job.bias_f32) {
    if (x != -kInf) bias = std::max(bias, std::abs(double(x)));
  }
  double slope = 0;
  for (float x : job.alibi_slopes) slope = std::max(slope, std::abs(double(x)));
  const double input_bound = linear ? kMaxLinearInput : kMaxSoftmaxInput;
  Bounds out;
  out.max_v = v;
  out.bounded = q <= input_bound && k <= input_bound && v <= input_bound &&
                std::abs(p.scale) <= kMaxSoftmaxInput && slope <= kMaxSoftmaxInput &&
                bias <= kMaxBias;
  const double max_score = std::abs(double(p.scale)) * p.head_dim * q * k;
  out.tame = out.bounded && (linear ? q <= 4 && k <= 4
                                    : max_score <= kMaxTameScore && bias <= kMaxTameBias &&
                                          slope * p.seqlen_k <= kMaxTameBias);
  return out;
}

// Invariants of one backend's outputs on a bounded request.
void CheckBoundedOutputs(const AttentionJob& job, const Bounds& bounds, const char* backend) {
  const AttentionParams& p = job.params;
  const Shape s = ShapeOf(p);
  // F32 sums over Lk terms, each rounded: the slack grows with Lk.
  const double slack = 1e-3 + 2.5e-7 * s.Lk;
  const double max_out = bounds.max_v * (1 + slack) + 1e-30;
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t h = 0; h < s.Hq; ++h) {
      for (int64_t i = 0; i < s.Lq; ++i) {
        const std::vector<char> attended = Attended(p, b, h, i);
        const int64_t n_attended = std::count(attended.begin(), attended.end(), 1);
        const bool masked = n_attended == 0;
        const auto where = [&] { return absl::StrCat(backend, " [b ", b, ", h ", h, ", i ", i, "] "); };
        const int64_t o0 = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
        for (int64_t e = 0; e < s.Dv; ++e) {
          const double o = LoadFloat(p.o, p.dtype, o0 + e);
          if (!(std::abs(o) <= max_out)) {
            Fail(absl::StrCat(where(), "output ", o, " outside [-max|V|, max|V|] = ", bounds.max_v));
          }
          if (masked && o != 0) Fail(absl::StrCat(where(), "fully masked row has output ", o));
        }
        const int64_t row = (b * s.Hq + h) * s.Lq + i;
        // A sink is one more outcome: it takes the whole mass of a row
        // without keys (lse = the sink, output 0, entropy 0).
        const bool sink = p.sparse.sink_logits != nullptr;
        if (p.lse != nullptr) {
          const float lse = p.lse[row];
          const bool ok = !masked ? std::isfinite(lse)
                          : sink  ? std::abs(double(lse) - p.sparse.sink_logits[h]) <=
                                       1e-4 * (1 + std::abs(p.sparse.sink_logits[h]))
                                  : lse == -kInf;
          if (!ok) {
            Fail(absl::StrCat(where(), "lse ", lse, " for a row with ", n_attended,
                              " attended keys", sink ? " and a sink" : ""));
          }
        }
        if (p.entropy != nullptr) {
          // 0 <= H <= ln(outcomes); 0 for a fully masked row.
          const float h_nats = p.entropy[row];
          const double outcomes = static_cast<double>(n_attended + (sink ? 1 : 0));
          const double most = masked ? 0.0 : std::log(outcomes) + 1e-3 + slack;
          if (!(h_nats >= 0 && h_nats <= most)) {
            Fail(absl::StrCat(where(), "entropy ", h_nats, " for a row with ", n_attended,
                              " attended keys"));
          }
        }
        if (p.weights != nullptr) {
          double sum = 0;
          for (int64_t j = 0; j < s.Lk; ++j) {
            const float w = p.weights[row * s.Lk + j];
            if (!(w >= 0 && w <= 1 + slack) || (!attended[j] && w != 0)) {
              Fail(absl::StrCat(where(), "weight ", w, " of key ", j,
                                attended[j] ? " (attended)" : " (masked)"));
            }
            sum += w;
          }
          // With a sink the keys' weights sum to 1 minus the sink's.
          const bool ok = masked ? sum == 0
                          : sink ? sum <= 1 + slack
                                 : std::abs(sum - 1) <= slack;
          if (!ok) Fail(absl::StrCat(where(), "weights sum to ", sum));
        }
        if (p.top_k > 0) {
          const int32_t* idx = p.top_k_indices + row * p.top_k;
          const float* w = p.top_k_weights + row * p.top_k;
          const int64_t want = std::min<int64_t>(p.top_k, n_attended);
          std::vector<char> seen(s.Lk, 0);
          for (int64_t r = 0; r < p.top_k; ++r) {
            const bool ok =
                r < want ? idx[r] >= 0 && idx[r] < s.Lk && attended[idx[r]] && !seen[idx[r]] &&
                               w[r] >= 0 && w[r] <= 1 + slack && (r == 0 || w[r] <= w[r - 1])
                         : idx[r] == -1 && w[r] == 0;
            if (!ok) {
              Fail(absl::StrCat(where(), "top_k entry ", r, ": key ", idx[r], " weight ", w[r],
                                " (", n_attended, " attended keys)"));
            }
            if (r < want) seen[idx[r]] = 1;
          }
        }
      }
    }
  }
}

// The cpu backend against the reference on a tame request: scores are small,
// so F32 rounding moves each weight by under 1% (see kMaxTameScore).
void CheckAgreement(const AttentionJob& cpu, const AttentionJob& ref, const Bounds& bounds) {
  const AttentionParams& p = ref.params;
  const Shape s = ShapeOf(p);
  const double rounding = p.dtype == DType::kF32 ? 0 : 1.0 / 128;  // one 16-bit ulp, relative
  const double out_tol = (2e-2 + rounding + 1e-7 * s.Lk) * bounds.max_v + 1e-6;
  const int64_t n_out = CheckedElementCount(ref.output.shape);
  for (int64_t e = 0; e < n_out; ++e) {
    const double got = LoadFloat(cpu.output.data.data(), p.dtype, e);
    const double want = LoadFloat(ref.output.data.data(), p.dtype, e);
    if (!(std::abs(got - want) <= out_tol)) {
      Fail(absl::StrCat("cpu output[", e, "] = ", got, ", reference ", want, ", tolerance ", out_tol));
    }
  }
  const auto close = [](double got, double want, double tol) {
    return got == want || std::abs(got - want) <= tol;  // == for -inf
  };
  for (int64_t r = 0; r < CheckedElementCount(ref.lse.shape) && p.lse != nullptr; ++r) {
    const double got = cpu.params.lse[r], want = p.lse[r];
    if (!close(got, want, 2e-2 + 1e-4 * std::abs(want))) {
      Fail(absl::StrCat("cpu lse[", r, "] = ", got, ", reference ", want));
    }
  }
  for (int64_t r = 0; r < CheckedElementCount(ref.entropy.shape) && p.entropy != nullptr; ++r) {
    const double got = cpu.params.entropy[r], want = p.entropy[r];
    if (!close(got, want, 2e-2 + 1e-3 * std::abs(want))) {
      Fail(absl::StrCat("cpu entropy[", r, "] = ", got, ", reference ", want));
    }
  }
  for (int64_t e = 0; e < CheckedElementCount(ref.weights.shape) && p.weights != nullptr; ++e) {
    if (!close(cpu.params.weights[e], p.weights[e], 2e-2)) {
      Fail(absl::StrCat("cpu weights[", e, "] = ", cpu.params.weights[e], ", reference ",
                        p.weights[e]));
    }
  }
  // The r-th largest weight moves no more than the weights do, whatever the
  // order of near-ties (indices may differ there).
  for (int64_t e = 0; e < CheckedElementCount(ref.top_k_weights.shape) && p.top_k > 0; ++e) {
    if (!close(cpu.params.top_k_weights[e], p.top_k_weights[e], 2e-2)) {
      Fail(absl::StrCat("cpu top_k_weights[", e, "] = ", cpu.params.top_k_weights[e],
                        ", reference ", p.top_k_weights[e]));
    }
  }
}

// Values of mutated inputs are mostly huge or not finite, which leaves the
// output checks (bounded inputs only) unreached. A request with priority 1
// (a field only the scheduler reads) has its Q, K, V and bias values folded
// into a small range first: non-finite values become 0 (a bias keeps -inf,
// its mask), others x mod 4 (bias: mod 64). Priority 0 runs the raw values.
void FoldValues(v1::Tensor& t, double range, bool keep_neg_inf) {
  const absl::StatusOr<DType> dtype = RequestDTypeFromProto(t.dtype(), "");
  if (!dtype.ok()) return;
  std::string& data = *t.mutable_data();
  const int64_t n = static_cast<int64_t>(data.size() / DTypeSize(*dtype));
  for (int64_t i = 0; i < n; ++i) {
    const float x = LoadFloat(data.data(), *dtype, i);
    float folded = std::isfinite(x) ? std::fmod(x, static_cast<float>(range)) : 0.f;
    if (keep_neg_inf && x == -kInf) folded = x;
    StoreFloat(data.data(), *dtype, i, folded);
  }
}

// Runs `job` on `backend`; false when the backend does not support it.
bool RunOn(Backend& backend, const AttentionJob& job) {
  const absl::Status supported = backend.Supports(job.params);
  if (!supported.ok()) {
    ExpectCode(supported, {absl::StatusCode::kUnimplemented}, backend.info().name.c_str());
    return false;
  }
  const absl::Status run = backend.Run(absl::MakeConstSpan(&job.params, 1));
  if (!run.ok()) Fail(absl::StrCat(backend.info().name, " Run: ", run.ToString()));
  return true;
}

// The bytes a sparse pattern is drawn from: the request_id's (which the
// mutator edits like any other field) or, when it is empty, for one input in
// three, bytes derived from a hash of the whole input, so that the committed
// dense seeds have sparse variants too. Empty: no pattern.
std::string SparseSource(const v1::AttendRequest& proto, const uint8_t* data, size_t size) {
  if (!proto.request_id().empty()) return proto.request_id();
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 1099511628211ull;
  if (h % 3 != 0) return "";
  std::string bytes(64, '\0');
  for (char& c : bytes) {  // splitmix64
    h += 0x9e3779b97f4a7c15ull;
    uint64_t z = h;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    c = static_cast<char>(z ^ (z >> 31));
  }
  return bytes;
}

// Owns the bytes a drawn pattern's index tensors view.
struct SparseBytes {
  std::string indptr, indices, full_indptr, full_indices, key_indices;
};

TensorView I32View(std::string& bytes, std::vector<int64_t> shape, const std::vector<int32_t>& v) {
  bytes.assign(v.size() * sizeof(int32_t), '\0');
  if (!v.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
  return TensorView{DType::kI32, std::move(shape), bytes};
}

// One element of `v` replaced by a value near the edges of what is valid.
void Corrupt(FuzzedDataProvider& in, std::vector<int32_t>& v, int32_t limit) {
  if (v.empty()) {
    v.push_back(in.ConsumeIntegralInRange<int32_t>(-2, limit + 1));
    return;
  }
  const size_t at = in.ConsumeIntegralInRange<size_t>(0, v.size() - 1);
  const int32_t choices[] = {-2, -1, 0, limit - 1, limit, limit + 1,
                             v[in.ConsumeIntegralInRange<size_t>(0, v.size() - 1)]};
  v[at] = choices[in.ConsumeIntegralInRange<size_t>(0, std::size(choices) - 1)];
}

// Draws a sparse pattern for `request` from `source` (see SparseSource):
// valid for the request's dims unless the bytes ask for one of the breakages
// (an index out of range or repeated, a wrong shape or dtype, a zero block
// size, full blocks without their indices, a sink that is not finite, ...).
// Sizes stay small whatever the dims claim, so a pattern never costs more
// than a few thousand entries.
void SparseFromBytes(const std::string& source, AttentionRequest& request, SparseBytes& bytes) {
  FuzzedDataProvider in(reinterpret_cast<const uint8_t*>(source.data()), source.size());
  const int64_t qr = request.query.rank(), kr = request.key.rank();
  auto dim = [](const TensorView& t, int64_t at) {
    return at >= 0 && at < t.rank() ? std::clamp<int64_t>(t.shape[at], 0, 1 << 16) : 1;
  };
  const int64_t B = qr == 4 ? dim(request.query, 0) : 1;
  const int64_t Lq = dim(request.query, qr - 3), Hq = dim(request.query, qr - 2);
  const int64_t Lk = dim(request.key, kr - 3), Hkv = dim(request.key, kr - 2);
  const uint8_t kind = in.ConsumeIntegral<uint8_t>();
  const bool broken = in.ConsumeIntegralInRange<int>(0, 7) == 0;
  // What to break, when broken: 0..3 the key pattern, 4 globals, 5 sinks, 6 combinations.
  const int breakage = in.ConsumeIntegralInRange<int>(0, 6);
  constexpr int64_t kMaxEntries = 1 << 12;
  SparsitySpec& sp = request.sparsity;
  const int key_pattern = kind & 3;  // 0 none, 1 block mask, 2 key selection, 3 both
  if (key_pattern == 1 || key_pattern == 3) {
    static const int32_t kSizes[] = {1, 2, 3, 4, 5, 7, 8, 16, 64, 100};
    BlockMaskSpec bm;
    bm.block_rows = kSizes[in.ConsumeIntegralInRange<size_t>(0, std::size(kSizes) - 1)];
    bm.block_cols = kSizes[in.ConsumeIntegralInRange<size_t>(0, std::size(kSizes) - 1)];
    const int64_t rows = (Lq + bm.block_rows - 1) / bm.block_rows;
    const int64_t cols = (Lk + bm.block_cols - 1) / bm.block_cols;
    const uint8_t layout = in.ConsumeIntegral<uint8_t>();
    int64_t Bm = layout & 1 ? B : 1, Hm = layout & 2 ? Hq : 1;
    if (Bm * Hm * (rows + 1) > kMaxEntries) Bm = Hm = 1;
    const bool rank1 = Bm == 1 && Hm == 1 && (layout & 4);
    const bool full = layout & 8;
    std::vector<int32_t> ip{0}, ix, fip{0}, fix;
    for (int64_t slice = 0; slice < Bm * Hm && rows + 1 <= kMaxEntries; ++slice) {
      if (slice > 0) ip.push_back(ip.back()), fip.push_back(fip.back());
      for (int64_t r = 0; r < rows; ++r) {
        for (int32_t c = 0; c < cols && static_cast<int64_t>(ix.size() + fix.size()) < kMaxEntries; ++c) {
          const uint8_t pick = in.ConsumeIntegral<uint8_t>();
          if (pick % 3 == 0) continue;
          (full && pick % 3 == 2 ? fix : ix).push_back(c);
        }
        ip.push_back(static_cast<int32_t>(ix.size()));
        fip.push_back(static_cast<int32_t>(fix.size()));
      }
    }
    std::vector<int64_t> shape =
        rank1 ? std::vector<int64_t>{rows + 1} : std::vector<int64_t>{Bm, Hm, rows + 1};
    std::vector<int64_t> full_shape = shape;
    bool drop_full_indices = false;
    if (broken && breakage <= 3) {
      switch (in.ConsumeIntegralInRange<int>(0, 8)) {
        case 0: Corrupt(in, ip, static_cast<int32_t>(ix.size())); break;
        case 1: Corrupt(in, ix, static_cast<int32_t>(cols)); break;
        case 2: Corrupt(in, fix, static_cast<int32_t>(cols)); break;
        case 3: shape.back() += in.ConsumeBool() ? 1 : -1; break;
        case 4: bm.block_rows = in.ConsumeIntegralInRange<int32_t>(-1, 0); break;
        case 5: bm.block_cols = in.ConsumeIntegralInRange<int32_t>(-1, 0); break;
        case 6: drop_full_indices = true; break;
        case 7:  // a full block that repeats a partial one
          if (!ix.empty()) fix.insert(fix.begin(), ix.front());
          break;
        default: full_shape.push_back(1); break;
      }
    }
    // A shape whose element count differs from the data is refused for its
    // data length; keep the data consistent with the claimed shape when possible.
    auto elements = [](const std::vector<int64_t>& s) {
      int64_t n = 1;
      for (int64_t d : s) n *= std::max<int64_t>(d, 0);
      return n;
    };
    if (elements(shape) <= kMaxEntries) ip.resize(elements(shape), static_cast<int32_t>(ix.size()));
    bm.indptr = I32View(bytes.indptr, shape, ip);
    bm.indices = I32View(bytes.indices, {static_cast<int64_t>(ix.size())}, ix);
    if (full) {
      if (elements(full_shape) <= kMaxEntries) fip.resize(elements(full_shape), static_cast<int32_t>(fix.size()));
      bm.full_indptr = I32View(bytes.full_indptr, full_shape, fip);
      if (!drop_full_indices) {
        bm.full_indices = I32View(bytes.full_indices, {static_cast<int64_t>(fix.size())}, fix);
      }
    }
    if (broken && breakage == 3 && in.ConsumeBool()) bm.indices.dtype = DType::kF32;
    sp.block_mask = std::move(bm);
  }
  if (key_pattern == 2 || (key_pattern == 3 && broken)) {  // both: refused
    KeySelectionSpec ks;
    ks.query_block = in.ConsumeIntegralInRange<int32_t>(1, 8);
    ks.key_block = in.ConsumeIntegralInRange<int32_t>(1, 8);
    const int64_t rows = (Lq + ks.query_block - 1) / ks.query_block;
    const int64_t units = (Lk + ks.key_block - 1) / ks.key_block;
    const uint8_t layout = in.ConsumeIntegral<uint8_t>();
    int64_t Bi = layout & 1 ? 1 : B;
    const int64_t heads[] = {Hq, Hkv, 1};
    int64_t Hi = heads[(layout >> 1) % 3];
    const int64_t k = in.ConsumeIntegralInRange<int64_t>(1, 8);
    if (Bi * Hi * rows * k > kMaxEntries) Bi = Hi = 1;
    std::vector<int64_t> shape = {Bi, Hi, rows, k};
    std::vector<int32_t> v;
    for (int64_t n = 0; n < Bi * Hi * rows && static_cast<int64_t>(v.size()) + k <= kMaxEntries; ++n) {
      for (int64_t c = 0; c < k; ++c) {
        int32_t u = in.ConsumeIntegralInRange<int32_t>(-1, static_cast<int32_t>(std::max<int64_t>(units - 1, 0)));
        if (units == 0 || std::find(v.end() - c, v.end(), u) != v.end()) u = -1;  // -1 pads
        v.push_back(u);
      }
    }
    if (broken && breakage <= 3) {
      switch (in.ConsumeIntegralInRange<int>(0, 5)) {
        case 0: Corrupt(in, v, static_cast<int32_t>(units)); break;
        case 1:  // a duplicate within the first row
          if (k > 1 && v.size() >= 2) v[1] = v[0] = std::max(v[0], 0);
          break;
        case 2: shape[2] += in.ConsumeBool() ? 1 : -1; break;
        case 3: ks.query_block = 0; break;
        case 4: ks.key_block = -1; break;
        default: shape[1] = Hq + 1; break;
      }
    }
    if (CheckedElementCount(shape) >= 0 && CheckedElementCount(shape) <= kMaxEntries) {
      v.resize(CheckedElementCount(shape), -1);
    }
    ks.indices = I32View(bytes.key_indices, shape, v);
    sp.key_indices = std::move(ks);
  }
  if (kind & 4) {
    const int n = in.ConsumeIntegralInRange<int>(1, 6);
    for (int g = 0; g < n && Lk > 0; ++g) {
      const int64_t x = in.ConsumeIntegralInRange<int64_t>(0, Lk - 1);
      if (std::find(sp.global_tokens.begin(), sp.global_tokens.end(), x) == sp.global_tokens.end()) {
        sp.global_tokens.push_back(x);
      }
    }
    if (broken && (breakage == 4 || breakage == 6)) {
      if (in.ConsumeBool() && !sp.global_tokens.empty()) {
        sp.global_tokens.push_back(sp.global_tokens.front());
      } else {
        sp.global_tokens.push_back(in.ConsumeBool() ? Lk : -1);
      }
    }
  }
  if (kind & 8) {
    for (int64_t h = 0; h < Hq && h < kMaxEntries; ++h) {
      sp.sink_logits.push_back(in.ConsumeFloatingPointInRange<float>(-8.f, 8.f));
    }
    if (broken && (breakage == 5 || breakage == 6)) {
      if (in.ConsumeBool()) {
        sp.sink_logits.push_back(0.f);  // one more than Hq
      } else if (!sp.sink_logits.empty()) {
        const float bad[] = {std::numeric_limits<float>::quiet_NaN(), kInf, -kInf};
        sp.sink_logits[0] = bad[in.ConsumeIntegralInRange<int>(0, 2)];
      }
    }
  }
}

// The pattern's counts for the cost model against a brute-force count of
// KeyVisibleToHead: exact visible pairs, and a bound of the computed scores
// between them and the dense count.
void CheckSparseCounts(const AttentionParams& p) {
  if (!p.sparse.any()) return;
  double visible = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.num_heads_q; ++h)
      for (int64_t i = 0; i < p.seqlen_q; ++i)
        for (int64_t j = 0; j < p.seqlen_k; ++j) visible += KeyVisibleToHead(p, b, h, i, j);
  if (CountVisiblePairs(p) != visible) {
    Fail(absl::StrCat("CountVisiblePairs ", CountVisiblePairs(p), ", brute force ", visible));
  }
  const double dense = double(p.batch) * p.num_heads_q * p.seqlen_q * p.seqlen_k;
  const double bound = SparseScoresBound(p, dense);
  if (!(bound >= visible && bound <= dense)) {
    Fail(absl::StrCat("SparseScoresBound ", bound, " outside [", visible, ", ", dense, "]"));
  }
}

// ATTEND_FUZZER_TRACE=1: one input's request as the core sees it, to
// reproduce a failure in a unit test.
std::string I32List(const TensorView& t) {
  std::vector<int32_t> v(t.data.size() / sizeof(int32_t));
  if (!v.empty()) std::memcpy(v.data(), t.data.data(), v.size() * sizeof(int32_t));
  return absl::StrCat(DTypeName(t.dtype), " ", ShapeString(t.shape), " {", absl::StrJoin(v, ", "),
                      "}");
}

void Trace(const AttentionRequest& r) {
  static const bool trace = std::getenv("ATTEND_FUZZER_TRACE") != nullptr;
  if (!trace) return;
  const AttentionOptions& o = r.options;
  std::string line = absl::StrCat(
      "query ", DTypeName(r.query.dtype), " ", ShapeString(r.query.shape), ", key ",
      ShapeString(r.key.shape), ", value ", ShapeString(r.value.shape), ", scale ", o.scale,
      ", causal ", o.causal, o.causal_alignment == CausalAlignment::kTopLeft ? " top-left" : "",
      ", window ", o.window_left, "/", o.window_right, ", softcap ", o.softcap, ", alibi {",
      absl::StrJoin(o.alibi_slopes, ", "), "}, variant ", static_cast<int>(o.variant),
      r.bias ? absl::StrCat(", bias ", ShapeString(r.bias->shape)) : "", ", key_lengths {",
      absl::StrJoin(r.key_lengths, ", "), "}, outputs lse ", r.outputs.lse, " entropy ",
      r.outputs.entropy, " weights ", r.outputs.weights, " top_k ", r.outputs.top_k);
  const SparsitySpec& sp = r.sparsity;
  if (sp.block_mask) {
    const BlockMaskSpec& bm = *sp.block_mask;
    absl::StrAppend(&line, "\n  block_mask ", bm.block_rows, "x", bm.block_cols, " indptr ",
                    I32List(bm.indptr), " indices ", I32List(bm.indices));
    if (bm.full_indptr) absl::StrAppend(&line, " full_indptr ", I32List(*bm.full_indptr));
    if (bm.full_indices) absl::StrAppend(&line, " full_indices ", I32List(*bm.full_indices));
  }
  if (sp.key_indices) {
    absl::StrAppend(&line, "\n  key_indices query_block ", sp.key_indices->query_block,
                    " key_block ", sp.key_indices->key_block, " ", I32List(sp.key_indices->indices));
  }
  if (!sp.global_tokens.empty()) {
    absl::StrAppend(&line, "\n  global_tokens {", absl::StrJoin(sp.global_tokens, ", "), "}");
  }
  if (!sp.sink_logits.empty()) {
    absl::StrAppend(&line, "\n  sink_logits {", absl::StrJoin(sp.sink_logits, ", "), "}");
  }
  std::fprintf(stderr, "attend_fuzzer: %s\n", line.c_str());
}

// The server's parse of received slices (WireAttendRequest) against
// protobuf's: the bytes cut into three chunks, both parses succeed or both
// fail, and with the scanned tensors' bytes put back the messages are equal.
void CheckWireParse(const uint8_t* data, size_t size, bool parsed, const v1::AttendRequest& proto) {
  const char* bytes = reinterpret_cast<const char*>(data);
  const absl::string_view chunks[] = {absl::string_view(bytes, size / 3),
                                      absl::string_view(bytes + size / 3, size / 3),
                                      absl::string_view(bytes + 2 * (size / 3), size - 2 * (size / 3))};
  WireAttendRequest wire;
  const absl::Status s = wire.Parse(chunks);
  if (s.ok() != parsed || (!s.ok() && s.code() != absl::StatusCode::kInvalidArgument)) {
    Fail(absl::StrCat("WireAttendRequest::Parse: ", s.ToString(), ", protobuf: ",
                      parsed ? "parsed" : "refused"));
  }
  if (!parsed) return;
  v1::AttendRequest restored = wire.request();
  const v1::Tensor* scanned[] = {&wire.request().query(), &wire.request().key(),
                                 &wire.request().value(), &wire.request().bias()};
  v1::Tensor* out[] = {restored.mutable_query(), restored.mutable_key(), restored.mutable_value(),
                       restored.mutable_bias()};
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<std::optional<std::string_view>> b = wire.Bytes(*scanned[i], "tensor");
    if (!b.ok()) Fail(absl::StrCat("WireAttendRequest::Bytes: ", b.status().ToString()));
    if (b->has_value()) out[i]->set_data(std::string(**b));
  }
  // mutable_*() above set absent tensors: compare with the same done to the original.
  v1::AttendRequest expected = proto;
  expected.mutable_query();
  expected.mutable_key();
  expected.mutable_value();
  expected.mutable_bias();
  // Compared as bytes: a NaN (alibi_slopes) never equals itself field by field.
  if (restored.SerializeAsString() != expected.SerializeAsString()) {
    Fail("WireAttendRequest: the message differs from protobuf's parse");
  }
}

int FuzzAttend(const uint8_t* data, size_t size) {
  v1::AttendRequest proto;
  // gRPC refuses bytes that are not a message before the service sees them.
  const bool parsed = proto.ParseFromArray(data, static_cast<int>(size));
  CheckWireParse(data, size, parsed, proto);
  if (!parsed) return -1;
  if (proto.priority() == 1) {
    for (v1::Tensor* t : {proto.mutable_query(), proto.mutable_key(), proto.mutable_value()}) {
      FoldValues(*t, 4, /*keep_neg_inf=*/false);
    }
    if (proto.has_bias()) FoldValues(*proto.mutable_bias(), 64, /*keep_neg_inf=*/true);
  }

  absl::StatusOr<AttentionRequest> request = RequestFromProto(proto);
  if (!request.ok()) {
    ExpectCode(request.status(), {absl::StatusCode::kInvalidArgument}, "RequestFromProto");
    return 0;
  }
  SparseBytes sparse_bytes;
  if (request->sparsity.empty()) {
    const std::string source = SparseSource(proto, data, size);
    if (!source.empty()) SparseFromBytes(source, *request, sparse_bytes);
  }
  Trace(*request);
  const RequestLimits limits = FuzzLimits();
  absl::StatusOr<std::unique_ptr<AttentionJob>> ref = PrepareAttention(*request, limits);
  if (!ref.ok()) {
    if (std::getenv("ATTEND_FUZZER_TRACE") != nullptr) {
      std::fprintf(stderr, "attend_fuzzer: PrepareAttention: %s\n", ref.status().ToString().c_str());
    }
    ExpectCode(ref.status(),
               {absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted},
               "PrepareAttention");
    return 0;
  }
  CheckShapes(**ref, *request);
  if (Work(ShapeOf((*ref)->params), request->outputs.top_k) > kMaxWork) return 0;
  CheckSparseCounts((*ref)->params);

  // A second job from the same request: each backend writes its own outputs.
  absl::StatusOr<std::unique_ptr<AttentionJob>> cpu = PrepareAttention(*request, limits);
  if (!cpu.ok()) Fail(absl::StrCat("PrepareAttention failed the second time: ", cpu.status().ToString()));

  RunOn(ReferenceBackend(), **ref);
  const bool cpu_ran = RunOn(CpuBackend(), **cpu);

  const Bounds bounds = BoundsOf(**ref, *request);
  if (!bounds.bounded) return 0;
  CheckBoundedOutputs(**ref, bounds, "reference");
  if (!cpu_ran) return 0;
  CheckBoundedOutputs(**cpu, bounds, "cpu");
  if (bounds.tame) CheckAgreement(**cpu, **ref, bounds);
  return 0;
}

}  // namespace
}  // namespace attnserve

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field with invalid UTF-8; parsing still fails
  // cleanly, so the log is only noise (and most of the time spent).
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return attnserve::FuzzAttend(data, size);
}
