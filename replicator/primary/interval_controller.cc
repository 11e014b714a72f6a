#include "replicator/primary/interval_controller.h"

#include <algorithm>
#include <cmath>

namespace remus {

namespace {
std::string Ms(double v) { return std::to_string(static_cast<int64_t>(std::lround(v))) + " ms"; }

double Smooth(double est, double sample) {
  if (est < 0) return sample;
  const double a = sample > est ? IntervalController::kAlphaUp : IntervalController::kAlphaDown;
  return est + a * (sample - est);
}
}  // namespace

Status ValidateIntervalOptions(const std::string& domain, const IntervalControllerOptions& o) {
  using O = IntervalControllerOptions;
  const std::string d = "domain " + domain + ": ";
  if (o.latency_budget_ms < O::kMinBudgetMs || o.latency_budget_ms > O::kMaxBudgetMs)
    return InvalidArgument(d + "--latency-budget " + std::to_string(o.latency_budget_ms) + " ms is out of range (" +
                           std::to_string(O::kMinBudgetMs) + ".." + std::to_string(O::kMaxBudgetMs) + ")");
  if (o.min_ms < 1 || o.min_ms > 600000)
    return InvalidArgument(d + "--interval-min " + std::to_string(o.min_ms) + " ms is out of range (1..600000)");
  if (o.max_ms < 1 || o.max_ms > 600000)
    return InvalidArgument(d + "--interval-max " + std::to_string(o.max_ms) + " ms is out of range (1..600000)");
  if (o.min_ms > o.max_ms)
    return InvalidArgument(d + "--interval-min " + std::to_string(o.min_ms) + " ms is above --interval-max " +
                           std::to_string(o.max_ms) + " ms");
  if (o.min_ms >= o.latency_budget_ms)
    return InvalidArgument(d + "--interval-min " + std::to_string(o.min_ms) + " ms leaves nothing of the " +
                           std::to_string(o.latency_budget_ms) +
                           " ms latency budget: the floor must be below the budget");
  if (!(o.margin >= 1.0 && o.margin <= 10.0)) return InvalidArgument(d + "the pace margin must be 1..10");
  return OkStatus();
}

IntervalController::IntervalController(IntervalControllerOptions o, int start_ms)
    : o_(o), cur_(std::clamp(start_ms, o.min_ms, o.max_ms)) {}

bool IntervalController::OnCheckpointAcked(const CheckpointSample& s) {
  const bool first = ack_est_ < 0;
  ack_est_ = Smooth(ack_est_, std::max(0.0, s.ack_ms));
  pause_est_ = Smooth(first ? -1 : pause_est_, std::max(0.0, s.pause_ms));
  bytes_est_ = Smooth(first ? -1 : bytes_est_, static_cast<double>(s.wire_bytes));
  since_change_++;

  const double lo = o_.min_ms, hi = o_.max_ms;
  const double need = o_.margin * ack_est_;                                   // keeping pace
  const double cap = o_.latency_budget_ms - ack_est_ - pause_est_;            // the budget
  double target;
  if (need <= cap || need <= lo) {
    target = need;
    bound_ = need <= lo ? Bound::kFloor : Bound::kPace;
  } else if (cap >= ack_est_) {
    target = cap;  // less headroom than the margin, but still ahead of the acks
    bound_ = Bound::kBudget;
  } else {
    target = ack_est_;  // the budget cannot be met; anything shorter piles up
    bound_ = Bound::kSaturated;
  }
  if (target > hi) bound_ = Bound::kCeiling;
  target = std::clamp(target, lo, hi);

  // The ACK came after the next checkpoint was due: checkpoints pile up.
  const bool behind = s.ack_ms > cur_;
  double next = cur_;
  if (target > cur_) {
    if (behind) target = std::max(target, cur_ * kBehindIncrease);
    target = std::min(target, hi);
    if (target >= cur_ * (1 + kMinChange) || (behind && target > cur_)) next = target;
  } else if ((target <= cur_ * (1 - kMinChange) || (target <= lo && cur_ > lo)) &&
             since_change_ >= kSettleCheckpoints) {
    // (The last step onto the floor may be small.)
    next = std::max(target, cur_ * (1 - kMaxDecrease));
  }
  const int n = std::clamp(static_cast<int>(std::lround(next)), o_.min_ms, o_.max_ms);
  if (n == cur_) return false;
  cur_ = n;
  since_change_ = 0;
  changes_++;
  return true;
}

std::string IntervalController::reason() const {
  const std::string acks = "acks take " + Ms(ack_est_);
  switch (bound_) {
    case Bound::kStarting: return "waiting for the first acked checkpoints";
    case Bound::kFloor: return "at the floor " + Ms(o_.min_ms) + ": " + acks;
    case Bound::kPace: return "keeping pace: " + acks;
    case Bound::kBudget:
      return "capped by the latency budget " + Ms(o_.latency_budget_ms) + ": replication is near saturation (the link or the backup), " + acks;
    case Bound::kSaturated:
      return "over the latency budget " + Ms(o_.latency_budget_ms) + ": replication is saturated (the link or the backup), " + acks +
             "; the interval keeps pace with them";
    case Bound::kCeiling:
      return "at the ceiling " + Ms(o_.max_ms) + ": " + acks + "; backpressure paces the guest";
  }
  return "";
}

}  // namespace remus
