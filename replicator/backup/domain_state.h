// The lifecycle of one protected domain on the backup, as one explicit state
// machine. NextState is pure (no clock, no I/O, no locks): BackupDomain calls
// it under its lock for every change, and domain_state_test.cc checks the
// whole table.
//
//   (fresh) waiting --SYNC_BEGIN--> syncing --COMMIT 0, no disks--> protected
//                                      |  \--COMMIT 0 with disks: syncing until
//                                      |     the DISK_SYNCED checkpoint commits
//   waiting/syncing/protected --link lost, silent, FAILOVER--> primary-lost
//   waiting/syncing/protected/primary-lost --GOODBYE, ERROR either way--> unprotected
//   primary-lost, unprotected, failed --a primary connects--> waiting
//   any but promoting/failed-over/ended --promote--> promoting --ok--> failed-over
//                                                        \--error--> failed (may retry)
//   failed-over --the promoted guest is gone--> ended --a primary connects--> waiting
//   restart: a fresh domain --> primary-lost (checkpoint kept, or none),
//            failed-over (a promoted guest runs), ended (it ran and is gone),
//            failed (a promotion was cut short and its guest is gone)
//
// Automatic promotion happens only from primary-lost, and only for the
// session (generation) that lost its primary; when nothing is restorable it
// ends in failed, saying why. unprotected means the primary was alive when
// protection ended (its GOODBYE or ERROR, or our ERROR): the backup never
// promotes by itself there, an operator still may. ended means the guest
// promoted here ran and stopped running here (its QEMU exited: it failed over
// or switched over to another host, or was killed): the checkpoint it was
// restored from is older than what it ran, so it is never promoted again;
// the domain may be protected to this host anew (re-protection), and its
// page store stays as the base of a delta resync.
#pragma once

#include <optional>
#include <string_view>

namespace remus {

enum class DomainState {
  kWaiting,      // a primary is connected; no initial copy of this session yet
  kSyncing,      // the initial copy (memory, or the disks' background copy) runs
  kProtected,    // a committed checkpoint of this session can be restored
  kPrimaryLost,  // the link broke or went silent without GOODBYE
  kUnprotected,  // protection ended while the primary lived (GOODBYE, ERROR)
  kPromoting,    // a promotion runs: no session may start
  kFailedOver,   // the guest runs here now
  kFailed,       // the promotion failed, or cannot be trusted after a restart
  kEnded,        // the guest promoted here ran and is gone: never promoted again
};
std::string_view DomainStateName(DomainState s);

enum class DomainEvent {
  kSessionStart,          // an authenticated primary connected
  kSyncBegin,             // SYNC_BEGIN: this session's initial copy starts
  kInitialCommit,         // COMMIT 0, disks (if any) still copying
  kProtectedNow,          // COMMIT 0 without disks, or the disks' copy committed
  kPrimaryLost,           // link closed, silent past the timeout, or FAILOVER
  kPrimaryEnded,          // GOODBYE, or an ERROR either way: the primary lives
  kPromote,               // a promotion begins
  kPromoted,              // the restored guest runs
  kPromoteFailed,         // the promotion failed
  kRecoveredCheckpoint,   // restart: a committed checkpoint was kept
  kRecoveredPromotion,    // restart: a promotion ran before and its guest lives
  kRecoveredBroken,       // restart: a promotion was cut short and its guest is gone
  kPromotedGuestGone,     // the guest promoted here exited (or runs elsewhere now)
  kRecoveredEnded,        // restart: a promotion finished before and its guest is gone
};
std::string_view DomainEventName(DomainEvent e);

// The state after `e` in state `s`, or nullopt when `e` is not allowed there.
std::optional<DomainState> NextState(DomainState s, DomainEvent e);

// Whether a session (a connected primary) is live in state s.
bool SessionState(DomainState s);

}  // namespace remus
