#include "replicator/backup/records.h"

#include <gtest/gtest.h>

namespace remus {
namespace {

TEST(Records, ConfigOfTheWrongTypesIsInvalidArgument) {
  for (const char* bad : {
           R"([1,2])", R"({"argv":"qemu"})", R"({"argv":[1]})", R"({"argv":[]})", R"({})",
           R"({"argv":["q"],"heartbeat_interval_ms":"50"})", R"({"argv":["q"],"interval_ms":1.5})",
           R"({"argv":["q"],"disks":{}})", R"({"argv":["q"],"disks":[{"id":"d","size":-1}]})",
           R"({"argv":["q"],"disks":[{"id":"d","size":1,"node":5}]})", R"({"argv":["q"],"disks":[{"id":"../x","size":1}]})",
           R"({"libvirt":"<domain/>"})", R"({"libvirt":{"xml":7}})", R"({"argv":["q"],"qemu_version":7})",
           R"({"argv":["q"],"domain":[]})", "not json"}) {
    auto c = ParseConfigPayload(bad, "vm1");
    // Not JSON is DataLoss (the codec's rule), the wrong shape InvalidArgument.
    EXPECT_EQ(c.status().code(), std::string(bad) == "not json" ? Code::kDataLoss : Code::kInvalidArgument) << bad;
  }
  auto ok = ParseConfigPayload(
      R"({"domain":"vm1","argv":["q","-m","1"],"heartbeat_interval_ms":50,"heartbeat_timeout_ms":2000,)"
      R"("disks":[{"id":"drive0","node":"n","format":"raw","file":"/x","size":4096}]})",
      "vm1");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->argv[0], "q");
  EXPECT_EQ(ok->disks.at(0).id, "drive0");
  EXPECT_EQ(ParseConfigFile(R"({"argv":5})", "vm1").status().code(), Code::kDataLoss);
}

TEST(Records, SyncBegin) {
  auto b = ParseSyncBegin(R"({"total_bytes":8192,"blocks":[{"id":"pc.ram","used_length":8192}],"configuration":"0700"})");
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->total_bytes, 8192u);
  ASSERT_EQ(b->blocks.size(), 1u);
  EXPECT_EQ(b->blocks[0].id, "pc.ram");
  EXPECT_EQ(b->configuration, std::string("\x07\x00", 2));
  for (const char* bad : {R"({"total_bytes":"x"})", R"({"blocks":{}})", R"({"blocks":[{"id":1,"used_length":1}]})",
                          R"({"blocks":[{"id":"a","used_length":"1"}]})", R"({"configuration":5})", "[]", "{",
                          R"({"configuration":"zz"})"})
    EXPECT_FALSE(ParseSyncBegin(bad).ok()) << bad;
}

TEST(Records, ReasonIsInformational) {
  EXPECT_EQ(ParseReason(""), "");
  EXPECT_EQ(ParseReason(R"({"reason":"QEMU exited"})"), "QEMU exited");
  EXPECT_EQ(ParseReason(R"({"reason":42})"), "");
  EXPECT_EQ(ParseReason("garbage"), "");
}

TEST(Records, StateFiles) {
  EXPECT_EQ(ParseDisksFile(R"([{"id":"d","size":"x"}])", "disks.json").status().code(), Code::kDataLoss);
  EXPECT_EQ(ParseDisksFile(R"({})", "disks.json").status().code(), Code::kDataLoss);
  auto d = ParseDisksFile(R"([{"id":"d","size":4096}])", "disks.json");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ((*d)[0].size, 4096u);
  EXPECT_EQ(ParsePromotionMarker(R"({"pid":"1"})").status().code(), Code::kDataLoss);
  EXPECT_EQ(ParsePromotionMarker(R"({"libvirt":3})").status().code(), Code::kDataLoss);
  auto m = ParsePromotionMarker(R"({"pid":12,"epoch":3,"libvirt":{"uri":"qemu:///system","domain":"vm1"}})");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->pid, 12);
  EXPECT_TRUE(m->via_libvirt);
  EXPECT_EQ(m->libvirt_domain, "vm1");
}

}  // namespace
}  // namespace remus
