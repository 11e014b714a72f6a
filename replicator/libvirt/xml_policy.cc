#include "replicator/libvirt/xml_policy.h"

#include <algorithm>
#include <filesystem>

#include "replicator/libvirt/xml.h"

namespace remus {

namespace {

using libvirt_xml::Child;
using libvirt_xml::ChildProp;
using libvirt_xml::Named;
using libvirt_xml::Prop;
using libvirt_xml::XPath;

std::string Name(const xmlNode* n) {
  std::string p = n->ns && n->ns->prefix ? reinterpret_cast<const char*>(n->ns->prefix) + std::string(":") : "";
  return "<" + p + reinterpret_cast<const char*>(n->name) + ">";
}

// "<interface type='hostdev'>" for messages.
std::string Desc(const xmlNode* n) {
  std::string s = Name(n);
  std::string t = Prop(n, "type");
  if (!t.empty()) s = s.substr(0, s.size() - 1) + " type='" + t + "'>";
  return s;
}

Status Refuse(const xmlNode* n, const std::string& why) {
  return PermissionDenied("domain XML element " + Desc(n) + " (line " + std::to_string(xmlGetLineNo(n)) +
                          ") is not accepted from a peer: " + why);
}

bool Extra(const PeerPolicy& p, const xmlNode* n) {
  return std::find(p.extra_libvirt_elements.begin(), p.extra_libvirt_elements.end(),
                   reinterpret_cast<const char*>(n->name)) != p.extra_libvirt_elements.end();
}

Status File(const xmlNode* n, const std::string& path, const std::string& what, const PeerPolicy& p,
            PeerFileAccess access = PeerFileAccess::kRead) {
  Status s = CheckPeerFile(path, what, p, access);
  return s.ok() ? s : Refuse(n, s.message());
}

bool InMetadata(const xmlNode* n) {
  for (const xmlNode* a = n->parent; a && a->type == XML_ELEMENT_NODE; a = a->parent)
    if (Named(a, "metadata") && a->parent && Named(a->parent, "domain") && a->parent->parent &&
        a->parent->parent->type == XML_DOCUMENT_NODE)
      return true;
  return false;
}

bool IsQemuNs(const xmlNs* ns) {
  return ns && ns->href && std::string_view(reinterpret_cast<const char*>(ns->href)) == kLibvirtQemuXmlNamespace;
}

Status Namespaces(xmlNode* n) {
  for (; n; n = n->next) {
    if (n->type != XML_ELEMENT_NODE) continue;
    if (IsQemuNs(n->ns))
      return Refuse(n, "libvirt's QEMU namespace passes arguments, capabilities or properties to QEMU unchecked");
    for (xmlAttr* a = n->properties; a; a = a->next)
      if (IsQemuNs(a->ns)) return Refuse(n, "an attribute in libvirt's QEMU namespace");
    if (n->ns && !InMetadata(n))
      return Refuse(n, "an element of another namespace is accepted only inside <metadata>");
    RETURN_IF_ERROR(Namespaces(n->children));
  }
  return OkStatus();
}

// A <serial>, <console>, <parallel> or <channel>.
Status Chardev(xmlNode* n, const PeerPolicy& p) {
  std::string type = Prop(n, "type");
  if (type.empty() || type == "pty" || type == "null" || type == "vc" || type == "stdio" || type == "spicevmc" ||
      type == "qemu-vdagent" || type == "file")
    return OkStatus();  // a file's path is moved into the run directory
  if (type == "unix") {
    for (xmlNode* c = n->children; c; c = c->next)
      if (Named(c, "source") && libvirt_xml::HasProp(c, "path"))
        RETURN_IF_ERROR(File(n, Prop(c, "path"), "a unix socket", p, PeerFileAccess::kWrite));
    return OkStatus();
  }
  return Refuse(n, "only file, pty, null, vc, stdio, spicevmc, qemu-vdagent and unix character devices are accepted");
}

Status Disk(xmlNode* n, const std::set<std::string>& mirrored, const PeerPolicy& p) {
  std::string dev = ChildProp(n, "target", "dev");
  if (mirrored.count(dev)) return OkStatus();  // onto the backup's own image
  std::string type = Prop(n, "type");
  XPath xp(n->doc);
  std::vector<xmlNode*> sources = xp.Nodes("./source | .//backingStore/source", n);
  if (sources.empty()) return OkStatus();  // an empty CD-ROM drive
  bool read_only = Child(n, "readonly") != nullptr;
  if (!read_only && (type == "file" || type == "block")) {
    // Shared storage: the primary's own image, reachable here at its path.
    bool shared = true;
    for (xmlNode* s : sources)
      for (const char* attr : {"file", "dev", "dir"})
        if (libvirt_xml::HasProp(s, attr)) shared &= CheckSharedDisk(Prop(s, attr), "", p).ok();
    if (shared) return OkStatus();
  }
  if (!read_only)
    return Refuse(n, "disk '" + dev + "' is writable and not mirrored to this backup: the restored guest would open "
                     "the primary's storage on this host (mirror the disk, make it <readonly/>, or, on shared storage, "
                     "remusd --allow-shared-disks DIR)");
  for (xmlNode* s : sources) {
    if (type != "file" && type != "block" && !(Named(s->parent, "backingStore") && Prop(s->parent, "type") == "file"))
      return Refuse(n, "disk '" + dev + "' of type '" + type + "': only file and block sources are accepted");
    for (const char* attr : {"file", "dev", "dir"})
      if (libvirt_xml::HasProp(s, attr)) RETURN_IF_ERROR(File(n, Prop(s, attr), "a read-only disk image", p));
  }
  return OkStatus();
}

Status Interface(xmlNode* n) {
  std::string type = Prop(n, "type");
  for (const char* t : {"hostdev", "vhostuser", "vdpa", "server", "client", "mcast", "udp"})
    if (type == t) return Refuse(n, "it connects the guest to a device or socket of this host");
  if (Child(n, "script") || Child(n, "downscript")) return Refuse(n, "a <script> or <downscript> runs on this host");
  if (xmlNode* b = Child(n, "backend"); b && (libvirt_xml::HasProp(b, "tap") || libvirt_xml::HasProp(b, "vhost")))
    return Refuse(n, "<backend tap=|vhost=> names a device path on this host");
  return OkStatus();
}

Status Device(xmlNode* n, const std::set<std::string>& mirrored, const PeerPolicy& p) {
  if (Extra(p, n)) return OkStatus();
  std::string type = Prop(n, "type");
  if (Named(n, "hostdev")) return Refuse(n, "it passes a host device through to the guest");
  if (Named(n, "filesystem")) return Refuse(n, "it exports a directory of this host to the guest");
  if (Named(n, "redirdev")) return Refuse(n, "it redirects a USB device from this host or a socket");
  if (Named(n, "smartcard")) return Refuse(n, "it gives the guest a smartcard of this host");
  if (Named(n, "shmem")) return Refuse(n, "it shares memory with this host");
  if (Named(n, "lease")) return Refuse(n, "it names a lock file on this host");
  if (Named(n, "vsock")) return Refuse(n, "it gives the guest a socket into this host");
  if (Named(n, "disk")) return Disk(n, mirrored, p);
  if (Named(n, "interface")) return Interface(n);
  if (Named(n, "serial") || Named(n, "console") || Named(n, "parallel") || Named(n, "channel")) {
    RETURN_IF_ERROR(Chardev(n, p));
  }
  if (Named(n, "input") && (type == "passthrough" || type == "evdev"))
    return Refuse(n, "it passes an input device of this host through");
  if (Named(n, "tpm")) {
    xmlNode* b = Child(n, "backend");
    if (b && Prop(b, "type") == "passthrough") return Refuse(n, "it passes this host's TPM through");
  }
  if (Named(n, "rng")) {
    xmlNode* b = Child(n, "backend");
    if (b && Prop(b, "model") == "egd") return Refuse(n, "an egd backend talks to a socket or device of this host");
    std::string f = b ? libvirt_xml::Text(b) : "";
    if (b && !f.empty() && f != "/dev/urandom" && f != "/dev/random" && f != "/dev/hwrng")
      return Refuse(n, "an rng may read /dev/urandom, /dev/random or /dev/hwrng only");
  }
  if (Named(n, "memory")) {
    XPath xp(n->doc);
    if (xmlNode* path = xp.First("./source/path", n))
      RETURN_IF_ERROR(File(n, libvirt_xml::Text(path), "a guest memory file", p, PeerFileAccess::kWrite));
  }
  if (Named(n, "audio") && type == "file") return Refuse(n, "it writes a file on this host");
  if (Named(n, "graphics")) {
    for (xmlNode* c = n->children; c; c = c->next)
      if (Named(c, "listen") && Prop(c, "type") == "socket" && libvirt_xml::HasProp(c, "socket"))
        RETURN_IF_ERROR(File(n, Prop(c, "socket"), "a display socket", p, PeerFileAccess::kWrite));
  }
  return OkStatus();
}

}  // namespace

std::string DomainXmlEmulator(std::string_view xml) {
  auto doc = libvirt_xml::ParseDomain(xml);
  if (!doc.ok()) return "";
  xmlNode* e = XPath(doc->get()).First("/domain/devices/emulator");
  return e ? libvirt_xml::Text(e) : "";
}

Status CheckDomainXml(std::string_view xml, const std::set<std::string>& mirrored, const PeerPolicy& policy,
                      bool own_qemu) {
  ASSIGN_OR_RETURN(libvirt_xml::Doc doc, libvirt_xml::ParseDomain(xml));
  xmlNode* root = xmlDocGetRootElement(doc.get());
  RETURN_IF_ERROR(Namespaces(root));
  XPath xp(doc.get());
  // <log file=> writes the device's output to that file: only file chardevs'
  // logs are moved into the run directory.
  for (xmlNode* log : xp.Nodes("//log[@file]")) {
    xmlNode* dev = log->parent;
    bool moved = dev && Prop(dev, "type") == "file" &&
                 (Named(dev, "serial") || Named(dev, "console") || Named(dev, "parallel") || Named(dev, "channel")) &&
                 dev->parent && Named(dev->parent, "devices");
    if (!moved) return Refuse(log, "it writes the device's output to a file on this host");
  }
  if (xmlNode* e = xp.First("/domain/devices/emulator"); e && !own_qemu) {
    std::string path = libvirt_xml::Text(e);
    if (!IsQemuBinaryName(std::filesystem::path(path).filename().string()))
      return Refuse(e, "emulator '" + path + "' is not named qemu-system-ARCH, and this backup has no --qemu of its own");
  }
  for (xmlNode* n : xp.Nodes("/domain/os/kernel | /domain/os/initrd | /domain/os/dtb | /domain/os/loader")) {
    std::string path = libvirt_xml::Text(n);
    if (!path.empty()) RETURN_IF_ERROR(File(n, path, "a file the restored guest boots from", policy));
  }
  for (xmlNode* n : xp.Nodes("/domain/os/nvram")) {
    std::string path = libvirt_xml::Text(n);
    if (!path.empty()) RETURN_IF_ERROR(File(n, path, "a firmware variables file", policy, PeerFileAccess::kWrite));
    if (libvirt_xml::HasProp(n, "template"))
      RETURN_IF_ERROR(File(n, Prop(n, "template"), "a firmware variables template", policy));
  }
  for (xmlNode* n : xp.Nodes("/domain/os/acpi/table"))
    RETURN_IF_ERROR(File(n, libvirt_xml::Text(n), "an ACPI table file", policy));
  for (xmlNode* n : xp.Nodes("/domain/sysinfo/entry[@file]"))
    RETURN_IF_ERROR(File(n, Prop(n, "file"), "a file handed to the guest through fw_cfg", policy));
  for (xmlNode* n : xp.Nodes("/domain/devices/*")) RETURN_IF_ERROR(Device(n, mirrored, policy));
  return OkStatus();
}

}  // namespace remus
