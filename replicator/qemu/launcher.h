// Starting and stopping the processes remusd owns (a promoted QEMU): the OS
// boundary behind an interface, so promotion is unit-tested with a fake.
//
// A ProcessLauncher owns the children it spawned: it reaps every one of them
// (no zombies, no thread per child), reports whether each still runs, and can
// kill one and wait until it is gone. A child outlives its launcher: when the
// launcher is destroyed, its children run on unreaped (a promoted guest must
// survive a remusd restart), and the launcher's own thread is joined.
//
// Thread-safety: every method is thread-safe.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus {

struct SpawnSpec {
  std::vector<std::string> argv;  // argv[0] is looked up in PATH
  std::string log_path;           // stdout and stderr, appended to; stdin is /dev/null
};

class ProcessLauncher {
 public:
  virtual ~ProcessLauncher() = default;
  // Starts argv in a session of its own, with default signal dispositions and
  // an empty signal mask. Returns its pid.
  virtual StatusOr<int> Spawn(const SpawnSpec& spec) = 0;
  // Whether a child spawned here has not exited yet. False for unknown pids.
  virtual bool Running(int pid) = 0;
  // SIGKILL, then waits (at most `wait`) until the child is reaped. OK when it
  // is gone (or was already); DeadlineExceeded if it outlived `wait`;
  // NotFound for a pid this launcher did not spawn.
  virtual Status Kill(int pid, std::chrono::milliseconds wait = std::chrono::seconds(5)) = 0;
};

// posix_spawn rather than fork: remusd is multithreaded, and a forked child
// may not allocate (another thread may hold malloc's lock). One reaper thread
// polls the children's pidfds.
class PosixSpawnLauncher final : public ProcessLauncher {
 public:
  PosixSpawnLauncher();
  ~PosixSpawnLauncher() override;

  StatusOr<int> Spawn(const SpawnSpec& spec) override;
  bool Running(int pid) override;
  Status Kill(int pid, std::chrono::milliseconds wait) override;

 private:
  struct Child {
    Fd pidfd;
    bool exited = false;
    int wait_status = 0;
  };
  void ReapLoop();
  void Wake();

  Mutex mu_;
  CondVar exited_cv_;
  std::map<int, Child> children_ GUARDED_BY(mu_);
  bool stopping_ GUARDED_BY(mu_) = false;
  Fd wake_fd_;  // an eventfd: the set of children changed, or stop
  std::thread reaper_;
};

}  // namespace remus
