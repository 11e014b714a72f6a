#include "replicator/backup/page_store.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "common/crc32c.h"
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
  // A crash between the "applying" marker and the final meta, in a store
  // written before the marker named a redo record: nothing to finish it from.
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

// ---- Crash safety of Commit: the redo record (issue 16) ----

using Step = PageStore::CommitStep;

// One page of a checkpoint: the block, the page index, and the Pattern seed
// of its content (-1: a zero page).
struct PageOp {
  uint32_t block;
  uint64_t page;
  int seed;
};
using Batches = std::vector<std::vector<PageOp>>;
// The expected memory image: one string per block of SmallBlocks().
using Image = std::vector<std::string>;

Image EpochZeroImage() {
  Image img;
  for (const auto& b : SmallBlocks()) img.emplace_back(b.used_length, '\0');
  auto p = Pattern(1);  // what Synced() writes
  img[0].replace(0, kPageSize, reinterpret_cast<const char*>(p.data()), kPageSize);
  return img;
}

// Applies a checkpoint to an image the simple way, in order.
Image Applied(Image img, const Batches& batches) {
  for (const auto& batch : batches) {
    for (const auto& op : batch) {
      std::string& blk = img[op.block];
      if (op.seed < 0) {
        std::fill_n(blk.begin() + static_cast<long>(op.page * kPageSize), kPageSize, '\0');
      } else {
        auto p = Pattern(static_cast<uint8_t>(op.seed));
        blk.replace(op.page * kPageSize, kPageSize, reinterpret_cast<const char*>(p.data()), kPageSize);
      }
    }
  }
  return img;
}

Staging Checkpoint(const Batches& batches, const std::string& blob) {
  Staging st;
  for (const auto& batch : batches) {
    std::string b;
    for (const auto& op : batch) {
      auto p = Pattern(static_cast<uint8_t>(op.seed < 0 ? 0 : op.seed));
      wire::AppendPageRecord(&b, op.block, op.page * kPageSize, op.seed < 0 ? nullptr : p.data());
    }
    st.AddPageBatch(std::move(b));
  }
  st.SetDeviceBlob(blob);
  return st;
}

// Epoch 1, committed normally.
const Batches& EpochOne() {
  static const Batches b = {{{0, 1, 11}, {0, 2, 12}, {2, 0, 13}}, {{0, 3, 14}, {1, 1, 15}, {0, 0, -1}}};
  return b;
}
// Epoch 2, the one the crashes interrupt: several batches, zero pages over
// data and over holes, and pages written twice (order matters).
const Batches& EpochTwo() {
  static const Batches b = {
      {{0, 1, -1}, {0, 4, 21}, {0, 5, -1}},
      {{2, 0, 22}, {0, 2, 23}},
      {{1, 0, 24}, {0, 1, 25}},
      {{0, 15, -1}, {2, 3, 26}, {0, 4, 27}, {0, 3, -1}},
  };
  return b;
}
const Batches& EpochThree() {
  static const Batches b = {{{0, 6, 31}, {0, 4, -1}}, {{2, 1, 32}}};
  return b;
}
Image ImageOne() { return Applied(EpochZeroImage(), EpochOne()); }
Image ImageTwo() { return Applied(ImageOne(), EpochTwo()); }
Image ImageThree() { return Applied(ImageTwo(), EpochThree()); }

// Byte-for-byte comparison of the store's memory with an expected image.
::testing::AssertionResult ImageIs(const PageStore& s, const Image& want) {
  if (s.blocks().size() != want.size()) return ::testing::AssertionFailure() << "block count differs";
  for (size_t b = 0; b < want.size(); ++b) {
    if (s.blocks()[b].used_length != want[b].size()) return ::testing::AssertionFailure() << "block " << b << " length";
    for (size_t off = 0; off < want[b].size(); off += kPageSize) {
      if (std::memcmp(s.BlockData(b) + off, want[b].data() + off, kPageSize) != 0)
        return ::testing::AssertionFailure() << "block " << b << " page " << off / kPageSize << " differs";
    }
  }
  return ::testing::AssertionSuccess();
}

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}
// What a clean store at an epoch holds: after its first Commit, the record
// file too (kept from commit to commit).
std::set<std::string> CleanFiles(uint64_t epoch, bool record_file = true) {
  std::set<std::string> f = {"manifest.json", "meta.json", "ram-000-pc.ram.img", "ram-001-_rom_etc_acpi_tables.img",
                             "ram-002-0000_00_02.0_vga.vram.img", "device-" + std::to_string(epoch) + ".bin"};
  if (record_file) f.insert("redo.log");
  return f;
}
const char kRecordFile[] = "/redo.log";
constexpr uint64_t kRecordFileStep = 4u << 20;  // the file grows in these steps

uint64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

// The size of a checkpoint's complete redo record (docs/formats/page-store-redo.md).
uint64_t RedoSize(const Batches& batches) {
  Staging st = Checkpoint(batches, Blob("dev"));
  uint64_t n = 40 + 8 * st.batches().size() + 4;
  for (const auto& b : st.batches()) n += b.size();
  return n;
}
uint64_t RedoSizeOfEpochTwo() { return RedoSize(EpochTwo()); }

// Whether the first `len` bytes of s are a complete record of `epoch`
// (epoch field and trailer CRC).
bool HoldsRecord(const std::string& s, uint64_t len, uint64_t epoch) {
  if (s.size() < len || len < 44) return false;
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  return LoadU64(p + 16) == epoch && LoadU32(p + len - 4) == crc32c::Value(p, len - 4);
}

// A store committed at epoch 1 (image ImageOne(), blob "dev1").
void StoreAtEpochOne(const std::string& dir) {
  auto s = Synced(dir);
  ASSERT_TRUE(s->Commit(1, Checkpoint(EpochOne(), Blob("dev1"))).ok());
  ASSERT_TRUE(ImageIs(*s, ImageOne()));
}

bool Matches(Step step, size_t arg, Step at, size_t at_arg) {
  return step == at && (step != Step::kBatchApplied || arg == at_arg);
}

// A child process opens the store (committed at epoch - 1) and commits
// `epoch`, and is killed (SIGKILL, no cleanup of any kind) at the step.
void CrashDuringCommit(const std::string& dir, uint64_t epoch, const Batches& batches, const std::string& blob,
                       Step at, size_t at_arg) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // No gtest in here, and _exit: the parent owns the temp dirs.
    auto s = PageStore::Open(dir);
    if (!s.ok() || !(*s)->has_committed() || (*s)->committed_epoch() != epoch - 1) ::_exit(2);
    (*s)->SetCommitHookForTest([&](Step step, size_t arg) {
      if (Matches(step, arg, at, at_arg)) ::raise(SIGKILL);
      return OkStatus();
    });
    Status c = (*s)->Commit(epoch, Checkpoint(batches, blob));
    ::_exit(c.ok() ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the child was not killed at the step: status " << status;
}
void CrashDuringCommitOfEpochTwo(const std::string& dir, Step at, size_t at_arg) {
  CrashDuringCommit(dir, 2, EpochTwo(), Blob("dev2"), at, at_arg);
}

struct CrashPoint {
  const char* name;
  Step step;
  size_t arg;
  bool after_marker;  // the commit was decided: epoch 2 must come back
};
std::vector<CrashPoint> CrashPoints() {
  return {
      {"blob written", Step::kBlobWritten, 0, false},
      {"redo record half written", Step::kRedoWriting, 0, false},
      {"redo record written", Step::kRedoWritten, 0, false},
      {"marker written", Step::kMarkerWritten, 0, true},
      {"first batch applied", Step::kBatchApplied, 0, true},
      {"last batch applied", Step::kBatchApplied, EpochTwo().size() - 1, true},
      {"commit record written", Step::kCommitRecordWritten, 0, true},
  };
}

TEST(PageStoreCrash, KillAtEveryCommitStepReopensAtOneEpochOrTheNext) {
  for (const CrashPoint& c : CrashPoints()) {
    SCOPED_TRACE(c.name);
    std::string dir = TempDir();
    StoreAtEpochOne(dir);
    CrashDuringCommitOfEpochTwo(dir, c.step, c.arg);
    if (HasFatalFailure()) return;

    // What the crash left, before Open tidies it.
    std::set<std::string> left = Files(dir);
    auto meta = nlohmann::json::parse(*ReadFileToString(dir + "/meta.json"));
    ASSERT_TRUE(left.count("redo.log"));
    const std::string record = *ReadFileToString(dir + kRecordFile);
    EXPECT_EQ(record.size(), kRecordFileStep) << "grown once, kept";
    if (c.step == Step::kBlobWritten) {
      EXPECT_TRUE(HoldsRecord(record, RedoSize(EpochOne()), 1)) << "still epoch 1's record";
    } else if (c.step == Step::kRedoWriting) {
      EXPECT_EQ(LoadU64(reinterpret_cast<const uint8_t*>(record.data()) + 16), 2u) << "epoch 2's header";
      EXPECT_FALSE(HoldsRecord(record, RedoSizeOfEpochTwo(), 2)) << "a partial record: no valid trailer";
    } else {
      EXPECT_TRUE(HoldsRecord(record, RedoSizeOfEpochTwo(), 2));
    }
    if (c.after_marker && c.step != Step::kCommitRecordWritten) {
      EXPECT_EQ(meta.value("applying", 0), 2) << meta.dump();
      EXPECT_EQ(meta.value("redo", ""), "redo.log") << meta.dump();
    } else {
      EXPECT_FALSE(meta.contains("applying")) << meta.dump();
    }
    EXPECT_TRUE(left.count("device-2.bin"));

    const uint64_t want = c.after_marker ? 2 : 1;
    auto s = PageStore::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
    EXPECT_EQ((*s)->committed_epoch(), want);
    EXPECT_TRUE(ImageIs(**s, want == 2 ? ImageTwo() : ImageOne()));
    EXPECT_EQ((*s)->device_blob(), Blob(want == 2 ? "dev2" : "dev1"));
    EXPECT_EQ(Files(dir), CleanFiles(want)) << "stray files of the interrupted commit removed";
    auto meta2 = nlohmann::json::parse(*ReadFileToString(dir + "/meta.json"));
    EXPECT_FALSE(meta2.contains("applying"));
    EXPECT_FALSE(meta2.contains("redo"));

    // The next checkpoint commits, and the store reopens there.
    ASSERT_TRUE((*s)->Commit(3, Checkpoint(EpochThree(), Blob("dev3"))).ok());
    Image three = Applied(want == 2 ? ImageTwo() : ImageOne(), EpochThree());
    EXPECT_TRUE(ImageIs(**s, three));
    s->reset();
    auto again = PageStore::Open(dir);
    ASSERT_TRUE(again.ok());
    ASSERT_TRUE((*again)->has_committed()) << (*again)->invalid_reason();
    EXPECT_EQ((*again)->committed_epoch(), 3u);
    EXPECT_TRUE(ImageIs(**again, three));
    EXPECT_EQ((*again)->device_blob(), Blob("dev3"));
    EXPECT_EQ(Files(dir), CleanFiles(3));
  }
}

// Recovery is idempotent: a crash during the recovery's own apply (here: the
// recovered image is damaged further, as a half-finished re-apply would, and
// the marker is still there) is finished by the next Open.
TEST(PageStoreCrash, RecoveryAppliesTheWholeRecordAgain) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  CrashDuringCommitOfEpochTwo(dir, Step::kBatchApplied, 1);
  ASSERT_FALSE(HasFatalFailure());
  std::string meta = *ReadFileToString(dir + "/meta.json");
  std::string redo = *ReadFileToString(dir + kRecordFile);
  {
    auto s = PageStore::Open(dir);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
    EXPECT_TRUE(ImageIs(**s, ImageTwo()));
  }
  // Put the marker and the record back, as if that Open had died before its
  // commit record.
  ASSERT_TRUE(WriteFileAtomic(dir + "/meta.json", meta).ok());
  ASSERT_TRUE(WriteFileAtomic(dir + kRecordFile, redo).ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
  EXPECT_EQ((*s)->committed_epoch(), 2u);
  EXPECT_TRUE(ImageIs(**s, ImageTwo()));
  EXPECT_EQ(Files(dir), CleanFiles(2));
}

TEST(PageStoreCrash, DamagedRedoRecordLeavesTheStoreTorn) {
  struct Case {
    const char* name;
    std::function<void(const std::string& dir)> damage;
    const char* reason;  // invalid_reason() must contain it
  };
  const std::string kRedo = kRecordFile;
  std::vector<Case> cases = {
      {"a payload byte flipped",
       [&](const std::string& dir) {
         std::string r = *ReadFileToString(dir + kRedo);
         r[RedoSizeOfEpochTwo() / 2] ^= 0x40;
         ASSERT_TRUE(WriteFileAtomic(dir + kRedo, r).ok());
       },
       "CRC-32C mismatch"},
      {"the trailer flipped",
       [&](const std::string& dir) {
         std::string r = *ReadFileToString(dir + kRedo);
         r[RedoSizeOfEpochTwo() - 1] ^= 1;
         ASSERT_TRUE(WriteFileAtomic(dir + kRedo, r).ok());
       },
       "CRC-32C mismatch"},
      {"a batch length changed (the record ends elsewhere in the file)",
       [&](const std::string& dir) {
         std::string r = *ReadFileToString(dir + kRedo);
         r[40 + 7] ^= 0x10;  // batch 0's length, low byte: +-16 bytes
         ASSERT_TRUE(WriteFileAtomic(dir + kRedo, r).ok());
       },
       "CRC-32C mismatch"},
      {"truncated", [&](const std::string& dir) { ASSERT_EQ(::truncate((dir + kRedo).c_str(), 5000), 0); },
       "short: 5000 bytes, less than the first 2 batches its header lists (truncated)"},
      {"truncated by one byte",
       [&](const std::string& dir) {
         ASSERT_EQ(::truncate((dir + kRedo).c_str(), static_cast<off_t>(RedoSizeOfEpochTwo() - 1)), 0);
       },
       "(truncated)"},
      {"truncated into the header",
       [&](const std::string& dir) { ASSERT_EQ(::truncate((dir + kRedo).c_str(), 20), 0); }, "short"},
      {"empty", [&](const std::string& dir) { ASSERT_EQ(::truncate((dir + kRedo).c_str(), 0), 0); }, "short"},
      {"missing", [&](const std::string& dir) { ASSERT_EQ(::unlink((dir + kRedo).c_str()), 0); }, "missing"},
      {"bad magic",
       [&](const std::string& dir) {
         std::string r = *ReadFileToString(dir + kRedo);
         r[0] = 'X';
         ASSERT_TRUE(WriteFileAtomic(dir + kRedo, r).ok());
       },
       "magic"},
      {"the device blob replaced",
       [&](const std::string& dir) { ASSERT_TRUE(WriteFileAtomic(dir + "/device-2.bin", Blob("devX")).ok()); },
       "is not the device state"},
      {"the device blob missing",
       [&](const std::string& dir) { ASSERT_EQ(::unlink((dir + "/device-2.bin").c_str()), 0); }, "device-2.bin"},
      {"the marker names another epoch",
       [&](const std::string& dir) {
         ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) { j["applying"] = 5; }).ok());
       },
       "record of epoch 2, the marker names epoch 5"},
      {"the host rebooted",
       [&](const std::string& dir) {
         ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) { j["boot_id"] = "another-boot"; }).ok());
       },
       "rebooted"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string dir = TempDir();
    StoreAtEpochOne(dir);
    CrashDuringCommitOfEpochTwo(dir, Step::kMarkerWritten, 0);
    ASSERT_FALSE(HasFatalFailure());
    c.damage(dir);
    ASSERT_FALSE(HasFatalFailure());
    std::set<std::string> before = Files(dir);
    auto s = PageStore::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_FALSE((*s)->has_committed());
    const std::string& why = (*s)->invalid_reason();
    EXPECT_NE(why.find(c.reason), std::string::npos) << why;
    EXPECT_NE(why.find("epoch 2"), std::string::npos) << why;
    if (std::string(c.name) != "the host rebooted" && std::string(c.name).find("device blob") == std::string::npos) {
      EXPECT_NE(why.find("redo.log"), std::string::npos) << why;
    }
    EXPECT_EQ(Files(dir), before) << "a torn commit's files stay for inspection";
    Staging st;
    st.SetDeviceBlob(Blob("dev3"));
    EXPECT_EQ((*s)->Commit(3, std::move(st)).code(), Code::kFailedPrecondition);
    // A new initial sync starts over and clears them.
    ASSERT_TRUE((*s)->BeginInitialSync().ok());
    ASSERT_TRUE((*s)->CompleteInitialSync(Blob("dev10"), 10).ok());
    EXPECT_EQ(Files(dir), CleanFiles(10, false)) << "the record file too";
  }
}

// A hook that fails a step is a write failure there: before the marker the
// store stays at epoch 1; after it, reopening finishes epoch 2.
TEST(PageStoreCrash, FailureAtEveryStepLeavesARestorableStore) {
  for (const CrashPoint& c : CrashPoints()) {
    SCOPED_TRACE(c.name);
    std::string dir = TempDir();
    StoreAtEpochOne(dir);
    auto s = PageStore::Open(dir);
    ASSERT_TRUE(s.ok());
    (*s)->SetCommitHookForTest([&](Step step, size_t arg) {
      return Matches(step, arg, c.step, c.arg) ? ResourceExhausted("disk full (test)") : OkStatus();
    });
    Status r = (*s)->Commit(2, Checkpoint(EpochTwo(), Blob("dev2")));
    EXPECT_EQ(r.code(), Code::kResourceExhausted) << r.ToString();
    EXPECT_NE(r.message().find("disk full (test)"), std::string::npos) << r.message();
    (*s)->SetCommitHookForTest(nullptr);

    uint64_t want = 1;
    // A failed write of the record removes the file (the next commit makes
    // it again); any other failure leaves it, unnamed by meta.
    const bool record_file = c.step != Step::kRedoWriting;
    if (c.step == Step::kBatchApplied) {
      // Torn here (memory mixes epochs) until reopened.
      EXPECT_FALSE((*s)->has_committed());
      EXPECT_NE((*s)->invalid_reason().find("redo.log"), std::string::npos) << (*s)->invalid_reason();
      want = 2;
    } else if (c.step == Step::kCommitRecordWritten) {
      ASSERT_TRUE((*s)->has_committed());
      EXPECT_EQ((*s)->committed_epoch(), 2u);
      EXPECT_TRUE(ImageIs(**s, ImageTwo()));
      EXPECT_EQ(Files(dir), CleanFiles(2));
      want = 2;
    } else {
      ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
      EXPECT_EQ((*s)->committed_epoch(), 1u);
      EXPECT_TRUE(ImageIs(**s, ImageOne()));
      EXPECT_EQ((*s)->device_blob(), Blob("dev1"));
      EXPECT_EQ(Files(dir), CleanFiles(1, record_file)) << "the new epoch's device blob removed";
    }
    s->reset();
    auto o = PageStore::Open(dir);
    ASSERT_TRUE(o.ok());
    ASSERT_TRUE((*o)->has_committed()) << (*o)->invalid_reason();
    EXPECT_EQ((*o)->committed_epoch(), want);
    EXPECT_TRUE(ImageIs(**o, want == 2 ? ImageTwo() : ImageOne()));
    EXPECT_EQ(Files(dir), CleanFiles(want, record_file));
    if (want == 1) {  // the same checkpoint again, now without a failure
      ASSERT_TRUE((*o)->Commit(2, Checkpoint(EpochTwo(), Blob("dev2"))).ok());
      EXPECT_TRUE(ImageIs(**o, ImageTwo()));
    }
    ASSERT_TRUE((*o)->Commit(3, Checkpoint(EpochThree(), Blob("dev3"))).ok());
    EXPECT_TRUE(ImageIs(**o, ImageThree()));
    EXPECT_EQ(Files(dir), CleanFiles(3));
  }
}

// A real ENOSPC from write(2): the record file's name is a symlink to
// /dev/full, whose writes fail with ENOSPC (no root, no small filesystem).
TEST(PageStoreCrash, NoSpaceForTheRedoRecordKeepsThePreviousEpoch) {
  if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no writable /dev/full";
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(::unlink((dir + kRecordFile).c_str()), 0);
  ASSERT_EQ(::symlink("/dev/full", (dir + kRecordFile).c_str()), 0);
  Status r = (*s)->Commit(2, Checkpoint(EpochTwo(), Blob("dev2")));
  EXPECT_EQ(r.code(), Code::kResourceExhausted) << r.ToString();
  EXPECT_NE(r.message().find("redo.log"), std::string::npos) << r.message();
  ASSERT_TRUE((*s)->has_committed());
  EXPECT_EQ((*s)->committed_epoch(), 1u);
  EXPECT_TRUE(ImageIs(**s, ImageOne()));
  EXPECT_EQ((*s)->device_blob(), Blob("dev1"));
  EXPECT_EQ(Files(dir), CleanFiles(1, false)) << "no record file, no device-2.bin";
  EXPECT_EQ(::access("/dev/full", F_OK), 0);
  {
    auto o = PageStore::Open(dir);
    ASSERT_TRUE(o.ok());
    ASSERT_TRUE((*o)->has_committed());
    EXPECT_EQ((*o)->committed_epoch(), 1u);
    EXPECT_TRUE(ImageIs(**o, ImageOne()));
  }
  // Space again: the next checkpoint commits.
  ASSERT_TRUE((*s)->Commit(2, Checkpoint(EpochTwo(), Blob("dev2"))).ok());
  EXPECT_TRUE(ImageIs(**s, ImageTwo()));
  EXPECT_EQ(Files(dir), CleanFiles(2));
}

// The record's bytes are what docs/formats/page-store-redo.md describes.
TEST(PageStoreCrash, RedoRecordLayout) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  CrashDuringCommitOfEpochTwo(dir, Step::kRedoWritten, 0);
  ASSERT_FALSE(HasFatalFailure());
  std::string r = *ReadFileToString(dir + kRecordFile);
  Staging want = Checkpoint(EpochTwo(), Blob("dev2"));
  const auto* p = reinterpret_cast<const uint8_t*>(r.data());
  ASSERT_EQ(r.size(), kRecordFileStep) << "the file: the record, then stale bytes";
  r.resize(RedoSizeOfEpochTwo());
  EXPECT_EQ(r.substr(0, 8), "RMPSREDO");
  EXPECT_EQ(LoadU32(p + 8), 1u);                                  // version
  EXPECT_EQ(LoadU32(p + 12), want.batches().size());              // batch count
  EXPECT_EQ(LoadU64(p + 16), 2u);                                 // epoch
  EXPECT_EQ(LoadU64(p + 24), want.device_blob().size());          // device blob length
  EXPECT_EQ(LoadU32(p + 32), crc32c::Value(want.device_blob().data(), want.device_blob().size()));
  EXPECT_EQ(LoadU32(p + 36), 0u);                                 // reserved
  size_t pos = 40 + 8 * want.batches().size();
  for (size_t i = 0; i < want.batches().size(); ++i) {
    EXPECT_EQ(LoadU64(p + 40 + 8 * i), want.batches()[i].size());
    EXPECT_EQ(r.substr(pos, want.batches()[i].size()), want.batches()[i]) << "batch " << i << " as received";
    pos += want.batches()[i].size();
  }
  EXPECT_EQ(pos + 4, r.size());
  EXPECT_EQ(LoadU32(p + pos), crc32c::Value(p, pos));
}

// ---- The kept record file (redo.log, overwritten in place) ----

// A checkpoint whose record is longer than one growth step of the file: the
// store's pages written over and over (a page may come twice in a checkpoint;
// the later content wins). `seed` varies the content.
Batches BigCheckpoint(int seed, size_t pages) {
  Batches b(4);
  for (size_t i = 0; i < pages; ++i) {
    uint32_t block = static_cast<uint32_t>(i % 3);
    uint64_t page = (i / 3) % (block == 0 ? 16 : block == 1 ? 2 : 4);
    b[i % 4].push_back({block, page, static_cast<int>((seed + i) % 200) + 1});
  }
  return b;
}

// A complete record of an older epoch in the kept file is never replayed for
// a marker that names a newer one (it can only be there if the newer record
// was never written; the marker is written after it, so this is damage).
TEST(PageStoreRecordFile, StaleRecordOfAnOlderEpochIsNotReplayed) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  ASSERT_TRUE(HoldsRecord(*ReadFileToString(dir + kRecordFile), RedoSize(EpochOne()), 1));
  // As if epoch 2's commit had reached its marker without writing a record.
  ASSERT_TRUE(WriteFileAtomic(dir + "/device-2.bin", Blob("dev2")).ok());
  ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) {
                j["applying"] = 2;
                j["redo"] = "redo.log";
              }).ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_NE((*s)->invalid_reason().find("record of epoch 1, the marker names epoch 2"), std::string::npos)
      << (*s)->invalid_reason();
  EXPECT_TRUE(ImageIs(**s, ImageOne())) << "nothing applied";
}

// A record of the marker's epoch torn over an older one (its header and first
// half written, the rest the older record's bytes) fails the CRC.
TEST(PageStoreRecordFile, TornRecordOverAnOlderOneIsNotReplayed) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  CrashDuringCommitOfEpochTwo(dir, Step::kRedoWriting, 0);
  ASSERT_FALSE(HasFatalFailure());
  {
    // No marker: the torn record is never read; the store is at epoch 1.
    auto s = PageStore::Open(dir);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
    EXPECT_EQ((*s)->committed_epoch(), 1u);
    EXPECT_TRUE(ImageIs(**s, ImageOne()));
  }
  // A marker naming it (damage: Commit writes the marker after the record).
  ASSERT_TRUE(WriteFileAtomic(dir + "/device-2.bin", Blob("dev2")).ok());
  ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) {
                j["applying"] = 2;
                j["redo"] = "redo.log";
              }).ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE((*s)->has_committed());
  EXPECT_NE((*s)->invalid_reason().find("CRC-32C mismatch"), std::string::npos) << (*s)->invalid_reason();
  EXPECT_TRUE(ImageIs(**s, ImageOne())) << "nothing applied";
}

// A record shorter than the one before it leaves the older record's tail in
// the file; recovery reads the new record only.
TEST(PageStoreRecordFile, ShorterRecordLeavesTheOldTailHarmless) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  const Batches big = BigCheckpoint(7, 1500);  // ~6 MiB of records
  const uint64_t big_size = RedoSize(big);
  ASSERT_GT(big_size, kRecordFileStep);
  Image two = Applied(ImageOne(), big);
  {
    auto s = PageStore::Open(dir);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->Commit(2, Checkpoint(big, Blob("dev2"))).ok());
    ASSERT_TRUE(ImageIs(**s, two));
  }
  const std::string after_big = *ReadFileToString(dir + kRecordFile);
  ASSERT_EQ(after_big.size(), 2 * kRecordFileStep) << "grown to the record, in steps";
  ASSERT_TRUE(HoldsRecord(after_big, big_size, 2));

  // Epoch 3 (short) crashes after its marker; its record lies over epoch 2's.
  CrashDuringCommit(dir, 3, EpochThree(), Blob("dev3"), Step::kBatchApplied, 0);
  ASSERT_FALSE(HasFatalFailure());
  const uint64_t small = RedoSize(EpochThree());
  const std::string after_small = *ReadFileToString(dir + kRecordFile);
  ASSERT_EQ(after_small.size(), after_big.size()) << "the file keeps its size";
  EXPECT_TRUE(HoldsRecord(after_small, small, 3));
  EXPECT_EQ(after_small.substr(small), after_big.substr(small)) << "epoch 2's bytes after the record";

  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
  EXPECT_EQ((*s)->committed_epoch(), 3u);
  Image three = Applied(two, EpochThree());
  EXPECT_TRUE(ImageIs(**s, three));
  EXPECT_EQ((*s)->device_blob(), Blob("dev3"));
  EXPECT_EQ(Files(dir), CleanFiles(3));
  // And the next, longer-again commit works from there.
  ASSERT_TRUE((*s)->Commit(4, Checkpoint(big, Blob("dev4"))).ok());
  EXPECT_TRUE(ImageIs(**s, Applied(three, big)));
  EXPECT_EQ(FileSize(dir + kRecordFile), 2 * kRecordFileStep);
}

// A record file from before it was kept (redo-<epoch>.log, exactly one record
// long) is still finished, and removed afterwards.
TEST(PageStoreRecordFile, MarkerNamingAPerEpochRecordIsFinished) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  CrashDuringCommitOfEpochTwo(dir, Step::kMarkerWritten, 0);
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_EQ(::rename((dir + kRecordFile).c_str(), (dir + "/redo-2.log").c_str()), 0);
  ASSERT_EQ(::truncate((dir + "/redo-2.log").c_str(), static_cast<off_t>(RedoSizeOfEpochTwo())), 0);
  ASSERT_TRUE(EditMeta(dir, [](nlohmann::json& j) { j["redo"] = "redo-2.log"; }).ok());
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->has_committed()) << (*s)->invalid_reason();
  EXPECT_EQ((*s)->committed_epoch(), 2u);
  EXPECT_TRUE(ImageIs(**s, ImageTwo()));
  EXPECT_EQ(Files(dir), CleanFiles(2, false));
}

// The file shrinks after a long run of records much smaller than it.
TEST(PageStoreRecordFile, ShrinksAfterAThousandSmallRecords) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  const Batches big = BigCheckpoint(3, 4500);  // ~18 MiB of records: a 20 MiB file
  uint64_t epoch = 2;
  ASSERT_TRUE((*s)->Commit(epoch++, Checkpoint(big, Blob("dev"))).ok());
  ASSERT_EQ(FileSize(dir + kRecordFile), 5 * kRecordFileStep);
  // 1000 records of at most a quarter of the file: kept at its size.
  const Batches medium = BigCheckpoint(5, 1100);  // ~4.4 MiB <= 20 MiB / 4
  ASSERT_GT(RedoSize(medium), kRecordFileStep);
  ASSERT_TRUE((*s)->Commit(epoch++, Checkpoint(medium, Blob("dev"))).ok());
  for (int i = 1; i < 1000; ++i) ASSERT_TRUE((*s)->Commit(epoch++, Checkpoint(EpochThree(), Blob("dev"))).ok());
  EXPECT_EQ(FileSize(dir + kRecordFile), 5 * kRecordFileStep);
  // The next one shrinks it to twice the largest of them, in 4 MiB steps.
  ASSERT_TRUE((*s)->Commit(epoch, Checkpoint(EpochThree(), Blob("dev"))).ok());
  EXPECT_EQ(FileSize(dir + kRecordFile), 3 * kRecordFileStep);  // 2 x ~4.4 MiB -> 12 MiB
  EXPECT_TRUE(HoldsRecord(*ReadFileToString(dir + kRecordFile), RedoSize(EpochThree()), epoch));
  // A big record grows it again.
  ASSERT_TRUE((*s)->Commit(++epoch, Checkpoint(big, Blob("dev"))).ok());
  EXPECT_EQ(FileSize(dir + kRecordFile), 5 * kRecordFileStep);
  s->reset();
  auto o = PageStore::Open(dir);
  ASSERT_TRUE(o.ok());
  ASSERT_TRUE((*o)->has_committed());
  EXPECT_EQ((*o)->committed_epoch(), epoch);
}

// Growing the file can fail (here: RLIMIT_FSIZE makes fallocate fail with
// EFBIG): the store stays at the previous epoch and the file is removed.
TEST(PageStoreRecordFile, FailureToGrowKeepsThePreviousEpoch) {
  std::string dir = TempDir();
  StoreAtEpochOne(dir);
  auto s = PageStore::Open(dir);
  ASSERT_TRUE(s.ok());
  const Batches big = BigCheckpoint(9, 1500);
  struct rlimit old;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct sigaction ign {}, old_act {};
  ign.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ign, &old_act), 0);
  struct rlimit lim = old;
  lim.rlim_cur = kRecordFileStep;  // the file is one step now
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  Status r = (*s)->Commit(2, Checkpoint(big, Blob("dev2")));
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  ASSERT_EQ(::sigaction(SIGXFSZ, &old_act, nullptr), 0);
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.message().find("redo.log"), std::string::npos) << r.message();
  ASSERT_TRUE((*s)->has_committed());
  EXPECT_EQ((*s)->committed_epoch(), 1u);
  EXPECT_TRUE(ImageIs(**s, ImageOne()));
  EXPECT_EQ(Files(dir), CleanFiles(1, false));
  ASSERT_TRUE((*s)->Commit(2, Checkpoint(big, Blob("dev2"))).ok());
  EXPECT_TRUE(ImageIs(**s, Applied(ImageOne(), big)));
  EXPECT_EQ(Files(dir), CleanFiles(2));
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
