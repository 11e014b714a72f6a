#include "netbuf/nfq_socket.h"

#include <libmnl/libmnl.h>
#include <sys/socket.h>

#include <cerrno>
#include <string>

#include "common/io.h"

namespace remus::netbuf {
namespace {

constexpr size_t kRecvBufSize = 8192;  // a metadata-only packet message is a few hundred bytes
constexpr int kRcvBufBytes = 16 << 20;

}  // namespace

StatusOr<std::unique_ptr<NfqSocket>> NfqSocket::Open() {
  mnl_socket* nl = mnl_socket_open2(NETLINK_NETFILTER, SOCK_CLOEXEC);
  if (!nl) return ErrnoStatus("opening a netfilter netlink socket", errno);
  std::unique_ptr<NfqSocket> s(new NfqSocket(nl));
  if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) return ErrnoStatus("binding the netlink socket", errno);
  s->portid_ = mnl_socket_get_portid(nl);
  int one = 1;
  // Without it a full receive buffer makes recv fail with ENOBUFS; the
  // kernel then drops (or, fail-open, accepts) the packet, counted in
  // user_dropped either way.
  (void)mnl_socket_setsockopt(nl, NETLINK_NO_ENOBUFS, &one, sizeof one);
  int size = kRcvBufBytes;
  if (::setsockopt(s->fd(), SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
    (void)::setsockopt(s->fd(), SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  return s;
}

NfqSocket::~NfqSocket() { mnl_socket_close(nl_); }

int NfqSocket::fd() const { return mnl_socket_get_fd(nl_); }

Status NfqSocket::Send(const nlmsghdr* nlh, std::string_view what) {
  if (mnl_socket_sendto(nl_, nlh, nlh->nlmsg_len) < 0) return ErrnoStatus(what, errno);
  return OkStatus();
}

Status NfqSocket::Request(const nlmsghdr* nlh, std::string_view what, int* err) {
  RETURN_IF_ERROR(Send(nlh, what));
  for (int waited = 0; waited < 2000; waited += 100) {
    ASSIGN_OR_RETURN(bool readable, WaitReadable(fd(), 100));
    if (!readable) continue;
    NfqMessages m;
    RETURN_IF_ERROR(ReadBatch(&m).status());
    early_.insert(early_.end(), m.ids.begin(), m.ids.end());
    for (const NfqMessages::Error& e : m.errors)
      if (e.seq == nlh->nlmsg_seq) {
        if (err) *err = e.err;
        return e.err == 0 ? OkStatus() : ErrnoStatus(what, e.err);
      }
  }
  return DeadlineExceeded(std::string(what) + ": no answer from the kernel");
}

StatusOr<int> NfqSocket::ReadBatch(NfqMessages* out) {
  if (bufs_.empty()) bufs_.resize(kBatch * kRecvBufSize);
  mmsghdr msgs[kBatch] = {};
  iovec iov[kBatch];
  for (int i = 0; i < kBatch; i++) {
    iov[i] = {bufs_.data() + i * kRecvBufSize, kRecvBufSize};
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  int n = ::recvmmsg(fd(), msgs, kBatch, MSG_DONTWAIT, nullptr);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    return ErrnoStatus("reading the nfqueue socket", errno);
  }
  // A bad datagram does not hide the ids of the others: an id we miss is
  // only held longer (the next batch covers it), but count what we can.
  Status first;
  for (int i = 0; i < n; i++) {
    Status s = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                   ? DataLoss("an nfqueue message did not fit the buffer")
                   : ParseNfqMessages(iov[i].iov_base, msgs[i].msg_len, out);
    if (!s.ok() && first.ok()) first = s;
  }
  if (!first.ok()) return first;
  return n;
}

Status BindQueue(NfqSocket& s, uint16_t queue, bool* taken) {
  char buf[kNfqMsgBufSize];
  int err = 0;
  Status st = s.Request(BuildNfqBind(buf, queue, s.NextSeq()), "binding nfqueue " + std::to_string(queue), &err);
  if (taken) *taken = err == EPERM || err == EBUSY;
  return st;
}

}  // namespace remus::netbuf
