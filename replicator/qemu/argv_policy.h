// What a backup accepts from its peer: the QEMU command line the primary's
// CONFIG carries is input from another host, and the backup runs it (as
// root) when it promotes. So it is checked against an allow-list before any
// state moves (when CONFIG arrives) and again before QEMU starts (promotion,
// from the config.json kept on disk). Pure: no I/O except ResolveQemuBinary.
//
// The rules (docs/operator-guide.md, "What the backup accepts from a peer"):
// - Every option must be on the allow-list (kAllowedOptions in the .cc, or
//   PeerPolicy::extra_options); an unknown option, a bare argument (QEMU
//   takes it for a disk image) or a value that starts with '-' is refused.
// - Options that name something on the host are checked by value: a file
//   the restored guest would read (-kernel, -initrd, firmware, a read-only
//   -drive) must lie under one of PeerPolicy::file_dirs; a writable -drive
//   must be one the backup mirrors (argv_rewrite.h points it at the backup's
//   own image); chardevs, -serial and -netdev only in the forms the rewrite
//   moves into the run dir or that touch nothing on the host (tap without
//   scripts or fds); -device drivers from an allow-list, and no ROM file
//   given by path.
// - argv[0] is never run: the backup runs its --qemu, or, without one, the
//   binary of the same name (qemu-system-ARCH) from its own PATH.
//
// Refusals are PermissionDenied with one sentence naming the option, the
// value and the reason.
//
// Thread-safety: free functions over values.
#pragma once

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace remus {

// The backup's own additions to the built-in allow-lists (remusd flags).
struct PeerPolicy {
  // --allow-qemu-option NAME: an option accepted with any value (e.g. "vnc"
  // or "-vnc"). It then bypasses every value check: only for options that
  // open nothing the primary could choose.
  std::vector<std::string> extra_options;
  // --allow-qemu-device DRIVER: a -device driver beyond the built-in list.
  std::vector<std::string> extra_devices;
  // --allow-qemu-files DIR: directories whose files a restored guest may
  // read (kernels, initrds, firmware, ISO images). None by default.
  std::vector<std::string> file_dirs;
  // --allow-shared-disks DIR: shared storage. A writable disk the backup
  // does not mirror is accepted when its file lies under one of these (the
  // restored guest opens the primary's path on this host: safe only when it
  // is the same storage and the primary's copy is dead or fenced).
  std::vector<std::string> shared_disk_dirs;
  // --allow-libvirt-element NAME: a <devices> child refused by default
  // (hostdev, filesystem, ...) that this backup accepts in a peer's XML.
  std::vector<std::string> extra_libvirt_elements;
};

// A QEMU option string split as QEMU does (key=value, "a" alone meaning
// a=on, the first bare element being `implied` when given). Escaped commas
// (",,"), empty elements and duplicate keys are InvalidArgument: the
// rewrite and the checks must read the string the way QEMU does, and those
// are where readings differ.
StatusOr<std::vector<std::pair<std::string, std::string>>> ParseQemuOpts(std::string_view value,
                                                                        const std::string& implied = "");

// System firmware directories whose files any restored guest may read
// (QEMU's ROMs, SeaBIOS, OVMF/AAVMF, iPXE): Debian's and common paths.
inline constexpr const char* kFirmwareDirs[] = {"/usr/share/qemu", "/usr/share/seabios", "/usr/share/OVMF",
                                                "/usr/share/ovmf", "/usr/share/AAVMF", "/usr/share/qemu-efi-aarch64",
                                                "/usr/lib/ipxe/qemu"};

enum class PeerFileAccess {
  kRead,   // the restored guest reads it: policy.file_dirs and kFirmwareDirs
  kWrite,  // QEMU or libvirt creates or writes it: policy.file_dirs only
};

// OK if `path` is absolute, has no "." or ".." component and no ',', and
// lies under one of the directories `access` allows; PermissionDenied
// naming `what` otherwise.
Status CheckPeerFile(const std::string& path, const std::string& what, const PeerPolicy& policy,
                     PeerFileAccess access = PeerFileAccess::kRead);
// The same for a writable disk: under one of policy.shared_disk_dirs.
Status CheckSharedDisk(const std::string& path, const std::string& what, const PeerPolicy& policy);

// Whether `name` (a path's last component) is a QEMU system emulator's name:
// qemu-system-ARCH (ARCH of letters, digits and '_'), qemu-kvm or kvm.
bool IsQemuBinaryName(std::string_view name);

// The binary a restored guest runs: `configured` (remusd --qemu) when set,
// else the peer's binary's name (IsQemuBinaryName) found in this host's
// PATH (or /usr/local/bin:/usr/bin:/bin:/usr/libexec without one).
// PermissionDenied for another name, NotFound when no such file runs here.
StatusOr<std::string> ResolveQemuBinary(const std::string& configured, const std::string& peer_binary);

// Checks a primary's QEMU argv. mirrored: the -drive ids the backup keeps a
// copy of (CONFIG's disks). own_qemu: the backup has a --qemu (argv[0] is
// then not looked at; otherwise its name must pass IsQemuBinaryName).
Status CheckQemuArgv(const std::vector<std::string>& argv, const std::set<std::string>& mirrored,
                     const PeerPolicy& policy, bool own_qemu);

}  // namespace remus
