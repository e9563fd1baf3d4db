#include "core/shared_memory.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/errors.h"

namespace attnserve {

struct SharedMemoryRegion::Counters {
  std::atomic<int64_t> regions{0};
  std::atomic<int64_t> mapped_bytes{0};
  std::function<void(int64_t, int64_t)> on_change;
  // Reports one at a time, each reading the counters as they are then, so
  // the last report made is never older than one made before it.
  mutable std::mutex report_mu;

  void Report() const {
    std::lock_guard<std::mutex> lock(report_mu);
    if (on_change) on_change(regions.load(), mapped_bytes.load());
  }
};

namespace {

// The fault handler's table: one slot per mapping, read lock-free from the
// handler. Each slot is a sequence lock: `seq` is odd while the slot is
// being filled or cleared, and a handler that reads begin, end and broken
// uses them only if `seq` was even and the same before and after, so it
// never pairs one mapping's begin with another's end (which would zero an
// unrelated range).
struct FaultSlot {
  std::atomic<bool> used{false};
  std::atomic<uint64_t> seq{0};
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<std::atomic<bool>*> broken{nullptr};
};
FaultSlot g_slots[kMaxSharedMemoryMappings];
struct sigaction g_previous_sigbus;

void OnSigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (FaultSlot& slot : g_slots) {
    const uint64_t seq = slot.seq.load(std::memory_order_acquire);
    if (seq % 2 != 0) continue;
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    std::atomic<bool>* const broken = slot.broken.load(std::memory_order_acquire);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (slot.seq.load(std::memory_order_relaxed) != seq) continue;
    if (begin == 0 || addr < begin || addr >= end) continue;
    // Zero pages over the whole mapping: the access that faulted, and every
    // later one, reads zeros (and writes go nowhere) instead of faulting.
    void* replaced = mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE,
                          MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (replaced == MAP_FAILED) break;
    if (broken != nullptr) broken->store(true, std::memory_order_release);
    return;  // the faulting instruction runs again, on the zero pages
  }
  // Not ours: whoever handled SIGBUS before.
  if ((g_previous_sigbus.sa_flags & SA_SIGINFO) != 0 && g_previous_sigbus.sa_sigaction != nullptr) {
    g_previous_sigbus.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN &&
      g_previous_sigbus.sa_handler != nullptr) {
    g_previous_sigbus.sa_handler(sig);
    return;
  }
  // The default action, as if no handler had been installed: terminate. The
  // signal raised here is pending until the handler returns (SIGBUS is
  // blocked meanwhile), so a SIGBUS another process sent (kill -BUS) ends the
  // process too, rather than leaving it running without this handler.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
  raise(SIGBUS);
}

void InstallSigbusHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous_sigbus);
  });
}

// A slot for [begin, end), or -1 when the table is full.
int ClaimSlot(uintptr_t begin, uintptr_t end, std::atomic<bool>* broken) {
  for (int i = 0; i < kMaxSharedMemoryMappings; ++i) {
    bool expected = false;
    if (!g_slots[i].used.compare_exchange_strong(expected, true)) continue;
    g_slots[i].seq.fetch_add(1, std::memory_order_acq_rel);  // odd: being filled
    g_slots[i].begin.store(begin, std::memory_order_release);
    g_slots[i].end.store(end, std::memory_order_release);
    g_slots[i].broken.store(broken, std::memory_order_release);
    g_slots[i].seq.fetch_add(1, std::memory_order_acq_rel);  // even: published
    return i;
  }
  return -1;
}

void ReleaseSlot(int i) {
  g_slots[i].seq.fetch_add(1, std::memory_order_acq_rel);  // odd: being cleared
  g_slots[i].begin.store(0, std::memory_order_release);
  g_slots[i].broken.store(nullptr, std::memory_order_release);
  g_slots[i].end.store(0, std::memory_order_release);
  g_slots[i].seq.fetch_add(1, std::memory_order_acq_rel);  // even: empty
  g_slots[i].used.store(false, std::memory_order_release);
}

bool IsNameChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '_' || c == '.' || c == '-';
}

// A caller's string for an error message: quoted, escaped, cut at 64 bytes.
std::string Quoted(const std::string& s) {
  const size_t kShown = 64;
  return absl::StrCat("\"", absl::CHexEscape(s.substr(0, kShown)), s.size() > kShown ? "..." : "",
                      "\"");
}

absl::Status CheckSpec(const SharedMemoryRegionSpec& spec) {
  if (spec.name.empty() || spec.name.size() > 128 ||
      !std::all_of(spec.name.begin(), spec.name.end(), IsNameChar)) {
    return InvalidField("name", "1 to 128 characters of [A-Za-z0-9_.-]", Quoted(spec.name));
  }
  const std::string rest = spec.key.empty() ? std::string() : spec.key.substr(1);
  if (spec.key.empty() || spec.key[0] != '/' || rest.empty() || rest.size() > 254 ||
      !std::all_of(rest.begin(), rest.end(), IsNameChar) || rest == "." || rest == "..") {
    return InvalidField("key",
                        "a shm_open name: \"/\" then 1 to 254 characters of [A-Za-z0-9_.-], "
                        "not \"/.\" or \"/..\"",
                        Quoted(spec.key));
  }
  if (spec.offset < 0) return InvalidField("offset", ">= 0", absl::StrCat(spec.offset));
  if (spec.byte_size <= 0) return InvalidField("byte_size", "> 0", absl::StrCat(spec.byte_size));
  if (spec.byte_size > INT64_MAX - spec.offset) {
    return InvalidField("byte_size", "offset + byte_size below 2^63",
                        absl::StrCat("offset ", spec.offset, " + byte_size ", spec.byte_size));
  }
  return absl::OkStatus();
}

std::string ErrnoText(int err) { return std::strerror(err); }

}  // namespace

SharedMemoryRegion::~SharedMemoryRegion() {
  if (slot_ >= 0) ReleaseSlot(slot_);
  if (map_base_ != nullptr) munmap(map_base_, map_bytes_);
  if (fd_ >= 0) close(fd_);
  if (counters_ != nullptr) {
    counters_->mapped_bytes.fetch_sub(static_cast<int64_t>(map_bytes_));
    counters_->Report();
  }
}

absl::Status SharedMemoryRegion::CheckIntact() const {
  if (broken()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shared-memory region '", spec_.name, "' (", spec_.key,
        ") was truncated while a request used it: an access past the object's end faulted, "
        "and the region now reads as zeros; register it again"));
  }
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("shared-memory region '", spec_.name,
                                                      "': fstat failed: ", ErrnoText(errno)));
  }
  if (st.st_size < spec_.offset + spec_.byte_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shared-memory region '", spec_.name, "' was truncated to ", st.st_size,
        " bytes: the object ", spec_.key, " must hold offset + byte_size = ",
        spec_.offset + spec_.byte_size, " bytes; register it again"));
  }
  return absl::OkStatus();
}

SharedMemoryRegistry::SharedMemoryRegistry(SharedMemoryOptions options)
    : options_(std::move(options)),
      counters_(std::make_shared<SharedMemoryRegion::Counters>()) {
  counters_->on_change = options_.on_change;
  InstallSigbusHandler();
}

SharedMemoryRegistry::~SharedMemoryRegistry() {
  absl::MutexLock lock(&mu_);
  counters_->regions.store(0);
  regions_.clear();  // regions still in use unmap when their last holder drops them
}

absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegistry::Map(
    const SharedMemoryRegionSpec& spec) {
  const int fd = shm_open(spec.key.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int err = errno;
    return absl::FailedPreconditionError(absl::StrCat(
        "key: cannot open the shared-memory object ", spec.key, ": ", ErrnoText(err),
        err == ENOENT ? " (the caller creates it with shm_open before registering it)"
        : err == EACCES
            ? " (the server's user needs read and write access to it)"
            : ""));
  }
  auto region = std::shared_ptr<SharedMemoryRegion>(new SharedMemoryRegion());
  region->spec_ = spec;
  region->fd_ = fd;  // closed by the region from here on
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("key: fstat of ", spec.key, " failed: ", ErrnoText(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("key: ", spec.key, " is not a regular shared-memory object"));
  }
  if (st.st_size < spec.offset + spec.byte_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "byte_size: the object ", spec.key, " holds ", st.st_size,
        " bytes, less than offset + byte_size = ", spec.offset + spec.byte_size));
  }
  const int64_t page = sysconf(_SC_PAGESIZE);
  const int64_t start = spec.offset / page * page;
  const int64_t length = spec.offset - start + spec.byte_size;
  const size_t mapped = static_cast<size_t>((length + page - 1) / page * page);
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, start);
  if (base == MAP_FAILED) {
    return absl::FailedPreconditionError(
        absl::StrCat("key: cannot map ", spec.key, ": ", ErrnoText(errno)));
  }
  region->map_base_ = base;
  region->map_bytes_ = mapped;
  region->data_ = static_cast<char*>(base) + (spec.offset - start);
  region->counters_ = counters_;
  counters_->mapped_bytes.fetch_add(static_cast<int64_t>(mapped));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(base);
  region->slot_ = ClaimSlot(begin, begin + mapped, &region->broken_);
  if (region->slot_ < 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server maps ", kMaxSharedMemoryMappings,
        " shared-memory regions already (all callers together); unregister some first"));
  }
  return region;
}

absl::Status SharedMemoryRegistry::Register(const std::string& caller,
                                            const SharedMemoryRegionSpec& spec) {
  if (absl::Status s = CheckSpec(spec); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = regions_.find(Key(caller, spec.name)); it != regions_.end()) {
      return absl::AlreadyExistsError(
          absl::StrCat("name: region '", spec.name, "' is already registered (key ",
                       it->second->spec().key, "); unregister it first"));
    }
    auto count = per_caller_.find(caller);
    if (count != per_caller_.end() && count->second >= options_.max_regions_per_caller) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "this caller holds ", count->second,
          " shared-memory regions, the most --max_shm_regions allows; unregister one first"));
    }
  }
  // The system calls run unlocked; the checks above are repeated below.
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> region = Map(spec);
  if (!region.ok()) return region.status();
  {
    absl::MutexLock lock(&mu_);
    if (regions_.contains(Key(caller, spec.name))) {
      return absl::AlreadyExistsError(
          absl::StrCat("name: region '", spec.name, "' is already registered"));
    }
    int32_t& count = per_caller_[caller];
    if (count >= options_.max_regions_per_caller) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "this caller holds ", count,
          " shared-memory regions, the most --max_shm_regions allows; unregister one first"));
    }
    ++count;
    regions_.emplace(Key(caller, spec.name), *std::move(region));
    counters_->regions.fetch_add(1);
  }
  Report();
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::Unregister(const std::string& caller, const std::string& name) {
  // Dropped outside the lock: a region no request uses unmaps here.
  std::vector<std::shared_ptr<SharedMemoryRegion>> dropped;
  {
    absl::MutexLock lock(&mu_);
    if (name.empty()) {
      for (auto it = regions_.begin(); it != regions_.end();) {
        if (it->first.first == caller) {
          dropped.push_back(std::move(it->second));
          regions_.erase(it++);
        } else {
          ++it;
        }
      }
    } else {
      auto it = regions_.find(Key(caller, name));
      if (it == regions_.end()) {
        return absl::NotFoundError(absl::StrCat(
            "name: expected a region this caller registered, got '", name, "'"));
      }
      dropped.push_back(std::move(it->second));
      regions_.erase(it);
    }
    if (dropped.empty()) return absl::OkStatus();
    auto count = per_caller_.find(caller);
    count->second -= static_cast<int32_t>(dropped.size());
    if (count->second == 0) per_caller_.erase(count);
    counters_->regions.fetch_sub(static_cast<int64_t>(dropped.size()));
  }
  dropped.clear();
  Report();
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegistry::Find(
    const std::string& caller, const std::string& name) const {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(Key(caller, name));
  if (it == regions_.end()) {
    return absl::NotFoundError(absl::StrCat("no shared-memory region '", name,
                                            "' registered by this caller"));
  }
  return it->second;
}

std::vector<SharedMemoryRegionSpec> SharedMemoryRegistry::List(const std::string& caller) const {
  std::vector<SharedMemoryRegionSpec> out;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, region] : regions_) {
      if (key.first == caller) out.push_back(region->spec());
    }
  }
  std::sort(out.begin(), out.end(),
            [](const SharedMemoryRegionSpec& a, const SharedMemoryRegionSpec& b) {
              return a.name < b.name;
            });
  return out;
}

int64_t SharedMemoryRegistry::regions() const { return counters_->regions.load(); }
int64_t SharedMemoryRegistry::mapped_bytes() const { return counters_->mapped_bytes.load(); }

void SharedMemoryRegistry::Report() const { counters_->Report(); }

}  // namespace attnserve
