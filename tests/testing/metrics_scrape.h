// Test helpers for the Prometheus endpoint: fetch GET /metrics over a plain
// loopback socket, and read one sample out of the text format.
#ifndef ATTNSERVE_TESTS_TESTING_METRICS_SCRAPE_H_
#define ATTNSERVE_TESTS_TESTING_METRICS_SCRAPE_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace attnserve::test_util {

// The value of the sample whose name and labels are exactly `series`; -1 if absent.
inline double SampleValue(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " ")) continue;
    double value = 0;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return -1;
}

// The whole HTTP response (status line, headers, body) of GET /metrics on
// 127.0.0.1:`port`; "" if the connection fails.
inline std::string HttpGetMetrics(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  const std::string request = "GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
    char buf[8192];
    for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, n);
  }
  close(fd);
  return response;
}

}  // namespace attnserve::test_util

#endif  // ATTNSERVE_TESTS_TESTING_METRICS_SCRAPE_H_
