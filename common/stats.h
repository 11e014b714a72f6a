// Rolling sample windows for status: percentiles over the last N samples and
// a rate over a time window.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "common/clock.h"

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
  mutable std::mutex mu_;
  size_t capacity_;
  std::deque<double> samples_;
};

// Events per second over the last `window`.
class RateMeter {
 public:
  RateMeter(const Clock& clock, Nanos window) : clock_(clock), window_(window) {}
  void Mark();
  double PerSecond() const;

 private:
  void Trim(TimePoint now) const;
  const Clock& clock_;
  Nanos window_;
  mutable std::mutex mu_;
  mutable std::deque<TimePoint> marks_;
};

}  // namespace remus
