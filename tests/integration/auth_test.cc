// Tests of server/auth: the tokens file format, the token comparison, the
// option checks, and CallerIdentity as a handler sees it on a real gRPC
// server (bearer tokens over plaintext; client certificates under mutual
// TLS, with certificates made by `openssl` in a temporary directory).
#include "server/auth.h"

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

constexpr char kTokens[] =
    "# callers\n"
    "alice  alice-0123456789abcdef\n"
    "\n"
    "bob\tbob-fedcba9876543210   # batch jobs\n";

TEST(TokenTableTest, ParsesNamesTokensAndComments) {
  absl::StatusOr<TokenTable> table = TokenTable::Parse(kTokens, "tokens");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->size(), 2u);
  ASSERT_NE(table->Find("alice-0123456789abcdef"), nullptr);
  EXPECT_EQ(*table->Find("alice-0123456789abcdef"), "alice");
  ASSERT_NE(table->Find("bob-fedcba9876543210"), nullptr);
  EXPECT_EQ(*table->Find("bob-fedcba9876543210"), "bob");
}

TEST(TokenTableTest, FindsOnlyExactTokens) {
  absl::StatusOr<TokenTable> table = TokenTable::Parse(kTokens, "tokens");
  ASSERT_TRUE(table.ok());
  for (const char* presented :
       {"", "alice", "alice-0123456789abcde", "alice-0123456789abcdefg", "Alice-0123456789abcdef",
        "alice-0123456789abcdeg", "alice-0123456789abcdefalice-0123456789abcdef",
        "bob-fedcba9876543210 "}) {
    EXPECT_EQ(table->Find(presented), nullptr) << presented;
  }
}

TEST(TokenTableTest, RejectsMalformedFilesNamingTheLine) {
  struct Case {
    const char* text;
    const char* message;
  } cases[] = {
      {"alice alice-0123456789abcdef extra\n", "tokens line 1: expected 'name token', got 3"},
      {"# c\nalice\n", "tokens line 2: expected 'name token', got 1"},
      {"alice short\n", "expected at least 16 characters, got 5"},
      {"a alice-0123456789abcdef\na bob-fedcba9876543210\n", "line 2: name expected to be unique"},
      {"a alice-0123456789abcdef\nb alice-0123456789abcdef\n",
       "token of 'b' expected to be unique"},
      {"# nothing\n\n", "expected at least one 'name token' line, got none"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<TokenTable> table = TokenTable::Parse(c.text, "tokens");
    EXPECT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_TRUE(absl::StrContains(table.status().message(), c.message)) << table.status();
  }
}

TEST(AuthTest, OpenMethodsAreHealthAndReflection) {
  EXPECT_TRUE(IsOpenMethod("/grpc.health.v1.Health/Check"));
  EXPECT_TRUE(IsOpenMethod("/grpc.health.v1.Health/Watch"));
  EXPECT_TRUE(IsOpenMethod("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
  EXPECT_FALSE(IsOpenMethod("/attnserve.v1.AttentionService/Attend"));
  EXPECT_FALSE(IsOpenMethod("/attnserve.v1.AttentionService/GetServerInfo"));
  EXPECT_FALSE(IsOpenMethod(""));
  EXPECT_FALSE(IsOpenMethod("/grpc.health.v1.HealthX/Check"));
}

TEST(AuthTest, InconsistentOptionsNameTheOption) {
  auto status_of = [](const AuthOptions& o) { return CreateServerCredentials(o).status(); };
  absl::Status s = status_of(AuthOptions{.tls_cert_file = "cert.pem",
                                                .tls_key_file = "",
                                                .tls_client_ca_file = "",
                                                .auth_tokens_file = ""});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "only tls_cert_file")) << s;
  s = status_of(AuthOptions{.tls_cert_file = "",
                                   .tls_key_file = "",
                                   .tls_client_ca_file = "ca.pem",
                                   .auth_tokens_file = ""});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "tls_client_ca_file")) << s;
  s = status_of(AuthOptions{.tls_cert_file = "",
                                   .tls_key_file = "",
                                   .tls_client_ca_file = "",
                                   .auth_tokens_file = "/nonexistent/tokens"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "auth_tokens_file")) << s;
  EXPECT_TRUE(CreateServerCredentials({}).ok());
  EXPECT_EQ(DescribeAuth({}), "plaintext, no bearer tokens");
}

// GetServerInfo answers with CallerIdentity(context) as its version.
class IdentityEcho final : public v1::AttentionService::CallbackService {
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest*,
                                          v1::ServerInfo* response) override {
    response->set_version(CallerIdentity(*context));
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

class EchoServer {
 public:
  explicit EchoServer(const AuthOptions& options) {
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
        CreateServerCredentials(options);
    EXPECT_TRUE(creds.ok()) << creds.status();
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", *creds, &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
  }
  ~EchoServer() { server_->Shutdown(); }

  std::string target() const { return absl::StrCat("localhost:", port_); }

 private:
  IdentityEcho service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// The caller identity (or the error) GetServerInfo sees over `channel`.
absl::StatusOr<std::string> Identity(const std::shared_ptr<grpc::Channel>& channel,
                                     const std::string& authorization = "") {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  v1::ServerInfo info;
  grpc::Status s = v1::AttentionService::NewStub(channel)->GetServerInfo(
      &context, v1::GetServerInfoRequest(), &info);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  }
  return info.version();
}

bool HealthOk(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckResponse response;
  return grpc::health::v1::Health::NewStub(channel)
      ->Check(&context, grpc::health::v1::HealthCheckRequest(), &response)
      .ok();
}

std::string TempDir(const char* name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/attnserve_auth_test_", name, "_", getpid());
  EXPECT_EQ(std::system(absl::StrCat("rm -rf '", dir, "' && mkdir -p '", dir, "'").c_str()), 0);
  return dir;
}

void WriteFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(CallerIdentityTest, IsTheTokenNameOverPlaintext) {
  const std::string dir = TempDir("tokens");
  WriteFile(dir + "/tokens", kTokens);
  EchoServer server(AuthOptions{.tls_cert_file = "",
                                .tls_key_file = "",
                                .tls_client_ca_file = "",
                                .auth_tokens_file = dir + "/tokens"});
  // One connection, calls of two callers: the identity is per call.
  auto channel = grpc::CreateChannel(server.target(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(Identity(channel, "Bearer alice-0123456789abcdef").value_or("error"), "alice");
  EXPECT_EQ(Identity(channel, "Bearer bob-fedcba9876543210").value_or("error"), "bob");
  EXPECT_EQ(Identity(channel).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(Identity(channel, "Bearer alice-0123456789abcdeX").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(Identity(channel, "bearer alice-0123456789abcdef").value_or("error"), "alice");
  EXPECT_TRUE(HealthOk(channel));
}

TEST(CallerIdentityTest, IsEmptyWithoutAuth) {
  EchoServer server({});
  auto channel = grpc::CreateChannel(server.target(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(Identity(channel, "Bearer anything-at-all-here").value_or("error"), "");
}

TEST(CallerIdentityTest, IsTheCertificateCommonNameUnderMutualTls) {
  const std::string dir = TempDir("mtls");
  const std::string script = absl::StrCat(
      "cd '", dir, "' && exec >openssl.log 2>&1 && ",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj '/CN=test ca' -keyout ca.key "
      "-out ca.pem && ",
      "printf 'subjectAltName=DNS:localhost\\n' > server.ext && ",
      "openssl req -newkey rsa:2048 -nodes -subj '/CN=localhost' -keyout server.key "
      "-out server.csr && ",
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
      "-extfile server.ext -out server.pem && ",
      "openssl req -newkey rsa:2048 -nodes -subj '/CN=ingest-service' -keyout client.key "
      "-out client.csr && ",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
      "-out client.pem");
  if (std::system(script.c_str()) != 0) {
    GTEST_SKIP() << "openssl could not make certificates: " << ReadFile(dir + "/openssl.log");
  }
  EchoServer server(AuthOptions{.tls_cert_file = dir + "/server.pem",
                                .tls_key_file = dir + "/server.key",
                                .tls_client_ca_file = dir + "/ca.pem",
                                .auth_tokens_file = ""});
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadFile(dir + "/ca.pem");
  ssl.pem_cert_chain = ReadFile(dir + "/client.pem");
  ssl.pem_private_key = ReadFile(dir + "/client.key");
  auto channel = grpc::CreateChannel(server.target(), grpc::SslCredentials(ssl));
  EXPECT_EQ(Identity(channel).value_or("error"), "ingest-service");

  // Tokens on top: the token's name wins over the certificate's.
  WriteFile(dir + "/tokens", kTokens);
  EchoServer both(AuthOptions{.tls_cert_file = dir + "/server.pem",
                              .tls_key_file = dir + "/server.key",
                              .tls_client_ca_file = dir + "/ca.pem",
                              .auth_tokens_file = dir + "/tokens"});
  auto both_channel = grpc::CreateChannel(both.target(), grpc::SslCredentials(ssl));
  EXPECT_EQ(Identity(both_channel, "Bearer bob-fedcba9876543210").value_or("error"), "bob");
  EXPECT_EQ(Identity(both_channel).status().code(), absl::StatusCode::kUnauthenticated);
}

}  // namespace
}  // namespace attnserve
