#include "replicator/backup/domain.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "common/hex.h"
#include "common/log.h"
#include "diskmirror/disk_replica.h"
#include "replicator/backup/promoter.h"
#include "replicator/backup/records.h"
#include "replicator/backup/recovery.h"
#include "replicator/link/page_batch.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

bool ValidDomainName(std::string_view d) {
  if (d.empty() || d.size() > 64 || d[0] == '.' || d[0] == '-') return false;
  for (char c : d)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

namespace {

// As much as the primary's read-buffer pool (CheckpointSource): a checkpoint
// of up to ~64 batches is received without allocating.
constexpr uint64_t kSpareBufferBytes = 256ull << 20;
// Smaller buffers (control frames, a moved-from payload) are not worth keeping.
constexpr size_t kMinSpareBuffer = 1 << 20;

// fsync of a directory: a rename or unlink in it is durable afterwards.
Status SyncDir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open " + dir, errno);
  if (::fsync(fd.get()) < 0) return ErrnoStatus("fsync " + dir, errno);
  return OkStatus();
}

Status WriteDurable(const std::string& dir, const std::string& file, const std::string& data) {
  RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + file, data));
  return SyncDir(dir);
}

}  // namespace

BackupDomain::BackupDomain(std::string name, const BackupOptions& opts, const Clock& clock, Arbiter* arbiter,
                           ProcessLauncher* launcher)
    : name_(std::move(name)), opts_(opts), clock_(clock), arbiter_(arbiter), launcher_(launcher),
      dir_(opts.state_dir + "/domains/" + name_), tag_("backup[" + name_ + "]") {}

BackupDomain::~BackupDomain() = default;

void BackupDomain::Stop() {
  MutexLock l(mu_);
  stopping_ = true;
  cv_.NotifyAll();
}

DomainState BackupDomain::state() const {
  MutexLock l(mu_);
  return state_;
}

bool BackupDomain::Transition(DomainEvent e) {
  std::optional<DomainState> n = NextState(state_, e);
  if (!n) {
    LOG_WARN(tag_) << "event " << DomainEventName(e) << " ignored in state " << DomainStateName(state_);
    return false;
  }
  if (*n != state_) LOG_INFO(tag_) << DomainStateName(state_) << " -> " << DomainStateName(*n) << " (" << DomainEventName(e) << ")";
  state_ = *n;
  state_view_ = static_cast<int>(*n);
  return true;
}

// ---- sessions ----

void BackupDomain::Serve(std::unique_ptr<wire::Link> link) {
  uint64_t gen = 0;
  {
    MutexLock l(mu_);
    Status refuse;
    if (stopping_)
      refuse = Unavailable("this backup is shutting down");
    else if (state_ == DomainState::kPromoting || state_ == DomainState::kFailedOver)
      refuse = FailedPrecondition("domain " + name_ + " was promoted on this backup; it runs here now");
    else if (session_running_ || !NextState(state_, DomainEvent::kSessionStart))
      refuse = AlreadyExists("domain " + name_ + " already has a primary connected");
    if (!refuse.ok()) {
      l.Unlock();
      LOG_WARN(tag_) << "refused " << link->PeerName() << ": " << refuse.message();
      (void)link->Send(MsgType::kError, 0, wire::EncodeError(refuse));
      return;
    }
    Transition(DomainEvent::kSessionStart);
    gen = ++generation_;  // an older session's pending automatic promotion is off
    session_running_ = true;
    error_.clear();
    primary_ = link->PeerName();
    link_ = link.get();
    cv_.NotifyAll();
  }
  LOG_INFO(tag_) << "primary " << link->PeerName() << " connected (session " << gen << ")";
  Outcome out = RunSession(*link, gen);
  EndSessionIngest();
  Nanos wait{0};
  {
    MutexLock l(mu_);
    bytes_received_done_ += link->bytes_received();
    link_ = nullptr;
    session_running_ = false;
    cv_.NotifyAll();
    // A promotion ended this session; it owns the state now.
    if (state_ == DomainState::kPromoting || state_ == DomainState::kFailedOver) return;
    Status restorable = Restorable();
    std::string nothing = restorable.ok() ? "" : "; " + restorable.message();
    switch (out.end) {
      case End::kEnded:
        Transition(DomainEvent::kPrimaryEnded);
        error_ = out.why + "; the primary lives on unprotected, so this backup does not promote by itself" +
                 (restorable.ok() ? " (`remusctl failover " + name_ + "` still restores checkpoint " +
                                        std::to_string(committed_->committed_epoch()) + " if you are sure it is gone)"
                                  : nothing);
        LOG_WARN(tag_) << error_;
        return;
      case End::kPromoting:
        return;
      case End::kFailover:
        Transition(DomainEvent::kPrimaryLost);
        if (!opts_.auto_promote) {
          error_ = out.why + "; not promoting by itself (--no-auto-promote): run `remusctl failover " + name_ + "`";
          LOG_WARN(tag_) << error_;
          return;
        }
        error_ = out.why + nothing;
        break;
      case End::kLost:
        Transition(DomainEvent::kPrimaryLost);
        error_ = "lost the primary: " + out.why + nothing;
        LOG_WARN(tag_) << error_;
        if (!opts_.auto_promote) return;
        // Fail-stop detection: the primary is dead once it has been silent
        // for the heartbeat timeout (a closed connection alone could be a
        // restart).
        wait = std::max(Nanos(0), hb_->config().timeout - hb_->SinceLastReceived());
        break;
    }
  }
  AutoPromoteAfter(gen, wait, out.end == End::kFailover ? out.why : "primary lost: " + out.why);
}

BackupDomain::Outcome BackupDomain::RunSession(wire::Link& link, uint64_t generation) {
  (void)generation;
  {
    MutexLock g(sess_mu_);
    session_over_ = false;
    acks_.clear();
  }
  hb_ = std::make_unique<HeartbeatMonitor>(clock_, opts_.heartbeat);
  config_seen_ = false;
  wire::Link* l = &link;
  std::thread acker([this, l] { AckLoop(l); });
  std::thread beat([this, l] { SessionHeartbeat(l); });
  Outcome out;
  Status s;        // why the session ends
  bool ours = false;  // s is our refusal of the primary's input, not a broken link
  for (;;) {
    auto f = link.Recv(TakeSpareBuffer());
    if (!f.ok()) {
      s = f.status();
      // A corrupt frame (bad checksum or length) arrived over a live link.
      ours = s.code() == Code::kDataLoss || s.code() == Code::kInvalidArgument;
      break;
    }
    hb_->Received();
    // Liveness is counted on receipt, and the time spent applying is ours:
    // the primary's frames wait in our socket meanwhile.
    hb_->SetBusy(true);
    s = HandleFrame(*f, &out);
    hb_->SetBusy(false);
    RecycleBuffer(std::move(f->payload));  // kept unless HandleFrame took it
    if (!s.ok()) {
      ours = s.code() != Code::kAborted && s.code() != Code::kCancelled;
      break;
    }
  }
  {
    MutexLock g(sess_mu_);
    session_over_ = true;
    sess_cv_.NotifyAll();
  }
  bool promoting;
  {
    MutexLock g(mu_);
    promoting = state_ == DomainState::kPromoting;
  }
  if (promoting) {
    out = {End::kPromoting, "a promotion ended the session"};
  } else if (ours) {
    // Tell the primary why we stop acking; it drops to unprotected and its
    // guest runs on: from now on this backup must not promote by itself.
    // Then read on until it closes (bounded): closing with its frames unread
    // would reset the connection, and the ERROR could be lost with it. A
    // GOODBYE read meanwhile only confirms that the primary lives.
    LOG_ERROR(tag_) << "refusing the primary's stream: " << s.ToString();
    out = {End::kEnded, "this backup refused the primary's stream and told it so (" + s.ToString() + ")"};
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
    out = {End::kLost, s.message()};
  }
  link.Shutdown();
  acker.join();
  beat.join();
  return out;
}

void BackupDomain::EndSessionIngest() {
  staging_.Clear();        // a partial checkpoint is discarded
  spare_buffers_.clear();  // an idle domain holds no receive buffers
  spare_bytes_ = 0;
  device_buf_.clear();
  staged_page_bytes_ = 0;
  staged_pages_ = 0;
  staged_disk_records_ = 0;
  if (session_disks_) {
    MutexLock dg(disk_mu_);
    Status d = session_disks_->DropUncommitted();
    if (!d.ok()) LOG_ERROR(tag_) << "dropping a partial checkpoint's disk writes: " << d.ToString();
    session_disks_.reset();
  }
  MutexLock g(mu_);
  syncing_.reset();
}

void BackupDomain::SessionHeartbeat(wire::Link* link) {
  MutexLock l(sess_mu_);
  while (!session_over_) {
    sess_cv_.WaitFor(sess_mu_, std::min<Nanos>(hb_->NextCheckIn(), std::chrono::milliseconds(50)));
    if (session_over_) return;
    l.Unlock();
    if (hb_->PeerLost()) {
      LOG_WARN(tag_) << "primary silent for " << static_cast<int>(ToMillis(hb_->SinceLastReceived())) << " ms";
      link->Shutdown();
      l.Lock();
      return;
    }
    if (hb_->SendDue()) {
      hb_->Sent();
      (void)link->Send(MsgType::kHeartbeat, static_cast<uint64_t>(std::max<int64_t>(0, last_committed_)), "");
    }
    l.Lock();
  }
}

void BackupDomain::AckLoop(wire::Link* link) {
  // ACKs go out from here so an --ack-delay-ms never slows down receiving.
  MutexLock l(sess_mu_);
  for (;;) {
    while (!session_over_ && acks_.empty()) sess_cv_.Wait(sess_mu_);
    if (session_over_) {
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

Status BackupDomain::HandleFrame(wire::Frame& f, Outcome* outcome) {
  switch (f.type) {
    case MsgType::kHeartbeat:
    case MsgType::kProgress:
      return OkStatus();
    case MsgType::kConfig:
      return HandleConfig(f.payload);
    case MsgType::kSyncBegin:
      return HandleSyncBegin(f.payload);
    case MsgType::kPages: {
      if (f.flags & wire::kFlagLz4) {
        ASSIGN_OR_RETURN(f.payload, wire::DecompressBatch(f.payload, wire::kMaxPayload));
      }
      if (f.epoch == 0) {
        PageStore* store;
        {
          MutexLock g(mu_);
          store = syncing_.get();
        }
        if (!store) return FailedPrecondition("PAGES for the initial copy before SYNC_BEGIN");
        RETURN_IF_ERROR(wire::ForEachPageRecord(f.payload, [&](uint32_t b, uint64_t o, const uint8_t* d) {
          staged_pages_++;
          sync_done_ += wire::kPageSize;
          return store->ApplyPage(b, o, d);
        }));
        staged_page_bytes_ += f.payload.size();
        return OkStatus();
      }
      if (staging_.bytes() + device_buf_.size() + f.payload.size() > opts_.max_staged_bytes)
        return ResourceExhausted("domain " + name_ + ": checkpoint " + std::to_string(f.epoch) + " stages more than " +
                                 std::to_string(opts_.max_staged_bytes >> 20) +
                                 " MiB in the backup's memory (its limit); lower the primary's max unacked bytes "
                                 "or raise the backup's limit, then protect again");
      staged_page_bytes_ += f.payload.size();
      staging_.AddPageBatch(std::move(f.payload));
      return OkStatus();
    }
    case MsgType::kDisk: {
      if (!session_disks_) return FailedPrecondition("DISK for a domain without mirrored disks, or before SYNC_BEGIN");
      ASSIGN_OR_RETURN(wire::DiskRecord r, wire::DecodeDiskRecord(f.payload));
      staged_disk_records_++;
      MutexLock dg(disk_mu_);
      Status ds;
      switch (r.op) {
        case wire::DiskOp::kWrite:
          ds = session_disks_->Write(
              r.disk, f.epoch, r.offset,
              std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(r.data.data()), r.data.size()));
          break;
        case wire::DiskOp::kZero: ds = session_disks_->Zero(r.disk, f.epoch, r.offset, r.length); break;
        case wire::DiskOp::kTrim: ds = session_disks_->Trim(r.disk, f.epoch, r.offset, r.length); break;
      }
      return DiskError(ds, f.epoch);
    }
    case MsgType::kDiskSynced:
      if (!session_disks_) return FailedPrecondition("DISK_SYNCED for a domain without mirrored disks");
      session_disk_synced_ = static_cast<int64_t>(f.epoch);
      return OkStatus();
    case MsgType::kDevice:
      if (device_buf_.size() + f.payload.size() > qemu::kMaxDeviceState) return DataLoss("device state too large");
      if (f.epoch > 0 && staging_.bytes() + device_buf_.size() + f.payload.size() > opts_.max_staged_bytes)
        return ResourceExhausted("domain " + name_ + ": checkpoint " + std::to_string(f.epoch) + " stages more than " +
                                 std::to_string(opts_.max_staged_bytes >> 20) +
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
      *outcome = {End::kFailover, reason};
      return Aborted("primary lost");
    }
    case MsgType::kGoodbye: {
      std::string why = ParseReason(f.payload);
      std::string reason = "the primary ended protection (GOODBYE";
      if (!why.empty()) reason += ": " + why;
      *outcome = {End::kEnded, reason + ")"};
      LOG_INFO(tag_) << outcome->why << "; not promoting";
      return Cancelled("goodbye");
    }
    case MsgType::kError: {
      Status e = wire::DecodeError(f.payload);
      *outcome = {End::kEnded, "the primary gave up protection with an error (" + e.ToString() + ")"};
      return Cancelled("error from the primary");
    }
    default:
      return InvalidArgument("unexpected " + wire::MsgTypeName(f.type) + " from the primary");
  }
}

Status BackupDomain::HandleConfig(const std::string& payload) {
  if (config_seen_) return InvalidArgument("CONFIG sent twice in one session");
  ASSIGN_OR_RETURN(wire::ConfigMsg c, ParseConfigPayload(payload, name_));
  RETURN_IF_ERROR(MakeDirs(dir_ + "/run", 0700));
  if (c.heartbeat_interval_ms > 0 && c.heartbeat_timeout_ms > c.heartbeat_interval_ms)
    hb_->Reconfigure({std::chrono::milliseconds(c.heartbeat_interval_ms), std::chrono::milliseconds(c.heartbeat_timeout_ms)});
  config_seen_ = true;
  MutexLock g(mu_);
  session_config_ = std::move(c);
  // The guest ran on since the last checkpoint this backup committed (that is
  // why there is a new session): that checkpoint is stale from now on.
  return RetireCheckpoint("a new protection session from " + primary_ +
                          " began, and its initial copy has not committed yet");
}

Status BackupDomain::RetireCheckpoint(const std::string& why) {
  no_checkpoint_reason_ = why;
  bool had = committed_ != nullptr || ::access((dir_ + "/current").c_str(), F_OK) == 0;
  if (!had) return OkStatus();
  // `current` goes first, durably: after a crash from here on, Recover must
  // not find it (`retired` only explains its absence).
  if (::unlink((dir_ + "/current").c_str()) < 0 && errno != ENOENT) return ErrnoStatus("unlink " + dir_ + "/current", errno);
  RETURN_IF_ERROR(SyncDir(dir_));
  RETURN_IF_ERROR(WriteDurable(dir_, "retired", why));
  if (committed_disks_) {
    // The images are shared by sessions: the retired session's journals go
    // onto them in full before the new one's writes can.
    MutexLock dg(disk_mu_);
    Status a = committed_disks_->ApplyAll();
    if (!a.ok()) LOG_WARN(tag_) << "applying the retired session's disk journals: " << a.ToString();
  }
  committed_disks_.reset();
  disk_synced_epoch_ = -1;
  if (committed_) {
    std::error_code ec;
    std::filesystem::remove_all(committed_->dir(), ec);
    LOG_INFO(tag_) << "checkpoint " << committed_->committed_epoch() << " retired: " << why;
  }
  committed_.reset();
  committed_configuration_.clear();
  config_ = wire::ConfigMsg();
  last_committed_ = -1;
  return OkStatus();
}

Status BackupDomain::HandleSyncBegin(const std::string& payload) {
  if (!config_seen_) return InvalidArgument("SYNC_BEGIN before CONFIG");
  ASSIGN_OR_RETURN(wire::SyncBeginMsg b, ParseSyncBegin(payload));
  wire::ConfigMsg config;
  std::string store_dir;
  {
    MutexLock g(mu_);
    if (state_ != DomainState::kWaiting) return InvalidArgument("SYNC_BEGIN sent twice in one session");
    int seq = ++session_seq_;
    while (std::filesystem::exists(dir_ + "/store-" + std::to_string(seq))) seq = ++session_seq_;
    store_dir = dir_ + "/store-" + std::to_string(seq);
    config = session_config_;
  }
  ASSIGN_OR_RETURN(auto store, PageStore::Create(store_dir, b.blocks));
  RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/configuration.bin", b.configuration));
  // The CONFIG belongs with the store it describes: it becomes the restorable
  // one only when this store does.
  RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/config.json", wire::EncodeConfig(config)));
  RETURN_IF_ERROR(OpenSessionDisks(store->dir(), config.disks));
  MutexLock g(mu_);
  configuration_section_ = std::move(b.configuration);
  syncing_ = std::move(store);
  sync_total_ = b.total_bytes;
  sync_done_ = 0;
  Transition(DomainEvent::kSyncBegin);
  LOG_INFO(tag_) << "initial copy starting: " << b.blocks.size() << " RAM blocks, " << b.total_bytes << " bytes";
  return OkStatus();
}

Status BackupDomain::CommitEpoch(uint64_t epoch, const std::string& payload) {
  ASSIGN_OR_RETURN(wire::CommitInfo ci, wire::DecodeCommit(payload));
  std::string blob = std::move(device_buf_);
  device_buf_.clear();
  uint64_t page_bytes = staged_page_bytes_;
  uint64_t disk_records = staged_disk_records_;
  staged_page_bytes_ = 0;
  staged_pages_ = 0;
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
  if (session_disks_) {
    MutexLock dg(disk_mu_);
    RETURN_IF_ERROR(DiskError(session_disks_->Commit(epoch), epoch));
  }
  if (opts_.before_commit_for_test) opts_.before_commit_for_test(epoch);
  bool disks_pending = false;
  if (epoch == 0) {
    MutexLock g(mu_);
    if (!syncing_) return FailedPrecondition("COMMIT of the initial copy without SYNC_BEGIN");
    RETURN_IF_ERROR(syncing_->CompleteInitialSync(blob, 0));
    // This session's image is the restorable one from now on.
    RETURN_IF_ERROR(WriteDurable(dir_, "current", std::filesystem::path(syncing_->dir()).filename().string()));
    ::unlink((dir_ + "/retired").c_str());
    ::unlink((dir_ + "/promoted.json").c_str());  // a new session replaces an old promotion
    ::unlink((dir_ + "/promoting.json").c_str());
    committed_ = std::move(syncing_);
    committed_configuration_ = configuration_section_;
    config_ = session_config_;
    committed_disks_ = session_disks_;
    disk_synced_epoch_ = -1;
    no_checkpoint_reason_.clear();
    disks_pending = committed_disks_ != nullptr;
    Transition(disks_pending ? DomainEvent::kInitialCommit : DomainEvent::kProtectedNow);
    LOG_INFO(tag_) << "initial copy committed (" << ci.page_count << " pages)"
                   << (disks_pending ? "; disks still copying" : "; standing by");
  } else {
    Staging st = std::move(staging_);
    staging_ = Staging();
    st.SetDeviceBlob(std::move(blob));
    Status c;
    {
      MutexLock g(mu_);
      if (!committed_) return FailedPrecondition("checkpoint " + std::to_string(epoch) + " before the initial copy");
      c = committed_->Commit(epoch, std::move(st));
    }
    for (std::string& b : st.TakeBatches()) RecycleBuffer(std::move(b));
    RETURN_IF_ERROR(c);
  }
  if (session_disks_ && session_disk_synced_ >= 0 && static_cast<uint64_t>(session_disk_synced_) <= epoch) {
    MutexLock g(mu_);
    if (disk_synced_epoch_ < 0 && committed_) {
      disk_synced_epoch_ = session_disk_synced_;
      RETURN_IF_ERROR(WriteFileAtomic(committed_->dir() + "/disks-synced", std::to_string(disk_synced_epoch_)));
      Transition(DomainEvent::kProtectedNow);
      LOG_INFO(tag_) << "disk copies complete as of checkpoint " << disk_synced_epoch_ << "; standing by";
    }
  }
  double ms = ToMillis(clock_.Now() - t0);
  apply_ms_.Add(ms);
  apply_hist_.Observe(ms / 1000.0);
  if (epoch > 0) checkpoints_total_++;
  if (ms > 0 && epoch > 0) apply_mb_s_ = static_cast<double>(page_bytes) / 1e6 / (ms / 1000.0);
  last_committed_ = static_cast<int64_t>(epoch);
  {
    MutexLock g(sess_mu_);
    acks_.push_back({epoch, clock_.Now() + std::chrono::milliseconds(opts_.ack_delay_ms)});
    sess_cv_.NotifyAll();
  }
  if (session_disks_) {
    // The committed epochs reach the images now and then (batched: each
    // apply syncs the images), after the ACK is on its way: the epoch is
    // durable in the journal already. Promotion applies the rest, after this
    // thread stopped.
    MutexLock dg(disk_mu_);
    Status a = session_disks_->MaybeApply();
    if (!a.ok()) return Status(a.code(), "domain " + name_ + ": applying disk writes to the images: " + a.message());
  }
  return OkStatus();
}

std::string BackupDomain::TakeSpareBuffer() {
  if (spare_buffers_.empty()) return {};
  std::string b = std::move(spare_buffers_.back());
  spare_buffers_.pop_back();
  spare_bytes_ -= b.capacity();
  return b;
}

void BackupDomain::RecycleBuffer(std::string buf) {
  if (buf.capacity() < kMinSpareBuffer || spare_bytes_ + buf.capacity() > kSpareBufferBytes) return;
  spare_bytes_ += buf.capacity();
  spare_buffers_.push_back(std::move(buf));
}

// ---- disks ----

Status BackupDomain::DiskError(const Status& s, uint64_t epoch) const {
  if (s.ok()) return s;
  std::string fix = s.code() == Code::kResourceExhausted
                        ? "; the backup's state dir " + opts_.state_dir + " is full: free space there, then protect again"
                        : "";
  return Status(s.code(), "domain " + name_ + ": checkpoint " + std::to_string(epoch) +
                              ": its disk writes are not durable on the backup, so it is not acked: " + s.message() +
                              fix);
}

FileIo* BackupDomain::Io() {
  MutexLock dg(disk_mu_);
  if (!io_) {
    auto io = NewUringFileIo();
    if (!io.ok()) return nullptr;
    io_ = std::move(io).value();
  }
  return io_.get();
}

StatusOr<std::unique_ptr<DiskReplicaSet>> BackupDomain::OpenDisks(const std::string& store_dir,
                                                                  std::optional<uint64_t> discard_after) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(store_dir + "/disks.json"));
  ASSIGN_OR_RETURN(std::vector<ReplicaDisk> disks, ParseDisksFile(text, store_dir + "/disks.json"));
  FileIo* io = Io();
  if (!io) return Unavailable("domain " + name_ + ": io_uring is unavailable for the disk journals");
  RETURN_IF_ERROR(MakeDirs(dir_ + "/disks", 0700));
  return DiskReplicaSet::Open(io, dir_ + "/disks", store_dir, std::move(disks), discard_after);
}

Status BackupDomain::OpenSessionDisks(const std::string& store_dir, const std::vector<wire::DiskSpec>& disks) {
  session_disks_.reset();
  session_disk_synced_ = -1;
  if (disks.empty()) return OkStatus();
  json list = json::array();
  for (const auto& d : disks) list.push_back(wire::DiskSpecToJson(d));
  RETURN_IF_ERROR(WriteFileAtomic(store_dir + "/disks.json", list.dump()));
  ASSIGN_OR_RETURN(auto set, OpenDisks(store_dir, std::nullopt));
  MutexLock dg(disk_mu_);
  session_disks_ = std::move(set);
  LOG_INFO(tag_) << "mirroring " << disks.size() << " disk(s) into " << dir_ << "/disks";
  return OkStatus();
}

// ---- promotion ----

Status BackupDomain::Restorable() const {
  if (!committed_ || !committed_->has_committed())
    return FailedPrecondition("domain " + name_ + " has no committed checkpoint of its current protection session (" +
                              (no_checkpoint_reason_.empty() ? "the initial copy never completed"
                                                             : no_checkpoint_reason_) +
                              "); nothing to restore");
  if (committed_disks_ &&
      (disk_synced_epoch_ < 0 || static_cast<uint64_t>(disk_synced_epoch_) > committed_->committed_epoch()))
    return FailedPrecondition("domain " + name_ + ": the disk copy to this backup never completed, so its disk "
                              "does not match any checkpoint; not restoring");
  return OkStatus();
}

void BackupDomain::AutoPromoteAfter(uint64_t generation, Nanos wait, const std::string& reason) {
  TimePoint deadline = clock_.Now() + wait;
  {
    MutexLock l(mu_);
    for (;;) {
      if (stopping_ || generation_ != generation || state_ != DomainState::kPrimaryLost) {
        LOG_INFO(tag_) << "automatic promotion of session " << generation << " called off: "
                       << (stopping_ ? "remusd is stopping"
                                     : generation_ != generation ? "a newer session started"
                                                                 : "the domain is " + std::string(DomainStateName(state_)));
        return;
      }
      Nanos left = deadline - clock_.Now();
      if (left.count() <= 0) break;
      cv_.WaitFor(mu_, std::min<Nanos>(left, std::chrono::milliseconds(20)));
    }
  }
  Status p = PromoteImpl(reason, generation);
  if (!p.ok()) LOG_ERROR(tag_) << "automatic promotion did not happen: " << p.ToString();
}

Status BackupDomain::PromoteImpl(const std::string& reason, std::optional<uint64_t> generation) {
  {
    MutexLock l(mu_);
    if (generation && (*generation != generation_ || state_ != DomainState::kPrimaryLost || stopping_))
      return Cancelled("domain " + name_ + ": the automatic promotion of session " + std::to_string(*generation) +
                       " was superseded");
    if (state_ == DomainState::kPromoting)
      return FailedPrecondition("domain " + name_ + ": a promotion is already under way (" + promote_reason_ + ")");
    if (state_ == DomainState::kFailedOver)
      return FailedPrecondition("domain " + name_ + " was promoted already (" + promote_reason_ +
                                "); its guest runs here");
    RETURN_IF_ERROR(Restorable());
    if (!Transition(DomainEvent::kPromote)) return FailedPrecondition("domain " + name_ + ": cannot promote now");
    promote_reason_ = reason;
    promote_error_.clear();
    promotion_tried_ = true;
    ++generation_;  // no older session's automatic promotion follows this one
    cv_.NotifyAll();
    // An operator's failover while a primary is connected: end that session
    // and wait until its ingest stopped, so neither the store nor the disks
    // change under the restore.
    if (link_) link_->Shutdown();
    while (session_running_) cv_.Wait(mu_);
  }
  LOG_WARN(tag_) << "promoting: " << reason;
  Status s = arbiter_->MayPromote(name_);
  PromoteInput in;
  if (s.ok()) {
    MutexLock l(mu_);
    s = Restorable();
    if (s.ok()) {
      in.store = committed_.get();
      in.configuration = committed_configuration_;
      in.config = config_;
      in.disks = committed_disks_;
      in.epoch = committed_->committed_epoch();
    }
  }
  restore_progress_.ram_done = 0;
  restore_progress_.ram_total = 0;
  promote_phase_ = "preparing";
  TimePoint t0 = clock_.Now();
  if (s.ok()) s = DoPromote(in);
  promote_phase_ = nullptr;
  MutexLock l(mu_);
  if (!s.ok()) {
    Transition(DomainEvent::kPromoteFailed);
    promote_error_ = s.message();
    error_ = "promotion failed: " + s.message();
    return s.Annotate("domain " + name_);
  }
  failover_ms_ = static_cast<int64_t>(ToMillis(clock_.Now() - t0));
  Transition(DomainEvent::kPromoted);
  failovers_total_++;
  last_committed_ = static_cast<int64_t>(in.epoch);
  // Remembered across a restart of remusd: the guest runs here now, and
  // restoring the (older) checkpoint again would make a second copy.
  json marker = {{"pid", qemu_pid_}, {"qmp_socket", qmp_socket_}, {"epoch", in.epoch}, {"reason", reason}};
  if (!libvirt_uri_.empty()) marker["libvirt"] = {{"uri", libvirt_uri_}, {"domain", libvirt_domain_}};
  Status w = WriteDurable(dir_, "promoted.json", marker.dump());
  if (!w.ok()) LOG_ERROR(tag_) << "cannot record the promotion: " << w.ToString();
  else ::unlink((dir_ + "/promoting.json").c_str());
  LOG_INFO(tag_) << "promoted in " << failover_ms_ << " ms (detection excluded); the guest runs here now";
  return OkStatus();
}

Status BackupDomain::DoPromote(const PromoteInput& in) {
  RestoreRequest req;
  req.domain = name_;
  req.store = in.store;
  req.configuration = in.configuration;
  req.config = in.config;
  req.run_dir = dir_ + "/run";
  req.epoch = in.epoch;
  req.progress = &restore_progress_;
  req.phase = &promote_phase_;
  if (in.disks) {
    MutexLock dg(disk_mu_);
    promote_phase_ = "applying disk writes";
    RETURN_IF_ERROR(in.disks->ApplyAll().Annotate("domain " + name_ + ": bringing the disk images to checkpoint " +
                                                  std::to_string(in.epoch)));
    for (size_t i = 0; i < in.disks->size(); i++) req.drive_images[in.disks->disk(i).id] = in.disks->ImagePath(i);
  }
  RETURN_IF_ERROR(MakeDirs(req.run_dir, 0700));
  // A libvirt domain's disks are named by their <target dev=>.
  bool via_libvirt = in.config.libvirt.has_value();
  // Before anything can start the guest: a crash of remusd from here on must
  // never lead to restoring this checkpoint again (Recover).
  json marker = {{"epoch", in.epoch}, {"via", via_libvirt ? "libvirt" : "qemu"}, {"pid", -1}};
  RETURN_IF_ERROR(WriteDurable(dir_, "promoting.json", marker.dump()).Annotate("recording the promotion"));
  req.started = [&](int pid) {
    marker["pid"] = pid;
    Status w = WriteFileAtomic(dir_ + "/promoting.json", marker.dump());
    if (!w.ok()) LOG_WARN(tag_) << "cannot record the restored QEMU's pid: " << w.ToString();
    MutexLock l(mu_);
    qemu_pid_ = pid;
    qemu_ours_ = true;
  };
  std::unique_ptr<Promoter> promoter;
  if (via_libvirt)
    promoter = std::make_unique<LibvirtPromoter>(
        LibvirtPromoterOptions{opts_.libvirt_uri, opts_.libvirt_pid_dir, opts_.qemu_binary});
  else
    promoter = std::make_unique<QemuPromoter>(launcher_, QemuPromoterOptions{opts_.qemu_binary, opts_.qemu_start_timeout_ms});
  StatusOr<RestoredGuest> g = promoter->Restore(req);
  MutexLock l(mu_);
  if (!g.ok()) {
    qemu_pid_ = -1;
    qemu_ours_ = false;
    return g.status();
  }
  qemu_pid_ = g->pid;
  qemu_ours_ = g->ours;
  qmp_socket_ = g->qmp_socket;
  libvirt_uri_ = g->libvirt_uri;
  libvirt_domain_ = g->libvirt_domain;
  return OkStatus();
}

// ---- recovery ----

Status BackupDomain::Recover() {
  StatusOr<FoundPromotion> p = FindPromotion(dir_, name_, opts_.libvirt_pid_dir);
  if (p.ok()) {
    // A promotion ran, or was under way: its guest may have run, so this
    // checkpoint is never restored again by itself.
    MutexLock g(mu_);
    last_committed_ = p->marker.epoch;
    promotion_tried_ = true;
    promote_reason_ = p->finished ? "promoted before remusd restarted" : "a promotion was under way when remusd stopped";
    if (p->alive) {
      qemu_pid_ = p->pid;
      if (p->marker.via_libvirt) {
        libvirt_uri_ = p->marker.libvirt_uri.empty() ? opts_.libvirt_uri : p->marker.libvirt_uri;
        libvirt_domain_ = p->marker.libvirt_domain.empty() ? name_ : p->marker.libvirt_domain;
      } else {
        qmp_socket_ = p->finished ? p->marker.qmp_socket : dir_ + "/run/qmp.sock";
      }
      Transition(DomainEvent::kRecoveredPromotion);
      LOG_INFO(tag_) << "the guest promoted here before the restart runs on (pid " << p->pid << ")";
    } else {
      error_ = std::string(p->finished ? "the guest promoted here before remusd restarted"
                                       : "a promotion was under way when remusd stopped, and the guest it started") +
               " (pid " + std::to_string(p->pid) + ") is gone; its checkpoint " + std::to_string(p->marker.epoch) +
               " is older than what that guest may have run, so it is not restored again; remove " + dir_ +
               " to protect this domain here anew";
      promote_error_ = error_;
      Transition(DomainEvent::kRecoveredBroken);
      LOG_ERROR(tag_) << error_;
    }
    return OkStatus();
  }
  if (p.status().code() != Code::kNotFound) return p.status();
  std::string retired;
  StatusOr<KeptCheckpoint> k = LoadKeptCheckpoint(dir_, name_, &retired);
  if (!k.ok() && k.status().code() == Code::kNotFound && !retired.empty()) {
    // A re-sync began and never committed: there is no checkpoint to keep,
    // and the retired one must not come back.
    MutexLock g(mu_);
    no_checkpoint_reason_ = retired;
    Transition(DomainEvent::kRecoveredCheckpoint);
    error_ = "remusd restarted; no checkpoint: " + no_checkpoint_reason_ + "; protect again from the primary";
    LOG_WARN(tag_) << error_;
    return OkStatus();
  }
  if (!k.ok()) return k.status();
  const PageStore& store = *k->store;
  // The disks: replay what the journals committed up to the page store's
  // epoch, and drop what they committed after it.
  std::shared_ptr<DiskReplicaSet> disks;
  int64_t synced = -1;
  if (std::filesystem::exists(store.dir() + "/disks.json")) {
    ASSIGN_OR_RETURN(auto set, OpenDisks(store.dir(), store.committed_epoch()));
    {
      MutexLock dg(disk_mu_);
      RETURN_IF_ERROR(set->ApplyAll().Annotate("domain " + name_ + ": replaying the disk journals"));
    }
    disks = std::move(set);
    if (auto t = ReadFileToString(store.dir() + "/disks-synced"); t.ok()) synced = std::atoll(t->c_str());
    LOG_INFO(tag_) << "disk images replayed to checkpoint " << store.committed_epoch();
  }
  // Stores of sessions that never committed are of no use any more.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir_, ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind("store-", 0) == 0 && n != k->store_name) std::filesystem::remove_all(e.path(), ec);
  }
  MutexLock g(mu_);
  config_ = std::move(k->config);
  committed_configuration_ = std::move(k->configuration);
  last_committed_ = static_cast<int64_t>(store.committed_epoch());
  committed_ = std::move(k->store);
  committed_disks_ = std::move(disks);
  disk_synced_epoch_ = synced;
  Transition(DomainEvent::kRecoveredCheckpoint);
  error_ = "remusd restarted; checkpoint " + std::to_string(last_committed_.load()) +
           " is kept: run `remusctl failover " + name_ + "` if the primary is gone, or protect again from the primary";
  LOG_WARN(tag_) << error_;
  return OkStatus();
}

// ---- status ----

json BackupDomain::StatusJson() const {
  json j;
  MutexLock g(mu_);
  DomainState st = state_;
  j["domain"] = name_;
  j["role"] = st == DomainState::kFailedOver ? "primary (promoted)" : "backup";
  j["state"] = DomainStateName(st);
  // Pages the guest dirtied during the first pass arrive twice, so the bytes
  // received can pass the guest's size before the copy is complete.
  uint64_t total = sync_total_, done = std::min<uint64_t>(sync_done_, sync_total_);
  double pct = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0;
  if (st == DomainState::kSyncing || st == DomainState::kWaiting) pct = std::min(pct, 99.0);
  else if (last_committed_ >= 0) pct = 100.0;
  j["sync"] = {{"total_bytes", total}, {"done_bytes", done}, {"percent", pct}};
  j["last_committed_epoch"] = last_committed_.load();
  j["apply_ms"] = {{"p50", apply_ms_.Quantile(0.5)}, {"p99", apply_ms_.Quantile(0.99)}};
  std::string pstate = st == DomainState::kPromoting   ? "promoting"
                       : st == DomainState::kFailedOver ? "promoted"
                       : st == DomainState::kFailed && promotion_tried_ ? "failed"
                                                                        : "standby";
  j["promotion"] = {{"state", pstate}, {"reason", promote_reason_}, {"error", promote_error_},
                    {"failover_ms", failover_ms_.load()}};
  if (st == DomainState::kPromoting) {
    const char* phase = promote_phase_.load();
    uint64_t streamed = restore_progress_.ram_done.load(), all = restore_progress_.ram_total.load();
    j["promotion"]["phase"] = phase ? phase : "preparing";
    j["promotion"]["restore"] = {
        {"done_bytes", streamed},
        {"total_bytes", all},
        {"percent", all ? 100.0 * static_cast<double>(streamed) / static_cast<double>(all) : 0.0}};
  }
  Status restorable = Restorable();
  j["restorable"] = restorable.ok() && st != DomainState::kPromoting && st != DomainState::kFailedOver;
  if (!restorable.ok()) j["no_checkpoint_reason"] = restorable.message();
  j["session"] = generation_;
  j["ack_delay_ms"] = opts_.ack_delay_ms;
  j["checkpoints_total"] = checkpoints_total_.load();
  j["failovers_total"] = failovers_total_.load();
  j["histograms"] = {{"apply_seconds", HistogramToJson(apply_hist_.Snapshot())}};
  j["link"] = {{"bytes_received", bytes_received_done_ + (link_ ? link_->bytes_received() : 0)}};
  j["primary"] = primary_;
  j["connected"] = session_running_;
  j["error"] = error_;
  j["qmp_socket"] = qmp_socket_;
  int pid = qemu_pid_;
  if (qemu_ours_) {
    if (!launcher_->Running(pid)) pid = -1;
  } else if (pid > 0 && !ProcessRunning(pid)) {
    pid = -1;  // libvirt's child or one from before a restart, not ours to reap
  }
  if (!libvirt_uri_.empty()) j["libvirt"] = {{"uri", libvirt_uri_}, {"domain", libvirt_domain_}};
  j["qemu"] = {{"pid", pid}};
  if (committed_) j["store"] = committed_->dir();
  if (committed_disks_) {
    json ids = json::array();
    for (size_t i = 0; i < committed_disks_->size(); i++)
      ids.push_back({{"id", committed_disks_->disk(i).id}, {"image", committed_disks_->ImagePath(i)}});
    j["disks"] = {{"images", ids}, {"synced_epoch", disk_synced_epoch_}};
  }
  return j;
}

}  // namespace remus
