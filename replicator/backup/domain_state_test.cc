#include "replicator/backup/domain_state.h"

#include <gtest/gtest.h>

#include <vector>

namespace remus {
namespace {

using S = DomainState;
using E = DomainEvent;

const std::vector<S> kAll = {S::kWaiting,     S::kSyncing,   S::kProtected,  S::kPrimaryLost,
                             S::kUnprotected, S::kPromoting, S::kFailedOver, S::kFailed,
                             S::kEnded};

TEST(DomainState, ASessionRunsWaitingSyncingProtected) {
  EXPECT_EQ(NextState(S::kWaiting, E::kSyncBegin), S::kSyncing);
  EXPECT_EQ(NextState(S::kSyncing, E::kInitialCommit), S::kSyncing);  // disks still copying
  EXPECT_EQ(NextState(S::kSyncing, E::kProtectedNow), S::kProtected);
  EXPECT_EQ(NextState(S::kProtected, E::kProtectedNow), S::kProtected);
  EXPECT_EQ(NextState(S::kWaiting, E::kProtectedNow), std::nullopt);
  EXPECT_EQ(NextState(S::kProtected, E::kSyncBegin), std::nullopt);  // once per session
}

TEST(DomainState, OnlyOneSessionAndNoneOncePromoting) {
  for (S s : {S::kPrimaryLost, S::kUnprotected, S::kFailed, S::kWaiting, S::kEnded})
    EXPECT_EQ(NextState(s, E::kSessionStart), S::kWaiting) << DomainStateName(s);
  for (S s : {S::kSyncing, S::kProtected, S::kPromoting, S::kFailedOver})
    EXPECT_EQ(NextState(s, E::kSessionStart), std::nullopt) << DomainStateName(s);
}

TEST(DomainState, APrimaryThatLivesLeavesUnprotected) {
  for (S s : {S::kWaiting, S::kSyncing, S::kProtected, S::kPrimaryLost})
    EXPECT_EQ(NextState(s, E::kPrimaryEnded), S::kUnprotected) << DomainStateName(s);
  for (S s : {S::kPromoting, S::kFailedOver, S::kFailed})
    EXPECT_EQ(NextState(s, E::kPrimaryEnded), std::nullopt) << DomainStateName(s);
}

TEST(DomainState, LostOnlyFromALiveSession) {
  for (S s : {S::kWaiting, S::kSyncing, S::kProtected, S::kPrimaryLost})
    EXPECT_EQ(NextState(s, E::kPrimaryLost), S::kPrimaryLost) << DomainStateName(s);
  // An unprotected domain cannot become primary-lost: nothing would turn it
  // back into an automatic promotion.
  for (S s : {S::kUnprotected, S::kPromoting, S::kFailedOver, S::kFailed})
    EXPECT_EQ(NextState(s, E::kPrimaryLost), std::nullopt) << DomainStateName(s);
}

TEST(DomainState, PromotesOnceAndRetriesAfterAFailure) {
  for (S s : kAll) {
    auto n = NextState(s, E::kPromote);
    if (s == S::kPromoting || s == S::kFailedOver || s == S::kEnded) EXPECT_EQ(n, std::nullopt) << DomainStateName(s);
    else EXPECT_EQ(n, S::kPromoting) << DomainStateName(s);
  }
  EXPECT_EQ(NextState(S::kPromoting, E::kPromoted), S::kFailedOver);
  EXPECT_EQ(NextState(S::kPromoting, E::kPromoteFailed), S::kFailed);
  EXPECT_EQ(NextState(S::kFailed, E::kPromote), S::kPromoting);
  for (S s : kAll) {
    if (s == S::kPromoting) continue;
    EXPECT_EQ(NextState(s, E::kPromoted), std::nullopt) << DomainStateName(s);
    EXPECT_EQ(NextState(s, E::kPromoteFailed), std::nullopt) << DomainStateName(s);
  }
}

// A promoted guest that runs here holds the domain: no session, no second
// promotion. Only its end lets a new session in (re-protection to this host),
// and the checkpoint it ran from is never promoted again.
TEST(DomainState, FailedOverEndsOnlyWhenItsGuestIsGone) {
  const std::vector<E> all = {E::kSessionStart,       E::kSyncBegin,         E::kInitialCommit,
                              E::kProtectedNow,       E::kPrimaryLost,       E::kPrimaryEnded,
                              E::kPromote,            E::kPromoted,          E::kPromoteFailed,
                              E::kRecoveredCheckpoint, E::kRecoveredPromotion, E::kRecoveredBroken,
                              E::kPromotedGuestGone,  E::kRecoveredEnded};
  for (E e : all) {
    if (e == E::kPromotedGuestGone) continue;
    EXPECT_EQ(NextState(S::kFailedOver, e), std::nullopt) << DomainEventName(e);
  }
  EXPECT_EQ(NextState(S::kFailedOver, E::kPromotedGuestGone), S::kEnded);
  for (S s : kAll)
    if (s != S::kFailedOver) EXPECT_EQ(NextState(s, E::kPromotedGuestGone), std::nullopt) << DomainStateName(s);
  for (E e : all) {
    auto n = NextState(S::kEnded, e);
    if (e == E::kSessionStart) EXPECT_EQ(n, S::kWaiting);
    else EXPECT_EQ(n, std::nullopt) << DomainEventName(e);
  }
}

TEST(DomainState, RecoveryStartsFromAFreshDomain) {
  EXPECT_EQ(NextState(S::kWaiting, E::kRecoveredCheckpoint), S::kPrimaryLost);
  EXPECT_EQ(NextState(S::kWaiting, E::kRecoveredPromotion), S::kFailedOver);
  EXPECT_EQ(NextState(S::kWaiting, E::kRecoveredBroken), S::kFailed);
  EXPECT_EQ(NextState(S::kWaiting, E::kRecoveredEnded), S::kEnded);
  EXPECT_EQ(NextState(S::kFailedOver, E::kRecoveredEnded), std::nullopt);
  EXPECT_EQ(NextState(S::kProtected, E::kRecoveredCheckpoint), std::nullopt);
}

TEST(DomainState, NamesAreStatusStrings) {
  EXPECT_EQ(DomainStateName(S::kProtected), "protected");
  EXPECT_EQ(DomainStateName(S::kPrimaryLost), "primary-lost");
  EXPECT_EQ(DomainStateName(S::kFailedOver), "failed-over");
  EXPECT_TRUE(SessionState(S::kSyncing));
  EXPECT_FALSE(SessionState(S::kPrimaryLost));
}

}  // namespace
}  // namespace remus
