#include "heartbeat/heartbeat.h"

#include <algorithm>
#include <cassert>

namespace remus {
namespace {
int64_t Ns(TimePoint t) { return t.time_since_epoch().count(); }
}  // namespace

HeartbeatMonitor::HeartbeatMonitor(const Clock& clock, HeartbeatConfig cfg)
    : clock_(clock), cfg_(cfg), last_rx_ns_(Ns(clock.Now())), last_tx_ns_(INT64_MIN / 2) {
  assert(cfg.interval.count() > 0 && cfg.interval < cfg.timeout);
}

void HeartbeatMonitor::Received() { last_rx_ns_ = Ns(clock_.Now()); }
void HeartbeatMonitor::Sent() { last_tx_ns_ = Ns(clock_.Now()); }

bool HeartbeatMonitor::SendDue() const { return Ns(clock_.Now()) - last_tx_ns_ >= cfg_.interval.count(); }

bool HeartbeatMonitor::PeerLost() const { return SinceLastReceived() > cfg_.timeout; }

Nanos HeartbeatMonitor::SinceLastReceived() const { return Nanos(Ns(clock_.Now()) - last_rx_ns_); }

Nanos HeartbeatMonitor::NextCheckIn() const {
  int64_t now = Ns(clock_.Now());
  int64_t to_send = last_tx_ns_ + cfg_.interval.count() - now;
  int64_t to_lost = last_rx_ns_ + cfg_.timeout.count() - now + 1;
  return Nanos(std::max<int64_t>(0, std::min(to_send, to_lost)));
}

}  // namespace remus
