// Residency of a store's files: the policy names, measurement by cachestat and
// by mincore (which agree, and must not fault anything in), pinning with mlock (survives fadvise DONTNEED,
// comes back after a hole punch or truncate via Refresh, follows a replaced
// file), its error when the memlock limit refuses, and memory admission.
#include "replicator/backup/residency.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <linux/magic.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

bool OnTmpfs(const std::string& dir) {
  struct statfs sf;
  return ::statfs(dir.c_str(), &sf) == 0 && sf.f_type == TMPFS_MAGIC;
}

// A file of len bytes full of data, written with write(2) (so in the page cache).
void WriteDataFile(const std::string& path, uint64_t len) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path;
  std::string chunk(kMiB, 'x');
  for (uint64_t off = 0; off < len; off += chunk.size()) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), len - off));
    ASSERT_EQ(::write(fd, chunk.data(), n), static_cast<ssize_t>(n));
  }
  ::close(fd);
}

// A sparse file of len bytes with its extents reserved, as the page store makes them.
void MakeStoreFile(const std::string& path, uint64_t len) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(len)), 0);
  ASSERT_EQ(::fallocate(fd, 0, 0, static_cast<off_t>(len)), 0);
  ::close(fd);
}

// Writes dirty pages back and asks the kernel to drop the file's page cache.
void DropCache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::fdatasync(fd), 0);
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  ::close(fd);
}

// Bytes of path's pages mapped into this process's mlocked mappings
// ("Locked:" in /proc/self/smaps). fadvise(DONTNEED) leaves mapped pages alone
// whether locked or not, so this is what shows the pin's pages are locked.
uint64_t LockedBytes(const std::string& path) {
  FILE* fp = std::fopen("/proc/self/smaps", "r");
  if (fp == nullptr) return 0;
  uint64_t total = 0;
  bool ours = false;
  char line[4096];
  while (std::fgets(line, sizeof line, fp) != nullptr) {
    std::string l(line);
    if (!l.empty() && l.back() == '\n') l.pop_back();
    if (std::isxdigit(static_cast<unsigned char>(l[0])) && l.find('-') < l.find(' ')) {
      const size_t slash = l.find('/');
      ours = slash != std::string::npos && l.substr(slash) == path;
    } else if (ours && l.rfind("Locked:", 0) == 0) {
      total += std::strtoull(l.c_str() + 7, nullptr, 10) * 1024;
    }
  }
  std::fclose(fp);
  return total;
}

// MeasureResidency both ways (cachestat where the kernel has it, and
// mincore), which must agree to within a page per file; returns mincore's.
// Except on tmpfs, where fallocate allocates pages that stay "not uptodate"
// until touched: cachestat counts them (they hold memory), mincore does not.
ResidentBytes Measure(const std::vector<std::string>& files) {
  auto best = MeasureResidency(files);
  auto mincore = MeasureResidency(files, ResidencyProbe::kMincore);
  EXPECT_TRUE(best.ok()) << best.status().ToString();
  EXPECT_TRUE(mincore.ok()) << mincore.status().ToString();
  if (!best.ok() || !mincore.ok()) return ResidentBytes{};
  EXPECT_EQ(best->total_bytes, mincore->total_bytes);
  const uint64_t a = best->resident_bytes, b = mincore->resident_bytes;
  if (!OnTmpfs(files[0].substr(0, files[0].rfind('/')))) {
    EXPECT_LE(a > b ? a - b : b - a, 4096 * files.size()) << "cachestat " << a << ", mincore " << b;
  }
  return *mincore;
}

// Pins files, or skips the test when an unprivileged run's RLIMIT_MEMLOCK is
// too small for it (CI runs as root, where it never is).
#define PIN_OR_SKIP(var, files)                                                          \
  auto var##_or = ResidencyPin::Pin(files);                                             \
  if (!var##_or.ok() && var##_or.status().code() == Code::kResourceExhausted &&        \
      ::geteuid() != 0)                                                                  \
    GTEST_SKIP() << "RLIMIT_MEMLOCK too small as non-root: " << var##_or.status().ToString(); \
  ASSERT_TRUE(var##_or.ok()) << var##_or.status().ToString();                           \
  std::unique_ptr<ResidencyPin> var = std::move(var##_or).value()

TEST(Residency, NamesRoundTrip) {
  for (Residency r : {Residency::kHot, Residency::kPaged}) {
    auto p = ParseResidency(ResidencyName(r));
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    EXPECT_EQ(*p, r);
  }
  EXPECT_EQ(ResidencyName(Residency::kHot), "hot");
  EXPECT_EQ(ResidencyName(Residency::kPaged), "paged");
}

TEST(Residency, ParseRejectsAnythingElse) {
  for (const char* bad : {"", "HOT", "hot ", "cold", "pinned"}) {
    auto p = ParseResidency(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), Code::kInvalidArgument);
    EXPECT_NE(p.status().message().find("\"hot\" or \"paged\""), std::string::npos) << p.status().message();
  }
}

// A file just written is resident; after fdatasync + DONTNEED on a disk
// filesystem it mostly is not. Totals are exact, partial last page included.
TEST(MeasureResidency, WrittenFileIsResidentUntilDropped) {
  testing::TempDir t("remus-residency");
  const std::string a = t.file("ram-000-pc.ram.img"), b = t.file("ram-001-rom.img"), e = t.file("empty.img");
  WriteDataFile(a, 16 * kMiB);
  WriteDataFile(b, 4 * kMiB + 100);
  WriteDataFile(e, 0);
  ResidentBytes r = Measure({a, b, e});
  EXPECT_EQ(r.total_bytes, 20 * kMiB + 100);
  EXPECT_LE(r.resident_bytes, r.total_bytes);
  EXPECT_GE(r.resident_bytes, r.total_bytes * 9 / 10);  // just written: in the cache
  DropCache(a);
  DropCache(b);
  r = Measure({a, b, e});
  EXPECT_EQ(r.total_bytes, 20 * kMiB + 100);
  if (OnTmpfs(t.path())) GTEST_SKIP() << t.path() << " is tmpfs: DONTNEED drops nothing there";
  EXPECT_LT(r.resident_bytes, r.total_bytes / 2);
}

// Measuring faults nothing in: a fresh store file stays as it was.
TEST(MeasureResidency, DoesNotFaultPagesIn) {
  testing::TempDir t("remus-residency");
  const std::string f = t.file("ram-000-pc.ram.img");
  MakeStoreFile(f, 64 * kMiB);
  ResidentBytes r1 = Measure({f});
  ResidentBytes r2 = Measure({f});
  EXPECT_EQ(r1.total_bytes, 64 * kMiB);
  EXPECT_EQ(r2.resident_bytes, r1.resident_bytes);
  // tmpfs allocates its pages at fallocate; a disk filesystem only reserves extents.
  if (!OnTmpfs(t.path())) {
    EXPECT_EQ(r1.resident_bytes, 0u);
  }
}

TEST(MeasureResidency, MissingFileIsNotFound) {
  testing::TempDir t("remus-residency");
  for (ResidencyProbe probe : {ResidencyProbe::kBest, ResidencyProbe::kMincore}) {
    auto r = MeasureResidency({t.file("nope.img")}, probe);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Code::kNotFound);
    EXPECT_NE(r.status().message().find("nope.img"), std::string::npos);
  }
}

// A pinned sparse store is all resident, stays so through DONTNEED, and is
// reclaimable again once the pin is gone.
TEST(ResidencyPin, PinsSparseStoreAgainstDontneed) {
  testing::TempDir t("remus-residency");
  const std::string f = t.file("ram-000-pc.ram.img"), e = t.file("ram-001-empty.img");
  MakeStoreFile(f, 64 * kMiB);
  WriteDataFile(e, 0);
  {
    PIN_OR_SKIP(pin, (std::vector<std::string>{f, e}));
    EXPECT_EQ(pin->locked_bytes(), 64 * kMiB);
    EXPECT_EQ(LockedBytes(f), 64 * kMiB);
    ResidentBytes r = Measure({f});
    EXPECT_EQ(r.total_bytes, 64 * kMiB);
    EXPECT_EQ(r.resident_bytes, 64 * kMiB);
    DropCache(f);
    r = Measure({f});
    EXPECT_EQ(r.resident_bytes, 64 * kMiB) << "locked pages were dropped";
  }
  EXPECT_EQ(LockedBytes(f), 0u);
  DropCache(f);
  ResidentBytes r = Measure({f});
  if (OnTmpfs(t.path())) GTEST_SKIP() << t.path() << " is tmpfs: DONTNEED drops nothing there";
  EXPECT_LT(r.resident_bytes, r.total_bytes / 2);
}

// A hole punch (and the store's truncate-and-regrow at a new initial sync)
// drops locked pages; Refresh brings them back, locked.
TEST(ResidencyPin, RefreshAfterPunchHoleAndTruncate) {
  testing::TempDir t("remus-residency");
  const std::string f = t.file("ram-000-pc.ram.img");
  MakeStoreFile(f, 64 * kMiB);
  PIN_OR_SKIP(pin, std::vector<std::string>{f});
  ASSERT_EQ(Measure({f}).resident_bytes, 64 * kMiB);

  int fd = ::open(f.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 32 * kMiB), 0);
  EXPECT_LE(Measure({f}).resident_bytes, 32 * kMiB);
  EXPECT_LE(LockedBytes(f), 32 * kMiB);
  ASSERT_TRUE(pin->Refresh().ok());
  EXPECT_EQ(pin->locked_bytes(), 64 * kMiB);
  EXPECT_EQ(LockedBytes(f), 64 * kMiB);
  EXPECT_EQ(Measure({f}).resident_bytes, 64 * kMiB);
  DropCache(f);
  EXPECT_EQ(Measure({f}).resident_bytes, 64 * kMiB) << "refreshed pages are not locked";

  // What PageStore::BeginInitialSync does to its files.
  ASSERT_EQ(::ftruncate(fd, 0), 0);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(64 * kMiB)), 0);
  ASSERT_EQ(::fallocate(fd, 0, 0, static_cast<off_t>(64 * kMiB)), 0);
  EXPECT_EQ(Measure({f}).resident_bytes, 0u);
  EXPECT_EQ(LockedBytes(f), 0u);
  ASSERT_TRUE(pin->Refresh().ok());
  EXPECT_EQ(LockedBytes(f), 64 * kMiB);
  EXPECT_EQ(Measure({f}).resident_bytes, 64 * kMiB);
  DropCache(f);
  EXPECT_EQ(Measure({f}).resident_bytes, 64 * kMiB) << "refreshed pages are not locked";
  ::close(fd);
}

// A file replaced at its path (another inode, another size) is pinned afresh
// by Refresh instead of the deleted one staying locked.
TEST(ResidencyPin, RefreshFollowsReplacedFile) {
  testing::TempDir t("remus-residency");
  const std::string f = t.file("ram-000-pc.ram.img"), g = t.file("new.img");
  MakeStoreFile(f, 16 * kMiB);
  PIN_OR_SKIP(pin, std::vector<std::string>{f});
  EXPECT_EQ(pin->locked_bytes(), 16 * kMiB);
  MakeStoreFile(g, 32 * kMiB);
  ASSERT_EQ(::rename(g.c_str(), f.c_str()), 0);
  EXPECT_EQ(LockedBytes(f + " (deleted)"), 16 * kMiB);
  ASSERT_TRUE(pin->Refresh().ok());
  EXPECT_EQ(pin->locked_bytes(), 32 * kMiB);
  EXPECT_EQ(LockedBytes(f), 32 * kMiB);
  EXPECT_EQ(LockedBytes(f + " (deleted)"), 0u);  // the old file is not kept locked
  DropCache(f);
  ResidentBytes r = Measure({f});
  EXPECT_EQ(r.total_bytes, 32 * kMiB);
  EXPECT_EQ(r.resident_bytes, 32 * kMiB);
}

TEST(ResidencyPin, MissingFileIsNotFound) {
  testing::TempDir t("remus-residency");
  auto p = ResidencyPin::Pin({t.file("nope.img")});
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), Code::kNotFound);
}

// Drops CAP_IPC_LOCK from this (child) process, so RLIMIT_MEMLOCK applies even as root.
bool DropIpcLock() {
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capget, &hdr, data) != 0) return false;
  data[0].effective &= ~(1u << CAP_IPC_LOCK);
  data[0].permitted &= ~(1u << CAP_IPC_LOCK);
  return ::syscall(SYS_capset, &hdr, data) == 0;
}

// In a child: gives up CAP_IPC_LOCK, lowers RLIMIT_MEMLOCK to 1 MiB and pins
// the 64 MiB file f. 0 if Pin failed with the error a person can act on.
int PinUnderLowMemlockLimit(const std::string& f) {
  struct rlimit rl = {kMiB, kMiB};
  if (!DropIpcLock() || ::setrlimit(RLIMIT_MEMLOCK, &rl) != 0) {
    std::fprintf(stderr, "setup failed\n");
    return 2;
  }
  auto p = ResidencyPin::Pin({f});
  if (p.ok()) {
    std::fprintf(stderr, "pinned despite the limit\n");
    return 3;
  }
  const std::string& m = p.status().message();
  std::fprintf(stderr, "%s\n", p.status().ToString().c_str());
  const bool good = p.status().code() == Code::kResourceExhausted &&
                    m.find("67108864 bytes (64 MiB)") != std::string::npos &&
                    m.find("RLIMIT_MEMLOCK is 1048576 bytes") != std::string::npos &&
                    m.find("CAP_IPC_LOCK") != std::string::npos &&
                    m.find("--residency paged") != std::string::npos;
  return good ? 0 : 4;
}

// When the memlock limit refuses, the error says how much, the limit and
// what to do, and nothing stays locked. Runs in a child (death test) that
// gives up CAP_IPC_LOCK and lowers its limit to 1 MiB.
TEST(ResidencyPin, MemlockLimitIsResourceExhaustedWithAFix) {
  testing::TempDir t("remus-residency");
  const std::string f = t.file("ram-000-pc.ram.img");
  MakeStoreFile(f, 64 * kMiB);
  EXPECT_EXIT(std::_Exit(PinUnderLowMemlockLimit(f)), ::testing::ExitedWithCode(0), "");
}

TEST(MemInfo, ParsesMemTotalAndMemAvailable) {
  testing::TempDir t("remus-residency");
  const std::string p = t.file("meminfo");
  FILE* fp = std::fopen(p.c_str(), "w");
  ASSERT_NE(fp, nullptr);
  std::fputs(
      "MemTotal:       24683784 kB\n"
      "MemFree:        22000000 kB\n"
      "MemAvailable:   23000000 kB\n"
      "HugePages_Total:       0\n"
      "Hugepagesize:       2048 kB\n",
      fp);
  std::fclose(fp);
  auto mi = ReadMemInfo(p);
  ASSERT_TRUE(mi.ok()) << mi.status().ToString();
  EXPECT_EQ(mi->mem_total, 24683784ull * 1024);
  EXPECT_EQ(mi->mem_available, 23000000ull * 1024);
}

TEST(MemInfo, MissingOrMalformedFieldsAreErrors) {
  testing::TempDir t("remus-residency");
  auto with = [&](const std::string& text) {
    const std::string p = t.file("meminfo");
    FILE* fp = std::fopen(p.c_str(), "w");
    std::fputs(text.c_str(), fp);
    std::fclose(fp);
    return ReadMemInfo(p);
  };
  auto r = with("MemTotal:       24683784 kB\nMemFree:        22000000 kB\n");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_NE(r.status().message().find("MemAvailable"), std::string::npos) << r.status().message();
  r = with("MemAvailable:   23000000 kB\n");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("MemTotal"), std::string::npos) << r.status().message();
  r = with("MemTotal:       lots kB\nMemAvailable:   23000000 kB\n");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  r = with("MemTotal:       24683784 MB\nMemAvailable:   23000000 kB\n");
  ASSERT_FALSE(r.ok());
  r = with("MemTotal:       99999999999999999999 kB\nMemAvailable:   1 kB\n");
  ASSERT_FALSE(r.ok());
  r = ReadMemInfo(t.file("absent"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
}

TEST(MemInfo, ReadsProcMeminfo) {
  auto mi = ReadMemInfo();
  ASSERT_TRUE(mi.ok()) << mi.status().ToString();
  EXPECT_GT(mi->mem_total, 64 * kMiB);
  EXPECT_GT(mi->mem_available, 0u);
  EXPECT_LE(mi->mem_available, mi->mem_total);
}

TEST(HotAdmission, FitsWhenAvailableCoversStoreAndHeadroom) {
  MemInfo mi{32 * kGiB, 10 * kGiB};
  EXPECT_TRUE(CheckHotAdmission(8 * kGiB, 0, mi, 2 * kGiB).ok());   // exactly enough
  EXPECT_TRUE(CheckHotAdmission(4 * kGiB, 4 * kGiB, mi, 1 * kGiB).ok());
  EXPECT_TRUE(CheckHotAdmission(0, 0, mi, 0).ok());
}

TEST(HotAdmission, RefusesWithOneSentenceThatSaysWhatToDo) {
  MemInfo mi{32 * kGiB, 6 * kGiB};
  Status s = CheckHotAdmission(8 * kGiB, 0, mi, 1 * kGiB);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kResourceExhausted);
  const std::string& m = s.message();
  EXPECT_NE(m.find("8.0 GiB"), std::string::npos) << m;
  EXPECT_NE(m.find("1.0 GiB headroom"), std::string::npos) << m;
  EXPECT_NE(m.find("MemAvailable is only 6.0 GiB"), std::string::npos) << m;
  EXPECT_NE(m.find("--residency paged, or free memory"), std::string::npos) << m;
  EXPECT_EQ(m.find("already admitted"), std::string::npos) << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  // One more byte than there is.
  EXPECT_FALSE(CheckHotAdmission(8 * kGiB + 1, 0, MemInfo{32 * kGiB, 9 * kGiB}, 1 * kGiB).ok());
}

TEST(HotAdmission, PendingPinsCountAndNothingOverflows) {
  MemInfo mi{32 * kGiB, 10 * kGiB};
  Status s = CheckHotAdmission(6 * kGiB, 3 * kGiB, mi, 2 * kGiB);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("3.0 GiB already admitted for hot stores still being locked"), std::string::npos)
      << s.message();
  EXPECT_FALSE(CheckHotAdmission(~0ull, ~0ull, MemInfo{~0ull, ~0ull - 1}, ~0ull).ok());
  EXPECT_FALSE(CheckHotAdmission(2, ~0ull, MemInfo{~0ull, ~0ull - 1}, 0).ok());
}

}  // namespace
}  // namespace remus
