// libFuzzer target for page batches, the PAGES payload
// (replicator/link/page_batch.h).
//
// Input: byte 0 selects, the rest is the payload.
//   % 4 == 0  ForEachPageRecord
//   % 4 == 1  DecompressBatch (limit 1 MiB), then ForEachPageRecord
//   % 4 == 2  CompressBatch, DecompressBatch: the payload comes back
//   % 4 == 3  the records into DeferredPages, out again as batches of a
//             target size (byte 0 / 4 pages) by NextBatch and NextBatchViews
// Checks: errors are DataLoss; the records decoded re-encode
// (AppendPageRecord) to exactly the payload; compression round trips;
// DeferredPages' batches hold every record once, in order, each batch
// reaching the target unless it is the last, and both batch builders agree.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "replicator/link/page_batch.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
namespace w = remus::wire;
constexpr const char* kTarget = "fuzz_page_batch";

struct Rec {
  uint32_t block;
  uint64_t offset;
  const uint8_t* data;
};

// Decodes; on success checks the re-encoding and returns true.
bool Decode(std::string_view payload, std::vector<Rec>* recs) {
  std::string again;
  Status s = w::ForEachPageRecord(payload, [&](uint32_t block, uint64_t offset, const uint8_t* data) {
    fuzz::Check(offset % w::kPageSize == 0, kTarget, "offset not page aligned");
    if (data) {
      auto* b = reinterpret_cast<const uint8_t*>(payload.data());
      fuzz::Check(data >= b && data + w::kPageSize <= b + payload.size(), kTarget, "page data outside the payload");
    }
    w::AppendPageRecord(&again, block, offset, data);
    if (recs) recs->push_back({block, offset, data});
    return OkStatus();
  });
  if (!s.ok()) {
    fuzz::CheckCode(s, {Code::kDataLoss}, kTarget, "ForEachPageRecord: unexpected error code");
    return false;
  }
  fuzz::Check(again == payload, kTarget, "records do not re-encode to the payload");
  return true;
}

void Deferred(std::string_view payload, size_t target) {
  std::vector<Rec> recs;
  if (!Decode(payload, &recs)) return;
  w::DeferredPages a, b;
  for (const Rec& r : recs) {
    a.Add(r.block, r.offset, r.data);
    b.Add(r.block, r.offset, r.data);
  }
  fuzz::Check(a.pages() == recs.size() && a.bytes() == payload.size(), kTarget, "DeferredPages counts");
  std::string all, batch, headers;
  std::vector<std::string_view> parts;
  for (;;) {
    bool more = a.NextBatch(target, &batch);
    bool more_v = b.NextBatchViews(target, &headers, &parts);
    fuzz::Check(more == more_v, kTarget, "NextBatch and NextBatchViews disagree on the end");
    if (!more) break;
    std::string joined;
    for (auto v : parts) joined.append(v);
    fuzz::Check(joined == batch, kTarget, "NextBatch and NextBatchViews build different batches");
    fuzz::Check(!batch.empty(), kTarget, "an empty batch");
    all += batch;
    fuzz::Check(batch.size() >= target || all.size() == payload.size(), kTarget, "a short batch before the last");
  }
  fuzz::Check(all == payload, kTarget, "the batches do not add up to the records");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 4) {
      case 0:
        Decode(payload, nullptr);
        break;
      case 1: {
        auto raw = w::DecompressBatch(payload, 1 << 20);
        if (!raw.ok()) {
          fuzz::CheckCode(raw.status(), {Code::kDataLoss}, kTarget, "DecompressBatch: unexpected error code");
          break;
        }
        fuzz::Check(raw->size() <= (1u << 20), kTarget, "decompressed beyond the limit");
        Decode(*raw, nullptr);
        break;
      }
      case 2: {
        std::string c = w::CompressBatch(payload);
        auto raw = w::DecompressBatch(c, payload.size());
        if (!raw.ok()) fuzz::Fail(kTarget, "a compressed batch does not decompress", raw.status());
        fuzz::Check(*raw == payload, kTarget, "compression does not round trip");
        break;
      }
      case 3:
        Deferred(payload, static_cast<size_t>(data[0] / 4) * w::kPageSize / 8);
        break;
    }
  } catch (...) {
    fuzz::Fail(kTarget, "threw");
  }
  return 0;
}
