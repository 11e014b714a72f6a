// Starting the guest from a committed checkpoint: a new QEMU fed the restore
// stream (QemuPromoter, through a ProcessLauncher), or a libvirt domain
// restored through the backup's libvirt (LibvirtPromoter). They hold no
// domain state: the domain decides when to promote and records the result.
//
// Contract: Restore either returns a running guest, or fails having left
// nothing running (a QEMU it started is killed and reaped first).
// Threads: one Restore at a time per domain; `phase` and `progress` are
// atomics read by status while it runs.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "replicator/backup/page_store.h"
#include "replicator/backup/restore.h"
#include "replicator/link/messages.h"
#include "replicator/qemu/argv_rewrite.h"
#include "replicator/qemu/launcher.h"

namespace remus {

struct RestoreRequest {
  std::string domain;
  const PageStore* store = nullptr;  // committed; not modified while this runs
  std::string configuration;         // QEMU's CONFIGURATION section
  wire::ConfigMsg config;            // the session's CONFIG (argv or libvirt XML)
  std::map<std::string, std::string> drive_images;  // disk id -> the backup's image
  std::string run_dir;
  uint64_t epoch = 0;
  RestoreProgress* progress = nullptr;
  std::atomic<const char*>* phase = nullptr;  // a string literal naming the step
  // Called with the QEMU's pid as soon as it started (QemuPromoter only), so
  // the caller can record it before anything can go wrong.
  std::function<void(int pid)> started;
  // Restore by mapping (QemuPromoter): main RAM becomes a memory-backend-file
  // on the store's own file where PlanRamMapping allows it. False: stream
  // everything (remusd --restore stream).
  bool map_ram = true;
};

struct RestoredGuest {
  int pid = -1;
  bool ours = false;        // a child of the launcher (not libvirt's)
  std::string qmp_socket;        // QemuPromoter: the operators' monitor
  std::string remus_qmp_socket;  // and remusd's own
  std::string libvirt_uri;  // LibvirtPromoter
  std::string libvirt_domain;
  // How the checkpoint got into the guest: "mapped" (main RAM is the store's
  // file) or "streamed" (every page through the migration stream); and why
  // not mapped, when streamed.
  std::string restore_mode;
  std::string stream_reason;
  uint64_t streamed_bytes = 0;  // restore stream bytes
  uint64_t mapped_bytes = 0;    // guest RAM mapped instead
};

// What a promotion of this checkpoint would do (status while standing by).
struct RestorePlanInfo {
  std::string mode;       // "mapped" or "streamed"
  std::string reason;     // why streamed
  uint64_t mapped_bytes = 0;
  uint64_t streamed_ram_bytes = 0;
};
RestorePlanInfo PlanRestore(const wire::ConfigMsg& config, const PageStore& store, bool map_ram);

class Promoter {
 public:
  virtual ~Promoter() = default;
  virtual StatusOr<RestoredGuest> Restore(const RestoreRequest& req) = 0;
};

struct QemuPromoterOptions {
  std::string qemu_binary;      // replaces the primary's argv[0] when set
  int start_timeout_ms = 5000;  // for the monitor to come up
};

class QemuPromoter final : public Promoter {
 public:
  // launcher outlives this.
  QemuPromoter(ProcessLauncher* launcher, QemuPromoterOptions opts) : launcher_(launcher), opts_(std::move(opts)) {}
  StatusOr<RestoredGuest> Restore(const RestoreRequest& req) override;

 private:
  // One QEMU started and fed the checkpoint, mapping main RAM when plan.map.
  // *exited_at_start (when not null): that QEMU exited before its monitor
  // came up.
  StatusOr<RestoredGuest> Attempt(const RestoreRequest& req, const RamMappingPlan& plan, bool* exited_at_start);

  ProcessLauncher* const launcher_;
  const QemuPromoterOptions opts_;
};

struct LibvirtPromoterOptions {
  std::string uri = "qemu:///system";
  std::string pid_dir = "/run/libvirt/qemu";
  std::string qemu_binary;  // replaces <emulator> when set
};

class LibvirtPromoter final : public Promoter {
 public:
  explicit LibvirtPromoter(LibvirtPromoterOptions opts) : opts_(std::move(opts)) {}
  StatusOr<RestoredGuest> Restore(const RestoreRequest& req) override;

 private:
  const LibvirtPromoterOptions opts_;
};

}  // namespace remus
