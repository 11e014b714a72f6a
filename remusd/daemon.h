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
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/io.h"
#include "common/thread_annotations.h"
#include "arbiter/etcd_arbiter.h"
#include "remusd/history.h"
#include "remusd/reprotector.h"
#include "remusd/metrics.h"
#include "remusd/request.h"
#include "replicator/backup/backup.h"
#include "replicator/primary/primary.h"

namespace remus {

struct DaemonOptions {
  std::string state_dir = "/var/lib/remus";
  std::string control_socket = "/run/remus/remusd.sock";
  std::string key_file = "/etc/remus/key";
  // Certificate mode for replication links instead of the key file (all
  // three, or none); the peer's expected name (replicator/link/tls.h).
  std::string tls_cert, tls_key, tls_ca, tls_peer_name;
  std::optional<HostPort> listen;  // backup role
  HeartbeatConfig heartbeat;
  int ack_delay_ms = 0;
  // Backup: how a promotion restores the guest: "map" (main RAM mapped from
  // the page store where the command line allows it) or "stream".
  std::string restore = "map";
  // Backup: memory kept free beyond a hot domain's RAM when admitting it.
  uint64_t hot_headroom_mib = 512;
  std::string qemu_binary;
  // Backup: what a primary's CONFIG may make this host run beyond the
  // built-in allow-lists (replicator/backup/peer_policy.h).
  PeerPolicy peer_policy;
  bool auto_promote = true;
  // Re-protection after a failover (remusd/reprotector.h). Primary: what
  // CONFIG asks the backup to do after it promoted: "none", "self" (this
  // remusd's --listen address, which must name a host) or "host:port".
  // Backup: whether it does what its primaries ask.
  std::string reprotect_to = "none";
  bool auto_reprotect = true;
  // libvirt mode: the libvirt a `protect` without --qmp (or --connect) uses
  // on this host, and the one a backup restores libvirt domains into; where
  // that libvirt keeps its <domain>.pid files.
  std::string libvirt_uri = "qemu:///system";
  std::string libvirt_pid_dir = "/run/libvirt/qemu";
  // Test-only: fault injection handed to every PrimaryReplicator (and to the
  // backup: switchover-no-answer).
  std::string fault;
  // Allow non-root control clients (tests run unprivileged unit tests only;
  // never set in production).
  bool allow_any_uid = false;
  // A control connection that sends no complete request for this long is
  // closed, so idle clients cannot hold the kMaxControlClients slots.
  int control_idle_timeout_ms = 60000;
  // Prometheus endpoint, "ADDR:PORT" (remusd/metrics.h); empty: off.
  std::string metrics_listen;
  // Its TLS and basic auth (--metrics-web-config, remusd/web_config.h);
  // unset: plain HTTP, no authentication.
  std::optional<WebConfig> metrics_web;
  // Arbitration (docs/architecture.md, "Arbitration"). "etcd", the default:
  // remusd refuses to start without etcd_endpoints, so no host runs without
  // arbitration by omission. "none": fail-stop, which a network partition
  // or a frozen remusd turns into two running copies; status says so.
  std::string arbiter = "etcd";
  std::vector<std::string> etcd_endpoints;
  std::string etcd_cacert, etcd_cert, etcd_key;
  std::string etcd_prefix = "/remus";
  std::string host_id;  // empty: the hostname
  // The fence watchdog binary; empty: remus-fence next to remusd's own binary.
  std::string fence_helper;
  int lease_ttl_ms = 5000;
  int lease_margin_ms = 1000;
};

// Checks the arbitration options: InvalidArgument naming the flag.
Status ValidateArbiterOptions(const DaemonOptions& o);

class Daemon {
 public:
  explicit Daemon(DaemonOptions opts, const Clock& clock = RealClock::Get());
  ~Daemon();

  // Loads the key, starts the backup listener (if any) and the control socket.
  Status Start();
  // Start's first step with --arbiter etcd: resolves what a remusd that died
  // left of the domains it owned (arbiter/leftovers.h). True when output
  // rules may be removed: nothing was left undecided.
  bool ResolveLeftovers();
  // Starts remus-fence (arbiter/fence_table.h) on a new fence table, after
  // stopping the one a previous remusd left.
  Status StartFenceWatchdog();
  // Blocks until Shutdown().
  void Wait();
  void Shutdown();

  // Control connections served at once; one more gets a RESOURCE_EXHAUSTED
  // reply and is closed.
  static constexpr int kMaxControlClients = 16;

  // The control protocol, callable directly (tests). Never throws: a
  // malformed request gets an error reply (request.h).
  nlohmann::json Handle(const nlohmann::json& request);
  // The port /metrics is served on; 0 when --metrics is off.
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }

 private:
  void ControlLoop();
  void ServeClient(int fd);
  nlohmann::json Dispatch(const nlohmann::json& request);
  nlohmann::json Protect(const RequestReader& req);
  StatusOr<PrimaryOptions> ProtectOptions(const std::string& domain, const RequestReader& req) const;
  nlohmann::json Unprotect(const RequestReader& req);
  nlohmann::json StatusOf(const RequestReader& req);
  nlohmann::json Failover(const RequestReader& req);
  nlohmann::json Tune(const RequestReader& req);
  nlohmann::json Switchover(const RequestReader& req);
  // `remusctl estimate`: measures the domain's dirty rate (through the
  // protection's monitor, or a connection of its own made as `protect`
  // would) on the control client's thread, never under mu_; a few seconds.
  nlohmann::json Estimate(const RequestReader& req);

  // Entries of each domain's history a status row carries.
  static constexpr size_t kStatusHistory = 10;

  DaemonOptions opts_;
  const Clock& clock_;
  // Each domain's history on this host (STATE/history); both sides report to it.
  std::unique_ptr<DomainHistory> history_;
  // One TLS context per role, shared by every link (tls.h).
  std::shared_ptr<const wire::TlsContext> tls_primary_, tls_backup_;
  // Arbitration (--arbiter etcd): the etcd client and the arbiter the
  // primaries and the backup share. Before backup_: destroyed after it.
  std::unique_ptr<etcd::Kv> etcd_;
  // Before arbiter_: the leases it holds free their slots when it goes.
  std::unique_ptr<FenceTable> fence_table_;
  std::unique_ptr<EtcdArbiter> arbiter_;
  int fence_pid_ = -1;
  // Leftover guests of a dead remusd that run on here (their sessions
  // retired): resumed again once its fence watchdog is gone.
  std::vector<int> resumed_leftovers_;
  std::unique_ptr<BackupServer> backup_;
  // "host:port" from opts_.reprotect_to ("" for none), set by Start.
  std::string reprotect_to_;
  // Before primaries_ and backup_ in Shutdown: its jobs call into both.
  std::unique_ptr<Reprotector> reprotector_;
  // The backup side promoted `domain`: start its automatic re-protection if
  // its primary asked for one (detail: BackupOptions::on_state's).
  void MaybeReprotect(const std::string& domain, const nlohmann::json& detail);
  // StatusOr-style protect for the reprotector (automatic: true).
  Status ProtectForReprotector(const nlohmann::json& request);
  bool ReprotectWanted(const std::string& domain);
  Fd control_fd_;
  std::thread control_thread_;
  std::unique_ptr<MetricsServer> metrics_;  // set in Start, reset first in Shutdown
  std::atomic<bool> stopping_{false};
  Mutex mu_;
  CondVar cv_;
  // shared: an async unprotect's worker may still hold one that a later
  // request replaced.
  std::map<std::string, std::shared_ptr<PrimaryReplicator>> primaries_ GUARDED_BY(mu_);
  // Workers of async requests (libvirt's hook must not wait), joined by Shutdown.
  std::vector<std::thread> workers_ GUARDED_BY(mu_);
  // Control connections being served (their threads are detached).
  std::set<int> client_fds_ GUARDED_BY(mu_);
  // Domains an estimate is measuring (QEMU measures one window at a time).
  Mutex estimate_mu_;
  std::set<std::string> estimating_ GUARDED_BY(estimate_mu_);
};

}  // namespace remus
