// Unit tests of the libvirt boundary that need no libvirtd: the pure helpers
// (event shape, reply parsing, error mapping, save image layout), and
// Connect's errors against libvirt's built-in test driver (test:///default,
// in-process) and a URI whose socket does not exist. The real daemon is
// exercised by tests/e2e/test_libvirt_basics.py.
#include "replicator/libvirt/monitor.h"
#include "replicator/libvirt/restore.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/io.h"
#include "replicator/libvirt/restore.h"
#include "replicator/libvirt/session.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace libvirt_internal;

const std::string kWhere = "domain web1 (libvirt qemu:///system)";

TEST(LibvirtEvent, QmpShapeWithData) {
  json ev = MakeEvent("MIGRATION", 1700000000, 123456, R"({"status":"colo"})");
  EXPECT_EQ(ev["event"], "MIGRATION");
  EXPECT_EQ(ev["data"]["status"], "colo");
  EXPECT_EQ(ev["timestamp"]["seconds"], 1700000000);
  EXPECT_EQ(ev["timestamp"]["microseconds"], 123456);
}

TEST(LibvirtEvent, NoDataKeyWhenQemuSentNone) {
  // QEMU's STOP has no "data"; QmpClient passes it on without one.
  json ev = MakeEvent("STOP", 5, 7, nullptr);
  EXPECT_FALSE(ev.contains("data"));
  EXPECT_EQ(ev["timestamp"]["seconds"], 5);
}

TEST(LibvirtEvent, MissingTimestampIsMinusOne) {
  json ev = MakeEvent("RESUME", -1, 0, nullptr);
  EXPECT_EQ(ev["timestamp"]["seconds"], -1);
  EXPECT_EQ(ev["timestamp"]["microseconds"], -1);
}

TEST(LibvirtCommand, ArgumentsOnlyWhenGiven) {
  EXPECT_EQ(json::parse(MakeCommand("query-status", json::object())), json({{"execute", "query-status"}}));
  json c = json::parse(MakeCommand("migrate", {{"uri", "fd:x"}}));
  EXPECT_EQ(c["arguments"]["uri"], "fd:x");
}

TEST(LibvirtReply, ReturnValue) {
  auto r = ParseReply("query-status", kWhere, R"({"return":{"status":"running"},"id":"libvirt-412"})");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["status"], "running");
}

TEST(LibvirtReply, ErrorsMapLikeQmpClient) {
  auto r = ParseReply("nope", kWhere,
                      R"({"id":"libvirt-413","error":{"class":"CommandNotFound","desc":"The command nope has not been found"}})");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("QMP command 'nope' failed on domain web1"));
  EXPECT_THAT(r.status().message(), HasSubstr("CommandNotFound: The command nope has not been found"));

  auto g = ParseReply("migrate", kWhere, R"({"error":{"class":"GenericError","desc":"busy"}})");
  EXPECT_EQ(g.status().code(), Code::kFailedPrecondition);
  auto d = ParseReply("device_del", kWhere, R"({"error":{"class":"DeviceNotFound","desc":"x"}})");
  EXPECT_EQ(d.status().code(), Code::kInvalidArgument);
}

TEST(LibvirtReply, GarbageIsInternal) {
  EXPECT_EQ(ParseReply("x", kWhere, "not json").status().code(), Code::kInternal);
  EXPECT_EQ(ParseReply("x", kWhere, R"({"id":"a"})").status().code(), Code::kInternal);
  EXPECT_EQ(ParseReply("x", kWhere, nullptr).status().code(), Code::kInternal);
}

TEST(LibvirtErrors, CodeMapping) {
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_OPERATION_TIMEOUT, true), Code::kDeadlineExceeded);
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_NO_CONNECT, true), Code::kUnavailable);
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_RPC, true), Code::kUnavailable);
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_NO_DOMAIN, true), Code::kUnavailable);
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_ACCESS_DENIED, true), Code::kPermissionDenied);
  // "domain is not running" once QEMU is gone: a closed monitor.
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_OPERATION_INVALID, false), Code::kUnavailable);
  EXPECT_EQ(CodeForLibvirtError(VIR_ERR_INTERNAL_ERROR, true), Code::kInternal);
}

TEST(LibvirtPidFile, Parses) {
  EXPECT_EQ(*ParsePidFile("1234", "p"), 1234);
  EXPECT_EQ(*ParsePidFile("1234\n", "p"), 1234);
  EXPECT_EQ(ParsePidFile("", "p").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParsePidFile("12a", "p").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParsePidFile("0", "p").status().code(), Code::kInvalidArgument);
}

TEST(LibvirtNames, StoppedAndClose) {
  EXPECT_EQ(StoppedDetailName(VIR_DOMAIN_EVENT_STOPPED_DESTROYED), "destroyed");
  EXPECT_EQ(StoppedDetailName(VIR_DOMAIN_EVENT_STOPPED_CRASHED), "crashed");
  EXPECT_EQ(StoppedDetailName(VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN), "shutdown");
  EXPECT_EQ(CloseReasonName(VIR_CONNECT_CLOSE_REASON_EOF), "eof");
  EXPECT_EQ(CloseReasonName(VIR_CONNECT_CLOSE_REASON_KEEPALIVE), "keepalive");
}

// ---- Connect's errors ----

TEST(LibvirtConnect, UnreachableLibvirtNamesUriAndDaemon) {
  std::string dir = testing::MakeTempDir("lvmon");
  LibvirtMonitorOptions o;
  o.uri = "qemu:///system?socket=" + dir + "/no-such-sock";
  o.domain = "web1";
  auto m = LibvirtMonitor::Connect(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr(o.uri));
  EXPECT_THAT(m.status().message(), HasSubstr("domain web1"));
  EXPECT_THAT(m.status().message(), HasSubstr("is libvirtd running"));
}

TEST(LibvirtConnect, NoDomainName) {
  LibvirtMonitorOptions o;
  o.domain = "";
  EXPECT_EQ(LibvirtMonitor::Connect(o).status().code(), Code::kInvalidArgument);
}

// libvirt's test driver runs in-process, with one running domain "test".
TEST(LibvirtConnect, UnknownDomainIsNotFound) {
  LibvirtMonitorOptions o;
  o.uri = "test:///default";
  o.domain = "no-such-domain";
  auto m = LibvirtMonitor::Connect(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("has no domain no-such-domain"));
  EXPECT_THAT(m.status().message(), HasSubstr("list --all"));
}

TEST(LibvirtConnect, ShutOffDomainIsFailedPrecondition) {
  // test:///default is one shared instance per process: a domain defined on
  // this connection is seen by Connect's.
  virConnectPtr c = virConnectOpen("test:///default");
  ASSERT_NE(c, nullptr);
  const char* xml =
      "<domain type='test'><name>off1</name><memory>65536</memory>"
      "<os><type>hvm</type></os></domain>";
  virDomainPtr d = virDomainDefineXML(c, xml);
  ASSERT_NE(d, nullptr);
  LibvirtMonitorOptions o;
  o.uri = "test:///default";
  o.domain = "off1";
  auto m = LibvirtMonitor::Connect(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(m.status().message(), HasSubstr("domain off1"));
  EXPECT_THAT(m.status().message(), HasSubstr("is shut off"));
  EXPECT_THAT(m.status().message(), HasSubstr("start off1"));
  virDomainUndefine(d);
  virDomainFree(d);
  virConnectClose(c);
}

TEST(LibvirtConnect, NonQemuDomainHasNoMonitor) {
  LibvirtMonitorOptions o;
  o.uri = "test:///default";
  o.domain = "test";
  auto m = LibvirtMonitor::Connect(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(m.status().message(), HasSubstr("QEMU driver"));
}

// ---- save image ----

uint32_t Native32(const std::string& s, size_t off) {
  uint32_t v;
  std::memcpy(&v, s.data() + off, 4);
  return v;
}

TEST(LibvirtSaveImage, PrefixLayoutMatchesQemuSaveHeader) {
  const std::string xml = "<domain type='qemu'><name>web1</name></domain>";
  auto p = EncodeSaveImagePrefix(xml, true);
  ASSERT_TRUE(p.ok());
  const uint32_t data_len = static_cast<uint32_t>(xml.size() + 1 + kLibvirtSaveXmlPadding);
  ASSERT_EQ(p->size(), kLibvirtSaveHeaderSize + data_len);
  EXPECT_EQ(p->substr(0, 16), "LibvirtQemudSave");
  EXPECT_EQ(Native32(*p, 16), 2u);          // version
  EXPECT_EQ(Native32(*p, 20), data_len);    // data_len
  EXPECT_EQ(Native32(*p, 24), 1u);          // was_running
  EXPECT_EQ(Native32(*p, 28), 0u);          // compressed: raw
  EXPECT_EQ(Native32(*p, 32), 0u);          // cookieOffset: none
  EXPECT_EQ(p->substr(36, 56), std::string(56, '\0'));
  EXPECT_EQ(p->substr(92, xml.size()), xml);
  EXPECT_EQ((*p)[92 + xml.size()], '\0');

  auto paused = EncodeSaveImagePrefix(xml, false);
  EXPECT_EQ(Native32(*paused, 24), 0u);
  EXPECT_EQ(EncodeSaveImagePrefix(std::string("a\0b", 3), true).status().code(), Code::kInvalidArgument);
}

TEST(LibvirtSaveImage, WriteAppendsTheStream) {
  std::string dir = testing::MakeTempDir("lvsave");
  std::string path = dir + "/img";
  int f = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(f, 0);
  Fd fd(f);
  const std::string xml = "<domain><name>a</name></domain>";
  ASSERT_TRUE(WriteSaveImage(fd.get(), xml, true, [](int out) { return WriteFull(out, "QEVM\0\0\0\3", 8); }).ok());
  auto all = ReadFileToString(path);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), kLibvirtSaveHeaderSize + xml.size() + 1 + kLibvirtSaveXmlPadding + 8);
  EXPECT_EQ(all->substr(all->size() - 8, 4), "QEVM");
  // A writer's error is returned as is.
  Status s = WriteSaveImage(fd.get(), xml, true, [](int) { return DataLoss("store crc"); });
  EXPECT_EQ(s.code(), Code::kDataLoss);
}

TEST(LibvirtDomainXml, NameUuidEmulator) {
  const std::string xml =
      "<domain type='qemu'>\n  <name>web1</name>\n  <uuid>9e7bce4c-57a1-4a45-9df7-15e4c67b1092</uuid>\n"
      "  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n  </devices>\n</domain>\n";
  EXPECT_EQ(*DomainXmlName(xml), "web1");
  EXPECT_EQ(*DomainXmlUuid(xml), "9e7bce4c-57a1-4a45-9df7-15e4c67b1092");
  auto e = SetDomainXmlEmulator(xml, "/opt/q&a/qemu");
  ASSERT_TRUE(e.ok());
  EXPECT_THAT(*e, HasSubstr("<emulator>/opt/q&amp;a/qemu</emulator>"));
  EXPECT_THAT(*e, HasSubstr("<name>web1</name>"));
  EXPECT_EQ(DomainXmlName("<domain/>").status().code(), Code::kNotFound);
  EXPECT_EQ(SetDomainXmlEmulator("<domain/>", "/x").status().code(), Code::kNotFound);
}

TEST(LibvirtDomainXml, RewriteForRestore) {
  const std::string xml =
      "<domain type='qemu'>\n  <name>web1</name>\n  <metadata>\n"
      "    <remus:protect xmlns:remus=\"https://remus.dev/xmlns/1\" backup=\"hostB:7788\" interval=\"100\"/>\n"
      "    <app:x xmlns:app='https://example.org/app'/>\n  </metadata>\n  <devices>\n"
      "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
      "    <disk type='file' device='disk'><source file='/var/lib/img/web1.qcow2'/></disk>\n"
      "    <serial type='file'>\n      <source path='/var/log/web1.serial'/>\n"
      "      <log file='/var/log/web1.serial.log' append='on'/>\n      <target port='0'/>\n    </serial>\n"
      "    <serial type='pty'><source path='/dev/pts/3'/><target port='1'/></serial>\n"
      "    <console type='file'>\n      <source path='/var/log/web1.serial'/>\n"
      "      <target type='serial' port='0'/>\n    </console>\n"
      "    <channel type=\"file\"><source path=\"/tmp/ch&amp;1\"/></channel>\n"
      "  </devices>\n</domain>\n";
  auto r = RewriteDomainXmlForRestore(xml, "/state/domains/web1/run", "/opt/qemu");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  // The console and serial 0 share the one file, as on the primary.
  // (The edited XML is libxml2's text of it: attributes in double quotes.)
  EXPECT_THAT(*r, HasSubstr("<serial type=\"file\">\n      <source path=\"/state/domains/web1/run/serial.log\"/>"));
  EXPECT_THAT(*r, HasSubstr("<console type=\"file\">\n      <source path=\"/state/domains/web1/run/serial.log\"/>"));
  EXPECT_THAT(*r, HasSubstr("<log file=\"/state/domains/web1/run/chardev-1.log\" append=\"on\"/>"));
  EXPECT_THAT(*r, HasSubstr("<source path=\"/state/domains/web1/run/chardev-2.log\"/>"));
  EXPECT_THAT(*r, Not(HasSubstr("/var/log/web1")));
  // Only file-backed devices move; disks are left alone.
  EXPECT_THAT(*r, HasSubstr("<source path=\"/dev/pts/3\"/>"));
  EXPECT_THAT(*r, HasSubstr("<source file=\"/var/lib/img/web1.qcow2\"/>"));
  // remus's own metadata goes, other applications' stays.
  EXPECT_THAT(*r, Not(HasSubstr("remus.dev")));
  EXPECT_THAT(*r, HasSubstr("<metadata>\n    <app:x xmlns:app=\"https://example.org/app\"/>\n  </metadata>"));
  EXPECT_THAT(*r, HasSubstr("<emulator>/opt/qemu</emulator>"));
  // No emulator given: the primary's stays.
  auto keep = RewriteDomainXmlForRestore(xml, "/r", "");
  ASSERT_TRUE(keep.ok());
  EXPECT_THAT(*keep, HasSubstr("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
  // A path needing escapes is escaped.
  auto esc = RewriteDomainXmlForRestore(xml, "/r&d", "");
  ASSERT_TRUE(esc.ok());
  EXPECT_THAT(*esc, HasSubstr("<source path=\"/r&amp;d/serial.log\"/>"));
  EXPECT_EQ(RewriteDomainXmlForRestore("<vm/>", "/r", "").status().code(), Code::kInvalidArgument);
}

TEST(LibvirtDomainXml, RewriteRemovesLongFormMetadata) {
  const std::string xml =
      "<domain><name>a</name><metadata><r:protect xmlns:r='https://remus.dev/xmlns/1' backup='b'>"
      "</r:protect></metadata></domain>";
  auto r = RewriteDomainXmlForRestore(xml, "/r", "");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<domain><name>a</name><metadata/></domain>");
}

// Disks as libvirt 9.0 writes them in the XML of a running domain.
const std::string kDiskXml =
    "<domain type='qemu' id='3'>\n  <name>web1</name>\n  <devices>\n"
    "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
    "    <disk type='file' device='disk'>\n"
    "      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>\n"
    "      <source file='/var/lib/img/web1.qcow2' index='2'/>\n"
    "      <backingStore type='file' index='3'>\n"
    "        <format type='qcow2'/>\n"
    "        <source file='/var/lib/img/base.qcow2'/>\n"
    "        <backingStore type='file' index='4'>\n"
    "          <format type='raw'/>\n"
    "          <source file='/var/lib/img/base0.raw'/>\n"
    "          <backingStore/>\n"
    "        </backingStore>\n"
    "      </backingStore>\n"
    "      <target dev='vda' bus='virtio'/>\n"
    "      <alias name='virtio-disk0'/>\n"
    "      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>\n"
    "    </disk>\n"
    "    <disk type=\"block\" device=\"disk\">\n"
    "      <source dev=\"/dev/vg0/data\" index=\"1\"/>\n"
    "      <backingStore/>\n"
    "      <target dev=\"vdb\" bus=\"virtio\"/>\n"
    "      <serial>DATA-1</serial>\n"
    "      <alias name=\"virtio-disk1\"/>\n"
    "    </disk>\n"
    "    <disk type='file' device='cdrom'>\n"
    "      <driver name='qemu' type='raw'/>\n"
    "      <source file='/iso/install.iso' index='5'/>\n"
    "      <target dev='sda' bus='sata'/>\n"
    "      <readonly/>\n"
    "      <alias name='sata0-0-0'/>\n"
    "    </disk>\n"
    "    <serial type='pty'><source path='/dev/pts/3'/><target port='0'/></serial>\n"
    "  </devices>\n</domain>\n";

TEST(LibvirtDomainXml, DiskTargetsByAlias) {
  auto t = LibvirtDiskTargets(kDiskXml);
  EXPECT_EQ(t, (std::map<std::string, std::string>{
                   {"virtio-disk0", "vda"}, {"virtio-disk1", "vdb"}, {"sata0-0-0", "sda"}}));
  // Without aliases (an inactive definition) there is nothing to map.
  EXPECT_TRUE(LibvirtDiskTargets("<domain><devices><disk type='file'><target dev='vda'/></disk></devices></domain>")
                  .empty());
}

TEST(LibvirtDomainXml, RewriteMirroredDisksOntoTheBackupsImages) {
  auto r = RewriteDomainXmlForRestore(kDiskXml, "/state/domains/web1/run", "",
                                      {{"vda", "/state/domains/web1/disks/vda.img"},
                                       {"vdb", "/state/domains/web1/disks/vdb.img"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  // vda: raw, on the copy, its backing chain gone, cache and discard kept.
  EXPECT_THAT(*r, HasSubstr("    <disk type=\"file\" device=\"disk\">\n"
                            "      <driver name=\"qemu\" type=\"raw\" cache=\"none\" discard=\"unmap\"/>\n"
                            "      <source file=\"/state/domains/web1/disks/vda.img\"/>\n"
                            "      <target dev=\"vda\" bus=\"virtio\"/>\n"
                            "      <alias name=\"virtio-disk0\"/>\n"));
  EXPECT_THAT(*r, Not(HasSubstr("/var/lib/img")));
  EXPECT_THAT(*r, Not(HasSubstr("<backingStore")));
  EXPECT_THAT(*r, Not(HasSubstr("qcow2")));
  // vdb: a block device on the primary becomes a file disk, with a driver.
  EXPECT_THAT(*r, HasSubstr("    <disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"raw\"/>\n"
                            "      <source file=\"/state/domains/web1/disks/vdb.img\"/>\n"
                            "      <target dev=\"vdb\" bus=\"virtio\"/>\n"
                            "      <serial>DATA-1</serial>\n"));
  EXPECT_THAT(*r, Not(HasSubstr("/dev/vg0/data")));
  // Disks not mirrored, and the other devices, stay as they were.
  EXPECT_THAT(*r, HasSubstr("<source file=\"/iso/install.iso\" index=\"5\"/>"));
  EXPECT_THAT(*r, HasSubstr("<source path=\"/dev/pts/3\"/>"));
  // No images: the XML's disks are left alone.
  auto plain = RewriteDomainXmlForRestore(kDiskXml, "/r", "");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain, kDiskXml);
  // An image with an XML-special path is escaped.
  auto esc = RewriteDomainXmlForRestore(kDiskXml, "/r", "", {{"vda", "/s&t/vda.img"}});
  ASSERT_TRUE(esc.ok());
  EXPECT_THAT(*esc, HasSubstr("<source file=\"/s&amp;t/vda.img\"/>"));
}

TEST(LibvirtDomainXml, RewriteRefusesAnImageForNoDisk) {
  auto r = RewriteDomainXmlForRestore(kDiskXml, "/r", "", {{"vdz", "/s/vdz.img"}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("vdz"));
}

TEST(LibvirtDomainXml, RewriteAddsADriverAndSourceWhenMissing) {
  const std::string xml =
      "<domain><name>a</name><devices><disk type='network' device='disk'>"
      "<target dev='vda' bus='virtio'/></disk></devices></domain>";
  auto r = RewriteDomainXmlForRestore(xml, "/r", "", {{"vda", "/s/vda.img"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r,
            "<domain><name>a</name><devices><disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"raw\"/>"
            "<source file=\"/s/vda.img\"/><target dev=\"vda\" bus=\"virtio\"/></disk></devices></domain>");
}

// Text the old hand-written scanner misread, and text that is not XML: the
// XML can come from the peer (CONFIG), so a bad one must be a clear error.
TEST(LibvirtDomainXml, MalformedXmlIsAClearError) {
  for (const std::string bad : {std::string(""), std::string("not xml"), std::string("<domain><name>a</name>"),
                                std::string("<domain><name>a</domain>"), std::string("<domain type='qemu></domain>"),
                                std::string("<domain><name>a</name></domain><domain/>"),
                                std::string("<domain><name>a\xff\xfe</name></domain>"),
                                std::string("<domain><name>&undefined;</name></domain>"),
                                std::string("<domain><name>a</name><devices><disk type='file'><target dev='vda'/>"
                                            "<alias name='d0'/></devices></domain>")}) {
    SCOPED_TRACE(bad);
    for (const Status& s : {DomainXmlName(bad).status(), DomainXmlUuid(bad).status(),
                            SetDomainXmlEmulator(bad, "/q").status(),
                            RewriteDomainXmlForRestore(bad, "/r", "/q").status(),
                            RewriteDomainXmlForRestore(bad, "/r", "", {{"vda", "/s/vda.img"}}).status()}) {
      EXPECT_EQ(s.code(), Code::kInvalidArgument);
      EXPECT_THAT(s.message(), HasSubstr("domain XML is not well-formed"));
    }
    EXPECT_TRUE(LibvirtDiskTargets(bad).empty());
  }
  // Where: libxml2's line and reason.
  auto r = DomainXmlName("<domain>\n  <name>a</name>\n  <devices>\n</domain>\n");
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("line 4"));
  EXPECT_THAT(r.status().message(), HasSubstr("devices"));
  // Well-formed, but not a domain.
  for (const char* other : {"<network><name>default</name></network>", "<d:domain xmlns:d='u'><d:name>a</d:name></d:domain>"}) {
    SCOPED_TRACE(other);
    EXPECT_EQ(DomainXmlName(other).status().code(), Code::kInvalidArgument);
    EXPECT_THAT(DomainXmlName(other).status().message(), HasSubstr("no <domain> root element"));
    EXPECT_EQ(RewriteDomainXmlForRestore(other, "/r", "").status().code(), Code::kInvalidArgument);
  }
}

TEST(LibvirtDomainXml, DoctypesAndEntitiesAreRefused) {
  // Billion laughs, an external entity, an external DTD: refused before any
  // declaration is read; nothing is expanded or fetched.
  const std::string laughs =
      "<?xml version='1.0'?>\n<!DOCTYPE domain [\n <!ENTITY a 'aaaaaaaaaaaaaaaa'>\n"
      " <!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>\n"
      " <!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>\n"
      " <!ENTITY d '&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;'>\n"
      " <!ENTITY e '&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;'>\n"
      " <!ENTITY f '&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;'>\n"
      " <!ENTITY g '&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;'>\n"
      "]>\n<domain><name>&g;</name><devices><emulator>/q</emulator></devices></domain>\n";
  const std::string external =
      "<!DOCTYPE domain [<!ENTITY p SYSTEM 'file:///etc/passwd'>]>\n"
      "<domain><name>&p;</name><devices><emulator>/q</emulator></devices></domain>";
  const std::string dtd =
      "<!DOCTYPE domain SYSTEM 'http://127.0.0.1:9/domain.dtd'>\n<domain><name>a</name></domain>";
  for (const std::string& x : {laughs, external, dtd}) {
    auto n = DomainXmlName(x);
    EXPECT_EQ(n.status().code(), Code::kInvalidArgument);
    EXPECT_THAT(n.status().message(), HasSubstr("DOCTYPE"));
    auto r = RewriteDomainXmlForRestore(x, "/r", "/opt/qemu");
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  }
  // Too large to be a domain XML.
  std::string huge = "<domain><name>a</name><description>" + std::string(17 << 20, 'x') + "</description></domain>";
  EXPECT_EQ(DomainXmlName(huge).status().code(), Code::kInvalidArgument);
  EXPECT_THAT(DomainXmlName(huge).status().message(), HasSubstr("MiB"));
}

TEST(LibvirtDomainXml, CommentsCdataAndEntitiesAreReadAsXml) {
  const std::string xml =
      "<!-- <name>decoy0</name> -->\n<domain type=\"qemu\">\n"
      "  <metadata><app:x xmlns:app='https://example.org/app'><name>decoy1</name></app:x></metadata>\n"
      "  <!-- <name>decoy2</name> <uuid>decoy</uuid> -->\n"
      "  <name><![CDATA[web]]>&amp;<!-- not this -->1</name>\n"
      "  <uuid><!-- the uuid -->9e7bce4c</uuid>\n"
      "  <devices>\n    <!-- <emulator>/old/qemu</emulator> -->\n"
      "    <emulator><![CDATA[/usr/bin/qemu-system-x86_64]]></emulator>\n  </devices>\n</domain>";
  EXPECT_EQ(*DomainXmlName(xml), "web&1");
  EXPECT_EQ(*DomainXmlUuid(xml), "9e7bce4c");
  auto e = SetDomainXmlEmulator(xml, "/opt/q<&>/qemu");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_THAT(*e, HasSubstr("<emulator>/opt/q&lt;&amp;&gt;/qemu</emulator>"));
  // Everything else stays: the comments (the commented-out emulator too),
  // the CDATA, the other application's metadata; no trailing newline added.
  EXPECT_THAT(*e, HasSubstr("<!-- <emulator>/old/qemu</emulator> -->"));
  EXPECT_THAT(*e, HasSubstr("<name><![CDATA[web]]>&amp;<!-- not this -->1</name>"));
  EXPECT_THAT(*e, HasSubstr("<!-- <name>decoy0</name> -->\n<domain"));
  EXPECT_THAT(*e, HasSubstr("<app:x xmlns:app=\"https://example.org/app\"><name>decoy1</name></app:x>"));
  EXPECT_EQ(e->back(), '>');
  EXPECT_EQ(*DomainXmlName(*e), "web&1");
  // No emulator outside a comment.
  EXPECT_EQ(SetDomainXmlEmulator("<domain><devices><!-- <emulator>/q</emulator> --></devices></domain>", "/x")
                .status()
                .code(),
            Code::kNotFound);
  EXPECT_EQ(DomainXmlUuid("<domain><!-- <uuid>u</uuid> --><name>a</name></domain>").status().code(),
            Code::kNotFound);
}

TEST(LibvirtDomainXml, AttributeQuotingAndLayoutVariations) {
  // Spaces around '=', tabs and newlines between attributes, the other quote
  // inside a value, entities, attributes in any order, disks and devices in
  // comments: all as libvirt would read them.
  const std::string xml =
      "<domain type='qemu'>\n  <name>web1</name>\n"
      "  <metadata>\n    <protect xmlns=\"https://remus.dev/xmlns/1\" backup=\"b:1\"/>\n"
      "    <x:protect xmlns:x='https://example.org/other'/>\n  </metadata>\n"
      "  <title>Z\xc3\xbcrich</title>\n"
      "  <devices>\n    <emulator>/usr/bin/qemu</emulator>\n"
      "    <!-- <disk type='file'><target dev='vdz'/><alias name='gone'/></disk> -->\n"
      "    <disk\ttype = \"block\"\n          device='disk'>\n"
      "      <source dev='/dev/vg0/a'/>\n"
      "      <target bus=\"virtio\"   dev = 'vda'/>\n"
      "      <alias\n        name=\"it's-disk0\"/>\n    </disk>\n"
      "    <!-- <serial type='file'><source path='/var/log/commented'/></serial> -->\n"
      "    <serial type = \"file\"><source path='/var/log/say \"hi\".log'/><target port='0'/></serial>\n"
      "    <channel type='file'><source path=\"/tmp/ch&amp;1\"/></channel>\n"
      "    <console type='file'><source path='/tmp/ch&#38;1'/></console>\n"
      "    <parallel type='pty'><source path='/dev/pts/9'/></parallel>\n"
      "  </devices>\n</domain>\n";
  EXPECT_EQ(LibvirtDiskTargets(xml), (std::map<std::string, std::string>{{"it's-disk0", "vda"}}));
  EXPECT_EQ(RewriteDomainXmlForRestore(xml, "/r", "", {{"vdz", "/s/vdz.img"}}).status().code(), Code::kNotFound);
  auto r = RewriteDomainXmlForRestore(xml, "/r", "", {{"vda", "/s/vda.img"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_THAT(*r, HasSubstr("<disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"raw\"/>\n"
                            "      <source file=\"/s/vda.img\"/>\n"
                            "      <target bus=\"virtio\" dev=\"vda\"/>\n"));
  EXPECT_THAT(*r, Not(HasSubstr("/dev/vg0")));
  // The serial's path (with its quotes) is the first; the channel's and the
  // console's are one path, written two ways.
  EXPECT_THAT(*r, HasSubstr("<serial type=\"file\"><source path=\"/r/serial.log\"/>"));
  EXPECT_THAT(*r, HasSubstr("<channel type=\"file\"><source path=\"/r/chardev-1.log\"/>"));
  EXPECT_THAT(*r, HasSubstr("<console type=\"file\"><source path=\"/r/chardev-1.log\"/>"));
  EXPECT_THAT(*r, Not(HasSubstr("chardev-2")));
  EXPECT_THAT(*r, HasSubstr("<source path=\"/dev/pts/9\"/>"));
  // Comments are not devices: left as they were.
  EXPECT_THAT(*r, HasSubstr("<!-- <serial type='file'><source path='/var/log/commented'/></serial> -->"));
  EXPECT_THAT(*r, HasSubstr("<!-- <disk type='file'><target dev='vdz'/><alias name='gone'/></disk> -->"));
  // remus's protect goes in its default-namespace form too; another
  // application's <protect> stays.
  EXPECT_THAT(*r, Not(HasSubstr("remus.dev")));
  EXPECT_THAT(*r, HasSubstr("  <metadata>\n    <x:protect xmlns:x=\"https://example.org/other\"/>\n  </metadata>\n"));
  // UTF-8 stays UTF-8; the trailing newline stays.
  EXPECT_THAT(*r, HasSubstr("<title>Z\xc3\xbcrich</title>"));
  EXPECT_EQ(r->back(), '\n');
  // The result reads back as the same domain.
  EXPECT_EQ(*DomainXmlName(*r), "web1");
  EXPECT_EQ(LibvirtDiskTargets(*r), (std::map<std::string, std::string>{{"it's-disk0", "vda"}}));
}

TEST(LibvirtDomainXml, RewriteLeavesAnXmlWithNothingToChangeAsItWas) {
  const std::string xml =
      "<domain type='qemu'>\n  <name>a</name>  <!-- c -->\n  <devices>\n"
      "    <serial type='pty'><source path='/dev/pts/3'/></serial>\n  </devices>\n</domain>\n";
  auto r = RewriteDomainXmlForRestore(xml, "/r", "");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, xml);
}

TEST(LibvirtSession, ConnectErrorsAreTheMonitors) {
  std::string dir = testing::MakeTempDir("lvsess");
  LibvirtMonitorOptions o;
  o.uri = "qemu:///system?socket=" + dir + "/no-such-sock";
  o.domain = "web1";
  auto s = LibvirtSession::Connect(o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Code::kUnavailable);
  EXPECT_THAT(s.status().message(), HasSubstr(o.uri));
  EXPECT_THAT(s.status().message(), HasSubstr("libvirtd running"));
  o.uri = "test:///default";
  o.domain = "nope";
  EXPECT_EQ(LibvirtSession::Connect(o).status().code(), Code::kNotFound);
}

TEST(LibvirtRestore, UnreachableLibvirt) {
  std::string dir = testing::MakeTempDir("lvrest");
  LibvirtRestoreOptions o;
  o.uri = "qemu:///system?socket=" + dir + "/no-such-sock";
  o.work_dir = dir;
  auto r = RestoreDomain(o, "<domain><name>web1</name></domain>", [](int) { return OkStatus(); });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("restore domain web1"));
  EXPECT_EQ(RestoreDomain(o, "<domain/>", [](int) { return OkStatus(); }).status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

// A fenced copy under libvirt ends with virDomainDestroy (test driver: a
// transient domain destroyed is gone).
TEST(DestroyLibvirtDomain, DestroysARunningDomainAndToleratesAMissingOne) {
  virConnectPtr c = virConnectOpen("test:///default");
  ASSERT_NE(c, nullptr);
  const char* xml =
      "<domain type='test'><name>fence1</name><memory>65536</memory>"
      "<os><type>hvm</type></os></domain>";
  virDomainPtr d = virDomainCreateXML(c, xml, 0);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(virDomainIsActive(d), 1);
  virDomainFree(d);
  EXPECT_TRUE(DestroyLibvirtDomain("test:///default", "fence1").ok());
  virDomainPtr again = virDomainLookupByName(c, "fence1");
  EXPECT_TRUE(again == nullptr || virDomainIsActive(again) == 0);
  if (again) virDomainFree(again);
  EXPECT_TRUE(DestroyLibvirtDomain("test:///default", "no-such-domain").ok());
  virConnectClose(c);
}

}  // namespace
}  // namespace remus
