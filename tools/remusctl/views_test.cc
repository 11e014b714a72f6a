#include "tools/remusctl/views.h"

#include <gtest/gtest.h>

#include <sstream>

namespace remus {
namespace {

using nlohmann::json;

json Primary(double ckpts, double dirty_pages, double sent) {
  Histogram pause(Histogram::LatencySeconds());
  pause.Observe(0.004);
  pause.Observe(0.004);
  pause.Observe(0.3);
  Histogram ack(Histogram::LatencySeconds());
  ack.Observe(0.02);
  return {{"domain", "web1"},
          {"role", "primary"},
          {"state", "protected"},
          {"last_acked_epoch", 17},
          {"checkpoints_total", ckpts},
          {"dirty_pages_total", dirty_pages},
          {"epoch_bytes_total", 1 << 20},
          {"unacked_epochs", 2},
          {"backpressure_waits", 0},
          {"pause_ms", {{"p50", 4.2}, {"p99", 30.5}}},
          {"link", {{"bytes_sent", sent}}},
          {"interval_ms", 100},
          {"netbuf", {{"mode", "nfqueue"}, {"buffered_packets", 7}, {"dropped_packets", 0}, {"released_packets", 3}}},
          {"histograms",
           {{"pause_seconds", HistogramToJson(pause.Snapshot())}, {"ack_seconds", HistogramToJson(ack.Snapshot())}}}};
}

TEST(WatchRows, RatesComeFromTwoStatusCalls) {
  json a = json::array({Primary(100, 1000, 5e6)});
  json b = json::array({Primary(120, 3000, 9e6)});
  auto rows = WatchRows(a, b, 2.0);
  ASSERT_EQ(rows.size(), 1u);
  const WatchRow& r = rows[0];
  EXPECT_TRUE(r.has_rates);
  EXPECT_DOUBLE_EQ(r.epochs_per_s, 10);
  EXPECT_DOUBLE_EQ(r.dirty_mb_per_s, 2000 * 4096 / 1e6 / 2);
  EXPECT_DOUBLE_EQ(r.wire_mb_per_s, 2);
  EXPECT_EQ(r.unacked_epochs, 2);
  EXPECT_EQ(r.buffered_packets, 7);
  EXPECT_EQ(r.epoch, 17);
  std::string line = WatchLine(r);
  EXPECT_NE(line.find("web1"), std::string::npos) << line;
  EXPECT_NE(line.find("10.0"), std::string::npos) << line;
  EXPECT_NE(line.find("4.2ms"), std::string::npos) << line;
  EXPECT_NE(line.find("30.5ms"), std::string::npos) << line;
  EXPECT_EQ(WatchHeader().find("DOMAIN"), 0u);
  EXPECT_NE(WatchHeader().find("INTERVAL"), std::string::npos);
  EXPECT_NE(line.find("100ms/fixed"), std::string::npos) << line;
}

TEST(IntervalLine, ShowsTheModeBudgetAndReason) {
  json d = {{"domain", "web1"}, {"role", "primary"}, {"interval_ms", 240}, {"interval_mode", "auto"},
            {"latency_budget_ms", 200}, {"interval_reason", "keeping pace: acks take 150 ms"}};
  EXPECT_EQ(IntervalLine(d), "  interval 240 ms (auto, latency budget 200 ms): keeping pace: acks take 150 ms");
  WatchRow r = WatchRows(json::array(), json::array({d}), 1.0)[0];
  EXPECT_NE(WatchLine(r).find("240ms/auto"), std::string::npos) << WatchLine(r);
  d = {{"domain", "web1"}, {"role", "primary"}, {"interval_ms", 100}, {"interval_mode", "fixed"},
       {"interval_reason", "fixed by remusctl tune"}};
  EXPECT_EQ(IntervalLine(d), "  interval 100 ms (fixed): fixed by remusctl tune");
  EXPECT_EQ(IntervalLine({{"domain", "web1"}, {"role", "backup"}}), "");
}

TEST(WatchRows, NoRatesForANewDomainOrACounterReset) {
  auto rows = WatchRows(json::array(), json::array({Primary(5, 5, 5)}), 1.0);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_FALSE(rows[0].has_rates);
  EXPECT_NE(WatchLine(rows[0]).find(" - "), std::string::npos);
  // Protection restarted: the counters began again.
  rows = WatchRows(json::array({Primary(500, 5, 5)}), json::array({Primary(3, 6, 6)}), 1.0);
  EXPECT_FALSE(rows[0].has_rates);
  // A backup row: received bytes and commits; no pause or unacked columns.
  json bk = {{"domain", "db"}, {"role", "backup"}, {"state", "protected"}, {"last_committed_epoch", 9},
             {"checkpoints_total", 9}, {"link", {{"bytes_received", 4e6}}}};
  json bk0 = bk;
  bk0["checkpoints_total"] = 4;
  bk0["link"]["bytes_received"] = 0;
  rows = WatchRows(json::array({bk0}), json::array({bk}), 1.0);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_DOUBLE_EQ(rows[0].epochs_per_s, 5);
  EXPECT_DOUBLE_EQ(rows[0].wire_mb_per_s, 4);
  EXPECT_FALSE(rows[0].primary);
}

TEST(FormatHistogram, OneLinePerBucketWithBars) {
  Histogram h({0.001, 0.01, 0.1});
  for (int i = 0; i < 8; i++) h.Observe(0.005);
  h.Observe(0.05);
  h.Observe(3);
  std::string t = FormatHistogram("guest pause per checkpoint", "seconds", h.Snapshot());
  std::istringstream in(t);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 5u) << t;  // title + 3 bounds + above
  EXPECT_NE(lines[0].find("10 samples"), std::string::npos) << t;
  EXPECT_NE(lines[1].find("<= 1 ms"), std::string::npos) << t;
  EXPECT_EQ(lines[1].find('#'), std::string::npos) << t;  // empty bucket: no bar
  EXPECT_NE(lines[2].find("<= 10 ms"), std::string::npos) << t;
  EXPECT_NE(lines[2].find(std::string(40, '#')), std::string::npos) << t;  // the largest: a full bar
  EXPECT_NE(lines[3].find("<= 100 ms"), std::string::npos) << t;
  EXPECT_NE(lines[3].find("#"), std::string::npos) << t;  // one sample still shows
  EXPECT_NE(lines[4].find("> 100 ms"), std::string::npos) << t;
  EXPECT_NE(lines[4].find(" 1 "), std::string::npos) << t;
  std::string pages = FormatHistogram("dirty pages", "pages", Histogram(Histogram::PageCounts()).Snapshot());
  EXPECT_NE(pages.find("<= 1048576 "), std::string::npos) << pages;
  EXPECT_NE(pages.find("0 samples\n"), std::string::npos) << pages;
}

TEST(Stats, TextAndJson) {
  json d = Primary(120, 3000, 9e6);
  std::string t = StatsText(d, true);
  EXPECT_EQ(t.find("web1 (primary, protected)"), 0u) << t;
  EXPECT_NE(t.find("guest pause per checkpoint: 3 samples"), std::string::npos) << t;
  EXPECT_NE(t.find("ack latency"), std::string::npos) << t;
  EXPECT_NE(t.find("held 7, released 3, dropped 0"), std::string::npos) << t;
  EXPECT_EQ(StatsText(d, false).find("guest pause"), std::string::npos);
  d["initial_copy"] = {{"mode", "delta"}, {"pages_sent", 655}, {"pages_kept", 65290}, {"bytes_saved", 65290 * 4096}};
  EXPECT_NE(StatsText(d, false).find("initial copy           delta: 655 pages sent, 65290 kept ("), std::string::npos)
      << StatsText(d, false);

  json j = StatsJson(d, true);
  EXPECT_EQ(j["counters"]["checkpoints_total"], 120);
  EXPECT_EQ(j["counters"]["wire_bytes_sent"], 9000000);
  const json& p = j["histograms"]["pause_seconds"];
  EXPECT_EQ(p["unit"], "seconds");
  EXPECT_EQ(p["count"], 3);
  ASSERT_EQ(p["buckets"].size(), Histogram::LatencySeconds().size() + 1);
  EXPECT_EQ(p["buckets"].back()["le"], "+Inf");
  EXPECT_EQ(p["buckets"].back()["cumulative"], 3);
  uint64_t sum = 0;
  for (const auto& b : p["buckets"]) sum += b["count"].get<uint64_t>();
  EXPECT_EQ(sum, 3u);
  EXPECT_FALSE(StatsJson(d, false).contains("histograms"));
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

TEST(ArbiterLine, SaysOwnerTokenTimeLeftAndFences) {
  json held = {{"arbiter",
                {{"name", "etcd"}, {"state", "held"}, {"owner", "hostA"}, {"token", 812}, {"deadline_in_ms", 1700},
                 {"ttl_ms", 5000}}}};
  EXPECT_EQ(ArbiterLine(held),
            "  arbiter etcd: lease held by hostA, token 812; fenced in 1.7 s without a renewal (TTL 5.0 s)");
  json lost = {{"arbiter", {{"name", "etcd"}, {"state", "lost"}, {"winner", "hostB"}, {"token", 900}}}};
  EXPECT_NE(ArbiterLine(lost).find("FENCED for good: host 'hostB' won (token 900)"), std::string::npos);
  json fenced = {{"arbiter", {{"name", "etcd"}, {"state", "fenced"}, {"fenced_reason", "no lease renewal for 4000 ms"}}}};
  EXPECT_NE(ArbiterLine(fenced).find("FENCED: the guest is paused"), std::string::npos);
  json waiting = {{"arbiter", {{"name", "etcd"}, {"host", "hostB"}}},
                  {"promotion", {{"arbitration", "waiting for arbitration: host 'hostA' still holds ..."}}}};
  EXPECT_NE(ArbiterLine(waiting).find("standby (host hostB)\n  promotion: waiting for arbitration"), std::string::npos)
      << ArbiterLine(waiting);
  json none = {{"arbiter", {{"name", "none"}, {"warning", "no arbiter: two copies possible"}}}};
  EXPECT_EQ(ArbiterLine(none), "  arbiter none: WARNING no arbiter: two copies possible");
  EXPECT_EQ(ArbiterLine(json::object()), "");
}

}  // namespace
}  // namespace remus

namespace remus {
namespace {

TEST(EstimateText, MarksEachRowsBasisAndShowsCompressionWhenMeasured) {
  nlohmann::json r = {
      {"rows",
       {{{"interval_ms", 10}, {"dirty_pages", 40}, {"dirty_pages_high", 200}, {"basis", "lower-bound"},
         {"method", "page-sampling"}, {"from_window_ms", 50}, {"bytes_per_checkpoint", 163840},
         {"mb_per_s", 16.384}, {"gbit_per_s", 0.131}},
        {{"interval_ms", 100}, {"dirty_pages", 400}, {"basis", "measured"}, {"method", "checkpoints"},
         {"from_window_ms", 100}, {"bytes_per_checkpoint", 1638400}, {"mb_per_s", 16.384}, {"gbit_per_s", 0.131},
         {"compressed", {{"mb_per_s", 4.1}, {"gbit_per_s", 0.033}}}}}},
      {"protection", {{"interval_ms", 100}, {"dirty_pages_per_checkpoint", 400.0}, {"compression_ratio", 4.0}}},
      {"notes", {"a note"}},
      {"took_ms", 1234}};
  std::string t = EstimateText(r);
  EXPECT_NE(t.find(">= 40"), std::string::npos) << t;
  EXPECT_NE(t.find("at least (QEMU page-sampling, 50 ms window; at most 200 pages)"), std::string::npos) << t;
  EXPECT_NE(t.find("= 400"), std::string::npos) << t;
  EXPECT_NE(t.find("measured (protection's checkpoints)"), std::string::npos) << t;
  EXPECT_NE(t.find("lz4 MB/s"), std::string::npos) << t;
  EXPECT_NE(t.find("4.1"), std::string::npos) << t;
  EXPECT_NE(t.find("lz4 ratio 4.00"), std::string::npos) << t;
  EXPECT_NE(t.find("note: a note"), std::string::npos) << t;
  // Without a ratio, no compressed columns.
  r["rows"][1].erase("compressed");
  EXPECT_EQ(EstimateText(r).find("lz4 MB/s"), std::string::npos);
}

}  // namespace
}  // namespace remus
