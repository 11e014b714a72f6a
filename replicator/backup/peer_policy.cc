#include "replicator/backup/peer_policy.h"

#include <set>

#include "replicator/libvirt/xml_policy.h"

namespace remus {

Status CheckPeerConfig(const wire::ConfigMsg& config, const PeerPolicy& policy, bool own_qemu) {
  // The disks the backup mirrors are the ones it points at its own images:
  // -drive ids in QMP mode, <target dev=> in libvirt mode.
  std::set<std::string> mirrored;
  for (const auto& d : config.disks) mirrored.insert(d.id);
  if (config.libvirt) return CheckDomainXml(config.libvirt->xml, mirrored, policy, own_qemu);
  return CheckQemuArgv(config.argv, mirrored, policy, own_qemu);
}

}  // namespace remus
