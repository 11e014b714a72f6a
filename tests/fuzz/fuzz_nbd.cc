// libFuzzer target for diskmirror's NBD server (diskmirror/nbd_server.h,
// nbd_proto.h): the handshake, option haggling and request parsing of one
// connection, as QEMU's NBD client (or anything that reaches the socket)
// could drive it.
//
// Input: byte 0 selects the export and the sink, the rest is what the client
// sends (at most 64 KiB), written into a socketpair whose client end then
// shuts down writing; NbdServer::ServeConnection serves the other end on a
// thread while this one reads every reply.
//   bits 0-1  export: 64 KiB; 64 KiB with 512-byte blocks and 16 KiB
//             payloads; 64 KiB read-only; empty, unnamed
//   bits 2-4  the sink fails every call with: nothing, ResourceExhausted,
//             InvalidArgument, PermissionDenied, Unimplemented, DataLoss, ...
// Checks: the sink is never asked for bytes outside the export, for a
// misaligned range, or to write a read-only export; the session ends OK,
// Aborted (protocol violation), NotFound (unknown export) or Unavailable
// (the client hung up); the server's first bytes are the NBD greeting.
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "common/io.h"
#include "common/log.h"
#include "diskmirror/nbd_proto.h"
#include "diskmirror/nbd_server.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
constexpr const char* kTarget = "fuzz_nbd";
constexpr size_t kMaxInput = 64 * 1024;

class CheckingSink final : public DiskSink {
 public:
  CheckingSink(const NbdExport& e) : e_(e), mem_(e.size, 0) {}
  Status fail;  // every call returns this (OK: works)

  Status Read(uint64_t off, std::span<uint8_t> out) override {
    Range(off, out.size());
    if (!fail.ok()) return fail;
    std::memcpy(out.data(), mem_.data() + off, out.size());
    return OkStatus();
  }
  Status Write(uint64_t off, std::span<const uint8_t> data, bool) override {
    Range(off, data.size());
    Writable();
    if (!fail.ok()) return fail;
    std::memcpy(mem_.data() + off, data.data(), data.size());
    return OkStatus();
  }
  Status WriteZeroes(uint64_t off, uint64_t len, bool) override {
    Range(off, len);
    Writable();
    if (!fail.ok()) return fail;
    std::memset(mem_.data() + off, 0, len);
    return OkStatus();
  }
  Status Trim(uint64_t off, uint64_t len) override {
    Range(off, len);
    Writable();
    return fail;
  }
  Status Flush() override { return fail; }

 private:
  void Range(uint64_t off, uint64_t len) const {
    fuzz::Check(len > 0, kTarget, "the sink got an empty range");
    fuzz::Check(off <= e_.size && len <= e_.size - off, kTarget, "the sink got a range outside the export");
    fuzz::Check(off % e_.min_block == 0 && len % e_.min_block == 0, kTarget, "the sink got a misaligned range");
  }
  void Writable() const { fuzz::Check(!e_.read_only, kTarget, "the sink was asked to write a read-only export"); }
  NbdExport e_;
  std::vector<uint8_t> mem_;
};

struct Server {
  NbdExport exp;
  std::unique_ptr<CheckingSink> sink;
  std::unique_ptr<NbdServer> server;
};

Server* GetServer(int which) {
  static Server servers[4];
  static std::string dir = [] {
    SetLogLevel(LogLevel::kError);
    char t[] = "/dev/shm/fuzz_nbd.XXXXXX";
    if (!::mkdtemp(t)) fuzz::Fail(kTarget, "mkdtemp failed");
    std::atexit([] {
      for (auto& s : servers) s.server.reset();
      ::rmdir(dir.c_str());
    });
    return std::string(t);
  }();
  Server& s = servers[which];
  if (!s.server) {
    s.exp.name = "vda";
    s.exp.size = 64 << 10;
    if (which == 1) {
      s.exp.min_block = 512;
      s.exp.max_payload = 16 << 10;
    } else if (which == 2) {
      s.exp.read_only = true;
    } else if (which == 3) {
      s.exp.name = "";
      s.exp.description = "empty";
      s.exp.size = 0;
    }
    s.sink = std::make_unique<CheckingSink>(s.exp);
    NbdServerOptions o;
    o.unix_path = dir + "/s" + std::to_string(which);
    auto st = NbdServer::Start(s.exp, s.sink.get(), o);
    if (!st.ok()) fuzz::Fail(kTarget, "NbdServer::Start failed", st.status());
    s.server = std::move(st).value();
  }
  return &s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > kMaxInput + 1) return 0;
  const uint8_t sel = data[0];
  Server* s = GetServer(sel & 3);
  static const Status kFails[] = {OkStatus(),
                                  ResourceExhausted("full"),
                                  InvalidArgument("bad"),
                                  PermissionDenied("no"),
                                  Unimplemented("no"),
                                  DataLoss("eio"),
                                  OutOfRange("range"),
                                  Unavailable("gone")};
  s->sink->fail = kFails[(sel >> 2) & 7];

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) fuzz::Fail(kTarget, "socketpair failed");
  Fd server_end(sv[0]), client(sv[1]);
  int sndbuf = 1 << 20;
  ::setsockopt(client.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  ::fcntl(client.get(), F_SETFL, O_NONBLOCK);
  if (size > 1) {
    ssize_t n = ::write(client.get(), data + 1, size - 1);
    if (n != static_cast<ssize_t>(size - 1)) fuzz::Fail(kTarget, "the input does not fit the socket buffer");
  }
  ::shutdown(client.get(), SHUT_WR);

  Status ended;
  std::thread t([&] {
    ended = s->server->ServeConnection(server_end.get());
    server_end.Reset();  // the client's read sees EOF
  });
  // Drain the replies.
  std::string out;
  char buf[65536];
  for (;;) {
    pollfd p{client.get(), POLLIN, 0};
    ::poll(&p, 1, -1);
    ssize_t n = ::read(client.get(), buf, sizeof buf);
    if (n > 0) {
      if (out.size() < 64) out.append(buf, static_cast<size_t>(std::min<ssize_t>(n, 64)));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    break;
  }
  t.join();
  fuzz::Debug(kTarget, ("session ended; requests so far " + std::to_string(s->server->stats().requests.load())).c_str(), ended);
  if (!ended.ok())
    fuzz::CheckCode(ended, {Code::kAborted, Code::kNotFound, Code::kUnavailable}, kTarget,
                    "the session ended with an unexpected code");
  fuzz::Check(out.size() >= 18 && LoadU64(out.data()) == nbd::kMagic && LoadU64(out.data() + 8) == nbd::kOptMagic,
              kTarget, "the server did not greet");
  return 0;
}
