// Failover restore through libvirt: starts the protected domain on the
// backup's libvirtd from the primary's domain XML and a QEMU migration stream
// (restore.h writes one from the page store), so that libvirt owns the
// restored guest (`virsh list` shows it running, `virsh` manages it after).
//
// How: libvirt can only start a QEMU with an incoming stream through its
// migration protocol (internal driver calls) or from a save image
// (virDomainRestoreFlags). A save image is libvirt's header + the domain XML +
// the raw QEMU stream (layout below, from libvirt's src/qemu/qemu_saveimage.h,
// QEMU_SAVE_VERSION 2, unchanged from libvirt 1.x to 10.x). The header is
// written here by hand: libvirt's own writer is internal to its QEMU driver,
// and its public API creates images only by saving a running domain.
// RestoreDomain streams the image through a FIFO: libvirtd opens the path,
// reads header and XML, and hands the fd to the new QEMU (`-incoming defer`,
// migrate-incoming "fd:"), which reads the stream from the FIFO as it is
// generated. Nothing is staged on disk; libvirt then resumes the guest.
//
//   offset  size  field (host byte order, as libvirt writes it)
//   0       16    magic "LibvirtQemudSave" (no NUL; "LibvirtQemudPart" = incomplete)
//   16      4     version = 2
//   20      4     data_len: bytes of XML (with its NUL) + cookie + zero padding
//   24      4     was_running: 1 = resume the guest after loading
//   28      4     compressed = 0 (raw)
//   32      4     cookieOffset = 0 (no save cookie; libvirt then keeps the
//                 XML's CPU definition as is)
//   36      56    unused, zero
//   92      data_len  XML, NUL, zero padding (64 KiB, as libvirt pads, so
//                 `virsh save-image-edit` can grow the XML in place)
//   92+data_len   the QEMU migration stream, to its end
//
// Thread-safety: free functions; RestoreDomain blocks until libvirt has the
// guest running (or failed) and uses one helper thread to feed the FIFO.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "common/status.h"
#include "replicator/libvirt/monitor.h"

namespace remus {

inline constexpr char kLibvirtSaveMagic[] = "LibvirtQemudSave";
inline constexpr uint32_t kLibvirtSaveVersion = 2;
inline constexpr size_t kLibvirtSaveHeaderSize = 92;
inline constexpr size_t kLibvirtSaveXmlPadding = 64 * 1024;

// Writes a complete QEMU migration stream to fd and returns; e.g.
//   [&](int fd) { return WriteRestoreStream(store, configuration, fd, &stats); }
// A write error (EPIPE: libvirt or QEMU gave up) is returned as is.
using StreamWriter = std::function<Status(int fd)>;

// Header + XML + NUL + padding: everything of a save image before the stream.
// InvalidArgument if xml holds a NUL or the data would not fit the 32-bit length.
StatusOr<std::string> EncodeSaveImagePrefix(std::string_view xml, bool was_running);

// A whole save image (prefix, then write_stream) to fd, e.g. a regular file.
Status WriteSaveImage(int fd, std::string_view xml, bool was_running, const StreamWriter& write_stream);

// Domain XML is parsed with libxml2 as untrusted input (libvirt/xml.h): a
// text that is not well-formed, too large, has a DOCTYPE or no <domain> root
// is InvalidArgument. An edited XML comes back in libxml2's form of it
// (attributes in double quotes, empty elements as <x/>, no XML declaration);
// whitespace, comments, CDATA and other applications' metadata stay.

// The text (CDATA included, comments left out) of the <name> and <uuid>
// children of <domain>. NotFound when missing.
StatusOr<std::string> DomainXmlName(std::string_view xml);
StatusOr<std::string> DomainXmlUuid(std::string_view xml);
// Replaces the text of <devices><emulator> (the backup's own QEMU).
// NotFound if the XML has none.
StatusOr<std::string> SetDomainXmlEmulator(std::string_view xml, const std::string& emulator);

// The XML namespace of remus's own metadata element in a domain XML (see
// README, "libvirt domains"): <remus:protect xmlns:remus="..." backup=.../>.
inline constexpr char kRemusXmlNamespace[] = "https://remus.dev/xmlns/1";

// The primary's domain XML made fit for a restore on this host (pure; the
// XML unchanged, byte for byte, when none of this applies):
//   - <emulator> becomes emulator, when that is not empty;
//   - the files of file-backed character devices (<serial>, <console>,
//     <parallel>, <channel> of type 'file', and their <log file=>) move into
//     run_dir: the first distinct path is serial.log (the guest console, as
//     in the QMP-mode restore), the others chardev-N.log;
//   - every <seclabel> (the domain's and its devices') is removed: the
//     backup's libvirt applies its own security driver's defaults, so a peer
//     cannot turn confinement off here (<seclabel type='none'>);
//   - remus's <protect> metadata is removed: the restored guest is not
//     protected, and a libvirt hook on this host must not protect it back to
//     the host it came from.
//   - each <disk> whose <target dev=> is a key of disk_images (its mirrored
//     copy on this host) becomes a raw file disk on that image: type='file',
//     <source file='IMAGE'/> (the primary's source goes, with its
//     <backingStore> chain), <driver name='qemu' type='raw' .../> (the
//     driver's other attributes, e.g. cache, stay).
// InvalidArgument as above; NotFound when a disk_images key is no <disk>'s
// target, or emulator is given and the XML has no <emulator>.
StatusOr<std::string> RewriteDomainXmlForRestore(std::string_view xml, const std::string& run_dir,
                                                 const std::string& emulator,
                                                 const std::map<std::string, std::string>& disk_images = {});

// The <disk> elements of a domain XML: device alias (<alias name=>, present
// in the XML of a running domain) -> <target dev=>. Disks without an alias
// or a target are left out; an XML that cannot be parsed has none (logged).
std::map<std::string, std::string> LibvirtDiskTargets(std::string_view xml);

struct LibvirtRestoreOptions {
  std::string uri = kDefaultLibvirtUri;
  // Where the FIFO is made (created 0700 if missing); it must be a path
  // libvirtd can open (same host, same mount namespace as libvirtd).
  std::string work_dir = "/run/remus";
  // Leave the guest paused after loading (VIR_DOMAIN_SAVE_PAUSED).
  bool start_paused = false;
  // Non-empty: write a regular save image file here first, then restore from
  // it (the stream is staged on disk; for comparison and debugging).
  std::string image_path;
  std::string pid_dir = kDefaultLibvirtPidDir;
};

struct LibvirtRestoreResult {
  std::string domain;
  std::string uuid;
  int qemu_pid = -1;     // from <pid_dir>/<domain>.pid, -1 if unreadable
  int64_t restore_ms = 0;  // virDomainRestoreFlags: QEMU start + stream load + resume
  int64_t stage_ms = 0;    // writing image_path (0 when streamed)
};

// Starts the domain described by xml on libvirt at opts.uri from the stream
// write_stream produces, and returns once libvirt reports it running (paused
// with start_paused). The domain becomes a transient domain of that libvirtd
// (or takes over an inactive persistent definition with the same name and
// UUID).
// Unavailable if libvirt cannot be reached; FailedPrecondition if a domain of
// that name is already running there (restoring would make a second copy) or
// libvirt/QEMU refuse the image or stream (libvirt's message, with the
// writer's error if it failed first).
// virDomainDestroy of domain `name` at `uri`: how a fenced copy under
// libvirt is ended (arbiter/lease.h), so libvirt records why it stopped.
// OK when the domain is not running (or does not exist).
Status DestroyLibvirtDomain(const std::string& uri, const std::string& name);

StatusOr<LibvirtRestoreResult> RestoreDomain(const LibvirtRestoreOptions& opts, const std::string& xml,
                                             const StreamWriter& write_stream);

}  // namespace remus
