// The primary's view of QEMU's checkpoints: the seam between the epoch loop
// and everything QEMU-specific. CheckpointSource (checkpoint_source.h) is the
// real one, over QMP and QEMU's COLO migration stream; unit tests drive the
// epoch loop with a fake that produces epochs on demand.
//
// One checkpoint, as seen by the caller (docs/formats/qemu-colo-stream.md):
//   WaitForRequest()        QEMU's timer fired (guest running)
//   BeginPause()            REPLY; QEMU stops the guest
//   ReadCheckpoint(sink)    dirty pages to sink, then the device blob
//   TakeRetained()          the buffers the sink's page pointers point into
//   EndPause()              RECEIVED + LOADED; QEMU resumes the guest
//
// Thread-safety: one thread (the epoch loop) calls the stream methods;
// SetInterval, CheckInColo, Abort and GiveUp may be called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/io.h"
#include "common/status.h"
#include "replicator/qemu/qemu_stream.h"

namespace remus {

class CheckpointStream {
 public:
  virtual ~CheckpointStream() = default;

  // Puts QEMU into COLO mode and starts its migration towards us.
  virtual Status Start() = 0;
  // The initial full copy: pages to sink, then configuration, blocks and
  // device state. QEMU then waits (guest stopped) until SendReady().
  virtual Status ReadInitial(qemu::PageSink* sink, qemu::InitialInfo* info) = 0;
  virtual Status SendReady() = 0;

  virtual Status WaitForRequest() = 0;
  virtual Status BeginPause() = 0;
  // The epoch's RAM pages to sink; returns the device blob. The page
  // pointers stay valid until the buffers TakeRetained returns next are
  // given back to pool().
  virtual StatusOr<std::string> ReadCheckpoint(qemu::PageSink* sink, uint64_t* pages) = 0;
  virtual std::vector<std::vector<uint8_t>> TakeRetained() = 0;
  virtual const std::shared_ptr<BufferPool>& pool() const = 0;
  virtual Status EndPause() = 0;

  virtual Status SetInterval(int ms) = 0;
  // OK once QEMU reports the "colo" migration state.
  virtual Status CheckInColo() = 0;
  // The RAM blocks of the stream's ram START section (empty before it).
  virtual const std::vector<qemu::RamBlock>& blocks() const = 0;

  // Unblocks any stream read in progress (it then fails).
  virtual void Abort() = 0;
  // Ends COLO on QEMU's side so the guest runs unprotected (never left
  // stopped by us). Unavailable: the monitor was unreachable and nothing was
  // done; a later call may try again.
  virtual Status GiveUp() = 0;
};

}  // namespace remus
