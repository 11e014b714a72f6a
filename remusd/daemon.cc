#include "remusd/daemon.h"

#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {

using nlohmann::json;

namespace {

json Error(const Status& s) { return {{"ok", false}, {"code", std::string(CodeName(s.code()))}, {"error", s.message()}}; }
json Ok(json result = json::object()) { return {{"ok", true}, {"result", std::move(result)}}; }

StatusOr<std::string> DomainArg(const json& req) {
  if (!req.contains("domain") || !req["domain"].is_string()) return InvalidArgument("missing domain name");
  std::string d = req["domain"].get<std::string>();
  if (!ValidDomainName(d))
    return InvalidArgument("invalid domain name '" + d + "': use 1-64 letters, digits, '.', '-' or '_'");
  return d;
}

}  // namespace

Daemon::Daemon(DaemonOptions opts, const Clock& clock) : opts_(std::move(opts)), clock_(clock) {}

Daemon::~Daemon() { Shutdown(); }

Status Daemon::Start() {
  ASSIGN_OR_RETURN(key_, wire::LoadKey(opts_.key_file));
  RETURN_IF_ERROR(MakeDirs(opts_.state_dir, 0700));
  RETURN_IF_ERROR(MakeDirs(opts_.state_dir + "/run", 0700));
  size_t slash = opts_.control_socket.rfind('/');
  if (slash != std::string::npos && slash > 0) RETURN_IF_ERROR(MakeDirs(opts_.control_socket.substr(0, slash), 0755));
  if (opts_.listen) {
    BackupOptions bo;
    bo.state_dir = opts_.state_dir;
    bo.key = key_;
    bo.heartbeat = opts_.heartbeat;
    bo.ack_delay_ms = opts_.ack_delay_ms;
    bo.qemu_binary = opts_.qemu_binary;
    bo.auto_promote = opts_.auto_promote;
    bo.libvirt_uri = opts_.libvirt_uri;
    bo.libvirt_pid_dir = opts_.libvirt_pid_dir;
    backup_ = std::make_unique<BackupServer>(bo, clock_, std::make_unique<FailStopArbiter>());
    RETURN_IF_ERROR(backup_->Listen(*opts_.listen).Annotate("listening for primaries"));
  }
  // Output-buffering rules left by a remusd that died must not keep holding
  // (or dropping) a guest's packets.
  if (Status c = CleanupStaleNetbuf(); !c.ok()) LOG_WARN("remusd") << "netbuf cleanup: " << c.message();
  ASSIGN_OR_RETURN(control_fd_, ListenUnix(opts_.control_socket, 0600));
  control_thread_ = std::thread([this] { ControlLoop(); });
  // Last: a scrape reads backup_, which must be set by then.
  if (!opts_.metrics_listen.empty()) {
    ASSIGN_OR_RETURN(metrics_, MetricsServer::Start(opts_.metrics_listen, [this] {
                       json r = StatusOf(json::object());
                       return r.value("ok", false) ? r["result"]["domains"] : json::array();
                     }));
    LOG_INFO("remusd") << "metrics: http://" << opts_.metrics_listen.substr(0, opts_.metrics_listen.rfind(':')) << ":"
                       << metrics_->port() << "/metrics";
  }
  LOG_INFO("remusd") << "ready: control socket " << opts_.control_socket << ", state " << opts_.state_dir
                     << ", key fingerprint " << wire::KeyFingerprint(key_);
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
  std::map<std::string, std::shared_ptr<PrimaryReplicator>> ps;
  std::vector<std::thread> workers;
  {
    MutexLock g(mu_);
    ps.swap(primaries_);
    workers.swap(workers_);
  }
  for (auto& w : workers) w.join();
  ps.clear();  // each ends protection and leaves its guest running
  backup_.reset();
}

void Daemon::ControlLoop() {
  while (!stopping_) {
    auto fd = Accept(control_fd_.get());
    if (!fd.ok()) return;
    std::thread([this, f = std::move(fd).value()]() mutable { ServeClient(std::move(f)); }).detach();
  }
}

void Daemon::ServeClient(Fd fd) {
  auto cred = GetPeerCred(fd.get());
  if (!cred.ok() || (cred->uid != 0 && !opts_.allow_any_uid)) {
    std::string m = Error(PermissionDenied("the remusd control socket is for root only")).dump() + "\n";
    (void)WriteFull(fd.get(), m.data(), m.size());
    // Closing with the client's request unread would reset the connection
    // and could destroy the answer in flight: end our side, then drain.
    ::shutdown(fd.get(), SHUT_WR);
    char sink[4096];
    for (int i = 0; i < 16; i++) {
      auto readable = WaitReadable(fd.get(), 1000);
      if (!readable.ok() || !*readable || ::read(fd.get(), sink, sizeof sink) <= 0) break;
    }
    return;
  }
  std::string buf;
  char tmp[4096];
  for (;;) {
    size_t nl;
    while ((nl = buf.find('\n')) == std::string::npos) {
      ssize_t r = ::read(fd.get(), tmp, sizeof tmp);
      if (r <= 0) return;
      buf.append(tmp, static_cast<size_t>(r));
      if (buf.size() > (1 << 20)) return;
    }
    std::string line = buf.substr(0, nl);
    buf.erase(0, nl + 1);
    json reply;
    if (!json::accept(line)) reply = Error(InvalidArgument("request is not JSON"));
    else reply = Handle(json::parse(line));
    std::string out = reply.dump() + "\n";
    if (!WriteFull(fd.get(), out.data(), out.size()).ok()) return;
  }
}

json Daemon::Handle(const json& req) {
  std::string cmd = req.is_object() ? req.value("command", "") : "";
  if (cmd == "protect") return Protect(req);
  if (cmd == "unprotect") return Unprotect(req);
  if (cmd == "status") return StatusOf(req);
  if (cmd == "failover") return Failover(req);
  if (cmd == "tune") return Tune(req);
  if (cmd == "ping") return Ok({{"version", "0.1.0"}, {"backup", backup_ != nullptr}});
  return Error(InvalidArgument("unknown command '" + cmd + "'"));
}

StatusOr<PrimaryOptions> Daemon::ProtectOptions(const std::string& d, const json& req) const {
  PrimaryOptions po;
  po.domain = d;
  po.qmp_socket = req.value("qmp", "");
  if (po.qmp_socket.empty()) {
    // libvirt mode: the domain is libvirt's, by name.
    po.libvirt_uri = req.value("libvirt_uri", "");
    if (po.libvirt_uri.empty()) po.libvirt_uri = opts_.libvirt_uri;
    po.libvirt_pid_dir = opts_.libvirt_pid_dir;
  } else if (!req.value("libvirt_uri", "").empty()) {
    return InvalidArgument("domain " + d + ": give either --qmp (a QEMU's QMP socket) or --connect (libvirt), not both");
  }
  auto hp = ParseHostPort(req.value("backup", ""), 7788);
  if (!hp.ok()) return hp.status().Annotate("domain " + d + ": --backup");
  po.backup = *hp;
  po.run_dir = opts_.state_dir + "/run";
  po.interval_ms = req.value("interval_ms", 100);
  po.key = key_;
  po.heartbeat = opts_.heartbeat;
  po.netbuf.mode = req.value("netbuf", "plug");
  if (req.contains("netbuf_interfaces")) {
    if (!req["netbuf_interfaces"].is_array())
      return InvalidArgument("domain " + d + ": netbuf_interfaces must be a list of device names");
    for (const auto& i : req["netbuf_interfaces"]) {
      if (!i.is_string() || i.get<std::string>().empty() || i.get<std::string>().size() >= 16 ||
          i.get<std::string>().find('/') != std::string::npos)
        return InvalidArgument("domain " + d + ": --netbuf-if " + i.dump() + " is not a network device name");
      po.netbuf.interfaces.push_back(i.get<std::string>());
    }
  }
  po.netbuf_fallback = req.value("netbuf_fallback", false);
  po.netbuf.queue_maxlen = req.value("netbuf_queue_maxlen", po.netbuf.queue_maxlen);
  if (po.netbuf.queue_maxlen < 1) return InvalidArgument("domain " + d + ": --netbuf-queue-len must be at least 1");
  po.netbuf.fail_open = req.value("netbuf_fail_open", false);
  std::string compress = req.value("compress", "none");
  if (compress != "none" && compress != "lz4")
    return InvalidArgument("domain " + d + ": unknown --compress '" + compress + "'; expected lz4 or none");
  po.compress = compress == "lz4";
  po.disks = req.value("disks", "all");
  if (po.disks.empty() || po.disks.find_first_not_of(
                              "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,") != std::string::npos)
    return InvalidArgument("domain " + d + ": --disks '" + po.disks +
                           "' is not all, none, or a comma-separated list of drive ids");
  po.fault = opts_.fault;
  return po;
}

json Daemon::Protect(const json& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  const bool async = req.value("async", false);
  auto po = ProtectOptions(*d, req);
  if (!po.ok()) return Error(po.status());
  auto active = [](const PrimaryReplicator& p) {
    PrimaryState s = p.state();
    return s == PrimaryState::kSyncing || s == PrimaryState::kProtected || s == PrimaryState::kStarting;
  };
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
    po->connect_retry_ms = req.value("retry_ms", 30000);
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

json Daemon::Unprotect(const json& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  const bool async = req.value("async", false);
  // libvirt's hook after the domain stopped: QEMU is gone, so protection
  // ends by itself, as a failover (unless the guest shut itself down). Only
  // a protection still starting is cancelled; nothing is ended early, which
  // would tell the backup not to take over.
  const bool domain_stopped = req.value("domain_stopped", false);
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
    if (async) {
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

json Daemon::StatusOf(const json& req) {
  std::string d = req.value("domain", "");
  json arr = json::array();
  {
    MutexLock g(mu_);
    for (const auto& [name, p] : primaries_)
      if (d.empty() || name == d) arr.push_back(p->StatusJson());
  }
  if (backup_)
    for (auto& j : backup_->StatusJson(d)) arr.push_back(j);
  if (!d.empty() && arr.empty())
    return Error(NotFound("unknown domain " + d + ": not protected from or replicated to this host"));
  return Ok({{"domains", arr}});
}

json Daemon::Failover(const json& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  if (!backup_) return Error(FailedPrecondition("this remusd is not a backup (start it with --listen)"));
  Status s = backup_->Failover(*d);
  if (!s.ok()) return Error(s);
  return Ok(backup_->StatusJson(*d));
}

json Daemon::Tune(const json& req) {
  auto d = DomainArg(req);
  if (!d.ok()) return Error(d.status());
  MutexLock g(mu_);
  auto it = primaries_.find(*d);
  if (it == primaries_.end())
    return Error(NotFound("unknown domain " + *d + ": it is not protected from this host (see `remusctl status`)"));
  if (!req.contains("interval_ms")) return Error(InvalidArgument("tune needs --interval MS"));
  Status s = it->second->SetInterval(req["interval_ms"].get<int>());
  if (!s.ok()) return Error(s);
  return Ok(it->second->StatusJson());
}

}  // namespace remus
