#include "replicator/backup/session.h"

#include <thread>

#include "common/log.h"
#include "diskmirror/disk_replica.h"
#include "replicator/backup/records.h"
#include "replicator/backup/store_hash.h"
#include "replicator/link/page_batch.h"
#include "replicator/link/resync.h"

namespace remus {

using wire::MsgType;

namespace {
// As much as the primary's read-buffer pool (CheckpointSource): a checkpoint
// of up to ~64 batches is received without allocating.
constexpr uint64_t kSpareBufferBytes = 256ull << 20;
// Smaller buffers (control frames, a moved-from payload) are not worth keeping.
constexpr size_t kMinSpareBuffer = 1 << 20;
}  // namespace

Session::Session(SessionOptions opts, const Clock& clock, SessionHost* host, IngestStats* stats, Mutex* disk_mu)
    : opts_(std::move(opts)), clock_(clock), host_(host), stats_(stats), disk_mu_(*disk_mu),
      tag_("backup[" + opts_.domain + "]"), hb_(clock, opts_.heartbeat) {}

Session::~Session() = default;

SessionOutcome Session::Run(wire::Link& link) {
  wire::Link* l = &link;
  link_ = l;
  std::thread acker([this, l] { AckLoop(l); });
  std::thread beat([this, l] { HeartbeatLoop(l); });
  SessionOutcome out;
  Status s;           // why the session ends
  bool ours = false;  // s is our refusal of the primary's input, not a broken link
  for (;;) {
    auto f = link.Recv(TakeSpareBuffer());
    if (!f.ok()) {
      s = f.status();
      // A corrupt frame (bad checksum or length) arrived over a live link.
      ours = s.code() == Code::kDataLoss || s.code() == Code::kInvalidArgument;
      break;
    }
    hb_.Received();
    // Liveness is counted on receipt, and the time spent applying is ours:
    // the primary's frames wait in our socket meanwhile.
    hb_.SetBusy(true);
    s = HandleFrame(*f, &out);
    hb_.SetBusy(false);
    if (s.ok() && switchover_reply_due_) {
      // Accepted: tell the primary, which then ends its QEMU and says so
      // with FAILOVER. From here on this backup promotes whatever happens.
      switchover_reply_due_ = false;
      Status r = link.Send(MsgType::kSwitchover, static_cast<uint64_t>(switchover_epoch_), "");
      if (!r.ok()) LOG_WARN(tag_) << "answering SWITCHOVER: " << r.ToString() << "; promoting anyway";
    }
    RecycleBuffer(std::move(f->payload));  // kept unless HandleFrame took it
    if (!s.ok()) {
      ours = s.code() != Code::kAborted && s.code() != Code::kCancelled;
      break;
    }
  }
  {
    MutexLock g(sess_mu_);
    over_ = true;
    sess_cv_.NotifyAll();
  }
  if (host_->Promoting()) {
    out = {SessionEnd::kPromoting, "a promotion ended the session"};
  } else if (ours) {
    // Tell the primary why we stop acking; it drops to unprotected and its
    // guest runs on: from now on this backup must not promote by itself.
    // Then read on until it closes (bounded): closing with its frames unread
    // would reset the connection, and the ERROR could be lost with it. A
    // GOODBYE read meanwhile only confirms that the primary lives.
    LOG_ERROR(tag_) << "refusing the primary's stream: " << s.ToString();
    out = {SessionEnd::kEnded, "this backup refused the primary's stream and told it so (" + s.ToString() + ")"};
    if (link.Send(MsgType::kError, 0, wire::EncodeError(s)).ok()) {
      link.ShutdownWrite();
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      for (;;) {
        auto f = link.RecvUntil(deadline);
        if (!f.ok()) break;
        if (f->type == MsgType::kGoodbye) out.why += "; the primary answered GOODBYE";
      }
    }
  } else if (s.code() != Code::kAborted && s.code() != Code::kCancelled) {
    out = {SessionEnd::kLost, s.message()};
  }
  link.Shutdown();
  acker.join();
  beat.join();
  Discard();
  return out;
}

void Session::Discard() {
  staging_.Clear();        // a partial checkpoint is discarded
  spare_buffers_.clear();  // an idle domain holds no receive buffers
  spare_bytes_ = 0;
  device_buf_.clear();
  staged_page_bytes_ = 0;
  staged_disk_records_ = 0;
  if (disks_) {
    MutexLock dg(disk_mu_);
    Status d = disks_->DropUncommitted();
    if (!d.ok()) LOG_ERROR(tag_) << "dropping a partial checkpoint's disk writes: " << d.ToString();
    disks_.reset();
  }
}

void Session::HeartbeatLoop(wire::Link* link) {
  MutexLock l(sess_mu_);
  while (!over_) {
    sess_cv_.WaitFor(sess_mu_, std::min<Nanos>(hb_.NextCheckIn(), std::chrono::milliseconds(50)));
    if (over_) return;
    l.Unlock();
    if (hb_.PeerLost()) {
      LOG_WARN(tag_) << "primary silent for " << static_cast<int>(ToMillis(hb_.SinceLastReceived())) << " ms";
      link->Shutdown();
      l.Lock();
      return;
    }
    if (hb_.SendDue()) {
      hb_.Sent();
      (void)link->Send(MsgType::kHeartbeat, static_cast<uint64_t>(std::max<int64_t>(0, stats_->last_committed)), "");
    }
    l.Lock();
  }
}

void Session::AckLoop(wire::Link* link) {
  // ACKs go out from here so an --ack-delay-ms never slows down receiving.
  MutexLock l(sess_mu_);
  for (;;) {
    while (!over_ && acks_.empty()) sess_cv_.Wait(sess_mu_);
    if (over_) {
      acks_.clear();
      return;
    }
    auto [epoch, due] = acks_.front();
    if (clock_.Now() < due) {
      sess_cv_.WaitUntil(sess_mu_, std::chrono::steady_clock::time_point(due.time_since_epoch()));
      continue;
    }
    acks_.pop_front();
    l.Unlock();
    (void)link->Send(MsgType::kAck, epoch, "");
    l.Lock();
  }
}

Status Session::HandleFrame(wire::Frame& f, SessionOutcome* outcome) {
  if (switchover_epoch_ >= 0) {
    // After an accepted switchover only the primary's last words count.
    switch (f.type) {
      case MsgType::kFailover:
        *outcome = {SessionEnd::kSwitchover, "planned switchover: the primary ended its QEMU after checkpoint " +
                                                 std::to_string(switchover_epoch_)};
        LOG_INFO(tag_) << outcome->why;
        return Aborted("switchover");
      case MsgType::kGoodbye:
      case MsgType::kError:
      case MsgType::kHeartbeat:
        break;
      default:
        LOG_WARN(tag_) << "ignoring " << wire::MsgTypeName(f.type) << " after the switchover was accepted";
        return OkStatus();
    }
  }
  switch (f.type) {
    case MsgType::kSwitchover:
      return HandleSwitchover(f.epoch, f.payload);
    case MsgType::kHeartbeat:
    case MsgType::kProgress:
      return OkStatus();
    case MsgType::kConfig:
      return HandleConfig(f.payload);
    case MsgType::kSyncBegin:
      return HandleSyncBegin(f.payload);
    case MsgType::kPages: {
      if (f.flags & wire::kFlagLz4) {
        // Into a kept buffer (no fresh zero-filled 4 MiB per batch); the
        // compressed bytes' buffer goes back to the spares.
        std::string raw = TakeSpareBuffer();
        RETURN_IF_ERROR(wire::DecompressBatch(f.payload, wire::kMaxPayload, &raw));
        std::swap(f.payload, raw);
        RecycleBuffer(std::move(raw));
      }
      if (f.epoch == 0) {
        if (!syncing_) return FailedPrecondition("PAGES for the initial copy before SYNC_BEGIN");
        RETURN_IF_ERROR(wire::ForEachPageRecord(f.payload, [&](uint32_t b, uint64_t o, const uint8_t* d) {
          stats_->sync_done += wire::kPageSize;
          stats_->initial_received_pages++;
          return syncing_->ApplyPage(b, o, d);
        }));
        staged_page_bytes_ += f.payload.size();
        return OkStatus();
      }
      if (staging_.bytes() + device_buf_.size() + f.payload.size() > opts_.max_staged_bytes)
        return ResourceExhausted("domain " + opts_.domain + ": checkpoint " + std::to_string(f.epoch) +
                                 " stages more than " + std::to_string(opts_.max_staged_bytes >> 20) +
                                 " MiB in the backup's memory (its limit); lower the primary's max unacked bytes "
                                 "or raise the backup's limit, then protect again");
      if (xor_records_) {
        // Back to whole pages (in place, same size) before staging: the
        // staging and the store's commit, its redo copy included, see plain
        // records only. The versions XOR-ed against are committed here: the
        // primary XORs only against pages of earlier checkpoints.
        RETURN_IF_ERROR(wire::ResolveXorRecords(
            &f.payload, [&](uint32_t b, uint64_t o) { return host_->CommittedPage(b, o); }));
      }
      staged_page_bytes_ += f.payload.size();
      staging_.AddPageBatch(std::move(f.payload));
      return OkStatus();
    }
    case MsgType::kDisk: {
      if (!disks_) return FailedPrecondition("DISK for a domain without mirrored disks, or before SYNC_BEGIN");
      ASSIGN_OR_RETURN(wire::DiskRecord r, wire::DecodeDiskRecord(f.payload));
      staged_disk_records_++;
      MutexLock dg(disk_mu_);
      Status ds;
      switch (r.op) {
        case wire::DiskOp::kWrite:
          ds = disks_->Write(r.disk, f.epoch, r.offset,
                             std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(r.data.data()), r.data.size()));
          break;
        case wire::DiskOp::kZero: ds = disks_->Zero(r.disk, f.epoch, r.offset, r.length); break;
        case wire::DiskOp::kTrim: ds = disks_->Trim(r.disk, f.epoch, r.offset, r.length); break;
      }
      return DiskError(ds, f.epoch);
    }
    case MsgType::kKeep: {
      Status k = HandleKeep(f);
      if (!k.ok() && base_) {
        host_->DropResyncBase(k.message());
        base_ = nullptr;
      }
      return k;
    }
    case MsgType::kDiskSynced:
      if (!disks_) return FailedPrecondition("DISK_SYNCED for a domain without mirrored disks");
      disk_synced_ = static_cast<int64_t>(f.epoch);
      return OkStatus();
    case MsgType::kDevice:
      if (device_buf_.size() + f.payload.size() > qemu::kMaxDeviceState) return DataLoss("device state too large");
      if (f.epoch > 0 && staging_.bytes() + device_buf_.size() + f.payload.size() > opts_.max_staged_bytes)
        return ResourceExhausted("domain " + opts_.domain + ": checkpoint " + std::to_string(f.epoch) +
                                 " stages more than " + std::to_string(opts_.max_staged_bytes >> 20) +
                                 " MiB in the backup's memory (its limit)");
      device_buf_ += f.payload;
      return OkStatus();
    case MsgType::kCommit:
      return CommitEpoch(f.epoch, f.payload);
    case MsgType::kFailover: {
      std::string why = ParseReason(f.payload);
      std::string reason = "primary reports its guest lost";
      if (!why.empty()) reason += ": " + why;
      LOG_WARN(tag_) << reason;
      *outcome = {SessionEnd::kFailover, reason};
      return Aborted("primary lost");
    }
    case MsgType::kGoodbye: {
      std::string why = ParseReason(f.payload);
      std::string reason = "the primary ended protection (GOODBYE";
      if (!why.empty()) reason += ": " + why;
      *outcome = {SessionEnd::kEnded, reason + ")"};
      LOG_INFO(tag_) << outcome->why << "; not promoting";
      return Cancelled("goodbye");
    }
    case MsgType::kError: {
      Status e = wire::DecodeError(f.payload);
      *outcome = {SessionEnd::kEnded, "the primary gave up protection with an error (" + e.ToString() + ")"};
      return Cancelled("error from the primary");
    }
    default:
      return InvalidArgument("unexpected " + wire::MsgTypeName(f.type) + " from the primary");
  }
}

Status Session::HandleSwitchover(uint64_t epoch, const std::string& payload) {
  const std::string e = std::to_string(epoch);
  ASSIGN_OR_RETURN(wire::SwitchoverMsg msg, wire::DecodeSwitchover(payload));
  // The guest on the primary is paused at `epoch`: nothing of a later
  // checkpoint can be on its way, and `epoch` must be the one committed here.
  if (staging_.bytes() > 0 || !device_buf_.empty() || staged_page_bytes_ > 0 || staged_disk_records_ > 0)
    return FailedPrecondition("domain " + opts_.domain + ": SWITCHOVER at checkpoint " + e +
                              " while frames of a later checkpoint are staged here; refusing the switchover");
  if (stats_->last_committed != static_cast<int64_t>(epoch))
    return FailedPrecondition("domain " + opts_.domain + ": the primary names checkpoint " + e +
                              " as the final one, but this backup committed " +
                              std::to_string(stats_->last_committed.load()) + "; refusing the switchover");
  RETURN_IF_ERROR(host_->AcceptSwitchover(epoch, msg));
  switchover_epoch_ = static_cast<int64_t>(epoch);
  switchover_reply_due_ = opts_.fault != "switchover-no-answer";
  if (!switchover_reply_due_) LOG_WARN(tag_) << "fault injection: not answering SWITCHOVER " << e;
  LOG_INFO(tag_) << "switchover accepted at checkpoint " << e << "; promoting from it once the primary's QEMU ended";
  return OkStatus();
}

Status Session::HandleConfig(const std::string& payload) {
  if (config_seen_) return InvalidArgument("CONFIG sent twice in one session");
  ASSIGN_OR_RETURN(wire::ConfigMsg c, ParseConfigPayload(payload, opts_.domain));
  if (c.heartbeat_interval_ms > 0 && c.heartbeat_timeout_ms > c.heartbeat_interval_ms)
    hb_.Reconfigure({std::chrono::milliseconds(c.heartbeat_interval_ms), std::chrono::milliseconds(c.heartbeat_timeout_ms)});
  config_seen_ = true;
  xor_records_ = c.page_delta == "xor";
  stats_->initial_offered_pages = 0;
  stats_->initial_kept_pages = 0;
  stats_->initial_received_pages = 0;
  stats_->initial_verified = -1;
  const bool delta = c.delta_resync;
  RETURN_IF_ERROR(host_->AcceptConfig(std::move(c)));
  return delta ? SendOffer() : OkStatus();
}

Status Session::SendOffer() {
  std::string why;
  const PageStore* base = host_->ResyncBase(&why);
  wire::ResyncOfferMsg offer;
  if (base) {
    offer.blocks = base->blocks();
    offer.epoch = base->committed_epoch();
  } else {
    offer.reason = why;
  }
  RETURN_IF_ERROR(link_->Send(MsgType::kResyncOffer, 0, wire::EncodeResyncOffer(offer)));
  if (!base) {
    LOG_INFO(tag_) << "delta resync: nothing to offer (" << why << "): the initial copy is full";
    return OkStatus();
  }
  TimePoint t0 = clock_.Now();
  uint64_t pages = 0;
  // 64 Ki pages (1 MiB of hashes, 256 MiB of guest) per frame.
  for (size_t i = 0; i < base->blocks().size(); i++) {
    RETURN_IF_ERROR(HashStoreBlock(*base, i, 65536, [&](uint64_t first, const wire::PageHash* h, size_t n) {
      pages += n;
      return link_->Send(MsgType::kResyncHashes, 0, wire::EncodeResyncHashes(static_cast<uint32_t>(i), first, h, n));
    }));
  }
  offered_ = true;
  stats_->initial_offered_pages = pages;
  LOG_INFO(tag_) << "delta resync: offered the image of checkpoint " << base->committed_epoch() << " in "
                 << base->dir() << " (" << pages << " pages, hashed in "
                 << static_cast<int>(ToMillis(clock_.Now() - t0)) << " ms)";
  return OkStatus();
}

Status Session::HandleKeep(const wire::Frame& f) {
  if (f.epoch != 0 || !syncing_) return InvalidArgument("KEEP outside the initial copy");
  if (!base_) return InvalidArgument("KEEP, but this backup offered no image to keep pages from");
  ASSIGN_OR_RETURN(std::vector<wire::KeepRun> runs, wire::DecodeKeep(f.payload));
  for (const wire::KeepRun& r : runs) {
    if (r.block >= base_block_.size() || base_block_[r.block] < 0)
      return DataLoss("KEEP names block " + std::to_string(r.block) +
                      ", which has no block of the same id and length in the offered image");
    const size_t src = static_cast<size_t>(base_block_[r.block]);
    const uint64_t pages = base_->blocks()[src].used_length / wire::kPageSize;
    if (r.first_page >= pages || r.count > pages - r.first_page)
      return DataLoss("KEEP run of block " + std::to_string(r.block) + " (pages " + std::to_string(r.first_page) +
                      "+" + std::to_string(r.count) + ") runs past its " + std::to_string(pages) + " pages");
    RETURN_IF_ERROR(syncing_->CopyPagesFrom(*base_, src, r.block, r.first_page, r.count));
    kept_pages_ += r.count;
    stats_->initial_kept_pages += r.count;
    stats_->sync_done += static_cast<uint64_t>(r.count) * wire::kPageSize;
  }
  return OkStatus();
}

Status Session::VerifyInitial(const wire::CommitInfo& ci) {
  if (ci.kept_pages != kept_pages_)
    return DataLoss("delta resync: the primary kept " + std::to_string(ci.kept_pages) + " pages, this backup " +
                    std::to_string(kept_pages_));
  if (ci.image_digest.empty()) {
    if (kept_pages_ > 0) return DataLoss("delta resync: pages were kept but the primary sent no image digest");
    return OkStatus();
  }
  TimePoint t0 = clock_.Now();
  ASSIGN_OR_RETURN(wire::PageHash d, StoreDigest(*syncing_));
  if (wire::PageHashHex(d) != ci.image_digest) {
    stats_->initial_verified = 0;
    return DataLoss("delta resync: the image after the initial copy does not match the primary's (digest " +
                    wire::PageHashHex(d) + ", the primary's " + ci.image_digest +
                    "); not committing it. The offered image is discarded: the next protection makes a full copy");
  }
  stats_->initial_verified = 1;
  LOG_INFO(tag_) << "delta resync: the new image matches the primary's digest (checked in "
                 << static_cast<int>(ToMillis(clock_.Now() - t0)) << " ms)";
  return OkStatus();
}

Status Session::HandleSyncBegin(const std::string& payload) {
  if (!config_seen_) return InvalidArgument("SYNC_BEGIN before CONFIG");
  ASSIGN_OR_RETURN(wire::SyncBeginMsg b, ParseSyncBegin(payload));
  ASSIGN_OR_RETURN(SessionHost::SyncTarget t, host_->BeginSync(b));
  syncing_ = t.store;
  disks_ = std::move(t.disks);
  base_ = offered_ ? t.base : nullptr;
  base_block_.assign(b.blocks.size(), -1);
  if (base_) {
    for (size_t i = 0; i < b.blocks.size(); i++)
      for (size_t j = 0; j < base_->blocks().size(); j++)
        if (base_->blocks()[j] == b.blocks[i]) base_block_[i] = static_cast<long>(j);
  }
  kept_pages_ = 0;
  disk_synced_ = -1;
  stats_->sync_total = b.total_bytes;
  stats_->sync_done = 0;
  LOG_INFO(tag_) << "initial copy starting: " << b.blocks.size() << " RAM blocks, " << b.total_bytes << " bytes";
  return OkStatus();
}

Status Session::CommitEpoch(uint64_t epoch, const std::string& payload) {
  ASSIGN_OR_RETURN(wire::CommitInfo ci, wire::DecodeCommit(payload));
  std::string blob = std::move(device_buf_);
  device_buf_.clear();
  uint64_t page_bytes = staged_page_bytes_;
  uint64_t disk_records = staged_disk_records_;
  staged_page_bytes_ = 0;
  staged_disk_records_ = 0;
  if (ci.page_bytes != page_bytes || ci.device_bytes != blob.size() || ci.disk_records != disk_records)
    return DataLoss("checkpoint " + std::to_string(epoch) + " is incomplete: got " + std::to_string(page_bytes) +
                    " page bytes, " + std::to_string(blob.size()) + " device bytes and " +
                    std::to_string(disk_records) + " disk writes, the primary sent " + std::to_string(ci.page_bytes) +
                    ", " + std::to_string(ci.device_bytes) + " and " + std::to_string(ci.disk_records));
  TimePoint t0 = clock_.Now();
  // The disk writes are durable before the memory part commits: a crash in
  // between leaves a disk epoch the page store never committed, which
  // recovery drops (discard_after). Never ack what is not durable.
  if (disks_) {
    MutexLock dg(disk_mu_);
    RETURN_IF_ERROR(DiskError(disks_->Commit(epoch), epoch));
  }
  if (opts_.before_commit_for_test) opts_.before_commit_for_test(epoch);
  if (epoch == 0) {
    if (!syncing_) return FailedPrecondition("COMMIT of the initial copy without SYNC_BEGIN");
    if (Status v = VerifyInitial(ci); !v.ok()) {
      if (base_) host_->DropResyncBase(v.message());
      base_ = nullptr;
      return v;
    }
    RETURN_IF_ERROR(host_->CommitInitial(blob, ci.page_count));
    base_ = nullptr;  // CommitInitial retired it
    syncing_ = nullptr;
  } else {
    Staging st = std::move(staging_);
    staging_ = Staging();
    st.SetDeviceBlob(std::move(blob));
    Status c = host_->CommitCheckpoint(epoch, st);
    for (std::string& b : st.TakeBatches()) RecycleBuffer(std::move(b));
    RETURN_IF_ERROR(c);
  }
  if (disks_ && !disks_synced_reported_ && disk_synced_ >= 0 && static_cast<uint64_t>(disk_synced_) <= epoch) {
    RETURN_IF_ERROR(host_->DisksSynced(disk_synced_));
    disks_synced_reported_ = true;
  }
  double ms = ToMillis(clock_.Now() - t0);
  stats_->apply_ms.Add(ms);
  stats_->apply_hist.Observe(ms / 1000.0);
  if (epoch > 0) stats_->checkpoints_total++;
  if (ms > 0 && epoch > 0) stats_->apply_mb_s = static_cast<double>(page_bytes) / 1e6 / (ms / 1000.0);
  stats_->last_committed = static_cast<int64_t>(epoch);
  {
    MutexLock g(sess_mu_);
    acks_.push_back({epoch, clock_.Now() + std::chrono::milliseconds(opts_.ack_delay_ms)});
    sess_cv_.NotifyAll();
  }
  if (disks_) {
    // The committed epochs reach the images now and then (batched: each
    // apply syncs the images), after the ACK is on its way: the epoch is
    // durable in the journal already. Promotion applies the rest, after this
    // thread stopped.
    MutexLock dg(disk_mu_);
    Status a = disks_->MaybeApply();
    if (!a.ok()) return Status(a.code(), "domain " + opts_.domain + ": applying disk writes to the images: " + a.message());
  }
  return OkStatus();
}

Status Session::DiskError(const Status& s, uint64_t epoch) const {
  if (s.ok()) return s;
  std::string fix = s.code() == Code::kResourceExhausted
                        ? "; the backup's state dir " + opts_.state_dir + " is full: free space there, then protect again"
                        : "";
  return Status(s.code(), "domain " + opts_.domain + ": checkpoint " + std::to_string(epoch) +
                              ": its disk writes are not durable on the backup, so it is not acked: " + s.message() +
                              fix);
}

std::string Session::TakeSpareBuffer() {
  if (spare_buffers_.empty()) return {};
  std::string b = std::move(spare_buffers_.back());
  spare_buffers_.pop_back();
  spare_bytes_ -= b.capacity();
  return b;
}

void Session::RecycleBuffer(std::string buf) {
  if (buf.capacity() < kMinSpareBuffer || spare_bytes_ + buf.capacity() > kSpareBufferBytes) return;
  spare_bytes_ += buf.capacity();
  spare_buffers_.push_back(std::move(buf));
}

}  // namespace remus
