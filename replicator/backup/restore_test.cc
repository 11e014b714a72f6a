#include "replicator/backup/restore.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <csignal>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "common/io.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

using qemu::kPageSize;
using qemu::RamBlock;

std::string TempDir() { return remus::testing::MakeTempDir("restore"); }

std::vector<uint8_t> Pattern(uint8_t seed) {
  std::vector<uint8_t> p(kPageSize);
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<uint8_t>(seed * 13 + i * 3);
  p[100] = 0xff;
  return p;
}

// Minimal reader over the produced bytes; fails the test on overrun.
struct Cursor {
  const std::string& s;
  size_t pos = 0;
  bool Need(size_t n) {
    EXPECT_LE(pos + n, s.size()) << "stream too short at " << pos;
    return pos + n <= s.size();
  }
  uint8_t U8() { return Need(1) ? static_cast<uint8_t>(s[pos++]) : 0; }
  uint32_t U32() {
    if (!Need(4)) return 0;
    uint32_t v = LoadU32(s.data() + pos);
    pos += 4;
    return v;
  }
  uint64_t U64() {
    if (!Need(8)) return 0;
    uint64_t v = LoadU64(s.data() + pos);
    pos += 8;
    return v;
  }
  std::string Bytes(size_t n) {
    if (!Need(n)) return "";
    std::string r = s.substr(pos, n);
    pos += n;
    return r;
  }
  std::string Idstr() { return Bytes(U8()); }
};

std::string Blob() {
  // Stand-in device sections: FULL header + body + footer, then EOF.
  std::string b;
  PutU8(&b, qemu::kSecFull);
  PutU32(&b, 3);
  PutU8(&b, 5);
  b += "timer";
  PutU32(&b, 0);
  PutU32(&b, 2);
  b += std::string(24, '\x11');
  PutU8(&b, qemu::kSecFooter);
  PutU32(&b, 3);
  PutU8(&b, qemu::kSecEof);
  return b;
}

TEST(Restore, TinyTwoBlockLayout) {
  std::string dir = TempDir();
  std::vector<RamBlock> blocks = {{"pc.ram", 4 * kPageSize}, {"/rom@etc/acpi/tables", 2 * kPageSize}};
  auto c = PageStore::Create(dir, blocks);
  ASSERT_TRUE(c.ok());
  PageStore& s = **c;
  auto p1 = Pattern(1), p2 = Pattern(2), p3 = Pattern(3);
  ASSERT_TRUE(s.ApplyPage(0, 1 * kPageSize, p1.data()).ok());
  ASSERT_TRUE(s.ApplyPage(0, 2 * kPageSize, p1.data()).ok());
  ASSERT_TRUE(s.CompleteInitialSync(Blob()).ok());
  Staging st;
  std::string batch;
  wire::AppendPageRecord(&batch, 0, 2 * kPageSize, nullptr);  // written once, now zero
  wire::AppendPageRecord(&batch, 0, 3 * kPageSize, p2.data());
  wire::AppendPageRecord(&batch, 1, 0, p3.data());
  st.AddPageBatch(batch);
  st.SetDeviceBlob(Blob());
  ASSERT_TRUE(s.Commit(1, std::move(st)).ok());

  std::string config = qemu::MakeConfigurationSection("pc-i440fx-7.2");
  RestoreStats rs;
  RestoreProgress progress;
  progress.ram_done = 12345;  // a leftover from an earlier promotion is reset
  rs.progress = &progress;
  auto out = RestoreStreamToString(s, config, &rs);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(rs.pages, 3u);
  EXPECT_EQ(rs.zero_pages, 3u);
  EXPECT_EQ(rs.bytes, out->size());
  // Progress counts the guest's RAM: both blocks, all of it at the end.
  EXPECT_EQ(progress.ram_total.load(), 6 * kPageSize);
  EXPECT_EQ(progress.ram_done.load(), 6 * kPageSize);
  EXPECT_EQ(rs.progress, &progress);

  Cursor r{*out};
  EXPECT_EQ(r.U32(), qemu::kFileMagic);
  EXPECT_EQ(r.U32(), 3u);
  EXPECT_EQ(r.Bytes(config.size()), config);
  // START ram
  EXPECT_EQ(r.U8(), qemu::kSecStart);
  const uint32_t id = r.U32();
  EXPECT_NE(id, 0u);
  EXPECT_EQ(id, kRestoreRamSectionId);
  EXPECT_EQ(r.Idstr(), "ram");
  EXPECT_EQ(r.U32(), 0u);  // instance
  EXPECT_EQ(r.U32(), 4u);  // version
  EXPECT_EQ(r.U64(), (6 * kPageSize) | qemu::kRamFlagMemSize);
  EXPECT_EQ(r.Idstr(), "pc.ram");
  EXPECT_EQ(r.U64(), 4 * kPageSize);
  EXPECT_EQ(r.Idstr(), "/rom@etc/acpi/tables");
  EXPECT_EQ(r.U64(), 2 * kPageSize);
  // Every page of every block, in order; CONTINUE after the first of a block.
  struct Want {
    std::string block;
    uint64_t offset;
    const std::vector<uint8_t>* data;  // nullptr: ZERO
  };
  std::vector<Want> want = {{"pc.ram", 0, nullptr},
                            {"pc.ram", kPageSize, &p1},
                            {"pc.ram", 2 * kPageSize, nullptr},
                            {"pc.ram", 3 * kPageSize, &p2},
                            {"/rom@etc/acpi/tables", 0, &p3},
                            {"/rom@etc/acpi/tables", kPageSize, nullptr}};
  std::string current;
  for (const auto& w : want) {
    SCOPED_TRACE(w.block + " @" + std::to_string(w.offset));
    uint64_t v = r.U64();
    uint64_t flags = v & qemu::kRamFlagMask;
    EXPECT_EQ(v & ~qemu::kRamFlagMask, w.offset);
    if (w.block == current) {
      EXPECT_TRUE(flags & qemu::kRamFlagContinue);
    } else {
      EXPECT_FALSE(flags & qemu::kRamFlagContinue);
      EXPECT_EQ(r.Idstr(), w.block);
      current = w.block;
    }
    if (w.data) {
      EXPECT_EQ(flags & ~qemu::kRamFlagContinue, qemu::kRamFlagPage);
      EXPECT_EQ(r.Bytes(kPageSize), std::string(w.data->begin(), w.data->end()));
    } else {
      EXPECT_EQ(flags & ~qemu::kRamFlagContinue, qemu::kRamFlagZero);
      EXPECT_EQ(r.U8(), 0u);
    }
  }
  EXPECT_EQ(r.U64(), qemu::kRamFlagEos);
  EXPECT_EQ(r.U8(), qemu::kSecFooter);
  EXPECT_EQ(r.U32(), id);
  // END ram
  EXPECT_EQ(r.U8(), qemu::kSecEnd);
  EXPECT_EQ(r.U32(), id);
  EXPECT_EQ(r.U64(), qemu::kRamFlagEos);
  EXPECT_EQ(r.U8(), qemu::kSecFooter);
  EXPECT_EQ(r.U32(), id);
  // Device state as committed, then the empty VMDESCRIPTION.
  EXPECT_EQ(r.Bytes(Blob().size()), Blob());
  EXPECT_EQ(r.U8(), qemu::kSecVmDescription);
  EXPECT_EQ(r.U32(), 0u);
  EXPECT_EQ(r.pos, out->size());
}

TEST(Restore, AllZeroStoreUsesZeroRecords) {
  std::string dir = TempDir();
  const uint64_t n = 300;
  auto c = PageStore::Create(dir, {{"pc.ram", n * kPageSize}});
  ASSERT_TRUE(c.ok());
  // Zero pages over holes and explicit zeros over written pages.
  auto p = Pattern(9);
  ASSERT_TRUE((*c)->ApplyPage(0, 7 * kPageSize, p.data()).ok());
  ASSERT_TRUE((*c)->ApplyPage(0, 7 * kPageSize, nullptr).ok());
  ASSERT_TRUE((*c)->CompleteInitialSync(Blob()).ok());
  RestoreStats rs;
  auto out = RestoreStreamToString(**c, qemu::MakeConfigurationSection("pc"), &rs);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(rs.pages, 0u);
  EXPECT_EQ(rs.zero_pages, n);
  // header 8 + config (5+2) + START (1+4+1+3+4+4+8+1+6+8) + first record (8+1+6+1)
  // + (n-1) records (8+1) + EOS/footer (8+5) + END (5+8+5) + blob + VMDESCRIPTION (5).
  size_t expect = 8 + 7 + 40 + 16 + (n - 1) * 9 + 13 + 18 + Blob().size() + 5;
  EXPECT_EQ(out->size(), expect);
}

TEST(Restore, FdStreamMatchesStringAndIsChunked) {
  std::string dir = TempDir();
  // Larger than a chunk so the stream is flushed several times.
  const uint64_t n = 3 * (kRestoreChunk / kPageSize) / 2;
  auto c = PageStore::Create(dir, {{"pc.ram", n * kPageSize}, {"vga.vram", 16 * kPageSize}});
  ASSERT_TRUE(c.ok());
  for (uint64_t i = 0; i < n; i += 3) {
    auto p = Pattern(static_cast<uint8_t>(i));
    ASSERT_TRUE((*c)->ApplyPage(0, i * kPageSize, p.data()).ok());
  }
  ASSERT_TRUE((*c)->CompleteInitialSync(Blob()).ok());
  std::string config = qemu::MakeConfigurationSection("pc-q35-7.2");

  size_t chunks = 0, largest = 0;
  std::string joined;
  ASSERT_TRUE(GenerateRestoreStream(**c, config, [&](std::string_view chunk) {
                ++chunks;
                largest = std::max(largest, chunk.size());
                joined.append(chunk);
                return OkStatus();
              }).ok());
  EXPECT_GT(chunks, 2u);
  EXPECT_LE(largest, kRestoreChunk + 2 * kPageSize);

  std::string path = dir + "/restore.bin";
  {
    Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd.valid());
    RestoreStats rs;
    ASSERT_TRUE(WriteRestoreStream(**c, config, fd.get(), &rs).ok());
    EXPECT_EQ(rs.pages, (n + 2) / 3);
    EXPECT_EQ(rs.zero_pages, n - (n + 2) / 3 + 16);
  }
  auto file = ReadFileToString(path);
  ASSERT_TRUE(file.ok());
  EXPECT_TRUE(*file == joined);
  auto str = RestoreStreamToString(**c, config);
  ASSERT_TRUE(str.ok());
  EXPECT_TRUE(*str == joined);
}

TEST(Restore, RefusesWithoutCommittedImage) {
  std::string dir = TempDir();
  auto c = PageStore::Create(dir, {{"pc.ram", 4 * kPageSize}});
  ASSERT_TRUE(c.ok());
  auto r = RestoreStreamToString(**c, qemu::MakeConfigurationSection("pc"));
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("initial sync"), std::string::npos);
  ASSERT_TRUE((*c)->CompleteInitialSync(Blob()).ok());
  EXPECT_EQ(RestoreStreamToString(**c, "not a config").status().code(), Code::kInvalidArgument);
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  ::close(fds[0]);
  ::signal(SIGPIPE, SIG_IGN);
  Status w = WriteRestoreStream(**c, qemu::MakeConfigurationSection("pc"), fds[1]);
  EXPECT_FALSE(w.ok());
  ::close(fds[1]);
}

// Restore by mapping: pc.ram is the restored QEMU's memory-backend-file, so
// the stream lists it but carries only the other block's pages.
TEST(Restore, MappedBlockIsLeftOutOfTheStream) {
  std::string dir = TempDir();
  std::vector<RamBlock> blocks = {{"pc.ram", 4 * kPageSize}, {"vga.vram", 2 * kPageSize}};
  auto c = PageStore::Create(dir, blocks);
  ASSERT_TRUE(c.ok());
  PageStore& s = **c;
  auto p1 = Pattern(1), p2 = Pattern(2);
  ASSERT_TRUE(s.ApplyPage(0, kPageSize, p1.data()).ok());
  ASSERT_TRUE(s.ApplyPage(1, kPageSize, p2.data()).ok());
  ASSERT_TRUE(s.CompleteInitialSync(Blob()).ok());
  EXPECT_EQ(s.BlockPath(0), dir + "/ram-000-pc.ram.img");

  std::string config = qemu::MakeConfigurationSection("pc-i440fx-7.2");
  RestoreStats rs;
  RestoreProgress progress;
  rs.progress = &progress;
  auto out = RestoreStreamToString(s, config, &rs, {true, false});
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(rs.pages, 1u);
  EXPECT_EQ(rs.zero_pages, 1u);
  EXPECT_EQ(rs.mapped_bytes, 4 * kPageSize);
  EXPECT_EQ(progress.ram_total.load(), 2 * kPageSize);  // what is streamed
  EXPECT_EQ(progress.ram_done.load(), 2 * kPageSize);

  Cursor r{*out};
  EXPECT_EQ(r.U32(), qemu::kFileMagic);
  EXPECT_EQ(r.U32(), 3u);
  EXPECT_EQ(r.Bytes(config.size()), config);
  EXPECT_EQ(r.U8(), qemu::kSecStart);
  EXPECT_EQ(r.U32(), kRestoreRamSectionId);
  EXPECT_EQ(r.Idstr(), "ram");
  EXPECT_EQ(r.U32(), 0u);
  EXPECT_EQ(r.U32(), 4u);
  EXPECT_EQ(r.U64(), (6 * kPageSize) | qemu::kRamFlagMemSize);
  EXPECT_EQ(r.Idstr(), "pc.ram");
  EXPECT_EQ(r.U64(), 4 * kPageSize);
  EXPECT_EQ(r.Idstr(), "vga.vram");
  EXPECT_EQ(r.U64(), 2 * kPageSize);
  // Only vga.vram's two pages.
  uint64_t v = r.U64();
  EXPECT_EQ(v & ~qemu::kRamFlagMask, 0u);
  EXPECT_EQ(v & qemu::kRamFlagMask, qemu::kRamFlagZero);
  EXPECT_EQ(r.Idstr(), "vga.vram");
  EXPECT_EQ(r.U8(), 0u);
  v = r.U64();
  EXPECT_EQ(v & ~qemu::kRamFlagMask, kPageSize);
  EXPECT_EQ(v & qemu::kRamFlagMask, qemu::kRamFlagPage | qemu::kRamFlagContinue);
  EXPECT_EQ(r.Bytes(kPageSize), std::string(p2.begin(), p2.end()));
  EXPECT_EQ(r.U64(), qemu::kRamFlagEos);

  // One flag per block, or none.
  EXPECT_EQ(RestoreStreamToString(s, config, nullptr, {true}).status().code(), Code::kInvalidArgument);
  // Nothing mapped: the plain stream, unchanged.
  auto plain = RestoreStreamToString(s, config, nullptr, {false, false});
  auto plain2 = RestoreStreamToString(s, config);
  ASSERT_TRUE(plain.ok() && plain2.ok());
  EXPECT_EQ(*plain, *plain2);
}

}  // namespace
}  // namespace remus
