// Automatic re-protection after a failover (docs/architecture.md,
// "Re-protection"). When this host's backup side promotes a guest whose
// primary asked for it (CONFIG reprotect_to), the promoted guest is protected
// again to that host with no command: the protection that failed over names
// where protection goes next. The host named is usually the primary itself,
// which runs remusd --listen: once its remusd is back, the next attempt finds
// it, so "A offers itself" is A's remusd listening again.
//
// One job per domain: try, and on failure wait (1 s, doubling, at most
// max_backoff) and try again, until the protection starts, or the job is no
// longer wanted (the promoted guest stopped running here, an operator
// protected or unprotected it, remusd stops). Each attempt and its outcome
// shows in StatusJson and in the history (report).
//
// Thread-safety: public methods are thread-safe. One thread runs the jobs;
// Protect and Wanted are called on it without this class's lock held.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus {

struct ReprotectJob {
  std::string domain;
  std::string to;  // "host:port"
  nlohmann::json protect_request;  // the control request to run ("command": "protect", ...)
};

class Reprotector {
 public:
  struct Deps {
    // Runs the protect request; OK once protection started.
    std::function<Status(const nlohmann::json& request)> protect;
    // Whether the job is still wanted: false ends it (the guest is gone, or
    // someone protected it meanwhile).
    std::function<bool(const std::string& domain)> wanted;
    // One sentence for the domain's history.
    std::function<void(const std::string& domain, const std::string& text)> report;
  };
  Reprotector(Deps deps, std::chrono::milliseconds first_backoff = std::chrono::seconds(1),
              std::chrono::milliseconds max_backoff = std::chrono::seconds(10));
  ~Reprotector();  // Stop()

  // Starts (or replaces) the domain's job; its first attempt is at once.
  void Request(ReprotectJob job) EXCLUDES(mu_);
  // Ends the domain's job, if any (an operator's protect or unprotect).
  void Cancel(const std::string& domain) EXCLUDES(mu_);
  void Stop() EXCLUDES(mu_);
  // {"to","state" ("trying", "waiting", "done", "cancelled"),"attempts","error"};
  // null when the domain never had a job.
  nlohmann::json StatusJson(const std::string& domain) const EXCLUDES(mu_);

 private:
  struct Entry {
    ReprotectJob job;
    std::string state = "waiting";
    int attempts = 0;
    std::string error;
    std::chrono::steady_clock::time_point next{};
    std::chrono::milliseconds backoff{0};
    uint64_t id = 0;
  };
  void Loop() EXCLUDES(mu_);

  const Deps deps_;
  const std::chrono::milliseconds first_backoff_, max_backoff_;
  mutable Mutex mu_;
  CondVar cv_;
  bool stop_ GUARDED_BY(mu_) = false;
  uint64_t next_id_ GUARDED_BY(mu_) = 0;
  std::map<std::string, Entry> jobs_ GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace remus
