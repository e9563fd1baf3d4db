// Transport security and caller authentication for the gRPC server: TLS or
// mutual TLS from PEM files, and bearer tokens ("authorization: Bearer <t>")
// checked in gRPC's server auth filter, before any handler runs, against a
// table of named tokens. Health checking and reflection stay open to callers
// without a token, so probes and grpcurl-style tools keep working.
//
// CreateServerCredentials() turns AuthOptions into the credentials the server
// listens with; CallerIdentity() tells a handler who called.
//
// Thread safety: TokenTable is immutable after Parse/Load and may be shared;
// the credentials' token check runs concurrently on gRPC's threads.
#ifndef ATTNSERVE_SERVER_AUTH_H_
#define ATTNSERVE_SERVER_AUTH_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_context.h"

namespace attnserve {

struct AuthOptions {
  // PEM certificate chain and private key; both set: serve TLS, both empty:
  // plaintext.
  std::string tls_cert_file;
  std::string tls_key_file;
  // PEM CA bundle; set: clients must present a certificate it signed (mutual
  // TLS). Needs tls_cert_file and tls_key_file.
  std::string tls_client_ca_file;
  // One "name token" pair per line ('#' starts a comment); set: every call
  // except health and reflection needs "authorization: Bearer <token>" with
  // one of the tokens, else UNAUTHENTICATED. Works over TLS and plaintext
  // (use plaintext only behind something that encrypts, e.g. a mesh sidecar).
  std::string auth_tokens_file;
};

// Shortest token accepted: 16 characters (96 bits as base64) makes guessing
// hopeless at any request rate.
inline constexpr size_t kMinTokenLength = 16;

// The bearer tokens callers may present, each with a name that identifies the
// caller (logs, session ownership).
class TokenTable {
 public:
  // Parses the auth_tokens_file format. INVALID_ARGUMENT naming `source` and
  // the line for a line that is not "name token", a token shorter than
  // kMinTokenLength, a repeated name or token, or no tokens at all.
  static absl::StatusOr<TokenTable> Parse(absl::string_view text, absl::string_view source);
  // Reads and parses `path`; INVALID_ARGUMENT if it cannot be read.
  static absl::StatusOr<TokenTable> Load(const std::string& path);

  // The name of the token equal to `presented`, or nullptr. Compares against
  // every token, each over every presented byte without an early exit, so the
  // time taken depends on the lengths only, never on which bytes matched.
  const std::string* Find(absl::string_view presented) const;

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name;
    std::string token;
  };
  std::vector<Entry> entries_;
};

// Whether calls to `method` (the HTTP/2 path, "/package.Service/Method") are
// served without a token: grpc.health.v1 and server reflection.
bool IsOpenMethod(absl::string_view method);

// The credentials for ServerBuilder::AddListeningPort: plaintext or TLS (mutual
// when tls_client_ca_file is set), with the bearer-token check attached when
// auth_tokens_file is set. Reads every file now: INVALID_ARGUMENT naming the
// option for an unreadable or malformed file or an inconsistent combination.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> CreateServerCredentials(
    const AuthOptions& options);

// A one-line summary for the start-up log, e.g. "mTLS, 3 bearer tokens".
std::string DescribeAuth(const AuthOptions& options);

// The authenticated caller of the call behind `context`: the name of its
// bearer token when tokens are on, else the subject common name of its
// client certificate under mutual TLS, else "". Per call, also when calls of
// different callers share a connection. (The token is looked up in the token
// tables of every server in this process; only the server's own can have
// admitted it, unless two servers here list one token under two names.)
std::string CallerIdentity(const grpc::ServerContextBase& context);

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_AUTH_H_
