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
// Thread-safety: public methods are thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/io.h"
#include "common/stats.h"
#include "heartbeat/heartbeat.h"
#include "netbuf/netbuf.h"
#include "replicator/qemu/checkpoint_source.h"
#include "replicator/primary/disk_source.h"
#include "replicator/libvirt/session.h"
#include "replicator/link/page_batch.h"
#include "replicator/qemu/qmp.h"
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
  std::string run_dir;  // for the migration socket
  int interval_ms = 100;
  wire::Key key;
  HeartbeatConfig heartbeat;
  // Output commit. interfaces empty: the guest's taps, asked from QEMU.
  NetbufOptions netbuf;
  // With netbuf.mode "plug": use nfqueue instead where the kernel lacks
  // sch_plug, rather than refusing.
  bool netbuf_fallback = false;
  // Disks to mirror: "all" writable -drive disks, "none", or drive ids "a,b".
  std::string disks = "all";
  bool compress = false;  // LZ4 on PAGES frames (in the sender thread, off the pause path)
  uint64_t max_unacked_epochs = 8;
  uint64_t max_unacked_bytes = 1ull << 30;
  int connect_timeout_ms = 5000;
  // Test-only fault injection: "stall-after-reply@EPOCH" makes the epoch loop
  // stop forever right after REPLY of that epoch (the guest is then paused),
  // so tests can kill processes in that protocol phase.
  std::string fault;
};

enum class PrimaryState { kStarting, kSyncing, kProtected, kUnprotected, kFailedOver, kStopped };
std::string_view PrimaryStateName(PrimaryState s);

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

  PrimaryState state() const { return state_.load(); }
  nlohmann::json StatusJson() const;
  const std::string& domain() const { return opts_.domain; }

 private:
  PrimaryReplicator(PrimaryOptions opts, const Clock& clock);
  Status Connect();
  // monitor_, qemu_pid_ and probe_, retried for opts_.connect_retry_ms.
  Status ConnectMonitor();
  Status ConnectQmp();
  Status ConnectLibvirt();
  void OnQemuLost(const std::string& why);
  // After the stream from QEMU broke: true if QEMU is gone (or going).
  bool QemuExited();
  // Waits for the start thread (StartAsync), cancelling it first.
  void CancelStart();
  // Stop's GiveUp found libvirt unreachable: retries it once libvirt is back.
  void GiveUpWhenReconnected();
  void EpochLoop();
  Status RunInitialSync();
  Status ResolveNetbuf();
  Status RunCheckpoint(uint64_t epoch);
  void SenderLoop();
  void AckLoop();
  void HeartbeatLoop();
  void OnQemuEvent(const nlohmann::json& ev);

  struct OutFrame {
    wire::MsgType type;
    uint64_t epoch;
    std::string payload;
    uint16_t flags = 0;
    // A checkpoint's pages, batched by the sender (type kPages, payload empty).
    std::shared_ptr<wire::DeferredPages> pages;
    uint64_t size() const { return pages ? pages->bytes() : payload.size(); }
  };
  // Blocks while the queue holds more than the bound (initial sync flow control).
  void Enqueue(OutFrame f);
  Status SendFrame(OutFrame& f);
  // Appends to the sender's queue, counting its bytes. REQUIRES mu_.
  void PushLocked(OutFrame f);
  // A mirrored disk write (NBD server threads): tagged with the epoch it belongs to.
  void OnDiskWrite(uint32_t disk, wire::DiskOp op, uint64_t offset, uint64_t length, std::span<const uint8_t> data);
  // Ends epoch `epoch` in the queue: DISK_SYNCED when due, then COMMIT.
  // Later disk writes belong to the next epoch. REQUIRES mu_.
  void PushCommitLocked(uint64_t epoch, wire::CommitInfo ci);
  Status SendPages(uint64_t epoch, std::string* payload);
  // Ends protection because of `why`. If qemu_dead, the backup is told to
  // promote; otherwise the guest is left running unprotected.
  void Stop(const Status& why, bool qemu_dead);
  void SetError(const std::string& e);

  PrimaryOptions opts_;
  const Clock& clock_;
  // Set by Connect; read by other threads only once ready_ is true.
  std::unique_ptr<QemuMonitor> monitor_;
  QmpClient* qmp_ = nullptr;           // monitor_ in QMP mode
  LibvirtSession* libvirt_ = nullptr;  // monitor_ in libvirt mode
  int qemu_pid_ = -1;
  std::string domain_xml_;             // libvirt mode: the migratable XML sent in CONFIG
  std::atomic<bool> ready_{false};     // Connect returned (either way)
  std::atomic<bool> cancel_start_{false};
  std::thread start_thread_;           // StartAsync
  std::thread giveup_thread_;          // GiveUpWhenReconnected, started by Stop at most once
  std::atomic<bool> destroying_{false};
  std::unique_ptr<CheckpointSource> source_;
  std::unique_ptr<wire::Link> link_;
  // Made while the guest is paused at the end of the initial copy (output
  // before protection is established is not held). netbuf_ is what other
  // threads read; the epoch thread sets it once.
  std::unique_ptr<OutputBuffer> netbuf_owner_;
  std::atomic<OutputBuffer*> netbuf_{nullptr};
  NetbufOptions netbuf_opts_;  // resolved at Connect
  std::unique_ptr<HeartbeatMonitor> hb_;
  std::vector<std::string> qemu_argv_;
  ColoProbe probe_;

  std::atomic<PrimaryState> state_{PrimaryState::kStarting};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> qemu_dead_{false};
  // QEMU reported a SHUTDOWN it was told to do (data.guest false): it exits next.
  std::atomic<bool> host_shutdown_{false};
  std::atomic<int> interval_ms_;

  // Send queue and ack accounting.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<OutFrame> queue_;             // guarded by mu_
  uint64_t queued_bytes_ = 0;              // guarded by mu_
  uint64_t last_staged_epoch_ = 0;         // guarded by mu_
  size_t last_epoch_pages_ = 0;            // epoch thread only
  std::unique_ptr<DiskSource> disks_;      // null without mirrored disks
  uint64_t disk_epoch_ = 0;                // guarded by mu_: the epoch disk writes belong to
  uint64_t disk_records_ = 0;              // guarded by mu_: kDisk frames of disk_epoch_
  uint64_t disk_bytes_ = 0;                // guarded by mu_: their payload bytes
  int64_t disk_synced_epoch_ = -1;         // guarded by mu_: DISK_SYNCED sent with this epoch
  int64_t last_acked_epoch_ = -1;          // guarded by mu_
  std::deque<std::pair<uint64_t, uint64_t>> unacked_;  // (epoch, bytes), guarded by mu_
  uint64_t unacked_bytes_ = 0;             // guarded by mu_
  std::deque<std::pair<uint64_t, TimePoint>> loaded_at_;  // guarded by mu_
  std::string error_;                      // guarded by mu_

  // Initial sync progress.
  std::atomic<uint64_t> sync_total_bytes_{0};
  std::atomic<uint64_t> sync_done_bytes_{0};

  // Metrics.
  SampleWindow pause_ms_;     // from QMP STOP/RESUME timestamps
  SampleWindow ack_ms_;       // LOADED -> ACK
  SampleWindow stage_ms_;     // REPLY written -> LOADED written: remus's own part of the pause
  SampleWindow dirty_pages_;  // pages per epoch
  SampleWindow epoch_bytes_;  // wire bytes per epoch
  RateMeter checkpoints_;
  // Cumulative, for metrics and `remusctl stats --histogram` (the windows
  // above forget; these never do).
  Histogram pause_hist_{Histogram::LatencySeconds()};  // seconds
  Histogram ack_hist_{Histogram::LatencySeconds()};    // seconds
  Histogram dirty_hist_{Histogram::PageCounts()};      // pages per epoch
  std::atomic<int64_t> stop_ts_us_{-1};
  std::atomic<uint64_t> checkpoints_total_{0};
  std::atomic<uint64_t> dirty_pages_total_{0};
  std::atomic<uint64_t> epoch_bytes_total_{0};
  std::atomic<uint64_t> backpressure_waits_{0};

  std::thread epoch_thread_, sender_thread_, ack_thread_, hb_thread_;
};

}  // namespace remus
