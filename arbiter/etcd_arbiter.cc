#include "arbiter/etcd_arbiter.h"

#include <unistd.h>

#include <random>

#include "arbiter/leftovers.h"
#include "common/hex.h"
#include "common/log.h"

namespace remus {

using nlohmann::json;

std::string LocalHostId() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

std::string RandomId() {
  std::random_device rd;
  uint8_t b[8];
  for (auto& x : b) x = static_cast<uint8_t>(rd());
  return HexEncode(std::string_view(reinterpret_cast<const char*>(b), sizeof b));
}

EtcdArbiter::~EtcdArbiter() {
  MutexLock l(mu_);
  for (auto& [domain, o] : won_) o->lease().DetachFence();
}

StatusOr<std::unique_ptr<OwnedDomain>> EtcdArbiter::Own(const std::string& domain, const std::string& session, int pid,
                                                        std::function<Status()> destroy) {
  auto o = std::make_unique<OwnedDomain>(opts_, domain, kv_, clock_);
  o->fencer().set_pid(pid);
  if (destroy) o->fencer().set_destroy(std::move(destroy));
  RETURN_IF_ERROR(o->lease().Acquire(session));
  if (fence_table_) o->lease().AttachFence(fence_table_, pid, ProcessStartTime(pid));
  o->lease().Start();
  // A copy this host promoted, protected again from here: the key moved to
  // the new session's lease (Acquire takes this host's own key). The
  // promotion's lease must not go on as if it owned the domain: MayPromote
  // would take it for a win of a later session.
  std::shared_ptr<OwnedDomain> won;
  {
    MutexLock l(mu_);
    auto it = won_.find(domain);
    if (it != won_.end()) {
      won = std::move(it->second);
      won_.erase(it);
    }
  }
  if (won) won->lease().HandOver(session);
  return o;
}

StatusOr<PromotionGrant> EtcdArbiter::MayPromote(const std::string& domain, const std::string& session) {
  auto refuse = [&](Status s) {
    MutexLock l(mu_);
    refused_[domain] = s.message();
    return s;
  };
  if (session.empty())
    return refuse(Aborted("the primary of domain " + domain +
                          " named no protection session: it runs without an arbiter; give both hosts --arbiter etcd"));
  {
    MutexLock l(mu_);
    auto it = won_.find(domain);
    if (it != won_.end() && it->second->lease().state() == LeaseState::kHeld) {
      // Won before (a promotion that failed and is tried again).
      refused_.erase(domain);
      return PromotionGrant{it->second->lease().token()};
    }
  }
  const std::string owner_key = OwnerKey(opts_, domain), session_key = SessionKey(opts_, domain);
  TimePoint sent = clock_.Now();
  StatusOr<int64_t> lease = kv_->Grant(opts_.ttl_seconds());
  if (!lease.ok()) return refuse(lease.status().Annotate("etcd"));
  etcd::TxnRequest t;
  t.compare = {etcd::Compare::Absent(owner_key), etcd::Compare::ValueIs(session_key, session)};
  t.success = {etcd::Op::Put(owner_key, OwnerRecord{opts_.host, opts_.instance, session}.Encode(), *lease),
               etcd::Op::Put(session_key, "promoted:" + session)};
  t.failure = {etcd::Op::Get(owner_key), etcd::Op::Get(session_key)};
  StatusOr<etcd::TxnResult> r = kv_->Txn(t);
  if (r.ok() && !r->succeeded && !r->gets.empty() && r->gets[0] && r->gets[0]->lease == *lease) {
    r->succeeded = true;  // the client resent a write whose first attempt took effect
    r->revision = r->gets[0]->mod_revision;
  }
  if (!r.ok() || !r->succeeded) (void)kv_->Revoke(*lease);
  if (!r.ok()) return refuse(r.status().Annotate("etcd"));
  if (!r->succeeded) {
    const auto& owner = r->gets.size() > 0 ? r->gets[0] : std::nullopt;
    const auto& sess = r->gets.size() > 1 ? r->gets[1] : std::nullopt;
    if (owner) {
      OwnerRecord rec = OwnerRecord::Decode(owner->value);
      return refuse(FailedPrecondition("host '" + rec.host + "' still holds domain " + domain +
                                       "'s lease (session " + rec.session +
                                       "): its copy may be running; promoting only once that lease ends"));
    }
    std::string v = sess ? sess->value : "";
    return refuse(Aborted("session " + session + " of domain " + domain + " can no longer be promoted (etcd: " +
                          (v.empty() ? std::string("no session key") : "'" + v + "'") +
                          (v.rfind("retired:", 0) == 0 ? ": the primary ended it and runs on unprotected" : "") + ")"));
  }
  auto o = std::make_shared<OwnedDomain>(opts_, domain, kv_, clock_);
  o->lease().Adopt(session, *lease, sent, r->revision, "promoted:" + session);
  o->lease().Start();
  LOG_WARN("arbiter[" + domain + "]") << "won domain " << domain << " (session " << session << "): fencing token "
                                      << r->revision;
  MutexLock l(mu_);
  refused_.erase(domain);
  won_[domain] = o;
  return PromotionGrant{r->revision};
}

void EtcdArbiter::Promoted(const std::string& domain, int pid, std::function<Status()> destroy) {
  MutexLock l(mu_);
  auto it = won_.find(domain);
  if (it == won_.end()) return;
  it->second->fencer().set_pid(pid);
  if (destroy) it->second->fencer().set_destroy(std::move(destroy));
  if (fence_table_ && pid > 0) it->second->lease().AttachFence(fence_table_, pid, ProcessStartTime(pid));
}

json EtcdArbiter::StatusJson(const std::string& domain) const {
  MutexLock l(mu_);
  json j = {{"name", "etcd"}, {"host", opts_.host}};
  auto it = won_.find(domain);
  if (it != won_.end()) j.update(it->second->lease().StatusJson());
  auto r = refused_.find(domain);
  if (r != refused_.end()) j["refused"] = r->second;
  return j;
}

std::map<std::string, std::shared_ptr<OwnedDomain>> EtcdArbiter::won() const {
  MutexLock l(mu_);
  return won_;
}

}  // namespace remus
