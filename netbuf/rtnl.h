// The rtnetlink boundary of netbuf, through libnl-route-3: an owned socket,
// owned messages, libnl errors turned into Status (here and nowhere else),
// and link facts (ifindex, kind, bridge master, alias) read by netlink rather
// than sysfs, which shows the namespace it was mounted in, not the caller's.
//
// Thread-safety: an RtnlSocket is used by one thread at a time (callers
// lock); the free functions are pure or use the socket passed in.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

struct nl_sock;
struct nl_msg;

namespace remus::netbuf {

struct NlMsgDeleter {
  void operator()(nl_msg* m) const;
};
using NlMsgPtr = std::unique_ptr<nl_msg, NlMsgDeleter>;

// "what: <libnl's sentence>", with the code of the errno behind it
// (NLE_OBJ_NOTFOUND -> NotFound, NLE_EXIST -> AlreadyExists, ...).
Status NlStatus(std::string_view what, int nl_error);

class RtnlSocket {
 public:
  static StatusOr<RtnlSocket> Open();
  RtnlSocket(RtnlSocket&& o) noexcept : sock_(o.sock_) { o.sock_ = nullptr; }
  RtnlSocket& operator=(RtnlSocket&&) = delete;
  RtnlSocket(const RtnlSocket&) = delete;
  ~RtnlSocket();

  nl_sock* get() const { return sock_; }
  // Sends a request and waits for the kernel's ack; errors as NlStatus(what).
  Status Request(NlMsgPtr msg, std::string_view what);

 private:
  explicit RtnlSocket(nl_sock* s) : sock_(s) {}
  nl_sock* sock_;
};

struct LinkFacts {
  std::string name;
  int ifindex = 0;
  std::string kind;         // IFLA_INFO_KIND: "bridge", "ifb", "tun", "veth", ... ("" if none)
  std::string master_kind;  // kind of the master device, "" if no master
  std::string alias;        // IFLA_IFALIAS
  bool bridge_port() const { return master_kind == "bridge"; }
};

// NotFound if there is no such interface in this network namespace.
StatusOr<LinkFacts> LookupLink(RtnlSocket& s, std::string_view name);
StatusOr<std::vector<LinkFacts>> ListLinks(RtnlSocket& s);

}  // namespace remus::netbuf
