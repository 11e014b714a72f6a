#include "netbuf/nfqueue.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libnetfilter_queue/libnetfilter_queue.h>

#include <atomic>
#include <cerrno>
#include <set>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/log.h"
#include "common/thread_annotations.h"
#include "common/command.h"
#include "netbuf/firewall.h"
#include "netbuf/naming.h"
#include "netbuf/nfq_socket.h"
#include "netbuf/rtnl.h"

namespace remus::netbuf {

// ---- messages ----

nlmsghdr* BuildNfqBind(char* buf, uint16_t queue, uint32_t seq) {
  nlmsghdr* nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, queue);
  nlh->nlmsg_flags |= NLM_F_ACK;
  nlh->nlmsg_seq = seq;
  // The family is ignored by kernels >= 3.8 for BIND; AF_UNSPEC is what
  // libnetfilter_queue's own example sends.
  nfq_nlmsg_cfg_put_cmd(nlh, AF_UNSPEC, NFQNL_CFG_CMD_BIND);
  return nlh;
}

nlmsghdr* BuildNfqParams(char* buf, uint16_t queue, uint32_t maxlen, bool fail_open, uint32_t seq) {
  nlmsghdr* nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, queue);
  nlh->nlmsg_flags |= NLM_F_ACK;
  nlh->nlmsg_seq = seq;
  nfq_nlmsg_cfg_put_params(nlh, NFQNL_COPY_META, 0);
  nfq_nlmsg_cfg_put_qmaxlen(nlh, maxlen);
  uint32_t flags = NFQA_CFG_F_GSO | (fail_open ? NFQA_CFG_F_FAIL_OPEN : 0);
  mnl_attr_put_u32(nlh, NFQA_CFG_FLAGS, htonl(flags));
  mnl_attr_put_u32(nlh, NFQA_CFG_MASK, htonl(NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN));
  return nlh;
}

nlmsghdr* BuildNfqVerdictBatch(char* buf, uint16_t queue, uint32_t last_id, Verdict v) {
  nlmsghdr* nlh = nfq_nlmsg_put(buf, NFQNL_MSG_VERDICT_BATCH, queue);
  nfq_nlmsg_verdict_put(nlh, static_cast<int>(last_id), v == Verdict::kAccept ? NF_ACCEPT : NF_DROP);
  return nlh;
}

Status ParseNfqMessages(const void* buf, size_t len, NfqMessages* out) {
  auto* nlh = static_cast<const nlmsghdr*>(buf);
  int rem = static_cast<int>(len);
  for (; mnl_nlmsg_ok(nlh, rem); nlh = mnl_nlmsg_next(nlh, &rem)) {
    if (nlh->nlmsg_type == NLMSG_ERROR) {
      if (nlh->nlmsg_len < mnl_nlmsg_size(sizeof(nlmsgerr))) return DataLoss("truncated netlink error message");
      auto* e = static_cast<const nlmsgerr*>(mnl_nlmsg_get_payload(nlh));
      out->errors.push_back({e->msg.nlmsg_seq, -e->error});
      continue;
    }
    if (NFNL_SUBSYS_ID(nlh->nlmsg_type) != NFNL_SUBSYS_QUEUE || NFNL_MSG_TYPE(nlh->nlmsg_type) != NFQNL_MSG_PACKET)
      continue;
    nlattr* attr[NFQA_MAX + 1] = {};
    if (nfq_nlmsg_parse(nlh, attr) < 0 || !attr[NFQA_PACKET_HDR] ||
        mnl_attr_get_payload_len(attr[NFQA_PACKET_HDR]) < sizeof(nfqnl_msg_packet_hdr))
      return DataLoss("malformed nfqueue packet message");
    auto* ph = static_cast<const nfqnl_msg_packet_hdr*>(mnl_attr_get_payload(attr[NFQA_PACKET_HDR]));
    out->ids.push_back(ntohl(ph->packet_id));
  }
  return OkStatus();
}

namespace {

const char* const kFamilies[] = {"iptables", "ip6tables"};

std::string NfqueueProcText() {
  auto t = ReadFileToString("/proc/thread-self/net/netfilter/nfnetlink_queue");
  if (!t.ok()) t = ReadFileToString("/proc/self/net/netfilter/nfnetlink_queue");
  return t.ok() ? *t : "";
}

// Queue numbers iptables/ip6tables rules already send packets to.
std::set<uint16_t> QueuesReferenced() {
  std::set<uint16_t> used;
  for (const char* save : {"iptables-save", "ip6tables-save"}) {
    auto r = RunCommand({save});
    if (r.ok() && r->exit_code == 0) {
      std::set<uint16_t> u = QueuesInUse(r->out);
      used.insert(u.begin(), u.end());
    }
  }
  return used;
}

Status WriteSysctl(const std::string& path, std::string_view value) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open " + path, errno);
  return WriteFull(fd.get(), value.data(), value.size());
}

// Bridged frames reach iptables only with br_netfilter and these per-netns
// switches on (on by default in a new namespace; distributions and Docker
// may turn them off).
Status EnableBridgeNetfilter(std::string_view domain, std::string_view tap) {
  const std::string base = "/proc/sys/net/bridge/bridge-nf-call-";
  if (::access((base + "iptables").c_str(), F_OK) != 0) (void)RunCommand({"modprobe", "br_netfilter"});
  for (const char* fam : {"iptables", "ip6tables"}) {
    std::string path = base + fam;
    auto cur = ReadFileToString(path);
    if (!cur.ok())
      return FailedPrecondition("domain " + std::string(domain) + ": " + std::string(tap) +
                                " is a bridge port, but the kernel lacks br_netfilter (CONFIG_BRIDGE_NETFILTER); "
                                "use --netbuf plug");
    if (!cur->empty() && (*cur)[0] == '1') continue;
    LOG_INFO("netbuf[" + std::string(domain) + "]") << "setting net.bridge.bridge-nf-call-" << fam
                                                    << "=1 so bridged guest packets reach the queue";
    RETURN_IF_ERROR(WriteSysctl(path, "1").Annotate("domain " + std::string(domain)));
  }
  return OkStatus();
}

Argv WithBinary(const char* bin, const Argv& args) {
  Argv a = {bin};
  a.insert(a.end(), args.begin(), args.end());
  return a;
}

class NfqueueOutputBuffer final : public OutputBuffer, private VerdictSink {
 public:
  NfqueueOutputBuffer(std::string domain, std::unique_ptr<NfqSocket> sock, uint16_t queue,
                      const std::vector<RuleInterface>& ifs, bool fail_open)
      : domain_(std::move(domain)),
        fail_open_(fail_open),
        tag_("netbuf[" + domain_ + "]"),
        sock_(std::move(sock)),
        portid_(sock_->portid()),
        queue_(queue),
        rules_(BuildNfqueueRules(ChainName(domain_), ifs, queue, FormatOwnerTag(SelfOwner()))) {}

  ~NfqueueOutputBuffer() override {
    Status s = Finish(false);
    if (!s.ok()) LOG_ERROR(tag_) << "tearing down the nfqueue buffer: " << s.ToString();
  }

  Status Start() {
    stop_fd_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!stop_fd_.valid()) return ErrnoStatus("eventfd", errno);
    reader_ = std::thread([this] { ReaderLoop(); });
    return OkStatus();
  }

  Status InstallRules() {
    for (int f = 0; f < 2; f++) {
      for (size_t i = 0; i < rules_.setup.size(); i++) {
        Status s = RunChecked(WithBinary(kFamilies[f], rules_.setup[i]));
        if (!s.ok() && i == 0 && s.message().find("exists") != std::string::npos) s = ReclaimChain(kFamilies[f]);
        if (!s.ok())
          return Status(s.code(), "domain " + domain_ + ": installing the nfqueue rules: " + s.message());
        installed_[f] = true;
      }
    }
    LOG_INFO(tag_) << "nfqueue " << queue_ << " holds the guest's output (chain " << rules_.chain << ")";
    return OkStatus();
  }

  Status Barrier(uint64_t epoch) override { return ledger_.Barrier(epoch); }
  Status Release(uint64_t epoch) override { return ledger_.Release(epoch); }

  Status Finish(bool primary_continues) override {
    MutexLock g(finish_mu_);
    if (finished_) return OkStatus();
    finished_ = true;
    // Verdict first: with !primary_continues nothing may leave, not even
    // while the rules are being removed (the reader drops those at once).
    Status first = ledger_.Finish(primary_continues ? Verdict::kAccept : Verdict::kDrop);
    Status r = RemoveRules();
    if (first.ok()) first = r;
    StopReader();
    Drain();  // messages still in the socket get the final verdict
    RefreshDrops();
    closed_ = true;
    sock_.reset();  // the kernel unbinds the queue and drops anything left in it
    LOG_INFO(tag_) << "nfqueue " << queue_ << " finished: " << (primary_continues ? "released" : "dropped")
                   << " what was held; " << ledger_.released() << " packets released in all, "
                   << ledger_.discarded() << " dropped at the end";
    if (!first.ok()) return Status(first.code(), "domain " + domain_ + ": " + first.message());
    return OkStatus();
  }

  std::string_view mode() const override { return "nfqueue"; }
  std::string_view guarantee() const override {
    if (fail_open_)
      return "IP packets the guest sends are held until the backup acks the checkpoint that covers them, "
             "except when the queue is full: then they pass at once (fail-open); non-IP frames such as ARP "
             "are not held";
    return "IP packets the guest sends are held until the backup acks the checkpoint that covers them "
           "(when the queue is full, new ones are dropped); non-IP frames such as ARP are not held";
  }
  uint64_t buffered_packets() const override { return ledger_.buffered(); }
  uint64_t released_packets() const override { return ledger_.released(); }
  uint64_t dropped_packets() const override {
    if (!closed_) RefreshDrops();
    return drops_;
  }

 private:
  Status Batch(uint32_t last_id, Verdict v) override {
    char buf[kNfqMsgBufSize];
    return sock_->Send(BuildNfqVerdictBatch(buf, queue_, last_id, v), "sending an nfqueue batch verdict");
  }

  // -N found the chain already there: a leftover of a dead remusd is
  // removed and the chain made again; a live owner's chain is refused.
  Status ReclaimChain(const char* bin) {
    ASSIGN_OR_RETURN(CommandResult dump, RunCommand({bin, "-t", "mangle", "-S"}));
    for (const FoundChain& c : FindOurChains(dump.out)) {
      if (c.chain != rules_.chain) continue;
      if (c.owner && OwnerAlive(*c.owner))
        return AlreadyExists("chain " + c.chain + " belongs to the running remusd pid " +
                             std::to_string(c.owner->pid) + " (is this domain protected twice?)");
      LOG_WARN(tag_) << "removing " << bin << " chain " << c.chain << " left by a dead remusd";
      for (const Argv& a : c.remove) (void)RunChecked(WithBinary(bin, a));
    }
    return RunChecked(WithBinary(bin, rules_.setup[0]));
  }

  Status RemoveRules() {
    Status first;
    for (int f = 0; f < 2; f++) {
      if (!installed_[f]) continue;
      installed_[f] = false;
      for (const Argv& a : rules_.teardown) {
        Status s = RunChecked(WithBinary(kFamilies[f], a));
        if (!s.ok() && s.message().find("No chain/target/match") == std::string::npos &&
            s.message().find("Bad rule") == std::string::npos && first.ok())
          first = s;
      }
    }
    return first;
  }

  void ReaderLoop() {
    std::vector<uint32_t> early = sock_->TakeEarlyIds();
    if (!early.empty()) LogIfError(ledger_.OnPackets(early));
    pollfd p[2] = {{sock_->fd(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    for (;;) {
      if (::poll(p, 2, -1) < 0) {
        if (errno == EINTR) continue;
        LOG_ERROR(tag_) << ErrnoStatus("poll on the nfqueue socket", errno).ToString();
        return;
      }
      if (p[1].revents) return;
      Drain();
    }
  }

  void Drain() {
    for (;;) {
      NfqMessages m;
      auto n = sock_->ReadBatch(&m);
      if (!m.ids.empty()) LogIfError(ledger_.OnPackets(m.ids));
      if (!n.ok()) {
        LOG_WARN(tag_) << n.status().ToString();
        return;  // poll says when there is more
      }
      // ENOENT: a batch found nothing left to verdict (harmless).
      for (const NfqMessages::Error& e : m.errors)
        if (e.err != 0 && e.err != ENOENT)
          LOG_WARN(tag_) << ErrnoStatus("nfqueue " + std::to_string(queue_), e.err).ToString();
      if (*n < NfqSocket::kBatch) return;
    }
  }

  void StopReader() {
    if (!reader_.joinable()) return;
    uint64_t one = 1;
    (void)!::write(stop_fd_.get(), &one, sizeof one);
    reader_.join();
  }

  void RefreshDrops() const {
    for (const NfqueueProcStats& s : ParseNfqueueProc(NfqueueProcText()))
      if (s.queue_num == queue_ && s.portid == portid_) drops_ = uint64_t{s.queue_dropped} + s.user_dropped;
  }

  void LogIfError(const Status& s) {
    if (!s.ok()) LOG_ERROR(tag_) << s.ToString();
  }

  const std::string domain_;
  const bool fail_open_;
  const std::string tag_;
  std::unique_ptr<NfqSocket> sock_;
  const uint32_t portid_;
  const uint16_t queue_;
  const NfqueueRules rules_;
  bool installed_[2] = {false, false};  // per family; setup and Finish only
  PacketLedger ledger_{this};
  Fd stop_fd_;
  std::thread reader_;
  Mutex finish_mu_;
  bool finished_ GUARDED_BY(finish_mu_) = false;
  std::atomic<bool> closed_{false};
  mutable std::atomic<uint64_t> drops_{0};
};

}  // namespace

StatusOr<std::unique_ptr<OutputBuffer>> MakeNfqueueOutputBuffer(const NetbufOptions& opts) {
  const std::string& d = opts.domain;
  if (d.empty()) return InvalidArgument("netbuf nfqueue needs the domain's name");
  if (opts.interfaces.empty())
    return InvalidArgument("domain " + d + ": netbuf nfqueue needs the guest's tap interfaces");
  if (opts.queue_num < -1 || opts.queue_num > 65535)
    return InvalidArgument("domain " + d + ": nfqueue number " + std::to_string(opts.queue_num) +
                           " is out of range (0-65535, or -1 to pick one)");
  if (opts.queue_maxlen == 0) return InvalidArgument("domain " + d + ": nfqueue length must be at least 1");

  ASSIGN_OR_RETURN(RtnlSocket rt, RtnlSocket::Open());
  std::vector<RuleInterface> ifs;
  for (const std::string& name : opts.interfaces) {
    if (!ValidInterfaceName(name))
      return InvalidArgument("domain " + d + ": '" + name + "' is not a valid interface name");
    auto link = LookupLink(rt, name);
    if (!link.ok()) return Status(link.status().code(), "domain " + d + ": " + link.status().message());
    ifs.push_back({name, link->bridge_port()});
    if (link->bridge_port()) RETURN_IF_ERROR(EnableBridgeNetfilter(d, name));
  }

  ASSIGN_OR_RETURN(auto sock, NfqSocket::Open());
  int queue = -1;
  if (opts.queue_num >= 0) {
    bool taken = false;
    Status b = BindQueue(*sock, static_cast<uint16_t>(opts.queue_num), &taken);
    if (taken)
      return Unavailable("domain " + d + ": nfqueue " + std::to_string(opts.queue_num) +
                         " is taken by another program; pick another number or let remus pick one");
    if (!b.ok()) return Status(b.code(), "domain " + d + ": " + b.message());
    queue = opts.queue_num;
  } else {
    // Another process's queue answers EPERM, one of ours EBUSY.
    std::set<uint16_t> referenced = QueuesReferenced();
    uint32_t start = NameHash(d) % kAutoQueueCount;
    for (uint32_t i = 0; i < kAutoQueueCount && queue < 0; i++) {
      auto q = static_cast<uint16_t>(kAutoQueueFirst + (start + i) % kAutoQueueCount);
      if (referenced.count(q)) continue;
      bool taken = false;
      Status b = BindQueue(*sock, q, &taken);
      if (b.ok()) queue = q;
      else if (!taken)
        return Status(b.code(), "domain " + d + ": " + b.message());
    }
    if (queue < 0)
      return ResourceExhausted("domain " + d + ": no free nfqueue number in " + std::to_string(kAutoQueueFirst) +
                               "-" + std::to_string(kAutoQueueFirst + kAutoQueueCount - 1));
  }
  char buf[kNfqMsgBufSize];
  Status p = sock->Request(
      BuildNfqParams(buf, static_cast<uint16_t>(queue), opts.queue_maxlen, opts.fail_open, sock->NextSeq()),
      "configuring nfqueue " + std::to_string(queue));
  if (!p.ok()) return Status(p.code(), "domain " + d + ": " + p.message());

  auto nb = std::make_unique<NfqueueOutputBuffer>(d, std::move(sock), static_cast<uint16_t>(queue), ifs, opts.fail_open);
  RETURN_IF_ERROR(nb->Start());
  RETURN_IF_ERROR(nb->InstallRules());  // on error the destructor removes what was installed
  return std::unique_ptr<OutputBuffer>(std::move(nb));
}

Status CheckNfqueueSupportHere() {
  const std::string chain = std::string(kChainPrefix) + "probe";
  for (const char* bin : kFamilies) {
    auto v = RunCommand({bin, "-V"});
    if (!v.ok() && v.status().code() == Code::kNotFound)
      return FailedPrecondition(std::string(bin) + " is not installed (apt-get install iptables); use --netbuf plug");
    if (!RunChecked({bin, "-t", "mangle", "-N", chain}).ok())
      return FailedPrecondition(std::string(bin) +
                                " cannot create chains in the mangle table (CONFIG_IP_NF_MANGLE, "
                                "CONFIG_IP6_NF_MANGLE); use --netbuf plug");
    Status q = RunChecked({bin, "-t", "mangle", "-A", chain, "-j", "NFQUEUE", "--queue-num", "0"});
    Status ph = RunChecked({bin, "-t", "mangle", "-A", chain, "-m", "physdev", "--physdev-in", "probe0", "-j", "RETURN"});
    (void)RunChecked({bin, "-t", "mangle", "-F", chain});
    (void)RunChecked({bin, "-t", "mangle", "-X", chain});
    if (!q.ok())
      return FailedPrecondition("the kernel lacks the NFQUEUE target (CONFIG_NETFILTER_XT_TARGET_NFQUEUE); "
                                "use --netbuf plug");
    if (!ph.ok())
      return FailedPrecondition("the kernel lacks the physdev match (CONFIG_NETFILTER_XT_MATCH_PHYSDEV); "
                                "use --netbuf plug");
  }
  if (::access("/proc/sys/net/bridge/bridge-nf-call-iptables", F_OK) != 0) {
    (void)RunCommand({"modprobe", "br_netfilter"});
    if (::access("/proc/sys/net/bridge/bridge-nf-call-iptables", F_OK) != 0)
      return FailedPrecondition("the kernel lacks br_netfilter (CONFIG_BRIDGE_NETFILTER); use --netbuf plug");
  }
  auto sock = NfqSocket::Open();
  if (!sock.ok() || !BindQueue(**sock, 0).ok())
    return FailedPrecondition("the kernel lacks nfnetlink_queue (CONFIG_NETFILTER_NETLINK_QUEUE); use --netbuf plug");
  return OkStatus();
}

Status CleanupStaleNfqueue() {
  Status first;
  for (const char* bin : kFamilies) {
    auto dump = RunCommand({bin, "-t", "mangle", "-S"});
    if (!dump.ok()) {
      if (dump.status().code() == Code::kNotFound) continue;  // no iptables: no rules of ours either
      return dump.status();
    }
    if (dump->exit_code != 0) continue;  // no mangle table in this kernel: nothing of ours
    for (const FoundChain& c : FindOurChains(dump->out)) {
      if (c.owner && OwnerAlive(*c.owner)) continue;
      LOG_INFO("netbuf") << "removing " << bin << " chain " << c.chain << " left by "
                         << (c.owner ? "dead remusd pid " + std::to_string(c.owner->pid) : std::string("an unknown owner"));
      for (const Argv& a : c.remove) {
        Status s = RunChecked(WithBinary(bin, a));
        if (!s.ok() && first.ok()) first = s;
      }
    }
  }
  return first;
}

}  // namespace remus::netbuf
