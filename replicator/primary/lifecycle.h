// The primary's lifecycle for one protected domain: one state machine, one
// owner of its threads and of its lock. PrimaryReplicator (primary.h)
// connects to QEMU and the backup and hands the pieces over (Attach); this
// class runs protection and ends it.
//
//   starting --Attach--> syncing --ACK covering the initial copy--> protected
//      |                   |                                           |
//      |                   |                              Switchover   |
//      |                   |                                           v
//      |                   |                                    switching-over
//      |                   |                                           |
//      +-------------------+---------Teardown--------------------------+
//                          v                                           | accepted, or
//      unprotected (protection lost; the guest runs on)                v lost once told
//                                                                switched-over
//      failed-over (QEMU died; the backup was told to promote)
//      stopped     (ended on purpose: unprotect, guest shutdown, daemon stop)
//      fenced      (arbitration: another host won the domain; our copy was
//                   destroyed and nothing it held was released)
//      switched-over (a planned switchover: the backup accepted the final
//                   checkpoint, our QEMU was ended, the backup runs the guest)
//
// Planned switchover (Switchover): the next checkpoint is the final one; the
// guest stays paused from its capture on (LOADED is never sent). Once the
// backup acked it, SWITCHOVER(final) goes out, and from then on our guest
// never resumes: the backup may promote. It answers SWITCHOVER (accepted) or
// ERROR (refused: it never promotes this session, so the guest resumes here,
// unprotected). On acceptance, or silence, or a broken link after SWITCHOVER
// went out, QEMU is ended (LifecycleDeps::end_qemu), the lease given up and
// FAILOVER sent (the backup promotes at once). Anything that ends protection
// before SWITCHOVER went out (the backup lost, the final ACK late, unprotect)
// is an ordinary end: the guest resumes here, unprotected.
//
// With an arbiter (LifecycleDeps::lease), output leaves only while the lease
// is valid, and protection that ends with the guest running retires the
// session in etcd before anything held is released: until then a backup
// could still promote the session's last checkpoint. (docs/architecture.md,
// "Arbitration".)
//
// The three ends are final, and only the lifecycle thread enters them
// (Teardown), so an end runs once and on a thread that may issue QMP
// commands. Everything else only posts:
//   - monitor events and monitor loss (QMP reader thread, libvirt's event
//     thread: both refuse QMP commands of their own),
//   - the epoch loop ending (QEMU gone, the stream broke),
//   - the sender or ack reader losing the link, the backup's ERROR,
//   - Unprotect (which then waits for the end) and the destructor.
//
// Threads, all owned here: lifecycle (constructor to destructor), and from
// Attach on epoch, sender, ack reader and heartbeat sender.
//
// The backup's liveness is judged on receipt only, on the lifecycle thread:
// any frame from the backup counts, and silence for the heartbeat timeout
// is its loss, whatever the sender is doing. Heartbeats go out with
// Link::TrySend (a link busy with a frame is carrying data anyway); every
// write is bounded by the link's send timeout (LifecycleOptions::send_timeout,
// a backstop: liveness is not its job, and a live backup busy applying a
// commit may take no data for a while). Whenever protection ends without
// QEMU's death, the guest is released first (GiveUp: QEMU leaves COLO, the
// guest resumes), then GOODBYE is sent, waiting only while the backup is not
// silent, then output is released, and a silent backup's link is shut down
// both ways, which also ends a write stuck on it. So a backpressure pause
// (LOADED withheld) lasts at most heartbeat timeout + one interval after the
// backup's last frame, plus the time QEMU takes to leave COLO.
//
// Thread-safety: public methods are thread-safe. Callbacks handed to other
// components (event handler, disk writes) may run on any thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "arbiter/lease.h"
#include "common/clock.h"
#include "common/stats.h"
#include "common/thread_annotations.h"
#include "heartbeat/heartbeat.h"
#include "netbuf/netbuf.h"
#include "replicator/link/messages.h"
#include "replicator/link/page_batch.h"
#include "replicator/link/resync.h"
#include "replicator/link/wire.h"
#include "replicator/primary/disk_source.h"
#include "replicator/primary/interval_controller.h"
#include "replicator/primary/page_version_cache.h"
#include "replicator/qemu/checkpoint_stream.h"
#include "replicator/qemu/qmp.h"

namespace remus {

enum class PrimaryState {
  kStarting, kSyncing, kProtected, kUnprotected, kFailedOver, kStopped, kFenced, kSwitchingOver, kSwitchedOver
};
std::string_view PrimaryStateName(PrimaryState s);
inline bool IsFinal(PrimaryState s) {
  return s == PrimaryState::kUnprotected || s == PrimaryState::kFailedOver || s == PrimaryState::kStopped ||
         s == PrimaryState::kFenced || s == PrimaryState::kSwitchedOver;
}
// Protection runs (the backup's liveness is watched) in these states.
inline bool IsLive(PrimaryState s) {
  return s == PrimaryState::kSyncing || s == PrimaryState::kProtected || s == PrimaryState::kSwitchingOver;
}
// The transitions the lifecycle makes (Advance, EnterFinal check them):
// starting -> syncing -> protected -> switching-over; any state but a final
// one -> unprotected, failed-over, stopped, fenced; switching-over ->
// switched-over.
bool PrimaryTransitionAllowed(PrimaryState from, PrimaryState to);

struct LifecycleOptions {
  std::string domain;
  std::string backup;  // "host:port", for messages
  HeartbeatConfig heartbeat;
  uint64_t max_unacked_epochs = 8;
  uint64_t max_unacked_bytes = 1ull << 30;
  bool compress = false;
  // Compression "xor-lz4" (with compress): the bytes of page versions kept
  // to send pages as XOR records (page_version_cache.h). 0: LZ4 alone.
  uint64_t xor_cache_bytes = 0;
  int interval_ms = 100;
  // --interval auto: the interval moves within interval_auto's bounds
  // (interval_controller.h), starting from interval_ms.
  bool interval_auto = false;
  IntervalControllerOptions interval_auto_opts;
  // No write waits longer than this for the backup to take data (zero:
  // max(30 s, 4 x heartbeat timeout)), nor do GOODBYE/FAILOVER. A backstop:
  // the backup's loss is judged on receipt, within the heartbeat timeout.
  Nanos send_timeout{0};
  // "stall-after-reply@EPOCH" (tests): see PrimaryOptions::fault.
  std::string fault;
  // Told every state change (remusd's history), with the error for an end.
  // Called without the lifecycle's lock; it must not block.
  std::function<void(PrimaryState to, const std::string& why)> on_state;
};

// What Attach takes over. Only link and source are required.
struct LifecycleDeps {
  // Authenticated, CONFIG sent. Owned from Attach on.
  std::unique_ptr<wire::Link> link;
  // Not yet started (Attach starts it).
  std::unique_ptr<CheckpointStream> source;
  // QEMU's monitor (outlives this): asked whether QEMU still runs when the
  // stream breaks. Null: a broken stream under a running QEMU is assumed.
  QemuMonitor* monitor = nullptr;
  // Output buffering, made while the guest is paused at the end of the
  // initial copy. Null: NoOutputBuffer.
  std::function<StatusOr<std::unique_ptr<OutputBuffer>>()> make_netbuf;
  // The disk mirror, given the function its writes go to. Null: no disks.
  std::function<std::unique_ptr<DiskMirror>(DiskMirror::WriteFn)> make_disks;
  // Whether QEMU's process still exists. Null: assume it does.
  std::function<bool()> qemu_running;
  // Ends QEMU for good (a planned switchover: the backup runs the guest
  // now) and returns once it is gone. Null: switchover is refused.
  std::function<Status()> end_qemu;
  // Called after end_qemu succeeded and the backup was told (FAILOVER), off
  // the switchover's critical path: libvirt's destroy, so that libvirt knows
  // the domain is off (it takes up to seconds to reap a killed QEMU). Null:
  // nothing to do.
  std::function<Status()> forget_qemu;
  // libvirt mode: whether the monitor is reachable. Set, a GiveUp that
  // failed with Unavailable is retried once it is back.
  std::function<bool()> monitor_connected;
  // Arbitration: this host's lease on the domain (outlives this object,
  // started). Null: --arbiter none.
  DomainLease* lease = nullptr;
  // Delta resync: the backup's offer (complete). Null: the initial copy is
  // full, and resync_note says why.
  std::unique_ptr<wire::DeltaFilter> delta;
  std::string resync_note;
};

class PrimaryLifecycle {
 public:
  static constexpr size_t kBatchBytes = 4u << 20;            // PAGES payload target
  static constexpr uint64_t kInitialQueueBound = 64u << 20;  // flow control during the initial copy

  // Starts the lifecycle thread; the state is "starting".
  PrimaryLifecycle(LifecycleOptions opts, const Clock& clock);
  // Ends protection if it still runs (stopped: "daemon shutting down"),
  // then joins every thread. REQUIRES: no callback of this object can run
  // any more or runs concurrently only until it returns (clear the monitor's
  // event handler first).
  ~PrimaryLifecycle();
  PrimaryLifecycle(const PrimaryLifecycle&) = delete;
  PrimaryLifecycle& operator=(const PrimaryLifecycle&) = delete;

  // starting -> syncing: takes the pieces, starts QEMU's COLO migration
  // (source->Start) and the threads. On error protection has ended
  // (unprotected, the error as its reason) and the error is returned.
  // Once only; not concurrently with Unprotect or the destructor.
  Status Attach(LifecycleDeps deps);
  // starting -> unprotected (or stopped, for Cancelled): a start that never
  // reached Attach.
  void FailStart(const Status& why);

  // Ends protection on purpose (GOODBYE: the backup does not promote; the
  // guest runs on) and waits until it has ended. Idempotent: protection
  // that already ended stays as it ended. The error is the reason
  // protection had been lost, if it had been.
  Status Unprotect();
  // A fixed interval (`remusctl tune --interval N`): ends an automatic one.
  Status SetInterval(int ms) EXCLUDES(interval_mu_, mu_);
  // The automatic interval (`--interval auto`): from the next acked
  // checkpoints on, the controller moves it within o's bounds, through the
  // same QMP call as SetInterval, from the lifecycle thread. InvalidArgument
  // for bad bounds (ValidateIntervalOptions).
  Status SetAutoInterval(const IntervalControllerOptions& o) EXCLUDES(interval_mu_, mu_);
  // Planned switchover to the backup (see the top of this file): protected
  // -> switching-over, then waits until the switchover ended. OK when the
  // backup accepted and our QEMU ended (switched-over); otherwise the error,
  // with the state saying where the guest runs (unprotected: here;
  // switched-over with an error: the backup was told and promotes by itself).
  // FailedPrecondition when not protected, AlreadyExists when a switchover
  // runs already.
  // msg travels in SWITCHOVER (its reason is set here): where the backup
  // protects the guest back to (reverse protection), if anywhere.
  Status Switchover(wire::SwitchoverMsg msg = {}) EXCLUDES(mu_);

  // Monitor callbacks: post to the lifecycle, never block, never issue QMP.
  void OnQemuEvent(const nlohmann::json& ev);
  void OnQemuLost(const std::string& why);

  PrimaryState state() const { return state_.load(); }
  // The fields this object knows (state, sync, epochs, metrics, netbuf
  // counters, disks, link).
  void FillStatus(nlohmann::json* j) const;
  std::string error() const;
  OutputBuffer* netbuf() const { return netbuf_.load(); }

 private:
  struct Event {
    Status why;              // Cancelled: ended on purpose
    bool qemu_dead = false;  // failover
    bool unprotect = false;  // from Unprotect(): wake it when done
  };
  struct OutFrame {
    wire::MsgType type;
    uint64_t epoch;
    std::string payload;
    uint16_t flags = 0;
    // A checkpoint's pages, batched by the sender (type kPages, payload empty).
    std::shared_ptr<wire::DeferredPages> pages;
    uint64_t size() const { return pages ? pages->bytes() : payload.size(); }
  };

  // ---- lifecycle.cc: the state machine ----
  void Post(Event e) EXCLUDES(mu_);
  void LifecycleLoop() EXCLUDES(mu_);
  // The one place protection ends. Lifecycle thread only.
  void Teardown(const Status& why, bool qemu_dead) EXCLUDES(mu_);
  // Switchover: drives it from the lifecycle thread (the final ACK, then
  // SWITCHOVER, then the backup's answer).
  void StepSwitchover() EXCLUDES(mu_);
  // The end of a switchover once SWITCHOVER went out: QEMU ended, the lease
  // given up, FAILOVER, switched-over. why: OK for an accepted one.
  // Lifecycle thread only.
  void EndSwitchover(const Status& why, bool qemu_dead) EXCLUDES(mu_);
  // phase for status; deadline: when the phase gives up (zero: never).
  void SetSwitchPhase(const char* phase, Nanos deadline_in = Nanos(0)) EXCLUDES(mu_);
  // GiveUp; schedules retries when the monitor is away (libvirt restarting).
  void ReleaseGuest() EXCLUDES(mu_);
  void RetryGiveUp() EXCLUDES(mu_);
  // Arbitration: retires the session (retrying while etcd is away) before
  // held output may go. False if it could not: the copy was fenced for good,
  // or the lifecycle is being destroyed.
  bool RetireSession(const Status& why) EXCLUDES(mu_);
  // A transition that is not into a final state (CAS on `from`).
  bool Advance(PrimaryState from, PrimaryState to) EXCLUDES(mu_);
  void EnterFinal(PrimaryState to) EXCLUDES(mu_);
  void SetError(const std::string& e) EXCLUDES(mu_);
  // The automatic interval: applies the controller's last change (QMP).
  // Lifecycle thread only.
  void ApplyAutoInterval() EXCLUDES(interval_mu_, mu_);
  std::string Tag() const { return "primary[" + opts_.domain + "]"; }
  Nanos SendBackstop() const {
    return opts_.send_timeout.count() > 0 ? opts_.send_timeout
                                          : std::max<Nanos>(std::chrono::seconds(30), 4 * opts_.heartbeat.timeout);
  }

  // ---- epoch_loop.cc: QEMU's checkpoints ----
  // Wall-clock seconds with microseconds, for the debug lines tests line up
  // with packet timestamps taken elsewhere on the host (barrier, ack).
  static std::string WallSeconds();
  void EpochLoop() EXCLUDES(mu_);
  Status RunInitialSync() EXCLUDES(mu_);
  Status RunCheckpoint(uint64_t epoch) EXCLUDES(mu_);
  bool QemuExited();

  // ---- sender.cc: the send queue, the link's two directions ----
  // Blocks while the queue holds more than the bound (initial-copy flow control).
  void Enqueue(OutFrame f) EXCLUDES(mu_);
  void PushLocked(OutFrame f) REQUIRES(mu_);
  // Ends epoch `epoch` in the queue: DISK_SYNCED when due, then COMMIT.
  void PushCommitLocked(uint64_t epoch, wire::CommitInfo ci) REQUIRES(mu_);
  void OnDiskWrite(uint32_t disk, wire::DiskOp op, uint64_t offset, uint64_t length,
                   std::span<const uint8_t> data) EXCLUDES(mu_);
  void SenderLoop() EXCLUDES(mu_);
  Status SendFrame(OutFrame& f);
  Status SendPages(uint64_t epoch, std::string* payload);
  void AckLoop() EXCLUDES(mu_);
  void OnAck(uint64_t e) EXCLUDES(mu_);
  void HeartbeatLoop() EXCLUDES(mu_);

  const LifecycleOptions opts_;
  const Clock& clock_;
  HeartbeatMonitor hb_;

  // Set by Attach before the worker threads start, read-only afterwards
  // (the lifecycle thread waits for Attach before it handles events).
  std::unique_ptr<wire::Link> link_;
  std::unique_ptr<CheckpointStream> source_;
  std::unique_ptr<DiskMirror> disks_;
  QemuMonitor* monitor_ = nullptr;
  std::function<StatusOr<std::unique_ptr<OutputBuffer>>()> make_netbuf_;
  std::function<bool()> qemu_running_;
  std::function<Status()> end_qemu_;
  std::function<Status()> forget_qemu_;
  std::function<bool()> monitor_connected_;
  DomainLease* lease_ = nullptr;
  // Made by the epoch thread while the guest is paused at the end of the
  // initial copy; others read netbuf_.
  std::unique_ptr<OutputBuffer> netbuf_owner_;
  std::atomic<OutputBuffer*> netbuf_{nullptr};
  // Delta resync (epoch thread only, set by Attach), and what the status
  // says about the initial copy.
  std::unique_ptr<wire::DeltaFilter> delta_;
  // Compression "xor-lz4": the sender thread's page versions (null otherwise).
  std::unique_ptr<PageVersionCache> xor_cache_;
  // The sender thread's kept buffers for compressed batches: one batch and
  // its LZ4 block, reused so that no batch pays a fresh 4 MiB allocation and
  // its zero fill (wire::CompressBatch).
  std::string batch_scratch_, lz4_scratch_;
  std::atomic<bool> delta_offered_{false};
  std::atomic<uint64_t> initial_sent_pages_{0}, initial_kept_pages_{0}, initial_wire_bytes_{0};

  // Set by Attach once the fields above are: monitor events (which may
  // arrive before Attach returns) read disks_ only then.
  std::atomic<bool> deps_ready_{false};
  std::atomic<PrimaryState> state_{PrimaryState::kStarting};
  // Set (under mu_, so waits see it) when protection starts ending.
  std::atomic<bool> stopping_{false};
  std::atomic<bool> qemu_dead_{false};
  // QEMU reported a SHUTDOWN the host asked for (data.guest false): it exits next.
  std::atomic<bool> host_shutdown_{false};
  std::atomic<int> interval_ms_;
  // Serializes setting QEMU's interval (tune, the automatic interval) so
  // that the last mode chosen also sets the last value.
  Mutex interval_mu_ ACQUIRED_BEFORE(mu_);

  // Switchover. requested: the epoch loop makes its next checkpoint the
  // final one. told: SWITCHOVER went out (or may have): our guest never
  // resumes. accepted/refused: the backup's answer (ack reader).
  std::atomic<bool> switch_requested_{false};
  std::atomic<int64_t> final_epoch_{-1};
  std::atomic<int64_t> released_epoch_{-1};  // output released through this epoch (ack reader)
  std::atomic<bool> switch_told_{false};
  std::atomic<bool> switch_accepted_{false};
  std::atomic<bool> switch_refused_{false};

  mutable Mutex mu_;
  CondVar cv_;     // queue, acks, stopping_, qemu_dead_
  CondVar ev_cv_;  // events_, attaching_, destroy_, ended_
  std::deque<Event> events_ GUARDED_BY(mu_);
  bool attaching_ GUARDED_BY(mu_) = false;
  bool attached_ GUARDED_BY(mu_) = false;
  bool destroy_ GUARDED_BY(mu_) = false;
  bool ended_ GUARDED_BY(mu_) = false;  // Teardown finished
  // GiveUp failed with Unavailable: retried while this is set.
  bool give_up_pending_ GUARDED_BY(mu_) = false;
  TimePoint give_up_deadline_ GUARDED_BY(mu_);
  std::string error_ GUARDED_BY(mu_);
  // The switchover's progress, for status: phase ("" before any).
  std::string switch_phase_ GUARDED_BY(mu_);
  TimePoint switch_started_ GUARDED_BY(mu_);
  TimePoint switch_deadline_ GUARDED_BY(mu_);  // for the current phase
  int64_t switch_took_ms_ GUARDED_BY(mu_) = -1;
  std::string switch_result_ GUARDED_BY(mu_);
  bool switch_kick_ GUARDED_BY(mu_) = false;  // wakes the lifecycle thread for StepSwitchover
  Status switch_status_ GUARDED_BY(mu_);  // how the switchover ended
  wire::SwitchoverMsg switch_msg_ GUARDED_BY(mu_);
  std::string resync_note_ GUARDED_BY(mu_);  // why the initial copy was full, or what the delta kept

  std::deque<OutFrame> queue_ GUARDED_BY(mu_);
  uint64_t queued_bytes_ GUARDED_BY(mu_) = 0;
  uint64_t last_staged_epoch_ GUARDED_BY(mu_) = 0;
  uint64_t disk_epoch_ GUARDED_BY(mu_) = 0;    // the epoch disk writes belong to
  uint64_t disk_records_ GUARDED_BY(mu_) = 0;  // kDisk frames of disk_epoch_
  uint64_t disk_bytes_ GUARDED_BY(mu_) = 0;    // their payload bytes
  int64_t disk_synced_epoch_ GUARDED_BY(mu_) = -1;  // DISK_SYNCED sent with this epoch
  int64_t last_acked_epoch_ GUARDED_BY(mu_) = -1;
  std::deque<std::pair<uint64_t, uint64_t>> unacked_ GUARDED_BY(mu_);  // (epoch, bytes)
  uint64_t unacked_bytes_ GUARDED_BY(mu_) = 0;
  std::deque<std::pair<uint64_t, TimePoint>> loaded_at_ GUARDED_BY(mu_);
  size_t last_epoch_pages_ = 0;  // epoch thread only
  // The automatic interval (null: fixed), fed by OnAck; a change it wants
  // waits in pending_interval_ (0: none) for the lifecycle thread.
  std::unique_ptr<IntervalController> interval_auto_ GUARDED_BY(mu_);
  int pending_interval_ GUARDED_BY(mu_) = 0;
  // When protection began: checkpoints staged before (queued behind the
  // initial copy, their acks late for that reason) teach it nothing.
  TimePoint protected_since_ GUARDED_BY(mu_) = TimePoint::max();
  bool interval_kick_ GUARDED_BY(mu_) = false;  // wakes the lifecycle thread for it
  std::string interval_note_ GUARDED_BY(mu_);   // fixed mode: who set it; auto: a failed change
  std::atomic<uint64_t> interval_changes_{0};   // applied by the automatic interval
  std::atomic<double> last_pause_ms_{0};        // the last checkpoint's pause (STOP -> RESUME)

  // Initial sync progress.
  std::atomic<uint64_t> sync_total_bytes_{0};
  std::atomic<uint64_t> sync_done_bytes_{0};

  // Metrics (each internally synchronized).
  SampleWindow pause_ms_;     // from QMP STOP/RESUME timestamps
  SampleWindow ack_ms_;       // LOADED -> ACK
  SampleWindow stage_ms_;     // REPLY written -> LOADED written: remus's own part of the pause
  SampleWindow dirty_pages_;  // pages per epoch
  SampleWindow epoch_bytes_;  // bytes staged per epoch (pages + device state + disk), before compression
  RateMeter checkpoints_;
  Histogram pause_hist_{Histogram::LatencySeconds()};  // seconds
  Histogram ack_hist_{Histogram::LatencySeconds()};    // seconds
  Histogram dirty_hist_{Histogram::PageCounts()};      // pages per epoch
  std::atomic<int64_t> stop_ts_us_{-1};
  std::atomic<uint64_t> checkpoints_total_{0};
  std::atomic<uint64_t> dirty_pages_total_{0};
  std::atomic<uint64_t> epoch_bytes_total_{0};
  // Checkpoints' (not the initial copy's) PAGES payloads before and after
  // LZ4, for the compression ratio `remusctl estimate` uses.
  std::atomic<uint64_t> ckpt_page_bytes_raw_{0}, ckpt_page_bytes_wire_{0};
  std::atomic<uint64_t> backpressure_waits_{0};
  std::atomic<uint64_t> releases_deferred_{0};  // ACKs whose output waited for a valid lease

  std::thread epoch_thread_, sender_thread_, ack_thread_, hb_thread_;
  std::thread lifecycle_thread_;  // last: started when everything above exists
};

}  // namespace remus
