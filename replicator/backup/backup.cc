#include "replicator/backup/backup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <filesystem>

#include "common/hex.h"
#include "common/log.h"
#include "diskmirror/disk_replica.h"
#include "replicator/primary/disk_source.h"
#include "replicator/libvirt/restore.h"
#include "replicator/backup/restore.h"

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

// Replaces the value of key=VALUE inside a QEMU option string.
std::string ReplaceOpt(const std::string& opts, const std::string& key, const std::string& value) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i <= opts.size()) {
    size_t j = opts.find(',', i);
    if (j == std::string::npos) j = opts.size();
    parts.push_back(opts.substr(i, j - i));
    i = j + 1;
  }
  std::string out;
  for (size_t k = 0; k < parts.size(); k++) {
    std::string p = parts[k];
    if (p.rfind(key + "=", 0) == 0) p = key + "=" + value;
    if (k) out += ",";
    out += p;
  }
  return out;
}

std::string OptValue(const std::string& opts, const std::string& key) {
  size_t i = 0;
  while (i <= opts.size()) {
    size_t j = opts.find(',', i);
    if (j == std::string::npos) j = opts.size();
    std::string p = opts.substr(i, j - i);
    if (p.rfind(key + "=", 0) == 0) return p.substr(key.size() + 1);
    i = j + 1;
  }
  return "";
}

}  // namespace

std::vector<std::string> RewriteArgvForRestore(const std::vector<std::string>& argv, const std::string& run_dir,
                                               const std::string& qemu_binary,
                                               const std::map<std::string, std::string>& drive_images) {
  std::vector<std::string> out;
  if (argv.empty()) return out;
  out.push_back(qemu_binary.empty() ? argv[0] : qemu_binary);
  // Chardevs that serve a monitor are dropped with their -mon.
  std::vector<std::string> monitor_chardevs;
  for (size_t i = 1; i + 1 < argv.size(); i++) {
    std::string o = argv[i].rfind("--", 0) == 0 ? argv[i].substr(1) : argv[i];
    if (o == "-mon") monitor_chardevs.push_back(OptValue(argv[i + 1], "chardev"));
  }
  bool have_pidfile = false;
  for (size_t i = 1; i < argv.size(); i++) {
    std::string o = argv[i].rfind("--", 0) == 0 ? argv[i].substr(1) : argv[i];
    bool has_val = i + 1 < argv.size();
    std::string v = has_val ? argv[i + 1] : "";
    if (o == "-daemonize" || o == "-S") continue;
    if ((o == "-qmp" || o == "-monitor" || o == "-mon" || o == "-incoming") && has_val) {
      i++;
      continue;
    }
    if (o == "-pidfile" && has_val) {
      out.insert(out.end(), {"-pidfile", run_dir + "/qemu.pid"});
      have_pidfile = true;
      i++;
      continue;
    }
    if (o == "-chardev" && has_val) {
      std::string id = OptValue(v, "id");
      i++;
      if (std::find(monitor_chardevs.begin(), monitor_chardevs.end(), id) != monitor_chardevs.end()) continue;
      std::string backend = v.substr(0, v.find(','));
      if (backend == "socket" && !OptValue(v, "path").empty()) v = ReplaceOpt(v, "path", run_dir + "/" + id + ".sock");
      if (backend == "file") v = ReplaceOpt(v, "path", run_dir + "/" + id + ".log");
      out.insert(out.end(), {"-chardev", v});
      continue;
    }
    if (o == "-drive" && has_val) {
      i++;
      auto it = drive_images.find(OptValue(v, "id"));
      if (it != drive_images.end()) {
        // The backup's copy is a raw image, whatever the primary's format.
        v = ReplaceOpt(v, "file", it->second);
        v = v.find("format=") != std::string::npos ? ReplaceOpt(v, "format", "raw") : v + ",format=raw";
      }
      out.insert(out.end(), {"-drive", v});
      continue;
    }
    if (o == "-serial" && has_val) {
      i++;
      if (v.rfind("file:", 0) == 0 || v == "stdio" || v.rfind("mon:", 0) == 0) v = "file:" + run_dir + "/serial.log";
      else if (v.rfind("unix:", 0) == 0) v = "unix:" + run_dir + "/serial.sock" + (v.find(',') != std::string::npos ? v.substr(v.find(',')) : "");
      out.insert(out.end(), {"-serial", v});
      continue;
    }
    out.push_back(argv[i]);
  }
  out.insert(out.end(), {"-qmp", "unix:" + run_dir + "/qmp.sock,server=on,wait=off"});
  if (!have_pidfile) out.insert(out.end(), {"-pidfile", run_dir + "/qemu.pid"});
  out.insert(out.end(), {"-incoming", "defer"});
  return out;
}

// One protected domain on the backup.
class BackupDomain {
 public:
  enum class State { kWaiting, kSyncing, kStandby, kPrimaryLost, kUnprotected, kPromoting, kFailedOver, kFailed };
  static std::string_view StateName(State s) {
    switch (s) {
      case State::kWaiting: return "waiting";
      case State::kSyncing: return "syncing";
      case State::kStandby: return "protected";
      case State::kPrimaryLost: return "primary-lost";
      case State::kUnprotected: return "unprotected";
      case State::kPromoting: return "promoting";
      case State::kFailedOver: return "failed-over";
      case State::kFailed: return "failed";
    }
    return "unknown";
  }

  BackupDomain(std::string name, const BackupOptions& opts, const Clock& clock, Arbiter* arbiter)
      : name_(std::move(name)), opts_(opts), clock_(clock), arbiter_(arbiter),
        dir_(opts.state_dir + "/domains/" + name_), tag_("backup[" + name_ + "]") {}

  ~BackupDomain() {
    if (qemu_reaper_.joinable()) qemu_reaper_.detach();
  }

  // Runs one session on an authenticated link until it ends.
  void Serve(std::unique_ptr<wire::Link> link);
  // After a restart of remusd: reopens the committed checkpoint kept in the
  // state dir, so `remusctl failover` can still restore it. NotFound when
  // there is none. Never promotes by itself: the primary may be alive.
  Status Recover();
  Status Promote(const std::string& reason);
  json StatusJson() const;

 private:
  Status HandleFrame(wire::Frame& f);
  Status CommitEpoch(uint64_t epoch, const std::string& payload);
  Status DoPromote();
  // DoPromote for a libvirt domain. REQUIRES mu_.
  Status DoPromoteLibvirt(const std::string& run, const std::map<std::string, std::string>& disk_images);
  void AckLoop(wire::Link* link);
  void SessionHeartbeat(wire::Link* link);

  const std::string name_;
  const BackupOptions& opts_;
  const Clock& clock_;
  Arbiter* arbiter_;
  const std::string dir_;
  const std::string tag_;

  mutable std::mutex mu_;  // stores, session state, config
  std::atomic<State> state_{State::kWaiting};
  json config_;                                // guarded by mu_
  std::string configuration_section_;          // guarded by mu_ (for the session's store)
  std::string committed_configuration_;        // guarded by mu_
  std::unique_ptr<PageStore> committed_;       // guarded by mu_
  std::unique_ptr<PageStore> syncing_;         // guarded by mu_
  int session_seq_ = 0;                        // guarded by mu_
  std::string error_;                          // guarded by mu_
  std::string primary_;                        // guarded by mu_
  bool goodbye_ = false;                       // guarded by mu_
  bool session_active_ = false;                // guarded by mu_

  // Mirrored disks (diskmirror/disk_replica.h). The session's set is made at
  // SYNC_BEGIN with journals in the new store; at COMMIT 0 it becomes the
  // committed one. Both are touched by the session thread, and by promotion
  // and recovery when no session runs.
  Status OpenSessionDisks(const std::string& store_dir);
  StatusOr<std::unique_ptr<DiskReplicaSet>> OpenDisks(const std::string& store_dir, std::optional<uint64_t> discard_after);
  FileIo* Io();
  // A disk journal error, with the domain, the epoch and the fix.
  Status DiskError(const Status& s, uint64_t epoch) const;
  std::unique_ptr<FileIo> io_;
  // Held around every use of a DiskReplicaSet (not thread-safe): an
  // operator's failover may run while the session thread ends. Order: mu_
  // before disk_mu_.
  std::mutex disk_mu_;
  std::shared_ptr<DiskReplicaSet> session_disks_;    // session thread
  std::shared_ptr<DiskReplicaSet> committed_disks_;  // guarded by mu_
  int64_t disk_synced_epoch_ = -1;                   // guarded by mu_ (of the committed store)
  int64_t session_disk_synced_ = -1;                 // session thread: DISK_SYNCED of this session
  uint64_t staged_disk_records_ = 0;                 // session thread

  // Per-session receive state (session thread only).
  Staging staging_;
  // Receive buffers handed back by committed page batches (session thread).
  // A checkpoint's frames are read into the previous ones' memory: no fresh
  // 4 MiB allocation, page faults and zero-fill per frame. Bounded by
  // kSpareBufferBytes; the rest is freed.
  std::string TakeSpareBuffer();
  void RecycleBuffer(std::string buf);
  std::vector<std::string> spare_buffers_;
  uint64_t spare_bytes_ = 0;
  std::string device_buf_;
  uint64_t staged_page_bytes_ = 0;
  uint64_t staged_pages_ = 0;

  wire::Link* link_ = nullptr;  // valid during a session; guarded by mu_
  // Made before a session's threads start and kept until they are joined;
  // CONFIG only reconfigures it.
  std::unique_ptr<HeartbeatMonitor> hb_;
  // The session's ack and heartbeat threads wait on their own lock, so store
  // I/O done under mu_ (a commit, a large apply) never delays a heartbeat or
  // an ACK: the primary would take that for a dead backup.
  std::mutex sess_mu_;
  std::condition_variable sess_cv_;
  std::deque<std::pair<uint64_t, TimePoint>> acks_;  // guarded by sess_mu_
  bool session_over_ = false;                        // guarded by sess_mu_

  std::atomic<uint64_t> sync_total_{0}, sync_done_{0};
  std::atomic<int64_t> last_committed_{-1};
  SampleWindow apply_ms_;
  std::atomic<double> apply_mb_s_{0};
  // Cumulative, for metrics and `remusctl stats --histogram`.
  Histogram apply_hist_{Histogram::LatencySeconds()};  // seconds per commit
  std::atomic<uint64_t> checkpoints_total_{0};         // committed epochs after the initial copy
  std::atomic<uint64_t> failovers_total_{0};           // successful promotions
  // What a running promotion is doing, for status (and remusctl failover's
  // progress) while DoPromote holds mu_: a string literal, or nullptr.
  std::atomic<const char*> promote_phase_{nullptr};
  RestoreProgress restore_progress_;
  uint64_t bytes_received_done_ = 0;                   // by ended sessions; guarded by mu_

  PromotionGate gate_;
  std::atomic<int64_t> failover_ms_{-1};
  std::atomic<int> qemu_pid_{-1};
  std::string qmp_socket_;  // guarded by mu_
  // The promoted guest's libvirt, when restored through it (then qmp_socket_ is empty).
  std::string libvirt_uri_;     // guarded by mu_
  std::string libvirt_domain_;  // guarded by mu_
  std::thread qemu_reaper_;
};

void BackupDomain::Serve(std::unique_ptr<wire::Link> link) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (session_active_) {
      (void)link->Send(MsgType::kError, 0, wire::EncodeError(AlreadyExists("domain " + name_ + " already has a primary connected")));
      return;
    }
    State s = state_;
    if (s == State::kPromoting || s == State::kFailedOver) {
      (void)link->Send(MsgType::kError, 0,
                       wire::EncodeError(FailedPrecondition("domain " + name_ + " was promoted on this backup; it runs here now")));
      return;
    }
    session_active_ = true;
    goodbye_ = false;
    error_.clear();
    primary_ = link->PeerName();
    link_ = link.get();
  }
  {
    std::lock_guard<std::mutex> g(sess_mu_);
    session_over_ = false;
    acks_.clear();
  }
  hb_ = std::make_unique<HeartbeatMonitor>(clock_, opts_.heartbeat);
  LOG_INFO(tag_) << "primary " << link->PeerName() << " connected";
  wire::Link* l = link.get();
  std::thread acker([this, l] { AckLoop(l); });
  std::thread beat([this, l] { SessionHeartbeat(l); });
  Status s;
  for (;;) {
    auto f = link->Recv(TakeSpareBuffer());
    if (!f.ok()) {
      s = f.status();
      break;
    }
    // Liveness is counted on receipt, and the time spent applying is ours:
    // the primary's frames wait in our socket meanwhile.
    hb_->SetBusy(true);
    s = HandleFrame(*f);
    hb_->SetBusy(false);
    RecycleBuffer(std::move(f->payload));  // kept unless HandleFrame took it
    if (!s.ok()) break;
  }
  bool goodbye;
  {
    std::lock_guard<std::mutex> g(mu_);
    goodbye = goodbye_;
  }
  {
    std::lock_guard<std::mutex> g(sess_mu_);
    session_over_ = true;
    sess_cv_.notify_all();
  }
  if (!goodbye && s.code() != Code::kAborted && s.code() != Code::kCancelled) {
    if (s.code() == Code::kDataLoss || s.code() == Code::kResourceExhausted || s.code() == Code::kInvalidArgument) {
      // Tell the primary why we stop acking; it drops to unprotected. Then
      // read on until it closes (bounded): closing with its frames unread
      // would reset the connection, and the ERROR could be lost with it.
      if (link->Send(MsgType::kError, 0, wire::EncodeError(s)).ok()) {
        link->ShutdownWrite();
        auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
        while (link->RecvUntil(deadline).ok()) {
        }
      }
    }
  }
  link->Shutdown();
  acker.join();
  beat.join();
  staging_.Clear();  // a partial checkpoint is discarded
  spare_buffers_.clear();  // an idle domain holds no receive buffers
  spare_bytes_ = 0;
  device_buf_.clear();
  staged_page_bytes_ = 0;
  staged_pages_ = 0;
  staged_disk_records_ = 0;
  if (session_disks_) {
    std::lock_guard<std::mutex> dg(disk_mu_);
    Status d = session_disks_->DropUncommitted();
    if (!d.ok()) LOG_ERROR(tag_) << "dropping a partial checkpoint's disk writes: " << d.ToString();
    session_disks_.reset();
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    bytes_received_done_ += link->bytes_received();
    link_ = nullptr;
    session_active_ = false;
    syncing_.reset();
  }
  if (goodbye) {
    LOG_INFO(tag_) << "primary ended protection; not promoting";
    State st = state_;
    if (st != State::kPromoting && st != State::kFailedOver) state_ = State::kUnprotected;
    return;
  }
  if (s.code() == Code::kAborted) return;  // FAILOVER handled it
  LOG_WARN(tag_) << "lost the primary: " << s.message();
  {
    std::lock_guard<std::mutex> g(mu_);
    error_ = "lost the primary: " + s.message();
    State st = state_;
    if (st == State::kStandby || st == State::kSyncing || st == State::kWaiting) state_ = State::kPrimaryLost;
  }
  if (!opts_.auto_promote) return;
  // Fail-stop detection: the primary is dead once it has been silent for the
  // heartbeat timeout (a closed connection alone could be a restart).
  Nanos left = hb_->config().timeout - hb_->SinceLastReceived();
  if (left.count() > 0) std::this_thread::sleep_for(left);
  Status p = Promote("primary lost: " + s.message());
  if (!p.ok()) LOG_ERROR(tag_) << "promotion failed: " << p.ToString();
}

Status BackupDomain::Recover() {
  if (auto m = ReadFileToString(dir_ + "/promoted.json"); m.ok() && json::accept(*m)) {
    json marker = json::parse(*m);
    int pid = marker.value("pid", -1);
    // Ours only if it is a live process started for this domain's run dir.
    std::string argv;
    if (pid > 0) {
      auto cmdline = ReadFileToString("/proc/" + std::to_string(pid) + "/cmdline");
      if (cmdline.ok()) argv = std::move(*cmdline);
    }
    // A libvirt-restored QEMU is libvirt's: it names the domain (-name guest=NAME).
    bool via_libvirt = marker.contains("libvirt") && marker["libvirt"].is_object();
    bool alive = via_libvirt ? argv.find(std::string("guest=") + name_ + ",") != std::string::npos ||
                                   argv.find(std::string("guest=") + name_ + '\0') != std::string::npos
                             : argv.find(dir_ + "/run/") != std::string::npos;
    RETURN_IF_ERROR(gate_.Begin("promoted before remusd restarted"));
    std::lock_guard<std::mutex> g(mu_);
    last_committed_ = marker.value("epoch", int64_t{-1});
    if (alive) {
      gate_.Finish(OkStatus());
      qemu_pid_ = pid;
      qmp_socket_ = marker.value("qmp_socket", "");
      if (via_libvirt) {
        libvirt_uri_ = marker["libvirt"].value("uri", "");
        libvirt_domain_ = marker["libvirt"].value("domain", "");
      }
      state_ = State::kFailedOver;
      LOG_INFO(tag_) << "the guest promoted here before the restart runs on (pid " << pid << ")";
    } else {
      error_ = "the guest promoted here before remusd restarted (pid " + std::to_string(pid) +
               ") is gone; its checkpoint " + std::to_string(last_committed_.load()) +
               " is older than what that guest ran, so it is not restored again; remove " + dir_ +
               " to protect this domain here anew";
      gate_.Finish(FailedPrecondition(error_));
      state_ = State::kFailed;
      LOG_ERROR(tag_) << error_;
    }
    return OkStatus();
  }
  auto cur = ReadFileToString(dir_ + "/current");
  if (!cur.ok()) return NotFound("domain " + name_ + " has no committed store");
  std::string store_name = *cur;
  while (!store_name.empty() && (store_name.back() == '\n' || store_name.back() == ' ')) store_name.pop_back();
  if (store_name.rfind("store-", 0) != 0 || store_name.find('/') != std::string::npos)
    return DataLoss(dir_ + "/current names '" + store_name + "', not a store");
  ASSIGN_OR_RETURN(std::string cfg_text, ReadFileToString(dir_ + "/config.json"));
  if (!json::accept(cfg_text)) return DataLoss(dir_ + "/config.json is not JSON");
  ASSIGN_OR_RETURN(auto store, PageStore::Open(dir_ + "/" + store_name));
  if (!store->has_committed())
    return DataLoss("domain " + name_ + ": store " + store->dir() + " holds no restorable checkpoint: " +
                    store->invalid_reason());
  ASSIGN_OR_RETURN(std::string configuration, ReadFileToString(store->dir() + "/configuration.bin"));
  // The disks: replay what the journals committed up to the page store's
  // epoch, and drop what they committed after it.
  std::shared_ptr<DiskReplicaSet> disks;
  int64_t synced = -1;
  if (std::filesystem::exists(store->dir() + "/disks.json")) {
    ASSIGN_OR_RETURN(auto set, OpenDisks(store->dir(), store->committed_epoch()));
    RETURN_IF_ERROR(set->ApplyAll().Annotate("domain " + name_ + ": replaying the disk journals"));
    disks = std::move(set);
    if (auto t = ReadFileToString(store->dir() + "/disks-synced"); t.ok()) synced = std::atoll(t->c_str());
    LOG_INFO(tag_) << "disk images replayed to checkpoint " << store->committed_epoch();
  }
  // Stores of sessions that never committed are of no use any more.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir_, ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind("store-", 0) == 0 && n != store_name) std::filesystem::remove_all(e.path(), ec);
  }
  std::lock_guard<std::mutex> g(mu_);
  config_ = json::parse(cfg_text);
  committed_configuration_ = std::move(configuration);
  last_committed_ = static_cast<int64_t>(store->committed_epoch());
  committed_ = std::move(store);
  committed_disks_ = std::move(disks);
  disk_synced_epoch_ = synced;
  state_ = State::kPrimaryLost;
  error_ = "remusd restarted; checkpoint " + std::to_string(last_committed_.load()) +
           " is kept: run `remusctl failover " + name_ + "` if the primary is gone, or protect again from the primary";
  LOG_WARN(tag_) << error_;
  return OkStatus();
}

void BackupDomain::SessionHeartbeat(wire::Link* link) {
  std::unique_lock<std::mutex> l(sess_mu_);
  while (!session_over_) {
    sess_cv_.wait_for(l, std::min<Nanos>(hb_->NextCheckIn(), std::chrono::milliseconds(50)));
    if (session_over_) return;
    l.unlock();
    if (hb_->PeerLost()) {
      LOG_WARN(tag_) << "primary silent for " << static_cast<int>(ToMillis(hb_->SinceLastReceived())) << " ms";
      link->Shutdown();
      l.lock();
      return;
    }
    if (hb_->SendDue()) {
      hb_->Sent();
      (void)link->Send(MsgType::kHeartbeat, static_cast<uint64_t>(std::max<int64_t>(0, last_committed_)), "");
    }
    l.lock();
  }
}

void BackupDomain::AckLoop(wire::Link* link) {
  // ACKs go out from here so an --ack-delay-ms never slows down receiving.
  std::unique_lock<std::mutex> l(sess_mu_);
  for (;;) {
    sess_cv_.wait(l, [&] { return session_over_ || !acks_.empty(); });
    if (session_over_) {
      acks_.clear();
      return;
    }
    auto [epoch, due] = acks_.front();
    if (clock_.Now() < due) {
      sess_cv_.wait_until(l, std::chrono::steady_clock::time_point(due.time_since_epoch()));
      continue;
    }
    acks_.pop_front();
    l.unlock();
    (void)link->Send(MsgType::kAck, epoch, "");
    l.lock();
  }
}

Status BackupDomain::HandleFrame(wire::Frame& f) {
  switch (f.type) {
    case MsgType::kHeartbeat:
    case MsgType::kProgress:
      return OkStatus();
    case MsgType::kConfig: {
      if (!json::accept(f.payload)) return DataLoss("CONFIG is not JSON");
      json c = json::parse(f.payload);
      bool has_xml = c.contains("libvirt") && c["libvirt"].is_object() && c["libvirt"].contains("xml") &&
                     c["libvirt"]["xml"].is_string();
      if (c.contains("libvirt")) {
        if (!has_xml) return InvalidArgument("CONFIG: libvirt carries no domain XML");
        auto xml_name = DomainXmlName(c["libvirt"]["xml"].get<std::string>());
        if (!xml_name.ok() || *xml_name != name_)
          return InvalidArgument("CONFIG: the libvirt XML is not domain " + name_ + "'s");
      }
      if (!has_xml && (!c.contains("argv") || !c["argv"].is_array() || c["argv"].empty()))
        return InvalidArgument("CONFIG carries no QEMU argv");
      if (c.contains("disks") && !c["disks"].is_array()) return InvalidArgument("CONFIG: disks is not a list");
      for (const auto& d : c.value("disks", json::array())) {
        auto g = GuestDisk::FromJson(d);
        if (!g.ok()) return InvalidArgument("CONFIG: " + g.status().message());
        if (!ValidDomainName(g->id)) return InvalidArgument("CONFIG: disk id '" + g->id + "' is not a usable name");
      }
      RETURN_IF_ERROR(MakeDirs(dir_ + "/run", 0700));
      RETURN_IF_ERROR(WriteFileAtomic(dir_ + "/config.json", c.dump(2)));
      if (c.contains("heartbeat_interval_ms") && c.contains("heartbeat_timeout_ms")) {
        HeartbeatConfig hc{std::chrono::milliseconds(c["heartbeat_interval_ms"].get<int64_t>()),
                           std::chrono::milliseconds(c["heartbeat_timeout_ms"].get<int64_t>())};
        if (hc.interval.count() > 0 && hc.interval < hc.timeout) hb_->Reconfigure(hc);
      }
      std::lock_guard<std::mutex> g(mu_);
      config_ = std::move(c);
      return OkStatus();
    }
    case MsgType::kSyncBegin: {
      if (!json::accept(f.payload)) return DataLoss("SYNC_BEGIN is not JSON");
      json b = json::parse(f.payload);
      std::vector<qemu::RamBlock> blocks;
      for (const auto& x : b.value("blocks", json::array()))
        blocks.push_back({x.value("id", ""), x.value("used_length", uint64_t{0})});
      auto config_bytes = HexDecode(b.value("configuration", ""));
      if (!config_bytes) return DataLoss("SYNC_BEGIN: the configuration section is not hex");
      std::string config = std::move(*config_bytes);
      int seq;
      {
        std::lock_guard<std::mutex> g(mu_);
        seq = ++session_seq_;
        while (std::filesystem::exists(dir_ + "/store-" + std::to_string(seq))) seq = ++session_seq_;
      }
      ASSIGN_OR_RETURN(auto store, PageStore::Create(dir_ + "/store-" + std::to_string(seq), blocks));
      RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/configuration.bin", config));
      RETURN_IF_ERROR(OpenSessionDisks(store->dir()));
      std::lock_guard<std::mutex> g(mu_);
      configuration_section_ = config;
      syncing_ = std::move(store);
      sync_total_ = b.value("total_bytes", uint64_t{0});
      sync_done_ = 0;
      if (state_ != State::kStandby) state_ = State::kSyncing;
      LOG_INFO(tag_) << "initial copy starting: " << blocks.size() << " RAM blocks, " << sync_total_ << " bytes";
      return OkStatus();
    }
    case MsgType::kPages: {
      if (f.flags & wire::kFlagLz4) {
        ASSIGN_OR_RETURN(f.payload, wire::DecompressBatch(f.payload, wire::kMaxPayload));
      }
      if (f.epoch == 0) {
        PageStore* store;
        {
          std::lock_guard<std::mutex> g(mu_);
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
      staged_page_bytes_ += f.payload.size();
      staging_.AddPageBatch(std::move(f.payload));
      return OkStatus();
    }
    case MsgType::kDisk: {
      if (!session_disks_) return FailedPrecondition("DISK for a domain without mirrored disks, or before SYNC_BEGIN");
      ASSIGN_OR_RETURN(wire::DiskRecord r, wire::DecodeDiskRecord(f.payload));
      staged_disk_records_++;
      std::lock_guard<std::mutex> dg(disk_mu_);
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
      device_buf_ += f.payload;
      return OkStatus();
    case MsgType::kCommit:
      return CommitEpoch(f.epoch, f.payload);
    case MsgType::kFailover: {
      std::string reason = "primary reports its guest lost";
      if (json::accept(f.payload)) reason += ": " + json::parse(f.payload).value("reason", "");
      LOG_WARN(tag_) << reason;
      if (!opts_.auto_promote) {
        std::lock_guard<std::mutex> g(mu_);
        error_ = reason + "; not promoting by itself (--no-auto-promote): run `remusctl failover " + name_ + "`";
        State st = state_;
        if (st == State::kStandby || st == State::kSyncing || st == State::kWaiting) state_ = State::kPrimaryLost;
        return Aborted("primary lost");
      }
      Status p = Promote(reason);
      if (!p.ok()) LOG_ERROR(tag_) << "promotion failed: " << p.ToString();
      return Aborted("promoted");
    }
    case MsgType::kGoodbye: {
      std::lock_guard<std::mutex> g(mu_);
      goodbye_ = true;
      return Cancelled("goodbye");
    }
    case MsgType::kError:
      return wire::DecodeError(f.payload);
    default:
      return InvalidArgument("unexpected " + wire::MsgTypeName(f.type) + " from the primary");
  }
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
    std::lock_guard<std::mutex> dg(disk_mu_);
    RETURN_IF_ERROR(DiskError(session_disks_->Commit(epoch), epoch));
  }
  if (epoch == 0) {
    std::unique_ptr<PageStore> old;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!syncing_) return FailedPrecondition("COMMIT of the initial copy without SYNC_BEGIN");
      RETURN_IF_ERROR(syncing_->CompleteInitialSync(blob, 0));
      RETURN_IF_ERROR(WriteFileAtomic(dir_ + "/current", std::filesystem::path(syncing_->dir()).filename().string()));
      old = std::move(committed_);
      committed_ = std::move(syncing_);
      committed_configuration_ = configuration_section_;
      committed_disks_ = session_disks_;
      disk_synced_epoch_ = -1;
      state_ = committed_disks_ ? State::kSyncing : State::kStandby;
    }
    if (old) {
      std::error_code ec;
      std::filesystem::remove_all(old->dir(), ec);
    }
    ::unlink((dir_ + "/promoted.json").c_str());  // a new session replaces an old promotion
    LOG_INFO(tag_) << "initial copy committed (" << ci.page_count << " pages)"
                   << (committed_disks_ ? "; disks still copying" : "; standing by");
  } else {
    Staging st = std::move(staging_);
    staging_ = Staging();
    st.SetDeviceBlob(std::move(blob));
    std::lock_guard<std::mutex> g(mu_);
    if (!committed_) return FailedPrecondition("checkpoint " + std::to_string(epoch) + " before the initial copy");
    Status c = committed_->Commit(epoch, std::move(st));
    for (std::string& b : st.TakeBatches()) RecycleBuffer(std::move(b));
    RETURN_IF_ERROR(c);
  }
  if (session_disks_) {
    if (session_disk_synced_ >= 0 && static_cast<uint64_t>(session_disk_synced_) <= epoch) {
      std::lock_guard<std::mutex> g(mu_);
      if (disk_synced_epoch_ < 0) {
        disk_synced_epoch_ = session_disk_synced_;
        RETURN_IF_ERROR(WriteFileAtomic(committed_->dir() + "/disks-synced", std::to_string(disk_synced_epoch_)));
        if (state_ == State::kSyncing) state_ = State::kStandby;
        LOG_INFO(tag_) << "disk copies complete as of checkpoint " << disk_synced_epoch_ << "; standing by";
      }
    }
  }
  double ms = ToMillis(clock_.Now() - t0);
  apply_ms_.Add(ms);
  apply_hist_.Observe(ms / 1000.0);
  if (epoch > 0) checkpoints_total_++;
  if (ms > 0 && epoch > 0) apply_mb_s_ = static_cast<double>(page_bytes) / 1e6 / (ms / 1000.0);
  last_committed_ = static_cast<int64_t>(epoch);
  {
    std::lock_guard<std::mutex> g(sess_mu_);
    acks_.push_back({epoch, clock_.Now() + std::chrono::milliseconds(opts_.ack_delay_ms)});
    sess_cv_.notify_all();
  }
  if (session_disks_) {
    // The committed epochs reach the images now and then (batched: each
    // apply syncs the images), after the ACK is on its way: the epoch is
    // durable in the journal already. Promotion applies the rest.
    std::lock_guard<std::mutex> dg(disk_mu_);
    Status a = session_disks_->MaybeApply();
    if (!a.ok()) return Status(a.code(), "domain " + name_ + ": applying disk writes to the images: " + a.message());
  }
  return OkStatus();
}

namespace {
// As much as the primary's read-buffer pool (CheckpointSource): a checkpoint
// of up to ~64 batches is received without allocating.
constexpr uint64_t kSpareBufferBytes = 256ull << 20;
// Smaller buffers (control frames, a moved-from payload) are not worth keeping.
constexpr size_t kMinSpareBuffer = 1 << 20;
}  // namespace

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
  if (!json::accept(text)) return DataLoss(store_dir + "/disks.json is not JSON");
  std::vector<ReplicaDisk> disks;
  for (const auto& d : json::parse(text)) {
    auto g = GuestDisk::FromJson(d);
    if (!g.ok()) return DataLoss(store_dir + "/disks.json: " + g.status().message());
    disks.push_back({g->id, g->size});
  }
  FileIo* io = Io();
  if (!io) return Unavailable("domain " + name_ + ": io_uring is unavailable for the disk journals");
  RETURN_IF_ERROR(MakeDirs(dir_ + "/disks", 0700));
  return DiskReplicaSet::Open(io, dir_ + "/disks", store_dir, std::move(disks), discard_after);
}

Status BackupDomain::OpenSessionDisks(const std::string& store_dir) {
  json disks;
  {
    std::lock_guard<std::mutex> g(mu_);
    disks = config_.value("disks", json::array());
  }
  session_disks_.reset();
  session_disk_synced_ = -1;
  if (disks.empty()) return OkStatus();
  // The images are shared by sessions: the last committed session's journals
  // go onto them in full before this one's writes can.
  {
    std::lock_guard<std::mutex> g(mu_);
    std::lock_guard<std::mutex> dg(disk_mu_);
    if (committed_disks_) RETURN_IF_ERROR(committed_disks_->ApplyAll().Annotate("domain " + name_));
  }
  RETURN_IF_ERROR(WriteFileAtomic(store_dir + "/disks.json", disks.dump()));
  ASSIGN_OR_RETURN(auto set, OpenDisks(store_dir, std::nullopt));
  std::lock_guard<std::mutex> dg(disk_mu_);
  session_disks_ = std::move(set);
  LOG_INFO(tag_) << "mirroring " << disks.size() << " disk(s) into " << dir_ << "/disks";
  return OkStatus();
}

Status BackupDomain::Promote(const std::string& reason) {
  RETURN_IF_ERROR(gate_.Begin(reason).Annotate("domain " + name_));
  Status s = arbiter_->MayPromote(name_);
  if (s.ok()) {
    // An operator's failover while a primary is still connected: end that session first.
    std::unique_lock<std::mutex> l(mu_);
    if (link_) link_->Shutdown();
    l.unlock();
    restore_progress_.ram_done = 0;
    restore_progress_.ram_total = 0;
    promote_phase_ = "preparing";
    state_ = State::kPromoting;
    TimePoint t0 = clock_.Now();
    s = DoPromote();
    promote_phase_ = nullptr;
    if (s.ok()) failover_ms_ = static_cast<int64_t>(ToMillis(clock_.Now() - t0));
  }
  gate_.Finish(s);
  if (!s.ok()) {
    state_ = State::kFailed;
    std::lock_guard<std::mutex> g(mu_);
    error_ = "promotion failed: " + s.message();
    return s.Annotate("domain " + name_);
  }
  state_ = State::kFailedOver;
  failovers_total_++;
  {
    // Remembered across a restart of remusd: the guest runs here now, and
    // restoring the (older) checkpoint again would make a second copy.
    std::lock_guard<std::mutex> g(mu_);
    json marker = {{"pid", qemu_pid_.load()}, {"qmp_socket", qmp_socket_}, {"epoch", last_committed_.load()},
                   {"reason", reason}};
    if (!libvirt_uri_.empty()) marker["libvirt"] = {{"uri", libvirt_uri_}, {"domain", libvirt_domain_}};
    Status w = WriteFileAtomic(dir_ + "/promoted.json", marker.dump());
    if (!w.ok()) LOG_ERROR(tag_) << "cannot record the promotion: " << w.ToString();
  }
  LOG_INFO(tag_) << "promoted in " << failover_ms_ << " ms (detection excluded); the guest runs here now";
  return OkStatus();
}

Status BackupDomain::DoPromote() {
  std::lock_guard<std::mutex> g(mu_);
  if (!committed_ || !committed_->has_committed())
    return FailedPrecondition("domain " + name_ + " has no committed checkpoint (the initial copy never completed); "
                              "nothing to restore");
  std::map<std::string, std::string> drive_images;
  if (committed_disks_) {
    if (disk_synced_epoch_ < 0 || static_cast<uint64_t>(disk_synced_epoch_) > committed_->committed_epoch())
      return FailedPrecondition("domain " + name_ + ": the disk copy to this backup never completed, so its disk "
                                "does not match any checkpoint; not restoring");
    std::lock_guard<std::mutex> dg(disk_mu_);
    promote_phase_ = "applying disk writes";
    RETURN_IF_ERROR(committed_disks_->ApplyAll().Annotate("domain " + name_ + ": bringing the disk images to checkpoint " +
                                                          std::to_string(committed_->committed_epoch())));
    for (size_t i = 0; i < committed_disks_->size(); i++)
      drive_images[committed_disks_->disk(i).id] = committed_disks_->ImagePath(i);
  }
  std::string run = dir_ + "/run";
  RETURN_IF_ERROR(MakeDirs(run, 0700));
  // A libvirt domain's disks are named by their <target dev=>.
  if (config_.contains("libvirt")) return DoPromoteLibvirt(run, drive_images);
  std::vector<std::string> argv;
  for (const auto& a : config_.value("argv", json::array())) argv.push_back(a.get<std::string>());
  for (const char* f : {"/qmp.sock", "/incoming.sock", "/qemu.pid"}) ::unlink((run + f).c_str());
  argv = RewriteArgvForRestore(argv, run, opts_.qemu_binary, drive_images);
  LOG_INFO(tag_) << "restoring epoch " << committed_->committed_epoch() << " into a new QEMU";
  std::string log = run + "/qemu.log";
  // posix_spawn rather than fork: remusd is multithreaded, and a forked child
  // may not allocate (another thread may hold malloc's lock). The child gets
  // an empty signal mask and default dispositions (remusd blocks SIGINT and
  // SIGTERM for its signal thread and ignores SIGPIPE), its own session, and
  // the log file as stdout and stderr.
  promote_phase_ = "starting QEMU";
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, cargv[0], &fa, &attr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return ErrnoStatus("starting " + argv[0], rc);
  qemu_pid_ = pid;
  qemu_reaper_ = std::thread([pid, tag = tag_, this] {
    int st = 0;
    ::waitpid(pid, &st, 0);
    LOG_WARN(tag) << "restored QEMU (pid " << pid << ") exited with status " << st;
    qemu_pid_ = -1;
  });
  auto qemu_failed = [&](const std::string& what) {
    auto tail = ReadFileToString(log);
    std::string t = tail.ok() ? *tail : "";
    if (t.size() > 600) t = t.substr(t.size() - 600);
    return Unavailable(what + "; QEMU's log " + log + " ends with: " + t);
  };
  std::string qmp_path = run + "/qmp.sock";
  std::unique_ptr<QmpClient> qmp;
  for (int i = 0; i < 500 && !qmp; i++) {
    if (qemu_pid_ < 0) return qemu_failed("the restored QEMU exited at start");
    auto c = QmpClient::Connect(qmp_path, 2000);
    if (c.ok()) qmp = std::move(c).value();
    else std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!qmp) return qemu_failed("the restored QEMU's monitor did not come up");
  std::string in = run + "/incoming.sock";
  RETURN_IF_ERROR(qmp->Execute("migrate-incoming", {{"uri", "unix:" + in}}).status().Annotate("migrate-incoming"));
  Fd fd;
  for (int i = 0; i < 500 && !fd.valid(); i++) {
    auto c = ConnectUnix(in);
    if (c.ok()) fd = std::move(c).value();
    else std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!fd.valid()) return qemu_failed("the restored QEMU did not open its incoming socket");
  RestoreStats rs;
  rs.progress = &restore_progress_;
  promote_phase_ = "streaming the checkpoint";
  RETURN_IF_ERROR(WriteRestoreStream(*committed_, committed_configuration_, fd.get(), &rs).Annotate("restore stream"));
  ::shutdown(fd.get(), SHUT_WR);
  promote_phase_ = "waiting for the guest to run";
  for (int i = 0; i < 3000; i++) {
    auto st = qmp->Execute("query-status", json::object(), 2000);
    if (!st.ok()) return qemu_failed("the restored QEMU failed while loading: " + st.status().message());
    if (st->value("status", "") == "running") {
      qmp_socket_ = qmp_path;
      LOG_INFO(tag_) << "restored " << rs.pages << " pages + " << rs.zero_pages << " zero pages; guest running (pid "
                     << pid << ", QMP " << qmp_path << ")";
      return OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return qemu_failed("the restored guest did not start running");
}

Status BackupDomain::DoPromoteLibvirt(const std::string& run, const std::map<std::string, std::string>& disk_images) {
  const json& lv = config_["libvirt"];
  auto rewritten = RewriteDomainXmlForRestore(lv.value("xml", ""), run, opts_.qemu_binary, disk_images);
  if (!rewritten.ok())
    return Status(rewritten.status().code(), "domain " + name_ + ": cannot make its libvirt XML fit this host: " +
                                                 rewritten.status().message());
  std::string xml = std::move(rewritten).value();
  Status w = WriteFileAtomic(run + "/domain.xml", xml);  // for the operator: what was restored
  if (!w.ok()) LOG_WARN(tag_) << "cannot keep the restored XML: " << w.ToString();
  LOG_INFO(tag_) << "restoring epoch " << committed_->committed_epoch() << " through libvirt at "
                 << opts_.libvirt_uri;
  LibvirtRestoreOptions ro;
  ro.uri = opts_.libvirt_uri;
  ro.work_dir = run;
  ro.pid_dir = opts_.libvirt_pid_dir;
  RestoreStats rs;
  rs.progress = &restore_progress_;
  promote_phase_ = "libvirt starting QEMU";
  auto res = RestoreDomain(ro, xml, [&](int fd) {
    promote_phase_ = "streaming the checkpoint";
    Status st = WriteRestoreStream(*committed_, committed_configuration_, fd, &rs).Annotate("restore stream");
    promote_phase_ = "libvirt resuming the guest";
    return st;
  });
  if (!res.ok()) return res.status();
  qemu_pid_ = res->qemu_pid;
  qmp_socket_.clear();
  libvirt_uri_ = opts_.libvirt_uri;
  libvirt_domain_ = res->domain;
  LOG_INFO(tag_) << "restored " << rs.pages << " pages + " << rs.zero_pages << " zero pages; domain " << res->domain
                 << " runs in libvirt " << opts_.libvirt_uri << " (pid " << res->qemu_pid << ", libvirt restore "
                 << res->restore_ms << " ms)";
  return OkStatus();
}

json BackupDomain::StatusJson() const {
  json j;
  j["domain"] = name_;
  j["role"] = state_ == State::kFailedOver ? "primary (promoted)" : "backup";
  j["state"] = StateName(state_);
  // Pages the guest dirtied during the first pass arrive twice, so the bytes
  // received can pass the guest's size before the copy is complete.
  uint64_t total = sync_total_, done = std::min<uint64_t>(sync_done_, sync_total_);
  double pct = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0;
  State st = state_;
  if (st == State::kSyncing || st == State::kWaiting) pct = std::min(pct, 99.0);
  else if (last_committed_ >= 0) pct = 100.0;
  j["sync"] = {{"total_bytes", total}, {"done_bytes", done}, {"percent", pct}};
  j["last_committed_epoch"] = last_committed_.load();
  j["apply_ms"] = {{"p50", apply_ms_.Quantile(0.5)}, {"p99", apply_ms_.Quantile(0.99)}};
  j["promotion"] = {{"state", PromotionStateName(gate_.state())}, {"reason", gate_.reason()},
                    {"error", gate_.error()}, {"failover_ms", failover_ms_.load()}};
  if (st == State::kPromoting) {
    // The promotion holds mu_ until the guest runs: report its progress from
    // the atomics and leave the rest out rather than wait.
    const char* phase = promote_phase_.load();
    uint64_t streamed = restore_progress_.ram_done.load(), all = restore_progress_.ram_total.load();
    j["promotion"]["phase"] = phase ? phase : "preparing";
    j["promotion"]["restore"] = {
        {"done_bytes", streamed},
        {"total_bytes", all},
        {"percent", all ? 100.0 * static_cast<double>(streamed) / static_cast<double>(all) : 0.0}};
    return j;
  }
  j["ack_delay_ms"] = opts_.ack_delay_ms;
  j["checkpoints_total"] = checkpoints_total_.load();
  j["failovers_total"] = failovers_total_.load();
  j["histograms"] = {{"apply_seconds", HistogramToJson(apply_hist_.Snapshot())}};
  std::lock_guard<std::mutex> g(mu_);
  j["link"] = {{"bytes_received", bytes_received_done_ + (link_ ? link_->bytes_received() : 0)}};
  j["primary"] = primary_;
  j["connected"] = session_active_;
  j["error"] = error_;
  j["qmp_socket"] = qmp_socket_;
  int pid = qemu_pid_.load();
  if (!libvirt_uri_.empty()) {
    j["libvirt"] = {{"uri", libvirt_uri_}, {"domain", libvirt_domain_}};
    if (!ProcessRunning(pid)) pid = -1;  // libvirt's child, not ours to reap
  }
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

// ---- server ----

BackupServer::BackupServer(BackupOptions opts, const Clock& clock, std::unique_ptr<Arbiter> arbiter)
    : opts_(std::move(opts)), clock_(clock), arbiter_(std::move(arbiter)) {}

BackupServer::~BackupServer() {
  stopping_ = true;
  if (listen_fd_.valid()) ::shutdown(listen_fd_.get(), SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  std::vector<std::thread> ts;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (int fd : session_fds_) ::shutdown(fd, SHUT_RDWR);
    ts.swap(sessions_);
  }
  for (auto& t : ts) t.join();
}

Status BackupServer::Listen(const HostPort& addr) {
  ASSIGN_OR_RETURN(listen_fd_, ListenTcp(addr));
  RETURN_IF_ERROR(MakeDirs(opts_.state_dir + "/domains", 0700));
  // Checkpoints committed before a restart stay restorable.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(opts_.state_dir + "/domains", ec)) {
    std::string name = e.path().filename().string();
    if (!e.is_directory() || !ValidDomainName(name)) continue;
    auto d = std::make_shared<BackupDomain>(name, opts_, clock_, arbiter_.get());
    Status r = d->Recover();
    if (r.ok()) {
      std::lock_guard<std::mutex> g(mu_);
      domains_[name] = std::move(d);
    } else if (r.code() != Code::kNotFound) {
      LOG_ERROR("backup") << "domain " << name << ": cannot recover its checkpoint: " << r.message();
    }
  }
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  LOG_INFO("backup") << "listening on " << addr.ToString();
  return OkStatus();
}

void BackupServer::AcceptLoop() {
  while (!stopping_) {
    auto fd = Accept(listen_fd_.get());
    if (!fd.ok()) {
      if (!stopping_) LOG_ERROR("backup") << "accept: " << fd.status().ToString();
      return;
    }
    std::lock_guard<std::mutex> g(mu_);
    session_fds_.push_back(fd->get());
    sessions_.emplace_back([this, f = std::move(fd).value()]() mutable { Serve(std::move(f)); });
  }
}

void BackupServer::Serve(Fd fd) {
  int raw = fd.get();
  auto link = std::make_unique<wire::Link>(std::move(fd));
  auto domain = wire::ServerHandshake(*link, opts_.key, opts_.handshake_timeout_ms);
  if (!domain.ok()) {
    LOG_WARN("backup") << "refused " << link->PeerName() << ": " << domain.status().message();
  } else if (!ValidDomainName(*domain)) {
    (void)link->Send(MsgType::kError, 0, wire::EncodeError(InvalidArgument("invalid domain name '" + *domain + "'")));
  } else {
    GetOrCreate(*domain)->Serve(std::move(link));
  }
  std::lock_guard<std::mutex> g(mu_);
  session_fds_.erase(std::remove(session_fds_.begin(), session_fds_.end(), raw), session_fds_.end());
}

std::shared_ptr<BackupDomain> BackupServer::GetOrCreate(const std::string& domain) {
  std::lock_guard<std::mutex> g(mu_);
  auto& d = domains_[domain];
  if (!d) d = std::make_shared<BackupDomain>(domain, opts_, clock_, arbiter_.get());
  return d;
}

bool BackupServer::HasDomain(const std::string& domain) const {
  std::lock_guard<std::mutex> g(mu_);
  return domains_.count(domain) > 0;
}

Status BackupServer::Failover(const std::string& domain) {
  std::shared_ptr<BackupDomain> d;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = domains_.find(domain);
    if (it == domains_.end()) return NotFound("domain " + domain + " is not replicated to this backup");
    d = it->second;
  }
  return d->Promote("operator requested failover");
}

json BackupServer::StatusJson(const std::string& domain) const {
  json arr = json::array();
  std::lock_guard<std::mutex> g(mu_);
  for (const auto& [name, d] : domains_)
    if (domain.empty() || name == domain) arr.push_back(d->StatusJson());
  return arr;
}

}  // namespace remus
