// DomainLease and EtcdArbiter against FakeEtcd on a FakeClock: the steps
// (RenewOnce, CheckDeadline) are driven by hand, so every interleaving of
// renewals, partitions and a backup's transaction is chosen by the test.
#include <gtest/gtest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <random>

#include "arbiter/etcd_arbiter.h"
#include "arbiter/lease.h"
#include "arbiter/leftovers.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_etcd.h"

namespace remus {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

class RecordingFencer final : public Fencer {
 public:
  Status Pause() override {
    paused = true;
    pauses++;
    return OkStatus();
  }
  Status Resume() override {
    paused = false;
    resumes++;
    return OkStatus();
  }
  Status Destroy() override {
    destroyed = true;
    return OkStatus();
  }
  std::atomic<bool> paused{false}, destroyed{false};
  std::atomic<int> pauses{0}, resumes{0};
};

ArbiterOptions Opts(const std::string& host) {
  ArbiterOptions o;
  o.prefix = "/t";
  o.host = host;
  o.instance = host + "-1";
  o.ttl = seconds(5);
  o.margin = seconds(1);
  return o;
}

class LeaseTest : public ::testing::Test {
 protected:
  FakeClock clock_;
  FakeEtcd etcd_{clock_};
  FakeEtcdLink a_link_{&etcd_};
  RecordingFencer fencer_;
  std::unique_ptr<DomainLease> a_ = std::make_unique<DomainLease>(Opts("A"), "vm1", &a_link_, clock_, &fencer_);
  EtcdArbiter b_{Opts("B"), &etcd_, clock_};
};

TEST_F(LeaseTest, AcquireWritesOwnerAndSession) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  auto owner = etcd_.Peek("/t/domains/vm1/owner");
  ASSERT_TRUE(owner);
  EXPECT_EQ(OwnerRecord::Decode(owner->value).host, "A");
  EXPECT_EQ(OwnerRecord::Decode(owner->value).session, "s1");
  EXPECT_NE(owner->lease, 0);
  EXPECT_EQ(a_->token(), owner->mod_revision);
  EXPECT_EQ(etcd_.Peek("/t/domains/vm1/session")->value, "s1");
  EXPECT_TRUE(a_->Valid());
}

TEST_F(LeaseTest, AcquireRefusedWhileAnotherHostOwns) {
  FakeEtcd& e = etcd_;
  DomainLease other(Opts("B"), "vm1", &e, clock_, &fencer_);
  ASSERT_TRUE(other.Acquire("s0").ok());
  Status s = a_->Acquire("s1");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_NE(s.message().find("host 'B'"), std::string::npos) << s.message();
  EXPECT_EQ(a_->state(), LeaseState::kAcquiring);
}

TEST_F(LeaseTest, AcquireTakesOverThisHostsOwnKeyAfterARestart) {
  RecordingFencer f2;
  DomainLease before(Opts("A"), "vm1", &etcd_, clock_, &f2);
  ASSERT_TRUE(before.Acquire("s0").ok());
  ASSERT_TRUE(a_->Acquire("s1").ok());
  EXPECT_EQ(etcd_.Peek("/t/domains/vm1/session")->value, "s1");
}

TEST_F(LeaseTest, AcquireWithoutEtcdIsUnavailable) {
  etcd_.set_reachable(false);
  EXPECT_EQ(a_->Acquire("s1").code(), Code::kUnavailable);
}

TEST_F(LeaseTest, RenewalsKeepTheGuestRunning) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  for (int i = 0; i < 30; i++) {
    clock_.Advance(milliseconds(1600));
    a_->CheckDeadline();
    a_->RenewOnce();
  }
  EXPECT_FALSE(fencer_.paused);
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_EQ(a_->renewals(), 30u);
  EXPECT_TRUE(a_->Valid());
}

TEST_F(LeaseTest, FencesAtTheLocalDeadlineAndResumesWhenRenewedInTime) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  etcd_.set_reachable(false);
  clock_.Advance(milliseconds(3999));
  a_->RenewOnce();  // fails: unreachable
  a_->CheckDeadline();
  EXPECT_FALSE(fencer_.paused);
  EXPECT_TRUE(a_->Valid());
  clock_.Advance(milliseconds(1));  // ttl - margin
  a_->CheckDeadline();
  EXPECT_TRUE(fencer_.paused);
  EXPECT_FALSE(a_->Valid());
  EXPECT_EQ(a_->state(), LeaseState::kFenced);
  EXPECT_EQ(a_->fence_events(), 1u);
  // etcd is back before the lease expired there: same lease, guest resumes.
  clock_.Advance(milliseconds(500));
  etcd_.set_reachable(true);
  a_->RenewOnce();
  EXPECT_FALSE(fencer_.paused);
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_TRUE(a_->Valid());
  EXPECT_FALSE(fencer_.destroyed);
}

TEST_F(LeaseTest, TakesTheKeyBackWhenItExpiredButNoOneWon) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  int64_t t0 = a_->token();
  etcd_.set_reachable(false);
  clock_.Advance(seconds(10));
  a_->CheckDeadline();
  EXPECT_TRUE(fencer_.paused);
  etcd_.set_reachable(true);
  a_->RenewOnce();  // the lease is gone, the key is free, the session still s1
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_FALSE(fencer_.paused);
  EXPECT_FALSE(fencer_.destroyed);
  EXPECT_GT(a_->token(), t0);
}

TEST_F(LeaseTest, DestroysItsCopyWhenTheBackupWon) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_link_.set_up(false);
  clock_.Advance(seconds(4));
  a_->CheckDeadline();
  ASSERT_TRUE(fencer_.paused);
  clock_.Advance(seconds(1));  // the lease expires in etcd
  StatusOr<PromotionGrant> g = b_.MayPromote("vm1", "s1");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  a_link_.set_up(true);
  a_->RenewOnce();
  EXPECT_EQ(a_->state(), LeaseState::kLost);
  EXPECT_TRUE(fencer_.destroyed);
  EXPECT_EQ(a_->StatusJson()["owner"], "B");
  EXPECT_EQ(a_->token(), g->token);
  EXPECT_EQ(a_->StatusJson()["winner"], "B");
  EXPECT_EQ(etcd_.Peek("/t/domains/vm1/session")->value, "promoted:s1");
}

TEST_F(LeaseTest, BackupCannotWinWhileThePrimaryHoldsTheLease) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  StatusOr<PromotionGrant> g = b_.MayPromote("vm1", "s1");
  EXPECT_EQ(g.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(g.status().message().find("host 'A' still holds"), std::string::npos) << g.status().message();
  EXPECT_NE(b_.StatusJson("vm1").value("refused", ""), "");
}

TEST_F(LeaseTest, RetiredSessionIsNeverPromoted) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  ASSERT_TRUE(a_->Retire("backup lost").ok());
  EXPECT_EQ(a_->state(), LeaseState::kReleased);
  EXPECT_FALSE(etcd_.Peek("/t/domains/vm1/owner"));
  EXPECT_EQ(etcd_.Peek("/t/domains/vm1/session")->value, "retired:s1");
  clock_.Advance(seconds(60));
  StatusOr<PromotionGrant> g = b_.MayPromote("vm1", "s1");
  EXPECT_EQ(g.status().code(), Code::kAborted);
  EXPECT_NE(g.status().message().find("runs on unprotected"), std::string::npos) << g.status().message();
}

TEST_F(LeaseTest, RetireWaitsForEtcdAndFinishesInTheBackground) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  etcd_.set_reachable(false);
  EXPECT_EQ(a_->Retire("unprotect").code(), Code::kUnavailable);
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_EQ(a_->StatusJson().value("retiring", ""), "unprotect");
  etcd_.set_reachable(true);
  a_->RenewOnce();
  EXPECT_EQ(a_->state(), LeaseState::kReleased);
  EXPECT_EQ(etcd_.Peek("/t/domains/vm1/session")->value, "retired:s1");
}

TEST_F(LeaseTest, AbandonLetsTheBackupWinAtOnce) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_->Abandon();
  EXPECT_EQ(a_->state(), LeaseState::kReleased);
  StatusOr<PromotionGrant> g = b_.MayPromote("vm1", "s1");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_GT(g->token, a_->token());
}

TEST_F(LeaseTest, BackupRefusesAnotherSessionAndSessionlessPrimaries) {
  ASSERT_TRUE(a_->Acquire("s2").ok());
  a_->Abandon();
  EXPECT_EQ(b_.MayPromote("vm1", "s1").status().code(), Code::kAborted);  // an older session's checkpoint
  EXPECT_EQ(b_.MayPromote("vm1", "").status().code(), Code::kAborted);
}

TEST_F(LeaseTest, ExpiredPromotedCopyIsNotTakenBackByTheOldPrimary) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_link_.set_up(false);
  clock_.Advance(seconds(6));
  a_->CheckDeadline();
  a_link_.set_up(true);
  ASSERT_TRUE(b_.MayPromote("vm1", "s1").ok());
  // B's lease lapses too (B died after promoting): the key is free again,
  // but the session says promoted, so A must not run.
  clock_.Advance(seconds(6));
  a_->RenewOnce();
  EXPECT_EQ(a_->state(), LeaseState::kLost);
  EXPECT_TRUE(fencer_.destroyed);
}

TEST_F(LeaseTest, RetriedPromotionKeepsItsToken) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_->Abandon();
  auto g1 = b_.MayPromote("vm1", "s1");
  auto g2 = b_.MayPromote("vm1", "s1");
  ASSERT_TRUE(g1.ok() && g2.ok());
  EXPECT_EQ(g1->token, g2->token);
}

// Re-protection after a failover: B promoted session s1, then protects the
// promoted guest again (session s2, to A). s2's lease owns the domain; the
// promotion's lease is handed over, not kept as a win: otherwise B would take
// it for a win of a later session and promote without etcd's say.
TEST_F(LeaseTest, APromotedCopyProtectedAgainHandsItsWinOver) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_->Abandon();
  StatusOr<PromotionGrant> g1 = b_.MayPromote("vm1", "s1");
  ASSERT_TRUE(g1.ok()) << g1.status().ToString();
  b_.Promoted("vm1", -1, nullptr);
  ASSERT_EQ(b_.won().size(), 1u);

  auto own = b_.Own("vm1", "s2", -1, nullptr);
  ASSERT_TRUE(own.ok()) << own.status().ToString();
  EXPECT_TRUE(b_.won().empty());
  auto owner = etcd_.Peek("/t/domains/vm1/owner");
  ASSERT_TRUE(owner.has_value());  // the old lease's revocation left the moved key alone
  EXPECT_EQ(OwnerRecord::Decode(owner->value).session, "s2");
  EXPECT_EQ(etcd_.Peek("/t/domains/vm1/session")->value, "s2");
  EXPECT_GT((*own)->lease().token(), g1->token);

  // B's QEMU dies; A, its backup now, wins s2 with a newer token.
  (*own)->lease().Abandon();
  EtcdArbiter a_backup{Opts("A"), &etcd_, clock_};
  StatusOr<PromotionGrant> g2 = a_backup.MayPromote("vm1", "s2");
  ASSERT_TRUE(g2.ok()) << g2.status().ToString();
  EXPECT_GT(g2->token, (*own)->lease().token());
  // While A owns the domain, B cannot promote it, whatever it won before.
  EXPECT_FALSE(b_.MayPromote("vm1", "s2").ok());
}

// The etcd client resends a write whose answer was lost; each transaction
// must take a failure against its own earlier success for what it is.
TEST_F(LeaseTest, ResentWritesAreRecognisedAsOurOwn) {
  etcd_.ResendNextTxn();
  ASSERT_TRUE(a_->Acquire("s1").ok());
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_EQ(a_->token(), etcd_.Peek("/t/domains/vm1/owner")->mod_revision);
  etcd_.ResendNextTxn();
  ASSERT_TRUE(a_->Retire("done").ok());
  EXPECT_EQ(a_->state(), LeaseState::kReleased);
}

TEST_F(LeaseTest, ResentPromotionIsAWin) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_->Abandon();
  etcd_.ResendNextTxn();
  auto g = b_.MayPromote("vm1", "s1");
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->token, etcd_.Peek("/t/domains/vm1/owner")->mod_revision);
}

TEST_F(LeaseTest, ResentRetakeAfterExpiryIsOurs) {
  ASSERT_TRUE(a_->Acquire("s1").ok());
  a_link_.set_up(false);
  clock_.Advance(seconds(6));
  a_->CheckDeadline();
  a_link_.set_up(true);
  etcd_.ResendNextTxn();
  a_->RenewOnce();
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_FALSE(fencer_.destroyed);
}

// The ordering argument, checked over random schedules: whenever a backup's
// transaction can succeed, the primary's copy is already paused (it fences
// T - margin after sending its last successful keep-alive; etcd expires the
// lease T after receiving it). Keep-alives may be lost or delayed.
TEST_F(LeaseTest, NoScheduleLetsTheBackupWinWhileThePrimaryRuns) {
  std::mt19937 rng(12345);
  int wins = 0, fenced_then_resumed = 0;
  for (int run = 0; run < 200; run++) {
    FakeClock clock;
    FakeEtcd etcd(clock);
    FakeEtcdLink la(&etcd), lb(&etcd);
    RecordingFencer f;
    DomainLease a(Opts("A"), "vm1", &la, clock, &f);
    EtcdArbiter b(Opts("B"), &lb, clock);
    ASSERT_TRUE(a.Acquire("s1").ok());
    bool won = false;
    for (int step = 0; step < 400 && !won; step++) {
      clock.Advance(milliseconds(std::uniform_int_distribution<int>(10, 400)(rng)));
      int r = std::uniform_int_distribution<int>(0, 9)(rng);
      if (r < 2) la.set_up(std::uniform_int_distribution<int>(0, 2)(rng) != 0);
      if (r == 2) lb.set_up(std::uniform_int_distribution<int>(0, 2)(rng) != 0);
      a.CheckDeadline();
      if (r == 4 || r == 5) a.RenewOnce();
      if (r == 6) {
        bool was_running = !f.paused && !f.destroyed;
        auto g = b.MayPromote("vm1", "s1");
        if (g.ok()) {
          won = true;
          wins++;
          EXPECT_FALSE(was_running) << "run " << run << " step " << step << ": the backup won while A ran";
        }
      }
    }
    if (f.resumes > 0) fenced_then_resumed++;
  }
  // The schedules exercise both outcomes, or the check above proves nothing.
  EXPECT_GT(wins, 20);
  EXPECT_GT(fenced_then_resumed, 20);
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

TEST(FenceTableTest, StopsOnlyTheArmedProcessPastItsDeadline) {
  auto t = FenceTable::Create();
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  FenceTable& table = **t;
  int a = table.Arm(100, 7, 1000);
  int b = table.Arm(200, 9, 5000);
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  std::vector<int> stopped;
  auto start = [](int pid) -> uint64_t { return pid == 100 ? 7 : 10; };  // pid 200 was reused
  auto stop = [&](int pid) { stopped.push_back(pid); };
  EXPECT_EQ(table.Enforce(999, start, stop), 2);
  EXPECT_TRUE(stopped.empty());
  EXPECT_EQ(table.Enforce(1000, start, stop), 1);
  EXPECT_EQ(stopped, std::vector<int>{100});
  EXPECT_TRUE(table.Fenced(a));
  // A renewal moves the deadline; a fenced slot is re-armed by remusd only.
  EXPECT_TRUE(table.Rearm(a, 3000));
  EXPECT_FALSE(table.Fenced(a));
  EXPECT_EQ(table.Enforce(2000, start, stop), 2);
  // pid 200's start time differs: marked fenced, but never signalled.
  EXPECT_EQ(table.Enforce(6000, start, stop), 0);
  EXPECT_EQ(stopped, (std::vector<int>{100, 100}));
  EXPECT_TRUE(table.Fenced(b));
  table.Free(a);
  table.Free(b);
  EXPECT_EQ(table.Enforce(10000, start, stop), 0);
}

TEST(FenceTableTest, TheWatchdogSeesTheSameTableThroughTheFd) {
  auto t = FenceTable::Create();
  ASSERT_TRUE(t.ok());
  int dupfd = ::dup((*t)->fd());
  auto m = FenceTable::Map(dupfd);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  int s = (*t)->Arm(1, 1, 50);
  std::vector<int> stopped;
  (*m)->Enforce(60, [](int) -> uint64_t { return 1; }, [&](int pid) { stopped.push_back(pid); });
  EXPECT_EQ(stopped, std::vector<int>{1});
  EXPECT_TRUE((*t)->Fenced(s));
}

TEST(FenceTableTest, MapRefusesWhatIsNotATable) {
  int fd = ::memfd_create("x", 0);
  ASSERT_EQ(::ftruncate(fd, 1 << 20), 0);
  EXPECT_EQ(FenceTable::Map(fd).status().code(), Code::kInvalidArgument);
}

TEST_F(LeaseTest, TheWatchdogsFenceIsSeenAndUndoneOnRenewal) {
  auto t = FenceTable::Create();
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(a_->Acquire("s1").ok());
  ASSERT_TRUE(a_->AttachFence(t->get(), 4242, 1));
  std::vector<int> stopped;
  auto enforce = [&] {
    (*t)->Enforce(clock_.Now().time_since_epoch().count(), [](int) -> uint64_t { return 1; },
                  [&](int pid) { stopped.push_back(pid); });
  };
  a_link_.set_up(false);
  clock_.Advance(milliseconds(3500));
  enforce();
  EXPECT_TRUE(stopped.empty());  // the deadline is 4 s out
  a_->RenewOnce();              // fails: unreachable; the deadline stays
  clock_.Advance(milliseconds(500));
  enforce();  // remusd "frozen": only the watchdog acts
  EXPECT_EQ(stopped, std::vector<int>{4242});
  a_->CheckDeadline();  // remusd wakes
  EXPECT_EQ(a_->state(), LeaseState::kFenced);
  EXPECT_TRUE(fencer_.paused);
  a_link_.set_up(true);
  a_->RenewOnce();  // still within etcd's TTL: resumes, re-armed with the new deadline
  EXPECT_EQ(a_->state(), LeaseState::kHeld);
  EXPECT_FALSE(fencer_.paused);
  clock_.Advance(milliseconds(1000));
  enforce();
  EXPECT_EQ(stopped.size(), 1u);  // not stopped again for the old deadline
}

TEST_F(LeaseTest, RetiringFreesTheWatchdogSlot) {
  auto t = FenceTable::Create();
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(a_->Acquire("s1").ok());
  ASSERT_TRUE(a_->AttachFence(t->get(), 4242, 1));
  ASSERT_TRUE(a_->Retire("done").ok());
  std::vector<int> stopped;
  clock_.Advance(seconds(60));
  EXPECT_EQ((*t)->Enforce(clock_.Now().time_since_epoch().count(), [](int) -> uint64_t { return 1; },
                          [&](int pid) { stopped.push_back(pid); }),
            0);
  EXPECT_TRUE(stopped.empty());
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// Found by the fault campaign (seed 1, run 7): a promoted backup cut from
// etcd past its TTL fenced its copy, and on return compared the session key
// against the primary's value ("S") instead of its own ("promoted:S"), so it
// destroyed the only copy. It must take its key back.
TEST(PromotedBackupLease, TakesItsExpiredKeyBackAfterAnEtcdOutage) {
  FakeClock clock;
  FakeEtcd etcd(clock);
  FakeEtcdLink a_link(&etcd), b_link(&etcd);
  RecordingFencer fa;
  DomainLease a(Opts("A"), "vm1", &a_link, clock, &fa);
  ASSERT_TRUE(a.Acquire("s1").ok());
  a.Abandon();
  EtcdArbiter b(Opts("B"), &b_link, clock);
  ASSERT_TRUE(b.MayPromote("vm1", "s1").ok());
  auto won = b.won().at("vm1");
  b_link.set_up(false);
  clock.Advance(seconds(6));
  won->lease().CheckDeadline();
  EXPECT_EQ(won->lease().state(), LeaseState::kFenced);
  b_link.set_up(true);
  won->lease().RenewOnce();  // expired: nobody owns it, the session says promoted:s1
  EXPECT_EQ(won->lease().state(), LeaseState::kHeld) << won->lease().StatusJson().dump();
  EXPECT_EQ(OwnerRecord::Decode(etcd.Peek("/t/domains/vm1/owner")->value).host, "B");
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// A promoted copy must not be stopped by the watchdog after its remusd
// stopped on purpose (nobody would resume it).
TEST(PromotedBackupLease, StoppingTheArbiterFreesItsWatchdogSlots) {
  FakeClock clock;
  FakeEtcd etcd(clock);
  auto table = FenceTable::Create();
  ASSERT_TRUE(table.ok());
  {
    RecordingFencer fa;
    DomainLease a(Opts("A"), "vm1", &etcd, clock, &fa);
    ASSERT_TRUE(a.Acquire("s1").ok());
    a.Abandon();
    EtcdArbiter b(Opts("B"), &etcd, clock);
    b.set_fence_table(table->get());
    ASSERT_TRUE(b.MayPromote("vm1", "s1").ok());
    b.Promoted("vm1", ::getpid(), nullptr);
    // Armed while B's remusd runs (before the deadline: nothing stopped).
    EXPECT_EQ((*table)->Enforce(clock.Now().time_since_epoch().count(), [](int) -> uint64_t { return 0; },
                                [](int) { ADD_FAILURE() << "stopped before the deadline"; }),
              1);
  }
  std::vector<int> stopped;
  EXPECT_EQ((*table)->Enforce((clock.Now() + seconds(60)).time_since_epoch().count(),
                              [](int) -> uint64_t { return ProcessStartTime(::getpid()); },
                              [&](int pid) { stopped.push_back(pid); }),
            0);
  EXPECT_TRUE(stopped.empty());
}

}  // namespace
}  // namespace remus
