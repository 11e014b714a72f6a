// A Clock that moves only when a test advances it.
#pragma once

#include <atomic>

#include "common/clock.h"

namespace remus {

class FakeClock final : public Clock {
 public:
  TimePoint Now() const override { return TimePoint(Nanos(now_ns_.load())); }
  int64_t WallNanos() const override { return now_ns_.load(); }
  void Advance(Nanos d) { now_ns_ += d.count(); }

 private:
  std::atomic<int64_t> now_ns_{1'000'000'000};
};

}  // namespace remus
