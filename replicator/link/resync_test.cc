// The delta resync's codecs (RESYNC_OFFER, RESYNC_HASHES, KEEP, COMMIT's new
// fields) and the logic both ends share (resync.h).
#include "replicator/link/resync.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/io.h"
#include "replicator/link/wire.h"

namespace remus::wire {
namespace {

std::vector<uint8_t> Page(uint8_t fill) { return std::vector<uint8_t>(kPageSize, fill); }

TEST(PageHash, ZeroPageAndHexRoundTrip) {
  std::vector<uint8_t> zeros(kPageSize, 0);
  EXPECT_EQ(HashPage(nullptr), HashPage(zeros.data()));
  auto a = Page(1), b = Page(1);
  b[4095] = 2;  // one byte at the end
  EXPECT_NE(HashPage(a.data()), HashPage(b.data()));
  PageHash h = HashPage(a.data());
  EXPECT_EQ(PageHashFromHex(PageHashHex(h)), h);
  EXPECT_EQ(PageHashHex(h).size(), 32u);
  EXPECT_FALSE(PageHashFromHex("xyz"));
  EXPECT_FALSE(PageHashFromHex(std::string(32, 'g')));
  std::string wire;
  AppendPageHash(&wire, h);
  ASSERT_EQ(wire.size(), kPageHashSize);
  EXPECT_EQ(LoadPageHash(reinterpret_cast<const uint8_t*>(wire.data())), h);
}

TEST(PageHash, DigestDependsOnOrderAndContent) {
  auto a = Page(1), b = Page(2);
  ImageDigest d1, d2, d3;
  d1.Add(HashPage(a.data()));
  d1.Add(HashPage(b.data()));
  d2.Add(HashPage(b.data()));
  d2.Add(HashPage(a.data()));
  d3.Add(HashPage(a.data()));
  d3.Add(HashPage(b.data()));
  EXPECT_NE(d1.Finish(), d2.Finish());
  EXPECT_EQ(d1.Finish(), d3.Finish());
}

TEST(ResyncCodecs, OfferRoundTripAndBounds) {
  ResyncOfferMsg m{{{"pc.ram", 1 << 20}, {"vga.vram", 8192}}, 42, ""};
  auto back = DecodeResyncOffer(EncodeResyncOffer(m));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);
  ResyncOfferMsg none{{}, 0, "no committed image of this domain here"};
  back = DecodeResyncOffer(EncodeResyncOffer(none));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, none);

  EXPECT_EQ(DecodeResyncOffer("{").status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeResyncOffer("[]").status().code(), Code::kInvalidArgument);
  auto bad = [](const std::string& j) { return DecodeResyncOffer(j).status(); };
  EXPECT_EQ(bad(R"({"blocks":[{"id":"a","used_length":4095}]})").code(), Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"blocks":[{"id":"a","used_length":0}]})").code(), Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"blocks":[{"id":"","used_length":4096}]})").code(), Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"blocks":[{"id":"a","used_length":4096},{"id":"a","used_length":4096}]})").code(),
            Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"blocks":[{"id":"a","used_length":-4096}]})").code(), Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"blocks":[{"id":"a"}]})").code(), Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"blocks":{}})").code(), Code::kInvalidArgument);
  EXPECT_EQ(bad(R"({"epoch":"1"})").code(), Code::kInvalidArgument);
  // More than 16 TiB in total.
  EXPECT_EQ(bad(R"({"blocks":[{"id":"a","used_length":17592186044416},{"id":"b","used_length":4096}]})").code(),
            Code::kInvalidArgument);

}

TEST(ResyncCodecs, HashesRoundTripAndBounds) {
  auto a = Page(7);
  std::vector<PageHash> hs = {HashPage(a.data()), ZeroPageHash(), HashPage(nullptr)};
  std::string p = EncodeResyncHashes(3, 1000, hs.data(), hs.size());
  EXPECT_EQ(p.size(), kResyncHashesHeader + 3 * kPageHashSize);
  auto m = DecodeResyncHashes(p);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->block, 3u);
  EXPECT_EQ(m->first_page, 1000u);
  EXPECT_EQ(m->hashes, hs);
  EXPECT_EQ(DecodeResyncHashes(p.substr(0, p.size() - 1)).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeResyncHashes(p.substr(0, kResyncHashesHeader)).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeResyncHashes("").status().code(), Code::kDataLoss);
  std::string far;
  PutU32(&far, 0);
  PutU64(&far, ~0ull);
  AppendPageHash(&far, ZeroPageHash());
  EXPECT_EQ(DecodeResyncHashes(far).status().code(), Code::kDataLoss);
}

TEST(ResyncCodecs, KeepRoundTripAndBounds) {
  std::string p;
  AppendKeepRun(&p, {0, 0, 5});
  AppendKeepRun(&p, {2, 77, 1});
  auto runs = DecodeKeep(p);
  ASSERT_TRUE(runs.ok()) << runs.status().ToString();
  EXPECT_EQ(*runs, (std::vector<KeepRun>{{0, 0, 5}, {2, 77, 1}}));
  EXPECT_EQ(DecodeKeep("").status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeKeep(p.substr(0, 15)).status().code(), Code::kDataLoss);
  std::string zero;
  AppendKeepRun(&zero, {0, 0, 0});
  EXPECT_EQ(DecodeKeep(zero).status().code(), Code::kDataLoss);
  std::string far;
  AppendKeepRun(&far, {0, ~0ull, 1});
  EXPECT_EQ(DecodeKeep(far).status().code(), Code::kDataLoss);
}

TEST(ResyncCodecs, CommitCarriesKeptPagesAndDigest) {
  CommitInfo c{10, 4096, 100, 0, 7, PageHashHex(HashPage(nullptr))};
  auto back = DecodeCommit(EncodeCommit(c));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, c);
  // Older form: absent fields.
  back = DecodeCommit(R"({"page_count":1,"page_bytes":2,"device_bytes":3})");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->kept_pages, 0u);
  EXPECT_EQ(back->image_digest, "");
  EXPECT_FALSE(DecodeCommit(R"({"page_count":1,"page_bytes":2,"device_bytes":3,"image_digest":"abc"})").ok());
  EXPECT_FALSE(DecodeCommit(R"({"page_count":1,"page_bytes":2,"device_bytes":3,"image_digest":7})").ok());
  EXPECT_FALSE(DecodeCommit(R"({"page_count":1,"page_bytes":2,"device_bytes":3,"kept_pages":-1})").ok());
}

TEST(ResyncCodecs, ConfigDeltaResyncFlag) {
  ConfigMsg c;
  c.argv = {"qemu"};
  c.delta_resync = true;
  auto back = DecodeConfig(EncodeConfig(c));
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(back->delta_resync);
  c.delta_resync = false;
  EXPECT_EQ(EncodeConfig(c).find("delta_resync"), std::string::npos);
  EXPECT_EQ(DecodeConfig(R"({"argv":["q"],"delta_resync":1})").status().code(), Code::kInvalidArgument);
}

TEST(ResyncOfferAssembler, AcceptsInOrderAndRefusesTheRest) {
  ResyncOfferAssembler a;
  EXPECT_FALSE(a.Add({0, 0, {ZeroPageHash()}}).ok());  // before the offer
  ASSERT_TRUE(a.Begin({{{"a", 3 * kPageSize}, {"b", kPageSize}}, 1, ""}).ok());
  EXPECT_FALSE(a.Begin({}).ok());
  EXPECT_FALSE(a.complete());
  EXPECT_FALSE(a.Add({1, 0, {ZeroPageHash()}}).ok());   // block b before a is done
  EXPECT_FALSE(a.Add({0, 1, {ZeroPageHash()}}).ok());   // a gap
  EXPECT_FALSE(a.Add({0, 0, std::vector<PageHash>(4)}).ok());  // past the block
  ASSERT_TRUE(a.Add({0, 0, std::vector<PageHash>(2)}).ok());
  EXPECT_FALSE(a.Add({0, 0, std::vector<PageHash>(1)}).ok());  // again
  ASSERT_TRUE(a.Add({0, 2, std::vector<PageHash>(1)}).ok());
  EXPECT_FALSE(a.complete());
  ASSERT_TRUE(a.Add({1, 0, std::vector<PageHash>(1)}).ok());
  EXPECT_TRUE(a.complete());
  EXPECT_FALSE(a.Add({1, 1, std::vector<PageHash>(1)}).ok());  // after the end
  auto h = a.TakeHashes();
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[0].size(), 3u);

  ResyncOfferAssembler empty;
  ASSERT_TRUE(empty.Begin({{}, 0, "nothing here"}).ok());
  EXPECT_TRUE(empty.complete());
}

// The primary keeps exactly the pages whose content equals the offered page
// at the same place, and its digest is that of the image a full copy gives.
TEST(DeltaFilter, KeepsMatchingPagesAndDigestsTheResult) {
  auto p1 = Page(1), p2 = Page(2), p3 = Page(3);
  // The backup's image: block "ram" = [p1, p2, zero, p3]; "rom" has another length.
  std::vector<qemu::RamBlock> offered = {{"ram", 4 * kPageSize}, {"rom", 2 * kPageSize}};
  std::vector<std::vector<PageHash>> hashes = {
      {HashPage(p1.data()), HashPage(p2.data()), ZeroPageHash(), HashPage(p3.data())},
      {ZeroPageHash(), ZeroPageHash()}};
  DeltaFilter f(offered, hashes);
  // The guest now: "ram" = [p1, p3, zero, p3], "rom" 1 page (layout changed), "new" unknown.
  std::vector<qemu::RamBlock> now = {{"ram", 4 * kPageSize}, {"rom", kPageSize}, {"new", kPageSize}};
  EXPECT_EQ(f.Bind(now), 1u);
  EXPECT_EQ(f.offered_pages(), 4u);
  EXPECT_TRUE(f.Decide(0, 0, p1.data()));
  EXPECT_FALSE(f.Decide(0, kPageSize, p3.data()));  // changed
  EXPECT_TRUE(f.Decide(0, 2 * kPageSize, nullptr));  // zero both sides
  EXPECT_TRUE(f.Decide(0, 3 * kPageSize, p3.data()));
  EXPECT_FALSE(f.Decide(1, 0, nullptr));            // other layout: never kept
  EXPECT_FALSE(f.Decide(2, 0, p1.data()));          // not offered
  EXPECT_FALSE(f.Decide(7, 0, p1.data()));          // out of the layout
  EXPECT_FALSE(f.Decide(0, 4 * kPageSize, p1.data()));
  // A page re-sent later in the pass: the latest content counts.
  EXPECT_TRUE(f.Decide(0, kPageSize, p2.data()));
  EXPECT_EQ(f.kept(), 4u);
  EXPECT_EQ(f.sent(), 5u);

  ImageDigest full;
  const uint8_t* ram[] = {p1.data(), p2.data(), nullptr, p3.data()};
  for (const uint8_t* d : ram) full.Add(HashPage(d));
  full.Add(ZeroPageHash());      // rom
  full.Add(HashPage(p1.data()));  // new
  EXPECT_EQ(f.Digest(), full.Finish());
}

TEST(KeepRunBuilder, MergesConsecutivePages) {
  KeepRunBuilder b;
  EXPECT_TRUE(b.empty());
  b.Add(0, 1);
  b.Add(0, 2);
  b.Add(0, 3);
  b.Add(0, 5);
  b.Add(1, 6);
  EXPECT_EQ(b.size(), 3 * kKeepRunSize);
  auto runs = DecodeKeep(b.Take());
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(*runs, (std::vector<KeepRun>{{0, 1, 3}, {0, 5, 1}, {1, 6, 1}}));
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(b.Take(), "");
}

}  // namespace
}  // namespace remus::wire
