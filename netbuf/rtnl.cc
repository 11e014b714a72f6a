#include "netbuf/rtnl.h"

#include <netlink/cache.h>
#include <netlink/errno.h>
#include <netlink/netlink.h>
#include <netlink/route/link.h>
#include <netlink/socket.h>

#include <map>

namespace remus::netbuf {

void NlMsgDeleter::operator()(nl_msg* m) const { nlmsg_free(m); }

Status NlStatus(std::string_view what, int nl_error) {
  int e = nl_error < 0 ? -nl_error : nl_error;
  std::string msg = std::string(what) + ": " + nl_geterror(e);
  switch (e) {
    case NLE_OBJ_NOTFOUND: return NotFound(msg);
    case NLE_EXIST: return AlreadyExists(msg);
    case NLE_PERM:
    case NLE_NOACCESS: return PermissionDenied(msg);
    case NLE_INVAL:
    case NLE_RANGE: return InvalidArgument(msg);
    case NLE_BUSY:
    case NLE_AGAIN: return Unavailable(msg);
    case NLE_NOMEM: return ResourceExhausted(msg);
    case NLE_OPNOTSUPP: return Unimplemented(msg);
    default: return Internal(msg);
  }
}

StatusOr<RtnlSocket> RtnlSocket::Open() {
  nl_sock* s = nl_socket_alloc();
  if (!s) return ResourceExhausted("cannot allocate a netlink socket");
  int err = nl_connect(s, NETLINK_ROUTE);
  if (err < 0) {
    nl_socket_free(s);
    return NlStatus("connecting to rtnetlink", err);
  }
  return RtnlSocket(s);
}

RtnlSocket::~RtnlSocket() {
  if (sock_) nl_socket_free(sock_);
}

Status RtnlSocket::Request(NlMsgPtr msg, std::string_view what) {
  int err = nl_send_auto(sock_, msg.get());
  if (err < 0) return NlStatus(what, err);
  err = nl_wait_for_ack(sock_);
  if (err < 0) return NlStatus(what, err);
  return OkStatus();
}

namespace {

LinkFacts Facts(rtnl_link* l, const std::map<int, std::string>& kinds) {
  LinkFacts f;
  f.name = rtnl_link_get_name(l) ? rtnl_link_get_name(l) : "";
  f.ifindex = rtnl_link_get_ifindex(l);
  if (const char* t = rtnl_link_get_type(l)) f.kind = t;
  if (const char* a = rtnl_link_get_ifalias(l)) f.alias = a;
  int master = rtnl_link_get_master(l);
  if (master > 0) {
    auto it = kinds.find(master);
    f.master_kind = it != kinds.end() ? it->second : "?";
  }
  return f;
}

}  // namespace

StatusOr<std::vector<LinkFacts>> ListLinks(RtnlSocket& s) {
  nl_cache* cache = nullptr;
  int err = rtnl_link_alloc_cache(s.get(), AF_UNSPEC, &cache);
  if (err < 0) return NlStatus("listing network interfaces", err);
  std::map<int, std::string> kinds;
  for (nl_object* o = nl_cache_get_first(cache); o; o = nl_cache_get_next(o)) {
    auto* l = reinterpret_cast<rtnl_link*>(o);
    const char* t = rtnl_link_get_type(l);
    kinds[rtnl_link_get_ifindex(l)] = t ? t : "";
  }
  std::vector<LinkFacts> out;
  for (nl_object* o = nl_cache_get_first(cache); o; o = nl_cache_get_next(o))
    out.push_back(Facts(reinterpret_cast<rtnl_link*>(o), kinds));
  nl_cache_free(cache);
  return out;
}

StatusOr<LinkFacts> LookupLink(RtnlSocket& s, std::string_view name) {
  ASSIGN_OR_RETURN(std::vector<LinkFacts> links, ListLinks(s));
  for (LinkFacts& f : links)
    if (f.name == name) return std::move(f);
  return NotFound("there is no network interface " + std::string(name));
}

}  // namespace remus::netbuf
