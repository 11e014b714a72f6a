#include "replicator/qemu/version.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <charconv>
#include <map>
#include <utility>

#include "common/io.h"
#include "common/thread_annotations.h"

extern char** environ;

namespace remus::qemu {

std::string QemuRelease::ToString() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(micro);
}

StatusOr<QemuRelease> ParseQemuRelease(std::string_view v) {
  QemuRelease r;
  int* parts[] = {&r.major, &r.minor, &r.micro};
  const char* p = v.data();
  const char* end = v.data() + v.size();
  for (int i = 0; i < 3; i++) {
    auto [next, ec] = std::from_chars(p, end, *parts[i]);
    if (ec != std::errc() || *parts[i] < 0) return InvalidArgument("'" + std::string(v) + "' is not a QEMU version");
    p = next;
    if (i < 2) {
      if (p == end || *p != '.') return InvalidArgument("'" + std::string(v) + "' is not a QEMU version");
      ++p;
    }
  }
  // Development builds say "10.0.50"; a suffix ("-rc1") is not expected from
  // query-version's numbers, but tolerated from -version's text.
  return r;
}

StatusOr<QemuRelease> ParseVersionOutput(std::string_view out) {
  constexpr std::string_view kPrefix = "QEMU emulator version ";
  size_t at = out.find(kPrefix);
  if (at == std::string_view::npos)
    return InvalidArgument("not QEMU's -version output: '" + std::string(out.substr(0, 80)) + "'");
  std::string_view rest = out.substr(at + kPrefix.size());
  size_t end = rest.find_first_of(" \n(");
  return ParseQemuRelease(rest.substr(0, end));
}

namespace {

// A child of its own, reaped here (ProcessLauncher's reaper only reaps the
// pids it spawned). posix_spawn: remusd is multithreaded.
StatusOr<std::string> RunForOutput(const std::string& binary, std::chrono::milliseconds timeout) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return ErrnoStatus("pipe", errno);
  Fd rd(p[0]), wr(p[1]);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, wr.get(), 1);
  posix_spawn_file_actions_adddup2(&fa, wr.get(), 2);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::string a0 = binary, a1 = "-version";
  char* argv[] = {a0.data(), a1.data(), nullptr};
  pid_t pid = -1;
  int rc = ::posix_spawn(&pid, binary.c_str(), &fa, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return ErrnoStatus("running " + binary + " -version", rc);
  wr.Reset();
  std::string out;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{rd.get(), POLLIN, 0};
    int n = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;
    char buf[4096];
    ssize_t got = ::read(rd.get(), buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    if (out.size() < 65536) out.append(buf, static_cast<size_t>(got));
  }
  if (timed_out) ::kill(pid, SIGKILL);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) return DeadlineExceeded(binary + " -version did not answer within " +
                                         std::to_string(timeout.count()) + " ms");
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
    return FailedPrecondition(binary + " -version failed: " + out.substr(0, 200));
  return out;
}

Mutex cache_mu;
std::map<std::pair<std::string, int64_t>, QemuRelease> cache GUARDED_BY(cache_mu);

}  // namespace

StatusOr<QemuRelease> QemuBinaryVersion(const std::string& binary) {
  struct stat st {};
  if (::stat(binary.c_str(), &st) != 0) return ErrnoStatus("QEMU binary " + binary, errno);
  auto key = std::make_pair(binary, static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
  {
    MutexLock g(cache_mu);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  ASSIGN_OR_RETURN(std::string out, RunForOutput(binary, std::chrono::seconds(5)));
  ASSIGN_OR_RETURN(QemuRelease r, ParseVersionOutput(out));
  MutexLock g(cache_mu);
  cache[key] = r;
  return r;
}

Status CheckSameRelease(const std::string& domain, const QemuRelease& primary, const QemuRelease& backup,
                        const std::string& backup_binary) {
  if (primary.major == backup.major && primary.minor == backup.minor) return OkStatus();
  return FailedPrecondition("domain " + domain + ": the primary runs QEMU " + primary.ToString() +
                            " but this backup would restore it with QEMU " + backup.ToString() + " (" +
                            backup_binary + "); a checkpoint is restored only by the same QEMU release "
                            "(major.minor), so install the same QEMU release on both hosts");
}

}  // namespace remus::qemu
