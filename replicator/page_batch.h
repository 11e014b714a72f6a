// The page batch: the payload of a PAGES frame, and what the backup's page
// store decodes at commit. One definition for both ends (docs/formats/replication-link.md).
//
// A batch is a sequence of records:
//   be32 block index, be64 (offset | flags), then kPageSize bytes of data
//   unless flags has kPageFlagZero. offset is page aligned; flags live in the
//   low 12 bits and only kPageFlagZero is defined.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace remus::wire {

inline constexpr size_t kPageSize = 4096;
inline constexpr uint64_t kPageFlagZero = 0x1;
inline constexpr uint64_t kPageFlagMask = kPageSize - 1;  // low bits of the offset word
inline constexpr size_t kPageRecordHeader = 12;           // be32 block + be64 offset|flags

// Appends one record to a kPages payload. data == nullptr means a zero page
// (no data bytes follow). REQUIRES: offset % kPageSize == 0.
void AppendPageRecord(std::string* out, uint32_t block, uint64_t offset, const uint8_t* data);
// Bytes AppendPageRecord adds.
inline size_t PageRecordSize(bool zero) { return kPageRecordHeader + (zero ? 0 : kPageSize); }

// Calls fn for each record in order; data points into payload (kPageSize
// bytes) or is nullptr for a zero page. Stops at the first error from fn and
// returns it. A truncated record or unknown flag bits in the offset word
// (i.e. an offset that is not page-aligned) is DataLoss.
Status ForEachPageRecord(
    std::string_view payload,
    const std::function<Status(uint32_t block, uint64_t offset, const uint8_t* data_or_null)>& fn);

// LZ4 compression of a batch for the link (frames flagged kFlagLz4):
// be32 uncompressed size, then one LZ4 block. Guest memory is often highly
// compressible (zeroed and repeated pages), and a replication network is the
// bottleneck a backup shares with everything else.
std::string CompressBatch(std::string_view batch);
// DataLoss if the block is corrupt or claims more than max_size bytes.
StatusOr<std::string> DecompressBatch(std::string_view compressed, size_t max_size);

}  // namespace remus::wire
