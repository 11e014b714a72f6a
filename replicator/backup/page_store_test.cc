#include "replicator/backup/page_store.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using qemu::kPageSize;
using qemu::RamBlock;

// Temporary directories, removed when the test binary exits.
std::string TempDir() { return remus::testing::MakeTempDir("pagestore"); }

std::vector<uint8_t> Pattern(uint8_t seed) {
  std::vector<uint8_t> p(kPageSize);
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 8));
  if (p[0] == 0) p[0] = 1;
  return p;
}

bool PageEquals(const PageStore& s, uint32_t b, uint64_t off, const std::vector<uint8_t>& want) {
  return std::memcmp(s.BlockData(b) + off, want.data(), kPageSize) == 0;
}
bool PageIsZero(const PageStore& s, uint32_t b, uint64_t off) {
  return IsZeroPage(s.BlockData(b) + off);
}

std::string Blob(std::string_view body) { return std::string(body) + std::string(1, '\0'); }

std::vector<RamBlock> SmallBlocks() {
  return {{"pc.ram", 16 * kPageSize},
          {"/rom@etc/acpi/tables", 2 * kPageSize},
          {"0000:00:02.0/vga.vram", 4 * kPageSize}};
}

// A store through its initial sync, epoch 0 committed.
std::unique_ptr<PageStore> Synced(const std::string& dir) {
  auto s = PageStore::Create(dir, SmallBlocks());
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  auto p = Pattern(1);
  EXPECT_TRUE((*s)->ApplyPage(0, 0, p.data()).ok());
  EXPECT_TRUE((*s)->CompleteInitialSync(Blob("dev0")).ok());
  return std::move(*s);
}

Status EditMeta(const std::string& dir, const std::function<void(nlohmann::json&)>& f) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/meta.json"));
  auto j = nlohmann::json::parse(text);
  f(j);
  return WriteFileAtomic(dir + "/meta.json", j.dump());
}

TEST(PageStore, CreateOpenRoundTrip) {
  std::string dir = TempDir();
  {
    auto s = PageStore::Create(dir, SmallBlocks());
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_FALSE((*s)->has_committed());
    EXPECT_EQ((*s)->total_bytes(), 22 * kPageSize);
    auto a = Pattern(3), b = Pattern(9);
    ASSERT_TRUE((*s)->ApplyPage(0, 5 * kPageSize, a.data()).ok());
    ASSERT_TRUE((*s)->ApplyPage(2, 3 * kPageSize, b.data()).ok());
    ASSERT_TRUE((*s)->ApplyPage(0, 6 * kPageSize, nullptr).ok());
    ASSERT_TRUE((*s)->CompleteInitialSync(Blob("devstate")).ok());
    EXPECT_TRUE((*s)->has_committed());
    EXPECT_EQ((*s)->stats().pages_applied.load(), 2u);
    EXPECT_EQ((*s)->stats().zero_pages_applied.load(), 1u);
    EXPECT_EQ((*s)->stats().bytes_applied.load(), 3 * kPageSize);
  }
  // Sanitized, unique, sparse file names.
  struct stat st;
  EXPECT_EQ(::stat((dir + "/ram-000-pc.ram.img").c_str(), &st), 0);
  EXPECT_EQ(::stat((dir + "/ram-001-_rom_etc_acpi_tables.img").c_str(), &st), 0);
  EXPECT_EQ(::stat((dir + "/ram-002-0000_00_02.0_vga.vram.img").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 4 * kPageSize);

  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
  EXPECT_EQ((*s)->committed_epoch(), 0u);
  EXPECT_EQ((*s)->blocks(), SmallBlocks());
  EXPECT_EQ((*s)->device_blob(), Blob("devstate"));
  EXPECT_TRUE(PageEquals(**s, 0, 5 * kPageSize, Pattern(3)));
  EXPECT_TRUE(PageEquals(**s, 2, 3 * kPageSize, Pattern(9)));
  EXPECT_TRUE(PageIsZero(**s, 0, 6 * kPageSize));
  EXPECT_TRUE(PageIsZero(**s, 1, 0));
}

TEST(PageStore, OpenMissingIsNotFound) {
  std::string dir = TempDir();
  EXPECT_EQ(PageStore::Open(dir).status().code(), Code::kNotFound);
}

TEST(PageStore, OpenRejectsDamagedManifest) {
  std::string dir = TempDir();
  Synced(dir);
  ASSERT_TRUE(WriteFileAtomic(dir + "/manifest.json",
                              R"({"version":1,"blocks":[{"id":"pc.ram","used_length":4096,)"
                              R"("file":"../../etc/passwd"}]})")
                  .ok());
  EXPECT_EQ(PageStore::Open(dir).status().code(), Code::kDataLoss);
  ASSERT_TRUE(WriteFileAtomic(dir + "/manifest.json", "{not json").ok());
  EXPECT_EQ(PageStore::Open(dir).status().code(), Code::kDataLoss);
  // Size mismatch between manifest and file.
  ASSERT_TRUE(WriteFileAtomic(dir + "/manifest.json",
                              R"({"version":1,"blocks":[{"id":"pc.ram","used_length":8192,)"
                              R"("file":"ram-000-pc.ram.img"}]})")
                  .ok());
  EXPECT_EQ(PageStore::Open(dir).status().code(), Code::kDataLoss);
}

TEST(PageStore, CreateValidatesBlocks) {
  std::string dir = TempDir();
  auto code = [&](std::vector<RamBlock> b) { return PageStore::Create(dir, b).status().code(); };
  EXPECT_EQ(code({}), Code::kInvalidArgument);
  EXPECT_EQ(code({{"a", 4096}, {"a", 4096}}), Code::kInvalidArgument);
  EXPECT_EQ(code({{"a", 4095}}), Code::kInvalidArgument);
  EXPECT_EQ(code({{"a", 0}}), Code::kInvalidArgument);
  EXPECT_EQ(code({{"", 4096}}), Code::kInvalidArgument);
  EXPECT_EQ(code({{std::string(256, 'x'), 4096}}), Code::kInvalidArgument);
  EXPECT_EQ(code({{"a", kMaxGuestRam + 4096}}), Code::kInvalidArgument);
  std::vector<RamBlock> many;
  for (size_t i = 0; i <= qemu::kMaxRamBlocks; ++i) many.push_back({"b" + std::to_string(i), 4096});
  EXPECT_EQ(code(many), Code::kInvalidArgument);
}

TEST(PageStore, ApplyPageIsBoundsChecked) {
  std::string dir = TempDir();
  auto s = PageStore::Create(dir, SmallBlocks());
  ASSERT_TRUE(s.ok());
  auto p = Pattern(5);
  EXPECT_EQ((*s)->ApplyPage(3, 0, p.data()).code(), Code::kOutOfRange);
  EXPECT_EQ((*s)->ApplyPage(1, 2 * kPageSize, p.data()).code(), Code::kOutOfRange);
  EXPECT_EQ((*s)->ApplyPage(1, ~0ull & ~0xfffull, p.data()).code(), Code::kOutOfRange);
  EXPECT_EQ((*s)->ApplyPage(1, 100, p.data()).code(), Code::kDataLoss);
  EXPECT_TRUE((*s)->ApplyPage(1, kPageSize, p.data()).ok());  // last page
  EXPECT_TRUE(PageEquals(**s, 1, kPageSize, p));
  EXPECT_TRUE(PageIsZero(**s, 1, 0));
  ASSERT_TRUE((*s)->CompleteInitialSync(Blob("d")).ok());
  EXPECT_EQ((*s)->ApplyPage(1, 0, p.data()).code(), Code::kFailedPrecondition);
}

TEST(PageStore, CommitAppliesPagesAndZeroPages) {
  std::string dir = TempDir();
  auto s = Synced(dir);
  ASSERT_TRUE(PageEquals(*s, 0, 0, Pattern(1)));
  Staging st;
  std::string b1, b2;
  auto p7 = Pattern(7), p8 = Pattern(8);
  wire::AppendPageRecord(&b1, 0, 0, nullptr);  // data page becomes zero
  wire::AppendPageRecord(&b1, 0, 15 * kPageSize, p7.data());
  wire::AppendPageRecord(&b2, 2, kPageSize, p8.data());
  wire::AppendPageRecord(&b2, 2, 2 * kPageSize, nullptr);  // zero page over a hole
  st.AddPageBatch(b1);
  st.AddPageBatch(b2);
  st.SetDeviceBlob(Blob("dev1"));
  EXPECT_EQ(st.bytes(), b1.size() + b2.size() + 5);
  ASSERT_TRUE(s->Commit(1, std::move(st)).ok());
  EXPECT_EQ(s->committed_epoch(), 1u);
  EXPECT_TRUE(PageIsZero(*s, 0, 0));
  EXPECT_TRUE(PageEquals(*s, 0, 15 * kPageSize, p7));
  EXPECT_TRUE(PageEquals(*s, 2, kPageSize, p8));
  EXPECT_TRUE(PageIsZero(*s, 2, 2 * kPageSize));
  EXPECT_EQ(s->device_blob(), Blob("dev1"));
  EXPECT_EQ(s->stats().commits.load(), 2u);

  // An empty checkpoint (idle guest) only moves the device state.
  Staging idle;
  idle.SetDeviceBlob(Blob("dev2"));
  ASSERT_TRUE(s->Commit(2, std::move(idle)).ok());
  EXPECT_EQ(s->device_blob(), Blob("dev2"));
  EXPECT_TRUE(PageEquals(*s, 0, 15 * kPageSize, p7));
}

TEST(PageStore, CommitRequiresOrderAndInitialSync) {
  std::string dir = TempDir();
  auto c = PageStore::Create(dir, SmallBlocks());
  ASSERT_TRUE(c.ok());
  Staging a;
  a.SetDeviceBlob(Blob("x"));
  EXPECT_EQ((*c)->Commit(1, std::move(a)).code(), Code::kFailedPrecondition);
  ASSERT_TRUE((*c)->CompleteInitialSync(Blob("x"), 5).ok());
  Staging b;
  b.SetDeviceBlob(Blob("y"));
  EXPECT_EQ((*c)->Commit(5, std::move(b)).code(), Code::kFailedPrecondition);
  Staging d;
  d.SetDeviceBlob(Blob("y"));
  EXPECT_TRUE((*c)->Commit(6, std::move(d)).ok());
}

// Each bad batch follows a good record: the good one must not be applied either.
TEST(PageStore, BadRecordAppliesNothing) {
  auto p = Pattern(42);
  struct Case {
    const char* name;
    std::string batch;
  };
  std::vector<Case> cases;
  auto bad = [&](const char* name, const std::function<void(std::string*)>& f) {
    std::string b;
    wire::AppendPageRecord(&b, 0, 3 * kPageSize, p.data());
    f(&b);
    cases.push_back({name, b});
  };
  bad("block out of range", [&](std::string* b) { wire::AppendPageRecord(b, 3, 0, p.data()); });
  bad("offset beyond used_length",
      [&](std::string* b) { wire::AppendPageRecord(b, 1, 2 * kPageSize, p.data()); });
  bad("huge offset", [&](std::string* b) { wire::AppendPageRecord(b, 1, 1ull << 62, nullptr); });
  bad("misaligned", [&](std::string* b) {
    PutU32(b, 0);
    PutU64(b, 4 * kPageSize + 0x200);
    b->append(kPageSize, 'x');
  });
  bad("truncated data", [&](std::string* b) {
    wire::AppendPageRecord(b, 0, 4 * kPageSize, p.data());
    b->resize(b->size() - 1);
  });
  bad("truncated header", [&](std::string* b) { b->append("\0\0\0\0\0", 5); });

  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string dir = TempDir();
    auto s = Synced(dir);
    Staging st;
    std::string good;
    wire::AppendPageRecord(&good, 0, 2 * kPageSize, p.data());
    st.AddPageBatch(good);
    st.AddPageBatch(c.batch);
    st.SetDeviceBlob(Blob("dev1"));
    Status r = s->Commit(1, std::move(st));
    EXPECT_EQ(r.code(), Code::kDataLoss) << r.ToString();
    EXPECT_NE(r.message().find("batch 1"), std::string::npos) << r.message();
    EXPECT_EQ(s->committed_epoch(), 0u);
    EXPECT_TRUE(s->has_committed());
    EXPECT_TRUE(PageIsZero(*s, 0, 2 * kPageSize));
    EXPECT_TRUE(PageIsZero(*s, 0, 3 * kPageSize));
    EXPECT_EQ(s->device_blob(), Blob("dev0"));
    EXPECT_EQ(s->stats().rejected_commits.load(), 1u);
    // And the store still takes the next good checkpoint.
    Staging ok;
    ok.AddPageBatch(good);
    ok.SetDeviceBlob(Blob("dev1"));
    EXPECT_TRUE(s->Commit(1, std::move(ok)).ok());
    EXPECT_TRUE(PageEquals(*s, 0, 2 * kPageSize, p));
  }
}

TEST(PageStore, DeviceBlobWithoutEofIsRejected) {
  std::string dir = TempDir();
  auto s = Synced(dir);
  auto p = Pattern(2);
  Staging st;
  std::string b;
  wire::AppendPageRecord(&b, 0, 0, p.data());
  st.AddPageBatch(b);
  st.SetDeviceBlob("no eof");
  EXPECT_EQ(s->Commit(1, std::move(st)).code(), Code::kDataLoss);
  EXPECT_TRUE(PageEquals(*s, 0, 0, Pattern(1)));
  Staging empty;
  EXPECT_EQ(s->Commit(1, std::move(empty)).code(), Code::kDataLoss);
}

TEST(PageStore, CrashMidCommitReopensAsTorn) {
  std::string dir = TempDir();
  {
    auto s = Synced(dir);
    Staging st;
    st.SetDeviceBlob(Blob("dev1"));
    ASSERT_TRUE(s->Commit(1, std::move(st)).ok());
  }
  // What a crash between the "applying" marker and the final meta leaves.
  ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) { j["applying"] = 2; }).ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_NE((*s)->invalid_reason().find("epoch 2 was interrupted"), std::string::npos)
      << (*s)->invalid_reason();
  Staging st;
  st.SetDeviceBlob(Blob("dev3"));
  Status c = (*s)->Commit(3, std::move(st));
  EXPECT_EQ(c.code(), Code::kFailedPrecondition);
  EXPECT_NE(c.message().find("interrupted"), std::string::npos);
  EXPECT_EQ((*s)->ApplyPage(0, 0, nullptr).code(), Code::kFailedPrecondition);

  // A new initial sync recovers, from an empty image.
  ASSERT_TRUE((*s)->BeginInitialSync().ok());
  EXPECT_TRUE(PageIsZero(**s, 0, 0));
  auto p = Pattern(4);
  ASSERT_TRUE((*s)->ApplyPage(0, kPageSize, p.data()).ok());
  ASSERT_TRUE((*s)->CompleteInitialSync(Blob("dev10"), 10).ok());
  auto again = PageStore::Open(dir);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE((*again)->has_committed());
  EXPECT_EQ((*again)->committed_epoch(), 10u);
  EXPECT_TRUE(PageEquals(**again, 0, kPageSize, p));
}

TEST(PageStore, UnreadableMetaIsNotCommitted) {
  std::string dir = TempDir();
  { Synced(dir); }
  ASSERT_TRUE(WriteFileAtomic(dir + "/meta.json", "{trunc").ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_NE((*s)->invalid_reason().find("meta"), std::string::npos);
  ASSERT_TRUE((*s)->BeginInitialSync().ok());
  ASSERT_TRUE((*s)->CompleteInitialSync(Blob("d")).ok());
  auto t = PageStore::Open(dir);
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE((*t)->has_committed());
}

TEST(PageStore, InterruptedInitialSyncIsNotCommitted) {
  std::string dir = TempDir();
  {
    auto s = PageStore::Create(dir, SmallBlocks());
    ASSERT_TRUE(s.ok());
    auto p = Pattern(6);
    ASSERT_TRUE((*s)->ApplyPage(0, 0, p.data()).ok());
  }
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_NE((*s)->invalid_reason().find("initial sync"), std::string::npos);
  // The sync may continue: pages written before the restart are cleared by ZERO.
  ASSERT_TRUE((*s)->ApplyPage(0, 0, nullptr).ok());
  EXPECT_TRUE(PageIsZero(**s, 0, 0));
}

TEST(PageStore, RebootWithoutSyncIsNotCommitted) {
  std::string dir = TempDir();
  { Synced(dir); }
  ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) { j["boot_id"] = "another-boot"; }).ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_NE((*s)->invalid_reason().find("rebooted"), std::string::npos);
  // After Sync() the image survives a reboot.
  std::string dir2 = TempDir();
  {
    auto t = Synced(dir2);
    ASSERT_TRUE(t->Sync().ok());
  }
  ASSERT_TRUE(EditMeta(dir2, [](nlohmann::json& j) { j["boot_id"] = "another-boot"; }).ok());
  auto u = PageStore::Open(dir2);
  ASSERT_TRUE(u.ok());
  EXPECT_TRUE((*u)->has_committed()) << (*u)->invalid_reason();
  EXPECT_TRUE(PageEquals(**u, 0, 0, Pattern(1)));
}

TEST(PageStore, DeviceBlobPersists) {
  std::string dir = TempDir();
  std::string big(300000, 'q');
  big.push_back('\0');
  {
    auto s = Synced(dir);
    Staging a;
    a.SetDeviceBlob(Blob("first"));
    ASSERT_TRUE(s->Commit(1, std::move(a)).ok());
    Staging b;
    b.SetDeviceBlob(big);
    ASSERT_TRUE(s->Commit(7, std::move(b)).ok());
  }
  struct stat st;
  EXPECT_NE(::stat((dir + "/device-1.bin").c_str(), &st), 0) << "old blob kept";
  EXPECT_EQ(::stat((dir + "/device-7.bin").c_str(), &st), 0);
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->has_committed());
  EXPECT_EQ((*s)->committed_epoch(), 7u);
  EXPECT_EQ((*s)->device_blob(), big);
}

TEST(PageStore, CreateReplacesOldStore) {
  std::string dir = TempDir();
  { Synced(dir); }
  auto s = PageStore::Create(dir, SmallBlocks());
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_TRUE(PageIsZero(**s, 0, 0));
  auto o = PageStore::Open(dir);
  ASSERT_TRUE(o.ok());
  EXPECT_FALSE((*o)->has_committed());
}

// Apply-rate micro-benchmark: prints MB/s of page data, asserts nothing about time.
TEST(PageStoreBench, ApplyRate) {
  std::string dir = TempDir();
  const uint64_t kBlock = 512ull << 20;
  auto c = PageStore::Create(dir, {{"pc.ram", kBlock}});
  ASSERT_TRUE(c.ok());
  PageStore& s = **c;
  ASSERT_TRUE(s.CompleteInitialSync(Blob("d")).ok());
  const uint64_t pages = kBlock / kPageSize;
  std::mt19937_64 rng(1);
  std::vector<uint8_t> page(kPageSize);
  for (auto& x : page) x = static_cast<uint8_t>(rng() | 1);
  // Checkpoints of 8192 pages (32 MiB) in 1 MiB batches, random pages.
  auto make = [&](uint64_t seed, bool sequential, uint64_t start) {
    Staging st;
    std::mt19937_64 r(seed);
    std::string batch;
    for (uint64_t i = 0; i < 8192; ++i) {
      uint64_t pg = sequential ? (start + i) % pages : r() % pages;
      wire::AppendPageRecord(&batch, 0, pg * kPageSize, page.data());
      if (batch.size() >= (1u << 20)) st.AddPageBatch(std::move(batch)), batch.clear();
    }
    if (!batch.empty()) st.AddPageBatch(std::move(batch));
    st.SetDeviceBlob(Blob("dev"));
    return st;
  };
  auto run = [&](const char* what, int epochs, bool sequential, uint64_t* epoch) {
    std::vector<Staging> sts;
    for (int i = 0; i < epochs; ++i) sts.push_back(make(*epoch + i, sequential, i * 8192ull));
    uint64_t before = s.stats().bytes_applied.load();
    auto t0 = std::chrono::steady_clock::now();
    for (auto& st : sts) ASSERT_TRUE(s.Commit(++*epoch, std::move(st)).ok());
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double mb = (s.stats().bytes_applied.load() - before) / 1e6;
    std::printf("[ bench    ] %-40s %8.0f MB/s (%.0f MB in %.3f s, %.2f ms/commit)\n", what,
                mb / sec, mb, sec, sec * 1000 / epochs);
  };
  uint64_t epoch = 0;
  run("first touch, random pages (holes)", 2, false, &epoch);
  run("first touch, sequential (initial-like)", 16, true, &epoch);  // the whole 512 MiB
  run("rewrite, random pages", 16, false, &epoch);
  run("rewrite, random pages (again)", 16, false, &epoch);

  // Commit overhead alone: an empty checkpoint.
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) {
    Staging st;
    st.SetDeviceBlob(Blob("dev"));
    ASSERT_TRUE(s.Commit(++epoch, std::move(st)).ok());
  }
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ bench    ] empty commit (meta + blob files)           %.2f ms/commit\n", ms / 20);
}

}  // namespace
}  // namespace remus
