#include "heartbeat/heartbeat.h"

#include <algorithm>
#include <cassert>

namespace remus {
namespace {
int64_t Ns(TimePoint t) { return t.time_since_epoch().count(); }
}  // namespace

HeartbeatMonitor::HeartbeatMonitor(const Clock& clock, HeartbeatConfig cfg)
    : clock_(clock),
      interval_ns_(cfg.interval.count()),
      timeout_ns_(cfg.timeout.count()),
      last_rx_ns_(Ns(clock.Now())),
      last_tx_ns_(INT64_MIN / 2) {
  assert(cfg.interval.count() > 0 && cfg.interval < cfg.timeout);
}

void HeartbeatMonitor::Received() { last_rx_ns_ = Ns(clock_.Now()); }
void HeartbeatMonitor::Sent() { last_tx_ns_ = Ns(clock_.Now()); }

void HeartbeatMonitor::SetBusy(bool busy) {
  busy_ = busy;
  last_rx_ns_ = Ns(clock_.Now());
}

void HeartbeatMonitor::Reconfigure(HeartbeatConfig cfg) {
  assert(cfg.interval.count() > 0 && cfg.interval < cfg.timeout);
  interval_ns_ = cfg.interval.count();
  timeout_ns_ = cfg.timeout.count();
}

bool HeartbeatMonitor::SendDue() const { return Ns(clock_.Now()) - last_tx_ns_ >= interval_ns_; }

bool HeartbeatMonitor::PeerLost() const { return !busy_ && SinceLastReceived().count() > timeout_ns_; }

Nanos HeartbeatMonitor::SinceLastReceived() const { return Nanos(Ns(clock_.Now()) - last_rx_ns_); }

Nanos HeartbeatMonitor::NextCheckIn() const {
  int64_t now = Ns(clock_.Now());
  int64_t to_send = last_tx_ns_ + interval_ns_ - now;
  int64_t to_lost = last_rx_ns_ + timeout_ns_ - now + 1;
  return Nanos(std::max<int64_t>(0, std::min(to_send, to_lost)));
}

}  // namespace remus
