// attnctl: command-line client for attnserve.
//
//   attnctl [--target=HOST:PORT] info [--json]
//   attnctl [--target=HOST:PORT] health [--service=NAME]
//   attnctl [--target=HOST:PORT] attend (--q=q.npy --k=k.npy --v=v.npy | --shape=S1|B,Lq,Hq,Lk,Hkv,D)
//           [options] [--out=o.npy] [--lse_out=lse.npy] [--weights_out=w.npy] ...
//           [--entropy] [--entropy_out=e.npy]
//           [--heatmap=w.png [--heads=0,3,5] [--heatmap_log] [--tokens=FILE] [--batch_row=0]]
//           [--bertviz=w.json] [--shm]
//           [--block_mask=m.npz | --key_indices=i.npy [--query_block=N] [--key_block=N]]
//           [--global_tokens=0,1,...] [--sink_logits=a,b,...]
//   attnctl [--target=HOST:PORT] bench --shape=S1 [--concurrency=N | --rate=QPS] [--stream]
//           [--duration=10s] [--json] [--shm]
//   attnctl [--target=HOST:PORT] bench --sessions=N [--context=T] [--decode_tokens=1]
//           [--concurrency=C] [--shape=P4 | --hq=32 --hkv=8 --d=128] [--cache_dtype=f32|bf16|f16]
//           [--layers=L [--batched]] [--duration=10s] [--json]
//
// Exit status: 0 success, 1 the server answered an error (or not SERVING),
// 2 bad usage.
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <csignal>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/heatmap.h"
#include "client/load_generator.h"
#include "client/load_shm.h"
#include "client/session_load.h"
#include "client/shapes.h"
#include "client/shared_memory.h"
#include "core/npy.h"

ABSL_FLAG(std::string, target, "localhost:50051", "server address HOST:PORT");
ABSL_FLAG(std::string, deadline, "30s", "deadline of each call (e.g. 500ms, 30s)");
ABSL_FLAG(bool, tls, false, "connect with TLS, verifying the server against the system roots");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA bundle to verify the server with (implies --tls)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (implies --tls)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "name to check the server certificate against instead of the target's host");
ABSL_FLAG(std::string, token, "",
          "bearer token sent as 'authorization: Bearer <token>' (servers with "
          "--auth_tokens_file); default: $ATTNSERVE_TOKEN");
ABSL_FLAG(bool, json, false, "info, bench: print one JSON line");
ABSL_FLAG(std::string, service, "", "health: the service to ask about (empty: the server)");

// attend and bench: the request.
ABSL_FLAG(std::string, q, "", "query .npy [B, Lq, Hq, D]");
ABSL_FLAG(std::string, k, "", "key .npy [B, Lk, Hkv, D]");
ABSL_FLAG(std::string, v, "", "value .npy [B, Lk, Hkv, Dv]");
ABSL_FLAG(std::string, shape, "",
          "random inputs: a benchmark id (P1, P2, P3, P4, S1) or B,Lq,Hq,Lk,Hkv,D");
ABSL_FLAG(uint64_t, seed, 1, "seed of the random inputs and of open-loop arrivals");
ABSL_FLAG(std::string, dtype, "", "f32, f16 or bf16 (default: the inputs' dtype, f32 if random)");
ABSL_FLAG(bool, causal, false, "causal mask (bottom-right aligned unless --top_left)");
ABSL_FLAG(bool, top_left, false, "align the causal diagonal and window top-left (PyTorch)");
ABSL_FLAG(int32_t, window_left, -1, "sliding window: keys to the left of the diagonal (-1: all)");
ABSL_FLAG(int32_t, window_right, -1, "sliding window: keys to the right of the diagonal (-1: all)");
ABSL_FLAG(float, softcap, 0.f, "soft-capping of the scores (0: off)");
ABSL_FLAG(float, scale, 0.f, "score scale (0: 1/sqrt(D))");
ABSL_FLAG(std::string, alibi_slopes, "", "ALiBi slopes, one per query head: comma list, or 'auto'");
ABSL_FLAG(std::string, bias, "", "additive bias .npy, broadcastable to [B, Hq, Lq, Lk]");
ABSL_FLAG(std::string, key_lengths, "", "keys per batch row, comma list");
ABSL_FLAG(bool, linear, false, "linear attention (elu+1 feature map) instead of softmax");
ABSL_FLAG(int32_t, top_k, 0, "return the k most attended keys per query");
ABSL_FLAG(std::string, backend, "", "backend to run on (default: the server's)");
ABSL_FLAG(int32_t, priority, 0, "0 normal, 1 high");
ABSL_FLAG(std::string, out, "", "attend: write the output here (.npy)");
ABSL_FLAG(bool, shm, false,
          "attend, bench: pass the inputs and the output through POSIX shared memory instead of "
          "the messages (a server on this host with --allow_shared_memory)");
ABSL_FLAG(std::string, lse_out, "", "attend: request and write the log-sum-exp [B, Hq, Lq]");
ABSL_FLAG(std::string, weights_out, "", "attend: request and write the weights [B, Hq, Lq, Lk]");
ABSL_FLAG(std::string, top_k_indices_out, "", "attend: write the top-k indices (with --top_k)");
ABSL_FLAG(std::string, top_k_weights_out, "", "attend: write the top-k weights (with --top_k)");
ABSL_FLAG(bool, entropy, false,
          "attend: request and print the attention entropy -sum p ln p (nats) per query and head");
ABSL_FLAG(std::string, entropy_out, "", "attend: request and write the entropy [B, Hq, Lq] (.npy)");
// attend: sparse attention (README "Sparse attention").
ABSL_FLAG(std::string, block_mask, "",
          "attend: block-sparse mask, an .npz (np.savez or np.savez_compressed) of integer arrays "
          "indptr and indices (optional full_indptr, full_indices) and integer scalars block_rows, "
          "block_cols, as BlockMask in the proto");
ABSL_FLAG(std::string, key_indices, "",
          "attend: the keys each query sees, an integer .npy [B, Hq or Hkv or 1, "
          "ceil(Lq / query_block), k] of key (block) numbers, -1 padding");
ABSL_FLAG(int32_t, query_block, 1, "attend --key_indices: query rows per index row");
ABSL_FLAG(int32_t, key_block, 1, "attend --key_indices: keys per index");
ABSL_FLAG(std::string, global_tokens, "",
          "attend: key positions every query sees and whose queries see every key, comma list");
ABSL_FLAG(std::string, sink_logits, "",
          "attend: one sink logit per query head, comma list: exp(sink) joins each row's softmax "
          "denominator");
// attend: looking at the weights.
ABSL_FLAG(std::string, heatmap, "",
          "attend: request the weights and draw them as a PNG here: one tile per head, queries "
          "down, keys across, axes over 256 max-pooled");
ABSL_FLAG(std::string, heads, "",
          "attend --heatmap/--bertviz: the query heads to request and show, e.g. 0,3,5 or 0-3 "
          "(the request then carries only those heads, so --out, --lse_out... are theirs too); "
          "default all (the heatmap draws the first 16)");
ABSL_FLAG(bool, heatmap_log, false, "attend --heatmap: colour by log10 of the weight");
ABSL_FLAG(std::string, tokens, "",
          "attend --heatmap/--bertviz: token labels, one per line; self-attention only, their "
          "count must equal Lq = Lk");
ABSL_FLAG(int64_t, batch_row, 0, "attend --heatmap/--bertviz: the batch row to show");
ABSL_FLAG(std::string, bertviz, "",
          "attend: request the weights and write them with the tokens as JSON for bertviz's "
          "head_view: {\"attention\": [[1, H, L, L] per layer], \"tokens\": [...]}");

// bench
ABSL_FLAG(int32_t, concurrency, 0,
          "bench: calls in flight (closed loop); 0: 1, or with --sessions every session");
ABSL_FLAG(double, rate, 0, "bench: open loop at this many calls per second (Poisson arrivals)");
ABSL_FLAG(bool, stream, false, "bench: send on AttendStream streams instead of unary calls");
ABSL_FLAG(int32_t, streams, 1, "bench: streams per connection with --stream");
ABSL_FLAG(int32_t, channels, 1, "bench: connections to the server");
ABSL_FLAG(std::string, duration, "10s", "bench: how long to send (e.g. 2s, 1m; a bare number is seconds)");
ABSL_FLAG(std::string, warmup, "0s", "bench: unmeasured run before the measurement");
ABSL_FLAG(int64_t, max_in_flight, 100000, "bench: open-loop calls in flight before arrivals are dropped");
// bench --sessions: decode steps over KV-cache sessions.
ABSL_FLAG(int32_t, sessions, 0,
          "bench: decode across this many KV-cache sessions instead of sending Attend calls");
ABSL_FLAG(int64_t, context, -1,
          "bench --sessions: tokens prefilled per session (-1: the shape's Lk, 4096 for P4)");
ABSL_FLAG(int32_t, decode_tokens, 1, "bench --sessions: new tokens per decode step");
ABSL_FLAG(int32_t, hq, 0, "bench --sessions: query heads (0: the shape's, P4 by default)");
ABSL_FLAG(int32_t, hkv, 0, "bench --sessions: KV heads (0: the shape's)");
ABSL_FLAG(int32_t, d, 0, "bench --sessions: head dim (0: the shape's)");
ABSL_FLAG(std::string, cache_dtype, "f32",
          "bench --sessions: storage dtype of the sessions' cache: f32, f16 or bf16");
ABSL_FLAG(int32_t, layers, 1,
          "bench --sessions: model-shaped run when > 1: sessions of this many layers, each "
          "token stepping every layer in order over all sessions");
ABSL_FLAG(bool, batched, false,
          "bench --sessions: model-shaped run where each layer-step is one BatchDecode over "
          "all sessions instead of one Decode per session");
ABSL_FLAG(bool, progress, false, "bench: print the progress line even when stderr is not a terminal");

namespace attnserve::client {
namespace {

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

int Fail(const absl::Status& status, int code = kExitError) {
  std::cerr << "attnctl: " << status << "\n";
  return code;
}

absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& v) {
  double seconds = 0;
  if (absl::SimpleAtod(v, &seconds)) return absl::Seconds(seconds);
  absl::Duration d;
  if (absl::ParseDuration(v, &d)) return d;
  return absl::InvalidArgumentError(
      absl::StrCat("--", name, ": expected a duration such as 2s or 500ms, got \"", v, "\""));
}

template <typename T>
absl::StatusOr<std::vector<T>> ParseList(const std::string& name, const std::string& v) {
  std::vector<T> out;
  for (absl::string_view part : absl::StrSplit(v, ',', absl::SkipWhitespace())) {
    T x{};
    bool ok;
    if constexpr (std::is_same_v<T, float>) {
      ok = absl::SimpleAtof(absl::StripAsciiWhitespace(part), &x);
    } else {
      ok = absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &x);
    }
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", name, ": expected a comma-separated list of numbers, got \"", v, "\""));
    }
    out.push_back(x);
  }
  return out;
}

// ALiBi's standard slopes for `n` heads: the geometric sequence 2^(-8i/n)
// (exact for a power of two, as in the ALiBi paper's reference code).
std::vector<float> DefaultAlibiSlopes(int64_t n) {
  std::vector<float> slopes;
  for (int64_t i = 1; i <= n; ++i) slopes.push_back(std::exp2(-8.0f * i / n));
  return slopes;
}

// The tensors of a request (owned) and the request viewing them.
struct Inputs {
  Tensor q, k, v;
  std::optional<Tensor> bias;
  std::map<std::string, Tensor> block_mask;  // --block_mask's arrays by name
  std::optional<Tensor> key_indices;
  AttentionRequest request;
  CallOptions call;
  double flops = 0;
  std::string shape_name;
};

absl::StatusOr<Tensor> ReadInput(const std::string& flag, const std::string& path,
                                 std::optional<DType> dtype) {
  absl::StatusOr<Tensor> t = ReadNpy(path);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat("--", flag, "=", path, ": ",
                                                        t.status().message()));
  }
  if (!dtype.has_value() || t->dtype == *dtype) return t;
  return ConvertTensor(*t, *dtype);
}

// .npz reading: a zip archive of .npy members, as NumPy's savez (stored) and
// savez_compressed (deflated) write them. Just enough of the zip format for
// those: the central directory (zip64 fields too: NumPy marks its members
// zip64), stored or deflated members, each checked against its CRC-32.

uint64_t ReadLittleEndian(std::string_view bytes, size_t at, int width) {
  uint64_t v = 0;
  for (int i = width - 1; i >= 0; --i) v = v << 8 | static_cast<uint8_t>(bytes[at + i]);
  return v;
}

absl::Status Malformed(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("not a readable .npz: ", what));
}

// The bytes of one member, inflated if deflated; `entry` is its central
// directory header, `sizes` its sizes and local header offset (zip64 resolved).
absl::StatusOr<std::string> NpzMember(std::string_view zip, size_t entry, uint64_t packed_size,
                                      uint64_t size, uint64_t local, absl::string_view name) {
  constexpr uint64_t kMaxMemberBytes = uint64_t{1} << 31;
  const int method = static_cast<int>(ReadLittleEndian(zip, entry + 10, 2));
  const uint32_t crc = static_cast<uint32_t>(ReadLittleEndian(zip, entry + 16, 4));
  if (local > zip.size() || zip.size() - local < 30 ||
      ReadLittleEndian(zip, local, 4) != 0x04034b50) {
    return Malformed(absl::StrCat(name, ": no local header at offset ", local));
  }
  const uint64_t start = local + 30 + ReadLittleEndian(zip, local + 26, 2) +
                         ReadLittleEndian(zip, local + 28, 2);
  if (start > zip.size() || zip.size() - start < packed_size) {
    return Malformed(absl::StrCat(name, ": ", packed_size, " bytes past the end of the file"));
  }
  if (size > kMaxMemberBytes) {
    return Malformed(absl::StrCat(name, ": ", size, " bytes, more than ", kMaxMemberBytes));
  }
  // Deflate expands at most 1032 to 1: a claimed size past that is a lie,
  // refused before its memory is allocated.
  if (method == 8 && size > packed_size * 1032 + 1024) {
    return Malformed(absl::StrCat(name, ": claims ", size, " bytes from ", packed_size,
                                  " deflated ones"));
  }
  const std::string_view packed = zip.substr(start, packed_size);
  std::string out;
  if (method == 0) {
    if (packed_size != size) return Malformed(absl::StrCat(name, ": stored sizes differ"));
    out.assign(packed);
  } else if (method == 8) {
    out.resize(size);
    z_stream z{};
    if (inflateInit2(&z, -MAX_WBITS) != Z_OK) return absl::InternalError("zlib inflateInit2");
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(packed.data()));
    z.avail_in = static_cast<uInt>(packed.size());
    z.next_out = reinterpret_cast<Bytef*>(out.data());
    z.avail_out = static_cast<uInt>(out.size());
    const int rc = inflate(&z, Z_FINISH);
    const uint64_t produced = z.total_out;
    inflateEnd(&z);
    if (rc != Z_STREAM_END || produced != size) {
      return Malformed(absl::StrCat(name, ": the deflated data does not inflate to ", size,
                                    " bytes"));
    }
  } else {
    return Malformed(absl::StrCat(name, ": compression method ", method,
                                  ", expected 0 (stored) or 8 (deflated)"));
  }
  const uint32_t actual = static_cast<uint32_t>(
      crc32(0, reinterpret_cast<const Bytef*>(out.data()), static_cast<uInt>(out.size())));
  if (actual != crc) return Malformed(absl::StrCat(name, ": CRC-32 mismatch"));
  return out;
}

// The .npy members of the .npz at `path`, by name without ".npy".
// NOT_FOUND when the file cannot be read; INVALID_ARGUMENT for anything else.
absl::StatusOr<std::map<std::string, Tensor>> ReadNpz(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError("cannot open the file");
  std::stringstream buffer;
  buffer << file.rdbuf();
  const std::string bytes = buffer.str();
  const std::string_view zip = bytes;
  // The end of central directory record: 22 bytes and a comment of < 64 KiB.
  constexpr size_t kEnd = 22;
  if (zip.size() < kEnd) return Malformed("shorter than a zip's end record");
  size_t end = std::string_view::npos;
  for (size_t at = zip.size() - kEnd + 1; at-- > 0 && zip.size() - at <= kEnd + 0xFFFF;) {
    if (ReadLittleEndian(zip, at, 4) == 0x06054b50) {
      end = at;
      break;
    }
  }
  if (end == std::string_view::npos) return Malformed("no zip end of central directory record");
  uint64_t entries = ReadLittleEndian(zip, end + 10, 2);
  uint64_t directory = ReadLittleEndian(zip, end + 16, 4);
  if (entries == 0xFFFF || directory == 0xFFFFFFFF) {  // zip64: the locator sits before
    if (end < 20 || ReadLittleEndian(zip, end - 20, 4) != 0x07064b50) {
      return Malformed("zip64 end record locator missing");
    }
    const uint64_t end64 = ReadLittleEndian(zip, end - 20 + 8, 8);
    if (end64 > zip.size() || zip.size() - end64 < 56 ||
        ReadLittleEndian(zip, end64, 4) != 0x06064b50) {
      return Malformed("zip64 end record missing");
    }
    entries = ReadLittleEndian(zip, end64 + 32, 8);
    directory = ReadLittleEndian(zip, end64 + 48, 8);
  }
  std::map<std::string, Tensor> out;
  uint64_t at = directory;
  for (uint64_t n = 0; n < entries; ++n) {
    if (at > zip.size() || zip.size() - at < 46 || ReadLittleEndian(zip, at, 4) != 0x02014b50) {
      return Malformed(absl::StrCat("central directory entry ", n, " missing"));
    }
    const uint64_t name_len = ReadLittleEndian(zip, at + 28, 2);
    const uint64_t extra_len = ReadLittleEndian(zip, at + 30, 2);
    const uint64_t comment_len = ReadLittleEndian(zip, at + 32, 2);
    if (zip.size() - at - 46 < name_len + extra_len + comment_len) {
      return Malformed(absl::StrCat("central directory entry ", n, " truncated"));
    }
    const std::string name(zip.substr(at + 46, name_len));
    const std::string shown = absl::CHexEscape(name);  // for messages
    uint64_t packed_size = ReadLittleEndian(zip, at + 20, 4);
    uint64_t size = ReadLittleEndian(zip, at + 24, 4);
    uint64_t local = ReadLittleEndian(zip, at + 42, 4);
    // The zip64 extra field holds, in this order, those of the three that read 0xFFFFFFFF.
    const std::string_view extra = zip.substr(at + 46 + name_len, extra_len);
    for (size_t e = 0; e + 4 <= extra.size();) {
      const uint64_t id = ReadLittleEndian(extra, e, 2), len = ReadLittleEndian(extra, e + 2, 2);
      if (e + 4 + len > extra.size()) break;
      if (id == 1) {
        size_t field = e + 4;
        for (uint64_t* v : {&size, &packed_size, &local}) {
          if (*v != 0xFFFFFFFF) continue;
          if (field + 8 > e + 4 + len) return Malformed(absl::StrCat(shown, ": short zip64 field"));
          *v = ReadLittleEndian(extra, field, 8);
          field += 8;
        }
      }
      e += 4 + len;
    }
    absl::StatusOr<std::string> member = NpzMember(zip, at, packed_size, size, local, shown);
    if (!member.ok()) return member.status();
    if (!absl::EndsWith(name, ".npy")) {
      return Malformed(absl::StrCat("member ", shown, ": expected a .npy"));
    }
    absl::StatusOr<Tensor> t = ParseNpy(*member);
    if (!t.ok()) {
      return absl::Status(t.status().code(), absl::StrCat(shown, ": ", t.status().message()));
    }
    out[name.substr(0, name.size() - 4)] = std::move(*t);
    at += 46 + name_len + extra_len + comment_len;
  }
  return out;
}

// Index arrays hold integers (int32, or NumPy's default int64 within int32's
// range, which ParseNpy narrows).
constexpr absl::string_view kInt32Hint =
    " (save integers: a.astype(np.int32), np.int32(16) for a scalar)";

// "--<flag>=<path>: <message>", the status's code kept; a refused .npy
// dtype gets kInt32Hint.
absl::Status FlagError(absl::string_view flag, absl::string_view path, const absl::Status& s) {
  const bool dtype = absl::StrContains(s.message(), ".npy descr");
  return absl::Status(s.code(), absl::StrCat("--", flag, "=", path, ": ", s.message(),
                                             dtype ? kInt32Hint : ""));
}

// --block_mask: the .npz's arrays into `inputs->block_mask`, viewed by a BlockMaskSpec.
absl::StatusOr<BlockMaskSpec> BlockMaskFromFlag(const std::string& path, Inputs* inputs) {
  const auto fail = [&](absl::string_view message) {
    return FlagError("block_mask", path, absl::InvalidArgumentError(message));
  };
  absl::StatusOr<std::map<std::string, Tensor>> arrays = ReadNpz(path);
  if (!arrays.ok()) return FlagError("block_mask", path, arrays.status());
  inputs->block_mask = *std::move(arrays);
  const std::map<std::string, Tensor>& a = inputs->block_mask;
  constexpr absl::string_view kNames[] = {"indptr", "indices", "block_rows", "block_cols",
                                          "full_indptr", "full_indices"};
  for (const auto& [name, t] : a) {
    if (std::find(std::begin(kNames), std::end(kNames), name) == std::end(kNames)) {
      return fail(absl::StrCat("array ", absl::CHexEscape(name), ": expected only ",
                               absl::StrJoin(kNames, ", ")));
    }
    if (t.dtype != DType::kI32) {
      return fail(absl::StrCat(name, ": expected int32, got ", DTypeName(t.dtype), kInt32Hint));
    }
  }
  for (absl::string_view name : {"indptr", "indices", "block_rows", "block_cols"}) {
    if (!a.contains(std::string(name))) {
      return fail(absl::StrCat(name, ": expected an array of this name, got none"));
    }
  }
  if (a.contains("full_indptr") != a.contains("full_indices")) {
    return fail("full_indptr, full_indices: expected both or neither");
  }
  BlockMaskSpec spec;
  for (auto [name, dest] : {std::pair{"block_rows", &spec.block_rows},
                            std::pair{"block_cols", &spec.block_cols}}) {
    const Tensor& t = a.at(name);
    if (t.num_elements() != 1 || t.shape.size() > 1) {
      return fail(absl::StrCat(name, ": expected a scalar, got shape ", ShapeString(t.shape)));
    }
    std::memcpy(dest, t.data.data(), 4);
  }
  spec.indptr = a.at("indptr").view();
  spec.indices = a.at("indices").view();
  if (a.contains("full_indptr")) {
    spec.full_indptr = a.at("full_indptr").view();
    spec.full_indices = a.at("full_indices").view();
  }
  return spec;
}

// --block_mask, --key_indices (with --query_block, --key_block),
// --global_tokens and --sink_logits into the request's sparsity.
absl::Status SparsityFromFlags(Inputs* inputs) {
  SparsitySpec& s = inputs->request.sparsity;
  const std::string block_mask = absl::GetFlag(FLAGS_block_mask);
  const std::string key_indices = absl::GetFlag(FLAGS_key_indices);
  const int32_t query_block = absl::GetFlag(FLAGS_query_block);
  const int32_t key_block = absl::GetFlag(FLAGS_key_block);
  if (!block_mask.empty() && !key_indices.empty()) {
    return absl::InvalidArgumentError(
        "--block_mask, --key_indices: expected one or neither (a row's keys come from one "
        "pattern), got both");
  }
  if (key_indices.empty() && (query_block != 1 || key_block != 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--query_block, --key_block: expected --key_indices with them, got none (",
        query_block, ", ", key_block, ")"));
  }
  if (!block_mask.empty()) {
    absl::StatusOr<BlockMaskSpec> m = BlockMaskFromFlag(block_mask, inputs);
    if (!m.ok()) return m.status();
    s.block_mask = *std::move(m);
  }
  if (!key_indices.empty()) {
    absl::StatusOr<Tensor> t = ReadNpy(key_indices);
    if (!t.ok()) return FlagError("key_indices", key_indices, t.status());
    if (t->dtype != DType::kI32) {
      return FlagError("key_indices", key_indices,
                       absl::InvalidArgumentError(absl::StrCat(
                           "expected int32, got ", DTypeName(t->dtype), kInt32Hint)));
    }
    inputs->key_indices = *std::move(t);
    s.key_indices = KeySelectionSpec{inputs->key_indices->view(), query_block, key_block};
  }
  if (const std::string g = absl::GetFlag(FLAGS_global_tokens); !g.empty()) {
    absl::StatusOr<std::vector<int64_t>> tokens = ParseList<int64_t>("global_tokens", g);
    if (!tokens.ok()) return tokens.status();
    s.global_tokens = *std::move(tokens);
  }
  if (const std::string l = absl::GetFlag(FLAGS_sink_logits); !l.empty()) {
    absl::StatusOr<std::vector<float>> logits = ParseList<float>("sink_logits", l);
    if (!logits.ok()) return logits.status();
    s.sink_logits = *std::move(logits);
  }
  return absl::OkStatus();
}

// Heap-allocated so the request's views stay valid (small tensors live inside
// std::string and would move with it).
absl::StatusOr<std::unique_ptr<Inputs>> InputsFromFlags() {
  auto inputs = std::make_unique<Inputs>();
  std::optional<DType> dtype;
  if (!absl::GetFlag(FLAGS_dtype).empty()) {
    absl::StatusOr<DType> d = ParseDType(absl::GetFlag(FLAGS_dtype));
    if (!d.ok()) return d.status();
    dtype = *d;
  }
  const std::string shape_spec = absl::GetFlag(FLAGS_shape);
  const bool from_files = !absl::GetFlag(FLAGS_q).empty() || !absl::GetFlag(FLAGS_k).empty() ||
                          !absl::GetFlag(FLAGS_v).empty();
  bool causal = absl::GetFlag(FLAGS_causal);
  if (from_files == !shape_spec.empty()) {
    return absl::InvalidArgumentError(
        "inputs: expected either --q, --k and --v (.npy files) or --shape, got " +
        std::string(from_files ? "both" : "neither"));
  }
  if (from_files) {
    for (auto [flag, path, dest] : {std::tuple{"q", absl::GetFlag(FLAGS_q), &inputs->q},
                                    std::tuple{"k", absl::GetFlag(FLAGS_k), &inputs->k},
                                    std::tuple{"v", absl::GetFlag(FLAGS_v), &inputs->v}}) {
      if (path.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("--", flag, ": expected a .npy path, got none"));
      }
      absl::StatusOr<Tensor> t = ReadInput(flag, path, dtype);
      if (!t.ok()) return t.status();
      *dest = std::move(*t);
    }
    inputs->shape_name = ShapeString(inputs->q.shape);
  } else {
    absl::StatusOr<AttentionShape> shape = ParseAttentionShape(shape_spec);
    if (!shape.ok()) return shape.status();
    const DType dt = dtype.value_or(DType::kF32);
    const uint64_t seed = absl::GetFlag(FLAGS_seed);
    inputs->q = RandomTensor(dt, shape->query_shape(), seed);
    inputs->k = RandomTensor(dt, shape->key_shape(), seed + 1);
    inputs->v = RandomTensor(dt, shape->key_shape(), seed + 2);
    causal = causal || shape->causal;
    inputs->shape_name = shape->name;
  }
  if (!absl::GetFlag(FLAGS_bias).empty()) {
    absl::StatusOr<Tensor> b =
        ReadInput("bias", absl::GetFlag(FLAGS_bias), inputs->q.dtype);
    if (!b.ok()) return b.status();
    inputs->bias = std::move(*b);
  }

  AttentionRequest& r = inputs->request;
  r.query = inputs->q.view();
  r.key = inputs->k.view();
  r.value = inputs->v.view();
  if (inputs->bias.has_value()) r.bias = inputs->bias->view();
  if (!absl::GetFlag(FLAGS_key_lengths).empty()) {
    absl::StatusOr<std::vector<int32_t>> kl =
        ParseList<int32_t>("key_lengths", absl::GetFlag(FLAGS_key_lengths));
    if (!kl.ok()) return kl.status();
    r.key_lengths = std::move(*kl);
  }
  AttentionOptions& o = r.options;
  o.scale = absl::GetFlag(FLAGS_scale);
  o.causal = causal;
  o.causal_alignment =
      absl::GetFlag(FLAGS_top_left) ? CausalAlignment::kTopLeft : CausalAlignment::kBottomRight;
  o.window_left = absl::GetFlag(FLAGS_window_left);
  o.window_right = absl::GetFlag(FLAGS_window_right);
  o.softcap = absl::GetFlag(FLAGS_softcap);
  o.variant = absl::GetFlag(FLAGS_linear) ? Variant::kLinear : Variant::kSoftmax;
  const std::string alibi = absl::GetFlag(FLAGS_alibi_slopes);
  const int64_t heads_q = r.query.shape.size() >= 2 ? r.query.shape[r.query.shape.size() - 2] : 0;
  if (alibi == "auto") {
    o.alibi_slopes = DefaultAlibiSlopes(heads_q);
  } else if (!alibi.empty()) {
    absl::StatusOr<std::vector<float>> slopes = ParseList<float>("alibi_slopes", alibi);
    if (!slopes.ok()) return slopes.status();
    o.alibi_slopes = std::move(*slopes);
  }
  r.outputs.lse = !absl::GetFlag(FLAGS_lse_out).empty();
  r.outputs.entropy = absl::GetFlag(FLAGS_entropy) || !absl::GetFlag(FLAGS_entropy_out).empty();
  r.outputs.weights = !absl::GetFlag(FLAGS_weights_out).empty() ||
                      !absl::GetFlag(FLAGS_heatmap).empty() ||
                      !absl::GetFlag(FLAGS_bertviz).empty();
  r.outputs.top_k = absl::GetFlag(FLAGS_top_k);
  if (absl::Status st = SparsityFromFlags(inputs.get()); !st.ok()) return st;

  inputs->call.backend = absl::GetFlag(FLAGS_backend);
  inputs->call.priority = absl::GetFlag(FLAGS_priority);
  const std::vector<int64_t>& qs = r.query.shape;
  const std::vector<int64_t>& ks = r.key.shape;
  if (qs.size() >= 3 && ks.size() >= 3) {
    const int64_t b = qs.size() == 4 ? qs[0] : 1;
    const int64_t lq = qs[qs.size() - 3], lk = ks[ks.size() - 3], d = qs.back();
    inputs->flops = 4.0 * b * heads_q * double(lq) * lk * d;
    if (causal && lq == lk) inputs->flops /= 2;
  }
  return inputs;
}

absl::StatusOr<std::unique_ptr<AttnClient>> MakeClient(bool dedicated_connection = false) {
  absl::StatusOr<absl::Duration> deadline =
      ParseDurationFlag("deadline", absl::GetFlag(FLAGS_deadline));
  if (!deadline.ok()) return deadline.status();
  ClientOptions options;
  options.default_deadline = *deadline;
  options.dedicated_connection = dedicated_connection;
  options.tls = absl::GetFlag(FLAGS_tls);
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.bearer_token = absl::GetFlag(FLAGS_token);
  // From the environment by default, so the token need not show in `ps`.
  if (const char* env = std::getenv("ATTNSERVE_TOKEN"); options.bearer_token.empty() && env) {
    options.bearer_token = env;
  }
  return AttnClient::Create(absl::GetFlag(FLAGS_target), options);
}

// --channels dedicated connections for the load generators.
absl::StatusOr<std::vector<std::unique_ptr<AttnClient>>> OpenBenchChannels() {
  const int channels = absl::GetFlag(FLAGS_channels);
  if (channels < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--channels: expected >= 1, got ", channels));
  }
  std::vector<std::unique_ptr<AttnClient>> clients;
  for (int i = 0; i < channels; ++i) {
    absl::StatusOr<std::unique_ptr<AttnClient>> c = MakeClient(/*dedicated_connection=*/true);
    if (!c.ok()) return c.status();
    clients.push_back(*std::move(c));
  }
  return clients;
}

std::string DTypeList(const google::protobuf::RepeatedField<int>& dtypes) {
  std::vector<std::string> names;
  for (int d : dtypes) names.push_back(v1::DType_Name(static_cast<v1::DType>(d)));
  return absl::StrJoin(names, ",");
}

int CmdInfo() {
  absl::StatusOr<std::unique_ptr<AttnClient>> client = MakeClient();
  if (!client.ok()) return Fail(client.status(), kExitUsage);
  absl::StatusOr<v1::ServerInfo> info = (*client)->GetServerInfo();
  if (!info.ok()) return Fail(info.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::string json;
    google::protobuf::util::JsonPrintOptions opts;
    opts.preserve_proto_field_names = true;
    (void)google::protobuf::util::MessageToJsonString(*info, &json, opts);
    std::cout << json << "\n";
    return 0;
  }
  std::cout << "target          " << (*client)->target() << "\n"
            << "version         " << info->version() << "\n"
            << "default backend " << info->default_backend() << "\n"
            << "dtypes          " << DTypeList(info->dtypes()) << "\n";
  const v1::ServerLimits& l = info->limits();
  std::cout << absl::StrFormat(
      "limits          max_request_bytes=%d max_output_bytes=%d max_weights_bytes=%d "
      "max_top_k=%d max_head_dim=%d max_sparse_bytes=%d\n",
      l.max_request_bytes(), l.max_output_bytes(), l.max_weights_bytes(), l.max_top_k(),
      l.max_head_dim(), l.max_sparse_bytes());
  std::cout << absl::StrFormat(
      "budget          max_request_flops=%g memory_limit_bytes=%d memory_reserved_bytes=%d\n",
      l.max_request_flops(), l.memory_limit_bytes(), l.memory_reserved_bytes());
  for (const v1::BackendDescription& b : info->backends()) {
    std::cout << "backend " << b.name() << ": " << b.description() << "\n"
              << "  dtypes " << DTypeList(b.dtypes()) << ", max_head_dim " << b.max_head_dim()
              << "\n  features " << absl::StrJoin(b.features(), ",") << "\n";
  }
  if (!info->replica_id().empty() || info->peers_size() > 0) {
    std::cout << "replica " << info->replica_id() << ", peers "
              << (info->peers().empty() ? std::string("none")
                                        : absl::StrJoin(info->peers(), ","))
              << "\n";
  }
  for (const v1::ModelDescription& m : info->models()) {
    std::cout << absl::StrFormat(
        "model %s: %s (%s), %d layers, hidden %d, heads %d/%d, head_dim %d, %s weights%s%s\n",
        m.name(), m.family(), m.model_type(), m.num_layers(), m.hidden_size(), m.num_heads(),
        m.num_kv_heads(), m.head_dim(), v1::DType_Name(m.dtype()),
        m.cross_attention() ? ", cross-attention" : "", m.has_rotary() ? ", RoPE" : "");
  }
  return 0;
}

int CmdHealth() {
  absl::StatusOr<std::unique_ptr<AttnClient>> client = MakeClient();
  if (!client.ok()) return Fail(client.status(), kExitUsage);
  absl::StatusOr<ServingStatus> status = (*client)->CheckHealth(absl::GetFlag(FLAGS_service));
  if (!status.ok()) return Fail(status.status());
  std::cout << ServingStatusName(*status) << "\n";
  return *status == ServingStatus::kServing ? 0 : kExitError;
}

absl::Status WriteOutput(const std::string& flag, const std::string& path,
                         const std::optional<Tensor>& t) {
  if (path.empty()) return absl::OkStatus();
  if (!t.has_value()) {
    return absl::InternalError(absl::StrCat("--", flag, ": the server returned no such output"));
  }
  return WriteNpy(path, *t);
}

// The request's options in words, for the heatmap's title.
std::string OptionsDescription(const Inputs& inputs) {
  const AttentionOptions& o = inputs.request.options;
  std::vector<std::string> parts = {absl::StrCat(DTypeName(inputs.q.dtype), " inputs")};
  if (o.variant == Variant::kLinear) parts.push_back("linear attention");
  if (o.causal) {
    parts.push_back(o.causal_alignment == CausalAlignment::kTopLeft ? "causal (top-left)"
                                                                     : "causal");
  }
  if (o.window_left >= 0) parts.push_back(absl::StrCat("window_left=", o.window_left));
  if (o.window_right >= 0) parts.push_back(absl::StrCat("window_right=", o.window_right));
  if (o.scale != 0) parts.push_back(absl::StrCat("scale=", o.scale));
  if (o.softcap != 0) parts.push_back(absl::StrCat("softcap=", o.softcap));
  if (!o.alibi_slopes.empty()) parts.push_back("ALiBi");
  if (inputs.request.bias.has_value()) parts.push_back("bias " + absl::GetFlag(FLAGS_bias));
  if (!inputs.request.key_lengths.empty()) {
    parts.push_back("key_lengths=" + absl::StrJoin(inputs.request.key_lengths, ","));
  }
  const SparsitySpec& sparsity = inputs.request.sparsity;
  if (sparsity.block_mask.has_value()) parts.push_back("block mask " + absl::GetFlag(FLAGS_block_mask));
  if (sparsity.key_indices.has_value()) {
    parts.push_back("key indices " + absl::GetFlag(FLAGS_key_indices));
  }
  if (!sparsity.global_tokens.empty()) {
    parts.push_back("global_tokens=" + absl::StrJoin(sparsity.global_tokens, ","));
  }
  if (!sparsity.sink_logits.empty()) parts.push_back("sinks");
  return absl::StrJoin(parts, ", ");
}

// --heatmap, --bertviz and their flags, checked against the inputs before
// the call so a bad tokens file or head costs no server time.
struct WeightsViews {
  std::string heatmap, bertviz;
  std::vector<int64_t> heads;  // empty: every head in the request
  std::vector<std::string> tokens;
  int64_t batch_row = 0;
  bool any() const { return !heatmap.empty() || !bertviz.empty(); }
};

absl::StatusOr<WeightsViews> WeightsViewsFromFlags(const AttentionRequest& request) {
  WeightsViews v;
  v.heatmap = absl::GetFlag(FLAGS_heatmap);
  v.bertviz = absl::GetFlag(FLAGS_bertviz);
  v.batch_row = absl::GetFlag(FLAGS_batch_row);
  const std::string heads = absl::GetFlag(FLAGS_heads);
  const std::string tokens = absl::GetFlag(FLAGS_tokens);
  if (!v.any()) {
    if (!heads.empty() || !tokens.empty() || absl::GetFlag(FLAGS_heatmap_log) || v.batch_row != 0) {
      return absl::InvalidArgumentError(
          "--heads, --tokens, --heatmap_log, --batch_row: expected --heatmap or --bertviz with "
          "them, got neither");
    }
    return v;
  }
  if (absl::GetFlag(FLAGS_heatmap_log) && v.heatmap.empty()) {
    return absl::InvalidArgumentError("--heatmap_log: expected --heatmap with it, got none");
  }
  // Query [B, Lq, Hq, D] or [Lq, Hq, D]; key [B, Lk, Hkv, D] likewise.
  const std::vector<int64_t>& qs = request.query.shape;
  const std::vector<int64_t>& ks = request.key.shape;
  if ((qs.size() != 3 && qs.size() != 4) || ks.size() != qs.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--heatmap, --bertviz: expected a query and key of rank 3 or 4, got ", ShapeString(qs),
        " and ", ShapeString(ks)));
  }
  const int64_t batch = qs.size() == 4 ? qs[0] : 1;
  const int64_t lq = qs[qs.size() - 3], hq = qs[qs.size() - 2], lk = ks[ks.size() - 3];
  if (v.batch_row < 0 || v.batch_row >= batch) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--batch_row: expected in [0, %d) (the request's B), got %d", batch, v.batch_row));
  }
  if (!v.bertviz.empty() && lq != lk) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--bertviz=%s: head_view's self-attention form needs Lq == Lk, got Lq=%d Lk=%d",
        v.bertviz, lq, lk));
  }
  if (!heads.empty()) {
    absl::StatusOr<std::vector<int64_t>> h = ParseHeads(heads, hq);
    if (!h.ok()) return absl::InvalidArgumentError(absl::StrCat("--heads: ", h.status().message()));
    v.heads = *std::move(h);
  }
  if (!tokens.empty()) {
    absl::StatusOr<std::vector<std::string>> t = ReadTokens(tokens);
    if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat("--tokens: ", t.status().message()));
    if (absl::Status s = CheckTokens(*t, tokens, lq, lk); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens: ", s.message()));
    }
    v.tokens = *std::move(t);
  }
  return v;
}

// Prints entropy [B, Hq, Lq]: one line per batch row and head.
void PrintEntropy(const Tensor& e, const std::vector<int64_t>& head_numbers) {
  std::cout << absl::StrFormat("entropy %s %s nats (-sum p ln p per query; 0 for a fully masked "
                               "row)\n",
                               std::string(DTypeName(e.dtype)), ShapeString(e.shape));
  if (e.dtype != DType::kF32 || e.shape.size() != 3) return;
  const int64_t heads = e.shape[1], lq = e.shape[2];
  std::string line;
  for (int64_t b = 0; b < e.shape[0]; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      line = absl::StrFormat("  row %d head %d:", b,
                             head_numbers.empty() ? h : head_numbers[h]);
      for (int64_t i = 0; i < lq; ++i) {
        float x;
        std::memcpy(&x, e.data.data() + ((b * heads + h) * lq + i) * 4, 4);
        absl::StrAppendFormat(&line, " %.7g", x);
      }
      std::cout << line << "\n";
    }
  }
}

// attend --shm: the request's query, key, value (and bias) copied into a
// fresh shared-memory object with room for the output after them,
// registered with the server as this process's region. Destruction
// unregisters it and unlinks the object, also after an error.
class AttendShm {
 public:
  // Sets call->shm to name the tensors and the output's place.
  static absl::StatusOr<std::unique_ptr<AttendShm>> Place(AttnClient* client,
                                                          const AttentionRequest& request,
                                                          CallOptions* call) {
    const std::vector<int64_t>& qs = request.query.shape;
    const std::vector<int64_t>& vs = request.value.shape;
    if (qs.empty() || vs.empty()) {
      return absl::InvalidArgumentError("--shm: expected a query and a value with dims");
    }
    // The output is the query's shape with the value's last dim, in its dtype.
    std::vector<int64_t> output_shape = qs;
    output_shape.back() = vs.back();
    const int64_t output_bytes =
        CheckedElementCount(output_shape, INT64_MAX / 8) * DTypeSize(request.query.dtype);
    const TensorView* inputs[] = {&request.query, &request.key, &request.value,
                                  request.bias.has_value() ? &*request.bias : nullptr};
    std::optional<ShmRef>* refs[] = {&call->shm.query, &call->shm.key, &call->shm.value,
                                     &call->shm.bias};
    // Each tensor starts on a cache line.
    const auto aligned = [](int64_t n) { return (n + 63) / 64 * 64; };
    int64_t size = aligned(output_bytes);
    for (const TensorView* t : inputs) size += t == nullptr ? 0 : aligned(t->data.size());

    absl::StatusOr<SharedMemoryRegion> region = SharedMemoryRegion::Create(
        SharedMemoryRegion::UniqueKey("attnctl"), std::max<int64_t>(size, 1));
    if (!region.ok()) return region.status();
    auto shm = std::unique_ptr<AttendShm>(
        new AttendShm(client, absl::StrCat("attnctl_", getpid()), *std::move(region)));
    int64_t offset = 0;
    for (size_t i = 0; i < std::size(inputs); ++i) {
      if (inputs[i] == nullptr) continue;
      if (absl::StatusOr<TensorView> t = shm->region_.Write(offset, *inputs[i]); !t.ok()) {
        return t.status();
      }
      *refs[i] = ShmRef{shm->name_, offset};
      offset += aligned(inputs[i]->data.size());
    }
    call->shm.output = ShmRef{shm->name_, offset};
    if (absl::Status s = client->RegisterSharedMemory(shm->name_, shm->region_); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("--shm: RegisterSharedMemory(", shm->name_, ", ",
                                                 shm->region_.key(), "): ", s.message()));
    }
    shm->registered_ = true;
    return shm;
  }

  ~AttendShm() {
    if (registered_) client_->UnregisterSharedMemory(name_).IgnoreError();
  }

  // Copies the output the server wrote into the region into result->output.
  absl::Status ReadOutput(AttendResult* result) const {
    if (!result->output_shm.has_value()) {
      return absl::InternalError("--shm: the server answered the output inline, not in the region");
    }
    absl::StatusOr<Tensor> out =
        region_.Read(result->output_shm->offset, result->output.dtype, result->output.shape);
    if (!out.ok()) return out.status();
    result->output = *std::move(out);
    return absl::OkStatus();
  }

 private:
  AttendShm(AttnClient* client, std::string name, SharedMemoryRegion region)
      : client_(client), name_(std::move(name)), region_(std::move(region)) {}

  AttnClient* const client_;
  const std::string name_;
  SharedMemoryRegion region_;
  bool registered_ = false;
};

int CmdAttend() {
  absl::StatusOr<std::unique_ptr<Inputs>> inputs_or = InputsFromFlags();
  if (!inputs_or.ok()) return Fail(inputs_or.status(), kExitUsage);
  const std::unique_ptr<Inputs>& inputs = *inputs_or;
  absl::StatusOr<WeightsViews> views_or = WeightsViewsFromFlags(inputs->request);
  if (!views_or.ok()) return Fail(views_or.status(), kExitUsage);
  const WeightsViews& views = *views_or;
  // --heads: send only those query heads, so the weights stay small.
  const AttentionRequest* request = &inputs->request;
  std::unique_ptr<HeadSubset> subset;
  if (!views.heads.empty()) {
    if (!request->sparsity.empty()) {
      return Fail(absl::InvalidArgumentError(
                      "--heads: expected none with --block_mask, --key_indices, "
                      "--global_tokens or --sink_logits (their per-head parts are not "
                      "subset), got " + absl::GetFlag(FLAGS_heads)),
                  kExitUsage);
    }
    absl::StatusOr<std::unique_ptr<HeadSubset>> s = SelectQueryHeads(*request, views.heads);
    if (!s.ok()) return Fail(s.status(), kExitUsage);
    subset = *std::move(s);
    request = &subset->request;
  }
  absl::StatusOr<std::unique_ptr<AttnClient>> client = MakeClient();
  if (!client.ok()) return Fail(client.status(), kExitUsage);
  CallOptions call = inputs->call;
  std::unique_ptr<AttendShm> shm;  // before the result, which may view it
  if (absl::GetFlag(FLAGS_shm)) {
    absl::StatusOr<std::unique_ptr<AttendShm>> placed =
        AttendShm::Place(client->get(), *request, &call);
    if (!placed.ok()) return Fail(placed.status());
    shm = *std::move(placed);
  }
  absl::StatusOr<AttendResult> result = (*client)->Attend(*request, call);
  if (result.ok() && shm != nullptr) {
    if (absl::Status s = shm->ReadOutput(&*result); !s.ok()) result = s;
  }
  if (!result.ok()) {
    const int code = Fail(result.status());
    if (views.any() && result.status().code() == absl::StatusCode::kResourceExhausted) {
      const std::vector<int64_t>& qs = request->query.shape;
      const int64_t batch = qs.size() == 4 ? qs[0] : 1;
      const int64_t lq = qs[qs.size() - 3], hq = qs[qs.size() - 2];
      const int64_t lk = request->key.shape[request->key.shape.size() - 3];
      std::cerr << absl::StrFormat(
          "attnctl: hint: --heatmap and --bertviz need the weights, F32 [B, Hq, Lq, Lk] = "
          "[%d, %d, %d, %d] (%d bytes) here, and the server caps them (max_weights_bytes in "
          "`attnctl info`): ask for fewer heads with --heads (e.g. --heads=0,1) and send a "
          "shorter range of tokens (shorter --q/--k, or a smaller --shape)\n",
          batch, hq, lq, lk, batch * hq * lq * lk * 4);
    }
    return code;
  }

  struct Output {
    const char* flag;
    std::string path;
    std::optional<Tensor> tensor;
  };
  Output outputs[] = {
      {"out", absl::GetFlag(FLAGS_out), std::move(result->output)},
      {"lse_out", absl::GetFlag(FLAGS_lse_out), std::move(result->lse)},
      {"weights_out", absl::GetFlag(FLAGS_weights_out), std::move(result->weights)},
      {"top_k_indices_out", absl::GetFlag(FLAGS_top_k_indices_out),
       std::move(result->top_k_indices)},
      {"top_k_weights_out", absl::GetFlag(FLAGS_top_k_weights_out),
       std::move(result->top_k_weights)},
      {"entropy_out", absl::GetFlag(FLAGS_entropy_out), std::move(result->entropy)},
  };
  for (const Output& o : outputs) {
    if (absl::Status s = WriteOutput(o.flag, o.path, o.tensor); !s.ok()) return Fail(s);
  }
  const Tensor& out = *outputs[0].tensor;
  const ServerTiming& t = result->timing;
  std::cout << absl::StrFormat(
      "output %s %s%s  backend=%s queue_us=%d compute_us=%d batch_size=%d total_us=%d\n",
      std::string(DTypeName(out.dtype)), ShapeString(out.shape),
      outputs[0].path.empty() ? "" : " -> " + outputs[0].path, result->backend, t.queue_us,
      t.compute_us, t.batch_size, t.total_us);
  if (absl::GetFlag(FLAGS_entropy)) {
    if (!outputs[5].tensor.has_value()) {
      return Fail(absl::InternalError("--entropy: the server returned no entropy"));
    }
    PrintEntropy(*outputs[5].tensor, views.heads);
  }
  if (!views.any()) return 0;
  const std::optional<Tensor>& weights = outputs[2].tensor;
  if (!weights.has_value()) {
    return Fail(absl::InternalError("--heatmap, --bertviz: the server returned no weights"));
  }
  if (!views.heatmap.empty()) {
    HeatmapOptions options;
    options.batch_row = views.batch_row;
    options.log_scale = absl::GetFlag(FLAGS_heatmap_log);
    options.tokens = views.tokens;
    options.description = OptionsDescription(*inputs);
    if (!views.heads.empty()) {
      // The weights hold just the chosen heads: draw them all, under their numbers.
      for (size_t i = 0; i < views.heads.size(); ++i) options.heads.push_back(i);
      options.head_numbers = views.heads;
    }
    HeatmapGeometry g;
    const absl::Time start = absl::Now();
    if (absl::Status s = RenderHeatmap(*weights, options, views.heatmap, &g); !s.ok()) {
      return Fail(absl::Status(s.code(), absl::StrCat("--heatmap=", views.heatmap, ": ",
                                                      s.message())));
    }
    const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    std::vector<std::string> tiles;
    for (const auto& [x, y] : g.tile_origins) tiles.push_back(absl::StrCat(x, ",", y));
    std::cout << absl::StrFormat(
        "heatmap %s %dx%d px: heads %s, %dx%d cells of %dx%d px%s, %s scale %.4g..%.4g%s; "
        "tiles at %s; rendered in %.1f ms\n",
        views.heatmap, g.width, g.height, HeadListString(g.heads), g.rows, g.cols, g.cell_width,
        g.cell_height,
        g.pool_rows > 1 || g.pool_cols > 1
            ? absl::StrFormat(" (max-pooled %dx%d)", g.pool_rows, g.pool_cols)
            : "",
        options.log_scale ? "log10" : "linear", g.min_value, g.max_value,
        views.tokens.empty() ? "" : g.token_labels ? ", tokens drawn" : ", tokens not drawn",
        absl::StrJoin(tiles, " "), ms);
  }
  if (!views.bertviz.empty()) {
    if (absl::Status s = WriteBertvizJson(*weights, views.batch_row, views.tokens, views.bertviz);
        !s.ok()) {
      return Fail(absl::Status(s.code(), absl::StrCat("--bertviz=", views.bertviz, ": ",
                                                      s.message())));
    }
    const std::vector<int64_t>& ws = weights->shape;
    std::cout << absl::StrFormat("bertviz %s: 1 layer of [1, %d, %d, %d] (batch row %d), %d tokens%s\n",
                                 views.bertviz, ws[ws.size() - 3], ws[ws.size() - 2], ws.back(),
                                 views.batch_row, ws.back(),
                                 views.tokens.empty() ? " (positions)" : "");
  }
  return 0;
}

std::string ErrorsJson(const std::map<std::string, int64_t>& errors) {
  std::vector<std::string> parts;
  for (const auto& [name, count] : errors) parts.push_back(absl::StrFormat("\"%s\":%d", name, count));
  return "{" + absl::StrJoin(parts, ",") + "}";
}

std::string ErrorsText(const std::map<std::string, int64_t>& errors) {
  std::vector<std::string> parts;
  for (const auto& [name, count] : errors) parts.push_back(absl::StrCat(name, "=", count));
  return parts.empty() ? "none" : absl::StrJoin(parts, " ");
}

int CmdBenchSessions();

int CmdBench() {
  if (absl::GetFlag(FLAGS_sessions) != 0) return CmdBenchSessions();
  if (absl::GetFlag(FLAGS_layers) != 1 || absl::GetFlag(FLAGS_batched)) {
    return Fail(absl::InvalidArgumentError(
                    "--layers, --batched: expected --sessions=N with them (model-shaped runs "
                    "step KV-cache sessions), got no --sessions"),
                kExitUsage);
  }
  absl::StatusOr<std::unique_ptr<Inputs>> inputs_or = InputsFromFlags();
  if (!inputs_or.ok()) return Fail(inputs_or.status(), kExitUsage);
  const std::unique_ptr<Inputs>& inputs = *inputs_or;
  LoadOptions options;
  options.concurrency = absl::GetFlag(FLAGS_concurrency) == 0 ? 1 : absl::GetFlag(FLAGS_concurrency);
  options.rate_qps = absl::GetFlag(FLAGS_rate);
  options.stream = absl::GetFlag(FLAGS_stream);
  options.streams = absl::GetFlag(FLAGS_streams);
  options.max_in_flight = absl::GetFlag(FLAGS_max_in_flight);
  options.seed = absl::GetFlag(FLAGS_seed);
  for (auto [flag, value, dest] :
       {std::tuple{"duration", absl::GetFlag(FLAGS_duration), &options.duration},
        std::tuple{"warmup", absl::GetFlag(FLAGS_warmup), &options.warmup},
        std::tuple{"deadline", absl::GetFlag(FLAGS_deadline), &options.call_deadline}}) {
    absl::StatusOr<absl::Duration> d = ParseDurationFlag(flag, value);
    if (!d.ok()) return Fail(d.status(), kExitUsage);
    *dest = *d;
  }
  const bool show_progress = absl::GetFlag(FLAGS_progress) || isatty(STDERR_FILENO);
  const bool tty = isatty(STDERR_FILENO);
  if (show_progress) options.progress_interval = absl::Seconds(1);
  if (absl::Status s = ValidateLoadOptions(options); !s.ok()) return Fail(s, kExitUsage);
  absl::StatusOr<std::vector<std::unique_ptr<AttnClient>>> owned = OpenBenchChannels();
  if (!owned.ok()) return Fail(owned.status(), kExitUsage);
  std::vector<AttnClient*> clients;
  for (const auto& c : *owned) clients.push_back(c.get());
  const int channels = static_cast<int>(clients.size());
  if (absl::Status s = clients[0]->WaitForServing(absl::Seconds(10)); !s.ok()) return Fail(s);
  const v1::AttendRequest request = ToProto(inputs->request, inputs->call);
  // --shm: each connection's region holds the inputs, written once, and its output slot.
  const bool use_shm = absl::GetFlag(FLAGS_shm);
  std::unique_ptr<LoadShmRegions> shm;
  if (use_shm) {
    absl::StatusOr<std::unique_ptr<LoadShmRegions>> regions =
        LoadShmRegions::Create(clients, request);
    if (!regions.ok()) return Fail(regions.status());
    shm = *std::move(regions);
  }

  std::function<void(const LoadProgress&)> progress = [tty](const LoadProgress& p) {
    const LatencySummary& s = p.interval;
    const std::string line = absl::StrFormat(
        "[%5.1fs] %8.1f qps  p50 %7.3f ms  p99 %7.3f ms  ok %d  errors %d  in flight %d",
        p.elapsed_s, p.interval_s > 0 ? s.ok / p.interval_s : 0.0, s.p50_ms, s.p99_ms, s.ok,
        s.errors_total, p.in_flight);
    // On a terminal the line rewrites itself; in a log each second is a line.
    std::fprintf(stderr, tty ? "\r%s\033[K" : "%s\n", line.c_str());
    std::fflush(stderr);
  };
  absl::StatusOr<LoadReport> report = use_shm
                                          ? RunLoad(clients, shm->requests(), options, progress)
                                          : RunLoad(clients, request, options, progress);
  if (show_progress && tty) std::fprintf(stderr, "\n");
  if (!report.ok()) return Fail(report.status(), kExitUsage);
  if (shm != nullptr) {
    if (absl::Status s = shm->Release(); !s.ok()) return Fail(s);
  }
  const LatencySummary& l = report->latency;
  const double gflops = report->elapsed_s > 0 ? l.ok * inputs->flops / report->elapsed_s / 1e9 : 0;
  const std::string mode = options.rate_qps > 0 ? "open" : "closed";
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << absl::StrFormat(
        "{\"shape\":\"%s\",\"dtype\":\"%s\",\"mode\":\"%s\",\"stream\":%s,\"concurrency\":%d,"
        "\"rate\":%g,\"channels\":%d,\"duration_s\":%.3f,\"sent\":%d,\"ok\":%d,\"errors\":%s,"
        "\"qps\":%.2f,\"gflops\":%.3f,\"p50_ms\":%.4f,\"p90_ms\":%.4f,\"p99_ms\":%.4f,"
        "\"p999_ms\":%.4f,\"mean_ms\":%.4f,\"max_ms\":%.4f,\"error_p50_ms\":%.4f,"
        "\"error_p99_ms\":%.4f,\"server_queue_us\":%.1f,\"server_compute_us\":%.1f,"
        "\"server_batch_size\":%.2f%s}\n",
        inputs->shape_name, std::string(DTypeName(inputs->q.dtype)), mode,
        options.stream ? "true" : "false", options.concurrency, options.rate_qps, channels,
        report->elapsed_s, report->sent, l.ok, ErrorsJson(l.errors), report->qps, gflops,
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.mean_ms, l.max_ms, l.error_p50_ms,
        l.error_p99_ms, l.server_queue_us, l.server_compute_us, l.server_batch_size,
        use_shm ? ",\"shm\":true" : "");
  } else {
    std::cout << absl::StrFormat(
        "shape %s %s, %s loop%s, %s%s, %d channel(s)\n"
        "duration   %.2f s, %d sent, %d ok\n"
        "throughput %.1f qps, %.2f GFLOP/s\n"
        "latency    p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  mean %.3f ms  "
        "max %.3f ms\n"
        "server     queue %.0f us  compute %.0f us  batch size %.2f (means)\n"
        "errors     %s\n",
        inputs->shape_name, std::string(DTypeName(inputs->q.dtype)), mode,
        options.rate_qps > 0 ? absl::StrFormat(" at %g qps", options.rate_qps)
                             : absl::StrFormat(", concurrency %d", options.concurrency),
        options.stream ? "stream" : "unary", use_shm ? " via shared memory" : "", channels,
        report->elapsed_s, report->sent, l.ok,
        report->qps, gflops, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.mean_ms, l.max_ms,
        l.server_queue_us, l.server_compute_us, l.server_batch_size, ErrorsText(l.errors));
  }
  return 0;
}

std::atomic<bool> g_interrupted{false};

// First Ctrl-C: stop the run and close the sessions; a second one kills.
extern "C" void OnInterrupt(int /*signal*/) {
  g_interrupted.store(true);
  std::signal(SIGINT, SIG_DFL);
}

// The dims of bench --sessions: --shape (P4 by default), overridden by
// --hq/--hkv/--d; the context by --context.
absl::Status SessionDimsFromFlags(SessionLoadOptions* o) {
  const std::string spec = absl::GetFlag(FLAGS_shape).empty() ? "P4" : absl::GetFlag(FLAGS_shape);
  absl::StatusOr<AttentionShape> shape = ParseAttentionShape(spec);
  if (!shape.ok()) return shape.status();
  o->heads_q = static_cast<int32_t>(shape->heads_q);
  o->heads_kv = static_cast<int32_t>(shape->heads_kv);
  o->head_dim = static_cast<int32_t>(shape->head_dim);
  o->context_tokens = shape->seqlen_k;
  for (auto [flag, value, dest] : {std::tuple{"hq", absl::GetFlag(FLAGS_hq), &o->heads_q},
                                   std::tuple{"hkv", absl::GetFlag(FLAGS_hkv), &o->heads_kv},
                                   std::tuple{"d", absl::GetFlag(FLAGS_d), &o->head_dim}}) {
    if (value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": expected >= 1 (0: the shape's), got ", value));
    }
    if (value > 0) *dest = value;
  }
  if (absl::GetFlag(FLAGS_context) >= 0) o->context_tokens = absl::GetFlag(FLAGS_context);
  return absl::OkStatus();
}

int CmdBenchSessions() {
  if (absl::GetFlag(FLAGS_rate) != 0 || absl::GetFlag(FLAGS_stream)) {
    return Fail(absl::InvalidArgumentError(
                    "--sessions: runs closed loop over unary Decode calls; expected neither "
                    "--rate nor --stream, got one"),
                kExitUsage);
  }
  if (absl::GetFlag(FLAGS_shm)) {
    return Fail(absl::InvalidArgumentError(
                    "--shm: expected none with --sessions (Attend loads only), got --shm"),
                kExitUsage);
  }
  SessionLoadOptions options;
  options.sessions = absl::GetFlag(FLAGS_sessions);
  options.decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  options.concurrency =
      absl::GetFlag(FLAGS_concurrency) == 0 ? options.sessions : absl::GetFlag(FLAGS_concurrency);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.layers = absl::GetFlag(FLAGS_layers);
  options.batched = absl::GetFlag(FLAGS_batched);
  if (absl::Status s = SessionDimsFromFlags(&options); !s.ok()) return Fail(s, kExitUsage);
  for (auto [flag, value, dest] :
       {std::tuple{"dtype", absl::GetFlag(FLAGS_dtype), &options.dtype},
        std::tuple{"cache_dtype", absl::GetFlag(FLAGS_cache_dtype), &options.cache_dtype}}) {
    if (value.empty()) continue;
    absl::StatusOr<DType> d = ParseDType(value);
    if (!d.ok()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", d.status().message())),
                  kExitUsage);
    }
    *dest = *d;
  }
  for (auto [flag, value, dest] :
       {std::tuple{"duration", absl::GetFlag(FLAGS_duration), &options.duration},
        std::tuple{"deadline", absl::GetFlag(FLAGS_deadline), &options.call_deadline}}) {
    absl::StatusOr<absl::Duration> d = ParseDurationFlag(flag, value);
    if (!d.ok()) return Fail(d.status(), kExitUsage);
    *dest = *d;
  }
  const bool tty = isatty(STDERR_FILENO);
  if (absl::GetFlag(FLAGS_progress) || tty) options.progress_interval = absl::Seconds(1);
  if (absl::Status s = ValidateSessionLoadOptions(options); !s.ok()) return Fail(s, kExitUsage);
  absl::StatusOr<std::vector<std::unique_ptr<AttnClient>>> owned = OpenBenchChannels();
  if (!owned.ok()) return Fail(owned.status(), kExitUsage);
  std::vector<AttnClient*> clients;
  for (const auto& c : *owned) clients.push_back(c.get());
  const int channels = static_cast<int>(clients.size());
  if (absl::Status s = clients[0]->WaitForServing(absl::Seconds(10)); !s.ok()) return Fail(s);
  absl::StatusOr<v1::ServerInfo> info = clients[0]->GetServerInfo();
  if (!info.ok()) return Fail(info.status());
  // Prefill chunks must fit the server's message limit and the client's.
  options.max_request_bytes = ClientOptions().max_message_bytes;
  if (info->limits().max_request_bytes() > 0) {
    options.max_request_bytes =
        std::min<int64_t>(options.max_request_bytes, info->limits().max_request_bytes());
  }

  std::function<void(const LoadProgress&)> progress = [tty, &options](const LoadProgress& p) {
    const LatencySummary& s = p.interval;
    const double steps = p.interval_s > 0 ? s.ok / p.interval_s : 0.0;
    // Model-shaped: a token is one step of every layer.
    const int layers = options.model_shaped() ? options.layers : 1;
    const std::string line = absl::StrFormat(
        "[%5.1fs] %9.1f tok/s  p50 %7.3f ms  p99 %7.3f ms  ok %d  errors %d  in flight %d",
        p.elapsed_s, steps * options.decode_tokens / layers, s.p50_ms, s.p99_ms, s.ok,
        s.errors_total, p.in_flight);
    std::fprintf(stderr, tty ? "\r%s\033[K" : "%s\n", line.c_str());
    std::fflush(stderr);
  };
  options.interrupted = &g_interrupted;
  std::signal(SIGINT, OnInterrupt);
  absl::StatusOr<SessionLoadReport> report = RunSessionLoad(clients, options, progress);
  std::signal(SIGINT, SIG_DFL);
  if (options.progress_interval > absl::ZeroDuration() && tty) std::fprintf(stderr, "\n");
  if (!report.ok()) return Fail(report.status());

  const SessionLoadReport& r = *report;
  const LatencySummary& l = r.latency;
  const double prefill_tokens_per_s = r.prefill_s > 0 ? r.prefill_tokens / r.prefill_s : 0;
  const std::string dtype = DTypeName(options.dtype);
  const std::string cache_dtype = DTypeName(options.cache_dtype);
  const bool model = options.model_shaped();
  if (absl::GetFlag(FLAGS_json)) {
    // Model-shaped runs add their keys before the closing brace.
    const std::string model_json =
        model ? absl::StrFormat(",\"layers\":%d,\"batched\":%s,\"tokens\":%d,\"layer_steps\":%d,"
                                "\"layer_p50_ms\":%.4f,\"layer_p99_ms\":%.4f,"
                                "\"sessions_dropped\":%d",
                                options.layers, options.batched ? "true" : "false", r.tokens,
                                r.layer_steps, r.layer_p50_ms, r.layer_p99_ms, r.sessions_dropped)
              : "";
    std::cout << absl::StrFormat(
        "{\"mode\":\"sessions\",\"sessions\":%d,\"context\":%d,\"decode_tokens\":%d,"
        "\"concurrency\":%d,\"hq\":%d,\"hkv\":%d,\"d\":%d,\"dtype\":\"%s\",\"cache_dtype\":\"%s\","
        "\"channels\":%d,\"prefill_s\":%.3f,\"prefill_tokens\":%d,\"prefill_tokens_per_s\":%.1f,"
        "\"duration_s\":%.3f,\"sent\":%d,\"ok\":%d,\"errors\":%s,\"qps\":%.2f,"
        "\"tokens_per_s\":%.2f,\"p50_ms\":%.4f,\"p90_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,"
        "\"mean_ms\":%.4f,\"max_ms\":%.4f,\"server_queue_us\":%.1f,\"server_compute_us\":%.1f,"
        "\"server_batch_size\":%.2f,\"context_tokens_max\":%d,\"close_errors\":%d,"
        "\"interrupted\":%s%s}\n",
        options.sessions, options.context_tokens, options.decode_tokens, options.concurrency,
        options.heads_q, options.heads_kv, options.head_dim, dtype, cache_dtype, channels,
        r.prefill_s, r.prefill_tokens, prefill_tokens_per_s, r.elapsed_s, r.sent, l.ok,
        ErrorsJson(l.errors), r.steps_per_s, r.tokens_per_s, l.p50_ms, l.p90_ms, l.p99_ms,
        l.p999_ms, l.mean_ms, l.max_ms, l.server_queue_us, l.server_compute_us,
        l.server_batch_size, r.context_tokens_max, r.close_errors,
        r.interrupted ? "true" : "false", model_json);
  } else {
    std::cout << absl::StrFormat(
        "sessions   %d x %d tokens, Hq=%d Hkv=%d D=%d, %s on the wire, %s cache, "
        "%d new token(s) per step, concurrency %d, %d channel(s)%s\n"
        "prefill    %.2f s, %d tokens in %d calls (%.0f tokens/s)\n"
        "decode     %.2f s, %d steps sent, %d ok, longest context %d tokens\n"
        "throughput %.1f tokens/s (%.1f steps/s)\n"
        "latency    p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  mean %.3f ms  "
        "max %.3f ms\n"
        "server     queue %.0f us  compute %.0f us  batch size %.2f (means)\n"
        "%s"
        "errors     %s%s\n",
        options.sessions, options.context_tokens, options.heads_q, options.heads_kv,
        options.head_dim, dtype, cache_dtype, options.decode_tokens, options.concurrency,
        channels, r.interrupted ? " (interrupted)" : "", r.prefill_s, r.prefill_tokens,
        r.prefill_calls, prefill_tokens_per_s, r.elapsed_s, r.sent, l.ok, r.context_tokens_max,
        r.tokens_per_s, r.steps_per_s, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.mean_ms,
        l.max_ms, l.server_queue_us, l.server_compute_us, l.server_batch_size,
        model ? absl::StrFormat("model      %d layers, %s: %d whole-model tokens, layer-step "
                                "p50 %.3f ms  p99 %.3f ms (%d layer-steps)%s\n",
                                options.layers,
                                options.batched ? "one BatchDecode per layer-step"
                                                : "one Decode per session and layer",
                                r.tokens, r.layer_p50_ms, r.layer_p99_ms, r.layer_steps,
                                r.sessions_dropped > 0
                                    ? absl::StrFormat(", %d session(s) dropped after an error",
                                                      r.sessions_dropped)
                                    : "")
              : "",
        ErrorsText(l.errors),
        r.close_errors > 0 ? absl::StrFormat(" (%d CloseSession calls failed)", r.close_errors)
                           : "");
  }
  return r.interrupted ? 130 : 0;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "attnctl [--target=HOST:PORT] info|health|attend|bench [flags]\n"
      "  info    server version, backends, limits\n"
      "  health  grpc.health.v1 status (exit 0 when SERVING)\n"
      "  attend  one request from .npy files (--q --k --v) or random (--shape); --out=o.npy;\n"
      "          --entropy; --heatmap=w.png [--heads=0-3] [--tokens=FILE]; --bertviz=w.json;\n"
      "          sparse: --block_mask=m.npz | --key_indices=i.npy [--query_block --key_block],\n"
      "          --global_tokens=0,5 --sink_logits=0.5,...; --shm: tensors in shared memory\n"
      "  bench   load: --shape, --concurrency or --rate, --stream, --duration, --json, --shm;\n"
      "          --sessions=N --context=T: decode steps across N KV-cache sessions;\n"
      "          --layers=L [--batched]: model-shaped, every token through L layers");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return kExitUsage;
  }
  const std::string command = args[1];
  if (command == "info") return CmdInfo();
  if (command == "health") return CmdHealth();
  if (command == "attend") return CmdAttend();
  if (command == "bench") return CmdBench();
  std::cerr << "attnctl: unknown command \"" << command << "\"\n"
            << absl::ProgramUsageMessage() << "\n";
  return kExitUsage;
}

}  // namespace
}  // namespace attnserve::client

int main(int argc, char** argv) { return attnserve::client::Main(argc, argv); }
