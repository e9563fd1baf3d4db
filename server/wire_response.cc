#include "server/wire_response.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "grpcpp/support/slice.h"
#include "server/wire_format.h"

namespace attnserve {
namespace {

using wire_format::AppendVarint;
using wire_format::kLengthDelimited;
using wire_format::kTensorData;
using wire_format::VarintSize;

// AttendResponse's tensor fields, with their field numbers.
struct TensorField {
  uint32_t number;
  v1::Tensor* tensor;  // null when unset
};

std::vector<TensorField> TensorFields(v1::AttendResponse* r) {
  std::vector<TensorField> fields;
  auto add = [&](uint32_t number, bool has, v1::Tensor* (v1::AttendResponse::*get)()) {
    if (has) fields.push_back({number, (r->*get)()});
  };
  add(2, r->has_output(), &v1::AttendResponse::mutable_output);
  add(3, r->has_lse(), &v1::AttendResponse::mutable_lse);
  add(4, r->has_weights(), &v1::AttendResponse::mutable_weights);
  add(5, r->has_top_k_indices(), &v1::AttendResponse::mutable_top_k_indices);
  add(6, r->has_top_k_weights(), &v1::AttendResponse::mutable_top_k_weights);
  add(9, r->has_entropy(), &v1::AttendResponse::mutable_entropy);
  return fields;
}

void DeleteString(void* s) { delete static_cast<std::string*>(s); }

}  // namespace

void SerializeAttendResponse(v1::AttendResponse* response, grpc::ByteBuffer* out) {
  struct Moved {
    uint32_t number;
    std::unique_ptr<std::string> data;
  };
  std::vector<Moved> moved;
  for (const TensorField& f : TensorFields(response)) {
    if (static_cast<int64_t>(f.tensor->data().size()) < kZeroCopyMinBytes) continue;
    auto data = std::make_unique<std::string>();
    data->swap(*f.tensor->mutable_data());
    moved.push_back({f.number, std::move(data)});
  }
  // The message less the moved data, then per moved tensor: its field again,
  // holding only `data`, whose bytes are the next slice.
  std::string head = response->SerializeAsString();
  std::vector<grpc::Slice> slices;
  slices.reserve(2 * moved.size() + 1);
  for (Moved& m : moved) {
    const uint64_t n = m.data->size();
    const uint64_t inner = VarintSize((kTensorData << 3) | kLengthDelimited) + VarintSize(n) + n;
    AppendVarint((uint64_t{m.number} << 3) | kLengthDelimited, &head);
    AppendVarint(inner, &head);
    AppendVarint((kTensorData << 3) | kLengthDelimited, &head);
    AppendVarint(n, &head);
    slices.emplace_back(head);
    head.clear();
    std::string* owned = m.data.release();
    slices.emplace_back(owned->data(), owned->size(), &DeleteString, owned);
  }
  if (!head.empty() || slices.empty()) slices.emplace_back(head);
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  out->Swap(&buffer);
}

}  // namespace attnserve
