// Backup-side guest memory: one sparse, memory-mapped file per QEMU RAM block
// in a state directory, so a 64 GiB guest costs page cache, not 64 GiB of
// anonymous memory, and survives a daemon restart.
//
// Lifecycle (one PageStore per protected domain):
//   Create(dir, blocks)      empty image, state "syncing"
//   ApplyPage(...)*          the initial full copy, page by page
//   CompleteInitialSync(...) epoch 0 committed with its device blob
//   Commit(epoch, staging)*  each checkpoint, all-or-nothing
//   Open(dir)                after a restart; has_committed() says whether the
//                            image is a consistent committed epoch
//
// Directory layout:
//   manifest.json   {"version":1,"blocks":[{"id","used_length","file"}]}, written once
//   meta.json       committed epoch, initial sync done, device blob file,
//                   "applying" marker, boot id, synced flag; replaced atomically
//   ram-NNN-<id>.img  one sparse file per block (id sanitized; NNN makes it unique)
//   device-<epoch>.bin  the device blob of the committed epoch (and, during a
//                   Commit, of the epoch being committed)
//   redo.log        the redo record of the latest Commit: the checkpoint's
//                   page batches as received, with a header and a CRC-32C
//                   (docs/formats/page-store-redo.md). One file, kept and
//                   overwritten in place from offset 0 by every Commit; it is
//                   as long as the largest recent record, so bytes after the
//                   current record are stale.
//
// Crash consistency (against a crash of the process, e.g. kill -9): Commit
//   1. validates the whole checkpoint before touching anything;
//   2. writes the new device blob to device-<epoch>.bin (a new name: the
//      committed blob stays intact);
//   3. writes the redo record at offset 0 of redo.log: the page batches
//      exactly as received, a header (magic, version, epoch, the blob's length
//      and CRC, each batch's length) and a CRC-32C of all of it in a trailer,
//      in pwritev calls that point at the received buffers (not copied into
//      one buffer); the file is grown (fallocate) only when the record is
//      longer than it, never truncated to the record;
//   4. replaces meta with an "applying" marker naming the epoch and the redo
//      file: from here on the commit is decided;
//   5. applies the batches to the mapped block files;
//   6. replaces meta again, committed at the new epoch, without the marker;
//   7. unlinks the previous epoch's device blob (redo.log stays).
// Each meta write is write-temp + rename, so readers see old or new. A crash
// before 4 leaves meta at the previous epoch: Open() removes the new epoch's
// stray files (device-*.bin and *.tmp not named by meta); whatever redo.log
// holds then (a torn record, an older one) is never read, since no marker
// names it. A crash after 4 leaves the marker: Open() checks the redo record
// (magic, version, lengths, CRC, the epoch against the marker's, every batch
// as Commit does, the device blob's length and CRC; the stale bytes after the
// record are ignored), applies all of it again (idempotent: a page record
// overwrites its page, a zero record zeroes it, in the order received) and
// writes meta committed at the new epoch, so has_committed() is true at the
// NEW epoch. A record of an older epoch (the marker names another) or a torn
// one (its trailer is then an old byte sequence: CRC mismatch) is refused.
// (The disk journal made epoch N+1 durable before the page store commit
// started, and recovery drops disk epochs after the page store's committed
// epoch, so N and N+1 are both consistent; N+1 is the newer.) If the
// marker's redo record is missing, short or fails a check, the image mixes two
// epochs: Open() reports it torn (has_committed() false, invalid_reason()
// names the file and the problem) and leaves the files for inspection.
// A failure before 4 (ENOSPC growing or writing the record, ...) returns the
// error (ResourceExhausted for ENOSPC/EDQUOT) and leaves the store at the
// previous epoch, in memory and on disk, with the new epoch's device blob
// removed (and redo.log, if writing it failed: the next Commit recreates it).
// Nothing is fsynced per epoch, deliberately, not even the redo record: pages
// live in the page cache, which survives a daemon crash but not a host crash,
// so meta records the kernel boot id and Open() refuses an image from an
// earlier boot unless Sync() ran after its last commit (a marker from an
// earlier boot is refused too). Consistency is therefore only needed against
// a process crash, where the page cache (and with it the unsynced redo record
// and metas) survives; an fsync of the record would cost ~10 ms per epoch on
// the ack path and buy nothing, since the pages it protects are not durable
// across a host crash either. (Create, BeginInitialSync, CompleteInitialSync
// and Sync do fsync meta.)
// Cost: the record is one more copy of the checkpoint's page bytes into the
// page cache of redo.log, whose pages and blocks already exist (no
// allocation, no unlink), plus a CRC-32C pass over them right before each
// ~4 MiB piece is written. The kernel writes the dirty file back (~30 s after
// it was first dirtied), i.e. at most one record's size per ~30 s however
// many commits overwrote it, less than the block files' own writeback of the
// same pages. Size: redo.log keeps the size of the largest record; after
// 1000 commits in a row whose records used at most a quarter of it, the next
// Commit truncates it to twice the largest of those (4 MiB steps). A new
// initial sync (and Create) removes it. Measured: docs/architecture.md,
// "Crash-safe store commit".
// Performance: applying is a memcpy into the mapping. Rewriting resident pages
// runs at memory speed; the first write to a page that is a hole costs a page
// fault plus the filesystem's block reservation (~10-30 us on ext4, ~5 us on
// tmpfs), as does the first write after the kernel wrote a page back.
//
// Page batch format (the payload the replication link carries for pages; the
// wire module frames, authenticates and checksums it): a sequence of records
//   be32 block index, be64 (offset | flags), then kPageSize bytes unless
//   flags has kBatchFlagZero. offset is page aligned; flags live in the low
//   12 bits and only kBatchFlagZero is defined.
//
// Thread-safety: not thread-safe. One thread (the backup's epoch loop) calls
// the mutating methods; readers (restore) must not run concurrently with
// Commit/ApplyPage. stats() may be read from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "replicator/link/page_batch.h"
#include "replicator/qemu/qemu_stream.h"

namespace remus {

inline constexpr uint64_t kBatchFlagZero = wire::kPageFlagZero;
inline constexpr uint64_t kBatchFlagMask = wire::kPageFlagMask;
inline constexpr size_t kBatchRecordHeader = wire::kPageRecordHeader;
// Sanity bound on the sum of all blocks' used_length.
inline constexpr uint64_t kMaxGuestRam = 16ull << 40;

// True if the kPageSize bytes at p are all zero.
bool IsZeroPage(const uint8_t* p);

// One checkpoint as received, waiting for its last byte. Holds the page
// batches exactly as received (decoded only at Commit) and the device blob.
// Dropping it (disconnect, aborted epoch) just frees the memory.
class Staging {
 public:
  void AddPageBatch(std::string batch) {
    bytes_ += batch.size();
    batches_.push_back(std::move(batch));
  }
  void SetDeviceBlob(std::string blob) {
    bytes_ = bytes_ - device_blob_.size() + blob.size();
    device_blob_ = std::move(blob);
  }
  const std::vector<std::string>& batches() const { return batches_; }
  // Hands the batches' buffers back (for reuse as receive buffers) and
  // forgets them.
  std::vector<std::string> TakeBatches() {
    for (const auto& b : batches_) bytes_ -= b.size();
    std::vector<std::string> out = std::move(batches_);
    batches_.clear();
    return out;
  }
  const std::string& device_blob() const { return device_blob_; }
  std::string TakeDeviceBlob() {
    bytes_ -= device_blob_.size();
    return std::move(device_blob_);
  }
  // Bytes held (for backpressure accounting).
  uint64_t bytes() const { return bytes_; }
  void Clear() {
    batches_.clear();
    device_blob_.clear();
    bytes_ = 0;
  }

 private:
  std::vector<std::string> batches_;
  std::string device_blob_;
  uint64_t bytes_ = 0;
};

struct PageStoreStats {
  std::atomic<uint64_t> pages_applied{0};       // data pages copied in
  std::atomic<uint64_t> zero_pages_applied{0};  // zero pages cleared
  std::atomic<uint64_t> bytes_applied{0};       // page bytes (zero pages count kPageSize)
  std::atomic<uint64_t> commits{0};
  std::atomic<uint64_t> rejected_commits{0};    // checkpoints refused as corrupt
};

class PageStore {
 public:
  // Makes a fresh, all-zero store in dir (created if missing), replacing any
  // store already there. REQUIRES: blocks non-empty, at most qemu::kMaxRamBlocks,
  // unique non-empty ids of at most 255 bytes, each used_length a non-zero
  // multiple of kPageSize, total at most kMaxGuestRam (else InvalidArgument).
  static StatusOr<std::unique_ptr<PageStore>> Create(const std::string& dir,
                                                     const std::vector<qemu::RamBlock>& blocks);
  // Reopens an existing store. NotFound if dir holds no store, DataLoss if the
  // manifest or a block file is damaged. A torn, unfinished, unsynced-after-
  // reboot or unreadable-meta image opens fine but with has_committed() false;
  // see invalid_reason(). BeginInitialSync() then starts over.
  static StatusOr<std::unique_ptr<PageStore>> Open(const std::string& dir);

  ~PageStore();
  PageStore(const PageStore&) = delete;
  PageStore& operator=(const PageStore&) = delete;

  // Writes one page during the initial sync (data == nullptr: zero page).
  // OutOfRange for a block index or offset outside the image, DataLoss for a
  // misaligned offset; nothing is written then. FailedPrecondition once the
  // store holds a committed image (use Commit, or BeginInitialSync first).
  Status ApplyPage(uint32_t block, uint64_t offset, const uint8_t* data);
  // Delta resync: during the initial sync, makes pages [first_page,
  // first_page + count) of block `block` equal to the same pages of block
  // src_block of `src` (an older store of the domain, not modified). Holes in
  // src are zero pages and are not read; data is copied in the kernel
  // (copy_file_range) where it can be, else through the mappings.
  // REQUIRES: src_block has this block's used_length. OutOfRange for a range
  // outside either block; FailedPrecondition outside the initial sync.
  Status CopyPagesFrom(const PageStore& src, size_t src_block, uint32_t block, uint64_t first_page, uint64_t count);
  // Discards the image (all pages become zero holes) and marks the store
  // invalid so a new initial sync can fill it (e.g. after a torn commit, or
  // when the primary restarts protection).
  Status BeginInitialSync();
  // Ends the initial sync: epoch `epoch` (normally 0) is committed with this
  // device blob. REQUIRES: syncing state.
  Status CompleteInitialSync(std::string_view device_blob, uint64_t epoch = 0);

  // Applies one complete checkpoint. Everything is validated first; on a bad
  // record or blob nothing is applied and DataLoss is returned (the store
  // stays at the previous epoch). FailedPrecondition if the store holds no
  // committed image or epoch <= committed_epoch(). A failure to write the
  // device blob, the redo record or the "applying" marker (ENOSPC: Resource-
  // Exhausted) also leaves the store at the previous epoch, its device blob
  // removed.
  // A failure after the marker (the commit record cannot be written) leaves
  // has_committed() false here; reopening the store finishes the commit from
  // its redo record. The staging is consumed.
  // On return (either way) `staging` still holds its page batches, so the
  // caller can reuse their buffers (Staging::TakeBatches); the device blob is
  // taken on success.
  Status Commit(uint64_t epoch, Staging&& staging);

  // Test seam: the points of Commit a hook can interrupt, in order.
  enum class CommitStep {
    kBlobWritten,          // device-<epoch>.bin written
    kRedoWriting,          // between the two parts of the redo record (arg: bytes written)
    kRedoWritten,          // the record complete in redo.log
    kMarkerWritten,        // meta has the "applying" marker
    kBatchApplied,         // batch `arg` applied (not called for a checkpoint without batches)
    kCommitRecordWritten,  // meta committed at the new epoch (old device blob not yet removed)
  };
  // Commit calls hook(step, arg) at each step. The hook may kill the process
  // (a crash there) or return an error, which Commit returns as if that step
  // had failed: up to kMarkerWritten the store stays at the previous epoch
  // (the marker is rolled back); at kBatchApplied it is torn in memory until
  // reopened (the redo record finishes it); at kCommitRecordWritten the new
  // epoch is committed anyway. An empty function removes the hook.
  using CommitHook = std::function<Status(CommitStep step, size_t arg)>;
  void SetCommitHookForTest(CommitHook hook) { commit_hook_ = std::move(hook); }

  // Makes the committed image durable across a host reboot (msync + fsync),
  // e.g. on clean shutdown. Costly for a big guest; not needed per epoch.
  Status Sync();

  bool has_committed() const { return state_ == State::kCommitted; }
  // Valid only if has_committed().
  uint64_t committed_epoch() const { return committed_epoch_; }
  // Why has_committed() is false ("" when it is true).
  const std::string& invalid_reason() const { return invalid_reason_; }
  // The device blob (FULL sections + footers + EOF) of the committed epoch.
  const std::string& device_blob() const { return device_blob_; }

  const std::string& dir() const { return dir_; }
  const std::vector<qemu::RamBlock>& blocks() const { return blocks_; }
  const uint8_t* BlockData(size_t i) const { return maps_[i].addr; }
  // One page of a block (kPageSize bytes in the mapping); InvalidArgument
  // for a block or offset outside the store, or an unaligned offset.
  StatusOr<const uint8_t*> Page(uint32_t block, uint64_t offset) const;
  // The file holding block i (a restored QEMU may map it: restore by mapping).
  std::string BlockPath(size_t i) const { return dir_ + "/" + maps_[i].file; }
  uint64_t total_bytes() const { return total_bytes_; }
  const PageStoreStats& stats() const { return stats_; }

  // Sparse-file helpers for restore: the first offset >= from in block i that
  // may hold data / is a hole (used_length when none). Holes read as zero.
  StatusOr<uint64_t> NextData(size_t i, uint64_t from) const;
  StatusOr<uint64_t> NextHole(size_t i, uint64_t from) const;

 private:
  enum class State { kSyncing, kCommitted, kTorn };
  struct Mapping {
    std::string file;
    int fd = -1;
    uint8_t* addr = nullptr;
    uint64_t len = 0;
  };
  struct Meta {
    uint64_t committed_epoch = 0;
    bool initial_sync_complete = false;
    std::string device_blob_file;
    bool applying = false;
    uint64_t applying_epoch = 0;
    std::string redo_file;  // with applying: the redo record ("" in stores from before it)
    std::string boot_id;
    bool synced = false;
  };

  explicit PageStore(std::string dir) : dir_(std::move(dir)) {}
  static Status ValidateBlocks(const std::vector<qemu::RamBlock>& blocks);
  Status MapBlocks(bool create);
  Status WriteMeta(const Meta& m, bool durable);
  Meta CurrentMeta() const;
  // Checks a batch without applying; counts its pages.
  Status ValidateBatch(std::string_view batch, size_t batch_index) const;
  void ApplyBatch(std::string_view batch);
  // Writes the record at offset 0 of redo.log (path), growing or shrinking
  // the file (see the header comment); removes the file on failure.
  Status WriteRedo(const std::string& path, uint64_t epoch, const Staging& s);
  // Open() found an "applying" marker with a redo record: checks it and
  // re-applies it. On success the store is committed at meta.applying_epoch;
  // on error nothing was applied (or the commit record could not be written)
  // and the caller reports the store torn with the message.
  Status FinishInterruptedCommit(const Meta& meta);
  Status CallHook(CommitStep step, size_t arg) {
    return commit_hook_ ? commit_hook_(step, arg) : OkStatus();
  }
  // Removes device-*.bin except `keep`, every redo-*.log (left by an older
  // version), redo.log if record_file, and every *.tmp; returns the names of
  // the device and redo files it removed.
  std::vector<std::string> RemoveStaleBlobs(const std::string& keep, bool record_file);
  Status PunchAll();
  Status Reserve(int fd, uint64_t len, const std::string& path);

  // During the initial sync: pages written since the image was last emptied,
  // so a ZERO record for a never-written page touches nothing (a fresh image
  // is all holes). One bit per page, e.g. 2 MiB for 64 GiB.
  std::vector<std::vector<uint64_t>> written_;

  std::string dir_;
  std::vector<qemu::RamBlock> blocks_;
  std::vector<Mapping> maps_;
  uint64_t total_bytes_ = 0;
  State state_ = State::kSyncing;
  std::string invalid_reason_;
  uint64_t committed_epoch_ = 0;
  std::string device_blob_;
  std::string device_blob_file_;
  std::string boot_id_;
  bool synced_ = false;
  PageStoreStats stats_;
  CommitHook commit_hook_;
  // Commits in a row whose record used at most a quarter of redo.log, and
  // the largest of those records (WriteRedo's shrink rule).
  uint64_t redo_small_run_ = 0;
  uint64_t redo_small_max_ = 0;
};

}  // namespace remus
