#include "common/clock.h"

#include <time.h>

namespace remus {

int64_t RealClock::WallNanos() const {
  return std::chrono::duration_cast<Nanos>(std::chrono::system_clock::now().time_since_epoch()).count();
}

RealClock& RealClock::Get() {
  static RealClock c;
  return c;
}

TimePoint BootClock::Now() const {
  timespec ts{};
  ::clock_gettime(CLOCK_BOOTTIME, &ts);
  return TimePoint(Nanos(int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec));
}

BootClock& BootClock::Get() {
  static BootClock c;
  return c;
}

}  // namespace remus
