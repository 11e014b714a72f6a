// The primary side of one protected domain: the epoch loop.
//
//   QEMU --(COLO stream, unix socket)--> CheckpointSource --> staging
//        --> sender thread --(Link, TCP)--> backup
//   backup --ACK(epoch)--> ack reader --> netbuf release, backpressure release
//
// Speculative execution: LOADED is sent (the guest resumes) as soon as a
// checkpoint is staged, never after a network round trip. Backpressure: while
// more than max_unacked_epochs checkpoints or max_unacked_bytes are unacked,
// LOADED is held, so the guest waits and nothing is dropped.
//
// When protection ends for any reason other than the death of QEMU itself,
// the guest is left running unprotected (CheckpointSource::GiveUp).
//
// QEMU is reached through its QMP socket (opts.qmp_socket, QmpClient) or
// through libvirt (opts.libvirt_uri, LibvirtSession; docs/libvirt-notes.md).
// Under libvirt the COLO stream goes over a socketpair end passed to QEMU
// (`getfd` + `migrate fd:`), the CONFIG carries the domain's migratable XML
// for a restore through the backup's libvirt, and a lost connection to
// libvirtd is not QEMU's death: the session reconnects and protection goes
// on (commands and events are missed meanwhile).
//
// QEMU's death means failover: the backup is told to promote. A SHUTDOWN
// event the guest asked for (data.guest true: poweroff inside the guest,
// ACPI shutdown) ends protection instead, without failover; one from the
// host (a signal: `virsh destroy`, a host shutdown; QMP quit) is followed by
// QEMU's exit, which is a failover like any other death.
//
// Layout: this class connects (monitor, COLO probe, backup, handshake,
// CONFIG) and reports status; PrimaryLifecycle (lifecycle.h) owns the state
// machine, the threads and the lock from then on: epoch_loop.cc (QEMU's
// checkpoints), sender.cc (the link), lifecycle.cc (events and teardown).
//
// Thread-safety: public methods are thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "arbiter/etcd_arbiter.h"
#include "common/clock.h"
#include "common/io.h"
#include "common/thread_annotations.h"
#include "heartbeat/heartbeat.h"
#include "netbuf/netbuf.h"
#include "replicator/qemu/checkpoint_source.h"
#include "replicator/primary/disk_source.h"
#include "replicator/primary/lifecycle.h"
#include "replicator/libvirt/session.h"
#include "replicator/link/page_batch.h"
#include "replicator/qemu/qmp.h"
#include "replicator/link/tls.h"
#include "replicator/link/wire.h"

namespace remus {

struct PrimaryOptions {
  std::string domain;
  // Exactly one of these: QEMU's QMP socket, or the libvirt URI whose domain
  // `domain` is (libvirt mode).
  std::string qmp_socket;
  std::string libvirt_uri;
  std::string libvirt_pid_dir = kDefaultLibvirtPidDir;  // libvirt's <domain>.pid files
  // Retry the monitor connection and QEMU probe this long (0: fail at once)
  // when the domain is not ready yet: libvirt holds a domain's job while
  // its hook scripts run, so a protect started by the hook waits for it.
  int connect_retry_ms = 0;
  HostPort backup;
  // The guest is one this host promoted (a re-protection after a failover).
  bool reprotect = false;
  // Where the backup protects the guest again after it promoted it
  // ("host:port"; empty: it does not). Sent in CONFIG with the netbuf mode,
  // compress and disks options, which it reuses.
  std::string reprotect_to;
  std::string run_dir;  // for the migration socket
  int interval_ms = 100;
  // --interval auto: interval_ms is where it starts; the interval then
  // moves within interval_auto_opts (interval_controller.h). Sent in CONFIG,
  // so a re-protection after a failover is automatic too.
  bool interval_auto = false;
  IntervalControllerOptions interval_auto_opts;
  // How the link to the backup is authenticated and encrypted (tls.h).
  std::shared_ptr<const wire::TlsContext> tls;
  HeartbeatConfig heartbeat;
  // Output commit. interfaces empty: the guest's taps, asked from QEMU.
  NetbufOptions netbuf;
  // With netbuf.mode "plug": use nfqueue instead where the kernel lacks
  // sch_plug, rather than refusing.
  bool netbuf_fallback = false;
  // Disks to mirror: "all" writable -drive disks, "none", or drive ids "a,b".
  std::string disks = "all";
  bool compress = false;  // LZ4 on PAGES frames (in the sender thread, off the pause path)
  // With compress: XOR against the page's previous version first, keeping
  // up to this many bytes of versions ("xor-lz4"; 0: LZ4 alone).
  uint64_t xor_cache_bytes = 0;
  // How the backup keeps the page store: "hot" (locked in memory) or "paged"
  // (sent in CONFIG; replicator/backup/residency.h).
  std::string residency = "hot";
  // Delta resync: ask the backup for the image it holds of this domain and
  // send only the pages it lacks (docs/formats/replication-link.md).
  bool delta_resync = true;
  // How long to wait for the backup's RESYNC_OFFER to begin (a backup that
  // sends none, an older release, gets a full copy after this).
  int resync_offer_timeout_ms = 5000;
  uint64_t max_unacked_epochs = 8;
  uint64_t max_unacked_bytes = 1ull << 30;
  int connect_timeout_ms = 5000;
  // Arbitration (--arbiter etcd): owns the domain in etcd for each protection
  // session, fencing this host's copy when it cannot. Null: --arbiter none.
  EtcdArbiter* arbiter = nullptr;
  // Told every state change ("protected", "failed-over", ...) with the error
  // of an end (remusd's history). Must not block or call back.
  std::function<void(const std::string& state, const std::string& why)> on_state;
  // Test-only fault injection: "stall-after-reply@EPOCH" makes the epoch loop
  // stop forever right after REPLY of that epoch (the guest is then paused),
  // so tests can kill processes in that protocol phase.
  std::string fault;
};

class PrimaryReplicator {
 public:
  // Connects to QEMU and the backup, checks QEMU's COLO support,
  // authenticates, and starts the initial copy in the background. Errors come
  // back here for bad input: an unreachable monitor or backup, a key
  // mismatch, an unsupported QEMU.
  static StatusOr<std::unique_ptr<PrimaryReplicator>> Start(PrimaryOptions opts, const Clock& clock);
  // As Start, but returns at once in state "starting" and connects on a
  // thread of its own (retrying for opts.connect_retry_ms). A failure leaves
  // it "unprotected" with the reason as its status's error. For callers that
  // must not wait: libvirt's hook (which must return before libvirt lets
  // anyone talk to the domain).
  static std::unique_ptr<PrimaryReplicator> StartAsync(PrimaryOptions opts, const Clock& clock);
  ~PrimaryReplicator();

  // Ends protection on purpose: tells the backup not to promote, leaves the
  // guest running. Idempotent. Cancels a start in progress (waits for it).
  Status Unprotect();
  Status SetInterval(int ms);
  Status SetAutoInterval(const IntervalControllerOptions& o);
  // Planned switchover to the backup (PrimaryLifecycle::Switchover): returns
  // once it ended; our QEMU is gone then and the backup runs the guest.
  Status Switchover(wire::SwitchoverMsg msg = {});

  PrimaryState state() const { return lifecycle_->state(); }
  // QEMU's monitor once the start returned (null before, or when it could
  // not connect), for read-only requests beside the checkpoints (`remusctl
  // estimate`). Valid while this replicator lives.
  QemuMonitor* monitor() const { return ready_ && monitor_ ? monitor_.get() : nullptr; }
  nlohmann::json StatusJson() const;
  const std::string& domain() const { return opts_.domain; }

 private:
  // Monitor callbacks go through this, so none reaches the lifecycle once
  // it is being destroyed (the monitor outlives it and its threads may be
  // mid-callback).
  class Forwarder;

  PrimaryReplicator(PrimaryOptions opts, const Clock& clock);
  Status Connect();
  // monitor_, qemu_pid_ and probe_, retried for opts.connect_retry_ms.
  Status ConnectMonitor();
  Status ConnectQmp();
  Status ConnectLibvirt();
  Status ResolveNetbuf();
  // Waits for the start thread (StartAsync), cancelling it first.
  void CancelStart();

  PrimaryOptions opts_;
  const Clock& clock_;
  std::shared_ptr<Forwarder> forward_;
  // Set by Connect; read by other threads only once ready_ is true.
  std::unique_ptr<QemuMonitor> monitor_;
  QmpClient* qmp_ = nullptr;           // monitor_ in QMP mode
  LibvirtSession* libvirt_ = nullptr;  // monitor_ in libvirt mode
  int qemu_pid_ = -1;
  std::string domain_xml_;             // libvirt mode: the migratable XML sent in CONFIG
  NetbufOptions netbuf_opts_;          // resolved at Connect
  std::vector<std::string> qemu_argv_;
  ColoProbe probe_;
  std::atomic<bool> ready_{false};     // Connect returned (either way)
  std::atomic<bool> cancel_start_{false};
  std::thread start_thread_;           // StartAsync
  // This session's ownership (arbitration), set by Connect. Outlives the
  // lifecycle, which retires the session through it.
  std::unique_ptr<OwnedDomain> owned_;
  // After the monitor: destroyed (torn down, threads joined) first.
  std::unique_ptr<PrimaryLifecycle> lifecycle_;
};

}  // namespace remus
