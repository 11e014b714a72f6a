// libFuzzer target for the bytes a backup reads from a peer that has not
// authenticated: ServerHandshake (replicator/link/tls.h) with a shared key:
// the first-bytes check (plain remus, not TLS), OpenSSL's ClientHello
// parsing, and our ClientHello callback that reads the offered PSK identity
// out of the raw pre_shared_key extension.
//
// Input: what the peer sends. It is written into one end of a socketpair
// whose sending side is then shut down, so the handshake ends at once at the
// end of the input (inputs are capped below the socket buffer; what the
// backup answers, at most a ServerHello flight, fits in the other
// direction's buffer).
// Checks: no crash, leak or UB (ASan/UBSan); the handshake never succeeds
// (nothing in the input can hold the key's PSK) and fails with one of its
// documented codes.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>

#include "common/io.h"
#include "common/log.h"
#include "replicator/link/tls.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
constexpr const char* kTarget = "fuzz_tls_handshake";
constexpr size_t kMaxInput = 32 * 1024;

const wire::TlsContext& Backup() {
  static std::shared_ptr<const wire::TlsContext> ctx = [] {
    SetLogLevel(LogLevel::kError);
    wire::LinkSecurity sec;
    sec.key = wire::Key(std::string(32, 'k'));
    auto c = wire::TlsContext::Create(sec, wire::TlsRole::kBackup);
    if (!c.ok()) fuzz::Fail(kTarget, "cannot create the TLS context", c.status());
    return *c;
  }();
  return *ctx;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > kMaxInput) return 0;
  const wire::TlsContext& ctx = Backup();
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  Fd peer(sv[1]);
  wire::Link link{Fd(sv[0])};
  if (size > 0 && !WriteFull(peer.get(), data, size).ok()) return 0;
  ::shutdown(peer.get(), SHUT_WR);
  auto r = wire::ServerHandshake(link, ctx, 1000);
  if (r.ok()) fuzz::Fail(kTarget, "a handshake without the key succeeded");
  fuzz::CheckCode(r.status(),
                  {Code::kUnauthenticated, Code::kUnavailable, Code::kDeadlineExceeded, Code::kDataLoss,
                   Code::kInvalidArgument, Code::kFailedPrecondition},
                  kTarget, "unexpected error code");
  return 0;
}
