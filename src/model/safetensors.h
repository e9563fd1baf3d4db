// SafetensorsFile: a memory-mapped .safetensors file (an 8-byte little-endian
// header length, a JSON header naming each tensor's dtype, shape and byte
// range, then the raw bytes). Tensors are views into the mapping, valid while
// the file object lives.
//
// Thread-compatible; const methods may be called concurrently.
#ifndef ATTNSERVE_MODEL_SAFETENSORS_H_
#define ATTNSERVE_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace attnserve {

struct SafetensorsEntry {
  std::string dtype;            // as written: "F32", "F16", "BF16", "I64", ...
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping
  int64_t bytes = 0;
};

class SafetensorsFile {
 public:
  // Maps `path` and parses its header. FAILED_PRECONDITION naming the file
  // when it cannot be opened or mapped; INVALID_ARGUMENT naming the file (and
  // the tensor) when the header is malformed: not JSON, a byte range outside
  // the data or not matching dtype × shape.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  // Null when the file has no such tensor.
  const SafetensorsEntry* Find(const std::string& name) const;
  const std::map<std::string, SafetensorsEntry>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* mapping_ = nullptr;
  int64_t mapping_bytes_ = 0;
  std::map<std::string, SafetensorsEntry> tensors_;
};

}  // namespace attnserve

#endif  // ATTNSERVE_MODEL_SAFETENSORS_H_
