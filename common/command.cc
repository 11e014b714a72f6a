#include "common/command.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>

#include "common/io.h"

extern char** environ;

namespace remus {
std::string FindProgram(const std::string& name, const std::string& extra_dirs) {
  if (name.find('/') != std::string::npos) return name;
  const char* env = std::getenv("PATH");
  std::string path = (env && *env ? std::string(env) : std::string("/usr/local/bin:/usr/bin:/bin")) + ":" + extra_dirs;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find(':', i);
    if (j == std::string::npos) j = path.size();
    std::string dir = path.substr(i, j - i);
    if (!dir.empty() && dir[0] == '/') {  // never a relative PATH entry
      std::string full = dir + "/" + name;
      struct stat st {};
      if (::stat(full.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(full.c_str(), X_OK) == 0) return full;
    }
    i = j + 1;
  }
  return "";
}

std::string CommandLine(const std::vector<std::string>& argv) {
  std::string s;
  for (const std::string& a : argv) {
    if (!s.empty()) s += ' ';
    if (a.empty() || a.find_first_of(" \t\"'") != std::string::npos) s += "'" + a + "'";
    else s += a;
  }
  return s;
}

StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  if (argv.empty()) return InvalidArgument("empty command");
  std::string prog = FindProgram(argv[0], "/usr/sbin:/sbin:/usr/bin:/bin");
  if (prog.empty()) return NotFound(argv[0] + " is not installed");

  int outp[2], errp[2];
  if (::pipe2(outp, O_CLOEXEC) != 0) return ErrnoStatus("pipe", errno);
  Fd out_r(outp[0]), out_w(outp[1]);
  if (::pipe2(errp, O_CLOEXEC) != 0) return ErrnoStatus("pipe", errno);
  Fd err_r(errp[0]), err_w(errp[1]);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_w.get(), 1);
  posix_spawn_file_actions_adddup2(&fa, err_w.get(), 2);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  // remusd blocks SIGINT/SIGTERM for its signal thread and ignores SIGPIPE;
  // the tools we run get a clean signal state.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  int rc = ::posix_spawn(&pid, prog.c_str(), &fa, &attr, args.data(), environ);
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return ErrnoStatus("running " + prog, rc);
  out_w.Reset();
  err_w.Reset();

  CommandResult res;
  struct pollfd p[2] = {{out_r.get(), POLLIN, 0}, {err_r.get(), POLLIN, 0}};
  std::string* sink[2] = {&res.out, &res.err};
  int open = 2;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool timed_out = false;
  while (open > 0) {
    int wait_ms = -1;
    if (timeout.count() > 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        timed_out = true;
        ::kill(pid, SIGKILL);  // not reaped yet: the pid is still ours
        break;
      }
      wait_ms = static_cast<int>(left.count());
    }
    int n = ::poll(p, 2, wait_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (n == 0) continue;
    for (int i = 0; i < 2; i++) {
      if (p[i].fd < 0 || p[i].revents == 0) continue;
      char buf[4096];
      ssize_t r = ::read(p[i].fd, buf, sizeof buf);
      if (r > 0) {
        sink[i]->append(buf, static_cast<size_t>(r));
      } else if (r == 0 || errno != EINTR) {
        p[i].fd = -1;
        open--;
      }
    }
  }
  int wst = 0;
  while (::waitpid(pid, &wst, 0) < 0) {
    if (errno != EINTR) return ErrnoStatus("waitpid " + prog, errno);
  }
  if (timed_out)
    return DeadlineExceeded(CommandLine(argv) + " did not finish within " + std::to_string(timeout.count()) + " ms");
  res.exit_code = WIFEXITED(wst) ? WEXITSTATUS(wst) : 128 + WTERMSIG(wst);
  return res;
}

Status RunChecked(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CommandResult r, RunCommand(argv));
  if (r.exit_code == 0) return OkStatus();
  std::string msg = r.err.empty() ? r.out : r.err;
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  if (msg.empty()) msg = "exit code " + std::to_string(r.exit_code);
  return Internal(CommandLine(argv) + ": " + msg);
}

}  // namespace remus
