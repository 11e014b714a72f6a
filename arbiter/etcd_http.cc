#include "arbiter/etcd_http.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/log.h"

namespace remus::etcd {

using json = nlohmann::json;
using std::chrono::steady_clock;

namespace {

constexpr char kTag[] = "etcd";

// An answer larger than this is not one etcd gives to our one-key requests;
// the write callback refuses it rather than let a broken or hostile peer
// grow our memory.
constexpr size_t kMaxBody = 4 << 20;

// Pause between two passes over every endpoint, so a call that meets "no
// leader" everywhere during an election does not spin.
constexpr Nanos kPassPause = std::chrono::milliseconds(50);

// libcurl's global state must be set up once before any handle exists, and
// is not thread-safe to set up.
Status InitCurlOnce() {
  static std::once_flag once;
  static CURLcode rc = CURLE_OK;
  std::call_once(once, [] { rc = curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (rc != CURLE_OK) return Internal(std::string("curl_global_init failed: ") + curl_easy_strerror(rc));
  return OkStatus();
}

// curl takes 0 as "no timeout": round up, to at least 1 ms.
long CeilMillis(Nanos d) {
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(d).count();
  return static_cast<long>(std::max<int64_t>(ms, 1));
}

// etcd's error answer. Unary calls: {"error":msg,"message":msg,"code":N}; the
// streaming keep-alive: {"error":{"grpc_code":N,"message":msg,...}}.
struct EtcdError {
  int code = 2;  // gRPC Unknown
  std::string message;
};

std::optional<EtcdError> ErrorOf(const json& j) {
  if (!j.is_object()) return std::nullopt;
  auto it = j.find("error");
  if (it == j.end()) return std::nullopt;
  EtcdError e;
  const json* holder = &j;
  if (it->is_object()) {
    holder = &*it;
    auto c = it->find("grpc_code");
    if (c != it->end() && c->is_number_integer()) e.code = c->get<int>();
  } else {
    auto c = j.find("code");
    if (c != j.end() && c->is_number_integer()) e.code = c->get<int>();
    if (it->is_string()) e.message = it->get<std::string>();
  }
  auto m = holder->find("message");
  if (m != holder->end() && m->is_string() && !m->get<std::string>().empty()) e.message = m->get<std::string>();
  if (e.message.empty()) e.message = "(no message)";
  return e;
}

// Errors another member may not have: this member lost its leader or is
// mid-election (etcd sends these as gRPC Unavailable, code 14, but the
// message is the stable part across versions).
bool IsRetryable(const EtcdError& e) {
  return e.code == 14 || e.message.find("leader changed") != std::string::npos ||
         e.message.find("no leader") != std::string::npos;
}

Status FromEtcdError(std::string_view what, const EtcdError& e, long http) {
  std::string m = std::string(what) + ": " + e.message;
  switch (e.code) {
    case 3: return InvalidArgument(m);
    case 5: return NotFound(m);
    case 7: return PermissionDenied(m);
    case 16: return Unauthenticated(m);
    default:
      return Internal(m + " (gRPC code " + std::to_string(e.code) + ", HTTP " + std::to_string(http) + ")");
  }
}

Status Malformed(std::string_view what, std::string_view detail) {
  return Internal(std::string(what) + ": etcd's answer is malformed: " + std::string(detail));
}

// proto3 JSON int64: a string of digits, or (accepted too) a number; an
// absent field is 0.
StatusOr<int64_t> Int64Field(std::string_view what, const json& obj, const char* name) {
  if (!obj.is_object()) return Malformed(what, std::string("no object holding \"") + name + "\"");
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return int64_t{0};
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_string()) {
    const std::string& s = it->get_ref<const std::string&>();
    int64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc() && end == s.data() + s.size() && !s.empty()) return v;
  }
  return Malformed(what, std::string("\"") + name + "\" is not an int64: " + it->dump().substr(0, 64));
}

// proto3 JSON bytes: base64; absent is empty.
StatusOr<std::string> BytesField(std::string_view what, const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return std::string();
  if (!it->is_string()) return Malformed(what, std::string("\"") + name + "\" is not a string");
  auto b = Base64Decode(it->get_ref<const std::string&>());
  if (!b.ok()) return Malformed(what, std::string("\"") + name + "\": " + b.status().message());
  return std::move(b).value();
}

StatusOr<KeyValue> ParseKeyValue(std::string_view what, const json& j) {
  if (!j.is_object()) return Malformed(what, "a kvs entry is not an object");
  KeyValue kv;
  ASSIGN_OR_RETURN(kv.key, BytesField(what, j, "key"));
  ASSIGN_OR_RETURN(kv.value, BytesField(what, j, "value"));
  ASSIGN_OR_RETURN(kv.create_revision, Int64Field(what, j, "create_revision"));
  ASSIGN_OR_RETURN(kv.mod_revision, Int64Field(what, j, "mod_revision"));
  ASSIGN_OR_RETURN(kv.version, Int64Field(what, j, "version"));
  ASSIGN_OR_RETURN(kv.lease, Int64Field(what, j, "lease"));
  return kv;
}

// A range answer's "kvs" (absent when nothing matched): its first entry.
StatusOr<std::optional<KeyValue>> FirstKv(std::string_view what, const json& range) {
  if (!range.is_object()) return Malformed(what, "a range answer is not an object");
  auto it = range.find("kvs");
  if (it == range.end() || it->is_null()) return std::optional<KeyValue>();
  if (!it->is_array()) return Malformed(what, "\"kvs\" is not an array");
  if (it->empty()) return std::optional<KeyValue>();
  ASSIGN_OR_RETURN(KeyValue kv, ParseKeyValue(what, it->front()));
  return std::optional<KeyValue>(std::move(kv));
}

json OpJson(const Op& op) {
  switch (op.kind) {
    case Op::Kind::kPut: {
      json put = {{"key", Base64Encode(op.key)}, {"value", Base64Encode(op.value)}};
      if (op.lease != 0) put["lease"] = std::to_string(op.lease);
      return {{"request_put", std::move(put)}};
    }
    case Op::Kind::kDelete:
      return {{"request_delete_range", {{"key", Base64Encode(op.key)}}}};
    case Op::Kind::kGet:
      break;
  }
  return {{"request_range", {{"key", Base64Encode(op.key)}}}};
}

json CompareJson(const Compare& c) {
  json j = {{"key", Base64Encode(c.key)}, {"result", "EQUAL"}};
  // The number is sent even when 0 (a create revision of 0 is "absent"):
  // etcd reads a missing field as 0 too, but explicit is easier to debug.
  switch (c.target) {
    case Compare::Target::kCreateRevision:
      j["target"] = "CREATE";
      j["create_revision"] = std::to_string(c.number);
      break;
    case Compare::Target::kModRevision:
      j["target"] = "MOD";
      j["mod_revision"] = std::to_string(c.number);
      break;
    case Compare::Target::kValue:
      j["target"] = "VALUE";
      j["value"] = Base64Encode(c.value);
      break;
    case Compare::Target::kLease:
      j["target"] = "LEASE";
      j["lease"] = std::to_string(c.number);
      break;
  }
  return j;
}

bool ReadableFile(const std::string& path, std::string* err) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *err = ErrnoStatus("open", errno).message();
    return false;
  }
  ::close(fd);
  return true;
}

}  // namespace

// ---- base64 ----

std::string Base64Encode(std::string_view bytes) {
  if (bytes.empty()) return {};
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');  // + EVP's NUL
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

StatusOr<std::string> Base64Decode(std::string_view text) {
  // EVP_DecodeBlock skips surrounding whitespace, accepts a missing '='
  // inconsistently and counts padding as zero bytes of output, so the shape
  // is checked here and the padding subtracted after.
  if (text.size() % 4 != 0) return InvalidArgument("base64 length " + std::to_string(text.size()) + " is not a multiple of 4");
  if (text.size() > kMaxBody) return InvalidArgument("base64 text too long");
  size_t pad = 0;
  for (size_t i = 0; i < text.size(); i++) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '=') {
      if (i + 2 < text.size()) return InvalidArgument("base64 padding before the end");
      pad++;
    } else if (pad != 0 || !(std::isalnum(c) || c == '+' || c == '/')) {
      return InvalidArgument("invalid base64 character at offset " + std::to_string(i));
    }
  }
  if (text.empty()) return std::string();
  std::string out(text.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
  if (n < 0 || static_cast<size_t>(n) < pad) return InvalidArgument("invalid base64");
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

// ---- endpoints ----

Status ValidateEndpoint(std::string_view url) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument("etcd endpoint \"" + std::string(url) + "\": " + std::string(why) +
                           " (want http://HOST:PORT or https://HOST:PORT)");
  };
  std::string_view rest;
  if (url.starts_with("http://")) {
    rest = url.substr(7);
  } else if (url.starts_with("https://")) {
    rest = url.substr(8);
  } else {
    return bad("the scheme is not http:// or https://");
  }
  if (rest.ends_with("/")) rest.remove_suffix(1);
  if (rest.empty()) return bad("no host");
  std::string_view host;
  std::string_view port;
  if (rest.starts_with("[")) {  // [IPv6]:port
    size_t close = rest.find(']');
    if (close == std::string_view::npos) return bad("unterminated [IPv6 address]");
    host = rest.substr(1, close - 1);
    if (host.empty() || host.find_first_not_of("0123456789abcdefABCDEF:.") != std::string_view::npos)
      return bad("not an IPv6 address between [ ]");
    rest.remove_prefix(close + 1);
    if (!rest.starts_with(":")) return bad("no port");
    port = rest.substr(1);
  } else {
    size_t colon = rest.rfind(':');
    if (colon == std::string_view::npos) return bad("no port");
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
    if (host.empty()) return bad("no host");
    for (char c : host) {
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-'))
        return bad("the host has a character other than letters, digits, '.' and '-'");
    }
  }
  int p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || p < 1 || p > 65535)
    return bad("the port is not a number from 1 to 65535");
  return OkStatus();
}

// ---- the client ----

namespace {
struct Body {
  std::string data;
  bool too_big = false;
};

size_t WriteBody(char* data, size_t size, size_t n, void* userdata) {
  auto* r = static_cast<Body*>(userdata);
  size_t len = size * n;
  if (r->data.size() + len > kMaxBody) {
    r->too_big = true;
    return 0;  // curl fails the transfer with CURLE_WRITE_ERROR
  }
  try {  // never let an exception unwind through libcurl's C frames
    r->data.append(data, len);
  } catch (...) {
    return 0;
  }
  return len;
}
}  // namespace

struct HttpClient::Reply {
  bool transport_ok = false;  // an HTTP answer arrived
  std::string error;          // why not
  long http = 0;
  std::string body;
};

StatusOr<std::unique_ptr<HttpClient>> HttpClient::Create(HttpClientOptions options) {
  RETURN_IF_ERROR(InitCurlOnce());
  if (options.endpoints.empty()) return InvalidArgument("etcd client: no endpoints given");
  for (std::string& e : options.endpoints) {
    RETURN_IF_ERROR(ValidateEndpoint(e));
    if (e.ends_with("/")) e.pop_back();  // paths are appended as "/v3/..."
  }
  struct File {
    const char* what;
    const std::string& path;
  };
  for (const File& f : {File{"CA certificate", options.cacert}, File{"client certificate", options.cert},
                        File{"client key", options.key}}) {
    std::string err;
    if (!f.path.empty() && !ReadableFile(f.path, &err))
      return InvalidArgument(std::string("etcd client: the ") + f.what + " file " + f.path + " is not readable: " + err);
  }
  if (!options.key.empty() && options.cert.empty())
    return InvalidArgument("etcd client: a client key (" + options.key + ") needs a client certificate");
  if (options.request_timeout <= Nanos(0) || options.connect_timeout <= Nanos(0))
    return InvalidArgument("etcd client: the request and connect timeouts must be positive");
  return std::unique_ptr<HttpClient>(new HttpClient(std::move(options)));
}

HttpClient::HttpClient(HttpClientOptions options) : options_(std::move(options)) {}

HttpClient::~HttpClient() {
  MutexLock l(mu_);
  for (void* h : idle_) curl_easy_cleanup(h);
}

std::string HttpClient::PreferredEndpoint() const {
  MutexLock l(mu_);
  return options_.endpoints[preferred_];
}

void* HttpClient::TakeHandle() {
  {
    MutexLock l(mu_);
    if (!idle_.empty()) {
      void* h = idle_.back();
      idle_.pop_back();
      return h;
    }
  }
  return curl_easy_init();  // may be null: Post reports it
}

void HttpClient::ReturnHandle(void* curl) {
  if (curl == nullptr) return;
  MutexLock l(mu_);
  idle_.push_back(curl);
}

HttpClient::Reply HttpClient::Post(void* curl, const std::string& url, const std::string& body, Nanos budget) const {
  Reply r;
  Body body_in;
  if (curl == nullptr) {
    r.error = "curl_easy_init failed";
    return r;
  }
  // Reset drops the previous call's options but keeps the handle's open
  // connections, which is the point of pooling handles.
  curl_easy_reset(curl);
  char errbuf[CURL_ERROR_SIZE] = {0};
  // "Expect:" stops curl from waiting for 100-continue on larger bodies.
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  headers = curl_slist_append(headers, "Expect:");
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_POST, 1L);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &WriteBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body_in);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
  // Timeouts by signal (SIGALRM around the resolver) are unsafe with threads.
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, CeilMillis(budget));
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, CeilMillis(std::min(budget, options_.connect_timeout)));
  // An http_proxy/https_proxy in remusd's environment must not reroute
  // arbitration through a host that is not part of the cluster.
  curl_easy_setopt(curl, CURLOPT_PROXY, "");
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
  if (!options_.cacert.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, options_.cacert.c_str());
  if (!options_.cert.empty()) curl_easy_setopt(curl, CURLOPT_SSLCERT, options_.cert.c_str());
  if (!options_.key.empty()) curl_easy_setopt(curl, CURLOPT_SSLKEY, options_.key.c_str());

  CURLcode rc = curl_easy_perform(curl);
  curl_slist_free_all(headers);
  // The handle goes back to the pool; it must not point at this frame.
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, nullptr);
  if (rc != CURLE_OK) {
    if (body_in.too_big) {
      r.error = "answer larger than " + std::to_string(kMaxBody) + " bytes";
    } else {
      r.error = curl_easy_strerror(rc);
      if (errbuf[0] != '\0') r.error += std::string(" (") + errbuf + ")";
    }
    return r;
  }
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r.http);
  r.body = std::move(body_in.data);
  r.transport_ok = true;
  return r;
}

StatusOr<json> HttpClient::Call(std::string_view what, std::string_view path, const std::string& body) {
  const auto deadline = steady_clock::now() + options_.request_timeout;
  const size_t n = options_.endpoints.size();
  size_t first;
  {
    MutexLock l(mu_);
    first = preferred_;
  }
  std::vector<bool> tried(n, false);
  std::string last_error = "no attempt fitted in the deadline";
  void* curl = TakeHandle();
  // Passes over every endpoint, starting with the one that answered last,
  // until one answers or the deadline passes.
  for (int pass = 0;; pass++) {
    if (pass > 0) {
      if (steady_clock::now() + kPassPause >= deadline) break;
      std::this_thread::sleep_for(kPassPause);
    }
    bool expired = false;
    for (size_t i = 0; i < n && !expired; i++) {
      const size_t idx = (first + i) % n;
      const std::string& ep = options_.endpoints[idx];
      Nanos left = deadline - steady_clock::now();
      if (left <= Nanos(0)) {
        expired = true;
        break;
      }
      tried[idx] = true;
      Reply r = Post(curl, ep + std::string(path), body, left);
      if (!r.transport_ok) {
        last_error = ep + ": " + r.error;
        continue;
      }
      json j = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
      std::optional<EtcdError> err = j.is_discarded() ? std::nullopt : ErrorOf(j);
      if (r.http >= 500 || (err && IsRetryable(*err))) {
        last_error = ep + ": HTTP " + std::to_string(r.http) + ": " +
                     (err ? err->message : r.body.substr(0, 200));
        continue;
      }
      if (j.is_discarded()) {
        // Not etcd's gateway speaking (something else on that port?).
        last_error = ep + ": HTTP " + std::to_string(r.http) + ", not JSON: " + r.body.substr(0, 200);
        continue;
      }
      // This endpoint answered: it is the one to ask first next time.
      ReturnHandle(curl);
      {
        MutexLock l(mu_);
        preferred_ = idx;
      }
      if (idx != first) LOG_INFO(kTag) << "failed over to " << ep << " (" << last_error << ")";
      if (err) return FromEtcdError(what, *err, r.http);
      if (r.http != 200 || !j.is_object())
        return Malformed(what, "HTTP " + std::to_string(r.http) + ": " + r.body.substr(0, 200));
      return j;
    }
    if (expired) break;
  }
  ReturnHandle(curl);
  std::string names;
  for (size_t i = 0; i < n; i++) {
    if (!tried[i]) continue;
    if (!names.empty()) names += ", ";
    names += options_.endpoints[i];
  }
  return Unavailable(std::string(what) + ": no etcd endpoint answered within " +
                     std::to_string(CeilMillis(options_.request_timeout)) + " ms (tried " + names +
                     "); last error: " + last_error);
}

// ---- Kv ----

StatusOr<int64_t> HttpClient::Grant(int64_t ttl_seconds) {
  const std::string what = "etcd lease grant";
  if (ttl_seconds <= 0) return InvalidArgument(what + ": TTL " + std::to_string(ttl_seconds) + " is not positive");
  ASSIGN_OR_RETURN(json j, Call(what, "/v3/lease/grant", json{{"TTL", std::to_string(ttl_seconds)}}.dump()));
  ASSIGN_OR_RETURN(int64_t id, Int64Field(what, j, "ID"));
  if (id == 0) return Malformed(what, "no lease ID");
  return id;
}

StatusOr<int64_t> HttpClient::KeepAlive(int64_t lease) {
  const std::string what = "etcd lease keep-alive of " + std::to_string(lease);
  ASSIGN_OR_RETURN(json j, Call(what, "/v3/lease/keepalive", json{{"ID", std::to_string(lease)}}.dump()));
  // A streaming RPC through the gateway: the message is under "result".
  auto it = j.find("result");
  if (it == j.end() || !it->is_object()) return Malformed(what, "no \"result\" object");
  // TTL absent (0) when the lease has expired or was revoked.
  return Int64Field(what, *it, "TTL");
}

Status HttpClient::Revoke(int64_t lease) {
  const std::string what = "etcd lease revoke of " + std::to_string(lease);
  auto j = Call(what, "/v3/lease/revoke", json{{"ID", std::to_string(lease)}}.dump());
  if (!j.ok() && j.status().code() == Code::kNotFound) return OkStatus();  // already gone
  return j.status();
}

StatusOr<int64_t> HttpClient::TimeToLive(int64_t lease) {
  const std::string what = "etcd lease time-to-live of " + std::to_string(lease);
  ASSIGN_OR_RETURN(json j, Call(what, "/v3/lease/timetolive", json{{"ID", std::to_string(lease)}}.dump()));
  return Int64Field(what, j, "TTL");  // -1 when the lease does not exist
}

StatusOr<std::optional<KeyValue>> HttpClient::Get(const std::string& key) {
  const std::string what = "etcd get";
  ASSIGN_OR_RETURN(json j, Call(what, "/v3/kv/range", json{{"key", Base64Encode(key)}}.dump()));
  return FirstKv(what, j);
}

StatusOr<TxnResult> HttpClient::Txn(const TxnRequest& txn) {
  const std::string what = "etcd txn";
  json compare = json::array();
  for (const Compare& c : txn.compare) compare.push_back(CompareJson(c));
  json success = json::array();
  for (const Op& op : txn.success) success.push_back(OpJson(op));
  json failure = json::array();
  for (const Op& op : txn.failure) failure.push_back(OpJson(op));
  json req = {{"compare", std::move(compare)}, {"success", std::move(success)}, {"failure", std::move(failure)}};
  ASSIGN_OR_RETURN(json j, Call(what, "/v3/kv/txn", req.dump()));

  TxnResult out;
  auto header = j.find("header");
  if (header == j.end()) return Malformed(what, "no \"header\"");
  ASSIGN_OR_RETURN(out.revision, Int64Field(what, *header, "revision"));
  auto s = j.find("succeeded");  // absent when false
  if (s != j.end() && !s->is_null()) {
    if (!s->is_boolean()) return Malformed(what, "\"succeeded\" is not a boolean");
    out.succeeded = s->get<bool>();
  }
  const std::vector<Op>& ran = out.succeeded ? txn.success : txn.failure;
  auto rs = j.find("responses");  // absent when the branch was empty
  size_t count = 0;
  if (rs != j.end() && !rs->is_null()) {
    if (!rs->is_array()) return Malformed(what, "\"responses\" is not an array");
    count = rs->size();
  }
  if (count != ran.size())
    return Malformed(what, std::to_string(count) + " responses for " + std::to_string(ran.size()) + " operations");
  for (size_t i = 0; i < ran.size(); i++) {
    if (ran[i].kind != Op::Kind::kGet) continue;
    const json& r = (*rs)[i];
    auto range = r.find("response_range");  // end() when r is not an object
    if (range == r.end()) return Malformed(what, "no response_range for a get");
    ASSIGN_OR_RETURN(std::optional<KeyValue> kv, FirstKv(what, *range));
    out.gets.push_back(std::move(kv));
  }
  return out;
}

}  // namespace remus::etcd
