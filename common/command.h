// Running a host tool with an argv, no shell: iptables and friends (netbuf),
// `qemu-system-* -version` (the QEMU version rule). posix_spawn, so it is
// safe to call from a multithreaded daemon; stdout and stderr are captured.
// The child is reaped here (ProcessLauncher reaps only the pids it spawned).
//
// Thread-safety: free functions; callable from any thread.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "common/status.h"

namespace remus {

struct CommandResult {
  int exit_code = -1;  // 128+N if killed by signal N
  std::string out;
  std::string err;
};

// Runs argv (argv[0] is looked up in PATH, then /usr/sbin, /sbin, /usr/bin,
// /bin). NotFound if the program does not exist; any exit code is a result.
// timeout > 0: a child still running then is SIGKILLed and reaped, and the
// call returns DeadlineExceeded.
StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                   std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

// Runs argv and requires exit code 0. The error is Internal with the
// command line and the tool's own stderr, e.g.
//   "iptables -t mangle -N REMUS-web1: iptables: Chain already exists."
Status RunChecked(const std::vector<std::string>& argv);

// The executable regular file `name` in $PATH's directories (or, without a
// PATH, /usr/local/bin:/usr/bin:/bin), then in `extra_dirs` (':'-separated);
// relative entries are skipped. A name with a '/' is returned as it is.
// Empty when there is none.
std::string FindProgram(const std::string& name, const std::string& extra_dirs);

// "a b 'c d'" for messages.
std::string CommandLine(const std::vector<std::string>& argv);

}  // namespace remus
