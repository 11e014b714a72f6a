// remus-fence: the fence watchdog remusd starts when it arbitrates through
// etcd (arbiter/fence_table.h says why it is a process of its own). It
// stops (SIGSTOP) each armed QEMU whose lease deadline passed, and nothing
// else: no etcd, no sockets. It outlives a remusd
// that died, until every slot it watches is fenced or freed.
//
//   remus-fence --table-fd FD --parent PID
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "arbiter/fence_table.h"
#include "arbiter/leftovers.h"

int main(int argc, char** argv) {
  int fd = -1, parent = -1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--table-fd") == 0) fd = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--parent") == 0) parent = std::atoi(argv[i + 1]);
  }
  if (fd < 0 || parent <= 0) {
    std::fprintf(stderr, "usage: remus-fence --table-fd FD --parent PID (started by remusd)\n");
    return 2;
  }
  auto table = remus::FenceTable::Map(fd);
  if (!table.ok()) {
    std::fprintf(stderr, "remus-fence: %s\n", table.status().message().c_str());
    return 1;
  }
  // Its own session: a signal to remusd's process group is not one to us.
  ::setsid();
  // Never wait for a page fault at the moment a fence is due.
  (void)::mlockall(MCL_CURRENT | MCL_FUTURE);
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGTERM, SIG_IGN);
  const timespec nap{0, 5'000'000};  // 5 ms: the fence's extra lateness at most
  for (;;) {
    int armed = (*table)->Enforce(
        remus::BootNanos(), [](int pid) { return remus::ProcessStartTime(pid); },
        [](int pid) { ::kill(pid, SIGSTOP); });
    // remusd is gone (we were reparented): stay while anything is armed.
    if (::getppid() != parent && armed == 0) return 0;
    ::nanosleep(&nap, nullptr);
  }
}
