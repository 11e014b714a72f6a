#include "heartbeat/heartbeat.h"

#include <gtest/gtest.h>

#include "tests/fakes/fake_clock.h"

namespace remus {
namespace {

using std::chrono::milliseconds;

TEST(Heartbeat, SendsEveryInterval) {
  FakeClock clock;
  HeartbeatMonitor hb(clock, {milliseconds(100), milliseconds(500)});
  EXPECT_TRUE(hb.SendDue());  // nothing sent yet
  hb.Sent();
  EXPECT_FALSE(hb.SendDue());
  clock.Advance(milliseconds(99));
  EXPECT_FALSE(hb.SendDue());
  clock.Advance(milliseconds(1));
  EXPECT_TRUE(hb.SendDue());
}

TEST(Heartbeat, PeerLostOnlyAfterTimeoutOfSilence) {
  FakeClock clock;
  HeartbeatMonitor hb(clock, {milliseconds(100), milliseconds(500)});
  clock.Advance(milliseconds(500));
  EXPECT_FALSE(hb.PeerLost());  // exactly the timeout is not yet lost
  clock.Advance(milliseconds(1));
  EXPECT_TRUE(hb.PeerLost());
  hb.Received();
  EXPECT_FALSE(hb.PeerLost());
  for (int i = 0; i < 20; i++) {  // a peer that keeps talking is never lost
    clock.Advance(milliseconds(400));
    hb.Received();
    EXPECT_FALSE(hb.PeerLost());
  }
  EXPECT_EQ(hb.SinceLastReceived(), Nanos(0));
}

TEST(Heartbeat, NextCheckInIsTheEarlierDeadline) {
  FakeClock clock;
  HeartbeatMonitor hb(clock, {milliseconds(100), milliseconds(500)});
  hb.Sent();
  EXPECT_EQ(hb.NextCheckIn(), milliseconds(100));
  clock.Advance(milliseconds(450));
  hb.Sent();
  // 50 ms + 1 ns until the peer counts as lost, before the next send at 100 ms.
  EXPECT_EQ(hb.NextCheckIn(), milliseconds(50) + Nanos(1));
  clock.Advance(milliseconds(600));
  EXPECT_EQ(hb.NextCheckIn(), Nanos(0));
}

TEST(Heartbeat, BusyReceiverNeverDeclaresThePeerLost) {
  FakeClock clock;
  HeartbeatMonitor hb(clock, {milliseconds(100), milliseconds(500)});
  hb.SetBusy(true);  // applying a large frame: the peer's bytes wait in our socket
  clock.Advance(milliseconds(5000));
  EXPECT_FALSE(hb.PeerLost());
  hb.SetBusy(false);  // silence counts from the end of the busy spell
  clock.Advance(milliseconds(500));
  EXPECT_FALSE(hb.PeerLost());
  clock.Advance(milliseconds(1));
  EXPECT_TRUE(hb.PeerLost());
}

TEST(Heartbeat, ReconfigureAdoptsThePeersTimeout) {
  FakeClock clock;
  HeartbeatMonitor hb(clock, {milliseconds(100), milliseconds(500)});
  hb.Reconfigure({milliseconds(200), milliseconds(3000)});
  EXPECT_EQ(hb.config().timeout, Nanos(milliseconds(3000)));
  clock.Advance(milliseconds(2999));
  EXPECT_FALSE(hb.PeerLost());
  clock.Advance(milliseconds(2));
  EXPECT_TRUE(hb.PeerLost());
  hb.Sent();
  clock.Advance(milliseconds(199));
  EXPECT_FALSE(hb.SendDue());
  clock.Advance(milliseconds(1));
  EXPECT_TRUE(hb.SendDue());
}

}  // namespace
}  // namespace remus
