// One protected domain on the backup: its sessions (one connected primary at
// a time), its committed checkpoint, its promotion, its recovery after a
// restart of remusd. The lifecycle is the state machine of domain_state.h;
// every change goes through NextState under mu_.
//
// Per domain, under <state-dir>/domains/<domain>/:
//   store-<n>/         a PageStore, one per protection session, with the
//                      session's config.json (QEMU argv, versions, a libvirt
//                      domain's XML), configuration.bin and disks.json
//   current            the name of the store holding this session's committed
//                      image; removed (durably) as soon as a new session's
//                      CONFIG is accepted: the guest ran on since, so the old
//                      image is stale and never restored again
//   retired            why there is no `current` (a re-sync that never committed)
//   base               the name of a retired store kept as the delta resync's
//                      (after a promotion, the store `current` names is the base)
//                      base: never restorable, only offered (hashed) to the
//                      next session's primary and read for the pages it keeps;
//                      removed when that session's initial copy commits
//   disks/             the mirrored disk images
//   run/               the promoted QEMU's qmp.sock, qemu.pid, serial.log, qemu.log
//                      (libvirt: domain.xml as restored, serial.log, the FIFO)
//   promoting.json     written durably before the restored QEMU starts
//   promoted.json      after a promotion: its pid, epoch, reason, and its QMP
//                      socket or libvirt URI and domain
//
// Rules (see docs/architecture.md):
// - The backup promotes by itself only from primary-lost (the link broke or
//   went silent, or FAILOVER) and only for the session that lost its primary:
//   a newer session cancels the pending promotion (generation_).
// - After GOODBYE, an ERROR from the primary, or its own ERROR, the primary
//   is known to live: the state is unprotected and nothing promotes by itself.
// - A promotion first ends the live session and waits until its ingest
//   stopped, then reads the store and the disks.
// - Only the current session's committed checkpoint is restorable.
//
// Threads: Serve runs a session on the caller's thread (the server's
// connection thread) plus an ack thread and a heartbeat thread it joins
// before returning. Promote, StatusJson and Recover may be called from any
// thread. The launcher, arbiter and clock outlive the domain.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/stats.h"
#include "common/thread_annotations.h"
#include "heartbeat/heartbeat.h"
#include "heartbeat/promotion.h"
#include "replicator/backup/domain_state.h"
#include "replicator/backup/page_store.h"
#include "replicator/backup/residency.h"
#include "replicator/backup/session.h"
#include "replicator/backup/restore.h"
#include "replicator/link/messages.h"
#include "replicator/link/tls.h"
#include "replicator/link/wire.h"
#include "replicator/qemu/argv_policy.h"
#include "replicator/qemu/launcher.h"
#include "replicator/qemu/version.h"

namespace remus {

class DiskReplicaSet;
class FileIo;

struct BackupOptions {
  std::string state_dir;
  // How links from primaries are authenticated and encrypted (tls.h).
  std::shared_ptr<const wire::TlsContext> tls;
  HeartbeatConfig heartbeat;        // used until the primary's CONFIG names its own
  int ack_delay_ms = 0;             // test and benchmark knob: hold each ACK this long
  // The QEMU restored guests run (libvirt: <emulator>). Empty: the binary of
  // the primary's name (qemu-system-ARCH only) from this host's PATH; the
  // primary's path is never run (argv_policy.h).
  std::string qemu_binary;
  // What this backup accepts from a primary beyond the built-in allow-lists
  // (peer_policy.h): checked when CONFIG arrives and before a promotion.
  PeerPolicy peer_policy;
  // Where libvirt domains are restored, and where that libvirt keeps its
  // <domain>.pid files.
  std::string libvirt_uri = "qemu:///system";
  std::string libvirt_pid_dir = "/run/libvirt/qemu";
  bool auto_promote = true;         // promote when the primary is lost
  // A refused arbitration (the primary still holds its lease) is asked again
  // this often while the primary stays lost: one failing etcd transaction
  // per retry, and at most this much added to a failover after a host death.
  Nanos arbitration_retry = std::chrono::milliseconds(100);
  int handshake_timeout_ms = 5000;
  // Connections served at once (authenticated or not), and of those, how many
  // may be in the handshake. More are closed at once, with a log line.
  int max_connections = 64;
  int max_handshakes = 8;
  // A checkpoint staging more than this in memory on the backup (page
  // batches + device state) is refused with ResourceExhausted.
  uint64_t max_staged_bytes = 2ull << 30;
  // How long a restored QEMU may take to open its monitor.
  int qemu_start_timeout_ms = 5000;
  // Restore by mapping (promoter.h): a restored QEMU's main RAM is the page
  // store's own file. False (remusd --restore stream): every page is
  // streamed, as before issue 16.
  bool restore_by_mapping = true;
  // A hot domain (residency.h) is admitted only while MemAvailable covers its
  // guest RAM plus this much.
  uint64_t hot_headroom_bytes = 512ull << 20;
  // Where admission reads the host's memory (tests inject).
  std::string meminfo_path = "/proc/meminfo";
  // Told every state change of a domain (remusd's history), with what the
  // sentence needs: {"primary","epoch","token","error"}. Called with the
  // domain's lock held: it must not call back into the backup.
  std::function<void(const std::string& domain, const std::string& state, const nlohmann::json& detail)> on_state;
  // Test hook: called by the session thread before it commits an epoch (after
  // its disk writes are durable). Never set in production.
  std::function<void(uint64_t epoch)> before_commit_for_test;
  // Test-only fault injection (remusd --fault): "switchover-no-answer"
  // accepts a switchover but never answers it (the primary then waits in
  // its handover phase, for tests to break the link there).
  std::string fault;
  // After a planned switchover promoted a domain whose old primary asked to
  // become its backup (SWITCHOVER's reprotect_to): protect it back there.
  // Called on the session's thread; must not block for long. Null: never.
  // detail: as on_state's for failed-over, with the switchover's
  // reprotect_to (and its interval and netbuf, when it names them).
  std::function<void(const std::string& domain, const nlohmann::json& detail)> on_switched_over;
  // Which QEMU release a binary is (the version rule, replicator/qemu/version.h).
  // Null: run it with -version (qemu::QemuBinaryVersion). Unit tests inject.
  std::function<StatusOr<qemu::QemuRelease>(const std::string& binary)> qemu_release;
};

// A domain name remus accepts (it names a directory in the state dir):
// 1-64 letters, digits, '.', '-' or '_', not starting with '.' or '-'.
bool ValidDomainName(std::string_view d);

class BackupDomain final : private SessionHost {
 public:
  BackupDomain(std::string name, const BackupOptions& opts, const Clock& clock, Arbiter* arbiter,
               ProcessLauncher* launcher);
  ~BackupDomain();
  BackupDomain(const BackupDomain&) = delete;
  BackupDomain& operator=(const BackupDomain&) = delete;

  // Runs one session on an authenticated link until it ends, then (primary
  // lost, auto_promote) waits out the heartbeat timeout and promotes unless a
  // newer session started meanwhile.
  void Serve(std::unique_ptr<wire::Link> link) EXCLUDES(mu_);
  // After a restart of remusd: reopens what the state dir holds. NotFound
  // when there is nothing. Never promotes by itself: the primary may be alive.
  // Never throws: a corrupt file is an error naming it.
  Status Recover() EXCLUDES(mu_);
  // Operator-requested promotion (`remusctl failover`): ends a live session
  // first. FailedPrecondition when there is nothing to restore, or a
  // promotion runs or ran.
  Status Promote(const std::string& reason) EXCLUDES(mu_) { return PromoteImpl(reason, std::nullopt, std::nullopt); }
  // Stops pending automatic promotions (the server is shutting down).
  void Stop() EXCLUDES(mu_);
  nlohmann::json StatusJson() const EXCLUDES(mu_);
  DomainState state() const EXCLUDES(mu_);
  // failed-over whose guest no longer runs here -> ended (status and a new
  // session call it: nothing watches a promoted QEMU between them).
  void NoticeGuestGone() EXCLUDES(mu_);

  // The guest promoted here, while it runs here: how this host's remusd
  // reaches it to protect it again (re-protection after a failover).
  struct PromotedGuest {
    int pid = -1;
    std::string qmp_socket;  // remusd's own monitor (QMP mode)
    std::string libvirt_uri, libvirt_domain;  // libvirt mode
  };
  std::optional<PromotedGuest> RunningGuest() const EXCLUDES(mu_);

 private:
  // What a promotion reads, taken under mu_ once the session stopped. The
  // pointers stay valid while the state is promoting: only a session start
  // (refused then) or Recover replace them.
  struct PromoteInput {
    const PageStore* store = nullptr;
    std::string configuration;
    wire::ConfigMsg config;
    std::shared_ptr<DiskReplicaSet> disks;
    uint64_t epoch = 0;
  };

  // Applies `e` to state_; false (and a log line) when not allowed.
  bool Transition(DomainEvent e) REQUIRES(mu_);
  // generation: an automatic promotion of that session; grant: arbitration
  // already won (automatic promotions win it first, while still standby).
  Status PromoteImpl(const std::string& reason, std::optional<uint64_t> generation,
                     std::optional<PromotionGrant> grant) EXCLUDES(mu_);
  // Asks the arbiter until it grants, refuses for good, or the primary's
  // loss is over (a new session, remusd stopping). Automatic promotions only.
  std::optional<PromotionGrant> Arbitrate(uint64_t generation, const std::string& reason) EXCLUDES(mu_);
  // FailedPrecondition unless the current session has a restorable checkpoint.
  Status Restorable() const REQUIRES(mu_);
  // Restores the guest through promoter.h and records what runs.
  Status DoPromote(const PromoteInput& in) EXCLUDES(mu_);
  // The QEMU a restore of `config` runs: --qemu, else <emulator> (libvirt)
  // or argv[0]'s name from this host's PATH. Empty: libvirt's default.
  StatusOr<std::string> QemuToRun(const wire::ConfigMsg& config) const;
  // The version rule between the primary's QEMU and QemuToRun's.
  Status CheckQemuRelease(const wire::ConfigMsg& config) const;
  void AutoPromoteAfter(uint64_t generation, Nanos wait, const std::string& reason) EXCLUDES(mu_);

  // SessionHost: what the live session hands over (session thread).
  Status AcceptConfig(wire::ConfigMsg config) override EXCLUDES(mu_);
  StatusOr<SyncTarget> BeginSync(const wire::SyncBeginMsg& begin) override EXCLUDES(mu_);
  Status CommitInitial(std::string_view device_blob, uint64_t page_count) override EXCLUDES(mu_);
  Status CommitCheckpoint(uint64_t epoch, Staging& staging) override EXCLUDES(mu_);
  StatusOr<const uint8_t*> CommittedPage(uint32_t block, uint64_t offset) override EXCLUDES(mu_);
  Status DisksSynced(int64_t epoch) override EXCLUDES(mu_);
  bool Promoting() override EXCLUDES(mu_);
  Status AcceptSwitchover(uint64_t epoch, const wire::SwitchoverMsg& msg) override EXCLUDES(mu_);
  // An automatic promotion may go ahead in this state: the primary was lost,
  // or it handed over (switching-over).
  bool AwaitingPromotion() const REQUIRES(mu_) {
    return state_ == DomainState::kPrimaryLost || state_ == DomainState::kSwitchingOver;
  }
  // The promoted guest's pid while it runs; -1 when it is gone.
  int LiveGuestPid() const REQUIRES(mu_);
  void NoticeGuestGoneLocked() REQUIRES(mu_);
  // Whether a new session may start now: OK, or why not (ALREADY_EXISTS
  // while another session runs).
  Status AdmissionLocked() REQUIRES(mu_);
  const PageStore* ResyncBase(std::string* why) override EXCLUDES(mu_);
  void DropResyncBase(const std::string& why) override EXCLUDES(mu_);
  // Removes the base store and its `base` file.
  void RemoveBase(const std::string& why) REQUIRES(mu_);
  // After a restart: reopens the store `file` names (`base`; after a
  // promotion, `current`: the store it was made from) as the resync base,
  // unless it is `current`'s store, kept as the checkpoint. Its name, or ""
  // when there is none.
  std::string RecoverBase(const std::string& current, const char* file = "base") EXCLUDES(mu_);
  // Removes `current` durably: the committed image is stale from now on.
  Status RetireCheckpoint(const std::string& why) REQUIRES(mu_);

  // Mirrored disks (diskmirror/disk_replica.h).
  StatusOr<std::unique_ptr<DiskReplicaSet>> OpenDisks(const std::string& store_dir,
                                                      std::optional<uint64_t> discard_after);
  FileIo* Io();

  const std::string name_;
  const BackupOptions& opts_;
  const Clock& clock_;
  Arbiter* const arbiter_;
  ProcessLauncher* const launcher_;
  const std::string dir_;
  const std::string tag_;

  // The domain: lifecycle, stores, config, the promoted guest.
  mutable Mutex mu_;
  CondVar cv_;  // session_running_, generation_, stopping_ changed
  DomainState state_ GUARDED_BY(mu_) = DomainState::kWaiting;
  std::atomic<int> state_view_{0};    // state_, readable without mu_ (metrics)
  uint64_t generation_ GUARDED_BY(mu_) = 0;     // sessions started; a new one cancels older auto promotions
  bool session_running_ GUARDED_BY(mu_) = false;  // a session's ingest has not stopped yet
  bool stopping_ GUARDED_BY(mu_) = false;
  wire::Link* link_ GUARDED_BY(mu_) = nullptr;  // the live session's link
  std::string error_ GUARDED_BY(mu_);
  std::string no_checkpoint_reason_ GUARDED_BY(mu_);  // why committed_ is empty
  std::string primary_ GUARDED_BY(mu_);
  wire::ConfigMsg config_ GUARDED_BY(mu_);            // of the committed store
  wire::ConfigMsg session_config_ GUARDED_BY(mu_);    // the live session's CONFIG
  std::string configuration_section_ GUARDED_BY(mu_);  // of the session's store
  std::string committed_configuration_ GUARDED_BY(mu_);
  std::unique_ptr<PageStore> committed_ GUARDED_BY(mu_);
  std::unique_ptr<PageStore> syncing_ GUARDED_BY(mu_);                // the live session's, until COMMIT 0
  // Residency "hot": the committed store's (and the syncing store's) files
  // locked in memory (residency.h). Null for "paged".
  std::unique_ptr<ResidencyPin> pin_ GUARDED_BY(mu_);
  std::unique_ptr<ResidencyPin> syncing_pin_ GUARDED_BY(mu_);
  std::unique_ptr<PageStore> base_ GUARDED_BY(mu_);  // the delta resync's base (`base`), never restorable
  std::shared_ptr<DiskReplicaSet> syncing_disks_ GUARDED_BY(mu_);  // its disks, likewise
  int session_seq_ GUARDED_BY(mu_) = 0;
  std::shared_ptr<DiskReplicaSet> committed_disks_ GUARDED_BY(mu_);
  int64_t disk_synced_epoch_ GUARDED_BY(mu_) = -1;  // of the committed store
  uint64_t bytes_received_done_ GUARDED_BY(mu_) = 0;
  // The promotion: why it began, how it failed, what runs.
  std::string promote_reason_ GUARDED_BY(mu_);
  std::string promote_error_ GUARDED_BY(mu_);
  // The last promotion's restore: "mapped"/"streamed", why streamed, bytes.
  nlohmann::json restore_result_ GUARDED_BY(mu_);
  bool promotion_tried_ GUARDED_BY(mu_) = false;
  int64_t switchover_epoch_ GUARDED_BY(mu_) = -1;  // the accepted switchover's final epoch
  // Recover: a switchover accepted before a restart is promoted on this thread
  // (after the heartbeat timeout); joined by the destructor.
  std::thread recovered_promotion_;
  wire::SwitchoverMsg switchover_msg_ GUARDED_BY(mu_);
  // Arbitration: the fencing token this node won (0: none), and why an
  // automatic promotion is waiting or was refused.
  int64_t promotion_token_ GUARDED_BY(mu_) = 0;
  std::string arbitration_ GUARDED_BY(mu_);
  int qemu_pid_ GUARDED_BY(mu_) = -1;
  bool qemu_ours_ GUARDED_BY(mu_) = false;  // spawned by launcher_ (not libvirt's, not recovered)
  std::string qmp_socket_ GUARDED_BY(mu_);         // the operators' monitor of the promoted guest
  std::string remus_qmp_socket_ GUARDED_BY(mu_);   // remusd's own (argv_rewrite.h)
  std::string libvirt_uri_ GUARDED_BY(mu_);
  std::string libvirt_domain_ GUARDED_BY(mu_);

  // Every use of a DiskReplicaSet (not thread-safe) holds disk_mu_.
  Mutex disk_mu_ ACQUIRED_AFTER(mu_);
  std::unique_ptr<FileIo> io_ GUARDED_BY(disk_mu_);

  // Counters of all sessions, for status and metrics.
  IngestStats stats_;
  std::atomic<uint64_t> failovers_total_{0};  // successful promotions
  std::atomic<int64_t> failover_ms_{-1};
  // What a running promotion is doing: a string literal, or nullptr.
  std::atomic<const char*> promote_phase_{nullptr};
  RestoreProgress restore_progress_;
};

}  // namespace remus
