// SharedMemoryRegistry: the POSIX shared-memory regions callers registered
// (RegisterSharedMemory), each mapped read-write into this process and keyed
// by (caller identity, name), so that co-located callers can pass tensors by
// reference instead of in the message. SharedMemoryRegion is one mapping,
// shared_ptr-counted: a request that resolved a tensor in a region keeps it
// mapped after the caller unregisters it; the last holder unmaps it.
//
// The caller owns the object and may shrink it (ftruncate) while a request
// reads or writes it. Reading a truncated mapping raises SIGBUS; a
// process-wide handler (installed by the first registry) catches faults inside
// registered mappings, puts anonymous zero pages over the whole mapping and
// marks the region broken, so the computation finishes on zeros and the
// request is then refused (CheckIntact) rather than answered wrong or crashing
// the server. Faults elsewhere go to the handler that was installed before.
//
// Thread-safe.
#ifndef ATTNSERVE_CORE_SHARED_MEMORY_H_
#define ATTNSERVE_CORE_SHARED_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

// What a caller asks to map: the part [offset, offset + byte_size) of the
// object shm_open(key) opens, under `name`.
struct SharedMemoryRegionSpec {
  std::string name;  // 1-128 of [A-Za-z0-9_.-]
  std::string key;   // "/" then 1-254 of [A-Za-z0-9_.-], not "/." or "/.."
  int64_t offset = 0;     // >= 0
  int64_t byte_size = 0;  // > 0
};

// Mappings the server holds at once, over all callers: the fault handler's
// table is fixed-size (no allocation in a signal handler).
inline constexpr int kMaxSharedMemoryMappings = 1024;

class SharedMemoryRegion {
 public:
  ~SharedMemoryRegion();  // unmaps and closes the object
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const SharedMemoryRegionSpec& spec() const { return spec_; }
  const std::string& name() const { return spec_.name; }
  int64_t byte_size() const { return spec_.byte_size; }
  // The region's first byte (byte_size bytes, read-write). Its address is
  // aligned as spec().offset is: a page boundary of the object plus
  // offset % page size.
  char* data() const { return data_; }

  // OK while the object still holds the whole region and no access faulted.
  // FAILED_PRECONDITION naming the region when it was truncated (fstat shows
  // it smaller than offset + byte_size) or an access past the object's end
  // faulted since it was mapped (the mapping then reads as zeros).
  // Non-blocking (one fstat).
  absl::Status CheckIntact() const;
  bool broken() const { return broken_.load(std::memory_order_acquire); }

 private:
  friend class SharedMemoryRegistry;
  struct Counters;
  SharedMemoryRegion() = default;

  SharedMemoryRegionSpec spec_;
  int fd_ = -1;
  void* map_base_ = nullptr;  // page-aligned start of the mapping
  size_t map_bytes_ = 0;      // the mapping's length, a whole number of pages
  char* data_ = nullptr;      // map_base_ + offset % page size
  int slot_ = -1;             // the fault handler's table slot
  std::atomic<bool> broken_{false};  // set by the fault handler
  std::shared_ptr<Counters> counters_;
};

struct SharedMemoryOptions {
  int32_t max_regions_per_caller = 64;  // --max_shm_regions; > 0
  // Runs after each change of the registered regions or the mapped bytes
  // (regions still used by requests after Unregister count until unmapped),
  // for the metrics. May be null; must not call back into the registry.
  std::function<void(int64_t regions, int64_t mapped_bytes)> on_change = nullptr;
};

class SharedMemoryRegistry {
 public:
  // Installs the SIGBUS handler (once per process).
  explicit SharedMemoryRegistry(SharedMemoryOptions options);
  ~SharedMemoryRegistry();
  SharedMemoryRegistry(const SharedMemoryRegistry&) = delete;
  SharedMemoryRegistry& operator=(const SharedMemoryRegistry&) = delete;

  // Opens and maps `spec` for `caller`. INVALID_ARGUMENT naming the field for
  // a bad name, key, offset or size; ALREADY_EXISTS for a name the caller
  // uses; RESOURCE_EXHAUSTED past max_regions_per_caller (or the server's
  // kMaxSharedMemoryMappings); FAILED_PRECONDITION when the object cannot be
  // opened or mapped (with the errno text) or is smaller than
  // offset + byte_size. Blocks on the open and mmap system calls only.
  absl::Status Register(const std::string& caller, const SharedMemoryRegionSpec& spec);

  // Forgets the caller's region `name`, or all of them for "" (OK when it has
  // none). The mapping goes when the last request using it drops it.
  // NOT_FOUND for a name the caller has not registered.
  absl::Status Unregister(const std::string& caller, const std::string& name);

  // The caller's region `name`, shared with the registry; NOT_FOUND when the
  // caller has none of that name (another caller's regions are not seen).
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> Find(const std::string& caller,
                                                            const std::string& name) const;

  // The caller's regions, by name.
  std::vector<SharedMemoryRegionSpec> List(const std::string& caller) const;

  int64_t regions() const;       // registered, over all callers
  int64_t mapped_bytes() const;  // mapped now, including unregistered ones still in use
  const SharedMemoryOptions& options() const { return options_; }

 private:
  using Key = std::pair<std::string, std::string>;  // (caller, name)

  // Opens and maps; no table change.
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> Map(const SharedMemoryRegionSpec& spec);
  void Report() const;

  // Constant after construction.
  const SharedMemoryOptions options_;
  const std::shared_ptr<SharedMemoryRegion::Counters> counters_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<Key, std::shared_ptr<SharedMemoryRegion>> regions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int32_t> per_caller_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_SHARED_MEMORY_H_
