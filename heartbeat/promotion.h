// Promotion of a backup to primary: one compare-and-swap state machine (after
// QEMU's migration/colo-failover.c), so a node can never promote twice, even
// when the heartbeat timeout, the primary's FAILOVER message and an operator's
// `remusctl failover` race.
//
//   kStandby --Begin--> kPromoting --Finish(ok)--> kPromoted (final)
//                            |--Finish(error)--> kFailed --Begin--> kPromoting
//
// Before promoting, the caller asks an Arbiter. Automatic promotion assumes
// fail-stop; a later arbiter (etcd lease) plugs in here against split brain.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <atomic>
#include <string>

#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus {

enum class PromotionState { kStandby, kPromoting, kPromoted, kFailed };
std::string_view PromotionStateName(PromotionState s);

class PromotionGate {
 public:
  // Wins the right to promote. FailedPrecondition if a promotion is under way
  // or done; the message names the first reason.
  Status Begin(const std::string& reason);
  // Ends the promotion begun by the winner of Begin.
  void Finish(const Status& result);
  PromotionState state() const { return state_.load(); }
  std::string reason() const;
  std::string error() const;

 private:
  std::atomic<PromotionState> state_{PromotionState::kStandby};
  mutable Mutex mu_;
  std::string reason_ GUARDED_BY(mu_);
  std::string error_ GUARDED_BY(mu_);
};

class Arbiter {
 public:
  virtual ~Arbiter() = default;
  // OK if this node may take over `domain` now.
  virtual Status MayPromote(const std::string& domain) = 0;
};

// Grants every promotion: correct only when failures are fail-stop (a primary
// that stops talking is dead). The documented default until arbitration lands.
class FailStopArbiter final : public Arbiter {
 public:
  Status MayPromote(const std::string&) override { return OkStatus(); }
};

}  // namespace remus
