// DiskReplicaSet: the backup's disks across checkpoints, crashes and a disk
// epoch the memory part never committed (FaultyFileIo).
#include "diskmirror/disk_replica.h"

#include <gtest/gtest.h>

#include "diskmirror/faulty_file_io.h"

namespace remus {
namespace {

constexpr uint64_t kSize = 1 << 20;

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

std::string ImageAt(FaultyFileIo& io, const std::string& path, uint64_t off, size_t n) {
  auto c = io.DurableContents(path);
  if (c.size() < off + n) c.resize(off + n);
  return std::string(c.begin() + off, c.begin() + off + n);
}

std::unique_ptr<DiskReplicaSet> OpenSet(FaultyFileIo& io, std::optional<uint64_t> discard_after) {
  auto s = DiskReplicaSet::Open(&io, "/img", "/store", {{"vda", kSize}, {"vdb", kSize}}, discard_after);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

TEST(DiskReplicaSet, CommittedEpochsReachTheImagesOnApply) {
  FaultyFileIo io;
  auto set = OpenSet(io, std::nullopt);
  ASSERT_TRUE(set);
  EXPECT_EQ(set->ImagePath(1), "/img/vdb.img");
  ASSERT_TRUE(set->Write(0, 1, 4096, Bytes(std::string(4096, 'a'))).ok());
  ASSERT_TRUE(set->Write(1, 1, 0, Bytes(std::string(512, 'b'))).ok());
  ASSERT_TRUE(set->Commit(1).ok());
  ASSERT_TRUE(set->Write(0, 2, 4096, Bytes(std::string(4096, 'c'))).ok());  // not committed
  EXPECT_EQ(ImageAt(io, "/img/vda.img", 4096, 1), std::string(1, '\0'));  // not applied yet
  ASSERT_TRUE(set->ApplyAll().ok());
  EXPECT_EQ(ImageAt(io, "/img/vda.img", 4096, 4096), std::string(4096, 'a'));
  EXPECT_EQ(ImageAt(io, "/img/vdb.img", 0, 512), std::string(512, 'b'));
  EXPECT_EQ(set->last_committed(), 1u);
}

TEST(DiskReplicaSet, OutOfRangeWritesAreRefused) {
  FaultyFileIo io;
  auto set = OpenSet(io, std::nullopt);
  ASSERT_TRUE(set);
  EXPECT_EQ(set->Write(2, 1, 0, Bytes("x")).code(), Code::kOutOfRange);
  EXPECT_EQ(set->Write(0, 1, kSize - 1, Bytes("xy")).code(), Code::kOutOfRange);
  EXPECT_EQ(set->Zero(0, 1, kSize, 1).code(), Code::kOutOfRange);
  EXPECT_EQ(set->Trim(0, 1, ~0ull, 2).code(), Code::kOutOfRange);
}

// The disk part of epoch 2 committed, then the host died before the memory
// part did: recovery with discard_after 1 leaves the image at epoch 1.
TEST(DiskReplicaSet, RecoveryDropsDiskEpochsTheMemoryNeverCommitted) {
  FaultyFileIo io;
  {
    auto set = OpenSet(io, std::nullopt);
    ASSERT_TRUE(set);
    ASSERT_TRUE(set->Write(0, 1, 0, Bytes(std::string(4096, '1'))).ok());
    ASSERT_TRUE(set->Commit(1).ok());
    ASSERT_TRUE(set->Write(0, 2, 0, Bytes(std::string(4096, '2'))).ok());
    ASSERT_TRUE(set->Commit(2).ok());
  }
  io.Crash();
  auto set = OpenSet(io, 1);
  ASSERT_TRUE(set);
  ASSERT_TRUE(set->ApplyAll().ok());
  EXPECT_EQ(ImageAt(io, "/img/vda.img", 0, 4096), std::string(4096, '1'));
  // ... and with the memory at epoch 2 both are there.
  FaultyFileIo io2;
  {
    auto s2 = OpenSet(io2, std::nullopt);
    ASSERT_TRUE(s2);
    ASSERT_TRUE(s2->Write(0, 1, 0, Bytes(std::string(4096, '1'))).ok());
    ASSERT_TRUE(s2->Commit(1).ok());
    ASSERT_TRUE(s2->Write(0, 2, 0, Bytes(std::string(4096, '2'))).ok());
    ASSERT_TRUE(s2->Commit(2).ok());
  }
  io2.Crash();
  auto again = OpenSet(io2, 2);
  ASSERT_TRUE(again);
  ASSERT_TRUE(again->ApplyAll().ok());
  EXPECT_EQ(ImageAt(io2, "/img/vda.img", 0, 4096), std::string(4096, '2'));
}

TEST(DiskReplicaSet, AFullDiskFailsTheCommitSoNothingIsAcked) {
  FaultyFileIo io;
  auto set = OpenSet(io, std::nullopt);
  ASSERT_TRUE(set);
  io.SetSpaceLeft(0);
  // The append is buffered in memory (OK) or already hits the full disk; the
  // commit cannot succeed either way.
  Status w = set->Write(0, 1, 0, Bytes(std::string(65536, 'z')));
  EXPECT_TRUE(w.ok() || w.code() == Code::kResourceExhausted) << w.ToString();
  Status c = set->Commit(1);
  EXPECT_EQ(c.code(), Code::kResourceExhausted) << c.ToString();
  EXPECT_NE(c.message().find("vda"), std::string::npos) << c.ToString();
}

}  // namespace
}  // namespace remus
