#include "replicator/qemu/launcher.h"

#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>

#include <functional>
#include <thread>

namespace remus {
namespace {

bool Eventually(const std::function<bool()>& f) {
  for (int i = 0; i < 300; i++) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

TEST(PosixSpawnLauncher, KillsAndReapsItsChild) {
  PosixSpawnLauncher l;
  auto pid = l.Spawn({{"sleep", "30"}, "/dev/null"});
  ASSERT_TRUE(pid.ok()) << pid.status().ToString();
  EXPECT_TRUE(l.Running(*pid));
  ASSERT_TRUE(l.Kill(*pid, std::chrono::seconds(5)).ok());
  EXPECT_FALSE(l.Running(*pid));
  EXPECT_NE(::kill(*pid, 0), 0);  // reaped: no zombie left
  EXPECT_TRUE(l.Kill(*pid, std::chrono::seconds(1)).ok());  // gone already
}

TEST(PosixSpawnLauncher, NoticesAnExit) {
  PosixSpawnLauncher l;
  auto pid = l.Spawn({{"true"}, ""});
  ASSERT_TRUE(pid.ok());
  EXPECT_TRUE(Eventually([&] { return !l.Running(*pid); }));
}

TEST(PosixSpawnLauncher, Errors) {
  PosixSpawnLauncher l;
  EXPECT_FALSE(l.Spawn({{"/nonexistent/qemu"}, ""}).ok());
  EXPECT_EQ(l.Spawn({{}, ""}).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(l.Kill(1, std::chrono::seconds(1)).code(), Code::kNotFound);  // not ours
  EXPECT_FALSE(l.Running(1));
}

TEST(PosixSpawnLauncher, ChildOutlivesTheLauncher) {
  int pid;
  {
    PosixSpawnLauncher l;
    auto p = l.Spawn({{"sleep", "30"}, ""});
    ASSERT_TRUE(p.ok());
    pid = *p;
  }
  EXPECT_EQ(::kill(pid, 0), 0);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

}  // namespace
}  // namespace remus
