// The primary's monitor in libvirt mode: a LibvirtMonitor that survives a
// restart of libvirtd.
//
// libvirtd's death is not QEMU's (docs/libvirt-notes.md): the guest runs on,
// and so does COLO, whose stream goes from QEMU to remusd directly. What is
// lost with the connection is the monitor: commands and events. So when the
// connection closes while QEMU still runs, LibvirtSession reconnects in the
// background (every reconnect_interval_ms, for as long as QEMU runs) and
// re-installs the event handler on the new connection. Meanwhile commands
// fail at once with Unavailable and events are missed (the caller must not
// depend on one arriving; see PrimaryReplicator's use of RESUME).
//
// QEMU's death is reported once to the loss handler: libvirt's STOPPED
// lifecycle event, a lost connection with QEMU's process gone, or QEMU's
// process gone while reconnecting. A reconnect that finds the domain under a
// different QEMU pid (it was restarted meanwhile) also counts as its death.
//
// Threads: the loss handler and the event handler run on libvirt's event
// loop thread, or on the reconnect thread (a loss found while reconnecting);
// they must not block for long and must not call Execute. Execute and PassFd
// may be called from any other thread. The destructor stops and joins the
// reconnect thread first; no handler runs after it returns.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "common/thread_annotations.h"
#include "replicator/libvirt/monitor.h"

namespace remus {

class LibvirtSession final : public QemuMonitor {
 public:
  // The first connection: errors as LibvirtMonitor::Connect's (Unavailable,
  // NotFound, FailedPrecondition), returned as they are.
  static StatusOr<std::unique_ptr<LibvirtSession>> Connect(const LibvirtMonitorOptions& opts,
                                                           int reconnect_interval_ms = 500);
  ~LibvirtSession() override;

  LibvirtSession(const LibvirtSession&) = delete;
  LibvirtSession& operator=(const LibvirtSession&) = delete;

  // Unavailable without sending while reconnecting.
  StatusOr<nlohmann::json> Execute(const std::string& command,
                                   const nlohmann::json& args = nlohmann::json::object(),
                                   int timeout_ms = 10000) override;
  void SetEventHandler(std::function<void(const nlohmann::json& event)> handler) override;
  Status PassFd(const std::string& fdname, int fd, int timeout_ms = 10000);

  // QEMU is gone (see the top of this file). Fires once; at once on the
  // caller's thread if that is already known.
  void SetLossHandler(std::function<void(const MonitorLoss&)> handler);

  // False while reconnecting (and after QEMU's death was reported).
  bool connected() const;
  int reconnects() const { return reconnects_.load(); }
  // Why the last connection was lost or the last reconnect failed; "" if never.
  std::string last_error() const;

  const std::string& uri() const { return opts_.uri; }
  const std::string& domain() const { return opts_.domain; }
  int pid() const { return pid_; }
  const std::string& version() const { return version_; }
  const std::string& package() const { return package_; }
  StatusOr<std::string> MigratableXml() const;
  StatusOr<std::string> LiveXml() const;
  StatusOr<std::vector<std::string>> QemuArgv() const;

 private:
  LibvirtSession(LibvirtMonitorOptions opts, int reconnect_interval_ms);
  void Install(const std::shared_ptr<LibvirtMonitor>& m);
  void OnLoss(const MonitorLoss& loss);
  void ReportDeath(const MonitorLoss& loss);
  void ReconnectLoop();
  std::shared_ptr<LibvirtMonitor> Current() const;

  const LibvirtMonitorOptions opts_;
  const int reconnect_interval_ms_;
  int pid_ = -1;
  std::string version_;
  std::string package_;

  mutable Mutex mu_;
  CondVar cv_;
  std::shared_ptr<LibvirtMonitor> cur_ GUARDED_BY(mu_);
  bool connected_ GUARDED_BY(mu_) = false;
  bool need_reconnect_ GUARDED_BY(mu_) = false;
  bool stopping_ GUARDED_BY(mu_) = false;
  bool dead_ GUARDED_BY(mu_) = false;
  bool death_reported_ GUARDED_BY(mu_) = false;
  MonitorLoss death_ GUARDED_BY(mu_);
  std::string last_error_ GUARDED_BY(mu_);
  std::function<void(const nlohmann::json&)> event_handler_ GUARDED_BY(mu_);
  std::function<void(const MonitorLoss&)> loss_handler_ GUARDED_BY(mu_);
  std::atomic<int> reconnects_{0};
  std::thread reconnect_thread_;
};

}  // namespace remus
