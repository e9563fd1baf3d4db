#include "server/wire_request.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/wire_format.h"

namespace attnserve {
namespace {

using wire_format::AppendVarint;
using wire_format::kFixed32;
using wire_format::kFixed64;
using wire_format::kLengthDelimited;
using wire_format::kTensorData;
using wire_format::kVarint;

// The AttendRequest fields scanned by hand, by index: query, key, value, bias.
int ScannedIndex(uint32_t field) {
  switch (field) {
    case 2:
      return 0;
    case 3:
      return 1;
    case 4:
      return 2;
    case 6:
      return 3;
    default:
      return -1;
  }
}

absl::Status Malformed(absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("request: not a valid attnserve.v1.AttendRequest (", why, ")"));
}

// What a scan found that protobuf's own parser should judge (a group, a
// reserved wire type): the message is then parsed whole, with copies.
absl::Status NeedsFullParse() { return absl::UnimplementedError("a group or reserved wire type"); }

// The message's bytes as one sequence over its chunks, read from the front.
class ChunkReader {
 public:
  explicit ChunkReader(absl::Span<const absl::string_view> chunks) : chunks_(chunks) {
    starts_.reserve(chunks.size());
    for (absl::string_view c : chunks) {
      starts_.push_back(size_);
      size_ += static_cast<int64_t>(c.size());
    }
  }

  int64_t size() const { return size_; }
  int64_t pos() const { return pos_; }

  // A varint of at most `max_bytes` bytes that ends before `limit`; false if
  // it is longer or runs past it.
  bool ReadVarint(int64_t limit, int max_bytes, uint64_t* value) {
    uint64_t v = 0;
    for (int i = 0; i < max_bytes; ++i) {
      if (pos_ >= limit) return false;
      const auto b = static_cast<uint8_t>(ByteAt(pos_++));
      v |= static_cast<uint64_t>(b & 0x7f) << (7 * i);
      if ((b & 0x80) == 0) {
        *value = v;
        return true;
      }
    }
    return false;
  }

  // Skips `n` bytes; false if that passes `limit`.
  bool Skip(int64_t n, int64_t limit) {
    if (n < 0 || n > limit - pos_) return false;
    pos_ += n;
    return true;
  }

  // Appends bytes [from, to) to `out`.
  void Append(int64_t from, int64_t to, std::string* out) const {
    while (from < to) {
      const size_t c = ChunkOf(from);
      const int64_t in_chunk = from - starts_[c];
      const int64_t n =
          std::min<int64_t>(to - from, static_cast<int64_t>(chunks_[c].size()) - in_chunk);
      out->append(chunks_[c].data() + in_chunk, static_cast<size_t>(n));
      from += n;
    }
  }

  // Bytes [from, from + n) when they lie in one chunk.
  std::optional<std::string_view> View(int64_t from, int64_t n) const {
    if (n == 0) return std::string_view();
    const size_t c = ChunkOf(from);
    const int64_t in_chunk = from - starts_[c];
    if (in_chunk + n > static_cast<int64_t>(chunks_[c].size())) return std::nullopt;
    return std::string_view(chunks_[c].data() + in_chunk, static_cast<size_t>(n));
  }

 private:
  // The chunk holding byte `pos` (< size_): the last that starts at or
  // before it, never an empty one.
  size_t ChunkOf(int64_t pos) const {
    auto it = std::upper_bound(starts_.begin(), starts_.end(), pos);
    return static_cast<size_t>(it - starts_.begin()) - 1;
  }
  char ByteAt(int64_t pos) {
    // Reads go forward: the cursor moves on from the last chunk used.
    while (pos >= starts_[cursor_] + static_cast<int64_t>(chunks_[cursor_].size())) ++cursor_;
    return chunks_[cursor_][static_cast<size_t>(pos - starts_[cursor_])];
  }

  absl::Span<const absl::string_view> chunks_;
  std::vector<int64_t> starts_;
  int64_t size_ = 0;
  int64_t pos_ = 0;
  size_t cursor_ = 0;
};

// Reads one field's tag and skips its value, up to `limit`; the value
// starts at `*value_start`, and a length-delimited one is `*length` bytes.
// OK, Malformed, or NeedsFullParse for groups and reserved wire types.
absl::Status ReadField(ChunkReader& r, int64_t limit, uint32_t* field, uint32_t* wire_type,
                       int64_t* value_start, int64_t* length) {
  uint64_t tag = 0;
  // As protobuf reads a tag: at most 5 bytes, kept to 32 bits.
  if (!r.ReadVarint(limit, 5, &tag)) return Malformed("a truncated tag");
  tag &= 0xffffffffu;
  *field = static_cast<uint32_t>(tag >> 3);
  *wire_type = static_cast<uint32_t>(tag & 7);
  if (*field == 0) return Malformed("field number 0");
  uint64_t v = 0;
  switch (*wire_type) {
    case kVarint:
      if (!r.ReadVarint(limit, 10, &v)) return Malformed("a truncated varint");
      break;
    case kFixed64:
      if (!r.Skip(8, limit)) return Malformed("a truncated fixed64");
      break;
    case kFixed32:
      if (!r.Skip(4, limit)) return Malformed("a truncated fixed32");
      break;
    case kLengthDelimited:
      if (!r.ReadVarint(limit, 5, &v) || v > INT32_MAX) return Malformed("a truncated length");
      *value_start = r.pos();
      *length = static_cast<int64_t>(v);
      if (!r.Skip(*length, limit)) return Malformed("a length past the end of the message");
      break;
    default:
      return NeedsFullParse();
  }
  return absl::OkStatus();
}

// Where one scanned tensor's data lies in the message.
struct DataRange {
  bool present = false;
  int64_t offset = 0;
  int64_t size = 0;
};
using DataRanges = std::array<DataRange, 4>;  // query, key, value, bias

// Copies the message read by `r` into `*rest`, less the data of the scanned
// tensors, whose places go to `*ranges`.
absl::Status Scan(ChunkReader& r, absl::Span<const absl::string_view> chunks, DataRanges* ranges,
                  std::string* rest);

}  // namespace

v1::Tensor* WireAttendRequest::MutableTensor(int index) {
  switch (index) {
    case 0:
      return request_.mutable_query();
    case 1:
      return request_.mutable_key();
    case 2:
      return request_.mutable_value();
    default:
      return request_.mutable_bias();
  }
}

absl::Status WireAttendRequest::Parse(absl::Span<const absl::string_view> chunks) {
  ChunkReader r(chunks);
  wire_bytes_ = r.size();
  DataRanges ranges;
  // The message minus the scanned tensors' data, for protobuf.
  std::string rest;
  absl::Status scanned = Scan(r, chunks, &ranges, &rest);
  if (absl::IsUnimplemented(scanned)) {
    rest.clear();
    r.Append(0, r.size(), &rest);
    ranges = {};
  } else if (!scanned.ok()) {
    return scanned;
  }
  copied_bytes_ = static_cast<int64_t>(rest.size());
  if (!request_.ParseFromString(rest)) return Malformed("protobuf's parser refused it");
  // Views into the chunks keep them all alive: worth it only when the views
  // are most of the message, else the few bytes in one chunk are copied too.
  int64_t in_chunks = 0;
  for (const DataRange& range : ranges) {
    if (range.present && r.View(range.offset, range.size).has_value()) in_chunks += range.size;
  }
  const bool keep_chunks = 2 * in_chunks >= wire_bytes_;
  for (int i = 0; i < kScannedTensors; ++i) {
    const DataRange& range = ranges[i];
    if (!range.present) continue;
    std::optional<std::string_view> view = r.View(range.offset, range.size);
    if (!keep_chunks) view.reset();
    const bool in_chunk = view.has_value();
    if (!in_chunk) {
      auto gathered = std::make_unique<std::string>();
      gathered->reserve(static_cast<size_t>(range.size));
      r.Append(range.offset, range.offset + range.size, gathered.get());
      copied_bytes_ += range.size;
      view = *gathered;
      gathered_.push_back(std::move(gathered));
    }
    v1::Tensor* tensor = MutableTensor(i);
    if (tensor->has_shm()) {
      // `next` (the shared-memory source) judges a tensor with both.
      tensor->set_data(view->data(), view->size());
      continue;
    }
    data_[i] = view;
    refers_to_chunks_ |= in_chunk && range.size > 0;
  }
  return absl::OkStatus();
}

namespace {

absl::Status Scan(ChunkReader& r, absl::Span<const absl::string_view> chunks, DataRanges* ranges,
                  std::string* rest) {
  while (r.pos() < r.size()) {
    const int64_t start = r.pos();
    uint32_t field = 0, wire_type = 0;
    int64_t value_start = 0, length = 0;
    if (absl::Status s = ReadField(r, r.size(), &field, &wire_type, &value_start, &length);
        !s.ok()) {
      return s;
    }
    const int index = ScannedIndex(field);
    if (index < 0 || wire_type != kLengthDelimited) {
      r.Append(start, r.pos(), rest);
      continue;
    }
    // A tensor: its fields but `data` go to protobuf; the last `data` wins,
    // as when protobuf merges repeated occurrences of the tensor.
    std::string tensor;
    ChunkReader t(chunks);
    t.Skip(value_start, r.size());
    const int64_t end = value_start + length;
    while (t.pos() < end) {
      const int64_t field_start = t.pos();
      uint32_t f = 0, wt = 0;
      int64_t data_start = 0, data_length = 0;
      if (absl::Status s = ReadField(t, end, &f, &wt, &data_start, &data_length); !s.ok()) {
        return s;
      }
      if (f == kTensorData && wt == kLengthDelimited) {
        (*ranges)[index] = {.present = true, .offset = data_start, .size = data_length};
      } else {
        t.Append(field_start, t.pos(), &tensor);
      }
    }
    // The tag as it was, then the new length.
    ChunkReader tag(chunks);
    tag.Skip(start, r.size());
    uint64_t unused = 0;
    tag.ReadVarint(r.size(), 5, &unused);
    r.Append(start, tag.pos(), rest);
    AppendVarint(tensor.size(), rest);
    *rest += tensor;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::optional<std::string_view>> WireAttendRequest::Bytes(
    const v1::Tensor& t, absl::string_view field) const {
  const bool has[kScannedTensors] = {request_.has_query(), request_.has_key(), request_.has_value(),
                                     request_.has_bias()};
  const v1::Tensor* tensors[kScannedTensors] = {&request_.query(), &request_.key(),
                                                &request_.value(), &request_.bias()};
  for (int i = 0; i < kScannedTensors; ++i) {
    if (has[i] && tensors[i] == &t && data_[i].has_value()) return *data_[i];
  }
  if (next_ != nullptr) return next_->Bytes(t, field);
  return std::nullopt;
}

}  // namespace attnserve
