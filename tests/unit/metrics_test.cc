#include "metrics/metrics.h"

#include <unistd.h>

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"
#include "tests/testing/metrics_scrape.h"
#include "metrics/process_collector.h"

namespace attnserve {
namespace {

// The value of the sample line that starts with `series` ("name{labels}"), or
// -1 if absent.
using ::attnserve::test_util::HttpGetMetrics;
using ::attnserve::test_util::SampleValue;

TEST(ParseProcStatTest, ReadsFieldsAfterACommandWithSpacesAndParens) {
  // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
  // utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss ...
  const std::string line =
      "4242 (attn serve) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 "
      "250 50 0 0 20 0 8 0 1000 1048576 256 18446744073709551615";
  absl::StatusOr<ProcessStat> stat = ParseProcStat(line, 100, 4096);
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_DOUBLE_EQ(stat->cpu_seconds, 3.0);
  EXPECT_DOUBLE_EQ(stat->start_time_seconds, 10.0);
  EXPECT_EQ(stat->virtual_memory_bytes, 1048576);
  EXPECT_EQ(stat->resident_memory_bytes, 256 * 4096);
}

TEST(ParseProcStatTest, RejectsATruncatedLine) {
  absl::StatusOr<ProcessStat> stat = ParseProcStat("1 (x) S 1 1 1", 100, 4096);
  EXPECT_EQ(stat.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(stat.status().message(), "expected at least 14 fields"))
      << stat.status();
  EXPECT_EQ(ParseProcStat("no parens here", 100, 4096).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ProcessCollectorTest, ReportsThisProcess) {
  std::vector<prometheus::MetricFamily> families = ProcessCollector().Collect();
  auto value = [&](absl::string_view name) {
    for (const auto& f : families) {
      if (f.name == name) return f.type == prometheus::MetricType::Counter
                                     ? f.metric.at(0).counter.value
                                     : f.metric.at(0).gauge.value;
    }
    return -1.0;
  };
  EXPECT_GT(value("process_resident_memory_bytes"), 1 << 20);
  EXPECT_GE(value("process_virtual_memory_bytes"), value("process_resident_memory_bytes"));
  EXPECT_GE(value("process_cpu_seconds_total"), 0);
  EXPECT_GE(value("process_open_fds"), 3);  // stdin, stdout, stderr at least
  EXPECT_GT(value("process_start_time_seconds"), 1.5e9);  // after 2017
  EXPECT_GE(value("process_max_fds"), value("process_open_fds"));
}

TEST(MetricsTest, BucketsSpanMicrosecondsToMinutes) {
  std::vector<double> b = DurationBuckets();
  EXPECT_DOUBLE_EQ(b.front(), 20e-6);
  EXPECT_GT(b.back(), 60.0);
  for (size_t i = 1; i < b.size(); ++i) EXPECT_DOUBLE_EQ(b[i], 2 * b[i - 1]);
  EXPECT_DOUBLE_EQ(BatchSizeBuckets().back(), 1024);
}

TEST(MetricsTest, TextFormatHasTheDesignNames) {
  absl::StatusOr<std::unique_ptr<Metrics>> created =
      Metrics::Create({.listen_address = "", .version = "9.8.7", .backends = {"cpu", "reference"}});
  ASSERT_TRUE(created.ok()) << created.status();
  Metrics& m = **created;

  m.RequestStarted();
  m.RequestStarted();
  m.RequestFinished();
  m.RecordRequest("Attend", absl::StatusCode::kOk, absl::Milliseconds(3));
  m.RecordRequest("Attend", absl::StatusCode::kOk, absl::Milliseconds(5));
  m.RecordRequest("Attend", absl::StatusCode::kInvalidArgument, absl::Microseconds(30));
  m.RecordCancellation("Attend");
  m.OnDequeue(absl::Microseconds(100));
  m.OnQueueDepth(7);
  m.OnBatch("cpu", 4, 1e6, absl::Milliseconds(2));
  m.OnBatch("cpu", 2, 5e5, absl::Milliseconds(1));

  const std::string text = m.TextFormat();
  EXPECT_EQ(SampleValue(text, R"(attnserve_requests_total{code="OK",method="Attend"})"), 2);
  EXPECT_EQ(SampleValue(text, R"(attnserve_requests_total{code="INVALID_ARGUMENT",method="Attend"})"),
            1);
  EXPECT_EQ(SampleValue(text, R"(attnserve_request_duration_seconds_count{method="Attend"})"), 3);
  // 3 ms and 5 ms are under the 5.12 ms bucket; 30 µs is under 40 µs.
  EXPECT_EQ(
      SampleValue(text, R"(attnserve_request_duration_seconds_bucket{method="Attend",le="4e-05"})"),
      1);
  EXPECT_EQ(SampleValue(text, R"(attnserve_cancelled_requests_total{method="Attend"})"), 1);
  EXPECT_EQ(SampleValue(text, R"(attnserve_queue_duration_seconds_count)"), 1);
  EXPECT_EQ(SampleValue(text, R"(attnserve_compute_duration_seconds_count{backend="cpu"})"), 2);
  EXPECT_EQ(SampleValue(text, R"(attnserve_batch_size_sum)"), 6);
  EXPECT_EQ(SampleValue(text, R"(attnserve_queue_depth)"), 7);
  EXPECT_EQ(SampleValue(text, R"(attnserve_inflight_requests)"), 1);
  EXPECT_EQ(SampleValue(text, R"(attnserve_flops_total{backend="cpu"})"), 1.5e6);
  EXPECT_EQ(SampleValue(text, R"(attnserve_build_info{backends="cpu,reference",version="9.8.7"})"),
            1);
  EXPECT_GT(SampleValue(text, "process_resident_memory_bytes"), 0);
  EXPECT_EQ(m.http_port(), 0);
}

// A backend that only reports its workspace.
class WorkspaceBackend : public Backend {
 public:
  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams&) const override { return absl::OkStatus(); }
  absl::Status Run(absl::Span<const AttentionParams>) override { return absl::OkStatus(); }
  int64_t workspace_bytes() const override { return 12345; }

 private:
  BackendInfo info_{.name = "fake"};
};

TEST(MetricsTest, SharedMemoryGaugesOnlyWhenShmIsOn) {
  auto off = Metrics::Create({});
  ASSERT_TRUE(off.ok());
  (*off)->SetSharedMemory(3, 4096);  // ignored: not exported
  EXPECT_FALSE(absl::StrContains((*off)->TextFormat(), "attnserve_shm_"));
  auto on = Metrics::Create({.shared_memory = true});
  ASSERT_TRUE(on.ok());
  EXPECT_EQ(SampleValue((*on)->TextFormat(), "attnserve_shm_regions"), 0);
  (*on)->SetSharedMemory(3, 8192);
  EXPECT_EQ(SampleValue((*on)->TextFormat(), "attnserve_shm_regions"), 3);
  EXPECT_EQ(SampleValue((*on)->TextFormat(), "attnserve_shm_bytes"), 8192);
}

TEST(MetricsTest, WorkspaceBytesIsReadAtScrapeTime) {
  auto m = Metrics::Create({});
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(absl::StrContains((*m)->TextFormat(), "attnserve_workspace_bytes"));
  WorkspaceBackend backend;
  (*m)->WatchBackend(&backend);
  EXPECT_EQ(SampleValue((*m)->TextFormat(), R"(attnserve_workspace_bytes{backend="fake"})"), 12345);
}

// A backend with device memory, as a GPU backend reports it.
class DeviceBackend : public WorkspaceBackend {
 public:
  DeviceMemory device_memory() const override { return memory; }
  DeviceMemory memory;
};

TEST(MetricsTest, DeviceMemoryOnlyForBackendsWithACapacity) {
  auto m = Metrics::Create({});
  ASSERT_TRUE(m.ok());
  WorkspaceBackend host;
  (*m)->WatchBackend(&host);
  EXPECT_FALSE(absl::StrContains((*m)->TextFormat(), "attnserve_device_memory_bytes"));
  DeviceBackend device;
  (*m)->WatchBackend(&device);
  EXPECT_FALSE(absl::StrContains((*m)->TextFormat(), "attnserve_device_memory_bytes"));
  device.memory = {.used_bytes = 1 << 20, .capacity_bytes = int64_t{8} << 30};
  const std::string text = (*m)->TextFormat();
  EXPECT_EQ(SampleValue(text, R"(attnserve_device_memory_bytes{device="fake",state="used"})"),
            1 << 20);
  EXPECT_EQ(SampleValue(text, R"(attnserve_device_memory_bytes{device="fake",state="capacity"})"),
            static_cast<double>(int64_t{8} << 30));
}

TEST(MetricsTest, QueueCapacityWhenGiven) {
  auto without = Metrics::Create({});
  ASSERT_TRUE(without.ok());
  EXPECT_FALSE(absl::StrContains((*without)->TextFormat(), "attnserve_queue_capacity"));
  auto with = Metrics::Create({.queue_capacity = 256});
  ASSERT_TRUE(with.ok());
  EXPECT_EQ(SampleValue((*with)->TextFormat(), "attnserve_queue_capacity"), 256);
}

// GET /metrics over a plain socket: the endpoint binds an ephemeral port and
// serves the same text.
TEST(MetricsTest, ServesHttpOnAnEphemeralPort) {
  auto m = Metrics::Create({.listen_address = "127.0.0.1:0"});
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->RecordRequest("GetServerInfo", absl::StatusCode::kOk, absl::Microseconds(50));
  const int port = (*m)->http_port();
  ASSERT_GT(port, 0);

  const std::string response = HttpGetMetrics(port);

  EXPECT_TRUE(absl::StartsWith(response, "HTTP/1.1 200")) << response.substr(0, 100);
  EXPECT_TRUE(absl::StrContains(response,
                                R"(attnserve_requests_total{code="OK",method="GetServerInfo"} 1)"));
  EXPECT_TRUE(absl::StrContains(response, "process_resident_memory_bytes"));
}

TEST(MetricsTest, UnusableListenAddressIsUnavailable) {
  auto m = Metrics::Create({.listen_address = "256.1.1.1:80"});
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
}

}  // namespace
}  // namespace attnserve
