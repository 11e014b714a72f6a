#include "heartbeat/promotion.h"

#include "common/thread_annotations.h"

namespace remus {

std::string_view PromotionStateName(PromotionState s) {
  switch (s) {
    case PromotionState::kStandby: return "standby";
    case PromotionState::kPromoting: return "promoting";
    case PromotionState::kPromoted: return "promoted";
    case PromotionState::kFailed: return "promotion-failed";
  }
  return "unknown";
}

Status PromotionGate::Begin(const std::string& reason) {
  for (PromotionState from : {PromotionState::kStandby, PromotionState::kFailed}) {
    PromotionState expected = from;
    if (state_.compare_exchange_strong(expected, PromotionState::kPromoting)) {
      MutexLock g(mu_);
      reason_ = reason;
      error_.clear();
      return OkStatus();
    }
  }
  MutexLock g(mu_);
  return FailedPrecondition(std::string("already ") + std::string(PromotionStateName(state_.load())) +
                            " (" + reason_ + ")");
}

void PromotionGate::Finish(const Status& result) {
  {
    MutexLock g(mu_);
    error_ = result.ok() ? "" : result.ToString();
  }
  PromotionState expected = PromotionState::kPromoting;
  state_.compare_exchange_strong(expected, result.ok() ? PromotionState::kPromoted : PromotionState::kFailed);
}

std::string PromotionGate::reason() const {
  MutexLock g(mu_);
  return reason_;
}

std::string PromotionGate::error() const {
  MutexLock g(mu_);
  return error_;
}

}  // namespace remus
