// Which QEMU release a binary is, and the rule between a primary's QEMU and
// the QEMU its backup restores checkpoints with.
//
// The rule (docs/operator-guide.md, "QEMU versions"): both hosts run the same
// QEMU release, major.minor. A checkpoint's device state is loaded by the
// backup's QEMU, and a failover back (reverse protection) loads the other
// way, so both directions must load. QEMU keeps the migration format within a
// stable series (10.0.x), so the micro version may differ; across releases it
// does not promise a backward load, and a machine type alias ("pc", "q35")
// resolves to a different versioned type ("pc-i440fx-7.2" against
// "pc-i440fx-10.0"), which the restore would refuse at promotion time. The
// machine type itself cannot differ: the backup starts what the primary's
// CONFIG describes, and QEMU checks the stream's CONFIGURATION section on load.
//
// Thread-safety: QemuBinaryVersion is thread-safe (a mutex guards its cache);
// the rest are free functions over values.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace remus::qemu {

struct QemuRelease {
  int major = 0, minor = 0, micro = 0;
  std::string ToString() const;
  bool operator==(const QemuRelease&) const = default;
};

// "10.0.13" (query-version's numbers, as CONFIG carries them).
StatusOr<QemuRelease> ParseQemuRelease(std::string_view version);
// The first line of `qemu-system-x86_64 -version`:
// "QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)".
StatusOr<QemuRelease> ParseVersionOutput(std::string_view output);

// Runs `binary -version` (at most 5 s) and parses it. Cached per path and
// modification time, so a backup asks each binary once per upgrade.
StatusOr<QemuRelease> QemuBinaryVersion(const std::string& binary);

// FailedPrecondition, one sentence naming both releases and the binary, when
// the primary's QEMU (CONFIG's qemu_version) and the backup's differ in
// major.minor; OK otherwise.
Status CheckSameRelease(const std::string& domain, const QemuRelease& primary, const QemuRelease& backup,
                        const std::string& backup_binary);

}  // namespace remus::qemu
