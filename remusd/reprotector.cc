#include "remusd/reprotector.h"

#include <algorithm>

#include "common/log.h"

namespace remus {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

Reprotector::Reprotector(Deps deps, std::chrono::milliseconds first_backoff, std::chrono::milliseconds max_backoff)
    : deps_(std::move(deps)), first_backoff_(first_backoff), max_backoff_(max_backoff) {
  thread_ = std::thread([this] { Loop(); });
}

Reprotector::~Reprotector() { Stop(); }

void Reprotector::Stop() {
  {
    MutexLock l(mu_);
    stop_ = true;
    cv_.NotifyAll();
  }
  if (thread_.joinable()) thread_.join();
}

void Reprotector::Request(ReprotectJob job) {
  MutexLock l(mu_);
  Entry& e = jobs_[job.domain];
  e = Entry{};
  e.job = std::move(job);
  e.next = Clock::now();
  e.backoff = first_backoff_;
  e.id = ++next_id_;
  LOG_INFO("reprotect") << "domain " << e.job.domain << ": will protect the promoted guest again to " << e.job.to;
  cv_.NotifyAll();
}

void Reprotector::Cancel(const std::string& domain) {
  MutexLock l(mu_);
  auto it = jobs_.find(domain);
  if (it == jobs_.end() || it->second.state == "done") return;
  it->second.state = "cancelled";
  cv_.NotifyAll();
}

json Reprotector::StatusJson(const std::string& domain) const {
  MutexLock l(mu_);
  auto it = jobs_.find(domain);
  if (it == jobs_.end()) return nullptr;
  const Entry& e = it->second;
  json j = {{"to", e.job.to}, {"state", e.state}, {"attempts", e.attempts}};
  if (!e.error.empty()) j["error"] = e.error;
  return j;
}

void Reprotector::Loop() {
  MutexLock l(mu_);
  while (!stop_) {
    // The job due first.
    Entry* due = nullptr;
    for (auto& [d, e] : jobs_)
      if ((e.state == "waiting" || e.state == "trying") && (!due || e.next < due->next)) due = &e;
    if (!due) {
      cv_.Wait(mu_);
      continue;
    }
    if (Clock::now() < due->next) {
      cv_.WaitUntil(mu_, due->next);
      continue;
    }
    const ReprotectJob job = due->job;
    const uint64_t id = due->id;
    const int attempt = ++due->attempts;
    due->state = "trying";
    l.Unlock();
    Status s;
    bool wanted = deps_.wanted(job.domain);
    if (wanted) s = deps_.protect(job.protect_request);
    l.Lock();
    auto it = jobs_.find(job.domain);
    if (it == jobs_.end() || it->second.id != id || it->second.state == "cancelled") continue;  // replaced meanwhile
    Entry& e = it->second;
    if (!wanted) {
      e.state = "cancelled";
      e.error = "the promoted guest no longer runs here, or was protected by hand";
      continue;
    }
    if (s.ok()) {
      e.state = "done";
      e.error.clear();
      l.Unlock();
      LOG_INFO("reprotect") << "domain " << job.domain << ": protection to " << job.to << " started (attempt "
                            << attempt << ")";
      deps_.report(job.domain, "re-protecting automatically to " + job.to);
      l.Lock();
      continue;
    }
    const bool first_failure = e.error.empty();
    e.error = s.message();
    e.state = "waiting";
    e.next = Clock::now() + e.backoff;
    e.backoff = std::min(e.backoff * 2, max_backoff_);
    if (first_failure) {
      const std::string text = "automatic re-protection to " + job.to + " waits: " + s.message() + " (retrying)";
      l.Unlock();
      LOG_WARN("reprotect") << "domain " << job.domain << ": " << text;
      deps_.report(job.domain, text);
      l.Lock();
    }
  }
}

}  // namespace remus
