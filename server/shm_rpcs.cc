// The shared-memory RPCs of AttentionServiceImpl: RegisterSharedMemory and
// UnregisterSharedMemory, on the SharedMemoryRegistry (core/shared_memory.h),
// and the per-call source that resolves Tensor.shm in the caller's regions.
// A region belongs to the caller's identity, like a session: another caller
// can neither use nor unregister it.
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/shared_memory.h"
#include "server/call_context.h"
#include "server/service.h"
#include "server/shm_source.h"

namespace attnserve {
namespace {

constexpr char kRegisterSharedMemory[] = "RegisterSharedMemory";
constexpr char kUnregisterSharedMemory[] = "UnregisterSharedMemory";

absl::Status SharedMemoryOff() {
  return absl::FailedPreconditionError(
      "shared memory is off on this server (start it with --allow_shared_memory)");
}

}  // namespace

std::shared_ptr<ShmTensorSource> AttentionServiceImpl::ShmSourceFor(
    const std::string& caller) const {
  return std::make_shared<ShmTensorSource>(options_.shared_memory, caller);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::RegisterSharedMemory(
    grpc::CallbackServerContext* context, const v1::RegisterSharedMemoryRequest* request,
    v1::RegisterSharedMemoryResponse* /*response*/) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Status status = AdmitNoThrow([&]() -> absl::Status {
    if (draining()) return Draining();
    if (options_.shared_memory == nullptr) return SharedMemoryOff();
    return options_.shared_memory->Register(
        CallerOf(context), SharedMemoryRegionSpec{request->name(), request->key(),
                                                  request->offset(), request->byte_size()});
  });
  FinishUnary(reactor, kRegisterSharedMemory, received, status);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::UnregisterSharedMemory(
    grpc::CallbackServerContext* context, const v1::UnregisterSharedMemoryRequest* request,
    v1::UnregisterSharedMemoryResponse* /*response*/) {
  // Allowed while draining: it only releases mappings.
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Status status = AdmitNoThrow([&]() -> absl::Status {
    if (options_.shared_memory == nullptr) return SharedMemoryOff();
    return options_.shared_memory->Unregister(CallerOf(context), request->name());
  });
  FinishUnary(reactor, kUnregisterSharedMemory, received, status);
  return reactor;
}

}  // namespace attnserve
