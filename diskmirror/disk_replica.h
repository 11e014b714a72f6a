// The backup's copy of a protected domain's disks: per disk, a raw image and
// the journal in front of it (journal.h):
//
//   <image_dir>/<id>.img        the backup's disk image (sparse raw, the guest's size)
//   <journal_dir>/<id>.journal  writes of checkpoints not yet applied to the image
//
// The journals live in the protection session's page-store directory: a new
// session (its epochs start again at 0) gets new journals, and a session
// whose initial copy never committed leaves the image alone, so the image
// always belongs to the committed page store. Call ApplyAll on the old set
// before a new session's set applies anything.
//
// One checkpoint, as the backup's receive loop drives it:
//   Write/Zero/Trim(epoch, ...)*   the epoch's disk writes, as they arrive
//   Commit(epoch)                  every journal durable for the epoch, BEFORE
//                                  the memory part commits and the ACK
//   MaybeApply()                   now and then: committed epochs to the images
//
// The images hold a committed checkpoint's disks only after ApplyAll();
// promotion and recovery call it. Recovery after a crash (Open with
// discard_after = the epoch the page store committed) drops disk epochs the
// memory part never committed, then replays the rest.
//
// Thread-safety: not thread-safe; the domain's receive thread owns it (and
// promotion, once that thread has ended).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "diskmirror/file_io.h"
#include "diskmirror/journal.h"

namespace remus {

struct ReplicaDisk {
  std::string id;     // drive id; names the files
  uint64_t size = 0;  // bytes
};

class DiskReplicaSet {
 public:
  // Opens or creates every disk's image and journal and recovers the
  // journals (committed epochs after discard_after dropped). Applies nothing:
  // call ApplyAll when the journals belong to the committed page store. An
  // image that exists with another size is resized (the guest's disk
  // changed; a full copy follows).
  static StatusOr<std::unique_ptr<DiskReplicaSet>> Open(FileIo* io, std::string image_dir, std::string journal_dir,
                                                        std::vector<ReplicaDisk> disks,
                                                        std::optional<uint64_t> discard_after);
  ~DiskReplicaSet();

  // OutOfRange for an index or extent outside the disks.
  Status Write(uint32_t disk, uint64_t epoch, uint64_t off, std::span<const uint8_t> data);
  Status Zero(uint32_t disk, uint64_t epoch, uint64_t off, uint64_t len);
  Status Trim(uint32_t disk, uint64_t epoch, uint64_t off, uint64_t len);
  // Every journal's records of the epoch durable, then its COMMIT: OK means
  // the epoch's disk writes survive any crash. ResourceExhausted for a full
  // disk, DataLoss for an I/O error, naming the journal.
  Status Commit(uint64_t epoch);
  Status DropUncommitted();
  // Applies committed epochs to the images when enough have gathered
  // (epochs or journal bytes); cheap otherwise.
  Status MaybeApply();
  // Applies every committed epoch: the images then hold the last commit.
  Status ApplyAll();

  size_t size() const { return disks_.size(); }
  const ReplicaDisk& disk(size_t i) const { return disks_[i]; }
  std::string ImagePath(size_t i) const;
  // The newest epoch every journal committed (nullopt: none yet).
  std::optional<uint64_t> last_committed() const;
  uint64_t journal_bytes() const;

 private:
  DiskReplicaSet(FileIo* io, std::string image_dir, std::string journal_dir, std::vector<ReplicaDisk> disks)
      : io_(io), image_dir_(std::move(image_dir)), journal_dir_(std::move(journal_dir)), disks_(std::move(disks)) {}
  Status Check(uint32_t disk, uint64_t off, uint64_t len) const;

  FileIo* io_;
  std::string image_dir_, journal_dir_;
  std::vector<ReplicaDisk> disks_;
  std::vector<std::unique_ptr<File>> images_;
  std::vector<std::unique_ptr<Journal>> journals_;
  std::optional<uint64_t> last_committed_;
};

}  // namespace remus
