#include "replicator/backup/domain_state.h"

namespace remus {

std::string_view DomainStateName(DomainState s) {
  switch (s) {
    case DomainState::kWaiting: return "waiting";
    case DomainState::kSyncing: return "syncing";
    case DomainState::kProtected: return "protected";
    case DomainState::kPrimaryLost: return "primary-lost";
    case DomainState::kUnprotected: return "unprotected";
    case DomainState::kPromoting: return "promoting";
    case DomainState::kFailedOver: return "failed-over";
    case DomainState::kFailed: return "failed";
    case DomainState::kEnded: return "ended";
  }
  return "unknown";
}

std::string_view DomainEventName(DomainEvent e) {
  switch (e) {
    case DomainEvent::kSessionStart: return "session-start";
    case DomainEvent::kSyncBegin: return "sync-begin";
    case DomainEvent::kInitialCommit: return "initial-commit";
    case DomainEvent::kProtectedNow: return "protected";
    case DomainEvent::kPrimaryLost: return "primary-lost";
    case DomainEvent::kPrimaryEnded: return "primary-ended";
    case DomainEvent::kPromote: return "promote";
    case DomainEvent::kPromoted: return "promoted";
    case DomainEvent::kPromoteFailed: return "promote-failed";
    case DomainEvent::kRecoveredCheckpoint: return "recovered-checkpoint";
    case DomainEvent::kRecoveredPromotion: return "recovered-promotion";
    case DomainEvent::kRecoveredBroken: return "recovered-broken";
    case DomainEvent::kPromotedGuestGone: return "promoted-guest-gone";
    case DomainEvent::kRecoveredEnded: return "recovered-ended";
  }
  return "unknown";
}

bool SessionState(DomainState s) {
  return s == DomainState::kWaiting || s == DomainState::kSyncing || s == DomainState::kProtected;
}

std::optional<DomainState> NextState(DomainState s, DomainEvent e) {
  using S = DomainState;
  using E = DomainEvent;
  switch (e) {
    case E::kSessionStart:
      // Not while another session is live, nor once a promotion began.
      if (s == S::kPrimaryLost || s == S::kUnprotected || s == S::kFailed || s == S::kWaiting || s == S::kEnded)
        return S::kWaiting;
      return std::nullopt;
    case E::kSyncBegin:
      if (s == S::kWaiting) return S::kSyncing;
      return std::nullopt;
    case E::kInitialCommit:
      if (s == S::kSyncing) return S::kSyncing;
      return std::nullopt;
    case E::kProtectedNow:
      if (s == S::kSyncing || s == S::kProtected) return S::kProtected;
      return std::nullopt;
    case E::kPrimaryLost:
      if (SessionState(s) || s == S::kPrimaryLost) return S::kPrimaryLost;
      return std::nullopt;
    case E::kPrimaryEnded:
      if (SessionState(s) || s == S::kPrimaryLost || s == S::kUnprotected) return S::kUnprotected;
      return std::nullopt;
    case E::kPromote:
      // An operator may promote over a live session (it is ended first).
      if (s == S::kPromoting || s == S::kFailedOver || s == S::kEnded) return std::nullopt;
      return S::kPromoting;
    case E::kPromoted:
      if (s == S::kPromoting) return S::kFailedOver;
      return std::nullopt;
    case E::kPromoteFailed:
      if (s == S::kPromoting) return S::kFailed;
      return std::nullopt;
    case E::kRecoveredCheckpoint:
      if (s == S::kWaiting) return S::kPrimaryLost;
      return std::nullopt;
    case E::kRecoveredPromotion:
      if (s == S::kWaiting) return S::kFailedOver;
      return std::nullopt;
    case E::kRecoveredBroken:
      if (s == S::kWaiting) return S::kFailed;
      return std::nullopt;
    case E::kPromotedGuestGone:
      if (s == S::kFailedOver) return S::kEnded;
      return std::nullopt;
    case E::kRecoveredEnded:
      if (s == S::kWaiting) return S::kEnded;
      return std::nullopt;
  }
  return std::nullopt;
}

}  // namespace remus
