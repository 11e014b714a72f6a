#include "common/stats.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "tests/fakes/fake_clock.h"

namespace remus {
namespace {

// 10 marks a second, read right after a mark: 10.0 from the first seconds on
// (not 2.0 after 2 s of a 10 s window), and still 10.0 once the window is full.
TEST(RateMeter, IsNormalisedToTheTimeSinceTheFirstMarkInTheWindow) {
  FakeClock clock;
  RateMeter m(clock, std::chrono::seconds(10));
  EXPECT_EQ(m.PerSecond(), 0);
  int marks = 0;
  auto run_until = [&](int total) {
    for (; marks < total; marks++) {
      clock.Advance(std::chrono::milliseconds(100));
      m.Mark();
    }
  };
  run_until(1);
  EXPECT_EQ(m.PerSecond(), 0) << "one mark is no rate yet";
  run_until(20);  // 2 s
  EXPECT_NEAR(m.PerSecond(), 10.0, 1e-9);
  run_until(40);  // 4 s
  EXPECT_NEAR(m.PerSecond(), 10.0, 1e-9);
  run_until(61);  // 6.1 s
  EXPECT_NEAR(m.PerSecond(), 10.0, 1e-9);
  run_until(250);  // 25 s: the window has been full for a while
  EXPECT_NEAR(m.PerSecond(), 10.0, 1e-9);
  // Marks stop: the rate falls off, and is 0 once the window is empty.
  clock.Advance(std::chrono::seconds(5));
  EXPECT_NEAR(m.PerSecond(), 50.0 / 10.0, 1e-9);  // marks of the last 5 s over 10 s
  clock.Advance(std::chrono::seconds(6));
  EXPECT_EQ(m.PerSecond(), 0);
}

// 10 marks a second, then 5: a 2 s window soon sees only the new rate.
TEST(RateMeter, FollowsARateChange) {
  FakeClock clock;
  RateMeter m(clock, std::chrono::seconds(2));
  for (int i = 0; i < 30; i++) {
    clock.Advance(std::chrono::milliseconds(100));
    m.Mark();
  }
  for (int i = 0; i < 20; i++) {
    clock.Advance(std::chrono::milliseconds(200));
    m.Mark();
  }
  EXPECT_NEAR(m.PerSecond(), 5.0, 1e-9);
}

TEST(Histogram, CountsAreCumulativeAndLeInclusive) {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 2.0, 4.0, 9.0, -3.0}) h.Observe(v);
  h.Observe(std::numeric_limits<double>::quiet_NaN());  // ignored
  HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.bounds, (std::vector<double>{1, 2, 5}));
  EXPECT_EQ(s.cumulative, (std::vector<uint64_t>{3, 5, 6}));  // -3, 0.5, 1 | 1.5, 2 | 4
  EXPECT_EQ(s.count, 7u);                                       // + 9 above the last bound
  EXPECT_DOUBLE_EQ(s.sum, 0.5 + 1 + 1.5 + 2 + 4 + 9 - 3);
  EXPECT_EQ(s.BucketCount(0), 3u);
  EXPECT_EQ(s.BucketCount(1), 2u);
  EXPECT_EQ(s.BucketCount(2), 1u);
  EXPECT_EQ(s.BucketCount(3), 1u);
}

TEST(Histogram, SnapshotsOnlyGrowAndSubtract) {
  Histogram h(Histogram::LatencySeconds());
  h.Observe(0.003);
  HistogramSnapshot a = h.Snapshot();
  h.Observe(0.003);
  h.Observe(0.2);
  HistogramSnapshot b = h.Snapshot();
  for (size_t i = 0; i < a.cumulative.size(); i++) EXPECT_LE(a.cumulative[i], b.cumulative[i]);
  auto d = b.Minus(a);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->count, 2u);
  EXPECT_NEAR(d->sum, 0.203, 1e-12);
  auto back = a.Minus(b);
  EXPECT_EQ(back.status().code(), Code::kInvalidArgument);
  EXPECT_NE(back.status().message().find("reset"), std::string::npos);
  auto other = b.Minus(Histogram({1}).Snapshot());
  EXPECT_EQ(other.status().code(), Code::kInvalidArgument);
}

TEST(Histogram, QuantileInterpolatesWithinTheBucket) {
  Histogram h({10, 20, 40});
  EXPECT_EQ(h.Snapshot().Quantile(0.5), 0);  // empty
  for (int i = 0; i < 10; i++) h.Observe(15);  // all in (10, 20]
  HistogramSnapshot s = h.Snapshot();
  EXPECT_DOUBLE_EQ(s.Quantile(0.5), 15);
  EXPECT_DOUBLE_EQ(s.Quantile(1.0), 20);
  h.Observe(1000);  // above the last bound: reported as the last bound
  EXPECT_DOUBLE_EQ(h.Snapshot().Quantile(1.0), 40);
}

TEST(Histogram, JsonRoundTripAndValidation) {
  Histogram h(Histogram::PageCounts());
  h.Observe(100);
  h.Observe(5000000);
  nlohmann::json j = HistogramToJson(h.Snapshot());
  EXPECT_EQ(j["count"], 2);
  EXPECT_EQ(j["le"].size(), j["cumulative"].size());
  auto back = HistogramFromJson(nlohmann::json::parse(j.dump()));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->cumulative, h.Snapshot().cumulative);
  EXPECT_EQ(back->count, 2u);

  nlohmann::json bad = j;
  bad["cumulative"][0] = 5;  // more than the next bucket: not cumulative
  EXPECT_EQ(HistogramFromJson(bad).status().code(), Code::kInvalidArgument);
  bad = j;
  bad["le"].push_back(1e9);
  EXPECT_NE(HistogramFromJson(bad).status().message().find("differ in length"), std::string::npos);
  EXPECT_FALSE(HistogramFromJson(nlohmann::json::array()).ok());
}

}  // namespace
}  // namespace remus
