// Loopback replication links: a connected pair of wire::Link
// (replicator/link/wire.h) over socketpair(AF_UNIX, SOCK_STREAM), for tests
// that need both ends of a link in one process.
//
//   auto [a, b] = testing::MakeLoopbackLinks();
//   a->Send(wire::MsgType::kHeartbeat, 1, "");
//   auto f = b->Recv();
//
// With buffer_bytes > 0 both sockets' SO_SNDBUF and SO_RCVBUF are set to it,
// so a peer that stops reading blocks the sender after roughly that much
// (the kernel doubles the value and has a floor of a few KiB): the way to
// test backpressure and a stalled backup without a network.
//
// Ownership: each Link owns its socket; destroying one end makes the other's
// Recv fail with Unavailable. Thread-safety: as wire::Link.
// Target: remus_test_fakes (tests/CMakeLists.txt).
#pragma once

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <memory>

#include "common/io.h"
#include "replicator/link/wire.h"

namespace remus::testing {

struct LinkPair {
  std::unique_ptr<wire::Link> a;
  std::unique_ptr<wire::Link> b;
};

inline LinkPair MakeLoopbackLinks(int buffer_bytes = 0) {
  int sv[2] = {-1, -1};
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0) << "socketpair";
  if (buffer_bytes > 0) {
    for (int fd : sv) {
      EXPECT_EQ(::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof buffer_bytes), 0);
      EXPECT_EQ(::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof buffer_bytes), 0);
    }
  }
  return {std::make_unique<wire::Link>(Fd(sv[0])), std::make_unique<wire::Link>(Fd(sv[1]))};
}

}  // namespace remus::testing
