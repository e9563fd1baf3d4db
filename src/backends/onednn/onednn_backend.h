// The `onednn` backend: attention composed from oneDNN 2.6 primitives. Per
// (request, batch row, kv head, query-row chunk) it runs a matmul Q·Kᵀ (scale as
// output scales, softcap as eltwise post-ops, masks/ALiBi/bias as one additive
// binary post-op tile), a softmax primitive along the key axis and a matmul P·V.
// LINEAR runs the same two matmuls on φ(Q), φ(K) with a row normalisation between.
//
// Every primitive runs single-threaded on one OpenMP worker and its shapes depend
// only on the request, so results are bitwise independent of the batch and of
// the thread count. F16/BF16 inputs are converted to F32 in a workspace.
// Thread-safe: Run() may be called concurrently.
#ifndef ATTNSERVE_BACKENDS_ONEDNN_ONEDNN_BACKEND_H_
#define ATTNSERVE_BACKENDS_ONEDNN_ONEDNN_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "backends/backend.h"

namespace attnserve {

// Creates the backend on oneDNN's CPU engine with `options.threads` OpenMP
// workers (0 = one per hardware core). INTERNAL if oneDNN cannot create an engine.
absl::StatusOr<std::unique_ptr<Backend>> CreateOnednnBackend(const BackendOptions& options);

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_ONEDNN_ONEDNN_BACKEND_H_
