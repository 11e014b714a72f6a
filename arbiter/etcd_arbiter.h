// Arbitration through etcd for one remusd (docs/architecture.md,
// "Arbitration"): the primary side owns each protected domain (Own), the
// backup side wins a transaction before it promotes (MayPromote) and then
// owns the promoted copy the same way.
//
// Thread-safety: public methods are thread-safe.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "arbiter/etcd.h"
#include "arbiter/lease.h"
#include "common/clock.h"
#include "common/thread_annotations.h"
#include "heartbeat/promotion.h"

namespace remus {

// One owned domain: the lease and the fencer it fences with.
class OwnedDomain {
 public:
  OwnedDomain(ArbiterOptions opts, std::string domain, etcd::Kv* kv, const Clock& clock)
      : lease_(std::move(opts), std::move(domain), kv, clock, &fencer_) {}
  PidFencer& fencer() { return fencer_; }
  DomainLease& lease() { return lease_; }
  const DomainLease& lease() const { return lease_; }

 private:
  PidFencer fencer_;  // before lease_: the lease's threads use it until they stop
  DomainLease lease_;
};

class EtcdArbiter final : public Arbiter {
 public:
  // kv and clock (CLOCK_BOOTTIME in production) outlive this object.
  EtcdArbiter(ArbiterOptions opts, etcd::Kv* kv, const Clock& clock) : opts_(std::move(opts)), kv_(kv), clock_(clock) {}
  // A promoted copy runs on after remusd stops: its watchdog slots are
  // freed (DomainLease::DetachFence says why); its lease lapses in etcd.
  ~EtcdArbiter() override;

  const ArbiterOptions& options() const { return opts_; }
  // The fence watchdog's table (remusd's remus-fence); null: fencing by
  // remusd's own threads only (tests). Set before any Own or promotion.
  void set_fence_table(FenceTable* t) { fence_table_ = t; }

  // Primary: owns `domain` for protection session `session`, fencing `pid`.
  // Started (renewing). Errors as DomainLease::Acquire.
  StatusOr<std::unique_ptr<OwnedDomain>> Own(const std::string& domain, const std::string& session, int pid,
                                             std::function<Status()> destroy);

  // Backup.
  std::string_view name() const override { return "etcd"; }
  StatusOr<PromotionGrant> MayPromote(const std::string& domain, const std::string& session) override EXCLUDES(mu_);
  void Promoted(const std::string& domain, int pid, std::function<Status()> destroy) override EXCLUDES(mu_);
  nlohmann::json StatusJson(const std::string& domain) const override EXCLUDES(mu_);
  // The promoted copies this backup owns, by domain.
  std::map<std::string, std::shared_ptr<OwnedDomain>> won() const EXCLUDES(mu_);

 private:
  const ArbiterOptions opts_;
  etcd::Kv* const kv_;
  const Clock& clock_;
  FenceTable* fence_table_ = nullptr;
  mutable Mutex mu_;
  // Domains this backup won (its promoted copies), kept while remusd runs.
  std::map<std::string, std::shared_ptr<OwnedDomain>> won_ GUARDED_BY(mu_);
  // Why the last MayPromote of a domain was refused (status).
  std::map<std::string, std::string> refused_ GUARDED_BY(mu_);
};

// This host's name (gethostname), the default host id in owner records.
std::string LocalHostId();
// A random id for one remusd instance or one protection session (16 hex digits).
std::string RandomId();

}  // namespace remus
