// remusd: the per-host daemon. It is a primary for the domains it protects
// (`remusctl protect`), and, with --listen, a backup for domains other hosts
// protect to it. Operators talk to it over a root-only unix control socket,
// one JSON request per line and one JSON reply per line (docs/formats/control.md).
//
// Thread-safety: public methods are thread-safe.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/io.h"
#include "replicator/backup.h"
#include "replicator/primary.h"
#include "remusd/metrics.h"

namespace remus {

struct DaemonOptions {
  std::string state_dir = "/var/lib/remus";
  std::string control_socket = "/run/remus/remusd.sock";
  std::string key_file = "/etc/remus/key";
  std::optional<HostPort> listen;  // backup role
  HeartbeatConfig heartbeat;
  int ack_delay_ms = 0;
  std::string qemu_binary;
  bool auto_promote = true;
  // Test-only: fault injection handed to every PrimaryReplicator.
  std::string fault;
  // Allow non-root control clients (tests run unprivileged unit tests only;
  // never set in production).
  bool allow_any_uid = false;
  // Prometheus endpoint, "ADDR:PORT" (remusd/metrics.h); empty: off.
  std::string metrics_listen;
};

class Daemon {
 public:
  explicit Daemon(DaemonOptions opts, const Clock& clock = RealClock::Get());
  ~Daemon();

  // Loads the key, starts the backup listener (if any) and the control socket.
  Status Start();
  // Blocks until Shutdown().
  void Wait();
  void Shutdown();

  // The control protocol, callable directly (tests).
  nlohmann::json Handle(const nlohmann::json& request);
  // The port /metrics is served on; 0 when --metrics is off.
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }

 private:
  void ControlLoop();
  void ServeClient(Fd fd);
  nlohmann::json Protect(const nlohmann::json& req);
  nlohmann::json Unprotect(const nlohmann::json& req);
  nlohmann::json StatusOf(const nlohmann::json& req);
  nlohmann::json Failover(const nlohmann::json& req);
  nlohmann::json Tune(const nlohmann::json& req);

  DaemonOptions opts_;
  const Clock& clock_;
  wire::Key key_;
  std::unique_ptr<BackupServer> backup_;
  Fd control_fd_;
  std::thread control_thread_;
  std::unique_ptr<MetricsServer> metrics_;  // set in Start, reset first in Shutdown
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::unique_ptr<PrimaryReplicator>> primaries_;  // guarded by mu_
};

}  // namespace remus
