// The backup's server: accepts links from primaries, authenticates them,
// hands each to its domain (domain.h), and serves the operator's failover and
// status. It owns the connection threads, the domains and the process
// launcher.
//
// Connections: at most opts.max_connections are served at once, and at most
// opts.max_handshakes of them may be unauthenticated; more are closed at once
// with a log line. Finished connection threads are joined as new ones arrive.
//
// Thread-safety: public methods are thread-safe.
#pragma once

#include <atomic>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/io.h"
#include "common/thread_annotations.h"
#include "heartbeat/promotion.h"
#include "replicator/backup/domain.h"
#include "replicator/qemu/launcher.h"

namespace remus {

class BackupServer {
 public:
  // launcher: how promoted QEMUs start (nullptr: posix_spawn).
  BackupServer(BackupOptions opts, const Clock& clock, std::unique_ptr<Arbiter> arbiter,
               std::unique_ptr<ProcessLauncher> launcher = nullptr);
  ~BackupServer();

  // Recovers the domains kept in the state dir, listens on addr and serves
  // connections in the background.
  Status Listen(const HostPort& addr);
  // Operator-requested promotion (`remusctl failover`).
  Status Failover(const std::string& domain);
  nlohmann::json StatusJson(const std::string& domain_or_empty) const;
  bool HasDomain(const std::string& domain) const;
  // The guest this backup promoted for `domain`, while it runs here.
  std::optional<BackupDomain::PromotedGuest> RunningGuest(const std::string& domain) const;
  // Connections being served (tests, metrics).
  int connections() const;

 private:
  struct Conn {
    std::thread thread;
    int fd = -1;
    bool done = false;
  };
  void AcceptLoop();
  void Serve(Fd fd, Conn* conn);
  std::shared_ptr<BackupDomain> GetOrCreate(const std::string& domain);
  void ReapFinished() REQUIRES(mu_);

  BackupOptions opts_;
  const Clock& clock_;
  std::unique_ptr<Arbiter> arbiter_;
  std::unique_ptr<ProcessLauncher> launcher_;  // outlives the domains
  Fd listen_fd_;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<BackupDomain>> domains_ GUARDED_BY(mu_);
  std::list<Conn> conns_ GUARDED_BY(mu_);
  int handshakes_ GUARDED_BY(mu_) = 0;
};

}  // namespace remus
