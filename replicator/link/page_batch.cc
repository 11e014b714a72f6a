#include "replicator/link/page_batch.h"

#include <cassert>
#include <algorithm>
#include <cstdio>
#include <cstring>

#include <lz4.h>

#include "common/io.h"

namespace remus::wire {

void AppendPageRecord(std::string* out, uint32_t block, uint64_t offset, const uint8_t* data) {
  assert(offset % kPageSize == 0);
  PutU32(out, block);
  PutU64(out, offset | (data ? 0 : kPageFlagZero));
  if (data) out->append(reinterpret_cast<const char*>(data), kPageSize);
}

DeferredPages::~DeferredPages() {
  if (release_) release_(std::move(buffers_));
}

void DeferredPages::Add(uint32_t block, uint64_t offset, const uint8_t* data_or_null) {
  refs_.push_back({offset, data_or_null, block});
  if (data_or_null == nullptr) zero_pages_++;
  bytes_ += PageRecordSize(data_or_null == nullptr);
}

void DeferredPages::Adopt(std::vector<std::vector<uint8_t>> buffers,
                          std::function<void(std::vector<std::vector<uint8_t>>)> release) {
  for (auto& b : buffers) buffers_.push_back(std::move(b));
  release_ = std::move(release);
}

bool DeferredPages::NextBatch(size_t target, std::string* out) {
  out->clear();
  if (next_ >= refs_.size()) return false;
  out->reserve(std::min<uint64_t>(target + PageRecordSize(false), bytes_));
  while (next_ < refs_.size() && (out->empty() || out->size() < target)) {
    const Ref& r = refs_[next_++];
    AppendPageRecord(out, r.block, r.offset, r.data);
  }
  return true;
}

bool DeferredPages::NextBatchViews(size_t target, std::string* headers, std::vector<std::string_view>* parts) {
  headers->clear();
  parts->clear();
  if (next_ >= refs_.size()) return false;
  // Which records go in this batch, so that *headers never reallocates under
  // the views taken into it.
  size_t end = next_, size = 0;
  while (end < refs_.size() && (size == 0 || size < target)) size += PageRecordSize(refs_[end++].data == nullptr);
  headers->reserve((end - next_) * kPageRecordHeader);
  size_t run_begin = 0;  // start in *headers of the header run not yet viewed
  for (; next_ < end; next_++) {
    const Ref& r = refs_[next_];
    // The record's header as AppendPageRecord writes it; the data stays put.
    PutU32(headers, r.block);
    PutU64(headers, r.offset | (r.data ? 0 : kPageFlagZero));
    if (r.data) {
      parts->emplace_back(headers->data() + run_begin, headers->size() - run_begin);
      parts->emplace_back(reinterpret_cast<const char*>(r.data), kPageSize);
      run_begin = headers->size();
    }
  }
  if (run_begin < headers->size()) parts->emplace_back(headers->data() + run_begin, headers->size() - run_begin);
  return true;
}

namespace {

// One walk over a batch's records for both readers: Char is const char
// (ForEachPageRecord) or char (in place). `allowed` are the flag bits the
// caller accepts (kPageFlagZero and kPageFlagXor never together). fn gets
// the record's header position too, to rewrite its flags.
template <class Char, class Fn>
Status WalkPageRecords(Char* base, size_t size, uint64_t allowed, Fn&& fn) {
  size_t pos = 0;
  for (uint64_t n = 0; pos < size; n++) {
    // Built only on error: this loop runs once per page.
    auto where = [&, at = pos] {
      return "page record #" + std::to_string(n) + " at byte " + std::to_string(at) + " of a " +
             std::to_string(size) + "-byte PAGES payload";
    };
    if (size - pos < kPageRecordHeader) return DataLoss(where() + " is truncated");
    const uint32_t block = LoadU32(base + pos);
    const uint64_t word = LoadU64(base + pos + 4);
    const uint64_t flags = word & kPageFlagMask;
    const uint64_t offset = word & ~kPageFlagMask;
    if ((flags & ~allowed) || flags == (kPageFlagZero | kPageFlagXor)) {
      char buf[40];
      std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(word));
      return DataLoss(where() + ": offset word " + buf + " is not page-aligned (unknown or contradictory flag bits)");
    }
    const size_t header_at = pos;
    pos += kPageRecordHeader;
    Char* data = nullptr;
    if (!(flags & kPageFlagZero)) {
      if (size - pos < kPageSize) return DataLoss(where() + " is truncated (page data)");
      data = base + pos;
      pos += kPageSize;
    }
    RETURN_IF_ERROR(fn(block, offset, flags, data, header_at));
  }
  return OkStatus();
}

}  // namespace

Status ForEachPageRecord(
    std::string_view payload,
    const std::function<Status(uint32_t block, uint64_t offset, const uint8_t* data_or_null)>& fn) {
  return WalkPageRecords(payload.data(), payload.size(), kPageFlagZero,
                         [&](uint32_t block, uint64_t offset, uint64_t, const char* data, size_t) {
                           return fn(block, offset, reinterpret_cast<const uint8_t*>(data));
                         });
}

void XorPage(uint8_t* dst, const uint8_t* src) {
  // Word by word through memcpy (no alignment assumed); gcc and clang turn
  // this into vector XORs.
  for (size_t i = 0; i < kPageSize; i += 8) {
    uint64_t a, b;
    std::memcpy(&a, dst + i, 8);
    std::memcpy(&b, src + i, 8);
    a ^= b;
    std::memcpy(dst + i, &a, 8);
  }
}

Status ForEachPageRecordInPlace(
    std::string* payload,
    const std::function<Status(uint32_t block, uint64_t offset, uint64_t* flags, uint8_t* data_or_null)>& fn) {
  char* const base = payload->data();
  return WalkPageRecords(
      base, payload->size(), kPageFlagZero | kPageFlagXor,
      [&](uint32_t block, uint64_t offset, uint64_t flags, char* data, size_t header_at) {
        const uint64_t before = flags;
        RETURN_IF_ERROR(fn(block, offset, &flags, reinterpret_cast<uint8_t*>(data)));
        if (flags != before) {
          // A record keeps its size: fn may only move between plain and XOR.
          assert(data != nullptr && (flags & ~kPageFlagXor) == 0);
          StoreU64(base + header_at + 4, offset | flags);
        }
        return OkStatus();
      });
}

Status ResolveXorRecords(std::string* payload,
                         const std::function<StatusOr<const uint8_t*>(uint32_t block, uint64_t offset)>& base) {
  return ForEachPageRecordInPlace(payload, [&](uint32_t block, uint64_t offset, uint64_t* flags, uint8_t* data) {
    if (!(*flags & kPageFlagXor)) return OkStatus();
    ASSIGN_OR_RETURN(const uint8_t* prev, base(block, offset));
    XorPage(data, prev);
    *flags &= ~kPageFlagXor;
    return OkStatus();
  });
}

std::string_view CompressBatch(std::string_view batch, std::string* scratch) {
  const int bound = LZ4_compressBound(static_cast<int>(batch.size()));
  const size_t need = 4 + static_cast<size_t>(bound);
  if (scratch->size() < need) scratch->resize(need);  // grows only: no zero fill per batch
  StoreU32(scratch->data(), static_cast<uint32_t>(batch.size()));
  const int n = LZ4_compress_default(batch.data(), scratch->data() + 4, static_cast<int>(batch.size()), bound);
  return std::string_view(scratch->data(), 4 + static_cast<size_t>(n > 0 ? n : 0));
}

Status DecompressBatch(std::string_view compressed, size_t max_size, std::string* out) {
  if (compressed.size() < 4) return DataLoss("compressed PAGES payload is truncated");
  const uint32_t raw = LoadU32(compressed.data());
  if (raw > max_size)
    return DataLoss("compressed PAGES payload claims " + std::to_string(raw) + " bytes, over the limit of " +
                    std::to_string(max_size));
  out->resize(raw);  // zero-fills only beyond the kept buffer's size
  const int n = LZ4_decompress_safe(compressed.data() + 4, out->data(), static_cast<int>(compressed.size() - 4),
                                    static_cast<int>(raw));
  if (n < 0 || static_cast<uint32_t>(n) != raw) return DataLoss("compressed PAGES payload is corrupt");
  return OkStatus();
}

std::string CompressBatch(std::string_view batch) {
  std::string scratch;
  return std::string(CompressBatch(batch, &scratch));
}

StatusOr<std::string> DecompressBatch(std::string_view compressed, size_t max_size) {
  std::string out;
  RETURN_IF_ERROR(DecompressBatch(compressed, max_size, &out));
  return out;
}

}  // namespace remus::wire
