// The primary's half of compression "xor-lz4" (Remus's page compression, XOR
// against the previous version, in the spirit of Xen's libxc): the last version
// this session sent of up to `capacity` bytes of pages. A page that is sent
// again in a later checkpoint goes as its XOR with that version; a guest
// rewrites a few words of most pages it dirties, so the XOR is mostly zero
// bytes and the LZ4 pass after it shrinks it to a few dozen bytes.
//
// The backup XORs the record with the page it committed (wire::ResolveXorRecords):
// a version "sent in an earlier checkpoint" is committed there, because the
// backup commits checkpoints in order before it reads the next one's pages,
// and a failed commit ends the session (and with it this cache). A page sent
// twice in one checkpoint goes whole the second time. Zero pages drop their
// entry. The initial copy is not remembered (a delta resync may KEEP a page
// from the backup's old image after sending it), so checkpoint 1 fills the
// cache and XOR records start with checkpoint 2.
//
// Bounded: CLOCK (second chance) eviction over a fixed number of slots; the
// slots' memory is allocated as it fills, in 1 MiB chunks, and shown in
// status (stats()). Used by the sender thread only; stats() from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace remus {

class PageVersionCache {
 public:
  explicit PageVersionCache(uint64_t capacity_bytes);
  PageVersionCache(const PageVersionCache&) = delete;
  PageVersionCache& operator=(const PageVersionCache&) = delete;

  // Encodes a PAGES batch of checkpoint `epoch` (uncompressed, as
  // DeferredPages::NextBatch builds it) in place: records of pages cached
  // from an earlier checkpoint become XOR records; every page's version is
  // remembered. DataLoss for a malformed batch (a bug on our side).
  Status EncodeBatch(uint64_t epoch, std::string* batch);

  struct Stats {
    uint64_t capacity_bytes = 0;
    uint64_t bytes = 0;  // allocated for page versions
    uint64_t pages = 0;  // versions held
    uint64_t hits = 0;   // pages sent as XOR records
    uint64_t misses = 0;  // pages sent whole (not cached, or cached in this checkpoint)
    uint64_t evictions = 0;
  };
  Stats stats() const;

 private:
  static constexpr uint32_t kChunkPages = 256;  // 1 MiB
  static constexpr uint32_t kFree = UINT32_MAX;
  struct Slot {
    uint64_t key = 0;
    uint64_t epoch = 0;
    bool used = false;
    bool referenced = false;
  };
  uint8_t* Data(uint32_t slot) { return chunks_[slot / kChunkPages].get() + (slot % kChunkPages) * 4096ull; }
  uint32_t AllocateSlot();  // a free slot, a new one, or the CLOCK's victim
  void Drop(uint64_t key);

  const uint32_t capacity_pages_;
  std::unordered_map<uint64_t, uint32_t> index_;  // (block, page) -> slot
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<uint8_t[]>> chunks_;
  std::vector<uint32_t> free_;
  uint32_t hand_ = 0;
  std::atomic<uint64_t> hits_{0}, misses_{0}, evictions_{0}, pages_{0}, bytes_{0};
};

}  // namespace remus
