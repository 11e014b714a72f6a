#include "arbiter/lease.h"

#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <cmath>

#include "common/log.h"

namespace remus {

using nlohmann::json;

int64_t ArbiterOptions::ttl_seconds() const {
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::chrono::duration<double>(ttl).count())));
}

std::string OwnerKey(const ArbiterOptions& o, const std::string& domain) {
  return o.prefix + "/domains/" + domain + "/owner";
}
std::string SessionKey(const ArbiterOptions& o, const std::string& domain) {
  return o.prefix + "/domains/" + domain + "/session";
}

std::string OwnerRecord::Encode() const {
  return json{{"host", host}, {"instance", instance}, {"session", session}}.dump();
}

OwnerRecord OwnerRecord::Decode(const std::string& value) {
  OwnerRecord r;
  json j = json::parse(value, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return r;
  auto str = [&](const char* k) {
    auto it = j.find(k);
    return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  r.host = str("host");
  r.instance = str("instance");
  r.session = str("session");
  return r;
}

// ---- PidFencer ----

void PidFencer::set_destroy(std::function<Status()> f) {
  MutexLock l(mu_);
  destroy_ = std::move(f);
}

Status PidFencer::Signal(int sig, const char* what) {
  int pid = pid_.load();
  if (pid <= 0) return OkStatus();  // no copy (yet): nothing to fence
  if (::kill(pid, sig) != 0 && errno != ESRCH) return ErrnoStatus(std::string(what) + " QEMU pid " + std::to_string(pid), errno);
  return OkStatus();
}

Status PidFencer::Pause() { return Signal(SIGSTOP, "pausing"); }
Status PidFencer::Resume() { return Signal(SIGCONT, "resuming"); }

Status PidFencer::Destroy() {
  std::function<Status()> d;
  {
    MutexLock l(mu_);
    d = destroy_;
  }
  if (d) {
    Status s = d();
    if (s.ok()) return s;
    LOG_WARN("fence") << "destroy through libvirt failed (" << s.message() << "); killing QEMU";
  }
  return Signal(SIGKILL, "killing");
}

// ---- DomainLease ----

std::string_view LeaseStateName(LeaseState s) {
  switch (s) {
    case LeaseState::kAcquiring: return "acquiring";
    case LeaseState::kHeld: return "held";
    case LeaseState::kFenced: return "fenced";
    case LeaseState::kLost: return "lost";
    case LeaseState::kReleased: return "released";
  }
  return "?";
}

DomainLease::DomainLease(ArbiterOptions opts, std::string domain, etcd::Kv* kv, const Clock& clock, Fencer* fencer)
    : opts_(std::move(opts)),
      domain_(std::move(domain)),
      owner_key_(OwnerKey(opts_, domain_)),
      session_key_(SessionKey(opts_, domain_)),
      kv_(kv),
      clock_(clock),
      fencer_(fencer) {}

DomainLease::~DomainLease() {
  {
    MutexLock l(mu_);
    stop_ = true;
    cv_.NotifyAll();
  }
  if (renewer_.joinable()) renewer_.join();
  if (watchdog_.joinable()) watchdog_.join();
}

Status DomainLease::Acquire(const std::string& session) {
  const OwnerRecord me{opts_.host, opts_.instance, session};
  TimePoint sent = clock_.Now();
  ASSIGN_OR_RETURN(int64_t lease, kv_->Grant(opts_.ttl_seconds()));
  etcd::TxnRequest t;
  t.compare = {etcd::Compare::Absent(owner_key_)};
  t.success = {etcd::Op::Put(owner_key_, me.Encode(), lease), etcd::Op::Put(session_key_, session)};
  t.failure = {etcd::Op::Get(owner_key_)};
  StatusOr<etcd::TxnResult> r = kv_->Txn(t);
  if (r.ok() && !r->succeeded && !r->gets.empty() && r->gets[0] && r->gets[0]->lease == lease) {
    r->succeeded = true;  // a resent write whose first attempt took effect
    r->revision = r->gets[0]->mod_revision;
  }
  if (r.ok() && !r->succeeded && !r->gets.empty() && r->gets[0]) {
    const etcd::KeyValue& cur = *r->gets[0];
    OwnerRecord rec = OwnerRecord::Decode(cur.value);
    if (rec.host != opts_.host) {
      (void)kv_->Revoke(lease);
      return FailedPrecondition("domain " + domain_ + " is owned by host '" + rec.host + "' (token " +
                                std::to_string(cur.mod_revision) +
                                "): its guest runs there; protect it from that host, or wait for its lease to end");
    }
    // A remusd of this host that restarted left its key: ours to take over,
    // as long as no one else moved it meanwhile.
    t.compare = {etcd::Compare::ModRevisionIs(owner_key_, cur.mod_revision)};
    r = kv_->Txn(t);
  }
  if (!r.ok() || !r->succeeded) {
    (void)kv_->Revoke(lease);
    if (!r.ok()) return r.status().Annotate("taking domain " + domain_ + "'s ownership key in etcd");
    return Aborted("domain " + domain_ + ": its ownership key changed while it was being taken; try again");
  }
  Adopt(session, lease, sent, r->revision);
  LOG_INFO(Tag()) << "owns " << owner_key_ << " (lease " << lease << ", token " << r->revision << ", session "
                  << session << ")";
  return OkStatus();
}

void DomainLease::Adopt(const std::string& session, int64_t lease, TimePoint sent, int64_t token,
                        const std::string& session_value) {
  MutexLock l(mu_);
  session_ = session;
  session_value_ = session_value.empty() ? session : session_value;
  lease_ = lease;
  last_renewal_ = sent;
  deadline_ = sent + opts_.ttl - opts_.margin;
  token_ = token;
  state_ = LeaseState::kHeld;
}

void DomainLease::Start() {
  renewer_ = std::thread([this] { RenewerLoop(); });
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

bool DomainLease::AttachFence(FenceTable* table, int pid, uint64_t pid_start) {
  MutexLock l(mu_);
  if (fence_table_) fence_table_->Free(fence_slot_);
  fence_table_ = table;
  fence_slot_ = table->Arm(pid, pid_start, deadline_.time_since_epoch().count());
  if (fence_slot_ < 0) {
    LOG_ERROR(Tag()) << "the fence table is full: this copy is fenced by remusd's own thread only";
    fence_table_ = nullptr;
    return false;
  }
  return true;
}

void DomainLease::DetachFence() {
  MutexLock l(mu_);
  FreeFence();
}

void DomainLease::PublishDeadline() {
  if (fence_table_) fence_table_->SetDeadline(fence_slot_, deadline_.time_since_epoch().count());
}

void DomainLease::ResumeLocked(const char* why) {
  // The watchdog first, with the new deadline: it must not stop the copy
  // again for the old one.
  if (fence_table_) fence_table_->Rearm(fence_slot_, deadline_.time_since_epoch().count());
  Status r = fencer_->Resume();
  if (!r.ok()) LOG_ERROR(Tag()) << r.ToString();
  paused_ = false;
  if (state_ == LeaseState::kFenced) state_ = LeaseState::kHeld;
  LOG_INFO(Tag()) << why;
}

void DomainLease::FreeFence() {
  if (fence_table_) fence_table_->Free(fence_slot_);
  fence_table_ = nullptr;
  fence_slot_ = -1;
}

bool DomainLease::Valid() const {
  if (state_.load() != LeaseState::kHeld) return false;
  MutexLock l(mu_);
  return !paused_ && clock_.Now() < deadline_;
}

void DomainLease::CheckDeadline() {
  MutexLock l(mu_);
  LeaseState s = state_.load();
  if ((s != LeaseState::kHeld && s != LeaseState::kFenced) || paused_) return;
  const bool by_watchdog = fence_table_ && fence_table_->Fenced(fence_slot_);
  if (clock_.Now() < deadline_ && !by_watchdog) return;
  // Paused before anything else: the rest can wait, the guest cannot.
  Status p = fencer_->Pause();
  paused_ = true;
  state_ = LeaseState::kFenced;
  fence_events_++;
  last_fence_after_renewal_ms_ = static_cast<int64_t>(ToMillis(clock_.Now() - last_renewal_));
  fenced_why_ = "no lease renewal for " +
                std::to_string(static_cast<int64_t>(ToMillis(clock_.Now() - last_renewal_))) + " ms" +
                (last_error_.empty() ? "" : " (" + last_error_ + ")");
  if (!p.ok()) LOG_ERROR(Tag()) << "fencing: " << p.ToString();
  LOG_WARN(Tag()) << "fenced" << (by_watchdog ? " (by the fence watchdog first)" : "")
                  << ": the guest is paused, its output held (" << fenced_why_ << ")";
  cv_.NotifyAll();
}

void DomainLease::RenewOnce() {
  int64_t lease;
  bool retire;
  {
    MutexLock l(mu_);
    LeaseState s = state_.load();
    if (s != LeaseState::kHeld && s != LeaseState::kFenced) return;
    lease = lease_;
    retire = retire_pending_;
  }
  TimePoint sent = clock_.Now();
  StatusOr<int64_t> ttl = kv_->KeepAlive(lease);
  renew_hist_.Observe(std::chrono::duration<double>(clock_.Now() - sent).count());
  if (!ttl.ok()) {
    renewal_failures_++;
    MutexLock l(mu_);
    last_error_ = ttl.status().message();
    return;
  }
  if (*ttl <= 0) {
    // The lease is gone (etcd expired it): we may no longer run. Pause now
    // if the watchdog has not yet, then find out who owns the key.
    renewal_failures_++;
    {
      MutexLock l(mu_);
      last_error_ = "lease " + std::to_string(lease) + " expired";
      deadline_ = std::min(deadline_, clock_.Now());
      PublishDeadline();
    }
    CheckDeadline();
    Resolve();
    return;
  }
  renewals_++;
  bool was_paused;
  {
    MutexLock l(mu_);
    last_error_.clear();
    last_renewal_ = sent;
    deadline_ = sent + std::min<Nanos>(opts_.ttl, std::chrono::seconds(*ttl)) - opts_.margin;
    PublishDeadline();
    // The watchdog may have stopped the copy while this thread was late.
    was_paused = paused_ || (fence_table_ && fence_table_->Fenced(fence_slot_));
  }
  if (was_paused) {
    // Renewed: the lease lived, so no one else can have taken the key. Check
    // anyway before the guest runs again.
    StatusOr<std::optional<etcd::KeyValue>> cur = kv_->Get(owner_key_);
    if (!cur.ok()) return;  // next round
    if (!*cur || (*cur)->lease != lease) {
      OwnerRecord rec = *cur ? OwnerRecord::Decode((*cur)->value) : OwnerRecord{};
      Lose(rec.host, *cur ? (*cur)->mod_revision : 0, "the ownership key is no longer attached to our lease");
      return;
    }
    MutexLock l(mu_);
    ResumeLocked("lease renewed: still the owner; the guest resumes");
  }
  if (retire) (void)TryRetire();
}

void DomainLease::Resolve() {
  std::string session, session_value;
  {
    MutexLock l(mu_);
    session = session_;
    session_value = session_value_;
  }
  StatusOr<std::optional<etcd::KeyValue>> cur = kv_->Get(owner_key_);
  if (!cur.ok()) return;  // etcd unreachable again: the next round
  if (*cur) {
    OwnerRecord rec = OwnerRecord::Decode((*cur)->value);
    Lose(rec.host, (*cur)->mod_revision, "host '" + rec.host + "' owns the domain now");
    return;
  }
  // Nobody owns it. Ours again only if our session is still the one that
  // may run: a backup that won and lost its lease since left "promoted:S".
  TimePoint sent = clock_.Now();
  StatusOr<int64_t> lease = kv_->Grant(opts_.ttl_seconds());
  if (!lease.ok()) return;
  etcd::TxnRequest t;
  t.compare = {etcd::Compare::Absent(owner_key_), etcd::Compare::ValueIs(session_key_, session_value)};
  t.success = {etcd::Op::Put(owner_key_, OwnerRecord{opts_.host, opts_.instance, session}.Encode(), *lease)};
  t.failure = {etcd::Op::Get(owner_key_), etcd::Op::Get(session_key_)};
  StatusOr<etcd::TxnResult> r = kv_->Txn(t);
  if (!r.ok()) {
    (void)kv_->Revoke(*lease);
    return;
  }
  const bool taken_before = !r->succeeded && !r->gets.empty() && r->gets[0] && r->gets[0]->lease == *lease;
  if (taken_before) r->revision = r->gets[0]->mod_revision;  // a resent write that took effect
  if (!r->succeeded && !taken_before) {
    (void)kv_->Revoke(*lease);
    const auto& owner = r->gets.size() > 0 ? r->gets[0] : std::nullopt;
    const auto& sess = r->gets.size() > 1 ? r->gets[1] : std::nullopt;
    if (owner) {
      OwnerRecord rec = OwnerRecord::Decode(owner->value);
      Lose(rec.host, owner->mod_revision, "host '" + rec.host + "' owns the domain now");
    } else {
      Lose("", sess ? sess->mod_revision : 0,
           "session " + session + " is no longer this copy's (etcd: " + (sess ? "'" + sess->value + "'" : std::string("no session key")) +
               ", this copy runs while it is '" + session_value + "')");
    }
    return;
  }
  {
    MutexLock l(mu_);
    lease_ = *lease;
    last_renewal_ = sent;
    deadline_ = sent + opts_.ttl - opts_.margin;
    token_ = r->revision;
    state_ = LeaseState::kFenced;
    ResumeLocked("the key is ours again");
    last_error_.clear();
  }
  renewals_++;
  LOG_WARN(Tag()) << "our lease had expired but no one took the domain: owner again (token " << r->revision
                  << "); the guest resumes";
}

void DomainLease::Lose(const std::string& winner, int64_t token, const std::string& why) {
  {
    MutexLock l(mu_);
    if (state_ == LeaseState::kLost || state_ == LeaseState::kReleased) return;
    if (!paused_) {
      (void)fencer_->Pause();
      paused_ = true;
      fence_events_++;
    }
    state_ = LeaseState::kLost;
    FreeFence();  // stopped already (paused above); the kill follows
    winner_ = winner;
    token_ = token;
    fenced_why_ = why;
    retire_pending_ = false;
    cv_.NotifyAll();
  }
  // Outside the lock: under libvirt this waits for virDomainDestroy, and
  // status must not wait with it. The copy is paused meanwhile.
  Status d = fencer_->Destroy();
  if (!d.ok()) LOG_ERROR(Tag()) << "destroying our copy: " << d.ToString();
  LOG_ERROR(Tag()) << "fenced for good: " << why << "; our copy was destroyed, nothing it held was released"
                   << (winner.empty() ? "" : " (winner '" + winner + "', token " + std::to_string(token) + ")");
}

Status DomainLease::Retire(const std::string& why) {
  {
    MutexLock l(mu_);
    LeaseState s = state_.load();
    if (s == LeaseState::kReleased) return OkStatus();
    if (s == LeaseState::kLost) return Aborted("domain " + domain_ + ": fenced, another host owns it");
    retire_pending_ = true;
    retire_why_ = why;
  }
  return TryRetire();
}

Status DomainLease::TryRetire() {
  std::string session;
  int64_t lease;
  {
    MutexLock l(mu_);
    if (!retire_pending_) return state_ == LeaseState::kReleased ? OkStatus() : Aborted("not retiring");
    session = session_;
    lease = lease_;
  }
  etcd::TxnRequest t;
  t.compare = {etcd::Compare::LeaseIs(owner_key_, lease), etcd::Compare::ValueIs(session_key_, session)};
  t.success = {etcd::Op::Put(session_key_, "retired:" + session), etcd::Op::Delete(owner_key_)};
  t.failure = {etcd::Op::Get(owner_key_), etcd::Op::Get(session_key_)};
  StatusOr<etcd::TxnResult> r = kv_->Txn(t);
  if (!r.ok()) {
    MutexLock l(mu_);
    last_error_ = r.status().message();
    return r.status().Annotate("retiring session " + session + " in etcd");
  }
  // The client resends a write whose answer was lost: if an earlier attempt
  // took effect, this one fails against our own result.
  const bool done_before = !r->succeeded && r->gets.size() > 1 && !r->gets[0] && r->gets[1] &&
                           r->gets[1]->value == "retired:" + session;
  if (!r->succeeded && !done_before) {
    // Our lease is gone. If another host owns the key, we lost; if no one
    // does, the renewer's Resolve takes it back first, then retires.
    if (!r->gets.empty() && r->gets[0]) {
      OwnerRecord rec = OwnerRecord::Decode(r->gets[0]->value);
      Lose(rec.host, r->gets[0]->mod_revision, "host '" + rec.host + "' owns the domain now");
      return Aborted("domain " + domain_ + ": host '" + rec.host + "' owns it now; our copy was destroyed");
    }
    return Unavailable("domain " + domain_ + ": our lease expired before session " + session +
                       " could be retired; retrying once it is ours again");
  }
  (void)kv_->Revoke(lease);
  {
    MutexLock l(mu_);
    retire_pending_ = false;
    // No backup can promote the session now: the copy runs free.
    const bool stopped = paused_ || (fence_table_ && fence_table_->Fenced(fence_slot_));
    FreeFence();
    if (stopped) {
      Status s = fencer_->Resume();
      if (!s.ok()) LOG_ERROR(Tag()) << s.ToString();
      paused_ = false;
    }
    state_ = LeaseState::kReleased;
    cv_.NotifyAll();
    LOG_INFO(Tag()) << "session " << session << " retired in etcd (" << retire_why_
                    << "): no backup can promote it; the key is released";
  }
  return OkStatus();
}

std::optional<int64_t> DomainLease::EndHere() {
  MutexLock l(mu_);
  LeaseState s = state_.load();
  if (s != LeaseState::kHeld && s != LeaseState::kFenced) return std::nullopt;
  state_ = LeaseState::kReleased;
  retire_pending_ = false;
  FreeFence();
  cv_.NotifyAll();
  return lease_;
}

void DomainLease::Abandon() {
  std::optional<int64_t> ended = EndHere();  // the copy is dead: nothing to fence
  if (!ended) return;
  const int64_t lease = *ended;
  Status r = kv_->Revoke(lease);
  if (r.ok()) LOG_INFO(Tag()) << "QEMU is gone: lease " << lease << " revoked, so the backup may take over now";
  else LOG_WARN(Tag()) << "revoking lease " << lease << ": " << r.message() << " (it expires within the TTL)";
}

void DomainLease::HandOver(const std::string& to_session) {
  std::optional<int64_t> ended = EndHere();  // the new owner's lease fences the copy now
  if (!ended) return;
  const int64_t lease = *ended;
  Status r = kv_->Revoke(lease);
  LOG_INFO(Tag()) << "handed the domain over to protection session " << to_session << "; lease " << lease
                  << (r.ok() ? " revoked" : " left to expire (" + r.message() + ")");
}

void DomainLease::RenewerLoop() {
  for (;;) {
    RenewOnce();
    MutexLock l(mu_);
    LeaseState s = state_.load();
    if (stop_ || s == LeaseState::kLost || s == LeaseState::kReleased) return;
    // Fenced, or a renewal that failed: try again soon, not a period later.
    Nanos wait = opts_.renew_period();
    if (paused_ || !last_error_.empty()) wait = std::min<Nanos>(wait, std::chrono::milliseconds(250));
    cv_.WaitFor(mu_, wait, [&]() REQUIRES(mu_) { return stop_; });
  }
}

void DomainLease::WatchdogLoop() {
  for (;;) {
    CheckDeadline();
    MutexLock l(mu_);
    LeaseState s = state_.load();
    if (stop_ || s == LeaseState::kLost || s == LeaseState::kReleased) return;
    // Sleep to the deadline (a renewal moves it; the 50 ms cap also bounds
    // how late a missed wake-up can make the fence).
    Nanos left = deadline_ - clock_.Now();
    Nanos wait = paused_ ? std::chrono::milliseconds(50)
                         : std::clamp<Nanos>(left, std::chrono::milliseconds(1), std::chrono::milliseconds(50));
    cv_.WaitFor(mu_, wait, [&]() REQUIRES(mu_) { return stop_; });
  }
}

json DomainLease::StatusJson() const {
  MutexLock l(mu_);
  json j = {{"state", std::string(LeaseStateName(state_.load()))},
            {"key", owner_key_},
            {"session", session_},
            {"lease", lease_},
            {"token", token_.load()},
            {"ttl_ms", static_cast<int64_t>(ToMillis(opts_.ttl))},
            {"margin_ms", static_cast<int64_t>(ToMillis(opts_.margin))},
            {"renewals", renewals_.load()},
            {"renewal_failures", renewal_failures_.load()},
            {"fence_events", fence_events_.load()},
            {"last_fence_after_renewal_ms", last_fence_after_renewal_ms_.load()},
            {"histograms", {{"renewal_seconds", HistogramToJson(renew_hist_.Snapshot())}}}};
  LeaseState s = state_.load();
  if (s == LeaseState::kHeld || s == LeaseState::kFenced) {
    j["owner"] = opts_.host;
    j["deadline_in_ms"] = static_cast<int64_t>(ToMillis(deadline_ - clock_.Now()));
    j["since_renewal_ms"] = static_cast<int64_t>(ToMillis(clock_.Now() - last_renewal_));
  }
  if (s == LeaseState::kLost) j["owner"] = winner_;
  if (!winner_.empty()) j["winner"] = winner_;
  if (!fenced_why_.empty()) j["fenced_reason"] = fenced_why_;
  if (!last_error_.empty()) j["error"] = last_error_;
  if (retire_pending_) j["retiring"] = retire_why_;
  return j;
}

}  // namespace remus
