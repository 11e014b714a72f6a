// What the backup reads from the primary (CONFIG, SYNC_BEGIN, the reason of
// FAILOVER and GOODBYE) and from its own state dir (config.json, disks.json,
// promoting.json / promoted.json), decoded into checked values. Never throws:
// malformed input, wrong JSON types included, is InvalidArgument (peer input)
// or DataLoss (a file), naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "diskmirror/disk_replica.h"
#include "replicator/qemu/qemu_stream.h"

namespace remus {

// CONFIG, checked for what the backup relies on: an object; argv a non-empty
// list of strings unless libvirt XML (naming `domain`) is given; disks a list
// of {id (a usable name), size, node?, format?, file?}; the heartbeat fields
// integers. Returns the JSON as received (it is kept as the store's config.json).
StatusOr<nlohmann::json> ParseConfigPayload(std::string_view payload, const std::string& domain);
// The same check for a config.json read back from the state dir (DataLoss).
StatusOr<nlohmann::json> ParseConfigFile(std::string_view text, const std::string& domain);

struct SyncBeginRecord {
  std::vector<qemu::RamBlock> blocks;
  std::string configuration;  // raw bytes of QEMU's CONFIGURATION section
  uint64_t total_bytes = 0;
};
StatusOr<SyncBeginRecord> ParseSyncBegin(std::string_view payload);

// The optional {"reason": "..."} of FAILOVER and GOODBYE; empty when absent.
StatusOr<std::string> ParseReason(std::string_view payload);

StatusOr<std::vector<ReplicaDisk>> ParseDisksFile(std::string_view text, const std::string& path);

// promoting.json / promoted.json.
struct PromotionMarker {
  int pid = -1;
  int64_t epoch = -1;
  std::string qmp_socket;
  bool via_libvirt = false;
  std::string libvirt_uri;
  std::string libvirt_domain;
};
StatusOr<PromotionMarker> ParsePromotionMarker(std::string_view text);

}  // namespace remus
