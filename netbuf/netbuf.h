// Output commit: packets the guest sends during epoch N leave the host only
// after the backup acknowledged checkpoint N. The epoch loop calls Barrier at
// each checkpoint pause and Release on each ACK.
//
// Backends: `none` (below) holds nothing; `plug` and `nfqueue` land with the
// output-commit issue behind this same interface.
//
// Thread-safety: implementations are called from the epoch loop and the ACK
// reader; they must be thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

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
  virtual uint64_t buffered_packets() const = 0;
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

// Creates the backend named by `mode` ("none" for now).
StatusOr<std::unique_ptr<OutputBuffer>> MakeOutputBuffer(std::string_view mode);

}  // namespace remus
