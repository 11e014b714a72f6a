// The backup's per-disk journal: the disk writes of each checkpoint are
// made durable here before the checkpoint is acked, and reach the backup's
// disk image only after the checkpoint commits. Format: journal_format.h and
// diskmirror/README.md.
//
// Lifecycle (one Journal per protected disk, in the domain's state dir):
//   Open(io, path, opts)      creates an empty journal, or recovers one: scans
//                             and verifies every record, drops the torn or
//                             uncommitted tail (durably), keeps the committed
//                             epochs not yet applied
//   ApplyCommitted(image)     right after Open: replays those epochs
//   Append*(epoch, ...)*      an epoch's writes, zeroes and trims, in order
//   Commit(epoch)             fsync records, write COMMIT, fsync: durable
//   ApplyCommitted(image)     writes committed epochs to the image, fsyncs it,
//                             records "applied through N" in the superblock
//                             durably, then truncates the journal
//   DropUncommitted()         an aborted epoch: forget its records
//
// Crash consistency: a crash at any point leaves, after Open +
// ApplyCommitted, the image holding exactly the epochs whose COMMIT record
// was durable (at least every epoch whose Commit() returned OK; an epoch
// whose Commit() was interrupted may or may not be there). Replaying an
// epoch that was partly or fully applied before the crash is harmless: an
// epoch's records are full data, applied in order.
//
// Errors: ENOSPC/EDQUOT surface as ResourceExhausted, EIO (failed write,
// fsync or read) as DataLoss, a damaged committed record as DataLoss, always
// with the journal's path and epoch in the message. After any I/O error the
// journal is failed: every later call returns that error (a failed fsync
// leaves the page cache in an unknown state, so nothing may be retried or
// acked) until the journal is reopened, which recovers it. Commit() returns
// OK only when the epoch is durable: the caller acks on OK and on nothing
// else.
//
// Epoch rules: epochs strictly increase across commits; all records between
// two commits carry the same epoch, the one committed next. Violations are
// FailedPrecondition and change nothing. An epoch without records commits
// without I/O (nothing to replay), so last_committed() after a reopen is
// the last epoch that carried records.
//
// Thread-safety: not thread-safe; one thread (the backup's epoch loop) owns
// a Journal and the image File it applies to.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "diskmirror/file_io.h"
#include "diskmirror/journal_format.h"

namespace remus {

struct JournalOptions {
  // Size of the disk image in bytes; records beyond it are refused, and a
  // journal made for another size does not open.
  uint64_t disk_size = 0;
  // For messages, e.g. "web1/vda".
  std::string name;
  // Appended records are gathered in memory up to this many bytes before
  // they are written (not synced) to the journal file.
  size_t append_buffer = 1 << 20;
  // Recovery: committed epochs after this one are dropped as if never
  // committed (the checkpoint's memory part did not commit, so the disk part
  // must not either). FailedPrecondition if the journal already applied a
  // later epoch to the image.
  std::optional<uint64_t> discard_after;
};

// What Open found.
struct JournalRecovery {
  bool created = false;                      // a new, empty journal
  std::optional<uint64_t> applied_epoch;     // from the superblock
  std::vector<uint64_t> committed_pending;   // committed, to be applied
  std::vector<uint64_t> discarded_epochs;    // committed but after discard_after
  uint64_t dropped_records = 0;              // uncommitted or discarded
  uint64_t dropped_bytes = 0;                // file bytes cut from the tail
  bool torn_tail = false;                    // stopped at a torn/corrupt record
};

class Journal {
 public:
  // REQUIRES: io outlives the journal; opts.disk_size > 0.
  static StatusOr<std::unique_ptr<Journal>> Open(FileIo* io, const std::string& path, JournalOptions opts);
  ~Journal();
  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  // Appends one record (bigger writes and extents are split). OutOfRange if
  // [off, off+len) leaves the disk; FailedPrecondition for an epoch out of
  // order. Not durable until Commit(epoch).
  Status AppendWrite(uint64_t epoch, uint64_t off, std::span<const uint8_t> data);
  Status AppendZero(uint64_t epoch, uint64_t off, uint64_t len);
  Status AppendTrim(uint64_t epoch, uint64_t off, uint64_t len);

  // Makes the epoch's records durable, then its COMMIT record. OK means the
  // epoch survives any crash from now on.
  Status Commit(uint64_t epoch);

  // Forgets the records appended since the last commit.
  Status DropUncommitted();

  // Writes every committed, unapplied epoch to the image in order, fsyncs
  // the image, records the last one as applied (durably), then truncates
  // the journal (records of the open epoch are kept). Records are re-read
  // from the journal and their crc checked again (DataLoss if damaged).
  Status ApplyCommitted(File* image);

  std::optional<uint64_t> last_committed() const { return last_committed_; }
  std::optional<uint64_t> applied_epoch() const;
  // Committed epochs waiting for ApplyCommitted.
  size_t pending_epochs() const;
  const JournalRecovery& recovery() const { return recovery_; }
  // Bytes in the journal file, including what is still buffered.
  uint64_t size_bytes() const { return end_; }
  // The error that failed the journal (OK while it works).
  const Status& failure() const { return failed_; }
  const std::string& path() const { return path_; }

 private:
  struct Entry {
    journal::RecordType type;
    uint64_t epoch;
    uint64_t off;   // on the disk
    uint32_t len;   // data bytes (write) or extent (zero/trim)
    uint64_t pos;   // of the record header in the journal file
    uint32_t crc;
  };

  Journal(FileIo* io, std::string path, JournalOptions opts);
  Status Create();
  Status Recover();
  // Scans records from kDataStart; fills entries_ and friends.
  Status Scan(uint64_t file_size, uint64_t* valid_end);
  // After the scan stopped at `from`: DataLoss if a well-formed COMMIT lies
  // at or beyond it, of this generation for an epoch after `lower`, or of a
  // later generation (then committed data was damaged, not torn).
  Status CheckNoCommitAfter(uint64_t from, uint64_t file_size, std::optional<uint64_t> lower);
  Status Append(uint64_t epoch, journal::RecordType type, uint64_t off, uint64_t len, std::span<const uint8_t> data);
  Status CheckEpochForAppend(uint64_t epoch) const;
  Status FlushBuffer();
  Status WriteSuperblock(const journal::Superblock& sb);
  Status ApplyEntries(File* image, size_t count);
  Status MoveTail(size_t first, uint64_t new_generation);
  // Records a failure (sticky) and returns it, annotated.
  Status Fail(const Status& s, const std::string& what);
  std::string Where() const;

  FileIo* io_;
  std::string path_;
  JournalOptions opts_;
  std::unique_ptr<File> file_;
  journal::Superblock sb_;
  JournalRecovery recovery_;
  Status failed_;

  // Records not yet applied: committed ones first (entries_[0, committed_count_)),
  // then those of the open epoch.
  std::vector<Entry> entries_;
  size_t committed_count_ = 0;
  std::optional<uint64_t> last_committed_;
  std::optional<uint64_t> open_epoch_;
  uint64_t committed_end_ = journal::kDataStart;  // end of the last COMMIT record
  uint64_t written_end_ = journal::kDataStart;    // bytes written to the file
  uint64_t end_ = journal::kDataStart;            // written_end_ + buffer
  std::vector<uint8_t> buf_;                      // encoded records at written_end_
};

}  // namespace remus
