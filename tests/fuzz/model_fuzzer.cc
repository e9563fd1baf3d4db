// Model directories' parsers on arbitrary bytes: the first byte picks the
// safetensors reader (even) or the config.json parser (odd); the rest is the
// file. The safetensors bytes go to an in-memory file (memfd) that
// SafetensorsFile::Open maps like a file on disk. Invariants: no crash or
// sanitizer report, every tensor the reader accepts lies inside the file (all
// its bytes are read), and every config accepted is one Model::Random takes.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "model/model.h"
#include "model/safetensors.h"

namespace {

void FuzzSafetensors(const uint8_t* data, size_t size) {
  const int fd = memfd_create("model_fuzzer", 0);
  if (fd < 0) std::abort();
  size_t written = 0;
  while (written < size) {
    const ssize_t n = write(fd, data + written, size - written);
    if (n <= 0) std::abort();
    written += static_cast<size_t>(n);
  }
  absl::StatusOr<std::unique_ptr<attnserve::SafetensorsFile>> file =
      attnserve::SafetensorsFile::Open("/proc/self/fd/" + std::to_string(fd));
  if (file.ok()) {
    // Every byte of every tensor is read (a range past the mapping faults);
    // the volatile sink keeps the reads.
    volatile uint64_t sum = 0;
    for (const auto& [name, entry] : (*file)->tensors()) {
      if (entry.bytes < 0 || static_cast<size_t>(entry.bytes) > size) std::abort();
      for (int64_t i = 0; i < entry.bytes; ++i) sum = sum + entry.data[i];
    }
  } else if (file.status().message().empty()) {
    std::abort();  // an error must say why
  }
  close(fd);
}

void FuzzConfig(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<attnserve::ModelConfig> config = attnserve::ParseModelConfig(text, "config.json");
  if (!config.ok()) {
    if (config.status().message().find("config.json") == std::string::npos) std::abort();
    return;
  }
  const attnserve::ModelConfig& c = *config;
  if (c.num_layers <= 0 || c.hidden_size <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 ||
      c.head_dim <= 0 || c.num_heads % c.num_kv_heads != 0) {
    std::abort();
  }
  if (c.rope.has_value() && (c.rope->rotary_dim <= 0 || c.rope->rotary_dim > c.head_dim ||
                             c.rope->rotary_dim % 2 != 0)) {
    std::abort();
  }
  // Small enough to make: the layer's weights from the parsed config.
  if (static_cast<int64_t>(c.hidden_size) * c.num_heads * c.head_dim <= (int64_t{1} << 16) &&
      c.num_layers <= 2) {
    absl::StatusOr<std::unique_ptr<attnserve::Model>> model =
        attnserve::Model::Random("fuzz", c, attnserve::DType::kF32, 1);
    if (!model.ok()) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  if (data[0] % 2 == 0) {
    FuzzSafetensors(data + 1, size - 1);
  } else {
    FuzzConfig(data + 1, size - 1);
  }
  return 0;
}
