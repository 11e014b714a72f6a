// The ingest of one protection session on the backup: frames from the
// primary -> staging -> commit -> ack queue, with the session's heartbeat and
// ack threads. What outlives the session (the stores, the lifecycle) belongs
// to the domain, reached through SessionHost.
//
// Threads: Run executes on the caller's thread (the domain's Serve) and
// starts an ack thread and a heartbeat thread that it joins before it
// returns. The ack and heartbeat threads wait on a lock of their own
// (sess_mu_), so store I/O never delays a heartbeat or an ACK: the primary
// would take that for a dead backup. Everything else in a Session is touched
// by Run's thread only.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/stats.h"
#include "common/thread_annotations.h"
#include "heartbeat/heartbeat.h"
#include "replicator/backup/page_store.h"
#include "replicator/link/messages.h"
#include "replicator/link/wire.h"

namespace remus {

class DiskReplicaSet;

// How a session ended.
enum class SessionEnd {
  kLost,       // link closed or silent: the primary may be dead
  kFailover,   // the primary said FAILOVER
  kEnded,      // GOODBYE, or an ERROR either way: the primary lives
  kPromoting,  // a promotion on this backup ended it
  kSwitchover, // a switchover was accepted and the primary said its QEMU ended (FAILOVER)
};

struct SessionOutcome {
  SessionEnd end = SessionEnd::kLost;
  std::string why;
};

// What a session hands to its domain. Called on the session's thread.
class SessionHost {
 public:
  virtual ~SessionHost() = default;
  // CONFIG was accepted: the domain keeps it and retires its checkpoint.
  virtual Status AcceptConfig(wire::ConfigMsg config) = 0;
  // SYNC_BEGIN: a fresh store for this session (and its disk set, if the
  // CONFIG named disks). The store stays the domain's; valid until the
  // session ends.
  struct SyncTarget {
    PageStore* store = nullptr;
    std::shared_ptr<DiskReplicaSet> disks;
    // The image offered for a delta resync (ResyncBase), if one was; KEEP
    // copies its pages. Valid until the session ends.
    const PageStore* base = nullptr;
  };
  virtual StatusOr<SyncTarget> BeginSync(const wire::SyncBeginMsg& begin) = 0;
  // COMMIT 0: the session's store becomes the committed one.
  virtual Status CommitInitial(std::string_view device_blob, uint64_t page_count) = 0;
  // COMMIT N >= 1 into the committed store. The batches stay in `staging`.
  virtual Status CommitCheckpoint(uint64_t epoch, Staging& staging) = 0;
  // The committed version of a page (kPageSize bytes, valid until the next
  // commit), against which an XOR record ("xor-lz4") is resolved. An error
  // for a page outside the committed store's blocks, or before COMMIT 0.
  virtual StatusOr<const uint8_t*> CommittedPage(uint32_t block, uint64_t offset) = 0;
  // The disks' background copy is committed as of `epoch`.
  virtual Status DisksSynced(int64_t epoch) = 0;
  // True once a promotion on this backup ended the session.
  virtual bool Promoting() = 0;
  // SWITCHOVER(epoch): the primary's guest stays paused at its final
  // checkpoint `epoch`. OK: accepted (the domain is switching-over and will
  // promote from `epoch`); an error: refused (the session ends with ERROR).
  virtual Status AcceptSwitchover(uint64_t epoch, const wire::SwitchoverMsg& msg) = 0;
  // Delta resync: the image this domain can offer (a retired or kept
  // committed store of an earlier session; never the restorable one), or
  // nullptr with *why saying why not. Called after AcceptConfig. The store
  // stays valid and unchanged until the session ends.
  virtual const PageStore* ResyncBase(std::string* why) = 0;
  // The offered image proved unusable (a digest mismatch, a bad KEEP): it is
  // removed, so the next protection makes a full copy.
  virtual void DropResyncBase(const std::string& why) = 0;
};

// Counters that outlive sessions (status and metrics). Written by the
// session thread, read by anyone.
struct IngestStats {
  std::atomic<uint64_t> sync_total{0}, sync_done{0};
  std::atomic<int64_t> last_committed{-1};
  SampleWindow apply_ms;
  std::atomic<double> apply_mb_s{0};
  Histogram apply_hist{Histogram::LatencySeconds()};  // seconds per commit
  std::atomic<uint64_t> checkpoints_total{0};         // committed epochs after the initial copy
  // The last initial copy (delta resync): pages the backup offered, pages
  // the primary kept from that image instead of sending them, pages it sent
  // (data and zero records); verified: -1 not a delta (or not finished),
  // 1 the digest matched, 0 it did not.
  std::atomic<uint64_t> initial_offered_pages{0}, initial_kept_pages{0}, initial_received_pages{0};
  std::atomic<int> initial_verified{-1};
};

struct SessionOptions {
  std::string domain;
  std::string state_dir;                // for the "disk full" fix in messages
  HeartbeatConfig heartbeat;            // until the primary's CONFIG names its own
  int ack_delay_ms = 0;
  uint64_t max_staged_bytes = 2ull << 30;
  std::function<void(uint64_t epoch)> before_commit_for_test;
  std::string fault;  // BackupOptions::fault
};

class Session {
 public:
  // host, stats and disk_mu outlive the session. disk_mu is held around
  // every use of a DiskReplicaSet.
  Session(SessionOptions opts, const Clock& clock, SessionHost* host, IngestStats* stats, Mutex* disk_mu);
  ~Session();

  // Receives until the link fails or a frame ends the session. When the
  // session ends because this backup refused the primary's input, it sends
  // ERROR first (and reads on briefly, so the ERROR is not lost to a reset).
  // The link is shut down on return; a partial checkpoint is discarded.
  SessionOutcome Run(wire::Link& link);

  // After Run: the heartbeat settings in force, and how long the primary has
  // been silent.
  HeartbeatConfig heartbeat() const { return hb_.config(); }
  Nanos SilentFor() const { return hb_.SinceLastReceived(); }

 private:
  Status HandleFrame(wire::Frame& f, SessionOutcome* outcome);
  Status HandleConfig(const std::string& payload);
  Status HandleSyncBegin(const std::string& payload);
  // Delta resync: RESYNC_OFFER and RESYNC_HASHES to the primary.
  Status SendOffer();
  Status HandleKeep(const wire::Frame& f);
  // COMMIT 0 of a delta resync: the new image against the primary's digest.
  Status VerifyInitial(const wire::CommitInfo& ci);
  Status CommitEpoch(uint64_t epoch, const std::string& payload);
  Status HandleSwitchover(uint64_t epoch, const std::string& payload);
  void AckLoop(wire::Link* link) EXCLUDES(sess_mu_);
  void HeartbeatLoop(wire::Link* link) EXCLUDES(sess_mu_);
  void Discard();
  Status DiskError(const Status& s, uint64_t epoch) const;
  std::string TakeSpareBuffer();
  void RecycleBuffer(std::string buf);

  const SessionOptions opts_;
  const Clock& clock_;
  SessionHost* const host_;
  IngestStats* const stats_;
  Mutex& disk_mu_;
  const std::string tag_;
  HeartbeatMonitor hb_;

  Mutex sess_mu_;
  CondVar sess_cv_;
  std::deque<std::pair<uint64_t, TimePoint>> acks_ GUARDED_BY(sess_mu_);
  bool over_ GUARDED_BY(sess_mu_) = false;

  // Run's thread only.
  wire::Link* link_ = nullptr;  // during Run
  bool config_seen_ = false;
  bool xor_records_ = false;  // CONFIG said page_delta "xor"
  bool offered_ = false;             // a RESYNC_OFFER with blocks went out
  const PageStore* base_ = nullptr;  // the offered image, from SYNC_BEGIN on
  std::vector<long> base_block_;     // per SYNC_BEGIN block: base_'s block of the same layout, or -1
  uint64_t kept_pages_ = 0;          // pages KEEP copied in this initial copy
  PageStore* syncing_ = nullptr;  // the initial copy's store, until COMMIT 0
  bool committed_initial_ = false;
  Staging staging_;
  std::string device_buf_;
  uint64_t staged_page_bytes_ = 0;
  uint64_t staged_disk_records_ = 0;
  std::shared_ptr<DiskReplicaSet> disks_;  // used under disk_mu_
  int64_t disk_synced_ = -1;               // DISK_SYNCED of this session
  bool disks_synced_reported_ = false;
  // The switchover this session accepted (its final epoch), and whether its
  // SWITCHOVER answer is still to be sent.
  int64_t switchover_epoch_ = -1;
  bool switchover_reply_due_ = false;
  // Receive buffers handed back by committed page batches: a checkpoint's
  // frames are read into the previous ones' memory (no fresh 4 MiB
  // allocation, page faults and zero-fill per frame).
  std::vector<std::string> spare_buffers_;
  uint64_t spare_bytes_ = 0;
};

}  // namespace remus
