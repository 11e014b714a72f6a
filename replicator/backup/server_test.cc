// The backup against a scripted primary over real loopback TCP: commits only
// complete checkpoints, refuses corrupt ones, discards partial ones, and never
// lets an unauthenticated peer create state.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "common/io.h"
#include "replicator/backup/backup.h"
#include "replicator/link/wire.h"

namespace remus {
namespace {

using nlohmann::json;
using wire::MsgType;

std::string TempDir() {
  char tmpl[] = "/tmp/remus-backup-test.XXXXXX";
  return mkdtemp(tmpl);
}

// TLS contexts holding the shared key `c`, for either end.
std::shared_ptr<const wire::TlsContext> Tls(char c, wire::TlsRole role) {
  wire::LinkSecurity sec;
  sec.key = wire::Key(std::string(32, c));
  return *wire::TlsContext::Create(sec, role);
}
std::shared_ptr<const wire::TlsContext> BackupTls(char c) { return Tls(c, wire::TlsRole::kBackup); }
std::shared_ptr<const wire::TlsContext> TestKey(char c) { return Tls(c, wire::TlsRole::kPrimary); }

class BackupServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    BackupOptions o;
    o.state_dir = dir_;
    o.tls = BackupTls('k');
    o.auto_promote = false;  // no QEMU here: promotion is covered end to end
    o.qemu_binary = "/bin/false";  // the backup's own "QEMU": exits at start
    o.heartbeat = {std::chrono::milliseconds(50), std::chrono::milliseconds(2000)};
    server_ = std::make_unique<BackupServer>(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
    // Find a free port by binding to 0 through the OS.
    for (uint16_t port = 27000; port < 27100; port++) {
      if (server_->Listen({"127.0.0.1", port}).ok()) {
        port_ = port;
        break;
      }
    }
    ASSERT_NE(port_, 0);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<wire::Link> Connect(const std::shared_ptr<const wire::TlsContext>& key, remus::Status* hs) {
    auto fd = ConnectTcp({"127.0.0.1", port_}, 2000);
    EXPECT_TRUE(fd.ok());
    auto link = std::make_unique<wire::Link>(std::move(fd).value());
    *hs = wire::ClientHandshake(*link, *key, "127.0.0.1", "vm1", 2000);
    return link;
  }

  // CONFIG, SYNC_BEGIN, an initial copy of 4 pages and COMMIT(0).
  // extra: more CONFIG keys.
  void InitialSync(wire::Link& l, const json& extra = json::object()) {
    json config = {{"domain", "vm1"}, {"argv", {"qemu-system-x86_64", "-m", "1"}},
                   {"heartbeat_interval_ms", 50}, {"heartbeat_timeout_ms", 2000}};
    config.update(extra);
    ASSERT_TRUE(l.Send(MsgType::kConfig, 0, config.dump()).ok());
    json begin = {{"total_bytes", 4 * 4096}, {"blocks", {{{"id", "pc.ram"}, {"used_length", 4 * 4096}}}},
                  {"configuration", "0700000003616263"}};
    ASSERT_TRUE(l.Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
    std::string pages;
    uint8_t page[4096];
    for (uint64_t i = 0; i < 4; i++) {
      memset(page, static_cast<int>('a' + i), sizeof page);
      wire::AppendPageRecord(&pages, 0, i * 4096, i == 3 ? nullptr : page);
    }
    ASSERT_TRUE(l.Send(MsgType::kPages, 0, pages).ok());
    ASSERT_TRUE(l.Send(MsgType::kDevice, 0, Blob()).ok());
    ASSERT_TRUE(l.Send(MsgType::kCommit, 0, wire::EncodeCommit({4, pages.size(), Blob().size()})).ok());
    ExpectAck(l, 0);
  }

  static std::string Blob() { return std::string("\x04") + "device-state" + std::string(1, '\0'); }

  // Sends checkpoint `epoch` dirtying page `page` with byte `fill`.
  static std::string CheckpointPages(uint64_t page, char fill) {
    std::string pages;
    std::string data(4096, fill);
    wire::AppendPageRecord(&pages, 0, page * 4096, reinterpret_cast<const uint8_t*>(data.data()));
    return pages;
  }

  // PAGES, DEVICE and COMMIT of checkpoint `epoch` with honest counts.
  static void SendCheckpoint(wire::Link& l, uint64_t epoch, const std::string& pages) {
    ASSERT_TRUE(l.Send(MsgType::kPages, epoch, pages).ok());
    ASSERT_TRUE(l.Send(MsgType::kDevice, epoch, Blob()).ok());
    ASSERT_TRUE(l.Send(MsgType::kCommit, epoch, wire::EncodeCommit({1, pages.size(), Blob().size()})).ok());
  }

  void ExpectAck(wire::Link& l, uint64_t epoch) {
    for (;;) {
      auto f = l.RecvUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5));
      ASSERT_TRUE(f.ok()) << f.status().ToString();
      if (f->type == MsgType::kHeartbeat) continue;
      ASSERT_EQ(f->type, MsgType::kAck) << wire::MsgTypeName(f->type) << " " << f->payload;
      EXPECT_EQ(f->epoch, epoch);
      return;
    }
  }

  StatusOr<wire::Frame> NextNonHeartbeat(wire::Link& l) {
    for (;;) {
      auto f = l.RecvUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5));
      if (!f.ok() || f->type != MsgType::kHeartbeat) return f;
    }
  }

  json DomainStatus() { return server_->StatusJson("vm1").at(0); }

  // The committed byte of page `page` in the backup's store.
  char StoreByte(uint64_t page) {
    std::string store = DomainStatus().value("store", "");
    auto manifest = ReadFileToString(store + "/manifest.json");
    EXPECT_TRUE(manifest.ok());
    std::string file = json::parse(*manifest)["blocks"][0]["file"];
    auto data = ReadFileToString(store + "/" + file);
    EXPECT_TRUE(data.ok());
    return (*data)[page * 4096 + 100];
  }

  void WaitState(const std::string& want) {
    for (int i = 0; i < 200; i++) {
      if (server_->HasDomain("vm1") && DomainStatus().value("state", "") == want) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL() << "state never became " << want << ": " << (server_->HasDomain("vm1") ? DomainStatus().dump() : "no domain");
  }

  // A server's options on this test's state dir (no QEMU of its own).
  BackupOptions RestartOptions() {
    BackupOptions o;
    o.state_dir = dir_;
    o.tls = BackupTls('k');
    o.auto_promote = false;
    o.heartbeat = {std::chrono::milliseconds(50), std::chrono::milliseconds(2000)};
    return o;
  }
  // remusd restarts on the same state dir.
  void Restart(const BackupOptions& o) {
    server_.reset();
    server_ = std::make_unique<BackupServer>(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
    ASSERT_TRUE(ListenAgain());
  }
  // After a restart: the old port first; ctest runs tests in parallel and
  // another fixture's probe may have taken it in the meantime, so any free
  // port of the range will do (port_ follows).
  bool ListenAgain() {
    if (server_->Listen({"127.0.0.1", port_}).ok()) return true;
    for (uint16_t port = 27000; port < 27100; port++) {
      if (server_->Listen({"127.0.0.1", port}).ok()) {
        port_ = port;
        return true;
      }
    }
    return false;
  }

  std::string dir_;
  uint16_t port_ = 0;
  std::unique_ptr<BackupServer> server_;
};

TEST_F(BackupServerTest, CommitsCompleteCheckpointsInOrder) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok()) << hs.ToString();
  InitialSync(*l);
  EXPECT_EQ(StoreByte(0), 'a');
  EXPECT_EQ(StoreByte(3), 0);  // zero page
  for (uint64_t e = 1; e <= 5; e++) {
    std::string p = CheckpointPages(e % 4, static_cast<char>('A' + e));
    SendCheckpoint(*l, e, p);
    ExpectAck(*l, e);
  }
  EXPECT_EQ(DomainStatus()["last_committed_epoch"], 5);
  EXPECT_EQ(StoreByte(1), 'F');  // epoch 5 wrote page 1
  EXPECT_EQ(DomainStatus()["state"], "protected");
}

TEST_F(BackupServerTest, AcceptsLz4CompressedPages) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  std::string p = CheckpointPages(2, 'Q');
  std::string z = wire::CompressBatch(p);
  ASSERT_TRUE(l->Send(MsgType::kPages, 1, z, wire::kFlagLz4).ok());
  ASSERT_TRUE(l->Send(MsgType::kDevice, 1, Blob()).ok());
  // Counts are of the uncompressed batch.
  ASSERT_TRUE(l->Send(MsgType::kCommit, 1, wire::EncodeCommit({1, p.size(), Blob().size()})).ok());
  ExpectAck(*l, 1);
  EXPECT_EQ(StoreByte(2), 'Q');
}

// Compression "xor-lz4": a record XOR-ed with the page's committed version
// is resolved before staging; one without CONFIG's page_delta is refused.
TEST_F(BackupServerTest, ResolvesXorRecordsAgainstTheCommittedPage) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l, {{"compress", true}, {"page_delta", "xor"}});
  ASSERT_EQ(StoreByte(1), 'b');
  auto xor_pages = [](uint64_t page, char committed, char now) {
    std::string p = CheckpointPages(page, static_cast<char>(committed ^ now));
    remus::StoreU64(p.data() + 4, page * 4096 | wire::kPageFlagXor);
    return p;
  };
  std::string p = xor_pages(1, 'b', 'Q');
  std::string z = wire::CompressBatch(p);
  ASSERT_TRUE(l->Send(MsgType::kPages, 1, z, wire::kFlagLz4).ok());
  ASSERT_TRUE(l->Send(MsgType::kDevice, 1, Blob()).ok());
  ASSERT_TRUE(l->Send(MsgType::kCommit, 1, wire::EncodeCommit({1, p.size(), Blob().size()})).ok());
  ExpectAck(*l, 1);
  EXPECT_EQ(StoreByte(1), 'Q');
  // Against checkpoint 1's version now.
  SendCheckpoint(*l, 2, xor_pages(1, 'Q', 'R'));
  ExpectAck(*l, 2);
  EXPECT_EQ(StoreByte(1), 'R');
  // An XOR record for a page outside the store ends the session.
  SendCheckpoint(*l, 3, xor_pages(99, 'R', 'S'));
  auto f = NextNonHeartbeat(*l);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->type, MsgType::kError);
  WaitState("unprotected");
}

TEST_F(BackupServerTest, XorRecordsWithoutPageDeltaAreRefused) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l, {{"compress", true}});
  std::string p = CheckpointPages(1, 'x');
  remus::StoreU64(p.data() + 4, 4096 | wire::kPageFlagXor);
  SendCheckpoint(*l, 1, p);
  auto f = NextNonHeartbeat(*l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kError);
  EXPECT_EQ(wire::DecodeError(f->payload).code(), Code::kDataLoss);
  WaitState("unprotected");
}

TEST_F(BackupServerTest, CorruptCheckpointIsRefusedAndNotApplied) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  // Counts that do not match what arrived: the checkpoint is incomplete.
  std::string p = CheckpointPages(0, 'Z');
  ASSERT_TRUE(l->Send(MsgType::kPages, 1, p).ok());
  ASSERT_TRUE(l->Send(MsgType::kDevice, 1, Blob()).ok());
  ASSERT_TRUE(l->Send(MsgType::kCommit, 1, wire::EncodeCommit({2, p.size() + 4108, Blob().size()})).ok());
  auto f = NextNonHeartbeat(*l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, MsgType::kError);
  remus::Status err = wire::DecodeError(f->payload);
  EXPECT_EQ(err.code(), Code::kDataLoss);
  EXPECT_NE(err.message().find("incomplete"), std::string::npos) << err.message();
  // The primary was told and lives on: never an automatic promotion now,
  // and its guest runs on past checkpoint 0, which is retired.
  WaitState("unprotected");
  json st = DomainStatus();
  EXPECT_EQ(st["last_committed_epoch"], -1);
  EXPECT_NE(st["error"].get<std::string>().find("retired"), std::string::npos) << st["error"];
  remus::Status fo = server_->Failover("vm1");
  EXPECT_EQ(fo.code(), Code::kFailedPrecondition) << fo.ToString();
}

TEST_F(BackupServerTest, OutOfRangePageIsRefused) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  std::string p = CheckpointPages(99, 'Z');  // beyond the 4-page block
  SendCheckpoint(*l, 1, p);
  auto f = NextNonHeartbeat(*l);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->type, MsgType::kError);
  WaitState("unprotected");
  EXPECT_EQ(DomainStatus()["last_committed_epoch"], -1);  // retired: the primary runs on
}

TEST_F(BackupServerTest, PartialCheckpointDiscardedOnDisconnect) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  ASSERT_TRUE(l->Send(MsgType::kPages, 1, CheckpointPages(0, 'Z')).ok());
  ASSERT_TRUE(l->Send(MsgType::kDevice, 1, Blob()).ok());
  l.reset();  // the primary dies before COMMIT(1)
  WaitState("primary-lost");
  EXPECT_EQ(DomainStatus()["last_committed_epoch"], 0);
  EXPECT_EQ(StoreByte(0), 'a');
  EXPECT_FALSE(DomainStatus()["connected"].get<bool>());
  EXPECT_NE(DomainStatus()["error"].get<std::string>().find("lost the primary"), std::string::npos);
}

TEST_F(BackupServerTest, GoodbyeMeansNoPromotion) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  ASSERT_TRUE(l->Send(MsgType::kGoodbye, 0, R"({"reason":"unprotected by the operator"})").ok());
  WaitState("unprotected");
  EXPECT_EQ(DomainStatus()["promotion"]["state"], "standby");
}

TEST_F(BackupServerTest, WrongKeyCreatesNoState) {
  remus::Status hs;
  auto l = Connect(TestKey('x'), &hs);
  EXPECT_EQ(hs.code(), Code::kUnauthenticated) << hs.ToString();
  // Whatever it sends next is never read as state.
  (void)l->Send(MsgType::kConfig, 0, R"({"argv":["evil"]})");
  (void)l->Send(MsgType::kSyncBegin, 0, "{}");
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(server_->HasDomain("vm1"));
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/domains/vm1"));
}

TEST_F(BackupServerTest, SecondPrimaryForTheSameDomainRefused) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  // The first primary stays alive (heartbeats) while the second waits to be
  // let in (up to two heartbeat timeouts): it is refused at the end.
  std::atomic<bool> done{false};
  std::thread beat([&] {
    while (!done) {
      if (!l->Send(MsgType::kHeartbeat, 0, "").ok()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  remus::Status hs2;
  auto l2 = Connect(TestKey('k'), &hs2);
  ASSERT_TRUE(hs2.ok());
  auto f = NextNonHeartbeat(*l2);
  done = true;
  beat.join();
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kError);
  EXPECT_EQ(wire::DecodeError(f->payload).code(), Code::kAlreadyExists);
  EXPECT_EQ(DomainStatus()["state"], "protected") << DomainStatus().dump();
}

// `unprotect` returns once the primary sent GOODBYE; the backup reads it only
// after applying what was queued before it. A `protect` in that gap is let in
// once the old session ends, not refused as a second primary.
TEST_F(BackupServerTest, ProtectRightAfterGoodbyeWaitsForTheOldSessionToEnd) {
  BackupOptions o = RestartOptions();
  std::atomic<bool> slow{false};
  o.before_commit_for_test = [&](uint64_t) {
    if (slow) std::this_thread::sleep_for(std::chrono::milliseconds(600));  // a backup far behind
  };
  Restart(o);
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  slow = true;
  SendCheckpoint(*l, 1, CheckpointPages(1, 'x'));
  ASSERT_TRUE(l->Send(MsgType::kGoodbye, 0, R"({"reason":"unprotected by the operator"})").ok());
  auto l2 = Connect(TestKey('k'), &hs);  // the old session is still applying epoch 1
  ASSERT_TRUE(hs.ok());
  EXPECT_EQ(DomainStatus()["state"], "protected") << DomainStatus().dump();
  slow = false;
  InitialSync(*l2);  // admitted: its initial copy commits and is acknowledged
  EXPECT_EQ(DomainStatus()["state"], "protected") << DomainStatus().dump();
  EXPECT_EQ(DomainStatus()["last_committed_epoch"], 0) << DomainStatus().dump();
}

TEST_F(BackupServerTest, FailoverWithoutCommittedStateFails) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  ASSERT_TRUE(l->Send(MsgType::kConfig, 0, json{{"argv", {"qemu"}}}.dump()).ok());
  l.reset();
  WaitState("primary-lost");
  remus::Status s = server_->Failover("vm1");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("no committed checkpoint"), std::string::npos) << s.message();
  EXPECT_EQ(server_->Failover("nope").code(), Code::kNotFound);
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// A backup whose state directory is full refuses the domain with a clear
// error instead of dying of SIGBUS on its first page.
TEST_F(BackupServerTest, FailoverFrameWithoutAutoPromoteWaitsForTheOperator) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  InitialSync(*l);
  ASSERT_TRUE(l->Send(MsgType::kFailover, 0, json{{"reason", "QEMU exited"}}.dump()).ok());
  WaitState("primary-lost");
  json st = DomainStatus();
  EXPECT_NE(st["error"].get<std::string>().find("remusctl failover vm1"), std::string::npos) << st.dump();
  EXPECT_EQ(st["promotion"]["state"], "standby") << st.dump();  // never began
}

TEST_F(BackupServerTest, RestartKeepsTheCommittedCheckpointRestorable) {
  {
    remus::Status hs;
    auto l = Connect(TestKey('k'), &hs);
    ASSERT_TRUE(hs.ok());
    InitialSync(*l);
    std::string p = CheckpointPages(1, 'R');
    SendCheckpoint(*l, 1, p);
    ExpectAck(*l, 1);
    // A partial epoch 2 that is never committed.
    ASSERT_TRUE(l->Send(MsgType::kPages, 2, CheckpointPages(1, 'X')).ok());
  }
  WaitState("primary-lost");
  Restart(RestartOptions());
  ASSERT_TRUE(server_->HasDomain("vm1"));
  json st = DomainStatus();
  EXPECT_EQ(st["state"], "primary-lost") << st.dump();
  EXPECT_EQ(st["last_committed_epoch"], 1) << st.dump();
  EXPECT_NE(st["error"].get<std::string>().find("remusctl failover vm1"), std::string::npos) << st.dump();
  EXPECT_EQ(StoreByte(1), 'R');
  // A primary that comes back starts a new session over it.
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok()) << hs.ToString();
  InitialSync(*l);
  EXPECT_EQ(DomainStatus()["state"], "protected");
  EXPECT_EQ(StoreByte(1), 'b');
}

TEST_F(BackupServerTest, PartialCheckpointDoesNotLeakIntoTheNextSession) {
  {
    remus::Status hs;
    auto l = Connect(TestKey('k'), &hs);
    ASSERT_TRUE(hs.ok());
    InitialSync(*l);
    ASSERT_TRUE(l->Send(MsgType::kPages, 1, CheckpointPages(2, 'P')).ok());  // never committed
  }
  WaitState("primary-lost");
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok()) << hs.ToString();
  InitialSync(*l);  // its COMMIT(0) counts only this session's pages
  EXPECT_EQ(DomainStatus()["state"], "protected") << DomainStatus().dump();
}

class BackupRecoverTest : public BackupServerTest {
 protected:
  // Restarts the server after marking the domain promoted by process `pid`.
  void RestartPromotedBy(int pid) {
    remus::Status hs;
    {
      auto l = Connect(TestKey('k'), &hs);
      ASSERT_TRUE(hs.ok());
      InitialSync(*l);
    }
    WaitState("primary-lost");
    server_.reset();
    std::string dir = dir_ + "/domains/vm1";
    ASSERT_TRUE(WriteFileAtomic(dir + "/promoted.json",
                                json{{"pid", pid}, {"qmp_socket", dir + "/run/qmp.sock"}, {"epoch", 0}}.dump())
                    .ok());
    BackupOptions o;
    o.state_dir = dir_;
    o.tls = BackupTls('k');
    o.auto_promote = false;
    server_ = std::make_unique<BackupServer>(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
    ASSERT_TRUE(ListenAgain());
  }
};

TEST_F(BackupRecoverTest, APromotedGuestStillRunningIsNotRestoredAgain) {
  std::string run = dir_ + "/domains/vm1/run/";
  pid_t child = ::fork();
  if (child == 0) {
    execl("/bin/sh", "sh", "-c", "sleep 30 >/dev/null 2>&1", run.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // exec done
  RestartPromotedBy(child);
  json st = DomainStatus();
  EXPECT_EQ(st["state"], "failed-over") << st.dump();
  EXPECT_EQ(st["qemu"]["pid"], child) << st.dump();
  EXPECT_FALSE(server_->Failover("vm1").ok());  // no second copy
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
}

TEST_F(BackupRecoverTest, APromotedGuestThatIsGoneLeavesAClearError) {
  pid_t child = ::fork();
  if (child == 0) _exit(0);
  ::waitpid(child, nullptr, 0);  // a pid that no longer runs
  RestartPromotedBy(child);
  json st = DomainStatus();
  // ended: the guest ran from that checkpoint, so it is never promoted
  // again; a new protection to this host may start.
  EXPECT_EQ(st["state"], "ended") << st.dump();
  EXPECT_NE(st["error"].get<std::string>().find("not restored again"), std::string::npos) << st.dump();
  remus::Status f = server_->Failover("vm1");
  EXPECT_EQ(f.code(), Code::kFailedPrecondition) << f.ToString();
  EXPECT_NE(f.message().find("never promoted again"), std::string::npos) << f.ToString();
}

TEST(BackupFullDisk, RefusesWithResourceExhausted) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount a small tmpfs";
  char tmpl[] = "/tmp/remus-fulldisk.XXXXXX";
  std::string dir = mkdtemp(tmpl);
  ASSERT_EQ(::system(("mount -t tmpfs -o size=256k tmpfs " + dir).c_str()), 0);
  {
    BackupOptions o;
    o.state_dir = dir;
    o.tls = BackupTls('k');
    o.auto_promote = false;
    BackupServer server(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
    uint16_t port = 0;
    for (uint16_t p = 27100; p < 27200 && !port; p++)
      if (server.Listen({"127.0.0.1", p}).ok()) port = p;
    ASSERT_NE(port, 0);
    auto fd = ConnectTcp({"127.0.0.1", port}, 2000);
    ASSERT_TRUE(fd.ok());
    wire::Link l(std::move(fd).value());
    ASSERT_TRUE(wire::ClientHandshake(l, *TestKey('k'), "127.0.0.1", "vm1", 2000).ok());
    ASSERT_TRUE(l.Send(wire::MsgType::kConfig, 0, nlohmann::json{{"argv", {"qemu-system-x86_64"}}}.dump()).ok());
    nlohmann::json begin = {{"total_bytes", 16 << 20},
                            {"blocks", {{{"id", "pc.ram"}, {"used_length", 16 << 20}}}},
                            {"configuration", "0700000003616263"}};
    ASSERT_TRUE(l.Send(wire::MsgType::kSyncBegin, 0, begin.dump()).ok());
    StatusOr<wire::Frame> f = Unavailable("none");
    do {
      f = l.RecvUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    } while (f.ok() && f->type == wire::MsgType::kHeartbeat);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ASSERT_EQ(f->type, wire::MsgType::kError);
    remus::Status err = wire::DecodeError(f->payload);
    EXPECT_EQ(err.code(), Code::kResourceExhausted) << err.ToString();
    EXPECT_NE(err.message().find("no room"), std::string::npos) << err.message();
  }
  ASSERT_EQ(::system(("umount " + dir).c_str()), 0);
  ::rmdir(dir.c_str());
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// Defect 9: connections beyond the caps are closed at once; finished
// connection threads are reaped, so the caps count only live ones.
class BackupServerCapsTest : public ::testing::Test {
 protected:
  void Start(int max_connections, int max_handshakes) {
    dir_ = TempDir();
    BackupOptions o;
    o.state_dir = dir_;
    o.tls = BackupTls('k');
    o.auto_promote = false;
    o.max_connections = max_connections;
    o.max_handshakes = max_handshakes;
    server_ = std::make_unique<BackupServer>(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
    for (uint16_t p = 27200; p < 27300 && !port_; p++)
      if (server_->Listen({"127.0.0.1", p}).ok()) port_ = p;
    ASSERT_NE(port_, 0);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }
  Fd Open() {
    auto fd = ConnectTcp({"127.0.0.1", port_}, 2000);
    EXPECT_TRUE(fd.ok());
    return fd.ok() ? std::move(fd).value() : Fd();
  }
  // True if the server closed fd within 2 s without sending anything.
  static bool ClosedByServer(const Fd& fd) {
    auto r = WaitReadable(fd.get(), 2000);
    if (!r.ok() || !*r) return false;
    char c;
    return ::read(fd.get(), &c, 1) == 0;
  }
  void WaitConnections(int n) {
    for (int i = 0; i < 300 && server_->connections() != n; i++)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    EXPECT_EQ(server_->connections(), n);
  }

  std::string dir_;
  uint16_t port_ = 0;
  std::unique_ptr<BackupServer> server_;
};

TEST_F(BackupServerCapsTest, ConnectionsOverTheCapAreClosed) {
  Start(/*max_connections=*/2, /*max_handshakes=*/8);
  Fd a = Open(), b = Open();
  WaitConnections(2);
  Fd c = Open();
  EXPECT_TRUE(ClosedByServer(c));
  // The silent peers leave; their threads are reaped and the slots free.
  a.Reset();
  b.Reset();
  WaitConnections(0);
  auto fd = ConnectTcp({"127.0.0.1", port_}, 2000);
  ASSERT_TRUE(fd.ok());
  wire::Link l(std::move(fd).value());
  EXPECT_TRUE(wire::ClientHandshake(l, *TestKey('k'), "127.0.0.1", "vm1", 2000).ok());
}

TEST_F(BackupServerCapsTest, HandshakesOverTheCapAreClosed) {
  Start(/*max_connections=*/8, /*max_handshakes=*/1);
  Fd a = Open();
  WaitConnections(1);
  Fd b = Open();
  EXPECT_TRUE(ClosedByServer(b));
  a.Reset();
  WaitConnections(0);
}

TEST_F(BackupServerCapsTest, ManyFailedHandshakesLeaveNoThreads) {
  Start(/*max_connections=*/4, /*max_handshakes=*/4);
  for (int i = 0; i < 20; i++) {
    remus::Status hs;
    auto fd = ConnectTcp({"127.0.0.1", port_}, 2000);
    ASSERT_TRUE(fd.ok());
    wire::Link l(std::move(fd).value());
    EXPECT_FALSE(wire::ClientHandshake(l, *TestKey('x'), "127.0.0.1", "vm1", 2000).ok());
  }
  WaitConnections(0);
  EXPECT_FALSE(server_->HasDomain("vm1"));
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// Through the server's public API with automatic promotion on, as remusd
// runs it. The primary's QEMU binary does not exist here, so a promotion
// that wrongly happens shows as promotion.state "promotion-failed".
class BackupServerAutoPromoteTest : public BackupServerTest {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    BackupOptions o;
    o.state_dir = dir_;
    o.tls = BackupTls('k');
    o.auto_promote = true;
    o.heartbeat = {std::chrono::milliseconds(50), std::chrono::milliseconds(400)};
    o.qemu_binary = "/nonexistent/qemu-system-x86_64";  // fails to start, as the tests want
    server_ = std::make_unique<BackupServer>(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
    for (uint16_t port = 27300; port < 27400 && !port_; port++)
      if (server_->Listen({"127.0.0.1", port}).ok()) port_ = port;
    ASSERT_NE(port_, 0);
  }
  static json Config() {
    return {{"domain", "vm1"}, {"argv", {"/nonexistent/qemu-system-x86_64", "-m", "1"}},
            {"heartbeat_interval_ms", 50}, {"heartbeat_timeout_ms", 400}};
  }
  void Sync(wire::Link& l) {
    ASSERT_TRUE(l.Send(MsgType::kConfig, 0, Config().dump()).ok());
    json begin = {{"total_bytes", 4 * 4096}, {"blocks", {{{"id", "pc.ram"}, {"used_length", 4 * 4096}}}},
                  {"configuration", "0700000003616263"}};
    ASSERT_TRUE(l.Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
    std::string pages = CheckpointPages(0, 'a');
    ASSERT_TRUE(l.Send(MsgType::kPages, 0, pages).ok());
    ASSERT_TRUE(l.Send(MsgType::kDevice, 0, Blob()).ok());
    ASSERT_TRUE(l.Send(MsgType::kCommit, 0, wire::EncodeCommit({1, pages.size(), Blob().size()})).ok());
    ExpectAck(l, 0);
  }
};

// Defect 1, end to end through the server: ERROR, then GOODBYE: no promotion.
TEST_F(BackupServerAutoPromoteTest, RefusedCheckpointAndGoodbyeNeverPromote) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  Sync(*l);
  std::string p = CheckpointPages(0, 'Z');
  ASSERT_TRUE(l->Send(MsgType::kPages, 1, p).ok());
  ASSERT_TRUE(l->Send(MsgType::kDevice, 1, Blob()).ok());
  ASSERT_TRUE(l->Send(MsgType::kCommit, 1, wire::EncodeCommit({2, p.size() + 4108, Blob().size()})).ok());
  auto f = NextNonHeartbeat(*l);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->type, MsgType::kError);
  ASSERT_TRUE(l->Send(MsgType::kGoodbye, 1, R"({"reason":"backup refused"})").ok());
  l.reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  json st = DomainStatus();
  EXPECT_EQ(st["promotion"]["state"], "standby") << st.dump();
  EXPECT_EQ(st["state"], "unprotected") << st.dump();
}

// Defect 6, through the server: the primary is back within the timeout.
TEST_F(BackupServerAutoPromoteTest, ReconnectWithinTheTimeoutKeepsTheNewSession) {
  remus::Status hs;
  {
    auto l = Connect(TestKey('k'), &hs);
    ASSERT_TRUE(hs.ok());
    Sync(*l);
  }
  WaitState("primary-lost");
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok()) << hs.ToString();
  Sync(*l);
  for (int i = 0; i < 16; i++) {  // past the first session's deadline, alive
    ASSERT_TRUE(l->Send(MsgType::kHeartbeat, 0, "").ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  SendCheckpoint(*l, 1, CheckpointPages(1, 'N'));
  ExpectAck(*l, 1);
  json st = DomainStatus();
  EXPECT_EQ(st["promotion"]["state"], "standby") << st.dump();
  EXPECT_EQ(st["state"], "protected") << st.dump();
}

// Defect 8, through the server: wrong JSON types in CONFIG used to throw
// nlohmann::json::type_error on the session thread (std::terminate).
TEST_F(BackupServerAutoPromoteTest, ConfigOfWrongTypesIsRefused) {
  remus::Status hs;
  auto l = Connect(TestKey('k'), &hs);
  ASSERT_TRUE(hs.ok());
  ASSERT_TRUE(l->Send(MsgType::kConfig, 0,
                      R"({"argv":["q"],"heartbeat_interval_ms":"50","heartbeat_timeout_ms":"400"})").ok());
  auto f = NextNonHeartbeat(*l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->type, MsgType::kError);
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// Defect 2, through the server: after GOODBYE the guest ran on unprotected;
// a re-sync that dies before its COMMIT(0) leaves nothing to restore, also
// after a restart.
TEST_F(BackupServerTest, UncommittedResyncLeavesNoCheckpoint) {
  remus::Status hs;
  {
    auto l = Connect(TestKey('k'), &hs);
    ASSERT_TRUE(hs.ok());
    InitialSync(*l);
    ASSERT_TRUE(l->Send(MsgType::kGoodbye, 0, R"({"reason":"unprotected by the operator"})").ok());
  }
  WaitState("unprotected");
  {
    auto l = Connect(TestKey('k'), &hs);
    ASSERT_TRUE(hs.ok());
    json config = {{"domain", "vm1"}, {"argv", {"qemu-new", "-m", "1"}}};
    ASSERT_TRUE(l->Send(MsgType::kConfig, 0, config.dump()).ok());
    json begin = {{"total_bytes", 4 * 4096}, {"blocks", {{{"id", "pc.ram"}, {"used_length", 4 * 4096}}}},
                  {"configuration", "0700000003616263"}};
    ASSERT_TRUE(l->Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
    ASSERT_TRUE(l->Send(MsgType::kPages, 0, CheckpointPages(0, 'n')).ok());
  }
  WaitState("primary-lost");
  remus::Status s = server_->Failover("vm1");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("no committed checkpoint"), std::string::npos) << s.message();
  server_.reset();
  BackupOptions o;
  o.state_dir = dir_;
  o.tls = BackupTls('k');
  o.auto_promote = false;
  server_ = std::make_unique<BackupServer>(o, RealClock::Get(), std::make_unique<FailStopArbiter>());
  ASSERT_TRUE(ListenAgain());
  ASSERT_TRUE(server_->HasDomain("vm1"));
  s = server_->Failover("vm1");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("no committed checkpoint"), std::string::npos) << s.message();
}

// Defect 4, through the server with the real launcher: a QEMU that exits at
// start fails the promotion; retrying used to std::terminate.
TEST_F(BackupServerTest, RetryingAFailedFailoverIsSafe) {
  remus::Status hs;
  {
    auto l = Connect(TestKey('k'), &hs);
    ASSERT_TRUE(hs.ok());
    json config = {{"domain", "vm1"}, {"argv", {"/bin/false"}}};
    ASSERT_TRUE(l->Send(MsgType::kConfig, 0, config.dump()).ok());
    json begin = {{"total_bytes", 4096}, {"blocks", {{{"id", "pc.ram"}, {"used_length", 4096}}}},
                  {"configuration", "0700000003616263"}};
    ASSERT_TRUE(l->Send(MsgType::kSyncBegin, 0, begin.dump()).ok());
    std::string pages = CheckpointPages(0, 'a');
    ASSERT_TRUE(l->Send(MsgType::kPages, 0, pages).ok());
    ASSERT_TRUE(l->Send(MsgType::kDevice, 0, Blob()).ok());
    ASSERT_TRUE(l->Send(MsgType::kCommit, 0, wire::EncodeCommit({1, pages.size(), Blob().size()})).ok());
    ExpectAck(*l, 0);
  }
  WaitState("primary-lost");
  for (int i = 0; i < 3; i++) {
    remus::Status s = server_->Failover("vm1");
    EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
    EXPECT_NE(s.message().find("exited at start"), std::string::npos) << s.message();
    EXPECT_EQ(DomainStatus()["state"], "failed");
  }
}

}  // namespace
}  // namespace remus
