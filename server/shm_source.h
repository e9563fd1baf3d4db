// ShmTensorSource: the TensorSource (convert.h) of one call's shared-memory
// references (Tensor.shm), resolved in the caller's registered regions
// (core/shared_memory.h), and the places outputs are written to
// (OutputSpec.output_shm, BatchDecodeEntry.output_shm). It holds every region
// it resolved until it is destroyed, so a region the caller unregisters while
// the call computes stays mapped; keep it until the call is answered.
//
// Thread-safe (a BatchDecode's entries may share one).
#ifndef ATTNSERVE_SERVER_SHM_SOURCE_H_
#define ATTNSERVE_SERVER_SHM_SOURCE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "attnserve/v1/attention.pb.h"
#include "core/dtype.h"
#include "core/shared_memory.h"
#include "core/tensor.h"
#include "server/convert.h"

namespace attnserve {

class ShmTensorSource final : public TensorSource {
 public:
  // `registry` not owned, null when shared memory is off
  // (--allow_shared_memory): a reference is then FAILED_PRECONDITION.
  // `caller` is the call's identity: only its own regions resolve.
  ShmTensorSource(const SharedMemoryRegistry* registry, std::string caller)
      : registry_(registry), caller_(std::move(caller)) {}
  // A source for a call that cannot use shared memory whatever the server
  // allows (PartialAttend, a session split over replicas: the bytes would
  // have to reach another machine): every reference is INVALID_ARGUMENT
  // naming the field, saying `why`.
  static std::shared_ptr<ShmTensorSource> Refusing(std::string why);

  // Tensor.shm's bytes: prod(shape) * dtype size bytes at the offset of the
  // region; nullopt when `t` has no shm (its bytes are t.data()).
  // INVALID_ARGUMENT naming the field ("query.shm.offset") for data and shm
  // both set, an unknown region (another caller's included), a negative
  // offset or bytes past the region's end; FAILED_PRECONDITION when shared
  // memory is off or the region's object was truncated.
  absl::StatusOr<std::optional<std::string_view>> Bytes(const v1::Tensor& t,
                                                        absl::string_view field) const override;

  // Where an output of `bytes` bytes of `dtype` goes: `ref` resolved as
  // Bytes does, its place in the object (region offset + ref.offset) a
  // multiple of the dtype's size, and not overlapping the bytes of an input
  // this source resolved (the kernel would read what it writes: zeros, or
  // partial results). `field` names ref ("outputs.output_shm").
  absl::StatusOr<char*> Output(const v1::SharedMemoryRef& ref, absl::string_view field,
                               int64_t bytes, DType dtype) const;

  // After the computation: OK unless a region the call used was truncated
  // meanwhile (FAILED_PRECONDITION naming it); the call must then be refused,
  // since what it read or wrote there is lost.
  absl::Status CheckIntact() const;

 private:
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> Resolve(const v1::SharedMemoryRef& ref,
                                                               absl::string_view field) const;

  const SharedMemoryRegistry* const registry_;
  const std::string caller_;
  std::string refusal_;  // Refusing's `why`; empty otherwise
  // The bytes of an input Bytes resolved: [begin, end) of the object `key`.
  struct InputBytes {
    std::string key;
    int64_t begin = 0;
    int64_t end = 0;
    std::string field;
  };
  mutable absl::Mutex mu_;
  mutable std::vector<std::shared_ptr<SharedMemoryRegion>> used_ ABSL_GUARDED_BY(mu_);
  mutable std::vector<InputBytes> inputs_ ABSL_GUARDED_BY(mu_);
};

// `out` as a response tensor written to shared memory: its dtype and shape
// kept, the data dropped, `ref` as its shm.
void ShmOutputToProto(const v1::SharedMemoryRef& ref, v1::Tensor* out);

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_SHM_SOURCE_H_
