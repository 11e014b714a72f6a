#include "heartbeat/promotion.h"

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
      std::lock_guard<std::mutex> g(mu_);
      reason_ = reason;
      error_.clear();
      return OkStatus();
    }
  }
  std::lock_guard<std::mutex> g(mu_);
  return FailedPrecondition(std::string("already ") + std::string(PromotionStateName(state_.load())) +
                            " (" + reason_ + ")");
}

void PromotionGate::Finish(const Status& result) {
  {
    std::lock_guard<std::mutex> g(mu_);
    error_ = result.ok() ? "" : result.ToString();
  }
  PromotionState expected = PromotionState::kPromoting;
  state_.compare_exchange_strong(expected, result.ok() ? PromotionState::kPromoted : PromotionState::kFailed);
}

std::string PromotionGate::reason() const {
  std::lock_guard<std::mutex> g(mu_);
  return reason_;
}

std::string PromotionGate::error() const {
  std::lock_guard<std::mutex> g(mu_);
  return error_;
}

}  // namespace remus
