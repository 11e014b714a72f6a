// The plug backend's rtnetlink requests as libnl builds them, checked
// attribute by attribute without a kernel: the plug qdisc and its commands
// (TCA_KIND "plug", TCA_OPTIONS tc_plug_qopt), the IFB device, the ingress
// qdisc and the u32 + mirred redirect filter.
#include <gtest/gtest.h>
#include <linux/if_ether.h>
#include <linux/if_link.h>
#include <linux/pkt_cls.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <linux/tc_act/tc_mirred.h>
#include <net/if.h>
#include <netlink/attr.h>
#include <netlink/msg.h>
#include <netlink/route/qdisc.h>
#include <netlink/route/tc.h>

#include <cstring>
#include <map>
#include <string>

#include "netbuf/plug.h"

namespace remus::netbuf {
namespace {

using AttrMap = std::map<int, nlattr*>;

AttrMap Attrs(nl_msg* msg, int hdrlen) {
  AttrMap m;
  nlattr* a;
  int rem;
  nlmsg_for_each_attr(a, nlmsg_hdr(msg), hdrlen, rem) m[nla_type(a)] = a;
  return m;
}
AttrMap Nested(nlattr* parent) {
  AttrMap m;
  nlattr* a;
  int rem;
  nla_for_each_nested(a, parent, rem) m[nla_type(a)] = a;
  return m;
}
const tcmsg* Tc(nl_msg* msg) { return static_cast<const tcmsg*>(nlmsg_data(nlmsg_hdr(msg))); }
std::string Str(nlattr* a) { return nla_get_string(a); }

tc_plug_qopt PlugOptions(nlattr* options) {
  EXPECT_EQ(nla_len(options), static_cast<int>(sizeof(tc_plug_qopt)));
  tc_plug_qopt o{};
  std::memcpy(&o, nla_data(options), sizeof o);
  return o;
}

TEST(netbuf_plug_msg, PlugQdiscWithALimit) {
  auto m = BuildPlugQdiscAddRequest(17, 4 << 20);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  nlmsghdr* h = nlmsg_hdr(m->get());
  EXPECT_EQ(h->nlmsg_type, RTM_NEWQDISC);
  EXPECT_EQ(h->nlmsg_flags & (NLM_F_CREATE | NLM_F_EXCL), NLM_F_CREATE | NLM_F_EXCL);
  EXPECT_EQ(Tc(m->get())->tcm_ifindex, 17);
  EXPECT_EQ(Tc(m->get())->tcm_parent, TC_H_ROOT);
  EXPECT_EQ(Tc(m->get())->tcm_handle, TC_HANDLE(1, 0));
  AttrMap a = Attrs(m->get(), sizeof(tcmsg));
  ASSERT_TRUE(a.count(TCA_KIND) && a.count(TCA_OPTIONS));
  EXPECT_EQ(Str(a[TCA_KIND]), "plug");
  EXPECT_EQ(PlugOptions(a[TCA_OPTIONS]).limit, 4u << 20);
}

// Why BuildPlugQdiscAddRequest strips TCA_OPTIONS for the default limit:
// libnl on its own sends tc_plug_qopt{limit 0}, which plug_init takes as
// "hold 0 bytes", i.e. drop everything.
TEST(netbuf_plug_msg, LibnlAloneWouldSendLimitZero) {
  rtnl_qdisc* q = rtnl_qdisc_alloc();
  rtnl_tc_set_ifindex(TC_CAST(q), 17);
  rtnl_tc_set_parent(TC_CAST(q), TC_H_ROOT);
  rtnl_tc_set_handle(TC_CAST(q), TC_HANDLE(1, 0));
  rtnl_tc_set_kind(TC_CAST(q), "plug");
  nl_msg* raw = nullptr;
  ASSERT_EQ(rtnl_qdisc_build_add_request(q, NLM_F_CREATE, &raw), 0);
  NlMsgPtr m(raw);
  rtnl_qdisc_put(q);
  AttrMap a = Attrs(m.get(), sizeof(tcmsg));
  ASSERT_TRUE(a.count(TCA_OPTIONS));
  EXPECT_EQ(PlugOptions(a[TCA_OPTIONS]).limit, 0u);
}

TEST(netbuf_plug_msg, PlugQdiscWithTheKernelDefaultLimitSendsNoOptions) {
  auto m = BuildPlugQdiscAddRequest(17, 0);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(nlmsg_hdr(m->get())->nlmsg_type, RTM_NEWQDISC);
  EXPECT_EQ(Tc(m->get())->tcm_handle, TC_HANDLE(1, 0));
  AttrMap a = Attrs(m->get(), sizeof(tcmsg));
  EXPECT_EQ(a.size(), 1u);
  ASSERT_TRUE(a.count(TCA_KIND));
  EXPECT_EQ(Str(a[TCA_KIND]), "plug");
  EXPECT_FALSE(a.count(TCA_OPTIONS));
}

TEST(netbuf_plug_msg, PlugCommandsChangeTheRootQdisc) {
  const std::pair<PlugAction, int> cases[] = {{PlugAction::kBuffer, TCQ_PLUG_BUFFER},
                                              {PlugAction::kReleaseOne, TCQ_PLUG_RELEASE_ONE},
                                              {PlugAction::kReleaseIndefinite, TCQ_PLUG_RELEASE_INDEFINITE}};
  for (auto [action, want] : cases) {
    auto m = BuildPlugActionRequest(23, action);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    nlmsghdr* h = nlmsg_hdr(m->get());
    EXPECT_EQ(h->nlmsg_type, RTM_NEWQDISC);
    EXPECT_EQ(h->nlmsg_flags & (NLM_F_CREATE | NLM_F_EXCL), 0);  // change, never create
    EXPECT_EQ(Tc(m->get())->tcm_ifindex, 23);
    EXPECT_EQ(Tc(m->get())->tcm_parent, TC_H_ROOT);
    EXPECT_EQ(Tc(m->get())->tcm_handle, TC_HANDLE(1, 0));
    AttrMap a = Attrs(m->get(), sizeof(tcmsg));
    ASSERT_TRUE(a.count(TCA_KIND) && a.count(TCA_OPTIONS));
    EXPECT_EQ(Str(a[TCA_KIND]), "plug");
    EXPECT_EQ(PlugOptions(a[TCA_OPTIONS]).action, want);
  }
}

TEST(netbuf_plug_msg, IngressQdisc) {
  auto m = BuildIngressQdiscAddRequest(5);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(nlmsg_hdr(m->get())->nlmsg_type, RTM_NEWQDISC);
  EXPECT_EQ(Tc(m->get())->tcm_ifindex, 5);
  EXPECT_EQ(Tc(m->get())->tcm_parent, TC_H_INGRESS);
  EXPECT_EQ(Tc(m->get())->tcm_handle, TC_HANDLE(0xffff, 0));
  AttrMap a = Attrs(m->get(), sizeof(tcmsg));
  EXPECT_EQ(Str(a[TCA_KIND]), "ingress");
  EXPECT_FALSE(a.count(TCA_OPTIONS));

  auto d = BuildIngressQdiscDeleteRequest(5);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(nlmsg_hdr(d->get())->nlmsg_type, RTM_DELQDISC);
  EXPECT_EQ(Tc(d->get())->tcm_parent, TC_H_INGRESS);
}

TEST(netbuf_plug_msg, RedirectFilterMatchesAllAndMirrorsToTheIfb) {
  auto m = BuildRedirectFilterAddRequest(5, 42);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(nlmsg_hdr(m->get())->nlmsg_type, RTM_NEWTFILTER);
  const tcmsg* t = Tc(m->get());
  EXPECT_EQ(t->tcm_ifindex, 5);
  EXPECT_EQ(t->tcm_parent, TC_HANDLE(0xffff, 0));
  EXPECT_EQ(TC_H_MAJ(t->tcm_info) >> 16, kRedirectPrio);
  EXPECT_EQ(TC_H_MIN(t->tcm_info), htons(ETH_P_ALL));
  AttrMap a = Attrs(m->get(), sizeof(tcmsg));
  EXPECT_EQ(Str(a[TCA_KIND]), "u32");
  ASSERT_TRUE(a.count(TCA_OPTIONS));
  AttrMap u32 = Nested(a[TCA_OPTIONS]);
  ASSERT_TRUE(u32.count(TCA_U32_SEL) && u32.count(TCA_U32_ACT));

  auto* sel = static_cast<const tc_u32_sel*>(nla_data(u32[TCA_U32_SEL]));
  EXPECT_NE(sel->flags & TC_U32_TERMINAL, 0);
  ASSERT_EQ(sel->nkeys, 1);
  EXPECT_EQ(sel->keys[0].mask, 0u);  // match u32 0 0: every frame
  EXPECT_EQ(sel->keys[0].val, 0u);
  EXPECT_EQ(sel->keys[0].off, 0);

  AttrMap acts = Nested(u32[TCA_U32_ACT]);
  ASSERT_EQ(acts.size(), 1u);
  AttrMap act = Nested(acts.begin()->second);
  ASSERT_TRUE(act.count(TCA_ACT_KIND) && act.count(TCA_ACT_OPTIONS));
  EXPECT_EQ(Str(act[TCA_ACT_KIND]), "mirred");
  AttrMap mopts = Nested(act[TCA_ACT_OPTIONS]);
  ASSERT_TRUE(mopts.count(TCA_MIRRED_PARMS));
  auto* p = static_cast<const tc_mirred*>(nla_data(mopts[TCA_MIRRED_PARMS]));
  EXPECT_EQ(p->eaction, TCA_EGRESS_REDIR);
  EXPECT_EQ(p->ifindex, 42u);
  EXPECT_EQ(p->action, TC_ACT_STOLEN);

  auto d = BuildRedirectFilterDeleteRequest(5);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(nlmsg_hdr(d->get())->nlmsg_type, RTM_DELTFILTER);
  EXPECT_EQ(TC_H_MAJ(Tc(d->get())->tcm_info) >> 16, kRedirectPrio);
  EXPECT_EQ(Tc(d->get())->tcm_parent, TC_HANDLE(0xffff, 0));
}

TEST(netbuf_plug_msg, IfbDevice) {
  auto m = BuildIfbAddRequest("ifr-0123abcd", 1000);
  ASSERT_TRUE(m.ok());
  nlmsghdr* h = nlmsg_hdr(m->get());
  EXPECT_EQ(h->nlmsg_type, RTM_NEWLINK);
  EXPECT_EQ(h->nlmsg_flags & (NLM_F_CREATE | NLM_F_EXCL), NLM_F_CREATE | NLM_F_EXCL);
  AttrMap a = Attrs(m->get(), sizeof(ifinfomsg));
  ASSERT_TRUE(a.count(IFLA_IFNAME) && a.count(IFLA_LINKINFO) && a.count(IFLA_TXQLEN));
  EXPECT_EQ(Str(a[IFLA_IFNAME]), "ifr-0123abcd");
  EXPECT_EQ(nla_get_u32(a[IFLA_TXQLEN]), 1000u);
  AttrMap info = Nested(a[IFLA_LINKINFO]);
  EXPECT_EQ(Str(info[IFLA_INFO_KIND]), "ifb");

  auto up = BuildLinkUpRequest(9, "ifr-0123abcd", "remus:pid=1,start=2");
  ASSERT_TRUE(up.ok());
  auto* ifi = static_cast<const ifinfomsg*>(nlmsg_data(nlmsg_hdr(up->get())));
  EXPECT_EQ(ifi->ifi_index, 9);
  EXPECT_NE(ifi->ifi_flags & IFF_UP, 0u);
  EXPECT_NE(ifi->ifi_change & IFF_UP, 0u);
  AttrMap ua = Attrs(up->get(), sizeof(ifinfomsg));
  ASSERT_TRUE(ua.count(IFLA_IFALIAS));
  EXPECT_EQ(Str(ua[IFLA_IFALIAS]), "remus:pid=1,start=2");

  auto del = BuildLinkDeleteRequest(9);
  ASSERT_TRUE(del.ok());
  EXPECT_EQ(nlmsg_hdr(del->get())->nlmsg_type, RTM_DELLINK);
  EXPECT_EQ(static_cast<const ifinfomsg*>(nlmsg_data(nlmsg_hdr(del->get())))->ifi_index, 9);
}

}  // namespace
}  // namespace remus::netbuf
