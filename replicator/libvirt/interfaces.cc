#include "replicator/libvirt/interfaces.h"

#include <unistd.h>

#include <algorithm>

#include "replicator/libvirt/xml.h"

namespace remus {
namespace {

using libvirt_xml::ChildProp;
using libvirt_xml::Named;
using libvirt_xml::Prop;

// What an interface type is, for the refusal (why its packets escape the host side).
std::string WhyNotHeld(const std::string& type) {
  if (type == "user") return "user networking (QEMU's own sockets, or passt)";
  if (type == "hostdev") return "a host PCI device passed through (VFIO)";
  if (type == "vdpa") return "a vDPA device (the NIC's hardware datapath)";
  if (type == "vhostuser") return "vhost-user (another process's datapath)";
  if (type == "direct") return "macvtap straight onto a host device (no tap)";
  if (type == "mcast" || type == "udp" || type == "server" || type == "client")
    return "a QEMU socket backend (" + type + ")";
  return "of type '" + type + "'";
}

const char kFix[] =
    "use an interface of type ethernet, bridge or network (a tap), or --netbuf none to run without output buffering";

}  // namespace

StatusOr<std::vector<DomainInterface>> ParseDomainInterfaces(std::string_view xml) {
  ASSIGN_OR_RETURN(libvirt_xml::Doc doc, libvirt_xml::ParseDomain(xml));
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  std::vector<DomainInterface> out;
  for (const xmlNode* d = root->children; d; d = d->next) {
    if (!Named(d, "devices")) continue;
    for (const xmlNode* n = d->children; n; n = n->next) {
      if (!Named(n, "interface")) continue;
      DomainInterface i;
      i.type = Prop(n, "type");
      i.target = ChildProp(n, "target", "dev");
      i.mac = ChildProp(n, "mac", "address");
      i.alias = ChildProp(n, "alias", "name");
      i.model = ChildProp(n, "model", "type");
      for (const char* a : {"network", "bridge", "dev"}) {
        i.source = ChildProp(n, "source", a);
        if (!i.source.empty()) break;
      }
      out.push_back(std::move(i));
    }
  }
  return out;
}

std::string DescribeInterface(const DomainInterface& i, size_t index) {
  if (!i.alias.empty()) return i.mac.empty() ? i.alias : i.alias + " (" + i.mac + ")";
  if (!i.mac.empty()) return i.mac;
  return "#" + std::to_string(index + 1);
}

StatusOr<std::vector<std::string>> DomainTapDevices(std::string_view live_xml, const std::string& domain,
                                                    const std::string& sys_class_net) {
  auto parsed = ParseDomainInterfaces(live_xml);
  if (!parsed.ok()) return parsed.status().Annotate("domain " + domain);
  std::vector<std::string> taps;
  for (size_t k = 0; k < parsed->size(); ++k) {
    const DomainInterface& i = (*parsed)[k];
    const std::string what = "domain " + domain + ": interface " + DescribeInterface(i, k);
    if (i.type != "ethernet" && i.type != "bridge" && i.type != "network")
      return FailedPrecondition(what + " is " + WhyNotHeld(i.type) + ", whose packets cannot be held on the host; " +
                                kFix);
    if (i.target.empty())
      return FailedPrecondition(what + " (type " + i.type +
                                ") has no <target dev=> in the live XML: cannot tell which host device carries its "
                                "packets; name it with --netbuf-if, or use --netbuf none");
    const std::string dev = sys_class_net + "/" + i.target;
    if (::access(dev.c_str(), F_OK) == 0 && ::access((dev + "/tun_flags").c_str(), F_OK) != 0)
      return FailedPrecondition(what + " (type " + i.type + (i.source.empty() ? "" : ", source " + i.source) +
                                ") sends through " + i.target +
                                ", which is not a tap (macvtap or a passed-through device?): its packets cannot be "
                                "held on the host; " + kFix);
    if (std::find(taps.begin(), taps.end(), i.target) == taps.end()) taps.push_back(i.target);
  }
  return taps;
}

StatusOr<std::vector<std::string>> LibvirtTapDevices(const LibvirtSession& session) {
  ASSIGN_OR_RETURN(std::string xml, session.LiveXml());
  return DomainTapDevices(xml, session.domain());
}

}  // namespace remus
