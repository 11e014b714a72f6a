#include "remusd/web_config.h"

#include <crypt.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <memory>
#include <set>
#include <string_view>

#include "common/io.h"

namespace remus {

namespace {

// exporter-toolkit's keys that remusd does not implement: refused by name
// with this note instead of "unknown".
const std::map<std::string, std::string> kUnsupported = {
    {"tls_server_config.cert", "inline certificates are not supported, use cert_file"},
    {"tls_server_config.key", "inline keys are not supported, use key_file"},
    {"tls_server_config.client_allowed_sans", "not supported"},
    {"tls_server_config.max_version", "not supported"},
    {"tls_server_config.cipher_suites", "not supported (OpenSSL's defaults are used)"},
    {"tls_server_config.prefer_server_cipher_suites", "not supported"},
    {"tls_server_config.curve_preferences", "not supported"},
    {"http_server_config", "not supported (remusd serves HTTP/1.1 only and sets its own headers)"},
};

class Parser {
 public:
  explicit Parser(std::string path) : path_(std::move(path)) {
    std::filesystem::path p(path_);
    dir_ = p.has_parent_path() ? p.parent_path() : std::filesystem::path(".");
  }

  Status Fail(const std::string& key, const std::string& why) const {
    return InvalidArgument("metrics web config " + path_ + ": " + (key.empty() ? "" : key + ": ") + why);
  }

  // Every key of the map `node` must be in `known`.
  Status CheckKeys(const YAML::Node& node, const std::string& prefix, const std::set<std::string>& known) const {
    for (const auto& kv : node) {
      if (!kv.first.IsScalar()) return Fail(prefix, "keys must be plain strings");
      std::string k = kv.first.as<std::string>();
      std::string full = prefix.empty() ? k : prefix + "." + k;
      if (auto u = kUnsupported.find(full); u != kUnsupported.end()) return Fail(full, u->second);
      if (!known.count(k)) {
        std::string list;
        for (const auto& x : known) list += (list.empty() ? "" : ", ") + x;
        return Fail(full, "unknown key (line " + std::to_string(kv.first.Mark().line + 1) + "; known here: " + list +
                              ")");
      }
    }
    return OkStatus();
  }

  StatusOr<std::string> String(const YAML::Node& node, const std::string& key) const {
    if (!node.IsScalar()) return Fail(key, "must be a string");
    return node.as<std::string>();
  }

  std::string Resolve(const std::string& file) const {
    std::filesystem::path f(file);
    return (f.is_absolute() ? f : dir_ / f).lexically_normal().string();
  }

  StatusOr<WebConfig> Parse(const std::string& text) {
    YAML::Node root;
    try {
      root = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      return Fail("", "not valid YAML: " + std::string(e.what()));
    }
    WebConfig c;
    c.path = path_;
    if (root.IsNull()) return c;  // an empty file: plain HTTP, no users
    if (!root.IsMap()) return Fail("", "expected a map with tls_server_config and/or basic_auth_users");
    RETURN_IF_ERROR(CheckKeys(root, "", {"tls_server_config", "basic_auth_users"}));
    if (YAML::Node t = root["tls_server_config"]; t && !t.IsNull()) {
      const std::string s = "tls_server_config";
      if (!t.IsMap()) return Fail(s, "must be a map");
      RETURN_IF_ERROR(
          CheckKeys(t, s, {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}));
      WebTlsConfig tls;
      for (const char* k : {"cert_file", "key_file"}) {
        if (!t[k] || t[k].IsNull()) return Fail(s + "." + k, "missing (required when tls_server_config is present)");
        ASSIGN_OR_RETURN(std::string v, String(t[k], s + "." + k));
        if (v.empty()) return Fail(s + "." + k, "empty");
        (std::string_view(k) == "cert_file" ? tls.cert_file : tls.key_file) = Resolve(v);
      }
      if (t["client_ca_file"] && !t["client_ca_file"].IsNull()) {
        ASSIGN_OR_RETURN(std::string v, String(t["client_ca_file"], s + ".client_ca_file"));
        if (!v.empty()) tls.client_ca_file = Resolve(v);
      }
      std::string auth = "NoClientCert";
      if (t["client_auth_type"] && !t["client_auth_type"].IsNull()) {
        ASSIGN_OR_RETURN(auth, String(t["client_auth_type"], s + ".client_auth_type"));
      }
      if (auth == "RequireAndVerifyClientCert") {
        tls.require_client_cert = true;
        if (tls.client_ca_file.empty())
          return Fail(s + ".client_auth_type", "RequireAndVerifyClientCert needs client_ca_file");
      } else if (auth == "NoClientCert" || auth.empty()) {
        if (!tls.client_ca_file.empty())
          return Fail(s + ".client_ca_file",
                      "set, but client_auth_type is NoClientCert; set client_auth_type: RequireAndVerifyClientCert");
      } else if (auth == "RequestClientCert" || auth == "RequireAnyClientCert" || auth == "VerifyClientCertIfGiven") {
        return Fail(s + ".client_auth_type",
                    auth + " is not supported by remusd; use NoClientCert or RequireAndVerifyClientCert");
      } else {
        return Fail(s + ".client_auth_type", "unknown value '" + auth +
                                                 "'; remusd supports NoClientCert and RequireAndVerifyClientCert");
      }
      if (t["min_version"] && !t["min_version"].IsNull()) {
        ASSIGN_OR_RETURN(std::string v, String(t["min_version"], s + ".min_version"));
        static const std::map<std::string, int> kVersions = {
            {"TLS10", 0x0301}, {"TLS11", 0x0302}, {"TLS12", 0x0303}, {"TLS13", 0x0304}};
        auto it = kVersions.find(v);
        if (it == kVersions.end()) return Fail(s + ".min_version", "unknown version '" + v + "'; use TLS10, TLS11, TLS12 or TLS13");
        tls.min_version = it->second;
      }
      c.tls = tls;
    }
    if (YAML::Node u = root["basic_auth_users"]; u && !u.IsNull()) {
      if (!u.IsMap()) return Fail("basic_auth_users", "must be a map of user name to bcrypt hash");
      for (const auto& kv : u) {
        if (!kv.first.IsScalar()) return Fail("basic_auth_users", "user names must be plain strings");
        std::string user = kv.first.as<std::string>();
        std::string key = "basic_auth_users." + user;
        if (user.empty()) return Fail("basic_auth_users", "empty user name");
        if (user.find(':') != std::string::npos) return Fail(key, "a user name cannot contain ':' (HTTP basic auth)");
        ASSIGN_OR_RETURN(std::string hash, String(kv.second, key));
        if (!IsBcryptHash(hash))
          return Fail(key, "not a bcrypt hash ($2y$..., $2b$... or $2a$...; make one with `htpasswd -nbBC 10 \"\" "
                           "PASSWORD | tr -d ':\\n'`)");
        c.basic_auth_users[user] = hash;
      }
    }
    return c;
  }

 private:
  std::string path_;
  std::filesystem::path dir_;
};

bool IsB64(char ch) {
  return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '/';
}

// RFC 4648 base64 (with padding) to bytes; nullopt when malformed.
std::optional<std::string> DecodeBase64(std::string_view in) {
  auto val = [](char ch) -> int {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
  };
  while (!in.empty() && in.back() == '=') in.remove_suffix(1);
  std::string out;
  unsigned buf = 0;
  int bits = 0;
  for (char ch : in) {
    int v = val(ch);
    if (v < 0) return std::nullopt;
    buf = (buf << 6) | static_cast<unsigned>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buf >> bits) & 0xff));
    }
  }
  return out;
}

bool ConstantTimeEqual(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  volatile unsigned char d = 0;
  for (size_t i = 0; i < a.size(); i++) d = d | static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

// Checked against when the user is unknown, so that costs the same time.
// A valid bcrypt hash, cost 10; which password it hashes does not matter.
constexpr const char* kDummyHash = "$2b$10$uJnRU9YLmSgBhgl4Rn5NKe/yc6bcs8GDGLJDjTQic/pr4dElFXNEy";

}  // namespace

StatusOr<WebConfig> ParseWebConfig(const std::string& text, const std::string& path) {
  return Parser(path).Parse(text);
}

StatusOr<WebConfig> LoadWebConfig(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return InvalidArgument("metrics web config " + path + ": cannot read: " + text.status().message());
  ASSIGN_OR_RETURN(WebConfig c, ParseWebConfig(*text, path));
  if (c.tls) {
    for (auto [key, file] : {std::pair{"cert_file", c.tls->cert_file}, std::pair{"key_file", c.tls->key_file},
                             std::pair{"client_ca_file", c.tls->client_ca_file}}) {
      if (file.empty()) continue;
      if (::access(file.c_str(), R_OK) != 0)
        return InvalidArgument("metrics web config " + path + ": tls_server_config." + key + ": cannot read " + file +
                               ": " + ErrnoStatus("access", errno).message());
    }
  }
  return c;
}

bool IsBcryptHash(const std::string& h) {
  // $2?$NN$ + 22 characters of salt + 31 of digest.
  if (h.size() != 60 || h[0] != '$' || h[1] != '2' || h[3] != '$' || h[6] != '$') return false;
  if (h[2] != 'a' && h[2] != 'b' && h[2] != 'y') return false;
  if (h[4] < '0' || h[4] > '9' || h[5] < '0' || h[5] > '9') return false;
  int cost = (h[4] - '0') * 10 + (h[5] - '0');
  if (cost < 4 || cost > 31) return false;
  for (size_t i = 7; i < h.size(); i++)
    if (!IsB64(h[i])) return false;
  return true;
}

bool VerifyBcrypt(const std::string& hash, const std::string& password) {
  if (!IsBcryptHash(hash) || password.find('\0') != std::string::npos) return false;
  auto data = std::make_unique<crypt_data>();  // ~32 KiB: not on the stack
  const char* out = crypt_rn(password.c_str(), hash.c_str(), data.get(), sizeof(crypt_data));
  if (out == nullptr || out[0] == '*') return false;
  return ConstantTimeEqual(out, hash);
}

bool CheckBasicAuth(const std::map<std::string, std::string>& users, const std::string& authorization) {
  std::string_view a = authorization;
  while (!a.empty() && a.front() == ' ') a.remove_prefix(1);
  std::string user, pass;
  bool parsed = false;
  if (a.size() > 6 && (a.substr(0, 6) == "Basic " || a.substr(0, 6) == "basic ")) {
    a.remove_prefix(6);
    while (!a.empty() && a.front() == ' ') a.remove_prefix(1);
    while (!a.empty() && a.back() == ' ') a.remove_suffix(1);
    if (auto d = DecodeBase64(a); d && d->find(':') != std::string::npos) {
      user = d->substr(0, d->find(':'));
      pass = d->substr(d->find(':') + 1);
      parsed = true;
    }
  }
  auto it = parsed ? users.find(user) : users.end();
  bool ok = VerifyBcrypt(it != users.end() ? it->second : kDummyHash, pass);
  return ok && it != users.end();
}

}  // namespace remus
