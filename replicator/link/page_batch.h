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
#include <vector>

#include "common/status.h"

namespace remus::wire {

inline constexpr size_t kPageSize = 4096;
inline constexpr uint64_t kPageFlagZero = 0x1;
// The record's data is the page XOR its previous version: the version this
// session sent in an earlier checkpoint, which the backup has committed
// (compression "xor-lz4": CONFIG page_delta "xor"; ResolveXorRecords).
inline constexpr uint64_t kPageFlagXor = 0x2;
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

// dst ^= src over one page.
void XorPage(uint8_t* dst, const uint8_t* src);

// Calls fn for each record of a batch whose data fn may change in place:
// *flags is the record's flag bits (kPageFlagZero, kPageFlagXor), which fn
// may change too (within those two bits; written back into the record).
// data is nullptr for a zero page. DataLoss as ForEachPageRecord, except
// that kPageFlagXor is accepted (alone, not with kPageFlagZero).
Status ForEachPageRecordInPlace(
    std::string* payload,
    const std::function<Status(uint32_t block, uint64_t offset, uint64_t* flags, uint8_t* data_or_null)>& fn);

// The backup's half of "xor-lz4": turns each XOR record of a (decompressed)
// batch back into the page, XOR-ing its data with the page's committed
// version, which base returns (kPageSize bytes, or an error for a page that
// is not in the store). The batch then holds plain records only, as the
// staging and the store's commit expect.
Status ResolveXorRecords(std::string* payload,
                         const std::function<StatusOr<const uint8_t*>(uint32_t block, uint64_t offset)>& base);

// The page records of one checkpoint whose data still lies in the buffers it
// was read into (BufferedReader::StartRetaining). The epoch loop records them
// while the guest is paused, without copying a page; the sender builds the
// PAGES payloads from them after the guest has resumed. Copying ~4 KiB per
// dirty page inside the pause was the largest part of what remus added to
// QEMU's own pause (docs/performance.md).
//
// Not thread-safe; handed from one thread to the next.
class DeferredPages {
 public:
  DeferredPages() = default;
  // Gives the buffers back (the on_release callback) when dropped.
  ~DeferredPages();
  DeferredPages(const DeferredPages&) = delete;
  DeferredPages& operator=(const DeferredPages&) = delete;

  void Reserve(size_t records) { refs_.reserve(records); }
  // data_or_null must stay valid while this lives (or until Adopt'ed buffers go).
  void Add(uint32_t block, uint64_t offset, const uint8_t* data_or_null);
  // Takes ownership of the buffers the data points into; release is called
  // with them when this is destroyed.
  void Adopt(std::vector<std::vector<uint8_t>> buffers,
             std::function<void(std::vector<std::vector<uint8_t>>)> release);

  size_t pages() const { return refs_.size(); }
  size_t zero_pages() const { return zero_pages_; }
  // Payload bytes of all batches together (sum of PageRecordSize).
  uint64_t bytes() const { return bytes_; }
  // Replaces *out with the next batch of about target bytes (at least one
  // record); false when every record has been batched.
  bool NextBatch(size_t target, std::string* out);
  // As NextBatch, without copying a page: *parts receives the batch as views
  // (record header, page data, record header, ...) into *headers, which
  // holds the records' headers, and into the adopted buffers. Consecutive
  // headers (zero pages) share one view. The views stay valid until the next
  // call, or until *headers or this object change. For Link::SendV, which
  // hands them to the kernel in one sendmsg per 1024 views.
  bool NextBatchViews(size_t target, std::string* headers, std::vector<std::string_view>* parts);

 private:
  struct Ref {
    uint64_t offset;
    const uint8_t* data;
    uint32_t block;
  };
  std::vector<Ref> refs_;
  size_t next_ = 0;
  size_t zero_pages_ = 0;
  uint64_t bytes_ = 0;
  std::vector<std::vector<uint8_t>> buffers_;
  std::function<void(std::vector<std::vector<uint8_t>>)> release_;
};

// LZ4 compression of a batch for the link (frames flagged kFlagLz4):
// be32 uncompressed size, then one LZ4 block. Guest memory is often highly
// compressible (zeroed and repeated pages), and a replication network is the
// bottleneck a backup shares with everything else.
//
// The hot paths pass a buffer they keep: CompressBatch writes into *scratch
// and returns a view of the compressed bytes in it, and never shrinks its
// size; DecompressBatch leaves exactly the batch in *out. std::string::resize
// zero-fills what it grows, and a fresh 4 MiB buffer per batch cost as much
// CPU as LZ4 itself on XOR-ed pages (perf, docs/performance.md section 16),
// so a kept buffer is zero-filled once, not per batch.
std::string_view CompressBatch(std::string_view batch, std::string* scratch);
// DataLoss if the block is corrupt or claims more than max_size bytes.
Status DecompressBatch(std::string_view compressed, size_t max_size, std::string* out);
// The same with fresh buffers (tests, tools).
std::string CompressBatch(std::string_view batch);
StatusOr<std::string> DecompressBatch(std::string_view compressed, size_t max_size);

}  // namespace remus::wire
