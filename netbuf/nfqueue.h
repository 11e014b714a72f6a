// The nfqueue backend: iptables/ip6tables rules (firewall.h) send the IP
// packets arriving from the guest's taps to one NFQUEUE; we read them with
// libnetfilter_queue's libmnl API, metadata only (NFQNL_COPY_META), and keep
// them queued in the kernel until their epoch is acked.
//
//   reader thread  poll(socket, eventfd) -> recvmmsg -> PacketLedger::OnPackets
//   Barrier(N)     PacketLedger::Barrier: closes N at the last id read
//   Release(N)     PacketLedger::Release: ONE NFQNL_MSG_VERDICT_BATCH ACCEPT
//   Finish(c)      ledger verdict for everything (accept if c, else drop),
//                  then the rules go (packets read meanwhile get the same
//                  verdict at once), then the reader stops, the socket is
//                  drained and closed (the kernel drops anything left)
//
// The queue is fail closed by default: when queue_maxlen packets are held,
// the kernel drops new ones (counted in dropped_packets()); fail_open accepts
// them instead, breaking output commit for those packets. The socket has
// NETLINK_NO_ENOBUFS and a 16 MiB SO_RCVBUFFORCE; a packet the kernel cannot
// hand to us is dropped (user_dropped), never silently let through.
// GSO packets are queued whole (NFQA_CFG_F_GSO): we never touch payloads.
// Non-IP frames (ARP) are not queued.
//
// Thread-safety: see OutputBuffer.
#pragma once

#include <linux/netlink.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "netbuf/netbuf.h"
#include "netbuf/packet_ledger.h"

namespace remus::netbuf {

// First of the 1000 queue numbers tried by the automatic pick (far from 0,
// where IDSes and other NFQUEUE users default).
inline constexpr uint16_t kAutoQueueFirst = 29000;
inline constexpr uint16_t kAutoQueueCount = 1000;

// Netlink messages, built into `buf` (at least kNfqMsgBufSize bytes), so
// their attributes can be tested without a kernel.
inline constexpr size_t kNfqMsgBufSize = 512;
nlmsghdr* BuildNfqBind(char* buf, uint16_t queue, uint32_t seq);
nlmsghdr* BuildNfqParams(char* buf, uint16_t queue, uint32_t maxlen, bool fail_open, uint32_t seq);
nlmsghdr* BuildNfqVerdictBatch(char* buf, uint16_t queue, uint32_t last_id, Verdict v);

// What one received datagram holds: queued packet ids and netlink errors.
struct NfqMessages {
  std::vector<uint32_t> ids;
  struct Error {
    uint32_t seq;
    int err;  // positive errno
  };
  std::vector<Error> errors;
};
Status ParseNfqMessages(const void* buf, size_t len, NfqMessages* out);

// REQUIRES: opts.mode == "nfqueue", opts.interfaces not empty.
StatusOr<std::unique_ptr<OutputBuffer>> MakeNfqueueOutputBuffer(const NetbufOptions& opts);

// Tries iptables, ip6tables, NFQUEUE, physdev, br_netfilter and a queue bind
// in the CALLER's network namespace (CheckNetbufSupport runs it in a
// throwaway one). Leaves nothing behind.
Status CheckNfqueueSupportHere();

// Removes REMUS-* chains (and the jumps to them) whose owner is gone, from
// the mangle tables of iptables and ip6tables.
Status CleanupStaleNfqueue();

}  // namespace remus::netbuf
