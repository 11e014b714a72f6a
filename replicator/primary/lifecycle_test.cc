// PrimaryLifecycle with fakes: a checkpoint stream the test drives, a backup
// at the other end of a socket pair, a monitor whose event thread refuses
// commands (as QMP's reader thread and libvirt's event thread do), a netbuf
// and a disk mirror that record what was asked of them. Real time, short
// heartbeat settings.
#include "replicator/primary/lifecycle.h"

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "arbiter/etcd_arbiter.h"
#include "replicator/link/messages.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_etcd.h"
#include "tests/fakes/fake_monitor.h"
#include "tests/fakes/loopback_link.h"
#include "tests/fakes/timing.h"

namespace remus {
namespace {

using json = nlohmann::json;
using wire::MsgType;
using Steady = std::chrono::steady_clock;
using std::chrono::milliseconds;
using testing::kSchedulingSlack;

int64_t Ms(Steady::duration d) { return std::chrono::duration_cast<milliseconds>(d).count(); }

// Waits (polling) until pred() or the limit; returns pred().
template <class Pred>
bool Eventually(Pred pred, milliseconds limit = milliseconds(5000)) {
  const auto until = Steady::now() + limit;
  while (!pred()) {
    if (Steady::now() > until) return pred();
    std::this_thread::sleep_for(milliseconds(2));
  }
  return true;
}

// ---- Fakes -------------------------------------------------------------------

// QEMU's checkpoints on demand. With auto_epochs, a request comes every
// interval; otherwise one per Fire().
class FakeStream final : public CheckpointStream {
 public:
  bool auto_epochs = true;
  milliseconds interval{5};
  size_t blob_bytes = 1000;  // device state per checkpoint

  Status Start() override { return OkStatus(); }
  Status ReadInitial(qemu::PageSink* sink, qemu::InitialInfo* info) override {
    for (uint64_t i = 0; i < 4; i++) RETURN_IF_ERROR(sink->OnPage(0, i * wire::kPageSize, nullptr));
    info->device_state = "initial-device-state";
    return OkStatus();
  }
  Status SendReady() override { return OkStatus(); }
  Status WaitForRequest() override {
    std::unique_lock<std::mutex> l(mu_);
    if (auto_epochs) {
      cv_.wait_for(l, interval, [&] { return aborted_ || fail_next_.has_value(); });
    } else {
      cv_.wait(l, [&] { return aborted_ || fail_next_.has_value() || fired_ > 0; });
      if (fired_ > 0) fired_--;
    }
    if (fail_next_) return *fail_next_;
    if (aborted_) return Cancelled("stream aborted");
    return OkStatus();
  }
  Status BeginPause() override {
    std::lock_guard<std::mutex> l(mu_);
    paused_ = true;
    paused_at_ = Steady::now();
    pauses_++;
    return OkStatus();
  }
  StatusOr<std::string> ReadCheckpoint(qemu::PageSink* sink, uint64_t* pages) override {
    RETURN_IF_ERROR(sink->OnPage(0, 0, nullptr));
    *pages = 1;
    return std::string(blob_bytes, 'd');
  }
  std::vector<std::vector<uint8_t>> TakeRetained() override { return {}; }
  const std::shared_ptr<BufferPool>& pool() const override { return pool_; }
  Status EndPause() override {
    std::lock_guard<std::mutex> l(mu_);
    paused_ = false;
    loaded_++;
    cv_.notify_all();
    return OkStatus();
  }
  Status SetInterval(int ms) override {
    std::lock_guard<std::mutex> l(mu_);
    set_interval_calls_++;
    interval = milliseconds(ms);  // auto_epochs follow it, as QEMU's timer
    if (!auto_epochs) fired_++;  // as QEMU: a new interval triggers a checkpoint
    cv_.notify_all();
    return OkStatus();
  }
  int set_interval_calls() const { std::lock_guard<std::mutex> l(mu_); return set_interval_calls_; }
  int64_t interval_ms() const { std::lock_guard<std::mutex> l(mu_); return interval.count(); }
  Status CheckInColo() override { return OkStatus(); }
  const std::vector<qemu::RamBlock>& blocks() const override { return blocks_; }
  void Abort() override {
    std::lock_guard<std::mutex> l(mu_);
    aborted_ = true;
    cv_.notify_all();
  }
  Status GiveUp() override {
    std::lock_guard<std::mutex> l(mu_);
    give_up_calls_++;
    if (give_up_failures_ > 0) {
      give_up_failures_--;
      return Unavailable("libvirt is not connected");
    }
    if (gave_up_) return OkStatus();
    gave_up_ = true;
    give_up_at_ = Steady::now();
    give_up_thread_ = std::this_thread::get_id();
    paused_ = false;  // QEMU leaves COLO and the guest runs
    return OkStatus();
  }

  // The next n GiveUp calls find the monitor unreachable.
  void FailGiveUp(int n) {
    std::lock_guard<std::mutex> l(mu_);
    give_up_failures_ = n;
  }
  int give_up_calls() const { std::lock_guard<std::mutex> l(mu_); return give_up_calls_; }
  void Fire() {
    std::lock_guard<std::mutex> l(mu_);
    fired_++;
    cv_.notify_all();
  }
  // The stream breaks (QEMU died, say).
  void Break(Status s) {
    std::lock_guard<std::mutex> l(mu_);
    fail_next_ = std::move(s);
    cv_.notify_all();
  }
  bool paused() const { std::lock_guard<std::mutex> l(mu_); return paused_; }
  Steady::time_point paused_at() const { std::lock_guard<std::mutex> l(mu_); return paused_at_; }
  uint64_t loaded() const { std::lock_guard<std::mutex> l(mu_); return loaded_; }
  uint64_t pauses() const { std::lock_guard<std::mutex> l(mu_); return pauses_; }
  bool gave_up() const { std::lock_guard<std::mutex> l(mu_); return gave_up_; }
  Steady::time_point give_up_at() const { std::lock_guard<std::mutex> l(mu_); return give_up_at_; }
  std::thread::id give_up_thread() const { std::lock_guard<std::mutex> l(mu_); return give_up_thread_; }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool aborted_ = false, paused_ = false, gave_up_ = false;
  std::optional<Status> fail_next_;
  uint64_t fired_ = 0, loaded_ = 0, pauses_ = 0;
  int give_up_failures_ = 0, give_up_calls_ = 0, set_interval_calls_ = 0;
  Steady::time_point paused_at_, give_up_at_;
  std::thread::id give_up_thread_;
  std::shared_ptr<BufferPool> pool_;
  std::vector<qemu::RamBlock> blocks_{{"pc.ram", 4 * wire::kPageSize}};
};

// As the real buffers (netbuf.h): calls after Finish are no-ops. The epoch
// loop may still place the barrier of a checkpoint it was reading when the
// teardown finished the buffer; that must not count as buffering again.
class FakeNetbuf final : public OutputBuffer {
 public:
  Status Barrier(uint64_t e) override { return Log("barrier", e); }
  Status Release(uint64_t e) override { return Log("release", e); }
  Status Finish(bool primary_continues) override {
    Status s = Log(primary_continues ? "finish-release" : "finish-drop", 0);
    finished_ = true;
    return s;
  }
  std::string_view mode() const override { return "fake"; }
  std::string_view guarantee() const override { return "fake"; }
  uint64_t buffered_packets() const override { return 0; }
  std::vector<std::pair<std::string, uint64_t>> log() const { std::lock_guard<std::mutex> l(mu_); return log_; }

 private:
  Status Log(const char* what, uint64_t e) {
    std::lock_guard<std::mutex> l(mu_);
    if (!finished_) log_.emplace_back(what, e);
    return OkStatus();
  }
  mutable std::mutex mu_;
  std::atomic<bool> finished_{false};  // set after Finish's own entry
  std::vector<std::pair<std::string, uint64_t>> log_;
};

// Stop cancels the mirror jobs through the monitor, as DiskSource does.
class FakeDisks final : public DiskMirror {
 public:
  explicit FakeDisks(QemuMonitor* m) : monitor_(m) {}
  Status Start() override { return OkStatus(); }
  void OnEvent(const json&) override {}
  bool AllReady() const override { return true; }
  Status failure() const override { return OkStatus(); }
  json Progress() const override { return json::array(); }
  double Fraction() const override { return 1.0; }
  void Stop(bool qemu_alive) override {
    std::lock_guard<std::mutex> l(mu_);
    stops_.push_back(qemu_alive);
    if (qemu_alive) cancel_ = monitor_->Execute("block-job-cancel", {{"device", "remus-drive0"}}).status();
  }
  std::vector<bool> stops() const { std::lock_guard<std::mutex> l(mu_); return stops_; }
  Status cancel() const { std::lock_guard<std::mutex> l(mu_); return cancel_; }

 private:
  QemuMonitor* monitor_;
  mutable std::mutex mu_;
  std::vector<bool> stops_;
  Status cancel_ = Internal("never cancelled");
};

// The backup: acks every COMMIT, sends heartbeats; can hold its acks, or go
// silent altogether (a blackhole: it neither reads nor sends, and the
// connection stays open).
class FakeBackup {
 public:
  FakeBackup(std::unique_ptr<wire::Link> link, milliseconds hb_interval)
      : link_(std::move(link)), hb_interval_(hb_interval) {
    reader_ = std::thread([this] { ReadLoop(); });
    beater_ = std::thread([this] { BeatLoop(); });
  }
  ~FakeBackup() {
    {
      std::lock_guard<std::mutex> l(mu_);
      closing_ = true;
      cv_.notify_all();
    }
    link_->Shutdown();
    reader_.join();
    beater_.join();
  }
  // Each ACK goes out this long after the COMMIT was read, one at a time: a
  // backup that applies slowly.
  void SetAckDelay(milliseconds d) {
    std::lock_guard<std::mutex> l(mu_);
    ack_delay_ = d;
  }
  void HoldAcks(bool hold) {
    std::lock_guard<std::mutex> l(mu_);
    hold_acks_ = hold;
    if (!hold) {
      for (uint64_t e : held_) (void)link_->Send(MsgType::kAck, e, "");
      held_.clear();
    }
  }
  // Neither reads nor sends: a pulled cable, a powered-off host.
  void Blackhole() {
    std::lock_guard<std::mutex> l(mu_);
    blackhole_ = true;
    not_reading_ = true;
  }
  // Alive (heartbeats go on) but takes no data: busy applying a commit.
  void StopReading(bool stop) {
    std::lock_guard<std::mutex> l(mu_);
    not_reading_ = stop;
    cv_.notify_all();
  }
  // How it answers SWITCHOVER.
  enum class OnSwitchover { kAccept, kRefuse, kSilent, kHangUp };
  void SetOnSwitchover(OnSwitchover a) {
    std::lock_guard<std::mutex> l(mu_);
    on_switchover_ = a;
  }
  int64_t switchover_epoch() const { std::lock_guard<std::mutex> l(mu_); return switchover_epoch_; }
  int64_t last_commit() const { std::lock_guard<std::mutex> l(mu_); return last_commit_; }
  // The frame types it received, in order.
  std::vector<MsgType> types() const { std::lock_guard<std::mutex> l(mu_); return types_; }
  bool Saw(MsgType t) const {
    std::lock_guard<std::mutex> l(mu_);
    for (auto x : types_)
      if (x == t) return true;
    return false;
  }
  int64_t commits() const { std::lock_guard<std::mutex> l(mu_); return commits_; }
  std::string goodbye_reason() const { std::lock_guard<std::mutex> l(mu_); return goodbye_reason_; }

 private:
  void ReadLoop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return !not_reading_ || closing_; });
        if (closing_) return;
      }
      auto f = link_->Recv();
      if (!f.ok()) {
        link_->Shutdown();  // the primary's ack reader ends
        return;
      }
      std::unique_lock<std::mutex> l(mu_);
      types_.push_back(f->type);
      if (f->type == MsgType::kSwitchover) {
        switchover_epoch_ = static_cast<int64_t>(f->epoch);
        switch (on_switchover_) {
          case OnSwitchover::kAccept: (void)link_->Send(MsgType::kSwitchover, f->epoch, ""); break;
          case OnSwitchover::kRefuse:
            (void)link_->Send(MsgType::kError, 0, wire::EncodeError(FailedPrecondition("refused by the test")));
            break;
          case OnSwitchover::kSilent: break;
          case OnSwitchover::kHangUp:
            l.unlock();
            link_->Shutdown();
            return;
        }
        continue;
      }
      if (f->type == MsgType::kGoodbye || f->type == MsgType::kFailover) {
        auto r = wire::DecodeReason(f->payload);
        if (r.ok()) goodbye_reason_ = r->reason;
      }
      if (f->type != MsgType::kCommit || blackhole_) continue;
      commits_++;
      last_commit_ = static_cast<int64_t>(f->epoch);
      if (hold_acks_) {
        held_.push_back(f->epoch);
      } else if (ack_delay_.count() > 0) {
        const milliseconds d = ack_delay_;
        l.unlock();
        std::this_thread::sleep_for(d);
        (void)link_->Send(MsgType::kAck, f->epoch, "");
      } else {
        (void)link_->Send(MsgType::kAck, f->epoch, "");
      }
    }
  }
  void BeatLoop() {
    std::unique_lock<std::mutex> l(mu_);
    while (!closing_) {
      cv_.wait_for(l, hb_interval_);
      if (!closing_ && !blackhole_) (void)link_->TrySend(MsgType::kHeartbeat, 0, "");
    }
  }

  std::unique_ptr<wire::Link> link_;
  const milliseconds hb_interval_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool closing_ = false, blackhole_ = false, not_reading_ = false, hold_acks_ = false;
  std::vector<uint64_t> held_;
  milliseconds ack_delay_{0};
  std::vector<MsgType> types_;
  int64_t commits_ = 0, last_commit_ = -1, switchover_epoch_ = -1;
  OnSwitchover on_switchover_ = OnSwitchover::kAccept;
  std::string goodbye_reason_;
  std::thread reader_, beater_;
};

// ---- The fixture -------------------------------------------------------------

struct World {
  // Answers every command; refuses those issued from its event thread.
  FakeMonitor monitor{"query-status", {{"status", "running"}}};
  World() { monitor.AnswerOthers(json::object()); }
  FakeStream* stream = nullptr;   // owned by the lifecycle
  FakeNetbuf* netbuf = nullptr;   // owned by the lifecycle
  FakeDisks* disks = nullptr;     // owned by the lifecycle
  std::unique_ptr<FakeBackup> backup;
  std::unique_ptr<PrimaryLifecycle> lc;
  bool qemu_running = true;
  int end_qemu_calls = 0;                  // under mu
  bool libvirt_mode = false;               // set before Start
  DomainLease* lease = nullptr;            // set before Start: arbitration
  std::atomic<bool> monitor_connected{true};
  std::mutex mu;

  // small_buffers: a few hundred KiB fill the socket (a stuck sender).
  void Start(LifecycleOptions o, bool small_buffers = false, std::function<void(FakeStream*)> setup = nullptr) {
    auto [primary_end, backup_end] = testing::MakeLoopbackLinks(small_buffers ? 16 * 1024 : 0);
    backup = std::make_unique<FakeBackup>(std::move(backup_end),
                                          std::chrono::duration_cast<milliseconds>(o.heartbeat.interval));
    lc = std::make_unique<PrimaryLifecycle>(std::move(o), RealClock::Get());
    auto s = std::make_unique<FakeStream>();
    stream = s.get();
    if (setup) setup(stream);
    LifecycleDeps d;
    d.link = std::move(primary_end);
    d.source = std::move(s);
    d.monitor = &monitor;
    d.make_netbuf = [this]() -> StatusOr<std::unique_ptr<OutputBuffer>> {
      auto n = std::make_unique<FakeNetbuf>();
      netbuf = n.get();
      return std::unique_ptr<OutputBuffer>(std::move(n));
    };
    d.make_disks = [this](DiskMirror::WriteFn) {
      auto f = std::make_unique<FakeDisks>(&monitor);
      disks = f.get();
      return std::unique_ptr<DiskMirror>(std::move(f));
    };
    d.qemu_running = [this] {
      std::lock_guard<std::mutex> l(mu);
      return qemu_running;
    };
    if (libvirt_mode) d.monitor_connected = [this] { return monitor_connected.load(); };
    d.end_qemu = [this] {
      std::lock_guard<std::mutex> l(mu);
      end_qemu_calls++;
      qemu_running = false;
      return OkStatus();
    };
    d.lease = lease;
    monitor.SetEventHandler([l = lc.get()](const json& ev) { l->OnQemuEvent(ev); });
    ASSERT_TRUE(lc->Attach(std::move(d)).ok());
  }
  int end_qemu() {
    std::lock_guard<std::mutex> l(mu);
    return end_qemu_calls;
  }
  ~World() {
    monitor.SetEventHandler(nullptr);
    lc.reset();
    backup.reset();
  }
};

LifecycleOptions Opts(milliseconds hb_interval = milliseconds(20), milliseconds hb_timeout = milliseconds(200)) {
  LifecycleOptions o;
  o.domain = "vm1";
  o.backup = "fake-backup";
  o.heartbeat = {hb_interval, hb_timeout};
  return o;
}

// ---- Tests -------------------------------------------------------------------

TEST(PrimaryLifecycle, EpochsFlowAcksReleaseOutputInOrderAndUnprotectSaysGoodbye) {
  World w;
  w.Start(Opts());
  EXPECT_EQ(w.lc->state(), PrimaryState::kSyncing);
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  ASSERT_TRUE(Eventually([&] { return w.backup->commits() >= 10; }));
  ASSERT_TRUE(w.lc->Unprotect().ok());
  EXPECT_EQ(w.lc->state(), PrimaryState::kStopped);
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kGoodbye); }));
  EXPECT_EQ(w.backup->goodbye_reason(), "unprotected by the operator");
  EXPECT_TRUE(w.stream->gave_up());

  // Barriers in epoch order; each release covers an epoch already barred,
  // never goes back, and the end releases the rest (the guest runs on).
  auto log = w.netbuf->log();
  ASSERT_FALSE(log.empty());
  uint64_t last_barrier = 0, last_release = 0;
  int releases = 0;
  for (size_t i = 0; i < log.size(); i++) {
    const auto& [what, e] = log[i];
    if (what == "barrier") {
      EXPECT_EQ(e, last_barrier + 1);
      last_barrier = e;
    } else if (what == "release") {
      EXPECT_GE(e, last_release);
      EXPECT_LE(e, last_barrier);
      last_release = e;
      releases++;
    } else {
      EXPECT_EQ(what, "finish-release");
      EXPECT_EQ(i, log.size() - 1);
    }
  }
  EXPECT_GE(releases, 5);
  ASSERT_EQ(w.disks->stops(), std::vector<bool>{true});
  EXPECT_TRUE(w.disks->cancel().ok());
  // Idempotent; SetInterval refuses once it ended.
  EXPECT_TRUE(w.lc->Unprotect().ok());
  EXPECT_EQ(w.lc->SetInterval(50).code(), Code::kFailedPrecondition);
}

TEST(PrimaryLifecycle, BackpressureHoldsLoadedWhileTooManyEpochsAreUnacked) {
  World w;
  LifecycleOptions o = Opts(milliseconds(20), milliseconds(2000));
  o.max_unacked_epochs = 2;
  w.Start(std::move(o), false, [](FakeStream* s) { s->auto_epochs = false; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));  // epoch 0 acked
  w.backup->HoldAcks(true);
  w.stream->Fire();
  w.stream->Fire();
  ASSERT_TRUE(Eventually([&] { return w.stream->loaded() == 2; }));  // epochs 1, 2: LOADED at once
  w.stream->Fire();  // epoch 3: two unacked, so LOADED waits; the guest stays paused
  ASSERT_TRUE(Eventually([&] { return w.stream->pauses() == 3; }));
  std::this_thread::sleep_for(milliseconds(150));
  EXPECT_EQ(w.stream->loaded(), 2u);
  EXPECT_TRUE(w.stream->paused());
  json st;
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["backpressure_waits"], 1);
  EXPECT_EQ(st["unacked_epochs"], 2);
  w.backup->HoldAcks(false);  // ACK 1, 2
  ASSERT_TRUE(Eventually([&] { return w.stream->loaded() == 3; }));
  EXPECT_FALSE(w.stream->paused());
  EXPECT_EQ(w.lc->state(), PrimaryState::kProtected);
}

// --interval auto: slow acks raise the interval through the stream's
// SetInterval (QEMU's x-checkpoint-delay), a recovery lowers it, and `tune`
// fixes it again.
TEST(PrimaryLifecycle, AutomaticIntervalFollowsTheAcksAndTuneFixesIt) {
  World w;
  LifecycleOptions o = Opts(milliseconds(20), milliseconds(2000));
  o.interval_ms = 5;
  o.interval_auto = true;
  o.interval_auto_opts = {.latency_budget_ms = 1000, .min_ms = 5, .max_ms = 400};
  w.Start(std::move(o), false, [](FakeStream* s) { s->interval = milliseconds(5); });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  json st;
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["interval_mode"], "auto");
  EXPECT_EQ(st["latency_budget_ms"], 1000);
  EXPECT_EQ(st["interval_auto"]["min_ms"], 5);
  EXPECT_EQ(st["interval_auto"]["max_ms"], 400);

  // The backup applies a checkpoint in 40 ms: keeping pace needs ~60 ms.
  w.backup->SetAckDelay(milliseconds(40));
  ASSERT_TRUE(Eventually([&] { return w.stream->interval_ms() >= 50; }, milliseconds(10000)))
      << w.stream->interval_ms();
  ASSERT_TRUE(Eventually([&] {
    json s;
    w.lc->FillStatus(&s);
    return s["interval_ms"] == w.stream->interval_ms();
  }));
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["interval_reason"].get<std::string>().rfind("keeping pace: acks take ", 0), 0u) << st.dump();
  EXPECT_GE(st["interval_auto"]["changes"].get<int>(), 1);
  EXPECT_LE(st["interval_ms"].get<int>(), 400);
  const int calls = w.stream->set_interval_calls();
  EXPECT_GE(calls, 1);

  // Recovered: back down to the floor.
  w.backup->SetAckDelay(milliseconds(0));
  ASSERT_TRUE(Eventually([&] { return w.stream->interval_ms() <= 6; }, milliseconds(15000)))
      << w.stream->interval_ms();
  ASSERT_TRUE(Eventually([&] {
    json s;
    w.lc->FillStatus(&s);
    return s["interval_reason"].get<std::string>().rfind("at the floor 5 ms", 0) == 0;
  }));

  // tune --interval 30: fixed from then on, whatever the acks say.
  ASSERT_TRUE(w.lc->SetInterval(30).ok());
  w.backup->SetAckDelay(milliseconds(40));
  std::this_thread::sleep_for(milliseconds(500));
  st = json::object();
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["interval_mode"], "fixed");
  EXPECT_EQ(st["interval_ms"], 30);
  EXPECT_EQ(st["latency_budget_ms"], 0);
  EXPECT_EQ(st["interval_reason"], "fixed by remusctl tune");
  EXPECT_EQ(w.stream->interval_ms(), 30);
  EXPECT_FALSE(st.contains("interval_auto"));

  // tune --interval auto with bounds that cannot work.
  Status bad = w.lc->SetAutoInterval({.latency_budget_ms = 50, .min_ms = 60, .max_ms = 100});
  EXPECT_EQ(bad.code(), Code::kInvalidArgument);
  EXPECT_EQ(bad.message(),
            "domain vm1: --interval-min 60 ms leaves nothing of the 50 ms latency budget: the floor must be below the "
            "budget");
  ASSERT_TRUE(w.lc->SetAutoInterval({.latency_budget_ms = 1000, .min_ms = 5, .max_ms = 400}).ok());
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["interval_mode"], "auto");
  ASSERT_TRUE(Eventually([&] { return w.stream->interval_ms() >= 50; }, milliseconds(10000)));
  w.backup->SetAckDelay(milliseconds(0));
}

TEST(PrimaryLifecycle, BackpressureCountsUnackedBytes) {
  World w;
  LifecycleOptions o = Opts(milliseconds(20), milliseconds(2000));
  o.max_unacked_bytes = 3000;  // one checkpoint of ~1 KiB fits, three do not
  w.Start(std::move(o), false, [](FakeStream* s) { s->auto_epochs = false; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.backup->HoldAcks(true);
  for (int i = 0; i < 3; i++) w.stream->Fire();
  ASSERT_TRUE(Eventually([&] { return w.stream->pauses() == 3; }));
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(w.stream->loaded(), 2u);
  w.backup->HoldAcks(false);
  ASSERT_TRUE(Eventually([&] { return w.stream->loaded() == 3; }));
}

// Issue 11, defect 3: a blackholed backup (no FIN, no RST) while the sender
// is stuck in a write and the guest is paused on backpressure. The primary
// must notice within the heartbeat timeout and release the guest: never
// paused by us for longer than heartbeat timeout + one interval.
TEST(PrimaryLifecycle, BlackholedBackupUnprotectsWithinTheHeartbeatTimeout) {
  const milliseconds interval(50), timeout(200);
  World w;
  LifecycleOptions o = Opts(interval, timeout);
  o.max_unacked_epochs = 2;
  w.Start(std::move(o), /*small_buffers=*/true, [](FakeStream* s) { s->blob_bytes = 1u << 20; });
  ASSERT_TRUE(Eventually([&] { return w.backup->commits() >= 3; }));
  const auto t_blackhole = Steady::now();
  w.backup->Blackhole();
  // The sender soon sticks in a 1 MiB write and the next checkpoint waits
  // for acks that never come: the guest is paused by us.
  ASSERT_TRUE(Eventually([&] { return w.stream->gave_up(); }, milliseconds(10000)))
      << "the primary never noticed its backup was gone";
  const int64_t detect_ms = Ms(w.stream->give_up_at() - t_blackhole);
  const int64_t paused_ms = Ms(w.stream->give_up_at() - w.stream->paused_at());
  std::printf("blackhole: guest released %lld ms after the backup went silent; last pause lasted %lld ms "
              "(bound %lld ms, + %lld ms scheduling slack)\n",
              static_cast<long long>(detect_ms), static_cast<long long>(paused_ms),
              static_cast<long long>((timeout + interval).count()),
              static_cast<long long>(kSchedulingSlack.count()));
  EXPECT_LE(detect_ms, (timeout + interval + kSchedulingSlack).count());
  EXPECT_LE(paused_ms, (timeout + interval + kSchedulingSlack).count());
  EXPECT_FALSE(w.stream->paused());
  json st;
  w.lc->FillStatus(&st);
  EXPECT_GE(st["backpressure_waits"].get<int>(), 1);  // the guest was held for acks
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kUnprotected; }, milliseconds(1000)));
  EXPECT_NE(w.lc->error().find("silent"), std::string::npos) << w.lc->error();
  auto log = w.netbuf->log();
  ASSERT_FALSE(log.empty());
  EXPECT_EQ(log.back().first, "finish-release");  // output flows again
  // The teardown itself is bounded too: GOODBYE gets one interval.
  EXPECT_TRUE(Eventually([&] { return !w.disks->stops().empty(); }, timeout + 2 * interval));
  // Unprotect afterwards succeeds and keeps the reason.
  EXPECT_TRUE(w.lc->Unprotect().ok());
  EXPECT_EQ(w.lc->state(), PrimaryState::kUnprotected);
}

TEST(PrimaryLifecycle, UnprotectWithASilentBackupReleasesTheGuestFirst) {
  const milliseconds interval(50), timeout(300);
  World w;
  LifecycleOptions o = Opts(interval, timeout);
  o.max_unacked_epochs = 2;
  w.Start(std::move(o), /*small_buffers=*/true, [](FakeStream* s) { s->blob_bytes = 1u << 20; });
  ASSERT_TRUE(Eventually([&] { return w.backup->commits() >= 3; }));
  w.backup->Blackhole();
  ASSERT_TRUE(Eventually([&] { return w.stream->paused(); }));  // held on backpressure
  const auto t0 = Steady::now();
  ASSERT_TRUE(w.lc->Unprotect().ok());
  const int64_t unprotect_ms = Ms(Steady::now() - t0);
  ASSERT_TRUE(w.stream->gave_up());
  // The guest is released at once, before the last words: those wait out the
  // backup's silence (the heartbeat timeout), so a release after them would
  // come at least `timeout` after t0.
  EXPECT_LT(Ms(w.stream->give_up_at() - t0), timeout.count()) << "the guest waited for the GOODBYE";
  // The GOODBYE gives up with the backup's silence (bound: timeout + interval).
  EXPECT_LE(unprotect_ms, (timeout + interval + kSchedulingSlack).count());
  EXPECT_EQ(w.lc->state(), PrimaryState::kStopped);
  EXPECT_EQ(w.netbuf->log().back().first, "finish-release");
}

TEST(PrimaryLifecycle, ABackupThatLivesButTakesNoDataIsNotLostAndGetsItsGoodbye) {
  // Heartbeats keep coming while the backup does not read (a slow commit):
  // that is not a loss, however long the sender is stuck, and the GOODBYE
  // of an unprotect during it is delivered, not dropped (a backup that gets
  // no GOODBYE promotes).
  const milliseconds interval(20), timeout(150);
  World w;
  LifecycleOptions o = Opts(interval, timeout);
  o.max_unacked_epochs = 2;
  w.Start(std::move(o), /*small_buffers=*/true, [](FakeStream* s) { s->blob_bytes = 1u << 20; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.backup->StopReading(true);
  std::this_thread::sleep_for(3 * timeout);
  EXPECT_EQ(w.lc->state(), PrimaryState::kProtected) << w.lc->error();
  const int64_t before = w.backup->commits();
  std::thread later([&] {
    std::this_thread::sleep_for(3 * timeout);  // Unprotect waits through this
    w.backup->StopReading(false);
  });
  const auto t0 = Steady::now();
  ASSERT_TRUE(w.lc->Unprotect().ok());
  later.join();
  EXPECT_GE(Ms(Steady::now() - t0), 2 * timeout.count());
  EXPECT_TRUE(w.stream->gave_up());
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kGoodbye); }));
  EXPECT_GE(w.backup->commits(), before);
  EXPECT_EQ(w.lc->error(), "");
}

TEST(PrimaryLifecycle, QemuDeathSendsFailoverAndDropsHeldOutput) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  {
    std::lock_guard<std::mutex> l(w.mu);
    w.qemu_running = false;
  }
  w.lc->OnQemuLost("its QMP monitor closed");
  w.stream->Break(Unavailable("QEMU closed the migration stream"));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kFailedOver; }));
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kFailover); }));
  EXPECT_FALSE(w.backup->Saw(MsgType::kGoodbye));
  EXPECT_FALSE(w.stream->gave_up());  // nothing to give up: QEMU is gone
  // The state is final before the output buffer and the disks are finished.
  ASSERT_TRUE(Eventually([&] { return !w.disks->stops().empty(); }));
  EXPECT_EQ(w.netbuf->log().back().first, "finish-drop");
  EXPECT_EQ(w.disks->stops(), std::vector<bool>{false});
}

// Issue 11, defect 10: a guest shutdown arrives on the monitor's event
// thread, which refuses commands. The teardown (GiveUp, block-job-cancel)
// must run on the lifecycle's own thread.
TEST(PrimaryLifecycle, GuestShutdownSaysGoodbyeAndTearsDownOffTheEventThread) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.monitor.EmitOnEventThread({{"event", "SHUTDOWN"}, {"data", {{"guest", true}, {"reason", "guest-shutdown"}}}});
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kStopped; }));
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kGoodbye); }));
  EXPECT_EQ(w.backup->goodbye_reason(), "the guest shut down");
  EXPECT_FALSE(w.backup->Saw(MsgType::kFailover));
  ASSERT_TRUE(Eventually([&] { return !w.disks->stops().empty(); }));
  EXPECT_TRUE(w.disks->cancel().ok()) << w.disks->cancel().ToString();
  EXPECT_TRUE(w.monitor.refused().empty());
  EXPECT_TRUE(w.stream->gave_up());
  EXPECT_EQ(w.lc->error(), "");
}

TEST(PrimaryLifecycle, HostShutdownIsNotTheEndButTheExitIsAFailover) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.monitor.EmitOnEventThread({{"event", "SHUTDOWN"}, {"data", {{"guest", false}, {"reason", "host-signal"}}}});
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_EQ(w.lc->state(), PrimaryState::kProtected);
  {
    std::lock_guard<std::mutex> l(w.mu);
    w.qemu_running = false;
  }
  w.stream->Break(Unavailable("QEMU closed the migration stream"));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kFailedOver; }));
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kFailover); }));
}

TEST(PrimaryLifecycle, StreamBreakUnderALiveQemuLeavesTheGuestUnprotected) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.stream->Break(DataLoss("bad section id"));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kUnprotected; }));
  EXPECT_TRUE(w.stream->gave_up());
  EXPECT_NE(w.lc->error().find("bad section id"), std::string::npos);
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kGoodbye); }));
  // Unprotect after the loss: OK, the reason stays.
  EXPECT_TRUE(w.lc->Unprotect().ok());
  EXPECT_EQ(w.lc->state(), PrimaryState::kUnprotected);
}

TEST(PrimaryLifecycle, LibvirtAwayAtTheEndRetriesLeavingColoOnceItIsBack) {
  // libvirt mode: the monitor is libvirtd, which may be restarting when
  // protection ends; QEMU then waits for x-colo-lost-heartbeat (GiveUp).
  World w;
  w.libvirt_mode = true;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.monitor_connected = false;
  w.stream->FailGiveUp(1);
  w.monitor.EmitOnEventThread({{"event", "SHUTDOWN"}, {"data", {{"guest", true}, {"reason", "guest-shutdown"}}}});
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kStopped; }));
  std::this_thread::sleep_for(milliseconds(700));
  EXPECT_EQ(w.stream->give_up_calls(), 1);  // not while libvirt is away
  EXPECT_FALSE(w.stream->gave_up());
  w.monitor_connected = true;
  ASSERT_TRUE(Eventually([&] { return w.stream->gave_up(); }));
  EXPECT_EQ(w.stream->give_up_calls(), 2);
  EXPECT_NE(w.lc->error().find("once libvirt was back"), std::string::npos) << w.lc->error();
}

TEST(PrimaryLifecycle, StartThatNeverAttachedEndsWithoutThreads) {
  PrimaryLifecycle lc(Opts(), RealClock::Get());
  EXPECT_EQ(lc.state(), PrimaryState::kStarting);
  lc.FailStart(Unavailable("backup unreachable"));
  ASSERT_TRUE(Eventually([&] { return lc.state() == PrimaryState::kUnprotected; }));
  EXPECT_EQ(lc.error(), "backup unreachable");
  EXPECT_TRUE(lc.Unprotect().ok());
  PrimaryLifecycle lc2(Opts(), RealClock::Get());
  EXPECT_TRUE(lc2.Unprotect().ok());
  EXPECT_EQ(lc2.state(), PrimaryState::kStopped);
}

TEST(PrimaryLifecycle, DestructorStopsProtectionOnPurpose) {
  auto w = std::make_unique<World>();
  w->Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w->backup->commits() >= 2; }));
  FakeBackup* b = w->backup.get();
  w->monitor.SetEventHandler(nullptr);
  w->lc.reset();
  EXPECT_TRUE(Eventually([&] { return b->Saw(MsgType::kGoodbye); }));
  EXPECT_EQ(b->goodbye_reason(), "daemon shutting down");
}

// ---- Planned switchover -----------------------------------------------------

// The final checkpoint is never LOADED: the guest stays paused from its
// capture on. Only after its ACK (and the release of its output) does
// SWITCHOVER name it; on acceptance QEMU is ended and FAILOVER follows; the
// guest never resumed (no GiveUp) and nothing held is released at the end.
TEST(PrimaryLifecycle, SwitchoverHoldsTheFinalCheckpointAndEndsQemuOnceAccepted) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(2000)), false, [](FakeStream* s) { s->auto_epochs = false; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.stream->Fire();
  w.stream->Fire();
  ASSERT_TRUE(Eventually([&] { return w.backup->commits() >= 3; }));  // epochs 0, 1, 2
  ASSERT_TRUE(w.lc->Switchover().ok()) << w.lc->error();
  EXPECT_EQ(w.lc->state(), PrimaryState::kSwitchedOver);
  EXPECT_EQ(w.stream->set_interval_calls(), 1);  // the final checkpoint was asked for at once
  EXPECT_EQ(w.stream->pauses(), 3u);
  EXPECT_EQ(w.stream->loaded(), 2u);  // epoch 3 paused the guest, never resumed it
  EXPECT_TRUE(w.stream->paused());
  EXPECT_FALSE(w.stream->gave_up());
  EXPECT_EQ(w.end_qemu(), 1);
  EXPECT_EQ(w.backup->switchover_epoch(), 3);
  ASSERT_TRUE(Eventually([&] { return w.backup->Saw(MsgType::kFailover); }));
  EXPECT_FALSE(w.backup->Saw(MsgType::kGoodbye));
  // SWITCHOVER came after COMMIT 3 and before FAILOVER.
  auto t = w.backup->types();
  auto at = [&](MsgType x) { return std::find(t.begin(), t.end(), x) - t.begin(); };
  EXPECT_LT(at(MsgType::kSwitchover), at(MsgType::kFailover));
  EXPECT_EQ(w.backup->last_commit(), 3);
  // Output: epoch 3's packets were released on its ACK, before the end
  // dropped the (empty) rest.
  auto log = w.netbuf->log();
  ASSERT_GE(log.size(), 2u);
  EXPECT_EQ(log.back().first, "finish-drop");
  EXPECT_EQ(log[log.size() - 2], (std::pair<std::string, uint64_t>{"release", 3}));
  json st;
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["state"], "switched-over");
  EXPECT_EQ(st["switchover"]["phase"], "done");
  EXPECT_EQ(st["switchover"]["final_epoch"], 3);
  EXPECT_GE(st["switchover"]["took_ms"].get<int64_t>(), 0);
  EXPECT_EQ(w.lc->error(), "");
  // Once over, a second one is refused, and so is unprotect's work.
  EXPECT_EQ(w.lc->Switchover().code(), Code::kFailedPrecondition);
  EXPECT_TRUE(w.lc->Unprotect().ok());
  EXPECT_EQ(w.lc->state(), PrimaryState::kSwitchedOver);
}

TEST(PrimaryLifecycle, SwitchoverIsRefusedUnlessProtectedAndOnlyOnceAtATime) {
  World w;
  LifecycleOptions o = Opts(milliseconds(20), milliseconds(2000));
  w.Start(std::move(o), false, [](FakeStream* s) { s->auto_epochs = false; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.backup->HoldAcks(true);
  auto first = std::async(std::launch::async, [&] { return w.lc->Switchover(); });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kSwitchingOver; }));
  Status again = w.lc->Switchover();
  EXPECT_EQ(again.code(), Code::kAlreadyExists) << again.ToString();
  w.backup->HoldAcks(false);
  ASSERT_EQ(first.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_TRUE(first.get().ok());
  PrimaryLifecycle starting(Opts(), RealClock::Get());
  EXPECT_EQ(starting.Switchover().code(), Code::kFailedPrecondition);
}

// The backup refuses (ERROR): it never promotes this session, so the guest
// resumes here, unprotected, and QEMU lives.
TEST(PrimaryLifecycle, ARefusedSwitchoverResumesTheGuestUnprotected) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(2000)), false, [](FakeStream* s) { s->auto_epochs = false; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.backup->SetOnSwitchover(FakeBackup::OnSwitchover::kRefuse);
  Status s = w.lc->Switchover();
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(w.lc->state(), PrimaryState::kUnprotected);
  EXPECT_NE(w.lc->error().find("refused by the test"), std::string::npos) << w.lc->error();
  EXPECT_TRUE(w.stream->gave_up());
  EXPECT_EQ(w.end_qemu(), 0);
  EXPECT_FALSE(w.backup->Saw(MsgType::kFailover));
}

// The backup is lost before it acked the final checkpoint: nobody was told
// to promote, so the guest resumes here (unprotected), QEMU lives.
TEST(PrimaryLifecycle, ABackupLostBeforeTheFinalAckLeavesTheGuestRunningHere) {
  World w;
  w.Start(Opts(milliseconds(20), milliseconds(300)), false, [](FakeStream* s) { s->auto_epochs = false; });
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  w.backup->Blackhole();
  const auto t0 = Steady::now();
  Status s = w.lc->Switchover();
  EXPECT_FALSE(s.ok());
  EXPECT_LT(Ms(Steady::now() - t0), 2000);
  EXPECT_EQ(w.lc->state(), PrimaryState::kUnprotected);
  EXPECT_TRUE(w.stream->gave_up());
  EXPECT_EQ(w.end_qemu(), 0);
  EXPECT_EQ(w.backup->switchover_epoch(), -1);
  json st;
  w.lc->FillStatus(&st);
  EXPECT_EQ(st["switchover"]["phase"], "aborted");
}

// Once SWITCHOVER went out the backup may promote: a link that breaks
// before its answer (or a silent backup) ends QEMU here; the guest never
// resumes.
TEST(PrimaryLifecycle, ALinkLostAfterSwitchoverWasSentEndsQemuAndNeverResumes) {
  for (auto mode : {FakeBackup::OnSwitchover::kHangUp, FakeBackup::OnSwitchover::kSilent}) {
    World w;
    w.Start(Opts(milliseconds(20), milliseconds(300)), false, [](FakeStream* s) { s->auto_epochs = false; });
    ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
    w.backup->SetOnSwitchover(mode);
    if (mode == FakeBackup::OnSwitchover::kSilent) {
      // Silent from SWITCHOVER on: heartbeats stop too.
      std::thread([b = w.backup.get()] {
        Eventually([&] { return b->switchover_epoch() >= 0; });
        b->Blackhole();
      }).detach();
    }
    Status s = w.lc->Switchover();
    EXPECT_FALSE(s.ok());
    EXPECT_EQ(w.lc->state(), PrimaryState::kSwitchedOver);
    EXPECT_FALSE(w.stream->gave_up());
    EXPECT_TRUE(w.stream->paused());
    EXPECT_EQ(w.end_qemu(), 1);
    EXPECT_NE(w.lc->error().find("told to take over"), std::string::npos) << w.lc->error();
    json st;
    w.lc->FillStatus(&st);
    EXPECT_EQ(st["switchover"]["phase"], "failed");
  }
}

// ---- Arbitration -------------------------------------------------------------

class NullFencer final : public Fencer {
 public:
  Status Pause() override { return OkStatus(); }
  Status Resume() override { return OkStatus(); }
  Status Destroy() override {
    destroyed = true;
    return OkStatus();
  }
  std::atomic<bool> destroyed{false};
};

ArbiterOptions LeaseOpts(const std::string& host) {
  ArbiterOptions o;
  o.prefix = "/t";
  o.host = host;
  o.instance = host + "-1";
  return o;  // TTL 5 s, margin 1 s
}

size_t Count(const std::vector<std::pair<std::string, uint64_t>>& log, const std::string& what) {
  return static_cast<size_t>(std::count_if(log.begin(), log.end(), [&](const auto& x) { return x.first == what; }));
}

// Output leaves only while the lease is valid; an end with the guest running
// retires the session in etcd before anything held is released.
TEST(PrimaryLifecycle, LeaseGatesOutputAndTheEndRetiresBeforeReleasing) {
  FakeClock clock;
  FakeEtcd etcd(clock);
  FakeEtcdLink link(&etcd);
  NullFencer fencer;
  DomainLease lease(LeaseOpts("A"), "vm1", &link, clock, &fencer);
  ASSERT_TRUE(lease.Acquire("s1").ok());
  World w;
  w.lease = &lease;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  ASSERT_TRUE(Eventually([&] { return Count(w.netbuf->log(), "release") >= 3; }));
  // etcd is gone and the deadline passes: ACKs go on, output does not.
  link.set_up(false);
  clock.Advance(std::chrono::milliseconds(4100));
  size_t released = Count(w.netbuf->log(), "release");
  int64_t commits = w.backup->commits();
  ASSERT_TRUE(Eventually([&] { return w.backup->commits() >= commits + 5; }));
  EXPECT_EQ(Count(w.netbuf->log(), "release"), released);
  json st;
  w.lc->FillStatus(&st);
  EXPECT_GT(st["releases_deferred"].get<int>(), 0);
  // Unprotect waits for the retirement; nothing held leaves meanwhile.
  auto done = std::async(std::launch::async, [&] { return w.lc->Unprotect(); });
  EXPECT_EQ(done.wait_for(std::chrono::milliseconds(600)), std::future_status::timeout);
  EXPECT_EQ(Count(w.netbuf->log(), "finish-release"), 0u);
  link.set_up(true);  // within the TTL: the lease is still ours in etcd
  ASSERT_EQ(done.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_EQ(w.netbuf->log().back().first, "finish-release");
  EXPECT_EQ(etcd.Peek("/t/domains/vm1/session")->value, "retired:s1");
  EXPECT_EQ(lease.state(), LeaseState::kReleased);
}

// Another host won: the lifecycle ends "fenced", drops what it held and
// sends no FAILOVER.
TEST(PrimaryLifecycle, ALostLeaseEndsFencedAndReleasesNothing) {
  FakeClock clock;
  FakeEtcd etcd(clock);
  FakeEtcdLink a_link(&etcd);
  NullFencer fencer;
  DomainLease lease(LeaseOpts("A"), "vm1", &a_link, clock, &fencer);
  ASSERT_TRUE(lease.Acquire("s1").ok());
  World w;
  w.lease = &lease;
  w.Start(Opts(milliseconds(20), milliseconds(2000)));
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kProtected; }));
  a_link.set_up(false);
  clock.Advance(std::chrono::seconds(6));
  lease.CheckDeadline();
  EtcdArbiter b(LeaseOpts("B"), &etcd, clock);
  ASSERT_TRUE(b.MayPromote("vm1", "s1").ok());
  a_link.set_up(true);
  lease.RenewOnce();
  EXPECT_TRUE(fencer.destroyed);
  ASSERT_TRUE(Eventually([&] { return w.lc->state() == PrimaryState::kFenced; }));
  // The state is final before the output buffer is finished.
  ASSERT_TRUE(Eventually([&] {
    auto log = w.netbuf->log();
    return !log.empty() && log.back().first.rfind("finish-", 0) == 0;
  }));
  EXPECT_EQ(w.netbuf->log().back().first, "finish-drop");
  EXPECT_FALSE(w.backup->Saw(MsgType::kFailover));
  EXPECT_NE(w.lc->error().find("host 'B' owns the domain"), std::string::npos) << w.lc->error();
}

}  // namespace
}  // namespace remus
