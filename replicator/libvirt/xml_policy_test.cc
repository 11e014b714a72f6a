// The backup's policy on a primary's libvirt domain XML: the migratable XML
// libvirt 9.0 writes for the e2e tests' domains passes; each hostile element
// is refused naming it and why.
#include "replicator/libvirt/xml_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "replicator/libvirt/restore.h"

namespace remus {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

const std::string kGuest = "/work/remus/build/guest";

// virDomainGetXMLDesc(MIGRATABLE | SECURE) of tests/e2e/libvirt_world.py's
// guest_xml (test_libvirt_mode.py: a mirrored disk, remus metadata), as
// libvirt 9.0 writes it with security_driver "none".
std::string MigratableXml(const std::string& devices = "", const std::string& os_extra = "",
                          const std::string& tail = "") {
  return R"(<domain type='qemu'>
  <name>web1</name>
  <uuid>6f1c2a52-8f1e-4c1a-9d55-7d0f6e1b2a3c</uuid>
  <metadata>
    <remus:protect xmlns:remus="https://remus.dev/xmlns/1" backup="127.0.0.1:7788"/>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>)" + kGuest + R"(/vmlinuz</kernel>
    <initrd>)" + kGuest + R"(/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
    <boot dev='hd'/>)" + os_extra + R"(
  </os>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/remus-lv-x/A/disk0.img'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='none'/>
    <controller type='pci' index='0' model='pci-root'/>
    <interface type='ethernet'>
      <mac address='52:54:00:77:00:02'/>
      <target dev='rtap0' managed='no'/>
      <model type='virtio'/>
      <driver name='qemu'/>
      <rom enabled='no'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='/tmp/remus-lv-x/web1.serial'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/tmp/remus-lv-x/web1.serial'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='none'/>)" + devices + R"(
  </devices>
  <seclabel type='none' model='none'/>)" + tail + R"(
</domain>
)";
}

PeerPolicy Policy() {
  PeerPolicy p;
  p.file_dirs = {kGuest};
  return p;
}

Status Check(const std::string& xml, const PeerPolicy& p = Policy(), bool own_qemu = true) {
  return CheckDomainXml(xml, {"vda"}, p, own_qemu);
}

TEST(XmlPolicy, AcceptsTheProductsOwnDomains) {
  Status s = Check(MigratableXml(), Policy(), /*own_qemu=*/false);
  EXPECT_TRUE(s.ok()) << s.ToString();
  // Read-only install media under an allowed directory, an empty CD-ROM, a
  // qemu-ga channel without a path, a pty console, an rng on /dev/urandom.
  s = Check(MigratableXml(R"(
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file=')" + kGuest + R"(/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/><readonly/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'><target port='1'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>
    <graphics type='vnc' port='-1' autoport='yes'/>)"));
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(XmlPolicy, RefusesWhatTouchesThisHost) {
  struct Case {
    std::string xml, names, why;
  };
  const std::string qemu_ns = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'";
  const std::vector<Case> cases = {
      {MigratableXml("", "", "\n  <qemu:commandline " + qemu_ns + "><qemu:arg value='-plugin'/></qemu:commandline>"),
       "<qemu:commandline>", "QEMU namespace"},
      {MigratableXml("", "", "\n  <qemu:capabilities " + qemu_ns + "><qemu:add capability='x'/></qemu:capabilities>"),
       "<qemu:capabilities>", "QEMU namespace"},
      {MigratableXml("", "", "\n  <qemu:override " + qemu_ns + "/>"), "<qemu:override>", "QEMU namespace"},
      {MigratableXml("", "", "\n  <x:thing xmlns:x='urn:x'/>"), "<x:thing>", "only inside <metadata>"},
      {MigratableXml("<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='0'/></source></hostdev>"),
       "<hostdev type='pci'>", "passes a host device"},
      {MigratableXml("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"),
       "<filesystem type='mount'>", "exports a directory"},
      {MigratableXml("<interface type='ethernet'><target dev='t1'/><script path='/tmp/evil'/></interface>"),
       "<interface type='ethernet'>", "<script>"},
      {MigratableXml("<interface type='hostdev'><source><address type='pci' bus='1'/></source></interface>"),
       "<interface type='hostdev'>", "device or socket of this host"},
      {MigratableXml("<interface type='bridge'><source bridge='br0'/><backend tap='/dev/evil'/></interface>"),
       "<interface type='bridge'>", "<backend tap=|vhost=>"},
      {MigratableXml("<disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk>"),
       "<disk type='file'>", "writable and not mirrored"},
      {MigratableXml("<disk type='file' device='cdrom'><source file='/etc/shadow'/><target dev='sdc'/><readonly/></disk>"),
       "<disk type='file'>", "outside the directories"},
      {MigratableXml("<disk type='network' device='cdrom'><source protocol='nbd' name='x'><host name='evil'/></source>"
                     "<target dev='sdc'/><readonly/></disk>"),
       "<disk type='network'>", "only file and block sources"},
      {MigratableXml("<serial type='pty'><log file='/etc/cron.d/evil'/><target port='1'/></serial>"), "<log>",
       "writes the device's output"},
      {MigratableXml("<serial type='tcp'><source mode='bind' host='0.0.0.0' service='4444'/></serial>"),
       "<serial type='tcp'>", "character devices are accepted"},
      {MigratableXml("<channel type='unix'><source mode='connect' path='/run/docker.sock'/>"
                     "<target type='virtio' name='x'/></channel>"),
       "<channel type='unix'>", "outside the directories"},
      {MigratableXml("<serial type='pipe'><source path='/tmp/p'/></serial>"), "<serial type='pipe'>",
       "character devices"},
      {MigratableXml("<input type='evdev'><source dev='/dev/input/event0'/></input>"), "<input type='evdev'>",
       "input device"},
      {MigratableXml("<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>"), "<rng>",
       "/dev/urandom"},
      {MigratableXml("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"),
       "<tpm>", "TPM"},
      {MigratableXml("<shmem name='x'/>"), "<shmem>", "shares memory"},
      {MigratableXml("<vsock model='virtio'><cid auto='yes'/></vsock>"), "<vsock>", "socket into this host"},
      {MigratableXml("<redirdev bus='usb' type='tcp'><source mode='connect' host='h' service='1'/></redirdev>"),
       "<redirdev type='tcp'>", "USB"},
      {MigratableXml("<smartcard mode='passthrough' type='tcp'/>"), "<smartcard type='tcp'>", "smartcard"},
      {MigratableXml("<audio id='2' type='file' path='/etc/evil'/>"), "<audio type='file'>", "writes a file"},
      {MigratableXml("", "\n    <loader readonly='yes' type='pflash'>/etc/shadow</loader>"), "<loader type='pflash'>",
       "outside the directories"},
      {MigratableXml("", "\n    <nvram>/etc/evil.fd</nvram>"), "<nvram>", "outside the directories"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.names);
    Status s = Check(c.xml);
    EXPECT_EQ(s.code(), Code::kPermissionDenied) << s.ToString();
    EXPECT_THAT(s.message(), HasSubstr(c.names));
    EXPECT_THAT(s.message(), HasSubstr(c.why));
  }
  // The kernel: only from an allowed directory.
  PeerPolicy none;
  Status s = Check(MigratableXml(), none);
  EXPECT_EQ(s.code(), Code::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("<kernel>"));
  EXPECT_THAT(s.message(), HasSubstr("--allow-qemu-files"));
}

TEST(XmlPolicy, EmulatorIsNeverThePeersChoice) {
  std::string xml = MigratableXml();
  std::string evil = xml;
  evil.replace(evil.find("/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64"),
               std::string("/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64").size(), "/tmp/evil");
  Status s = Check(evil, Policy(), /*own_qemu=*/false);
  EXPECT_EQ(s.code(), Code::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("<emulator>"));
  EXPECT_TRUE(Check(evil, Policy(), /*own_qemu=*/true).ok());  // replaced by --qemu
  EXPECT_EQ(DomainXmlEmulator(evil), "/tmp/evil");
  EXPECT_EQ(DomainXmlEmulator("<domain><devices/></domain>"), "");
}

TEST(XmlPolicy, OperatorExtensions) {
  std::string xml = MigratableXml("<hostdev mode='subsystem' type='pci'><source><address bus='1'/></source></hostdev>");
  PeerPolicy p = Policy();
  EXPECT_EQ(Check(xml, p).code(), Code::kPermissionDenied);
  p.extra_libvirt_elements = {"hostdev"};
  EXPECT_TRUE(Check(xml, p).ok());
  std::string shared = MigratableXml("<disk type='file' device='disk'><source file='/srv/shared/web1-data.img'/>"
                                     "<target dev='vdb'/></disk>");
  EXPECT_EQ(Check(shared, p).code(), Code::kPermissionDenied);
  p.shared_disk_dirs = {"/srv/shared"};
  EXPECT_TRUE(Check(shared, p).ok());
}

TEST(XmlPolicy, MalformedXmlIsInvalidArgument) {
  EXPECT_EQ(Check("<domain><name>a</name>").code(), Code::kInvalidArgument);
  EXPECT_EQ(Check("<network/>").code(), Code::kInvalidArgument);
}

// The peer's security labels go at restore: the backup's libvirt applies its
// own defaults.
TEST(XmlPolicy, RestoreDropsThePeersSecurityLabels) {
  std::string xml = MigratableXml(
      "<disk type='file' device='cdrom'><source file='" + kGuest +
      "/a.iso'><seclabel model='dac' relabel='no'/></source><target dev='sdd'/><readonly/></disk>");
  auto r = RewriteDomainXmlForRestore(xml, "/r", "/usr/bin/qemu-system-x86_64", {{"vda", "/s/vda.img"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_THAT(*r, Not(HasSubstr("seclabel")));
  EXPECT_THAT(*r, HasSubstr("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
}

}  // namespace
}  // namespace remus
