// SharedMemoryRegion: a POSIX shared-memory object (shm_open; on Linux a file
// of /dev/shm) mapped into this process, so that an attnserve server on the
// same host reads request tensors from it and writes outputs into it instead
// of both travelling in gRPC messages (AttnClient::RegisterSharedMemory,
// CallOptions::shm). ShmRef names a place in a region the server knows.
//
// The mapping is fixed for the object's life; moving it keeps the mapping.
// Reads and writes of the bytes are the caller's to order: the server reads
// the inputs while a call runs and writes its output before answering.
#ifndef ATTNSERVE_CLIENT_SHARED_MEMORY_H_
#define ATTNSERVE_CLIENT_SHARED_MEMORY_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/tensor.h"

namespace attnserve::client {

// A place in a shared-memory region registered with the server
// (SharedMemoryRef on the wire): `offset` bytes from the start of the
// region the caller registered as `region`.
struct ShmRef {
  std::string region;
  int64_t offset = 0;
};

class SharedMemoryRegion {
 public:
  // Creates the object `key` ("/" then 1-254 of [A-Za-z0-9_.-]) of
  // `byte_size` (> 0) zero bytes, readable and writable by `mode` (0600 when
  // the server runs as the same user; 0660 and a shared group otherwise),
  // and maps it. The region owns the object: destroying it unlinks the
  // name. ALREADY_EXISTS when an object of that name exists (it is left
  // alone); INVALID_ARGUMENT for a bad key or size; PERMISSION_DENIED,
  // RESOURCE_EXHAUSTED (no room in /dev/shm) or INTERNAL from the system
  // calls, naming the key.
  static absl::StatusOr<SharedMemoryRegion> Create(std::string key, int64_t byte_size,
                                                   mode_t mode = 0600);
  // Maps all of an existing object, read-write, without owning it (it is
  // not unlinked). NOT_FOUND when there is none; otherwise as Create.
  static absl::StatusOr<SharedMemoryRegion> Open(std::string key);

  // A key no other live process uses: "/<prefix>_<pid>_<n>_<random>", for
  // Create. `prefix` should be short and of [A-Za-z0-9_.-].
  static std::string UniqueKey(absl::string_view prefix);

  SharedMemoryRegion(SharedMemoryRegion&& other) noexcept;
  SharedMemoryRegion& operator=(SharedMemoryRegion&& other) noexcept;
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;
  // Unmaps; an owner also unlinks the name (a server that still maps the
  // object keeps its bytes until it unmaps them).
  ~SharedMemoryRegion();

  const std::string& key() const { return key_; }
  int64_t byte_size() const { return byte_size_; }
  bool owner() const { return owner_; }
  absl::Span<char> bytes() { return {data_, static_cast<size_t>(byte_size_)}; }
  absl::Span<const char> bytes() const { return {data_, static_cast<size_t>(byte_size_)}; }

  // Copies `t`'s bytes to `offset` and returns the view of them in the
  // region (dtype and shape as t's). INVALID_ARGUMENT when t's bytes do not
  // match its shape or do not fit at `offset`.
  absl::StatusOr<TensorView> Write(int64_t offset, const TensorView& t);
  // A view of the tensor of `dtype` and `shape` at `offset` (no copy; valid
  // while the region lives). INVALID_ARGUMENT when it does not fit.
  absl::StatusOr<TensorView> View(int64_t offset, DType dtype, std::vector<int64_t> shape) const;
  // As View, copied out into an owned tensor.
  absl::StatusOr<Tensor> Read(int64_t offset, DType dtype, std::vector<int64_t> shape) const;

  // Removes the name now (an owner's destructor then does nothing more than
  // unmap). The mapping stays usable. INTERNAL naming the key on failure.
  absl::Status Unlink();

 private:
  SharedMemoryRegion(std::string key, char* data, int64_t byte_size, bool owner)
      : key_(std::move(key)), data_(data), byte_size_(byte_size), owner_(owner) {}
  void Release();

  std::string key_;
  char* data_ = nullptr;
  int64_t byte_size_ = 0;
  bool owner_ = false;  // unlinks key_ on destruction
};

// INVALID_ARGUMENT naming `field` unless `key` is a shm_open name the server
// accepts: "/" then 1-254 of [A-Za-z0-9_.-].
absl::Status CheckShmKey(absl::string_view key, absl::string_view field = "key");

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_SHARED_MEMORY_H_
