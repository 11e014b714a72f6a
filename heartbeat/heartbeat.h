// Failure detection for one replication link. Both ends send a heartbeat
// every `interval`; any frame from the peer counts as a sign of life. The
// peer is lost when nothing arrived for `timeout`.
//
// Time comes from an injected Clock, so tests advance a fake clock.
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <atomic>

#include "common/clock.h"

namespace remus {

struct HeartbeatConfig {
  Nanos interval = std::chrono::milliseconds(100);
  Nanos timeout = std::chrono::milliseconds(1000);
};

class HeartbeatMonitor {
 public:
  // REQUIRES: 0 < interval < timeout. clock outlives this.
  HeartbeatMonitor(const Clock& clock, HeartbeatConfig cfg);

  void Received();  // a frame arrived from the peer
  void Sent();      // we sent a heartbeat
  // While busy (the receiver is applying a frame rather than reading the
  // socket), the peer's silence is ours, not its: PeerLost stays false and
  // the silence is counted from the end of the busy spell.
  void SetBusy(bool busy);
  // Adopts the peer's settings (from its CONFIG). REQUIRES: 0 < interval < timeout.
  void Reconfigure(HeartbeatConfig cfg);

  bool SendDue() const;
  bool PeerLost() const;
  Nanos SinceLastReceived() const;
  // How long a caller may sleep before it must check SendDue/PeerLost again.
  Nanos NextCheckIn() const;
  HeartbeatConfig config() const { return {Nanos(interval_ns_.load()), Nanos(timeout_ns_.load())}; }

 private:
  const Clock& clock_;
  std::atomic<int64_t> interval_ns_;
  std::atomic<int64_t> timeout_ns_;
  std::atomic<bool> busy_{false};
  std::atomic<int64_t> last_rx_ns_;
  std::atomic<int64_t> last_tx_ns_;
};

}  // namespace remus
