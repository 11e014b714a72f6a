#include "replicator/qemu/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"

extern char** environ;

namespace remus {

namespace {
int PidfdOpen(int pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}
}  // namespace

PosixSpawnLauncher::PosixSpawnLauncher() : wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  reaper_ = std::thread([this] { ReapLoop(); });
}

PosixSpawnLauncher::~PosixSpawnLauncher() {
  {
    MutexLock l(mu_);
    stopping_ = true;
  }
  Wake();
  reaper_.join();
}

void PosixSpawnLauncher::Wake() {
  uint64_t one = 1;
  if (wake_fd_.valid()) (void)!::write(wake_fd_.get(), &one, sizeof one);
}

StatusOr<int> PosixSpawnLauncher::Spawn(const SpawnSpec& spec) {
  if (spec.argv.empty()) return InvalidArgument("nothing to start: empty argv");
  std::vector<std::string> args = spec.argv;
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  const std::string log = spec.log_path.empty() ? "/dev/null" : spec.log_path;
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  // remusd blocks SIGINT and SIGTERM for its signal thread and ignores
  // SIGPIPE: the child gets an empty mask and default dispositions.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, cargv[0], &fa, &attr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return ErrnoStatus("starting " + spec.argv[0], rc);
  {
    MutexLock l(mu_);
    Child& c = children_[pid];
    c.pidfd = Fd(PidfdOpen(pid));  // invalid without pidfd support: polled instead
  }
  Wake();
  return static_cast<int>(pid);
}

bool PosixSpawnLauncher::Running(int pid) {
  MutexLock l(mu_);
  auto it = children_.find(pid);
  return it != children_.end() && !it->second.exited;
}

Status PosixSpawnLauncher::Kill(int pid, std::chrono::milliseconds wait) {
  MutexLock l(mu_);
  auto it = children_.find(pid);
  if (it == children_.end()) return NotFound("process " + std::to_string(pid) + " was not started by remusd");
  if (!it->second.exited) ::kill(pid, SIGKILL);  // not reaped yet: the pid is still ours
  l.Unlock();
  Wake();
  l.Lock();
  // An explicit loop: clang's analysis cannot see a predicate's lock through
  // CondVar's template.
  auto deadline = std::chrono::steady_clock::now() + wait;
  while (!children_[pid].exited)
    if (!exited_cv_.WaitUntil(mu_, deadline) && !children_[pid].exited) break;
  if (!children_[pid].exited) return DeadlineExceeded("process " + std::to_string(pid) + " outlived SIGKILL");
  return OkStatus();
}

void PosixSpawnLauncher::ReapLoop() {
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<int> pids;
    {
      MutexLock l(mu_);
      if (stopping_) return;
      fds.push_back({wake_fd_.get(), POLLIN, 0});
      for (auto& [pid, c] : children_) {
        if (c.exited) continue;
        pids.push_back(pid);
        if (c.pidfd.valid()) fds.push_back({c.pidfd.get(), POLLIN, 0});
      }
    }
    // Without pidfds (old kernels) the children are polled now and then.
    (void)::poll(fds.data(), fds.size(), 200);
    uint64_t n;
    while (::read(wake_fd_.get(), &n, sizeof n) > 0) {
    }
    for (int pid : pids) {
      int st = 0;
      // Only this thread reaps, and only pids it spawned.
      pid_t r = ::waitpid(pid, &st, WNOHANG);
      if (r != pid && !(r < 0 && errno == ECHILD)) continue;
      MutexLock l(mu_);
      Child& c = children_[pid];
      c.exited = true;
      c.wait_status = st;
      c.pidfd.Reset();
      exited_cv_.NotifyAll();
      if (WIFSIGNALED(st)) LOG_WARN("launcher") << "process " << pid << " was killed by signal " << WTERMSIG(st);
      else LOG_INFO("launcher") << "process " << pid << " exited with status " << WEXITSTATUS(st);
    }
  }
}

}  // namespace remus
