// The network interfaces of a libvirt domain, from its live XML: which host
// devices carry the guest's packets, for output buffering (netbuf) in
// libvirt mode.
//
// Output buffering holds what the guest sends on the host side of its NIC,
// the tap device (docs/operator-guide.md, "Output buffering"). libvirt names
// that tap in the live XML: <interface type=...><target dev='vnet0'/>. Only
// interfaces backed by a tap can be held: types ethernet, bridge and network
// (a virtual network whose forward mode puts a tap in a bridge, or routes
// it). The others leave the host some other way: user networking through
// QEMU's own sockets (or passt), hostdev/VFIO and vdpa in hardware,
// vhostuser through another process, direct (macvtap) straight to the
// lower device, mcast/udp/server/client through QEMU's sockets. An interface
// of type network forwarding through macvtap or hostdev also shows up as
// type network: its target is then not a tap, which DomainTapDevices checks
// on the host (tun_flags in sysfs).
//
// The XML is parsed with libxml2, as untrusted input (libvirt/xml.h).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "replicator/libvirt/session.h"

namespace remus {

// One <interface> element of <devices>, in document order.
struct DomainInterface {
  std::string type;    // type= attribute: ethernet, bridge, network, user, hostdev, ...
  std::string target;  // <target dev=>: the host device; "" if none
  std::string mac;     // <mac address=>; "" if none
  std::string alias;   // <alias name=> (live XML: net0, ...); "" if none
  std::string model;   // <model type=>; "" if none
  std::string source;  // <source network= | bridge= | dev=>, first found, for messages; "" if none
};

// The <interface> elements of a domain XML's <devices>. InvalidArgument if
// the text is not well-formed XML or its root is not <domain> (or as
// libvirt_xml::Parse refuses it: too large, a DOCTYPE).
StatusOr<std::vector<DomainInterface>> ParseDomainInterfaces(std::string_view xml);

// How an interface is named in messages: "net0 (52:54:00:12:34:56)", or the
// MAC alone, or "#<index+1>" when the XML gives neither.
std::string DescribeInterface(const DomainInterface& i, size_t index);

// The host devices whose packets netbuf holds for domain, from its live XML:
// each interface's <target dev=>, in document order, duplicates once.
// FailedPrecondition, naming the domain, the interface and the fix
// (--netbuf none, or a tap-backed interface), for an interface whose packets
// cannot be held on the host: a type other than ethernet, bridge or network,
// no <target dev=> (name the device with --netbuf-if), or a target that
// exists under sys_class_net but is not a tap (no tun_flags: macvtap, a
// hostdev's VF). A target missing from sys_class_net is returned as is (the
// caller reports it as not in remusd's network namespace). InvalidArgument as
// ParseDomainInterfaces.
StatusOr<std::vector<std::string>> DomainTapDevices(std::string_view live_xml, const std::string& domain,
                                                    const std::string& sys_class_net = "/sys/class/net");

// DomainTapDevices of the live XML of session's domain.
StatusOr<std::vector<std::string>> LibvirtTapDevices(const LibvirtSession& session);

}  // namespace remus
