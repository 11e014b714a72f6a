#include "replicator/link/messages.h"

#include <set>

#include <nlohmann/json.hpp>

#include "common/hex.h"
#include "common/io.h"
#include "replicator/link/page_batch.h"

namespace remus::wire {

using nlohmann::json;

namespace {

// Every decoder below only reads a json value after checking its type, so no
// nlohmann accessor here can throw.

std::string Dump(const json& j) {
  // replace: JSON cannot carry invalid UTF-8, and the default handler throws.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// DataLoss if the payload is not JSON, InvalidArgument if it is not an object.
StatusOr<json> ParseObject(std::string_view payload, std::string_view msg) {
  json j = json::parse(payload.begin(), payload.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return DataLoss(std::string(msg) + " is not JSON (" + std::to_string(payload.size()) + " bytes)");
  if (!j.is_object()) return InvalidArgument(std::string(msg) + " is not a JSON object");
  return j;
}

// Where a field sits, for error messages: "CONFIG" + "disks[2]." + "id".
struct Where {
  std::string_view msg;   // "CONFIG"
  std::string path = "";  // "", "libvirt.", "disks[2]."
  Status Error(std::string_view field, std::string_view what) const {
    return InvalidArgument(std::string(msg) + ": " + path + std::string(field) + " " + std::string(what));
  }
  Status Error(std::string_view what) const {  // about the object itself
    std::string p = path.empty() ? std::string() : path.substr(0, path.size() - 1);
    return InvalidArgument(std::string(msg) + (p.empty() ? "" : ": " + p) + " " + std::string(what));
  }
};

// The field, or nullptr if absent.
const json* Find(const json& obj, const char* field) {
  auto it = obj.find(field);
  return it == obj.end() ? nullptr : &*it;
}

Status Require(const json& obj, const Where& w, const char* field) {
  return Find(obj, field) ? OkStatus() : w.Error(field, "is missing");
}

Status GetString(const json& obj, const Where& w, const char* field, std::string* out, size_t max_len = SIZE_MAX) {
  const json* v = Find(obj, field);
  if (!v) return OkStatus();
  if (!v->is_string()) return w.Error(field, "is not a string");
  const auto& s = v->get_ref<const std::string&>();
  if (s.size() > max_len)
    return w.Error(field, "is " + std::to_string(s.size()) + " bytes, more than " + std::to_string(max_len));
  *out = s;
  return OkStatus();
}

Status GetUint(const json& obj, const Where& w, const char* field, uint64_t* out) {
  const json* v = Find(obj, field);
  if (!v) return OkStatus();
  if (!v->is_number_unsigned()) return w.Error(field, "is not an unsigned integer");
  *out = v->get<uint64_t>();
  return OkStatus();
}

// An integer within [lo, hi]; REQUIRES 0 <= lo <= hi.
Status GetInt(const json& obj, const Where& w, const char* field, int64_t lo, int64_t hi, int64_t* out) {
  const json* v = Find(obj, field);
  if (!v) return OkStatus();
  if (!v->is_number_integer()) return w.Error(field, "is not an integer");
  bool in_range;
  int64_t x = 0;
  if (v->is_number_unsigned()) {
    uint64_t u = v->get<uint64_t>();
    in_range = u >= static_cast<uint64_t>(lo) && u <= static_cast<uint64_t>(hi);
    if (in_range) x = static_cast<int64_t>(u);
  } else {
    x = v->get<int64_t>();
    in_range = x >= lo && x <= hi;
  }
  if (!in_range) return w.Error(field, "is out of range (" + std::to_string(lo) + ".." + std::to_string(hi) + ")");
  *out = x;
  return OkStatus();
}

StatusOr<DiskSpec> DecodeDisk(const json& j, const Where& w) {
  if (!j.is_object()) return w.Error("is not an object");
  DiskSpec d;
  RETURN_IF_ERROR(Require(j, w, "id"));
  RETURN_IF_ERROR(GetString(j, w, "id", &d.id));
  if (!ValidName(d.id))
    return w.Error("id", "'" + d.id.substr(0, 64) +
                             "' is not a usable name (letters, digits, '.', '-', '_'; 1..64 bytes; "
                             "not starting with '.' or '-')");
  RETURN_IF_ERROR(GetString(j, w, "node", &d.node));
  RETURN_IF_ERROR(GetString(j, w, "format", &d.format));
  RETURN_IF_ERROR(GetString(j, w, "file", &d.file));
  RETURN_IF_ERROR(Require(j, w, "size"));
  RETURN_IF_ERROR(GetUint(j, w, "size", &d.size));
  return d;
}

}  // namespace

bool ValidName(std::string_view id) {
  if (id.empty() || id.size() > 64 || id[0] == '.' || id[0] == '-') return false;
  for (char c : id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

json DiskSpecToJson(const DiskSpec& d) {
  return {{"id", d.id}, {"node", d.node}, {"format", d.format}, {"file", d.file}, {"size", d.size}};
}

StatusOr<DiskSpec> DiskSpecFromJson(const json& j) { return DecodeDisk(j, Where{"disk"}); }

// ---- CONFIG ------------------------------------------------------------------

std::string EncodeConfig(const ConfigMsg& m) {
  json disks = json::array();
  for (const auto& d : m.disks) disks.push_back(DiskSpecToJson(d));
  json j = {{"domain", m.domain},
            {"argv", m.argv},
            {"qemu_version", m.qemu_version},
            {"qemu_package", m.qemu_package},
            {"accelerator", m.accelerator},
            {"interval_ms", m.interval_ms},
            {"disks", std::move(disks)}};
  if (m.heartbeat_interval_ms != 0 || m.heartbeat_timeout_ms != 0) {
    j["heartbeat_interval_ms"] = m.heartbeat_interval_ms;
    j["heartbeat_timeout_ms"] = m.heartbeat_timeout_ms;
  }
  if (m.libvirt) j["libvirt"] = {{"xml", m.libvirt->xml}, {"name", m.libvirt->name}, {"uri", m.libvirt->uri}};
  if (!m.session.empty()) j["session"] = m.session;
  if (!m.arbiter.empty()) j["arbiter"] = m.arbiter;
  if (!m.reprotect_to.empty()) j["reprotect_to"] = m.reprotect_to;
  if (!m.interval_mode.empty()) {
    j["interval_mode"] = m.interval_mode;
    j["latency_budget_ms"] = m.latency_budget_ms;
    j["interval_min_ms"] = m.interval_min_ms;
    j["interval_max_ms"] = m.interval_max_ms;
  }
  if (!m.netbuf.empty()) j["netbuf"] = m.netbuf;
  if (m.compress) j["compress"] = true;
  if (!m.page_delta.empty()) j["page_delta"] = m.page_delta;
  if (!m.disks_option.empty()) j["disks_option"] = m.disks_option;
  if (m.delta_resync) j["delta_resync"] = true;
  if (!m.residency.empty()) j["residency"] = m.residency;
  return Dump(j);
}

std::string CompressionName(bool compress, bool xor_delta) {
  if (!compress) return "none";
  return xor_delta ? "xor-lz4" : "lz4";
}

StatusOr<ConfigMsg> DecodeConfig(std::string_view payload) {
  const Where w{"CONFIG"};
  ASSIGN_OR_RETURN(json j, ParseObject(payload, w.msg));
  ConfigMsg m;
  RETURN_IF_ERROR(GetString(j, w, "domain", &m.domain));
  RETURN_IF_ERROR(GetString(j, w, "qemu_version", &m.qemu_version));
  RETURN_IF_ERROR(GetString(j, w, "qemu_package", &m.qemu_package));
  RETURN_IF_ERROR(GetString(j, w, "accelerator", &m.accelerator));
  int64_t interval = 0;
  RETURN_IF_ERROR(GetInt(j, w, "interval_ms", 0, kMaxIntervalMs, &interval));
  m.interval_ms = static_cast<int>(interval);
  RETURN_IF_ERROR(GetString(j, w, "session", &m.session));
  if (m.session.size() > 64 ||
      m.session.find_first_not_of("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-") != std::string::npos)
    return w.Error("session", "is not 1-64 letters, digits, '_' or '-'");
  RETURN_IF_ERROR(GetString(j, w, "arbiter", &m.arbiter));
  if (!m.arbiter.empty() && m.arbiter != "none" && m.arbiter != "etcd")
    return w.Error("arbiter", "is '" + m.arbiter + "', not \"none\" or \"etcd\"");
  RETURN_IF_ERROR(GetString(j, w, "reprotect_to", &m.reprotect_to, 255));
  if (!m.reprotect_to.empty() && !ParseHostPort(m.reprotect_to, 7788).ok())
    return w.Error("reprotect_to", "is not HOST:PORT");
  RETURN_IF_ERROR(GetString(j, w, "interval_mode", &m.interval_mode));
  if (!m.interval_mode.empty() && m.interval_mode != "auto" && m.interval_mode != "fixed")
    return w.Error("interval_mode", "is not \"auto\" or \"fixed\"");
  RETURN_IF_ERROR(GetInt(j, w, "latency_budget_ms", 0, kMaxIntervalMs, &m.latency_budget_ms));
  RETURN_IF_ERROR(GetInt(j, w, "interval_min_ms", 0, kMaxIntervalMs, &m.interval_min_ms));
  RETURN_IF_ERROR(GetInt(j, w, "interval_max_ms", 0, kMaxIntervalMs, &m.interval_max_ms));
  RETURN_IF_ERROR(GetString(j, w, "netbuf", &m.netbuf));
  if (!m.netbuf.empty() && m.netbuf != "plug" && m.netbuf != "nfqueue" && m.netbuf != "none")
    return w.Error("netbuf", "is not \"plug\", \"nfqueue\" or \"none\"");
  if (const json* c = Find(j, "compress")) {
    if (!c->is_boolean()) return w.Error("compress", "is not a boolean");
    m.compress = c->get<bool>();
  }
  RETURN_IF_ERROR(GetString(j, w, "page_delta", &m.page_delta));
  if (!m.page_delta.empty() && m.page_delta != "xor") return w.Error("page_delta", "is not \"xor\"");
  if (!m.page_delta.empty() && !m.compress) return w.Error("page_delta", "needs compress");
  RETURN_IF_ERROR(GetString(j, w, "disks_option", &m.disks_option, 1024));
  if (m.disks_option.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,") !=
      std::string::npos)
    return w.Error("disks_option", "is not all, none, or a comma-separated list of drive ids");
  if (const json* d = Find(j, "delta_resync")) {
    if (!d->is_boolean()) return w.Error("delta_resync", "is not a boolean");
    m.delta_resync = d->get<bool>();
  }
  RETURN_IF_ERROR(GetString(j, w, "residency", &m.residency));
  if (!m.residency.empty() && m.residency != "hot" && m.residency != "paged")
    return w.Error("residency", "is not \"hot\" or \"paged\"");

  if (const json* lv = Find(j, "libvirt")) {
    const Where lw{w.msg, "libvirt."};
    if (!lv->is_object()) return lw.Error("is not an object");
    LibvirtConfig l;
    RETURN_IF_ERROR(Require(*lv, lw, "xml"));
    RETURN_IF_ERROR(GetString(*lv, lw, "xml", &l.xml, kMaxLibvirtXml));
    RETURN_IF_ERROR(GetString(*lv, lw, "name", &l.name));
    RETURN_IF_ERROR(GetString(*lv, lw, "uri", &l.uri));
    m.libvirt = std::move(l);
  }

  if (const json* argv = Find(j, "argv")) {
    if (!argv->is_array()) return w.Error("argv", "is not an array");
    if (argv->size() > kMaxConfigArgs)
      return w.Error("argv", "has " + std::to_string(argv->size()) + " elements, more than " +
                                 std::to_string(kMaxConfigArgs));
    m.argv.reserve(argv->size());
    for (size_t i = 0; i < argv->size(); i++) {
      const json& a = (*argv)[i];
      if (!a.is_string()) return w.Error("argv[" + std::to_string(i) + "]", "is not a string");
      m.argv.push_back(a.get_ref<const std::string&>());
    }
  }
  if (m.argv.empty() && !m.libvirt) return InvalidArgument("CONFIG carries no QEMU argv (and no libvirt XML)");

  if (const json* disks = Find(j, "disks")) {
    if (!disks->is_array()) return w.Error("disks", "is not an array");
    if (disks->size() > kMaxConfigDisks)
      return w.Error("disks", "has " + std::to_string(disks->size()) + " entries, more than " +
                                  std::to_string(kMaxConfigDisks));
    std::set<std::string> seen;
    for (size_t i = 0; i < disks->size(); i++) {
      ASSIGN_OR_RETURN(DiskSpec d, DecodeDisk((*disks)[i], Where{w.msg, "disks[" + std::to_string(i) + "]."}));
      // The id names the disk's files on the backup.
      if (!seen.insert(d.id).second) return w.Error("disks", "name '" + d.id + "' twice");
      m.disks.push_back(std::move(d));
    }
  }

  RETURN_IF_ERROR(GetInt(j, w, "heartbeat_interval_ms", 0, kMaxIntervalMs, &m.heartbeat_interval_ms));
  RETURN_IF_ERROR(GetInt(j, w, "heartbeat_timeout_ms", 0, kMaxIntervalMs, &m.heartbeat_timeout_ms));
  bool hb_off = m.heartbeat_interval_ms == 0 && m.heartbeat_timeout_ms == 0;
  if (!hb_off && !(m.heartbeat_interval_ms > 0 && m.heartbeat_interval_ms < m.heartbeat_timeout_ms))
    return InvalidArgument("CONFIG: heartbeat_interval_ms (" + std::to_string(m.heartbeat_interval_ms) +
                           ") must be above 0 and below heartbeat_timeout_ms (" +
                           std::to_string(m.heartbeat_timeout_ms) + "), or both absent");
  return m;
}

// ---- SYNC_BEGIN --------------------------------------------------------------

std::string EncodeSyncBegin(const SyncBeginMsg& m) {
  json blocks = json::array();
  for (const auto& b : m.blocks) blocks.push_back({{"id", b.id}, {"used_length", b.used_length}});
  json j = {{"total_bytes", m.total_bytes}, {"blocks", std::move(blocks)}, {"configuration", HexEncode(m.configuration)}};
  return Dump(j);
}

StatusOr<SyncBeginMsg> DecodeSyncBegin(std::string_view payload) {
  const Where w{"SYNC_BEGIN"};
  ASSIGN_OR_RETURN(json j, ParseObject(payload, w.msg));
  SyncBeginMsg m;
  if (const json* blocks = Find(j, "blocks")) {
    if (!blocks->is_array()) return w.Error("blocks", "is not an array");
    if (blocks->size() > kMaxSyncBlocks)
      return w.Error("blocks", "has " + std::to_string(blocks->size()) + " entries, more than " +
                                   std::to_string(kMaxSyncBlocks));
    m.blocks.reserve(blocks->size());
    for (size_t i = 0; i < blocks->size(); i++) {
      const json& b = (*blocks)[i];
      const Where bw{w.msg, "blocks[" + std::to_string(i) + "]."};
      if (!b.is_object()) return bw.Error("is not an object");
      qemu::RamBlock rb;
      RETURN_IF_ERROR(Require(b, bw, "id"));
      RETURN_IF_ERROR(GetString(b, bw, "id", &rb.id, kMaxBlockIdLen));
      if (rb.id.empty()) return bw.Error("id", "is empty");
      RETURN_IF_ERROR(Require(b, bw, "used_length"));
      RETURN_IF_ERROR(GetUint(b, bw, "used_length", &rb.used_length));
      m.blocks.push_back(std::move(rb));
    }
  }
  std::string hex;
  RETURN_IF_ERROR(GetString(j, w, "configuration", &hex));
  auto config = HexDecode(hex);
  if (!config) return w.Error("configuration", "is not hex");
  m.configuration = std::move(*config);
  RETURN_IF_ERROR(GetUint(j, w, "total_bytes", &m.total_bytes));
  return m;
}

// ---- RESYNC_OFFER, RESYNC_HASHES, KEEP -----------------------------------------

std::string EncodeResyncOffer(const ResyncOfferMsg& m) {
  json blocks = json::array();
  for (const auto& b : m.blocks) blocks.push_back({{"id", b.id}, {"used_length", b.used_length}});
  json j = {{"blocks", std::move(blocks)}, {"epoch", m.epoch}};
  if (!m.reason.empty()) j["reason"] = m.reason;
  return Dump(j);
}

StatusOr<ResyncOfferMsg> DecodeResyncOffer(std::string_view payload) {
  const Where w{"RESYNC_OFFER"};
  ASSIGN_OR_RETURN(json j, ParseObject(payload, w.msg));
  ResyncOfferMsg m;
  RETURN_IF_ERROR(GetUint(j, w, "epoch", &m.epoch));
  RETURN_IF_ERROR(GetString(j, w, "reason", &m.reason, 4096));
  if (const json* blocks = Find(j, "blocks")) {
    if (!blocks->is_array()) return w.Error("blocks", "is not an array");
    if (blocks->size() > kMaxSyncBlocks)
      return w.Error("blocks", "has " + std::to_string(blocks->size()) + " entries, more than " +
                                   std::to_string(kMaxSyncBlocks));
    std::set<std::string> ids;
    uint64_t total = 0;
    for (size_t i = 0; i < blocks->size(); i++) {
      const json& b = (*blocks)[i];
      const Where bw{w.msg, "blocks[" + std::to_string(i) + "]."};
      if (!b.is_object()) return bw.Error("is not an object");
      qemu::RamBlock rb;
      RETURN_IF_ERROR(Require(b, bw, "id"));
      RETURN_IF_ERROR(GetString(b, bw, "id", &rb.id, kMaxBlockIdLen));
      if (rb.id.empty()) return bw.Error("id", "is empty");
      if (!ids.insert(rb.id).second) return bw.Error("id", "'" + rb.id + "' appears twice");
      RETURN_IF_ERROR(Require(b, bw, "used_length"));
      RETURN_IF_ERROR(GetUint(b, bw, "used_length", &rb.used_length));
      if (rb.used_length == 0 || rb.used_length % kPageSize != 0)
        return bw.Error("used_length", "is not a non-zero multiple of " + std::to_string(kPageSize));
      if (rb.used_length > kMaxResyncBytes - total)
        return w.Error("blocks", "add up to more than " + std::to_string(kMaxResyncBytes >> 40) + " TiB");
      total += rb.used_length;
      m.blocks.push_back(std::move(rb));
    }
  }
  return m;
}

std::string EncodeResyncHashes(uint32_t block, uint64_t first_page, const PageHash* hashes, size_t count) {
  std::string out;
  out.reserve(kResyncHashesHeader + count * kPageHashSize);
  PutU32(&out, block);
  PutU64(&out, first_page);
  for (size_t i = 0; i < count; i++) AppendPageHash(&out, hashes[i]);
  return out;
}

StatusOr<ResyncHashesMsg> DecodeResyncHashes(std::string_view payload) {
  if (payload.size() < kResyncHashesHeader + kPageHashSize || (payload.size() - kResyncHashesHeader) % kPageHashSize != 0)
    return DataLoss("RESYNC_HASHES of " + std::to_string(payload.size()) +
                    " bytes: expected a 12-byte header and whole 16-byte hashes, at least one");
  const auto* p = reinterpret_cast<const uint8_t*>(payload.data());
  ResyncHashesMsg m;
  m.block = LoadU32(p);
  m.first_page = LoadU64(p + 4);
  size_t n = (payload.size() - kResyncHashesHeader) / kPageHashSize;
  if (m.first_page > (kMaxResyncBytes / kPageSize))
    return DataLoss("RESYNC_HASHES: first page " + std::to_string(m.first_page) + " is beyond any guest");
  m.hashes.reserve(n);
  for (size_t i = 0; i < n; i++) m.hashes.push_back(LoadPageHash(p + kResyncHashesHeader + i * kPageHashSize));
  return m;
}

void AppendKeepRun(std::string* out, const KeepRun& r) {
  PutU32(out, r.block);
  PutU64(out, r.first_page);
  PutU32(out, r.count);
}

StatusOr<std::vector<KeepRun>> DecodeKeep(std::string_view payload) {
  if (payload.empty() || payload.size() % kKeepRunSize != 0)
    return DataLoss("KEEP of " + std::to_string(payload.size()) + " bytes: expected whole 16-byte runs, at least one");
  const auto* p = reinterpret_cast<const uint8_t*>(payload.data());
  std::vector<KeepRun> runs;
  runs.reserve(payload.size() / kKeepRunSize);
  for (size_t pos = 0; pos < payload.size(); pos += kKeepRunSize) {
    KeepRun r{LoadU32(p + pos), LoadU64(p + pos + 4), LoadU32(p + pos + 12)};
    if (r.count == 0) return DataLoss("KEEP run " + std::to_string(pos / kKeepRunSize) + " has no pages");
    if (r.first_page > kMaxResyncBytes / kPageSize)
      return DataLoss("KEEP run " + std::to_string(pos / kKeepRunSize) + " starts beyond any guest");
    runs.push_back(r);
  }
  return runs;
}

// ---- FAILOVER, GOODBYE -------------------------------------------------------

std::string EncodeReason(const ReasonMsg& m) { return Dump(json{{"reason", m.reason}}); }

StatusOr<ReasonMsg> DecodeReason(std::string_view payload) {
  ReasonMsg m;
  if (payload.empty()) return m;
  const Where w{"FAILOVER/GOODBYE"};
  ASSIGN_OR_RETURN(json j, ParseObject(payload, w.msg));
  RETURN_IF_ERROR(GetString(j, w, "reason", &m.reason));
  return m;
}

std::string EncodeSwitchover(const SwitchoverMsg& m) {
  return Dump(json{{"reason", m.reason}, {"reprotect_to", m.reprotect_to}, {"interval_ms", m.interval_ms},
                   {"netbuf", m.netbuf}});
}

StatusOr<SwitchoverMsg> DecodeSwitchover(std::string_view payload) {
  SwitchoverMsg m;
  if (payload.empty()) return m;
  const Where w{"SWITCHOVER"};
  ASSIGN_OR_RETURN(json j, ParseObject(payload, w.msg));
  RETURN_IF_ERROR(GetString(j, w, "reason", &m.reason));
  RETURN_IF_ERROR(GetString(j, w, "reprotect_to", &m.reprotect_to, 300));
  RETURN_IF_ERROR(GetInt(j, w, "interval_ms", 0, kMaxIntervalMs, &m.interval_ms));
  RETURN_IF_ERROR(GetString(j, w, "netbuf", &m.netbuf, 16));
  if (!m.netbuf.empty() && m.netbuf != "plug" && m.netbuf != "nfqueue" && m.netbuf != "none")
    return InvalidArgument("SWITCHOVER: netbuf is not plug, nfqueue or none");
  return m;
}

}  // namespace remus::wire
