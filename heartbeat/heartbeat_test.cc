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

}  // namespace
}  // namespace remus
