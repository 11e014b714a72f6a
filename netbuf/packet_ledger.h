// The nfqueue backend's bookkeeping, without any kernel I/O: which queued
// packet ids belong to which epoch, and which batch verdict each Barrier,
// Release and Finish must send.
//
// The kernel numbers queued packets 1, 2, 3, ... per queue (32 bits, wrapping)
// and sends them to us in that order; NFQNL_MSG_VERDICT_BATCH with id X
// applies one verdict to every queued packet with id <= X (wrap-aware). So an
// epoch is fully described by the last id read before its barrier, and a
// release of any number of epochs is ONE batch up to the newest released
// epoch's last id. Packets the reader has not read yet when Barrier(N) runs
// count in N+1: they are only held longer, never released early.
//
// Batches are cumulative, so a batch that fails to send is healed by the
// next one; Finish covers everything in any case.
//
// Thread-safety: all methods may be called concurrently (reader thread,
// epoch thread, ACK thread, status). Verdicts are sent under the ledger's
// lock, so they reach the sink in the order the ledger decided them.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>

#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus::netbuf {

enum class Verdict { kAccept, kDrop };

// Where the ledger's verdicts go: the nfqueue socket, or a fake in tests.
class VerdictSink {
 public:
  virtual ~VerdictSink() = default;
  // One batch verdict: `v` for every queued packet with id <= last_id.
  virtual Status Batch(uint32_t last_id, Verdict v) = 0;
};

class PacketLedger {
 public:
  // `sink` must outlive the ledger.
  explicit PacketLedger(VerdictSink* sink) : sink_(sink) {}

  // The reader read these packet ids (in kernel order). After Finish they
  // get the final verdict at once, in one batch.
  Status OnPackets(std::span<const uint32_t> ids);
  Status OnPacket(uint32_t id) { return OnPackets(std::span<const uint32_t>(&id, 1)); }

  // See OutputBuffer. Barrier with an epoch not above the previous one is
  // InvalidArgument and changes nothing.
  Status Barrier(uint64_t epoch);
  Status Release(uint64_t epoch);
  // Applies `v` to everything recorded and, from now on, to every packet
  // read. Later calls are no-ops.
  Status Finish(Verdict v);

  uint64_t buffered() const;
  uint64_t released() const;
  // Packets Finish(kDrop) (or reads after it) discarded.
  uint64_t discarded() const;
  bool finished() const;

 private:
  struct Closed {
    uint64_t epoch;
    uint32_t last_id;
    uint64_t packets;
  };

  Status SendLocked(uint32_t last_id, Verdict v, uint64_t packets) REQUIRES(mu_);

  VerdictSink* sink_;
  mutable Mutex mu_;
  std::deque<Closed> closed_ GUARDED_BY(mu_);  // barriers not yet released, oldest first (only non-empty epochs)
  std::optional<uint32_t> last_id_ GUARDED_BY(mu_);  // newest id read
  uint64_t open_packets_ GUARDED_BY(mu_) = 0;  // read since the last barrier
  std::optional<uint64_t> last_barrier_ GUARDED_BY(mu_);
  std::optional<uint64_t> acked_ GUARDED_BY(mu_);
  std::optional<Verdict> final_ GUARDED_BY(mu_);  // set by Finish
  uint64_t released_ GUARDED_BY(mu_) = 0;
  uint64_t discarded_ GUARDED_BY(mu_) = 0;
};

}  // namespace remus::netbuf
