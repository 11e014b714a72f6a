// The state machine: events, the backup's liveness, and the one teardown.
#include "replicator/primary/lifecycle.h"

#include <algorithm>
#include <chrono>

#include "common/log.h"
#include "replicator/link/messages.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

namespace {
// GiveUp retries while the monitor is away (libvirt restarting).
constexpr auto kGiveUpRetryFor = std::chrono::minutes(30);
constexpr auto kGiveUpRetryEvery = std::chrono::milliseconds(500);
// The lifecycle thread wakes at least this often.
constexpr auto kMaxNap = std::chrono::milliseconds(50);
}  // namespace

std::string_view PrimaryStateName(PrimaryState s) {
  switch (s) {
    case PrimaryState::kStarting: return "starting";
    case PrimaryState::kSyncing: return "syncing";
    case PrimaryState::kProtected: return "protected";
    case PrimaryState::kUnprotected: return "unprotected";
    case PrimaryState::kFailedOver: return "failed-over";
    case PrimaryState::kStopped: return "stopped";
    case PrimaryState::kFenced: return "fenced";
    case PrimaryState::kSwitchingOver: return "switching-over";
    case PrimaryState::kSwitchedOver: return "switched-over";
  }
  return "unknown";
}

bool PrimaryTransitionAllowed(PrimaryState from, PrimaryState to) {
  using S = PrimaryState;
  if (IsFinal(from)) return false;
  switch (to) {
    case S::kStarting: return false;
    case S::kSyncing: return from == S::kStarting;
    case S::kProtected: return from == S::kSyncing;
    case S::kSwitchingOver: return from == S::kProtected;
    case S::kSwitchedOver: return from == S::kSwitchingOver;
    case S::kUnprotected:
    case S::kFailedOver:
    case S::kStopped:
    case S::kFenced: return true;
  }
  return false;
}

PrimaryLifecycle::PrimaryLifecycle(LifecycleOptions opts, const Clock& clock)
    : opts_(std::move(opts)),
      clock_(clock),
      hb_(clock, opts_.heartbeat),
      interval_ms_(opts_.interval_ms),
      checkpoints_(clock, std::chrono::seconds(10)) {
  if (opts_.compress && opts_.xor_cache_bytes > 0) xor_cache_ = std::make_unique<PageVersionCache>(opts_.xor_cache_bytes);
  {
    MutexLock l(mu_);
    if (opts_.interval_auto) {
      interval_auto_ = std::make_unique<IntervalController>(opts_.interval_auto_opts, opts_.interval_ms);
    } else {
      interval_note_ = "fixed by protect --interval";
    }
  }
  lifecycle_thread_ = std::thread([this] { LifecycleLoop(); });
}

PrimaryLifecycle::~PrimaryLifecycle() {
  {
    MutexLock l(mu_);
    destroy_ = true;
    ev_cv_.NotifyAll();
  }
  // It tears down (if nothing else did) before it returns.
  lifecycle_thread_.join();
  // The ack reader may still be draining the link after GOODBYE.
  if (link_) link_->Shutdown();
  if (source_) source_->Abort();
  for (auto* t : {&epoch_thread_, &sender_thread_, &ack_thread_, &hb_thread_})
    if (t->joinable()) t->join();
}

bool PrimaryLifecycle::Advance(PrimaryState from, PrimaryState to) {
  if (!PrimaryTransitionAllowed(from, to)) {
    LOG_ERROR(Tag()) << "refused transition " << PrimaryStateName(from) << " -> " << PrimaryStateName(to);
    return false;
  }
  if (!state_.compare_exchange_strong(from, to)) return false;
  LOG_INFO(Tag()) << "state " << PrimaryStateName(from) << " -> " << PrimaryStateName(to);
  if (opts_.on_state) opts_.on_state(to, "");
  return true;
}

void PrimaryLifecycle::EnterFinal(PrimaryState to) {
  // Only the lifecycle thread enters an end, so nothing else moves the state
  // from a final one; the others CAS from non-final states only.
  PrimaryState from = state_.load();
  if (!PrimaryTransitionAllowed(from, to)) {
    LOG_ERROR(Tag()) << "refused transition " << PrimaryStateName(from) << " -> " << PrimaryStateName(to);
    return;
  }
  from = state_.exchange(to);
  LOG_INFO(Tag()) << "state " << PrimaryStateName(from) << " -> " << PrimaryStateName(to);
  if (from != to && opts_.on_state) opts_.on_state(to, error());
}

void PrimaryLifecycle::SetError(const std::string& e) {
  MutexLock l(mu_);
  if (error_.empty()) error_ = e;
}

std::string PrimaryLifecycle::error() const {
  MutexLock l(mu_);
  return error_;
}

void PrimaryLifecycle::Post(Event e) {
  MutexLock l(mu_);
  events_.push_back(std::move(e));
  ev_cv_.NotifyAll();
}

Status PrimaryLifecycle::Attach(LifecycleDeps deps) {
  {
    MutexLock l(mu_);
    if (attached_ || attaching_ || ended_ || destroy_)
      return FailedPrecondition("domain " + opts_.domain + ": protection already started or ended");
    attaching_ = true;
  }
  link_ = std::move(deps.link);
  source_ = std::move(deps.source);
  monitor_ = deps.monitor;
  make_netbuf_ = std::move(deps.make_netbuf);
  qemu_running_ = std::move(deps.qemu_running);
  end_qemu_ = std::move(deps.end_qemu);
  forget_qemu_ = std::move(deps.forget_qemu);
  monitor_connected_ = std::move(deps.monitor_connected);
  lease_ = deps.lease;
  delta_ = std::move(deps.delta);
  delta_offered_ = delta_ != nullptr;
  {
    MutexLock l(mu_);
    resync_note_ = std::move(deps.resync_note);
  }
  if (deps.make_disks)
    disks_ = deps.make_disks([this](uint32_t i, wire::DiskOp op, uint64_t off, uint64_t len,
                                    std::span<const uint8_t> data) { OnDiskWrite(i, op, off, len, data); });
  deps_ready_ = true;  // monitor events may look at disks_ from here on
  // A backstop so no thread waits on a write forever. The backup's loss is
  // judged from receipt (LifecycleLoop), well before this; a backup that
  // lives but takes no data (busy applying a commit) is not lost.
  link_->SetSendTimeout(std::chrono::duration_cast<std::chrono::milliseconds>(SendBackstop()));
  hb_.Received();  // silence counts from now
  Status s = source_->Start();
  if (s.ok()) {
    Advance(PrimaryState::kStarting, PrimaryState::kSyncing);
    ack_thread_ = std::thread([this] { AckLoop(); });
    sender_thread_ = std::thread([this] { SenderLoop(); });
    hb_thread_ = std::thread([this] { HeartbeatLoop(); });
    epoch_thread_ = std::thread([this] { EpochLoop(); });
  }
  {
    MutexLock l(mu_);
    attaching_ = false;
    attached_ = true;
    ev_cv_.NotifyAll();
  }
  if (!s.ok()) {
    // As any other end: GOODBYE (CONFIG went out), GiveUp, netbuf and disks.
    Post({s, false, true});
    MutexLock l(mu_);
    ev_cv_.Wait(mu_, [&]() REQUIRES(mu_) { return ended_; });
  }
  return s;
}

void PrimaryLifecycle::FailStart(const Status& why) { Post({why, false, false}); }

Status PrimaryLifecycle::Unprotect() {
  // Protection that already ended (the backup was lost, say) has nothing
  // left to undo: the guest runs unprotected, so unprotect succeeds and the
  // earlier error stays visible in the status.
  const bool was_running = !IsFinal(state_.load());
  Post({Cancelled("unprotected by the operator"), false, true});
  MutexLock l(mu_);
  ev_cv_.Wait(mu_, [&]() REQUIRES(mu_) { return ended_; });
  if (!was_running) return OkStatus();
  return error_.empty() || state_ != PrimaryState::kUnprotected ? OkStatus() : Internal(error_);
}

Status PrimaryLifecycle::SetInterval(int ms) {
  if (IsFinal(state_.load())) return FailedPrecondition("domain " + opts_.domain + " is no longer protected");
  MutexLock a(interval_mu_);
  {
    MutexLock l(mu_);
    if (!attached_ || !source_) return FailedPrecondition("domain " + opts_.domain + ": protection is still starting");
  }
  RETURN_IF_ERROR(source_->SetInterval(ms));
  interval_ms_ = ms;
  MutexLock l(mu_);
  if (interval_auto_) LOG_INFO(Tag()) << "interval fixed at " << ms << " ms (was automatic)";
  interval_auto_.reset();
  pending_interval_ = 0;
  interval_note_ = "fixed by remusctl tune";
  return OkStatus();
}

Status PrimaryLifecycle::SetAutoInterval(const IntervalControllerOptions& o) {
  RETURN_IF_ERROR(ValidateIntervalOptions(opts_.domain, o));
  if (IsFinal(state_.load())) return FailedPrecondition("domain " + opts_.domain + " is no longer protected");
  MutexLock a(interval_mu_);
  MutexLock l(mu_);
  interval_auto_ = std::make_unique<IntervalController>(o, interval_ms_.load());
  pending_interval_ = 0;
  interval_note_.clear();
  LOG_INFO(Tag()) << "interval automatic: latency budget " << o.latency_budget_ms << " ms, " << o.min_ms << ".."
                  << o.max_ms << " ms";
  return OkStatus();
}

void PrimaryLifecycle::ApplyAutoInterval() {
  {
    // The common case, without waiting behind a tune's QMP call.
    MutexLock l(mu_);
    if (!interval_kick_ && pending_interval_ == 0) return;
  }
  MutexLock a(interval_mu_);
  int ms;
  std::string why;
  {
    MutexLock l(mu_);
    interval_kick_ = false;
    ms = interval_auto_ ? pending_interval_ : 0;
    pending_interval_ = 0;
    if (interval_auto_) why = interval_auto_->reason();
  }
  if (ms <= 0 || ms == interval_ms_.load() || stopping_ || state_.load() != PrimaryState::kProtected) return;
  // QEMU takes a checkpoint whenever the interval is set: the controller
  // changes it at most every few checkpoints.
  Status s = source_->SetInterval(ms);
  MutexLock l(mu_);
  if (!s.ok()) {
    LOG_WARN(Tag()) << "automatic interval: could not set " << ms << " ms: " << s.message();
    interval_note_ = "the last change (" + std::to_string(ms) + " ms) failed: " + s.message();
    if (interval_auto_) interval_auto_->SetCurrent(interval_ms_.load());  // it tries again from there
    return;
  }
  LOG_INFO(Tag()) << "interval " << interval_ms_.load() << " -> " << ms << " ms: " << why;
  interval_ms_ = ms;
  interval_changes_++;
  interval_note_.clear();
}

Status PrimaryLifecycle::Switchover(wire::SwitchoverMsg msg) {
  const std::string& d = opts_.domain;
  {
    MutexLock l(mu_);
    if (!attached_ || !source_) return FailedPrecondition("domain " + d + " is still starting, not protected");
  }
  if (!end_qemu_) return FailedPrecondition("domain " + d + ": this protection cannot end its QEMU; no switchover");
  const PrimaryState s = state_.load();
  if (s == PrimaryState::kSwitchingOver) {
    MutexLock l(mu_);
    return AlreadyExists("domain " + d + ": a switchover is already under way (" + switch_phase_ + ")");
  }
  if (s != PrimaryState::kProtected)
    return FailedPrecondition("domain " + d + " is " + std::string(PrimaryStateName(s)) +
                              ", not protected: a switchover needs the backup to hold a committed checkpoint and "
                              "the link up" +
                              (s == PrimaryState::kSyncing ? " (wait until the initial copy completes)" : ""));
  {
    MutexLock l(mu_);
    switch_started_ = clock_.Now();
    switch_took_ms_ = -1;
    switch_result_.clear();
    switch_status_ = OkStatus();
    msg.reason = "planned switchover";
    switch_msg_ = std::move(msg);
  }
  // QEMU takes the final checkpoint at once (below) or at the next interval.
  SetSwitchPhase("final-checkpoint", std::chrono::seconds(5) + 2 * std::chrono::milliseconds(interval_ms_.load()));
  if (!Advance(PrimaryState::kProtected, PrimaryState::kSwitchingOver)) {
    MutexLock l(mu_);
    switch_phase_.clear();  // never began
    return FailedPrecondition("domain " + d + " is " + std::string(PrimaryStateName(state_.load())) +
                              ", not protected any more");
  }
  switch_requested_ = true;
  LOG_INFO(Tag()) << "switchover to " << opts_.backup << " requested: the next checkpoint is the final one";
  // Setting the interval makes QEMU take a checkpoint now.
  if (Status t = source_->SetInterval(interval_ms_.load()); !t.ok())
    LOG_WARN(Tag()) << "switchover: could not trigger a checkpoint (" << t.message()
                    << "); the next regular one is the final one";
  MutexLock l(mu_);
  ev_cv_.Wait(mu_, [&]() REQUIRES(mu_) { return ended_; });
  if (state_.load() == PrimaryState::kSwitchedOver && switch_status_.ok()) return OkStatus();
  if (!switch_status_.ok()) return switch_status_;
  return Aborted("domain " + d + ": the switchover did not happen: " + (error_.empty() ? switch_result_ : error_) +
                 "; the domain is " + std::string(PrimaryStateName(state_.load())));
}

void PrimaryLifecycle::SetSwitchPhase(const char* phase, Nanos deadline_in) {
  MutexLock l(mu_);
  switch_phase_ = phase;
  switch_deadline_ = deadline_in.count() > 0 ? clock_.Now() + deadline_in : TimePoint::max();
  switch_kick_ = true;
  ev_cv_.NotifyAll();
}

void PrimaryLifecycle::StepSwitchover() {
  if (state_.load() != PrimaryState::kSwitchingOver || stopping_) return;
  const TimePoint now = clock_.Now();
  if (switch_accepted_) return Teardown(OkStatus(), false);
  bool late;
  std::string phase;
  int64_t acked;
  {
    MutexLock l(mu_);
    late = now > switch_deadline_;
    phase = switch_phase_;
    acked = last_acked_epoch_;
  }
  if (switch_told_) {
    // Waiting for the backup's answer: an ERROR (refusal) or a lost link
    // is posted by the ack reader, silence seen by the loop; this is the
    // backstop for a backup that lives but never answers.
    if (late)
      Teardown(DeadlineExceeded("switchover: the backup " + opts_.backup + " did not answer SWITCHOVER within " +
                                std::to_string(static_cast<int64_t>(ToMillis(SendBackstop()))) + " ms"),
               false);
    return;
  }
  const int64_t fe = final_epoch_.load();
  // The final checkpoint is acked and its output released (unless the lease
  // is not valid: then it is never released, and dropped at the end).
  const bool ready = fe >= 0 && acked >= fe && (released_epoch_.load() >= fe || (lease_ && !lease_->Valid()));
  if (!ready) {
    if (late)
      Teardown(DeadlineExceeded(phase == "final-checkpoint"
                                    ? "switchover: QEMU took no final checkpoint in time"
                                    : "switchover: the backup " + opts_.backup + " did not ack the final checkpoint " +
                                          std::to_string(fe) + " within the heartbeat timeout"),
               false);
    return;
  }
  // From here on the backup may promote: our guest never runs again.
  switch_told_ = true;
  SetSwitchPhase("handover", SendBackstop());
  LOG_INFO(Tag()) << "switchover: the backup committed the final checkpoint " << fe << "; telling it to take over";
  std::string payload;
  {
    MutexLock l(mu_);
    payload = wire::EncodeSwitchover(switch_msg_);
  }
  Status s = link_->SendBefore(std::chrono::steady_clock::now() + SendBackstop(), MsgType::kSwitchover,
                               static_cast<uint64_t>(fe), payload, 0,
                               [this] { return hb_.PeerLost(); });
  if (!s.ok()) Teardown(Unavailable("switchover: SWITCHOVER not sent: " + s.message()), false);
}

void PrimaryLifecycle::EndSwitchover(const Status& why, bool qemu_dead) {
  {
    MutexLock l(mu_);
    stopping_ = true;
    cv_.NotifyAll();  // the epoch loop's hold of the final checkpoint, the sender
  }
  const int64_t fe = final_epoch_.load();
  const std::string at = "checkpoint " + std::to_string(fe);
  if (why.ok()) {
    LOG_INFO(Tag()) << "switchover: the backup accepted " << at << "; ending QEMU";
  } else {
    LOG_ERROR(Tag()) << why.message() << "; the backup was told to take over from " << at
                     << ", so our guest never resumes: ending QEMU";
    SetError(why.message() + "; the backup was told to take over from " + at +
             ": it promotes by itself once it notices the primary is gone");
  }
  SetSwitchPhase("ending-qemu");
  Status k = qemu_dead ? OkStatus() : end_qemu_();
  if (!k.ok()) {
    LOG_ERROR(Tag()) << "switchover: ending QEMU: " << k.ToString();
    SetError("switchover: ending QEMU failed (" + k.message() +
             "); it stays paused and must never run again: end it by hand");
  }
  const auto deadline = std::chrono::steady_clock::now() + SendBackstop();
  const std::function<bool()> backup_silent = [this] { return hb_.PeerLost(); };
  if (k.ok()) {
    // Our copy is gone: the backup wins etcd at once instead of a TTL later.
    if (lease_) lease_->Abandon();
    Status f = link_->SendBefore(deadline, MsgType::kFailover, static_cast<uint64_t>(std::max<int64_t>(fe, 0)),
                                 wire::EncodeReason({"planned switchover: QEMU ended after " + at}), 0, backup_silent);
    if (!f.ok()) LOG_WARN(Tag()) << "FAILOVER not sent (" << f.message() << "); the backup promotes on silence";
  }
  EnterFinal(PrimaryState::kSwitchedOver);
  // Everything acked was released on its ACK; the guest sent nothing after
  // the final checkpoint's capture (it stayed paused).
  if (OutputBuffer* nb = netbuf_.load()) (void)nb->Finish(false);
  if (disks_) disks_->Stop(false);
  if (hb_.PeerLost()) link_->Shutdown();
  else link_->ShutdownWrite();
  source_->Abort();
  {
    MutexLock l(mu_);
    switch_took_ms_ = static_cast<int64_t>(ToMillis(clock_.Now() - switch_started_));
    switch_phase_ = why.ok() && k.ok() ? "done" : "failed";
    switch_result_ = why.ok() && k.ok()
                         ? "the backup runs the guest from " + at + "; QEMU here ended"
                         : (why.ok() ? k.message() : why.message()) + "; the backup takes over from " + at;
    switch_status_ = why.ok() ? k : why;
  }
  // The backup runs the guest; tidying up here is no longer on its path.
  if (k.ok() && forget_qemu_) {
    if (Status g = forget_qemu_(); !g.ok())
      LOG_WARN(Tag()) << "switchover: QEMU ended, but " << g.message() << "; the domain may still show as running";
  }
}

void PrimaryLifecycle::OnQemuEvent(const json& ev) {
  // On the monitor's event thread: count, post, never issue a command.
  std::string name = ev.value("event", "");
  if (deps_ready_ && disks_ && name.rfind("BLOCK_JOB_", 0) == 0) disks_->OnEvent(ev);
  const json& ts = ev.contains("timestamp") ? ev["timestamp"] : json::object();
  int64_t us = ts.value("seconds", int64_t{0}) * 1000000 + ts.value("microseconds", int64_t{0});
  if (name == "STOP") {
    stop_ts_us_ = us;
  } else if (name == "RESUME") {
    int64_t s = stop_ts_us_.exchange(-1);
    if (s >= 0 && state_ == PrimaryState::kProtected) {
      last_pause_ms_ = static_cast<double>(us - s) / 1000.0;
      pause_ms_.Add(static_cast<double>(us - s) / 1000.0);
      pause_hist_.Observe(static_cast<double>(us - s) / 1e6);
    }
  } else if (name == "SHUTDOWN") {
    const json& data = ev.contains("data") && ev["data"].is_object() ? ev["data"] : json::object();
    std::string reason = data.value("reason", "");
    if (data.value("guest", false)) {
      LOG_INFO(Tag()) << "the guest shut down (" << reason << "); protection ends with it";
      Post({Cancelled("the guest shut down"), false, false});
    } else {
      // A signal (`virsh destroy`, a host shutdown) or a QMP quit: QEMU
      // exits next, and its death is a failover like any other.
      host_shutdown_ = true;
      LOG_WARN(Tag()) << "QEMU is shutting down on the host's request (" << reason
                      << "), not the guest's; the backup takes over when it exits";
    }
  }
}

void PrimaryLifecycle::OnQemuLost(const std::string& why) {
  LOG_WARN(Tag()) << "QEMU is gone: " << why;
  // Wakes every wait of the epoch loop (the stall fault, backpressure); the
  // loop then ends and reports QEMU's death (EpochLoop).
  MutexLock l(mu_);
  qemu_dead_ = true;
  cv_.NotifyAll();
}

void PrimaryLifecycle::LifecycleLoop() {
  for (;;) {
    Event ev;
    bool have = false, destroy = false;
    {
      MutexLock l(mu_);
      // Events wait while Attach is handing over the pieces.
      // Wake when the backup's silence would reach the timeout.
      Nanos nap = kMaxNap;
      if (IsLive(state_.load()) && !stopping_)
        nap = std::clamp<Nanos>(opts_.heartbeat.timeout - hb_.SinceLastReceived() + std::chrono::milliseconds(1),
                                std::chrono::milliseconds(1), kMaxNap);
      ev_cv_.WaitFor(mu_, nap,
                     [&]() REQUIRES(mu_) {
                       return (!events_.empty() && !attaching_) || destroy_ || switch_kick_ || interval_kick_;
                     });
      switch_kick_ = false;
      if (!events_.empty() && !attaching_) {
        ev = std::move(events_.front());
        events_.pop_front();
        have = true;
      }
      destroy = destroy_ && !have && !attaching_;
    }
    if (have) Teardown(ev.why, ev.qemu_dead);
    if (destroy) {
      Teardown(Cancelled("daemon shutting down"), false);
      return;
    }
    StepSwitchover();
    ApplyAutoInterval();
    if (IsLive(state_.load()) && !stopping_ && hb_.PeerLost()) {
      Teardown(DeadlineExceeded("the backup " + opts_.backup + " has been silent for " +
                                std::to_string(static_cast<int>(ToMillis(hb_.SinceLastReceived()))) +
                                " ms (heartbeat timeout " +
                                std::to_string(static_cast<int>(ToMillis(opts_.heartbeat.timeout))) + " ms)"),
               false);
    }
    // Arbitration: another host won the domain and our copy was destroyed
    // (polled: the lease outlives this object, so it holds no callback of ours).
    if (lease_ && lease_->state() == LeaseState::kLost && !IsFinal(state_.load()) && !stopping_) {
      json a = lease_->StatusJson();
      Teardown(Aborted("fenced: " + a.value("fenced_reason", std::string("the lease was lost")) +
                       "; host '" + a.value("winner", std::string("?")) + "' owns the domain (token " +
                       std::to_string(a.value("token", int64_t{0})) + "), our copy was destroyed"),
               true);
    }
    RetryGiveUp();
  }
}

void PrimaryLifecycle::Teardown(const Status& why, bool qemu_dead) {
  auto finish = [&] {
    MutexLock l(mu_);
    ended_ = true;
    ev_cv_.NotifyAll();
  };
  if (IsFinal(state_.load())) return finish();
  // SWITCHOVER went out: the backup may promote, so whatever ends the
  // switchover now, our guest never runs again. (A refusal is the one
  // exception: the backup said it never promotes this session.)
  if (switch_told_ && !switch_refused_) {
    EndSwitchover(why.code() == Code::kCancelled ? Status(Code::kAborted, why.message()) : why, qemu_dead);
    return finish();
  }
  if (state_.load() == PrimaryState::kSwitchingOver) {
    SetSwitchPhase("aborted");
    MutexLock l(mu_);
    switch_took_ms_ = static_cast<int64_t>(ToMillis(clock_.Now() - switch_started_));
    switch_result_ = "aborted before the backup was told to take over (" + why.message() + "); the guest resumes here";
    switch_status_ = Aborted("domain " + opts_.domain + ": switchover " + switch_result_ + ", unprotected");
  }
  const bool on_purpose = why.code() == Code::kCancelled;
  if (!on_purpose) SetError(why.message());
  bool attached;
  {
    MutexLock l(mu_);
    stopping_ = true;
    attached = attached_;
    cv_.NotifyAll();  // backpressure, flow control, the sender, the stall fault
  }
  if (!attached) {
    // A start that never got as far as Attach: nothing to undo here.
    if (!on_purpose) LOG_ERROR(Tag()) << "protection did not start: " << why.message();
    EnterFinal(on_purpose ? PrimaryState::kStopped : PrimaryState::kUnprotected);
    return finish();
  }
  OutputBuffer* nb = netbuf_.load();
  // Last words are worth waiting for while the backup lives (a GOODBYE that
  // never arrives makes it promote), never once it has gone silent.
  const auto last_words_deadline = std::chrono::steady_clock::now() + SendBackstop();
  const std::function<bool()> backup_silent = [this] { return hb_.PeerLost(); };
  // Fenced for good: another host owns the domain and our copy was
  // destroyed. Nothing held leaves; the backup (the winner, or it knows
  // better) needs no word.
  auto end_fenced = [&] {
    EnterFinal(PrimaryState::kFenced);
    if (nb) (void)nb->Finish(false);
    if (disks_) disks_->Stop(false);
    link_->Shutdown();
    source_->Abort();
    finish();
  };
  if (qemu_dead && lease_ && lease_->state() == LeaseState::kLost) {
    LOG_ERROR(Tag()) << why.message();
    return end_fenced();
  }
  if (qemu_dead) {
    // The guest is gone: give up the lease now, so the backup wins at once
    // instead of a TTL from now.
    if (lease_) lease_->Abandon();
    LOG_ERROR(Tag()) << why.message() << "; telling the backup to take over";
    // The backup promotes on silence anyway; FAILOVER only makes it quicker.
    Status f = link_->SendBefore(last_words_deadline, MsgType::kFailover, 0, wire::EncodeReason({why.message()}), 0,
                                 backup_silent);
    if (!f.ok()) LOG_WARN(Tag()) << "FAILOVER not sent (" << f.message() << "); the backup promotes on silence";
    EnterFinal(PrimaryState::kFailedOver);
    // The guest is gone: what it sent after the last ACK is dropped, since
    // the backup resumes from a state that never sent it.
    if (nb) (void)nb->Finish(false);
    if (disks_) disks_->Stop(false);
    // The ack reader keeps reading until the backup closes its end, so the
    // last frame is delivered, not reset (see Link::ShutdownWrite).
    link_->ShutdownWrite();
    source_->Abort();
    return finish();
  }
  if (on_purpose) LOG_INFO(Tag()) << "protection ends: " << why.message();
  else LOG_ERROR(Tag()) << "protection lost: " << why.message() << "; the guest keeps running unprotected";
  // First the guest: it may be paused on backpressure (LOADED withheld),
  // and nothing that could wait on the backup comes before its release.
  ReleaseGuest();
  Status g = link_->SendBefore(last_words_deadline, MsgType::kGoodbye, 0, wire::EncodeReason({why.message()}), 0,
                               backup_silent);
  if (!g.ok()) LOG_WARN(Tag()) << "GOODBYE not sent: " << g.message();
  // The guest runs on unprotected: release everything it sent, once no
  // backup can promote this session any more.
  const bool retired = RetireSession(why);
  if (!retired && lease_ && lease_->state() == LeaseState::kLost) return end_fenced();
  if (nb) (void)nb->Finish(retired);
  // The guest keeps its own disk; the mirror target goes away. QMP
  // commands: this is why teardown never runs on the monitor's thread.
  if (disks_) disks_->Stop(true);
  EnterFinal(on_purpose ? PrimaryState::kStopped : PrimaryState::kUnprotected);
  // A silent backup gets no chance to drain: both directions go, which also
  // ends a write stuck on it. Otherwise read on until the backup closes.
  if (hb_.PeerLost()) link_->Shutdown();
  else link_->ShutdownWrite();
  source_->Abort();
  finish();
}

bool PrimaryLifecycle::RetireSession(const Status& why) {
  if (!lease_) return true;
  std::string last;
  for (;;) {
    Status r = lease_->Retire(why.message());
    if (r.ok()) return true;
    if (lease_->state() == LeaseState::kLost) return false;
    if (r.message() != last) {
      LOG_WARN(Tag()) << "output stays held until the session is retired in etcd: " << r.message();
      SetError("waiting to retire the session in etcd: " + r.message());
      last = r.message();
    }
    MutexLock l(mu_);
    if (destroy_) return false;
    ev_cv_.WaitFor(mu_, std::chrono::milliseconds(250), [&]() REQUIRES(mu_) { return destroy_; });
  }
}

void PrimaryLifecycle::ReleaseGuest() {
  Status g = source_->GiveUp();
  if (g.ok()) return;
  LOG_ERROR(Tag()) << g.ToString();
  SetError(g.message());
  // libvirtd is away: QEMU's COLO engine waits for x-colo-lost-heartbeat (a
  // guest stopped mid-checkpoint stays stopped until then): retry once
  // libvirt is back.
  if (monitor_connected_ && g.code() == Code::kUnavailable) {
    MutexLock l(mu_);
    give_up_pending_ = true;
    give_up_deadline_ = clock_.Now() + kGiveUpRetryFor;
  }
}

void PrimaryLifecycle::RetryGiveUp() {
  {
    MutexLock l(mu_);
    if (!give_up_pending_) return;
    if (qemu_dead_ || clock_.Now() > give_up_deadline_) {
      give_up_pending_ = false;
      return;
    }
    // Pace the retries; an event or the destructor ends the nap early.
    ev_cv_.WaitFor(mu_, kGiveUpRetryEvery, [&]() REQUIRES(mu_) { return !events_.empty() || destroy_; });
    if (destroy_) return;
  }
  if (!monitor_connected_()) return;
  Status g = source_->GiveUp();
  MutexLock l(mu_);
  if (g.ok()) {
    LOG_INFO(Tag()) << "libvirt is back: left COLO, the guest runs unprotected";
    error_ += " (COLO ended once libvirt was back)";
    give_up_pending_ = false;
    return;
  }
  LOG_ERROR(Tag()) << "leaving COLO after libvirt came back: " << g.ToString();
  if (g.code() != Code::kUnavailable) give_up_pending_ = false;
}

void PrimaryLifecycle::FillStatus(json* out) const {
  json& j = *out;
  const PrimaryState st = state_.load();
  j["state"] = PrimaryStateName(st);
  // Pages dirtied during the first pass are sent again, so the bytes sent can
  // pass the guest's size before the copy is complete.
  uint64_t total = sync_total_bytes_, done = std::min<uint64_t>(sync_done_bytes_, sync_total_bytes_);
  double pct = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0;
  if (st == PrimaryState::kSyncing || st == PrimaryState::kStarting) pct = std::min(pct, 99.0);
  else if (st == PrimaryState::kProtected) pct = 100.0;
  bool attached;
  {
    MutexLock l(mu_);
    attached = attached_;
    j["last_acked_epoch"] = last_acked_epoch_;
    j["last_staged_epoch"] = last_staged_epoch_;
    j["unacked_epochs"] = unacked_.size();
    j["unacked_bytes"] = unacked_bytes_;
    j["error"] = error_;
    // The initial copy: what the delta resync kept of the backup's image.
    uint64_t kept = initial_kept_pages_;
    j["initial_copy"] = {{"mode", delta_offered_ ? "delta" : "full"},
                         {"pages_sent", initial_sent_pages_.load()},
                         {"pages_kept", kept},
                         {"bytes_saved", kept * wire::kPageSize},
                         {"wire_bytes", initial_wire_bytes_.load()},
                         {"note", resync_note_}};
  }
  if (attached && disks_) {
    json dj = disks_->Progress();
    if (st == PrimaryState::kSyncing) pct = std::min(pct, std::min(99.0, 100.0 * disks_->Fraction()));
    j["disks"] = dj;
  }
  j["sync"] = {{"total_bytes", total}, {"done_bytes", done}, {"percent", pct}};
  j["interval_ms"] = interval_ms_.load();
  {
    MutexLock l(mu_);
    if (interval_auto_) {
      const IntervalController& c = *interval_auto_;
      const IntervalControllerOptions& o = c.options();
      j["interval_mode"] = "auto";
      j["latency_budget_ms"] = o.latency_budget_ms;
      j["interval_reason"] = interval_note_.empty() ? c.reason() : c.reason() + "; " + interval_note_;
      j["interval_auto"] = {{"min_ms", o.min_ms},
                            {"max_ms", o.max_ms},
                            {"target_ms", c.interval_ms()},
                            {"ack_estimate_ms", c.ack_estimate_ms() < 0 ? 0.0 : c.ack_estimate_ms()},
                            {"saturated", c.saturated()},
                            {"changes", interval_changes_.load()}};
    } else {
      j["interval_mode"] = "fixed";
      j["latency_budget_ms"] = 0;
      j["interval_reason"] = interval_note_;
    }
  }
  j["compress"] = wire::CompressionName(opts_.compress, xor_cache_ != nullptr);
  if (xor_cache_) {
    // The page versions "xor-lz4" keeps on this host, and how often a page
    // went as an XOR record.
    const PageVersionCache::Stats c = xor_cache_->stats();
    j["xor_cache"] = {{"capacity_bytes", c.capacity_bytes}, {"bytes", c.bytes},     {"pages", c.pages},
                      {"hits", c.hits},                     {"misses", c.misses}, {"evictions", c.evictions}};
  }
  j["checkpoints_total"] = checkpoints_total_.load();
  j["checkpoints_per_sec"] = checkpoints_.PerSecond();
  j["pause_ms"] = {{"p50", pause_ms_.Quantile(0.5)}, {"p99", pause_ms_.Quantile(0.99)},
                   {"mean", pause_ms_.Mean()}, {"samples", pause_ms_.size()}};
  j["ack_ms"] = {{"p50", ack_ms_.Quantile(0.5)}, {"p99", ack_ms_.Quantile(0.99)}};
  // The part of each pause between our REPLY and our LOADED (QEMU serializes
  // and we stage); the rest of pause_ms is QEMU stopping and resuming.
  j["stage_ms"] = {{"p50", stage_ms_.Quantile(0.5)}, {"p99", stage_ms_.Quantile(0.99)}, {"mean", stage_ms_.Mean()}};
  j["dirty_pages_per_epoch"] = {{"p50", dirty_pages_.Quantile(0.5)}, {"mean", dirty_pages_.Mean()}};
  j["bytes_per_epoch"] = {{"p50", epoch_bytes_.Quantile(0.5)}, {"mean", epoch_bytes_.Mean()}};
  j["backpressure_waits"] = backpressure_waits_.load();
  j["releases_deferred"] = releases_deferred_.load();
  j["dirty_pages_total"] = dirty_pages_total_.load();
  j["epoch_bytes_total"] = epoch_bytes_total_.load();
  j["checkpoint_page_bytes"] = {{"raw", ckpt_page_bytes_raw_.load()}, {"wire", ckpt_page_bytes_wire_.load()}};
  j["histograms"] = {{"pause_seconds", HistogramToJson(pause_hist_.Snapshot())},
                     {"ack_seconds", HistogramToJson(ack_hist_.Snapshot())},
                     {"dirty_pages", HistogramToJson(dirty_hist_.Snapshot())}};
  j["link"] = {{"bytes_sent", attached && link_ ? link_->bytes_sent() : 0}};
  MutexLock l(mu_);
  if (!switch_phase_.empty()) {
    json sw = {{"phase", switch_phase_}, {"final_epoch", final_epoch_.load()}, {"result", switch_result_},
               {"reprotect_to", switch_msg_.reprotect_to}};
    if (switch_took_ms_ >= 0) sw["took_ms"] = switch_took_ms_;
    else sw["elapsed_ms"] = static_cast<int64_t>(ToMillis(clock_.Now() - switch_started_));
    if (!switch_status_.ok()) sw["error"] = switch_status_.message();
    j["switchover"] = sw;
  }
}

}  // namespace remus
