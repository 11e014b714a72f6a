// The primary's side of disk mirroring: for each protected disk, an NBD
// export on a unix socket that QEMU's blockdev-mirror (sync full, copy-mode
// write-blocking) writes through, handing every write to the replicator.
//
//   ListGuestDisks(monitor)   the writable disks (query-block)
//   DiskSource::Start()       NBD servers up; blockdev-add an nbd node per
//                             disk; blockdev-mirror onto it
//   ...                       the background copy, then every guest write,
//                             reach the WriteFn (NBD server threads)
//   OnEvent(ev)               BLOCK_JOB_READY / _ERROR / _COMPLETED
//   Stop()                    block-job-cancel, blockdev-del, servers down;
//                             the guest keeps its own disk
//
// Why write-blocking: a guest write completes only after QEMU wrote it
// locally and handed it to us, so when QEMU stops the guest for a checkpoint
// (it drains in-flight I/O first) every write of the epoch has reached the
// WriteFn, before QEMU sends the checkpoint's RAM. The replicator tags each
// write with the epoch it belongs to by that order alone.
//
// The WriteFn must not fail a write because protection ended: the guest's
// own write has succeeded, and a failed target write would fail the mirror
// job (never the guest: QEMU reports target errors on the job). Reads are
// refused (EIO): the mirror job never reads its target.
//
// Thread-safety: OnEvent may be called from the monitor's reader thread;
// the rest from one thread (the replicator's). The WriteFn runs on NBD
// server threads, one call at a time per disk.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "common/thread_annotations.h"
#include "diskmirror/disk_sink.h"
#include "diskmirror/nbd_server.h"
#include "replicator/qemu/qmp.h"
#include "replicator/link/messages.h"
#include "replicator/link/wire.h"

namespace remus {

struct GuestDisk {
  // The -drive id (query-block "device"), e.g. "drive0"; for a libvirt
  // domain the disk's <target dev=> ("vda", as `virsh domblklist` shows).
  std::string id;
  std::string node;    // the top node's name
  std::string format;  // "raw", "qcow2", ...
  std::string file;    // the image on the primary
  uint64_t size = 0;   // virtual size, bytes
  // What blockdev-mirror mirrors from: the -drive id, or the top node of a
  // -blockdev disk. Not sent to the backup.
  std::string device;
  // The wire form (CONFIG's "disks", the backup's disks.json): DiskSpec in
  // replicator/link/messages.h.
  wire::DiskSpec Spec() const { return {id, node, format, file, size}; }
  nlohmann::json ToJson() const;
  static StatusOr<GuestDisk> FromJson(const nlohmann::json& j);
};

// The guest's writable disks with a medium, from query-block. `select` is
// "all", "none", or a comma-separated list of disk ids (unknown ids are
// InvalidArgument naming the ones there are).
//
// QMP mode (libvirt_targets null): disks attached with -blockdev (no drive
// id) are FailedPrecondition: the backup restores from the argv, which it can
// only rewrite for -drive.
// libvirt mode: libvirt_targets maps the device alias of each <disk> of the
// domain XML to its <target dev=> (LibvirtDiskTargets); a -blockdev disk is
// named by the target of the device it is attached to (query-block "qdev":
// the alias, or /machine/peripheral/<alias>/...). A writable disk that is no
// <disk> of the XML (a -drive from <qemu:commandline>) is FailedPrecondition:
// the backup restores from the XML and could not point it at its copy.
StatusOr<std::vector<GuestDisk>> ListGuestDisks(QemuMonitor* monitor, const std::string& domain,
                                                const std::string& select,
                                                const std::map<std::string, std::string>* libvirt_targets = nullptr);

// The device alias in query-block's "qdev" ("virtio-disk0" for
// "/machine/peripheral/virtio-disk0/virtio-backend" or "virtio-disk0"), or
// "" when it names no device given an id.
std::string QdevAlias(const std::string& qdev);

// What the primary's lifecycle needs of its disk mirror; DiskSource below
// is the real one, unit tests use a fake. Thread-safety as DiskSource's.
class DiskMirror {
 public:
  using WriteFn = std::function<void(uint32_t disk, wire::DiskOp op, uint64_t offset, uint64_t length,
                                     std::span<const uint8_t> data)>;
  virtual ~DiskMirror() = default;
  virtual Status Start() = 0;
  virtual void OnEvent(const nlohmann::json& event) = 0;
  virtual bool AllReady() const = 0;
  virtual Status failure() const = 0;
  virtual nlohmann::json Progress() const = 0;
  virtual double Fraction() const = 0;
  // Issues QMP commands when qemu_alive: never call it on the monitor's
  // event thread (QMP refuses commands there).
  virtual void Stop(bool qemu_alive) = 0;
};

class DiskSource final : public DiskMirror {
 public:

  // Hands QEMU a connected socket under the given name (getfd; the caller
  // keeps its fd), as CheckpointSourceOptions::pass_fd.
  using PassFdFn = std::function<Status(const std::string& fdname, int fd)>;

  // run_dir holds the NBD sockets. monitor outlives this. With pass_fd (a
  // libvirt domain, whose QEMU may not open paths of ours), QEMU gets a
  // socket already connected to each NBD server instead of its path.
  DiskSource(QemuMonitor* monitor, std::string domain, std::string run_dir, std::vector<GuestDisk> disks,
             WriteFn write, PassFdFn pass_fd = nullptr);
  ~DiskSource() override;
  DiskSource(const DiskSource&) = delete;
  DiskSource& operator=(const DiskSource&) = delete;

  Status Start() override;
  // BLOCK_JOB_READY marks a disk's copy complete; BLOCK_JOB_ERROR and a
  // BLOCK_JOB_COMPLETED/CANCELLED we did not ask for fail it.
  void OnEvent(const nlohmann::json& event) override;
  bool AllReady() const override;
  // Non-OK once a mirror job failed (the reason).
  Status failure() const override;
  // Per disk: id, copied and total bytes (query-block-jobs), ready.
  nlohmann::json Progress() const override;
  // Bytes copied / total over all disks (0..1), from the last Progress().
  double Fraction() const override;
  // Cancels the jobs and removes the nbd nodes if qemu_alive; always stops
  // the servers. Idempotent.
  void Stop(bool qemu_alive) override;

  const std::vector<GuestDisk>& disks() const { return disks_; }

 private:
  class Sink;
  std::string JobId(size_t i) const { return "remus-" + disks_[i].id; }
  std::string NodeName(size_t i) const { return "remus-nbd-" + disks_[i].id; }

  QemuMonitor* monitor_;
  const std::string domain_, run_dir_, tag_;
  const std::vector<GuestDisk> disks_;
  WriteFn write_;
  PassFdFn pass_fd_;
  std::vector<std::unique_ptr<Sink>> sinks_;
  std::vector<std::unique_ptr<NbdServer>> servers_;
  std::vector<bool> added_, mirroring_;  // replicator thread only

  mutable Mutex mu_;
  std::vector<bool> ready_ GUARDED_BY(mu_);
  Status failure_ GUARDED_BY(mu_);
  bool stopping_ GUARDED_BY(mu_) = false;
  mutable double fraction_ GUARDED_BY(mu_) = 0;
};

}  // namespace remus
