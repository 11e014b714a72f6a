#include "remusd/reprotector.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace remus {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;

template <typename F>
bool Eventually(F f) {
  for (int i = 0; i < 500; i++) {
    if (f()) return true;
    std::this_thread::sleep_for(milliseconds(10));
  }
  return false;
}

struct Recorder {
  Mutex mu;
  std::vector<std::string> texts GUARDED_BY(mu);
  std::vector<json> requests GUARDED_BY(mu);
  std::vector<std::string> Texts() {
    MutexLock l(mu);
    return texts;
  }
};

TEST(Reprotector, RetriesUntilTheBackupIsBackThenStops) {
  Recorder rec;
  std::atomic<int> calls{0};
  Reprotector r({.protect =
                     [&](const json& req) {
                       {
                         MutexLock l(rec.mu);
                         rec.requests.push_back(req);
                       }
                       return ++calls < 3 ? Unavailable("backup a:1 is unreachable") : OkStatus();
                     },
                 .wanted = [](const std::string&) { return true; },
                 .report =
                     [&](const std::string& d, const std::string& t) {
                       MutexLock l(rec.mu);
                       rec.texts.push_back(d + ": " + t);
                     }},
                milliseconds(10), milliseconds(40));
  EXPECT_TRUE(r.StatusJson("web1").is_null());
  r.Request({"web1", "a:1", {{"command", "protect"}, {"domain", "web1"}, {"backup", "a:1"}}});
  ASSERT_TRUE(Eventually([&] { return r.StatusJson("web1").value("state", "") == "done"; })) << r.StatusJson("web1");
  EXPECT_EQ(r.StatusJson("web1")["attempts"], 3);
  EXPECT_FALSE(r.StatusJson("web1").contains("error"));
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(calls.load(), 3);  // nothing after it started
  // One line for the first failure (not one per retry), one for the start.
  auto t = rec.Texts();
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0], "web1: automatic re-protection to a:1 waits: backup a:1 is unreachable (retrying)");
  EXPECT_EQ(t[1], "web1: re-protecting automatically to a:1");
  MutexLock l(rec.mu);
  EXPECT_EQ(rec.requests[0]["backup"], "a:1");
}

TEST(Reprotector, AJobNoLongerWantedEndsWithoutProtecting) {
  std::atomic<int> calls{0};
  Reprotector r({.protect = [&](const json&) { return ++calls, OkStatus(); },
                 .wanted = [](const std::string&) { return false; },
                 .report = [](const std::string&, const std::string&) {}},
                milliseconds(10), milliseconds(40));
  r.Request({"web1", "a:1", json::object()});
  ASSERT_TRUE(Eventually([&] { return r.StatusJson("web1").value("state", "") == "cancelled"; }));
  EXPECT_EQ(calls.load(), 0);
}

TEST(Reprotector, CancelStopsTheRetries) {
  std::atomic<int> calls{0};
  Reprotector r({.protect = [&](const json&) { return ++calls, Unavailable("down"); },
                 .wanted = [](const std::string&) { return true; },
                 .report = [](const std::string&, const std::string&) {}},
                milliseconds(10), milliseconds(20));
  r.Request({"web1", "a:1", json::object()});
  ASSERT_TRUE(Eventually([&] { return calls.load() >= 2; }));
  r.Cancel("web1");
  EXPECT_EQ(r.StatusJson("web1")["state"], "cancelled");
  EXPECT_EQ(r.StatusJson("web1")["error"], "down");
  int n = calls.load();
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_LE(calls.load(), n + 1);  // at most the attempt under way when it was cancelled
}

}  // namespace
}  // namespace remus
