// ListGuestDisks against canned query-block answers: QEMU with -drive disks
// (QMP mode) and with libvirt's -blockdev disks (libvirt mode).
#include "replicator/primary/disk_source.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/fakes/fake_monitor.h"

namespace remus {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

json Inserted(const std::string& node, const std::string& file, const std::string& drv, uint64_t size,
              bool ro = false) {
  return {{"node-name", node}, {"file", file}, {"drv", drv}, {"ro", ro}, {"image", {{"virtual-size", size}}}};
}

// As QEMU 7.2 answers for a domain libvirt 9.0 started: -blockdev, no drive ids.
json LibvirtBlocks() {
  return json::array({
      {{"device", ""}, {"qdev", "/machine/peripheral/virtio-disk0/virtio-backend"},
       {"inserted", Inserted("libvirt-2-format", "/var/lib/img/web1.qcow2", "qcow2", 64 << 20)}},
      {{"device", ""}, {"qdev", "/machine/peripheral/virtio-disk1/virtio-backend"},
       {"inserted", Inserted("libvirt-1-format", "/var/lib/img/data.raw", "raw", 32 << 20)}},
      {{"device", ""}, {"qdev", "sata0-0-0"},
       {"inserted", Inserted("libvirt-3-format", "/iso/install.iso", "raw", 1 << 20, true)}},
  });
}

const std::map<std::string, std::string> kTargets = {
    {"virtio-disk0", "vda"}, {"virtio-disk1", "vdb"}, {"sata0-0-0", "sda"}};

TEST(QdevAlias, FromPathOrId) {
  EXPECT_EQ(QdevAlias("/machine/peripheral/virtio-disk0/virtio-backend"), "virtio-disk0");
  EXPECT_EQ(QdevAlias("/machine/peripheral/scsi0-0-0-0"), "scsi0-0-0-0");
  EXPECT_EQ(QdevAlias("sata0-0-0"), "sata0-0-0");
  EXPECT_EQ(QdevAlias("/machine/peripheral-anon/device[0]/virtio-backend"), "");
  EXPECT_EQ(QdevAlias(""), "");
}

TEST(ListGuestDisks, DriveDisksByDriveId) {
  FakeMonitor m("query-block", json::array({
      {{"device", "drive0"}, {"qdev", "/machine/peripheral-anon/device[0]/virtio-backend"},
       {"inserted", Inserted("#block123", "/img/a.raw", "raw", 16 << 20)}},
      {{"device", "cd0"}},  // no medium
      {{"device", "ro0"}, {"inserted", Inserted("#block456", "/img/b.raw", "raw", 16 << 20, true)}},
  }));
  auto d = ListGuestDisks(&m, "web1", "all");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ((*d)[0].id, "drive0");
  EXPECT_EQ((*d)[0].device, "drive0");  // blockdev-mirror names the drive
  EXPECT_EQ((*d)[0].size, uint64_t{16} << 20);
  EXPECT_TRUE(ListGuestDisks(&m, "web1", "none")->empty());
}

TEST(ListGuestDisks, QmpModeRefusesBlockdevDisks) {
  FakeMonitor m("query-block", LibvirtBlocks());
  auto d = ListGuestDisks(&m, "web1", "all");
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(d.status().message(), HasSubstr("domain web1"));
  EXPECT_THAT(d.status().message(), HasSubstr("-blockdev"));
  EXPECT_THAT(d.status().message(), HasSubstr("--disks none"));
  EXPECT_THAT(d.status().message(), HasSubstr("virtio-disk0"));
}

TEST(ListGuestDisks, LibvirtBlockdevDisksByTarget) {
  FakeMonitor m("query-block", LibvirtBlocks());
  auto d = ListGuestDisks(&m, "web1", "all", &kTargets);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  ASSERT_EQ(d->size(), 2u);  // the read-only CD-ROM is not mirrored
  EXPECT_EQ((*d)[0].id, "vda");
  EXPECT_EQ((*d)[0].node, "libvirt-2-format");
  EXPECT_EQ((*d)[0].device, "libvirt-2-format");  // blockdev-mirror from the top node
  EXPECT_EQ((*d)[0].format, "qcow2");
  EXPECT_EQ((*d)[0].size, uint64_t{64} << 20);
  EXPECT_EQ((*d)[1].id, "vdb");
  EXPECT_EQ((*d)[1].device, "libvirt-1-format");
  // The node is not sent to the backup as the mirror's source.
  EXPECT_FALSE((*d)[0].ToJson().contains("device"));

  auto one = ListGuestDisks(&m, "web1", "vdb", &kTargets);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  ASSERT_EQ(one->size(), 1u);
  EXPECT_EQ((*one)[0].id, "vdb");

  auto bad = ListGuestDisks(&m, "web1", "vda,vdz", &kTargets);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("no writable disk 'vdz'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("vda, vdb"));
  EXPECT_THAT(bad.status().message(), HasSubstr("virsh domblklist"));
}

TEST(ListGuestDisks, LibvirtDiskOutsideTheXmlIsRefusedUnlessNotSelected) {
  json blocks = LibvirtBlocks();
  // A -drive from <qemu:commandline>: the backup could not point it at its copy.
  blocks.push_back({{"device", "extra0"}, {"qdev", "/machine/peripheral-anon/device[3]/virtio-backend"},
                    {"inserted", Inserted("#block9", "/img/extra.raw", "raw", 1 << 20)}});
  FakeMonitor m("query-block", blocks);
  auto all = ListGuestDisks(&m, "web1", "all", &kTargets);
  ASSERT_FALSE(all.ok());
  EXPECT_EQ(all.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(all.status().message(), HasSubstr("domain web1 (libvirt)"));
  EXPECT_THAT(all.status().message(), HasSubstr("extra0"));
  EXPECT_THAT(all.status().message(), HasSubstr("--disks"));
  // Naming the XML's disks leaves it out.
  auto some = ListGuestDisks(&m, "web1", "vda,vdb", &kTargets);
  ASSERT_TRUE(some.ok()) << some.status().ToString();
  EXPECT_EQ(some->size(), 2u);
  // An alias the XML does not know is refused the same way.
  const std::map<std::string, std::string> partial = {{"virtio-disk0", "vda"}};
  FakeMonitor m2("query-block", LibvirtBlocks());
  auto p = ListGuestDisks(&m2, "web1", "all", &partial);
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), HasSubstr("virtio-disk1"));
}

}  // namespace
}  // namespace remus
