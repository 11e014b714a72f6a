// The <interface>s of a domain XML and the taps netbuf holds in libvirt mode
// (libvirt/interfaces.h). The live XML against a real libvirtd is exercised
// by tests/e2e/test_libvirt_netbuf.py.
#include "replicator/libvirt/interfaces.h"

#include <sys/stat.h>

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/io.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Shaped like libvirt 9.0's live XML of a running domain.
std::string Xml(const std::string& interfaces) {
  return R"(<domain type='qemu' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>6f1c2a52-8f1e-4c1a-9d55-7d0f6e1b2a3c</uuid>
  <metadata>
    <remus:protect xmlns:remus="https://remus.dev/xmlns/1" backup="10.0.0.2:7788"/>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='/tmp/s.log'/><target type='isa-serial' port='0'/></serial>
)" + interfaces + R"(
    <memballoon model='none'/>
  </devices>
  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>
</domain>
)";
}

const char kEthernet[] = R"(
    <interface type='ethernet'>
      <mac address='52:54:00:77:00:02'/>
      <target dev='rtap0' managed='no'/>
      <model type='virtio'/>
      <rom enabled='no'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>)";

const char kBridge[] = R"(
    <interface type="bridge">
      <mac address="52:54:00:aa:bb:01"/>
      <source bridge="br0"/>
      <target dev="vnet3"/>
      <model type="e1000"/>
      <alias name="net1"/>
    </interface>)";

const char kNetwork[] = R"(
    <interface type='network'>
      <mac address='52:54:00:aa:bb:02'/>
      <source network='default' portid='0b1f0f5e-6c4c-4c5e-9f11-3f1a2f9b8c11' bridge='virbr0'/>
      <target dev='vnet4'/>
      <model type='virtio'/>
      <alias name='net2'/>
    </interface>)";

TEST(ParseDomainInterfaces, ReadsEveryInterfaceInOrder) {
  auto r = ParseDomainInterfaces(Xml(std::string(kEthernet) + kBridge + kNetwork));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 3u);
  const DomainInterface& e = (*r)[0];
  EXPECT_EQ(e.type, "ethernet");
  EXPECT_EQ(e.target, "rtap0");
  EXPECT_EQ(e.mac, "52:54:00:77:00:02");
  EXPECT_EQ(e.alias, "net0");
  EXPECT_EQ(e.model, "virtio");
  EXPECT_EQ(e.source, "");
  EXPECT_EQ((*r)[1].type, "bridge");  // double quotes as well
  EXPECT_EQ((*r)[1].target, "vnet3");
  EXPECT_EQ((*r)[1].source, "br0");
  EXPECT_EQ((*r)[2].source, "default");
  EXPECT_EQ((*r)[2].target, "vnet4");
}

TEST(ParseDomainInterfaces, NoInterfaces) {
  auto r = ParseDomainInterfaces(Xml(""));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
}

TEST(ParseDomainInterfaces, IgnoresInterfaceLookalikesOutsideDevices) {
  // Only <devices>'s children count: not text, comments or other elements.
  std::string xml = Xml(R"(
    <!-- <interface type='user'/> -->
    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>)");
  xml.insert(xml.find("<metadata>") + 10, "<x:interface xmlns:x='urn:x' type='user'/>");
  auto r = ParseDomainInterfaces(xml);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
}

TEST(ParseDomainInterfaces, RejectsMalformedXml) {
  auto r = ParseDomainInterfaces("<domain><devices><interface type='ethernet'></devices></domain>");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("not well-formed"));
  r = ParseDomainInterfaces("");
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  r = ParseDomainInterfaces("<network><name>default</name></network>");
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("<domain>"));
}

TEST(ParseDomainInterfaces, RefusesADoctypeAndReadsCommentsAsComments) {
  auto r = ParseDomainInterfaces(
      "<!DOCTYPE domain [<!ENTITY t SYSTEM 'file:///etc/hostname'>]>"
      "<domain><devices><interface type='ethernet'><target dev='&t;'/></interface></devices></domain>");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("DOCTYPE"));
  r = ParseDomainInterfaces(Xml("<!-- <interface type='user'/> -->" + std::string(kEthernet)));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 1u);
  EXPECT_EQ((*r)[0].target, "rtap0");
}

TEST(ParseDomainInterfaces, EntitiesAreDecoded) {
  auto r = ParseDomainInterfaces(
      "<domain><devices><interface type='bridge'><source bridge='br&amp;1'/><target dev='t&#48;'/>"
      "</interface></devices></domain>");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 1u);
  EXPECT_EQ((*r)[0].source, "br&1");
  EXPECT_EQ((*r)[0].target, "t0");
}

// A fake /sys/class/net: taps have tun_flags, other devices do not.
std::string FakeSysClassNet() {
  std::string d = testing::MakeTempDir("remus-sysnet");
  for (const char* tap : {"rtap0", "vnet3", "vnet4"}) {
    ::mkdir((d + "/" + tap).c_str(), 0755);
    EXPECT_TRUE(WriteFileAtomic(d + "/" + tap + "/tun_flags", "0x1002\n").ok());
  }
  ::mkdir((d + "/macvtap0").c_str(), 0755);
  return d;
}

TEST(DomainTapDevices, TapBackedTypesGiveTheirTargets) {
  std::string sys = FakeSysClassNet();
  auto r = DomainTapDevices(Xml(std::string(kEthernet) + kBridge + kNetwork), "web1", sys);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_THAT(*r, ElementsAre("rtap0", "vnet3", "vnet4"));
}

TEST(DomainTapDevices, NoInterfacesNoTaps) {
  auto r = DomainTapDevices(Xml(""), "web1", FakeSysClassNet());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
}

TEST(DomainTapDevices, ATargetNotInThisNamespaceIsLeftToTheCaller) {
  // The caller says the device is not in remusd's network namespace.
  auto r = DomainTapDevices(Xml(kEthernet), "web1", FakeSysClassNet() + "/nowhere");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_THAT(*r, ElementsAre("rtap0"));
}

TEST(DomainTapDevices, RefusesInterfacesWhosePacketsCannotBeHeld) {
  std::string sys = FakeSysClassNet();
  struct Case {
    std::string xml;
    std::string names;  // in the message: the interface and why
  } cases[] = {
      {"<interface type='user'><mac address='52:54:00:00:00:09'/><model type='virtio'/><alias name='net1'/>"
       "</interface>",
       "interface net1 (52:54:00:00:00:09) is user networking"},
      {"<interface type='hostdev' managed='yes'><mac address='52:54:00:00:00:0a'/><source><address type='pci' "
       "domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source></interface>",
       "interface 52:54:00:00:00:0a is a host PCI device passed through"},
      {"<interface type='vhostuser'><source type='unix' path='/run/vhu.sock' mode='client'/>"
       "<model type='virtio'/></interface>",
       "interface #2 is vhost-user"},
      {"<interface type='direct'><source dev='eth0' mode='bridge'/><target dev='macvtap0'/><alias name='net1'/>"
       "</interface>",
       "interface net1 is macvtap"},
      {"<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/><alias name='net1'/></interface>",
       "interface net1 is a vDPA device"},
      {"<interface type='mcast'><source address='230.0.0.1' port='5558'/><alias name='net1'/></interface>",
       "interface net1 is a QEMU socket backend (mcast)"},
  };
  for (const Case& c : cases) {
    auto r = DomainTapDevices(Xml(std::string(kEthernet) + c.xml), "web1", sys);
    ASSERT_FALSE(r.ok()) << c.xml;
    EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
    EXPECT_THAT(r.status().message(), HasSubstr("domain web1: " + c.names)) << r.status().message();
    EXPECT_THAT(r.status().message(), HasSubstr("cannot be held on the host"));
    EXPECT_THAT(r.status().message(), HasSubstr("--netbuf none"));
  }
}

TEST(DomainTapDevices, RefusesANetworkWhoseTargetIsNotATap) {
  // A virtual network in macvtap mode: type network, target macvtap0.
  auto r = DomainTapDevices(Xml(
                                "<interface type='network'><mac address='52:54:00:00:00:0b'/>"
                                "<source network='passthru-net'/><target dev='macvtap0'/><alias name='net0'/>"
                                "</interface>"),
                            "web1", FakeSysClassNet());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("domain web1: interface net0 (52:54:00:00:00:0b)"));
  EXPECT_THAT(r.status().message(), HasSubstr("source passthru-net"));
  EXPECT_THAT(r.status().message(), HasSubstr("macvtap0, which is not a tap"));
  EXPECT_THAT(r.status().message(), HasSubstr("--netbuf none"));
}

TEST(DomainTapDevices, ATapInterfaceWithoutTargetAsksForNetbufIf) {
  auto r = DomainTapDevices(Xml("<interface type='bridge'><source bridge='br0'/><alias name='net0'/></interface>"),
                            "web1", FakeSysClassNet());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("domain web1: interface net0"));
  EXPECT_THAT(r.status().message(), HasSubstr("--netbuf-if"));
}

TEST(DomainTapDevices, OneTapTwiceIsListedOnce) {
  auto r = DomainTapDevices(Xml(std::string(kEthernet) + kEthernet), "web1", FakeSysClassNet());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_THAT(*r, ElementsAre("rtap0"));
}

TEST(DomainTapDevices, MalformedXmlNamesTheDomain) {
  auto r = DomainTapDevices("<domain>", "web1", FakeSysClassNet());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("domain web1: domain XML is not well-formed"));
}

}  // namespace
}  // namespace remus
