#include "replicator/backup/domain.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <sstream>
#include <thread>

#include "common/hex.h"
#include "replicator/libvirt/restore.h"
#include "common/log.h"
#include "diskmirror/disk_replica.h"
#include "replicator/backup/peer_policy.h"
#include "replicator/backup/promoter.h"
#include "replicator/backup/records.h"
#include "replicator/backup/recovery.h"
#include "replicator/libvirt/xml_policy.h"
#include "replicator/link/page_batch.h"
#include "replicator/qemu/argv_rewrite.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

// A domain name and a disk id both name a directory or file on the backup:
// one rule for both (replicator/link/messages.h).
bool ValidDomainName(std::string_view d) { return wire::ValidName(d); }

BackupDomain::BackupDomain(std::string name, const BackupOptions& opts, const Clock& clock, Arbiter* arbiter,
                           ProcessLauncher* launcher)
    : name_(std::move(name)), opts_(opts), clock_(clock), arbiter_(arbiter), launcher_(launcher),
      dir_(opts.state_dir + "/domains/" + name_), tag_("backup[" + name_ + "]") {}

namespace {
// In the domain's directory while a switchover accepted here has not been
// promoted: "EPOCH STORE\n", written durably before the primary hears the
// acceptance. The primary ends its QEMU once it told us, so a restart of this
// remusd must promote that checkpoint by itself (Recover), or the guest would
// stay down until an operator ran `remusctl failover`.
constexpr char kSwitchoverFile[] = "switchover-accepted";
}  // namespace

BackupDomain::~BackupDomain() {
  Stop();
  if (recovered_promotion_.joinable()) recovered_promotion_.join();
}

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
  const bool changed = *n != state_;
  if (changed) LOG_INFO(tag_) << DomainStateName(state_) << " -> " << DomainStateName(*n) << " (" << DomainEventName(e) << ")";
  state_ = *n;
  state_view_ = static_cast<int>(*n);
  if (changed && opts_.on_state)
    opts_.on_state(name_, std::string(DomainStateName(*n)),
                   {{"primary", primary_},
                    {"epoch", stats_.last_committed.load()},
                    {"token", promotion_token_},
                    {"switchover", switchover_epoch_ >= 0},
                    {"error", promote_error_.empty() ? error_ : promote_error_},
                    // What a re-protection after this promotion reuses.
                    {"reprotect_to", config_.reprotect_to},
                    {"interval_ms", config_.interval_ms},
                    {"interval_mode", config_.interval_mode},
                    {"latency_budget_ms", config_.latency_budget_ms},
                    {"interval_min_ms", config_.interval_min_ms},
                    {"interval_max_ms", config_.interval_max_ms},
                    {"netbuf", config_.netbuf},
                    {"compress", wire::CompressionName(config_.compress, config_.page_delta == "xor")},
                    {"disks", config_.disks_option},
                    {"residency", config_.residency}});
  return true;
}

// ---- sessions ----

Status BackupDomain::AdmissionLocked() {
  NoticeGuestGoneLocked();  // a promoted guest that is gone lets a new session in
  if (stopping_) return Unavailable("this backup is shutting down");
  if (state_ == DomainState::kFailedOver)
    return FailedPrecondition("domain " + name_ + " was promoted on this host and runs here (pid " +
                              std::to_string(qemu_pid_) +
                              "): a host cannot be the backup of a guest it runs; protect it from here to another host");
  if (state_ == DomainState::kPromoting)
    return FailedPrecondition("domain " + name_ + " is being promoted on this host");
  if (state_ == DomainState::kSwitchingOver)
    return FailedPrecondition("domain " + name_ + " is switching over to this host; it runs here next");
  if (session_running_ || !NextState(state_, DomainEvent::kSessionStart))
    return AlreadyExists("domain " + name_ + " already has a primary connected");
  return OkStatus();
}

void BackupDomain::Serve(std::unique_ptr<wire::Link> link) {
  uint64_t gen = 0;
  {
    MutexLock l(mu_);
    Status refuse = AdmissionLocked();
    // A session still running may be this primary's previous one, applying
    // the checkpoints queued before its GOODBYE (one thread receives and
    // applies): `unprotect` returns when the GOODBYE is sent, so a `protect`
    // right after it lands here while the backup is behind. Wait for that
    // session to end rather than refuse; two heartbeat timeouts bound it (a
    // session whose primary went silent ends after one). A second primary
    // whose rival stays connected is refused after the wait, as before; any
    // other refusal (switching over, promoting, ...) comes at once.
    if (refuse.code() == Code::kAlreadyExists && session_running_) {
      const auto handover = std::chrono::duration_cast<std::chrono::milliseconds>(2 * opts_.heartbeat.timeout);
      LOG_INFO(tag_) << link->PeerName() << " connects while a session is still running; waiting up to "
                     << handover.count() << " ms for it to end";
      const auto until = std::chrono::steady_clock::now() + handover;
      while (session_running_ && !stopping_ && cv_.WaitUntil(mu_, until)) {
      }
      refuse = AdmissionLocked();
    }
    if (!refuse.ok()) {
      l.Unlock();
      LOG_WARN(tag_) << "refused " << link->PeerName() << ": " << refuse.message();
      (void)link->Send(MsgType::kError, 0, wire::EncodeError(refuse));
      return;
    }
    Transition(DomainEvent::kSessionStart);
    gen = ++generation_;  // an older session's pending automatic promotion is off
    switchover_epoch_ = -1;
    switchover_msg_ = wire::SwitchoverMsg();
    ::unlink((dir_ + "/" + kSwitchoverFile).c_str());  // a new session: no earlier acceptance stands
    session_running_ = true;
    error_.clear();
    primary_ = link->PeerName();
    link_ = link.get();
    cv_.NotifyAll();
  }
  LOG_INFO(tag_) << "primary " << link->PeerName() << " connected (session " << gen << ")";
  SessionOptions so;
  so.domain = name_;
  so.state_dir = opts_.state_dir;
  so.heartbeat = opts_.heartbeat;
  so.ack_delay_ms = opts_.ack_delay_ms;
  so.max_staged_bytes = opts_.max_staged_bytes;
  so.before_commit_for_test = opts_.before_commit_for_test;
  so.fault = opts_.fault;
  Session session(std::move(so), clock_, this, &stats_, &disk_mu_);
  SessionOutcome out = session.Run(*link);
  Nanos wait{0};
  {
    MutexLock l(mu_);
    syncing_.reset();  // an initial copy cut short is of no use
    syncing_pin_.reset();
    syncing_disks_.reset();
    bytes_received_done_ += link->bytes_received();
    link_ = nullptr;
    session_running_ = false;
    cv_.NotifyAll();
    // A promotion ended this session; it owns the state now.
    if (state_ == DomainState::kPromoting || state_ == DomainState::kFailedOver) return;
    Status restorable = Restorable();
    std::string nothing = restorable.ok() ? "" : "; " + restorable.message();
    if (state_ == DomainState::kSwitchingOver && out.end != SessionEnd::kEnded) {
      // The primary's guest stays paused at the final checkpoint for good:
      // promote from it, at once when the primary said its QEMU ended, after
      // the heartbeat timeout when the link just ended (it may still be
      // ending it). An operator's switchover: --no-auto-promote does not apply.
      Transition(DomainEvent::kPrimaryLost);
      std::string reason = "planned switchover from " + primary_ + " at checkpoint " +
                           std::to_string(switchover_epoch_);
      if (out.end == SessionEnd::kSwitchover || out.end == SessionEnd::kFailover) {
        error_.clear();
      } else {
        error_ = reason + ": the link ended before the primary confirmed its QEMU ended (" + out.why +
                 "); promoting after the heartbeat timeout" + nothing;
        LOG_WARN(tag_) << error_;
        reason += " (unconfirmed: " + out.why + ")";
        wait = std::max(Nanos(0), session.heartbeat().timeout - session.SilentFor());
      }
      l.Unlock();
      AutoPromoteAfter(gen, wait, reason);
      // Reverse protection: the old primary listens as this guest's backup.
      json detail;
      {
        MutexLock g(mu_);
        if (state_ != DomainState::kFailedOver || switchover_msg_.reprotect_to.empty()) return;
        const wire::SwitchoverMsg& m = switchover_msg_;
        detail = {{"reprotect_to", m.reprotect_to},
                  {"interval_ms", m.interval_ms > 0 ? m.interval_ms : config_.interval_ms},
                  {"interval_mode", config_.interval_mode},
                  {"latency_budget_ms", config_.latency_budget_ms},
                  {"interval_min_ms", config_.interval_min_ms},
                  {"interval_max_ms", config_.interval_max_ms},
                  {"netbuf", m.netbuf.empty() ? config_.netbuf : m.netbuf},
                  {"compress", wire::CompressionName(config_.compress, config_.page_delta == "xor")},
                  {"disks", config_.disks_option},
                  {"residency", config_.residency}};
      }
      if (opts_.on_switched_over) {
        LOG_INFO(tag_) << "switchover done; protecting the guest back to " << detail["reprotect_to"].get<std::string>();
        opts_.on_switched_over(name_, detail);
      }
      return;
    }
    switch (out.end) {
      case SessionEnd::kEnded: {
        // GOODBYE, or an ERROR either way: the primary lived when protection
        // ended, and its guest runs on unprotected past our last checkpoint.
        // Restoring that checkpoint now would roll the guest back behind
        // output clients already saw, next to a copy that still runs: it is
        // retired (durably, so a restart does not bring it back either).
        Transition(DomainEvent::kPrimaryEnded);
        std::string epoch = committed_ ? " " + std::to_string(committed_->committed_epoch()) : "";
        Status r = RetireCheckpoint(out.why + "; the primary lives on unprotected and its guest ran on past checkpoint" +
                                    epoch + ", so that checkpoint was retired (restoring it would roll the guest back)" +
                                    "; protect " + name_ + " again from the primary");
        if (!r.ok()) LOG_ERROR(tag_) << "retiring the checkpoint: " << r.ToString();
        error_ = no_checkpoint_reason_.empty() ? out.why : no_checkpoint_reason_;
        LOG_WARN(tag_) << error_;
        return;
      }
      case SessionEnd::kPromoting:
      case SessionEnd::kSwitchover:  // only after an accepted switchover (above)
        return;
      case SessionEnd::kFailover:
        Transition(DomainEvent::kPrimaryLost);
        if (!opts_.auto_promote) {
          error_ = out.why + "; not promoting by itself (--no-auto-promote): run `remusctl failover " + name_ + "`";
          LOG_WARN(tag_) << error_;
          return;
        }
        error_ = out.why + nothing;
        break;
      case SessionEnd::kLost:
        Transition(DomainEvent::kPrimaryLost);
        error_ = "lost the primary: " + out.why + nothing;
        LOG_WARN(tag_) << error_;
        if (!opts_.auto_promote) return;
        // Fail-stop detection: the primary is dead once it has been silent
        // for the heartbeat timeout (a closed connection alone could be a
        // restart).
        wait = std::max(Nanos(0), session.heartbeat().timeout - session.SilentFor());
        break;
    }
  }
  AutoPromoteAfter(gen, wait, out.end == SessionEnd::kFailover ? out.why : "primary lost: " + out.why);
}

// ---- what the session hands over ----

bool BackupDomain::Promoting() {
  MutexLock l(mu_);
  return state_ == DomainState::kPromoting;
}

Status BackupDomain::AcceptSwitchover(uint64_t epoch, const wire::SwitchoverMsg& msg) {
  MutexLock l(mu_);
  const std::string e = std::to_string(epoch);
  if (state_ != DomainState::kProtected)
    return FailedPrecondition("domain " + name_ + " is " + std::string(DomainStateName(state_)) +
                              " on this backup, not protected; refusing the switchover at checkpoint " + e);
  if (!committed_ || committed_->committed_epoch() != epoch)
    return FailedPrecondition("domain " + name_ + ": the primary names checkpoint " + e +
                              " as the final one, but this backup's committed checkpoint is " +
                              (committed_ ? std::to_string(committed_->committed_epoch()) : std::string("none")) +
                              "; refusing the switchover");
  RETURN_IF_ERROR(Restorable().Annotate("refusing the switchover at checkpoint " + e));
  if (!NextState(state_, DomainEvent::kSwitchover))
    return FailedPrecondition("domain " + name_ + ": cannot switch over now");
  RETURN_IF_ERROR(WriteDurable(dir_, kSwitchoverFile,
                               e + " " + std::filesystem::path(committed_->dir()).filename().string() + "\n")
                      .Annotate("domain " + name_ + ": refusing the switchover at checkpoint " + e +
                                ": cannot record its acceptance"));
  Transition(DomainEvent::kSwitchover);
  switchover_epoch_ = static_cast<int64_t>(epoch);
  switchover_msg_ = msg;
  cv_.NotifyAll();
  return OkStatus();
}

Status BackupDomain::CheckQemuRelease(const wire::ConfigMsg& c) const {
  // The version rule (replicator/qemu/version.h), checked now rather than
  // found out when a promotion's restore is refused.
  if (c.qemu_version.empty()) {
    LOG_WARN(tag_) << "domain " << name_ << ": the primary did not say its QEMU version; the version rule "
                   << "(same QEMU release on both hosts) is not checked";
    return OkStatus();
  }
  auto primary = qemu::ParseQemuRelease(c.qemu_version);
  if (!primary.ok())
    return InvalidArgument("domain " + name_ + ": CONFIG's qemu_version: " + primary.status().message());
  auto to_run = QemuToRun(c);
  if (!to_run.ok())
    return Status(to_run.status().code(), "domain " + name_ + ": no QEMU here to restore it with: " +
                                              to_run.status().message() + "; this backup refuses to protect it");
  const std::string& binary = *to_run;
  if (binary.empty()) return OkStatus();  // libvirt's default emulator: libvirt checks on restore
  auto mine = opts_.qemu_release ? opts_.qemu_release(binary) : qemu::QemuBinaryVersion(binary);
  if (!mine.ok())
    return FailedPrecondition("domain " + name_ + ": cannot tell which QEMU " + binary +
                              " is (" + mine.status().message() + "); this backup refuses to protect it");
  return qemu::CheckSameRelease(name_, *primary, *mine, binary);
}

Status BackupDomain::AcceptConfig(wire::ConfigMsg c) {
  // Both hosts must arbitrate the same way: a backup without an arbiter
  // would promote behind an etcd primary's back, and an etcd backup could
  // never win a session no primary holds a lease for.
  const std::string theirs = c.arbiter.empty() ? "none" : c.arbiter;
  if (theirs != arbiter_->name())
    return FailedPrecondition("the primary runs with --arbiter " + theirs + " but this backup with --arbiter " +
                              std::string(arbiter_->name()) + "; give both hosts the same arbiter");
  // What the primary would have this host run, checked before anything here
  // changes: a refusal writes nothing, starts nothing, and (as ERROR) leaves
  // the primary's guest running unprotected.
  if (Status p = CheckPeerConfig(c, opts_.peer_policy, !opts_.qemu_binary.empty()); !p.ok())
    return Status(p.code(), "domain " + name_ + ": " + p.message() + "; this backup refuses to protect it");
  RETURN_IF_ERROR(CheckQemuRelease(c));
  RETURN_IF_ERROR(MakeDirs(dir_ + "/run", 0700));
  MutexLock g(mu_);
  session_config_ = std::move(c);
  // The guest ran on since the last checkpoint this backup committed (that is
  // why there is a new session): that checkpoint is stale from now on.
  return RetireCheckpoint("a new protection session from " + primary_ +
                          " began, and its initial copy has not committed yet");
}

namespace {
bool WantsHot(const wire::ConfigMsg& c) { return c.residency != "paged"; }

std::vector<std::string> StoreFiles(const PageStore& s) {
  std::vector<std::string> files;
  for (size_t i = 0; i < s.blocks().size(); i++) files.push_back(s.BlockPath(i));
  return files;
}
}  // namespace

StatusOr<SessionHost::SyncTarget> BackupDomain::BeginSync(const wire::SyncBeginMsg& b) {
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
  // Residency "hot": admitted only if this host can keep the whole guest RAM
  // resident, and refused before the initial copy sends a page.
  const bool hot = WantsHot(config);
  if (hot) {
    ASSIGN_OR_RETURN(MemInfo mi, ReadMemInfo(opts_.meminfo_path));
    if (Status a = CheckHotAdmission(b.total_bytes, 0, mi, opts_.hot_headroom_bytes); !a.ok())
      return Status(a.code(), "domain " + name_ + ": " + a.message());
  }
  ASSIGN_OR_RETURN(auto store, PageStore::Create(store_dir, b.blocks));
  std::unique_ptr<ResidencyPin> pin;
  if (hot) {
    TimePoint t0 = clock_.Now();
    auto p = ResidencyPin::Pin(StoreFiles(*store));
    if (!p.ok()) return Status(p.status().code(), "domain " + name_ + ": " + p.status().message());
    pin = std::move(p).value();
    LOG_INFO(tag_) << "residency hot: " << pin->locked_bytes() << " bytes of page store locked in memory in "
                   << static_cast<int64_t>(ToMillis(clock_.Now() - t0)) << " ms";
  }
  RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/configuration.bin", b.configuration));
  // The CONFIG belongs with the store it describes: it becomes the restorable
  // one only when this store does.
  RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/config.json", wire::EncodeConfig(config)));
  std::shared_ptr<DiskReplicaSet> disks;
  if (!config.disks.empty()) {
    json list = json::array();
    for (const auto& d : config.disks) list.push_back(wire::DiskSpecToJson(d));
    RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/disks.json", list.dump()));
    ASSIGN_OR_RETURN(disks, OpenDisks(store->dir(), std::nullopt));
    LOG_INFO(tag_) << "mirroring " << config.disks.size() << " disk(s) into " << dir_ << "/disks";
  }
  MutexLock g(mu_);
  configuration_section_ = b.configuration;
  syncing_ = std::move(store);
  syncing_pin_ = std::move(pin);
  syncing_disks_ = disks;
  Transition(DomainEvent::kSyncBegin);
  return SyncTarget{syncing_.get(), std::move(disks), base_.get()};
}

Status BackupDomain::CommitInitial(std::string_view blob, uint64_t page_count) {
  MutexLock g(mu_);
  if (!syncing_) return FailedPrecondition("COMMIT of the initial copy without SYNC_BEGIN");
  RETURN_IF_ERROR(syncing_->CompleteInitialSync(blob, 0));
  // This session's image is the restorable one from now on.
  RETURN_IF_ERROR(WriteDurable(dir_, "current", std::filesystem::path(syncing_->dir()).filename().string()));
  ::unlink((dir_ + "/retired").c_str());
  // The new image replaces the base it may have been resynced from.
  if (base_) RemoveBase("the initial copy of " + std::filesystem::path(syncing_->dir()).filename().string() + " committed");
  ::unlink((dir_ + "/promoted.json").c_str());  // a new session replaces an old promotion
  ::unlink((dir_ + "/promoting.json").c_str());
  committed_ = std::move(syncing_);
  pin_ = std::move(syncing_pin_);
  if (pin_) {
    // Pages the copy wrote are locked too (cheap when all are resident).
    Status r = pin_->Refresh();
    if (!r.ok()) LOG_WARN(tag_) << "residency hot: " << r.ToString();
  }
  committed_configuration_ = configuration_section_;
  config_ = session_config_;
  committed_disks_ = std::move(syncing_disks_);
  disk_synced_epoch_ = -1;
  no_checkpoint_reason_.clear();
  bool disks_pending = committed_disks_ != nullptr;
  Transition(disks_pending ? DomainEvent::kInitialCommit : DomainEvent::kProtectedNow);
  LOG_INFO(tag_) << "initial copy committed (" << page_count << " pages)"
                 << (disks_pending ? "; disks still copying" : "; standing by");
  return OkStatus();
}

Status BackupDomain::CommitCheckpoint(uint64_t epoch, Staging& st) {
  MutexLock g(mu_);
  if (!committed_) return FailedPrecondition("checkpoint " + std::to_string(epoch) + " before the initial copy");
  return committed_->Commit(epoch, std::move(st));
}

StatusOr<const uint8_t*> BackupDomain::CommittedPage(uint32_t block, uint64_t offset) {
  MutexLock g(mu_);
  if (!committed_) return FailedPrecondition("an XOR page record before the initial copy committed");
  return committed_->Page(block, offset);
}

Status BackupDomain::DisksSynced(int64_t epoch) {
  MutexLock g(mu_);
  if (disk_synced_epoch_ >= 0 || !committed_) return OkStatus();
  disk_synced_epoch_ = epoch;
  RETURN_IF_ERROR(WriteFileAtomic(committed_->dir() + "/disks-synced", std::to_string(disk_synced_epoch_)));
  Transition(DomainEvent::kProtectedNow);
  LOG_INFO(tag_) << "disk copies complete as of checkpoint " << disk_synced_epoch_ << "; standing by";
  return OkStatus();
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
    LOG_INFO(tag_) << "checkpoint " << committed_->committed_epoch() << " retired: " << why;
    // Never restored again, but kept as the next session's delta resync base:
    // `current` is gone (durably) already, so nothing can promote it.
    if (base_) RemoveBase("a newer image replaces it as the resync base");
    std::string name = std::filesystem::path(committed_->dir()).filename().string();
    Status b = WriteDurable(dir_, "base", name);
    if (b.ok()) {
      base_ = std::move(committed_);
      LOG_INFO(tag_) << "kept " << name << " as the delta resync base";
    } else {
      LOG_WARN(tag_) << "cannot keep " << name << " as the delta resync base: " << b.ToString();
      std::error_code ec;
      std::filesystem::remove_all(committed_->dir(), ec);
    }
  }
  committed_.reset();
  pin_.reset();  // a resync base need not be resident
  committed_configuration_.clear();
  config_ = wire::ConfigMsg();
  stats_.last_committed = -1;
  return OkStatus();
}

const PageStore* BackupDomain::ResyncBase(std::string* why) {
  MutexLock g(mu_);
  if (!base_) *why = "this backup holds no earlier image of " + name_;
  return base_.get();
}

void BackupDomain::DropResyncBase(const std::string& why) {
  MutexLock g(mu_);
  if (base_) RemoveBase(why);
}

void BackupDomain::RemoveBase(const std::string& why) {
  ::unlink((dir_ + "/base").c_str());
  std::string d = base_->dir();
  base_.reset();
  std::error_code ec;
  std::filesystem::remove_all(d, ec);
  LOG_INFO(tag_) << "removed the delta resync base " << d << ": " << why;
}

std::string BackupDomain::RecoverBase(const std::string& current, const char* file) {
  auto b = ReadFileToString(dir_ + "/" + file);
  if (!b.ok()) return "";
  std::string name = *b;
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  bool valid = name.rfind("store-", 0) == 0 && name.find('/') == std::string::npos && name != current;
  StatusOr<std::unique_ptr<PageStore>> s = valid ? PageStore::Open(dir_ + "/" + name)
                                                 : StatusOr<std::unique_ptr<PageStore>>(NotFound("not a base"));
  if (!s.ok()) {
    LOG_WARN(tag_) << "dropping the delta resync base '" << name << "': " << s.status().ToString();
    if (std::string(file) != "base") return "";  // not ours to remove
    ::unlink((dir_ + "/base").c_str());
    if (valid) {
      std::error_code ec;
      std::filesystem::remove_all(dir_ + "/" + name, ec);
    }
    return "";
  }
  MutexLock g(mu_);
  base_ = std::move(s).value();
  LOG_INFO(tag_) << "kept " << name << " as the delta resync base";
  return name;
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
      if (stopping_ || generation_ != generation || !AwaitingPromotion()) {
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
  std::optional<PromotionGrant> grant = Arbitrate(generation, reason);
  if (!grant) return;
  Status p = PromoteImpl(reason, generation, grant);
  if (!p.ok()) LOG_ERROR(tag_) << "automatic promotion did not happen: " << p.ToString();
}

std::optional<PromotionGrant> BackupDomain::Arbitrate(uint64_t generation, const std::string& reason) {
  std::string last;
  for (;;) {
    std::string session;
    {
      MutexLock l(mu_);
      if (stopping_ || generation_ != generation || !AwaitingPromotion()) {
        arbitration_.clear();
        return std::nullopt;
      }
      // Nothing to restore: PromoteImpl says so as a failed promotion;
      // winning etcd first would only take the domain from everyone.
      if (!Restorable().ok()) return PromotionGrant{};
      session = config_.session;
    }
    StatusOr<PromotionGrant> g = arbiter_->MayPromote(name_, session);
    MutexLock l(mu_);
    if (g.ok()) {
      arbitration_.clear();
      return *g;
    }
    if (g.status().code() == Code::kAborted) {
      arbitration_ = "not promoting: " + g.status().message();
      error_ = reason + "; " + arbitration_;
      LOG_ERROR(tag_) << error_;
      return std::nullopt;
    }
    arbitration_ = "waiting for arbitration: " + g.status().message();
    if (arbitration_ != last) LOG_WARN(tag_) << reason << "; " << arbitration_;
    last = arbitration_;
    cv_.WaitFor(mu_, opts_.arbitration_retry,
                [&]() REQUIRES(mu_) { return stopping_ || generation_ != generation; });
  }
}

Status BackupDomain::PromoteImpl(const std::string& reason, std::optional<uint64_t> generation,
                                 std::optional<PromotionGrant> grant) {
  if (!grant) {
    // An operator's failover: arbitration first, while nothing has changed
    // here yet (a primary that still holds its lease keeps its session).
    std::string session;
    {
      MutexLock l(mu_);
      if (state_ != DomainState::kPromoting && state_ != DomainState::kFailedOver && Restorable().ok())
        session = config_.session;
    }
    if (!session.empty() || arbiter_->name() == "none") {
      StatusOr<PromotionGrant> g = arbiter_->MayPromote(name_, session);
      if (!g.ok()) return g.status().Annotate("domain " + name_ + ": arbitration refused the promotion");
      grant = *g;
    }
  }
  {
    MutexLock l(mu_);
    if (generation && (*generation != generation_ || !AwaitingPromotion() || stopping_))
      return Cancelled("domain " + name_ + ": the automatic promotion of session " + std::to_string(*generation) +
                       " was superseded");
    if (state_ == DomainState::kPromoting)
      return FailedPrecondition("domain " + name_ + ": a promotion is already under way (" + promote_reason_ + ")");
    if (state_ == DomainState::kFailedOver)
      return FailedPrecondition("domain " + name_ + " was promoted already (" + promote_reason_ +
                                "); its guest runs here");
    if (state_ == DomainState::kEnded)
      return FailedPrecondition("domain " + name_ + ": the guest promoted here from checkpoint " +
                                std::to_string(stats_.last_committed.load()) +
                                " ran and is gone; it ran past that checkpoint, so it is never promoted again");
    if (Status r = Restorable(); !r.ok()) {
      if (generation) {
        // The primary is gone and nothing here can replace it: the guest is
        // down. Say so as a failed promotion, not as a loss still pending.
        promotion_tried_ = true;
        promote_reason_ = reason;
        promote_error_ = r.message();
        error_ = reason + "; cannot promote: " + r.message();
        Transition(DomainEvent::kPromote);
        Transition(DomainEvent::kPromoteFailed);
        LOG_ERROR(tag_) << error_;
      }
      return r;
    }
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
  Status s = grant ? OkStatus() : FailedPrecondition("domain " + name_ + ": no arbitration was won");
  PromoteInput in;
  if (s.ok()) {
    MutexLock l(mu_);
    promotion_token_ = grant->token;
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
    promote_error_ = s.message();
    error_ = "promotion failed: " + s.message();
    Transition(DomainEvent::kPromoteFailed);
    return s.Annotate("domain " + name_);
  }
  failover_ms_ = static_cast<int64_t>(ToMillis(clock_.Now() - t0));
  stats_.last_committed = static_cast<int64_t>(in.epoch);
  Transition(DomainEvent::kPromoted);
  failovers_total_++;
  // Remembered across a restart of remusd: the guest runs here now, and
  // restoring the (older) checkpoint again would make a second copy.
  json marker = {{"pid", qemu_pid_}, {"qmp_socket", qmp_socket_}, {"epoch", in.epoch}, {"reason", reason},
                 {"arbiter", std::string(arbiter_->name())}, {"token", promotion_token_}};
  if (!libvirt_uri_.empty()) marker["libvirt"] = {{"uri", libvirt_uri_}, {"domain", libvirt_domain_}};
  Status w = WriteDurable(dir_, "promoted.json", marker.dump());
  if (!w.ok()) LOG_ERROR(tag_) << "cannot record the promotion: " << w.ToString();
  else ::unlink((dir_ + "/promoting.json").c_str());
  // From now on this node owns the domain: its copy is what it fences.
  std::function<Status()> destroy;
  if (!libvirt_uri_.empty())
    destroy = [uri = libvirt_uri_, dom = libvirt_domain_] { return DestroyLibvirtDomain(uri, dom); };
  arbiter_->Promoted(name_, qemu_pid_, std::move(destroy));
  LOG_INFO(tag_) << "promoted in " << failover_ms_ << " ms (detection excluded); the guest runs here now"
                 << (promotion_token_ ? " (fencing token " + std::to_string(promotion_token_) + ")" : "");
  return OkStatus();
}

StatusOr<std::string> BackupDomain::QemuToRun(const wire::ConfigMsg& config) const {
  // Ours, never a path the primary chose.
  if (!opts_.qemu_binary.empty()) return opts_.qemu_binary;
  if (config.libvirt) {
    std::string emulator = DomainXmlEmulator(config.libvirt->xml);
    if (emulator.empty()) return std::string();
    return ResolveQemuBinary("", emulator);
  }
  if (config.argv.empty()) return std::string();
  // Checked to be qemu-system-ARCH (CheckPeerConfig): found in our PATH.
  return ResolveQemuBinary("", config.argv[0]);
}

Status BackupDomain::DoPromote(const PromoteInput& in) {
  // Defence in depth: the config.json a restart read back is peer input too,
  // and the policy may have changed since it was accepted.
  bool via_libvirt = in.config.libvirt.has_value();
  RETURN_IF_ERROR(CheckPeerConfig(in.config, opts_.peer_policy, !opts_.qemu_binary.empty())
                      .Annotate("domain " + name_ + ": the stored configuration of checkpoint " +
                                std::to_string(in.epoch) + " is refused"));
  ASSIGN_OR_RETURN(std::string qemu, QemuToRun(in.config));
  RestoreRequest req;
  req.domain = name_;
  req.store = in.store;
  req.configuration = in.configuration;
  req.config = in.config;
  req.run_dir = dir_ + "/run";
  req.epoch = in.epoch;
  req.progress = &restore_progress_;
  req.phase = &promote_phase_;
  req.map_ram = opts_.restore_by_mapping;
  if (in.disks) {
    MutexLock dg(disk_mu_);
    promote_phase_ = "applying disk writes";
    RETURN_IF_ERROR(in.disks->ApplyAll().Annotate("domain " + name_ + ": bringing the disk images to checkpoint " +
                                                  std::to_string(in.epoch)));
    for (size_t i = 0; i < in.disks->size(); i++) req.drive_images[in.disks->disk(i).id] = in.disks->ImagePath(i);
  }
  RETURN_IF_ERROR(MakeDirs(req.run_dir, 0700));
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
        LibvirtPromoterOptions{opts_.libvirt_uri, opts_.libvirt_pid_dir, qemu});
  else
    promoter = std::make_unique<QemuPromoter>(launcher_, QemuPromoterOptions{qemu, opts_.qemu_start_timeout_ms});
  StatusOr<RestoredGuest> g = promoter->Restore(req);
  MutexLock l(mu_);
  if (!g.ok()) {
    qemu_pid_ = -1;
    qemu_ours_ = false;
    return g.status();
  }
  qemu_pid_ = g->pid;
  qemu_ours_ = g->ours;
  restore_result_ = {{"mode", g->restore_mode},
                     {"stream_bytes", g->streamed_bytes},
                     {"mapped_bytes", g->mapped_bytes}};
  if (!g->stream_reason.empty()) restore_result_["reason"] = g->stream_reason;
  LOG_INFO(tag_) << "checkpoint " << in.epoch << " restored "
                 << (g->restore_mode == "mapped" ? "by mapping main RAM from the page store"
                                                 : "by streaming every page (" + g->stream_reason + ")");
  qmp_socket_ = g->qmp_socket;
  remus_qmp_socket_ = g->remus_qmp_socket;
  libvirt_uri_ = g->libvirt_uri;
  libvirt_domain_ = g->libvirt_domain;
  return OkStatus();
}

// ---- recovery ----

Status BackupDomain::Recover() {
  StatusOr<FoundPromotion> p = FindPromotion(dir_, name_, opts_.libvirt_pid_dir);
  if (p.ok()) {
    // The store the promotion was made from is never restored again, but it
    // is the delta resync's base when the domain is protected to this host
    // again.
    RecoverBase("", "current");
    // A promotion ran, or was under way: its guest may have run, so this
    // checkpoint is never restored again by itself.
    MutexLock g(mu_);
    stats_.last_committed = p->marker.epoch;
    promotion_token_ = p->marker.token;
    promotion_tried_ = true;
    promote_reason_ = p->finished ? "promoted before remusd restarted" : "a promotion was under way when remusd stopped";
    if (p->alive) {
      qemu_pid_ = p->pid;
      if (p->marker.via_libvirt) {
        libvirt_uri_ = p->marker.libvirt_uri.empty() ? opts_.libvirt_uri : p->marker.libvirt_uri;
        libvirt_domain_ = p->marker.libvirt_domain.empty() ? name_ : p->marker.libvirt_domain;
      } else {
        qmp_socket_ = p->finished ? p->marker.qmp_socket : dir_ + "/run/" + kRestoredQmpSocket;
        remus_qmp_socket_ = dir_ + "/run/" + kRestoredRemusdQmpSocket;
      }
      Transition(DomainEvent::kRecoveredPromotion);
      // The fence watchdog of the remusd that died may have stopped it at
      // its lease's deadline; no other host can take a promoted session.
      ::kill(p->pid, SIGCONT);
      LOG_INFO(tag_) << "the guest promoted here before the restart runs on (pid " << p->pid << ")";
    } else {
      error_ = std::string(p->finished ? "the guest promoted here before remusd restarted"
                                       : "a promotion was under way when remusd stopped, and the guest it started") +
               " (pid " + std::to_string(p->pid) + ") is gone; its checkpoint " + std::to_string(p->marker.epoch) +
               " is older than what that guest may have run, so it is not restored again; protect the domain "
               "to this host again from where it runs";
      promote_error_ = error_;
      Transition(p->finished ? DomainEvent::kRecoveredEnded : DomainEvent::kRecoveredBroken);
      LOG_ERROR(tag_) << error_;
    }
    return OkStatus();
  }
  if (p.status().code() != Code::kNotFound) return p.status();
  std::string retired;
  StatusOr<KeptCheckpoint> k = LoadKeptCheckpoint(dir_, name_, &retired);
  if (!k.ok() && k.status().code() == Code::kNotFound && !retired.empty()) {
    // A re-sync began and never committed: there is no checkpoint to keep,
    // and the retired one must not come back (as a resync base it may).
    RecoverBase("");
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
  std::string base = RecoverBase(k->store_name);
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir_, ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind("store-", 0) == 0 && n != k->store_name && n != base) std::filesystem::remove_all(e.path(), ec);
  }
  // A switchover accepted at exactly this checkpoint: the primary ended (or
  // is ending) its QEMU for good.
  int64_t accepted = -1;
  if (auto t = ReadFileToString(dir_ + "/" + kSwitchoverFile); t.ok()) {
    std::istringstream in(*t);
    int64_t e = -1;
    std::string store_name;
    if (in >> e >> store_name && e == static_cast<int64_t>(store.committed_epoch()) && store_name == k->store_name)
      accepted = e;
    else
      LOG_WARN(tag_) << "ignoring " << kSwitchoverFile << " (\"" << t->substr(0, 64)
                     << "\"): it does not name the kept checkpoint";
  }
  std::unique_ptr<ResidencyPin> pin;
  if (WantsHot(k->config)) {
    auto pinned = ResidencyPin::Pin(StoreFiles(store));
    if (pinned.ok()) pin = std::move(pinned).value();
    else LOG_WARN(tag_) << "residency hot: cannot lock the kept checkpoint in memory: " << pinned.status().ToString();
  }
  MutexLock g(mu_);
  pin_ = std::move(pin);
  config_ = std::move(k->config);
  committed_configuration_ = std::move(k->configuration);
  stats_.last_committed = static_cast<int64_t>(store.committed_epoch());
  committed_ = std::move(k->store);
  committed_disks_ = std::move(disks);
  disk_synced_epoch_ = synced;
  Transition(DomainEvent::kRecoveredCheckpoint);
  if (accepted < 0) {
    error_ = "remusd restarted; checkpoint " + std::to_string(stats_.last_committed.load()) +
             " is kept: run `remusctl failover " + name_ + "` if the primary is gone, or protect again from the primary";
    LOG_WARN(tag_) << error_;
    return OkStatus();
  }
  // Promote it as the session would have: after the heartbeat timeout (the
  // primary may still be ending its QEMU), arbitrated like any promotion.
  switchover_epoch_ = accepted;
  const Nanos wait = std::max<Nanos>(opts_.heartbeat.timeout, std::chrono::milliseconds(config_.heartbeat_timeout_ms));
  const std::string reason = "planned switchover at checkpoint " + std::to_string(accepted) +
                             ", accepted before remusd restarted";
  error_ = reason + ": promoting it in " + std::to_string(static_cast<int64_t>(ToMillis(wait))) + " ms (the primary ended its QEMU)";
  LOG_WARN(tag_) << error_;
  recovered_promotion_ = std::thread([this, gen = generation_, wait, reason] { AutoPromoteAfter(gen, wait, reason); });
  return OkStatus();
}

// ---- the promoted guest ----

int BackupDomain::LiveGuestPid() const {
  if (state_ != DomainState::kFailedOver) return -1;
  int pid = qemu_pid_;
  if (pid <= 0) return -1;
  if (qemu_ours_) return launcher_->Running(pid) ? pid : -1;
  return ProcessRunning(pid) ? pid : -1;  // libvirt's child or one from before a restart
}

void BackupDomain::NoticeGuestGoneLocked() {
  if (state_ != DomainState::kFailedOver || LiveGuestPid() > 0) return;
  Transition(DomainEvent::kPromotedGuestGone);
  error_ = "the guest promoted here (pid " + std::to_string(qemu_pid_) + ", from checkpoint " +
           std::to_string(stats_.last_committed.load()) +
           ") no longer runs here; that checkpoint is never promoted again; this host may back the domain up anew";
  LOG_WARN(tag_) << error_;
}

void BackupDomain::NoticeGuestGone() {
  MutexLock l(mu_);
  NoticeGuestGoneLocked();
}

std::optional<BackupDomain::PromotedGuest> BackupDomain::RunningGuest() const {
  MutexLock l(mu_);
  int pid = LiveGuestPid();
  if (pid <= 0) return std::nullopt;
  PromotedGuest g;
  g.pid = pid;
  if (libvirt_uri_.empty()) g.qmp_socket = remus_qmp_socket_;
  g.libvirt_uri = libvirt_uri_;
  g.libvirt_domain = libvirt_domain_;
  return g;
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
  uint64_t total = stats_.sync_total, done = std::min<uint64_t>(stats_.sync_done, stats_.sync_total);
  double pct = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0;
  if (st == DomainState::kSyncing || st == DomainState::kWaiting) pct = std::min(pct, 99.0);
  else if (stats_.last_committed >= 0) pct = 100.0;
  j["sync"] = {{"total_bytes", total}, {"done_bytes", done}, {"percent", pct}};
  j["last_committed_epoch"] = stats_.last_committed.load();
  j["apply_ms"] = {{"p50", stats_.apply_ms.Quantile(0.5)}, {"p99", stats_.apply_ms.Quantile(0.99)}};
  // The names of heartbeat/promotion.h's PromotionState, as before the split.
  std::string pstate(PromotionStateName(st == DomainState::kPromoting   ? PromotionState::kPromoting
                                        : st == DomainState::kFailedOver ? PromotionState::kPromoted
                                        : st == DomainState::kFailed && promotion_tried_ ? PromotionState::kFailed
                                                                                         : PromotionState::kStandby));
  j["promotion"] = {{"state", pstate}, {"reason", promote_reason_}, {"error", promote_error_},
                    {"failover_ms", failover_ms_.load()}, {"token", promotion_token_}};
  if (!arbitration_.empty()) j["promotion"]["arbitration"] = arbitration_;
  if (switchover_epoch_ >= 0) j["promotion"]["switchover_epoch"] = switchover_epoch_;
  if (!restore_result_.is_null()) j["promotion"]["restored_by"] = restore_result_;
  j["arbiter"] = arbiter_->StatusJson(name_);
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
  if (j["restorable"].get<bool>() && committed_) {
    // What a failover would do now (the log says it again when it happens).
    RestorePlanInfo plan = PlanRestore(config_, *committed_, opts_.restore_by_mapping);
    j["restore_plan"] = {{"mode", plan.mode},
                         {"mapped_bytes", plan.mapped_bytes},
                         {"streamed_ram_bytes", plan.streamed_ram_bytes}};
    if (!plan.reason.empty()) j["restore_plan"]["reason"] = plan.reason;
  }
  if (const PageStore* store = committed_ ? committed_.get() : syncing_.get()) {
    // How much of the guest's memory a failover would find in RAM here.
    const bool hot = WantsHot(committed_ ? config_ : session_config_);
    const ResidencyPin* pin = committed_ ? pin_.get() : syncing_pin_.get();
    json r = {{"policy", hot ? "hot" : "paged"}, {"locked_bytes", pin ? pin->locked_bytes() : 0}};
    const std::vector<std::string> files = StoreFiles(*store);
    auto m = MeasureResidency(files);
    if (m.ok()) {
      double resident_pct =
          m->total_bytes ? 100.0 * static_cast<double>(m->resident_bytes) / static_cast<double>(m->total_bytes)
                         : 100.0;
      r["resident_bytes"] = m->resident_bytes;
      r["total_bytes"] = m->total_bytes;
      r["resident_percent"] = resident_pct;
      if (hot && m->resident_bytes < m->total_bytes)
        r["warning"] = "residency hot, but only " + std::to_string(static_cast<int>(resident_pct)) +
                       "% of the page store is in memory: a failover now would read the rest from disk";
    } else {
      r["error"] = m.status().message();
    }
    j["residency"] = std::move(r);
    // What this domain takes from the backup (N-to-1: each is bounded by the
    // guest's size and max_staged_bytes, and one session's threads).
    uint64_t allocated = 0;
    for (const auto& f : files) {
      struct stat sb;
      if (::stat(f.c_str(), &sb) == 0) allocated += static_cast<uint64_t>(sb.st_blocks) * 512;
    }
    const bool live = session_running_;
    j["resources"] = {
        {"memory", {{"locked_bytes", pin ? pin->locked_bytes() : 0}, {"staged_limit_bytes", opts_.max_staged_bytes}}},
        {"disk", {{"store_bytes", store->total_bytes()}, {"store_allocated_bytes", allocated}}},
        // Per session: one receives and applies, one acks, one sends heartbeats.
        {"threads", {{"session", live ? 3 : 0}, {"apply", live ? 1 : 0}}}};
  }
  j["session"] = generation_;
  j["ack_delay_ms"] = opts_.ack_delay_ms;
  j["checkpoints_total"] = stats_.checkpoints_total.load();
  j["failovers_total"] = failovers_total_.load();
  j["histograms"] = {{"apply_seconds", HistogramToJson(stats_.apply_hist.Snapshot())}};
  j["link"] = {{"bytes_received", bytes_received_done_ + (link_ ? link_->bytes_received() : 0)}};
  j["primary"] = primary_;
  j["connected"] = session_running_;
  j["error"] = error_;
  j["qmp_socket"] = qmp_socket_;
  if (!remus_qmp_socket_.empty()) j["remusd_qmp_socket"] = remus_qmp_socket_;
  int pid = qemu_pid_;
  if (qemu_ours_) {
    if (!launcher_->Running(pid)) pid = -1;
  } else if (pid > 0 && !ProcessRunning(pid)) {
    pid = -1;  // libvirt's child or one from before a restart, not ours to reap
  }
  if (!libvirt_uri_.empty()) j["libvirt"] = {{"uri", libvirt_uri_}, {"domain", libvirt_domain_}};
  j["qemu"] = {{"pid", pid}};
  if (committed_) j["store"] = committed_->dir();
  // The compression the committed session's primary uses on the link.
  j["compress"] = wire::CompressionName(config_.compress, config_.page_delta == "xor");
  {
    // The last initial copy: how much of it the delta resync kept.
    uint64_t offered = stats_.initial_offered_pages, kept = stats_.initial_kept_pages;
    int verified = stats_.initial_verified;
    j["initial_copy"] = {{"mode", offered > 0 ? "delta" : "full"},
                         {"offered_pages", offered},
                         {"kept_pages", kept},
                         {"received_pages", stats_.initial_received_pages.load()},
                         {"bytes_saved", kept * wire::kPageSize},
                         {"verified", verified < 0 ? json(nullptr) : json(verified == 1)}};
    if (base_) j["initial_copy"]["base"] = base_->dir();
  }
  if (committed_disks_) {
    json ids = json::array();
    for (size_t i = 0; i < committed_disks_->size(); i++)
      ids.push_back({{"id", committed_disks_->disk(i).id}, {"image", committed_disks_->ImagePath(i)}});
    j["disks"] = {{"images", ids}, {"synced_epoch", disk_synced_epoch_}};
  }
  return j;
}

}  // namespace remus
