// The remusctl binary's exit codes for a user who may not use the control
// socket (docs/man/remusctl.8.md, EXIT STATUS): 5 when the socket is root's,
// 4 when no remusd is there.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "common/io.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

constexpr const char* kSetpriv = "/usr/bin/setpriv";

struct Outcome {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// remusctl ARGS as uid/gid 65534 (nobody), without supplementary groups.
Outcome RunAsNobody(const std::string& args) {
  std::string cmd = std::string(kSetpriv) + " --reuid=65534 --regid=65534 --clear-groups " REMUSCTL_BIN " " + args +
                    " 2>&1";
  Outcome r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  int st = ::pclose(p);
  if (WIFEXITED(st)) r.exit_code = WEXITSTATUS(st);
  return r;
}

class RemusctlAsNobody : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to run remusctl as another user";
    if (::access(kSetpriv, X_OK) != 0) GTEST_SKIP() << kSetpriv << " is missing (util-linux)";
    ::chmod(dir_.path().c_str(), 0755);  // nobody may reach the socket file, as in /run/remus
  }
  testing::TempDir dir_{"remusctl-test"};
};

TEST_F(RemusctlAsNobody, ARootOnlyControlSocketExits5AndSaysSo) {
  // A listening socket with remusd's mode: connect(2) fails with EACCES.
  const std::string sock = dir_.file("remusd.sock");
  auto l = ListenUnix(sock, 0600);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  Outcome r = RunAsNobody("--socket " + sock + " status");
  EXPECT_EQ(r.exit_code, 5) << r.output;
  EXPECT_NE(r.output.find("is for root only"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(sock), std::string::npos) << r.output;
}

TEST_F(RemusctlAsNobody, NoDaemonBehindTheSocketExits4) {
  Outcome r = RunAsNobody("--socket " + dir_.file("nobody.sock") + " status");
  EXPECT_EQ(r.exit_code, 4) << r.output;
  EXPECT_NE(r.output.find("is remusd running?"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace remus
