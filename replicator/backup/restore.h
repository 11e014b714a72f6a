// Failover restore: turns the backup's page store into the migration stream a
// fresh QEMU started with -incoming loads (byte layout in
// docs/formats/qemu-colo-stream.md, "Restoring on the backup"):
//
//   magic, version 3, CONFIGURATION (the primary's, copied),
//   START ram (block list) + a record for every page (zero pages as ZERO) + EOS + footer,
//   END ram (EOS + footer),
//   the committed device blob as is (FULL sections + footers + EOF 0x00),
//   06 00000000 (an empty VMDESCRIPTION).
//
// Restore by mapping: blocks marked in `mapped` are memory-backend-files
// (share=off: a private, copy-on-write mapping) on the store's own block
// files in the restored QEMU, so they already hold the committed image. The
// stream still lists them in the block list (QEMU checks names and lengths)
// but carries none of their pages: QEMU's loader leaves a page it is not
// sent as it is.
//
// The stream is produced in bounded chunks (kRestoreChunk), never whole in
// memory. Holes in the store's sparse files become ZERO records without
// touching their pages.
//
// Thread-safety: reads the store; REQUIRES no concurrent Commit/ApplyPage.
#pragma once

#include <cstdint>
#include <atomic>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "replicator/backup/page_store.h"

namespace remus {

// Section id of the ram section in the restore stream. QEMU matches END to
// START by this id; it only has to be non-zero and differ from the device
// sections' ids in the blob, which QEMU numbers from 0 upwards.
inline constexpr uint32_t kRestoreRamSectionId = 0x7e000001;
inline constexpr size_t kRestoreChunk = 4u << 20;

// How far a restore stream is, readable from other threads while it runs
// (remusctl failover's progress bar, through the backup's status).
struct RestoreProgress {
  std::atomic<uint64_t> ram_done{0};   // guest RAM bytes streamed (pages and zero pages)
  std::atomic<uint64_t> ram_total{0};  // guest RAM bytes in all (set when the stream starts)
};

struct RestoreStats {
  uint64_t pages = 0;       // PAGE records
  uint64_t zero_pages = 0;  // ZERO records
  uint64_t bytes = 0;       // stream bytes
  uint64_t mapped_bytes = 0;  // guest RAM the restored QEMU maps instead
  RestoreProgress* progress = nullptr;  // optional, set by the caller: updated per chunk
};

// Streams the restore image to fd (a socket to QEMU or a file).
// FailedPrecondition if the store has no committed image; InvalidArgument if
// configuration_section is not a CONFIGURATION section (type byte 0x07 first)
// or `mapped` is not empty and not one flag per block.
Status WriteRestoreStream(const PageStore& store, std::string_view configuration_section, int fd,
                          RestoreStats* stats = nullptr, const std::vector<bool>& mapped = {});

// Same stream into memory (tests, small guests).
StatusOr<std::string> RestoreStreamToString(const PageStore& store,
                                            std::string_view configuration_section,
                                            RestoreStats* stats = nullptr, const std::vector<bool>& mapped = {});

// The generator both use: emit is called with chunks of at most about
// kRestoreChunk bytes, in order.
Status GenerateRestoreStream(const PageStore& store, std::string_view configuration_section,
                             const std::function<Status(std::string_view)>& emit,
                             RestoreStats* stats = nullptr, const std::vector<bool>& mapped = {});

}  // namespace remus
