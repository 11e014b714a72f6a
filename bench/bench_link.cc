// bench_link: replication-link throughput with TLS 1.3 (what remusd runs)
// against the same Link without encryption (the alternative: the link as it
// was before 2026-12, HMAC handshake then CRC-only frames), over loopback
// TCP on this machine.
//
// One sender thread sends PAGES frames of 4 MiB (the primary's batch size)
// as fast as the receiver thread takes them; the receiver acks every 16
// frames, as a backup acks checkpoints, so both directions share the TLS
// session as they do in remusd. Each rep times both modes back to back
// (order alternating), so a noisy neighbour hits both alike; the result is
// the medians and the per-rep ratio's median. CPU time (both threads,
// RUSAGE_SELF) per GiB says what encryption costs the primary and backup
// together on this CPU; on two hosts each pays about half.
//
// Output: one JSON object on stdout.
// Usage: bench_link [--reps N] [--mib M]
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "common/log.h"
#include "replicator/link/tls.h"
#include "replicator/link/wire.h"

namespace {

using remus::Fd;
using remus::wire::Link;
using remus::wire::MsgType;

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

void Die(const std::string& what) {
  std::fprintf(stderr, "bench_link: %s\n", what.c_str());
  std::exit(1);
}

struct Run {
  double seconds = 0, cpu = 0;
};

// Sends `frames` frames of `payload` from a fresh connection; TLS if tls.
Run Transfer(bool tls, const std::string& payload, int frames) {
  auto listener = remus::ListenTcp({"127.0.0.1", 0});
  if (!listener.ok()) Die(listener.status().ToString());
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  ::getsockname(listener->get(), reinterpret_cast<sockaddr*>(&addr), &len);
  remus::wire::LinkSecurity sec;
  sec.key = remus::wire::Key(std::string(32, 'b'));
  auto cctx = remus::wire::TlsContext::Create(sec, remus::wire::TlsRole::kPrimary);
  auto sctx = remus::wire::TlsContext::Create(sec, remus::wire::TlsRole::kBackup);
  if (!cctx.ok() || !sctx.ok()) Die("TLS contexts");

  std::thread receiver([&] {
    auto fd = remus::Accept(listener->get());
    if (!fd.ok()) Die(fd.status().ToString());
    Link link(std::move(*fd));
    if (tls && !remus::wire::ServerHandshake(link, **sctx, 5000).ok()) Die("server handshake");
    std::string reuse;
    for (int i = 0; i < frames; i++) {
      auto f = link.Recv(std::move(reuse));
      if (!f.ok()) Die(f.status().ToString());
      reuse = std::move(f->payload);
      if (i % 16 == 15 || i == frames - 1)
        if (!link.Send(MsgType::kAck, static_cast<uint64_t>(i), "").ok()) Die("ack");
    }
  });
  auto fd = remus::ConnectTcp({"127.0.0.1", ntohs(addr.sin_port)}, 5000);
  if (!fd.ok()) Die(fd.status().ToString());
  Link link(std::move(*fd));
  if (tls && !remus::wire::ClientHandshake(link, **cctx, "127.0.0.1", "bench", 5000).ok()) Die("client handshake");
  std::thread acks([&] {
    for (int i = 0; i < (frames + 15) / 16; i++)
      if (!link.Recv().ok()) Die("ack recv");
  });
  const double cpu0 = CpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < frames; i++)
    if (!link.Send(MsgType::kPages, static_cast<uint64_t>(i), payload).ok()) Die("send");
  acks.join();
  const auto t1 = std::chrono::steady_clock::now();
  receiver.join();
  return {std::chrono::duration<double>(t1 - t0).count(), CpuSeconds() - cpu0};
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 7, mib = 1024;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--mib")) mib = std::atoi(argv[i + 1]);
    else Die(std::string("unknown option ") + argv[i]);
  }
  remus::SetLogLevel(remus::LogLevel::kWarn);
  constexpr size_t kFrame = 4 << 20;
  // Page-like data: not all zero, not compressible to nothing.
  std::string payload(kFrame, '\0');
  for (size_t i = 0; i < kFrame; i += 8) std::memcpy(&payload[i], &i, sizeof i);
  const int frames = std::max(1, mib / 4);
  const double gib = static_cast<double>(frames) * kFrame / (1 << 30);
  Transfer(true, payload, 4);  // warm up both paths
  Transfer(false, payload, 4);

  std::vector<double> tls_mibs, plain_mibs, ratio, tls_cpu, plain_cpu;
  for (int r = 0; r < reps; r++) {
    Run t, p;
    if (r % 2 == 0) {
      t = Transfer(true, payload, frames);
      p = Transfer(false, payload, frames);
    } else {
      p = Transfer(false, payload, frames);
      t = Transfer(true, payload, frames);
    }
    tls_mibs.push_back(gib * 1024 / t.seconds);
    plain_mibs.push_back(gib * 1024 / p.seconds);
    ratio.push_back(p.seconds / t.seconds);  // TLS throughput as a fraction of plain
    tls_cpu.push_back(t.cpu / gib);
    plain_cpu.push_back(p.cpu / gib);
  }
  nlohmann::json out = {
      {"bench", "link"},
      {"frame_bytes", kFrame},
      {"gib_per_rep", gib},
      {"reps", reps},
      {"tls_mib_s_p50", Median(tls_mibs)},
      {"plain_mib_s_p50", Median(plain_mibs)},
      {"ratio_tls_plain_throughput_p50", Median(ratio)},
      {"tls_cpu_s_per_gib_p50", Median(tls_cpu)},
      {"plain_cpu_s_per_gib_p50", Median(plain_cpu)},
      {"cipher", "TLS_AES_128_GCM_SHA256"},
  };
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
