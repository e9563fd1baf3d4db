// WireAttendRequest: an AttendRequest parsed from its wire bytes as gRPC
// received them (a list of chunks, gRPC's slices) without copying the large
// tensors' bytes. The tensors of the request (query, key, value, bias) are
// scanned by hand: their `data` stays where it was received and is handed out
// as a view (TensorSource); everything else (shapes, options, sparsity, unknown
// fields) is parsed by protobuf from a small copy of those fields. A tensor
// whose bytes straddle two chunks is gathered into one buffer the object owns.
//
// The result is the message protobuf's own parse gives, with the scanned
// tensors' `data` empty and their bytes in Bytes(): the same fields, the same
// merging of repeated occurrences, the same failures (tests/fuzz checks it).
//
// Thread safety: Parse once; then the const methods may be called from any
// thread. The chunks must outlive the object.
#ifndef ATTNSERVE_SERVER_WIRE_REQUEST_H_
#define ATTNSERVE_SERVER_WIRE_REQUEST_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "attnserve/v1/attention.pb.h"
#include "server/convert.h"

namespace attnserve {

class WireAttendRequest final : public TensorSource {
 public:
  // `next` (not owned, may be null) resolves what this source does not: a
  // tensor with `shm` set (Tensor.shm), and the sparsity's index tensors.
  explicit WireAttendRequest(const TensorSource* next = nullptr) : next_(next) {}
  WireAttendRequest(const WireAttendRequest&) = delete;
  WireAttendRequest& operator=(const WireAttendRequest&) = delete;

  // Parses the message whose bytes are `chunks` in order (they must outlive
  // this object). Call once. INVALID_ARGUMENT when the bytes are not an
  // AttendRequest (protobuf would refuse them: a truncated varint, a length
  // past the end, a bad tag, malformed UTF-8 in a string).
  absl::Status Parse(absl::Span<const absl::string_view> chunks);

  // The request, the scanned tensors' `data` left empty (see Bytes).
  const v1::AttendRequest& request() const { return request_; }

  // The message's size on the wire.
  int64_t wire_bytes() const { return wire_bytes_; }
  // Bytes this object copied: tensors gathered from several chunks, and the
  // small fields protobuf parsed.
  int64_t copied_bytes() const { return copied_bytes_; }
  // Whether Bytes() hands out views into the chunks; if not, they may be
  // freed once Parse returns.
  bool refers_to_chunks() const { return refers_to_chunks_; }

  // The bytes of request().query(), key(), value() or bias() (by address)
  // when they were scanned; else what `next` says (nullopt without one).
  absl::StatusOr<std::optional<std::string_view>> Bytes(const v1::Tensor& t,
                                                        absl::string_view field) const override;

 private:
  static constexpr int kScannedTensors = 4;  // query, key, value, bias

  // The scanned tensor at `index` (0-3) of request_.
  v1::Tensor* MutableTensor(int index);

  const TensorSource* const next_;
  v1::AttendRequest request_;
  std::array<std::optional<std::string_view>, kScannedTensors> data_;
  std::vector<std::unique_ptr<std::string>> gathered_;  // tensors that straddled chunks
  int64_t wire_bytes_ = 0;
  int64_t copied_bytes_ = 0;
  bool refers_to_chunks_ = false;
};

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_WIRE_REQUEST_H_
