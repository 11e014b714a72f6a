#include "replicator/backup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <filesystem>

#include "common/log.h"
#include "replicator/restore.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

namespace {

bool ValidDomainName(const std::string& d) {
  if (d.empty() || d.size() > 64 || d[0] == '.' || d[0] == '-') return false;
  for (char c : d)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

StatusOr<std::string> Unhex(const std::string& h) {
  if (h.size() % 2) return DataLoss("odd-length hex string");
  std::string out;
  out.reserve(h.size() / 2);
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < h.size(); i += 2) {
    int a = nib(h[i]), b = nib(h[i + 1]);
    if (a < 0 || b < 0) return DataLoss("bad hex digit");
    out.push_back(static_cast<char>(a << 4 | b));
  }
  return out;
}

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
                                               const std::string& qemu_binary) {
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
  Status Promote(const std::string& reason);
  json StatusJson() const;

 private:
  Status HandleFrame(wire::Frame& f);
  Status CommitEpoch(uint64_t epoch, const std::string& payload);
  Status DoPromote();
  void AckLoop();
  void SessionHeartbeat();

  const std::string name_;
  const BackupOptions& opts_;
  const Clock& clock_;
  Arbiter* arbiter_;
  const std::string dir_;
  const std::string tag_;

  mutable std::mutex mu_;  // stores, session state, config
  std::condition_variable cv_;
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

  // Per-session receive state (session thread only).
  Staging staging_;
  std::string device_buf_;
  uint64_t staged_page_bytes_ = 0;
  uint64_t staged_pages_ = 0;

  wire::Link* link_ = nullptr;  // valid during a session
  std::unique_ptr<HeartbeatMonitor> hb_;
  std::deque<std::pair<uint64_t, TimePoint>> acks_;  // guarded by mu_
  bool session_over_ = false;                        // guarded by mu_

  std::atomic<uint64_t> sync_total_{0}, sync_done_{0};
  std::atomic<int64_t> last_committed_{-1};
  SampleWindow apply_ms_;
  std::atomic<double> apply_mb_s_{0};

  PromotionGate gate_;
  std::atomic<int64_t> failover_ms_{-1};
  std::atomic<int> qemu_pid_{-1};
  std::string qmp_socket_;  // guarded by mu_
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
    session_over_ = false;
    goodbye_ = false;
    error_.clear();
    primary_ = link->PeerName();
    link_ = link.get();
  }
  hb_ = std::make_unique<HeartbeatMonitor>(clock_, opts_.heartbeat);
  LOG_INFO(tag_) << "primary " << link->PeerName() << " connected";
  std::thread acker([this] { AckLoop(); });
  std::thread beat([this] { SessionHeartbeat(); });
  Status s;
  for (;;) {
    auto f = link->Recv();
    if (!f.ok()) {
      s = f.status();
      break;
    }
    hb_->Received();
    s = HandleFrame(*f);
    if (!s.ok()) break;
  }
  bool goodbye;
  {
    std::lock_guard<std::mutex> g(mu_);
    goodbye = goodbye_;
    session_over_ = true;
    cv_.notify_all();
  }
  if (!goodbye && s.code() != Code::kAborted && s.code() != Code::kCancelled) {
    if (s.code() == Code::kDataLoss || s.code() == Code::kResourceExhausted || s.code() == Code::kInvalidArgument) {
      // Tell the primary why we stop acking; it drops to unprotected.
      (void)link->Send(MsgType::kError, 0, wire::EncodeError(s));
    }
  }
  link->Shutdown();
  acker.join();
  beat.join();
  staging_.Clear();  // a partial checkpoint is discarded
  device_buf_.clear();
  {
    std::lock_guard<std::mutex> g(mu_);
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

void BackupDomain::SessionHeartbeat() {
  std::unique_lock<std::mutex> l(mu_);
  while (!session_over_) {
    cv_.wait_for(l, std::min<Nanos>(hb_->NextCheckIn(), std::chrono::milliseconds(50)));
    if (session_over_) return;
    wire::Link* link = link_;
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

void BackupDomain::AckLoop() {
  // ACKs go out from here so an --ack-delay-ms never slows down receiving.
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    cv_.wait(l, [&] { return session_over_ || !acks_.empty(); });
    if (session_over_) {
      acks_.clear();
      return;
    }
    auto [epoch, due] = acks_.front();
    if (clock_.Now() < due) {
      cv_.wait_until(l, std::chrono::steady_clock::time_point(due.time_since_epoch()));
      continue;
    }
    acks_.pop_front();
    wire::Link* link = link_;
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
      if (!c.contains("argv") || !c["argv"].is_array() || c["argv"].empty())
        return InvalidArgument("CONFIG carries no QEMU argv");
      RETURN_IF_ERROR(MakeDirs(dir_ + "/run", 0700));
      RETURN_IF_ERROR(WriteFileAtomic(dir_ + "/config.json", c.dump(2)));
      if (c.contains("heartbeat_interval_ms") && c.contains("heartbeat_timeout_ms")) {
        HeartbeatConfig hc{std::chrono::milliseconds(c["heartbeat_interval_ms"].get<int64_t>()),
                           std::chrono::milliseconds(c["heartbeat_timeout_ms"].get<int64_t>())};
        if (hc.interval.count() > 0 && hc.interval < hc.timeout) hb_ = std::make_unique<HeartbeatMonitor>(clock_, hc);
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
      ASSIGN_OR_RETURN(std::string config, Unhex(b.value("configuration", "")));
      int seq;
      {
        std::lock_guard<std::mutex> g(mu_);
        seq = ++session_seq_;
        while (std::filesystem::exists(dir_ + "/store-" + std::to_string(seq))) seq = ++session_seq_;
      }
      ASSIGN_OR_RETURN(auto store, PageStore::Create(dir_ + "/store-" + std::to_string(seq), blocks));
      RETURN_IF_ERROR(WriteFileAtomic(store->dir() + "/configuration.bin", config));
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
  staged_page_bytes_ = 0;
  staged_pages_ = 0;
  if (ci.page_bytes != page_bytes || ci.device_bytes != blob.size())
    return DataLoss("checkpoint " + std::to_string(epoch) + " is incomplete: got " + std::to_string(page_bytes) +
                    " page bytes and " + std::to_string(blob.size()) + " device bytes, the primary sent " +
                    std::to_string(ci.page_bytes) + " and " + std::to_string(ci.device_bytes));
  TimePoint t0 = clock_.Now();
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
      state_ = State::kStandby;
    }
    if (old) {
      std::error_code ec;
      std::filesystem::remove_all(old->dir(), ec);
    }
    LOG_INFO(tag_) << "initial copy committed (" << ci.page_count << " pages); standing by";
  } else {
    Staging st = std::move(staging_);
    staging_ = Staging();
    st.SetDeviceBlob(std::move(blob));
    std::lock_guard<std::mutex> g(mu_);
    if (!committed_) return FailedPrecondition("checkpoint " + std::to_string(epoch) + " before the initial copy");
    RETURN_IF_ERROR(committed_->Commit(epoch, std::move(st)));
  }
  double ms = ToMillis(clock_.Now() - t0);
  apply_ms_.Add(ms);
  if (ms > 0 && epoch > 0) apply_mb_s_ = static_cast<double>(page_bytes) / 1e6 / (ms / 1000.0);
  last_committed_ = static_cast<int64_t>(epoch);
  std::lock_guard<std::mutex> g(mu_);
  acks_.push_back({epoch, clock_.Now() + std::chrono::milliseconds(opts_.ack_delay_ms)});
  cv_.notify_all();
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
    state_ = State::kPromoting;
    TimePoint t0 = clock_.Now();
    s = DoPromote();
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
  LOG_INFO(tag_) << "promoted in " << failover_ms_ << " ms (detection excluded); the guest runs here now";
  return OkStatus();
}

Status BackupDomain::DoPromote() {
  std::lock_guard<std::mutex> g(mu_);
  if (!committed_ || !committed_->has_committed())
    return FailedPrecondition("domain " + name_ + " has no committed checkpoint (the initial copy never completed); "
                              "nothing to restore");
  std::vector<std::string> argv;
  for (const auto& a : config_.value("argv", json::array())) argv.push_back(a.get<std::string>());
  std::string run = dir_ + "/run";
  RETURN_IF_ERROR(MakeDirs(run, 0700));
  for (const char* f : {"/qmp.sock", "/incoming.sock", "/qemu.pid"}) ::unlink((run + f).c_str());
  argv = RewriteArgvForRestore(argv, run, opts_.qemu_binary);
  LOG_INFO(tag_) << "restoring epoch " << committed_->committed_epoch() << " into a new QEMU";
  std::string log = run + "/qemu.log";
  pid_t pid = ::fork();
  if (pid < 0) return ErrnoStatus("fork", errno);
  if (pid == 0) {
    // remusd blocks SIGINT/SIGTERM for its signal thread; QEMU must not inherit that.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::setsid();
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    int nul = ::open("/dev/null", O_RDONLY);
    if (nul >= 0) ::dup2(nul, 0);
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    ::execvp(cargv[0], cargv.data());
    _exit(127);
  }
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
  RETURN_IF_ERROR(WriteRestoreStream(*committed_, committed_configuration_, fd.get(), &rs).Annotate("restore stream"));
  ::shutdown(fd.get(), SHUT_WR);
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

json BackupDomain::StatusJson() const {
  json j;
  j["domain"] = name_;
  j["role"] = state_ == State::kFailedOver ? "primary (promoted)" : "backup";
  j["state"] = StateName(state_);
  uint64_t total = sync_total_, done = sync_done_;
  j["sync"] = {{"total_bytes", total}, {"done_bytes", done},
               {"percent", total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0}};
  j["last_committed_epoch"] = last_committed_.load();
  j["apply_ms"] = {{"p50", apply_ms_.Quantile(0.5)}, {"p99", apply_ms_.Quantile(0.99)}};
  j["promotion"] = {{"state", PromotionStateName(gate_.state())}, {"reason", gate_.reason()},
                    {"error", gate_.error()}, {"failover_ms", failover_ms_.load()}};
  j["ack_delay_ms"] = opts_.ack_delay_ms;
  std::lock_guard<std::mutex> g(mu_);
  j["primary"] = primary_;
  j["connected"] = session_active_;
  j["error"] = error_;
  j["qmp_socket"] = qmp_socket_;
  j["qemu"] = {{"pid", qemu_pid_.load()}};
  if (committed_) j["store"] = committed_->dir();
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
