// What a domain's state dir holds after a restart of remusd, read without
// side effects on the domain: a promotion that ran or was under way (and
// whether its guest lives), or the committed checkpoint kept for `remusctl
// failover`. BackupDomain::Recover turns the result into its state.
//
// Never throws: a corrupt file is DataLoss naming it and the fix.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "replicator/backup/page_store.h"
#include "replicator/backup/records.h"
#include "replicator/link/messages.h"

namespace remus {

struct FoundPromotion {
  PromotionMarker marker;
  bool finished = false;  // promoted.json (else promoting.json: remusd died while promoting)
  int pid = -1;           // the promoted QEMU, from the marker or its pidfile
  bool alive = false;     // that pid runs, and is the guest started for this domain
};

// NotFound when neither promoted.json nor promoting.json exists in dir.
// libvirt_pid_dir: where libvirt keeps <domain>.pid.
StatusOr<FoundPromotion> FindPromotion(const std::string& dir, const std::string& domain,
                                       const std::string& libvirt_pid_dir);

struct KeptCheckpoint {
  std::unique_ptr<PageStore> store;  // has_committed()
  std::string store_name;            // "store-<n>"
  wire::ConfigMsg config;            // of that store's session
  std::string configuration;         // QEMU's CONFIGURATION section
};

// The store `current` names. NotFound when there is no `current` (then
// `retired`, when present, says why: *no_checkpoint_reason).
StatusOr<KeptCheckpoint> LoadKeptCheckpoint(const std::string& dir, const std::string& domain,
                                            std::string* no_checkpoint_reason);

}  // namespace remus
