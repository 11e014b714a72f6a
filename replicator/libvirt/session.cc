#include "replicator/libvirt/session.h"

#include <signal.h>

#include <cerrno>
#include <chrono>

#include "common/io.h"
#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {

using nlohmann::json;

namespace {

constexpr char kTag[] = "libvirt";

}  // namespace

LibvirtSession::LibvirtSession(LibvirtMonitorOptions opts, int reconnect_interval_ms)
    : opts_(std::move(opts)), reconnect_interval_ms_(reconnect_interval_ms) {}

StatusOr<std::unique_ptr<LibvirtSession>> LibvirtSession::Connect(const LibvirtMonitorOptions& opts,
                                                                  int reconnect_interval_ms) {
  ASSIGN_OR_RETURN(std::unique_ptr<LibvirtMonitor> first, LibvirtMonitor::Connect(opts));
  std::unique_ptr<LibvirtSession> s(new LibvirtSession(opts, reconnect_interval_ms));
  s->pid_ = first->pid();
  s->version_ = first->version();
  s->package_ = first->package();
  std::shared_ptr<LibvirtMonitor> m = std::move(first);
  {
    MutexLock l(s->mu_);
    s->cur_ = m;
    s->connected_ = true;
  }
  s->Install(m);
  s->reconnect_thread_ = std::thread([p = s.get()] { p->ReconnectLoop(); });
  return s;
}

LibvirtSession::~LibvirtSession() {
  {
    MutexLock l(mu_);
    stopping_ = true;
    cv_.NotifyAll();
  }
  if (reconnect_thread_.joinable()) reconnect_thread_.join();
  std::shared_ptr<LibvirtMonitor> m;
  {
    MutexLock l(mu_);
    m = std::move(cur_);
  }
  m.reset();  // deregisters the callbacks and waits out one in progress (not under mu_)
}

void LibvirtSession::Install(const std::shared_ptr<LibvirtMonitor>& m) {
  m->SetEventHandler([this](const json& ev) {
    std::function<void(const json&)> h;
    {
      MutexLock l(mu_);
      h = event_handler_;
    }
    if (h) h(ev);
  });
  m->SetDisconnectHandler([this](const MonitorLoss& loss) { OnLoss(loss); });
}

void LibvirtSession::OnLoss(const MonitorLoss& loss) {
  if (loss.kind == MonitorLoss::Kind::kDomainStopped || !loss.qemu_alive) {
    ReportDeath(loss);
    return;
  }
  MutexLock l(mu_);
  if (stopping_ || dead_) return;
  connected_ = false;
  need_reconnect_ = true;
  last_error_ = "connection to libvirt at " + opts_.uri + " lost (" + loss.reason + ")";
  LOG_WARN(kTag) << "domain " << opts_.domain << ": " << last_error_ << " while QEMU (pid " << pid_
                 << ") runs on; reconnecting";
  cv_.NotifyAll();
}

void LibvirtSession::ReportDeath(const MonitorLoss& loss) {
  std::function<void(const MonitorLoss&)> h;
  {
    MutexLock l(mu_);
    if (dead_) return;
    dead_ = true;
    connected_ = false;
    death_ = loss;
    if (loss_handler_ && !death_reported_) {
      death_reported_ = true;
      h = loss_handler_;
    }
    cv_.NotifyAll();
  }
  if (h) h(loss);
}

void LibvirtSession::SetLossHandler(std::function<void(const MonitorLoss&)> handler) {
  MutexLock l(mu_);
  if (dead_ && !death_reported_) {
    death_reported_ = true;
    MonitorLoss loss = death_;
    l.Unlock();
    if (handler) handler(loss);
    return;
  }
  loss_handler_ = std::move(handler);
}

void LibvirtSession::ReconnectLoop() {
  for (;;) {
    std::shared_ptr<LibvirtMonitor> old;
    {
      MutexLock l(mu_);
      cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || (need_reconnect_ && !dead_); });
      if (stopping_) return;
      need_reconnect_ = false;
      old = std::move(cur_);
    }
    old.reset();  // here, not on libvirt's event loop thread
    for (int attempt = 1;; attempt++) {
      {
        MutexLock l(mu_);
        if (attempt > 1)
          cv_.WaitFor(mu_, std::chrono::milliseconds(reconnect_interval_ms_), [&]() REQUIRES(mu_) { return stopping_ || dead_; });
        if (stopping_) return;
        if (dead_) break;
      }
      if (!ProcessRunning(pid_)) {
        MonitorLoss loss;
        loss.kind = MonitorLoss::Kind::kDomainStopped;
        loss.reason = "QEMU exited while libvirt was unreachable";
        loss.qemu_pid = pid_;
        ReportDeath(loss);
        break;
      }
      auto m = LibvirtMonitor::Connect(opts_);
      if (!m.ok()) {
        MutexLock l(mu_);
        last_error_ = m.status().message();
        if (attempt == 1 || attempt % 20 == 0)
          LOG_WARN(kTag) << "domain " << opts_.domain << ": reconnect attempt " << attempt << ": " << last_error_;
        continue;
      }
      if ((*m)->pid() != pid_) {
        MonitorLoss loss;
        loss.kind = MonitorLoss::Kind::kDomainStopped;
        loss.reason = "the domain runs under a new QEMU (pid " + std::to_string((*m)->pid()) + ")";
        loss.qemu_pid = pid_;
        ReportDeath(loss);
        break;
      }
      std::shared_ptr<LibvirtMonitor> sm = std::move(m).value();
      {
        MutexLock l(mu_);
        cur_ = sm;
        connected_ = true;
      }
      reconnects_++;
      LOG_INFO(kTag) << "domain " << opts_.domain << ": reconnected to libvirt at " << opts_.uri << " after "
                     << attempt << " attempt(s)";
      Install(sm);  // a loss from now on (even at once) goes through OnLoss again
      break;
    }
  }
}

std::shared_ptr<LibvirtMonitor> LibvirtSession::Current() const {
  MutexLock l(mu_);
  return connected_ || dead_ ? cur_ : nullptr;
}

bool LibvirtSession::connected() const {
  MutexLock l(mu_);
  return connected_;
}

std::string LibvirtSession::last_error() const {
  MutexLock l(mu_);
  return last_error_;
}

StatusOr<json> LibvirtSession::Execute(const std::string& command, const json& args, int timeout_ms) {
  std::shared_ptr<LibvirtMonitor> m;
  std::string why;
  {
    MutexLock l(mu_);
    if (connected_ || dead_) m = cur_;
    why = dead_ ? "QEMU exited" : last_error_ + "; reconnecting";
  }
  if (!m) return Unavailable("QMP command '" + command + "' to domain " + opts_.domain + " not sent: " + why);
  return m->Execute(command, args, timeout_ms);
}

Status LibvirtSession::PassFd(const std::string& fdname, int fd, int timeout_ms) {
  std::shared_ptr<LibvirtMonitor> m = Current();
  if (!m) return Unavailable("passing fd " + fdname + " to domain " + opts_.domain + ": not connected to libvirt");
  return m->PassFd(fdname, fd, timeout_ms);
}

void LibvirtSession::SetEventHandler(std::function<void(const json& event)> handler) {
  MutexLock l(mu_);
  event_handler_ = std::move(handler);
}

StatusOr<std::string> LibvirtSession::MigratableXml() const {
  std::shared_ptr<LibvirtMonitor> m = Current();
  if (!m) return Unavailable("domain " + opts_.domain + ": not connected to libvirt at " + opts_.uri);
  return m->MigratableXml();
}

StatusOr<std::string> LibvirtSession::LiveXml() const {
  std::shared_ptr<LibvirtMonitor> m = Current();
  if (!m) return Unavailable("domain " + opts_.domain + ": not connected to libvirt at " + opts_.uri);
  return m->LiveXml();
}

StatusOr<std::vector<std::string>> LibvirtSession::QemuArgv() const {
  std::shared_ptr<LibvirtMonitor> m = Current();
  if (!m) return Unavailable("domain " + opts_.domain + ": not connected to libvirt at " + opts_.uri);
  return m->QemuArgv();
}

}  // namespace remus
