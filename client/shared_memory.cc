#include "client/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/errors.h"

namespace attnserve::client {
namespace {

// "<what> <key>: <strerror>", with errno's status code.
absl::Status SystemError(int error, absl::string_view what, absl::string_view key) {
  return absl::ErrnoToStatus(error, absl::StrCat(what, " ", key));
}

// The byte count of `dtype` `shape`, or -1 when a dim is negative or the
// count does not fit.
int64_t TensorBytes(DType dtype, const std::vector<int64_t>& shape) {
  const int64_t n = CheckedElementCount(shape, INT64_MAX / 8);
  return n < 0 ? -1 : n * static_cast<int64_t>(DTypeSize(dtype));
}

// Maps `fd` (of `byte_size` bytes) read-write and shared; closes `fd`.
absl::StatusOr<char*> MapAndClose(int fd, int64_t byte_size, absl::string_view key) {
  void* p =
      mmap(nullptr, static_cast<size_t>(byte_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int error = errno;
  close(fd);
  if (p == MAP_FAILED) return SystemError(error, "mmap", key);
  return static_cast<char*>(p);
}

}  // namespace

absl::Status CheckShmKey(absl::string_view key, absl::string_view field) {
  bool ok = key.size() >= 2 && key.size() <= 255 && key[0] == '/';
  for (size_t i = 1; ok && i < key.size(); ++i) {
    const char c = key[i];
    ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
  }
  // "/." and "/.." name directories, not objects.
  if (ok && (key == "/." || key == "/..")) ok = false;
  if (ok) return absl::OkStatus();
  return InvalidField(field, "\"/\" then 1-254 of [A-Za-z0-9_.-]",
                      absl::StrCat("\"", absl::CEscape(key), "\""));
}

absl::StatusOr<SharedMemoryRegion> SharedMemoryRegion::Create(std::string key, int64_t byte_size,
                                                              mode_t mode) {
  if (absl::Status s = CheckShmKey(key); !s.ok()) return s;
  if (byte_size <= 0) return InvalidField("byte_size", "> 0", absl::StrCat(byte_size));
  const int fd = shm_open(key.c_str(), O_RDWR | O_CREAT | O_EXCL, mode);
  if (fd < 0) return SystemError(errno, "shm_open(O_CREAT | O_EXCL)", key);
  // shm_open applies the umask; the mode asked for is what the server needs.
  // The pages are allocated now: a tmpfs too small for them (Docker's 64 MiB
  // /dev/shm) is ENOSPC here instead of SIGBUS at the first write past it.
  int error = 0;
  absl::string_view call;
  if (fchmod(fd, mode) != 0) {
    error = errno;
    call = "fchmod";
  } else if (ftruncate(fd, byte_size) != 0) {
    error = errno;
    call = "ftruncate";
  } else if ((error = posix_fallocate(fd, 0, byte_size)) != 0) {
    call = "posix_fallocate";
  }
  if (error != 0) {
    close(fd);
    shm_unlink(key.c_str());
    return SystemError(error, absl::StrCat(call, " (", byte_size, " bytes)"), key);
  }
  absl::StatusOr<char*> data = MapAndClose(fd, byte_size, key);
  if (!data.ok()) {
    shm_unlink(key.c_str());
    return data.status();
  }
  return SharedMemoryRegion(std::move(key), *data, byte_size, /*owner=*/true);
}

absl::StatusOr<SharedMemoryRegion> SharedMemoryRegion::Open(std::string key) {
  if (absl::Status s = CheckShmKey(key); !s.ok()) return s;
  const int fd = shm_open(key.c_str(), O_RDWR, 0);
  if (fd < 0) return SystemError(errno, "shm_open", key);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int error = errno;
    close(fd);
    return SystemError(error, "fstat", key);
  }
  if (st.st_size <= 0) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat("shm object ", key, " is empty"));
  }
  absl::StatusOr<char*> data = MapAndClose(fd, st.st_size, key);
  if (!data.ok()) return data.status();
  return SharedMemoryRegion(std::move(key), *data, st.st_size, /*owner=*/false);
}

std::string SharedMemoryRegion::UniqueKey(absl::string_view prefix) {
  static std::atomic<uint64_t> counter{0};
  std::random_device device;
  return absl::StrCat("/", prefix, "_", getpid(), "_", counter.fetch_add(1), "_",
                      absl::Hex(device(), absl::kZeroPad8));
}

SharedMemoryRegion::SharedMemoryRegion(SharedMemoryRegion&& other) noexcept
    : key_(std::move(other.key_)),
      data_(std::exchange(other.data_, nullptr)),
      byte_size_(std::exchange(other.byte_size_, 0)),
      owner_(std::exchange(other.owner_, false)) {}

SharedMemoryRegion& SharedMemoryRegion::operator=(SharedMemoryRegion&& other) noexcept {
  if (this != &other) {
    Release();
    key_ = std::move(other.key_);
    data_ = std::exchange(other.data_, nullptr);
    byte_size_ = std::exchange(other.byte_size_, 0);
    owner_ = std::exchange(other.owner_, false);
  }
  return *this;
}

SharedMemoryRegion::~SharedMemoryRegion() { Release(); }

void SharedMemoryRegion::Release() {
  if (data_ != nullptr) munmap(data_, static_cast<size_t>(byte_size_));
  if (owner_) shm_unlink(key_.c_str());
  data_ = nullptr;
  byte_size_ = 0;
  owner_ = false;
}

absl::Status SharedMemoryRegion::Unlink() {
  if (shm_unlink(key_.c_str()) != 0) return SystemError(errno, "shm_unlink", key_);
  owner_ = false;
  return absl::OkStatus();
}

absl::StatusOr<TensorView> SharedMemoryRegion::View(int64_t offset, DType dtype,
                                                    std::vector<int64_t> shape) const {
  const int64_t n = TensorBytes(dtype, shape);
  if (n < 0) {
    return InvalidField("shape", "non-negative dims with a product that fits", ShapeString(shape));
  }
  if (offset < 0 || offset > byte_size_ || n > byte_size_ - offset) {
    return InvalidField(
        "offset",
        absl::StrCat("room for ", n, " bytes (", DTypeName(dtype), " ", ShapeString(shape), ") in ",
                     key_, " of ", byte_size_, " bytes"),
        absl::StrCat(offset));
  }
  return TensorView{dtype, std::move(shape), std::string_view(data_ + offset, n)};
}

absl::StatusOr<Tensor> SharedMemoryRegion::Read(int64_t offset, DType dtype,
                                                std::vector<int64_t> shape) const {
  absl::StatusOr<TensorView> v = View(offset, dtype, std::move(shape));
  if (!v.ok()) return v.status();
  return Tensor{v->dtype, std::move(v->shape), std::string(v->data)};
}

absl::StatusOr<TensorView> SharedMemoryRegion::Write(int64_t offset, const TensorView& t) {
  if (TensorBytes(t.dtype, t.shape) != static_cast<int64_t>(t.data.size())) {
    return InvalidField(
        "data", absl::StrCat("the bytes of ", DTypeName(t.dtype), " ", ShapeString(t.shape)),
        absl::StrCat(t.data.size(), " bytes"));
  }
  absl::StatusOr<TensorView> dest = View(offset, t.dtype, t.shape);
  if (!dest.ok()) return dest.status();
  if (!t.data.empty()) std::memmove(data_ + offset, t.data.data(), t.data.size());
  return dest;
}

}  // namespace attnserve::client
