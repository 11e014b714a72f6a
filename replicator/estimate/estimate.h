// `remusctl estimate DOMAIN`: the link bandwidth each checkpoint interval
// needs, from the guest's measured dirty rate (docs/operator-guide.md,
// "Sizing the link: estimate").
//
// Two sources of "distinct pages dirtied in a window of W ms", D(W):
//   - QEMU's own measurement (replicator/qemu/dirty_rate.h): windows of 50 ms
//     and up on QEMU 8.2+ (10.0), whole seconds on 7.2;
//   - a protected domain's own count of pages per checkpoint at its current
//     interval (exact: what the checkpoints carried), with its bytes per
//     checkpoint and, with --compress lz4, its compression ratio.
//
// An interval with a window of its own is "measured". Any other is bounded
// from the windows around it, assuming the guest's writes are steady:
//   D is monotone:    D(W) >= D(w) for a window w < W, D(W) <= D(w) for w > W;
//   D is subadditive: D(W) <= D(w) * W / w for w < W  (rate x interval is an
//                     upper bound for a longer interval), and
//                     D(W) >= D(w) * W / w for w > W  (rate x interval is a
//                     LOWER bound for a shorter one: a short checkpoint has
//                     fewer chances to write a page twice).
// A row shows the lower bound when the interval is shorter than every
// window (QEMU 7.2's 1 s window and 10/25 ms intervals on any QEMU), the upper
// bound otherwise; both bounds are in the JSON.
//
// Bandwidth per second = bytes per checkpoint * 1000 / interval_ms, where
// bytes = pages * 4096 + what a protected domain's checkpoints carry besides
// pages (device state, disk writes), in MB/s (1e6 bytes) and Gbit/s (1e9
// bits); with a measured compression ratio the pages' share is divided by it.
//
// Thread-safety: the functions are pure; an Estimator runs one estimate at a
// time (the caller serializes per QEMU: QEMU measures one window at a time).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/status.h"
#include "replicator/qemu/dirty_rate.h"
#include "replicator/qemu/qmp.h"

namespace remus::estimate {

inline constexpr uint64_t kPageBytes = 4096;
inline constexpr size_t kMaxIntervals = 16;
inline constexpr int64_t kMaxIntervalMs = 600000;
// QEMU measures for at most this long per estimate (windows are dropped
// beyond it); the whole request ends within kMaxDurationMs.
inline constexpr int64_t kMeasureBudgetMs = 4000;
inline constexpr int64_t kMaxDurationMs = 8000;
// A protected domain's figures count once it has made this many checkpoints.
inline constexpr uint64_t kMinCheckpoints = 5;

std::vector<int64_t> DefaultIntervals();  // 10 25 50 100 200

// Sorted, duplicates removed. InvalidArgument naming the bad value: empty,
// more than kMaxIntervals, or one outside 1..kMaxIntervalMs.
StatusOr<std::vector<int64_t>> CheckIntervals(std::vector<int64_t> intervals);

// D(window_ms) as one source saw it.
struct Sample {
  int64_t window_ms = 0;
  double pages = 0;
  std::string method;  // "dirty-bitmap", "page-sampling" or "checkpoints"
  bool exact() const { return method != "page-sampling"; }
};

struct Row {
  int64_t interval_ms = 0;
  double pages = 0;  // the figure shown: measured, or the bound `basis` names
  std::optional<double> pages_low, pages_high;
  std::string basis;   // "measured", "lower-bound" or "upper-bound"
  std::string method;  // the source of the figure shown (Sample::method)
  int64_t from_window_ms = 0;
  double bytes = 0;  // per checkpoint, raw
  double mb_per_s = 0, gbit_per_s = 0;
  std::optional<double> mb_per_s_compressed, gbit_per_s_compressed;
};

// extra_bytes: bytes per checkpoint besides pages (0: unknown). ratio: raw
// page bytes / wire page bytes (0: none measured). REQUIRES: samples not
// empty, windows > 0.
std::vector<Row> Rows(const std::vector<int64_t>& intervals, const std::vector<Sample>& samples, double extra_bytes,
                      double ratio);
nlohmann::json RowJson(const Row& r);

// The QEMU windows to measure for `intervals` and how often each (page
// sampling is noisy, so short windows are repeated), within kMeasureBudgetMs.
struct Window {
  int64_t ms = 0;
  int reps = 1;
};
std::vector<Window> PlanWindows(const DirtyRateSupport& s, const std::vector<int64_t>& intervals);
int64_t PlannedMs(const std::vector<Window>& plan);

// What a protected domain measured, from PrimaryReplicator::StatusJson.
struct ProtectionFigures {
  int64_t interval_ms = 0;
  double pages_per_checkpoint = 0;  // mean
  double bytes_per_checkpoint = 0;  // mean, raw (pages + device state + disk)
  uint64_t checkpoints = 0;
  bool compress = false;
  uint64_t page_bytes_raw = 0, page_bytes_wire = 0;  // checkpoints' PAGES frames
  double compression_ratio() const;  // 0 when none measured
};
// Empty unless the domain is protected and made kMinCheckpoints checkpoints.
std::optional<ProtectionFigures> FiguresFromStatus(const nlohmann::json& status);

class Estimator {
 public:
  // monitor may be null: a protected domain whose QEMU cannot be asked
  // (then only its own figures count). REQUIRES: monitor outlives Run.
  Estimator(QemuMonitor* monitor, const Clock& clock, DirtyRateMeter::SleepFn sleep);

  // The estimate's JSON (docs/formats/control.md, "estimate"). Errors: the
  // QEMU measurement's (naming the domain), unless protection figures are
  // given, which are then used alone with the reason in "notes".
  StatusOr<nlohmann::json> Run(const std::string& domain, const std::vector<int64_t>& intervals,
                               const std::optional<ProtectionFigures>& protection);

 private:
  QemuMonitor* monitor_;
  const Clock& clock_;
  DirtyRateMeter::SleepFn sleep_;
};

}  // namespace remus::estimate
