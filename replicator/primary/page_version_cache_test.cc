#include "replicator/primary/page_version_cache.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>

#include "replicator/link/page_batch.h"

namespace remus {
namespace {

using wire::kPageSize;

std::vector<uint8_t> Page(uint8_t fill) { return std::vector<uint8_t>(kPageSize, fill); }

struct Rec {
  uint32_t block;
  uint64_t offset;
  uint64_t flags;
  std::vector<uint8_t> data;  // empty: zero page
};

std::vector<Rec> Records(std::string batch) {
  std::vector<Rec> out;
  EXPECT_TRUE(wire::ForEachPageRecordInPlace(&batch, [&](uint32_t b, uint64_t o, uint64_t* f, uint8_t* d) {
                out.push_back({b, o, *f, d ? std::vector<uint8_t>(d, d + kPageSize) : std::vector<uint8_t>()});
                return OkStatus();
              }).ok());
  return out;
}

TEST(PageVersionCache, SendsAPageOfAnEarlierCheckpointAsItsXor) {
  PageVersionCache c(1 << 20);
  std::string b1;
  auto v1 = Page(0x11);
  wire::AppendPageRecord(&b1, 0, 0x3000, v1.data());
  ASSERT_TRUE(c.EncodeBatch(1, &b1).ok());
  auto r1 = Records(b1);
  ASSERT_EQ(r1.size(), 1u);
  EXPECT_EQ(r1[0].flags, 0u) << "first sight: whole";
  EXPECT_EQ(r1[0].data, v1);

  auto v2 = v1;
  v2[100] = 0x42;
  std::string b2;
  wire::AppendPageRecord(&b2, 0, 0x3000, v2.data());
  ASSERT_TRUE(c.EncodeBatch(2, &b2).ok());
  auto r2 = Records(b2);
  ASSERT_EQ(r2.size(), 1u);
  EXPECT_EQ(r2[0].flags, wire::kPageFlagXor);
  std::vector<uint8_t> want(kPageSize, 0);
  want[100] = 0x11 ^ 0x42;
  EXPECT_EQ(r2[0].data, want) << "the XOR with the version sent in checkpoint 1";
  auto st = c.stats();
  EXPECT_EQ(st.hits, 1u);
  EXPECT_EQ(st.misses, 1u);
  EXPECT_EQ(st.pages, 1u);
  EXPECT_EQ(st.bytes, 1u << 20);  // one chunk
  EXPECT_EQ(st.capacity_bytes, 1u << 20);
}

TEST(PageVersionCache, SameCheckpointTwiceGoesWholeAndTheInitialCopyIsNotKept) {
  PageVersionCache c(1 << 20);
  std::string b0;
  auto v = Page(7);
  wire::AppendPageRecord(&b0, 1, 0, v.data());
  ASSERT_TRUE(c.EncodeBatch(0, &b0).ok());  // the initial copy: not remembered
  EXPECT_EQ(c.stats().pages, 0u);
  std::string b;
  wire::AppendPageRecord(&b, 1, 0, v.data());
  v[0] = 9;
  wire::AppendPageRecord(&b, 1, 0, v.data());
  ASSERT_TRUE(c.EncodeBatch(5, &b).ok());
  auto r = Records(b);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].flags, 0u);
  EXPECT_EQ(r[1].flags, 0u) << "the backup has checkpoint 5's first version only in its staging";
  EXPECT_EQ(r[1].data, v);
  // The version remembered is the last one.
  std::string n;
  wire::AppendPageRecord(&n, 1, 0, v.data());
  ASSERT_TRUE(c.EncodeBatch(6, &n).ok());
  auto r6 = Records(n);
  EXPECT_EQ(r6[0].flags, wire::kPageFlagXor);
  EXPECT_EQ(r6[0].data, std::vector<uint8_t>(kPageSize, 0));
}

TEST(PageVersionCache, AZeroPageForgetsTheVersion) {
  PageVersionCache c(1 << 20);
  auto v = Page(3);
  std::string b;
  wire::AppendPageRecord(&b, 0, 0, v.data());
  ASSERT_TRUE(c.EncodeBatch(1, &b).ok());
  b.clear();
  wire::AppendPageRecord(&b, 0, 0, nullptr);
  ASSERT_TRUE(c.EncodeBatch(2, &b).ok());
  EXPECT_EQ(c.stats().pages, 0u);
  b.clear();
  wire::AppendPageRecord(&b, 0, 0, v.data());
  ASSERT_TRUE(c.EncodeBatch(3, &b).ok());
  EXPECT_EQ(Records(b)[0].flags, 0u) << "the backup's page is zero now, not the old version";
}

TEST(PageVersionCache, StaysWithinItsCapacity) {
  const uint64_t cap = 2 << 20;  // 512 pages
  PageVersionCache c(cap);
  for (uint64_t e = 1; e <= 4; e++) {
    std::string b;
    auto v = Page(static_cast<uint8_t>(e));
    for (uint64_t p = 0; p < 2000; p++) wire::AppendPageRecord(&b, 0, p * kPageSize, v.data());
    ASSERT_TRUE(c.EncodeBatch(e, &b).ok());
  }
  auto st = c.stats();
  EXPECT_EQ(st.pages, 512u);
  EXPECT_EQ(st.bytes, cap);
  EXPECT_EQ(st.evictions, 4 * 2000u - 512u);
}

TEST(PageVersionCache, EmptyCacheChangesNothing) {
  PageVersionCache c(0);
  std::string b;
  auto v = Page(1);
  wire::AppendPageRecord(&b, 0, 0, v.data());
  std::string before = b;
  ASSERT_TRUE(c.EncodeBatch(1, &b).ok());
  ASSERT_TRUE(c.EncodeBatch(2, &b).ok());
  EXPECT_EQ(b, before);
}

// The two halves together: the primary encodes each checkpoint, a backup
// resolves the XOR records against what it committed and commits; its
// memory always equals the primary's. A small cache, so that evictions,
// zero pages and repeats all happen.
TEST(PageVersionCache, RoundTripThroughABackupKeepsItsMemoryExact) {
  constexpr uint64_t kPages = 300;
  std::mt19937_64 rng(42);
  std::vector<std::vector<uint8_t>> guest(kPages, std::vector<uint8_t>(kPageSize, 0));
  std::vector<std::vector<uint8_t>> backup = guest;
  PageVersionCache c(64 * kPageSize);
  uint64_t xor_records = 0;
  for (uint64_t epoch = 1; epoch <= 60; epoch++) {
    std::string batch;
    const int dirty = 1 + static_cast<int>(rng() % 120);
    for (int i = 0; i < dirty; i++) {
      // Skewed: a hot set of 40 pages and the rest.
      const uint64_t p = (rng() % 4 != 0) ? rng() % 40 : rng() % kPages;
      auto& pg = guest[p];
      if (rng() % 17 == 0) {
        std::fill(pg.begin(), pg.end(), 0);
        wire::AppendPageRecord(&batch, 0, p * kPageSize, nullptr);
        continue;
      }
      for (int k = 0; k < 3; k++) pg[rng() % kPageSize] = static_cast<uint8_t>(rng());
      wire::AppendPageRecord(&batch, 0, p * kPageSize, pg.data());
    }
    ASSERT_TRUE(c.EncodeBatch(epoch, &batch).ok());
    for (const Rec& r : Records(batch)) xor_records += (r.flags & wire::kPageFlagXor) ? 1 : 0;
    // The backup: resolve against its committed pages, then apply in order.
    ASSERT_TRUE(wire::ResolveXorRecords(&batch, [&](uint32_t b, uint64_t o) -> StatusOr<const uint8_t*> {
                  EXPECT_EQ(b, 0u);
                  return backup[o / kPageSize].data();
                }).ok());
    ASSERT_TRUE(wire::ForEachPageRecord(batch, [&](uint32_t, uint64_t o, const uint8_t* d) {
                  if (d) std::memcpy(backup[o / kPageSize].data(), d, kPageSize);
                  else std::fill(backup[o / kPageSize].begin(), backup[o / kPageSize].end(), 0);
                  return OkStatus();
                }).ok());
    for (uint64_t p = 0; p < kPages; p++) ASSERT_EQ(backup[p], guest[p]) << "page " << p << " after checkpoint " << epoch;
  }
  EXPECT_GT(xor_records, 100u);
  EXPECT_GT(c.stats().evictions, 0u);
}

}  // namespace
}  // namespace remus
