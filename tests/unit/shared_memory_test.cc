#include "core/shared_memory.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A POSIX shared-memory object of `bytes` bytes, unlinked when destroyed.
class ShmObject {
 public:
  ShmObject(const std::string& tag, int64_t bytes)
      : key_(absl::StrCat("/attnserve_unit_", tag, "_", getpid())) {
    shm_unlink(key_.c_str());
    const int fd = shm_open(key_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << key_;
    EXPECT_EQ(ftruncate(fd, bytes), 0);
    close(fd);
  }
  ~ShmObject() { shm_unlink(key_.c_str()); }
  const std::string& key() const { return key_; }
  void Truncate(int64_t bytes) const {
    const int fd = shm_open(key_.c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, bytes), 0);
    close(fd);
  }

 private:
  std::string key_;
};

SharedMemoryRegionSpec Spec(std::string name, std::string key, int64_t offset, int64_t bytes) {
  return SharedMemoryRegionSpec{std::move(name), std::move(key), offset, bytes};
}

TEST(SharedMemoryTest, BadSpecsNameTheField) {
  ShmObject object("spec", 4096);
  SharedMemoryRegistry registry({});
  struct Case {
    SharedMemoryRegionSpec spec;
    std::string message;
  };
  const std::string long_name(129, 'a');
  const std::vector<Case> cases = {
      {Spec("", object.key(), 0, 16), "name: expected 1 to 128 characters of [A-Za-z0-9_.-], got \"\""},
      {Spec(long_name, object.key(), 0, 16), "name: expected 1 to 128"},
      {Spec("a b", object.key(), 0, 16), "got \"a b\""},
      {Spec("in", "noslash", 0, 16), "key: expected a shm_open name"},
      {Spec("in", "/", 0, 16), "key: expected"},
      {Spec("in", "/a/b", 0, 16), "got \"/a/b\""},
      {Spec("in", "/..", 0, 16), "not \"/.\" or \"/..\", got \"/..\""},
      {Spec("in", object.key(), -1, 16), "offset: expected >= 0, got -1"},
      {Spec("in", object.key(), 0, 0), "byte_size: expected > 0, got 0"},
      {Spec("in", object.key(), INT64_MAX, 2), "byte_size: expected offset + byte_size below 2^63"},
  };
  for (const Case& c : cases) {
    absl::Status s = registry.Register("", c.spec);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(s.message(), HasSubstr(c.message));
  }
  EXPECT_EQ(registry.regions(), 0);
}

TEST(SharedMemoryTest, ObjectsThatCannotBeMappedAreFailedPrecondition) {
  ShmObject object("small", 100);
  SharedMemoryRegistry registry({});
  absl::Status missing =
      registry.Register("", Spec("in", absl::StrCat("/attnserve_unit_none_", getpid()), 0, 8));
  EXPECT_EQ(missing.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(missing.message(), HasSubstr("No such file or directory"));
  absl::Status small = registry.Register("", Spec("in", object.key(), 50, 51));
  EXPECT_EQ(small.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(small.message(), HasSubstr("holds 100 bytes, less than offset + byte_size = 101"));
  EXPECT_TRUE(registry.Register("", Spec("in", object.key(), 50, 50)).ok());
}

TEST(SharedMemoryTest, RegionsBelongToTheirCaller) {
  ShmObject object("callers", 8192);
  SharedMemoryRegistry registry({});
  ASSERT_TRUE(registry.Register("alice", Spec("in", object.key(), 0, 4096)).ok());
  ASSERT_TRUE(registry.Register("bob", Spec("in", object.key(), 4096, 4096)).ok());
  EXPECT_EQ(registry.Register("alice", Spec("in", object.key(), 0, 16)).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Find("carol", "in").status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> a = registry.Find("alice", "in");
  absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> b = registry.Find("bob", "in");
  ASSERT_TRUE(a.ok() && b.ok());
  // Both map the same object: what one writes, the other's part shows.
  std::memset((*a)->data(), 7, 4096);
  std::memset((*b)->data(), 9, 4096);
  EXPECT_EQ((*a)->data()[4095], 7);
  EXPECT_EQ((*b)->data()[0], 9);
  EXPECT_EQ(registry.Unregister("carol", "in").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry.List("alice").size(), 1u);
  EXPECT_EQ(registry.regions(), 2);
  EXPECT_TRUE(registry.Unregister("alice", "").ok());
  EXPECT_TRUE(registry.List("alice").empty());
  EXPECT_EQ(registry.List("bob").size(), 1u);
  EXPECT_TRUE(registry.Unregister("alice", "").ok());  // none left: still OK
}

TEST(SharedMemoryTest, CapIsPerCaller) {
  ShmObject object("cap", 4096);
  SharedMemoryRegistry registry({.max_regions_per_caller = 2});
  ASSERT_TRUE(registry.Register("a", Spec("r1", object.key(), 0, 8)).ok());
  ASSERT_TRUE(registry.Register("a", Spec("r2", object.key(), 8, 8)).ok());
  absl::Status third = registry.Register("a", Spec("r3", object.key(), 16, 8));
  EXPECT_EQ(third.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.message(), HasSubstr("--max_shm_regions"));
  EXPECT_TRUE(registry.Register("b", Spec("r3", object.key(), 16, 8)).ok());
  ASSERT_TRUE(registry.Unregister("a", "r1").ok());
  EXPECT_TRUE(registry.Register("a", Spec("r3", object.key(), 16, 8)).ok());
  std::vector<std::string> names;
  for (const SharedMemoryRegionSpec& s : registry.List("a")) names.push_back(s.name);
  EXPECT_THAT(names, ElementsAre("r2", "r3"));
}

TEST(SharedMemoryTest, UnregisteredRegionStaysMappedWhileHeld) {
  ShmObject object("held", 3 * 4096);
  std::vector<std::pair<int64_t, int64_t>> seen;
  SharedMemoryRegistry registry(
      {.on_change = [&](int64_t regions, int64_t bytes) { seen.emplace_back(regions, bytes); }});
  // An offset inside a page: the mapping starts at the page, data() at the offset.
  ASSERT_TRUE(registry.Register("", Spec("in", object.key(), 4096 + 100, 4096)).ok());
  EXPECT_EQ(registry.mapped_bytes(), 2 * 4096);
  std::shared_ptr<SharedMemoryRegion> held = *registry.Find("", "in");
  held->data()[0] = 42;
  ASSERT_TRUE(registry.Unregister("", "in").ok());
  EXPECT_EQ(registry.regions(), 0);
  EXPECT_EQ(registry.mapped_bytes(), 2 * 4096);  // still mapped: a request holds it
  EXPECT_EQ(held->data()[0], 42);
  EXPECT_TRUE(held->CheckIntact().ok());
  held.reset();
  EXPECT_EQ(registry.mapped_bytes(), 0);
  EXPECT_THAT(seen, ElementsAre(std::pair<int64_t, int64_t>(1, 2 * 4096),
                                std::pair<int64_t, int64_t>(0, 2 * 4096),
                                std::pair<int64_t, int64_t>(0, 0)));
}

TEST(SharedMemoryTest, TruncationIsSeenBeforeUse) {
  ShmObject object("trunc", 8192);
  SharedMemoryRegistry registry({});
  ASSERT_TRUE(registry.Register("", Spec("in", object.key(), 0, 8192)).ok());
  std::shared_ptr<SharedMemoryRegion> region = *registry.Find("", "in");
  object.Truncate(4096);
  absl::Status s = region->CheckIntact();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("region 'in' was truncated to 4096 bytes"));
  EXPECT_FALSE(region->broken());
}

// A SIGBUS that is not a fault in a region (another process's kill -BUS)
// still ends the process, as the handler installed before (a sanitizer's,
// which reports and exits or aborts) or the default action would, rather
// than leave it running without the handler.
TEST(SharedMemoryDeathTest, SentSigbusTerminatesAsWithoutTheHandler) {
  ASSERT_EXIT(
      {
        SharedMemoryRegistry registry({});
        kill(getpid(), SIGBUS);
        std::_Exit(0);  // reached only if the signal was swallowed
      },
      [](int status) { return !(WIFEXITED(status) && WEXITSTATUS(status) == 0); },
      "");
}

// The caller truncates the object between the check and the access: the
// access faults (SIGBUS), the handler puts zero pages there, and the process
// goes on; the region reports itself broken.
TEST(SharedMemoryTest, AccessPastTruncatedEndReadsZerosAndBreaksTheRegion) {
  ShmObject object("fault", 4 * 4096);
  SharedMemoryRegistry registry({});
  ASSERT_TRUE(registry.Register("", Spec("in", object.key(), 0, 4 * 4096)).ok());
  std::shared_ptr<SharedMemoryRegion> region = *registry.Find("", "in");
  std::memset(region->data(), 5, 4 * 4096);
  ASSERT_TRUE(region->CheckIntact().ok());
  object.Truncate(4096);
  volatile char* data = region->data();
  EXPECT_EQ(data[3 * 4096], 0);  // faulted: now a zero page
  data[2 * 4096] = 1;            // writes land on the zero pages
  EXPECT_EQ(data[2 * 4096], 1);
  EXPECT_EQ(data[0], 0);         // the whole mapping was replaced
  EXPECT_TRUE(region->broken());
  absl::Status s = region->CheckIntact();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("was truncated while a request used it"));
  // Other regions are untouched.
  ShmObject other("fault2", 4096);
  ASSERT_TRUE(registry.Register("", Spec("other", other.key(), 0, 4096)).ok());
  EXPECT_TRUE((*registry.Find("", "other"))->CheckIntact().ok());
}

}  // namespace
}  // namespace attnserve
