// One status row per guest. A host can hold two records of one domain: its
// primary side (it protects or protected the guest) and its backup side (it
// backs the guest up, or promoted it). After a failover and a re-protection
// both exist on each host; `remusctl status` shows the one that says where the
// guest is now, and lists the other under "other_roles".
//
// Pure functions on status JSON; unit-tested in status_rows_test.cc.
#pragma once

#include <nlohmann/json.hpp>

namespace remus {

// How current a row is: lower wins. A protection running from here (0), then
// the backup side while it holds or backs up the guest (1: a session, a
// promotion, a promoted guest that runs here), then the primary side's end
// (2: failed over, unprotected, stopped), then the backup side's end (3:
// ended, unprotected, failed).
int StatusRowRank(const nlohmann::json& row);

// Rows of any number of domains, primary rows and backup rows mixed, in
// their input order. Returns one row per domain (in order of first
// appearance): the lowest-ranked one (the first on a tie), with the others
// as "other_roles": [{"role","state","error"}].
nlohmann::json OneRowPerDomain(const nlohmann::json& rows);

}  // namespace remus
