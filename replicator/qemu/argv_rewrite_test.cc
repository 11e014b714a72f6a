#include "replicator/qemu/argv_rewrite.h"

#include <gtest/gtest.h>

namespace remus {
namespace {

TEST(RewriteArgv, RestoresOnThisHost) {
  std::vector<std::string> argv = {
      "/usr/bin/qemu-system-x86_64", "-name", "web1", "-machine", "pc", "-m", "256",
      "-qmp", "unix:/run/qemu/web1.qmp,server=on,wait=off", "-daemonize", "-pidfile", "/run/qemu/web1.pid",
      "-serial", "file:/var/log/web1.serial", "-chardev", "socket,id=mon0,path=/run/mon.sock,server=on,wait=off",
      "-mon", "chardev=mon0,mode=control", "-chardev", "file,id=log0,path=/var/log/x.log", "-S",
      "-incoming", "tcp:0:4444", "-kernel", "/boot/vmlinuz"};
  auto out = RewriteArgvForRestore(argv, "/state/web1/run", "");
  std::vector<std::string> want = {
      "/usr/bin/qemu-system-x86_64", "-name", "web1", "-machine", "pc", "-m", "256",
      "-pidfile", "/state/web1/run/qemu.pid", "-serial", "file:/state/web1/run/serial.log",
      "-chardev", "file,id=log0,path=/state/web1/run/log0.log", "-kernel", "/boot/vmlinuz",
      "-qmp", "unix:/state/web1/run/qmp.sock,server=on,wait=off",
      "-qmp", "unix:/state/web1/run/remusd-qmp.sock,server=on,wait=off", "-incoming", "defer"};
  EXPECT_EQ(out, want);
}

// A restored guest protected again: its argv (read back from the running
// QEMU) carries the monitors and -incoming of the first restore; a second
// restore replaces them rather than adding more.
TEST(RewriteArgv, ARestoredGuestsArgvRestoresTheSame) {
  auto once = RewriteArgvForRestore({"q", "-m", "256", "-qmp", "unix:/x,server=on,wait=off"}, "/a/run", "");
  auto twice = RewriteArgvForRestore(once, "/b/run", "");
  std::vector<std::string> want = {"q", "-m", "256", "-pidfile", "/b/run/qemu.pid",
                                   "-qmp", "unix:/b/run/qmp.sock,server=on,wait=off",
                                   "-qmp", "unix:/b/run/remusd-qmp.sock,server=on,wait=off", "-incoming", "defer"};
  EXPECT_EQ(twice, want);
}

TEST(RewriteArgv, OverridesBinaryAndAddsPidfile) {
  auto out = RewriteArgvForRestore({"qemu", "--qmp", "unix:/x", "-serial", "stdio"}, "/r", "/opt/qemu");
  std::vector<std::string> want = {"/opt/qemu", "-serial", "file:/r/serial.log", "-qmp",
                                   "unix:/r/qmp.sock,server=on,wait=off", "-qmp",
                                   "unix:/r/remusd-qmp.sock,server=on,wait=off", "-pidfile", "/r/qemu.pid",
                                   "-incoming", "defer"};
  EXPECT_EQ(out, want);
}

TEST(RewriteArgv, KeepsSocketChardevsButMovesTheirPath) {
  auto out = RewriteArgvForRestore({"q", "-chardev", "socket,id=ser0,path=/tmp/a.sock,server=on"}, "/r", "");
  ASSERT_GE(out.size(), 3u);
  EXPECT_EQ(out[2], "socket,id=ser0,path=/r/ser0.sock,server=on");
}

TEST(RewriteArgv, EmptyArgv) { EXPECT_TRUE(RewriteArgvForRestore({}, "/r", "").empty()); }

}  // namespace
}  // namespace remus
