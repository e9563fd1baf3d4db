// Fuzz target for the request path, as the server runs it minus gRPC: input
// bytes are parsed as an attnserve.v1.AttendRequest, converted
// (RequestFromProto), validated (PrepareAttention) and, when small enough to
// take well under a millisecond, computed by the reference and the cpu backend.
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
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "attention/job.h"
#include "attention/params.h"
#include "attention/request.h"
#include "attnserve/v1/attention.pb.h"
#include "backends/backend.h"
#include "backends/cpu/cpu_backend.h"
#include "backends/reference_backend.h"
#include "core/half.h"
#include "server/convert.h"

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

// Keys query row (b, h, i) attends: visible and not biased to -inf.
std::vector<char> Attended(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  std::vector<char> attended(p.seqlen_k, 0);
  const KeyRange r = VisibleKeyRange(p, b, i);
  for (int64_t j = r.begin; j < r.end; ++j) {
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
        if (p.lse != nullptr) {
          const float lse = p.lse[row];
          if (masked ? lse != -kInf : !std::isfinite(lse)) {
            Fail(absl::StrCat(where(), "lse ", lse, " for a row with ", n_attended, " attended keys"));
          }
        }
        if (p.entropy != nullptr) {
          // 0 <= H <= ln(attended keys); 0 for a fully masked row.
          const float h_nats = p.entropy[row];
          const double most = masked ? 0.0 : std::log(static_cast<double>(n_attended)) + 1e-3 + slack;
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
          if (std::abs(sum - (masked ? 0 : 1)) > slack) {
            Fail(absl::StrCat(where(), "weights sum to ", sum));
          }
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

int FuzzAttend(const uint8_t* data, size_t size) {
  v1::AttendRequest proto;
  // gRPC refuses bytes that are not a message before the service sees them.
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return -1;
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
  const RequestLimits limits = FuzzLimits();
  absl::StatusOr<std::unique_ptr<AttentionJob>> ref = PrepareAttention(*request, limits);
  if (!ref.ok()) {
    ExpectCode(ref.status(),
               {absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted},
               "PrepareAttention");
    return 0;
  }
  CheckShapes(**ref, *request);
  if (Work(ShapeOf((*ref)->params), request->outputs.top_k) > kMaxWork) return 0;

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
