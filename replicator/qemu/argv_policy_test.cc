// The backup's allow-list for a primary's QEMU command line: what the
// product's own primaries send passes (the argv of tests/e2e/conftest.py's
// guests, with disks and taps), and each hostile example is refused naming
// the option and why.
#include "replicator/qemu/argv_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "replicator/qemu/argv_rewrite.h"

namespace remus {
namespace {

using ::testing::HasSubstr;

const std::string kGuest = "/work/remus/build/guest";

PeerPolicy Policy() {
  PeerPolicy p;
  p.file_dirs = {kGuest};
  return p;
}

// tests/e2e/conftest.py's start_guest, as /proc/PID/cmdline shows it.
std::vector<std::string> GuestArgv() {
  return {"/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "256",
          "-nodefaults", "-nographic", "-vga", "none", "-serial", "file:/tmp/remus-e2e-x/g/serial.log", "-kernel",
          kGuest + "/vmlinuz", "-initrd", kGuest + "/initrd.img", "-append",
          "console=ttyS0 memmap=64K$0x4000000 remus.counter=0x4000000 remus.dirty=10000 remus.wss=64 remus.check=1 "
          "quiet",
          "-qmp", "unix:/tmp/remus-e2e-x/g/q.sock,server=on,wait=off", "-qmp",
          "unix:/tmp/remus-e2e-x/g/t.sock,server=on,wait=off"};
}

std::vector<std::string> With(std::vector<std::string> argv, std::initializer_list<std::string> more) {
  argv.insert(argv.end(), more);
  return argv;
}

Status Check(const std::vector<std::string>& argv, const std::set<std::string>& mirrored = {},
             const PeerPolicy& p = Policy(), bool own_qemu = true) {
  return CheckQemuArgv(argv, mirrored, p, own_qemu);
}

TEST(ArgvPolicy, AcceptsTheProductsOwnCommandLines) {
  EXPECT_TRUE(Check(GuestArgv(), {}, Policy(), /*own_qemu=*/false).ok()) << Check(GuestArgv()).ToString();
  // test_disk.py: a mirrored disk (its file becomes the backup's image).
  auto disk = With(GuestArgv(), {"-drive", "file=/tmp/remus-e2e-x/disk.qcow2,if=none,format=qcow2,id=drive0,cache=none",
                                 "-device", "virtio-blk-pci,drive=drive0"});
  EXPECT_TRUE(Check(disk, {"drive0"}).ok()) << Check(disk, {"drive0"}).ToString();
  // test_netbuf.py: a tap without scripts, ROM disabled.
  auto tap = With(GuestArgv(), {"-netdev", "tap,id=n0,ifname=rtap0,script=no,downscript=no", "-device",
                                "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02,romfile="});
  EXPECT_TRUE(Check(tap).ok()) << Check(tap).ToString();
  // Common hand-written options.
  auto more = With(GuestArgv(), {"-name", "guest=web1,debug-threads=on", "-uuid", "6f1c2a52-8f1e-4c1a-9d55-7d0f6e1b2a3c",
                                 "-cpu", "qemu64", "-smp", "2", "-rtc", "base=utc", "-display", "none", "-no-user-config",
                                 "-global", "kvm-pit.lost_tick_policy=delay", "-object",
                                 "memory-backend-ram,id=mem0,size=256M", "-object", "rng-random,id=rng0,filename=/dev/urandom",
                                 "-device", "virtio-rng-pci,rng=rng0", "-chardev",
                                 "socket,id=ser1,path=/run/x.sock,server=on,wait=off", "-device", "isa-serial,chardev=ser1",
                                 "-chardev", "file,id=log0,path=/var/log/x.log", "-mon", "chardev=ser1,mode=readline",
                                 "-pidfile", "/run/web1.pid", "-daemonize", "-S", "-incoming", "defer", "-sandbox",
                                 "on,obsolete=deny", "-drive", "if=none,id=cd0,media=cdrom", "-drive",
                                 "file=" + kGuest + "/install.iso,if=none,id=cd1,media=cdrom,readonly=on",
                                 "-netdev", "user,id=u0", "-device", "e1000,netdev=u0", "-boot", "order=c"});
  EXPECT_TRUE(Check(more).ok()) << Check(more).ToString();
}

// Each hostile example: the refusal names the option and the reason.
TEST(ArgvPolicy, RefusesWhatTouchesThisHost) {
  struct Case {
    std::vector<std::string> extra;
    std::string names, why;
  };
  const std::vector<Case> cases = {
      {{"-netdev", "tap,id=n0,ifname=t0,script=/tmp/evil,downscript=no"}, "-netdev", "script=no,downscript=no"},
      {{"-netdev", "tap,id=n0,script=no,downscript=/tmp/evil"}, "-netdev", "script=no,downscript=no"},
      {{"-netdev", "tap,id=n0,fd=3"}, "-netdev", "file descriptors"},
      {{"-netdev", "tap,id=n0,helper=/usr/lib/qemu/qemu-bridge-helper"}, "-netdev", "runs a program"},
      {{"-netdev", "user,id=u0,guestfwd=tcp:10.0.2.1:1-cmd:/bin/sh"}, "-netdev", "guestfwd"},
      {{"-netdev", "user,id=u0,smb=/etc"}, "-netdev", "smb"},
      {{"-netdev", "socket,id=s0,listen=:1234"}, "-netdev", "netdev type 'socket'"},
      {{"-add-fd", "fd=3,set=2"}, "-add-fd", "file descriptors"},
      {{"-plugin", "/tmp/evil.so"}, "-plugin", "shared object"},
      {{"-chardev", "pipe,id=p0,path=/tmp/p"}, "-chardev", "backend 'pipe'"},
      {{"-chardev", "socket,id=c0,host=0.0.0.0,port=4444,server=on"}, "-chardev", "not TCP"},
      {{"-chardev", "file,id=c0,path=/var/log/x,logfile=/etc/cron.d/evil"}, "-chardev", "logfile="},
      {{"-chardev", "file,id=../../../etc/cron.d/x,path=/tmp/x"}, "-chardev", "well-formed id"},
      {{"-loadvm", "snap1"}, "-loadvm", "snapshot"},
      {{"-monitor", "stdio", "-serial", "tcp:0.0.0.0:4444,server"}, "-serial", "file:"},
      {{"-D", "/etc/cron.d/evil"}, "-D", "log file"},
      {{"-d", "guest_errors"}, "-d", "debug"},
      {{"-run-with", "user=nobody"}, "-run-with", "this host's choice"},
      {{"-runas", "nobody"}, "-runas", "this host's choice"},
      {{"-chroot", "/tmp"}, "-chroot", "this host's choice"},
      {{"-sandbox", "off"}, "-sandbox", "only be turned on"},
      {{"-virtfs", "local,path=/,mount_tag=root,security_model=none"}, "-virtfs", "directory"},
      {{"-fsdev", "local,id=f0,path=/"}, "-fsdev", "directory"},
      {{"-device", "vfio-pci,host=0000:01:00.0"}, "-device", "passes a host device"},
      {{"-device", "usb-host,hostbus=1,hostaddr=2"}, "-device", "passes a host device"},
      {{"-device", "loader,file=/etc/shadow,addr=0x1000"}, "-device", "loads a file"},
      {{"-device", "vhost-vsock-pci,guest-cid=3"}, "-device", "backend on this host"},
      {{"-device", "virtio-net-pci,netdev=n0,romfile=/etc/shadow"}, "-device", "ROM file"},
      {{"-device", "nosuchdev"}, "-device", "--allow-qemu-device nosuchdev"},
      {{"-drive", "file=/dev/sda,if=virtio,id=d9"}, "-drive", "writable and not mirrored"},
      {{"-drive", "file=/etc/shadow,if=none,id=d9,readonly=on"}, "-drive", "outside the directories"},
      {{"-drive", "file=" + kGuest + "/../../etc/shadow,id=d9,readonly=on"}, "-drive", "'..' component"},
      {{"-drive", "id=drive0,file=/x,file.driver=nbd,file.host=evil"}, "-drive", "key 'file.driver'"},
      {{"-drive", "id=drive0,file=/a,,b"}, "-drive", "escaped commas"},
      {{"-blockdev", "driver=file,node-name=f0,filename=/etc/shadow"}, "-blockdev", "-drive with an id"},
      {{"-object", "memory-backend-file,id=m0,size=1G,mem-path=/etc/evil"}, "-object", "outside the directories"},
      {{"-object", "filter-dump,id=f0,netdev=n0,file=/etc/evil"}, "-object", "object type 'filter-dump'"},
      {{"-object", "rng-random,id=r0,filename=/etc/shadow"}, "-object", "/dev/urandom"},
      {{"-object", "{\"qom-type\":\"iothread\",\"id\":\"io0\"}"}, "-object", "JSON form"},
      {{"-kernel", "/etc/shadow"}, "-kernel", "outside the directories"},
      {{"-machine", "pc,dumpdtb=/etc/evil"}, "-machine", "dumpdtb"},
      {{"-fw_cfg", "name=opt/x,file=/etc/shadow"}, "-fw_cfg", "outside the directories"},
      {{"-readconfig", "/tmp/x.cfg"}, "-readconfig", "file on this host"},
      {{"-set", "drive.drive0.file=/etc/shadow"}, "-set", "after they were checked"},
      {{"-L", "/tmp"}, "-L", "firmware directory"},
      {{"-hda", "/dev/sda"}, "-hda", "--allow-qemu-option hda"},
      {{"/dev/sda"}, "/dev/sda", "bare argument"},
      {{"-display", "vnc=0.0.0.0:0"}, "-display", "-display none"},
      {{"-vnc", ":0"}, "-vnc", "remote display"},
      {{"-name", "-plugin"}, "-name", "may not start with '-'"},
      {{"-trace", "file=/etc/evil"}, "-trace", "trace files"},
      {{"-global", "virtio-net-pci.romfile=/etc/shadow"}, "-global", "ROM file"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::PrintToString(c.extra));
    Status s = Check(With(GuestArgv(), std::initializer_list<std::string>{}), {"drive0"});
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::vector<std::string> argv = GuestArgv();
    argv.insert(argv.end(), c.extra.begin(), c.extra.end());
    s = Check(argv, {"drive0"});
    EXPECT_EQ(s.code(), Code::kPermissionDenied) << s.ToString();
    EXPECT_THAT(s.message(), HasSubstr(c.names));
    EXPECT_THAT(s.message(), HasSubstr(c.why));
  }
}

TEST(ArgvPolicy, NeverRunsThePeersBinary) {
  // Without a --qemu of its own, the backup accepts only a QEMU's name...
  std::vector<std::string> argv = GuestArgv();
  argv[0] = "/tmp/evil";
  Status s = Check(argv, {}, Policy(), /*own_qemu=*/false);
  EXPECT_EQ(s.code(), Code::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("'/tmp/evil' is not named qemu-system-ARCH"));
  EXPECT_TRUE(Check(argv, {}, Policy(), /*own_qemu=*/true).ok());  // ignored: ours runs
  // ...and looks that name up in its own PATH, never the peer's directory.
  auto r = ResolveQemuBinary("/opt/q/bin/qemu", "/tmp/evil");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "/opt/q/bin/qemu");
  EXPECT_EQ(ResolveQemuBinary("", "/tmp/evil").status().code(), Code::kPermissionDenied);
  auto found = ResolveQemuBinary("", "/tmp/peer-dir/qemu-system-nosucharch");
  EXPECT_EQ(found.status().code(), Code::kNotFound);
  EXPECT_THAT(found.status().message(), HasSubstr("--qemu"));
  // The rewrite runs ours too.
  auto out = RewriteArgvForRestore(GuestArgv(), "/r", "qemu-system-x86_64");
  EXPECT_EQ(out[0], "qemu-system-x86_64");
  EXPECT_TRUE(IsQemuBinaryName("qemu-system-x86_64"));
  EXPECT_TRUE(IsQemuBinaryName("qemu-system-aarch64"));
  EXPECT_FALSE(IsQemuBinaryName("qemu-system-"));
  EXPECT_FALSE(IsQemuBinaryName("qemu-system-x86_64;rm"));
  EXPECT_FALSE(IsQemuBinaryName("sh"));
}

TEST(ArgvPolicy, OperatorExtensions) {
  PeerPolicy p = Policy();
  auto vnc = With(GuestArgv(), {"-vnc", ":0"});
  EXPECT_EQ(Check(vnc, {}, p).code(), Code::kPermissionDenied);
  p.extra_options = {"vnc"};
  EXPECT_TRUE(Check(vnc, {}, p).ok());
  auto dev = With(GuestArgv(), {"-device", "vfio-pci,host=0000:01:00.0"});
  EXPECT_EQ(Check(dev, {}, p).code(), Code::kPermissionDenied);
  p.extra_devices = {"vfio-pci"};
  EXPECT_TRUE(Check(dev, {}, p).ok());
  // Shared storage: a writable disk at the primary's path.
  auto shared = With(GuestArgv(), {"-drive", "file=/srv/shared/web1.img,if=virtio,id=d1"});
  EXPECT_EQ(Check(shared, {}, p).code(), Code::kPermissionDenied);
  p.shared_disk_dirs = {"/srv/shared"};
  EXPECT_TRUE(Check(shared, {}, p).ok());
  // No file directory: the test guest's kernel is refused.
  p.file_dirs.clear();
  Status s = Check(GuestArgv(), {}, p);
  EXPECT_EQ(s.code(), Code::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("-kernel"));
  EXPECT_THAT(s.message(), HasSubstr("--allow-qemu-files"));
}

TEST(ArgvPolicy, PeerFiles) {
  PeerPolicy p;
  p.file_dirs = {"/srv/images/"};
  EXPECT_TRUE(CheckPeerFile("/srv/images/a.iso", "x", p).ok());
  EXPECT_TRUE(CheckPeerFile("/srv/images/sub/a.iso", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("/srv/images", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("/srv/imagesX/a.iso", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("/srv/images/../a", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("images/a.iso", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("/srv/images/a,/etc/shadow", "x", p).ok());  // multiboot reads a list
  // System firmware is readable, not writable.
  EXPECT_TRUE(CheckPeerFile("/usr/share/OVMF/OVMF_CODE.fd", "x", p).ok());
  EXPECT_FALSE(CheckPeerFile("/usr/share/OVMF/OVMF_CODE.fd", "x", p, PeerFileAccess::kWrite).ok());
  EXPECT_TRUE(CheckPeerFile("/srv/images/m.mem", "x", p, PeerFileAccess::kWrite).ok());
  auto ovmf = With({"qemu-system-x86_64"}, {"-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd"});
  EXPECT_TRUE(CheckQemuArgv(ovmf, {}, p, true).ok());
}

TEST(ArgvPolicy, ParsesOptionsAsQemuDoes) {
  auto o = ParseQemuOpts("virtio-net-pci,netdev=n0,romfile=", "driver");
  ASSERT_TRUE(o.ok());
  EXPECT_EQ((*o)[0], (std::pair<std::string, std::string>{"driver", "virtio-net-pci"}));
  EXPECT_EQ((*o)[2], (std::pair<std::string, std::string>{"romfile", ""}));
  EXPECT_FALSE(ParseQemuOpts("id=a,id=b").ok());
  EXPECT_FALSE(ParseQemuOpts("a=1,,b").ok());
  EXPECT_FALSE(ParseQemuOpts("a=1,,b=2").ok());
  EXPECT_FALSE(ParseQemuOpts("a=1,").ok());
  EXPECT_FALSE(ParseQemuOpts("wait=on,nowait").ok());  // QEMU reads nowait as wait=off
}

}  // namespace
}  // namespace remus
