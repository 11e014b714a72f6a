// The backup's policy on what a primary may make it run: a CONFIG's QEMU
// argv (QMP mode, replicator/qemu/argv_policy.h) or its libvirt domain XML
// (libvirt mode, replicator/libvirt/xml_policy.h), checked against this
// backup's PeerPolicy. Applied twice: when CONFIG arrives, before anything
// is written or started (a refusal goes to the primary as ERROR
// PERMISSION_DENIED and the domain stays unprotected), and before a
// promotion starts QEMU or defines the domain, on the config.json read back
// from the state dir.
//
// In libvirt mode the argv in CONFIG is informational: the backup restores
// from the XML and never runs that argv, so only the XML is checked.
//
// Thread-safety: a free function over values.
#pragma once

#include "common/status.h"
#include "replicator/link/messages.h"
#include "replicator/qemu/argv_policy.h"

namespace remus {

// own_qemu: the backup has a --qemu (argv[0] / <emulator> are replaced).
// PermissionDenied naming what is refused and why; InvalidArgument for XML
// that does not parse.
Status CheckPeerConfig(const wire::ConfigMsg& config, const PeerPolicy& policy, bool own_qemu);

}  // namespace remus
