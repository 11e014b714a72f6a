// remusd's Prometheus endpoint (`remusd --metrics ADDR:PORT`): GET /metrics
// over HTTP/1.0 or 1.1 (or HTTPS, below) in the text exposition format,
// version 0.0.4.
//
// The metrics are rendered at scrape time from the domains' status JSON (the
// same objects `remusctl status --json` shows), so there is one source of
// truth: counters and the cumulative histograms live in the replicators
// (common/stats.h Histogram), this file only names and formats them. The
// metric names and labels are listed in docs/formats/control.md.
//
// Built on two maintained Debian packages rather than by hand:
// prometheus-cpp's core (its data model and TextSerializer, which does the
// label escaping) and civetweb (the HTTP server prometheus-cpp's own exposer
// uses). prometheus-cpp's Exposer itself is not used: in 1.0.1 it answers
// other methods on /metrics with 404 instead of 405 and labels the reply
// without `version=0.0.4`, so requests are routed here, in civetweb's
// begin_request callback.
//
// Optional TLS and HTTP basic auth come from a web config file in the
// format of Prometheus exporters (remusd/web_config.h). TLS is civetweb's,
// on an SSL_CTX remusd builds with OpenSSL (the external_ssl_ctx callback);
// Debian 12's civetweb needs two shim libraries to load OpenSSL 3
// (civetweb_openssl3/ssl_shim.c).
//
// Thread-safety: MetricsServer serves from its own civetweb threads (a fixed
// pool; slow clients time out), so a scrape never blocks the daemon beyond
// the status call it makes. The source callback runs on those threads.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "common/status.h"
#include "remusd/web_config.h"

struct mg_connection;  // civetweb
struct mg_context;

namespace remus {

// The exposition text for `domains` (a JSON array of status objects, as
// remusd's `status` command returns). Pure; unit-tested.
std::string RenderMetrics(const nlohmann::json& domains);

// The Content-Type of RenderMetrics' text.
inline constexpr const char* kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";

class MetricsServer {
 public:
  // Returns the domains' status array; called once per scrape.
  using Source = std::function<nlohmann::json()>;

  // Serves GET /metrics on `addr`, "ADDR:PORT" with a numeric IPv4 address
  // or "[IPv6]" if civetweb was built with IPv6 (Debian 12's is not); port
  // 0: any free port, see port(). Other paths get 404,
  // other methods 405; requests are limited to 8 KiB of headers and 10 s.
  // InvalidArgument for a malformed address, Unavailable when it cannot be
  // bound. With `web`: HTTPS instead of HTTP if web->tls (the certificate
  // and key are read here; FailedPrecondition if TLS cannot be set up), and
  // 401 without the credentials of one of web->basic_auth_users.
  static StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& addr, Source source,
                                                        const WebConfig* web = nullptr);
  // Stops serving; no call of the source is running or starts afterwards.
  ~MetricsServer();

  // The TCP port served.
  int port() const { return port_; }
  // Whether it is served over TLS.
  bool tls() const { return web_.tls.has_value(); }

 private:
  MetricsServer(Source source) : source_(std::move(source)) {}
  static int BeginRequest(mg_connection* conn);
  static int ExternalSslCtx(void** ssl_ctx, void* user_data);
  Status MakeSslCtx();

  Source source_;
  WebConfig web_;             // set before civetweb starts, read-only after
  void* ssl_ctx_ = nullptr;   // SSL_CTX*, owned; freed after mg_stop
  std::string tls_error_;     // why MakeSslCtx failed, for Start's message
  mg_context* ctx_ = nullptr;
  int port_ = 0;
  HostPort poke_;  // where the destructor connects to wake civetweb's listener
};

}  // namespace remus
