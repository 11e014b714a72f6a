// Typed codecs for the link's JSON messages: CONFIG, SYNC_BEGIN, FAILOVER and
// GOODBYE, and the delta resync's RESYNC_OFFER (JSON), RESYNC_HASHES and KEEP
// (binary) (docs/formats/replication-link.md lists every field, its type and
// its bounds). The primary encodes with these; the backup decodes with them,
// so a peer's payload is checked in exactly one place.
//
// Contract:
//  - Encoders produce the JSON the primary has always sent (same field names
//    and value types; nlohmann sorts object keys, so the bytes are stable).
//    They never throw: a string that is not valid UTF-8 (JSON cannot carry
//    it) has its bad bytes replaced by U+FFFD.
//  - Decoders never throw and never trust the peer. A payload that is not
//    JSON is DataLoss; JSON of the wrong shape, a field of the wrong type or
//    out of its bounds is InvalidArgument, with a message naming the message
//    and the field ("CONFIG: heartbeat_timeout_ms is not an integer").
//  - An absent field takes the struct's default (older or minimal peers);
//    a present field must have the documented type (null is a wrong type).
//    Unknown fields are ignored, so fields can be added.
//  - Decode(Encode(m)) == m for every m that satisfies the bounds below.
//
// Thread-safety: pure functions on value types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "common/status.h"
#include "replicator/link/page_hash.h"
#include "replicator/qemu/qemu_stream.h"

namespace remus::wire {

// Bounds the decoders enforce.
inline constexpr size_t kMaxConfigArgs = 4096;         // CONFIG argv elements
inline constexpr size_t kMaxConfigDisks = 64;          // CONFIG disks
inline constexpr int64_t kMaxIntervalMs = 600000;      // interval_ms, heartbeat_*_ms
inline constexpr size_t kMaxLibvirtXml = 16u << 20;    // CONFIG libvirt.xml bytes
inline constexpr size_t kMaxSyncBlocks = 1024;         // SYNC_BEGIN blocks
inline constexpr size_t kMaxBlockIdLen = 255;          // SYNC_BEGIN blocks[].id bytes

// One mirrored disk as CONFIG carries it (and as the backup's disks.json
// keeps it): {"id","node","format","file","size"}. `id` must be a usable
// name (ValidName); `size` is the virtual size in bytes.
struct DiskSpec {
  std::string id;
  std::string node;
  std::string format;
  std::string file;
  uint64_t size = 0;
  bool operator==(const DiskSpec&) const = default;
};

// The one rule for a domain name and a disk id, both of which name files
// and directories on the backup: letters, digits, '.', '-', '_'; 1..64
// bytes; not starting with '.' or '-'. (remusd refuses to protect a domain
// named otherwise; a backup refuses such a name in HELLO, before AUTH_OK.)
bool ValidName(std::string_view id);

// The JSON object form of one disk, for callers that embed it elsewhere.
nlohmann::json DiskSpecToJson(const DiskSpec& d);
// InvalidArgument naming the field ("disk: size is not an unsigned integer")
// for a wrong shape; id and size are required, node/format/file optional.
StatusOr<DiskSpec> DiskSpecFromJson(const nlohmann::json& j);

// CONFIG's "libvirt" object: the migratable domain XML the backup restores
// through its own libvirt, the domain's name and the primary's libvirt URI.
struct LibvirtConfig {
  std::string xml;
  std::string name;
  std::string uri;
  bool operator==(const LibvirtConfig&) const = default;
};

// CONFIG (primary -> backup, once after AUTH_OK).
struct ConfigMsg {
  std::string domain;
  std::vector<std::string> argv;  // non-empty unless libvirt is set; <= kMaxConfigArgs
  std::string qemu_version, qemu_package, accelerator;
  int interval_ms = 0;            // 0..kMaxIntervalMs
  std::vector<DiskSpec> disks;    // <= kMaxConfigDisks, in DISK-record index order
  // Both 0 (absent), or 0 < interval < timeout <= kMaxIntervalMs.
  int64_t heartbeat_interval_ms = 0, heartbeat_timeout_ms = 0;
  std::optional<LibvirtConfig> libvirt;  // libvirt domains only
  // The protection session's id (arbitration: the backup may promote this
  // session's checkpoints only while etcd says the session is current), and
  // the primary's arbiter ("etcd", "none"). Empty from older primaries.
  std::string session;  // <= 64 of [0-9A-Za-z_-]
  std::string arbiter;  // "", "none" or "etcd"
  // After a failover: where the backup protects the promoted guest again on
  // its own ("host:port" of a remusd --listen, <= 255 bytes; empty: nowhere),
  // and the protect options it reuses (netbuf mode "", "plug", "nfqueue" or
  // "none"; LZ4; the disks "all", "none" or ids).
  std::string reprotect_to;
  // The automatic interval (--interval auto) a re-protection reuses:
  // interval_mode "auto" with its budget and bounds (1..kMaxIntervalMs);
  // "" and zeros: a fixed interval.
  std::string interval_mode;
  int64_t latency_budget_ms = 0, interval_min_ms = 0, interval_max_ms = 0;
  std::string netbuf;
  bool compress = false;
  // "xor": PAGES records may be XOR records (page_batch.h kPageFlagXor),
  // compression "xor-lz4". Empty: never. A backup that does not know the
  // key refuses the first XOR record (unknown flag bits).
  std::string page_delta;
  std::string disks_option;  // <= 1024 of [A-Za-z0-9_.,-]
  // The primary takes a RESYNC_OFFER: the backup answers CONFIG with one.
  bool delta_resync = false;
  // How the backup keeps this domain's page store (residency.h): "hot"
  // (locked in memory; the backup admits it only if it has the memory) or
  // "paged". Empty from older primaries: hot.
  std::string residency;
  bool operator==(const ConfigMsg&) const = default;
};
std::string EncodeConfig(const ConfigMsg& m);
// The protect option --compress for a configuration: "none", "lz4" or
// "xor-lz4" (compress with page_delta "xor").
std::string CompressionName(bool compress, bool xor_delta);
StatusOr<ConfigMsg> DecodeConfig(std::string_view payload);

// SYNC_BEGIN (primary -> backup): an initial full copy starts.
struct SyncBeginMsg {
  std::vector<qemu::RamBlock> blocks;  // QEMU's RAM block order; <= kMaxSyncBlocks
  std::string configuration;           // QEMU's CONFIGURATION section, raw bytes (hex on the wire)
  uint64_t total_bytes = 0;            // sum of the blocks' used_length
  bool operator==(const SyncBeginMsg&) const = default;
};
std::string EncodeSyncBegin(const SyncBeginMsg& m);
StatusOr<SyncBeginMsg> DecodeSyncBegin(std::string_view payload);

// FAILOVER and GOODBYE: {"reason":"..."}.
struct ReasonMsg {
  std::string reason;
  bool operator==(const ReasonMsg&) const = default;
};
std::string EncodeReason(const ReasonMsg& m);
// An empty payload is an empty reason (older peers sent none).
StatusOr<ReasonMsg> DecodeReason(std::string_view payload);

// SWITCHOVER, primary -> backup: {"reason","reprotect_to","interval_ms","netbuf"}.
// reprotect_to: where the old primary listens as a backup ("host:port"):
// the backup protects the guest it promotes back to it; "" for none. An
// empty payload is all defaults.
struct SwitchoverMsg {
  std::string reason;
  std::string reprotect_to;
  int64_t interval_ms = 0;  // for the reverse protection; 0: the backup's default
  std::string netbuf;       // likewise ("" default, plug, nfqueue, none)
  bool operator==(const SwitchoverMsg&) const = default;
};
std::string EncodeSwitchover(const SwitchoverMsg& m);
StatusOr<SwitchoverMsg> DecodeSwitchover(std::string_view payload);
// ---- delta resync (docs/formats/replication-link.md, "Delta resync") ----

// Sum of an offer's used_length (the page store's own limit).
inline constexpr uint64_t kMaxResyncBytes = 16ull << 40;
inline constexpr size_t kResyncHashesHeader = 12;  // be32 block, be64 first page
inline constexpr size_t kKeepRunSize = 16;         // be32 block, be64 first page, be32 count

// RESYNC_OFFER (backup -> primary, after CONFIG with delta_resync): the
// layout of the image the backup offers. No blocks: nothing is offered and
// `reason` says why (the copy is full).
struct ResyncOfferMsg {
  std::vector<qemu::RamBlock> blocks;  // <= kMaxSyncBlocks; ids unique, 1..255 bytes;
                                       // used_length a non-zero multiple of kPageSize
  uint64_t epoch = 0;                  // the offered image's committed epoch (informational)
  std::string reason;                  // why nothing is offered
  bool operator==(const ResyncOfferMsg&) const = default;
};
std::string EncodeResyncOffer(const ResyncOfferMsg& m);
StatusOr<ResyncOfferMsg> DecodeResyncOffer(std::string_view payload);

// RESYNC_HASHES (backup -> primary): the hashes of `count` consecutive pages
// of one offered block, from page index first_page. Binary: be32 block,
// be64 first_page, then count x 16 bytes (count >= 1).
struct ResyncHashesMsg {
  uint32_t block = 0;       // index into the offer's blocks
  uint64_t first_page = 0;  // page index (offset / kPageSize)
  std::vector<PageHash> hashes;
  bool operator==(const ResyncHashesMsg&) const = default;
};
std::string EncodeResyncHashes(uint32_t block, uint64_t first_page, const PageHash* hashes, size_t count);
// DataLoss for a payload shorter than the header plus one hash or whose
// hashes are not whole. Ranges against the offer are the receiver's check
// (ResyncOfferAssembler).
StatusOr<ResyncHashesMsg> DecodeResyncHashes(std::string_view payload);

// KEEP (primary -> backup, epoch 0): runs of pages of the initial copy whose
// content is the offered image's page at the same block and offset. Binary:
// a sequence of (be32 block, be64 first_page, be32 count >= 1); `block`
// indexes SYNC_BEGIN's blocks.
struct KeepRun {
  uint32_t block = 0;
  uint64_t first_page = 0;
  uint32_t count = 0;
  bool operator==(const KeepRun&) const = default;
};
void AppendKeepRun(std::string* out, const KeepRun& r);
// DataLoss for an empty payload, one that is not whole runs, a run of 0
// pages or one whose end overflows. Ranges are the receiver's check.
StatusOr<std::vector<KeepRun>> DecodeKeep(std::string_view payload);

}  // namespace remus::wire
