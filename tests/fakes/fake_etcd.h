// FakeEtcd: an in-memory etcd::Kv (arbiter/etcd.h) with etcd's semantics for
// what arbitration uses: one global revision, leases that expire TTL after
// their last grant/keep-alive on a FakeClock (their keys vanish with them),
// and all-or-nothing transactions. Partitions are `set_reachable(false)`:
// every call fails with Unavailable and changes nothing, as a request that
// never arrived.
//
//   FakeClock clock;
//   FakeEtcd etcd(clock);
//   auto lease = etcd.Grant(5);
//   clock.Advance(std::chrono::seconds(6));   // lease and its keys are gone
//
// Thread-safety: all methods are thread-safe.
// Target: remus_test_fakes (tests/CMakeLists.txt).
#pragma once

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "arbiter/etcd.h"
#include "common/clock.h"

namespace remus {

class FakeEtcd final : public etcd::Kv {
 public:
  explicit FakeEtcd(const Clock& clock) : clock_(clock) {}

  void set_reachable(bool r) {
    std::lock_guard l(mu_);
    reachable_ = r;
  }
  int64_t revision() {
    std::lock_guard l(mu_);
    return revision_;
  }
  // Test access to the store (expired leases swept first).
  std::optional<etcd::KeyValue> Peek(const std::string& key) {
    std::lock_guard l(mu_);
    Sweep();
    auto it = kvs_.find(key);
    if (it == kvs_.end()) return std::nullopt;
    return it->second;
  }
  void Poke(const std::string& key, const std::string& value) {
    std::lock_guard l(mu_);
    PutLocked(key, value, 0);
  }

  StatusOr<int64_t> Grant(int64_t ttl) override {
    std::lock_guard l(mu_);
    if (!reachable_) return Unavailable("etcd unreachable (fake partition)");
    Sweep();
    int64_t id = next_lease_++;
    leases_[id] = {ttl, clock_.Now() + std::chrono::seconds(ttl)};
    return id;
  }
  StatusOr<int64_t> KeepAlive(int64_t lease) override {
    std::lock_guard l(mu_);
    if (!reachable_) return Unavailable("etcd unreachable (fake partition)");
    Sweep();
    auto it = leases_.find(lease);
    if (it == leases_.end()) return int64_t{0};
    it->second.expires = clock_.Now() + std::chrono::seconds(it->second.ttl);
    return it->second.ttl;
  }
  Status Revoke(int64_t lease) override {
    std::lock_guard l(mu_);
    if (!reachable_) return Unavailable("etcd unreachable (fake partition)");
    Sweep();
    DropLease(lease);
    return OkStatus();
  }
  StatusOr<int64_t> TimeToLive(int64_t lease) override {
    std::lock_guard l(mu_);
    if (!reachable_) return Unavailable("etcd unreachable (fake partition)");
    Sweep();
    auto it = leases_.find(lease);
    if (it == leases_.end()) return int64_t{-1};
    return std::chrono::duration_cast<std::chrono::seconds>(it->second.expires - clock_.Now()).count();
  }
  StatusOr<std::optional<etcd::KeyValue>> Get(const std::string& key) override {
    std::lock_guard l(mu_);
    if (!reachable_) return Unavailable("etcd unreachable (fake partition)");
    Sweep();
    auto it = kvs_.find(key);
    if (it == kvs_.end()) return std::optional<etcd::KeyValue>();
    return std::optional<etcd::KeyValue>(it->second);
  }
  // The next transaction is applied twice and the second answer returned:
  // what a client that resent a write whose first answer was lost sees.
  void ResendNextTxn() {
    std::lock_guard l(mu_);
    resend_next_ = true;
  }

  StatusOr<etcd::TxnResult> Txn(const etcd::TxnRequest& t) override {
    std::lock_guard l(mu_);
    if (!reachable_) return Unavailable("etcd unreachable (fake partition)");
    Sweep();
    if (resend_next_) {
      resend_next_ = false;
      (void)TxnLocked(t);
    }
    return TxnLocked(t);
  }

 private:
  StatusOr<etcd::TxnResult> TxnLocked(const etcd::TxnRequest& t) {
    bool ok = true;
    for (const auto& c : t.compare) {
      auto it = kvs_.find(c.key);
      const etcd::KeyValue* kv = it == kvs_.end() ? nullptr : &it->second;
      switch (c.target) {
        case etcd::Compare::Target::kCreateRevision: ok &= (kv ? kv->create_revision : 0) == c.number; break;
        case etcd::Compare::Target::kModRevision: ok &= (kv ? kv->mod_revision : 0) == c.number; break;
        case etcd::Compare::Target::kLease: ok &= (kv ? kv->lease : 0) == c.number; break;
        // etcd: a value comparison against an absent key is false.
        case etcd::Compare::Target::kValue: ok &= kv != nullptr && kv->value == c.value; break;
      }
    }
    etcd::TxnResult r;
    r.succeeded = ok;
    const auto& ops = ok ? t.success : t.failure;
    bool wrote = false;
    for (const auto& op : ops) {
      if (op.kind == etcd::Op::Kind::kPut && op.lease != 0 && !leases_.count(op.lease))
        return NotFound("etcdserver: requested lease not found");
    }
    for (const auto& op : ops) {
      if (op.kind == etcd::Op::Kind::kGet) {
        auto it = kvs_.find(op.key);
        r.gets.push_back(it == kvs_.end() ? std::nullopt : std::optional<etcd::KeyValue>(it->second));
      } else if (op.kind == etcd::Op::Kind::kPut || kvs_.count(op.key)) {
        if (!wrote) revision_++;
        wrote = true;
        if (op.kind == etcd::Op::Kind::kPut) PutAt(op.key, op.value, op.lease);
        else kvs_.erase(op.key);
      }
    }
    r.revision = revision_;
    return r;
  }
  struct Lease {
    int64_t ttl;
    TimePoint expires;
  };
  void Sweep() {
    for (auto it = leases_.begin(); it != leases_.end();) {
      if (clock_.Now() >= it->second.expires) {
        int64_t id = it->first;
        ++it;
        DropLease(id);
      } else {
        ++it;
      }
    }
  }
  void DropLease(int64_t id) {
    if (!leases_.erase(id)) return;
    bool any = false;
    for (auto it = kvs_.begin(); it != kvs_.end();) {
      if (it->second.lease == id) {
        it = kvs_.erase(it);
        any = true;
      } else {
        ++it;
      }
    }
    if (any) revision_++;
  }
  void PutLocked(const std::string& key, const std::string& value, int64_t lease) {
    revision_++;
    PutAt(key, value, lease);
  }
  void PutAt(const std::string& key, const std::string& value, int64_t lease) {
    auto& kv = kvs_[key];
    if (kv.create_revision == 0) kv.create_revision = revision_;
    kv.key = key;
    kv.value = value;
    kv.mod_revision = revision_;
    kv.version++;
    kv.lease = lease;
  }

  const Clock& clock_;
  std::mutex mu_;
  bool reachable_ = true;
  bool resend_next_ = false;
  int64_t revision_ = 1;
  int64_t next_lease_ = 7000;
  std::map<std::string, etcd::KeyValue> kvs_;
  std::map<int64_t, Lease> leases_;
};

// One host's path to a FakeEtcd: cut it (`set_up(false)`) to partition that
// host alone from etcd while others still reach it.
class FakeEtcdLink final : public etcd::Kv {
 public:
  explicit FakeEtcdLink(FakeEtcd* etcd) : etcd_(etcd) {}
  void set_up(bool up) { up_ = up; }

  StatusOr<int64_t> Grant(int64_t ttl) override {
    if (!up_) return Down();
    return etcd_->Grant(ttl);
  }
  StatusOr<int64_t> KeepAlive(int64_t lease) override {
    if (!up_) return Down();
    return etcd_->KeepAlive(lease);
  }
  Status Revoke(int64_t lease) override { return up_ ? etcd_->Revoke(lease) : Down(); }
  StatusOr<int64_t> TimeToLive(int64_t lease) override {
    if (!up_) return Down();
    return etcd_->TimeToLive(lease);
  }
  StatusOr<std::optional<etcd::KeyValue>> Get(const std::string& key) override {
    if (!up_) return Down();
    return etcd_->Get(key);
  }
  StatusOr<etcd::TxnResult> Txn(const etcd::TxnRequest& t) override {
    if (!up_) return Down();
    return etcd_->Txn(t);
  }

 private:
  static Status Down() { return Unavailable("etcd unreachable (fake partition of this host)"); }
  FakeEtcd* const etcd_;
  std::atomic<bool> up_{true};
};

}  // namespace remus
