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

TEST(PlanRamMapping, MapsTheDefaultMainRam) {
  std::vector<qemu::RamBlock> blocks = {{"pc.bios", 256 << 10}, {"pc.ram", 256 << 20}, {"vga.vram", 16 << 20}};
  auto p = PlanRamMapping({"q", "-machine", "pc", "-m", "256"}, blocks);
  EXPECT_TRUE(p.map) << p.reason;
  EXPECT_EQ(p.block, 1u);
  EXPECT_EQ(p.id, "pc.ram");
  EXPECT_TRUE(p.reason.empty());
}

TEST(PlanRamMapping, StreamsWhenTheGuestChoseItsOwnMemory) {
  std::vector<qemu::RamBlock> blocks = {{"pc.ram", 256 << 20}};
  struct Case {
    std::vector<std::string> argv;
    std::string says;
  } cases[] = {
      {{"q", "-mem-path", "/dev/hugepages"}, "-mem-path"},
      {{"q", "-mem-prealloc"}, "-mem-prealloc"},
      {{"q", "-numa", "node,memdev=m0"}, "NUMA"},
      {{"q", "-object", "memory-backend-ram,id=m0,size=1G"}, "memory-backend-ram"},
      {{"q", "--object", "memory-backend-file,id=m0,size=1G,mem-path=/x"}, "memory-backend-file"},
      {{"q", "-M", "pc,memory-backend=m0"}, "memory backend of its own"},
  };
  for (const auto& c : cases) {
    auto p = PlanRamMapping(c.argv, blocks);
    EXPECT_FALSE(p.map) << c.says;
    EXPECT_NE(p.reason.find(c.says), std::string::npos) << p.reason;
  }
  auto p = PlanRamMapping({"q"}, {{"my.ram", 4096}});
  EXPECT_FALSE(p.map);
  EXPECT_NE(p.reason.find("default main RAM"), std::string::npos) << p.reason;
  // Other objects are fine.
  EXPECT_TRUE(PlanRamMapping({"q", "-object", "rng-random,id=r0"}, blocks).map);
}

TEST(AddMappedRam, AppendsTheBackendAndMachineOption) {
  auto out = AddMappedRam({"q", "-m", "256"}, "pc.ram", "/state/a,b/ram-000-pc.ram.img", 256u << 20);
  std::vector<std::string> want = {
      "q", "-m", "256", "-object",
      "memory-backend-file,id=pc.ram,mem-path=/state/a,,b/ram-000-pc.ram.img,size=268435456,share=off",
      "-machine", "memory-backend=pc.ram"};
  EXPECT_EQ(out, want);
}

TEST(StripMappedRam, UndoesAddMappedRamOnly) {
  std::vector<std::string> plain = {"q", "-machine", "pc", "-m", "256", "-object", "rng-random,id=r0"};
  auto mapped = AddMappedRam(plain, "pc.ram", "/var/lib/remus/domains/g/store-3/ram-000-pc.ram.img", 256u << 20);
  EXPECT_EQ(StripMappedRam(mapped), plain);
  EXPECT_EQ(StripMappedRam(plain), plain);
  // An operator's own file backend stays.
  std::vector<std::string> own = {"q", "-object", "memory-backend-file,id=pc.ram,mem-path=/hugepages/x,size=1G,share=off",
                                  "-machine", "memory-backend=pc.ram"};
  EXPECT_EQ(StripMappedRam(own), own);
  // A restored guest's argv restores again with one backend, not two.
  auto again = RewriteArgvForRestore(mapped, "/r", "");
  for (const auto& a : again) EXPECT_EQ(a.find("memory-backend"), std::string::npos) << a;
}

}  // namespace
}  // namespace remus
