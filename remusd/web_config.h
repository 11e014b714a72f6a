// The metrics endpoint's web config file (`remusd --metrics-web-config FILE`,
// alias `--web.config.file`): TLS and HTTP basic authentication, in the YAML
// format of Prometheus exporters (prometheus/exporter-toolkit's
// docs/web-configuration.md), so a file written for node_exporter works here
// as long as it uses only what remusd supports:
//
//   tls_server_config:
//     cert_file: server.crt      # required in this section; PEM, may hold the chain
//     key_file: server.key       # required in this section; PEM
//     client_ca_file: ca.crt     # with client_auth_type RequireAndVerifyClientCert
//     client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default)
//     min_version: TLS12         # TLS10..TLS13; TLS12 by default
//   basic_auth_users:
//     alice: $2y$10$...          # bcrypt hashes
//
// Like exporter-toolkit, an unknown key is an error; keys exporter-toolkit
// has and remusd does not support (cipher_suites, http_server_config, ...)
// are refused by name too, rather than silently ignored. Relative paths are
// relative to the file's directory.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "common/status.h"

namespace remus {

struct WebTlsConfig {
  std::string cert_file;       // absolute after parsing
  std::string key_file;        // absolute after parsing
  std::string client_ca_file;  // empty: none
  bool require_client_cert = false;
  // The lowest TLS version accepted: 0x0301 (TLS 1.0) .. 0x0304 (TLS 1.3),
  // as OpenSSL's TLS1_*_VERSION.
  int min_version = 0x0303;
};

struct WebConfig {
  std::string path;                  // the file, for messages
  std::optional<WebTlsConfig> tls;   // absent: plain HTTP
  // User name to bcrypt hash; empty: no authentication.
  std::map<std::string, std::string> basic_auth_users;
};

// Parses the YAML `text` of the file at `path` (used for messages and to
// resolve relative paths against its directory). Pure: opens nothing.
// InvalidArgument naming the file and the key on any error.
StatusOr<WebConfig> ParseWebConfig(const std::string& text, const std::string& path);

// Reads and parses `path`, then checks that the files it names are readable.
StatusOr<WebConfig> LoadWebConfig(const std::string& path);

// Whether `hash` has the form of a bcrypt hash ($2a$, $2b$ or $2y$, cost
// 04..31, 53 characters of salt and digest).
bool IsBcryptHash(const std::string& hash);

// Whether `password` matches the bcrypt `hash` (libxcrypt's crypt_rn; the
// result is compared in constant time). False for a malformed hash.
bool VerifyBcrypt(const std::string& hash, const std::string& password);

// Whether an HTTP Authorization header value ("Basic base64(user:pass)")
// names a user of `users` with the right password. A missing or unknown
// user costs a bcrypt computation too, so response times do not tell which
// user names exist.
bool CheckBasicAuth(const std::map<std::string, std::string>& users, const std::string& authorization);

}  // namespace remus
