#include "common/clock.h"

namespace remus {

int64_t RealClock::WallNanos() const {
  return std::chrono::duration_cast<Nanos>(std::chrono::system_clock::now().time_since_epoch()).count();
}

RealClock& RealClock::Get() {
  static RealClock c;
  return c;
}

}  // namespace remus
