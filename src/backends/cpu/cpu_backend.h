// The `cpu` backend: attnserve's own tiled (flash-style) attention kernel on a
// persistent thread pool. Softmax requests with output and lse run the
// vectorised kernel (AVX-512 or AVX2+FMA, chosen from CPUID); the weights and
// top_k outputs and the LINEAR variant take a simple scalar path.
//
// Work items are (request, batch row, KV head, query-head group, query tile);
// decode-like requests (one query tile per head group, long key range) also
// split the keys into fixed chunks whose partial results are merged in chunk
// order. How a request is split depends only on its own shape, so its result
// is bitwise the same alone or in any batch, with any number of threads.
//
// Thread safety: every method may be called concurrently; Run calls are
// serialised.
#ifndef ATTNSERVE_BACKENDS_CPU_CPU_BACKEND_H_
#define ATTNSERVE_BACKENDS_CPU_CPU_BACKEND_H_

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "backends/backend.h"

namespace attnserve {

// Creates the backend with `options.threads` threads (0: one per hardware
// thread). Threads start here and live as long as the backend.
absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options);

// As CreateCpuBackend, with the kernel variant forced: "avx512", "avx2" or
// "scalar" (for tests and benchmarks). FAILED_PRECONDITION when this CPU
// cannot run it, INVALID_ARGUMENT for another name.
absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackendWithIsa(const BackendOptions& options,
                                                                 std::string_view isa);

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_CPU_CPU_BACKEND_H_
