// The io_uring FileIo on real files, and the journal on top of it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <random>

#include "diskmirror/file_io.h"
#include "diskmirror/journal.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

std::string TempDir() { return remus::testing::MakeTempDir("diskmirror"); }

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::vector<uint8_t> v;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return v;
  struct stat st {};
  ::fstat(fd, &st);
  v.resize(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < v.size()) {
    ssize_t r = ::pread(fd, v.data() + done, v.size() - done, static_cast<off_t>(done));
    if (r <= 0) break;
    done += static_cast<size_t>(r);
  }
  ::close(fd);
  return v;
}

class UringFileIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto io = NewUringFileIo(8);
    if (!io.ok()) GTEST_SKIP() << io.status().message();
    io_ = std::move(io).value();
    dir_ = TempDir();
  }
  std::unique_ptr<FileIo> io_;
  std::string dir_;
};

TEST_F(UringFileIoTest, WriteReadSyncTruncateZeroDiscard) {
  auto f = io_->Open(dir_ + "/f", true);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::vector<uint8_t> a(10000, 0xab);
  ASSERT_TRUE((*f)->Write(0, a).ok());
  ASSERT_TRUE((*f)->Sync().ok());
  EXPECT_EQ(*(*f)->Size(), 10000u);
  std::vector<uint8_t> back(20000);
  auto n = (*f)->Read(0, back);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 10000u) << "short only at end of file";
  EXPECT_TRUE(std::equal(a.begin(), a.end(), back.begin()));

  ASSERT_TRUE((*f)->Zero(100, 200).ok());
  ASSERT_TRUE((*f)->Discard(4096, 4096).ok());
  ASSERT_TRUE((*f)->Zero(9990, 1000).ok()) << "keeps the size";
  EXPECT_EQ(*(*f)->Size(), 10000u);
  auto v = ReadAll(dir_ + "/f");
  for (size_t i = 0; i < v.size(); ++i) {
    bool zero = (i >= 100 && i < 300) || (i >= 4096 && i < 8192) || i >= 9990;
    ASSERT_EQ(v[i], zero ? 0 : 0xab) << "byte " << i;
  }
  ASSERT_TRUE((*f)->Truncate(50).ok());
  EXPECT_EQ(*(*f)->Size(), 50u);
  EXPECT_EQ(io_->Open(dir_ + "/missing", false).status().code(), Code::kNotFound);
  EXPECT_TRUE(io_->SyncDir(dir_).ok());
}

TEST_F(UringFileIoTest, ManyWritesBeyondTheRingDepthInOneBatch) {
  auto f = io_->Open(dir_ + "/batch", true);
  ASSERT_TRUE(f.ok());
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<WriteOp> ops;
  for (int i = 0; i < 500; ++i) bufs.emplace_back(4096, static_cast<uint8_t>(i));
  for (int i = 0; i < 500; ++i) ops.push_back({static_cast<uint64_t>(499 - i) * 4096, bufs[i]});
  ASSERT_TRUE((*f)->Write(ops).ok());
  auto v = ReadAll(dir_ + "/batch");
  ASSERT_EQ(v.size(), 500u * 4096);
  for (int i = 0; i < 500; ++i) ASSERT_EQ(v[static_cast<size_t>(499 - i) * 4096 + 7], static_cast<uint8_t>(i));
}

TEST_F(UringFileIoTest, JournalOnRealFilesSplitsBigWritesAndSurvivesReopen) {
  const uint64_t disk = 40ull << 20;
  const std::string img = dir_ + "/vda.img", jpath = dir_ + "/vda.journal";
  {
    auto f = io_->Open(img, true);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Truncate(disk).ok());
  }
  std::vector<uint8_t> big((33u << 20) + 123);
  std::mt19937 rng(1);
  for (auto& b : big) b = static_cast<uint8_t>(rng());
  std::vector<uint8_t> small(4096, 0x5a);
  {
    auto j = Journal::Open(io_.get(), jpath, JournalOptions{disk, "vda", 1 << 20, std::nullopt});
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    ASSERT_TRUE((*j)->AppendWrite(1, 1000, big).ok()) << "split into two records";
    ASSERT_TRUE((*j)->Commit(1).ok());
    ASSERT_TRUE((*j)->AppendWrite(2, 0, small).ok());
    ASSERT_TRUE((*j)->AppendZero(2, 2000, 1000).ok());
    ASSERT_TRUE((*j)->Commit(2).ok());
  }
  // Reopen (as after a crash of the daemon: everything committed was synced).
  auto j = Journal::Open(io_.get(), jpath, JournalOptions{disk, "vda", 1 << 20, std::nullopt});
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().committed_pending, (std::vector<uint64_t>{1, 2}));
  auto image = io_->Open(img, false);
  ASSERT_TRUE(image.ok());
  ASSERT_TRUE((*j)->ApplyCommitted(image->get()).ok());
  auto v = ReadAll(img);
  ASSERT_EQ(v.size(), disk);
  std::vector<uint8_t> want(disk, 0);
  std::copy(big.begin(), big.end(), want.begin() + 1000);
  std::copy(small.begin(), small.end(), want.begin());
  std::fill(want.begin() + 2000, want.begin() + 3000, 0);
  EXPECT_TRUE(v == want);
  EXPECT_EQ(ReadAll(jpath).size(), journal::kDataStart) << "truncated after the apply";
}

}  // namespace
}  // namespace remus
