// What `remusctl watch`, `remusctl stats` and `remusctl estimate` print, computed from remusd's
// status JSON (docs/formats/control.md). Pure functions: main.cc does the
// control calls, the timing and the terminal.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/stats.h"

namespace remus {

// One domain's line in `remusctl watch`. Rates are over the time between two
// status calls; a rate is absent (has_rates false) for the first sample of a
// domain or when its counters went back (protection restarted).
struct WatchRow {
  std::string domain, role, state;
  long long epoch = -1;  // last acked (primary) or committed (backup)
  bool primary = false;
  bool has_rates = false;
  double epochs_per_s = 0;
  double dirty_mb_per_s = 0;  // primary: dirty guest pages (4 KiB) per second, in MB
  double wire_mb_per_s = 0;   // sent (primary) or received (backup), MB per second
  double pause_p50_ms = 0, pause_p99_ms = 0;  // primary: the status window (last 1024 pauses)
  long long unacked_epochs = 0;
  long long buffered_packets = 0;
  long long interval_ms = 0;  // primary: the checkpoint interval now
  std::string interval_mode;  // primary: "fixed" or "auto"
};

// Rows for every domain in `cur` (status arrays), rates against `prev`
// taken dt_s seconds earlier.
std::vector<WatchRow> WatchRows(const nlohmann::json& prev, const nlohmann::json& cur, double dt_s);
std::string WatchHeader();
std::string WatchLine(const WatchRow& r);

// `remusctl status`: the primary's interval line, "interval 240 ms (auto,
// latency budget 200 ms): keeping pace: acks take 150 ms"; "" for a backup.
std::string IntervalLine(const nlohmann::json& d);

// A text histogram: one line per bucket with its own (not cumulative) count
// and a bar scaled to the largest bucket. unit "seconds" prints bounds in
// ms/s; anything else prints them as numbers.
std::string FormatHistogram(const std::string& title, const std::string& unit, const HistogramSnapshot& h);

// `remusctl stats` of one domain status: totals, and with histograms the
// distributions, as text or as JSON.
std::string StatsText(const nlohmann::json& status, bool histograms);

// `remusctl status`'s arbiter line for one domain ("" when the status has no
// arbiter object): the arbiter, the owner, the token, the lease time left,
// and a fence or a refused promotion in words.
std::string ArbiterLine(const nlohmann::json& status);
nlohmann::json StatsJson(const nlohmann::json& status, bool histograms);

// `remusctl estimate`'s table from the estimate request's result
// (replicator/estimate/estimate.h): one row per interval, the figure shown
// marked "=" measured, ">=" a lower bound, "<=" an upper bound, "~" sampled;
// then where the figures come from and the notes.
std::string EstimateText(const nlohmann::json& result);

}  // namespace remus
