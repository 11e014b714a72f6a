#include "replicator/backup/recovery.h"

#include <unistd.h>

#include <cstdlib>

#include "common/io.h"

namespace remus {

namespace {
std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}
}  // namespace

StatusOr<FoundPromotion> FindPromotion(const std::string& dir, const std::string& domain,
                                       const std::string& libvirt_pid_dir) {
  FoundPromotion f;
  std::string file = dir + "/promoted.json";
  f.finished = true;
  if (::access(file.c_str(), F_OK) != 0) {
    file = dir + "/promoting.json";
    f.finished = false;
    if (::access(file.c_str(), F_OK) != 0) return NotFound("domain " + domain + " was not promoted here");
  }
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(file));
  StatusOr<PromotionMarker> m = ParsePromotionMarker(text);
  if (!m.ok())
    return DataLoss("domain " + domain + ": " + file + " is unreadable (" + m.status().message() +
                    "); the guest may have been promoted here: check for a running copy, then remove " + dir +
                    " to protect this domain here anew");
  f.marker = *m;
  f.pid = m->pid;
  if (f.pid <= 0) {
    // remusd died between starting QEMU and recording its pid: the pidfile
    // (QEMU's own, or libvirt's) tells.
    std::string pidfile = m->via_libvirt ? libvirt_pid_dir + "/" + domain + ".pid" : dir + "/run/qemu.pid";
    if (auto p = ReadFileToString(pidfile); p.ok()) f.pid = std::atoi(p->c_str());
  }
  // Ours only if it is a live process started for this domain's run dir.
  std::string argv;
  if (f.pid > 0) {
    auto cmdline = ReadFileToString("/proc/" + std::to_string(f.pid) + "/cmdline");
    if (cmdline.ok()) argv = std::move(*cmdline);
  }
  // A libvirt-restored QEMU is libvirt's: it names the domain (-name guest=NAME).
  f.alive = m->via_libvirt ? argv.find("guest=" + domain + ",") != std::string::npos ||
                                 argv.find("guest=" + domain + '\0') != std::string::npos
                           : argv.find(dir + "/run/") != std::string::npos;
  return f;
}

StatusOr<KeptCheckpoint> LoadKeptCheckpoint(const std::string& dir, const std::string& domain,
                                            std::string* no_checkpoint_reason) {
  auto cur = ReadFileToString(dir + "/current");
  if (!cur.ok()) {
    if (auto r = ReadFileToString(dir + "/retired"); r.ok()) *no_checkpoint_reason = Trim(*r);
    return NotFound("domain " + domain + " has no committed store");
  }
  KeptCheckpoint k;
  k.store_name = Trim(*cur);
  if (k.store_name.rfind("store-", 0) != 0 || k.store_name.find('/') != std::string::npos)
    return DataLoss(dir + "/current names '" + k.store_name + "', not a store");
  ASSIGN_OR_RETURN(k.store, PageStore::Open(dir + "/" + k.store_name));
  if (!k.store->has_committed())
    return DataLoss("domain " + domain + ": store " + k.store->dir() + " holds no restorable checkpoint: " +
                    k.store->invalid_reason());
  // The CONFIG of that store's session. State dirs written before the store
  // kept it kept one config.json beside the stores.
  std::string cfg_path = k.store->dir() + "/config.json";
  if (::access(cfg_path.c_str(), F_OK) != 0) cfg_path = dir + "/config.json";
  ASSIGN_OR_RETURN(std::string cfg_text, ReadFileToString(cfg_path));
  StatusOr<wire::ConfigMsg> cfg = ParseConfigFile(cfg_text, domain);
  if (!cfg.ok()) return DataLoss(cfg_path + " is unusable: " + cfg.status().message());
  k.config = std::move(cfg).value();
  ASSIGN_OR_RETURN(k.configuration, ReadFileToString(k.store->dir() + "/configuration.bin"));
  return k;
}

}  // namespace remus
