#include "replicator/qemu/argv_rewrite.h"

#include <algorithm>

namespace remus {

namespace {

// Replaces the value of key=VALUE inside a QEMU option string.
std::string ReplaceOpt(const std::string& opts, const std::string& key, const std::string& value) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i <= opts.size()) {
    size_t j = opts.find(',', i);
    if (j == std::string::npos) j = opts.size();
    parts.push_back(opts.substr(i, j - i));
    i = j + 1;
  }
  std::string out;
  for (size_t k = 0; k < parts.size(); k++) {
    std::string p = parts[k];
    if (p.rfind(key + "=", 0) == 0) p = key + "=" + value;
    if (k) out += ",";
    out += p;
  }
  return out;
}

std::string OptValue(const std::string& opts, const std::string& key) {
  size_t i = 0;
  while (i <= opts.size()) {
    size_t j = opts.find(',', i);
    if (j == std::string::npos) j = opts.size();
    std::string p = opts.substr(i, j - i);
    if (p.rfind(key + "=", 0) == 0) return p.substr(key.size() + 1);
    i = j + 1;
  }
  return "";
}

}  // namespace

std::vector<std::string> RewriteArgvForRestore(const std::vector<std::string>& argv_in, const std::string& run_dir,
                                               const std::string& qemu_binary,
                                               const std::map<std::string, std::string>& drive_images) {
  std::vector<std::string> out;
  if (argv_in.empty()) return out;
  // A guest restored by mapping before: its backend is re-made per restore.
  const std::vector<std::string> argv = StripMappedRam(argv_in);
  out.push_back(qemu_binary.empty() ? argv[0] : qemu_binary);
  // Chardevs that serve a monitor are dropped with their -mon.
  std::vector<std::string> monitor_chardevs;
  for (size_t i = 1; i + 1 < argv.size(); i++) {
    std::string o = argv[i].rfind("--", 0) == 0 ? argv[i].substr(1) : argv[i];
    if (o == "-mon") monitor_chardevs.push_back(OptValue(argv[i + 1], "chardev"));
  }
  bool have_pidfile = false;
  for (size_t i = 1; i < argv.size(); i++) {
    std::string o = argv[i].rfind("--", 0) == 0 ? argv[i].substr(1) : argv[i];
    bool has_val = i + 1 < argv.size();
    std::string v = has_val ? argv[i + 1] : "";
    if (o == "-daemonize" || o == "-S") continue;
    if ((o == "-qmp" || o == "-monitor" || o == "-mon" || o == "-incoming") && has_val) {
      i++;
      continue;
    }
    if (o == "-pidfile" && has_val) {
      out.insert(out.end(), {"-pidfile", run_dir + "/qemu.pid"});
      have_pidfile = true;
      i++;
      continue;
    }
    if (o == "-chardev" && has_val) {
      std::string id = OptValue(v, "id");
      i++;
      if (std::find(monitor_chardevs.begin(), monitor_chardevs.end(), id) != monitor_chardevs.end()) continue;
      std::string backend = v.substr(0, v.find(','));
      if (backend == "socket" && !OptValue(v, "path").empty()) v = ReplaceOpt(v, "path", run_dir + "/" + id + ".sock");
      if (backend == "file") v = ReplaceOpt(v, "path", run_dir + "/" + id + ".log");
      out.insert(out.end(), {"-chardev", v});
      continue;
    }
    if (o == "-drive" && has_val) {
      i++;
      auto it = drive_images.find(OptValue(v, "id"));
      if (it != drive_images.end()) {
        // The backup's copy is a raw image, whatever the primary's format.
        v = ReplaceOpt(v, "file", it->second);
        v = v.find("format=") != std::string::npos ? ReplaceOpt(v, "format", "raw") : v + ",format=raw";
      }
      out.insert(out.end(), {"-drive", v});
      continue;
    }
    if (o == "-serial" && has_val) {
      i++;
      if (v.rfind("file:", 0) == 0 || v == "stdio" || v.rfind("mon:", 0) == 0) v = "file:" + run_dir + "/serial.log";
      else if (v.rfind("unix:", 0) == 0) v = "unix:" + run_dir + "/serial.sock" + (v.find(',') != std::string::npos ? v.substr(v.find(',')) : "");
      out.insert(out.end(), {"-serial", v});
      continue;
    }
    out.push_back(argv[i]);
  }
  // Two monitors: the operators' (qmp.sock), and remusd's own
  // (remusd-qmp.sock: the promotion, then a re-protection, use it), so
  // protecting the restored guest again does not take the operators' away
  // (a QMP socket serves one client at a time).
  out.insert(out.end(), {"-qmp", "unix:" + run_dir + "/" + kRestoredQmpSocket + ",server=on,wait=off"});
  out.insert(out.end(), {"-qmp", "unix:" + run_dir + "/" + kRestoredRemusdQmpSocket + ",server=on,wait=off"});
  if (!have_pidfile) out.insert(out.end(), {"-pidfile", run_dir + "/qemu.pid"});
  out.insert(out.end(), {"-incoming", "defer"});
  return out;
}

namespace {
// QEMU's option syntax doubles a comma inside a value.
std::string EscapeOptValue(const std::string& v) {
  std::string out;
  for (char c : v) {
    out.push_back(c);
    if (c == ',') out.push_back(',');
  }
  return out;
}
}  // namespace

bool IsDefaultRamId(const std::string& id) {
  for (const char* d : {"pc.ram", "mach-virt.ram", "s390.ram", "ppc_spapr.ram", "riscv_virt_board.ram"})
    if (id == d) return true;
  return false;
}

RamMappingPlan PlanRamMapping(const std::vector<std::string>& argv, const std::vector<qemu::RamBlock>& blocks) {
  RamMappingPlan plan;
  for (size_t i = 1; i < argv.size(); i++) {
    std::string o = argv[i].rfind("--", 0) == 0 ? argv[i].substr(1) : argv[i];
    const std::string v = i + 1 < argv.size() ? argv[i + 1] : "";
    std::string why;
    if (o == "-mem-path" || o == "-mem-prealloc") why = "the guest's command line uses " + o;
    else if (o == "-numa") why = "the guest has NUMA nodes (-numa), whose memory has backends of its own";
    else if (o == "-object" && v.rfind("memory-backend", 0) == 0)
      why = "the guest's command line defines a memory backend (" + v.substr(0, v.find(',')) + ")";
    else if ((o == "-machine" || o == "-M") && (v.find("memory-backend=") != std::string::npos))
      why = "the guest's machine names a memory backend of its own";
    if (!why.empty()) {
      plan.reason = why + "; only a default main RAM is mapped";
      return plan;
    }
  }
  for (size_t b = 0; b < blocks.size(); b++) {
    if (IsDefaultRamId(blocks[b].id)) {
      plan.map = true;
      plan.block = b;
      plan.id = blocks[b].id;
      return plan;
    }
  }
  plan.reason = "no RAM block carries a machine's default main RAM id (pc.ram, mach-virt.ram, ...)";
  return plan;
}

std::vector<std::string> AddMappedRam(std::vector<std::string> argv, const std::string& id, const std::string& path,
                                      uint64_t size) {
  argv.insert(argv.end(), {"-object", "memory-backend-file,id=" + id + ",mem-path=" + EscapeOptValue(path) +
                                          ",size=" + std::to_string(size) + ",share=off"});
  argv.insert(argv.end(), {"-machine", "memory-backend=" + id});
  return argv;
}

std::vector<std::string> StripMappedRam(const std::vector<std::string>& argv) {
  // Which backend ids AddMappedRam made: the id is a default RAM id and the
  // file a page store's block file.
  std::vector<std::string> ours;
  for (size_t i = 1; i + 1 < argv.size(); i++) {
    if (argv[i] != "-object" || argv[i + 1].rfind("memory-backend-file,", 0) != 0) continue;
    const std::string& v = argv[i + 1];
    std::string id = OptValue(v, "id"), path = OptValue(v, "mem-path");
    std::string base = path.substr(path.rfind('/') + 1);
    if (IsDefaultRamId(id) && base.rfind("ram-", 0) == 0 && base.size() > 8 &&
        base.compare(base.size() - 4, 4, ".img") == 0 && v.find(",share=off") != std::string::npos)
      ours.push_back(id);
  }
  if (ours.empty()) return argv;
  auto is_ours = [&](const std::string& id) { return std::find(ours.begin(), ours.end(), id) != ours.end(); };
  std::vector<std::string> out;
  for (size_t i = 0; i < argv.size(); i++) {
    if (i > 0 && i + 1 < argv.size()) {
      const std::string& v = argv[i + 1];
      if (argv[i] == "-object" && v.rfind("memory-backend-file,", 0) == 0 && is_ours(OptValue(v, "id"))) {
        i++;
        continue;
      }
      if (argv[i] == "-machine" && v.rfind("memory-backend=", 0) == 0 && v.find(',') == std::string::npos &&
          is_ours(v.substr(15))) {
        i++;
        continue;
      }
    }
    out.push_back(argv[i]);
  }
  return out;
}

}  // namespace remus
