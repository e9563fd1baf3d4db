// flash_kernel_bench: times the cuda backend's flash-attention kernel alone,
// on inputs already in device memory, for the benchmark shapes of docs/ARCHITECTURE.md.
// attn_bench --backend=cuda times Backend::Run, which also moves the inputs
// and outputs across PCIe; this isolates the kernel so it can be compared
// with PyTorch SDPA on device tensors (bench/sdpa_compare.py --modes=device).
//
//   flash_kernel_bench --shape=P2 --dtype=bf16 [--min_time=1]
// prints one JSON line: shape, backend ("cuda_kernel"), dtype, ms, gflops,
// gbps (Q, K, V and the output once), device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "backends/cuda/flash_kernel.h"
#include "core/half.h"

ABSL_FLAG(std::string, shape, "P2", "P1, P2, P3, P4 or S1");
ABSL_FLAG(std::string, dtype, "bf16", "bf16 or f16");
ABSL_FLAG(double, min_time, 1.0, "seconds to time");

namespace attnserve::cuda {
namespace {

struct Shape {
  const char* id;
  int b, hq, hkv, lq, lk, d;
  bool causal;
};

constexpr Shape kShapes[] = {
    {"P1", 4, 12, 12, 512, 512, 64, false},   {"P2", 1, 32, 8, 2048, 2048, 128, true},
    {"P3", 1, 8, 8, 8192, 8192, 64, true},    {"P4", 16, 32, 8, 1, 4096, 128, false},
    {"S1", 1, 8, 8, 128, 128, 64, false},
};

#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    const cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(err_));                     \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

int Main() {
  const std::string id = absl::GetFlag(FLAGS_shape);
  const Shape* shape = nullptr;
  for (const Shape& s : kShapes) {
    if (id == s.id) shape = &s;
  }
  if (shape == nullptr) {
    std::fprintf(stderr, "--shape: expected P1, P2, P3, P4 or S1, got %s\n", id.c_str());
    return 2;
  }
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  if (dtype_name != "bf16" && dtype_name != "f16") {
    std::fprintf(stderr, "--dtype: expected bf16 or f16, got %s\n", dtype_name.c_str());
    return 2;
  }
  const DType dtype = dtype_name == "bf16" ? DType::kBF16 : DType::kF16;
  const Shape& s = *shape;

  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  CHECK_CUDA(static_cast<cudaError_t>(PrepareFlashKernels()));

  // Random inputs in [-1, 1], made on the host once.
  const int64_t nq = int64_t{s.b} * s.lq * s.hq * s.d;
  const int64_t nkv = int64_t{s.b} * s.lk * s.hkv * s.d;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  auto random16 = [&](int64_t n) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = dtype == DType::kBF16 ? FloatToBf16(dist(rng)) : FloatToHalf(dist(rng));
    return v;
  };
  const std::vector<uint16_t> hq = random16(nq), hk = random16(nkv), hv = random16(nkv);
  void *q, *k, *v, *o;
  CHECK_CUDA(cudaMalloc(&q, nq * 2));
  CHECK_CUDA(cudaMalloc(&k, nkv * 2));
  CHECK_CUDA(cudaMalloc(&v, nkv * 2));
  CHECK_CUDA(cudaMalloc(&o, nq * 2));
  CHECK_CUDA(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(k, hk.data(), nkv * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(v, hv.data(), nkv * 2, cudaMemcpyHostToDevice));

  DeviceJob job;
  job.q = q;
  job.k = k;
  job.v = v;
  job.o = o;
  job.q_head_stride = job.k_head_stride = job.v_head_stride = job.o_head_stride = s.d;
  job.q_row_stride = job.o_row_stride = int64_t{s.hq} * s.d;
  job.k_row_stride = job.v_row_stride = int64_t{s.hkv} * s.d;
  job.q_batch_stride = job.o_batch_stride = job.q_row_stride * s.lq;
  job.k_batch_stride = job.v_batch_stride = job.k_row_stride * s.lk;
  job.seqlen_q = s.lq;
  job.seqlen_k = s.lk;
  job.num_heads_q = s.hq;
  job.group_size = s.hq / s.hkv;
  job.head_dim = job.value_dim = s.d;
  job.window_right = s.causal ? 0 : -1;
  job.scale = static_cast<float>(1.0 / std::sqrt(double(s.d)));
  job.scale_log2 = static_cast<float>(job.scale * 1.4426950408889634);
  job.out_dtype = dtype;

  // The backend's work order: last query tiles first.
  std::vector<WorkItem> items;
  const int q_tiles = (s.lq + kQueryTile - 1) / kQueryTile;
  for (int t = q_tiles - 1; t >= 0; --t) {
    for (int b = 0; b < s.b; ++b) {
      for (int h = 0; h < s.hq; ++h) items.push_back(WorkItem{0, b, h, t});
    }
  }
  DeviceJob* d_job;
  WorkItem* d_items;
  CHECK_CUDA(cudaMalloc(&d_job, sizeof(DeviceJob)));
  CHECK_CUDA(cudaMalloc(&d_items, items.size() * sizeof(WorkItem)));
  CHECK_CUDA(cudaMemcpy(d_job, &job, sizeof(DeviceJob), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_items, items.data(), items.size() * sizeof(WorkItem),
                        cudaMemcpyHostToDevice));

  const int kernel_dim = KernelHeadDim(s.d, s.d);
  const int64_t n = static_cast<int64_t>(items.size());
  auto launch = [&] {
    return static_cast<cudaError_t>(LaunchFlashForward(dtype, kernel_dim, d_job, d_items, n,
                                                       nullptr));
  };
  for (int i = 0; i < 5; ++i) CHECK_CUDA(launch());
  CHECK_CUDA(cudaDeviceSynchronize());

  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  int iters = 10;
  float ms = 0;
  for (;;) {
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < iters; ++i) CHECK_CUDA(launch());
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (ms / 1e3 >= absl::GetFlag(FLAGS_min_time) || iters >= (1 << 20)) break;
    iters *= 2;
  }
  const double seconds = ms / 1e3 / iters;
  double flops = 4.0 * s.b * s.hq * double(s.lq) * s.lk * s.d;
  if (s.causal && s.lq == s.lk) flops /= 2;
  const double bytes = double(2 * nq + 2 * nkv) * 2;
  std::printf(
      "{\"shape\":\"%s\",\"backend\":\"cuda_kernel\",\"dtype\":\"%s\",\"B\":%d,\"Hq\":%d,"
      "\"Hkv\":%d,\"Lq\":%d,\"Lk\":%d,\"D\":%d,\"causal\":%s,\"iters\":%d,\"ms\":%.4f,"
      "\"gflops\":%.2f,\"gbps\":%.3f,\"device\":\"%s\"}\n",
      s.id, dtype_name.c_str(), s.b, s.hq, s.hkv, s.lq, s.lk, s.d, s.causal ? "true" : "false",
      iters, seconds * 1e3, flops / seconds / 1e9, bytes / seconds / 1e9, prop.name);
  return 0;
}

}  // namespace
}  // namespace attnserve::cuda

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return attnserve::cuda::Main();
}
