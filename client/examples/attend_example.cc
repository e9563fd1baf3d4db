// attend_example: what a service that calls attnserve looks like, linking the
// client library (attnserve_client) and nothing else of attnserve.
//
//   attend_example localhost:50051
//
// Sends one causal attention with its lse, then the same attention with the
// keys split in two parts merged by lse on this side (ShardedAttend, both
// parts to the same server), prints what came back and exits 0 when the two
// outputs agree (1 when they do not, 2 for a failed call).
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attention/request.h"
#include "client/client.h"
#include "core/tensor.h"

namespace {

using attnserve::AttentionRequest;
using attnserve::DType;
using attnserve::Tensor;
using attnserve::client::AttendResult;
using attnserve::client::AttnClient;

// Standard-normal F32 values in `shape`, from `rng`.
Tensor RandomF32(std::vector<int64_t> shape, std::mt19937& rng) {
  Tensor t = Tensor::Zeros(DType::kF32, std::move(shape));
  std::normal_distribution<float> normal;
  float* p = t.mutable_data<float>();
  for (int64_t i = 0; i < t.num_elements(); ++i) p[i] = normal(rng);
  return t;
}

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s HOST:PORT\n", argv[0]);
    return 2;
  }
  absl::StatusOr<std::unique_ptr<AttnClient>> client = AttnClient::Create(argv[1]);
  if (!client.ok()) return Fail("client", client.status());
  if (absl::Status s = (*client)->WaitForServing(absl::Seconds(10)); !s.ok()) {
    return Fail("health", s);
  }

  // GQA: 8 query heads over 2 KV heads; [batch, seq, heads, head_dim].
  std::mt19937 rng(0);
  const Tensor q = RandomF32({1, 64, 8, 32}, rng);
  const Tensor k = RandomF32({1, 256, 2, 32}, rng);
  const Tensor v = RandomF32({1, 256, 2, 32}, rng);
  AttentionRequest request;
  request.query = q.view();
  request.key = k.view();
  request.value = v.view();
  request.options.causal = true;
  request.outputs.lse = true;

  absl::StatusOr<AttendResult> whole = (*client)->Attend(request);
  if (!whole.ok()) return Fail("Attend", whole.status());
  std::printf("Attend: output %s, lse %s, backend %s, %lld us on the server\n",
              attnserve::ShapeString(whole->output.shape).c_str(),
              attnserve::ShapeString(whole->lse->shape).c_str(), whole->backend.c_str(),
              static_cast<long long>(whole->timing.total_us));

  AttnClient* const parts[] = {client->get(), client->get()};
  absl::StatusOr<AttendResult> split = AttnClient::ShardedAttend(parts, request);
  if (!split.ok()) return Fail("ShardedAttend", split.status());
  const float* a = whole->output.data_as<float>();
  const float* b = split->output.data_as<float>();
  double max_diff = 0;
  for (int64_t i = 0; i < whole->output.num_elements(); ++i) {
    max_diff = std::fmax(max_diff, std::fabs(double{a[i]} - double{b[i]}));
  }
  std::printf("ShardedAttend over 2 parts: output %s, max |difference| %.3g\n",
              attnserve::ShapeString(split->output.shape).c_str(), max_diff);
  if (split->output.shape != whole->output.shape || !(max_diff < 1e-4)) {
    std::fprintf(stderr, "the merged parts disagree with the whole attention\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
