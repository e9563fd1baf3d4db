// LoadShmRegions: the shared memory of a load run (attnctl bench --shm). One
// POSIX object per connection holds the request's query, key, value (and
// bias), written once, and a slot for the output; each is registered with
// the server through its own connection, and requests() are the request
// naming them, one per connection, for RunLoad.
//
// The calls in flight on one connection write the same output slot; a load
// run never reads it. Not thread-safe.
#ifndef ATTNSERVE_CLIENT_LOAD_SHM_H_
#define ATTNSERVE_CLIENT_LOAD_SHM_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attnserve/v1/attention.pb.h"
#include "client/client.h"
#include "client/shared_memory.h"

namespace attnserve::client {

class LoadShmRegions {
 public:
  // Creates, fills and registers one region per client (borrowed; they must
  // outlive this object) for `request`, whose query, key and value (and
  // bias) must carry their bytes. INVALID_ARGUMENT for a request without a
  // query or value shape; otherwise the errors of SharedMemoryRegion::Create
  // and AttnClient::RegisterSharedMemory (FAILED_PRECONDITION from a server
  // without --allow_shared_memory), after unregistering what was registered.
  static absl::StatusOr<std::unique_ptr<LoadShmRegions>> Create(
      const std::vector<AttnClient*>& clients, const v1::AttendRequest& request);
  // Release, errors ignored.
  ~LoadShmRegions();
  LoadShmRegions(const LoadShmRegions&) = delete;
  LoadShmRegions& operator=(const LoadShmRegions&) = delete;

  // requests()[i] is for clients[i]: tensors as SharedMemoryRef, no bytes,
  // the output asked into clients[i]'s region.
  const std::vector<v1::AttendRequest>& requests() const { return requests_; }
  // Bytes of each region.
  int64_t region_bytes() const { return region_bytes_; }

  // Unregisters every region (blocking, one call per connection) and unlinks
  // the objects. Returns the first unregistration error. Idempotent.
  absl::Status Release();

 private:
  LoadShmRegions() = default;

  std::vector<AttnClient*> clients_;
  std::vector<std::string> names_;  // registered through clients_[i]
  std::vector<SharedMemoryRegion> regions_;
  std::vector<v1::AttendRequest> requests_;
  int64_t region_bytes_ = 0;
};

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_LOAD_SHM_H_
