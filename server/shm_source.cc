#include "server/shm_source.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/errors.h"
#include "wire/convert.h"

namespace attnserve {

std::shared_ptr<ShmTensorSource> ShmTensorSource::Refusing(std::string why) {
  auto source = std::make_shared<ShmTensorSource>(nullptr, std::string());
  source->refusal_ = std::move(why);
  return source;
}

absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> ShmTensorSource::Resolve(
    const v1::SharedMemoryRef& ref, absl::string_view field) const {
  if (!refusal_.empty()) {
    return InvalidField(field, absl::StrCat("inline data (", refusal_, ")"),
                        absl::StrCat("shared-memory region '", ref.region(), "'"));
  }
  if (registry_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, ": shared memory is off on this server (start it with --allow_shared_memory)"));
  }
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> region =
      registry_->Find(caller_, ref.region());
  if (!region.ok()) {
    return InvalidField(absl::StrCat(field, ".region"),
                        "a region this caller registered (RegisterSharedMemory)",
                        absl::StrCat("'", ref.region(), "'"));
  }
  if (ref.offset() < 0) {
    return InvalidField(absl::StrCat(field, ".offset"), ">= 0", absl::StrCat(ref.offset()));
  }
  // The caller may have shrunk the object since it registered it.
  if (absl::Status s = (*region)->CheckIntact(); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (std::find(used_.begin(), used_.end(), *region) == used_.end()) used_.push_back(*region);
  return region;
}

absl::StatusOr<std::optional<std::string_view>> ShmTensorSource::Bytes(
    const v1::Tensor& t, absl::string_view field) const {
  if (!t.has_shm()) return std::nullopt;
  const std::string shm_field = absl::StrCat(field, ".shm");
  if (!t.data().empty()) {
    return InvalidField(field, "its bytes in data or in shm, not both",
                        absl::StrCat(t.data().size(), " bytes of data and shm region '",
                                     t.shm().region(), "'"));
  }
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> region = Resolve(t.shm(), shm_field);
  if (!region.ok()) return region.status();
  // The conversion checked the dtype before asking.
  absl::StatusOr<DType> dtype = DTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype"));
  if (!dtype.ok()) return dtype.status();
  const int64_t elements = CheckedElementCount(
      std::vector<int64_t>(t.shape().begin(), t.shape().end()), (*region)->byte_size());
  const int64_t size = DTypeSize(*dtype);
  const int64_t offset = t.shm().offset();
  const int64_t available = (*region)->byte_size();
  if (elements < 0 || elements > available / size || offset > available - elements * size) {
    return InvalidField(
        absl::StrCat(shm_field, ".offset"),
        absl::StrCat("offset + ",
                     elements < 0 || elements > available / size
                         ? absl::StrCat("the tensor's bytes (shape ",
                                        ShapeString({t.shape().begin(), t.shape().end()}), ")")
                         : absl::StrCat(elements * size, " bytes"),
                     " <= region '", t.shm().region(), "' size ", available),
        absl::StrCat("offset ", offset));
  }
  if (elements > 0) {
    const int64_t begin = (*region)->spec().offset + offset;
    absl::MutexLock lock(&mu_);
    inputs_.push_back({(*region)->spec().key, begin, begin + elements * size, std::string(field)});
  }
  return std::string_view((*region)->data() + offset, static_cast<size_t>(elements * size));
}

absl::StatusOr<char*> ShmTensorSource::Output(const v1::SharedMemoryRef& ref,
                                              absl::string_view field, int64_t bytes,
                                              DType dtype) const {
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> region = Resolve(ref, field);
  if (!region.ok()) return region.status();
  const int64_t available = (*region)->byte_size();
  if (bytes > available || ref.offset() > available - bytes) {
    return InvalidField(absl::StrCat(field, ".offset"),
                        absl::StrCat("offset + ", bytes, " bytes (the ", DTypeName(dtype),
                                     " output) <= region '", ref.region(), "' size ", available),
                        absl::StrCat("offset ", ref.offset()));
  }
  const int64_t size = DTypeSize(dtype);
  const int64_t place = (*region)->spec().offset + ref.offset();
  if (place % size != 0) {
    return InvalidField(
        absl::StrCat(field, ".offset"),
        absl::StrCat("the output at a multiple of ", size, " bytes (its ", DTypeName(dtype),
                     " elements) from the object's start: region offset ",
                     (*region)->spec().offset, " + offset"),
        absl::StrCat("offset ", ref.offset()));
  }
  if (bytes > 0) {
    absl::MutexLock lock(&mu_);
    for (const InputBytes& in : inputs_) {
      if (in.key != (*region)->spec().key || place >= in.end || in.begin >= place + bytes) {
        continue;
      }
      return InvalidField(absl::StrCat(field, ".offset"),
                          absl::StrCat("an output place not overlapping the input ", in.field,
                                       " (bytes [", in.begin, ", ", in.end, ") of ", in.key, ")"),
                          absl::StrCat("offset ", ref.offset(), ": bytes [", place, ", ",
                                       place + bytes, ") of ", in.key));
    }
  }
  return (*region)->data() + ref.offset();
}

absl::Status ShmTensorSource::CheckIntact() const {
  absl::MutexLock lock(&mu_);
  for (const std::shared_ptr<SharedMemoryRegion>& region : used_) {
    if (absl::Status s = region->CheckIntact(); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void ShmOutputToProto(const v1::SharedMemoryRef& ref, v1::Tensor* out) {
  out->clear_data();
  *out->mutable_shm() = ref;
}

}  // namespace attnserve
