// The .npy format (numpy/lib/format.py): the magic "\x93NUMPY", a major and a
// minor version byte, the header length (uint16 LE in v1, uint32 LE in v2/v3),
// then a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// padded with spaces and ended by '\n', then the raw data. v3 differs from v2
// only in allowing UTF-8 in the header, which this parser does not need.
#include "core/npy.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/half.h"

namespace attnserve {
namespace {

constexpr std::string_view kMagic = "\x93NUMPY";
// Bounds a header so a corrupt length cannot make the parser read far.
constexpr uint32_t kMaxHeaderBytes = 1 << 20;
// Bounds the element count so a hostile shape cannot overflow a size.
constexpr int64_t kMaxElements = int64_t{1} << 40;

absl::Status Malformed(std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("malformed .npy file: ", std::string(what)));
}

// A cursor over the header dict with the few Python literal forms .npy uses.
class HeaderParser {
 public:
  explicit HeaderParser(std::string_view text) : text_(text) {}

  void SkipSpace() {
    while (pos_ < text_.size() && absl::ascii_isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }

  // Consumes `c` (after whitespace) if it is next.
  bool Accept(char c) {
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  bool AtEnd() {
    SkipSpace();
    return pos_ >= text_.size();
  }

  // A '...' or "..." string without escapes (none occur in .npy headers).
  std::optional<std::string> String() {
    SkipSpace();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) return std::nullopt;
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == std::string_view::npos) return std::nullopt;
    std::string s(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return s;
  }

  std::optional<bool> Bool() {
    SkipSpace();
    for (const auto& [word, value] : {std::pair{"True", true}, std::pair{"False", false}}) {
      const std::string_view w = word;
      if (text_.substr(pos_, w.size()) == w) {
        pos_ += w.size();
        return value;
      }
    }
    return std::nullopt;
  }

  std::optional<int64_t> Int() {
    SkipSpace();
    size_t end = pos_;
    while (end < text_.size() && absl::ascii_isdigit(static_cast<unsigned char>(text_[end]))) ++end;
    int64_t v = 0;
    if (end == pos_ || !absl::SimpleAtoi(std::string(text_.substr(pos_, end - pos_)), &v)) return std::nullopt;
    pos_ = end;
    // Python 2 era writers appended 'L' to longs.
    if (pos_ < text_.size() && text_[pos_] == 'L') ++pos_;
    return v;
  }

  // "(2, 3)", "(5,)" or "()".
  std::optional<std::vector<int64_t>> Tuple() {
    if (!Accept('(')) return std::nullopt;
    std::vector<int64_t> dims;
    if (Accept(')')) return dims;
    while (true) {
      std::optional<int64_t> d = Int();
      if (!d) return std::nullopt;
      dims.push_back(*d);
      if (Accept(')')) return dims;
      if (!Accept(',')) return std::nullopt;
      if (Accept(')')) return dims;
    }
  }

  size_t pos() const { return pos_; }

 private:
  std::string_view text_;
  size_t pos_ = 0;
};

struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

absl::StatusOr<Header> ParseHeaderDict(std::string_view text) {
  HeaderParser parser(text);
  Header header;
  bool have_descr = false, have_order = false, have_shape = false;
  if (!parser.Accept('{')) return Malformed("header does not start with '{'");
  while (!parser.Accept('}')) {
    std::optional<std::string> key = parser.String();
    if (!key) return Malformed(absl::StrCat("expected a quoted key at header offset ", parser.pos()));
    if (!parser.Accept(':')) return Malformed(absl::StrCat("expected ':' after key '", *key, "'"));
    if (*key == "descr") {
      std::optional<std::string> descr = parser.String();
      if (!descr) return Malformed("'descr' is not a string (structured dtypes are not supported)");
      header.descr = *descr;
      have_descr = true;
    } else if (*key == "fortran_order") {
      std::optional<bool> order = parser.Bool();
      if (!order) return Malformed("'fortran_order' is not True or False");
      header.fortran_order = *order;
      have_order = true;
    } else if (*key == "shape") {
      std::optional<std::vector<int64_t>> shape = parser.Tuple();
      if (!shape) return Malformed("'shape' is not a tuple of non-negative integers");
      header.shape = *std::move(shape);
      have_shape = true;
    } else {
      return Malformed(absl::StrCat("unexpected header key '", *key, "'"));
    }
    if (!parser.Accept(',')) {
      if (!parser.Accept('}')) return Malformed("expected ',' or '}' in the header dict");
      break;
    }
  }
  if (!parser.AtEnd()) return Malformed("trailing characters after the header dict");
  if (!have_descr || !have_order || !have_shape) {
    return Malformed("header lacks one of 'descr', 'fortran_order', 'shape'");
  }
  return header;
}

uint32_t ReadLe(std::string_view bytes, size_t offset, size_t width) {
  uint32_t v = 0;
  for (size_t i = 0; i < width; ++i) v |= uint32_t{static_cast<uint8_t>(bytes[offset + i])} << (8 * i);
  return v;
}

}  // namespace

absl::StatusOr<Tensor> ParseNpy(std::string_view bytes) {
  if (bytes.size() < kMagic.size() + 2 || bytes.substr(0, kMagic.size()) != kMagic) {
    return Malformed("missing the \\x93NUMPY magic");
  }
  const int major = static_cast<uint8_t>(bytes[6]);
  const int minor = static_cast<uint8_t>(bytes[7]);
  if (major < 1 || major > 3 || minor != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        ".npy format version: expected 1.0, 2.0 or 3.0, got ", major, ".", minor));
  }
  const size_t len_width = major == 1 ? 2 : 4;
  const size_t preamble = 8 + len_width;
  if (bytes.size() < preamble) return Malformed("truncated before the header length");
  const uint32_t header_len = ReadLe(bytes, 8, len_width);
  if (header_len > kMaxHeaderBytes) {
    return Malformed(absl::StrCat("header length ", header_len, " exceeds ", kMaxHeaderBytes));
  }
  if (bytes.size() - preamble < header_len) {
    return Malformed(absl::StrCat("header length ", header_len, " exceeds the ",
                                  bytes.size() - preamble, " bytes after the preamble"));
  }
  absl::StatusOr<Header> header = ParseHeaderDict(bytes.substr(preamble, header_len));
  if (!header.ok()) return header.status();
  if (header->fortran_order) {
    return absl::InvalidArgumentError(".npy fortran_order: expected False, got True");
  }

  Tensor t;
  t.shape = header->shape;
  size_t item_size = 0;
  bool widen_f64 = false;
  bool narrow_i64 = false;
  if (header->descr == "<f4") {
    t.dtype = DType::kF32;
    item_size = 4;
  } else if (header->descr == "<f2") {
    t.dtype = DType::kF16;
    item_size = 2;
  } else if (header->descr == "<i4") {
    t.dtype = DType::kI32;
    item_size = 4;
  } else if (header->descr == "<f8") {
    t.dtype = DType::kF32;
    item_size = 8;
    widen_f64 = true;
  } else if (header->descr == "<i8") {  // NumPy's default integer: read as I32 when it fits
    t.dtype = DType::kI32;
    item_size = 8;
    narrow_i64 = true;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        ".npy descr: expected '<f4', '<f2', '<i4', '<i8' or '<f8', got '", header->descr, "'"));
  }
  const int64_t count = CheckedElementCount(t.shape, kMaxElements);
  if (count < 0) {
    return absl::InvalidArgumentError(absl::StrCat(".npy shape: expected at most ", kMaxElements,
                                                   " elements, got ", ShapeString(t.shape)));
  }
  const std::string_view data = bytes.substr(preamble + header_len);
  const uint64_t want = static_cast<uint64_t>(count) * item_size;
  if (data.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(".npy data: expected ", want, " bytes for shape ",
                                                   ShapeString(t.shape), " of ", header->descr,
                                                   ", got ", data.size()));
  }
  if (widen_f64) {
    t.data.resize(static_cast<size_t>(count) * 4);
    for (int64_t i = 0; i < count; ++i) {
      double d;
      std::memcpy(&d, data.data() + i * 8, 8);
      const float f = static_cast<float>(d);
      std::memcpy(t.data.data() + i * 4, &f, 4);
    }
  } else if (narrow_i64) {
    t.data.resize(static_cast<size_t>(count) * 4);
    for (int64_t i = 0; i < count; ++i) {
      int64_t v;
      std::memcpy(&v, data.data() + i * 8, 8);
      if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat(
            ".npy data: expected '<i8' values that fit in 32 bits, got ", v, " at element ", i));
      }
      const int32_t x = static_cast<int32_t>(v);
      std::memcpy(t.data.data() + i * 4, &x, 4);
    }
  } else {
    t.data.assign(data);
  }
  return t;
}

absl::StatusOr<Tensor> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  absl::StatusOr<Tensor> t = ParseNpy(bytes);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  }
  return t;
}

absl::Status WriteNpy(const std::string& path, const Tensor& t) {
  const int64_t count = t.num_elements();
  if (count < 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor shape: expected non-negative dims, got ",
                                                   ShapeString(t.shape)));
  }
  if (t.data.size() != static_cast<size_t>(count) * DTypeSize(t.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor data: expected ", count * DTypeSize(t.dtype),
                                                   " bytes for ", ShapeString(t.shape), " ",
                                                   std::string(DTypeName(t.dtype)), ", got ", t.data.size()));
  }
  std::string descr;
  switch (t.dtype) {
    case DType::kF32:
    case DType::kBF16:
      descr = "<f4";
      break;
    case DType::kF16:
      descr = "<f2";
      break;
    case DType::kI32:
      descr = "<i4";
      break;
  }
  std::string shape = "(";
  for (size_t i = 0; i < t.shape.size(); ++i) absl::StrAppend(&shape, i ? ", " : "", t.shape[i]);
  if (t.shape.size() == 1) shape += ",";
  shape += ")";
  std::string header =
      absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", shape, ", }");
  // Pad with spaces so magic + version + length + header + '\n' is a multiple
  // of 64, as NumPy does (it keeps the data aligned when memory-mapped).
  const size_t unpadded = kMagic.size() + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 0xffff) {
    return absl::InvalidArgumentError(absl::StrCat("tensor shape: too many dims for a v1.0 header, got ",
                                                   t.shape.size()));
  }

  std::string out(kMagic);
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  if (t.dtype == DType::kBF16) {
    std::string widened(static_cast<size_t>(count) * 4, '\0');
    for (int64_t i = 0; i < count; ++i) {
      const float f = LoadFloat(t.data.data(), DType::kBF16, i);
      std::memcpy(widened.data() + i * 4, &f, 4);
    }
    out += widened;
  } else {
    out += t.data;
  }

  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) return absl::FailedPreconditionError(absl::StrCat("cannot open ", path, " for writing"));
  file.write(out.data(), static_cast<std::streamsize>(out.size()));
  file.close();
  if (!file) return absl::DataLossError(absl::StrCat("error writing ", path));
  return absl::OkStatus();
}

}  // namespace attnserve
