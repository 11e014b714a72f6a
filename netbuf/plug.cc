#include "netbuf/plug.h"

#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <linux/pkt_sched.h>
#include <linux/tc_act/tc_mirred.h>
#include <net/if.h>
#include <netlink/errno.h>
#include <netlink/msg.h>
#include <netlink/netlink.h>
#include <netlink/route/act/mirred.h>
#include <netlink/route/action.h>
#include <netlink/route/classifier.h>
#include <netlink/route/cls/u32.h>
#include <netlink/route/link.h>
#include <netlink/route/qdisc.h>
#include <netlink/route/qdisc/plug.h>
#include <netlink/route/tc.h>

#include <chrono>
#include <thread>
#include <vector>

#include "common/log.h"
#include "common/thread_annotations.h"
#include "netbuf/naming.h"
#include "netbuf/plug_schedule.h"

namespace remus::netbuf {
namespace {

struct QdiscDeleter {
  void operator()(rtnl_qdisc* q) const { rtnl_qdisc_put(q); }
};
struct ClsDeleter {
  void operator()(rtnl_cls* c) const { rtnl_cls_put(c); }
};
struct LinkDeleter {
  void operator()(rtnl_link* l) const { rtnl_link_put(l); }
};
using QdiscPtr = std::unique_ptr<rtnl_qdisc, QdiscDeleter>;
using ClsPtr = std::unique_ptr<rtnl_cls, ClsDeleter>;
using LinkPtr = std::unique_ptr<rtnl_link, LinkDeleter>;

constexpr uint32_t kPlugHandle = TC_HANDLE(1, 0);
constexpr uint32_t kIngressHandle = TC_HANDLE(0xffff, 0);

StatusOr<NlMsgPtr> Built(int err, nl_msg* msg, std::string_view what) {
  if (err < 0) return NlStatus(what, err);
  return NlMsgPtr(msg);
}

QdiscPtr Qdisc(int ifindex, uint32_t parent, uint32_t handle, const char* kind) {
  QdiscPtr q(rtnl_qdisc_alloc());
  if (!q) return q;
  rtnl_tc_set_ifindex(TC_CAST(q.get()), ifindex);
  rtnl_tc_set_parent(TC_CAST(q.get()), parent);
  rtnl_tc_set_handle(TC_CAST(q.get()), handle);
  if (kind) rtnl_tc_set_kind(TC_CAST(q.get()), kind);
  return q;
}

ClsPtr RedirectCls(int tap_ifindex) {
  ClsPtr c(rtnl_cls_alloc());
  if (!c) return c;
  rtnl_tc_set_ifindex(TC_CAST(c.get()), tap_ifindex);
  rtnl_tc_set_parent(TC_CAST(c.get()), kIngressHandle);
  rtnl_tc_set_kind(TC_CAST(c.get()), "u32");
  rtnl_cls_set_prio(c.get(), kRedirectPrio);
  rtnl_cls_set_protocol(c.get(), ETH_P_ALL);
  return c;
}

// A copy of a request without one attribute (libnl always fills the plug
// options, see BuildPlugQdiscAddRequest).
StatusOr<NlMsgPtr> WithoutAttribute(nl_msg* in, int hdrlen, int type) {
  nlmsghdr* h = nlmsg_hdr(in);
  NlMsgPtr out(nlmsg_alloc_simple(h->nlmsg_type, h->nlmsg_flags));
  if (!out) return ResourceExhausted("cannot allocate a netlink message");
  if (nlmsg_append(out.get(), nlmsg_data(h), static_cast<size_t>(hdrlen), NLMSG_ALIGNTO) < 0)
    return ResourceExhausted("cannot build a netlink message");
  nlattr* a;
  int rem;
  nlmsg_for_each_attr(a, h, hdrlen, rem) {
    if (nla_type(a) == type) continue;
    if (nla_put(out.get(), nla_type(a), nla_len(a), nla_data(a)) < 0)
      return ResourceExhausted("cannot build a netlink message");
  }
  return out;
}

}  // namespace

// ---- requests ----

StatusOr<NlMsgPtr> BuildIfbAddRequest(std::string_view name, uint32_t txqlen) {
  LinkPtr l(rtnl_link_alloc());
  if (!l) return ResourceExhausted("cannot allocate a link object");
  rtnl_link_set_name(l.get(), std::string(name).c_str());
  int err = rtnl_link_set_type(l.get(), "ifb");
  if (err < 0) return NlStatus("ifb link", err);
  rtnl_link_set_txqlen(l.get(), txqlen);
  nl_msg* msg = nullptr;
  err = rtnl_link_build_add_request(l.get(), NLM_F_CREATE | NLM_F_EXCL, &msg);
  return Built(err, msg, "building the request for " + std::string(name));
}

StatusOr<NlMsgPtr> BuildLinkUpRequest(int ifindex, std::string_view name, std::string_view alias) {
  LinkPtr orig(rtnl_link_alloc()), change(rtnl_link_alloc());
  if (!orig || !change) return ResourceExhausted("cannot allocate a link object");
  rtnl_link_set_ifindex(orig.get(), ifindex);
  rtnl_link_set_name(orig.get(), std::string(name).c_str());
  rtnl_link_set_flags(change.get(), IFF_UP);
  rtnl_link_set_ifalias(change.get(), std::string(alias).c_str());
  nl_msg* msg = nullptr;
  int err = rtnl_link_build_change_request(orig.get(), change.get(), 0, &msg);
  return Built(err, msg, "building the request for " + std::string(name));
}

StatusOr<NlMsgPtr> BuildLinkDeleteRequest(int ifindex) {
  LinkPtr l(rtnl_link_alloc());
  if (!l) return ResourceExhausted("cannot allocate a link object");
  rtnl_link_set_ifindex(l.get(), ifindex);
  nl_msg* msg = nullptr;
  int err = rtnl_link_build_delete_request(l.get(), &msg);
  return Built(err, msg, "building a link delete request");
}

StatusOr<NlMsgPtr> BuildPlugQdiscAddRequest(int ifb_ifindex, uint32_t limit_bytes) {
  QdiscPtr q = Qdisc(ifb_ifindex, TC_H_ROOT, kPlugHandle, "plug");
  if (!q) return ResourceExhausted("cannot allocate a qdisc object");
  if (limit_bytes > 0) rtnl_qdisc_plug_set_limit(q.get(), static_cast<int>(limit_bytes));
  nl_msg* msg = nullptr;
  int err = rtnl_qdisc_build_add_request(q.get(), NLM_F_CREATE | NLM_F_EXCL, &msg);
  ASSIGN_OR_RETURN(NlMsgPtr built, Built(err, msg, "building the plug qdisc request"));
  if (limit_bytes > 0) return built;
  // libnl always appends tc_plug_qopt, with limit 0 when none was set, and
  // the kernel takes a present limit as is: a plug that drops every packet.
  // Without TCA_OPTIONS the kernel uses txqueuelen * (MTU + 14).
  return WithoutAttribute(built.get(), sizeof(tcmsg), TCA_OPTIONS);
}

StatusOr<NlMsgPtr> BuildRootQdiscChangeRequest(int ifindex, rtnl_qdisc* update) {
  QdiscPtr cur = Qdisc(ifindex, TC_H_ROOT, kPlugHandle, nullptr);
  if (!cur) return ResourceExhausted("cannot allocate a qdisc object");
  nl_msg* msg = nullptr;
  // RTM_NEWQDISC without NLM_F_CREATE naming the existing root 1: reaches
  // qdisc_change, i.e. the qdisc's own change op (plug_change).
  int err = rtnl_qdisc_build_update_request(cur.get(), update, NLM_F_REPLACE, &msg);
  return Built(err, msg, "building the qdisc change request");
}

StatusOr<NlMsgPtr> BuildPlugActionRequest(int ifb_ifindex, PlugAction action) {
  QdiscPtr upd(rtnl_qdisc_alloc());
  if (!upd) return ResourceExhausted("cannot allocate a qdisc object");
  rtnl_tc_set_kind(TC_CAST(upd.get()), "plug");
  int err = 0;
  switch (action) {
    case PlugAction::kBuffer: err = rtnl_qdisc_plug_buffer(upd.get()); break;
    case PlugAction::kReleaseOne: err = rtnl_qdisc_plug_release_one(upd.get()); break;
    case PlugAction::kReleaseIndefinite: err = rtnl_qdisc_plug_release_indefinite(upd.get()); break;
  }
  if (err < 0) return NlStatus("plug action", err);
  return BuildRootQdiscChangeRequest(ifb_ifindex, upd.get());
}

StatusOr<NlMsgPtr> BuildIngressQdiscAddRequest(int tap_ifindex) {
  QdiscPtr q = Qdisc(tap_ifindex, TC_H_INGRESS, kIngressHandle, "ingress");
  if (!q) return ResourceExhausted("cannot allocate a qdisc object");
  nl_msg* msg = nullptr;
  int err = rtnl_qdisc_build_add_request(q.get(), NLM_F_CREATE | NLM_F_EXCL, &msg);
  return Built(err, msg, "building the ingress qdisc request");
}

StatusOr<NlMsgPtr> BuildIngressQdiscDeleteRequest(int tap_ifindex) {
  QdiscPtr q = Qdisc(tap_ifindex, TC_H_INGRESS, kIngressHandle, "ingress");
  if (!q) return ResourceExhausted("cannot allocate a qdisc object");
  nl_msg* msg = nullptr;
  int err = rtnl_qdisc_build_delete_request(q.get(), &msg);
  return Built(err, msg, "building the ingress qdisc delete request");
}

StatusOr<NlMsgPtr> BuildRedirectFilterAddRequest(int tap_ifindex, int ifb_ifindex) {
  ClsPtr c = RedirectCls(tap_ifindex);
  rtnl_act* act = rtnl_act_alloc();
  if (!c || !act) {
    if (act) rtnl_act_put(act);
    return ResourceExhausted("cannot allocate a filter object");
  }
  rtnl_tc_set_kind(TC_CAST(act), "mirred");
  rtnl_mirred_set_action(act, TCA_EGRESS_REDIR);
  rtnl_mirred_set_policy(act, TC_ACT_STOLEN);
  rtnl_mirred_set_ifindex(act, static_cast<uint32_t>(ifb_ifindex));
  // Match every frame: one key, value 0 under mask 0 at offset 0 ("match u32 0 0").
  int err = rtnl_u32_add_key_uint32(c.get(), 0, 0, 0, 0);
  if (err == 0) err = rtnl_u32_set_cls_terminal(c.get());
  if (err == 0) err = rtnl_u32_add_action(c.get(), act);  // takes its own reference
  rtnl_act_put(act);
  if (err < 0) return NlStatus("redirect filter", err);
  nl_msg* msg = nullptr;
  err = rtnl_cls_build_add_request(c.get(), NLM_F_CREATE | NLM_F_EXCL, &msg);
  return Built(err, msg, "building the redirect filter request");
}

StatusOr<NlMsgPtr> BuildRedirectFilterDeleteRequest(int tap_ifindex) {
  ClsPtr c = RedirectCls(tap_ifindex);
  if (!c) return ResourceExhausted("cannot allocate a filter object");
  nl_msg* msg = nullptr;
  int err = rtnl_cls_build_delete_request(c.get(), 0, &msg);
  return Built(err, msg, "building the redirect filter delete request");
}

// ---- plumbing ----

StatusOr<int> CreateIfb(RtnlSocket& s, std::string_view name, std::string_view alias) {
  std::string n(name);
  ASSIGN_OR_RETURN(NlMsgPtr add, BuildIfbAddRequest(name, kIfbTxQueueLen));
  Status st = s.Request(std::move(add), "creating IFB device " + n);
  if (st.code() == Code::kUnimplemented || st.code() == Code::kNotFound)
    return FailedPrecondition("the kernel lacks IFB devices (CONFIG_IFB); use --netbuf nfqueue");
  RETURN_IF_ERROR(st);
  auto link = LookupLink(s, name);
  if (!link.ok()) return link.status();
  ASSIGN_OR_RETURN(NlMsgPtr up, BuildLinkUpRequest(link->ifindex, name, alias));
  st = s.Request(std::move(up), "setting IFB device " + n + " up");
  if (!st.ok()) {
    (void)DeleteLink(s, link->ifindex, name);
    return st;
  }
  return link->ifindex;
}

Status DeleteLink(RtnlSocket& s, int ifindex, std::string_view name) {
  ASSIGN_OR_RETURN(NlMsgPtr m, BuildLinkDeleteRequest(ifindex));
  return s.Request(std::move(m), "deleting " + std::string(name));
}

Status AddPlugQdisc(RtnlSocket& s, int ifb_ifindex, uint32_t limit_bytes) {
  ASSIGN_OR_RETURN(NlMsgPtr m, BuildPlugQdiscAddRequest(ifb_ifindex, limit_bytes));
  Status st = s.Request(std::move(m), "adding the plug qdisc");
  // ENOENT: "Specified qdisc kind is unknown" (after the kernel tried to
  // load sch_plug).
  if (st.code() == Code::kNotFound) return FailedPrecondition(std::string(kNoSchPlug));
  return st;
}

Status SendPlugAction(RtnlSocket& s, int ifb_ifindex, PlugAction action) {
  ASSIGN_OR_RETURN(NlMsgPtr m, BuildPlugActionRequest(ifb_ifindex, action));
  return s.Request(std::move(m), "sending a plug command");
}

Status AddIngressRedirect(RtnlSocket& s, int tap_ifindex, int ifb_ifindex, bool* created_ingress) {
  *created_ingress = false;
  ASSIGN_OR_RETURN(NlMsgPtr q, BuildIngressQdiscAddRequest(tap_ifindex));
  Status st = s.Request(std::move(q), "adding the ingress qdisc");
  if (st.ok()) *created_ingress = true;
  else if (st.code() != Code::kAlreadyExists) return st;  // an existing ingress qdisc is shared
  ASSIGN_OR_RETURN(NlMsgPtr f, BuildRedirectFilterAddRequest(tap_ifindex, ifb_ifindex));
  st = s.Request(std::move(f), "adding the redirect filter");
  if (!st.ok() && *created_ingress) {
    if (auto d = BuildIngressQdiscDeleteRequest(tap_ifindex); d.ok()) (void)s.Request(std::move(d).value(), "");
    *created_ingress = false;
  }
  return st;
}

Status RemoveIngressRedirect(RtnlSocket& s, int tap_ifindex, bool delete_ingress) {
  if (delete_ingress) {  // takes the filter with it
    ASSIGN_OR_RETURN(NlMsgPtr m, BuildIngressQdiscDeleteRequest(tap_ifindex));
    return s.Request(std::move(m), "deleting the ingress qdisc");
  }
  ASSIGN_OR_RETURN(NlMsgPtr m, BuildRedirectFilterDeleteRequest(tap_ifindex));
  return s.Request(std::move(m), "deleting the redirect filter");
}

StatusOr<QdiscCounters> PlugCounters(RtnlSocket& s, int ifb_ifindex) {
  nl_cache* cache = nullptr;
  int err = rtnl_qdisc_alloc_cache(s.get(), &cache);
  if (err < 0) return NlStatus("listing qdiscs", err);
  QdiscCounters c;
  rtnl_qdisc* q = rtnl_qdisc_get(cache, ifb_ifindex, kPlugHandle);
  if (q) {
    c.qlen = rtnl_tc_get_stat(TC_CAST(q), RTNL_TC_QLEN);
    c.drops = rtnl_tc_get_stat(TC_CAST(q), RTNL_TC_DROPS);
    c.packets = rtnl_tc_get_stat(TC_CAST(q), RTNL_TC_PACKETS);
    rtnl_qdisc_put(q);
  }
  nl_cache_free(cache);
  if (!q) return NotFound("no plug qdisc on ifindex " + std::to_string(ifb_ifindex));
  return c;
}

// ---- the backend ----

namespace {

class PlugOutputBuffer final : public OutputBuffer, private PlugControl {
 public:
  PlugOutputBuffer(std::string domain, RtnlSocket sock)
      : domain_(std::move(domain)), tag_("netbuf[" + domain_ + "]"), sock_(std::move(sock)) {}
  ~PlugOutputBuffer() override {
    Status s = Finish(false);
    if (!s.ok()) LOG_ERROR(tag_) << "tearing down the plug buffer: " << s.ToString();
  }

  Status AddPort(const std::string& tap, uint32_t limit) {
    MutexLock g(mu_);
    auto where = [&](const Status& s, const std::string& dev) {
      return Status(s.code(), "domain " + domain_ + ": " + dev + ": " + s.message());
    };
    auto link = LookupLink(sock_, tap);
    if (!link.ok()) return Status(link.status().code(), "domain " + domain_ + ": " + link.status().message());
    Port p{tap, link->ifindex, IfbName(domain_, tap), 0, false, false};
    std::string alias = FormatOwnerTag(SelfOwner()) + ";domain=" + domain_ + ";tap=" + tap;
    auto ifb = CreateIfb(sock_, p.ifb, alias.substr(0, 250));
    if (!ifb.ok() && ifb.status().code() == Code::kAlreadyExists) {
      Status r = ReclaimIfb(p.ifb);
      if (!r.ok()) return where(r, p.ifb);
      ifb = CreateIfb(sock_, p.ifb, alias.substr(0, 250));
    }
    if (!ifb.ok()) {
      if (ifb.status().code() == Code::kFailedPrecondition) return ifb.status();  // the one-sentence kernel message
      return where(ifb.status(), p.ifb);
    }
    p.ifb_ifindex = *ifb;
    ports_.push_back(p);  // from here teardown removes it
    Status st = AddPlugQdisc(sock_, p.ifb_ifindex, limit);
    if (st.code() == Code::kFailedPrecondition) return st;
    if (!st.ok()) return where(st, p.ifb);
    st = AddIngressRedirect(sock_, p.tap_ifindex, p.ifb_ifindex, &ports_.back().created_ingress);
    if (!st.ok()) return where(st, tap);
    ports_.back().filter = true;
    LOG_INFO(tag_) << "plug buffer for " << tap << " on " << p.ifb;
    return OkStatus();
  }

  Status Barrier(uint64_t epoch) override { return schedule_.Barrier(epoch); }
  Status Release(uint64_t epoch) override { return schedule_.Release(epoch); }

  Status Finish(bool primary_continues) override {
    MutexLock f(finish_mu_);
    if (finished_) return OkStatus();
    finished_ = true;
    Status first = schedule_.Finish(primary_continues);
    MutexLock g(mu_);
    if (primary_continues && first.ok()) {
      // Let the released queues drain before their device goes.
      for (int i = 0; i < 50; i++) {
        uint64_t held = 0;
        for (const Port& p : ports_)
          if (auto c = PlugCounters(sock_, p.ifb_ifindex); c.ok()) held += c->qlen;
        if (held == 0) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    for (Port& p : ports_) {
      Status s;
      if (primary_continues) {
        if (p.filter) s = RemoveIngressRedirect(sock_, p.tap_ifindex, p.created_ingress);
        Status d = DeleteLink(sock_, p.ifb_ifindex, p.ifb);
        if (s.ok()) s = d;
      } else {
        s = DeleteLink(sock_, p.ifb_ifindex, p.ifb);
        if (p.filter) {
          Status r = RemoveIngressRedirect(sock_, p.tap_ifindex, p.created_ingress);
          if (s.ok()) s = r;
        }
      }
      if (!s.ok() && first.ok()) first = Status(s.code(), "domain " + domain_ + ": " + p.tap + ": " + s.message());
    }
    ports_.clear();
    return first;
  }

  std::string_view mode() const override { return "plug"; }
  std::string_view guarantee() const override {
    return "every frame the guest sends is held until the backup acks the checkpoint that covers it";
  }
  uint64_t buffered_packets() const override { return Counters().qlen; }
  uint64_t released_packets() const override { return Counters().packets; }
  uint64_t dropped_packets() const override { return Counters().drops; }

 private:
  struct Port {
    std::string tap;
    int tap_ifindex;
    std::string ifb;
    int ifb_ifindex;
    bool created_ingress;
    bool filter;
  };

  QdiscCounters Counters() const {
    MutexLock g(mu_);
    QdiscCounters sum;
    for (const Port& p : ports_) {
      if (auto c = PlugCounters(sock_, p.ifb_ifindex); c.ok()) {
        sum.qlen += c->qlen;
        sum.drops += c->drops;
        sum.packets += c->packets;
      }
    }
    return sum;
  }

  // The same command on every IFB; called under the schedule's lock.
  Status All(PlugAction a) {
    MutexLock g(mu_);
    for (const Port& p : ports_) {
      Status s = SendPlugAction(sock_, p.ifb_ifindex, a);
      if (!s.ok()) return Status(s.code(), "domain " + domain_ + ": " + p.ifb + ": " + s.message());
    }
    return OkStatus();
  }
  Status Buffer() override { return All(PlugAction::kBuffer); }
  Status ReleaseOne() override { return All(PlugAction::kReleaseOne); }
  Status ReleaseIndefinite() override { return All(PlugAction::kReleaseIndefinite); }

  // The IFB name exists: a dead remusd's device is deleted; a live one's refused.
  Status ReclaimIfb(const std::string& name) REQUIRES(mu_) {
    auto link = LookupLink(sock_, name);
    if (!link.ok()) return link.status();
    auto owner = ParseOwnerTag(link->alias);
    if (link->kind != "ifb" || !owner)
      return AlreadyExists("a device with this name exists and is not one of ours");
    if (OwnerAlive(*owner))
      return AlreadyExists("belongs to the running remusd pid " + std::to_string(owner->pid) +
                           " (is this domain protected twice?)");
    LOG_WARN(tag_) << "deleting " << name << " left by a dead remusd";
    return DeleteLink(sock_, link->ifindex, name);
  }

  const std::string domain_;
  const std::string tag_;
  mutable Mutex mu_;
  mutable RtnlSocket sock_ GUARDED_BY(mu_);
  std::vector<Port> ports_ GUARDED_BY(mu_);
  PlugSchedule schedule_{this};
  Mutex finish_mu_;
  bool finished_ GUARDED_BY(finish_mu_) = false;
};

}  // namespace

StatusOr<std::unique_ptr<OutputBuffer>> MakePlugOutputBuffer(const NetbufOptions& opts) {
  const std::string& d = opts.domain;
  if (d.empty()) return InvalidArgument("netbuf plug needs the domain's name");
  if (opts.interfaces.empty()) return InvalidArgument("domain " + d + ": netbuf plug needs the guest's tap interfaces");
  for (const std::string& tap : opts.interfaces)
    if (!ValidInterfaceName(tap)) return InvalidArgument("domain " + d + ": '" + tap + "' is not a valid interface name");
  ASSIGN_OR_RETURN(RtnlSocket sock, RtnlSocket::Open());
  auto pb = std::make_unique<PlugOutputBuffer>(d, std::move(sock));
  for (const std::string& tap : opts.interfaces)
    RETURN_IF_ERROR(pb->AddPort(tap, opts.plug_limit_bytes));  // on error the destructor tears down
  return std::unique_ptr<OutputBuffer>(std::move(pb));
}

Status CheckPlugSupportHere() {
  ASSIGN_OR_RETURN(RtnlSocket s, RtnlSocket::Open());
  std::string a = std::string(kIfbPrefix) + "probe0", b = std::string(kIfbPrefix) + "probe1";
  ASSIGN_OR_RETURN(int ia, CreateIfb(s, a, "remus probe"));
  auto ib = CreateIfb(s, b, "remus probe");
  Status result = ib.status();
  if (result.ok()) result = AddPlugQdisc(s, ia, 0);
  if (result.ok()) {
    ASSIGN_OR_RETURN(NlMsgPtr q, BuildIngressQdiscAddRequest(*ib));
    if (!s.Request(std::move(q), "ingress").ok())
      result = FailedPrecondition("the kernel lacks the ingress qdisc (CONFIG_NET_SCH_INGRESS); use --netbuf nfqueue");
  }
  if (result.ok()) {
    ASSIGN_OR_RETURN(NlMsgPtr f, BuildRedirectFilterAddRequest(*ib, ia));
    if (!s.Request(std::move(f), "redirect").ok())
      result = FailedPrecondition(
          "the kernel lacks the u32 classifier or the mirred action (CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED); "
          "use --netbuf nfqueue");
  }
  if (ib.ok()) (void)DeleteLink(s, *ib, b);
  (void)DeleteLink(s, ia, a);
  return result;
}

Status CleanupStalePlug() {
  ASSIGN_OR_RETURN(RtnlSocket s, RtnlSocket::Open());
  ASSIGN_OR_RETURN(std::vector<LinkFacts> links, ListLinks(s));
  Status first;
  for (const LinkFacts& ifb : links) {
    if (ifb.kind != "ifb" || ifb.name.substr(0, kIfbPrefix.size()) != kIfbPrefix) continue;
    auto owner = ParseOwnerTag(ifb.alias);
    if (owner && OwnerAlive(*owner)) continue;
    // Our filters pointing at it first: with the IFB gone they would drop
    // the tap's frames.
    for (const LinkFacts& tap : links) {
      nl_cache* cache = nullptr;
      if (rtnl_cls_alloc_cache(s.get(), tap.ifindex, kIngressHandle, &cache) < 0) continue;
      bool ours = false;
      for (nl_object* o = nl_cache_get_first(cache); o && !ours; o = nl_cache_get_next(o)) {
        auto* c = reinterpret_cast<rtnl_cls*>(o);
        const char* kind = rtnl_tc_get_kind(TC_CAST(c));
        if (!kind || std::string_view(kind) != "u32" || rtnl_cls_get_prio(c) != kRedirectPrio) continue;
        for (rtnl_act* a = rtnl_u32_get_action(c); a; a = rtnl_act_next(a)) {
          const char* ak = rtnl_tc_get_kind(TC_CAST(a));
          if (ak && std::string_view(ak) == "mirred" && rtnl_mirred_get_ifindex(a) == static_cast<uint32_t>(ifb.ifindex))
            ours = true;
        }
      }
      nl_cache_free(cache);
      if (!ours) continue;
      LOG_INFO("netbuf") << "removing the redirect filter from " << tap.name << " to stale " << ifb.name;
      Status r = RemoveIngressRedirect(s, tap.ifindex, false);
      if (!r.ok() && first.ok()) first = r.Annotate(tap.name);
    }
    LOG_INFO("netbuf") << "deleting IFB " << ifb.name << " left by "
                       << (owner ? "dead remusd pid " + std::to_string(owner->pid) : std::string("an unknown owner"));
    Status d = DeleteLink(s, ifb.ifindex, ifb.name);
    if (!d.ok() && first.ok()) first = d;
  }
  return first;
}

}  // namespace remus::netbuf
