#include "remusd/web_config.h"

#include <crypt.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>

namespace remus {
namespace {

// A bcrypt hash of `password` made here with libxcrypt, cost 4 (fast).
std::string Bcrypt(const std::string& password, const char* prefix = "$2b$") {
  char salt[CRYPT_GENSALT_OUTPUT_SIZE];
  EXPECT_NE(crypt_gensalt_rn(prefix, 4, nullptr, 0, salt, sizeof salt), nullptr) << prefix;
  auto data = std::make_unique<crypt_data>();
  const char* h = crypt_rn(password.c_str(), salt, data.get(), sizeof(crypt_data));
  EXPECT_NE(h, nullptr);
  return h ? h : "";
}

std::string B64(const std::string& s) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  unsigned buf = 0;
  int bits = 0;
  for (unsigned char c : s) {
    buf = (buf << 8) | c;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(k[(buf >> bits) & 63]);
    }
  }
  if (bits > 0) out.push_back(k[(buf << (6 - bits)) & 63]);
  while (out.size() % 4) out.push_back('=');
  return out;
}

const char* kPath = "/etc/remus/web.yml";

TEST(WebConfig, FullFileRelativeAndAbsolutePaths) {
  std::string hash = Bcrypt("secret");
  auto c = ParseWebConfig("# exporter-toolkit format\n"
                          "tls_server_config:\n"
                          "  cert_file: tls/server.crt\n"
                          "  key_file: /keys/server.key\n"
                          "  client_ca_file: ../ca.crt\n"
                          "  client_auth_type: RequireAndVerifyClientCert\n"
                          "  min_version: TLS13\n"
                          "basic_auth_users:\n"
                          "  alice: " + hash + "\n"
                          "  bob: '" + hash + "'\n",
                          kPath);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE(c->tls.has_value());
  EXPECT_EQ(c->tls->cert_file, "/etc/remus/tls/server.crt");
  EXPECT_EQ(c->tls->key_file, "/keys/server.key");
  EXPECT_EQ(c->tls->client_ca_file, "/etc/ca.crt");
  EXPECT_TRUE(c->tls->require_client_cert);
  EXPECT_EQ(c->tls->min_version, 0x0304);
  EXPECT_EQ(c->basic_auth_users.size(), 2u);
  EXPECT_EQ(c->basic_auth_users.at("alice"), hash);
  EXPECT_EQ(c->path, kPath);
}

TEST(WebConfig, DefaultsAndOptionalSections) {
  auto c = ParseWebConfig("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n", "web.yml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->tls->cert_file, "a.crt");  // relative to the current directory's "."
  EXPECT_EQ(c->tls->client_ca_file, "");
  EXPECT_FALSE(c->tls->require_client_cert);
  EXPECT_EQ(c->tls->min_version, 0x0303);  // TLS 1.2, as exporter-toolkit
  EXPECT_TRUE(c->basic_auth_users.empty());

  c = ParseWebConfig("basic_auth_users:\n  alice: " + Bcrypt("x", "$2y$") + "\n", kPath);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_FALSE(c->tls.has_value());
  EXPECT_EQ(c->basic_auth_users.size(), 1u);

  for (const char* empty : {"", "# nothing\n", "tls_server_config:\nbasic_auth_users:\n"}) {
    c = ParseWebConfig(empty, kPath);
    ASSERT_TRUE(c.ok()) << empty << ": " << c.status().ToString();
    EXPECT_FALSE(c->tls.has_value());
    EXPECT_TRUE(c->basic_auth_users.empty());
  }
}

// Each invalid file: refused, the message naming the file, the key and the fix.
TEST(WebConfig, InvalidFilesSayWhatIsWrong) {
  const std::string tls = "tls_server_config:\n  cert_file: c\n  key_file: k\n";
  struct Case {
    std::string yaml, want;
  } cases[] = {
      {"tls_server_config: [\n", "not valid YAML"},
      {"- a\n- b\n", "expected a map"},
      {"tls_config:\n  cert_file: x\n", "tls_config: unknown key (line 1"},
      {"basic_auth_users: {}\nweb: 1\n", "web: unknown key (line 2"},
      {tls + "  certfile: x\n", "tls_server_config.certfile: unknown key"},
      {"tls_server_config:\n  key_file: k\n", "tls_server_config.cert_file: missing (required"},
      {"tls_server_config:\n  cert_file: c\n", "tls_server_config.key_file: missing"},
      {"tls_server_config:\n  cert_file: ''\n  key_file: k\n", "tls_server_config.cert_file: empty"},
      {"tls_server_config:\n  cert_file: [a]\n  key_file: k\n", "tls_server_config.cert_file: must be a string"},
      {"tls_server_config: yes\n", "tls_server_config: must be a map"},
      {tls + "  client_auth_type: RequireAndVerifyClientCert\n", "RequireAndVerifyClientCert needs client_ca_file"},
      {tls + "  client_ca_file: ca\n", "client_ca_file: set, but client_auth_type is NoClientCert"},
      {tls + "  client_ca_file: ca\n  client_auth_type: VerifyClientCertIfGiven\n",
       "VerifyClientCertIfGiven is not supported by remusd; use NoClientCert or RequireAndVerifyClientCert"},
      {tls + "  client_auth_type: RequireAnyClientCert\n", "RequireAnyClientCert is not supported"},
      {tls + "  client_auth_type: Sometimes\n", "unknown value 'Sometimes'"},
      {tls + "  min_version: TLS14\n", "min_version: unknown version 'TLS14'; use TLS10, TLS11, TLS12 or TLS13"},
      {tls + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "tls_server_config.cipher_suites: not supported"},
      {tls + "  max_version: TLS13\n", "tls_server_config.max_version: not supported"},
      {tls + "  cert: |\n    ---BEGIN\n", "tls_server_config.cert: inline certificates are not supported"},
      {"http_server_config:\n  http2: false\n", "http_server_config: not supported"},
      {"basic_auth_users:\n  alice: secret\n", "basic_auth_users.alice: not a bcrypt hash ($2y$"},
      {"basic_auth_users:\n  alice: $1$abc$def\n", "basic_auth_users.alice: not a bcrypt hash"},
      {"basic_auth_users:\n  alice: [a]\n", "basic_auth_users.alice: must be a string"},
      {"basic_auth_users:\n  'a:b': x\n", "cannot contain ':'"},
      {"basic_auth_users: [alice]\n", "basic_auth_users: must be a map of user name to bcrypt hash"},
  };
  for (const auto& c : cases) {
    auto r = ParseWebConfig(c.yaml, kPath);
    ASSERT_FALSE(r.ok()) << c.yaml;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << c.yaml;
    EXPECT_EQ(r.status().message().rfind(std::string("metrics web config ") + kPath + ": ", 0), 0u)
        << r.status().message();
    EXPECT_NE(r.status().message().find(c.want), std::string::npos)
        << "yaml:\n" << c.yaml << "message: " << r.status().message() << "\nwanted: " << c.want;
  }
}

TEST(WebConfig, LoadChecksTheNamedFiles) {
  std::string dir = ::testing::TempDir() + "webcfg" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir + "/" + name) << text;
    return dir + "/" + name;
  };
  write("c.crt", "x");
  std::string cfg = write("web.yml", "tls_server_config:\n  cert_file: c.crt\n  key_file: missing.key\n");
  auto r = LoadWebConfig(cfg);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("tls_server_config.key_file: cannot read " + dir + "/missing.key"),
            std::string::npos)
      << r.status().message();
  write("missing.key", "y");
  r = LoadWebConfig(cfg);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tls->key_file, dir + "/missing.key");
  r = LoadWebConfig(dir + "/nope.yml");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("metrics web config " + dir + "/nope.yml: cannot read"), std::string::npos)
      << r.status().message();
  std::filesystem::remove_all(dir);
}

TEST(Bcrypt, VerifiesAllPrefixes) {
  for (const char* prefix : {"$2b$", "$2y$", "$2a$"}) {
    std::string h = Bcrypt("correct horse", prefix);
    ASSERT_EQ(h.rfind(prefix, 0), 0u) << h;
    EXPECT_TRUE(IsBcryptHash(h)) << h;
    EXPECT_TRUE(VerifyBcrypt(h, "correct horse")) << h;
    EXPECT_FALSE(VerifyBcrypt(h, "correct horsE")) << h;
    EXPECT_FALSE(VerifyBcrypt(h, "")) << h;
  }
  // htpasswd -nbBC 10 "" pass | tr -d ':\n' (apache2-utils, $2y$).
  EXPECT_TRUE(VerifyBcrypt("$2y$10$bIcgUAoOozRl22yR9dOClOYzmW8/fBGCrRf8Z9DQTUk/M93GOmNA2", "pass"));
  EXPECT_FALSE(VerifyBcrypt("$2y$10$bIcgUAoOozRl22yR9dOClOYzmW8/fBGCrRf8Z9DQTUk/M93GOmNA2", "pas"));
  EXPECT_FALSE(IsBcryptHash("$2b$03$" + std::string(53, 'a')));  // cost below 4
  EXPECT_FALSE(IsBcryptHash("$2x$10$" + std::string(53, 'a')));
  EXPECT_FALSE(IsBcryptHash("$2b$10$" + std::string(52, 'a')));
  EXPECT_FALSE(IsBcryptHash("$2b$10$" + std::string(52, 'a') + "!"));
  EXPECT_FALSE(VerifyBcrypt("plain", "plain"));
  std::string h = Bcrypt("a");
  EXPECT_FALSE(VerifyBcrypt(h, std::string("a\0b", 3)));
}

TEST(Bcrypt, BasicAuthHeader) {
  std::map<std::string, std::string> users = {{"alice", Bcrypt("s3cret:x")}, {"bob", Bcrypt("pw")}};
  EXPECT_TRUE(CheckBasicAuth(users, "Basic " + B64("alice:s3cret:x")));  // the password may hold ':'
  EXPECT_TRUE(CheckBasicAuth(users, "Basic " + B64("bob:pw")));
  EXPECT_TRUE(CheckBasicAuth(users, "basic  " + B64("bob:pw") + " "));
  EXPECT_FALSE(CheckBasicAuth(users, "Basic " + B64("bob:pW")));
  EXPECT_FALSE(CheckBasicAuth(users, "Basic " + B64("alice:pw")));
  EXPECT_FALSE(CheckBasicAuth(users, "Basic " + B64("carol:pw")));
  EXPECT_FALSE(CheckBasicAuth(users, "Basic " + B64("bobpw")));
  EXPECT_FALSE(CheckBasicAuth(users, "Bearer " + B64("bob:pw")));
  EXPECT_FALSE(CheckBasicAuth(users, "Basic !!!"));
  EXPECT_FALSE(CheckBasicAuth(users, ""));
  EXPECT_FALSE(CheckBasicAuth({}, "Basic " + B64("bob:pw")));
}

}  // namespace
}  // namespace remus
