// BackupDomain against a scripted primary over a socketpair, with a fake
// process launcher: the lifecycle rules (when it promotes, when it must not),
// promotion's ordering against the session, recovery after a restart.
#include "replicator/backup/domain.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <future>
#include <mutex>
#include <thread>

#include "replicator/backup/backup_testing.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using nlohmann::json;
using testing::FakeLauncher;
using wire::MsgType;

class DomainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    opts_.state_dir = remus::testing::MakeTempDir("remus-domain-test");
    opts_.auto_promote = true;
    opts_.heartbeat = {std::chrono::milliseconds(50), std::chrono::milliseconds(400)};
    opts_.qemu_start_timeout_ms = 300;
    // The backup's own QEMU (the fake launcher starts none): the tests'
    // argv[0]s are then names, not binaries this host would look up.
    opts_.qemu_binary = "/usr/bin/qemu-system-x86_64";
    NewDomain();
  }
  void TearDown() override { EndAll(); }

  void EndAll() {
    if (domain_) domain_->Stop();
    for (auto& l : primaries_) l->Shutdown();
    for (auto& t : sessions_) t.join();
    sessions_.clear();
    primaries_.clear();
  }
  // A fresh domain object on the same state dir (a restart of remusd).
  void NewDomain() {
    EndAll();
    domain_ = std::make_unique<BackupDomain>("vm1", opts_, RealClock::Get(), &arbiter_, &launcher_);
  }

  // A primary connected to the domain: the test holds its end of the link.
  wire::Link& Connect() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    auto backup_end = std::make_unique<wire::Link>(Fd(sv[1]));
    sessions_.emplace_back([this, l = std::move(backup_end)]() mutable { domain_->Serve(std::move(l)); });
    primaries_.push_back(std::make_unique<wire::Link>(Fd(sv[0])));
    return *primaries_.back();
  }

  // A primary connected, with its initial copy and checkpoint 1 committed and acked.
  wire::Link& ProtectedAt1() {
    wire::Link& l = Connect();
    testing::InitialSync(l, Config());
    testing::SendCheckpoint(l, 1, testing::CheckpointPages(1, 'R'));
    testing::ExpectAck(l, 1);
    return l;
  }

  json Status() { return domain_->StatusJson(); }
  // A restarted domain protected with residency paged; returns its status's residency.
  json ProtectPagedOnANewDomain() {
    EndAll();
    NewDomain();
    json config = Config();
    config["residency"] = "paged";
    testing::InitialSync(Connect(), config);
    return Status()["residency"];
  }
  // The primary's CONFIG, with the heartbeat timeout the waits below assume.
  static json Config(const std::string& argv0 = "qemu-system-x86_64") { return testing::TestConfig(argv0, 400); }
  std::string dir() { return opts_.state_dir + "/domains/vm1"; }

  void WaitState(DomainState want, int ms = 3000) {
    for (int i = 0; i < ms / 10; i++) {
      if (domain_->state() == want) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL() << "state never became " << DomainStateName(want) << ": " << Status().dump();
  }

  // A checkpoint whose COMMIT counts do not match: the backup refuses it.
  static void SendCorruptCheckpoint(wire::Link& l, uint64_t epoch) {
    std::string p = testing::CheckpointPages(0, 'Z');
    ASSERT_TRUE(l.Send(MsgType::kPages, epoch, p).ok());
    ASSERT_TRUE(l.Send(MsgType::kDevice, epoch, testing::Blob()).ok());
    ASSERT_TRUE(l.Send(MsgType::kCommit, epoch, wire::EncodeCommit({2, p.size() + 4108, testing::Blob().size()})).ok());
  }

  BackupOptions opts_;
  FakeLauncher launcher_;
  FailStopArbiter arbiter_;
  std::unique_ptr<BackupDomain> domain_;
  std::vector<std::thread> sessions_;
  std::vector<std::unique_ptr<wire::Link>> primaries_;
};

// Defect 1: the backup refused a checkpoint and told the primary (ERROR);
// the primary answered GOODBYE and runs on. Promoting after the heartbeat
// timeout would make two guests.
TEST_F(DomainTest, OwnErrorAnsweredByGoodbyeNeverPromotes) {
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  SendCorruptCheckpoint(l, 1);
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  EXPECT_EQ(wire::DecodeError(f->payload).code(), Code::kDataLoss);
  ASSERT_TRUE(l.Send(MsgType::kGoodbye, 1, R"({"reason":"backup refused checkpoint 1"})").ok());
  l.ShutdownWrite();
  WaitState(DomainState::kUnprotected);
  std::this_thread::sleep_for(std::chrono::milliseconds(800));  // twice the heartbeat timeout
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_EQ(domain_->state(), DomainState::kUnprotected);
  json st = Status();
  std::string err = st["error"];
  EXPECT_NE(err.find("GOODBYE"), std::string::npos) << err;
  EXPECT_NE(err.find("retired"), std::string::npos) << err;
  EXPECT_EQ(st["promotion"]["state"], "standby");
  EXPECT_EQ(st["last_committed_epoch"], -1);
  // Its guest ran on past checkpoint 0: restoring it, even by hand, would
  // roll the guest back next to a copy that runs.
  remus::Status fo = domain_->Promote("operator requested failover");
  EXPECT_EQ(fo.code(), Code::kFailedPrecondition) << fo.ToString();
  EXPECT_EQ(launcher_.spawns(), 0);
}

// Defect 1: the primary never answers the ERROR (it closed); it was alive
// when told, so still no automatic promotion.
TEST_F(DomainTest, OwnErrorUnansweredNeverPromotes) {
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, Config().dump()).ok());  // twice: refused
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kError);
  l.Shutdown();
  WaitState(DomainState::kUnprotected);
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_EQ(domain_->state(), DomainState::kUnprotected);
}

// An ERROR from the primary: it gave up protection and lives on.
TEST_F(DomainTest, ErrorFromThePrimaryNeverPromotes) {
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  ASSERT_TRUE(l.Send(MsgType::kError, 0, wire::EncodeError(Unavailable("netbuf failed"))).ok());
  l.Shutdown();
  WaitState(DomainState::kUnprotected);
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  EXPECT_EQ(launcher_.spawns(), 0);
}

// A primary lost for good is promoted after the heartbeat timeout.
TEST_F(DomainTest, LostPrimaryIsPromotedAfterTheTimeout) {
  wire::Link& l = ProtectedAt1();
  l.Shutdown();
  WaitState(DomainState::kFailedOver);
  EXPECT_EQ(launcher_.spawns(), 1);
  json st = Status();
  EXPECT_EQ(st["promotion"]["state"], "promoted") << st.dump();
  EXPECT_EQ(st["last_committed_epoch"], 1);
  auto marker = ReadFileToString(dir() + "/promoted.json");
  ASSERT_TRUE(marker.ok());
  EXPECT_EQ(json::parse(*marker)["epoch"], 1);
  EXPECT_FALSE(std::filesystem::exists(dir() + "/promoting.json"));
}

// Planned switchover: SWITCHOVER naming the committed epoch is accepted
// (answered SWITCHOVER), and FAILOVER then promotes at once from exactly
// that epoch, also with --no-auto-promote (the operator asked for it).
TEST_F(DomainTest, AcceptedSwitchoverPromotesFromTheFinalEpochAtOnce) {
  opts_.auto_promote = false;
  std::mutex hook_mu;
  std::vector<std::pair<std::string, json>> hooked;
  opts_.on_switched_over = [&](const std::string& d, const json& m) {
    std::lock_guard<std::mutex> g(hook_mu);
    hooked.emplace_back(d, m);
  };
  NewDomain();
  wire::Link& l = ProtectedAt1();
  const wire::SwitchoverMsg asked{"planned switchover", "10.0.0.1:7788", 100, "nfqueue"};
  ASSERT_TRUE(l.Send(MsgType::kSwitchover, 1, wire::EncodeSwitchover(asked)).ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kSwitchover) << wire::MsgTypeName(f->type) << " " << f->payload;
  EXPECT_EQ(f->epoch, 1u);
  WaitState(DomainState::kSwitchingOver);
  // No promotion before the primary says its QEMU ended.
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  EXPECT_EQ(launcher_.spawns(), 0);
  // A second primary cannot connect meanwhile.
  wire::Link& other = Connect();
  auto refused = testing::NextNonHeartbeat(other);
  ASSERT_TRUE(refused.ok());
  EXPECT_EQ(refused->type, MsgType::kError);
  EXPECT_NE(wire::DecodeError(refused->payload).message().find("switching over"), std::string::npos);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(l.Send(MsgType::kFailover, 1, R"({"reason":"planned switchover: QEMU ended after checkpoint 1"})").ok());
  WaitState(DomainState::kFailedOver);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(300));  // not the heartbeat timeout
  EXPECT_EQ(launcher_.spawns(), 1);
  json st = Status();
  EXPECT_EQ(st["last_committed_epoch"], 1);
  EXPECT_EQ(st["promotion"]["switchover_epoch"], 1);
  EXPECT_NE(st["promotion"]["reason"].get<std::string>().find("planned switchover"), std::string::npos) << st.dump();
  auto marker = ReadFileToString(dir() + "/promoted.json");
  ASSERT_TRUE(marker.ok());
  EXPECT_EQ(json::parse(*marker)["epoch"], 1);
  // Reverse protection is asked for once the guest runs here.
  for (int i = 0; i < 100; i++) {
    {
      std::lock_guard<std::mutex> g(hook_mu);
      if (!hooked.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::lock_guard<std::mutex> g(hook_mu);
  ASSERT_EQ(hooked.size(), 1u);
  EXPECT_EQ(hooked[0].first, "vm1");
  EXPECT_EQ(hooked[0].second["reprotect_to"], asked.reprotect_to);
  EXPECT_EQ(hooked[0].second["interval_ms"], asked.interval_ms);
  EXPECT_EQ(hooked[0].second["netbuf"], asked.netbuf);
}

// The primary names an epoch that is not the committed one: refused with
// ERROR, and the session ends as the backup's own refusal (no promotion).
TEST_F(DomainTest, SwitchoverNamingAnotherEpochIsRefusedAndNeverPromotes) {
  wire::Link& l = ProtectedAt1();
  ASSERT_TRUE(l.Send(MsgType::kSwitchover, 2, "").ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  remus::Status e = wire::DecodeError(f->payload);
  EXPECT_EQ(e.code(), Code::kFailedPrecondition);
  EXPECT_NE(e.message().find("committed 1"), std::string::npos) << e.ToString();
  l.Shutdown();
  WaitState(DomainState::kUnprotected);
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  EXPECT_EQ(launcher_.spawns(), 0);
}

// Accepted, then the link ends without FAILOVER (the primary's remusd
// died, say): its guest never resumes, so the backup promotes after the
// heartbeat timeout, even with --no-auto-promote.
TEST_F(DomainTest, AcceptedSwitchoverWhoseLinkEndsPromotesAfterTheTimeout) {
  opts_.auto_promote = false;
  NewDomain();
  wire::Link& l = ProtectedAt1();
  ASSERT_TRUE(l.Send(MsgType::kSwitchover, 1, "").ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kSwitchover);
  l.Shutdown();
  WaitState(DomainState::kFailedOver);
  EXPECT_EQ(launcher_.spawns(), 1);
  EXPECT_EQ(Status()["last_committed_epoch"], 1);
}

// Accepted, then this remusd died before the primary heard of it: the primary
// ends its QEMU all the same (it told us), so the restarted backup promotes
// the final checkpoint by itself after the heartbeat timeout, even with
// --no-auto-promote, from the durable record of its acceptance.
TEST_F(DomainTest, SwitchoverAcceptedBeforeARestartIsPromotedAfterIt) {
  opts_.auto_promote = false;
  NewDomain();
  {
    wire::Link& l = ProtectedAt1();
    ASSERT_TRUE(l.Send(MsgType::kSwitchover, 1, "").ok());
    WaitState(DomainState::kSwitchingOver);
  }
  auto rec = ReadFileToString(dir() + "/switchover-accepted");
  ASSERT_TRUE(rec.ok());
  EXPECT_EQ(rec->rfind("1 store-", 0), 0u) << *rec;
  NewDomain();  // the old object stops without promoting: a crash, as far as the state dir knows
  EXPECT_EQ(launcher_.spawns(), 0);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(domain_->Recover().ok());
  EXPECT_EQ(domain_->state(), DomainState::kPrimaryLost);
  WaitState(DomainState::kFailedOver);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(350));  // the heartbeat timeout
  EXPECT_EQ(launcher_.spawns(), 1);
  json st = Status();
  EXPECT_EQ(st["last_committed_epoch"], 1);
  EXPECT_EQ(st["promotion"]["switchover_epoch"], 1);
  EXPECT_NE(st["promotion"]["reason"].get<std::string>().find("accepted before remusd restarted"), std::string::npos)
      << st.dump();
}

// A record that does not name the kept checkpoint (another epoch) promotes
// nothing: the restarted backup waits for an operator as after any restart.
TEST_F(DomainTest, ASwitchoverRecordForAnotherCheckpointIsIgnored) {
  opts_.auto_promote = false;
  NewDomain();
  {
    wire::Link& l = ProtectedAt1();
    l.Shutdown();
  }
  WaitState(DomainState::kPrimaryLost);
  std::string store = std::filesystem::path(Status()["store"].get<std::string>()).filename().string();
  ASSERT_TRUE(WriteDurable(dir(), "switchover-accepted", "7 " + store + "\n").ok());
  NewDomain();
  ASSERT_TRUE(domain_->Recover().ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  EXPECT_EQ(domain_->state(), DomainState::kPrimaryLost);
  EXPECT_EQ(launcher_.spawns(), 0);
  // A new session removes the record.
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  EXPECT_FALSE(std::filesystem::exists(dir() + "/switchover-accepted"));
}

// Defect 6: the primary came back within the timeout; the old session's
// pending promotion must not end the new session.
TEST_F(DomainTest, NewSessionCancelsTheOldSessionsPromotion) {
  // A 2 s heartbeat timeout, not 400 ms: the new session must reach the
  // backup within it, which a slow machine (TSan) sometimes missed.
  const json config = testing::TestConfig("qemu-system-x86_64", 2000);
  {
    wire::Link& l = Connect();
    testing::InitialSync(l, config);
    l.Shutdown();
  }
  WaitState(DomainState::kPrimaryLost);
  wire::Link& l2 = Connect();
  testing::InitialSync(l2, config);
  // Past the old session's deadline, the new primary alive all along.
  for (int i = 0; i < 48; i++) {
    ASSERT_TRUE(l2.Send(MsgType::kHeartbeat, 0, "").ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  testing::SendCheckpoint(l2, 1, testing::CheckpointPages(2, 'N'));
  testing::ExpectAck(l2, 1);
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_EQ(domain_->state(), DomainState::kProtected);
  EXPECT_TRUE(Status()["connected"].get<bool>());
}

// Defect 5: an operator's failover during a live session waits until the
// session's ingest stopped; the checkpoint being committed is either fully
// in or fully out, never half.
TEST_F(DomainTest, OperatorFailoverWaitsForTheSessionToStop) {
  std::promise<void> in_commit, release;
  std::shared_future<void> released = release.get_future().share();
  opts_.before_commit_for_test = [&](uint64_t epoch) {
    if (epoch != 2) return;
    in_commit.set_value();
    released.wait();
  };
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  testing::SendCheckpoint(l, 1, testing::CheckpointPages(1, 'A'));
  testing::ExpectAck(l, 1);
  testing::SendCheckpoint(l, 2, testing::CheckpointPages(1, 'B'));
  in_commit.get_future().wait();  // the session thread is inside commit 2
  bool store_at_spawn_epoch2 = false;
  launcher_.on_spawn = [&](const SpawnSpec&) { store_at_spawn_epoch2 = Status()["last_committed_epoch"] == 2; };
  auto promoted = std::async(std::launch::async, [&] { return domain_->Promote("operator requested failover"); });
  EXPECT_EQ(promoted.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout);
  EXPECT_EQ(launcher_.spawns(), 0);  // nothing read while the session runs
  release.set_value();
  remus::Status s = promoted.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(store_at_spawn_epoch2);
  json st = Status();
  EXPECT_FALSE(st["connected"].get<bool>());
  EXPECT_EQ(st["state"], "failed-over");
  EXPECT_EQ(json::parse(*ReadFileToString(dir() + "/promoted.json"))["epoch"], 2);
  opts_.before_commit_for_test = nullptr;
}

// Defect 5 with mirrored disks: an operator's failover while checkpoint 2 is
// being committed restores memory and disk at the same checkpoint, and the
// restored QEMU gets the backup's raw image.
TEST_F(DomainTest, OperatorFailoverRestoresMemoryAndDiskAtOneCheckpoint) {
  std::promise<void> in_commit, release;
  std::shared_future<void> released = release.get_future().share();
  opts_.before_commit_for_test = [&](uint64_t epoch) {
    if (epoch != 2) return;
    in_commit.set_value();
    released.wait();
  };
  json config = Config();
  config["argv"] = {"qemu-system-x86_64", "-drive", "id=drive0,file=/primary/d.qcow2,format=qcow2,if=none"};
  config["disks"] = {{{"id", "drive0"}, {"node", "n0"}, {"format", "qcow2"}, {"file", "/primary/d.qcow2"}, {"size", 65536}}};
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, config.dump()).ok());
  json begin = {{"total_bytes", 4096}, {"blocks", {{{"id", "pc.ram"}, {"used_length", 4 * 4096}}}},
                {"configuration", "0700000003616263"}};
  ASSERT_TRUE(l.Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
  auto disk_write = [&](uint64_t epoch, char fill) {
    std::string data(4096, fill);
    ASSERT_TRUE(l.Send(MsgType::kDisk, epoch, wire::EncodeDiskRecord(0, wire::DiskOp::kWrite, 0, 4096, data)).ok());
  };
  auto checkpoint = [&](uint64_t epoch, char fill, bool synced) {
    disk_write(epoch, fill);
    std::string pages = testing::CheckpointPages(0, fill);
    ASSERT_TRUE(l.Send(MsgType::kPages, epoch, pages).ok());
    ASSERT_TRUE(l.Send(MsgType::kDevice, epoch, testing::Blob()).ok());
    if (synced) {
      ASSERT_TRUE(l.Send(MsgType::kDiskSynced, epoch, "").ok());
    }
    ASSERT_TRUE(l.Send(MsgType::kCommit, epoch, wire::EncodeCommit({1, pages.size(), testing::Blob().size(), 1})).ok());
  };
  checkpoint(0, 'C', false);
  testing::ExpectAck(l, 0);
  EXPECT_EQ(domain_->state(), DomainState::kSyncing);  // the disk copy is not complete yet
  EXPECT_EQ(domain_->Promote("too early").code(), Code::kFailedPrecondition);
  checkpoint(1, 'D', true);
  testing::ExpectAck(l, 1);
  EXPECT_EQ(domain_->state(), DomainState::kProtected);
  checkpoint(2, 'E', false);
  in_commit.get_future().wait();
  std::vector<std::string> argv;
  launcher_.on_spawn = [&](const SpawnSpec& spec) { argv = spec.argv; };
  auto promoted = std::async(std::launch::async, [&] { return domain_->Promote("operator requested failover"); });
  EXPECT_EQ(promoted.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout);
  release.set_value();
  remus::Status s = promoted.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(Status()["last_committed_epoch"], 2);
  std::string image = dir() + "/disks/drive0.img";
  auto bytes = ReadFileToString(image);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ((*bytes)[100], 'E');  // checkpoint 2's write, like its memory
  bool found = false;
  for (const auto& a : argv) found |= a.find("file=" + image) != std::string::npos && a.find("format=raw") != std::string::npos;
  EXPECT_TRUE(found) << ::testing::PrintToString(argv);
  opts_.before_commit_for_test = nullptr;
}

// Defect 4: a failed promotion's QEMU is killed, and a retry works (it
// used to reassign a joinable std::thread: std::terminate).
TEST_F(DomainTest, RetryAfterAFailedPromotionKillsTheFirstAttempt) {
  opts_.auto_promote = false;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  l.Shutdown();
  WaitState(DomainState::kPrimaryLost);
  launcher_.mode = FakeLauncher::Mode::kHang;  // runs, but its monitor never comes up
  remus::Status s = domain_->Promote("operator requested failover");
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find("monitor did not come up"), std::string::npos) << s.message();
  EXPECT_EQ(launcher_.killed(), std::vector<int>{900000});
  EXPECT_EQ(domain_->state(), DomainState::kFailed);
  EXPECT_EQ(Status()["promotion"]["state"], "promotion-failed");
  launcher_.mode = FakeLauncher::Mode::kExitAtStart;
  s = domain_->Promote("operator requested failover");
  EXPECT_NE(s.message().find("exited at start"), std::string::npos) << s.ToString();
  // A QEMU that exits at start may have refused the mapping: that attempt
  // streamed next (a third QEMU), which exited too.
  EXPECT_EQ(launcher_.spawns(), 3);
  launcher_.mode = FakeLauncher::Mode::kQemu;
  s = domain_->Promote("operator requested failover");
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(launcher_.spawns(), 4);
  EXPECT_EQ(domain_->state(), DomainState::kFailedOver);
  EXPECT_EQ(Status()["qemu"]["pid"], 900003);
  EXPECT_EQ(domain_->Promote("again").code(), Code::kFailedPrecondition);  // never twice
}

// Restore by mapping: the restored QEMU's pc.ram is a private file mapping
// of the store's own block file; status says so before and after.
TEST_F(DomainTest, PromotionMapsMainRamFromTheStore) {
  opts_.auto_promote = false;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  l.Shutdown();
  WaitState(DomainState::kPrimaryLost);
  json before = Status();
  EXPECT_EQ(before["restore_plan"]["mode"], "mapped") << before.dump();
  EXPECT_EQ(before["restore_plan"]["mapped_bytes"], 4 * 4096);
  ASSERT_TRUE(domain_->Promote("operator requested failover").ok());
  auto specs = launcher_.specs();
  ASSERT_EQ(specs.size(), 1u);
  const auto& argv = specs[0].argv;
  auto obj = std::find_if(argv.begin(), argv.end(),
                          [](const std::string& a) { return a.rfind("memory-backend-file,id=pc.ram,", 0) == 0; });
  ASSERT_NE(obj, argv.end()) << ::testing::PrintToString(argv);
  EXPECT_NE(obj->find("/ram-000-pc.ram.img,size=16384,share=off"), std::string::npos) << *obj;
  EXPECT_NE(std::find(argv.begin(), argv.end(), "memory-backend=pc.ram"), argv.end());
  json after = Status();
  EXPECT_EQ(after["promotion"]["restored_by"]["mode"], "mapped") << after.dump();
  EXPECT_EQ(after["promotion"]["restored_by"]["mapped_bytes"], 4 * 4096);
  EXPECT_FALSE(after.contains("restore_plan"));  // nothing to restore any more
}

TEST_F(DomainTest, RestoreStreamOptionStreamsEverything) {
  opts_.auto_promote = false;
  opts_.restore_by_mapping = false;
  NewDomain();
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  l.Shutdown();
  WaitState(DomainState::kPrimaryLost);
  EXPECT_EQ(Status()["restore_plan"]["mode"], "streamed");
  EXPECT_NE(Status()["restore_plan"]["reason"].get<std::string>().find("--restore stream"), std::string::npos);
  ASSERT_TRUE(domain_->Promote("operator requested failover").ok());
  auto specs = launcher_.specs();
  ASSERT_EQ(specs.size(), 1u);
  for (const auto& a : specs[0].argv) EXPECT_EQ(a.find("memory-backend"), std::string::npos) << a;
  EXPECT_EQ(Status()["promotion"]["restored_by"]["mode"], "streamed");
}

// A QEMU that refuses the mapped backend exits at start; the promotion then
// streams the checkpoint into a second QEMU and says why.
TEST_F(DomainTest, MappingRefusedAtStartFallsBackToStreaming) {
  opts_.auto_promote = false;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  l.Shutdown();
  WaitState(DomainState::kPrimaryLost);
  launcher_.on_spawn = [&](const SpawnSpec& spec) {
    bool mapped = false;
    for (const auto& a : spec.argv) mapped = mapped || a.rfind("memory-backend-file", 0) == 0;
    launcher_.mode = mapped ? FakeLauncher::Mode::kExitAtStart : FakeLauncher::Mode::kQemu;
  };
  ASSERT_TRUE(domain_->Promote("operator requested failover").ok());
  EXPECT_EQ(launcher_.spawns(), 2);
  json st = Status();
  EXPECT_EQ(st["promotion"]["restored_by"]["mode"], "streamed") << st.dump();
  EXPECT_NE(st["promotion"]["restored_by"]["reason"].get<std::string>().find("exited at start"), std::string::npos);
  EXPECT_EQ(st["qemu"]["pid"], 900001);
}

// Residency hot (the default): the store is locked in memory from
// SYNC_BEGIN on, and status shows it; paged locks nothing.
TEST_F(DomainTest, HotStoreIsLockedAndPagedIsNot) {
  wire::Link& l = ProtectedAt1();
  json r = Status()["residency"];
  EXPECT_EQ(r["policy"], "hot") << r.dump();
  EXPECT_EQ(r["locked_bytes"], 4 * 4096);
  EXPECT_EQ(r["resident_bytes"], 4 * 4096);
  EXPECT_EQ(r["resident_percent"], 100.0);
  EXPECT_FALSE(r.contains("warning")) << r.dump();
  json res = Status()["resources"];
  EXPECT_EQ(res["memory"]["locked_bytes"], 4 * 4096) << res.dump();
  EXPECT_EQ(res["disk"]["store_bytes"], 4 * 4096);
  EXPECT_GE(res["disk"]["store_allocated_bytes"].get<uint64_t>(), 4096u);
  EXPECT_EQ(res["threads"]["apply"], 1);
  EXPECT_EQ(res["threads"]["session"], 3);
  l.Shutdown();
  r = ProtectPagedOnANewDomain();
  EXPECT_EQ(r["policy"], "paged") << r.dump();
  EXPECT_EQ(r["locked_bytes"], 0);
}

// A hot domain the backup lacks the memory for is refused at SYNC_BEGIN,
// before any page arrives, with the fix in the message; paged is admitted.
TEST_F(DomainTest, HotDomainWithoutTheMemoryIsRefusedBeforeTheCopy) {
  std::string mi = opts_.state_dir + "/meminfo";
  ASSERT_TRUE(WriteFileAtomic(mi, "MemTotal:  1048576 kB\nMemFree: 1000 kB\nMemAvailable:  1000 kB\n").ok());
  opts_.meminfo_path = mi;
  NewDomain();
  wire::Link& l = Connect();
  testing::SendInitialSync(l, Config());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  remus::Status e = wire::DecodeError(f->payload);
  EXPECT_EQ(e.code(), Code::kResourceExhausted) << e.ToString();
  EXPECT_NE(e.message().find("domain vm1"), std::string::npos) << e.message();
  EXPECT_NE(e.message().find("--residency paged"), std::string::npos) << e.message();
  EXPECT_FALSE(std::filesystem::exists(dir() + "/store-1")) << "a store was made for a refused domain";
  l.Shutdown();
  EXPECT_EQ(ProtectPagedOnANewDomain()["policy"], "paged");
}

// Defect 7: the promotion is on disk before QEMU starts.
TEST_F(DomainTest, PromotingRecordIsDurableBeforeQemuStarts) {
  opts_.auto_promote = false;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  l.Shutdown();
  WaitState(DomainState::kPrimaryLost);
  json at_spawn;
  launcher_.on_spawn = [&](const SpawnSpec&) {
    auto m = ReadFileToString(dir() + "/promoting.json");
    if (m.ok()) at_spawn = json::parse(*m);
  };
  ASSERT_TRUE(domain_->Promote("operator requested failover").ok());
  EXPECT_EQ(at_spawn.value("epoch", -1), 0) << at_spawn.dump();
  EXPECT_TRUE(std::filesystem::exists(dir() + "/promoted.json"));
}

// Defect 7: remusd died after promoting.json, before promoted.json. The
// restart must not offer that checkpoint again.
class RecoverPromotingTest : public DomainTest {
 protected:
  void CrashWhilePromoting(int pid) {
    opts_.auto_promote = false;
    wire::Link& l = Connect();
    testing::InitialSync(l, Config());
    l.Shutdown();
    WaitState(DomainState::kPrimaryLost);
    NewDomain();
    ASSERT_TRUE(WriteFileAtomic(dir() + "/promoting.json", json{{"epoch", 0}, {"via", "qemu"}, {"pid", -1}}.dump()).ok());
    ASSERT_TRUE(MakeDirs(dir() + "/run", 0700).ok());
    ASSERT_TRUE(WriteFileAtomic(dir() + "/run/qemu.pid", std::to_string(pid) + "\n").ok());
    ASSERT_TRUE(domain_->Recover().ok());
  }
};

TEST_F(RecoverPromotingTest, ItsQemuRunsOnAsFailedOver) {
  std::string run = dir() + "/run/";
  pid_t child = ::fork();
  if (child == 0) {
    execl("/bin/sh", "sh", "-c", "sleep 30 >/dev/null 2>&1", run.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Recover recognizes the guest by its command line: wait for the exec.
  for (int i = 0; i < 500; i++) {
    auto cmdline = ReadFileToString("/proc/" + std::to_string(child) + "/cmdline");
    if (cmdline.ok() && cmdline->find(run) != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CrashWhilePromoting(child);
  EXPECT_EQ(domain_->state(), DomainState::kFailedOver) << Status().dump();
  EXPECT_EQ(Status()["qemu"]["pid"], child);
  EXPECT_EQ(domain_->Promote("again").code(), Code::kFailedPrecondition);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
}

TEST_F(RecoverPromotingTest, ItsQemuGoneIsFailedNotPrimaryLost) {
  pid_t child = ::fork();
  if (child == 0) _exit(0);
  ::waitpid(child, nullptr, 0);
  CrashWhilePromoting(child);
  EXPECT_EQ(domain_->state(), DomainState::kFailed) << Status().dump();
  std::string err = Status()["error"];
  EXPECT_NE(err.find("not restored again"), std::string::npos) << err;
  EXPECT_EQ(launcher_.spawns(), 0);
}

// Defect 2: a re-sync that has not committed means "no checkpoint": the
// previous session's image is never restored, live or after a restart.
TEST_F(DomainTest, UncommittedResyncRestoresNothing) {
  {
    wire::Link& l = Connect();
    testing::InitialSync(l, Config("qemu-old"));
    testing::SendCheckpoint(l, 1, testing::CheckpointPages(1, 'R'));
    testing::ExpectAck(l, 1);
    ASSERT_TRUE(l.Send(MsgType::kGoodbye, 1, R"({"reason":"unprotected by the operator"})").ok());
  }
  WaitState(DomainState::kUnprotected);
  // The guest runs unprotected, then is protected again; the primary dies
  // halfway through the new initial copy.
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, Config("qemu-new").dump()).ok());
  json begin = {{"total_bytes", 4 * 4096},
                {"blocks", {{{"id", "pc.ram"}, {"used_length", 4 * 4096}}}},
                {"configuration", "0700000003616263"}};
  ASSERT_TRUE(l.Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
  ASSERT_TRUE(l.Send(MsgType::kPages, 0, testing::CheckpointPages(0, 'n')).ok());
  l.Shutdown();
  // Past the timeout the automatic promotion finds nothing to restore: the
  // guest is down, and status says why.
  WaitState(DomainState::kFailed);
  EXPECT_EQ(launcher_.spawns(), 0);
  json st = Status();
  EXPECT_FALSE(st["restorable"].get<bool>()) << st.dump();
  EXPECT_NE(st["error"].get<std::string>().find("no committed checkpoint"), std::string::npos) << st.dump();
  EXPECT_EQ(st["promotion"]["state"], "promotion-failed") << st.dump();
  remus::Status s = domain_->Promote("operator requested failover");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_NE(s.message().find("new protection session"), std::string::npos) << s.message();
  EXPECT_FALSE(std::filesystem::exists(dir() + "/current"));
  // After a restart too.
  NewDomain();
  ASSERT_TRUE(domain_->Recover().ok());
  EXPECT_EQ(domain_->state(), DomainState::kPrimaryLost);
  EXPECT_FALSE(Status()["restorable"].get<bool>());
  EXPECT_EQ(domain_->Promote("operator requested failover").code(), Code::kFailedPrecondition);
  EXPECT_EQ(launcher_.spawns(), 0);
}

// Defect 2: the restored argv is the committed session's, not a newer
// CONFIG's: config.json lives in the store it belongs to.
TEST_F(DomainTest, ConfigBelongsToItsStore) {
  opts_.auto_promote = false;
  {
    wire::Link& l = Connect();
    testing::InitialSync(l, Config("qemu-one"));
    l.Shutdown();
  }
  WaitState(DomainState::kPrimaryLost);
  std::string store = Status()["store"];
  auto cfg = ReadFileToString(store + "/config.json");
  ASSERT_TRUE(cfg.ok());
  EXPECT_EQ(json::parse(*cfg)["argv"][0], "qemu-one");
  EXPECT_FALSE(std::filesystem::exists(dir() + "/config.json"));
  NewDomain();
  ASSERT_TRUE(domain_->Recover().ok());
  ASSERT_TRUE(domain_->Promote("operator requested failover").ok());
  EXPECT_EQ(launcher_.spawns(), 1);
}

// Defect 8: peer input of the wrong JSON types is refused, never thrown.
TEST_F(DomainTest, MalformedConfigIsRefusedNotThrown) {
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, R"({"argv":["q"],"heartbeat_interval_ms":"50","heartbeat_timeout_ms":[1]})").ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kError);
  EXPECT_EQ(wire::DecodeError(f->payload).code(), Code::kInvalidArgument);
  WaitState(DomainState::kUnprotected);
}

TEST_F(DomainTest, MalformedSyncBeginAndFailoverAreNotThrown) {
  {
    wire::Link& l = Connect();
    ASSERT_TRUE(l.Send(MsgType::kConfig, 0, Config().dump()).ok());
    ASSERT_TRUE(l.Send(MsgType::kSyncBegin, 0, R"({"blocks":[{"id":7,"used_length":"x"}],"total_bytes":-1})").ok());
    auto f = testing::NextNonHeartbeat(l);
    ASSERT_TRUE(f.ok());
    ASSERT_EQ(f->type, MsgType::kError);
  }
  WaitState(DomainState::kUnprotected);
  opts_.auto_promote = false;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  ASSERT_TRUE(l.Send(MsgType::kFailover, 0, R"({"reason":42})").ok());
  WaitState(DomainState::kPrimaryLost);
}

// Defect 8: a corrupt state dir is an error for that domain, not a crash.
TEST_F(DomainTest, CorruptStateFilesAreErrorsNotCrashes) {
  opts_.auto_promote = false;
  {
    wire::Link& l = Connect();
    testing::InitialSync(l, Config());
    l.Shutdown();
  }
  WaitState(DomainState::kPrimaryLost);
  std::string store = Status()["store"];
  ASSERT_TRUE(WriteFileAtomic(store + "/config.json", R"({"argv":"not a list"})").ok());
  NewDomain();
  remus::Status r = domain_->Recover();
  EXPECT_EQ(r.code(), Code::kDataLoss) << r.ToString();
  EXPECT_NE(r.message().find("config.json"), std::string::npos) << r.message();
  ASSERT_TRUE(WriteFileAtomic(dir() + "/promoted.json", R"({"pid":"x"})").ok());
  NewDomain();
  r = domain_->Recover();
  EXPECT_EQ(r.code(), Code::kDataLoss) << r.ToString();
  EXPECT_NE(r.message().find("promoted.json"), std::string::npos) << r.message();
}

// Issue 13: what the backup runs is its policy's choice. A CONFIG whose argv
// or libvirt XML the policy refuses is answered with ERROR naming the reason
// before anything is written or started; the domain is unprotected (the
// primary's guest runs on) and nothing promotes.
TEST_F(DomainTest, HostileConfigIsRefusedBeforeAnythingIsWritten) {
  opts_.qemu_binary.clear();  // no --qemu: the peer's binary name is checked too
  NewDomain();
  struct Case {
    json config;
    std::string names, why;
  };
  json tap = Config("qemu-system-x86_64");
  tap["argv"] = {"qemu-system-x86_64", "-m", "1", "-netdev", "tap,id=n0,ifname=t0,script=/tmp/evil,downscript=no"};
  json binary = Config("/tmp/evil");
  json unmirrored = Config("qemu-system-x86_64");
  unmirrored["argv"] = {"qemu-system-x86_64", "-m", "1", "-drive", "id=d0,file=/dev/sda,if=virtio"};
  json xml = Config("qemu-system-x86_64");
  xml["libvirt"] = {{"xml", "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                            "<name>vm1</name><devices/><qemu:commandline><qemu:arg value='-plugin'/>"
                            "<qemu:arg value='/tmp/evil.so'/></qemu:commandline></domain>"},
                    {"name", "vm1"}};
  for (const Case& c : {Case{tap, "-netdev", "script=no,downscript=no"}, Case{binary, "/tmp/evil", "qemu-system-ARCH"},
                        Case{unmirrored, "-drive", "not mirrored"}, Case{xml, "<qemu:commandline>", "QEMU namespace"}}) {
    SCOPED_TRACE(c.names);
    wire::Link& l = Connect();
    ASSERT_TRUE(l.Send(MsgType::kConfig, 0, c.config.dump()).ok());
    auto f = testing::NextNonHeartbeat(l);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ASSERT_EQ(f->type, MsgType::kError);
    remus::Status e = wire::DecodeError(f->payload);
    EXPECT_EQ(e.code(), Code::kPermissionDenied) << e.ToString();
    EXPECT_NE(e.message().find(c.names), std::string::npos) << e.message();
    EXPECT_NE(e.message().find(c.why), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("refuses to protect"), std::string::npos) << e.message();
    l.Shutdown();
    WaitState(DomainState::kUnprotected);
    // Nothing written: no domain directory, no store, no config.json.
    EXPECT_FALSE(std::filesystem::exists(dir())) << dir();
    std::string err = Status()["error"];
    EXPECT_NE(err.find(c.names), std::string::npos) << err;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(800));  // twice the heartbeat timeout
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_EQ(domain_->state(), DomainState::kUnprotected);
  EXPECT_EQ(domain_->Promote("operator requested failover").code(), Code::kFailedPrecondition);
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_FALSE(std::filesystem::exists(dir()));
  // The product's own CONFIG is still accepted afterwards.
  wire::Link& l = Connect();
  testing::InitialSync(l, Config("qemu-system-x86_64"));
  EXPECT_EQ(domain_->state(), DomainState::kProtected);
}

// Issue 15, the version rule: the backup restores with its own QEMU, which
// must be the primary's release (major.minor). Refused at CONFIG, before
// anything is written, not found out when a promotion's restore fails.
TEST_F(DomainTest, AnotherQemuReleaseIsRefusedAtConfig) {
  std::vector<std::string> asked;
  opts_.qemu_release = [&](const std::string& binary) -> StatusOr<qemu::QemuRelease> {
    asked.push_back(binary);
    return qemu::QemuRelease{10, 0, 13};
  };
  NewDomain();
  json c = Config();
  c["qemu_version"] = "7.2.22";
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, c.dump()).ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  remus::Status e = wire::DecodeError(f->payload);
  EXPECT_EQ(e.code(), Code::kFailedPrecondition) << e.ToString();
  EXPECT_EQ(e.message(),
            "domain vm1: the primary runs QEMU 7.2.22 but this backup would restore it with QEMU 10.0.13 "
            "(/usr/bin/qemu-system-x86_64); a checkpoint is restored only by the same QEMU release "
            "(major.minor), so install the same QEMU release on both hosts");
  EXPECT_EQ(asked, std::vector<std::string>{"/usr/bin/qemu-system-x86_64"});  // --qemu, not the peer's argv[0]
  l.Shutdown();
  WaitState(DomainState::kUnprotected);
  EXPECT_FALSE(std::filesystem::exists(dir())) << dir();
  // Another micro version of the same release is accepted.
  c["qemu_version"] = "10.0.7";
  wire::Link& l2 = Connect();
  testing::InitialSync(l2, c);
  EXPECT_EQ(domain_->state(), DomainState::kProtected);
}

// Issue 13, defence in depth: the config.json a restart reads back is checked
// again before QEMU starts; a refused one starts nothing and records no
// promotion (promoting.json), so a retry under a fixed policy is possible.
TEST_F(DomainTest, StoredConfigIsCheckedAgainBeforeQemuStarts) {
  opts_.auto_promote = false;
  {
    wire::Link& l = Connect();
    testing::InitialSync(l, Config());
    l.Shutdown();
  }
  WaitState(DomainState::kPrimaryLost);
  std::string store = Status()["store"];
  json cfg = json::parse(*ReadFileToString(store + "/config.json"));
  cfg["argv"] = {"qemu-system-x86_64", "-m", "1", "-plugin", "/tmp/evil.so"};
  ASSERT_TRUE(WriteFileAtomic(store + "/config.json", cfg.dump()).ok());
  NewDomain();
  ASSERT_TRUE(domain_->Recover().ok());
  remus::Status s = domain_->Promote("operator requested failover");
  EXPECT_EQ(s.code(), Code::kPermissionDenied) << s.ToString();
  EXPECT_NE(s.message().find("-plugin"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("stored configuration"), std::string::npos) << s.message();
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_FALSE(std::filesystem::exists(dir() + "/promoting.json"));
  EXPECT_EQ(domain_->state(), DomainState::kFailed);
  // An operator who accepts the option (remusd --allow-qemu-option plugin)
  // can retry.
  opts_.peer_policy.extra_options = {"plugin"};
  ASSERT_TRUE(domain_->Promote("operator requested failover").ok());
  EXPECT_EQ(launcher_.spawns(), 1);
  opts_.peer_policy.extra_options.clear();
}

// Defect 9: a checkpoint that would stage more than the bound is refused.
TEST_F(DomainTest, OversizedCheckpointIsRefusedWithResourceExhausted) {
  opts_.max_staged_bytes = 16 * 1024;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  std::string pages;
  for (int i = 0; i < 4; i++) pages += testing::CheckpointPages(i, 'X');
  ASSERT_TRUE(l.Send(MsgType::kPages, 1, pages).ok());
  ASSERT_TRUE(l.Send(MsgType::kPages, 1, pages).ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kError);
  remus::Status e = wire::DecodeError(f->payload);
  EXPECT_EQ(e.code(), Code::kResourceExhausted) << e.ToString();
  EXPECT_NE(e.message().find("stages more than"), std::string::npos) << e.message();
  WaitState(DomainState::kUnprotected);
  EXPECT_EQ(Status()["last_committed_epoch"], -1);  // retired: the primary runs on
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// An arbiter whose answers the test scripts: the first `refusals` calls are
// refused with `refusal`, then it grants `token`.
class ScriptedArbiter final : public Arbiter {
 public:
  std::string_view name() const override { return "etcd"; }
  StatusOr<PromotionGrant> MayPromote(const std::string&, const std::string& session) override {
    calls++;
    last_session = session;
    if (calls <= refusals) return refusal;
    return PromotionGrant{token};
  }
  void Promoted(const std::string&, int pid, std::function<Status()>) override { promoted_pid = pid; }
  std::atomic<int> calls{0};
  int refusals = 0;
  Status refusal = FailedPrecondition("host 'A' still holds domain vm1's lease");
  int64_t token = 77;
  std::string last_session;
  std::atomic<int> promoted_pid{0};
};

class ArbitratedDomainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    opts_.state_dir = remus::testing::MakeTempDir("remus-arbitrated-domain-test");
    opts_.auto_promote = true;
    // The backup's own QEMU (the fake launcher starts none), so the test does
    // not depend on a qemu-system-x86_64 in this host's PATH.
    opts_.qemu_binary = "/usr/bin/qemu-system-x86_64";
    opts_.heartbeat = {std::chrono::milliseconds(50), std::chrono::milliseconds(400)};
    opts_.qemu_start_timeout_ms = 300;
    opts_.arbitration_retry = std::chrono::milliseconds(20);
    domain_ = std::make_unique<BackupDomain>("vm1", opts_, RealClock::Get(), &arbiter_, &launcher_);
  }
  void TearDown() override {
    domain_->Stop();
    if (primary_) primary_->Shutdown();
    if (session_.joinable()) session_.join();
  }
  wire::Link& Connect() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    session_ = std::thread([this, l = std::make_unique<wire::Link>(Fd(sv[1]))]() mutable { domain_->Serve(std::move(l)); });
    primary_ = std::make_unique<wire::Link>(Fd(sv[0]));
    return *primary_;
  }
  static json Config(const std::string& arbiter = "etcd") {
    json c = testing::TestConfig("qemu-system-x86_64", 400);
    c["session"] = "s-123";
    c["arbiter"] = arbiter;
    return c;
  }
  // Protected with one acked checkpoint, then the primary goes silent.
  void LosePrimary() {
    wire::Link& l = Connect();
    testing::InitialSync(l, Config());
    testing::SendCheckpoint(l, 1, testing::CheckpointPages(1, 'R'));
    testing::ExpectAck(l, 1);
    l.Shutdown();
  }
  bool Eventually(const std::function<bool()>& f, int ms = 3000) {
    for (int i = 0; i < ms / 10; i++, std::this_thread::sleep_for(std::chrono::milliseconds(10)))
      if (f()) return true;
    return f();
  }

  BackupOptions opts_;
  testing::FakeLauncher launcher_;
  ScriptedArbiter arbiter_;
  std::unique_ptr<BackupDomain> domain_;
  std::thread session_;
  std::unique_ptr<wire::Link> primary_;
};

TEST_F(ArbitratedDomainTest, WaitsWhileThePrimaryHoldsItsLeaseThenPromotesWithTheToken) {
  arbiter_.refusals = 5;
  LosePrimary();
  ASSERT_TRUE(Eventually([&] {
    return domain_->StatusJson()["promotion"].value("arbitration", "").find("still holds") != std::string::npos;
  })) << domain_->StatusJson().dump();
  EXPECT_EQ(launcher_.spawns(), 0);
  ASSERT_TRUE(Eventually([&] { return domain_->state() == DomainState::kFailedOver; }));
  EXPECT_EQ(arbiter_.calls, 6);
  EXPECT_EQ(arbiter_.last_session, "s-123");
  json st = domain_->StatusJson();
  EXPECT_EQ(st["promotion"]["token"], 77);
  EXPECT_FALSE(st["promotion"].contains("arbitration"));
  auto marker = ReadFileToString(opts_.state_dir + "/domains/vm1/promoted.json");
  ASSERT_TRUE(marker.ok());
  EXPECT_EQ(json::parse(*marker)["token"], 77);
  EXPECT_EQ(arbiter_.promoted_pid, st["qemu"]["pid"].get<int>());
}

TEST_F(ArbitratedDomainTest, RetiredSessionIsNeverPromoted) {
  arbiter_.refusals = 1000;
  arbiter_.refusal = Aborted("session s-123 can no longer be promoted (etcd: 'retired:s-123')");
  LosePrimary();
  ASSERT_TRUE(Eventually([&] { return domain_->StatusJson().value("error", "").find("retired") != std::string::npos; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(arbiter_.calls, 1);  // refused for good: not asked again
  EXPECT_EQ(launcher_.spawns(), 0);
  EXPECT_NE(domain_->state(), DomainState::kFailedOver);
}

TEST_F(ArbitratedDomainTest, OperatorFailoverIsRefusedWithTheArbitersReason) {
  arbiter_.refusals = 1000;
  wire::Link& l = Connect();
  testing::InitialSync(l, Config());
  Status s = domain_->Promote("operator requested failover");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("still holds"), std::string::npos) << s.message();
  // Nothing changed here: the session still runs.
  EXPECT_EQ(launcher_.spawns(), 0);
  testing::SendCheckpoint(l, 1, testing::CheckpointPages(1, 'R'));
  testing::ExpectAck(l, 1);
}

TEST_F(ArbitratedDomainTest, PrimaryWithAnotherArbiterIsRefused) {
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(wire::MsgType::kConfig, 0, Config("none").dump()).ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, wire::MsgType::kError);
  Status e = wire::DecodeError(f->payload);
  EXPECT_EQ(e.code(), Code::kFailedPrecondition);
  EXPECT_NE(e.message().find("--arbiter none"), std::string::npos) << e.message();
}

// ---- delta resync ----

namespace delta {

json DeltaConfig() {
  json c = testing::TestConfig("qemu-system-x86_64", 400);
  c["delta_resync"] = true;
  return c;
}

std::string Page(char fill) { return std::string(4096, fill); }

// The RESYNC_OFFER and the hashes the backup answers a delta CONFIG with.
struct Offer {
  wire::ResyncOfferMsg msg;
  std::vector<wire::PageHash> hashes;
};
Offer ReadOffer(wire::Link& l) {
  Offer o;
  auto f = testing::NextNonHeartbeat(l);
  EXPECT_TRUE(f.ok() && f->type == MsgType::kResyncOffer) << (f.ok() ? wire::MsgTypeName(f->type) : f.status().ToString());
  if (!f.ok()) return o;
  auto m = wire::DecodeResyncOffer(f->payload);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  o.msg = *m;
  uint64_t want = 0;
  for (const auto& b : o.msg.blocks) want += b.used_length / 4096;
  while (o.hashes.size() < want) {
    auto h = testing::NextNonHeartbeat(l);
    EXPECT_TRUE(h.ok() && h->type == MsgType::kResyncHashes);
    if (!h.ok()) break;
    auto hm = wire::DecodeResyncHashes(h->payload);
    EXPECT_TRUE(hm.ok());
    o.hashes.insert(o.hashes.end(), hm->hashes.begin(), hm->hashes.end());
  }
  return o;
}

void SendSyncBegin(wire::Link& l, uint64_t pages = 4) {
  json begin = {{"total_bytes", pages * 4096},
                {"blocks", {{{"id", "pc.ram"}, {"used_length", pages * 4096}}}},
                {"configuration", "0700000003616263"}};
  ASSERT_TRUE(l.Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
}

}  // namespace delta

// The image a GOODBYE retired is offered to the next session, which keeps
// pages 0 and 1 from it, sends 2 and 3, and commits once its digest matches.
TEST_F(DomainTest, DeltaResyncOffersTheRetiredImageAndCommitsAVerifiedImage) {
  wire::Link& l1 = Connect();
  testing::InitialSync(l1, Config());  // pages 'a', 'b', 'c', zero
  ASSERT_TRUE(l1.Send(MsgType::kGoodbye, 0, "").ok());
  l1.ShutdownWrite();
  WaitState(DomainState::kUnprotected);
  ASSERT_TRUE(std::filesystem::exists(dir() + "/base"));
  EXPECT_EQ(Status()["restorable"], false);

  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, delta::DeltaConfig().dump()).ok());
  delta::Offer o = delta::ReadOffer(l);
  ASSERT_EQ(o.msg.blocks, (std::vector<qemu::RamBlock>{{"pc.ram", 4 * 4096}}));
  ASSERT_EQ(o.hashes.size(), 4u);
  std::string a = delta::Page('a'), b = delta::Page('b'), x = delta::Page('x');
  EXPECT_EQ(o.hashes[0], wire::HashPage(reinterpret_cast<const uint8_t*>(a.data())));
  EXPECT_EQ(o.hashes[1], wire::HashPage(reinterpret_cast<const uint8_t*>(b.data())));
  EXPECT_EQ(o.hashes[3], wire::ZeroPageHash());

  delta::SendSyncBegin(l);
  std::string keep;
  wire::AppendKeepRun(&keep, {0, 0, 2});
  ASSERT_TRUE(l.Send(MsgType::kKeep, 0, keep).ok());
  std::string pages;
  wire::AppendPageRecord(&pages, 0, 2 * 4096, reinterpret_cast<const uint8_t*>(x.data()));
  wire::AppendPageRecord(&pages, 0, 3 * 4096, nullptr);
  ASSERT_TRUE(l.Send(MsgType::kPages, 0, pages).ok());
  ASSERT_TRUE(l.Send(MsgType::kDevice, 0, testing::Blob()).ok());
  wire::ImageDigest d;
  d.Add(o.hashes[0]);
  d.Add(o.hashes[1]);
  d.Add(wire::HashPage(reinterpret_cast<const uint8_t*>(x.data())));
  d.Add(wire::ZeroPageHash());
  wire::CommitInfo ci{2, pages.size(), testing::Blob().size()};
  ci.kept_pages = 2;
  ci.image_digest = wire::PageHashHex(d.Finish());
  ASSERT_TRUE(l.Send(MsgType::kCommit, 0, wire::EncodeCommit(ci)).ok());
  testing::ExpectAck(l, 0);

  json st = Status();
  EXPECT_EQ(st["restorable"], true) << st.dump();
  EXPECT_EQ(st["initial_copy"]["mode"], "delta");
  EXPECT_EQ(st["initial_copy"]["kept_pages"], 2);
  EXPECT_EQ(st["initial_copy"]["received_pages"], 2);
  EXPECT_EQ(st["initial_copy"]["verified"], true);
  EXPECT_FALSE(std::filesystem::exists(dir() + "/base"));  // replaced by the new image
  auto store = PageStore::Open(st["store"].get<std::string>());
  ASSERT_TRUE(store.ok());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*store)->BlockData(0)), 4096), a);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*store)->BlockData(0)) + 4096, 4096), b);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*store)->BlockData(0)) + 2 * 4096, 4096), x);
}

// A digest that does not match is never committed, and the base goes: the
// next protection makes a full copy.
TEST_F(DomainTest, DeltaResyncDigestMismatchIsRefusedAndTheBaseDropped) {
  wire::Link& l1 = Connect();
  testing::InitialSync(l1, Config());
  ASSERT_TRUE(l1.Send(MsgType::kGoodbye, 0, "").ok());
  l1.ShutdownWrite();
  WaitState(DomainState::kUnprotected);

  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, delta::DeltaConfig().dump()).ok());
  delta::Offer o = delta::ReadOffer(l);
  ASSERT_EQ(o.hashes.size(), 4u);
  delta::SendSyncBegin(l);
  std::string keep;
  wire::AppendKeepRun(&keep, {0, 0, 4});
  ASSERT_TRUE(l.Send(MsgType::kKeep, 0, keep).ok());
  ASSERT_TRUE(l.Send(MsgType::kDevice, 0, testing::Blob()).ok());
  wire::CommitInfo ci{0, 0, testing::Blob().size()};
  ci.kept_pages = 4;
  ci.image_digest = wire::PageHashHex(wire::ZeroPageHash());  // not the image's
  ASSERT_TRUE(l.Send(MsgType::kCommit, 0, wire::EncodeCommit(ci)).ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  remus::Status e = wire::DecodeError(f->payload);
  EXPECT_EQ(e.code(), Code::kDataLoss);
  EXPECT_NE(e.message().find("does not match the primary's"), std::string::npos) << e.ToString();
  l.ShutdownWrite();
  WaitState(DomainState::kUnprotected);
  json st = Status();
  EXPECT_EQ(st["restorable"], false) << st.dump();
  EXPECT_EQ(st["initial_copy"]["verified"], false);
  EXPECT_FALSE(std::filesystem::exists(dir() + "/base"));

  wire::Link& l3 = Connect();
  ASSERT_TRUE(l3.Send(MsgType::kConfig, 0, delta::DeltaConfig().dump()).ok());
  delta::Offer none = delta::ReadOffer(l3);
  EXPECT_TRUE(none.msg.blocks.empty());
  EXPECT_NE(none.msg.reason, "");
}

// KEEP for a block whose layout differs from the offered image's is refused:
// a kept page never comes from another block layout.
TEST_F(DomainTest, DeltaResyncRefusesKeepAcrossLayouts) {
  wire::Link& l1 = Connect();
  testing::InitialSync(l1, Config());
  ASSERT_TRUE(l1.Send(MsgType::kGoodbye, 0, "").ok());
  l1.ShutdownWrite();
  WaitState(DomainState::kUnprotected);

  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, delta::DeltaConfig().dump()).ok());
  delta::ReadOffer(l);
  delta::SendSyncBegin(l, 8);  // pc.ram grew: 8 pages
  std::string keep;
  wire::AppendKeepRun(&keep, {0, 0, 1});
  ASSERT_TRUE(l.Send(MsgType::kKeep, 0, keep).ok());
  auto f = testing::NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  EXPECT_NE(wire::DecodeError(f->payload).message().find("same id and length"), std::string::npos);
}

// A restarted backup still offers its base (the retired image), and never
// restores it.
TEST_F(DomainTest, DeltaResyncBaseSurvivesARestartButIsNeverRestorable) {
  wire::Link& l1 = Connect();
  testing::InitialSync(l1, Config());
  ASSERT_TRUE(l1.Send(MsgType::kGoodbye, 0, "").ok());
  l1.ShutdownWrite();
  WaitState(DomainState::kUnprotected);
  NewDomain();
  ASSERT_TRUE(domain_->Recover().ok());
  EXPECT_EQ(Status()["restorable"], false);
  EXPECT_EQ(domain_->Promote("operator").code(), Code::kFailedPrecondition);
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, delta::DeltaConfig().dump()).ok());
  delta::Offer o = delta::ReadOffer(l);
  EXPECT_EQ(o.msg.blocks.size(), 1u);
  EXPECT_EQ(o.hashes.size(), 4u);
}

// A primary without delta_resync gets no offer; one with it, on a backup
// that holds nothing, gets an empty offer saying why.
TEST_F(DomainTest, DeltaResyncWithoutABaseOffersNothing) {
  wire::Link& l = Connect();
  ASSERT_TRUE(l.Send(MsgType::kConfig, 0, delta::DeltaConfig().dump()).ok());
  delta::Offer o = delta::ReadOffer(l);
  EXPECT_TRUE(o.msg.blocks.empty());
  EXPECT_NE(o.msg.reason.find("no earlier image"), std::string::npos) << o.msg.reason;
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// Re-protection to the host that promoted a guest: refused while the
// promoted guest runs here, accepted once it is gone (ended), and the
// checkpoint it ran from is never promoted again.
TEST_F(DomainTest, APromotedGuestHoldsTheDomainUntilItIsGone) {
  wire::Link& l = ProtectedAt1();
  l.Shutdown();
  WaitState(DomainState::kFailedOver);
  auto guest = domain_->RunningGuest();
  ASSERT_TRUE(guest.has_value());
  EXPECT_NE(guest->qmp_socket.find("remusd-qmp.sock"), std::string::npos) << guest->qmp_socket;
  EXPECT_EQ(Status()["qmp_socket"], dir() + "/run/qmp.sock");

  wire::Link& again = Connect();
  auto f = again.Recv();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->type, MsgType::kError);
  EXPECT_NE(f->payload.find("runs here"), std::string::npos) << f->payload;
  EXPECT_EQ(domain_->state(), DomainState::kFailedOver);

  ASSERT_TRUE(launcher_.Kill(guest->pid, std::chrono::milliseconds(0)).ok());
  domain_->NoticeGuestGone();
  EXPECT_EQ(domain_->state(), DomainState::kEnded);
  EXPECT_FALSE(domain_->RunningGuest().has_value());
  remus::Status p = domain_->Promote("operator requested failover");
  EXPECT_EQ(p.code(), Code::kFailedPrecondition) << p.ToString();
  EXPECT_NE(p.message().find("never promoted again"), std::string::npos) << p.ToString();
  EXPECT_EQ(launcher_.spawns(), 1);

  wire::Link& back = Connect();
  testing::InitialSync(back, Config());
  WaitState(DomainState::kProtected);
}

}  // namespace
}  // namespace remus
