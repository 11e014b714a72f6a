// The automatic checkpoint interval (`remusctl protect --interval auto`):
// chooses the next interval from what the last checkpoints measured.
//
// Two bounds. Keeping pace bounds the interval from below: a checkpoint's
// ACK should come before the next checkpoint is due, or unacked checkpoints
// pile up until backpressure (max_unacked_epochs) holds the guest paused;
// so interval >= margin x ack time. The latency budget bounds it from above:
// with output commit a packet waits for the end of its epoch, the pause and
// the ACK, so the worst output latency is interval + pause + ack time, and
// interval <= budget - ack - pause. Between the two the shortest interval
// wins (smaller checkpoints, less work lost on a failover, lower latency);
// everything is clamped to [min_ms, max_ms].
//
// When the bounds cross (the link or the backup's apply rate is near its
// limit), the budget wins only as far as it can: the interval drops the
// margin and goes down to the budget's bound, but never below the ack time
// itself: shorter, checkpoints pile up and backpressure stalls the guest,
// which lengthens output latency instead of shortening it. If the ack time
// alone exceeds the budget, the interval follows the ack time (up to
// max_ms) and the reason says the budget cannot be met. If acks take longer
// than max_ms, backpressure paces the guest (status backpressure_waits).
//
// Movement: the ack and pause times are smoothed (an EWMA that follows a
// rise fast and a fall slowly). An increase is applied at once, at least
// x1.5 when the last ACK came after the next checkpoint was due (behind); a
// decrease waits kSettleCheckpoints acked checkpoints after the last change
// and goes at most 20% per step. Changes under 10% are not made (QMP calls
// are not free, and QEMU takes a checkpoint whenever the interval is set),
// which also keeps a steady load from oscillating.
//
// Thread-safety: none; the caller serializes (PrimaryLifecycle holds its lock).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/status.h"

namespace remus {

struct IntervalControllerOptions {
  int latency_budget_ms = 200;
  int min_ms = 20;    // the floor
  int max_ms = 2000;  // the ceiling
  // Keeping pace: the interval is at least this times the ack time.
  double margin = 1.5;

  // The bounds operators may give (docs/operator-guide.md).
  static constexpr int kDefaultBudgetMs = 200;
  static constexpr int kMinBudgetMs = 10, kMaxBudgetMs = 600000;
  static constexpr int kDefaultMinMs = 20, kDefaultMaxMs = 2000;
};

// InvalidArgument with one sentence naming the bad option (--latency-budget,
// --interval-min, --interval-max) and its range, for `domain`.
Status ValidateIntervalOptions(const std::string& domain, const IntervalControllerOptions& o);

// What one acked checkpoint measured.
struct CheckpointSample {
  double ack_ms = 0;        // LOADED sent -> its ACK received
  uint64_t wire_bytes = 0;  // the checkpoint's bytes (pages, device state, disk writes)
  double pause_ms = 0;      // the guest's pause for it (0: unknown)
};

class IntervalController {
 public:
  enum class Bound {
    kStarting,   // no sample yet
    kFloor,      // at min_ms: the link keeps up with anything shorter
    kPace,       // margin x ack time
    kBudget,     // capped by the latency budget, above the ack time
    kSaturated,  // the ack time alone is over the budget: follows the ack time
    kCeiling,    // at max_ms and the acks need more
  };
  static constexpr int kSettleCheckpoints = 4;
  static constexpr double kMinChange = 0.10;     // relative
  static constexpr double kMaxDecrease = 0.20;   // relative, per step
  static constexpr double kBehindIncrease = 1.5;  // at least, when behind
  static constexpr double kAlphaUp = 0.25, kAlphaDown = 0.1;

  // REQUIRES: ValidateIntervalOptions(o) is OK. start_ms: the interval in
  // effect now (clamped into the bounds: the first decision may move it).
  IntervalController(IntervalControllerOptions o, int start_ms);

  // Feeds one acked checkpoint; returns true when the interval should
  // change to interval_ms() (the caller applies it, then the next samples
  // measure it).
  bool OnCheckpointAcked(const CheckpointSample& s);

  int interval_ms() const { return cur_; }
  // The interval in effect is ms after all (the caller could not apply a
  // change): the next samples move it from there.
  void SetCurrent(int ms) { cur_ = std::clamp(ms, o_.min_ms, o_.max_ms); }
  Bound bound() const { return bound_; }
  // A short sentence for status: why the interval is what it is.
  std::string reason() const;
  // The smoothed ack time (ms), -1 before any sample.
  double ack_estimate_ms() const { return ack_est_; }
  // The smoothed bytes per checkpoint.
  double bytes_estimate() const { return bytes_est_; }
  // The bounds crossed: the budget cannot be kept with headroom.
  bool saturated() const { return bound_ == Bound::kBudget || bound_ == Bound::kSaturated || bound_ == Bound::kCeiling; }
  uint64_t changes() const { return changes_; }
  const IntervalControllerOptions& options() const { return o_; }

 private:
  const IntervalControllerOptions o_;
  int cur_;
  Bound bound_ = Bound::kStarting;
  double ack_est_ = -1, pause_est_ = 0, bytes_est_ = 0;
  int since_change_ = 0;
  uint64_t changes_ = 0;
};

}  // namespace remus
