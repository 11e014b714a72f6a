#include "replicator/estimate/estimate.h"

#include <gtest/gtest.h>

#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_monitor.h"
#include "tests/fakes/status_matchers.h"

namespace remus::estimate {
namespace {

using nlohmann::json;

TEST(CheckIntervals, SortsDedupsAndRejects) {
  auto v = CheckIntervals({200, 10, 50, 10});
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, (std::vector<int64_t>{10, 50, 200}));
  EXPECT_CODE(CheckIntervals({}).status(), Code::kInvalidArgument);
  EXPECT_CODE(CheckIntervals({0}).status(), Code::kInvalidArgument);
  EXPECT_CODE(CheckIntervals({-5}).status(), Code::kInvalidArgument);
  EXPECT_CODE(CheckIntervals({600001}).status(), Code::kInvalidArgument);
  EXPECT_CODE(CheckIntervals(std::vector<int64_t>(17, 5)).status(), Code::kInvalidArgument);
  EXPECT_NE(CheckIntervals({0}).status().message().find("0 ms"), std::string::npos);
}

TEST(Rows, MeasuredWindowGivesBandwidth) {
  // 1000 pages in 100 ms: 4096000 bytes per checkpoint, 10 per second.
  auto rows = Rows({100}, {{100, 1000, "dirty-bitmap"}}, 0, 0);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].basis, "measured");
  EXPECT_DOUBLE_EQ(rows[0].pages, 1000);
  EXPECT_DOUBLE_EQ(rows[0].bytes, 4096000);
  EXPECT_DOUBLE_EQ(rows[0].mb_per_s, 40.96);
  EXPECT_DOUBLE_EQ(rows[0].gbit_per_s, 0.32768);
  EXPECT_FALSE(rows[0].mb_per_s_compressed);
}

TEST(Rows, ShorterThanEveryWindowIsALowerBoundRateTimesInterval) {
  // QEMU 7.2: one 1 s window of 10000 pages.
  auto rows = Rows({10, 100}, {{1000, 10000, "page-sampling"}}, 0, 0);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].basis, "lower-bound");
  EXPECT_DOUBLE_EQ(rows[0].pages, 100);        // rate x interval
  EXPECT_DOUBLE_EQ(*rows[0].pages_low, 100);
  EXPECT_DOUBLE_EQ(*rows[0].pages_high, 10000);  // at most the whole window
  EXPECT_EQ(rows[0].from_window_ms, 1000);
  EXPECT_DOUBLE_EQ(rows[1].pages, 1000);
  // rate x interval costs the same per second at every interval.
  EXPECT_DOUBLE_EQ(rows[0].mb_per_s, rows[1].mb_per_s);
}

TEST(Rows, LongerThanEveryWindowIsAnUpperBound) {
  auto rows = Rows({200}, {{50, 300, "checkpoints"}}, 0, 0);
  EXPECT_EQ(rows[0].basis, "upper-bound");
  EXPECT_DOUBLE_EQ(rows[0].pages, 1200);
  EXPECT_DOUBLE_EQ(*rows[0].pages_low, 300);
  EXPECT_EQ(rows[0].method, "checkpoints");
}

TEST(Rows, BetweenWindowsTakesTheTightestBounds) {
  // A saturating guest: 500 pages in 50 ms, 600 in 200 ms.
  auto rows = Rows({100}, {{50, 500, "dirty-bitmap"}, {200, 600, "dirty-bitmap"}}, 0, 0);
  EXPECT_EQ(rows[0].basis, "upper-bound");
  EXPECT_DOUBLE_EQ(*rows[0].pages_low, 500);   // max(D(50), D(200)/2 = 300)
  EXPECT_DOUBLE_EQ(*rows[0].pages_high, 600);  // min(D(50)*2 = 1000, D(200))
  EXPECT_DOUBLE_EQ(rows[0].pages, 600);
  EXPECT_EQ(rows[0].from_window_ms, 200);
}

TEST(Rows, NoisySamplesNeverCrossBounds) {
  // Sampling noise: the longer window saw fewer pages than the shorter.
  auto rows = Rows({100}, {{50, 500, "page-sampling"}, {200, 400, "page-sampling"}}, 0, 0);
  EXPECT_LE(*rows[0].pages_low, *rows[0].pages_high);
}

TEST(Rows, LongerIntervalsNeverNeedMoreBandwidthThanTheBound) {
  std::vector<Sample> s = {{50, 500, "page-sampling"}, {100, 900, "page-sampling"}, {200, 1500, "page-sampling"}};
  auto rows = Rows({10, 25, 50, 100, 200, 500, 1000}, s, 0, 0);
  // Each upper-bound row is at most its source window's bandwidth.
  for (const Row& r : rows) {
    if (r.basis != "upper-bound") continue;
    auto src = Rows({r.from_window_ms}, s, 0, 0);
    EXPECT_LE(r.mb_per_s, src[0].mb_per_s + 1e-9) << r.interval_ms;
  }
}

TEST(Rows, ExactSourceWinsOverSampledAtTheSameWindow) {
  auto rows = Rows({100}, {{100, 900, "page-sampling"}, {100, 1000, "checkpoints"}}, 0, 0);
  EXPECT_DOUBLE_EQ(rows[0].pages, 1000);
  EXPECT_EQ(rows[0].method, "checkpoints");
}

TEST(Rows, ExtraBytesAndCompression) {
  // 1000 pages + 100000 bytes of device state, pages compress 4:1.
  auto rows = Rows({100}, {{100, 1000, "checkpoints"}}, 100000, 4.0);
  EXPECT_DOUBLE_EQ(rows[0].bytes, 4196000);
  ASSERT_TRUE(rows[0].mb_per_s_compressed);
  EXPECT_DOUBLE_EQ(*rows[0].mb_per_s_compressed, (1024000.0 + 100000) * 10 / 1e6);
  EXPECT_DOUBLE_EQ(*rows[0].gbit_per_s_compressed, (1024000.0 + 100000) * 10 * 8 / 1e9);
  json j = RowJson(rows[0]);
  EXPECT_EQ(j["basis"], "measured");
  EXPECT_TRUE(j.contains("compressed"));
}

DirtyRateSupport Support(bool ms, bool kvm = false) {
  DirtyRateSupport s;
  s.version = ms ? "10.0.13" : "7.2.0";
  s.millisecond = ms;
  s.kvm = kvm;
  s.mode = kvm ? "dirty-bitmap" : "page-sampling";
  s.sample_pages = 512;
  return s;
}

TEST(PlanWindows, MillisecondsMeasuresEachIntervalFromTheMinimum) {
  auto plan = PlanWindows(Support(true), {10, 25, 50, 100, 200});
  ASSERT_EQ(plan.size(), 3u);
  EXPECT_EQ(plan[0].ms, 50);
  EXPECT_EQ(plan[1].ms, 100);
  EXPECT_EQ(plan[2].ms, 200);
  EXPECT_LE(PlannedMs(plan), kMeasureBudgetMs);
  EXPECT_GE(plan[0].reps, 2);
}

TEST(PlanWindows, SecondsMeasuresOneSecond) {
  auto plan = PlanWindows(Support(false), {10, 25, 50, 100, 200});
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].ms, 1000);
}

TEST(PlanWindows, StaysWithinBudget) {
  auto plan = PlanWindows(Support(true), {100, 500, 1000, 1500, 2000, 60000});
  EXPECT_LE(PlannedMs(plan), kMeasureBudgetMs);
  EXPECT_FALSE(plan.empty());
}

TEST(SamplePages, WithinQemusRange) {
  EXPECT_EQ(SamplePagesFor(256ull << 20), kSamplePagesMax);
  EXPECT_EQ(SamplePagesFor(64ull << 30), 1024);
  EXPECT_EQ(SamplePagesFor(4096ull << 30), kSamplePagesMin);
}

TEST(FiguresFromStatus, OnlyAProtectedDomainWithCheckpoints) {
  json st = {{"state", "protected"},
             {"checkpoints_total", 50},
             {"interval_ms", 100},
             {"compress", "lz4"},
             {"dirty_pages_per_epoch", {{"mean", 1000.0}}},
             {"bytes_per_epoch", {{"mean", 4196000.0}}},
             {"checkpoint_page_bytes", {{"raw", 4000}, {"wire", 1000}}}};
  auto f = FiguresFromStatus(st);
  ASSERT_TRUE(f);
  EXPECT_EQ(f->interval_ms, 100);
  EXPECT_DOUBLE_EQ(f->compression_ratio(), 4.0);
  st["compress"] = "none";
  EXPECT_EQ(FiguresFromStatus(st)->compression_ratio(), 0);
  st["checkpoints_total"] = 2;
  EXPECT_FALSE(FiguresFromStatus(st));
  st["checkpoints_total"] = 50;
  st["state"] = "syncing";
  EXPECT_FALSE(FiguresFromStatus(st));
}

// A QEMU whose dirty rate is `pages_per_s`, measured in `polls` polls.
struct FakeQemu {
  FakeMonitor m;
  FakeClock clock;
  int polls_left = 0;
  int64_t last_calc_ms = 0;
  json last_args;
  FakeQemu(int major, int minor, bool kvm, int64_t mib_per_s, int polls = 1) {
    m.Answer("query-version", {{"qemu", {{"major", major}, {"minor", minor}, {"micro", 0}}}});
    m.Answer("query-kvm", {{"enabled", kvm}, {"present", true}});
    m.Answer("query-migrate", json::object());
    m.Answer("query-memory-size-summary", {{"base-memory", 256ull << 20}});
    m.Script("calc-dirty-rate", [this, polls](const json& a) -> StatusOr<json> {
      last_args = a;
      last_calc_ms = a.value("calc-time", int64_t{0}) * (a.contains("calc-time-unit") ? 1 : 1000);
      polls_left = polls;
      return json::object();
    });
    m.Script("query-dirty-rate", [this, mib_per_s, major](const json& a) -> StatusOr<json> {
      if (--polls_left > 0) return json{{"status", "measuring"}};
      const bool ms = a.value("calc-time-unit", "") == "millisecond";
      (void)major;
      return json{{"status", "measured"},
                  {"dirty-rate", mib_per_s},
                  {"calc-time", ms ? last_calc_ms : last_calc_ms / 1000},
                  {"mode", last_args.value("mode", "page-sampling")}};
    });
  }
  DirtyRateMeter::SleepFn Sleep() {
    return [this](std::chrono::milliseconds d) { clock.Advance(d); };
  }
};

TEST(Estimator, Qemu10MeasuresEachIntervalInMilliseconds) {
  FakeQemu q(10, 0, false, 40);  // 40 MiB/s = 10240 pages/s
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {10, 25, 50, 100, 200}, std::nullopt);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const json& rows = (*r)["rows"];
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows[0]["basis"], "lower-bound");
  EXPECT_EQ(rows[1]["basis"], "lower-bound");
  EXPECT_EQ(rows[3]["basis"], "measured");
  EXPECT_EQ(rows[3]["method"], "page-sampling");
  EXPECT_EQ(rows[3]["dirty_pages"], 1024);
  EXPECT_EQ(rows[0]["dirty_pages"], 102);  // 10240/s x 10 ms, rounded
  EXPECT_TRUE((*r)["protection"].is_null());
  EXPECT_EQ(q.last_args["calc-time-unit"], "millisecond");
  EXPECT_EQ(q.last_args["mode"], "page-sampling");  // TCG
  EXPECT_EQ(q.last_args["sample-pages"], kSamplePagesMax);
  EXPECT_LE((*r)["took_ms"].get<int64_t>(), kMaxDurationMs);
}

TEST(Estimator, KvmUsesDirtyBitmapAndNoSamplePages) {
  FakeQemu q(10, 0, true, 40);
  Estimator e(&q.m, q.clock, q.Sleep());
  ASSERT_TRUE(e.Run("web1", {100}, std::nullopt).ok());
  EXPECT_EQ(q.last_args["mode"], "dirty-bitmap");
  EXPECT_FALSE(q.last_args.contains("sample-pages"));
}

TEST(Estimator, KvmDirtyRingFallsBackToSampling) {
  FakeQemu q(10, 0, true, 40);
  q.m.Script("calc-dirty-rate", [&](const json& a) -> StatusOr<json> {
    if (a["mode"] == "dirty-bitmap")
      return FailedPrecondition("calc-dirty-rate: GenericError: mode dirty-bitmap is not enabled, use other method instead.");
    q.last_args = a;
    q.last_calc_ms = a["calc-time"];
    q.polls_left = 1;
    return json::object();
  });
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {100}, std::nullopt);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["qemu"]["mode"], "page-sampling");
}

TEST(Estimator, Qemu72MeasuresOneSecondAndSaysBound) {
  FakeQemu q(7, 2, false, 40);
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {10, 100}, std::nullopt);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(q.last_args["calc-time"], 1);
  EXPECT_FALSE(q.last_args.contains("calc-time-unit"));
  EXPECT_EQ((*r)["rows"][1]["basis"], "lower-bound");
  EXPECT_EQ((*r)["rows"][1]["dirty_pages"], 1024);
  EXPECT_EQ((*r)["rows"][1]["dirty_pages_high"], 10240);
  EXPECT_NE((*r)["notes"].dump().find("whole seconds"), std::string::npos);
}

TEST(Estimator, SlowQemuHitsTheDeadline) {
  FakeQemu q(10, 0, false, 40, 1000000);  // never measured
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {100}, std::nullopt);
  EXPECT_CODE(r.status(), Code::kDeadlineExceeded);
  EXPECT_NE(r.status().message().find("web1"), std::string::npos);
}

TEST(Estimator, QemuRefusalIsTheError) {
  FakeQemu q(10, 0, false, 40);
  q.m.Fail("calc-dirty-rate", FailedPrecondition("the dirty rate is already being measured."));
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {100}, std::nullopt);
  EXPECT_CODE(r.status(), Code::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("already being measured"), std::string::npos);
}

ProtectionFigures Prot() {
  ProtectionFigures p;
  p.interval_ms = 100;
  p.pages_per_checkpoint = 1000;
  p.bytes_per_checkpoint = 4096000 + 200000;
  p.checkpoints = 100;
  p.compress = true;
  p.page_bytes_raw = 3000;
  p.page_bytes_wire = 1000;
  return p;
}

TEST(Estimator, ProtectedDomainFallsBackToItsOwnFiguresWhenQemuRefuses) {
  FakeQemu q(7, 2, false, 40);
  q.m.Fail("calc-dirty-rate", FailedPrecondition("refused"));
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {50, 100, 200}, Prot());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const json& rows = (*r)["rows"];
  EXPECT_EQ(rows[1]["basis"], "measured");
  EXPECT_EQ(rows[1]["method"], "checkpoints");
  EXPECT_EQ(rows[1]["bytes_per_checkpoint"], 4296000);
  EXPECT_EQ(rows[0]["basis"], "lower-bound");
  EXPECT_EQ(rows[2]["basis"], "upper-bound");
  EXPECT_EQ(rows[2]["dirty_pages"], 2000);
  EXPECT_DOUBLE_EQ((*r)["compression_ratio"].get<double>(), 3.0);
  EXPECT_TRUE(rows[1].contains("compressed"));
  EXPECT_NE((*r)["notes"].dump().find("refused"), std::string::npos);
  EXPECT_TRUE((*r)["qemu"].contains("error"));
}

TEST(Estimator, ProtectedDomainWithoutMonitorUsesItsFigures) {
  FakeClock clock;
  Estimator e(nullptr, clock, [&](std::chrono::milliseconds d) { clock.Advance(d); });
  auto r = e.Run("web1", {100}, Prot());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)["rows"][0]["method"], "checkpoints");
}

TEST(Estimator, ProtectedDomainCombinesBoth) {
  FakeQemu q(10, 0, false, 40);
  q.m.Answer("query-migrate", {{"status", "colo"}});
  Estimator e(&q.m, q.clock, q.Sleep());
  auto r = e.Run("web1", {50, 100}, Prot());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["rows"][0]["method"], "page-sampling");
  EXPECT_EQ((*r)["rows"][1]["method"], "checkpoints");  // exact wins at its interval
  EXPECT_EQ((*r)["qemu"]["migration_active"], true);
}

TEST(Estimator, UnreachableQemuWithoutProtectionIsUnavailable) {
  FakeClock clock;
  Estimator e(nullptr, clock, [&](std::chrono::milliseconds d) { clock.Advance(d); });
  EXPECT_CODE(e.Run("web1", {100}, std::nullopt).status(), Code::kUnavailable);
}

}  // namespace
}  // namespace remus::estimate
