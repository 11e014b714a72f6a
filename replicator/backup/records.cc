#include "replicator/backup/records.h"

#include <nlohmann/json.hpp>

#include "replicator/libvirt/restore.h"

namespace remus {

using nlohmann::json;

namespace {

// Field checks: absent is fine unless required; present must have the type.
bool StringOrAbsent(const json& o, const char* k) { return !o.contains(k) || o[k].is_string(); }
bool IntOrAbsent(const json& o, const char* k) { return !o.contains(k) || o[k].is_number_integer(); }

}  // namespace

StatusOr<wire::ConfigMsg> ParseConfigPayload(std::string_view payload, const std::string& domain) {
  ASSIGN_OR_RETURN(wire::ConfigMsg c, wire::DecodeConfig(payload));
  if (c.libvirt) {
    if (c.libvirt->xml.empty()) return InvalidArgument("CONFIG: libvirt carries no domain XML");
    auto xml_name = DomainXmlName(c.libvirt->xml);
    if (!xml_name.ok() || *xml_name != domain) return InvalidArgument("CONFIG: the libvirt XML is not domain " + domain + "'s");
  } else if (c.argv.empty()) {
    return InvalidArgument("CONFIG carries no QEMU argv");
  }
  return c;
}

StatusOr<wire::ConfigMsg> ParseConfigFile(std::string_view text, const std::string& domain) {
  auto c = ParseConfigPayload(text, domain);
  if (!c.ok()) return DataLoss(c.status().message());
  return c;
}

StatusOr<wire::SyncBeginMsg> ParseSyncBegin(std::string_view payload) { return wire::DecodeSyncBegin(payload); }

std::string ParseReason(std::string_view payload) {
  auto r = wire::DecodeReason(payload);
  return r.ok() ? r->reason : std::string();
}

StatusOr<std::vector<ReplicaDisk>> ParseDisksFile(std::string_view text, const std::string& path) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_array()) return DataLoss(path + " is not a JSON list");
  std::vector<ReplicaDisk> disks;
  for (const auto& d : j) {
    auto spec = wire::DiskSpecFromJson(d);
    if (!spec.ok()) return DataLoss(path + ": " + spec.status().message());
    disks.push_back({spec->id, spec->size});
  }
  return disks;
}

StatusOr<PromotionMarker> ParsePromotionMarker(std::string_view text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return DataLoss("not a JSON object");
  if (!IntOrAbsent(j, "pid") || !IntOrAbsent(j, "epoch") || !IntOrAbsent(j, "token") || !StringOrAbsent(j, "qmp_socket") ||
      !StringOrAbsent(j, "via"))
    return DataLoss("a field has the wrong type");
  PromotionMarker m;
  m.pid = static_cast<int>(j.value("pid", int64_t{-1}));
  m.epoch = j.value("epoch", int64_t{-1});
  m.token = j.value("token", int64_t{0});
  m.qmp_socket = j.value("qmp_socket", "");
  m.via_libvirt = j.value("via", "") == "libvirt";
  if (j.contains("libvirt")) {
    const json& lv = j["libvirt"];
    if (!lv.is_object() || !StringOrAbsent(lv, "uri") || !StringOrAbsent(lv, "domain"))
      return DataLoss("libvirt is not an object of strings");
    m.via_libvirt = true;
    m.libvirt_uri = lv.value("uri", "");
    m.libvirt_domain = lv.value("domain", "");
  }
  return m;
}

}  // namespace remus
