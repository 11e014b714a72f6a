#include "replicator/primary/primary.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>

#include "arbiter/leftovers.h"
#include "common/log.h"
#include "replicator/libvirt/interfaces.h"
#include "replicator/libvirt/restore.h"
#include "replicator/qemu/argv_rewrite.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

class PrimaryReplicator::Forwarder {
 public:
  explicit Forwarder(PrimaryLifecycle* lc) : lc_(lc) {}
  void Event(const json& ev) EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (lc_) lc_->OnQemuEvent(ev);
  }
  void QemuLost(const std::string& why) EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (lc_) lc_->OnQemuLost(why);
  }
  // Waits for a callback in progress; none reaches the lifecycle afterwards.
  void Detach() EXCLUDES(mu_) {
    MutexLock l(mu_);
    lc_ = nullptr;
  }

 private:
  Mutex mu_;
  PrimaryLifecycle* lc_ GUARDED_BY(mu_);
};

namespace {
Status CheckInterval(const std::string& domain, int ms) {
  if (ms >= 1 && ms <= 600000) return OkStatus();
  return InvalidArgument("domain " + domain + ": interval " + std::to_string(ms) + " ms is out of range (1..600000)");
}

Status CheckIntervals(const PrimaryOptions& o) {
  RETURN_IF_ERROR(CheckInterval(o.domain, o.interval_ms));
  return o.interval_auto ? ValidateIntervalOptions(o.domain, o.interval_auto_opts) : OkStatus();
}

// Delta resync: the backup's answer to CONFIG (RESYNC_OFFER, then the
// hashes of every offered page). Null with *note saying why the copy is full;
// an ERROR from the backup (it refused CONFIG) is returned as the error.
StatusOr<std::unique_ptr<wire::DeltaFilter>> ReceiveResyncOffer(wire::Link& link, const std::string& domain,
                                                                Nanos first_wait, Nanos silence, std::string* note) {
  wire::ResyncOfferAssembler offer;
  auto deadline = std::chrono::steady_clock::now() + first_wait;
  while (!offer.complete()) {
    auto f = link.RecvUntil(deadline);
    if (!f.ok()) {
      if (f.status().code() == Code::kDeadlineExceeded && !offer.begun()) {
        *note = "full copy: the backup sent no resync offer (a release without delta resync?)";
        return std::unique_ptr<wire::DeltaFilter>();
      }
      return Status(f.status().code(), "domain " + domain + ": receiving the backup's resync offer: " + f.status().message());
    }
    if (offer.begun()) deadline = std::chrono::steady_clock::now() + silence;  // the backup is hashing: keep waiting while it talks
    switch (f->type) {
      case MsgType::kHeartbeat:
        break;
      case MsgType::kError:
        return wire::DecodeError(f->payload).Annotate("domain " + domain + ": the backup refused the stream");
      case MsgType::kResyncOffer: {
        ASSIGN_OR_RETURN(wire::ResyncOfferMsg m, wire::DecodeResyncOffer(f->payload));
        RETURN_IF_ERROR(offer.Begin(std::move(m)));
        deadline = std::chrono::steady_clock::now() + silence;
        break;
      }
      case MsgType::kResyncHashes: {
        ASSIGN_OR_RETURN(wire::ResyncHashesMsg m, wire::DecodeResyncHashes(f->payload));
        RETURN_IF_ERROR(offer.Add(m));
        break;
      }
      default:
        return InvalidArgument("domain " + domain + ": unexpected " + wire::MsgTypeName(f->type) +
                               " from the backup before the initial copy");
    }
  }
  if (offer.offer().blocks.empty()) {
    *note = "full copy: " + (offer.offer().reason.empty() ? std::string("the backup offered no image") : offer.offer().reason);
    return std::unique_ptr<wire::DeltaFilter>();
  }
  *note = "delta resync: the backup offered its image of checkpoint " + std::to_string(offer.offer().epoch);
  std::vector<qemu::RamBlock> blocks = offer.offer().blocks;
  return std::make_unique<wire::DeltaFilter>(std::move(blocks), offer.TakeHashes());
}

LifecycleOptions ToLifecycleOptions(const PrimaryOptions& o) {
  LifecycleOptions lo;
  lo.domain = o.domain;
  lo.backup = o.backup.ToString();
  lo.heartbeat = o.heartbeat;
  lo.max_unacked_epochs = o.max_unacked_epochs;
  lo.max_unacked_bytes = o.max_unacked_bytes;
  lo.compress = o.compress;
  lo.xor_cache_bytes = o.compress ? o.xor_cache_bytes : 0;
  lo.interval_ms = o.interval_ms;
  lo.interval_auto = o.interval_auto;
  lo.interval_auto_opts = o.interval_auto_opts;
  lo.fault = o.fault;
  if (o.on_state)
    lo.on_state = [f = o.on_state](PrimaryState to, const std::string& why) { f(std::string(PrimaryStateName(to)), why); };
  return lo;
}
}  // namespace

PrimaryReplicator::PrimaryReplicator(PrimaryOptions opts, const Clock& clock)
    : opts_(std::move(opts)),
      clock_(clock),
      lifecycle_(std::make_unique<PrimaryLifecycle>(ToLifecycleOptions(opts_), clock)) {
  forward_ = std::make_shared<Forwarder>(lifecycle_.get());
}

StatusOr<std::unique_ptr<PrimaryReplicator>> PrimaryReplicator::Start(PrimaryOptions opts, const Clock& clock) {
  RETURN_IF_ERROR(CheckIntervals(opts));
  std::unique_ptr<PrimaryReplicator> p(new PrimaryReplicator(std::move(opts), clock));
  Status s = p->Connect();
  p->ready_ = true;
  RETURN_IF_ERROR(s);
  return p;
}

std::unique_ptr<PrimaryReplicator> PrimaryReplicator::StartAsync(PrimaryOptions opts, const Clock& clock) {
  std::unique_ptr<PrimaryReplicator> p(new PrimaryReplicator(std::move(opts), clock));
  PrimaryReplicator* r = p.get();
  r->start_thread_ = std::thread([r] {
    Status s = CheckIntervals(r->opts_);
    if (s.ok()) s = r->Connect();
    r->ready_ = true;
    if (!s.ok()) {
      // As a failed Start: the guest runs on unprotected. (A failed Attach
      // has ended protection already; this is then a no-op.)
      LOG_ERROR("primary[" + r->opts_.domain + "]") << "protection did not start: " << s.message();
      r->lifecycle_->FailStart(r->cancel_start_ ? Cancelled(s.message()) : s);
    }
  });
  return p;
}

void PrimaryReplicator::CancelStart() {
  cancel_start_ = true;
  if (start_thread_.joinable() && start_thread_.get_id() != std::this_thread::get_id()) start_thread_.join();
}

PrimaryReplicator::~PrimaryReplicator() {
  CancelStart();
  forward_->Detach();
  // Tears down (stopped: "daemon shutting down") and joins its threads while
  // the monitor it needs for that still exists.
  lifecycle_.reset();
  if (owned_) {
    LeaseState s = owned_->lease().state();
    if (s == LeaseState::kReleased || s == LeaseState::kLost) RemoveOwnershipRecord(opts_.run_dir, opts_.domain);
    else LOG_ERROR("primary[" + opts_.domain + "]")
        << "remusd stops while it still owns the domain (session not retired in etcd): the next start resolves it";
  }
}

Status PrimaryReplicator::ConnectQmp() {
  const std::string& d = opts_.domain;
  auto qmp = QmpClient::Connect(opts_.qmp_socket);
  if (!qmp.ok())
    return Status(qmp.status().code(), "domain " + d + ": cannot reach QEMU's monitor at " + opts_.qmp_socket +
                                           ": " + qmp.status().message() + " (is QEMU running with -qmp?)");
  qmp_ = qmp->get();
  qemu_pid_ = qmp_->pid();
  // QEMU's death must wake every wait in the epoch loop (the stall fault,
  // backpressure), or the backup would never be told to take over.
  qmp_->SetDisconnectHandler([f = forward_] { f->QemuLost("its QMP monitor closed"); });
  monitor_ = std::move(qmp).value();
  return OkStatus();
}

Status PrimaryReplicator::ConnectLibvirt() {
  LibvirtMonitorOptions lo;
  lo.uri = opts_.libvirt_uri;
  lo.domain = opts_.domain;
  lo.pid_dir = opts_.libvirt_pid_dir;
  // Messages name the domain, the URI and the fix already.
  ASSIGN_OR_RETURN(std::unique_ptr<LibvirtSession> lv, LibvirtSession::Connect(lo));
  libvirt_ = lv.get();
  qemu_pid_ = libvirt_->pid();
  libvirt_->SetLossHandler([f = forward_](const MonitorLoss& l) {
    f->QemuLost(l.kind == MonitorLoss::Kind::kDomainStopped ? "libvirt reports the domain stopped (" + l.reason + ")"
                                                           : "libvirt connection lost (" + l.reason + ") and QEMU pid " +
                                                                 std::to_string(l.qemu_pid) + " is gone");
  });
  monitor_ = std::move(lv);
  return OkStatus();
}

Status PrimaryReplicator::ConnectMonitor() {
  const std::string tag = "primary[" + opts_.domain + "]";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(opts_.connect_retry_ms);
  for (int attempt = 1;; attempt++) {
    Status s = opts_.libvirt_uri.empty() ? ConnectQmp() : ConnectLibvirt();
    if (s.ok()) {
      auto probe = ProbeColo(*monitor_);
      if (probe.ok()) {
        probe_ = std::move(probe).value();
        return OkStatus();
      }
      s = probe.status().Annotate("domain " + opts_.domain + ": asking QEMU about COLO");
    }
    monitor_.reset();
    qmp_ = nullptr;
    libvirt_ = nullptr;
    qemu_pid_ = -1;
    // Not ready yet (libvirt still starting it, its job held by the hook): try again.
    bool transient = s.code() == Code::kDeadlineExceeded || s.code() == Code::kFailedPrecondition ||
                     s.code() == Code::kNotFound || s.code() == Code::kUnavailable;
    if (!transient || std::chrono::steady_clock::now() >= deadline || cancel_start_) return s;
    if (attempt == 1) LOG_INFO(tag) << "the domain is not ready (" << s.message() << "); retrying";
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    if (cancel_start_) return Cancelled("domain " + opts_.domain + ": protection cancelled while starting");
  }
}

Status PrimaryReplicator::Connect() {
  const std::string& d = opts_.domain;
  std::string tag = "primary[" + d + "]";
  RETURN_IF_ERROR(ConnectMonitor());
  RETURN_IF_ERROR(CheckColoSupported(probe_, d));
  if (std::string w = ColoWarning(probe_); !w.empty()) LOG_WARN(tag) << "domain " << d << ": " << w;
  ASSIGN_OR_RETURN(json st, monitor_->Execute("query-migrate"));
  std::string mstatus = st.value("status", "none");
  if (mstatus == "active" || mstatus == "colo" || mstatus == "setup")
    return AlreadyExists("domain " + d + ": QEMU already has a migration in progress (" + mstatus +
                         "); is it protected by another remusd?");
  if (libvirt_) {
    ASSIGN_OR_RETURN(qemu_argv_, libvirt_->QemuArgv());
    ASSIGN_OR_RETURN(domain_xml_, libvirt_->MigratableXml());
  } else {
    ASSIGN_OR_RETURN(qemu_argv_, qmp_->QemuArgv());
    // A guest restored here by mapping runs on this host's page store file;
    // its backup gets the plain command line.
    qemu_argv_ = StripMappedRam(qemu_argv_);
  }
  RETURN_IF_ERROR(ResolveNetbuf());
  // libvirt attaches disks with -blockdev: each is named by its <target
  // dev=>, and the backup points that <disk> of the XML at its copy. The
  // device aliases are in the live XML only (not the migratable one).
  std::map<std::string, std::string> targets;
  if (libvirt_ && opts_.disks != "none") {
    ASSIGN_OR_RETURN(std::string live, libvirt_->LiveXml());
    targets = LibvirtDiskTargets(live);
  }
  ASSIGN_OR_RETURN(std::vector<GuestDisk> disks,
                   ListGuestDisks(monitor_.get(), d, opts_.disks, libvirt_ ? &targets : nullptr));

  // Arbitration: this host owns the domain for the new session before any
  // backup may hold a checkpoint of it.
  const std::string session = RandomId();
  if (opts_.arbiter) {
    // Under libvirt a fenced copy is ended through libvirt, which then
    // records why the domain stopped.
    std::function<Status()> destroy;
    if (libvirt_) destroy = [uri = opts_.libvirt_uri, d] { return DestroyLibvirtDomain(uri, d); };
    ASSIGN_OR_RETURN(owned_, opts_.arbiter->Own(d, session, qemu_pid_, std::move(destroy)));
    // A remusd that dies while owning leaves this; the next one resolves it
    // before it removes any netbuf rule (arbiter/leftovers.h).
    Status w = WriteOwnershipRecord(opts_.run_dir, {d, session, qemu_pid_, ProcessStartTime(qemu_pid_)});
    if (!w.ok()) {
      owned_->lease().Abandon();
      return w.Annotate("domain " + d + ": recording its ownership");
    }
  }
  // A start that fails from here on leaves no backup able to promote this
  // session (no checkpoint of it committed): the key may go at once.
  struct AbandonOnError {
    OwnedDomain* o;
    bool armed = true;
    ~AbandonOnError() {
      if (armed && o) o->lease().Abandon();
    }
  } abandon{owned_.get()};

  auto fd = ConnectTcp(opts_.backup, opts_.connect_timeout_ms);
  if (!fd.ok())
    return Status(Code::kUnavailable, "domain " + d + ": backup " + opts_.backup.ToString() +
                                          " is unreachable: " + fd.status().message() +
                                          " (is remusd --listen running there?)");
  auto link_ = std::make_unique<wire::Link>(std::move(fd).value());
  Status hs = wire::ClientHandshake(*link_, *opts_.tls, opts_.backup.host, d, opts_.connect_timeout_ms);
  if (!hs.ok()) return Status(hs.code(), "domain " + d + ": " + hs.message());

  wire::ConfigMsg config{
      .domain = d,
      .argv = qemu_argv_,
      .qemu_version = probe_.version,
      .qemu_package = probe_.package,
      .accelerator = probe_.accelerator,
      .interval_ms = opts_.interval_ms,
      .heartbeat_interval_ms = std::chrono::duration_cast<std::chrono::milliseconds>(opts_.heartbeat.interval).count(),
      .heartbeat_timeout_ms = std::chrono::duration_cast<std::chrono::milliseconds>(opts_.heartbeat.timeout).count()};
  config.session = session;
  config.arbiter = opts_.arbiter ? "etcd" : "none";
  config.reprotect_to = opts_.reprotect_to;
  if (opts_.interval_auto) {
    config.interval_mode = "auto";
    config.latency_budget_ms = opts_.interval_auto_opts.latency_budget_ms;
    config.interval_min_ms = opts_.interval_auto_opts.min_ms;
    config.interval_max_ms = opts_.interval_auto_opts.max_ms;
  }
  config.netbuf = opts_.netbuf.mode;
  config.compress = opts_.compress;
  if (opts_.compress && opts_.xor_cache_bytes > 0) config.page_delta = "xor";
  config.disks_option = opts_.disks;
  for (const auto& g : disks) config.disks.push_back(g.Spec());
  // The backup restores a libvirt domain through its own libvirt, from this XML.
  if (libvirt_) config.libvirt = wire::LibvirtConfig{domain_xml_, d, opts_.libvirt_uri};
  config.delta_resync = opts_.delta_resync;
  config.residency = opts_.residency;
  RETURN_IF_ERROR(link_->Send(MsgType::kConfig, 0, wire::EncodeConfig(config)).Annotate("domain " + d + ": sending configuration"));
  std::unique_ptr<wire::DeltaFilter> delta;
  std::string resync_note = "full copy: delta resync is off on this primary";
  if (opts_.delta_resync) {
    ASSIGN_OR_RETURN(delta, ReceiveResyncOffer(*link_, d, std::chrono::milliseconds(opts_.resync_offer_timeout_ms),
                                               opts_.heartbeat.timeout, &resync_note));
    LOG_INFO(tag) << resync_note;
  }

  // libvirt's QEMU may not open a path of ours (its own user, AppArmor): the
  // COLO stream and the disks' NBD sockets reach it as passed fds.
  DiskSource::PassFdFn pass_fd;
  if (libvirt_) pass_fd = [lv = libvirt_](const std::string& name, int theirs) { return lv->PassFd(name, theirs); };
  LifecycleDeps deps;
  deps.link = std::move(link_);
  deps.monitor = monitor_.get();
  if (!disks.empty())
    deps.make_disks = [this, disks = std::move(disks), pass_fd](DiskMirror::WriteFn write) {
      return std::make_unique<DiskSource>(monitor_.get(), opts_.domain, opts_.run_dir, disks, std::move(write),
                                          pass_fd);
    };
  deps.make_netbuf = [nb = netbuf_opts_] { return MakeOutputBuffer(nb); };
  deps.qemu_running = [pid = qemu_pid_] { return ProcessRunning(pid); };
  // A planned switchover ends our QEMU for good: SIGKILL (it is paused in the
  // final checkpoint, and nothing it could still do may reach anyone; a
  // graceful quit would wait for its COLO thread, blocked on our stream),
  // then wait until it is gone (a zombie counts: it runs nothing). Without its
  // pid (a libvirt domain whose pid file we could not read), libvirt's destroy
  // is the only way to end it. Otherwise libvirt's destroy comes after the
  // backup was told (forget_qemu): libvirtd took 1.6 s here to reap the killed
  // QEMU and return from it, all of it on the switchover's critical path.
  deps.end_qemu = [pid = qemu_pid_, libvirt = libvirt_ != nullptr, uri = opts_.libvirt_uri, d]() -> Status {
    if (pid <= 0) return libvirt ? DestroyLibvirtDomain(uri, d).Annotate("destroying libvirt domain " + d) : OkStatus();
    if (::kill(pid, SIGKILL) < 0 && errno != ESRCH)
      return ErrnoStatus("kill -9 QEMU (pid " + std::to_string(pid) + ")", errno);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (ProcessRunning(pid)) {
      if (std::chrono::steady_clock::now() > until)
        return DeadlineExceeded("QEMU (pid " + std::to_string(pid) + ") still runs 10 s after it was ended");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return OkStatus();
  };
  // libvirt may have noticed the death already ("domain is not running"):
  // DestroyLibvirtDomain destroys only an active domain.
  if (libvirt_ && qemu_pid_ > 0)
    deps.forget_qemu = [uri = opts_.libvirt_uri, d] {
      return DestroyLibvirtDomain(uri, d).Annotate("destroying libvirt domain " + d);
    };
  if (libvirt_) deps.monitor_connected = [lv = libvirt_] { return lv->connected(); };
  if (owned_) deps.lease = &owned_->lease();
  deps.delta = std::move(delta);
  deps.resync_note = std::move(resync_note);
  CheckpointSourceOptions so{d, opts_.run_dir + "/" + d + ".migrate.sock", opts_.interval_ms, 10000};
  so.pass_fd = pass_fd;  // a socketpair end instead of our listening socket
  deps.source = std::make_unique<CheckpointSource>(monitor_.get(), std::move(so));
  // Events only post to the lifecycle: the monitor's event thread may not
  // issue commands, and ending protection takes some.
  monitor_->SetEventHandler([f = forward_](const json& ev) { f->Event(ev); });
  if (cancel_start_) {
    // CONFIG went out: the backup must not take the closed link for our death.
    Status c = Cancelled("domain " + d + ": protection cancelled while starting");
    (void)deps.link->SendBefore(std::chrono::steady_clock::now() + std::chrono::milliseconds(opts_.connect_timeout_ms),
                                MsgType::kGoodbye, 0, wire::EncodeReason({c.message()}));
    return c;
  }
  // Attach owns the end from here on: its teardown retires or abandons.
  abandon.armed = false;
  RETURN_IF_ERROR(lifecycle_->Attach(std::move(deps)));
  LOG_INFO(tag) << "protecting" << (libvirt_ ? " libvirt domain (" + opts_.libvirt_uri + ")" : std::string())
                << ": QEMU " << probe_.version << " (" << probe_.accelerator << "), backup "
                << opts_.backup.ToString() << ", interval " << opts_.interval_ms << " ms, netbuf " << netbuf_opts_.mode;
  return OkStatus();
}

Status PrimaryReplicator::ResolveNetbuf() {
  const std::string& d = opts_.domain;
  netbuf_opts_ = opts_.netbuf;
  netbuf_opts_.domain = d;
  NetbufOptions& nb = netbuf_opts_;
  if (nb.mode != "none" && nb.mode != "plug" && nb.mode != "nfqueue")
    return InvalidArgument("domain " + d + ": unknown --netbuf '" + nb.mode + "'; expected plug, nfqueue or none");
  if (nb.mode == "none") return OkStatus();
  if (nb.interfaces.empty()) {
    // libvirt mode: the taps libvirt made, from the live XML's <interface>s.
    if (libvirt_) {
      ASSIGN_OR_RETURN(nb.interfaces, LibvirtTapDevices(*libvirt_));
    } else {
      ASSIGN_OR_RETURN(nb.interfaces, GuestTapDevices(*monitor_, qemu_pid_, d));
    }
  }
  if (nb.interfaces.empty()) {
    LOG_INFO("primary[" + d + "]") << "the guest has no network devices: no output to hold";
    nb.mode = "none";
    return OkStatus();
  }
  for (const auto& i : nb.interfaces)
    if (::access(("/sys/class/net/" + i).c_str(), F_OK) != 0)
      return NotFound("domain " + d + ": network device " + i + " does not exist in remusd's network namespace");
  Status sup = CheckNetbufSupport(nb.mode);
  if (!sup.ok() && nb.mode == "plug" && opts_.netbuf_fallback) {
    LOG_WARN("primary[" + d + "]") << sup.message() << "; using nfqueue (--netbuf-fallback)";
    nb.mode = "nfqueue";
    sup = CheckNetbufSupport(nb.mode);
  }
  if (!sup.ok()) return Status(sup.code(), "domain " + d + ": " + sup.message());
  return OkStatus();
}

Status PrimaryReplicator::Unprotect() {
  CancelStart();
  return lifecycle_->Unprotect();
}

Status PrimaryReplicator::Switchover(wire::SwitchoverMsg msg) {
  if (!ready_) return FailedPrecondition("domain " + opts_.domain + " is still starting, not protected");
  if (msg.interval_ms == 0) msg.interval_ms = opts_.interval_ms;
  if (msg.netbuf.empty()) msg.netbuf = opts_.netbuf.mode;
  return lifecycle_->Switchover(std::move(msg));
}

Status PrimaryReplicator::SetInterval(int ms) {
  RETURN_IF_ERROR(CheckInterval(opts_.domain, ms));
  if (IsFinal(lifecycle_->state())) return FailedPrecondition("domain " + opts_.domain + " is no longer protected");
  if (!ready_) return FailedPrecondition("domain " + opts_.domain + ": protection is still starting");
  return lifecycle_->SetInterval(ms);
}

Status PrimaryReplicator::SetAutoInterval(const IntervalControllerOptions& o) {
  RETURN_IF_ERROR(ValidateIntervalOptions(opts_.domain, o));
  if (IsFinal(lifecycle_->state())) return FailedPrecondition("domain " + opts_.domain + " is no longer protected");
  if (!ready_) return FailedPrecondition("domain " + opts_.domain + ": protection is still starting");
  return lifecycle_->SetAutoInterval(o);
}

json PrimaryReplicator::StatusJson() const {
  json j;
  j["domain"] = opts_.domain;
  j["role"] = "primary";
  lifecycle_->FillStatus(&j);
  // Connect's members are read only once it returned (StartAsync runs it
  // on another thread).
  const bool ready = ready_.load();
  j["backup"] = opts_.backup.ToString();
  j["qmp_socket"] = opts_.qmp_socket;
  if (!opts_.libvirt_uri.empty()) {
    json lv = {{"uri", opts_.libvirt_uri}, {"domain", opts_.domain}};
    lv["connected"] = ready && libvirt_ ? libvirt_->connected() : false;
    lv["reconnects"] = ready && libvirt_ ? libvirt_->reconnects() : 0;
    lv["error"] = ready && libvirt_ ? libvirt_->last_error() : std::string();
    // libvirt sees every checkpoint's pause: `virsh domstate` says "paused
    // (unknown)" for those few milliseconds. The state above is remus's.
    lv["note"] = "virsh domstate shows 'paused (unknown)' during each checkpoint pause; do not virsh suspend/resume "
                 "a protected domain";
    j["libvirt"] = std::move(lv);
  }
  OutputBuffer* nb = lifecycle_->netbuf();
  const NetbufOptions no_netbuf;
  const NetbufOptions& nbo = ready ? netbuf_opts_ : no_netbuf;
  j["netbuf"] = {{"mode", ready ? nbo.mode : opts_.netbuf.mode},
                 {"interfaces", nbo.interfaces},
                 {"active", nb != nullptr},
                 {"guarantee", nb ? std::string(nb->guarantee()) : (nbo.mode == "none"
                                         ? std::string(NoOutputBuffer().guarantee())
                                         : "output is held from the end of the initial copy on")},
                 {"buffered_packets", nb ? nb->buffered_packets() : 0},
                 {"dropped_packets", nb ? nb->dropped_packets() : 0},
                 {"released_packets", nb ? nb->released_packets() : 0}};
  if (ready && owned_) {
    j["arbiter"] = {{"name", "etcd"}};
    j["arbiter"].update(owned_->lease().StatusJson());
  } else {
    j["arbiter"] = opts_.arbiter ? json{{"name", "etcd"}, {"state", "acquiring"}} : FailStopArbiter().StatusJson("");
  }
  j["qemu"] = {{"version", ready ? probe_.version : std::string()},
               {"accelerator", ready ? probe_.accelerator : std::string()},
               {"pid", ready ? qemu_pid_ : -1}};
  return j;
}

}  // namespace remus
