#include "client/load_shm.h"

#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/convert.h"
#include "core/errors.h"

namespace attnserve::client {
namespace {

int64_t CacheLines(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// The tensors of `request` that move into the region, in layout order.
std::vector<v1::Tensor*> Inputs(v1::AttendRequest* request) {
  std::vector<v1::Tensor*> out = {request->mutable_query(), request->mutable_key(),
                                  request->mutable_value()};
  if (request->has_bias()) out.push_back(request->mutable_bias());
  return out;
}

// The output's bytes: the query's shape with the value's last dim, in the
// query's dtype.
absl::StatusOr<int64_t> OutputBytes(const v1::AttendRequest& request) {
  const v1::Tensor& q = request.query();
  const v1::Tensor& v = request.value();
  if (q.shape().empty() || v.shape().empty()) {
    return InvalidField("query.shape, value.shape", "dims to size the output slot", "none");
  }
  absl::StatusOr<DType> dtype = FromProto(q.dtype());
  if (!dtype.ok()) return dtype.status();
  std::vector<int64_t> shape(q.shape().begin(), q.shape().end());
  shape.back() = v.shape(v.shape_size() - 1);
  const int64_t n = CheckedElementCount(shape, INT64_MAX / 8);
  if (n < 0) return InvalidField("query.shape", "an output size that fits", ShapeString(shape));
  return n * static_cast<int64_t>(DTypeSize(*dtype));
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoadShmRegions>> LoadShmRegions::Create(
    const std::vector<AttnClient*>& clients, const v1::AttendRequest& request) {
  absl::StatusOr<int64_t> output_bytes = OutputBytes(request);
  if (!output_bytes.ok()) return output_bytes.status();
  int64_t size = CacheLines(*output_bytes);
  for (const v1::Tensor* t : {&request.query(), &request.key(), &request.value(), &request.bias()}) {
    size += CacheLines(static_cast<int64_t>(t->data().size()));  // an unset bias has none
  }

  auto out = std::unique_ptr<LoadShmRegions>(new LoadShmRegions);
  out->region_bytes_ = size;
  for (size_t c = 0; c < clients.size(); ++c) {
    absl::StatusOr<SharedMemoryRegion> region =
        SharedMemoryRegion::Create(SharedMemoryRegion::UniqueKey("attnbench"), size);
    if (!region.ok()) return region.status();
    // Region names are per caller, and every connection of this process may
    // be the same caller: the pid and the connection make them unique.
    const std::string name = absl::StrCat("bench_", getpid(), "_", c);
    v1::AttendRequest wire = request;
    int64_t offset = 0;
    for (v1::Tensor* t : Inputs(&wire)) {
      std::memcpy(region->bytes().data() + offset, t->data().data(), t->data().size());
      const int64_t bytes = static_cast<int64_t>(t->data().size());
      t->clear_data();
      t->mutable_shm()->set_region(name);
      t->mutable_shm()->set_offset(offset);
      offset += CacheLines(bytes);
    }
    wire.mutable_outputs()->mutable_output_shm()->set_region(name);
    wire.mutable_outputs()->mutable_output_shm()->set_offset(offset);
    if (absl::Status s = clients[c]->RegisterSharedMemory(name, *region); !s.ok()) {
      out->Release().IgnoreError();
      return absl::Status(s.code(), absl::StrCat("RegisterSharedMemory(", name, ", ",
                                                 region->key(), "): ", s.message()));
    }
    out->clients_.push_back(clients[c]);
    out->names_.push_back(name);
    out->regions_.push_back(*std::move(region));
    out->requests_.push_back(std::move(wire));
  }
  return out;
}

LoadShmRegions::~LoadShmRegions() { Release().IgnoreError(); }

absl::Status LoadShmRegions::Release() {
  absl::Status first;
  for (size_t i = 0; i < names_.size(); ++i) {
    absl::Status s = clients_[i]->UnregisterSharedMemory(names_[i]);
    if (first.ok() && !s.ok()) {
      first = absl::Status(s.code(), absl::StrCat("UnregisterSharedMemory(", names_[i],
                                                  "): ", s.message()));
    }
  }
  clients_.clear();
  names_.clear();
  regions_.clear();  // unmaps and unlinks
  return first;
}

}  // namespace attnserve::client
