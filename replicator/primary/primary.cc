#include "replicator/primary/primary.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>

#include "common/hex.h"
#include "common/log.h"
#include "replicator/libvirt/interfaces.h"
#include "replicator/libvirt/restore.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

namespace {

constexpr size_t kBatchBytes = 4u << 20;          // PAGES payload target
constexpr uint64_t kInitialQueueBound = 64u << 20;  // flow control during the initial copy

// Wall-clock seconds with microseconds, for debug lines that tests line up
// with packet timestamps taken elsewhere on the host.
std::string WallSeconds() {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::system_clock::now().time_since_epoch()).count();
  char b[32];
  std::snprintf(b, sizeof b, "%lld.%06lld", static_cast<long long>(us / 1000000), static_cast<long long>(us % 1000000));
  return b;
}

// Collects page records into PAGES payloads of about kBatchBytes.
class BatchingSink final : public qemu::PageSink {
 public:
  using Flush = std::function<void(std::string&&)>;
  BatchingSink(Flush flush) : flush_(std::move(flush)) { cur_.reserve(kBatchBytes + 8192); }
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    if (first_page_) {
      first_page_();
      first_page_ = nullptr;
    }
    wire::AppendPageRecord(&cur_, block, offset, data);
    pages_++;
    if (data == nullptr) zero_pages_++;
    if (cur_.size() >= kBatchBytes) Drain();
    return OkStatus();
  }
  void Drain() {
    if (cur_.empty()) return;
    bytes_ += cur_.size();
    flush_(std::move(cur_));
    cur_ = std::string();
    cur_.reserve(kBatchBytes + 8192);
  }
  void OnFirstPage(std::function<void()> f) { first_page_ = std::move(f); }
  uint64_t pages() const { return pages_; }
  uint64_t zero_pages() const { return zero_pages_; }
  uint64_t bytes() const { return bytes_; }

 private:
  Flush flush_;
  std::function<void()> first_page_;
  std::string cur_;
  uint64_t pages_ = 0, zero_pages_ = 0, bytes_ = 0;
};

// Records the pages of a checkpoint without copying them (see DeferredPages).
class DeferredSink final : public qemu::PageSink {
 public:
  explicit DeferredSink(wire::DeferredPages* pages) : pages_(pages) {}
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    pages_->Add(block, offset, data);
    return OkStatus();
  }

 private:
  wire::DeferredPages* pages_;
};

}  // namespace

std::string_view PrimaryStateName(PrimaryState s) {
  switch (s) {
    case PrimaryState::kStarting: return "starting";
    case PrimaryState::kSyncing: return "syncing";
    case PrimaryState::kProtected: return "protected";
    case PrimaryState::kUnprotected: return "unprotected";
    case PrimaryState::kFailedOver: return "failed-over";
    case PrimaryState::kStopped: return "stopped";
  }
  return "unknown";
}

PrimaryReplicator::PrimaryReplicator(PrimaryOptions opts, const Clock& clock)
    : opts_(std::move(opts)),
      clock_(clock),
      interval_ms_(opts_.interval_ms),
      checkpoints_(clock, std::chrono::seconds(10)) {}

namespace {
Status CheckInterval(const std::string& domain, int ms) {
  if (ms >= 1 && ms <= 600000) return OkStatus();
  return InvalidArgument("domain " + domain + ": interval " + std::to_string(ms) + " ms is out of range (1..600000)");
}
}  // namespace

StatusOr<std::unique_ptr<PrimaryReplicator>> PrimaryReplicator::Start(PrimaryOptions opts, const Clock& clock) {
  RETURN_IF_ERROR(CheckInterval(opts.domain, opts.interval_ms));
  std::unique_ptr<PrimaryReplicator> p(new PrimaryReplicator(std::move(opts), clock));
  Status s = p->Connect();
  p->ready_ = true;
  RETURN_IF_ERROR(s);
  return p;
}

std::unique_ptr<PrimaryReplicator> PrimaryReplicator::StartAsync(PrimaryOptions opts, const Clock& clock) {
  std::unique_ptr<PrimaryReplicator> p(new PrimaryReplicator(std::move(opts), clock));
  PrimaryReplicator* r = p.get();
  r->start_thread_ = std::thread([r] {
    Status s = CheckInterval(r->opts_.domain, r->opts_.interval_ms);
    if (s.ok()) s = r->Connect();
    r->ready_ = true;
    if (!s.ok()) {
      // As a failed Start: undo what was set up; the guest runs on unprotected.
      LOG_ERROR("primary[" + r->opts_.domain + "]") << "protection did not start: " << s.message();
      r->Stop(r->cancel_start_ ? Cancelled(s.message()) : s, false);
    }
  });
  return p;
}

void PrimaryReplicator::CancelStart() {
  cancel_start_ = true;
  if (start_thread_.joinable() && start_thread_.get_id() != std::this_thread::get_id()) start_thread_.join();
}

void PrimaryReplicator::OnQemuLost(const std::string& why) {
  LOG_WARN("primary[" + opts_.domain + "]") << "QEMU is gone: " << why;
  std::lock_guard<std::mutex> g(mu_);
  qemu_dead_ = true;
  cv_.notify_all();
}

Status PrimaryReplicator::ConnectQmp() {
  const std::string& d = opts_.domain;
  auto qmp = QmpClient::Connect(opts_.qmp_socket);
  if (!qmp.ok())
    return Status(qmp.status().code(), "domain " + d + ": cannot reach QEMU's monitor at " + opts_.qmp_socket +
                                           ": " + qmp.status().message() + " (is QEMU running with -qmp?)");
  qmp_ = qmp->get();
  qemu_pid_ = qmp_->pid();
  // QEMU's death must wake every wait in the epoch loop (the stall fault,
  // backpressure), or the backup would never be told to take over.
  qmp_->SetDisconnectHandler([this] { OnQemuLost("its QMP monitor closed"); });
  monitor_ = std::move(qmp).value();
  return OkStatus();
}

Status PrimaryReplicator::ConnectLibvirt() {
  LibvirtMonitorOptions lo;
  lo.uri = opts_.libvirt_uri;
  lo.domain = opts_.domain;
  lo.pid_dir = opts_.libvirt_pid_dir;
  // Messages name the domain, the URI and the fix already.
  ASSIGN_OR_RETURN(std::unique_ptr<LibvirtSession> lv, LibvirtSession::Connect(lo));
  libvirt_ = lv.get();
  qemu_pid_ = libvirt_->pid();
  libvirt_->SetLossHandler([this](const MonitorLoss& l) {
    OnQemuLost(l.kind == MonitorLoss::Kind::kDomainStopped ? "libvirt reports the domain stopped (" + l.reason + ")"
                                                           : "libvirt connection lost (" + l.reason + ") and QEMU pid " +
                                                                 std::to_string(l.qemu_pid) + " is gone");
  });
  monitor_ = std::move(lv);
  return OkStatus();
}

Status PrimaryReplicator::ConnectMonitor() {
  const std::string tag = "primary[" + opts_.domain + "]";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(opts_.connect_retry_ms);
  for (int attempt = 1;; attempt++) {
    Status s = opts_.libvirt_uri.empty() ? ConnectQmp() : ConnectLibvirt();
    if (s.ok()) {
      auto probe = ProbeColo(*monitor_);
      if (probe.ok()) {
        probe_ = std::move(probe).value();
        return OkStatus();
      }
      s = probe.status().Annotate("domain " + opts_.domain + ": asking QEMU about COLO");
    }
    monitor_.reset();
    qmp_ = nullptr;
    libvirt_ = nullptr;
    qemu_pid_ = -1;
    // Not ready yet (libvirt still starting it, its job held by the hook): try again.
    bool transient = s.code() == Code::kDeadlineExceeded || s.code() == Code::kFailedPrecondition ||
                     s.code() == Code::kNotFound || s.code() == Code::kUnavailable;
    if (!transient || std::chrono::steady_clock::now() >= deadline || cancel_start_) return s;
    if (attempt == 1) LOG_INFO(tag) << "the domain is not ready (" << s.message() << "); retrying";
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    if (cancel_start_) return Cancelled("domain " + opts_.domain + ": protection cancelled while starting");
  }
}

Status PrimaryReplicator::Connect() {
  const std::string& d = opts_.domain;
  std::string tag = "primary[" + d + "]";
  RETURN_IF_ERROR(ConnectMonitor());
  RETURN_IF_ERROR(CheckColoSupported(probe_, d));
  if (!IsColoVersionTested(probe_))
    LOG_WARN(tag) << "QEMU " << probe_.version << " is untested with remus; COLO entry is verified after the initial copy";
  ASSIGN_OR_RETURN(json st, monitor_->Execute("query-migrate"));
  std::string mstatus = st.value("status", "none");
  if (mstatus == "active" || mstatus == "colo" || mstatus == "setup")
    return AlreadyExists("domain " + d + ": QEMU already has a migration in progress (" + mstatus +
                         "); is it protected by another remusd?");
  if (libvirt_) {
    ASSIGN_OR_RETURN(qemu_argv_, libvirt_->QemuArgv());
    ASSIGN_OR_RETURN(domain_xml_, libvirt_->MigratableXml());
  } else {
    ASSIGN_OR_RETURN(qemu_argv_, qmp_->QemuArgv());
  }
  RETURN_IF_ERROR(ResolveNetbuf());
  // libvirt attaches disks with -blockdev: each is named by its <target
  // dev=>, and the backup points that <disk> of the XML at its copy. The
  // device aliases are in the live XML only (not the migratable one).
  std::map<std::string, std::string> targets;
  if (libvirt_ && opts_.disks != "none") {
    ASSIGN_OR_RETURN(std::string live, libvirt_->LiveXml());
    targets = LibvirtDiskTargets(live);
  }
  ASSIGN_OR_RETURN(std::vector<GuestDisk> disks,
                   ListGuestDisks(monitor_.get(), d, opts_.disks, libvirt_ ? &targets : nullptr));

  auto fd = ConnectTcp(opts_.backup, opts_.connect_timeout_ms);
  if (!fd.ok())
    return Status(Code::kUnavailable, "domain " + d + ": backup " + opts_.backup.ToString() +
                                          " is unreachable: " + fd.status().message() +
                                          " (is remusd --listen running there?)");
  link_ = std::make_unique<wire::Link>(std::move(fd).value());
  Status hs = wire::ClientHandshake(*link_, opts_.key, d, opts_.connect_timeout_ms);
  if (!hs.ok()) return Status(hs.code(), "domain " + d + ": " + hs.message());

  wire::ConfigMsg config{
      .domain = d,
      .argv = qemu_argv_,
      .qemu_version = probe_.version,
      .qemu_package = probe_.package,
      .accelerator = probe_.accelerator,
      .interval_ms = opts_.interval_ms,
      .heartbeat_interval_ms = std::chrono::duration_cast<std::chrono::milliseconds>(opts_.heartbeat.interval).count(),
      .heartbeat_timeout_ms = std::chrono::duration_cast<std::chrono::milliseconds>(opts_.heartbeat.timeout).count()};
  for (const auto& g : disks) config.disks.push_back(g.Spec());
  // The backup restores a libvirt domain through its own libvirt, from this XML.
  if (libvirt_) config.libvirt = wire::LibvirtConfig{domain_xml_, d, opts_.libvirt_uri};
  RETURN_IF_ERROR(link_->Send(MsgType::kConfig, 0, wire::EncodeConfig(config)).Annotate("domain " + d + ": sending configuration"));

  hb_ = std::make_unique<HeartbeatMonitor>(clock_, opts_.heartbeat);
  // libvirt's QEMU may not open a path of ours (its own user, AppArmor): the
  // COLO stream and the disks' NBD sockets reach it as passed fds.
  DiskSource::PassFdFn pass_fd;
  if (libvirt_) pass_fd = [lv = libvirt_](const std::string& name, int theirs) { return lv->PassFd(name, theirs); };
  if (!disks.empty())
    disks_ = std::make_unique<DiskSource>(
        monitor_.get(), d, opts_.run_dir, std::move(disks),
        [this](uint32_t i, wire::DiskOp op, uint64_t off, uint64_t len, std::span<const uint8_t> data) {
          OnDiskWrite(i, op, off, len, data);
        },
        pass_fd);
  monitor_->SetEventHandler([this](const json& ev) { OnQemuEvent(ev); });

  CheckpointSourceOptions so{d, opts_.run_dir + "/" + d + ".migrate.sock", opts_.interval_ms, 10000};
  so.pass_fd = pass_fd;  // a socketpair end instead of our listening socket
  source_ = std::make_unique<CheckpointSource>(monitor_.get(), std::move(so));
  if (cancel_start_) return Cancelled("domain " + d + ": protection cancelled while starting");
  RETURN_IF_ERROR(source_->Start());
  state_ = PrimaryState::kSyncing;
  LOG_INFO(tag) << "protecting" << (libvirt_ ? " libvirt domain (" + opts_.libvirt_uri + ")" : std::string())
                << ": QEMU " << probe_.version << " (" << probe_.accelerator << "), backup "
                << opts_.backup.ToString() << ", interval " << opts_.interval_ms << " ms, netbuf " << netbuf_opts_.mode;

  ack_thread_ = std::thread([this] { AckLoop(); });
  sender_thread_ = std::thread([this] { SenderLoop(); });
  hb_thread_ = std::thread([this] { HeartbeatLoop(); });
  epoch_thread_ = std::thread([this] { EpochLoop(); });
  return OkStatus();
}

PrimaryReplicator::~PrimaryReplicator() {
  CancelStart();
  Stop(Cancelled("daemon shutting down"), false);
  if (link_) link_->Shutdown();  // the ack reader may still be draining the link
  for (auto* t : {&epoch_thread_, &sender_thread_, &ack_thread_, &hb_thread_})
    if (t->joinable()) t->join();
  // After the threads above, which are the ones that can start it (Stop).
  {
    std::lock_guard<std::mutex> g(mu_);
    destroying_ = true;
    cv_.notify_all();
  }
  if (giveup_thread_.joinable()) giveup_thread_.join();
}

void PrimaryReplicator::OnQemuEvent(const json& ev) {
  std::string name = ev.value("event", "");
  if (disks_ && name.rfind("BLOCK_JOB_", 0) == 0) disks_->OnEvent(ev);
  const json& ts = ev.contains("timestamp") ? ev["timestamp"] : json::object();
  int64_t us = ts.value("seconds", int64_t{0}) * 1000000 + ts.value("microseconds", int64_t{0});
  if (name == "STOP") {
    stop_ts_us_ = us;
  } else if (name == "RESUME") {
    int64_t s = stop_ts_us_.exchange(-1);
    if (s >= 0 && state_ == PrimaryState::kProtected) {
      pause_ms_.Add(static_cast<double>(us - s) / 1000.0);
      pause_hist_.Observe(static_cast<double>(us - s) / 1e6);
    }
  } else if (name == "SHUTDOWN") {
    const json& data = ev.contains("data") && ev["data"].is_object() ? ev["data"] : json::object();
    std::string reason = data.value("reason", "");
    if (data.value("guest", false)) {
      LOG_INFO("primary[" + opts_.domain + "]") << "the guest shut down (" << reason << "); protection ends with it";
      Stop(Cancelled("the guest shut down"), false);
    } else {
      // A signal (`virsh destroy`, a host shutdown) or a QMP quit: QEMU
      // exits next, and its death is a failover like any other.
      host_shutdown_ = true;
      LOG_WARN("primary[" + opts_.domain + "]") << "QEMU is shutting down on the host's request (" << reason
                                                << "), not the guest's; the backup takes over when it exits";
    }
  }
}

void PrimaryReplicator::Enqueue(OutFrame f) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return stopping_ || queued_bytes_ < kInitialQueueBound; });
  PushLocked(std::move(f));
  cv_.notify_all();
}

void PrimaryReplicator::SenderLoop() {
  for (;;) {
    OutFrame f;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      f = std::move(queue_.front());
      queue_.pop_front();
      queued_bytes_ -= f.size();
      cv_.notify_all();
    }
    Status s = SendFrame(f);
    if (!s.ok()) {
      // The backup may have said why it closed (an ERROR the ack reader is
      // about to read): its reason beats our broken pipe.
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait_for(l, std::chrono::milliseconds(500), [&] { return stopping_.load(); });
      }
      if (stopping_) return;
      Stop(Unavailable("lost the backup " + opts_.backup.ToString() + ": " + s.message()), false);
      return;
    }
  }
}

void PrimaryReplicator::PushLocked(OutFrame f) {
  queued_bytes_ += f.size();
  queue_.push_back(std::move(f));
}

void PrimaryReplicator::OnDiskWrite(uint32_t disk, wire::DiskOp op, uint64_t offset, uint64_t length,
                                    std::span<const uint8_t> data) {
  std::string payload = wire::EncodeDiskRecord(
      disk, op, offset, length, std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  std::unique_lock<std::mutex> l(mu_);
  // The guest's write waits here while the link is behind (flow control).
  cv_.wait(l, [&] { return stopping_ || queued_bytes_ < kInitialQueueBound; });
  if (stopping_) return;  // protection ended: the write is the guest's alone
  disk_records_++;
  disk_bytes_ += payload.size();
  PushLocked({MsgType::kDisk, disk_epoch_, std::move(payload)});
  cv_.notify_all();
}

void PrimaryReplicator::PushCommitLocked(uint64_t epoch, wire::CommitInfo ci) {
  // QEMU drained the guest's I/O before it stopped the guest for this
  // checkpoint, and the guest is still stopped: every write of the epoch is
  // in the queue, and none of the next one.
  ci.disk_records = disk_records_;
  disk_records_ = 0;
  disk_bytes_ = 0;
  disk_epoch_ = epoch + 1;
  if (disks_ && disk_synced_epoch_ < 0 && disks_->AllReady()) {
    disk_synced_epoch_ = static_cast<int64_t>(epoch);
    PushLocked({MsgType::kDiskSynced, epoch, std::string()});
    LOG_INFO("primary[" + opts_.domain + "]") << "disk copies complete as of checkpoint " << epoch;
  }
  PushLocked({MsgType::kCommit, epoch, wire::EncodeCommit(ci)});
}

Status PrimaryReplicator::SendPages(uint64_t epoch, std::string* payload) {
  uint16_t flags = 0;
  if (opts_.compress) {
    std::string z = wire::CompressBatch(*payload);
    if (z.size() < payload->size()) {
      *payload = std::move(z);
      flags |= wire::kFlagLz4;
    }
  }
  return link_->Send(MsgType::kPages, epoch, *payload, flags);
}

Status PrimaryReplicator::SendFrame(OutFrame& f) {
  if (f.pages) {
    // The pages leave QEMU's stream buffers here, after the guest resumed;
    // the buffers go back to the pool when f.pages is dropped.
    std::string batch;
    if (opts_.compress) {
      while (f.pages->NextBatch(kBatchBytes, &batch)) RETURN_IF_ERROR(SendPages(f.epoch, &batch));
    } else {
      // No copy in user space: the kernel gathers the pages from the
      // stream's buffers (measured: docs/performance.md section 1).
      std::vector<std::string_view> parts;
      while (f.pages->NextBatchViews(kBatchBytes, &batch, &parts))
        RETURN_IF_ERROR(link_->SendV(MsgType::kPages, f.epoch, parts));
    }
    f.pages.reset();
    return OkStatus();
  }
  if (f.type == MsgType::kPages) return SendPages(f.epoch, &f.payload);
  if (f.type == MsgType::kDevice) return link_->SendSplit(f.type, f.epoch, f.payload);
  return link_->Send(f.type, f.epoch, f.payload, f.flags);
}

void PrimaryReplicator::AckLoop() {
  std::string tag = "primary[" + opts_.domain + "]";
  for (;;) {
    auto f = link_->Recv();
    if (f.ok() && stopping_) continue;  // draining after FAILOVER/GOODBYE until the backup closes
    if (!f.ok()) {
      if (!stopping_) Stop(Unavailable("lost the backup " + opts_.backup.ToString() + ": " + f.status().message()), false);
      return;
    }
    hb_->Received();
    switch (f->type) {
      case MsgType::kAck: {
        uint64_t e = f->epoch;
        TimePoint now = clock_.Now();
        {
          std::lock_guard<std::mutex> g(mu_);
          if (static_cast<int64_t>(e) > last_acked_epoch_) last_acked_epoch_ = static_cast<int64_t>(e);
          while (!unacked_.empty() && unacked_.front().first <= e) {
            unacked_bytes_ -= unacked_.front().second;
            unacked_.pop_front();
          }
          while (!loaded_at_.empty() && loaded_at_.front().first <= e) {
            if (loaded_at_.front().first == e) {
              ack_ms_.Add(ToMillis(now - loaded_at_.front().second));
              ack_hist_.Observe(ToMillis(now - loaded_at_.front().second) / 1000.0);
            }
            loaded_at_.pop_front();
          }
          cv_.notify_all();
        }
        if (OutputBuffer* nb = netbuf_.load()) {
          LOG_DEBUG(tag) << "epoch " << e << ": acked, releasing output, wall " << WallSeconds();
          Status r = nb->Release(e);
          if (!r.ok()) LOG_ERROR(tag) << "netbuf release of epoch " << e << ": " << r.ToString();
        }
        bool complete;
        {
          std::lock_guard<std::mutex> g(mu_);
          complete = !disks_ || (disk_synced_epoch_ >= 0 && static_cast<int64_t>(e) >= disk_synced_epoch_);
        }
        if (complete && state_ == PrimaryState::kSyncing) {
          PrimaryState expect = PrimaryState::kSyncing;
          if (state_.compare_exchange_strong(expect, PrimaryState::kProtected))
            LOG_INFO(tag) << "protected: the backup committed checkpoint " << e
                          << (disks_ ? " with complete memory and disk copies" : " with the initial copy");
        }
        break;
      }
      case MsgType::kHeartbeat:
        break;
      case MsgType::kError:
        Stop(wire::DecodeError(f->payload).Annotate("the backup refused the stream"), false);
        return;
      default:
        LOG_WARN(tag) << "ignoring unexpected " << wire::MsgTypeName(f->type) << " from the backup";
    }
  }
}

void PrimaryReplicator::HeartbeatLoop() {
  std::unique_lock<std::mutex> l(mu_);
  while (!stopping_) {
    auto wait = std::min<Nanos>(hb_->NextCheckIn(), std::chrono::milliseconds(50));
    cv_.wait_for(l, wait);
    if (stopping_) return;
    l.unlock();
    if (hb_->PeerLost()) {
      Stop(DeadlineExceeded("the backup " + opts_.backup.ToString() + " has been silent for " +
                            std::to_string(static_cast<int>(ToMillis(hb_->SinceLastReceived()))) + " ms"),
           false);
      return;
    }
    if (hb_->SendDue()) {
      hb_->Sent();
      (void)link_->Send(MsgType::kHeartbeat, 0, "");  // a failure shows up in AckLoop
    }
    l.lock();
  }
}

Status PrimaryReplicator::ResolveNetbuf() {
  const std::string& d = opts_.domain;
  netbuf_opts_ = opts_.netbuf;
  netbuf_opts_.domain = d;
  NetbufOptions& nb = netbuf_opts_;
  if (nb.mode != "none" && nb.mode != "plug" && nb.mode != "nfqueue")
    return InvalidArgument("domain " + d + ": unknown --netbuf '" + nb.mode + "'; expected plug, nfqueue or none");
  if (nb.mode == "none") return OkStatus();
  if (nb.interfaces.empty()) {
    // libvirt mode: the taps libvirt made, from the live XML's <interface>s.
    if (libvirt_) {
      ASSIGN_OR_RETURN(nb.interfaces, LibvirtTapDevices(*libvirt_));
    } else {
      ASSIGN_OR_RETURN(nb.interfaces, GuestTapDevices(*monitor_, qemu_pid_, d));
    }
  }
  if (nb.interfaces.empty()) {
    LOG_INFO("primary[" + d + "]") << "the guest has no network devices: no output to hold";
    nb.mode = "none";
    return OkStatus();
  }
  for (const auto& i : nb.interfaces)
    if (::access(("/sys/class/net/" + i).c_str(), F_OK) != 0)
      return NotFound("domain " + d + ": network device " + i + " does not exist in remusd's network namespace");
  Status sup = CheckNetbufSupport(nb.mode);
  if (!sup.ok() && nb.mode == "plug" && opts_.netbuf_fallback) {
    LOG_WARN("primary[" + d + "]") << sup.message() << "; using nfqueue (--netbuf-fallback)";
    nb.mode = "nfqueue";
    sup = CheckNetbufSupport(nb.mode);
  }
  if (!sup.ok()) return Status(sup.code(), "domain " + d + ": " + sup.message());
  return OkStatus();
}

Status PrimaryReplicator::RunInitialSync() {
  std::string tag = "primary[" + opts_.domain + "]";
  qemu::InitialInfo info;
  Status disk_start;
  BatchingSink sink([this](std::string&& b) { Enqueue({MsgType::kPages, 0, std::move(b)}); });
  sink.OnFirstPage([&] {
    wire::SyncBeginMsg begin{source_->blocks(), info.configuration, 0};
    for (const auto& b : begin.blocks) begin.total_bytes += b.used_length;
    sync_total_bytes_ = begin.total_bytes;
    Enqueue({MsgType::kSyncBegin, 0, wire::EncodeSyncBegin(begin)});
    // The disks' background copy runs alongside the memory copy and on into
    // the first checkpoints; every write is tagged with its epoch. It starts
    // after SYNC_BEGIN, which opens the backup's journals.
    if (disks_) disk_start = disks_->Start();
  });
  // Progress in guest bytes covered, counted as pages pass through the sink.
  struct ProgressSink final : qemu::PageSink {
    BatchingSink* inner;
    std::atomic<uint64_t>* done;
    Status OnPage(uint32_t b, uint64_t o, const uint8_t* d) override {
      *done += wire::kPageSize;
      return inner->OnPage(b, o, d);
    }
  } progress;
  progress.inner = &sink;
  progress.done = &sync_done_bytes_;
  RETURN_IF_ERROR(source_->ReadInitial(&progress, &info));
  RETURN_IF_ERROR(disk_start);
  sink.Drain();
  // The guest is paused for its device state: output buffering starts here,
  // so everything the guest sends from now on waits for its checkpoint.
  auto nb = MakeOutputBuffer(netbuf_opts_);
  if (!nb.ok()) return nb.status().Annotate("domain " + opts_.domain + ": output buffering");
  netbuf_owner_ = std::move(nb).value();
  netbuf_ = netbuf_owner_.get();
  // QEMU stopped the guest for the device state; let it run again right away.
  Enqueue({MsgType::kDevice, 0, info.device_state});
  wire::CommitInfo ci{sink.pages(), sink.bytes(), info.device_state.size()};
  {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return stopping_ || queued_bytes_ < kInitialQueueBound; });
    unacked_.push_back({0, 0});
    PushCommitLocked(0, ci);
    cv_.notify_all();
  }
  RETURN_IF_ERROR(source_->SendReady());
  LOG_INFO(tag) << "initial copy sent: " << sink.pages() << " pages (" << sink.zero_pages() << " zero), "
                << info.device_state.size() << " bytes of device state";
  // QEMU 10.0 completes the migration here instead of entering COLO.
  Status colo;
  for (int i = 0; i < 50; i++) {
    colo = source_->CheckInColo();
    if (colo.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return colo;
}

Status PrimaryReplicator::RunCheckpoint(uint64_t epoch) {
  RETURN_IF_ERROR(source_->WaitForRequest());
  RETURN_IF_ERROR(source_->BeginPause());  // QEMU stops the guest now
  const TimePoint t_reply = clock_.Now();
  if (opts_.fault == "stall-after-reply@" + std::to_string(epoch)) {
    LOG_WARN("primary[" + opts_.domain + "]") << "fault injection: stalling after REPLY of epoch " << epoch;
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return stopping_ || qemu_dead_; });
    return Aborted("the injected stall ended: " + std::string(qemu_dead_ ? "QEMU exited" : "stopped"));
  }
  // Inside the pause only parse: the pages stay in the stream's read buffers
  // and the sender copies them into PAGES batches once the guest runs again.
  auto pages_ref = std::make_shared<wire::DeferredPages>();
  pages_ref->Reserve(last_epoch_pages_);
  DeferredSink sink(pages_ref.get());
  uint64_t pages = 0;
  ASSIGN_OR_RETURN(std::string blob, source_->ReadCheckpoint(&sink, &pages));
  pages_ref->Adopt(source_->TakeRetained(), [pool = source_->pool()](std::vector<std::vector<uint8_t>> bufs) {
    for (auto& b : bufs) pool->Put(std::move(b));
  });
  last_epoch_pages_ = pages_ref->pages();
  RETURN_IF_ERROR(netbuf_.load()->Barrier(epoch));
  LOG_DEBUG("primary[" + opts_.domain + "]") << "epoch " << epoch << ": output barrier, wall " << WallSeconds();
  const uint64_t page_bytes = pages_ref->bytes();
  uint64_t bytes = page_bytes + blob.size();
  wire::CommitInfo ci{pages_ref->pages(), page_bytes, blob.size()};
  if (disks_) RETURN_IF_ERROR(disks_->failure());  // the backup's disk would fall behind for good
  {
    std::unique_lock<std::mutex> l(mu_);
    bytes += disk_bytes_;
    auto room = [&] {
      return stopping_ || qemu_dead_ || (unacked_.size() < opts_.max_unacked_epochs &&
                           (unacked_.empty() || unacked_bytes_ + bytes <= opts_.max_unacked_bytes));
    };
    if (!room()) {
      backpressure_waits_++;
      cv_.wait(l, room);  // the guest stays paused: the backup is behind
    }
    if (stopping_) return Cancelled("stopped");
    if (qemu_dead_) return Unavailable("QEMU exited while the checkpoint waited for the backup");
    unacked_.push_back({epoch, bytes});
    unacked_bytes_ += bytes;
    if (pages_ref->pages() > 0) {
      OutFrame pf{MsgType::kPages, epoch, std::string()};
      pf.pages = std::move(pages_ref);
      PushLocked(std::move(pf));
    }
    PushLocked({MsgType::kDevice, epoch, std::move(blob)});
    PushCommitLocked(epoch, ci);
    last_staged_epoch_ = epoch;
    loaded_at_.push_back({epoch, clock_.Now()});
  }
  Status resumed = source_->EndPause();  // the guest resumes: speculative execution
  stage_ms_.Add(ToMillis(clock_.Now() - t_reply));
  {
    // The sender starts on this epoch after LOADED: woken earlier, it would
    // take the CPU QEMU needs to resume the guest. (Measured: making it also
    // yield during QEMU's serialization starves the link at high dirty rates
    // and the guest then waits on backpressure instead; docs/performance.md.)
    std::lock_guard<std::mutex> g(mu_);
    cv_.notify_all();
  }
  RETURN_IF_ERROR(resumed);
  dirty_pages_.Add(static_cast<double>(pages));
  epoch_bytes_.Add(static_cast<double>(bytes));
  dirty_hist_.Observe(static_cast<double>(pages));
  dirty_pages_total_ += pages;
  epoch_bytes_total_ += bytes;
  checkpoints_.Mark();
  checkpoints_total_++;
  return OkStatus();
}

void PrimaryReplicator::EpochLoop() {
  std::string tag = "primary[" + opts_.domain + "]";
  Status s = RunInitialSync();
  for (uint64_t epoch = 1; s.ok(); epoch++) s = RunCheckpoint(epoch);
  if (stopping_) return;
  if (QemuExited()) {
    Stop(Unavailable("QEMU exited: " + s.message()), true);
  } else {
    Stop(s.Annotate("checkpoint stream from QEMU"), false);
  }
}

bool PrimaryReplicator::QemuExited() {
  // Did QEMU die, or did the stream break under a live QEMU? The monitor
  // closes with the process; give it a moment to notice.
  auto gone = [&] {
    if (!qemu_dead_ && !ProcessRunning(qemu_pid_)) qemu_dead_ = true;
    return qemu_dead_.load();
  };
  for (int i = 0; i < 50; i++) {
    if (gone()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // Still there. A QEMU told to quit (SIGTERM from `virsh destroy`: its
  // SHUTDOWN event may come late through libvirt) closes the stream when
  // its main loop has ended, and lives on a little for its cleanup; its
  // monitor no longer answers then. One that answers, and not "shutdown",
  // runs on: the stream broke under a live guest.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (std::chrono::steady_clock::now() < deadline) {
    if (gone()) return true;
    if (!host_shutdown_) {
      auto st = monitor_->Execute("query-status", json::object(), 1000);
      if (st.ok() && st->value("status", "") != "shutdown") return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return gone();
}

void PrimaryReplicator::SetError(const std::string& e) {
  std::lock_guard<std::mutex> g(mu_);
  if (error_.empty()) error_ = e;
}

void PrimaryReplicator::Stop(const Status& why, bool qemu_dead) {
  if (stopping_.exchange(true)) return;
  std::string tag = "primary[" + opts_.domain + "]";
  bool on_purpose = why.code() == Code::kCancelled;
  if (!on_purpose) SetError(why.message());
  {
    std::lock_guard<std::mutex> g(mu_);
    cv_.notify_all();
  }
  if (qemu_dead) {
    LOG_ERROR(tag) << why.message() << "; telling the backup to take over";
    if (link_) (void)link_->Send(MsgType::kFailover, 0, wire::EncodeReason({why.message()}));
    state_ = PrimaryState::kFailedOver;
    // The guest is gone: what it sent after the last ACK is dropped, since
    // the backup resumes from a state that never sent it.
    if (OutputBuffer* nb = netbuf_.load()) (void)nb->Finish(false);
    if (disks_) disks_->Stop(false);
  } else {
    if (on_purpose) LOG_INFO(tag) << "protection ends: " << why.message();
    else LOG_ERROR(tag) << "protection lost: " << why.message() << "; the guest keeps running unprotected";
    if (link_) (void)link_->Send(MsgType::kGoodbye, 0, wire::EncodeReason({why.message()}));
    if (source_) {
      Status g = source_->GiveUp();
      if (!g.ok()) {
        LOG_ERROR(tag) << g.ToString();
        SetError(g.message());
        // libvirtd is away: QEMU's COLO engine waits for x-colo-lost-heartbeat
        // (a guest stopped mid-checkpoint stays stopped until then), so it is
        // sent once libvirt is back.
        if (libvirt_ && g.code() == Code::kUnavailable && !giveup_thread_.joinable())
          giveup_thread_ = std::thread([this] { GiveUpWhenReconnected(); });
      }
    }
    // The guest runs on unprotected: release everything it sent.
    if (OutputBuffer* nb = netbuf_.load()) (void)nb->Finish(true);
    // The guest keeps its own disk; the mirror target goes away.
    if (disks_) disks_->Stop(true);
    state_ = on_purpose ? PrimaryState::kStopped : PrimaryState::kUnprotected;
  }
  // The ack reader keeps reading until the backup closes its end, so the
  // last frame is delivered, not reset (see Link::ShutdownWrite).
  if (link_) link_->ShutdownWrite();
  if (source_) source_->Abort();
}

void PrimaryReplicator::GiveUpWhenReconnected() {
  const std::string tag = "primary[" + opts_.domain + "]";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(30);
  for (;;) {
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::milliseconds(500), [&] { return destroying_.load(); });
      if (destroying_) return;
    }
    if (qemu_dead_ || std::chrono::steady_clock::now() > deadline) return;
    if (!libvirt_->connected()) continue;
    Status g = source_->GiveUp();
    if (g.ok()) {
      LOG_INFO(tag) << "libvirt is back: left COLO, the guest runs unprotected";
      std::lock_guard<std::mutex> l(mu_);
      error_ += " (COLO ended once libvirt was back)";
      return;
    }
    LOG_ERROR(tag) << "leaving COLO after libvirt came back: " << g.ToString();
    if (g.code() != Code::kUnavailable) return;
  }
}

Status PrimaryReplicator::Unprotect() {
  CancelStart();
  // Protection that already ended (the backup was lost, say) has nothing
  // left to undo: the guest runs unprotected, so unprotect succeeds and the
  // earlier error stays visible in the status.
  bool was_running = !stopping_.load();
  Stop(Cancelled("unprotected by the operator"), false);
  std::lock_guard<std::mutex> g(mu_);
  if (!was_running) return OkStatus();
  return error_.empty() || state_ != PrimaryState::kUnprotected ? OkStatus() : Internal(error_);
}

Status PrimaryReplicator::SetInterval(int ms) {
  RETURN_IF_ERROR(CheckInterval(opts_.domain, ms));
  if (stopping_) return FailedPrecondition("domain " + opts_.domain + " is no longer protected");
  if (!ready_ || !source_) return FailedPrecondition("domain " + opts_.domain + ": protection is still starting");
  RETURN_IF_ERROR(source_->SetInterval(ms));
  interval_ms_ = ms;
  return OkStatus();
}

json PrimaryReplicator::StatusJson() const {
  json j;
  j["domain"] = opts_.domain;
  j["role"] = "primary";
  j["state"] = PrimaryStateName(state_);
  // Pages dirtied during the first pass are sent again, so the bytes sent can
  // pass the guest's size before the copy is complete.
  uint64_t total = sync_total_bytes_, done = std::min<uint64_t>(sync_done_bytes_, sync_total_bytes_);
  double pct = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0;
  if (state_ == PrimaryState::kSyncing || state_ == PrimaryState::kStarting) pct = std::min(pct, 99.0);
  else if (state_ == PrimaryState::kProtected) pct = 100.0;
  // Connect's members are read only once it returned (StartAsync runs it
  // on another thread).
  const bool ready = ready_.load();
  if (ready && disks_) {
    json dj = disks_->Progress();
    if (state_ == PrimaryState::kSyncing) pct = std::min(pct, std::min(99.0, 100.0 * disks_->Fraction()));
    j["disks"] = dj;
  }
  j["sync"] = {{"total_bytes", total}, {"done_bytes", done}, {"percent", pct}};
  {
    std::lock_guard<std::mutex> g(mu_);
    j["last_acked_epoch"] = last_acked_epoch_;
    j["last_staged_epoch"] = last_staged_epoch_;
    j["unacked_epochs"] = unacked_.size();
    j["unacked_bytes"] = unacked_bytes_;
    j["error"] = error_;
  }
  j["backup"] = opts_.backup.ToString();
  j["qmp_socket"] = opts_.qmp_socket;
  if (!opts_.libvirt_uri.empty()) {
    json lv = {{"uri", opts_.libvirt_uri}, {"domain", opts_.domain}};
    lv["connected"] = ready && libvirt_ ? libvirt_->connected() : false;
    lv["reconnects"] = ready && libvirt_ ? libvirt_->reconnects() : 0;
    lv["error"] = ready && libvirt_ ? libvirt_->last_error() : std::string();
    // libvirt sees every checkpoint's pause: `virsh domstate` says "paused
    // (unknown)" for those few milliseconds. The state above is remus's.
    lv["note"] = "virsh domstate shows 'paused (unknown)' during each checkpoint pause; do not virsh suspend/resume "
                 "a protected domain";
    j["libvirt"] = std::move(lv);
  }
  j["interval_ms"] = interval_ms_.load();
  j["compress"] = opts_.compress ? "lz4" : "none";
  j["checkpoints_total"] = checkpoints_total_.load();
  j["checkpoints_per_sec"] = checkpoints_.PerSecond();
  j["pause_ms"] = {{"p50", pause_ms_.Quantile(0.5)}, {"p99", pause_ms_.Quantile(0.99)},
                   {"mean", pause_ms_.Mean()}, {"samples", pause_ms_.size()}};
  j["ack_ms"] = {{"p50", ack_ms_.Quantile(0.5)}, {"p99", ack_ms_.Quantile(0.99)}};
  // The part of each pause between our REPLY and our LOADED (QEMU serializes
  // and we stage); the rest of pause_ms is QEMU stopping and resuming.
  j["stage_ms"] = {{"p50", stage_ms_.Quantile(0.5)}, {"p99", stage_ms_.Quantile(0.99)}, {"mean", stage_ms_.Mean()}};
  j["dirty_pages_per_epoch"] = {{"p50", dirty_pages_.Quantile(0.5)}, {"mean", dirty_pages_.Mean()}};
  j["bytes_per_epoch"] = {{"p50", epoch_bytes_.Quantile(0.5)}, {"mean", epoch_bytes_.Mean()}};
  j["backpressure_waits"] = backpressure_waits_.load();
  j["dirty_pages_total"] = dirty_pages_total_.load();
  j["epoch_bytes_total"] = epoch_bytes_total_.load();
  j["histograms"] = {{"pause_seconds", HistogramToJson(pause_hist_.Snapshot())},
                     {"ack_seconds", HistogramToJson(ack_hist_.Snapshot())},
                     {"dirty_pages", HistogramToJson(dirty_hist_.Snapshot())}};
  OutputBuffer* nb = netbuf_.load();
  const NetbufOptions no_netbuf;
  const NetbufOptions& nbo = ready ? netbuf_opts_ : no_netbuf;
  j["netbuf"] = {{"mode", ready ? nbo.mode : opts_.netbuf.mode},
                 {"interfaces", nbo.interfaces},
                 {"active", nb != nullptr},
                 {"guarantee", nb ? std::string(nb->guarantee()) : (nbo.mode == "none"
                                         ? std::string(NoOutputBuffer().guarantee())
                                         : "output is held from the end of the initial copy on")},
                 {"buffered_packets", nb ? nb->buffered_packets() : 0},
                 {"dropped_packets", nb ? nb->dropped_packets() : 0},
                 {"released_packets", nb ? nb->released_packets() : 0}};
  j["qemu"] = {{"version", ready ? probe_.version : std::string()},
               {"accelerator", ready ? probe_.accelerator : std::string()},
               {"pid", ready ? qemu_pid_ : -1}};
  j["link"] = {{"bytes_sent", ready && link_ ? link_->bytes_sent() : 0}};
  return j;
}

}  // namespace remus
