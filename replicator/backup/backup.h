// The backup side: accepts authenticated links from primaries, keeps one page
// store per protected domain, commits checkpoints only when complete, acks,
// and promotes (restores the guest into a new QEMU) when the primary is lost.
//
// Per domain, under <state-dir>/domains/<domain>/:
//   config.json        the primary's CONFIG (QEMU argv, versions, interval;
//                      a libvirt domain's XML)
//   store-<n>/         a PageStore; one per protection session
//   current            the name of the store holding the committed image
//   run/               the promoted QEMU's qmp.sock, qemu.pid, serial.log, qemu.log
//                      (libvirt: domain.xml as restored, serial.log, the FIFO)
//   promoted.json      after a promotion: its pid, epoch, reason, and its QMP
//                      socket or libvirt URI and domain
// A domain whose CONFIG carries libvirt XML is promoted through the backup's
// libvirt (RestoreDomain, libvirt/restore.h): libvirt owns the restored guest.
// A new session syncs into a new store and switches `current` only when its
// initial copy commits, so a resync that dies halfway loses nothing that was
// committed before.
//
// Thread-safety: public methods are thread-safe.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/io.h"
#include "common/stats.h"
#include "heartbeat/heartbeat.h"
#include "heartbeat/promotion.h"
#include "replicator/backup/page_store.h"
#include "replicator/qemu/qmp.h"
#include "replicator/link/wire.h"

namespace remus {

struct BackupOptions {
  std::string state_dir;
  wire::Key key;
  HeartbeatConfig heartbeat;        // used until the primary's CONFIG names its own
  int ack_delay_ms = 0;             // test and benchmark knob: hold each ACK this long
  std::string qemu_binary;          // overrides the primary's argv[0] (libvirt: <emulator>) when set
  // Where libvirt domains are restored, and where that libvirt keeps its
  // <domain>.pid files.
  std::string libvirt_uri = "qemu:///system";
  std::string libvirt_pid_dir = "/run/libvirt/qemu";
  bool auto_promote = true;         // promote when the primary is lost
  int handshake_timeout_ms = 5000;
};

// Rewrites the primary's QEMU command line for a restore on this host: its own
// monitor, pidfile and serial/chardev paths under run_dir, `-incoming defer`,
// no -daemonize, -S, -incoming or monitors of the primary. Pure; unit-tested.
// drive_images maps -drive ids to the backup's raw images: their file= is
// replaced and format= set to raw.
std::vector<std::string> RewriteArgvForRestore(const std::vector<std::string>& argv, const std::string& run_dir,
                                               const std::string& qemu_binary,
                                               const std::map<std::string, std::string>& drive_images = {});

class BackupDomain;

// A domain name remus accepts (it names a directory in the state dir):
// 1-64 letters, digits, '.', '-' or '_', not starting with '.' or '-'.
bool ValidDomainName(std::string_view d);

class BackupServer {
 public:
  BackupServer(BackupOptions opts, const Clock& clock, std::unique_ptr<Arbiter> arbiter);
  ~BackupServer();

  // Listens on addr and serves connections in the background.
  Status Listen(const HostPort& addr);
  // Operator-requested promotion (`remusctl failover`).
  Status Failover(const std::string& domain);
  nlohmann::json StatusJson(const std::string& domain_or_empty) const;
  bool HasDomain(const std::string& domain) const;

 private:
  void AcceptLoop();
  void Serve(Fd fd);
  std::shared_ptr<BackupDomain> GetOrCreate(const std::string& domain);

  BackupOptions opts_;
  const Clock& clock_;
  std::unique_ptr<Arbiter> arbiter_;
  Fd listen_fd_;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<BackupDomain>> domains_;  // guarded by mu_
  std::vector<std::thread> sessions_;                              // guarded by mu_
  std::vector<int> session_fds_;                                   // guarded by mu_
};

}  // namespace remus
