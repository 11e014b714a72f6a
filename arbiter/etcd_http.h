// HttpClient: etcd's v3 API (the Kv interface, etcd.h) over etcd's JSON
// gRPC-gateway, with libcurl.
//
// Why the gateway and not gRPC: Debian's libgrpc++ would need protobuf code
// generated in-tree from etcd's rpc.proto (and the gogoproto/annotations
// protos it imports) and a much heavier dependency for remusd; the gateway is
// etcd's documented HTTP API, and arbitration sends a few small requests per
// second, so JSON's cost does not matter.
//
// What etcd 3.4.23 (Debian 12's etcd-server) serves, checked by experiment:
// - Prefix: /v3/ and /v3beta/ both answer; /v3alpha/ is 404. We use /v3/:
//   3.4 deprecates /v3beta/ and 3.5 keeps only /v3/.
// - Every endpoint is POST with a JSON body. int64 fields (revisions, lease
//   ids, TTLs) are JSON strings ("revision":"12"); the gateway also accepts
//   numbers in requests. proto3 JSON omits default values: "succeeded" is
//   absent when a transaction failed, "kvs" when a range found nothing,
//   "value" when a value is empty, "lease" when 0, "TTL" of a keep-alive of
//   a dead lease.
// - A compare of create_revision == 0 ("key absent") works, with
//   "create_revision":"0" sent explicitly or left out.
// - /v3/lease/keepalive is a streaming RPC: one request in the body gets one
//   {"result":{"ID":..,"TTL":..}} line back. A dead lease gets TTL absent,
//   not an error.
// - /v3/lease/revoke of an unknown lease: HTTP 404,
//   {"error":"etcdserver: requested lease not found","code":5}.
// - /v3/lease/timetolive of an unknown lease: "TTL":"-1", HTTP 200.
// - Unary errors: {"error":msg,"message":msg,"code":grpc_code}; the
//   streaming keep-alive's: {"error":{"grpc_code":14,"http_code":503,
//   "message":"etcdserver: no leader",...}}. A member without quorum answers
//   linearizable reads 503 code 14 "etcdserver: request timed out" and writes
//   500 code 2 "context deadline exceeded", after ~7 s (etcd's own request
//   timeout; ours is shorter).
//
// Endpoints and deadlines: a call first tries the endpoint that answered
// last, then the others in order. It moves on after a transport failure
// (refused, reset, timed out, an answer over 4 MiB, not JSON), an HTTP 5xx,
// or an answer naming a leader change or no leader (gRPC code 14). When
// every endpoint failed it pauses 50 ms and goes round again (an election
// takes about a second). The whole call, across all endpoints and rounds, is
// bounded by request_timeout; each connection attempt also by
// connect_timeout, so a dead host does not eat the live ones' budget (a
// member that accepts but never answers still can). When no endpoint
// answered in time: Unavailable naming the endpoints tried and the last
// error. Any other answer, including etcd's own errors, ends the call.
//
// A write whose answer was lost (timeout, reset, 5xx) is sent again to the
// next endpoint, and may have taken effect the first time: a create-if-absent
// can then report succeeded=false with the caller's own value in its failure
// Get. Callers that must tell these apart compare the value they read back.
//
// Thread-safety: safe to call from any thread; calls run concurrently, each
// on its own curl handle (idle handles are pooled to keep connections open).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "arbiter/etcd.h"
#include "common/clock.h"
#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus::etcd {

struct HttpClientOptions {
  // Client URLs, "http://10.0.0.1:2379" or "https://...". At least one.
  std::vector<std::string> endpoints;
  // TLS (https endpoints), each optional: the CA bundle that signed the
  // members' certificates (else the system's), and our client certificate and
  // key when the cluster requires client authentication.
  std::string cacert, cert, key;
  // Bound on a whole call, across every endpoint it tries.
  Nanos request_timeout = std::chrono::seconds(1);
  // Bound on connecting to one endpoint.
  Nanos connect_timeout = std::chrono::milliseconds(500);
};

// Owns its curl handles; destroy it only when no call is in flight.
class HttpClient final : public Kv {
 public:
  // Validates the options: every endpoint is http:// or https:// with a
  // host and a port and nothing after the port but an optional "/"; the TLS
  // files that are set are readable; a key comes with a cert (a cert alone
  // may hold its key, as curl allows); timeouts are positive. InvalidArgument names the bad URL or file.
  static StatusOr<std::unique_ptr<HttpClient>> Create(HttpClientOptions options);
  ~HttpClient() override;
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  StatusOr<int64_t> Grant(int64_t ttl_seconds) override;
  StatusOr<int64_t> KeepAlive(int64_t lease) override;
  Status Revoke(int64_t lease) override;
  StatusOr<int64_t> TimeToLive(int64_t lease) override;
  StatusOr<std::optional<KeyValue>> Get(const std::string& key) override;
  StatusOr<TxnResult> Txn(const TxnRequest& txn) override;

  // The endpoint the next call tries first (the last one that answered).
  std::string PreferredEndpoint() const EXCLUDES(mu_);

 private:
  struct Reply;  // one endpoint's answer (etcd_http.cc)

  explicit HttpClient(HttpClientOptions options);

  // POSTs `body` to `path` (e.g. "/v3/kv/range"), failing over between
  // endpoints as the header comment describes. Returns the parsed JSON of
  // the first answer that is not a reason to try another endpoint; an etcd
  // error answer becomes InvalidArgument (gRPC code 3), NotFound (5),
  // PermissionDenied (7), Unauthenticated (16) or Internal, prefixed with
  // `what`.
  StatusOr<nlohmann::json> Call(std::string_view what, std::string_view path,
                                const std::string& body) EXCLUDES(mu_);
  // One attempt against one endpoint, within `budget`.
  Reply Post(void* curl, const std::string& url, const std::string& body, Nanos budget) const;
  // The handles are CURL* (curl.h's `typedef void CURL`), kept as void* so
  // this header does not pull in curl.h.
  void* TakeHandle() EXCLUDES(mu_);
  void ReturnHandle(void* curl) EXCLUDES(mu_);

  const HttpClientOptions options_;
  mutable Mutex mu_;
  size_t preferred_ GUARDED_BY(mu_) = 0;  // index into options_.endpoints
  // Idle curl easy handles; each keeps its connections open for reuse.
  std::vector<void*> idle_ GUARDED_BY(mu_);
};

// etcd's byte fields travel as standard base64 with padding (Go's
// encoding/base64.StdEncoding). Decode rejects anything else with
// InvalidArgument.
std::string Base64Encode(std::string_view bytes);
StatusOr<std::string> Base64Decode(std::string_view text);

// Checks one endpoint URL the way Create does; InvalidArgument names it.
Status ValidateEndpoint(std::string_view url);

}  // namespace remus::etcd
