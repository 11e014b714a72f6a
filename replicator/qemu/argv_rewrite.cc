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

std::vector<std::string> RewriteArgvForRestore(const std::vector<std::string>& argv, const std::string& run_dir,
                                               const std::string& qemu_binary,
                                               const std::map<std::string, std::string>& drive_images) {
  std::vector<std::string> out;
  if (argv.empty()) return out;
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

}  // namespace remus
