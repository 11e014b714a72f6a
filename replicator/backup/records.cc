#include "replicator/backup/records.h"

#include "common/hex.h"
#include "replicator/backup/domain.h"
#include "replicator/libvirt/restore.h"

namespace remus {

using nlohmann::json;

namespace {

StatusOr<json> ParseObject(std::string_view text, const std::string& what) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(what + " is not JSON");
  if (!j.is_object()) return InvalidArgument(what + " is not a JSON object");
  return j;
}

// Field checks: absent is fine unless required; present must have the type.
bool IsString(const json& o, const char* k) { return o.contains(k) && o[k].is_string(); }
bool StringOrAbsent(const json& o, const char* k) { return !o.contains(k) || o[k].is_string(); }
bool IntOrAbsent(const json& o, const char* k) { return !o.contains(k) || o[k].is_number_integer(); }
bool UintOrAbsent(const json& o, const char* k) { return !o.contains(k) || o[k].is_number_unsigned(); }

StatusOr<json> CheckConfig(json c, const std::string& domain) {
  if (!StringOrAbsent(c, "domain")) return InvalidArgument("CONFIG: domain is not a string");
  if (c.contains("libvirt")) {
    const json& lv = c["libvirt"];
    if (!lv.is_object() || !IsString(lv, "xml")) return InvalidArgument("CONFIG: libvirt carries no domain XML");
    if (!StringOrAbsent(lv, "name") || !StringOrAbsent(lv, "uri"))
      return InvalidArgument("CONFIG: libvirt name and uri must be strings");
    auto xml_name = DomainXmlName(lv["xml"].get<std::string>());
    if (!xml_name.ok() || *xml_name != domain) return InvalidArgument("CONFIG: the libvirt XML is not domain " + domain + "'s");
  } else if (!c.contains("argv") || !c["argv"].is_array() || c["argv"].empty()) {
    return InvalidArgument("CONFIG carries no QEMU argv");
  }
  if (c.contains("argv")) {
    if (!c["argv"].is_array()) return InvalidArgument("CONFIG: argv is not a list");
    for (const auto& a : c["argv"])
      if (!a.is_string()) return InvalidArgument("CONFIG: argv holds something other than strings");
  }
  for (const char* k : {"qemu_version", "qemu_package", "accelerator"})
    if (!StringOrAbsent(c, k)) return InvalidArgument(std::string("CONFIG: ") + k + " is not a string");
  for (const char* k : {"interval_ms", "heartbeat_interval_ms", "heartbeat_timeout_ms"})
    if (!IntOrAbsent(c, k)) return InvalidArgument(std::string("CONFIG: ") + k + " is not an integer");
  if (c.contains("disks")) {
    if (!c["disks"].is_array()) return InvalidArgument("CONFIG: disks is not a list");
    for (const auto& d : c["disks"]) {
      if (!d.is_object() || !IsString(d, "id") || !d.contains("size") || !d["size"].is_number_unsigned())
        return InvalidArgument("CONFIG: a disk entry needs a string id and a size");
      if (!StringOrAbsent(d, "node") || !StringOrAbsent(d, "format") || !StringOrAbsent(d, "file"))
        return InvalidArgument("CONFIG: a disk's node, format and file must be strings");
      std::string id = d["id"].get<std::string>();
      if (!ValidDomainName(id)) return InvalidArgument("CONFIG: disk id '" + id + "' is not a usable name");
    }
  }
  return c;
}

}  // namespace

StatusOr<json> ParseConfigPayload(std::string_view payload, const std::string& domain) {
  try {
    ASSIGN_OR_RETURN(json c, ParseObject(payload, "CONFIG"));
    return CheckConfig(std::move(c), domain);
  } catch (const json::exception& e) {  // defence in depth: the checks above should leave none
    return InvalidArgument(std::string("CONFIG: ") + e.what());
  }
}

StatusOr<json> ParseConfigFile(std::string_view text, const std::string& domain) {
  auto c = ParseConfigPayload(text, domain);
  if (!c.ok()) return DataLoss(c.status().message());
  return c;
}

StatusOr<SyncBeginRecord> ParseSyncBegin(std::string_view payload) {
  try {
    ASSIGN_OR_RETURN(json b, ParseObject(payload, "SYNC_BEGIN"));
    SyncBeginRecord r;
    if (!UintOrAbsent(b, "total_bytes")) return InvalidArgument("SYNC_BEGIN: total_bytes is not a byte count");
    r.total_bytes = b.value("total_bytes", uint64_t{0});
    if (b.contains("blocks") && !b["blocks"].is_array()) return InvalidArgument("SYNC_BEGIN: blocks is not a list");
    for (const auto& x : b.value("blocks", json::array())) {
      if (!x.is_object() || !IsString(x, "id") || !x.contains("used_length") || !x["used_length"].is_number_unsigned())
        return InvalidArgument("SYNC_BEGIN: a RAM block needs a string id and a used_length");
      r.blocks.push_back({x["id"].get<std::string>(), x["used_length"].get<uint64_t>()});
    }
    if (!StringOrAbsent(b, "configuration")) return InvalidArgument("SYNC_BEGIN: configuration is not a string");
    auto bytes = HexDecode(b.value("configuration", ""));
    if (!bytes) return DataLoss("SYNC_BEGIN: the configuration section is not hex");
    r.configuration = std::move(*bytes);
    return r;
  } catch (const json::exception& e) {
    return InvalidArgument(std::string("SYNC_BEGIN: ") + e.what());
  }
}

StatusOr<std::string> ParseReason(std::string_view payload) {
  if (payload.empty()) return std::string();
  json j = json::parse(payload, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return std::string();  // informational: ignored when malformed
  if (j.contains("reason") && j["reason"].is_string()) return j["reason"].get<std::string>();
  return std::string();
}

StatusOr<std::vector<ReplicaDisk>> ParseDisksFile(std::string_view text, const std::string& path) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_array()) return DataLoss(path + " is not a JSON list");
  std::vector<ReplicaDisk> disks;
  for (const auto& d : j) {
    if (!d.is_object() || !IsString(d, "id") || !d.contains("size") || !d["size"].is_number_unsigned())
      return DataLoss(path + ": a disk entry needs a string id and a size");
    disks.push_back({d["id"].get<std::string>(), d["size"].get<uint64_t>()});
  }
  return disks;
}

StatusOr<PromotionMarker> ParsePromotionMarker(std::string_view text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return DataLoss("not a JSON object");
  if (!IntOrAbsent(j, "pid") || !IntOrAbsent(j, "epoch") || !StringOrAbsent(j, "qmp_socket") ||
      !StringOrAbsent(j, "via"))
    return DataLoss("a field has the wrong type");
  PromotionMarker m;
  m.pid = static_cast<int>(j.value("pid", int64_t{-1}));
  m.epoch = j.value("epoch", int64_t{-1});
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
