#include "remusd/status_rows.h"

#include <map>
#include <string>
#include <vector>

namespace remus {

using nlohmann::json;

int StatusRowRank(const json& row) {
  const std::string role = row.value("role", "");
  const std::string state = row.value("state", "");
  // Backup rows say "backup", or "primary (promoted)" while their guest runs.
  const bool backup_side = role != "primary";
  if (!backup_side)
    return state == "starting" || state == "syncing" || state == "protected" || state == "switching" ? 0 : 2;
  if (state == "ended" || state == "unprotected" || state == "failed") return 3;
  return 1;
}

json OneRowPerDomain(const json& rows) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<const json*>> by_domain;
  for (const json& r : rows) {
    const std::string d = r.value("domain", "");
    if (!by_domain.count(d)) order.push_back(d);
    by_domain[d].push_back(&r);
  }
  json out = json::array();
  for (const std::string& d : order) {
    const std::vector<const json*>& rs = by_domain[d];
    size_t best = 0;
    for (size_t i = 1; i < rs.size(); i++)
      if (StatusRowRank(*rs[i]) < StatusRowRank(*rs[best])) best = i;
    json row = *rs[best];
    if (rs.size() > 1) {
      json others = json::array();
      for (size_t i = 0; i < rs.size(); i++)
        if (i != best)
          others.push_back({{"role", rs[i]->value("role", "")},
                            {"state", rs[i]->value("state", "")},
                            {"error", rs[i]->value("error", "")}});
      row["other_roles"] = others;
    }
    out.push_back(std::move(row));
  }
  return out;
}

}  // namespace remus
