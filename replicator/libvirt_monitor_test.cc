// Unit tests of the libvirt boundary that need no libvirtd: the pure helpers
// (event shape, reply parsing, error mapping, save image layout), and
// Connect's errors against libvirt's built-in test driver (test:///default,
// in-process) and a URI whose socket does not exist. The real daemon is
// exercised by tests/e2e/test_libvirt_basics.py.
#include "replicator/libvirt_monitor.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/io.h"
#include "replicator/libvirt_restore.h"
#include "replicator/libvirt_session.h"
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
  EXPECT_THAT(*r, HasSubstr("<serial type='file'>\n      <source path='/state/domains/web1/run/serial.log'/>"));
  EXPECT_THAT(*r, HasSubstr("<console type='file'>\n      <source path='/state/domains/web1/run/serial.log'/>"));
  EXPECT_THAT(*r, HasSubstr("<log file='/state/domains/web1/run/chardev-1.log' append='on'/>"));
  EXPECT_THAT(*r, HasSubstr("<source path=\"/state/domains/web1/run/chardev-2.log\"/>"));
  EXPECT_THAT(*r, Not(HasSubstr("/var/log/web1")));
  // Only file-backed devices move; disks are left alone.
  EXPECT_THAT(*r, HasSubstr("<source path='/dev/pts/3'/>"));
  EXPECT_THAT(*r, HasSubstr("<source file='/var/lib/img/web1.qcow2'/>"));
  // remus's own metadata goes, other applications' stays.
  EXPECT_THAT(*r, Not(HasSubstr("remus.dev")));
  EXPECT_THAT(*r, HasSubstr("<metadata>\n    <app:x xmlns:app='https://example.org/app'/>\n  </metadata>"));
  EXPECT_THAT(*r, HasSubstr("<emulator>/opt/qemu</emulator>"));
  // No emulator given: the primary's stays.
  auto keep = RewriteDomainXmlForRestore(xml, "/r", "");
  ASSERT_TRUE(keep.ok());
  EXPECT_THAT(*keep, HasSubstr("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
  // A path needing escapes is escaped.
  auto esc = RewriteDomainXmlForRestore(xml, "/r&d", "");
  ASSERT_TRUE(esc.ok());
  EXPECT_THAT(*esc, HasSubstr("<source path='/r&amp;d/serial.log'/>"));
  EXPECT_EQ(RewriteDomainXmlForRestore("<vm/>", "/r", "").status().code(), Code::kInvalidArgument);
}

TEST(LibvirtDomainXml, RewriteRemovesLongFormMetadata) {
  const std::string xml =
      "<domain><name>a</name><metadata><r:protect xmlns:r='https://remus.dev/xmlns/1' backup='b'>"
      "</r:protect></metadata></domain>";
  auto r = RewriteDomainXmlForRestore(xml, "/r", "");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<domain><name>a</name><metadata></metadata></domain>");
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
