// Responses serialized for gRPC without copying their large tensors: each
// tensor's bytes go into the ByteBuffer as a slice that owns the tensor's
// storage (freed when gRPC has sent it), next to a protobuf serialization of
// everything else. The bytes on the wire are a valid encoding of the same
// message: the tensor appears a second time holding only its `data`, and
// parsers merge repeated occurrences of a message field (the tests parse the
// result with protobuf, C++ and Python, and compare).
//
// Pure functions; thread-safe.
#ifndef ATTNSERVE_SERVER_WIRE_RESPONSE_H_
#define ATTNSERVE_SERVER_WIRE_RESPONSE_H_

#include <cstdint>

#include "attnserve/v1/attention.pb.h"
#include "grpcpp/support/byte_buffer.h"

namespace attnserve {

// Tensors with fewer bytes than this are serialized by protobuf: a slice of
// their own costs more than the copy.
inline constexpr int64_t kZeroCopyMinBytes = 4096;

// Serializes `response` into `*out`. The data of its tensors of at least
// kZeroCopyMinBytes (output, lse, weights, top-k, entropy) is moved into
// `*out`'s slices, so `response` is left with those tensors' data empty.
void SerializeAttendResponse(v1::AttendResponse* response, grpc::ByteBuffer* out);

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_WIRE_RESPONSE_H_
