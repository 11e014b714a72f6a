#include "replicator/page_batch.h"

#include <cassert>
#include <cstdio>

#include "common/io.h"

namespace remus::wire {

void AppendPageRecord(std::string* out, uint32_t block, uint64_t offset, const uint8_t* data) {
  assert(offset % kPageSize == 0);
  PutU32(out, block);
  PutU64(out, offset | (data ? 0 : kPageFlagZero));
  if (data) out->append(reinterpret_cast<const char*>(data), kPageSize);
}

Status ForEachPageRecord(
    std::string_view payload,
    const std::function<Status(uint32_t block, uint64_t offset, const uint8_t* data_or_null)>& fn) {
  size_t pos = 0;
  for (uint64_t n = 0; pos < payload.size(); n++) {
    // Built only on error: this loop runs once per page.
    auto where = [&, at = pos] {
      return "page record #" + std::to_string(n) + " at byte " + std::to_string(at) + " of a " +
             std::to_string(payload.size()) + "-byte PAGES payload";
    };
    if (payload.size() - pos < kPageRecordHeader) return DataLoss(where() + " is truncated");
    const uint32_t block = LoadU32(payload.data() + pos);
    const uint64_t word = LoadU64(payload.data() + pos + 4);
    pos += kPageRecordHeader;
    const uint64_t flags = word & kPageFlagMask;
    const uint64_t offset = word & ~kPageFlagMask;
    if (flags & ~kPageFlagZero) {
      char buf[40];
      std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(word));
      return DataLoss(where() + ": offset word " + buf + " is not page-aligned (unknown flag bits)");
    }
    const uint8_t* data = nullptr;
    if (!(flags & kPageFlagZero)) {
      if (payload.size() - pos < kPageSize) return DataLoss(where() + " is truncated (page data)");
      data = reinterpret_cast<const uint8_t*>(payload.data() + pos);
      pos += kPageSize;
    }
    RETURN_IF_ERROR(fn(block, offset, data));
  }
  return OkStatus();
}

}  // namespace remus::wire
