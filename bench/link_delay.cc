// link_delay: the one-way delay of an emulated link, for bench/workloads.py
// on a kernel without sch_netem (and without sch_fq, so no EDT timestamps
// either): iptables sends the link's outgoing packets to one NFQUEUE; this
// holds each packet in the kernel's queue for a fixed time and then accepts
// it. Payloads are never copied (metadata only, GSO packets whole). With a
// constant delay the due order is the arrival order, so one VERDICT_BATCH
// accepts every packet that is due. TCP on the link sees a real RTT: its
// window, its ACK clock and its retransmissions are the kernel's own.
//
// Written by hand: no Debian package delays packets without netem. The
// netlink side is the output buffer's own (netbuf/nfq_socket.h).
//
//   link_delay --queue N --delay-us US [--maxlen PACKETS]
//
// Runs until SIGTERM or SIGINT, then accepts everything held and prints one
// JSON line: packets, the most held at once, how late the verdicts were
// against their due time (p50/p99/max, microseconds: the emulation's error).
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "netbuf/nfq_socket.h"
#include "netbuf/nfqueue.h"

namespace {

using Clock = std::chrono::steady_clock;
using remus::netbuf::NfqMessages;
using remus::netbuf::NfqSocket;

struct Args {
  int queue = -1;
  long delay_us = -1;
  long maxlen = 65536;
};

int Fail(const std::string& what, const remus::Status& s) {
  std::fprintf(stderr, "link_delay: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

struct Held {
  uint32_t id;
  Clock::time_point due;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"Holds every packet of one NFQUEUE for a fixed time, then accepts it (bench/workloads.py)"};
  app.add_option("--queue", a.queue, "the NFQUEUE number")->required()->check(CLI::Range(0, 65535));
  app.add_option("--delay-us", a.delay_us, "how long each packet waits, microseconds")
      ->required()
      ->check(CLI::Range(0L, 10'000'000L));
  app.add_option("--maxlen", a.maxlen, "the queue's length in packets (default 65536)")->check(CLI::Range(1L, 1L << 24));
  CLI11_PARSE(app, argc, argv);
  const auto delay = std::chrono::microseconds(a.delay_us);
  const auto queue = static_cast<uint16_t>(a.queue);

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
  if (sfd < 0) return Fail("signalfd", remus::ErrnoStatus("signalfd", errno));

  auto sock = NfqSocket::Open();
  if (!sock.ok()) return Fail("netlink", sock.status());
  NfqSocket& s = **sock;
  if (remus::Status st = remus::netbuf::BindQueue(s, queue); !st.ok()) return Fail("bind", st);
  char buf[remus::netbuf::kNfqMsgBufSize];
  if (remus::Status st = s.Request(remus::netbuf::BuildNfqParams(buf, queue, static_cast<uint32_t>(a.maxlen),
                                                                 /*fail_open=*/false, s.NextSeq()),
                                   "queue parameters");
      !st.ok())
    return Fail("configure", st);
  std::fprintf(stderr, "link_delay: queue %d, delay %ld us\n", a.queue, a.delay_us);

  std::deque<Held> held;
  uint64_t packets = 0;
  size_t max_held = 0;
  std::vector<double> late_us;  // one sample per verdict batch (its oldest packet)
  auto take = [&](const std::vector<uint32_t>& ids) {
    auto due = Clock::now() + delay;
    for (uint32_t id : ids) held.push_back({id, due});
    packets += ids.size();
    max_held = std::max(max_held, held.size());
  };
  take(s.TakeEarlyIds());
  auto release = [&](bool all) -> remus::Status {
    auto now = Clock::now();
    size_t n = 0;
    while (n < held.size() && (all || held[n].due <= now)) n++;
    if (n == 0) return remus::OkStatus();
    late_us.push_back(std::chrono::duration<double, std::micro>(now - held.front().due).count());
    RETURN_IF_ERROR(s.Send(remus::netbuf::BuildNfqVerdictBatch(buf, queue, held[n - 1].id,
                                                                remus::netbuf::Verdict::kAccept),
                           "verdict"));
    held.erase(held.begin(), held.begin() + static_cast<std::ptrdiff_t>(n));
    return remus::OkStatus();
  };

  bool stop = false;
  while (!stop) {
    pollfd fds[2] = {{s.fd(), POLLIN, 0}, {sfd, POLLIN, 0}};
    timespec ts{};
    timespec* timeout = nullptr;
    if (!held.empty()) {
      auto left = std::max(Clock::duration::zero(), held.front().due - Clock::now());
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      ts = {static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
      timeout = &ts;
    }
    if (ppoll(fds, 2, timeout, nullptr) < 0 && errno != EINTR) return Fail("ppoll", remus::ErrnoStatus("ppoll", errno));
    if (fds[1].revents & POLLIN) stop = true;
    if (fds[0].revents & POLLIN) {
      for (;;) {
        NfqMessages m;
        auto n = s.ReadBatch(&m);
        take(m.ids);
        if (!n.ok()) return Fail("read", n.status());
        if (*n < NfqSocket::kBatch) break;
      }
    }
    if (remus::Status st = release(stop); !st.ok()) return Fail("release", st);
  }

  std::sort(late_us.begin(), late_us.end());
  auto pct = [&](double p) {
    return late_us.empty() ? 0.0 : late_us[static_cast<size_t>(p * static_cast<double>(late_us.size() - 1))];
  };
  nlohmann::json out = {{"queue", a.queue},       {"delay_us", a.delay_us},
                        {"packets", packets},     {"max_held", max_held},
                        {"late_us", {{"p50", pct(0.5)}, {"p99", pct(0.99)}, {"max", pct(1.0)}}}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
