// Promotion of a backup to primary: one compare-and-swap state machine (after
// QEMU's migration/colo-failover.c), so a node can never promote twice, even
// when the heartbeat timeout, the primary's FAILOVER message and an operator's
// `remusctl failover` race.
//
//   kStandby --Begin--> kPromoting --Finish(ok)--> kPromoted (final)
//                            |--Finish(error)--> kFailed --Begin--> kPromoting
//
// Before promoting, the caller asks an Arbiter: EtcdArbiter (arbiter/) wins
// an etcd transaction first; FailStopArbiter (--arbiter none) assumes that a
// primary that went silent is dead.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

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

// What winning arbitration gave: the fencing token (etcd: the revision of
// the winning transaction; 0 without an arbiter).
struct PromotionGrant {
  int64_t token = 0;
};

class Arbiter {
 public:
  virtual ~Arbiter() = default;
  // "etcd" or "none".
  virtual std::string_view name() const = 0;
  // OK with a grant if this node may take over `domain` now, from the
  // checkpoints of protection session `session` (CONFIG's session id).
  // FailedPrecondition or Unavailable: not now, ask again (the primary still
  // holds its lease; the arbiter is unreachable). Aborted: never for this
  // session (the primary retired it, or another host won it).
  virtual StatusOr<PromotionGrant> MayPromote(const std::string& domain, const std::string& session) = 0;
  // The promoted guest runs as `pid`: from now on it is what this node
  // fences when it cannot keep its ownership. `destroy` (may be empty) ends
  // it for good instead of SIGKILL (libvirt: virDomainDestroy).
  virtual void Promoted(const std::string& domain, int pid, std::function<Status()> destroy) {
    (void)domain, (void)pid, (void)destroy;
  }
  // The "arbiter" object of a domain's status.
  virtual nlohmann::json StatusJson(const std::string& domain) const {
    (void)domain;
    return {{"name", std::string(name())}};
  }
};

// Forwards to an arbiter owned elsewhere (remusd shares its EtcdArbiter
// between the primaries and the backup).
class ArbiterRef final : public Arbiter {
 public:
  explicit ArbiterRef(Arbiter* a) : a_(a) {}
  std::string_view name() const override { return a_->name(); }
  StatusOr<PromotionGrant> MayPromote(const std::string& d, const std::string& s) override { return a_->MayPromote(d, s); }
  void Promoted(const std::string& d, int pid, std::function<Status()> destroy) override {
    a_->Promoted(d, pid, std::move(destroy));
  }
  nlohmann::json StatusJson(const std::string& d) const override { return a_->StatusJson(d); }

 private:
  Arbiter* const a_;
};

// Grants every promotion: correct only when failures are fail-stop (a primary
// that stops talking is dead). `--arbiter none`: a partition, or a primary
// remusd that froze while its QEMU ran on, leaves two running copies.
class FailStopArbiter final : public Arbiter {
 public:
  std::string_view name() const override { return "none"; }
  StatusOr<PromotionGrant> MayPromote(const std::string&, const std::string&) override { return PromotionGrant{}; }
  nlohmann::json StatusJson(const std::string&) const override {
    return {{"name", "none"},
            {"warning", "no arbiter: a network partition or a frozen primary remusd can leave two running copies"}};
  }
};

}  // namespace remus
