// The pieces of protobuf's wire encoding that the Attend path reads and
// writes by hand (WireAttendRequest in wire_request.h, SerializeAttendResponse
// in wire_response.h): wire types, Tensor.data's field number, varints
// (protobuf's own CodedOutputStream encoding).
#ifndef ATTNSERVE_SERVER_WIRE_FORMAT_H_
#define ATTNSERVE_SERVER_WIRE_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "google/protobuf/io/coded_stream.h"

namespace attnserve {
namespace wire_format {

inline constexpr uint32_t kVarint = 0;
inline constexpr uint32_t kFixed64 = 1;
inline constexpr uint32_t kLengthDelimited = 2;
inline constexpr uint32_t kFixed32 = 5;

inline constexpr uint32_t kTensorData = 3;  // Tensor.data's field number

// Appends `v` as a varint.
inline void AppendVarint(uint64_t v, std::string* out) {
  uint8_t bytes[10];
  const uint8_t* end = google::protobuf::io::CodedOutputStream::WriteVarint64ToArray(v, bytes);
  out->append(reinterpret_cast<const char*>(bytes), static_cast<size_t>(end - bytes));
}

// The bytes AppendVarint(v) appends.
inline size_t VarintSize(uint64_t v) {
  return google::protobuf::io::CodedOutputStream::VarintSize64(v);
}

}  // namespace wire_format
}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_WIRE_FORMAT_H_
