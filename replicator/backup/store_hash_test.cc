// Page hashes of a store's image: holes are zero pages, data pages hash as
// their bytes, chunks cover every page once, and the digest changes with a
// single flipped byte.
#include "replicator/backup/store_hash.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <string>
#include <vector>

#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

TEST(StoreHash, HolesAreZeroPagesAndChunksCoverEveryPageOnce) {
  std::string dir = testing::MakeTempDir("remus-store-hash") + "/s";
  auto s = PageStore::Create(dir, {{"pc.ram", 64 * 4096}, {"rom", 2 * 4096}});
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  std::string a(4096, 'a'), b(4096, 'b');
  ASSERT_TRUE((*s)->ApplyPage(0, 5 * 4096, reinterpret_cast<const uint8_t*>(a.data())).ok());
  ASSERT_TRUE((*s)->ApplyPage(0, 40 * 4096, reinterpret_cast<const uint8_t*>(b.data())).ok());
  ASSERT_TRUE((*s)->ApplyPage(1, 4096, reinterpret_cast<const uint8_t*>(a.data())).ok());
  std::vector<wire::PageHash> got;
  uint64_t next = 0;
  ASSERT_TRUE(HashStoreBlock(**s, 0, 7, [&](uint64_t first, const wire::PageHash* h, size_t n) {
                EXPECT_EQ(first, next);
                EXPECT_LE(n, 7u);
                next += n;
                got.insert(got.end(), h, h + n);
                return OkStatus();
              }).ok());
  ASSERT_EQ(got.size(), 64u);
  for (size_t i = 0; i < 64; i++) {
    wire::PageHash want = i == 5    ? wire::HashPage(reinterpret_cast<const uint8_t*>(a.data()))
                          : i == 40 ? wire::HashPage(reinterpret_cast<const uint8_t*>(b.data()))
                                    : wire::ZeroPageHash();
    EXPECT_EQ(got[i], want) << "page " << i;
  }
  auto d1 = StoreDigest(**s);
  ASSERT_TRUE(d1.ok());
  wire::ImageDigest ref;
  ref.Add(got.data(), got.size());
  ref.Add(wire::ZeroPageHash());
  ref.Add(wire::HashPage(reinterpret_cast<const uint8_t*>(a.data())));
  EXPECT_EQ(*d1, ref.Finish());
  // One byte flipped (as a damaged file would be): another digest.
  uint8_t* p = const_cast<uint8_t*>((*s)->BlockData(0)) + 40 * 4096 + 17;
  *p ^= 1;
  auto d2 = StoreDigest(**s);
  ASSERT_TRUE(d2.ok());
  EXPECT_NE(*d1, *d2);
  // An error from the callback stops the walk.
  int calls = 0;
  remus::Status st = HashStoreBlock(**s, 0, 8, [&](uint64_t, const wire::PageHash*, size_t) {
    calls++;
    return Cancelled("enough");
  });
  EXPECT_EQ(st.code(), Code::kCancelled);
  EXPECT_EQ(calls, 1);
}

// The delta resync's copy from an older store: data pages arrive, holes are
// zero pages (clearing what the sync wrote there before), the source stays as
// it was, and the result hashes as the source's pages do.
TEST(StoreHash, CopyPagesFromAnOlderStore) {
  std::string root = testing::MakeTempDir("remus-store-copy");
  auto src = PageStore::Create(root + "/old", {{"pc.ram", 32 * 4096}});
  auto dst = PageStore::Create(root + "/new", {{"pc.ram", 32 * 4096}});
  ASSERT_TRUE(src.ok() && dst.ok());
  std::string a(4096, 'a'), b(4096, 'b'), z(4096, 'z');
  for (uint64_t p : {3, 4, 5, 20}) ASSERT_TRUE((*src)->ApplyPage(0, p * 4096, reinterpret_cast<const uint8_t*>(p == 20 ? b.data() : a.data())).ok());
  // The sync wrote page 10 (a hole in the source) before the source's copy of it is kept.
  ASSERT_TRUE((*dst)->ApplyPage(0, 10 * 4096, reinterpret_cast<const uint8_t*>(z.data())).ok());
  ASSERT_TRUE((*dst)->CopyPagesFrom(**src, 0, 0, 2, 20).ok());  // pages 2..21
  const uint8_t* d = (*dst)->BlockData(0);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(d) + 3 * 4096, 4096), a);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(d) + 5 * 4096, 4096), a);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(d) + 20 * 4096, 4096), b);
  EXPECT_TRUE(IsZeroPage(d + 10 * 4096));
  EXPECT_TRUE(IsZeroPage(d + 2 * 4096));
  EXPECT_TRUE(IsZeroPage(d + 30 * 4096));  // outside the range: untouched (a hole)
  auto ds = StoreDigest(**dst), ss = StoreDigest(**src);
  ASSERT_TRUE(ds.ok() && ss.ok());
  EXPECT_EQ(*ds, *ss);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*src)->BlockData(0)) + 20 * 4096, 4096), b);
  // Bounds.
  EXPECT_EQ((*dst)->CopyPagesFrom(**src, 0, 0, 30, 3).code(), Code::kOutOfRange);
  EXPECT_EQ((*dst)->CopyPagesFrom(**src, 1, 0, 0, 1).code(), Code::kOutOfRange);
  EXPECT_EQ((*dst)->CopyPagesFrom(**src, 0, 1, 0, 1).code(), Code::kOutOfRange);
  auto other = PageStore::Create(root + "/other", {{"pc.ram", 16 * 4096}});
  ASSERT_TRUE(other.ok());
  EXPECT_EQ((*dst)->CopyPagesFrom(**other, 0, 0, 0, 1).code(), Code::kOutOfRange);
  ASSERT_TRUE((*dst)->CompleteInitialSync(std::string("\x04x\0", 3)).ok());
  EXPECT_EQ((*dst)->CopyPagesFrom(**src, 0, 0, 0, 1).code(), Code::kFailedPrecondition);
}

}  // namespace
}  // namespace remus
