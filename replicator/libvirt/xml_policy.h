// What a backup accepts in the libvirt domain XML a primary's CONFIG
// carries: the backup's libvirt defines and starts that domain (its QEMU runs
// as libvirt's QEMU user, often root) when it promotes, so the XML is input
// from another host. Checked when CONFIG arrives, before any state moves, and
// again before the restore (from the config.json kept on disk).
//
// Refused, with a sentence naming the element and why (PermissionDenied):
// - anything in libvirt's QEMU namespace (http://libvirt.org/schemas/domain/
//   qemu/1.0: <qemu:commandline>, <qemu:capabilities>, <qemu:override>, ...)
//   anywhere, and elements of any other namespace outside <metadata>;
// - <devices> children that hand the guest something of this host:
//   <hostdev>, <filesystem>, <redirdev>, <smartcard>, <shmem>, <lease>,
//   <vsock>, <interface type='hostdev'|'vhostuser'|'vdpa'|'server'|'client'|
//   'mcast'|'udp'>, interfaces with a <script>, <downscript> or <backend
//   tap=|vhost=>, <input type='passthrough'|'evdev'>, a passthrough <tpm>, an
//   <rng> reading anything but /dev/urandom, /dev/random or /dev/hwrng, an
//   egd <rng>, <memory> backed by a host path, <audio type='file'>;
//   PeerPolicy::extra_libvirt_elements lifts the refusal of a whole element;
// - character devices other than file (moved into the run dir), pty, null,
//   vc, stdio, spicevmc, qemu-vdagent and unix sockets under an allowed
//   directory; a <log file=> anywhere but on a file chardev;
// - a <disk> that is not mirrored to this backup and has a source, unless
//   it is read-only and its file lies under PeerPolicy::file_dirs;
// - <os> files (<kernel>, <initrd>, <dtb>, <loader>, ACPI tables) and
//   <sysinfo> fw_cfg files outside PeerPolicy::file_dirs and kFirmwareDirs;
//   an <nvram> (written) outside PeerPolicy::file_dirs;
// - an <emulator> not named qemu-system-ARCH when the backup has no --qemu.
// The peer's <seclabel>s are not refused: the restore removes them, so the
// backup's libvirt applies its own security driver's defaults
// (RewriteDomainXmlForRestore).
//
// Thread-safety: a free function over values.
#pragma once

#include <set>
#include <string>
#include <string_view>

#include "common/status.h"
#include "replicator/qemu/argv_policy.h"

namespace remus {

inline constexpr char kLibvirtQemuXmlNamespace[] = "http://libvirt.org/schemas/domain/qemu/1.0";

// The text of <devices><emulator>; "" when there is none (libvirt then
// picks its own) or the XML does not parse.
std::string DomainXmlEmulator(std::string_view xml);

// mirrored: the <target dev=> of the disks the backup keeps a copy of
// (CONFIG's disk ids). own_qemu: the backup has a --qemu for <emulator>.
// InvalidArgument for XML that does not parse (libvirt/xml.h).
Status CheckDomainXml(std::string_view xml, const std::set<std::string>& mirrored, const PeerPolicy& policy,
                      bool own_qemu);

}  // namespace remus
