#include "remusd/metrics.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <dlfcn.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <unistd.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/log.h"
#include "common/stats.h"

namespace remus {

using nlohmann::json;
using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

namespace {

// The states each role can report (replicator/primary/primary.cc PrimaryStateName,
// replicator/backup/backup.cc BackupDomain::StateName), for the enum-style
// remus_state gauge: one series per state, 1 for the current one.
const std::vector<std::string> kPrimaryStates = {"starting", "syncing", "protected", "unprotected", "failed-over",
                                                 "stopped", "fenced"};
// arbiter/lease.h LeaseStateName.
const std::vector<std::string> kLeaseStates = {"acquiring", "held", "fenced", "lost", "released"};
const std::vector<std::string> kBackupStates = {"waiting",     "syncing",  "protected",   "primary-lost",
                                                "unprotected", "promoting", "failed-over", "failed"};

const json& Field(const json& j, const char* key) {
  static const json kEmpty = json::object();
  return j.is_object() && j.contains(key) && j[key].is_object() ? j[key] : kEmpty;
}

double Num(const json& j, const char* key) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number()) return 0;
  return j[key].get<double>();
}

// Collects families in the order they are first named, so every sample of a
// family is written together (the format requires it). HELP texts must not
// hold a newline or backslash: prometheus-cpp 1.0.1 does not escape HELP
// (label values it does escape).
class Families {
 public:
  ClientMetric& Add(const std::string& name, const char* help, MetricType type,
                    std::vector<ClientMetric::Label> labels) {
    auto [it, fresh] = index_.emplace(name, fams_.size());
    if (fresh) fams_.push_back(MetricFamily{name, help, type, {}});
    MetricFamily& f = fams_[it->second];
    f.metric.emplace_back();
    f.metric.back().label = std::move(labels);
    return f.metric.back();
  }
  void Counter(const std::string& name, const char* help, const std::vector<ClientMetric::Label>& l, double v) {
    Add(name, help, MetricType::Counter, l).counter.value = v;
  }
  void Gauge(const std::string& name, const char* help, const std::vector<ClientMetric::Label>& l, double v) {
    Add(name, help, MetricType::Gauge, l).gauge.value = v;
  }
  // From the status JSON form (common/stats.h HistogramToJson); a missing or
  // malformed one is left out rather than exported wrong.
  void Histogram(const std::string& name, const char* help, const std::vector<ClientMetric::Label>& l,
                 const json& j) {
    auto h = HistogramFromJson(j);
    if (!h.ok()) return;
    ClientMetric::Histogram& m = Add(name, help, MetricType::Histogram, l).histogram;
    for (size_t i = 0; i < h->bounds.size(); i++) m.bucket.push_back({h->cumulative[i], h->bounds[i]});
    m.bucket.push_back({h->count, std::numeric_limits<double>::infinity()});
    m.sample_count = h->count;
    m.sample_sum = h->sum;
  }
  const std::vector<MetricFamily>& families() const { return fams_; }

 private:
  std::vector<MetricFamily> fams_;
  std::map<std::string, size_t> index_;
};

void AddDomain(Families& f, const json& d) {
  if (!d.is_object()) return;
  // After a failover the backup reports role "primary (promoted)"; the label
  // keeps naming this daemon's side of the pair.
  bool primary = d.value("role", "") == "primary";
  std::string role = primary ? "primary" : "backup";
  std::vector<ClientMetric::Label> l = {{"domain", d.value("domain", "")}, {"role", role}};
  auto with = [&](const char* k, const std::string& v) {
    auto x = l;
    x.push_back({k, v});
    return x;
  };

  std::string state = d.value("state", "");
  std::vector<std::string> states = primary ? kPrimaryStates : kBackupStates;
  if (std::find(states.begin(), states.end(), state) == states.end()) states.push_back(state);
  for (const auto& s : states)
    f.Gauge("remus_state", "Protection state of the domain (1 for the current state)", with("state", s),
            s == state ? 1 : 0);
  f.Counter("remus_checkpoints_total", "Checkpoints taken (primary) or committed (backup) after the initial copy", l,
            Num(d, "checkpoints_total"));
  const json& hist = Field(d, "histograms");
  // The last initial copy (delta resync): pages that crossed the link, pages
  // kept from the backup's earlier image, and the bytes that saved.
  if (d.contains("initial_copy")) {
    const json& ic = Field(d, "initial_copy");
    f.Gauge("remus_initial_copy_pages_sent", "Pages the last initial copy sent (primary) or received (backup)", l,
            Num(ic, primary ? "pages_sent" : "received_pages"));
    f.Gauge("remus_initial_copy_pages_kept", "Pages the last initial copy kept from the backup's earlier image", l,
            Num(ic, primary ? "pages_kept" : "kept_pages"));
    f.Gauge("remus_initial_copy_saved_bytes", "Page bytes the last initial copy did not send (delta resync)", l,
            Num(ic, "bytes_saved"));
  }
  // Arbitration (etcd): the lease this daemon holds on the domain, as
  // primary or as the backup that won it.
  const json& arb = Field(d, "arbiter");
  if (arb.value("name", "") == "etcd" && arb.contains("state")) {
    std::string ls = arb.value("state", "");
    for (const auto& s : kLeaseStates)
      f.Gauge("remus_arbiter_lease_state", "State of this host's ownership lease on the domain (1 for the current)",
              with("state", s), s == ls ? 1 : 0);
    f.Counter("remus_arbiter_lease_renewals_total", "Lease keep-alives etcd answered", l, Num(arb, "renewals"));
    f.Counter("remus_arbiter_lease_renewal_failures_total", "Lease keep-alives that failed or found the lease gone", l,
              Num(arb, "renewal_failures"));
    f.Counter("remus_arbiter_fence_events_total", "Times the guest was paused because the lease deadline passed", l,
              Num(arb, "fence_events"));
    f.Gauge("remus_arbiter_fencing_token", "The etcd revision that won the domain (the fencing token)", l,
            Num(arb, "token"));
    if (arb.contains("deadline_in_ms"))
      f.Gauge("remus_arbiter_lease_deadline_seconds", "Time left until the guest is fenced without a renewal", l,
              Num(arb, "deadline_in_ms") / 1000.0);
    f.Histogram("remus_arbiter_lease_renewal_seconds", "Latency of lease keep-alives to etcd", l,
                Field(Field(arb, "histograms"), "renewal_seconds"));
  }
  if (primary) {
    f.Gauge("remus_last_acked_epoch", "Last checkpoint epoch the backup acknowledged (-1: none yet)", l,
            Num(d, "last_acked_epoch"));
    f.Gauge("remus_unacked_epochs", "Checkpoints sent and not yet acknowledged", l, Num(d, "unacked_epochs"));
    f.Gauge("remus_unacked_bytes", "Bytes of checkpoints not yet acknowledged", l, Num(d, "unacked_bytes"));
    f.Gauge("remus_checkpoint_interval_seconds", "Configured checkpoint interval", l, Num(d, "interval_ms") / 1000.0);
    f.Counter("remus_wire_sent_bytes_total", "Bytes sent to the backup on the replication link", l,
              Num(Field(d, "link"), "bytes_sent"));
    f.Counter("remus_backpressure_waits_total", "Checkpoints that waited because the backup was behind", l,
              Num(d, "backpressure_waits"));
    const json& nb = Field(d, "netbuf");
    f.Gauge("remus_netbuf_buffered_packets", "Guest output packets held until their checkpoint is acknowledged", l,
            Num(nb, "buffered_packets"));
    f.Counter("remus_netbuf_dropped_packets_total", "Guest output packets dropped because the buffer was full", l,
              Num(nb, "dropped_packets"));
    f.Counter("remus_netbuf_released_packets_total", "Guest output packets released after acknowledgement", l,
              Num(nb, "released_packets"));
    f.Histogram("remus_pause_seconds", "Guest pause per checkpoint (QEMU STOP to RESUME)", l,
                Field(hist, "pause_seconds"));
    f.Histogram("remus_ack_latency_seconds", "Checkpoint staged (guest resumed) to acknowledged by the backup", l,
                Field(hist, "ack_seconds"));
    f.Histogram("remus_dirty_pages_per_epoch", "Dirty 4 KiB pages per checkpoint", l, Field(hist, "dirty_pages"));
  } else {
    f.Gauge("remus_last_committed_epoch", "Last checkpoint epoch committed to the page store (-1: none yet)", l,
            Num(d, "last_committed_epoch"));
    f.Counter("remus_wire_received_bytes_total", "Bytes received from the primary on the replication link", l,
              Num(Field(d, "link"), "bytes_received"));
    f.Counter("remus_failovers_total", "Promotions of this domain on this backup that completed", l,
              Num(d, "failovers_total"));
    f.Gauge("remus_primary_connected", "1 while a primary is connected for this domain", l,
            d.value("connected", false) ? 1 : 0);
    f.Histogram("remus_apply_seconds", "Time to commit a checkpoint to the page store", l,
                Field(hist, "apply_seconds"));
    f.Gauge("remus_promotion_token", "Fencing token of this backup's promotion (0: none, or no arbiter)", l,
            Num(Field(d, "promotion"), "token"));
    if (d.contains("residency")) {
      const json& r = Field(d, "residency");
      const json& res = Field(d, "resources");
      f.Gauge("remus_store_bytes", "Guest RAM held in this domain's page store", l, Num(r, "total_bytes"));
      f.Gauge("remus_store_resident_bytes", "Bytes of the page store in the page cache", l, Num(r, "resident_bytes"));
      f.Gauge("remus_store_locked_bytes", "Bytes of the page store locked in memory (residency hot)", l,
              Num(r, "locked_bytes"));
      f.Gauge("remus_store_allocated_bytes", "Disk blocks the page store's files take", l,
              Num(Field(res, "disk"), "store_allocated_bytes"));
    }
  }
}

// The exposition format's line ends are \n; so are civetweb's error pages.
void Reply(mg_connection* c, int code, const char* reason, const std::string& body, const char* extra_headers = "") {
  mg_printf(c,
            "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %zu\r\n%s"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            code, reason, body.size(), extra_headers);
  mg_write(c, body.data(), body.size());
}

int LogMessage(const mg_connection*, const char* message) {
  LOG_DEBUG("metrics") << message;
  return 1;  // not to stderr
}

// Accepts "ADDR:PORT" with a numeric IPv4 address or "[IPv6]" (where
// civetweb has IPv6); anything
// else (names, civetweb's own "8443s" or comma lists) is refused here.
Status CheckListenAddress(const std::string& addr) {
  auto bad = [&](const std::string& why) {
    return InvalidArgument("--metrics " + addr + ": " + why +
                           "; expected ADDR:PORT with a numeric IPv4 address, e.g. 127.0.0.1:9100 or 0.0.0.0:9100");
  };
  size_t colon = addr.rfind(':');
  if (colon == std::string::npos || colon + 1 == addr.size()) return bad("no port");
  std::string host = addr.substr(0, colon), port = addr.substr(colon + 1);
  if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535)
    return bad("bad port '" + port + "'");
  unsigned char buf[sizeof(in6_addr)];
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), buf) != 1) return bad("bad IPv6 address");
    // Debian 12's civetweb is built without IPv6.
    if (!mg_check_feature(MG_FEATURES_IPV6)) return bad("this remusd's civetweb has no IPv6 support, use IPv4");
  } else if (inet_pton(AF_INET, host.c_str(), buf) != 1) {
    return bad("'" + host + "' is not a numeric IPv4 address");
  }
  return OkStatus();
}

// The TLS-capable civetweb: loads the OpenSSL 3 shims (ssl_shim.c), then
// has civetweb load OpenSSL. Once per process; the result is kept.
Status EnableCivetwebTls() {
  static std::once_flag once;
  static Status result;
  std::call_once(once, [] {
    if (!mg_check_feature(MG_FEATURES_TLS)) {
      result = FailedPrecondition("this remusd's civetweb was built without TLS support");
      return;
    }
    std::vector<std::filesystem::path> dirs;
    char self[4096];
    ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
      std::filesystem::path exe(std::string(self, static_cast<size_t>(n)));
      dirs.push_back(exe.parent_path());
      dirs.push_back((exe.parent_path() / ".." / "lib" / "remus").lexically_normal());
    }
#ifdef REMUS_CIVETWEB_SHIM_DIR
    dirs.push_back(REMUS_CIVETWEB_SHIM_DIR);
#endif
    std::string tried;
    bool loaded = false;
    for (const auto& d : dirs) {
      std::string crypto = (d / "libremus-civetweb-crypto.so").string(), ssl = (d / "libremus-civetweb-ssl.so").string();
      tried += (tried.empty() ? "" : ", ") + d.string();
      if (::access(ssl.c_str(), R_OK) != 0 || ::access(crypto.c_str(), R_OK) != 0) continue;
      // Kept loaded for the life of the process: civetweb holds on to them.
      if (::dlopen(crypto.c_str(), RTLD_NOW) == nullptr || ::dlopen(ssl.c_str(), RTLD_NOW) == nullptr) {
        const char* e = ::dlerror();
        result = FailedPrecondition(std::string("cannot load ") + ssl + ": " + (e ? e : "dlopen failed"));
        return;
      }
      loaded = true;
      break;
    }
    if (!loaded) LOG_WARN("metrics") << "libremus-civetweb-ssl.so not found in " << tried << "; TLS may fail";
    unsigned features = mg_init_library(MG_FEATURES_TLS);
    if (!(features & MG_FEATURES_TLS))
      result = FailedPrecondition(
          std::string("civetweb could not load OpenSSL") +
          (loaded ? "" : " (libremus-civetweb-ssl.so and libremus-civetweb-crypto.so, which Debian 12's civetweb "
                         "needs for OpenSSL 3, are not in " + tried + "; scripts/install-systemd.sh installs them)"));
  });
  return result;
}

std::string OpenSslError() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += (out.empty() ? "" : "; ") + std::string(buf);
  }
  return out.empty() ? "unknown OpenSSL error" : out;
}

}  // namespace

std::string RenderMetrics(const json& domains) {
  Families f;
  double n_primary = 0, n_backup = 0;
  if (domains.is_array())
    for (const auto& d : domains) (d.is_object() && d.value("role", "") == "primary" ? n_primary : n_backup) += 1;
  f.Gauge("remus_domains", "Domains this remusd protects (primary) or replicates (backup)", {{"role", "primary"}},
          n_primary);
  f.Gauge("remus_domains", "Domains this remusd protects (primary) or replicates (backup)", {{"role", "backup"}},
          n_backup);
  if (domains.is_array())
    for (const auto& d : domains) AddDomain(f, d);
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, f.families());
  return out.str();
}

Status MetricsServer::MakeSslCtx() {
  const WebTlsConfig& t = *web_.tls;
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr) return Internal("SSL_CTX_new: " + OpenSslError());
  ssl_ctx_ = ctx;  // freed by the destructor, also on the errors below
  auto fail = [&](const std::string& what) {
    return FailedPrecondition("metrics web config " + web_.path + ": " + what + ": " + OpenSslError());
  };
  if (SSL_CTX_set_min_proto_version(ctx, t.min_version) != 1) return fail("min_version");
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (SSL_CTX_use_certificate_chain_file(ctx, t.cert_file.c_str()) != 1)
    return fail("tls_server_config.cert_file " + t.cert_file);
  if (SSL_CTX_use_PrivateKey_file(ctx, t.key_file.c_str(), SSL_FILETYPE_PEM) != 1)
    return fail("tls_server_config.key_file " + t.key_file + " (a PEM private key, the one of cert_file " +
                t.cert_file + "?)");
  if (SSL_CTX_check_private_key(ctx) != 1) return fail("key_file does not match cert_file");
  static const unsigned char kSessionContext[] = "remusd-metrics";
  SSL_CTX_set_session_id_context(ctx, kSessionContext, sizeof kSessionContext - 1);
  if (!t.client_ca_file.empty()) {
    if (SSL_CTX_load_verify_locations(ctx, t.client_ca_file.c_str(), nullptr) != 1)
      return fail("tls_server_config.client_ca_file " + t.client_ca_file);
    // The CA names offered to clients in the handshake.
    STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(t.client_ca_file.c_str());
    if (names == nullptr) return fail("tls_server_config.client_ca_file " + t.client_ca_file);
    SSL_CTX_set_client_CA_list(ctx, names);
  }
  if (t.require_client_cert) SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  return OkStatus();
}

// civetweb calls this when it sets up TLS (once, in mg_start2) and when it
// frees its context; 1 tells it the SSL_CTX is ours, to use and not free.
int MetricsServer::ExternalSslCtx(void** ssl_ctx, void* user_data) {
  auto* self = static_cast<MetricsServer*>(user_data);
  if (self->ssl_ctx_ == nullptr) {
    if (Status st = self->MakeSslCtx(); !st.ok()) {
      self->tls_error_ = st.message();
      return -1;
    }
  }
  *ssl_ctx = self->ssl_ctx_;
  return 1;
}

StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& addr, Source source,
                                                              const WebConfig* web) {
  RETURN_IF_ERROR(CheckListenAddress(addr));
  static std::once_flag init;
  std::call_once(init, [] { mg_init_library(0); });
  std::unique_ptr<MetricsServer> s(new MetricsServer(std::move(source)));
  if (web) s->web_ = *web;
  std::string listening = addr;
  if (s->tls()) {
    RETURN_IF_ERROR(EnableCivetwebTls().Annotate("metrics web config " + web->path + ": cannot serve TLS"));
    listening += "s";  // civetweb: this port speaks TLS only
  }
  const char* options[] = {"listening_ports", listening.c_str(),
                           "num_threads", "2",
                           "request_timeout_ms", "10000",
                           "max_request_size", "8192",
                           "enable_keep_alive", "no",
                           "enable_directory_listing", "no",
                           nullptr};
  mg_callbacks cb;
  std::memset(&cb, 0, sizeof cb);
  cb.begin_request = &MetricsServer::BeginRequest;
  cb.log_message = &LogMessage;
  if (s->tls()) cb.external_ssl_ctx = &MetricsServer::ExternalSslCtx;
  mg_init_data init_data{&cb, s.get(), options};
  char err[256] = "";
  mg_error_data error{};
#if CIVETWEB_VERSION_MAJOR == 1 && CIVETWEB_VERSION_MINOR < 16
  // civetweb 1.15 (Debian 12) reports the code through a pointer; 1.16
  // (Debian 13) holds it in the struct.
  unsigned code = 0;
  error.code = &code;
#endif
  error.text = err;
  error.text_buffer_size = sizeof err;
  s->ctx_ = mg_start2(&init_data, &error);
  if (s->ctx_ == nullptr && !s->tls_error_.empty()) return FailedPrecondition(s->tls_error_);
  if (s->ctx_ == nullptr)
    return Unavailable("cannot serve metrics on " + addr + ": " + (err[0] ? std::string(err) : "civetweb failed") +
                       " (is the address on this host and the port free? pick another with --metrics)");
  mg_server_port ports[4];
  int n = mg_get_server_ports(s->ctx_, 4, ports);
  s->port_ = n > 0 ? ports[0].port : 0;
  std::string host = addr.substr(0, addr.rfind(':'));
  if (host.front() == '[') host = host.substr(1, host.size() - 2);
  if (host == "0.0.0.0") host = "127.0.0.1";
  if (host == "::") host = "::1";
  s->poke_ = HostPort{host, static_cast<uint16_t>(s->port_)};
  return s;
}

MetricsServer::~MetricsServer() {
  if (!ctx_) {
    SSL_CTX_free(static_cast<SSL_CTX*>(ssl_ctx_));
    return;
  }
  // civetweb's listener polls in 2 s quanta and only then sees the stop
  // flag: connections wake it, so a daemon with --metrics stops promptly.
  std::atomic<bool> stopped{false};
  std::thread poke([&] {
    while (!stopped) {
      (void)ConnectTcp(poke_, 200);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  mg_stop(ctx_);  // joins civetweb's threads
  stopped = true;
  poke.join();
  SSL_CTX_free(static_cast<SSL_CTX*>(ssl_ctx_));  // civetweb was told not to
}

int MetricsServer::BeginRequest(mg_connection* c) {
  auto* self = static_cast<MetricsServer*>(mg_get_user_data(mg_get_context(c)));
  const mg_request_info* ri = mg_get_request_info(c);
  std::string uri = ri->local_uri ? ri->local_uri : "";
  std::string method = ri->request_method ? ri->request_method : "";
  // Basic auth, when configured, guards every path (as exporter-toolkit).
  if (!self->web_.basic_auth_users.empty()) {
    const char* authz = mg_get_header(c, "Authorization");
    if (!CheckBasicAuth(self->web_.basic_auth_users, authz ? authz : "")) {
      LOG_DEBUG("metrics") << "401 for " << method << " " << uri << (authz ? ": wrong credentials" : ": no credentials");
      Reply(c, 401, "Unauthorized", "unauthorized\n", "WWW-Authenticate: Basic realm=\"remusd metrics\"\r\n");
      return 401;
    }
  }
  if (uri != "/metrics") {
    Reply(c, 404, "Not Found", "not found: remusd serves GET /metrics only\n");
    return 404;
  }
  if (method != "GET") {
    Reply(c, 405, "Method Not Allowed", "method " + method + " not allowed: use GET /metrics\n", "Allow: GET\r\n");
    return 405;
  }
  std::string body;
  try {
    body = RenderMetrics(self->source_());
  } catch (const std::exception& e) {
    Reply(c, 500, "Internal Server Error", std::string("collecting metrics failed: ") + e.what() + "\n");
    return 500;
  }
  mg_printf(c,
            "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n",
            kMetricsContentType, body.size());
  mg_write(c, body.data(), body.size());
  return 200;
}

}  // namespace remus
