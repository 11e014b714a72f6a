// The NETLINK_NETFILTER socket of one NFQUEUE, read metadata only with
// libnetfilter_queue's libmnl API: shared by the nfqueue output buffer
// (nfqueue.cc) and bench/link_delay (the bench's link RTT). Not thread-safe:
// one thread owns a socket.
#pragma once

#include <linux/netlink.h>

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "netbuf/nfqueue.h"

struct mnl_socket;

namespace remus::netbuf {

class NfqSocket {
 public:
  // Datagrams one ReadBatch takes at most: fewer means the socket is drained.
  static constexpr int kBatch = 64;

  // NETLINK_NO_ENOBUFS and a 16 MiB receive buffer (SO_RCVBUFFORCE).
  static StatusOr<std::unique_ptr<NfqSocket>> Open();
  ~NfqSocket();
  NfqSocket(const NfqSocket&) = delete;
  NfqSocket& operator=(const NfqSocket&) = delete;

  int fd() const;
  uint32_t portid() const { return portid_; }
  uint32_t NextSeq() { return ++seq_; }

  Status Send(const nlmsghdr* nlh, std::string_view what);

  // Sends a request carrying NLM_F_ACK and waits up to 2 s for its ack.
  // Packet ids read meanwhile are kept for TakeEarlyIds.
  // *err gets the kernel's errno (0 on success).
  Status Request(const nlmsghdr* nlh, std::string_view what, int* err = nullptr);

  // One recvmmsg without blocking; returns the number of datagrams (0: none,
  // kBatch: there may be more).
  StatusOr<int> ReadBatch(NfqMessages* out);

  std::vector<uint32_t> TakeEarlyIds() { return std::move(early_); }

 private:
  explicit NfqSocket(mnl_socket* nl) : nl_(nl) {}
  mnl_socket* nl_;
  uint32_t portid_ = 0;
  uint32_t seq_ = 0;
  std::vector<char> bufs_;
  std::vector<uint32_t> early_;
};

// Binds s to `queue`. *taken: another process owns the queue (EPERM) or we
// bound it already (EBUSY).
Status BindQueue(NfqSocket& s, uint16_t queue, bool* taken = nullptr);

}  // namespace remus::netbuf
