// The checkpoint source: everything QEMU-specific on the primary, behind one
// class. It drives QEMU's COLO engine over QMP and terminates the migration
// stream QEMU sends to remusd, answering its COLO messages. The stream comes
// over a unix socket remusd listens on (`migrate unix:PATH`), or, when QEMU
// may not open paths of ours (libvirt's QEMU: another user, AppArmor), over
// one end of a socketpair handed to QEMU (`getfd`, then `migrate fd:NAME`).
//
// One checkpoint, as seen by the caller (see docs/formats/qemu-colo-stream.md):
//   WaitForRequest()        QEMU's timer fired (guest running)
//   BeginPause()            we send REPLY; QEMU stops the guest
//   ReadCheckpoint(sink)    dirty pages to sink, then the device blob
//   TakeRetained()          the buffers the sink's page pointers point into
//   EndPause()              we send RECEIVED + LOADED; QEMU resumes the guest
//
// Thread-safety: the epoch loop thread calls the stream methods; Abort() and
// GiveUp() may be called from any thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "common/io.h"
#include "common/thread_annotations.h"
#include "replicator/qemu/checkpoint_stream.h"
#include "replicator/qemu/qemu_stream.h"
#include "replicator/qemu/qmp.h"

namespace remus {

struct CheckpointSourceOptions {
  std::string domain;
  std::string migration_socket;  // where QEMU connects (we listen); unused with pass_fd
  int interval_ms = 100;
  int accept_timeout_ms = 10000;
  // Read buffers kept warm for the next checkpoints (see BufferPool), in
  // 1 MiB buffers: at most this many bytes stay allocated between checkpoints.
  size_t buffer_pool_bytes = 256u << 20;
  // Set: the stream goes over a socketpair instead; this hands QEMU its end
  // under the given name (LibvirtMonitor::PassFd). The caller keeps its fd.
  std::function<Status(const std::string& fdname, int fd)> pass_fd;
};

class CheckpointSource final : public CheckpointStream {
 public:
  // monitor must outlive this.
  CheckpointSource(QemuMonitor* monitor, CheckpointSourceOptions opts);
  ~CheckpointSource() override;

  // Enables x-colo (return path off), sets x-checkpoint-delay, lifts the
  // bandwidth limit, and starts `migrate` to our socket (waits for QEMU to
  // connect) or to the socketpair end passed to QEMU.
  Status Start() override;
  // The initial full copy: pages to sink; returns configuration, blocks and
  // device state. QEMU then waits (guest stopped) until SendReady().
  Status ReadInitial(qemu::PageSink* sink, qemu::InitialInfo* info) override;
  Status SendReady() override;

  Status WaitForRequest() override;
  Status BeginPause() override;
  // Reads the epoch's RAM pages into sink and returns the device blob. The
  // page pointers the sink gets stay valid (no copy is made) until the
  // buffers TakeRetained returns next are given back to pool().
  StatusOr<std::string> ReadCheckpoint(qemu::PageSink* sink, uint64_t* pages) override;
  std::vector<std::vector<uint8_t>> TakeRetained() override;
  const std::shared_ptr<BufferPool>& pool() const override { return pool_; }
  Status EndPause() override;

  // Changes the interval (QEMU also checkpoints at once).
  Status SetInterval(int ms) override;
  // Verifies QEMU reports the "colo" migration state (QEMU 10.0 never gets there).
  Status CheckInColo() override;

  // The RAM blocks from the stream's ram START section (empty before it).
  const std::vector<qemu::RamBlock>& blocks() const override;

  // Unblocks any stream read in progress (it then fails with Cancelled/Unavailable).
  void Abort() override;
  // Ends COLO on QEMU's side so the guest runs unprotected: x-colo-lost-heartbeat,
  // then makes sure the guest is not left stopped by us. Once only, except
  // after Unavailable (the monitor could not be reached at all): then it may
  // be called again.
  Status GiveUp() override;

 private:
  Status Send(qemu::ColoMessage m);

  QemuMonitor* monitor_;
  CheckpointSourceOptions opts_;
  Fd listen_fd_;
  Fd conn_;
  std::unique_ptr<FdSource> source_;
  std::unique_ptr<BufferedReader> reader_;
  std::unique_ptr<qemu::StreamParser> parser_;
  std::shared_ptr<BufferPool> pool_;
  std::atomic<bool> aborted_{false};
  Mutex give_up_mu_;
  bool gave_up_ GUARDED_BY(give_up_mu_) = false;
};

}  // namespace remus
