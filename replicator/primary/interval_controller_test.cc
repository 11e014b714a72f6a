#include "replicator/primary/interval_controller.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <random>

namespace remus {
namespace {

using Bound = IntervalController::Bound;

// A simulated replication: checkpoints of a guest dirtying pages, a link of
// limited bandwidth (FIFO), a backup that holds each ACK ack_delay_ms, and
// the epoch loop's backpressure (at most 8 unacked). Time in ms, fake.
struct Plant {
  double bytes_per_ms = 100e3;  // 100 MB/s
  double ack_delay_ms = 2;
  double dirty_pages_per_s = 2000;
  double wss_pages = 1e9;  // distinct pages a guest can dirty
  double pause_ms = 5;
  double noise = 0;  // relative, on each ack time
  size_t max_unacked = 8;

  // Measured.
  uint64_t checkpoints = 0, stalls = 0;
  double max_stall_ms = 0;
  int min_seen = 1 << 30, max_seen = 0;

  double now = 0, link_free = 0;
  struct InFlight {
    double ack_at;
    CheckpointSample s;
  };
  std::deque<InFlight> in_flight;
  std::mt19937 rng{7};

  // Runs for `ms` of fake time with the controller choosing the interval.
  void Run(IntervalController& c, double ms) {
    const double end = now + ms;
    while (now < end) {
      const double due = now + c.interval_ms();
      Deliver(c, due);
      now = due;
      if (in_flight.size() >= max_unacked) {
        // Backpressure: the guest stays paused until the oldest ACK.
        double stall = in_flight.front().ack_at - now;
        stalls++;
        max_stall_ms = std::max(max_stall_ms, stall);
        Deliver(c, in_flight.front().ack_at);
        now += stall;
      }
      Checkpoint(c.interval_ms());
    }
  }
  void Deliver(IntervalController& c, double until) {
    while (!in_flight.empty() && in_flight.front().ack_at <= until) {
      c.OnCheckpointAcked(in_flight.front().s);
      in_flight.pop_front();
      min_seen = std::min(min_seen, c.interval_ms());
      max_seen = std::max(max_seen, c.interval_ms());
    }
  }
  void Checkpoint(int interval_ms) {
    const double pages = std::min(wss_pages, dirty_pages_per_s * interval_ms / 1000.0);
    const double bytes = pages * 4096 + 100e3;  // + device state
    const double loaded = now + pause_ms;
    const double start = std::max(loaded, link_free);
    link_free = start + bytes / bytes_per_ms;
    double ack_at = link_free + ack_delay_ms;
    if (noise > 0) ack_at += (ack_at - loaded) * std::uniform_real_distribution<double>(-noise, noise)(rng);
    in_flight.push_back({ack_at, {ack_at - loaded, static_cast<uint64_t>(bytes), pause_ms}});
    now = loaded;
    checkpoints++;
  }
  void ResetCounters() {
    checkpoints = stalls = 0;
    max_stall_ms = 0;
    min_seen = 1 << 30;
    max_seen = 0;
  }
};

IntervalControllerOptions Opts(int budget = 200, int min_ms = 20, int max_ms = 2000) {
  IntervalControllerOptions o;
  o.latency_budget_ms = budget;
  o.min_ms = min_ms;
  o.max_ms = max_ms;
  return o;
}

TEST(IntervalControllerTest, ValidatesOptionsWithClearErrors) {
  EXPECT_TRUE(ValidateIntervalOptions("web1", Opts()).ok());
  Status s = ValidateIntervalOptions("web1", Opts(5));
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message(), "domain web1: --latency-budget 5 ms is out of range (10..600000)");
  s = ValidateIntervalOptions("web1", Opts(200, 300, 2000));
  EXPECT_EQ(s.message(),
            "domain web1: --interval-min 300 ms leaves nothing of the 200 ms latency budget: the floor must be below "
            "the budget");
  s = ValidateIntervalOptions("web1", Opts(200, 50, 40));
  EXPECT_EQ(s.message(), "domain web1: --interval-min 50 ms is above --interval-max 40 ms");
  EXPECT_EQ(ValidateIntervalOptions("web1", Opts(200, 0, 40)).message(),
            "domain web1: --interval-min 0 ms is out of range (1..600000)");
  EXPECT_EQ(ValidateIntervalOptions("web1", Opts(200, 20, 700000)).message(),
            "domain web1: --interval-max 700000 ms is out of range (1..600000)");
}

TEST(IntervalControllerTest, StartsWithoutSamplesAndClampsTheStart) {
  IntervalController c(Opts(200, 20, 500), 5);
  EXPECT_EQ(c.interval_ms(), 20);
  EXPECT_EQ(c.bound(), Bound::kStarting);
  EXPECT_EQ(c.reason(), "waiting for the first acked checkpoints");
  EXPECT_EQ(IntervalController(Opts(200, 20, 500), 900).interval_ms(), 500);
}

TEST(IntervalControllerTest, FastLinkSettlesAtTheFloor) {
  Plant p;  // 100 MB/s, 2000 pages/s: acks take a few ms
  IntervalController c(Opts(), 100);
  p.Run(c, 10000);
  EXPECT_EQ(c.interval_ms(), 20);
  EXPECT_EQ(c.bound(), Bound::kFloor);
  EXPECT_EQ(c.reason().rfind("at the floor 20 ms: acks take ", 0), 0u) << c.reason();
  EXPECT_EQ(p.stalls, 0u);
}

TEST(IntervalControllerTest, SlowAcksRaiseTheIntervalToKeepPaceAndARecoveryLowersIt) {
  Plant p;
  IntervalController c(Opts(1000), 20);
  p.Run(c, 5000);
  ASSERT_EQ(c.interval_ms(), 20);
  // The backup (or the link) slows: each ACK takes 150 ms more.
  p.ack_delay_ms = 150;
  p.ResetCounters();
  p.Run(c, 3000);
  EXPECT_EQ(c.bound(), Bound::kPace) << c.reason();
  EXPECT_GE(c.interval_ms(), 150 * 1.4);
  EXPECT_LE(c.interval_ms(), 150 * 2.2);
  EXPECT_EQ(c.reason().rfind("keeping pace: acks take 1", 0), 0u) << c.reason();
  EXPECT_GE(c.ack_estimate_ms(), 150);
  EXPECT_LE(c.ack_estimate_ms(), 200);
  // A fixed 20 ms interval would have 8 unacked checkpoints and stall on
  // every one; the controller reacts before the pile reaches the bound.
  EXPECT_EQ(p.stalls, 0u);
  // Recovered: back down to the floor, gradually.
  p.ack_delay_ms = 2;
  p.ResetCounters();
  p.Run(c, 1000);
  EXPECT_GT(c.interval_ms(), 20);  // no jump: it waits and steps down
  p.Run(c, 10000);
  EXPECT_EQ(c.interval_ms(), 20);
  EXPECT_EQ(p.stalls, 0u);
}

TEST(IntervalControllerTest, AFixedShortIntervalStallsWhereAutoDoesNot) {
  // The comparison the e2e test makes, in the model: same slow backup.
  // 8 unacked checkpoints of 20 ms + 5 ms pause cover 200 ms: with ACKs
  // that take 300 ms a fixed 20 ms interval stalls about 100 ms every 8
  // checkpoints.
  Plant fixed;
  fixed.ack_delay_ms = 300;
  IntervalControllerOptions pinned = Opts(1000, 20, 20);  // min == max: fixed 20 ms
  IntervalController f(pinned, 20);
  fixed.Run(f, 5000);
  EXPECT_GE(fixed.stalls, 10u);
  EXPECT_GT(fixed.max_stall_ms, 50);
  Plant a;
  a.ack_delay_ms = 300;
  IntervalController c(Opts(1000), 20);
  a.Run(c, 5000);
  EXPECT_LE(a.stalls, 2u);
}

TEST(IntervalControllerTest, StepInDirtyRateRaisesThenLowersTheInterval) {
  Plant p;
  p.bytes_per_ms = 20e3;  // 20 MB/s
  IntervalController c(Opts(1000), 20);
  p.Run(c, 5000);
  const int calm = c.interval_ms();
  EXPECT_LE(calm, 40);
  // The guest dirties 4000 pages/s (16 MB/s): each checkpoint takes 80% of
  // its interval on the link, plus the device state.
  p.dirty_pages_per_s = 4000;
  p.wss_pages = 1000;  // but at most 1000 distinct pages (a hot working set)
  p.ResetCounters();
  p.Run(c, 20000);
  const int busy = c.interval_ms();
  EXPECT_GT(busy, 2 * calm);
  EXPECT_EQ(c.bound(), Bound::kPace) << c.reason();
  EXPECT_LE(p.stalls, 3u);
  p.dirty_pages_per_s = 200;
  p.ResetCounters();
  p.Run(c, 20000);
  EXPECT_LT(c.interval_ms(), busy / 2);
  EXPECT_EQ(p.stalls, 0u);
}

TEST(IntervalControllerTest, TheBudgetCapsTheIntervalNearSaturation) {
  IntervalController c(Opts(200), 20);
  // Acks of 90 ms, pauses of 10 ms: keeping pace wants 135 ms, the budget
  // allows 200 - 90 - 10 = 100 ms, which is still above the ack time.
  for (int i = 0; i < 40; i++) c.OnCheckpointAcked({90, 1 << 20, 10});
  EXPECT_EQ(c.bound(), Bound::kBudget);
  EXPECT_EQ(c.interval_ms(), 100);
  EXPECT_TRUE(c.saturated());
  EXPECT_EQ(c.reason(), "capped by the latency budget 200 ms: replication is near saturation (the link or the backup), "
            "acks take 90 ms");
}

TEST(IntervalControllerTest, SaturatedLinkFollowsTheAckTimeAndSaysSo) {
  IntervalController c(Opts(200), 20);
  for (int i = 0; i < 40; i++) c.OnCheckpointAcked({300, 8 << 20, 10});
  EXPECT_EQ(c.bound(), Bound::kSaturated);
  EXPECT_EQ(c.interval_ms(), 300);
  EXPECT_EQ(c.reason(),
            "over the latency budget 200 ms: replication is saturated (the link or the backup), acks take 300 ms; "
            "the interval keeps pace with them");
  // In the model: a link that cannot carry the dirty rate at short
  // intervals. The interval stays within the bounds, and once it settled a
  // stall lasts less than one interval.
  Plant p;
  p.bytes_per_ms = 5e3;  // 5 MB/s
  p.dirty_pages_per_s = 5000;
  p.wss_pages = 300;  // 1.2 MB at most per checkpoint: ~250 ms on the link
  IntervalController d(Opts(200), 20);
  p.Run(d, 20000);
  p.ResetCounters();
  p.Run(d, 20000);
  EXPECT_EQ(d.bound(), Bound::kSaturated) << d.reason();
  EXPECT_GE(d.interval_ms(), 240);
  EXPECT_LE(d.interval_ms(), 2000);
  EXPECT_EQ(p.stalls, 0u);
}

TEST(IntervalControllerTest, AtTheCeilingBackpressurePaces) {
  IntervalController c(Opts(200, 20, 500), 20);
  for (int i = 0; i < 40; i++) c.OnCheckpointAcked({900, 8 << 20, 10});
  EXPECT_EQ(c.interval_ms(), 500);
  EXPECT_EQ(c.bound(), Bound::kCeiling);
  EXPECT_EQ(c.reason(), "at the ceiling 500 ms: acks take 900 ms; backpressure paces the guest");
}

TEST(IntervalControllerTest, BoundsHoldWhateverTheSamples) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> ack(0, 5000), pause(0, 500);
  IntervalController c(Opts(300, 25, 700), 100);
  for (int i = 0; i < 5000; i++) {
    c.OnCheckpointAcked({ack(rng), 1000, pause(rng)});
    ASSERT_GE(c.interval_ms(), 25);
    ASSERT_LE(c.interval_ms(), 700);
  }
}

TEST(IntervalControllerTest, SteadyLoadSettlesAndStays) {
  Plant p;
  p.ack_delay_ms = 60;
  IntervalController c(Opts(1000), 20);
  p.Run(c, 10000);
  const uint64_t before = c.changes();
  const int settled = c.interval_ms();
  p.ResetCounters();
  p.Run(c, 60000);
  EXPECT_EQ(c.changes(), before);
  EXPECT_EQ(c.interval_ms(), settled);
  EXPECT_NEAR(settled, 1.5 * 65, 10);
}

TEST(IntervalControllerTest, SteadyNoisyLoadDoesNotOscillate) {
  Plant p;
  p.ack_delay_ms = 60;
  p.noise = 0.2;  // +-20% on every ack time
  IntervalController c(Opts(1000), 20);
  p.Run(c, 10000);
  const uint64_t before = c.changes();
  p.ResetCounters();
  p.Run(c, 60000);
  // A slow drift within the noise, not a swing: under one change per 50
  // checkpoints, and every interval within 20% of the middle.
  EXPECT_LE((c.changes() - before) * 50, p.checkpoints) << "settled at " << c.interval_ms();
  EXPECT_GE(p.min_seen, 90);
  EXPECT_LE(p.max_seen, 140);
  EXPECT_EQ(p.stalls, 0u);
}

TEST(IntervalControllerTest, ChangesAreRateLimited) {
  IntervalController c(Opts(1000), 100);
  // Acks that would want 96..105 ms: within 10% of 100 ms, no change.
  for (int i = 0; i < 50; i++) EXPECT_FALSE(c.OnCheckpointAcked({64.0 + (i % 5), 1000, 0}));
  EXPECT_EQ(c.changes(), 0u);
  // A fall waits kSettleCheckpoints after a change and steps at most 20%.
  IntervalController d(Opts(1000), 500);
  int changes = 0;
  for (int i = 0; i < 8; i++) changes += d.OnCheckpointAcked({1, 1000, 0});
  EXPECT_EQ(changes, 2);
  EXPECT_EQ(d.interval_ms(), 320);  // 500 -> 400 -> 320
}

}  // namespace
}  // namespace remus
