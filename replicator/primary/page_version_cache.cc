#include "replicator/primary/page_version_cache.h"

#include <cstring>

#include "replicator/link/page_batch.h"

namespace remus {

namespace {

// (block, page number) as one key. Page numbers of 2^40 and more (a 4 PiB
// block) are not cached.
bool MakeKey(uint32_t block, uint64_t offset, uint64_t* key) {
  const uint64_t page = offset / wire::kPageSize;
  if (page >> 40) return false;
  *key = (static_cast<uint64_t>(block) << 40) | page;
  return true;
}

// dst = dst ^ cache, cache = the old dst: the record becomes the XOR, the
// cache the new version, in one pass.
void XorSwap(uint8_t* record, uint8_t* cache) {
  for (size_t i = 0; i < wire::kPageSize; i += 8) {
    uint64_t r, c;
    std::memcpy(&r, record + i, 8);
    std::memcpy(&c, cache + i, 8);
    const uint64_t x = r ^ c;
    std::memcpy(record + i, &x, 8);
    std::memcpy(cache + i, &r, 8);
  }
}

}  // namespace

PageVersionCache::PageVersionCache(uint64_t capacity_bytes)
    : capacity_pages_(static_cast<uint32_t>(std::min<uint64_t>(capacity_bytes / wire::kPageSize, UINT32_MAX - 1))) {}

PageVersionCache::Stats PageVersionCache::stats() const {
  Stats s;
  s.capacity_bytes = static_cast<uint64_t>(capacity_pages_) * wire::kPageSize;
  s.bytes = bytes_.load();
  s.pages = pages_.load();
  s.hits = hits_.load();
  s.misses = misses_.load();
  s.evictions = evictions_.load();
  return s;
}

void PageVersionCache::Drop(uint64_t key) {
  auto it = index_.find(key);
  if (it == index_.end()) return;
  slots_[it->second].used = false;
  free_.push_back(it->second);
  index_.erase(it);
  pages_--;
}

uint32_t PageVersionCache::AllocateSlot() {
  if (!free_.empty()) {
    uint32_t s = free_.back();
    free_.pop_back();
    return s;
  }
  if (slots_.size() < capacity_pages_) {
    const auto s = static_cast<uint32_t>(slots_.size());
    if (s % kChunkPages == 0) {
      chunks_.push_back(std::make_unique<uint8_t[]>(kChunkPages * wire::kPageSize));
      bytes_ += kChunkPages * wire::kPageSize;
    }
    slots_.emplace_back();
    return s;
  }
  // Every slot is in use: the first one not referenced since the hand last
  // passed it.
  for (;;) {
    Slot& s = slots_[hand_];
    const uint32_t at = hand_;
    hand_ = (hand_ + 1) % static_cast<uint32_t>(slots_.size());
    if (s.referenced) {
      s.referenced = false;
      continue;
    }
    index_.erase(s.key);
    s.used = false;
    pages_--;
    evictions_++;
    return at;
  }
}

Status PageVersionCache::EncodeBatch(uint64_t epoch, std::string* batch) {
  // The initial copy (epoch 0) is not remembered: a delta resync may KEEP a
  // page from the backup's old image after sending it in an earlier round,
  // and then the backup's version would not be the one sent.
  if (capacity_pages_ == 0 || epoch == 0) return OkStatus();
  return wire::ForEachPageRecordInPlace(batch, [&](uint32_t block, uint64_t offset, uint64_t* flags, uint8_t* data) {
    uint64_t key;
    if (!MakeKey(block, offset, &key)) {
      misses_++;
      return OkStatus();
    }
    if (*flags & wire::kPageFlagXor) return DataLoss("PAGES batch to encode has an XOR record already");
    if (data == nullptr) {  // a zero page: nothing worth remembering
      Drop(key);
      return OkStatus();
    }
    auto it = index_.find(key);
    if (it != index_.end()) {
      Slot& s = slots_[it->second];
      s.referenced = true;
      if (s.epoch < epoch) {
        XorSwap(data, Data(it->second));
        *flags |= wire::kPageFlagXor;
        s.epoch = epoch;
        hits_++;
        return OkStatus();
      }
      // Sent before in this checkpoint: the backup has that version only in
      // its staging, not committed. Whole, and remembered.
      std::memcpy(Data(it->second), data, wire::kPageSize);
      s.epoch = epoch;
      misses_++;
      return OkStatus();
    }
    misses_++;
    const uint32_t slot = AllocateSlot();
    Slot& s = slots_[slot];
    s = {key, epoch, true, false};
    std::memcpy(Data(slot), data, wire::kPageSize);
    index_.emplace(key, slot);
    pages_++;
    return OkStatus();
  });
}

}  // namespace remus
