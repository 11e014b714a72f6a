// What a remusd that died leaves of the domains it owned, and what a remusd
// that starts does about them, before it removes any output-buffering rule
// (docs/architecture.md, "Arbitration", restart).
//
// While a primary owns a domain it keeps STATE/run/owned/<domain>.json:
// the session, and the QEMU it fences (pid and that process's start time, so
// a pid reused by another process is never signalled). On a clean end the
// record goes. A record found at start means remusd died while owning:
//   - another host owns the domain now, or the session was promoted there:
//     our QEMU is killed (it may run, output held by the fail-closed rules,
//     and must never release or run on);
//   - the key is still ours or free and the session is still ours: the
//     session is retired in etcd (no backup can promote it), and the guest
//     runs on unprotected, as after any remusd restart;
//   - etcd cannot say: the record stays, and the caller keeps the netbuf
//     rules (output stays held) and reports it.
//
// Thread-safety: functions only; no shared state.
#pragma once

#include <string>
#include <vector>

#include "arbiter/etcd.h"
#include "arbiter/lease.h"
#include "common/status.h"

namespace remus {

struct OwnershipRecord {
  std::string domain, session;
  int pid = -1;
  uint64_t pid_start = 0;  // /proc/PID/stat field 22 (0: unknown)
};

// The start time of `pid` (/proc/PID/stat field 22), 0 when it is gone.
uint64_t ProcessStartTime(int pid);

Status WriteOwnershipRecord(const std::string& run_dir, const OwnershipRecord& r);
void RemoveOwnershipRecord(const std::string& run_dir, const std::string& domain);

struct LeftoverOutcome {
  std::string domain;
  int pid = -1;  // the QEMU the record named
  // "killed" (another host owns it), "retired" (ours: the guest runs on
  // unprotected), "gone" (its QEMU had exited already), "undecided"
  // (etcd unreachable: the record stays).
  std::string action;
  std::string detail;
};

// Resolves every record under run_dir/owned. `undecided` is set when any
// record could not be resolved (etcd unreachable): output must stay held.
std::vector<LeftoverOutcome> ResolveLeftovers(const std::string& run_dir, const ArbiterOptions& opts, etcd::Kv* kv,
                                              bool* undecided);

}  // namespace remus
