#include "replicator/link/page_batch.h"

#include <gtest/gtest.h>

#include <vector>

#include "common/io.h"

namespace remus::wire {
namespace {

TEST(PageBatch, CompressRoundTrip) {
  std::string batch;
  std::vector<uint8_t> page(kPageSize);
  for (size_t i = 0; i < page.size(); i++) page[i] = static_cast<uint8_t>(i % 7);
  for (uint64_t i = 0; i < 64; i++) AppendPageRecord(&batch, 0, i * kPageSize, i % 3 ? page.data() : nullptr);
  std::string z = CompressBatch(batch);
  EXPECT_LT(z.size(), batch.size() / 4);  // repeated pages compress well
  auto back = DecompressBatch(z, 16u << 20);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, batch);
}

// The kept-buffer forms: the scratch only grows (a smaller batch after a
// larger one leaves its size alone, so no zero fill is paid again), the
// view holds exactly the block, and a kept output buffer ends at the batch.
TEST(PageBatch, CompressIntoKeptBuffers) {
  std::vector<uint8_t> page(kPageSize);
  for (size_t i = 0; i < page.size(); i++) page[i] = static_cast<uint8_t>(i * 13 / 5);
  std::string big, small;
  for (uint64_t i = 0; i < 32; i++) AppendPageRecord(&big, 1, i * kPageSize, page.data());
  AppendPageRecord(&small, 0, 7 * kPageSize, page.data());
  std::string scratch, out(1 << 20, 'j');  // a kept buffer with someone else's bytes
  std::string_view zb = CompressBatch(big, &scratch);
  const size_t kept = scratch.size();
  EXPECT_EQ(std::string(zb), CompressBatch(big));
  ASSERT_TRUE(DecompressBatch(zb, 16u << 20, &out).ok());
  EXPECT_EQ(out, big);
  std::string_view zs = CompressBatch(small, &scratch);
  EXPECT_EQ(scratch.size(), kept);
  EXPECT_EQ(zs.data(), scratch.data());
  EXPECT_EQ(std::string(zs), CompressBatch(small));
  ASSERT_TRUE(DecompressBatch(zs, 16u << 20, &out).ok());
  EXPECT_EQ(out, small);
  EXPECT_EQ(DecompressBatch(zs.substr(0, zs.size() - 1), 16u << 20, &out).code(), Code::kDataLoss);
}

// Deferred batches are byte for byte what appending the records at once gives,
// split at the target size, and the buffers go back on destruction.
TEST(PageBatch, DeferredPagesBatchLikeDirectAppend) {
  std::vector<uint8_t> mem(kPageSize * 10);
  for (size_t i = 0; i < mem.size(); i++) mem[i] = static_cast<uint8_t>(i * 31 / 7);
  std::string direct;
  int released = 0;
  {
    DeferredPages d;
    for (uint64_t i = 0; i < 10; i++) {
      const uint8_t* data = i % 4 == 3 ? nullptr : mem.data() + i * kPageSize;
      d.Add(static_cast<uint32_t>(i % 2), i * kPageSize, data);
      AppendPageRecord(&direct, static_cast<uint32_t>(i % 2), i * kPageSize, data);
    }
    std::vector<std::vector<uint8_t>> bufs(3);
    d.Adopt(std::move(bufs), [&](std::vector<std::vector<uint8_t>> b) { released = static_cast<int>(b.size()); });
    EXPECT_EQ(d.pages(), 10u);
    EXPECT_EQ(d.zero_pages(), 2u);
    EXPECT_EQ(d.bytes(), direct.size());
    std::string all, batch;
    int batches = 0;
    while (d.NextBatch(3 * kPageSize, &batch)) {
      EXPECT_LE(batch.size(), 3 * kPageSize + PageRecordSize(false));
      all += batch;
      batches++;
    }
    EXPECT_EQ(all, direct);
    EXPECT_EQ(batches, 3);
    EXPECT_FALSE(d.NextBatch(3 * kPageSize, &batch));
    EXPECT_EQ(released, 0);
  }
  EXPECT_EQ(released, 3);
}

// The zero-copy batches carry the same bytes as the copied ones, batch for
// batch; consecutive zero pages' headers share a view.
TEST(PageBatch, DeferredPagesViewsEqualCopiedBatches) {
  std::vector<uint8_t> mem(kPageSize * 12);
  for (size_t i = 0; i < mem.size(); i++) mem[i] = static_cast<uint8_t>(i * 13 / 5);
  DeferredPages copied, viewed;
  for (uint64_t i = 0; i < 12; i++) {
    const uint8_t* data = (i >= 4 && i <= 6) || i == 11 ? nullptr : mem.data() + i * kPageSize;
    copied.Add(static_cast<uint32_t>(i % 3), i * kPageSize, data);
    viewed.Add(static_cast<uint32_t>(i % 3), i * kPageSize, data);
  }
  std::string batch, headers;
  std::vector<std::string_view> parts;
  int batches = 0;
  while (copied.NextBatch(4 * kPageSize, &batch)) {
    ASSERT_TRUE(viewed.NextBatchViews(4 * kPageSize, &headers, &parts));
    std::string joined;
    for (auto p : parts) joined.append(p);
    EXPECT_EQ(joined, batch) << "batch " << batches;
    for (size_t k = 1; k < parts.size(); k++)  // no two header views in a row
      EXPECT_FALSE(parts[k].data() == parts[k - 1].data() + parts[k - 1].size() &&
                   parts[k].data() >= headers.data() && parts[k].data() < headers.data() + headers.size());
    batches++;
  }
  EXPECT_FALSE(viewed.NextBatchViews(4 * kPageSize, &headers, &parts));
  EXPECT_EQ(batches, 3);
}

TEST(PageBatch, CorruptOrOversizedCompressedBatchRefused) {
  std::string batch(100000, 'x');
  std::string z = CompressBatch(batch);
  EXPECT_EQ(DecompressBatch(z.substr(0, 3), 1 << 20).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecompressBatch(z, 1000).status().code(), Code::kDataLoss);  // claims more than allowed
  std::string bad = z;
  bad.resize(bad.size() / 2);
  EXPECT_EQ(DecompressBatch(bad, 1 << 20).status().code(), Code::kDataLoss);
  std::string lie = z;
  lie[3] = static_cast<char>(lie[3] + 1);  // wrong uncompressed size
  EXPECT_EQ(DecompressBatch(lie, 1 << 20).status().code(), Code::kDataLoss);
}

}  // namespace
}  // namespace remus::wire

namespace remus::wire {
namespace {

TEST(PageBatchXor, ResolveTurnsXorRecordsBackIntoPages) {
  std::vector<uint8_t> prev(kPageSize, 0x5a), delta(kPageSize, 0), zero;
  delta[7] = 0x01;
  std::string b;
  AppendPageRecord(&b, 2, 0x1000, delta.data());
  AppendPageRecord(&b, 2, 0x2000, nullptr);
  // Mark the first record XOR (its offset word is at byte 4).
  StoreU64(b.data() + 4, 0x1000 | kPageFlagXor);
  EXPECT_FALSE(ForEachPageRecord(b, [](uint32_t, uint64_t, const uint8_t*) { return OkStatus(); }).ok())
      << "an unresolved XOR record never reaches the store";
  int asked = 0;
  ASSERT_TRUE(ResolveXorRecords(&b, [&](uint32_t blk, uint64_t off) -> StatusOr<const uint8_t*> {
                asked++;
                EXPECT_EQ(blk, 2u);
                EXPECT_EQ(off, 0x1000u);
                return prev.data();
              }).ok());
  EXPECT_EQ(asked, 1);
  std::vector<uint8_t> want = prev;
  want[7] ^= 0x01;
  int n = 0;
  ASSERT_TRUE(ForEachPageRecord(b, [&](uint32_t, uint64_t off, const uint8_t* d) {
                if (n++ == 0) {
                  EXPECT_EQ(off, 0x1000u);
                  EXPECT_EQ(std::vector<uint8_t>(d, d + kPageSize), want);
                } else {
                  EXPECT_EQ(d, nullptr);
                }
                return OkStatus();
              }).ok());
}

TEST(PageBatchXor, RefusesZeroAndXorTogetherUnknownBitsAndAMissingBase) {
  std::vector<uint8_t> d(kPageSize, 1);
  std::string b;
  AppendPageRecord(&b, 0, 0, nullptr);
  StoreU64(b.data() + 4, kPageFlagZero | kPageFlagXor);
  auto base = [&](uint32_t, uint64_t) -> StatusOr<const uint8_t*> { return d.data(); };
  EXPECT_EQ(ResolveXorRecords(&b, base).code(), Code::kDataLoss);
  b.clear();
  AppendPageRecord(&b, 0, 0, d.data());
  StoreU64(b.data() + 4, 0x4);
  EXPECT_EQ(ResolveXorRecords(&b, base).code(), Code::kDataLoss);
  b.clear();
  AppendPageRecord(&b, 0, 0, d.data());
  StoreU64(b.data() + 4, kPageFlagXor);
  Status s = ResolveXorRecords(&b, [](uint32_t, uint64_t) -> StatusOr<const uint8_t*> {
    return OutOfRange("no such page");
  });
  EXPECT_EQ(s.code(), Code::kOutOfRange);
  b.resize(b.size() - 1);  // truncated
  EXPECT_EQ(ResolveXorRecords(&b, base).code(), Code::kDataLoss);
}

}  // namespace
}  // namespace remus::wire
