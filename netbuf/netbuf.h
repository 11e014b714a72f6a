// Output commit: packets the guest sends during epoch N leave the host only
// after the backup acknowledged checkpoint N. The epoch loop calls Barrier at
// each checkpoint pause and Release on each ACK.
//
// Backends (MakeOutputBuffer):
//   none     holds nothing (NoOutputBuffer below).
//   nfqueue  iptables/ip6tables rules send the IP packets arriving from the
//            guest's taps to an NFQUEUE; a reader thread tags each packet id
//            with its epoch and Release sends one batch verdict (nfqueue.h).
//   plug     Xen Remus's mechanism: each tap's ingress is redirected (u32 +
//            mirred) to an IFB device whose root qdisc is `plug`; Barrier
//            inserts a plug, Release lets one buffer go (plug.h).
// Kernel objects carry our naming prefixes (chains `REMUS-*`, IFB devices
// `ifr-*`, see naming.h) and an owner tag (pid + start time), so
// CleanupStaleNetbuf can remove what a crashed remusd left behind without
// touching a live remusd's objects.
//
// Contract of every backend:
//   Barrier(N)  the guest is PAUSED for checkpoint N: what it sent so far
//               belongs to epochs <= N, what is seen after the call to N+1.
//               Epochs passed to Barrier must increase.
//   Release(N)  the backup acked N: every packet of epochs <= N leaves, in
//               order. Duplicate and out-of-order (older) acks are ignored;
//               an ack ahead of its barrier is remembered, and Barrier(N)
//               then releases at once.
//   Finish(c)   protection ends. c (the primary guest continues): release
//               everything; !c (the backup takes over): drop everything not
//               released. Either way every rule and device is removed.
//               Later calls are no-ops. The destructor is Finish(false) if
//               Finish was not called.
// Inbound traffic to the guest is never delayed.
//
// Thread-safety: Barrier (epoch thread), Release (ACK reader) and the
// counters (status) may be called concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace remus {

class OutputBuffer {
 public:
  virtual ~OutputBuffer() = default;
  // The guest is paused for checkpoint `epoch`: packets sent from now on
  // belong to epoch+1.
  virtual Status Barrier(uint64_t epoch) = 0;
  // The backup acknowledged `epoch`: release every packet of epochs <= epoch.
  virtual Status Release(uint64_t epoch) = 0;
  // Protection ended. If the primary guest continues, unacked packets are
  // released; otherwise they are dropped.
  virtual Status Finish(bool primary_continues) = 0;
  virtual std::string_view mode() const = 0;
  // A sentence for `remusctl status` about the guarantee this backend gives.
  virtual std::string_view guarantee() const = 0;
  // Packets held now (for plug, the qdisc's queue length).
  virtual uint64_t buffered_packets() const = 0;
  // Packets let go by Release/Finish(true) so far (0 where not counted).
  virtual uint64_t released_packets() const { return 0; }
  // Packets the kernel dropped because the buffer was full or remusd could
  // not take them (nfqueue: queue_dropped + user_dropped of our queue; plug:
  // the qdiscs' drops). Not the packets Finish(false) discards on purpose.
  virtual uint64_t dropped_packets() const { return 0; }
};

// Holds nothing: for workloads that accept that clients may see output from
// a state the backup cannot reproduce.
class NoOutputBuffer final : public OutputBuffer {
 public:
  Status Barrier(uint64_t) override { return OkStatus(); }
  Status Release(uint64_t) override { return OkStatus(); }
  Status Finish(bool) override { return OkStatus(); }
  std::string_view mode() const override { return "none"; }
  std::string_view guarantee() const override {
    return "packets are not held: after a failover, clients may have seen output the backup never produced";
  }
  uint64_t buffered_packets() const override { return 0; }
};

struct NetbufOptions {
  std::string mode = "none";            // plug | nfqueue | none
  std::string domain;                   // names the chain / IFB devices (sanitized, see naming.h)
  std::vector<std::string> interfaces;  // host-side taps of the guest's NICs; required for plug/nfqueue
  int queue_num = -1;                   // nfqueue: -1 = pick a free queue number
  uint32_t queue_maxlen = 65536;        // nfqueue: kernel queue length
  bool fail_open = false;               // nfqueue: queue full -> accept (true) or drop (false)
  uint32_t plug_limit_bytes = 0;        // plug: qdisc limit; 0 = kernel default
};

// Creates the backend named by opts.mode and installs its rules/devices in
// the caller's network namespace. Errors are one sentence naming the domain
// and the device or rule that failed; nothing is left installed on error.
StatusOr<std::unique_ptr<OutputBuffer>> MakeOutputBuffer(const NetbufOptions& opts);
// Only "none" can be made without options; plug/nfqueue need interfaces.
StatusOr<std::unique_ptr<OutputBuffer>> MakeOutputBuffer(std::string_view mode);

// Removes the chains, rules, IFB devices and redirect filters a dead remusd
// left behind in this network namespace: everything carrying our prefixes
// whose owner process is gone. Objects of a live remusd (two may share a
// host) are kept. Called at remusd start. Needs root.
Status CleanupStaleNetbuf();

// Whether this kernel and host can run `mode`, tried for real in a throwaway
// network namespace. The error is one sentence naming what is missing and
// the alternative, e.g. "the kernel lacks sch_plug (CONFIG_NET_SCH_PLUG);
// use --netbuf nfqueue". "none" is always supported. Needs root.
Status CheckNetbufSupport(std::string_view mode);

}  // namespace remus
