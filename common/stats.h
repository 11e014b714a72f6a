// Statistics for status and metrics:
//  - SampleWindow: percentiles over the last N samples (status p50/p99);
//  - RateMeter: events per second over a time window;
//  - Histogram: a cumulative histogram in the Prometheus sense, bucket
//    counters kept as samples arrive and never forgotten, so a scraper (or
//    `remusctl watch`) can subtract two snapshots.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "common/clock.h"
#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus {

class SampleWindow {
 public:
  explicit SampleWindow(size_t capacity = 1024) : capacity_(capacity) {}
  void Add(double v);
  // q in [0,1]; 0 when empty.
  double Quantile(double q) const;
  double Mean() const;
  size_t size() const;
  std::vector<double> Snapshot() const;

 private:
  mutable Mutex mu_;
  size_t capacity_;
  std::deque<double> samples_ GUARDED_BY(mu_);
};

// Events per second over the last `window`: the marks in the window over the
// time since the first of them (so a young meter is not diluted by the part
// of the window before it started); 0 with fewer than two marks.
class RateMeter {
 public:
  RateMeter(const Clock& clock, Nanos window) : clock_(clock), window_(window) {}
  void Mark();
  double PerSecond() const;

 private:
  void Trim(TimePoint now) const REQUIRES(mu_);
  const Clock& clock_;
  Nanos window_;
  mutable Mutex mu_;
  mutable std::deque<TimePoint> marks_ GUARDED_BY(mu_);
};

// One reading of a Histogram. cumulative[i] counts the samples <= bounds[i]
// ("le"); count is the +Inf bucket. Both only grow over a Histogram's life.
struct HistogramSnapshot {
  std::vector<double> bounds;
  std::vector<uint64_t> cumulative;
  uint64_t count = 0;
  double sum = 0;

  // Samples in bucket i alone (i == bounds.size(): above the last bound).
  uint64_t BucketCount(size_t i) const;
  // Estimated q-quantile, linear within the bucket (as Prometheus's
  // histogram_quantile); 0 when empty, the last bound when it falls above it.
  double Quantile(double q) const;
  // This snapshot minus an earlier one of the same histogram (the samples in
  // between). InvalidArgument if the bounds differ or a counter went down
  // (the histogram was replaced, e.g. protection restarted).
  StatusOr<HistogramSnapshot> Minus(const HistogramSnapshot& earlier) const;
};

class Histogram {
 public:
  // REQUIRES: bounds strictly increasing and finite.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);  // NaN is ignored
  HistogramSnapshot Snapshot() const;

  // Bucket layouts used by remus (docs/formats/control.md).
  static std::vector<double> LatencySeconds();  // 0.5 ms .. 10 s
  static std::vector<double> PageCounts();      // 16 .. 1M pages (4 KiB .. 4 GiB)

 private:
  const std::vector<double> bounds_;
  mutable Mutex mu_;
  std::vector<uint64_t> counts_ GUARDED_BY(mu_);  // per bucket, not cumulative; last is +Inf
  double sum_ GUARDED_BY(mu_) = 0;
};

// The status-JSON form of a snapshot:
//   {"le": [bounds...], "cumulative": [counts...], "count": N, "sum": S}
// (JSON has no +Inf: the +Inf bucket is "count").
nlohmann::json HistogramToJson(const HistogramSnapshot& h);
// InvalidArgument when j is not of that form (lengths differ, counts not
// cumulative, bounds not increasing).
StatusOr<HistogramSnapshot> HistogramFromJson(const nlohmann::json& j);

}  // namespace remus
