// The plug backend, Xen Remus's mechanism, through libnl-route-3. Per tap:
//
//   tap --ingress qdisc ffff:, u32 match-all (prio kRedirectPrio),
//        action mirred egress redirect--> ifr-XXXXXXXX (IFB, ifalias = owner tag)
//                                          root qdisc 1: plug --> back into the tap's
//                                          receive path (bridge, routing)
//
// The guest's transmit is the tap's receive, so its frames (all of them, ARP
// included) wait in the IFB's plug qdisc; traffic towards the guest leaves
// through the tap's egress and is never delayed. The plug commands and when
// they are sent are PlugSchedule's (plug_schedule.h, which also explains why
// a barrier is sometimes merged into the next one). Finish(true) sends
// RELEASE_INDEFINITE, waits briefly for the queue to drain, then removes the
// filter and the IFB; Finish(false) deletes the IFB first (its queue is
// dropped, and the redirect drops frames while its target is gone), then the
// filter.
//
// The netlink requests are built by the Build* functions below (tested
// without a kernel); the plumbing functions send them. Every error is one
// sentence naming the domain and the device.
//
// Thread-safety: see OutputBuffer; the plumbing functions use the socket
// passed in (one thread at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"
#include "netbuf/netbuf.h"
#include "netbuf/rtnl.h"

struct rtnl_qdisc;

namespace remus::netbuf {

inline constexpr uint16_t kRedirectPrio = 0x5245;  // "RE": our filter's preference on the tap's ingress
inline constexpr uint32_t kIfbTxQueueLen = 1000;   // the plug's default limit is txqueuelen * (MTU + 14)
inline constexpr std::string_view kNoSchPlug =
    "the kernel lacks sch_plug (CONFIG_NET_SCH_PLUG); use --netbuf nfqueue";

enum class PlugAction : int { kBuffer = 0, kReleaseOne = 1, kReleaseIndefinite = 2 };  // TCQ_PLUG_*

// ---- requests ----
// RTM_NEWLINK kind ifb, NLM_F_CREATE|NLM_F_EXCL.
StatusOr<NlMsgPtr> BuildIfbAddRequest(std::string_view name, uint32_t txqlen);
// RTM_NEWLINK on an existing link: IFF_UP and IFLA_IFALIAS.
StatusOr<NlMsgPtr> BuildLinkUpRequest(int ifindex, std::string_view name, std::string_view alias);
StatusOr<NlMsgPtr> BuildLinkDeleteRequest(int ifindex);
// RTM_NEWQDISC root 1: kind plug. limit_bytes 0 sends no TCA_OPTIONS, so the
// kernel picks its default (libnl would send limit 0, which drops everything).
StatusOr<NlMsgPtr> BuildPlugQdiscAddRequest(int ifb_ifindex, uint32_t limit_bytes);
// RTM_NEWQDISC change of root 1: with TCA_OPTIONS tc_plug_qopt{action}.
StatusOr<NlMsgPtr> BuildPlugActionRequest(int ifb_ifindex, PlugAction action);
// The change request it is built with, for any kind: `update` (kind and
// options) applied to the existing root qdisc 1: of ifindex. The kernel test
// drives it with pfifo where sch_plug is missing.
StatusOr<NlMsgPtr> BuildRootQdiscChangeRequest(int ifindex, rtnl_qdisc* update);
StatusOr<NlMsgPtr> BuildIngressQdiscAddRequest(int tap_ifindex);
StatusOr<NlMsgPtr> BuildIngressQdiscDeleteRequest(int tap_ifindex);
// RTM_NEWTFILTER on ffff:, u32 match-all, protocol all, prio kRedirectPrio,
// action mirred egress redirect (TC_ACT_STOLEN) to ifb_ifindex.
StatusOr<NlMsgPtr> BuildRedirectFilterAddRequest(int tap_ifindex, int ifb_ifindex);
StatusOr<NlMsgPtr> BuildRedirectFilterDeleteRequest(int tap_ifindex);

// ---- plumbing (the caller's network namespace) ----
// Creates an IFB device, sets it up and tags it; returns its ifindex.
StatusOr<int> CreateIfb(RtnlSocket& s, std::string_view name, std::string_view alias);
Status DeleteLink(RtnlSocket& s, int ifindex, std::string_view name);
// FailedPrecondition(kNoSchPlug) when the kernel does not know the plug kind.
Status AddPlugQdisc(RtnlSocket& s, int ifb_ifindex, uint32_t limit_bytes);
Status SendPlugAction(RtnlSocket& s, int ifb_ifindex, PlugAction action);
// Adds the ingress qdisc if the tap has none (*created says whether we did)
// and our redirect filter.
Status AddIngressRedirect(RtnlSocket& s, int tap_ifindex, int ifb_ifindex, bool* created_ingress);
// Removes our filter, and the ingress qdisc if we created it.
Status RemoveIngressRedirect(RtnlSocket& s, int tap_ifindex, bool delete_ingress);
struct QdiscCounters {
  uint64_t qlen = 0;     // held now
  uint64_t drops = 0;    // over the limit
  uint64_t packets = 0;  // let go so far
};
StatusOr<QdiscCounters> PlugCounters(RtnlSocket& s, int ifb_ifindex);

// REQUIRES: opts.mode == "plug", opts.interfaces not empty.
StatusOr<std::unique_ptr<OutputBuffer>> MakePlugOutputBuffer(const NetbufOptions& opts);

// Tries IFB, plug, ingress, u32 and mirred in the CALLER's network namespace
// (CheckNetbufSupport runs it in a throwaway one). Leaves nothing behind.
Status CheckPlugSupportHere();

// Deletes ifr-* IFB devices whose owner is gone, and the redirect filters
// (any tap's ingress, prio kRedirectPrio) that point at them.
Status CleanupStalePlug();

}  // namespace remus::netbuf
