#include "remusd/daemon.h"
#include "remusd/status_rows.h"

#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <algorithm>
#include <cstdint>
#include <optional>
#include <thread>

#include "arbiter/etcd_http.h"
#include "arbiter/fence_table.h"
#include "arbiter/leftovers.h"
#include "replicator/estimate/estimate.h"
#include "replicator/libvirt/monitor.h"

#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {

using nlohmann::json;

namespace {

json Error(const Status& s) { return {{"ok", false}, {"code", std::string(CodeName(s.code()))}, {"error", s.message()}}; }
json Ok(json result = json::object()) { return {{"ok", true}, {"result", std::move(result)}}; }

// protect --compress xor-lz4: the page versions kept on the primary
// (page_version_cache.h), unless --xor-cache says otherwise. Measured on
// real workloads in docs/performance.md, "Compression".
constexpr int64_t kDefaultXorCacheMib = 64;

// The backup reports the compression its CONFIG named: "none", "lz4" or
// "xor-lz4" (older backups: a boolean for LZ4).
std::string ReprotectCompression(const json& detail) {
  const json c = detail.value("compress", json(false));
  if (c.is_string()) return c.get<std::string>();
  return c.is_boolean() && c.get<bool>() ? "lz4" : "none";
}

// A --listen address other hosts can reach: a host that is no wildcard, and
// a port (what --reprotect-to self and a switchover's reverse protection name).
bool ReachableListen(const std::optional<HostPort>& l) {
  return l && l->port != 0 && !l->host.empty() && l->host != "0.0.0.0" && l->host != "::";
}

// A --reprotect-to value, wherever it is given (remusd's flag, protect,
// switchover; each has its own default for an empty value): "none" gives "",
// "self" this host's --listen address (one other hosts reach), HOST:PORT
// itself. `what` prefixes errors.
StatusOr<std::string> ResolveReprotectTo(const std::string& value, const std::optional<HostPort>& listen,
                                         const std::string& what) {
  if (value == "none") return std::string();
  if (value == "self") {
    if (!ReachableListen(listen))
      return InvalidArgument(what + "--reprotect-to self names this host's --listen address, so --listen must give a "
                                    "host other hosts reach it by and a port (not 0.0.0.0 or ::); or give "
                                    "--reprotect-to HOST:PORT");
    return listen->ToString();
  }
  auto hp = ParseHostPort(value, 7788);
  if (!hp.ok()) return hp.status().Annotate(what + "--reprotect-to");
  return hp->ToString();
}

// A protection from here that is starting or running (a second one is refused).
bool ProtectionActive(PrimaryState s) {
  return s == PrimaryState::kSyncing || s == PrimaryState::kProtected || s == PrimaryState::kStarting;
}

StatusOr<std::string> DomainArg(const RequestReader& req) {
  if (!req.Has("domain")) return InvalidArgument("missing domain name");
  ASSIGN_OR_RETURN(std::string d, req.String("domain", ""));
  if (!ValidDomainName(d))
    return InvalidArgument("invalid domain name '" + d + "': use 1-64 letters, digits, '.', '-' or '_'");
  return d;
}

}  // namespace

Status ValidateArbiterOptions(const DaemonOptions& o) {
  if (o.arbiter == "none") {
    if (!o.etcd_endpoints.empty())
      return InvalidArgument("--etcd-endpoints is given but --arbiter is none; drop one of them");
    return OkStatus();
  }
  if (o.arbiter != "etcd") return InvalidArgument("--arbiter must be etcd or none, not '" + o.arbiter + "'");
  if (o.etcd_endpoints.empty())
    return InvalidArgument(
        "no arbiter: give --etcd-endpoints URL[,URL...] (--arbiter etcd is the default), or --arbiter none to run "
        "without arbitration, accepting that a network partition or a frozen remusd can leave two running copies");
  if (o.lease_ttl_ms < 1000 || o.lease_ttl_ms > 600000)
    return InvalidArgument("--lease-ttl-ms must be 1000..600000, not " + std::to_string(o.lease_ttl_ms));
  if (o.lease_margin_ms < 100 || o.lease_margin_ms * 2 > o.lease_ttl_ms)
    return InvalidArgument("--lease-margin-ms must be at least 100 and at most half of --lease-ttl-ms (" +
                           std::to_string(o.lease_ttl_ms) + "), not " + std::to_string(o.lease_margin_ms));
  if (o.etcd_prefix.empty() || o.etcd_prefix[0] != '/')
    return InvalidArgument("--etcd-prefix must start with '/', not '" + o.etcd_prefix + "'");
  return OkStatus();
}

Daemon::Daemon(DaemonOptions opts, const Clock& clock)
    : opts_(std::move(opts)), clock_(clock), history_(std::make_unique<DomainHistory>(opts_.state_dir + "/history")) {}

Daemon::~Daemon() { Shutdown(); }

Status Daemon::Start() {
  // Replication links: TLS 1.3 with the shared key, or with certificates.
  wire::LinkSecurity sec;
  sec.peer_name = opts_.tls_peer_name;
  if (opts_.tls_cert.empty() && opts_.tls_key.empty() && opts_.tls_ca.empty()) {
    ASSIGN_OR_RETURN(sec.key, wire::LoadKey(opts_.key_file));
  } else {
    sec.cert_file = opts_.tls_cert;
    sec.key_file = opts_.tls_key;
    sec.ca_file = opts_.tls_ca;
  }
  ASSIGN_OR_RETURN(tls_primary_, wire::TlsContext::Create(sec, wire::TlsRole::kPrimary));
  ASSIGN_OR_RETURN(tls_backup_, wire::TlsContext::Create(sec, wire::TlsRole::kBackup));
  RETURN_IF_ERROR(ValidateArbiterOptions(opts_));
  if (opts_.arbiter == "etcd") {
    etcd::HttpClientOptions eo;
    eo.endpoints = opts_.etcd_endpoints;
    eo.cacert = opts_.etcd_cacert;
    eo.cert = opts_.etcd_cert;
    eo.key = opts_.etcd_key;
    ASSIGN_OR_RETURN(std::unique_ptr<etcd::HttpClient> c, etcd::HttpClient::Create(eo));
    etcd_ = std::move(c);
    ArbiterOptions ao;
    ao.prefix = opts_.etcd_prefix;
    ao.host = opts_.host_id.empty() ? LocalHostId() : opts_.host_id;
    ao.instance = RandomId();
    ao.ttl = std::chrono::milliseconds(opts_.lease_ttl_ms);
    ao.margin = std::chrono::milliseconds(opts_.lease_margin_ms);
    // Lease deadlines count through a suspend (CLOCK_BOOTTIME).
    arbiter_ = std::make_unique<EtcdArbiter>(ao, etcd_.get(), BootClock::Get());
    std::string eps;
    for (const auto& e : opts_.etcd_endpoints) eps += (eps.empty() ? "" : ",") + e;
    LOG_INFO("remusd") << "arbiter: etcd " << eps << ", prefix " << ao.prefix << ", host "
                       << ao.host << ", lease TTL " << opts_.lease_ttl_ms << " ms, margin " << opts_.lease_margin_ms
                       << " ms";
  } else {
    LOG_WARN("remusd") << "--arbiter none: promotion assumes a silent primary is dead; a network partition or a "
                          "frozen remusd can leave two running copies of a guest";
  }
  RETURN_IF_ERROR(MakeDirs(opts_.state_dir, 0700));
  RETURN_IF_ERROR(MakeDirs(opts_.state_dir + "/run", 0700));
  size_t slash = opts_.control_socket.rfind('/');
  if (slash != std::string::npos && slash > 0) RETURN_IF_ERROR(MakeDirs(opts_.control_socket.substr(0, slash), 0755));
  if (!opts_.reprotect_to.empty()) {
    ASSIGN_OR_RETURN(reprotect_to_, ResolveReprotectTo(opts_.reprotect_to, opts_.listen, ""));
  }
  reprotector_ = std::make_unique<Reprotector>(Reprotector::Deps{
      .protect = [this](const json& r) { return ProtectForReprotector(r); },
      .wanted = [this](const std::string& d) { return ReprotectWanted(d); },
      .report = [this](const std::string& d, const std::string& t) {
        history_->Record(d, {{"role", "backup"}, {"state", "failed-over"}, {"text", t}});
      }});
  if (opts_.listen) {
    BackupOptions bo;
    bo.state_dir = opts_.state_dir;
    bo.tls = tls_backup_;
    bo.heartbeat = opts_.heartbeat;
    bo.ack_delay_ms = opts_.ack_delay_ms;
    bo.restore_by_mapping = opts_.restore != "stream";
    bo.hot_headroom_bytes = opts_.hot_headroom_mib << 20;
    bo.qemu_binary = opts_.qemu_binary;
    bo.peer_policy = opts_.peer_policy;
    bo.auto_promote = opts_.auto_promote;
    bo.fault = opts_.fault;
    // Reverse protection after a planned switchover: the switchover names
    // where (its reprotect_to replaces the CONFIG's); the same job as an
    // automatic re-protection after a failover (one per domain).
    bo.on_switched_over = [this](const std::string& d, const json& detail) { MaybeReprotect(d, detail); };
    bo.libvirt_uri = opts_.libvirt_uri;
    bo.libvirt_pid_dir = opts_.libvirt_pid_dir;
    bo.on_state = [this](const std::string& d, const std::string& to, const json& detail) {
      history_->Record(d, {{"role", "backup"},
                           {"state", to},
                           {"text", DomainHistory::BackupText(to, detail.value("primary", std::string()), detail)}});
      if (to == "failed-over") MaybeReprotect(d, detail);
    };
    std::unique_ptr<Arbiter> a;
    if (arbiter_) a = std::make_unique<ArbiterRef>(arbiter_.get());
    else a = std::make_unique<FailStopArbiter>();
    backup_ = std::make_unique<BackupServer>(bo, clock_, std::move(a));
    RETURN_IF_ERROR(backup_->Listen(*opts_.listen).Annotate("listening for primaries"));
  }
  // Output-buffering rules left by a remusd that died must not keep holding
  // (or dropping) a guest's packets; but a guest another host owns now must
  // be gone before its held output could leave.
  const bool decided = ResolveLeftovers();
  if (arbiter_) RETURN_IF_ERROR(StartFenceWatchdog());
  if (decided) {
    if (Status c = CleanupStaleNetbuf(); !c.ok()) LOG_WARN("remusd") << "netbuf cleanup: " << c.message();
  }
  ASSIGN_OR_RETURN(control_fd_, ListenUnix(opts_.control_socket, 0600));
  control_thread_ = std::thread([this] { ControlLoop(); });
  // Last: a scrape reads backup_, which must be set by then.
  if (!opts_.metrics_listen.empty()) {
    ASSIGN_OR_RETURN(metrics_, MetricsServer::Start(opts_.metrics_listen, [this] {
                       const json none = {{"all_roles", true}};
                       json r = StatusOf(RequestReader(none));
                       return r.value("ok", false) ? r["result"]["domains"] : json::array();
                     }, opts_.metrics_web ? &*opts_.metrics_web : nullptr));
    LOG_INFO("remusd") << "metrics: " << (metrics_->tls() ? "https" : "http") << "://"
                       << opts_.metrics_listen.substr(0, opts_.metrics_listen.rfind(':')) << ":" << metrics_->port()
                       << "/metrics"
                       << (opts_.metrics_web && !opts_.metrics_web->basic_auth_users.empty() ? " (basic auth)" : "");
  }
  LOG_INFO("remusd") << "ready: control socket " << opts_.control_socket << ", state " << opts_.state_dir
                     << ", replication links TLS 1.3 with " << tls_primary_->description();
  return OkStatus();
}

bool Daemon::ResolveLeftovers() {
  if (!arbiter_) return true;
  // Bounded: etcd may be down; then the rules stay and the operator is told.
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2 * opts_.lease_ttl_ms);
  for (;;) {
    bool undecided = false;
    for (const auto& o : remus::ResolveLeftovers(opts_.state_dir + "/run", arbiter_->options(), etcd_.get(), &undecided)) {
      LOG_WARN("remusd") << "left by the previous remusd: domain " << o.domain << ": " << o.action << " (" << o.detail
                         << ")";
      if (o.action == "retired") resumed_leftovers_.push_back(o.pid);
    }
    if (!undecided) return true;
    if (std::chrono::steady_clock::now() >= until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  LOG_ERROR("remusd") << "etcd cannot say who owns a domain the previous remusd protected: its output-buffering "
                         "rules stay (the guest's output stays held) until a start that can; see "
                         "docs/operator-guide.md, \"Failure matrix\"";
  return false;
}

Status Daemon::StartFenceWatchdog() {
  const std::string pidfile = opts_.state_dir + "/run/remus-fence.pid";
  // The previous remusd's watchdog holds deadlines of a table no one renews
  // any more: it would stop guests that run on legitimately.
  if (auto old = ReadFileToString(pidfile); old.ok()) {
    int pid = std::atoi(old->c_str());
    auto cmd = pid > 0 ? ReadFileToString("/proc/" + std::to_string(pid) + "/cmdline") : StatusOr<std::string>(NotFound(""));
    if (cmd.ok() && cmd->find("remus-fence") != std::string::npos) {
      ::kill(pid, SIGKILL);
      LOG_INFO("remusd") << "stopped the fence watchdog of the previous remusd (pid " << pid << ")";
    }
  }
  for (int pid : resumed_leftovers_) ::kill(pid, SIGCONT);
  std::string helper = opts_.fence_helper;
  if (helper.empty()) {
    char self[4096];
    ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    std::string dir = n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string();
    helper = dir.substr(0, dir.rfind('/') + 1) + "remus-fence";
  }
  if (::access(helper.c_str(), X_OK) != 0)
    return FailedPrecondition("the fence watchdog " + helper + " is missing; install remus-fence next to remusd");
  ASSIGN_OR_RETURN(fence_table_, FenceTable::Create());
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fence_table_->fd(), 3);  // dup2 clears close-on-exec
  const std::string parent = std::to_string(::getpid());
  std::vector<std::string> args = {helper, "--table-fd", "3", "--parent", parent};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  int rc = ::posix_spawn(&pid, helper.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return ErrnoStatus("starting the fence watchdog " + helper, rc);
  fence_pid_ = pid;
  if (Status w = WriteFileAtomic(pidfile, std::to_string(pid) + "\n"); !w.ok())
    LOG_WARN("remusd") << "cannot record the fence watchdog's pid: " << w.message();
  arbiter_->set_fence_table(fence_table_.get());
  LOG_INFO("remusd") << "fence watchdog: " << helper << " (pid " << pid << ")";
  return OkStatus();
}

void Daemon::Wait() {
  MutexLock l(mu_);
  cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_.load(); });
}

void Daemon::Shutdown() {
  {
    MutexLock g(mu_);
    if (stopping_.exchange(true)) return;
    cv_.NotifyAll();
  }
  metrics_.reset();  // no scrape runs past here
  if (control_fd_.valid()) ::shutdown(control_fd_.get(), SHUT_RDWR);
  if (control_thread_.joinable()) control_thread_.join();
  ::unlink(opts_.control_socket.c_str());
  {
    // Control connections end now (a request being handled finishes first).
    MutexLock g(mu_);
    for (int fd : client_fds_) ::shutdown(fd, SHUT_RDWR);
    cv_.Wait(mu_, [&]() REQUIRES(mu_) { return client_fds_.empty(); });
  }
  std::map<std::string, std::shared_ptr<PrimaryReplicator>> ps;
  std::vector<std::thread> workers;
  {
    MutexLock g(mu_);
    ps.swap(primaries_);
    workers.swap(workers_);
  }
  for (auto& w : workers) w.join();
  if (reprotector_) reprotector_->Stop();  // before what its jobs call into
  ps.clear();  // each ends protection and leaves its guest running
  backup_.reset();
}

void Daemon::ControlLoop() {
  while (!stopping_) {
    auto fd = Accept(control_fd_.get());
    if (!fd.ok()) return;
    MutexLock g(mu_);
    if (stopping_) return;
    if (client_fds_.size() >= kMaxControlClients) {
      // The reply fits in the empty socket buffer: this write cannot block.
      std::string m = Error(ResourceExhausted("remusd serves at most " + std::to_string(kMaxControlClients) +
                                              " control connections at once; try again when one has ended"))
                          .dump() +
                      "\n";
      (void)WriteFull(fd->get(), m.data(), m.size());
      continue;
    }
    client_fds_.insert(fd->get());
    std::thread([this, f = std::move(fd).value()]() mutable {
      ServeClient(f.get());
      MutexLock l(mu_);
      // Closed under mu_, so Shutdown never shuts down a reused number.
      client_fds_.erase(f.get());
      f.Reset();
      cv_.NotifyAll();
    }).detach();
  }
}

// Ends a connection after a final error reply: closing with the client's
// request unread would reset the connection and could destroy the answer in
// flight, so end our side and drain what the client still sends, for a while.
static void HangUpAfter(int fd, const json& reply) {
  std::string m = reply.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  (void)WriteFull(fd, m.data(), m.size());
  ::shutdown(fd, SHUT_WR);
  char sink[65536];
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < until) {
    auto readable = WaitReadable(fd, 500);
    if (!readable.ok() || !*readable || ::read(fd, sink, sizeof sink) <= 0) break;
  }
}

void Daemon::ServeClient(int fd) {
  auto cred = GetPeerCred(fd);
  if (!cred.ok() || (cred->uid != 0 && !opts_.allow_any_uid)) {
    HangUpAfter(fd, Error(PermissionDenied("the remusd control socket is for root only")));
    return;
  }
  std::string buf;
  char tmp[65536];
  size_t scanned = 0;  // buf[0, scanned) holds no newline
  for (;;) {
    size_t nl;
    while ((nl = buf.find('\n', scanned)) == std::string::npos) {
      scanned = buf.size();
      if (buf.size() > kMaxRequestBytes) {
        HangUpAfter(fd, Error(ResourceExhausted("request line longer than " + std::to_string(kMaxRequestBytes) +
                                                      " bytes; remusd closed the connection")));
        return;
      }
      auto readable = WaitReadable(fd, opts_.control_idle_timeout_ms);
      if (!readable.ok()) return;
      if (!*readable) {
        HangUpAfter(fd, Error(DeadlineExceeded("no complete request within " +
                                               std::to_string(opts_.control_idle_timeout_ms) +
                                               " ms; remusd closed the idle connection")));
        return;
      }
      ssize_t r = ::read(fd, tmp, sizeof tmp);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return;
      buf.append(tmp, static_cast<size_t>(r));
    }
    std::string_view line(buf.data(), nl);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    auto req = ParseRequestLine(line);
    json reply = req.ok() ? Handle(*req) : Error(req.status());
    buf.erase(0, nl + 1);
    scanned = 0;
    // Replace, not throw, if a string somewhere is not UTF-8.
    std::string out = reply.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    if (!WriteFull(fd, out.data(), out.size()).ok()) return;
  }
}

json Daemon::Handle(const json& req) {
  // Every field is read through RequestReader, which does not throw; this is
  // the last line of defence for whatever a future change forgets.
  try {
    return Dispatch(req);
  } catch (const std::exception& e) {
    LOG_ERROR("remusd") << "control request failed: " << e.what();
    return Error(Internal(std::string("remusd could not handle the request: ") + e.what()));
  }
}

json Daemon::Dispatch(const json& j) {
  if (!j.is_object()) return Error(InvalidArgument("request is not a JSON object"));
  RequestReader req(j);
  if (!req.Has("command")) return Error(InvalidArgument("request has no 'command' (protect, unprotect, status, failover, switchover, tune, estimate or ping)"));
  auto c = req.String("command", "");
  if (!c.ok()) return Error(c.status());
  const std::string& cmd = *c;
  if (cmd == "protect") return Protect(req);
  if (cmd == "unprotect") return Unprotect(req);
  if (cmd == "status") return StatusOf(req);
  if (cmd == "failover") return Failover(req);
  if (cmd == "tune") return Tune(req);
  if (cmd == "switchover") return Switchover(req);
  if (cmd == "estimate") return Estimate(req);
  if (cmd == "ping") return Ok({{"version", "0.1.0"}, {"backup", backup_ != nullptr}});
  return Error(InvalidArgument("unknown command '" + cmd.substr(0, 64) + "'"));
}

// interval_mode "auto" (`--interval auto`) with its budget and bounds;
// nullopt for a fixed interval. The bounds without "auto" are an error (the
// operator meant something).
static StatusOr<std::optional<IntervalControllerOptions>> AutoIntervalOptions(const std::string& d,
                                                                       const RequestReader& req) {
  using O = IntervalControllerOptions;
  ASSIGN_OR_RETURN(std::string mode, req.String("interval_mode", "fixed"));
  if (mode != "auto" && mode != "fixed")
    return InvalidArgument("domain " + d + ": interval_mode '" + mode.substr(0, 64) + "' is not auto or fixed");
  if (mode != "auto") {
    for (const char* f : {"latency_budget_ms", "interval_min_ms", "interval_max_ms"})
      if (req.Has(f))
        return InvalidArgument("domain " + d + ": " + f + " needs --interval auto (a fixed interval has no bounds)");
    return std::optional<O>();
  }
  O o;
  // Types and int ranges here; ValidateIntervalOptions words the bounds as the options.
  ASSIGN_OR_RETURN(int64_t budget, req.Int("latency_budget_ms", O::kDefaultBudgetMs, 0, 600000));
  ASSIGN_OR_RETURN(int64_t lo, req.Int("interval_min_ms", O::kDefaultMinMs, 0, 600000));
  ASSIGN_OR_RETURN(int64_t hi, req.Int("interval_max_ms", O::kDefaultMaxMs, 0, 600000));
  o.latency_budget_ms = static_cast<int>(budget);
  o.min_ms = static_cast<int>(lo);
  o.max_ms = static_cast<int>(hi);
  RETURN_IF_ERROR(ValidateIntervalOptions(d, o));
  return std::optional<O>(o);
}

StatusOr<PrimaryOptions> Daemon::ProtectOptions(const std::string& d, const RequestReader& request) const {
  const RequestReader req = request.In("domain " + d);
  PrimaryOptions po;
  po.domain = d;
  ASSIGN_OR_RETURN(po.qmp_socket, req.String("qmp", ""));
  ASSIGN_OR_RETURN(std::string libvirt_uri, req.String("libvirt_uri", ""));
  // Re-protection: a guest this host's backup side promoted is reached the
  // way the promotion left it (remusd's own QMP socket, or this libvirt).
  if (po.qmp_socket.empty() && libvirt_uri.empty() && backup_) {
    if (auto g = backup_->RunningGuest(d)) {
      po.qmp_socket = g->qmp_socket;
      libvirt_uri = g->libvirt_uri;
      po.reprotect = true;
    }
  }
  if (po.qmp_socket.empty()) {
    // libvirt mode: the domain is libvirt's, by name.
    po.libvirt_uri = libvirt_uri.empty() ? opts_.libvirt_uri : libvirt_uri;
    po.libvirt_pid_dir = opts_.libvirt_pid_dir;
  } else if (!libvirt_uri.empty()) {
    return InvalidArgument("domain " + d + ": give either --qmp (a QEMU's QMP socket) or --connect (libvirt), not both");
  }
  ASSIGN_OR_RETURN(std::string backup, req.String("backup", ""));
  auto hp = ParseHostPort(backup, 7788);
  if (!hp.ok()) return hp.status().Annotate("domain " + d + ": --backup");
  po.backup = *hp;
  po.run_dir = opts_.state_dir + "/run";
  ASSIGN_OR_RETURN(int64_t interval, req.Int("interval_ms", 100, 1, 600000));
  po.interval_ms = static_cast<int>(interval);
  ASSIGN_OR_RETURN(std::optional<IntervalControllerOptions> automatic, AutoIntervalOptions(d, req));
  if (automatic) {
    po.interval_auto = true;
    po.interval_auto_opts = *automatic;
    // Starts within the bounds; the controller moves it from there.
    po.interval_ms = std::clamp(po.interval_ms, automatic->min_ms, automatic->max_ms);
  }
  po.tls = tls_primary_;
  po.heartbeat = opts_.heartbeat;
  po.arbiter = arbiter_.get();
  ASSIGN_OR_RETURN(po.netbuf.mode, req.String("netbuf", "plug"));
  ASSIGN_OR_RETURN(std::vector<std::string> ifs, req.StringList("netbuf_interfaces"));
  for (const std::string& i : ifs) {
    if (i.empty() || i.size() >= 16 || i.find('/') != std::string::npos)
      return InvalidArgument("domain " + d + ": --netbuf-if " + json(i).dump(-1, ' ', false, json::error_handler_t::replace) +
                             " is not a network device name");
    po.netbuf.interfaces.push_back(i);
  }
  ASSIGN_OR_RETURN(po.netbuf_fallback, req.Bool("netbuf_fallback", false));
  ASSIGN_OR_RETURN(int64_t maxlen, req.Int("netbuf_queue_maxlen", po.netbuf.queue_maxlen, 1, UINT32_MAX));
  po.netbuf.queue_maxlen = static_cast<uint32_t>(maxlen);
  ASSIGN_OR_RETURN(po.netbuf.fail_open, req.Bool("netbuf_fail_open", false));
  ASSIGN_OR_RETURN(std::string compress, req.String("compress", "xor-lz4"));
  if (compress != "none" && compress != "lz4" && compress != "xor-lz4")
    return InvalidArgument("domain " + d + ": unknown --compress '" + compress.substr(0, 64) +
                           "'; expected none, lz4 or xor-lz4");
  po.compress = compress != "none";
  ASSIGN_OR_RETURN(int64_t xor_cache_mib, req.Int("xor_cache_mib", kDefaultXorCacheMib, 1, 1 << 20));
  if (compress == "xor-lz4") po.xor_cache_bytes = static_cast<uint64_t>(xor_cache_mib) << 20;
  ASSIGN_OR_RETURN(po.residency, req.String("residency", "hot"));
  if (po.residency != "hot" && po.residency != "paged")
    return InvalidArgument("domain " + d + ": unknown --residency '" + po.residency.substr(0, 64) +
                           "'; expected hot or paged");
  ASSIGN_OR_RETURN(po.disks, req.String("disks", "all"));
  if (po.disks.empty() || po.disks.find_first_not_of(
                              "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,") != std::string::npos)
    return InvalidArgument("domain " + d + ": --disks '" + po.disks.substr(0, 256) +
                           "' is not all, none, or a comma-separated list of drive ids");
  po.fault = opts_.fault;
  ASSIGN_OR_RETURN(std::string reprotect, req.String("reprotect_to", ""));
  if (reprotect.empty()) {
    po.reprotect_to = reprotect_to_;  // remusd's --reprotect-to
  } else {
    ASSIGN_OR_RETURN(po.reprotect_to, ResolveReprotectTo(reprotect, opts_.listen, "domain " + d + ": "));
  }
  // A protection that never started (the backup unreachable, QEMU refused)
  // is the protect request's error, not history.
  auto started = std::make_shared<std::atomic<bool>>(false);
  po.on_state = [h = history_.get(), d, peer = po.backup.ToString(), re = po.reprotect, started](
                    const std::string& to, const std::string& why) {
    if (to == "syncing" || to == "protected") started->store(true);
    if ((to == "stopped" || to == "unprotected") && !started->load()) return;
    std::string text = DomainHistory::PrimaryText(to, peer, why);
    if (re && to == "protected") text += " (re-protection of the guest promoted here)";
    h->Record(d, {{"role", "primary"}, {"state", to}, {"text", text}});
  };
  return po;
}

json Daemon::Protect(const RequestReader& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  auto automatic = req.In("domain " + *d).Bool("automatic", false);
  if (!automatic.ok()) return Error(automatic.status());
  // An operator's protect replaces an automatic re-protection still trying.
  if (!*automatic && reprotector_) reprotector_->Cancel(*d);
  auto async_or = req.In("domain " + *d).Bool("async", false);
  if (!async_or.ok()) return Error(async_or.status());
  const bool async = *async_or;
  auto po = ProtectOptions(*d, req);
  if (!po.ok()) return Error(po.status());
  auto active = [](const PrimaryReplicator& p) { return ProtectionActive(p.state()); };
  auto already = [&](const PrimaryReplicator& p) {
    return AlreadyExists("domain " + *d + " is already protected (" + std::string(PrimaryStateName(p.state())) +
                         "); run `remusctl unprotect " + *d + "` first");
  };
  std::shared_ptr<PrimaryReplicator> ended;
  {
    MutexLock g(mu_);
    auto it = primaries_.find(*d);
    if (it != primaries_.end()) {
      if (active(*it->second)) return Error(already(*it->second));
      // Protection of this domain ended earlier (backup lost, say). Its
      // replicator still holds QEMU's monitor connection, and QEMU's -qmp
      // socket serves one client: release it before connecting again.
      ended = std::move(it->second);
      primaries_.erase(it);
    }
  }
  ended.reset();
  if (async) {
    // libvirt's hook: answer now, connect in the background (retrying while
    // libvirt still holds the domain's job); the outcome shows in `status`.
    auto retry = req.In("domain " + *d).Int("retry_ms", 30000, 0, 24 * 3600 * 1000);
    if (!retry.ok()) return Error(retry.status());
    po->connect_retry_ms = static_cast<int>(*retry);
    std::shared_ptr<PrimaryReplicator> p = PrimaryReplicator::StartAsync(std::move(po).value(), clock_);
    MutexLock g(mu_);
    auto& slot = primaries_[*d];
    if (slot && active(*slot)) return Error(already(*slot));
    slot = p;
    LOG_INFO("remusd") << "domain " << *d << ": protection starting in the background";
    return Ok(p->StatusJson());
  }
  auto p = PrimaryReplicator::Start(std::move(po).value(), clock_);
  if (!p.ok()) return Error(p.status());
  MutexLock g(mu_);
  primaries_[*d] = std::move(p).value();
  return Ok(primaries_[*d]->StatusJson());
}

json Daemon::Unprotect(const RequestReader& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  if (reprotector_) reprotector_->Cancel(*d);
  auto async = req.In("domain " + *d).Bool("async", false);
  if (!async.ok()) return Error(async.status());
  // libvirt's hook after the domain stopped: QEMU is gone, so protection
  // ends by itself, as a failover (unless the guest shut itself down). Only
  // a protection still starting is cancelled; nothing is ended early, which
  // would tell the backup not to take over.
  auto stopped = req.In("domain " + *d).Bool("domain_stopped", false);
  if (!stopped.ok()) return Error(stopped.status());
  const bool domain_stopped = *stopped;
  std::shared_ptr<PrimaryReplicator> p;
  {
    MutexLock g(mu_);
    auto it = primaries_.find(*d);
    if (it == primaries_.end())
      return Error(NotFound("unknown domain " + *d + ": it is not protected from this host (see `remusctl status`)"));
    p = it->second;
    if (domain_stopped) {
      PrimaryState s = p->state();
      if (s != PrimaryState::kStarting) {
        LOG_INFO("remusd") << "domain " << *d << " stopped (libvirt); its protection (" << PrimaryStateName(s)
                           << ") ends by itself";
        return Ok(p->StatusJson());
      }
    } else {
      primaries_.erase(it);
    }
    if (*async) {
      json now = p->StatusJson();
      workers_.emplace_back([p, dom = *d] {
        Status s = p->Unprotect();
        if (!s.ok()) LOG_ERROR("remusd") << "domain " << dom << ": unprotect: " << s.message();
        else LOG_INFO("remusd") << "domain " << dom << ": protection ended (" << PrimaryStateName(p->state()) << ")";
      });
      return Ok(now);
    }
  }
  Status s = p->Unprotect();
  json last = p->StatusJson();
  p.reset();
  if (!s.ok()) return Error(s);
  return Ok(last);
}

json Daemon::StatusOf(const RequestReader& req) {
  std::string d;
  if (req.Has("domain")) {
    auto dom = DomainArg(req);
    if (!dom.ok()) return Error(dom.status());
    d = *dom;
  }
  // role: one side's records only ("primary": what this host protects;
  // "backup": what it backs up or promoted), unmerged: what remusctl's
  // protect and failover follow.
  auto role = req.String("role", "");
  if (!role.ok()) return Error(role.status());
  if (!role->empty() && *role != "primary" && *role != "backup")
    return Error(InvalidArgument("status: role must be primary or backup"));
  json arr = json::array();
  if (*role != "backup") {
    MutexLock g(mu_);
    for (const auto& [name, p] : primaries_)
      if (d.empty() || name == d) arr.push_back(p->StatusJson());
  }
  if (backup_ && *role != "primary")
    for (auto& j : backup_->StatusJson(d)) arr.push_back(j);
  if (!d.empty() && arr.empty())
    return Error(NotFound("unknown domain " + d + ": not protected from or replicated to this host"));
  // Metrics want every record; people want one row per guest (status_rows.h).
  const bool all_rows = req.Has("all_roles") || !role->empty();
  if (all_rows) return Ok({{"domains", arr}});
  json rows = OneRowPerDomain(arr);
  for (json& r : rows) {
    const std::string dom = r.value("domain", "");
    r["history"] = history_->Recent(dom, kStatusHistory);
    if (json rp = reprotector_ ? reprotector_->StatusJson(dom) : json(); !rp.is_null()) r["reprotect"] = rp;
  }
  return Ok({{"domains", rows}});
}

// ---- automatic re-protection ----

void Daemon::MaybeReprotect(const std::string& d, const json& detail) {
  const std::string to = detail.value("reprotect_to", std::string());
  if (to.empty() || !reprotector_) return;
  if (!opts_.auto_reprotect) {
    LOG_INFO("remusd") << "domain " << d << ": its primary asked for re-protection to " << to
                       << "; not done (--no-auto-reprotect)";
    return;
  }
  json req = {{"command", "protect"}, {"domain", d}, {"backup", to}, {"automatic", true},
              {"interval_ms", std::max<int64_t>(1, detail.value("interval_ms", int64_t{100}))},
              {"compress", ReprotectCompression(detail)}};
  if (detail.value("interval_mode", std::string()) == "auto") {
    // The automatic interval with the old primary's budget and bounds.
    req["interval_mode"] = "auto";
    for (const char* f : {"latency_budget_ms", "interval_min_ms", "interval_max_ms"})
      if (int64_t v = detail.value(f, int64_t{0}); v > 0) req[f] = v;
  }
  if (std::string nb = detail.value("netbuf", std::string()); !nb.empty()) req["netbuf"] = nb;
  if (std::string dk = detail.value("disks", std::string()); !dk.empty()) req["disks"] = dk;
  if (std::string rs = detail.value("residency", std::string()); !rs.empty()) req["residency"] = rs;
  reprotector_->Request({d, to, std::move(req)});
}

Status Daemon::ProtectForReprotector(const json& request) {
  json r = Protect(RequestReader(request));
  if (r.value("ok", false)) return OkStatus();
  return Unavailable(r.value("error", std::string("protect failed")));
}

bool Daemon::ReprotectWanted(const std::string& d) {
  if (stopping_ || !backup_ || !backup_->RunningGuest(d)) return false;
  MutexLock g(mu_);
  auto it = primaries_.find(d);
  if (it == primaries_.end()) return true;
  return !ProtectionActive(it->second->state());
}

json Daemon::Failover(const RequestReader& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  if (!backup_) return Error(FailedPrecondition("this remusd is not a backup (start it with --listen)"));
  Status s = backup_->Failover(*d);
  if (!s.ok()) return Error(s);
  return Ok(backup_->StatusJson(*d));
}

json Daemon::Tune(const RequestReader& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  MutexLock g(mu_);
  auto it = primaries_.find(*d);
  if (it == primaries_.end())
    return Error(NotFound("unknown domain " + *d + ": it is not protected from this host (see `remusctl status`)"));
  auto automatic = AutoIntervalOptions(*d, req.In("domain " + *d));
  if (!automatic.ok()) return Error(automatic.status());
  if (*automatic) {
    Status s = it->second->SetAutoInterval(**automatic);
    if (!s.ok()) return Error(s);
    return Ok(it->second->StatusJson());
  }
  if (!req.Has("interval_ms")) return Error(InvalidArgument("tune needs --interval MS or --interval auto"));
  auto ms = req.In("domain " + *d).Int("interval_ms", 0, 1, 600000);
  if (!ms.ok()) return Error(ms.status());
  Status s = it->second->SetInterval(static_cast<int>(*ms));
  if (!s.ok()) return Error(s);
  return Ok(it->second->StatusJson());
}

json Daemon::Switchover(const RequestReader& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  std::shared_ptr<PrimaryReplicator> p;
  {
    MutexLock g(mu_);
    auto it = primaries_.find(*d);
    if (it == primaries_.end()) {
      if (backup_ && !backup_->StatusJson(*d).empty())
        return Error(FailedPrecondition("domain " + *d + " is replicated to this host, not protected from it: run "
                                        "`remusctl switchover " + *d + "` on its primary"));
      return Error(NotFound("unknown domain " + *d + ": it is not protected from this host (see `remusctl status`)"));
    }
    p = it->second;
  }
  // Reverse protection: where this host listens as the guest's new backup.
  // Default: our --listen address, unless it is a wildcard; "none": no.
  wire::SwitchoverMsg msg;
  auto to = req.In("domain " + *d).String("reprotect_to", "");
  if (!to.ok()) return Error(to.status());
  if (to->empty()) {
    if (ReachableListen(opts_.listen)) msg.reprotect_to = opts_.listen->ToString();
  } else if (*to != "none" && !opts_.listen) {
    return Error(FailedPrecondition("domain " + *d + ": --reprotect-to needs this remusd to run with --listen "
                                    "(it becomes the guest's backup)"));
  } else {
    auto rp = ResolveReprotectTo(*to, opts_.listen, "domain " + *d + ": ");
    if (!rp.ok()) return Error(rp.status());
    msg.reprotect_to = *rp;
  }
  // Returns when the switchover ended (seconds: a checkpoint, its ACK, the
  // backup's answer); `status` shows its progress meanwhile.
  Status s = p->Switchover(msg);
  if (!s.ok()) return Error(s);
  return Ok(p->StatusJson());
}

json Daemon::Estimate(const RequestReader& request) {
  auto d = DomainArg(request);
  if (!d.ok()) return Error(d.status());
  const RequestReader req = request.In("domain " + *d);
  std::vector<int64_t> intervals = estimate::DefaultIntervals();
  // Each value is checked by CheckIntervals, with the interval's own words.
  auto list = req.IntList("intervals_ms");
  if (!list.ok()) return Error(list.status());
  if (req.Has("intervals_ms")) intervals = std::move(list).value();
  auto checked = estimate::CheckIntervals(std::move(intervals));
  if (!checked.ok()) return Error(checked.status().Annotate("domain " + *d + ": --intervals"));
  auto qmp = req.String("qmp", "");
  if (!qmp.ok()) return Error(qmp.status());
  auto uri = req.String("libvirt_uri", "");
  if (!uri.ok()) return Error(uri.status());
  if (!qmp->empty() && !uri->empty())
    return Error(InvalidArgument("domain " + *d + ": give either --qmp (a QEMU's QMP socket) or --connect (libvirt), not both"));
  {
    MutexLock g(estimate_mu_);
    if (!estimating_.insert(*d).second)
      return Error(AlreadyExists("domain " + *d + ": an estimate of it is already running; wait a few seconds"));
  }
  struct Done {
    Daemon* self;
    std::string d;
    ~Done() {
      MutexLock g(self->estimate_mu_);
      self->estimating_.erase(d);
    }
  } done{this, *d};
  // Protected from here: the protection's monitor (QEMU serves one QMP
  // client) and its own figures. Held by the shared_ptr, not under mu_.
  std::shared_ptr<PrimaryReplicator> p;
  {
    MutexLock g(mu_);
    if (auto it = primaries_.find(*d); it != primaries_.end() && it->second->monitor()) p = it->second;
  }
  std::unique_ptr<QemuMonitor> own;
  QemuMonitor* monitor = nullptr;
  std::optional<estimate::ProtectionFigures> figures;
  if (p) {
    monitor = p->monitor();
    figures = estimate::FiguresFromStatus(p->StatusJson());
  } else {
    // Not protected from here: find QEMU's monitor as `protect` would.
    std::string sock = *qmp, lv = *uri;
    if (sock.empty() && lv.empty() && backup_) {
      if (auto g = backup_->RunningGuest(*d)) sock = g->qmp_socket, lv = g->libvirt_uri;
    }
    if (!sock.empty()) {
      auto c = QmpClient::Connect(sock);
      if (!c.ok())
        return Error(Status(c.status().code(), "domain " + *d + ": cannot reach QEMU's monitor at " + sock + ": " +
                                                   c.status().message() +
                                                   " (is QEMU running with -qmp, and no other client on that socket?)"));
      own = std::move(c).value();
    } else {
      LibvirtMonitorOptions lo;
      lo.uri = lv.empty() ? opts_.libvirt_uri : lv;
      lo.domain = *d;
      lo.pid_dir = opts_.libvirt_pid_dir;
      auto c = LibvirtMonitor::Connect(lo);
      if (!c.ok()) {
        Status s = c.status();
        if (s.code() == Code::kNotFound || s.code() == Code::kUnavailable)
          s = Status(s.code(), "unknown domain " + *d + ": it is not protected from this host and libvirt (" + lo.uri +
                                   ") could not provide it (" + s.message() +
                                   "); for a QEMU libvirt does not run, give --qmp PATH");
        return Error(s);
      }
      own = std::move(c).value();
    }
    monitor = own.get();
  }
  estimate::Estimator e(monitor, clock_, [](std::chrono::milliseconds ms) { std::this_thread::sleep_for(ms); });
  auto r = e.Run(*d, *checked, figures);
  if (!r.ok()) return Error(r.status());
  (*r)["protected"] = p != nullptr && figures.has_value();
  LOG_INFO("remusd") << "domain " << *d << ": estimate took " << (*r)["took_ms"].get<int64_t>() << " ms";
  return Ok(std::move(r).value());
}

}  // namespace remus
