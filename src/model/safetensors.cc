// The safetensors layout (huggingface/safetensors, docs "The format"): an
// 8-byte little-endian header length N, N bytes of JSON
//   {"q.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
//    "__metadata__": {"format": "pt"}}
// and then the data, which the offsets index from its first byte. Nothing in
// the header is trusted: every number is range-checked before it is used to
// form a pointer.
#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace attnserve {
namespace {

using Json = nlohmann::json;

// The reference implementation refuses headers over 100 MB; a real one is a
// few hundred kilobytes even for models with thousands of tensors.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

// Bytes per element of the dtypes the format defines with whole-byte
// elements; nullopt for others (sub-byte and future types), whose byte
// count is then not checked against the shape.
std::optional<int64_t> DTypeBytes(absl::string_view dtype) {
  static constexpr std::pair<absl::string_view, int64_t> kSizes[] = {
      {"F64", 8},  {"F32", 4},     {"F16", 2},     {"BF16", 2},    {"I64", 8}, {"I32", 4},
      {"I16", 2},  {"I8", 1},      {"U64", 8},     {"U32", 4},     {"U16", 2}, {"U8", 1},
      {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1}, {"C64", 8},
  };
  for (const auto& [name, bytes] : kSizes) {
    if (name == dtype) return bytes;
  }
  return std::nullopt;
}

// A JSON value as a non-negative int64, or nullopt (negative, fractional,
// too large, not a number).
std::optional<int64_t> NonNegativeInt(const Json& value) {
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) {
    const int64_t i = value.get<int64_t>();
    if (i < 0) return std::nullopt;
    return i;
  }
  return std::nullopt;
}

// Short enough for an error message, however long the offending value.
std::string Excerpt(const Json& value) {
  std::string s = value.dump();
  constexpr size_t kMax = 80;
  if (s.size() > kMax) s = absl::StrCat(s.substr(0, kMax), "...");
  return s;
}

// Parses one header entry; `data` and `data_bytes` are the data section.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& path, const std::string& name,
                                            const Json& value, const uint8_t* data,
                                            int64_t data_bytes) {
  const auto invalid = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, ": ", what));
  };
  if (!value.is_object()) return invalid(absl::StrCat("expected an object, got ", Excerpt(value)));

  SafetensorsEntry entry;
  const auto dtype = value.find("dtype");
  if (dtype == value.end()) return invalid("dtype: missing");
  if (!dtype->is_string()) {
    return invalid(absl::StrCat("dtype: expected a string, got ", Excerpt(*dtype)));
  }
  entry.dtype = dtype->get<std::string>();

  const auto shape = value.find("shape");
  if (shape == value.end()) return invalid("shape: missing");
  if (!shape->is_array()) {
    return invalid(absl::StrCat("shape: expected an array, got ", Excerpt(*shape)));
  }
  int64_t elements = 1;
  for (const Json& dim : *shape) {
    const std::optional<int64_t> d = NonNegativeInt(dim);
    if (!d) {
      return invalid(absl::StrCat("shape: expected non-negative integers, got ", Excerpt(*shape)));
    }
    if (__builtin_mul_overflow(elements, *d, &elements)) {
      return invalid(absl::StrCat("shape: element count overflows, ", Excerpt(*shape)));
    }
    entry.shape.push_back(*d);
  }

  const auto offsets = value.find("data_offsets");
  if (offsets == value.end()) return invalid("data_offsets: missing");
  std::optional<int64_t> begin, end;
  if (offsets->is_array() && offsets->size() == 2) {
    begin = NonNegativeInt((*offsets)[0]);
    end = NonNegativeInt((*offsets)[1]);
  }
  if (!begin || !end) {
    return invalid(absl::StrCat("data_offsets: expected [begin, end], non-negative integers, got ",
                                Excerpt(*offsets)));
  }
  if (*begin > *end || *end > data_bytes) {
    return invalid(absl::StrCat("data_offsets: [", *begin, ", ", *end,
                                "] is not a byte range within the data (", data_bytes, " bytes)"));
  }
  entry.bytes = *end - *begin;
  entry.data = data + *begin;

  if (const std::optional<int64_t> size = DTypeBytes(entry.dtype)) {
    int64_t expected = 0;
    if (__builtin_mul_overflow(elements, *size, &expected) || expected != entry.bytes) {
      return invalid(absl::StrCat(entry.bytes, " bytes for ", entry.dtype, " [",
                                  absl::StrJoin(entry.shape, ", "), "], expected ", elements,
                                  " elements x ", *size, " bytes"));
    }
  }
  return entry;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const auto failed = [&path](absl::string_view what) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cannot ", what, ": ", std::strerror(errno)));
  };
  const auto invalid = [&path](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a safetensors file: ", what));
  };

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return failed("open");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status status = failed("stat");
    ::close(fd);
    return status;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::FailedPreconditionError(absl::StrCat(path, ": cannot map: not a regular file"));
  }
  const int64_t file_bytes = st.st_size;
  if (file_bytes < 8) {
    ::close(fd);
    return invalid(absl::StrCat(file_bytes, " bytes, shorter than the 8-byte header length"));
  }
  void* mapping = ::mmap(nullptr, static_cast<size_t>(file_bytes), PROT_READ, MAP_PRIVATE, fd, 0);
  absl::Status map_status = mapping == MAP_FAILED ? failed("map") : absl::OkStatus();
  ::close(fd);  // the mapping keeps the file
  if (!map_status.ok()) return map_status;

  // From here on the destructor unmaps, whatever the outcome.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->mapping_ = mapping;
  file->mapping_bytes_ = file_bytes;
  const auto* bytes = static_cast<const uint8_t*>(mapping);

  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | bytes[i];
  if (header_bytes > kMaxHeaderBytes || header_bytes > static_cast<uint64_t>(file_bytes - 8)) {
    return invalid(absl::StrCat("header length ", header_bytes, " exceeds the file's ",
                                file_bytes - 8, " bytes after it (or the ", kMaxHeaderBytes,
                                "-byte limit)"));
  }
  const auto* header_begin = reinterpret_cast<const char*>(bytes + 8);
  const uint8_t* data = bytes + 8 + header_bytes;
  const int64_t data_bytes = file_bytes - 8 - static_cast<int64_t>(header_bytes);

  Json header;
  try {
    header = Json::parse(header_begin, header_begin + header_bytes);
  } catch (const Json::exception& e) {
    return invalid(absl::StrCat("header is not JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return invalid(absl::StrCat("header is not a JSON object: ", Excerpt(header)));
  }

  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object() && !value.is_null()) {
        return invalid(absl::StrCat("__metadata__: expected an object, got ", Excerpt(value)));
      }
      continue;
    }
    absl::StatusOr<SafetensorsEntry> entry = ParseEntry(path, name, value, data, data_bytes);
    if (!entry.ok()) return entry.status();
    file->tensors_.emplace(name, *std::move(entry));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, static_cast<size_t>(mapping_bytes_));
}

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace attnserve
