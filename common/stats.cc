#include "common/stats.h"

#include <algorithm>
#include <numeric>

namespace remus {

void SampleWindow::Add(double v) {
  std::lock_guard<std::mutex> g(mu_);
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
  std::lock_guard<std::mutex> g(mu_);
  return samples_.size();
}

std::vector<double> SampleWindow::Snapshot() const {
  std::lock_guard<std::mutex> g(mu_);
  return {samples_.begin(), samples_.end()};
}

void RateMeter::Trim(TimePoint now) const {
  while (!marks_.empty() && now - marks_.front() > window_) marks_.pop_front();
}

void RateMeter::Mark() {
  std::lock_guard<std::mutex> g(mu_);
  TimePoint now = clock_.Now();
  marks_.push_back(now);
  Trim(now);
}

double RateMeter::PerSecond() const {
  std::lock_guard<std::mutex> g(mu_);
  Trim(clock_.Now());
  return static_cast<double>(marks_.size()) / std::chrono::duration<double>(window_).count();
}

}  // namespace remus
