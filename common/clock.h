// Clock: the time boundary. Heartbeat and promotion logic take a Clock& so
// tests advance a FakeClock (tests/fake_clock.h) instead of sleeping.
//
// Thread-safety: implementations are safe to call from any thread.
#pragma once

#include <chrono>
#include <cstdint>

namespace remus {

using Nanos = std::chrono::nanoseconds;
using TimePoint = std::chrono::time_point<std::chrono::steady_clock, Nanos>;

class Clock {
 public:
  virtual ~Clock() = default;
  // Monotonic time.
  virtual TimePoint Now() const = 0;
  // Wall-clock time in nanoseconds since the epoch (for logs and status only).
  virtual int64_t WallNanos() const = 0;
};

class RealClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
  int64_t WallNanos() const override;
  static RealClock& Get();
};

// CLOCK_BOOTTIME: monotonic, and it keeps counting while the host is
// suspended, which CLOCK_MONOTONIC (steady_clock) does not. Lease deadlines
// use it: a host that slept through its lease must wake up past its deadline,
// not before it (docs/architecture.md, "Arbitration").
class BootClock final : public Clock {
 public:
  TimePoint Now() const override;
  int64_t WallNanos() const override { return RealClock::Get().WallNanos(); }
  static BootClock& Get();
};

inline double ToMillis(Nanos d) { return std::chrono::duration<double, std::milli>(d).count(); }

}  // namespace remus
