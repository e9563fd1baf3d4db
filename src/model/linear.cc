#include "model/linear.h"

#include <algorithm>
#include <list>
#include <new>
#include <optional>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/half.h"
#include "dnnl.hpp"

namespace attnserve {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

// Matmul primitives kept per Linear, one per row count seen (each is made in
// about 0.1 ms; decode steps repeat a few row counts, prefills vary).
constexpr size_t kPrimitivesPerLinear = 32;
// Rows whose packed-weight format decides the layout the weights are kept in;
// the format oneDNN picks does not depend on the row count (checked at Run:
// a primitive that refuses it falls back to its own format, see below).
constexpr int64_t kLayoutRows = 64;
constexpr int64_t kMaxFeatures = int64_t{1} << 20;

const dnnl::engine& CpuEngine() {
  static const dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

Dt DnnlType(DType t) { return t == DType::kBF16 ? Dt::bf16 : Dt::f32; }

}  // namespace

bool CpuHasBf16Matmul() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

struct Linear::Impl {
  memory::desc weights_md;  // the packed layout weight_ holds
  memory weights;           // over weight_'s bytes
  memory bias;              // [1, out] F32, when there is a bias

  // One matmul per row count; most recent first.
  struct Entry {
    int64_t rows;
    dnnl::matmul primitive;
    // Set when the primitive wants the weights in another layout than
    // weights_md (a fallback never seen on the CPUs tested): they are
    // reordered into it on every call.
    std::optional<memory::desc> own_weights_md;
  };
  mutable absl::Mutex mu;
  mutable std::list<Entry> primitives ABSL_GUARDED_BY(mu);

  static memory::desc SrcDesc(int64_t rows, int64_t in, DType dtype) {
    return memory::desc({rows, in}, DnnlType(dtype), Tag::ab);
  }
  static memory::desc DstDesc(int64_t rows, int64_t out) {
    return memory::desc({rows, out}, Dt::f32, Tag::ab);
  }
  static memory::desc BiasDesc(int64_t out) { return memory::desc({1, out}, Dt::f32, Tag::ab); }

  Entry Make(int64_t rows, int64_t in, DType dtype, int64_t out, bool has_bias) const {
    const memory::desc src = SrcDesc(rows, in, dtype), dst = DstDesc(rows, out);
    const memory::desc bias_md = has_bias ? BiasDesc(out) : memory::desc();
    try {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, weights_md, bias_md, dst),
                                      CpuEngine());
      return Entry{rows, dnnl::matmul(pd), std::nullopt};
    } catch (const dnnl::error&) {
      const memory::desc any({in, out}, DnnlType(dtype), Tag::any);
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, any, bias_md, dst), CpuEngine());
      return Entry{rows, dnnl::matmul(pd), pd.weights_desc()};
    }
  }
};

Linear::Linear(int64_t out, int64_t in, DType dtype)
    : out_(out), in_(in), dtype_(dtype), impl_(std::make_unique<Impl>()) {}

Linear::~Linear() = default;

absl::StatusOr<std::unique_ptr<Linear>> Linear::Create(DType source, const void* weight,
                                                       const void* bias, int64_t out_features,
                                                       int64_t in_features, DType compute) {
  if (source != DType::kF32 && source != DType::kF16 && source != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("linear: weight dtype F32, F16 or BF16 expected, got ", DTypeName(source)));
  }
  if (compute != DType::kF32 && compute != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("linear: compute dtype F32 or BF16 expected, got ", DTypeName(compute)));
  }
  if (out_features <= 0 || in_features <= 0 || out_features > kMaxFeatures ||
      in_features > kMaxFeatures) {
    return absl::InvalidArgumentError(absl::StrCat("linear: features in [1, ", kMaxFeatures,
                                                   "] expected, got ", out_features, " x ",
                                                   in_features));
  }
  try {
    std::unique_ptr<Linear> linear(new Linear(out_features, in_features, compute));
    Impl& impl = *linear->impl_;
    const int64_t count = out_features * in_features;
    // W [out, in] row-major is the matmul's [in, out] weights with strides {1, in}.
    std::string plain(static_cast<size_t>(count) * DTypeSize(compute), '\0');
    ConvertFloats(weight, source, plain.data(), compute, count);
    const memory::desc plain_md({in_features, out_features}, DnnlType(compute),
                                memory::dims{1, in_features});
    const memory::desc any({in_features, out_features}, DnnlType(compute), Tag::any);
    dnnl::matmul::primitive_desc pd(
        dnnl::matmul::desc(Impl::SrcDesc(kLayoutRows, in_features, compute), any,
                           Impl::DstDesc(kLayoutRows, out_features)),
        CpuEngine());
    impl.weights_md = pd.weights_desc();
    if (impl.weights_md == plain_md) {
      linear->weight_ = std::move(plain);
    } else {
      linear->weight_.assign(impl.weights_md.get_size(), '\0');
      memory from(plain_md, CpuEngine(), plain.data());
      memory to(impl.weights_md, CpuEngine(), linear->weight_.data());
      dnnl::stream stream(CpuEngine());
      dnnl::reorder(from, to).execute(stream, from, to);
      stream.wait();
    }
    impl.weights = memory(impl.weights_md, CpuEngine(), linear->weight_.data());
    if (bias != nullptr) {
      linear->bias_.resize(static_cast<size_t>(out_features));
      ConvertFloats(bias, source, linear->bias_.data(), DType::kF32, out_features);
      impl.bias = memory(Impl::BiasDesc(out_features), CpuEngine(), linear->bias_.data());
    }
    return linear;
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "linear: out of memory for a ", out_features, " x ", in_features, " weight"));
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("linear: oneDNN: ", e.what()));
  }
}

int64_t Linear::bytes() const {
  return static_cast<int64_t>(weight_.size() + bias_.size() * sizeof(float));
}

int64_t Linear::ScratchBytes(int64_t rows) const {
  return dtype_ == DType::kBF16 ? rows * in_ * 2 : 0;
}

absl::Status Linear::Run(const float* x, int64_t rows, float* y) const {
  if (rows <= 0) return absl::OkStatus();
  try {
    Impl& impl = *impl_;
    Impl::Entry* entry = nullptr;
    {
      absl::MutexLock lock(&impl.mu);
      auto it = std::find_if(impl.primitives.begin(), impl.primitives.end(),
                             [rows](const Impl::Entry& e) { return e.rows == rows; });
      if (it != impl.primitives.end()) {
        impl.primitives.splice(impl.primitives.begin(), impl.primitives, it);
      } else {
        impl.primitives.push_front(impl.Make(rows, in_, dtype_, out_, has_bias()));
        if (impl.primitives.size() > kPrimitivesPerLinear) impl.primitives.pop_back();
      }
      entry = &impl.primitives.front();
    }
    // The entry is copied out: another thread may evict it once the lock is
    // released (primitives are reference-counted handles).
    const dnnl::matmul primitive = entry->primitive;
    const std::optional<memory::desc> own_weights_md = entry->own_weights_md;

    dnnl::stream stream(CpuEngine());
    std::string src_bf16;
    memory src;
    memory src_f32(memory::desc({rows, in_}, Dt::f32, Tag::ab), CpuEngine(),
                         const_cast<float*>(x));
    if (dtype_ == DType::kBF16) {
      src_bf16.resize(static_cast<size_t>(rows * in_) * 2);
      src = memory(Impl::SrcDesc(rows, in_, dtype_), CpuEngine(), src_bf16.data());
      dnnl::reorder(src_f32, src).execute(stream, src_f32, src);
    } else {
      src = src_f32;
    }
    memory weights = impl.weights;
    std::string own_weights;
    if (own_weights_md.has_value()) {
      own_weights.assign(own_weights_md->get_size(), '\0');
      weights = memory(*own_weights_md, CpuEngine(), own_weights.data());
      dnnl::reorder(impl.weights, weights).execute(stream, impl.weights, weights);
    }
    memory dst(Impl::DstDesc(rows, out_), CpuEngine(), y);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}};
    if (has_bias()) args.emplace(DNNL_ARG_BIAS, impl.bias);
    primitive.execute(stream, args);
    stream.wait();
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("linear: oneDNN: ", e.what()));
  }
}

}  // namespace attnserve
