// What the backup reads from the primary (CONFIG, SYNC_BEGIN, the reason of
// FAILOVER and GOODBYE) and from its own state dir (config.json, disks.json,
// promoting.json / promoted.json), decoded into checked values. The link's
// messages go through the typed codecs (replicator/link/messages.h); this
// adds what only the backup checks. Never throws: malformed input, wrong JSON
// types included, is an error naming the field: InvalidArgument or DataLoss
// for peer input (as the codecs say), DataLoss for a file.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "diskmirror/disk_replica.h"
#include "replicator/link/messages.h"

namespace remus {

// CONFIG, decoded, and then: argv non-empty unless libvirt XML is given, and
// that XML names `domain`.
StatusOr<wire::ConfigMsg> ParseConfigPayload(std::string_view payload, const std::string& domain);
// The same for a config.json read back from a store (DataLoss).
StatusOr<wire::ConfigMsg> ParseConfigFile(std::string_view text, const std::string& domain);

StatusOr<wire::SyncBeginMsg> ParseSyncBegin(std::string_view payload);

// The reason of FAILOVER and GOODBYE; empty when absent. A malformed one is
// ignored (the message still counts): the reason is informational.
std::string ParseReason(std::string_view payload);

StatusOr<std::vector<ReplicaDisk>> ParseDisksFile(std::string_view text, const std::string& path);

// promoting.json / promoted.json.
struct PromotionMarker {
  int pid = -1;
  int64_t epoch = -1;
  std::string qmp_socket;
  bool via_libvirt = false;
  std::string libvirt_uri;
  std::string libvirt_domain;
  int64_t token = 0;  // the fencing token the promotion won (0: no arbiter)
};
StatusOr<PromotionMarker> ParsePromotionMarker(std::string_view text);

}  // namespace remus
