#include "common/stats.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <numeric>

#include <nlohmann/json.hpp>

#include "common/thread_annotations.h"

namespace remus {

void SampleWindow::Add(double v) {
  MutexLock g(mu_);
  samples_.push_back(v);
  while (samples_.size() > capacity_) samples_.pop_front();
}

double SampleWindow::Quantile(double q) const {
  std::vector<double> v = Snapshot();
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

double SampleWindow::Mean() const {
  std::vector<double> v = Snapshot();
  if (v.empty()) return 0;
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

size_t SampleWindow::size() const {
  MutexLock g(mu_);
  return samples_.size();
}

std::vector<double> SampleWindow::Snapshot() const {
  MutexLock g(mu_);
  return {samples_.begin(), samples_.end()};
}

void RateMeter::Trim(TimePoint now) const {
  while (!marks_.empty() && now - marks_.front() > window_) marks_.pop_front();
}

void RateMeter::Mark() {
  MutexLock g(mu_);
  TimePoint now = clock_.Now();
  marks_.push_back(now);
  Trim(now);
}

double RateMeter::PerSecond() const {
  MutexLock g(mu_);
  TimePoint now = clock_.Now();
  Trim(now);
  // Over the time the marks in the window span, not the whole window: a
  // meter 2 s old has seen 2 s of events, not 10. The first mark opens the
  // span, so it is not counted: n marks, n - 1 intervals. Once the events
  // stop, the span keeps growing to `now` and the rate falls off.
  if (marks_.size() < 2) return 0;
  double span = std::chrono::duration<double>(now - marks_.front()).count();
  if (span <= 0) return 0;
  return static_cast<double>(marks_.size() - 1) / span;
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {
  for (size_t i = 0; i < bounds_.size(); i++) assert(std::isfinite(bounds_[i]) && (i == 0 || bounds_[i - 1] < bounds_[i]));
}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  // "le": a sample equal to a bound belongs to that bound's bucket.
  size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  MutexLock g(mu_);
  counts_[i]++;
  sum_ += v;
}

HistogramSnapshot Histogram::Snapshot() const {
  HistogramSnapshot h;
  h.bounds = bounds_;
  h.cumulative.reserve(bounds_.size());
  MutexLock g(mu_);
  uint64_t acc = 0;
  for (size_t i = 0; i < bounds_.size(); i++) h.cumulative.push_back(acc += counts_[i]);
  h.count = acc + counts_.back();
  h.sum = sum_;
  return h;
}

std::vector<double> Histogram::LatencySeconds() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

std::vector<double> Histogram::PageCounts() {
  return {16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576};
}

uint64_t HistogramSnapshot::BucketCount(size_t i) const {
  uint64_t below = i == 0 ? 0 : cumulative[i - 1];
  uint64_t upto = i < cumulative.size() ? cumulative[i] : count;
  return upto - below;
}

double HistogramSnapshot::Quantile(double q) const {
  if (count == 0 || bounds.empty()) return 0;
  double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(count);
  for (size_t i = 0; i < bounds.size(); i++) {
    if (static_cast<double>(cumulative[i]) < rank || cumulative[i] == 0) continue;
    double lo = i == 0 ? std::min(0.0, bounds[0]) : bounds[i - 1];
    double below = i == 0 ? 0.0 : static_cast<double>(cumulative[i - 1]);
    double in = static_cast<double>(cumulative[i]) - below;
    return lo + (bounds[i] - lo) * (rank - below) / in;
  }
  return bounds.back();
}

StatusOr<HistogramSnapshot> HistogramSnapshot::Minus(const HistogramSnapshot& e) const {
  if (e.bounds != bounds) return InvalidArgument("histograms with different buckets");
  HistogramSnapshot d;
  d.bounds = bounds;
  if (e.count > count) return InvalidArgument("histogram counters went down (it was reset)");
  for (size_t i = 0; i < cumulative.size(); i++) {
    if (e.cumulative[i] > cumulative[i]) return InvalidArgument("histogram counters went down (it was reset)");
    d.cumulative.push_back(cumulative[i] - e.cumulative[i]);
  }
  d.count = count - e.count;
  d.sum = sum - e.sum;
  return d;
}

nlohmann::json HistogramToJson(const HistogramSnapshot& h) {
  return {{"le", h.bounds}, {"cumulative", h.cumulative}, {"count", h.count}, {"sum", h.sum}};
}

StatusOr<HistogramSnapshot> HistogramFromJson(const nlohmann::json& j) {
  auto bad = [](const std::string& why) { return InvalidArgument("malformed histogram: " + why); };
  if (!j.is_object() || !j.contains("le") || !j["le"].is_array() || !j.contains("cumulative") ||
      !j["cumulative"].is_array() || !j.contains("count") || !j["count"].is_number_integer() || j["count"].get<int64_t>() < 0 ||
      !j.contains("sum") || !j["sum"].is_number())
    return bad("expected {le, cumulative, count, sum}");
  HistogramSnapshot h;
  if (j["le"].size() != j["cumulative"].size()) return bad("le and cumulative differ in length");
  for (const auto& b : j["le"]) {
    if (!b.is_number()) return bad("a bound is not a number");
    double v = b.get<double>();
    if (!h.bounds.empty() && !(h.bounds.back() < v)) return bad("bounds are not increasing");
    h.bounds.push_back(v);
  }
  for (const auto& c : j["cumulative"]) {
    if (!c.is_number_integer() || c.get<int64_t>() < 0) return bad("a count is not a non-negative integer");
    uint64_t v = c.get<uint64_t>();
    if (!h.cumulative.empty() && v < h.cumulative.back()) return bad("counts are not cumulative");
    h.cumulative.push_back(v);
  }
  h.count = j["count"].get<uint64_t>();
  if (!h.cumulative.empty() && h.count < h.cumulative.back()) return bad("count is below the last bucket");
  h.sum = j["sum"].get<double>();
  return h;
}

}  // namespace remus
