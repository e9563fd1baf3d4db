// Backend: a small table of operations that runs batches of attention jobs on
// one kind of hardware (ggml-backend style). A backend first says whether it can
// run a request (Supports), then runs whole batches (Run). Backends are created
// through the BackendRegistry (registry.h).
//
// Thread safety: every method may be called concurrently from several threads.
#ifndef ATTNSERVE_BACKENDS_BACKEND_H_
#define ATTNSERVE_BACKENDS_BACKEND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "attention/params.h"

namespace attnserve {

// What a backend can do, for GetServerInfo and clients choosing a backend.
struct BackendInfo {
  std::string name;         // "reference", "cpu", "onednn", "cuda"
  std::string description;  // one line for humans
  std::vector<DType> dtypes;
  std::vector<std::string> features;  // "causal", "window", "softcap", "alibi", "bias",
                                      // "key_lengths", "gqa", "linear", "lse", "weights", "top_k"
  int32_t max_head_dim = 0;
  // False when F32 requests are computed from 16-bit copies of the inputs
  // (e.g. on tensor cores): results then agree with the reference to 16-bit
  // tolerances, not F32 ones.
  bool f32_inputs_exact = true;
};

struct BackendOptions {
  int threads = 0;  // worker threads a backend may use; 0 = one per hardware core
  // Device memory a GPU backend may hold (its pool's limit, --gpu_memory_bytes);
  // 0 = 90% of the device memory free when the backend starts.
  int64_t gpu_memory_bytes = 0;
};

// Device memory of a GPU backend, for attnserve_device_memory_bytes{state}.
struct DeviceMemory {
  int64_t used_bytes = 0;      // held from the device now (in use + cached)
  int64_t capacity_bytes = 0;  // the most it may hold
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const BackendInfo& info() const = 0;

  // OK if Run() can compute `params`; otherwise UNIMPLEMENTED with a message
  // naming the option the backend lacks. Cheap; never blocks.
  virtual absl::Status Supports(const AttentionParams& params) const = 0;

  // Computes every job in `batch` (each already passed Supports), writing the
  // outputs the params point to. Blocks until all are done. Each job's result
  // is bitwise the same whatever else is in the batch. A job whose
  // params.cancel asks to stop is cut short between two work items (its
  // outputs are then unspecified; the token's stopped() tells); the others
  // are unaffected. Returns INTERNAL only on a backend failure (e.g. a device
  // error); then outputs are unspecified. May throw std::bad_alloc when host
  // memory runs out (the caller answers the batch RESOURCE_EXHAUSTED).
  virtual absl::Status Run(absl::Span<const AttentionParams> batch) = 0;

  // The most host memory Run() may allocate for `params` besides its outputs
  // (workspaces, partial results), in bytes, so admission can reserve it from
  // the memory budget. Depends on the request's shape only. Cheap.
  virtual int64_t ScratchBytes(const AttentionParams& /*params*/) const { return 0; }

  // Bytes of scratch memory the backend holds now (for metrics).
  virtual int64_t workspace_bytes() const { return 0; }

  // Device memory held and allowed; zeros for a backend without a device.
  virtual DeviceMemory device_memory() const { return {}; }
};

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_BACKEND_H_
