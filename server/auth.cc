#include "server/auth.h"

#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "grpc/grpc.h"
#include "grpc/grpc_security.h"
#include "grpc/grpc_security_constants.h"
#include "grpc/slice.h"
#include "grpcpp/security/auth_context.h"

namespace attnserve {
namespace {

// The token tables of this process's credentials, for CallerIdentity. The
// name cannot travel in the call's auth context: gRPC core hands the auth
// metadata processor the connection's context, shared by every call on the
// connection (a property added for one call would show in the next, and
// concurrent calls would write it at once). So the processor only admits or
// refuses, and CallerIdentity looks the admitted token up again.
class LiveTokenTables {
 public:
  void Add(std::shared_ptr<const TokenTable> table) {
    absl::MutexLock lock(&mu_);
    std::erase_if(tables_, [](const auto& t) { return t.expired(); });
    tables_.push_back(table);
  }
  // The name of `token` in a live table; "" if none has it.
  std::string NameOf(absl::string_view token) const {
    absl::MutexLock lock(&mu_);
    for (const auto& weak : tables_) {
      std::shared_ptr<const TokenTable> table = weak.lock();
      if (table == nullptr) continue;
      if (const std::string* name = table->Find(token)) return *name;
    }
    return "";
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::weak_ptr<const TokenTable>> tables_ ABSL_GUARDED_BY(mu_);
};

LiveTokenTables& LiveTables() {
  static auto* tables = new LiveTokenTables();
  return *tables;
}

absl::StatusOr<std::string> ReadFile(absl::string_view option, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(option, ": expected a readable file, got '", path, "' (cannot open it)"));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(
        absl::StrCat(option, ": expected a readable file, got '", path, "' (read error)"));
  }
  return text.str();
}

// Reads a PEM file that must hold a block whose BEGIN line contains `kind`
// ("CERTIFICATE", "PRIVATE KEY"), so a certificate passed for a key (or a
// file that is no PEM at all) is named here rather than in gRPC's log.
absl::StatusOr<std::string> ReadPem(absl::string_view option, const std::string& path,
                                    absl::string_view kind) {
  absl::StatusOr<std::string> text = ReadFile(option, path);
  if (!text.ok()) return text.status();
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (absl::StartsWith(line, "-----BEGIN ") && absl::StrContains(line, kind) &&
        !absl::StrContains(line, "REQUEST")) {
      return text;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(option, ": expected a PEM file with a ", kind,
                                                 " block, got '", path, "' without one"));
}

absl::string_view SliceView(const grpc_slice& slice) {
  return absl::string_view(reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(slice)),
                           GRPC_SLICE_LENGTH(slice));
}

// The token of an "authorization" value "Bearer <token>" (scheme
// case-insensitive, RFC 6750), or "" if it is not one.
absl::string_view BearerToken(absl::string_view value) {
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return {};
  }
  return absl::StripAsciiWhitespace(value.substr(kScheme.size()));
}

// The bearer-token check, as gRPC core's auth metadata processor: it runs in
// the server auth filter for every call, before the call reaches a service.
// Non-blocking (a table look-up), so it answers on the calling thread.
void ProcessMetadata(void* state, grpc_auth_context* /*context*/, const grpc_metadata* md,
                     size_t num_md, grpc_process_auth_metadata_done_cb done, void* user_data) {
  const TokenTable& tokens = **static_cast<std::shared_ptr<const TokenTable>*>(state);
  const grpc_metadata* authorization = nullptr;
  absl::string_view path;
  for (size_t i = 0; i < num_md; ++i) {
    const absl::string_view key = SliceView(md[i].key);
    if (key == ":path") {
      path = SliceView(md[i].value);
    } else if (key == "authorization") {
      authorization = &md[i];
    }
  }
  if (IsOpenMethod(path)) {
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_OK, nullptr);
    return;
  }
  if (authorization == nullptr) {
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_UNAUTHENTICATED,
         "missing credentials: expected metadata 'authorization: Bearer <token>'");
    return;
  }
  if (tokens.Find(BearerToken(SliceView(authorization->value))) == nullptr) {
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_UNAUTHENTICATED,
         "invalid credentials: the bearer token is not one this server accepts");
    return;
  }
  // Not consumed: CallerIdentity reads it to name the caller.
  done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_OK, nullptr);
}

void DestroyTokens(void* state) { delete static_cast<std::shared_ptr<const TokenTable>*>(state); }

// Server credentials built with gRPC core's C API, because the C++ API cannot
// attach an auth metadata processor to plaintext credentials: plaintext or
// TLS, optionally requiring client certificates, optionally with the token
// check. Each AddPortToServer builds fresh core credentials (they are
// reference-counted by the listener that uses them).
class AttnServerCredentials final : public grpc::ServerCredentials {
 public:
  struct Pem {
    std::string cert_chain, private_key, client_ca;
  };
  AttnServerCredentials(std::optional<Pem> tls, std::shared_ptr<const TokenTable> tokens)
      : tls_(std::move(tls)), tokens_(std::move(tokens)) {}

  // Our own check is attached in AddPortToServer; a C++ processor on top
  // would be a second, competing one.
  void SetAuthMetadataProcessor(const std::shared_ptr<grpc::AuthMetadataProcessor>&) override {}

 private:
  int AddPortToServer(const std::string& address, grpc_server* server) override {
    grpc_server_credentials* creds = nullptr;
    if (tls_.has_value()) {
      grpc_ssl_pem_key_cert_pair pair{tls_->private_key.c_str(), tls_->cert_chain.c_str()};
      const bool mutual = !tls_->client_ca.empty();
      creds = grpc_ssl_server_credentials_create_ex(
          mutual ? tls_->client_ca.c_str() : nullptr, &pair, 1,
          mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                 : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
          nullptr);
    } else {
      creds = grpc_insecure_server_credentials_create();
    }
    if (creds == nullptr) return 0;
    if (tokens_ != nullptr) {
      grpc_server_credentials_set_auth_metadata_processor(
          creds, grpc_auth_metadata_processor{&ProcessMetadata, &DestroyTokens,
                                              new std::shared_ptr<const TokenTable>(tokens_)});
    }
    const int port = grpc_server_add_http2_port(server, address.c_str(), creds);
    grpc_server_credentials_release(creds);
    return port;
  }

  const std::optional<Pem> tls_;
  const std::shared_ptr<const TokenTable> tokens_;  // null: no token check
};

}  // namespace

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view text, absl::string_view source) {
  TokenTable table;
  absl::flat_hash_set<std::string> names, tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    if (size_t hash = line.find('#'); hash != absl::string_view::npos) line = line.substr(0, hash);
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (fields.empty()) continue;
    const std::string where = absl::StrCat(source, " line ", line_number);
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": expected 'name token', got ", fields.size(), " fields"));
    }
    if (fields[1].size() < kMinTokenLength) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": token of '", fields[0],
                                                     "' expected at least ", kMinTokenLength,
                                                     " characters, got ", fields[1].size()));
    }
    if (!names.insert(std::string(fields[0])).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": name expected to be unique, got '", fields[0], "' again"));
    }
    if (!tokens.insert(std::string(fields[1])).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": token of '", fields[0], "' expected to be unique, got one listed before"));
    }
    table.entries_.push_back({std::string(fields[0]), std::string(fields[1])});
  }
  if (table.entries_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected at least one 'name token' line, got none"));
  }
  return table;
}

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile("auth_tokens_file", path);
  if (!text.ok()) return text.status();
  return Parse(*text, absl::StrCat("auth_tokens_file '", path, "'"));
}

const std::string* TokenTable::Find(absl::string_view presented) const {
  const std::string* found = nullptr;
  for (const Entry& entry : entries_) {
    const std::string& token = entry.token;  // never empty (kMinTokenLength)
    // Different lengths make `diff` non-zero; the loop still runs over every
    // presented byte (wrapping around the token) so its time says nothing
    // about where the first difference is.
    unsigned diff = presented.size() != token.size() ? 1u : 0u;
    for (size_t i = 0; i < presented.size(); ++i) {
      diff |= static_cast<unsigned char>(presented[i]) ^
              static_cast<unsigned char>(token[i % token.size()]);
    }
    // Tokens are unique, so at most one entry matches; no early exit.
    if (diff == 0) found = &entry.name;
  }
  return found;
}

bool IsOpenMethod(absl::string_view method) {
  return absl::StartsWith(method, "/grpc.health.v1.Health/") ||
         absl::StartsWith(method, "/grpc.reflection.v1alpha.ServerReflection/") ||
         absl::StartsWith(method, "/grpc.reflection.v1.ServerReflection/");
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> CreateServerCredentials(
    const AuthOptions& options) {
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tls_cert_file, tls_key_file: expected both or neither, got ",
                     options.tls_cert_file.empty() ? "only tls_key_file" : "only tls_cert_file"));
  }
  const bool tls = !options.tls_cert_file.empty();
  if (!tls && !options.tls_client_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "tls_client_ca_file: expected together with tls_cert_file and tls_key_file (client "
        "certificates are verified in the TLS handshake), got it without them");
  }
  std::optional<AttnServerCredentials::Pem> pem;
  if (tls) {
    pem.emplace();
    for (auto [option, path, kind, dest] :
         {std::tuple{"tls_cert_file", &options.tls_cert_file, "CERTIFICATE", &pem->cert_chain},
          std::tuple{"tls_key_file", &options.tls_key_file, "PRIVATE KEY", &pem->private_key},
          std::tuple{"tls_client_ca_file", &options.tls_client_ca_file, "CERTIFICATE",
                     &pem->client_ca}}) {
      if (path->empty()) continue;
      absl::StatusOr<std::string> text = ReadPem(option, *path, kind);
      if (!text.ok()) return text.status();
      *dest = *std::move(text);
    }
  }
  std::shared_ptr<const TokenTable> tokens;
  if (!options.auth_tokens_file.empty()) {
    absl::StatusOr<TokenTable> table = TokenTable::Load(options.auth_tokens_file);
    if (!table.ok()) return table.status();
    tokens = std::make_shared<const TokenTable>(*std::move(table));
    LiveTables().Add(tokens);
  }
  if (!tls && tokens == nullptr) return grpc::InsecureServerCredentials();
  return std::shared_ptr<grpc::ServerCredentials>(
      std::make_shared<AttnServerCredentials>(std::move(pem), std::move(tokens)));
}

std::string DescribeAuth(const AuthOptions& options) {
  std::string transport = options.tls_cert_file.empty()        ? "plaintext"
                          : options.tls_client_ca_file.empty() ? "TLS"
                                                               : "mutual TLS";
  if (options.auth_tokens_file.empty()) return absl::StrCat(transport, ", no bearer tokens");
  return absl::StrCat(transport, ", bearer tokens from ", options.auth_tokens_file);
}

std::string CallerIdentity(const grpc::ServerContextBase& context) {
  // A call that reached a handler with a bearer token was admitted by the
  // token check of this server, so the token is in its table.
  const auto& metadata = context.client_metadata();
  for (auto [it, end] = metadata.equal_range("authorization"); it != end; ++it) {
    absl::string_view token = BearerToken(absl::string_view(it->second.data(), it->second.size()));
    if (token.empty()) continue;
    if (std::string name = LiveTables().NameOf(token); !name.empty()) return name;
  }
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return "";
  std::vector<grpc::string_ref> cn = auth->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME);
  return cn.empty() ? "" : std::string(cn.front().data(), cn.front().size());
}

}  // namespace attnserve
