// The plug backend's bookkeeping, without any kernel I/O: which plug
// commands (TCQ_PLUG_BUFFER / _RELEASE_ONE / _RELEASE_INDEFINITE) each
// Barrier, Release and Finish must send.
//
// sch_plug (net/sched/sch_plug.c) is a FIFO that counts packets in only TWO
// sections: the current one (pkts_current_epoch) and ONE closed one
// (pkts_last_epoch). BUFFER closes the current section, overwriting the count
// of a closed section not released yet; RELEASE_ONE lets the closed section's
// packets go. Xen Remus never has two checkpoints in flight, so it sends
// BUFFER at each checkpoint and RELEASE_ONE at each ack. remus pipelines
// checkpoints (up to 8 unacked): sending BUFFER at every barrier would lose
// counts, and a later RELEASE_ONE would then let packets of an UNACKED epoch
// go (the FIFO head is older packets, the count is a newer epoch's). So the
// kernel holds at most one closed section here:
//   Barrier(N)   if no section is closed: BUFFER, the closed section now
//                covers epochs <= N. Otherwise nothing: N's packets stay in
//                the current section and are closed by a later barrier.
//   Release(N)   if the closed section covers only epochs <= N: RELEASE_ONE.
// Packets of a skipped barrier are therefore held until the ack of the next
// barrier that finds no closed section: longer than necessary (about one
// extra epoch when acks lag behind the interval), never too short.
//
// Thread-safety: all methods may be called concurrently; commands are sent
// under the schedule's lock, in order.
#pragma once

#include <cstdint>
#include <optional>

#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus::netbuf {

// The kernel side: one call = the same plug command on every IFB device.
class PlugControl {
 public:
  virtual ~PlugControl() = default;
  virtual Status Buffer() = 0;             // TCQ_PLUG_BUFFER
  virtual Status ReleaseOne() = 0;         // TCQ_PLUG_RELEASE_ONE
  virtual Status ReleaseIndefinite() = 0;  // TCQ_PLUG_RELEASE_INDEFINITE
};

class PlugSchedule {
 public:
  // `control` must outlive the schedule.
  explicit PlugSchedule(PlugControl* control) : control_(control) {}

  // See OutputBuffer. Barrier with an epoch not above the previous one is
  // InvalidArgument and changes nothing.
  Status Barrier(uint64_t epoch);
  Status Release(uint64_t epoch);
  // release: RELEASE_INDEFINITE; otherwise nothing (the devices are deleted
  // with their queues). Later calls and later Barrier/Release are no-ops.
  Status Finish(bool release);

  // The newest epoch the kernel's closed section covers, if one is closed.
  std::optional<uint64_t> closed_section() const;

 private:
  PlugControl* control_;
  mutable Mutex mu_;
  std::optional<uint64_t> closed_ GUARDED_BY(mu_);  // epoch covered by the kernel's closed section
  std::optional<uint64_t> last_barrier_ GUARDED_BY(mu_);
  std::optional<uint64_t> acked_ GUARDED_BY(mu_);
  bool finished_ GUARDED_BY(mu_) = false;
};

}  // namespace remus::netbuf
