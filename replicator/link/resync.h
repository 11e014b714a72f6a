// The delta resync's logic that both ends share (docs/formats/replication-link.md,
// "Delta resync"):
//   ResyncOfferAssembler  the primary's receipt of RESYNC_OFFER + RESYNC_HASHES,
//                         checking every frame against the offer (peer input)
//   DeltaFilter           the primary's decision per page of the initial copy:
//                         keep (the backup's image has it) or send, and the
//                         digest of the image the copy must give
//   KeepRunBuilder        KEEP payloads from kept pages, merged into runs
//
// Thread-safety: not thread-safe; each object is used by one thread at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "replicator/link/messages.h"
#include "replicator/link/page_hash.h"
#include "replicator/qemu/qemu_stream.h"

namespace remus::wire {

class ResyncOfferAssembler {
 public:
  // The RESYNC_OFFER. InvalidArgument when called twice.
  Status Begin(ResyncOfferMsg offer);
  // One RESYNC_HASHES. The frames must cover the offered blocks in order,
  // each page once, from page 0 on: anything else is InvalidArgument.
  Status Add(const ResyncHashesMsg& m);
  bool begun() const { return begun_; }
  // Every page of every offered block has its hash (true at once for an
  // offer without blocks).
  bool complete() const { return begun_ && block_ == offer_.blocks.size(); }
  const ResyncOfferMsg& offer() const { return offer_; }
  // REQUIRES complete(). Moves the hashes out (one vector per offered block).
  std::vector<std::vector<PageHash>> TakeHashes() { return std::move(hashes_); }

 private:
  bool begun_ = false;
  ResyncOfferMsg offer_;
  std::vector<std::vector<PageHash>> hashes_;
  size_t block_ = 0;  // the block being filled
};

class DeltaFilter {
 public:
  // The backup's offer, complete.
  DeltaFilter(std::vector<qemu::RamBlock> offered, std::vector<std::vector<PageHash>> hashes);

  // The initial copy's blocks (SYNC_BEGIN). A block is matched to the offered
  // block of the same id and used_length; pages of other blocks are always
  // sent. Returns how many of the blocks matched. Once, before Decide.
  size_t Bind(const std::vector<qemu::RamBlock>& blocks);
  // One page of the initial copy, in stream order (data nullptr: the zero
  // page). True: the backup's image holds exactly this content at this place,
  // so the page need not be sent. Records the page's hash for the digest.
  // A block or offset outside the bound layout is never kept.
  bool Decide(uint32_t block, uint64_t offset, const uint8_t* data_or_null);
  // The digest of the image the initial copy gives, so far (ImageDigest over
  // the bound blocks; a page never seen is the zero page, as on the backup).
  PageHash Digest() const;

  uint64_t kept() const { return kept_; }
  uint64_t sent() const { return sent_; }
  uint64_t offered_pages() const { return offered_pages_; }
  size_t matched_blocks() const { return matched_; }

 private:
  std::vector<qemu::RamBlock> offered_;
  std::vector<std::vector<PageHash>> offered_hashes_;
  // Per bound block: the offered block's index, or -1.
  std::vector<long> match_;
  // Per bound block: the latest hash of each page.
  std::vector<std::vector<PageHash>> current_;
  uint64_t kept_ = 0, sent_ = 0, offered_pages_ = 0;
  size_t matched_ = 0;
};

// Kept pages -> KEEP payloads: consecutive pages of a block merge into one run.
class KeepRunBuilder {
 public:
  void Add(uint32_t block, uint64_t page);
  bool empty() const { return !open_ && out_.empty(); }
  // Bytes the payload would have.
  size_t size() const { return out_.size() + (open_ ? kKeepRunSize : 0); }
  // The payload so far (empty when nothing was added); starts anew.
  std::string Take();

 private:
  std::string out_;
  bool open_ = false;
  KeepRun run_;
};

}  // namespace remus::wire
