// MemoryBudget: one bound on the host memory that requests hold outside the
// KV cache (--memory_limit_bytes). Every request reserves what it will hold —
// its input message, its outputs and optional outputs, the backend scratch it
// needs and its response while that waits to be written — before it is
// queued, and releases it when the response is sent or dropped. A request
// that does not fit is refused (RESOURCE_EXHAUSTED) at once, so the process's
// memory stays bounded whatever the callers send.
//
// Thread-safe.
#ifndef ATTNSERVE_CORE_MEMORY_BUDGET_H_
#define ATTNSERVE_CORE_MEMORY_BUDGET_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class MemoryBudget {
 public:
  // Bytes held for one request; returned to the budget when destroyed (or
  // Release()d). Move-only. Must not outlive the budget.
  class Reservation {
   public:
    Reservation() = default;
    Reservation(Reservation&& other) noexcept { *this = std::move(other); }
    Reservation& operator=(Reservation&& other) noexcept;
    ~Reservation() { Release(); }

    int64_t bytes() const { return bytes_; }
    void Release();

   private:
    friend class MemoryBudget;
    Reservation(MemoryBudget* budget, int64_t bytes) : budget_(budget), bytes_(bytes) {}
    MemoryBudget* budget_ = nullptr;
    int64_t bytes_ = 0;
  };

  // `limit_bytes` > 0. `on_change(reserved_bytes)` runs after every change,
  // under the budget's lock (so values arrive in order); it must not call
  // back into the budget. May be null. `origin` says in refusal messages
  // where the limit comes from; empty: "--memory_limit_bytes=<limit>".
  explicit MemoryBudget(int64_t limit_bytes, std::function<void(int64_t)> on_change = nullptr,
                        std::string origin = "");

  // Reserves `bytes` (>= 0) or answers RESOURCE_EXHAUSTED naming the budget,
  // what is reserved and `what` needs them ("the request: 1.2 GiB ..."). Never blocks.
  absl::StatusOr<Reservation> Reserve(int64_t bytes, absl::string_view what);

  int64_t limit_bytes() const { return limit_bytes_; }
  int64_t reserved_bytes() const;

 private:
  void Return(int64_t bytes);

  const int64_t limit_bytes_;
  const std::function<void(int64_t)> on_change_;
  const std::string origin_;
  mutable absl::Mutex mu_;
  int64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;
};

// "1.5 GiB", "300 MiB", "12 KiB", "17 B": for log lines and error messages.
std::string HumanBytes(int64_t bytes);

// The memory this process may use: the cgroup's limit (v2 memory.max, else
// v1 memory.limit_in_bytes) when one is set, else physical memory. `source`
// says which ("cgroup v2 memory.max", ...).
struct SystemMemory {
  int64_t bytes = 0;
  std::string source;
};
SystemMemory DetectSystemMemory();

// The default --memory_limit_bytes: kDefaultBudgetFraction of `system`,
// minus `kv_cache_bytes`, minus `model_bytes` (the weights of --model), minus
// kProcessBaselineBytes for the process itself (code, gRPC, threads, metrics). FAILED_PRECONDITION, saying why, when less
// than kMinBudgetBytes would be left. `derivation` gets a line for the log.
inline constexpr double kDefaultBudgetFraction = 0.85;
inline constexpr int64_t kProcessBaselineBytes = int64_t{256} << 20;
inline constexpr int64_t kMinBudgetBytes = int64_t{64} << 20;
absl::StatusOr<int64_t> DefaultMemoryLimit(const SystemMemory& system, int64_t kv_cache_bytes,
                                           std::string* derivation,
                                           int64_t model_bytes = 0);

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_MEMORY_BUDGET_H_
