#include "remusd/history.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>

#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using nlohmann::json;

TEST(DomainHistory, RecordsInOrderAndReadsBackAfterARestart) {
  const std::string dir = testing::MakeTempDir("history") + "/history";
  {
    DomainHistory h(dir);
    EXPECT_EQ(h.Recent("web1", 10), json::array());
    h.Record("web1", {{"role", "primary"}, {"text", "protected to b:7788"}});
    h.Record("web1", {{"role", "primary"}, {"text", "failed over to b:7788"}});
    h.Record("db", {{"role", "backup"}, {"text", "backing up for primary a"}});
    h.Record("web1", {{"role", "primary"}, {"text", ""}});  // not worth a line
  }
  DomainHistory again(dir);
  json r = again.Recent("web1", 10);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0]["text"], "protected to b:7788");
  EXPECT_EQ(r[1]["text"], "failed over to b:7788");
  EXPECT_EQ(r[1]["role"], "primary");
  EXPECT_EQ(r[0]["at"].get<std::string>().size(), 20u);  // 2026-12-06T10:00:00Z
  EXPECT_EQ(again.Recent("web1", 1).size(), 1u);
  EXPECT_EQ(again.Recent("web1", 1)[0]["text"], "failed over to b:7788");
  EXPECT_EQ(again.Recent("db", 10).size(), 1u);
}

TEST(DomainHistory, SkipsATornLastLine) {
  const std::string dir = testing::MakeTempDir("history");
  DomainHistory h(dir);
  h.Record("web1", {{"text", "one"}});
  { std::ofstream(dir + "/web1.jsonl", std::ios::app) << "{\"at\":\"2026-12-06T1"; }
  json r = DomainHistory(dir).Recent("web1", 10);  // a restarted remusd reads the file
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0]["text"], "one");
}

TEST(DomainHistory, RecentIsAnsweredFromMemoryAfterTheFirstRead) {
  // status asks for every domain's history on every call: the file is read once.
  const std::string dir = testing::MakeTempDir("history");
  {
    DomainHistory before(dir);
    before.Record("web1", {{"text", "one"}});
  }
  DomainHistory h(dir);
  EXPECT_EQ(h.Recent("web1", 10).size(), 1u);
  ASSERT_EQ(::unlink((dir + "/web1.jsonl").c_str()), 0);
  h.Record("web1", {{"text", "two"}});
  json r = h.Recent("web1", 10);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0]["text"], "one");
  EXPECT_EQ(r[1]["text"], "two");
}

TEST(DomainHistory, KeepsTheLastEntriesOnly) {
  const std::string dir = testing::MakeTempDir("history");
  DomainHistory h(dir);
  const size_t n = 2 * DomainHistory::kMaxKept + 1;
  for (size_t i = 0; i < n; i++) h.Record("web1", {{"text", "event " + std::to_string(i)}});
  json all = h.Recent("web1", 10 * n);
  ASSERT_LE(all.size(), 2 * DomainHistory::kMaxKept);
  ASSERT_GE(all.size(), DomainHistory::kMaxKept);
  EXPECT_EQ(all.back()["text"], "event " + std::to_string(n - 1));
}

TEST(DomainHistory, Sentences) {
  EXPECT_EQ(DomainHistory::PrimaryText("protected", "b:7788", ""), "protected to b:7788");
  EXPECT_EQ(DomainHistory::PrimaryText("syncing", "b:7788", ""), "");
  EXPECT_EQ(DomainHistory::PrimaryText("switched-over", "b:7788", ""),
            "switched over to b:7788: the guest runs there from the final checkpoint");
  EXPECT_NE(DomainHistory::PrimaryText("failed-over", "b:7788", "QEMU exited").find("failed over to b:7788: QEMU exited"),
            std::string::npos);
  EXPECT_EQ(DomainHistory::BackupText("failed-over", "a:1", {{"epoch", 812}, {"token", 4711}}),
            "failed over from a:1: the guest runs here from checkpoint 812, token 4711");
  EXPECT_EQ(DomainHistory::BackupText("failed-over", "a:1", {{"epoch", 3}, {"token", 0}}),
            "failed over from a:1: the guest runs here from checkpoint 3");
  EXPECT_EQ(DomainHistory::BackupText("failed-over", "a:1", {{"epoch", 40}, {"token", 0}, {"switchover", true}}),
            "switched over from a:1: the guest runs here from its final checkpoint 40");
  EXPECT_EQ(DomainHistory::BackupText("waiting", "a:1", json::object()), "");
}

}  // namespace
}  // namespace remus
