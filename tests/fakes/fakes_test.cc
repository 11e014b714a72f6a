// The shared fakes behave as their headers say.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>

#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_monitor.h"
#include "tests/fakes/loopback_link.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using json = nlohmann::json;

TEST(FakeClock, MovesOnlyWhenAdvanced) {
  FakeClock c;
  TimePoint t0 = c.Now();
  EXPECT_EQ(c.Now(), t0);
  c.Advance(std::chrono::milliseconds(250));
  EXPECT_EQ(c.Now() - t0, std::chrono::milliseconds(250));
}

TEST(TempDir, IsCreatedAndRemovedWithItsContents) {
  std::string path;
  {
    testing::TempDir d("fakes");
    path = d.path();
    ASSERT_TRUE(std::filesystem::is_directory(path));
    ASSERT_TRUE(WriteFileAtomic(d.file("x"), "data").ok());
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_TRUE(std::filesystem::is_directory(testing::MakeTempDir("fakes")));
}

TEST(FakeMonitor, AnswersFailsScriptsAndRecords) {
  FakeMonitor m("query-status", {{"status", "running"}});
  m.Fail("migrate", FailedPrecondition("busy"));
  m.Script("echo", [](const json& args) -> StatusOr<json> { return args; });
  EXPECT_EQ(m.Execute("query-status")->at("status"), "running");
  EXPECT_EQ(m.Execute("migrate").status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(*m.Execute("echo", {{"a", 1}}), (json{{"a", 1}}));
  auto unknown = m.Execute("quit");
  EXPECT_EQ(unknown.status().code(), Code::kUnimplemented);
  EXPECT_NE(unknown.status().message().find("'quit'"), std::string::npos);
  m.Answer("migrate", json::object());  // replaces the failure
  EXPECT_TRUE(m.Execute("migrate", json::object(), 5).ok());
  EXPECT_EQ(m.count("migrate"), 2);
  ASSERT_EQ(m.calls().size(), 5u);  // query-status, migrate, echo, quit, migrate
  EXPECT_EQ(m.calls()[4].timeout_ms, 5);
  // HumanMonitorCommand goes through Execute("human-monitor-command").
  m.Answer("human-monitor-command", "info output");
  EXPECT_EQ(*m.HumanMonitorCommand("info network"), "info output");

  EXPECT_FALSE(m.Emit({{"event", "STOP"}}));
  std::string seen;
  m.SetEventHandler([&](const json& e) { seen = e["event"]; });
  EXPECT_TRUE(m.Emit({{"event", "STOP"}}));
  EXPECT_EQ(seen, "STOP");
}

TEST(LoopbackLink, CarriesFramesBothWays) {
  auto [a, b] = testing::MakeLoopbackLinks();
  ASSERT_TRUE(a->Send(wire::MsgType::kHeartbeat, 7, "ping").ok());
  auto f = b->Recv();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->epoch, 7u);
  EXPECT_EQ(f->payload, "ping");
  ASSERT_TRUE(b->Send(wire::MsgType::kAck, 7, "").ok());
  EXPECT_EQ(a->Recv()->type, wire::MsgType::kAck);
  b.reset();
  EXPECT_EQ(a->Recv().status().code(), Code::kUnavailable);
}

TEST(LoopbackLink, SmallBuffersBlockTheSenderUntilThePeerReads) {
  auto [a, b] = testing::MakeLoopbackLinks(4096);
  std::atomic<bool> sent{false};
  std::thread sender([&, link = a.get()] {
    EXPECT_TRUE(link->Send(wire::MsgType::kPages, 1, std::string(1 << 20, 'p')).ok());
    sent = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(sent) << "1 MiB went into a 4 KiB buffer that nobody reads";
  auto f = b->Recv();
  sender.join();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->payload.size(), size_t{1} << 20);
  EXPECT_TRUE(sent);
}

}  // namespace
}  // namespace remus
