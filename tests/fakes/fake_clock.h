// FakeClock: a Clock (common/clock.h) that moves only when a test advances it,
// so time-driven logic (heartbeats, rates, timeouts) is tested without
// sleeping. Starts at 1 s on the monotonic scale; WallNanos is the same value.
//
//   FakeClock clock;
//   RateMeter m(clock, std::chrono::seconds(10));
//   clock.Advance(std::chrono::milliseconds(100));
//
// Thread-safety: Now and Advance may be called from any thread.
// Target: remus_test_fakes (tests/CMakeLists.txt).
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
