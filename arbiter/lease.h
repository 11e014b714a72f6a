// A host's ownership of one protected domain, held in etcd through a lease,
// and the fencing that goes with it (docs/architecture.md, "Arbitration";
// ../shared/design/failover-safety.md).
//
// Keys (prefix P, domain D):
//   P/domains/D/owner    attached to the owner's lease; value: OwnerRecord
//                        (host, remusd instance, session) as JSON
//   P/domains/D/session  no lease; "S" while session S is protected (its
//                        checkpoint may be promoted), "retired:S" once the
//                        primary ended S on its own (its guest runs on
//                        unprotected: S must never be promoted), "promoted:S"
//                        once a backup won S
//
// The one rule: a copy of the guest runs only while its host holds the owner
// key through a live lease, or has retired the session in etcd. A backup
// takes the key only with one transaction "owner absent and session == S";
// so while the primary holds the key, or once it retired S, no backup can.
//
//   acquiring --Acquire--> held --deadline passes--> fenced (guest paused)
//                           ^                           | renewed, key still ours: resume
//                           +---------------------------+
//                                                       | another host owns it, or S is gone:
//                                                       v
//                                                     lost (guest destroyed, final)
//   held/fenced --Retire (session retired, key deleted)--> released (final)
//   held/fenced --Abandon (QEMU is dead: revoke at once)--> released (final)
//
// Local deadline: the send time of the last keep-alive that succeeded + TTL -
// margin, on CLOCK_BOOTTIME. etcd deletes the key no earlier than TTL after
// it received that keep-alive, which is after we sent it; so our copy is
// paused before a backup can win, as long as the margin covers the clocks'
// rate difference and the time to pause (docs/architecture.md has the numbers).
//
// Threads: a renewer (etcd I/O every TTL/3, and the retries after a fence)
// and a watchdog that does nothing but pause the guest at the deadline: a
// keep-alive stuck in a slow etcd call must not delay the fence. Tests drive
// the steps (RenewOnce, CheckDeadline) directly without starting threads.
//
// Thread-safety: public methods are thread-safe.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "arbiter/etcd.h"
#include "arbiter/fence_table.h"
#include "common/clock.h"
#include "common/stats.h"
#include "common/thread_annotations.h"

namespace remus {

struct ArbiterOptions {
  std::string prefix = "/remus";
  std::string host;      // this host's id in owner records (hostname by default)
  std::string instance;  // this remusd's instance (random per start)
  Nanos ttl = std::chrono::seconds(5);
  Nanos margin = std::chrono::seconds(1);
  // Keep-alive period; zero: ttl / 3.
  Nanos renew_every{0};
  Nanos renew_period() const { return renew_every.count() > 0 ? renew_every : ttl / 3; }
  // The TTL etcd grants leases in: whole seconds, rounded up.
  int64_t ttl_seconds() const;
};

std::string OwnerKey(const ArbiterOptions& o, const std::string& domain);
std::string SessionKey(const ArbiterOptions& o, const std::string& domain);

struct OwnerRecord {
  std::string host, instance, session;
  std::string Encode() const;
  // Tolerant: a value that is not ours decodes to an empty record.
  static OwnerRecord Decode(const std::string& value);
};

// What a lost or fenced copy is done with. Pause and Resume freeze and thaw
// the guest (SIGSTOP/SIGCONT of its QEMU: immediate, whatever QEMU is doing,
// unlike QMP `stop`, which waits for QEMU's main loop); Destroy ends it for
// good (SIGKILL, or virDomainDestroy under libvirt). A fencer with no guest
// yet (a backup between winning and starting QEMU) does nothing.
class Fencer {
 public:
  virtual ~Fencer() = default;
  virtual Status Pause() = 0;
  virtual Status Resume() = 0;
  virtual Status Destroy() = 0;
};

// Fences a process by pid (set once it is known).
class PidFencer final : public Fencer {
 public:
  explicit PidFencer(int pid = -1) : pid_(pid) {}
  void set_pid(int pid) { pid_ = pid; }
  // Run instead of SIGKILL by Destroy when set (libvirt: virDomainDestroy).
  void set_destroy(std::function<Status()> f);
  Status Pause() override;
  Status Resume() override;
  Status Destroy() override;

 private:
  Status Signal(int sig, const char* what);
  std::atomic<int> pid_;
  Mutex mu_;
  std::function<Status()> destroy_ GUARDED_BY(mu_);
};

enum class LeaseState { kAcquiring, kHeld, kFenced, kLost, kReleased };
std::string_view LeaseStateName(LeaseState s);

class DomainLease {
 public:
  // kv, clock and fencer outlive this object.
  DomainLease(ArbiterOptions opts, std::string domain, etcd::Kv* kv, const Clock& clock, Fencer* fencer);
  ~DomainLease();  // stops the threads; the lease is left to etcd (see Retire/Abandon)
  DomainLease(const DomainLease&) = delete;
  DomainLease& operator=(const DomainLease&) = delete;

  // acquiring -> held, for protection session `session` (a primary starting
  // protection): the owner key must be absent or this host's own (a remusd
  // of this host that restarted). FailedPrecondition naming the owner when
  // another host holds it; Unavailable when etcd cannot be reached.
  Status Acquire(const std::string& session);
  // acquiring -> held with a lease and token won elsewhere (a backup's
  // promotion transaction: EtcdArbiter). session_value: what the session
  // key says while this copy may run ("promoted:S" for a promoted backup;
  // empty: the session itself).
  void Adopt(const std::string& session, int64_t lease, TimePoint sent, int64_t token,
             const std::string& session_value = "");
  // Starts the renewer and the watchdog. Once, after Acquire or Adopt.
  void Start();
  // Hands the deadline to the fence watchdog process too (remus-fence:
  // arbiter/fence_table.h), for the copy `pid`, so it is stopped at the
  // deadline even when this process is frozen. The slot stays armed when
  // this object goes without releasing: the watchdog outlives remusd.
  // Deadlines are read as CLOCK_BOOTTIME nanoseconds (the clock must be
  // BootClock). False when the table is full.
  bool AttachFence(FenceTable* table, int pid, uint64_t pid_start) EXCLUDES(mu_);
  // Frees the watchdog slot without touching etcd: the copy is no longer
  // fenced once this process is gone (a promoted backup's remusd stopping
  // on purpose: no other host can take a promoted session, and a guest
  // stopped by a watchdog nobody resumes would be down for good).
  void DetachFence() EXCLUDES(mu_);

  // Whether this host may let its copy's effects out now (release held
  // output): held, and before the local deadline.
  bool Valid() const;
  // held/fenced -> released: the session is retired in etcd (no backup can
  // promote it any more), then the key is deleted and the lease revoked. On
  // Unavailable the lease stays held (renewed, fenced at its deadline) and
  // the renewer retries in the background until it succeeds.
  Status Retire(const std::string& why);
  // held/fenced -> released: QEMU is dead; revoke the lease so a backup wins
  // at once instead of after the TTL. Best effort: the lease expires anyway.
  void Abandon();
  // held/fenced -> released without touching the owner key: the key moved to
  // another lease of this host (a promoted copy that this host now protects
  // again: its protection session's lease owns the domain from here on). The
  // old lease is revoked (it no longer holds the key) and its fence slot freed.
  void HandOver(const std::string& to_session) EXCLUDES(mu_);

  // One keep-alive round (renewer thread; tests).
  void RenewOnce() EXCLUDES(mu_);
  // Pauses the guest if the deadline has passed (watchdog thread; tests).
  void CheckDeadline() EXCLUDES(mu_);

  LeaseState state() const { return state_.load(); }
  int64_t token() const { return token_.load(); }
  // status --json "arbiter" object: state, owner, token, ttl_left_ms, ...
  nlohmann::json StatusJson() const EXCLUDES(mu_);
  // Metrics.
  uint64_t renewals() const { return renewals_.load(); }
  uint64_t renewal_failures() const { return renewal_failures_.load(); }
  uint64_t fence_events() const { return fence_events_.load(); }
  const Histogram& renewal_latency() const { return renew_hist_; }

 private:
  void RenewerLoop() EXCLUDES(mu_);
  void WatchdogLoop() EXCLUDES(mu_);
  // Fenced and the lease is gone: take the key back if no one else did and
  // the session is still ours; otherwise destroy the copy.
  void Resolve() EXCLUDES(mu_);
  void Lose(const std::string& winner, int64_t token, const std::string& why) EXCLUDES(mu_);
  Status TryRetire() EXCLUDES(mu_);
  // held/fenced -> released in this process (no renewals, fence slot freed);
  // the lease to revoke, or nullopt when it had ended already.
  std::optional<int64_t> EndHere() EXCLUDES(mu_);
  // deadline_ changed: tell the fence table.
  void PublishDeadline() REQUIRES(mu_);
  // The copy may run again (renewed, retaken): table re-armed, then SIGCONT.
  void ResumeLocked(const char* why) REQUIRES(mu_);
  void FreeFence() REQUIRES(mu_);
  std::string Tag() const { return "arbiter[" + domain_ + "]"; }

  const ArbiterOptions opts_;
  const std::string domain_;
  const std::string owner_key_, session_key_;
  etcd::Kv* const kv_;
  const Clock& clock_;
  Fencer* const fencer_;

  std::atomic<LeaseState> state_{LeaseState::kAcquiring};
  std::atomic<int64_t> token_{0};
  std::atomic<uint64_t> renewals_{0}, renewal_failures_{0}, fence_events_{0};
  // The last fence: how long after the send of the last successful renewal
  // the guest was paused (the bound is ttl - margin), -1 before any.
  std::atomic<int64_t> last_fence_after_renewal_ms_{-1};
  Histogram renew_hist_{Histogram::LatencySeconds()};

  mutable Mutex mu_;
  CondVar cv_;
  std::string session_ GUARDED_BY(mu_);
  // The session key's value while this copy may run: the session id on a
  // primary, "promoted:" + id on a promoted backup. Taking an expired key
  // back compares against it.
  std::string session_value_ GUARDED_BY(mu_);
  int64_t lease_ GUARDED_BY(mu_) = 0;
  TimePoint deadline_ GUARDED_BY(mu_);
  TimePoint last_renewal_ GUARDED_BY(mu_);
  bool paused_ GUARDED_BY(mu_) = false;
  bool retire_pending_ GUARDED_BY(mu_) = false;
  std::string retire_why_ GUARDED_BY(mu_);
  std::string winner_ GUARDED_BY(mu_);
  std::string last_error_ GUARDED_BY(mu_);
  std::string fenced_why_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;
  FenceTable* fence_table_ GUARDED_BY(mu_) = nullptr;
  int fence_slot_ GUARDED_BY(mu_) = -1;
  std::thread renewer_, watchdog_;
};

}  // namespace remus
