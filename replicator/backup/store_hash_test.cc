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

}  // namespace
}  // namespace remus
