// Rewrites a primary's QEMU command line so the guest can be restored on the
// backup host. Pure: no I/O; unit-tested in argv_rewrite_test.cc.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "replicator/qemu/qemu_stream.h"

namespace remus {

// The restored QEMU's monitors, in run_dir: the operators' and remusd's own.
inline constexpr const char* kRestoredQmpSocket = "qmp.sock";
inline constexpr const char* kRestoredRemusdQmpSocket = "remusd-qmp.sock";

// The primary's argv made fit for a restore on this host: two monitors
// (kRestoredQmpSocket, kRestoredRemusdQmpSocket),
// pidfile and serial/chardev paths under run_dir, `-incoming defer`, no
// -daemonize, -S, -incoming or monitors of the primary. qemu_binary, when not
// empty, replaces argv[0]. drive_images maps -drive ids to the backup's raw
// images: their file= is replaced and format= set to raw.
std::vector<std::string> RewriteArgvForRestore(const std::vector<std::string>& argv, const std::string& run_dir,
                                               const std::string& qemu_binary,
                                               const std::map<std::string, std::string>& drive_images = {});

// Restore by mapping (issue 16): the restored QEMU's main RAM becomes a
// memory-backend-file (share=on) on the page store's own file for that block,
// so a failover maps the committed image instead of streaming it, and QEMU's
// x-ignore-shared capability keeps that block out of the restore stream.
// Only main RAM is mapped: the other blocks (firmware, video RAM, ACPI
// tables) belong to devices that allocate them themselves, and are small.
struct RamMappingPlan {
  bool map = false;
  size_t block = 0;      // index of main RAM in the block list
  std::string id;        // its RAMBlock id, which the backend object takes
  std::string reason;    // why not, when !map (one sentence, for status and logs)
};

// Decides from the primary's argv and its RAM block list whether main RAM
// can be mapped: a block carries the machine's default RAM id (pc.ram on
// x86; mach-virt.ram, s390.ram, ppc_spapr.ram, riscv_virt_board.ram read
// from QEMU's source, tested on x86 only) and the argv picks no memory
// backend, -mem-path, -mem-prealloc or NUMA memory of its own.
RamMappingPlan PlanRamMapping(const std::vector<std::string>& argv, const std::vector<qemu::RamBlock>& blocks);

// Appends the backend for plan.id on file `path` (size bytes, share=off) and
// `-machine memory-backend=ID` (QEMU merges repeated -machine options).
std::vector<std::string> AddMappedRam(std::vector<std::string> argv, const std::string& id, const std::string& path,
                                      uint64_t size);

// The inverse, for a guest that a mapped restore started and that is now
// protected again: removes exactly what AddMappedRam added (a
// memory-backend-file with a default RAM id on a page store's ram-NNN-*.img,
// and its -machine memory-backend=), so its CONFIG names plain RAM rather
// than a file in this host's state directory. Anything else is kept.
std::vector<std::string> StripMappedRam(const std::vector<std::string>& argv);

}  // namespace remus
