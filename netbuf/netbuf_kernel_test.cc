// Output commit against the real kernel. Each case enters a fresh network
// namespace (ctest runs every case as its own process; the fixture also
// returns to the original namespace, so running the binary directly works
// too) and builds a small world there:
//
//   rtap0 (tap, /dev/net/tun) --port-- br0 02:00:00:00:00:01 10.77.0.1/24 -- UDP :5000
//   rtap1 (tap, routed)        02:00:00:00:01:01 10.78.0.1/24             -- UDP :5001
//
// Frames the test writes into a tap fd are the guest's transmit; the UDP
// sockets are the outside world. Needs root (skips without it); CI runs as
// root, so these run there. Plug cases that need sch_plug skip with
// CheckNetbufSupport's sentence when the kernel lacks it; the IFB + ingress +
// mirred plumbing runs for real either way.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netlink/route/link.h>
#include <netlink/route/qdisc.h>
#include <netlink/route/qdisc/fifo.h>
#include <netlink/route/tc.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/command.h"
#include "netbuf/firewall.h"
#include "netbuf/naming.h"
#include "netbuf/netbuf.h"
#include "netbuf/plug.h"
#include "netbuf/rtnl.h"

namespace remus::netbuf {
namespace {

using Clock = std::chrono::steady_clock;

uint16_t IpChecksum(const uint8_t* p, size_t n) {
  uint32_t sum = 0;
  for (size_t i = 0; i + 1 < n; i += 2) sum += (p[i] << 8) | p[i + 1];
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(~sum);
}

// One guest NIC: a tap fd and the addresses its frames carry.
struct GuestNic {
  std::string name;
  Fd fd;
  uint8_t mac[6];
  uint8_t peer_mac[6];
  in_addr_t ip;       // network order
  in_addr_t peer_ip;  // network order
  uint16_t port;

  // Writes one Ethernet/IPv4/UDP frame with `payload` into the tap: the
  // guest sends it.
  void Send(const std::string& payload) const {
    std::vector<uint8_t> f;
    f.reserve(14 + 20 + 8 + payload.size());
    f.insert(f.end(), peer_mac, peer_mac + 6);
    f.insert(f.end(), mac, mac + 6);
    f.push_back(0x08), f.push_back(0x00);
    f.resize(14 + 20 + 8 + payload.size());
    uint8_t* ip4 = &f[14];
    size_t iplen = 20 + 8 + payload.size();
    ip4[0] = 0x45;
    ip4[2] = static_cast<uint8_t>(iplen >> 8), ip4[3] = static_cast<uint8_t>(iplen);
    ip4[6] = 0x40;  // DF
    ip4[8] = 64;
    ip4[9] = IPPROTO_UDP;
    std::memcpy(&ip4[12], &ip, 4);
    std::memcpy(&ip4[16], &peer_ip, 4);
    uint16_t c = IpChecksum(ip4, 20);
    ip4[10] = static_cast<uint8_t>(c >> 8), ip4[11] = static_cast<uint8_t>(c);
    uint8_t* udp = ip4 + 20;
    udp[0] = 0x9c, udp[1] = 0x40;  // source port 40000
    udp[2] = static_cast<uint8_t>(port >> 8), udp[3] = static_cast<uint8_t>(port);
    size_t ulen = 8 + payload.size();
    udp[4] = static_cast<uint8_t>(ulen >> 8), udp[5] = static_cast<uint8_t>(ulen);  // checksum 0: none
    std::memcpy(udp + 8, payload.data(), payload.size());
    ASSERT_EQ(::write(fd.get(), f.data(), f.size()), static_cast<ssize_t>(f.size())) << strerror(errno);
  }
};

// The same over IPv6 (where the UDP checksum is mandatory), for the
// ip6tables half of the rules.
void SendV6(const GuestNic& nic, const char* src, const char* dst, uint16_t port, const std::string& payload) {
  uint8_t s6[16], d6[16];
  ASSERT_EQ(inet_pton(AF_INET6, src, s6), 1);
  ASSERT_EQ(inet_pton(AF_INET6, dst, d6), 1);
  size_t ulen = 8 + payload.size();
  std::vector<uint8_t> udp(ulen);
  udp[0] = 0x9c, udp[1] = 0x40;
  udp[2] = static_cast<uint8_t>(port >> 8), udp[3] = static_cast<uint8_t>(port);
  udp[4] = static_cast<uint8_t>(ulen >> 8), udp[5] = static_cast<uint8_t>(ulen);
  std::memcpy(udp.data() + 8, payload.data(), payload.size());
  std::vector<uint8_t> pseudo(s6, s6 + 16);
  pseudo.insert(pseudo.end(), d6, d6 + 16);
  for (int b : {0, 0, static_cast<int>(ulen >> 8), static_cast<int>(ulen & 0xff), 0, 0, 0, int{IPPROTO_UDP}})
    pseudo.push_back(static_cast<uint8_t>(b));
  pseudo.insert(pseudo.end(), udp.begin(), udp.end());
  if (pseudo.size() % 2) pseudo.push_back(0);
  uint16_t c = IpChecksum(pseudo.data(), pseudo.size());
  if (c == 0) c = 0xffff;
  udp[6] = static_cast<uint8_t>(c >> 8), udp[7] = static_cast<uint8_t>(c);

  std::vector<uint8_t> f(nic.peer_mac, nic.peer_mac + 6);
  f.insert(f.end(), nic.mac, nic.mac + 6);
  f.push_back(0x86), f.push_back(0xdd);
  uint8_t ip6[40] = {0x60};
  ip6[4] = static_cast<uint8_t>(ulen >> 8), ip6[5] = static_cast<uint8_t>(ulen);
  ip6[6] = IPPROTO_UDP;
  ip6[7] = 64;
  std::memcpy(ip6 + 8, s6, 16);
  std::memcpy(ip6 + 24, d6, 16);
  f.insert(f.end(), ip6, ip6 + 40);
  f.insert(f.end(), udp.begin(), udp.end());
  ASSERT_EQ(::write(nic.fd.get(), f.data(), f.size()), static_cast<ssize_t>(f.size())) << strerror(errno);
}

// Datagrams the outside world received within timeout_ms (stops at `want`).
std::vector<std::string> Receive(int sock, size_t want, int timeout_ms) {
  std::vector<std::string> got;
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (got.size() < want) {
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left <= 0) break;
    pollfd p{sock, POLLIN, 0};
    if (::poll(&p, 1, left) <= 0) continue;
    char buf[2048];
    ssize_t n = ::recv(sock, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) got.emplace_back(buf, static_cast<size_t>(n));
  }
  return got;
}

std::vector<std::string> Seq(const std::string& prefix, int n) {
  std::vector<std::string> v;
  for (int i = 0; i < n; i++) v.push_back(prefix + std::to_string(i));
  return v;
}

bool WaitFor(const std::function<bool()>& cond, int timeout_ms = 3000) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return cond();
}

// The ruleset of one family's mangle table.
std::string Mangle(const char* bin) {
  auto r = RunCommand({bin, "-t", "mangle", "-S"});
  return r.ok() ? r->out : "";
}
bool HasRemusRules() {
  return Mangle("iptables").find("REMUS-") != std::string::npos ||
         Mangle("ip6tables").find("REMUS-") != std::string::npos;
}

class NetnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root: network namespaces, iptables, tc";
    orig_ns_ = Fd(::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(orig_ns_.valid());
    ASSERT_EQ(::unshare(CLONE_NEWNET), 0) << strerror(errno);
    Run({"ip", "link", "set", "lo", "up"});
  }
  void TearDown() override {
    nics_.clear();
    socks_.clear();
    if (orig_ns_.valid()) (void)::setns(orig_ns_.get(), CLONE_NEWNET);
  }

  static void Run(const Argv& a) {
    Status s = RunChecked(a);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  static Fd OpenTap(const std::string& name) {
    Fd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
    EXPECT_TRUE(fd.valid()) << strerror(errno);
    ifreq ifr{};
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    std::strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
    EXPECT_EQ(::ioctl(fd.get(), TUNSETIFF, &ifr), 0) << strerror(errno);
    return fd;
  }

  int UdpListener(const char* ip, uint16_t port) {
    Fd s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = inet_addr(ip);
    EXPECT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << strerror(errno);
    socks_.push_back(std::move(s));
    return socks_.back().get();
  }

  // rtap0 on br0; returns the receiving socket.
  int MakeBridgedGuest() {
    Run({"ip", "link", "add", "br0", "type", "bridge", "forward_delay", "0"});
    Run({"ip", "link", "set", "br0", "address", "02:00:00:00:00:01"});
    Run({"ip", "addr", "add", "10.77.0.1/24", "dev", "br0"});
    Run({"ip", "link", "set", "br0", "up"});
    GuestNic n{"rtap0", OpenTap("rtap0"), {2, 0, 0, 0, 0, 2}, {2, 0, 0, 0, 0, 1},
               inet_addr("10.77.0.2"), inet_addr("10.77.0.1"), 5000};
    Run({"ip", "link", "set", "rtap0", "master", "br0"});
    Run({"ip", "link", "set", "rtap0", "up"});
    nics_.push_back(std::move(n));
    return UdpListener("10.77.0.1", 5000);
  }

  // rtap1, routed by the host; returns the receiving socket.
  int MakeRoutedGuest() {
    GuestNic n{"rtap1", OpenTap("rtap1"), {2, 0, 0, 0, 1, 2}, {2, 0, 0, 0, 1, 1},
               inet_addr("10.78.0.2"), inet_addr("10.78.0.1"), 5001};
    Run({"ip", "link", "set", "rtap1", "address", "02:00:00:00:01:01"});
    Run({"ip", "addr", "add", "10.78.0.1/24", "dev", "rtap1"});
    Run({"ip", "link", "set", "rtap1", "up"});
    nics_.push_back(std::move(n));
    return UdpListener("10.78.0.1", 5001);
  }

  const GuestNic& Nic(const std::string& name) {
    for (const GuestNic& n : nics_)
      if (n.name == name) return n;
    ADD_FAILURE() << "no nic " << name;
    return nics_.front();
  }

  void SendAll(const std::string& nic, const std::vector<std::string>& payloads) {
    for (const std::string& p : payloads) Nic(nic).Send(p);
  }

  static NetbufOptions Nfqueue(std::vector<std::string> ifs, std::string domain = "web1") {
    NetbufOptions o;
    o.mode = "nfqueue";
    o.domain = std::move(domain);
    o.interfaces = std::move(ifs);
    return o;
  }

  static std::unique_ptr<OutputBuffer> MustMake(const NetbufOptions& o) {
    auto b = MakeOutputBuffer(o);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    return b.ok() ? std::move(b).value() : nullptr;
  }

  // The reader has seen n held packets (Barrier counts only what it has read).
  static void AwaitBuffered(OutputBuffer& b, uint64_t n) {
    ASSERT_TRUE(WaitFor([&] { return b.buffered_packets() == n; }))
        << "buffered " << b.buffered_packets() << ", want " << n;
  }

  std::vector<GuestNic> nics_;
  std::vector<Fd> socks_;
  Fd orig_ns_;
};

constexpr int kHeldMs = 300;     // silence that counts as "held"
constexpr int kArriveMs = 3000;  // time a released packet has to arrive

// ---- nfqueue ----

using netbuf_kernel_nfqueue = NetnsTest;

TEST_F(netbuf_kernel_nfqueue, HoldsEachEpochUntilItsReleaseInOrder) {
  int rx = MakeBridgedGuest();
  auto b = MustMake(Nfqueue({"rtap0"}));
  ASSERT_TRUE(b);
  EXPECT_NE(Mangle("iptables").find("--physdev-in rtap0"), std::string::npos) << Mangle("iptables");
  EXPECT_NE(Mangle("ip6tables").find("-j REMUS-web1"), std::string::npos) << Mangle("ip6tables");

  SendAll("rtap0", Seq("e1-", 5));
  AwaitBuffered(*b, 5);
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty()) << "epoch 1 left before its barrier";
  ASSERT_TRUE(b->Barrier(1).ok());
  SendAll("rtap0", Seq("e2-", 3));
  AwaitBuffered(*b, 8);
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty()) << "a packet left before its ack";

  ASSERT_TRUE(b->Release(1).ok());
  EXPECT_EQ(Receive(rx, 5, kArriveMs), Seq("e1-", 5));  // all of epoch 1, in order
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty()) << "epoch 2 left with epoch 1's ack";
  EXPECT_EQ(b->buffered_packets(), 3u);

  ASSERT_TRUE(b->Barrier(2).ok());
  ASSERT_TRUE(b->Barrier(3).ok());  // an epoch with no packets
  ASSERT_TRUE(b->Release(3).ok());
  EXPECT_EQ(Receive(rx, 3, kArriveMs), Seq("e2-", 3));
  EXPECT_EQ(b->released_packets(), 8u);
  EXPECT_EQ(b->dropped_packets(), 0u);

  ASSERT_TRUE(b->Finish(true).ok());
  EXPECT_FALSE(HasRemusRules()) << Mangle("iptables") << Mangle("ip6tables");
  SendAll("rtap0", {"after"});
  EXPECT_EQ(Receive(rx, 1, kArriveMs), std::vector<std::string>{"after"});  // no longer held
}

// Bridged frames reach iptables only with bridge-nf-call-ip(6)tables on; a
// host that turned them off gets them turned on.
TEST_F(netbuf_kernel_nfqueue, TurnsOnBridgeNetfilter) {
  int rx = MakeBridgedGuest();
  for (const char* f : {"iptables", "ip6tables"}) {
    std::string path = std::string("/proc/sys/net/bridge/bridge-nf-call-") + f;
    Fd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.valid()) << path;
    ASSERT_EQ(::write(fd.get(), "0", 1), 1);
  }
  auto b = MustMake(Nfqueue({"rtap0"}));
  ASSERT_TRUE(b);
  for (const char* f : {"iptables", "ip6tables"}) {
    auto v = ReadFileToString(std::string("/proc/sys/net/bridge/bridge-nf-call-") + f);
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->substr(0, 1), "1") << f;
  }
  SendAll("rtap0", {"held"});
  AwaitBuffered(*b, 1);
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty());
  ASSERT_TRUE(b->Finish(true).ok());
  EXPECT_EQ(Receive(rx, 1, kArriveMs), std::vector<std::string>{"held"});
}

TEST_F(netbuf_kernel_nfqueue, HoldsIpv6Too) {
  int rx4 = MakeBridgedGuest();
  Run({"ip", "-6", "addr", "add", "fd00:77::1/64", "dev", "br0", "nodad"});
  Fd rx(::socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_port = htons(5002);
  ASSERT_EQ(inet_pton(AF_INET6, "fd00:77::1", &a.sin6_addr), 1);
  ASSERT_EQ(::bind(rx.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << strerror(errno);
  auto b = MustMake(Nfqueue({"rtap0"}));
  ASSERT_TRUE(b);
  SendV6(Nic("rtap0"), "fd00:77::2", "fd00:77::1", 5002, "v6-0");
  SendAll("rtap0", {"v4-0"});
  SendV6(Nic("rtap0"), "fd00:77::2", "fd00:77::1", 5002, "v6-1");
  AwaitBuffered(*b, 3);
  ASSERT_TRUE(b->Barrier(1).ok());
  EXPECT_TRUE(Receive(rx.get(), 1, kHeldMs).empty()) << "an IPv6 packet left before its ack";
  ASSERT_TRUE(b->Release(1).ok());
  EXPECT_EQ(Receive(rx.get(), 2, kArriveMs), (std::vector<std::string>{"v6-0", "v6-1"}));
  EXPECT_EQ(Receive(rx4, 1, kArriveMs), std::vector<std::string>{"v4-0"});
  ASSERT_TRUE(b->Finish(true).ok());
}

TEST_F(netbuf_kernel_nfqueue, FinishFalseDropsWhatWasNotAcked) {
  int rx = MakeBridgedGuest();
  auto b = MustMake(Nfqueue({"rtap0"}));
  ASSERT_TRUE(b);
  SendAll("rtap0", Seq("a", 2));
  AwaitBuffered(*b, 2);
  ASSERT_TRUE(b->Barrier(1).ok());
  SendAll("rtap0", Seq("b", 2));
  AwaitBuffered(*b, 4);
  ASSERT_TRUE(b->Release(1).ok());
  EXPECT_EQ(Receive(rx, 2, kArriveMs), Seq("a", 2));
  ASSERT_TRUE(b->Barrier(2).ok());
  ASSERT_TRUE(b->Finish(false).ok());
  EXPECT_TRUE(Receive(rx, 1, 500).empty()) << "unacked output escaped on failover";
  EXPECT_FALSE(HasRemusRules());
  EXPECT_TRUE(b->Release(2).ok());  // after Finish: a no-op
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty());
}

TEST_F(netbuf_kernel_nfqueue, FinishTrueReleasesEverythingInOrder) {
  int rx = MakeBridgedGuest();
  auto b = MustMake(Nfqueue({"rtap0"}));
  ASSERT_TRUE(b);
  SendAll("rtap0", Seq("x", 3));
  AwaitBuffered(*b, 3);
  ASSERT_TRUE(b->Barrier(1).ok());
  SendAll("rtap0", Seq("y", 3));  // the open epoch
  AwaitBuffered(*b, 6);
  ASSERT_TRUE(b->Finish(true).ok());
  std::vector<std::string> want = Seq("x", 3);
  for (const std::string& s : Seq("y", 3)) want.push_back(s);
  EXPECT_EQ(Receive(rx, 6, kArriveMs), want);
  EXPECT_FALSE(HasRemusRules());
  EXPECT_EQ(b->released_packets(), 6u);
}

TEST_F(netbuf_kernel_nfqueue, DestructorDropsAndRemovesRules) {
  int rx = MakeBridgedGuest();
  {
    auto b = MustMake(Nfqueue({"rtap0"}));
    ASSERT_TRUE(b);
    SendAll("rtap0", {"held"});
    AwaitBuffered(*b, 1);
  }
  EXPECT_FALSE(HasRemusRules());
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty());
}

TEST_F(netbuf_kernel_nfqueue, SeveralNicsBridgedAndRouted) {
  int rx0 = MakeBridgedGuest();
  int rx1 = MakeRoutedGuest();
  auto b = MustMake(Nfqueue({"rtap0", "rtap1"}));
  ASSERT_TRUE(b);
  EXPECT_NE(Mangle("iptables").find("-i rtap1"), std::string::npos) << Mangle("iptables");
  SendAll("rtap0", {"bridged"});
  SendAll("rtap1", {"routed"});
  AwaitBuffered(*b, 2);
  ASSERT_TRUE(b->Barrier(1).ok());
  EXPECT_TRUE(Receive(rx0, 1, kHeldMs).empty());
  EXPECT_TRUE(Receive(rx1, 1, 50).empty());
  ASSERT_TRUE(b->Release(1).ok());
  EXPECT_EQ(Receive(rx0, 1, kArriveMs), std::vector<std::string>{"bridged"});
  EXPECT_EQ(Receive(rx1, 1, kArriveMs), std::vector<std::string>{"routed"});
  ASSERT_TRUE(b->Finish(true).ok());
}

TEST_F(netbuf_kernel_nfqueue, InboundTrafficIsNeverHeld) {
  MakeBridgedGuest();
  Run({"ip", "neigh", "add", "10.77.0.2", "lladdr", "02:00:00:00:00:02", "dev", "br0"});
  auto b = MustMake(Nfqueue({"rtap0"}));
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->Barrier(1).ok());
  Fd s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(6000);
  to.sin_addr.s_addr = inet_addr("10.77.0.2");
  const std::string msg = "to-the-guest";
  ASSERT_EQ(::sendto(s.get(), msg.data(), msg.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to),
            static_cast<ssize_t>(msg.size()));
  // The frame comes out of the tap (the guest's receive) at once.
  bool seen = false;
  auto deadline = Clock::now() + std::chrono::milliseconds(kArriveMs);
  while (!seen && Clock::now() < deadline) {
    pollfd p{Nic("rtap0").fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char buf[2048];
    ssize_t n = ::read(Nic("rtap0").fd.get(), buf, sizeof buf);
    if (n > 0 && std::string(buf, static_cast<size_t>(n)).find(msg) != std::string::npos) seen = true;
  }
  EXPECT_TRUE(seen);
  EXPECT_EQ(b->buffered_packets(), 0u);
  ASSERT_TRUE(b->Finish(true).ok());
}

TEST_F(netbuf_kernel_nfqueue, FullQueueFailsClosedAndCountsDrops) {
  int rx = MakeBridgedGuest();
  NetbufOptions o = Nfqueue({"rtap0"});
  o.queue_maxlen = 4;
  auto b = MustMake(o);
  ASSERT_TRUE(b);
  SendAll("rtap0", Seq("p", 10));
  AwaitBuffered(*b, 4);
  EXPECT_TRUE(WaitFor([&] { return b->dropped_packets() == 6; })) << b->dropped_packets();
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty());
  ASSERT_TRUE(b->Barrier(1).ok());
  ASSERT_TRUE(b->Release(1).ok());
  EXPECT_EQ(Receive(rx, 10, 1000), Seq("p", 4));
  ASSERT_TRUE(b->Finish(true).ok());
  EXPECT_EQ(b->dropped_packets(), 6u);  // kept after the queue is gone
}

TEST_F(netbuf_kernel_nfqueue, FullQueueFailOpenLetsTheRestThrough) {
  int rx = MakeBridgedGuest();
  NetbufOptions o = Nfqueue({"rtap0"});
  o.queue_maxlen = 4;
  o.fail_open = true;
  auto b = MustMake(o);
  ASSERT_TRUE(b);
  SendAll("rtap0", Seq("p", 10));
  EXPECT_EQ(Receive(rx, 6, kArriveMs).size(), 6u);  // accepted unbuffered: output commit is off for them
  AwaitBuffered(*b, 4);
  EXPECT_EQ(b->dropped_packets(), 0u);
  ASSERT_TRUE(b->Finish(true).ok());
  EXPECT_EQ(Receive(rx, 4, kArriveMs), Seq("p", 4));
}

TEST_F(netbuf_kernel_nfqueue, RefusesATakenQueueAndDoubleProtection) {
  MakeBridgedGuest();
  MakeRoutedGuest();
  NetbufOptions o = Nfqueue({"rtap0"});
  o.queue_num = 7;
  auto first = MustMake(o);
  ASSERT_TRUE(first);
  NetbufOptions other = Nfqueue({"rtap1"}, "db1");
  other.queue_num = 7;
  auto second = MakeOutputBuffer(other);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Code::kUnavailable);
  EXPECT_NE(second.status().message().find("nfqueue 7 is taken"), std::string::npos) << second.status().message();

  auto twice = MakeOutputBuffer(Nfqueue({"rtap1"}, "web1"));
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.status().code(), Code::kAlreadyExists) << twice.status().ToString();
  EXPECT_NE(twice.status().message().find("protected twice"), std::string::npos) << twice.status().message();
  // The refused attempts left the first buffer's rules alone.
  EXPECT_NE(Mangle("iptables").find("--queue-num 7"), std::string::npos) << Mangle("iptables");
  EXPECT_NE(Mangle("ip6tables").find("--physdev-in rtap0"), std::string::npos) << Mangle("ip6tables");

  auto auto_picked = MakeOutputBuffer(Nfqueue({"rtap1"}, "db1"));  // -1: a free number
  ASSERT_TRUE(auto_picked.ok()) << auto_picked.status().ToString();
  EXPECT_NE(Mangle("iptables").find("--queue-num 29"), std::string::npos) << Mangle("iptables");
  ASSERT_TRUE((*auto_picked)->Finish(true).ok());
  ASSERT_TRUE(first->Finish(true).ok());
  EXPECT_FALSE(HasRemusRules());
}

TEST_F(netbuf_kernel_nfqueue, RejectsMissingInterfaces) {
  auto b = MakeOutputBuffer(Nfqueue({"nosuch0"}));
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kNotFound);
  EXPECT_EQ(b.status().message(), "domain web1: there is no network interface nosuch0");
  EXPECT_EQ(MakeOutputBuffer(Nfqueue({})).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(MakeOutputBuffer("nfqueue").status().code(), Code::kInvalidArgument);
  EXPECT_FALSE(HasRemusRules());
}

// A remusd that dies leaves its rules behind: the guest's output is dropped
// (fail closed) until CleanupStaleNetbuf removes them. A live remusd's rules
// stay.
TEST_F(netbuf_kernel_nfqueue, CleanupRemovesTheRulesOfACrashedRemusd) {
  int rx = MakeBridgedGuest();
  MakeRoutedGuest();

  // Forked while this process has one thread (TSan cannot follow a fork
  // from a multithreaded process into a child that starts threads).
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  if (child == 0) {
    auto b = MakeOutputBuffer(Nfqueue({"rtap0"}, "crashed"));
    char c = b.ok() ? 'y' : 'n';
    (void)!::write(ready[1], &c, 1);
    ::_exit(0);  // no destructors: a crash
  }
  ::close(ready[1]);
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ::close(ready[0]);
  ASSERT_EQ(c, 'y');
  int st;
  ASSERT_EQ(::waitpid(child, &st, 0), child);
  auto live = MustMake(Nfqueue({"rtap1"}, "live1"));
  ASSERT_TRUE(live);

  EXPECT_NE(Mangle("iptables").find("REMUS-crashed"), std::string::npos);
  SendAll("rtap0", {"while-stale"});
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty()) << "no listener: the queue must drop, not bypass";

  ASSERT_TRUE(CleanupStaleNetbuf().ok());
  EXPECT_EQ(Mangle("iptables").find("REMUS-crashed"), std::string::npos) << Mangle("iptables");
  EXPECT_EQ(Mangle("ip6tables").find("REMUS-crashed"), std::string::npos) << Mangle("ip6tables");
  EXPECT_NE(Mangle("iptables").find("REMUS-live1"), std::string::npos) << "a live remusd's rules were removed";
  SendAll("rtap0", {"after-cleanup"});
  EXPECT_EQ(Receive(rx, 1, kArriveMs), std::vector<std::string>{"after-cleanup"});
  ASSERT_TRUE(live->Finish(true).ok());
  EXPECT_FALSE(HasRemusRules());
}

TEST(netbuf_kernel_support, Nfqueue) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  Status s = CheckNetbufSupport("nfqueue");
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(CheckNetbufSupport("none").ok());
  EXPECT_EQ(CheckNetbufSupport("bogus").code(), Code::kInvalidArgument);
}

TEST(netbuf_kernel_support, PlugAnswersInOneSentence) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  Status s = CheckNetbufSupport("plug");
  if (s.ok()) return;  // a kernel with sch_plug
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_EQ(s.message(), kNoSchPlug);  // the one thing this kind of machine lacks
}

// ---- plug ----

using netbuf_kernel_plug = NetnsTest;

uint64_t TxPackets(const std::string& dev) {
  auto s = RtnlSocket::Open();
  if (!s.ok()) return 0;
  rtnl_link* l = nullptr;
  if (rtnl_link_get_kernel(s->get(), 0, dev.c_str(), &l) < 0) return 0;
  uint64_t n = rtnl_link_get_stat(l, RTNL_LINK_TX_PACKETS);
  rtnl_link_put(l);
  return n;
}

std::vector<std::string> OurIfbs() {
  std::vector<std::string> out;
  auto s = RtnlSocket::Open();
  if (!s.ok()) return out;
  auto links = ListLinks(*s);
  if (!links.ok()) return out;
  for (const LinkFacts& l : *links)
    if (l.name.rfind(kIfbPrefix, 0) == 0) out.push_back(l.name);
  return out;
}

std::string TcShow(const char* what, const std::string& dev) {
  auto r = RunCommand({"tc", what, "show", "dev", dev, "ingress"});
  return r.ok() ? r->out : "";
}

// The plug backend's plumbing without the plug: the tap's frames go through
// the IFB (ingress, u32 match-all, mirred redirect) and still reach the world.
TEST_F(netbuf_kernel_plug, IfbRedirectCarriesTheTapsFrames) {
  int rx = MakeBridgedGuest();
  auto s = RtnlSocket::Open();
  ASSERT_TRUE(s.ok());
  auto tap = LookupLink(*s, "rtap0");
  ASSERT_TRUE(tap.ok());
  EXPECT_TRUE(tap->bridge_port());
  auto ifb = CreateIfb(*s, "ifr-test0", FormatOwnerTag(SelfOwner()));
  ASSERT_TRUE(ifb.ok()) << ifb.status().ToString();
  auto facts = LookupLink(*s, "ifr-test0");
  ASSERT_TRUE(facts.ok());
  EXPECT_EQ(facts->kind, "ifb");
  EXPECT_EQ(ParseOwnerTag(facts->alias), SelfOwner());
  bool created = false;
  Status st = AddIngressRedirect(*s, tap->ifindex, *ifb, &created);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(created);
  EXPECT_NE(TcShow("filter", "rtap0").find("ifr-test0"), std::string::npos) << TcShow("filter", "rtap0");

  uint64_t before = TxPackets("ifr-test0");
  SendAll("rtap0", Seq("via-ifb-", 3));
  EXPECT_EQ(Receive(rx, 3, kArriveMs), Seq("via-ifb-", 3));
  EXPECT_GE(TxPackets("ifr-test0") - before, 3u) << "the frames did not pass through the IFB";

  ASSERT_TRUE(RemoveIngressRedirect(*s, tap->ifindex, created).ok());
  EXPECT_EQ(TcShow("qdisc", "rtap0").find("ingress"), std::string::npos);
  ASSERT_TRUE(DeleteLink(*s, *ifb, "ifr-test0").ok());
  EXPECT_TRUE(OurIfbs().empty());
}

// The plug commands are qdisc change requests on the IFB's root 1:. Without
// sch_plug, the same request shape is shown to reach a qdisc's change op
// with pfifo (its limit is read back).
TEST_F(netbuf_kernel_plug, RootQdiscChangeRequestReachesTheQdisc) {
  auto s = RtnlSocket::Open();
  ASSERT_TRUE(s.ok());
  auto ifb = CreateIfb(*s, "ifr-test1", FormatOwnerTag(SelfOwner()));
  ASSERT_TRUE(ifb.ok()) << ifb.status().ToString();
  Run({"tc", "qdisc", "add", "dev", "ifr-test1", "root", "handle", "1:", "pfifo", "limit", "10"});
  rtnl_qdisc* upd = rtnl_qdisc_alloc();
  rtnl_tc_set_kind(TC_CAST(upd), "pfifo");
  ASSERT_EQ(rtnl_qdisc_fifo_set_limit(upd, 77), 0);
  auto m = BuildRootQdiscChangeRequest(*ifb, upd);
  rtnl_qdisc_put(upd);
  ASSERT_TRUE(m.ok());
  Status st = s->Request(std::move(m).value(), "changing pfifo");
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto shown = RunCommand({"tc", "qdisc", "show", "dev", "ifr-test1"});
  ASSERT_TRUE(shown.ok());
  EXPECT_NE(shown->out.find("pfifo 1: root refcnt 2 limit 77p"), std::string::npos) << shown->out;
  ASSERT_TRUE(DeleteLink(*s, *ifb, "ifr-test1").ok());
}

TEST_F(netbuf_kernel_plug, RefusesClearlyWithoutSchPlugAndLeavesNothing) {
  if (CheckNetbufSupport("plug").ok()) GTEST_SKIP() << "this kernel has sch_plug; the refusal cannot be shown";
  MakeBridgedGuest();
  NetbufOptions o;
  o.mode = "plug";
  o.domain = "web1";
  o.interfaces = {"rtap0"};
  auto b = MakeOutputBuffer(o);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(b.status().message(), kNoSchPlug);
  EXPECT_TRUE(OurIfbs().empty());
  EXPECT_EQ(TcShow("qdisc", "rtap0").find("ingress"), std::string::npos);
}

TEST_F(netbuf_kernel_plug, HoldsEachEpochUntilItsRelease) {
  Status support = CheckNetbufSupport("plug");
  if (!support.ok()) GTEST_SKIP() << support.message();
  int rx = MakeBridgedGuest();
  NetbufOptions o;
  o.mode = "plug";
  o.domain = "web1";
  o.interfaces = {"rtap0"};
  auto b = MustMake(o);
  ASSERT_TRUE(b);
  SendAll("rtap0", Seq("e1-", 3));
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty());
  ASSERT_TRUE(b->Barrier(1).ok());
  SendAll("rtap0", Seq("e2-", 2));
  ASSERT_TRUE(b->Release(1).ok());
  EXPECT_EQ(Receive(rx, 3, kArriveMs), Seq("e1-", 3));
  EXPECT_TRUE(Receive(rx, 1, kHeldMs).empty());
  ASSERT_TRUE(b->Finish(true).ok());
  EXPECT_EQ(Receive(rx, 2, kArriveMs), Seq("e2-", 2));
  EXPECT_TRUE(OurIfbs().empty());
}

TEST_F(netbuf_kernel_plug, CleanupRemovesTheIfbAndFilterOfACrashedRemusd) {
  int rx = MakeBridgedGuest();
  pid_t child = ::fork();
  if (child == 0) {
    auto s = RtnlSocket::Open();
    if (!s.ok()) ::_exit(1);
    auto tap = LookupLink(*s, "rtap0");
    auto ifb = CreateIfb(*s, IfbName("crashed", "rtap0"), FormatOwnerTag(SelfOwner()));
    bool created = false;
    if (!tap.ok() || !ifb.ok() || !AddIngressRedirect(*s, tap->ifindex, *ifb, &created).ok()) ::_exit(2);
    ::_exit(0);  // no teardown: a crash
  }
  int st;
  ASSERT_EQ(::waitpid(child, &st, 0), child);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "child setup failed: " << st;
  ASSERT_EQ(OurIfbs(), std::vector<std::string>{IfbName("crashed", "rtap0")});
  EXPECT_NE(TcShow("filter", "rtap0").find("mirred"), std::string::npos);

  // A live owner's IFB stays.
  auto s = RtnlSocket::Open();
  ASSERT_TRUE(s.ok());
  auto mine = CreateIfb(*s, "ifr-live0", FormatOwnerTag(SelfOwner()));
  ASSERT_TRUE(mine.ok());

  Status c = CleanupStaleNetbuf();
  ASSERT_TRUE(c.ok()) << c.ToString();
  EXPECT_EQ(OurIfbs(), std::vector<std::string>{"ifr-live0"});
  EXPECT_EQ(TcShow("filter", "rtap0").find("mirred"), std::string::npos) << TcShow("filter", "rtap0");
  SendAll("rtap0", {"after-cleanup"});
  EXPECT_EQ(Receive(rx, 1, kArriveMs), std::vector<std::string>{"after-cleanup"});
  ASSERT_TRUE(DeleteLink(*s, *mine, "ifr-live0").ok());
}

}  // namespace
}  // namespace remus::netbuf
