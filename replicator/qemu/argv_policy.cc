#include "replicator/qemu/argv_policy.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "common/command.h"

namespace remus {

namespace {

using Opts = std::vector<std::pair<std::string, std::string>>;

std::string Shorten(std::string_view v) {
  if (v.size() <= 160) return std::string(v);
  return std::string(v.substr(0, 157)) + "...";
}

bool Contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'. The
// rewrite puts chardev ids into file names under the run dir.
bool WellFormedId(std::string_view id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

const std::string* Get(const Opts& o, const std::string& key) {
  for (const auto& [k, v] : o)
    if (k == key) return &v;
  return nullptr;
}

std::string GetOr(const Opts& o, const std::string& key, const std::string& def = "") {
  const std::string* v = Get(o, key);
  return v ? *v : def;
}

bool IsOn(const std::string& v) { return v == "on" || v == "yes" || v == "true"; }

// What one option's check sees.
struct Ctx {
  const std::string& opt;    // as written, e.g. "-drive"
  const std::string& value;  // "" for options without one
  const PeerPolicy& policy;
  const std::set<std::string>& mirrored;
};

Status Refuse(const Ctx& c, const std::string& why) {
  std::string v = c.value.empty() ? "" : " " + Shorten(c.value);
  return PermissionDenied("QEMU option " + c.opt + v + " is not accepted from a peer: " + why);
}

Status File(const Ctx& c, const std::string& path, const std::string& what,
            PeerFileAccess access = PeerFileAccess::kRead) {
  Status s = CheckPeerFile(path, what, c.policy, access);
  if (s.ok()) return s;
  return Refuse(c, s.message());
}

// Parses c.value; a bad string is refused naming the option.
StatusOr<Opts> Parse(const Ctx& c, const std::string& implied = "") {
  if (!c.value.empty() && c.value[0] == '{')
    return Refuse(c, "the JSON form of options is not accepted; write it as key=value");
  auto o = ParseQemuOpts(c.value, implied);
  if (!o.ok()) return Refuse(c, o.status().message());
  return o;
}

// Only the keys in `allowed` (or starting with one ending in '.' or '*').
Status OnlyKeys(const Ctx& c, const Opts& o, std::initializer_list<const char*> allowed, const std::string& what) {
  for (const auto& [k, v] : o) {
    bool ok = false;
    for (const char* a : allowed) {
      std::string_view as(a);
      if (!as.empty() && (as.back() == '*' || as.back() == '.'))
        ok |= k.rfind(as.substr(0, as.back() == '*' ? as.size() - 1 : as.size()), 0) == 0;
      else
        ok |= k == as;
    }
    if (!ok) return Refuse(c, "key '" + k + "' is not accepted in " + what);
  }
  return OkStatus();
}

Status Any(const Ctx&) { return OkStatus(); }

// Dropped by the rewrite, or replaced by the backup's own (argv_rewrite.h).
Status Replaced(const Ctx&) { return OkStatus(); }

Status Firmware(const Ctx& c, const std::string& path, const std::string& what) {
  // A bare name is looked up in QEMU's own data directories.
  if (path.find('/') == std::string::npos) return OkStatus();
  return File(c, path, what);
}

Status KernelFile(const Ctx& c) { return File(c, c.value, "a file the restored guest boots from"); }

Status Bios(const Ctx& c) { return Firmware(c, c.value, "a firmware file"); }

Status Machine(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "type"));
  for (const auto& [k, v] : o) {
    if (k == "kernel" || k == "initrd" || k == "dtb") RETURN_IF_ERROR(File(c, v, "a file the restored guest boots from"));
    if (k == "firmware") RETURN_IF_ERROR(Firmware(c, v, "a firmware file"));
    if (k == "dumpdtb") return Refuse(c, "dumpdtb writes a file on this host");
  }
  return OkStatus();
}

Status Display(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "type"));
  if (GetOr(o, "type") != "none") return Refuse(c, "only -display none is accepted (a display would open on this host)");
  return OkStatus();
}

Status Sandbox(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "enable"));
  if (!IsOn(GetOr(o, "enable"))) return Refuse(c, "QEMU's seccomp sandbox may only be turned on");
  return OkStatus();
}

Status Boot(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "order"));
  if (const std::string* s = Get(o, "splash")) return File(c, *s, "a boot splash image");
  return OkStatus();
}

Status Global(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c));
  std::string prop, val;
  if (o.size() == 1 && o[0].first.find('.') != std::string::npos) {
    prop = o[0].first.substr(o[0].first.find('.') + 1);
    val = o[0].second;
  } else {
    RETURN_IF_ERROR(OnlyKeys(c, o, {"driver", "property", "value"}, "-global"));
    prop = GetOr(o, "property");
    val = GetOr(o, "value");
  }
  if (prop == "romfile" && val.find('/') != std::string::npos)
    return Refuse(c, "a ROM file given by path would be read from this host (give a name from QEMU's data directory)");
  if (prop == "file" || prop == "filename" || prop == "path" || prop == "mem-path")
    return Refuse(c, "a property naming a file on this host");
  return OkStatus();
}

Status Drive(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c));
  RETURN_IF_ERROR(OnlyKeys(c, o,
                           {"id", "file", "if", "format", "media", "index", "bus", "unit", "cache", "aio", "discard",
                            "detect-zeroes", "readonly", "snapshot", "werror", "rerror", "copy-on-read",
                            "auto-read-only", "force-share", "locking", "bps*", "iops*", "throttling.", "group"},
                           "-drive (options of the image's driver, driver= and file.* can point it elsewhere)"));
  const std::string* file = Get(o, "file");
  if (!file) return OkStatus();  // an empty drive (a CD-ROM without a medium)
  std::string id = GetOr(o, "id");
  if (!id.empty() && c.mirrored.count(id)) return OkStatus();  // file= becomes the backup's own image
  bool read_only = IsOn(GetOr(o, "readonly")) || GetOr(o, "media") == "cdrom";
  if (!read_only && CheckSharedDisk(*file, "", c.policy).ok()) return OkStatus();  // shared storage
  if (!read_only)
    return Refuse(c, "drive '" + id + "' is writable and not mirrored to this backup: the restored guest would open " +
                         *file + " on this host (mirror the disk, make it readonly=on, or, on shared storage, "
                         "remusd --allow-shared-disks DIR)");
  return File(c, *file, "a read-only disk image");
}

Status Blockdev(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c));
  std::string driver = GetOr(o, "driver");
  if (driver == "null-co" || driver == "null-aio") return OkStatus();
  return Refuse(c, "the backup can point only a -drive at its copy of a disk (write the disk as -drive with an id)");
}

Status NetdevOpts(const Ctx& c, const Opts& o, const std::string& type) {
  if (type == "tap") {
    if (Get(o, "fd") || Get(o, "fds") || Get(o, "vhostfd") || Get(o, "vhostfds"))
      return Refuse(c, "tap with file descriptors (fd=, vhostfd=) refers to descriptors the backup does not have");
    if (Get(o, "helper") || Get(o, "br")) return Refuse(c, "tap with helper= or br= runs a program on this host");
    RETURN_IF_ERROR(OnlyKeys(c, o,
                             {"type", "id", "name", "ifname", "script", "downscript", "vhost", "vhostforce", "queues",
                              "vnet_hdr", "sndbuf", "poll-us"},
                             "a tap netdev"));
    if (GetOr(o, "script") != "no" || GetOr(o, "downscript") != "no")
      return Refuse(c, "tap must say script=no,downscript=no (QEMU would run a script on this host)");
    return OkStatus();
  }
  if (type == "user") {
    for (const char* k : {"hostfwd", "guestfwd", "smb", "tftp"})
      if (Get(o, k))
        return Refuse(c, std::string("user networking with ") + k +
                             "= forwards to, serves or runs something on this host");
    return OnlyKeys(c, o,
                    {"type", "id", "name", "net", "host", "restrict", "hostname", "dhcpstart", "dns", "dnssearch",
                     "domainname", "ipv4", "ipv6", "ipv6-net", "ipv6-host", "ipv6-dns", "ipv6-prefix",
                     "ipv6-prefixlen", "bootfile"},
                    "user networking");
  }
  if (type == "hubport") return OkStatus();
  return Refuse(c, "netdev type '" + type + "' is not accepted (tap, user and hubport are)");
}

Status Netdev(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "type"));
  return NetdevOpts(c, o, GetOr(o, "type"));
}

Status Net(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "type"));
  std::string type = GetOr(o, "type");
  if (type == "none" || type == "nic") return OkStatus();
  return NetdevOpts(c, o, type);
}

Status Chardev(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "backend"));
  std::string id = GetOr(o, "id"), backend = GetOr(o, "backend");
  if (!WellFormedId(id)) return Refuse(c, "a chardev needs a well-formed id (a letter, then letters, digits, '-', '.', '_')");
  if (Get(o, "logfile")) return Refuse(c, "logfile= writes a file on this host");
  if (Get(o, "fd")) return Refuse(c, "fd= refers to a descriptor the backup does not have");
  if (backend == "socket") {
    if (GetOr(o, "path").empty())
      return Refuse(c, "only unix socket chardevs (path=, moved into the backup's run directory) are accepted, not TCP");
    return OnlyKeys(c, o,
                    {"backend", "id", "path", "server", "wait", "nowait", "telnet", "tn3270", "websocket", "reconnect",
                     "abstract", "tight", "nodelay", "delay", "mux", "logappend"},
                    "a socket chardev");
  }
  if (backend == "file") {
    if (GetOr(o, "path").empty()) return Refuse(c, "a file chardev needs path=");
    return OnlyKeys(c, o, {"backend", "id", "path", "append", "mux", "logappend"}, "a file chardev");
  }
  if (backend == "null" || backend == "pty" || backend == "ringbuf" || backend == "memory" || backend == "stdio" ||
      backend == "vc")
    return OkStatus();
  return Refuse(c, "chardev backend '" + backend +
                       "' is not accepted (socket with path=, file, null, pty, ringbuf, memory, stdio and vc are)");
}

Status Serial(const Ctx& c) {
  const std::string& v = c.value;
  for (const char* ok : {"none", "null", "pty", "vc", "stdio"})
    if (v == ok) return OkStatus();
  // file:, unix: and mon: are moved into the run directory by the rewrite.
  for (const char* p : {"file:", "unix:", "mon:", "chardev:", "vc:"})
    if (v.rfind(p, 0) == 0) return OkStatus();
  return Refuse(c, "only none, null, pty, vc, stdio, file:, unix:, mon: and chardev: serial ports are accepted");
}

Status Parallel(const Ctx& c) {
  if (c.value == "none") return OkStatus();
  return Refuse(c, "only -parallel none is accepted");
}

// -device drivers the backup starts: the ones that emulate hardware without
// a host-side resource of their own. Exact names, or a prefix ending in '-'.
constexpr const char* kDevicePrefixes[] = {
    "virtio-blk-",   "virtio-net-",     "virtio-scsi-", "virtio-serial-", "virtio-balloon-", "virtio-rng-",
    "virtio-keyboard-", "virtio-mouse-", "virtio-tablet-", "virtio-gpu-",  "ich9-usb-",
};
constexpr const char* kDevices[] = {
    "virtio-vga", "virtserialport", "virtconsole", "scsi-hd", "scsi-cd", "ide-hd", "ide-cd", "floppy", "isa-fdc",
    "isa-serial", "pci-serial", "pci-serial-2x", "pci-serial-4x", "e1000", "e1000e", "e1000-82545em", "rtl8139",
    "vmxnet3", "pcnet", "ne2k_pci", "i82559er", "pci-bridge", "pcie-root-port", "pcie-pci-bridge", "ioh3420",
    "x3130-upstream", "xio3130-downstream", "pxb", "pxb-pcie", "ich9-ahci", "ahci", "piix3-usb-uhci",
    "piix4-usb-uhci", "usb-ehci", "qemu-xhci", "nec-usb-xhci", "usb-tablet", "usb-kbd", "usb-mouse", "usb-hub",
    "usb-storage", "VGA", "cirrus-vga", "qxl-vga", "qxl", "bochs-display", "ramfb", "sga", "pvpanic", "pvpanic-pci",
    "i6300esb", "ib700", "vmcoreinfo", "vmgenid", "intel-iommu", "amd-iommu", "pc-dimm", "lsi53c895a", "megasas",
    "megasas-gen2", "mptsas1068", "am53c974", "vmw_pvscsi", "intel-hda", "ich9-intel-hda", "hda-duplex",
    "hda-output", "hda-micro", "AC97", "ES1371", "isa-debugcon", "usb-serial",
};

std::string DeviceRefusal(const std::string& d) {
  if (d.rfind("vfio-", 0) == 0) return "it passes a host device through to the guest";
  if (d == "usb-host" || d == "u2f-passthru" || d == "pci-assign" || d == "kvm-pci-assign")
    return "it passes a host device through to the guest";
  if (d == "loader" || d == "guest-loader") return "it loads a file of this host into the guest";
  if (d.rfind("vhost-", 0) == 0) return "it connects the guest to a backend on this host";
  if (d.rfind("ivshmem", 0) == 0) return "it shares memory with this host";
  if (d.rfind("virtio-9p", 0) == 0) return "it exports a directory of this host to the guest";
  return "driver '" + d + "' is not on this backup's -device allow-list (remusd --allow-qemu-device " + d + ")";
}

Status Device(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "driver"));
  std::string d = GetOr(o, "driver");
  bool ok = Contains(c.policy.extra_devices, d) ||
            std::any_of(std::begin(kDevices), std::end(kDevices), [&](const char* n) { return d == n; }) ||
            std::any_of(std::begin(kDevicePrefixes), std::end(kDevicePrefixes),
                        [&](const char* p) { return d.rfind(p, 0) == 0; });
  if (!ok) return Refuse(c, DeviceRefusal(d));
  for (const auto& [k, v] : o) {
    if (k == "romfile" && v.find('/') != std::string::npos)
      return Refuse(c, "a ROM file given by path would be read from this host (give a name from QEMU's data directory)");
    if (k == "file" || k == "filename" || k == "path") return Refuse(c, "a property naming a file on this host");
  }
  return OkStatus();
}

Status Object(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "qom-type"));
  std::string t = GetOr(o, "qom-type");
  if (t == "memory-backend-ram" || t == "memory-backend-memfd" || t == "rng-builtin" || t == "iothread" ||
      t == "throttle-group")
    return OkStatus();
  if (t == "memory-backend-file") return File(c, GetOr(o, "mem-path"), "a guest memory file", PeerFileAccess::kWrite);
  if (t == "rng-random") {
    std::string f = GetOr(o, "filename", "/dev/urandom");
    if (f != "/dev/urandom" && f != "/dev/random" && f != "/dev/hwrng")
      return Refuse(c, "rng-random may read /dev/urandom, /dev/random or /dev/hwrng only");
    return OkStatus();
  }
  if (t == "secret") {
    if (Get(o, "file")) return Refuse(c, "a secret read from a file on this host");
    return OkStatus();
  }
  return Refuse(c, "object type '" + t +
                       "' is not accepted (memory-backend-ram/-memfd/-file, rng-random, rng-builtin, iothread, "
                       "throttle-group and secret are)");
}

Status FwCfg(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "name"));
  if (const std::string* f = Get(o, "file")) return File(c, *f, "a file handed to the guest through fw_cfg");
  return OkStatus();
}

Status Smbios(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c));
  if (const std::string* f = Get(o, "file")) return File(c, *f, "an SMBIOS table file");
  return OkStatus();
}

Status AcpiTable(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c));
  for (const char* k : {"file", "data"}) {
    const std::string* v = Get(o, k);
    if (!v) continue;
    size_t i = 0;
    while (i <= v->size()) {
      size_t j = v->find(':', i);
      if (j == std::string::npos) j = v->size();
      RETURN_IF_ERROR(File(c, v->substr(i, j - i), "an ACPI table file"));
      i = j + 1;
    }
  }
  return OkStatus();
}

Status OptionRom(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "romfile"));
  return Firmware(c, GetOr(o, "romfile"), "an option ROM");
}

Status Audiodev(const Ctx& c) {
  ASSIGN_OR_RETURN(Opts o, Parse(c, "driver"));
  if (GetOr(o, "driver") != "none") return Refuse(c, "only the 'none' audio backend is accepted");
  return OkStatus();
}

struct Rule {
  bool has_value;
  Status (*check)(const Ctx&);
};

const std::map<std::string, Rule>& Rules() {
  static const std::map<std::string, Rule> r = {
      // Without a value.
      {"nodefaults", {false, Any}}, {"no-user-config", {false, Any}}, {"nographic", {false, Any}},
      {"enable-kvm", {false, Any}}, {"no-reboot", {false, Any}}, {"no-shutdown", {false, Any}},
      {"no-hpet", {false, Any}}, {"no-acpi", {false, Any}}, {"snapshot", {false, Any}},
      {"only-migratable", {false, Any}}, {"usb", {false, Any}}, {"mem-prealloc", {false, Any}},
      {"no-fd-bootchk", {false, Any}}, {"S", {false, Replaced}}, {"daemonize", {false, Replaced}},
      // Values that name nothing on the host.
      {"m", {true, Any}}, {"smp", {true, Any}}, {"cpu", {true, Any}}, {"name", {true, Any}}, {"uuid", {true, Any}},
      {"rtc", {true, Any}}, {"append", {true, Any}}, {"k", {true, Any}}, {"vga", {true, Any}}, {"accel", {true, Any}},
      {"numa", {true, Any}}, {"overcommit", {true, Any}}, {"msg", {true, Any}}, {"action", {true, Any}},
      {"watchdog-action", {true, Any}}, {"compat", {true, Any}}, {"g", {true, Any}}, {"prom-env", {true, Any}},
      // The backup's own instead (argv_rewrite.h).
      {"qmp", {true, Replaced}}, {"monitor", {true, Replaced}}, {"mon", {true, Replaced}},
      {"incoming", {true, Replaced}}, {"pidfile", {true, Replaced}},
      // Checked by value.
      {"machine", {true, Machine}}, {"M", {true, Machine}}, {"display", {true, Display}},
      {"sandbox", {true, Sandbox}}, {"boot", {true, Boot}}, {"global", {true, Global}}, {"drive", {true, Drive}},
      {"blockdev", {true, Blockdev}}, {"netdev", {true, Netdev}}, {"net", {true, Net}},
      {"chardev", {true, Chardev}}, {"serial", {true, Serial}}, {"parallel", {true, Parallel}},
      {"device", {true, Device}}, {"object", {true, Object}}, {"kernel", {true, KernelFile}},
      {"initrd", {true, KernelFile}}, {"dtb", {true, KernelFile}}, {"bios", {true, Bios}},
      {"fw_cfg", {true, FwCfg}}, {"smbios", {true, Smbios}}, {"acpitable", {true, AcpiTable}},
      {"option-rom", {true, OptionRom}}, {"audiodev", {true, Audiodev}},
  };
  return r;
}

// Options refused with a reason of their own (the rest: not on the list).
const std::map<std::string, const char*>& Known() {
  static const std::map<std::string, const char*> k = {
      {"add-fd", "it passes file descriptors the backup does not have"},
      {"plugin", "it loads a shared object of this host into QEMU"},
      {"loadvm", "it loads a snapshot instead of the replicated checkpoint"},
      {"D", "it writes a log file on this host"},
      {"d", "debug logging is chosen by this host, not the peer"},
      {"trace", "it writes trace files or reads event lists on this host"},
      {"run-with", "the user, root and working directory of QEMU are this host's choice"},
      {"runas", "the user QEMU runs as is this host's choice"},
      {"chroot", "QEMU's root directory is this host's choice"},
      {"virtfs", "it exports a directory of this host to the guest"},
      {"fsdev", "it exports a directory of this host to the guest"},
      {"readconfig", "it reads further options from a file on this host"},
      {"writeconfig", "it writes a file on this host"},
      {"set", "it changes options after they were checked"},
      {"L", "it names a firmware directory on this host"},
      {"mem-path", "it names a memory file on this host"},
      {"pflash", "it writes a firmware file on this host (use -drive if=pflash,readonly=on,file=...)"},
      {"qmp-pretty", "the backup adds its own monitor"},
      {"gdb", "it opens a debugger port on this host"},
      {"s", "it opens a debugger port on this host"},
      {"qtest", "it opens a test port on this host"},
      {"vnc", "it opens a remote display on this host (remusd --allow-qemu-option vnc)"},
      {"spice", "it opens a remote display on this host (remusd --allow-qemu-option spice)"},
      {"tpmdev", "it uses a TPM of this host"},
      {"usbdevice", "use -device (host USB devices are not accepted)"},
      {"icount", "record/replay reads and writes files on this host"},
      {"semihosting", "it gives the guest access to this host's files"},
      {"semihosting-config", "it gives the guest access to this host's files"},
  };
  return k;
}

}  // namespace

StatusOr<Opts> ParseQemuOpts(std::string_view value, const std::string& implied) {
  Opts out;
  if (value.find(",,") != std::string_view::npos)
    return InvalidArgument("escaped commas (',,') are not accepted");
  size_t i = 0;
  bool first = true;
  while (i <= value.size()) {
    size_t j = value.find(',', i);
    if (j == std::string_view::npos) j = value.size();
    std::string_view part = value.substr(i, j - i);
    if (part.empty()) {
      if (value.empty()) break;
      return InvalidArgument("an empty element");
    }
    std::string k, v;
    size_t eq = part.find('=');
    if (eq != std::string_view::npos) {
      k = std::string(part.substr(0, eq));
      v = std::string(part.substr(eq + 1));
    } else if (first && !implied.empty()) {
      k = implied;
      v = std::string(part);
    } else if (part.rfind("no", 0) == 0 && part.size() > 2) {
      k = std::string(part.substr(2));  // "nowait": wait=off (also stored as given)
      v = "off";
      out.push_back({std::string(part), "on"});
    } else {
      k = std::string(part);
      v = "on";
    }
    if (k.empty()) return InvalidArgument("an element without a key");
    for (const auto& [ek, ev] : out)
      if (ek == k) return InvalidArgument("key '" + k + "' is given twice");
    out.push_back({k, v});
    first = false;
    i = j + 1;
  }
  return out;
}

namespace {
Status UnderDirs(const std::string& path, const std::string& what, std::vector<std::string> dirs_in,
                 const char* flag, bool firmware) {
  if (path.empty() || path[0] != '/') return PermissionDenied(what + " '" + path + "' is not an absolute path");
  if (path.find(',') != std::string::npos)
    return PermissionDenied(what + " '" + path + "' has a comma (QEMU may read it as a list)");
  std::filesystem::path p(path);
  for (const auto& part : p)
    if (part == "." || part == "..")
      return PermissionDenied(what + " '" + path + "' has a '.' or '..' component");
  for (const std::string& d : dirs_in) {
    std::string dir = std::filesystem::path(d).lexically_normal().string();
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    if (dir.empty() || dir[0] != '/') continue;
    if (dir == "/" || (path.size() > dir.size() && path.rfind(dir, 0) == 0 && path[dir.size()] == '/'))
      return OkStatus();
  }
  if (firmware) {
    for (const char* d : kFirmwareDirs) {
      std::string dir(d);
      if (path.size() > dir.size() && path.rfind(dir, 0) == 0 && path[dir.size()] == '/') return OkStatus();
    }
  }
  std::string dirs;
  for (const std::string& d : dirs_in) dirs += (dirs.empty() ? "" : ", ") + d;
  return PermissionDenied(what + " '" + path + "' is outside the directories this backup lets a restored guest use (" +
                          (dirs.empty() ? "none" : dirs) + "; remusd " + flag + " DIR)");
}
}  // namespace

Status CheckPeerFile(const std::string& path, const std::string& what, const PeerPolicy& policy,
                     PeerFileAccess access) {
  return UnderDirs(path, what, policy.file_dirs, "--allow-qemu-files", access == PeerFileAccess::kRead);
}

Status CheckSharedDisk(const std::string& path, const std::string& what, const PeerPolicy& policy) {
  return UnderDirs(path, what, policy.shared_disk_dirs, "--allow-shared-disks", false);
}

bool IsQemuBinaryName(std::string_view name) {
  if (name == "qemu-kvm" || name == "kvm") return true;
  constexpr std::string_view kPrefix = "qemu-system-";
  if (name.size() <= kPrefix.size() || name.substr(0, kPrefix.size()) != kPrefix) return false;
  return std::all_of(name.begin() + kPrefix.size(), name.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

StatusOr<std::string> ResolveQemuBinary(const std::string& configured, const std::string& peer_binary) {
  if (!configured.empty()) return configured;
  std::string name = std::filesystem::path(peer_binary).filename().string();
  if (!IsQemuBinaryName(name))
    return PermissionDenied("the peer's QEMU binary '" + Shorten(peer_binary) +
                            "' is not named qemu-system-ARCH, and this backup has no --qemu of its own");
  if (std::string found = FindProgram(name, "/usr/libexec"); !found.empty()) return found;
  return NotFound("no " + name + " in this backup's PATH; install it or start remusd with --qemu PATH");
}

Status CheckQemuArgv(const std::vector<std::string>& argv, const std::set<std::string>& mirrored,
                     const PeerPolicy& policy, bool own_qemu) {
  if (argv.empty()) return InvalidArgument("the QEMU command line is empty");
  if (!own_qemu) {
    std::string name = std::filesystem::path(argv[0]).filename().string();
    if (!IsQemuBinaryName(name))
      return PermissionDenied("the peer's QEMU binary '" + Shorten(argv[0]) +
                              "' is not named qemu-system-ARCH, and this backup has no --qemu of its own");
  }
  const auto& rules = Rules();
  const auto& known = Known();
  for (size_t i = 1; i < argv.size(); i++) {
    const std::string& a = argv[i];
    if (a.size() < 2 || a[0] != '-')
      return PermissionDenied("QEMU argument '" + Shorten(a) +
                              "' is not accepted from a peer: a bare argument is a disk image to QEMU (use -drive)");
    std::string name = a.substr(a.rfind("--", 0) == 0 ? 2 : 1);
    const std::string empty;
    auto extra = std::find_if(policy.extra_options.begin(), policy.extra_options.end(), [&](const std::string& e) {
      return e == name || e == "-" + name || e == "--" + name;
    });
    auto r = rules.find(name);
    if (r == rules.end() && extra == policy.extra_options.end()) {
      auto k = known.find(name);
      return PermissionDenied("QEMU option " + a + " is not accepted from a peer: " +
                              (k != known.end() ? std::string(k->second)
                                                : "it is not on this backup's allow-list (remusd --allow-qemu-option " +
                                                      name + ")"));
    }
    bool has_value = r != rules.end() ? r->second.has_value
                                      : i + 1 < argv.size() && (argv[i + 1].empty() || argv[i + 1][0] != '-');
    if (!has_value) {
      if (r != rules.end()) RETURN_IF_ERROR(r->second.check(Ctx{a, empty, policy, mirrored}));
      continue;
    }
    if (i + 1 >= argv.size()) return PermissionDenied("QEMU option " + a + " lacks its value");
    const std::string& v = argv[i + 1];
    // The rewrite reads the argv token by token: a value that looks like an
    // option could be read as one there and as a value by QEMU.
    if (!v.empty() && v[0] == '-')
      return PermissionDenied("QEMU option " + a + " " + Shorten(v) +
                              " is not accepted from a peer: a value may not start with '-'");
    if (extra == policy.extra_options.end()) RETURN_IF_ERROR(r->second.check(Ctx{a, v, policy, mirrored}));
    i++;
  }
  return OkStatus();
}

}  // namespace remus
