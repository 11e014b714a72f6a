// Backend selection, the support check and crash cleanup (see netbuf.h).
#include "netbuf/netbuf.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/io.h"
#include "netbuf/nfqueue.h"
#include "netbuf/plug.h"

namespace remus {

StatusOr<std::unique_ptr<OutputBuffer>> MakeOutputBuffer(const NetbufOptions& opts) {
  if (opts.mode == "none") return std::unique_ptr<OutputBuffer>(std::make_unique<NoOutputBuffer>());
  if (opts.mode == "nfqueue") return netbuf::MakeNfqueueOutputBuffer(opts);
  if (opts.mode == "plug") return netbuf::MakePlugOutputBuffer(opts);
  return InvalidArgument("unknown netbuf mode '" + opts.mode + "'; expected plug, nfqueue or none");
}

StatusOr<std::unique_ptr<OutputBuffer>> MakeOutputBuffer(std::string_view mode) {
  if (mode == "plug" || mode == "nfqueue")
    return InvalidArgument("netbuf mode '" + std::string(mode) + "' needs the domain's name and its tap interfaces");
  NetbufOptions o;
  o.mode = std::string(mode);
  return MakeOutputBuffer(o);
}

Status CleanupStaleNetbuf() {
  Status a = netbuf::CleanupStaleNfqueue();
  Status b = netbuf::CleanupStalePlug();
  if (!a.ok()) return a.Annotate("removing stale netbuf rules");
  if (!b.ok()) return b.Annotate("removing stale netbuf devices");
  return OkStatus();
}

Status CheckNetbufSupport(std::string_view mode) {
  Status (*check)() = nullptr;
  if (mode == "none") return OkStatus();
  if (mode == "nfqueue") check = netbuf::CheckNfqueueSupportHere;
  else if (mode == "plug") check = netbuf::CheckPlugSupportHere;
  else return InvalidArgument("unknown netbuf mode '" + std::string(mode) + "'; expected plug, nfqueue or none");

  // The check creates real chains, queues and devices, so it runs in a child
  // process inside a new network namespace: the host's namespace never sees
  // them, and the kernel deletes them with the namespace even if the check
  // dies halfway. Modules still load for the whole host (request_module), so
  // the answer is the host's. The child is forked from a possibly
  // multithreaded daemon: it only allocates (glibc keeps malloc usable after
  // fork), spawns iptables with posix_spawn and never logs (the log lock may
  // be held by a thread that does not exist in the child).
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return ErrnoStatus("pipe", errno);
  Fd rd(pipefd[0]), wr(pipefd[1]);
  pid_t pid = ::fork();
  if (pid < 0) return ErrnoStatus("fork", errno);
  if (pid == 0) {
    rd.Reset();
    Status s;
    if (::unshare(CLONE_NEWNET) != 0) {
      int e = errno;
      s = e == EPERM ? PermissionDenied("checking netbuf support needs root (a network namespace to try it in)")
                     : ErrnoStatus("creating a network namespace for the netbuf check", e);
    } else {
      s = check();
    }
    std::string out = std::to_string(static_cast<int>(s.code())) + " " + s.message();
    (void)WriteFull(wr.get(), out.data(), out.size());
    ::_exit(0);
  }
  wr.Reset();
  std::string out;
  char buf[512];
  for (;;) {
    ssize_t r = ::read(rd.get(), buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  int wst = 0;
  while (::waitpid(pid, &wst, 0) < 0 && errno == EINTR) {
  }
  size_t sp = out.find(' ');
  if (out.empty() || sp == std::string::npos)
    return Internal("the netbuf support check for '" + std::string(mode) + "' died without an answer");
  auto code = static_cast<Code>(std::atoi(out.substr(0, sp).c_str()));
  if (code == Code::kOk) return OkStatus();
  return Status(code, out.substr(sp + 1));
}

}  // namespace remus
