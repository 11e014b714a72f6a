// FaultyFileIo: an in-memory FileIo for tests of the journal's crash and
// error handling (leveldb's fault_injection_test / SpecialEnv). Each file
// has a "page cache" view (what reads see) and a durable view (what survives
// a crash); Sync() makes the first equal to the second. Switches:
//   AddFault        fail the Nth..Mth write/read/sync/truncate/zero/discard
//                   of files whose path contains a string, with an errno
//   SetSpaceLeft    the disk fills: writes that grow files beyond the budget
//                   write what fits and fail with ENOSPC
//   CutPowerAfter   after N more mutating operations every operation fails
//                   with EIO and has no effect (the machine is off)
//   Crash           drop what was not synced (optionally keeping the first K
//                   unsynced operations of each file and a torn prefix of the
//                   next write, or a random subset of them), then power on
// File creation is durable at once (the journal syncs its directory anyway).
//
// Thread-safety: thread-safe (one mutex).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_annotations.h"
#include "diskmirror/file_io.h"

namespace remus {

class FaultyFileIo final : public FileIo {
 public:
  enum class Op { kWrite, kRead, kSync, kTruncate, kZero, kDiscard };
  struct Fault {
    Op op = Op::kWrite;
    int err = 5;                // EIO
    std::string path_contains;  // "" matches every file
    uint64_t skip = 0;          // let this many matching calls pass first
    uint64_t times = ~0ull;     // then fail this many
  };
  struct CrashOptions {
    size_t keep_unsynced_ops = 0;  // per file, in the order they were made
    size_t tear_bytes = 0;         // of the next unsynced write, if any
    // Nonzero: instead, each unsynced operation survives or not at random
    // (seeded), in any combination, as when the page cache writes back
    // pages out of order.
    uint32_t random_subset_seed = 0;
  };

  FaultyFileIo() = default;

  StatusOr<std::unique_ptr<File>> Open(const std::string& path, bool create) override;
  Status SyncDir(const std::string& dir) override;

  void AddFault(Fault f);
  void ClearFaults();
  void SetSpaceLeft(uint64_t bytes);
  void CutPowerAfter(uint64_t mutating_ops);
  void Crash(CrashOptions o);
  void Crash();  // loses everything unsynced

  // Writes, syncs, truncates, zeroes and discards so far (each WriteOp counts).
  uint64_t mutating_ops() const;
  uint64_t syncs() const;
  bool Exists(const std::string& path) const;
  std::vector<uint8_t> Contents(const std::string& path) const;
  std::vector<uint8_t> DurableContents(const std::string& path) const;
  // Replaces a file's contents, durably (tests that build damaged journals).
  void SetContents(const std::string& path, std::vector<uint8_t> data);

 private:
  class FaultyFile;
  struct Unsynced {
    Op op;
    uint64_t off;
    uint64_t len;  // truncate: new size
    std::vector<uint8_t> data;
  };
  struct Node {
    std::vector<uint8_t> current;
    std::vector<uint8_t> durable;
    std::vector<Unsynced> unsynced;
  };

  // Returns the errno a call must fail with, or 0. Counts the call.
  int Check(Op op, const std::string& path) REQUIRES(mu_);
  static void Apply(std::vector<uint8_t>* v, const Unsynced& u);

  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<Node>> files_ GUARDED_BY(mu_);
  std::vector<Fault> faults_ GUARDED_BY(mu_);
  std::vector<uint64_t> fault_hits_ GUARDED_BY(mu_);
  uint64_t space_left_ GUARDED_BY(mu_) = ~0ull;
  uint64_t power_left_ GUARDED_BY(mu_) = ~0ull;
  uint64_t mutating_ops_ GUARDED_BY(mu_) = 0;
  uint64_t syncs_ GUARDED_BY(mu_) = 0;
};

}  // namespace remus
