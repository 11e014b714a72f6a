// Running a host tool (iptables, ip6tables, iptables-save) with an argv, no
// shell: the process boundary of netbuf. posix_spawn, so it is safe to call
// from a multithreaded daemon; stdout and stderr are captured.
//
// Thread-safety: free functions; callable from any thread.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace remus::netbuf {

struct CommandResult {
  int exit_code = -1;  // 128+N if killed by signal N
  std::string out;
  std::string err;
};

// Runs argv (argv[0] is looked up in PATH, then /usr/sbin, /sbin, /usr/bin,
// /bin). NotFound if the program does not exist; any exit code is a result.
StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv);

// Runs argv and requires exit code 0. The error is Internal with the
// command line and the tool's own stderr, e.g.
//   "iptables -t mangle -N REMUS-web1: iptables: Chain already exists."
Status RunChecked(const std::vector<std::string>& argv);

// "a b 'c d'" for messages.
std::string CommandLine(const std::vector<std::string>& argv);

}  // namespace remus::netbuf
