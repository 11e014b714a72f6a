#include "replicator/backup/residency.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>

#include "common/io.h"
#include "common/log.h"

namespace remus {
namespace {

constexpr char kTag[] = "residency";
// mincore window: 1 GiB is a 256 KiB vector with 4 KiB pages.
constexpr uint64_t kWindow = 1ull << 30;

uint64_t PageSize() {
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

// "8.0 GiB", "64 MiB", "512 bytes": for messages a person reads.
std::string HumanBytes(uint64_t b) {
  char buf[64];
  if (b >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(b) / (1ull << 30));
  else if (b >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.0f MiB", static_cast<double>(b) / (1ull << 20));
  else
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(b));
  return buf;
}

uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max() : a + b;
}

std::string MemlockLimit() {
  struct rlimit rl;
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) < 0) return "unknown";
  if (rl.rlim_cur == RLIM_INFINITY) return "unlimited";
  return std::to_string(static_cast<unsigned long long>(rl.rlim_cur)) + " bytes";
}

// mlock(2) and munlock(2) as raw system calls: the sanitizers' runtimes
// intercept the libc wrappers and turn them into no-ops, which would make a
// sanitized remusd (and these tests) believe a store is locked when it is not.
int Mlock(const void* addr, uint64_t len) { return static_cast<int>(::syscall(SYS_mlock, addr, len)); }
int Munlock(const void* addr, uint64_t len) { return static_cast<int>(::syscall(SYS_munlock, addr, len)); }

// The mlock failure a person can act on (limit or memory), as one sentence.
Status LockError(int err, const std::string& path, uint64_t total_bytes) {
  if (err != ENOMEM && err != EPERM && err != EAGAIN) return ErrnoStatus("mlock " + path, err);
  return ResourceExhausted("hot residency could not lock the store's " + std::to_string(total_bytes) +
                           " bytes (" + HumanBytes(total_bytes) + ") in memory (mlock " + path + ": " +
                           std::strerror(err) + "; RLIMIT_MEMLOCK is " + MemlockLimit() +
                           "): run remusd as root or with CAP_IPC_LOCK, or raise RLIMIT_MEMLOCK "
                           "(systemd LimitMEMLOCK=infinity), or free memory, or protect the domain "
                           "with --residency paged");
}

}  // namespace

StatusOr<Residency> ParseResidency(std::string_view s) {
  if (s == "hot") return Residency::kHot;
  if (s == "paged") return Residency::kPaged;
  return InvalidArgument("residency \"" + std::string(s) + "\": expected \"hot\" or \"paged\"");
}

std::string_view ResidencyName(Residency r) { return r == Residency::kHot ? "hot" : "paged"; }

namespace {

// cachestat(2) (Linux 6.5); the number is the same on every architecture.
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct CachestatRange {
  uint64_t off;
  uint64_t len;
};
struct Cachestat {
  uint64_t nr_cache;
  uint64_t nr_dirty;
  uint64_t nr_writeback;
  uint64_t nr_evicted;
  uint64_t nr_recently_evicted;
};
// Cleared the first time the kernel says it has no cachestat.
std::atomic<bool> cachestat_works{true};

// Resident bytes of the first len bytes of fd by cachestat, or nullopt when
// it is unavailable. Counts whole pages, so a resident partial last page
// counts as len's remainder only when every page is resident (capped at len).
std::optional<uint64_t> ResidentByCachestat(int fd, uint64_t len) {
  if (!cachestat_works.load(std::memory_order_relaxed)) return std::nullopt;
  CachestatRange range{0, len};
  Cachestat cs{};
  if (::syscall(__NR_cachestat, fd, &range, &cs, 0) != 0) {
    // ENOSYS: older kernel. EPERM: a seccomp filter that does not know it,
    // or a file we neither own nor may write. mincore then answers.
    if (errno == ENOSYS) cachestat_works.store(false, std::memory_order_relaxed);
    return std::nullopt;
  }
  return std::min(cs.nr_cache * PageSize(), len);
}

// Resident bytes of the first len bytes of fd by mincore over a read-only
// shared mapping, kWindow at a time. Mapping alone faults nothing in.
StatusOr<uint64_t> ResidentByMincore(int fd, uint64_t len, const std::string& path) {
  const uint64_t page = PageSize();
  void* a = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
  if (a == MAP_FAILED) return ErrnoStatus("mmap " + path, errno);
  uint8_t* base = static_cast<uint8_t*>(a);
  std::vector<unsigned char> vec;
  uint64_t out = 0;
  Status st;
  for (uint64_t off = 0; off < len; off += kWindow) {
    const uint64_t n = std::min(kWindow, len - off);
    const size_t pages = static_cast<size_t>((n + page - 1) / page);
    vec.resize(pages);
    if (::mincore(base + off, n, vec.data()) < 0) {
      st = ErrnoStatus("mincore " + path, errno);
      break;
    }
    uint64_t resident = 0;
    for (unsigned char v : vec) resident += v & 1;
    uint64_t bytes = resident * page;
    // The file's last page may be partial: count only the bytes it has.
    if (vec.back() & 1) bytes -= pages * page - n;
    out += bytes;
  }
  ::munmap(a, len);
  RETURN_IF_ERROR(st);
  return out;
}

}  // namespace

StatusOr<ResidentBytes> MeasureResidency(const std::vector<std::string>& files, ResidencyProbe probe) {
  ResidentBytes out;
  for (const std::string& path : files) {
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) return ErrnoStatus("open " + path, errno);
    struct stat st;
    if (::fstat(fd.get(), &st) < 0) return ErrnoStatus("fstat " + path, errno);
    const uint64_t len = static_cast<uint64_t>(st.st_size);
    out.total_bytes += len;
    if (len == 0) continue;
    std::optional<uint64_t> resident;
    if (probe == ResidencyProbe::kBest) resident = ResidentByCachestat(fd.get(), len);
    if (!resident) {
      ASSIGN_OR_RETURN(resident, ResidentByMincore(fd.get(), len, path));
    }
    out.resident_bytes += *resident;
  }
  return out;
}

StatusOr<std::unique_ptr<ResidencyPin>> ResidencyPin::Pin(const std::vector<std::string>& files) {
  const auto start = std::chrono::steady_clock::now();
  std::unique_ptr<ResidencyPin> pin(new ResidencyPin());
  pin->maps_.resize(files.size());
  // Map everything first, so an error names the whole store's size.
  uint64_t total = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    pin->maps_[i].path = files[i];
    RETURN_IF_ERROR(Map(pin->maps_[i]));  // on error ~ResidencyPin unmaps the rest
    total += pin->maps_[i].len;
  }
  for (Mapping& m : pin->maps_) RETURN_IF_ERROR(pin->Lock(m, total));
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
  LOG_INFO(kTag) << "locked " << HumanBytes(pin->locked_bytes()) << " in " << files.size() << " files in "
                 << ms.count() << " ms";
  return pin;
}

ResidencyPin::~ResidencyPin() {
  for (Mapping& m : maps_) Unmap(m);
}

Status ResidencyPin::Map(Mapping& m) {
  Fd fd(::open(m.path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open " + m.path, errno);
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) return ErrnoStatus("fstat " + m.path, errno);
  m.dev = static_cast<uint64_t>(st.st_dev);
  m.ino = static_cast<uint64_t>(st.st_ino);
  m.len = static_cast<uint64_t>(st.st_size);
  if (m.len == 0) return OkStatus();
  // The mapping keeps the file referenced; the fd is not needed after this.
  void* a = ::mmap(nullptr, m.len, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (a == MAP_FAILED) {
    m.len = 0;
    return ErrnoStatus("mmap " + m.path, errno);
  }
  m.addr = a;
  return OkStatus();
}

void ResidencyPin::Unmap(Mapping& m) {
  if (m.addr != nullptr) {
    Munlock(m.addr, m.len);
    ::munmap(m.addr, m.len);
  }
  m.addr = nullptr;
  m.len = 0;
  m.locked = false;
}

Status ResidencyPin::Lock(Mapping& m, uint64_t total_bytes) {
  if (m.addr == nullptr) return OkStatus();
  // mlock faults in (populates) every page of the range that is not mapped,
  // also when the range is locked already: that is how Refresh brings back
  // pages a truncate or hole punch dropped, without an unlocked window.
  if (Mlock(m.addr, m.len) < 0) {
    const int err = errno;
    // A first lock may have locked part of the range: undo it. A mapping
    // locked before stays so (what is mapped stays locked).
    if (!m.locked) Munlock(m.addr, m.len);
    return LockError(err, m.path, total_bytes);
  }
  if (!m.locked) locked_bytes_ += m.len;
  m.locked = true;
  return OkStatus();
}

Status ResidencyPin::Refresh() {
  uint64_t total = 0;
  for (Mapping& m : maps_) {
    struct stat st;
    if (::stat(m.path.c_str(), &st) < 0) return ErrnoStatus("stat " + m.path, errno);
    if (static_cast<uint64_t>(st.st_dev) != m.dev || static_cast<uint64_t>(st.st_ino) != m.ino ||
        static_cast<uint64_t>(st.st_size) != m.len) {
      // Replaced or resized: the old mapping would pin a deleted file or
      // miss (or fault past) the end of this one.
      if (m.locked) locked_bytes_ -= m.len;
      Unmap(m);
      RETURN_IF_ERROR(Map(m));
    }
    total += m.len;
  }
  for (Mapping& m : maps_) RETURN_IF_ERROR(Lock(m, total));
  return OkStatus();
}

StatusOr<MemInfo> ReadMemInfo(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  MemInfo mi;
  bool have_total = false, have_available = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string_view line(text.data() + pos, eol - pos);
    pos = eol + 1;
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    const std::string_view name = line.substr(0, colon);
    uint64_t* field = name == "MemTotal"       ? &mi.mem_total
                      : name == "MemAvailable" ? &mi.mem_available
                                               : nullptr;
    if (field == nullptr) continue;
    std::string_view rest = line.substr(colon + 1);
    while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\t')) rest.remove_prefix(1);
    uint64_t kb = 0;
    auto [end, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), kb);
    std::string_view unit(end, static_cast<size_t>(rest.data() + rest.size() - end));
    while (!unit.empty() && (unit.front() == ' ' || unit.front() == '\t')) unit.remove_prefix(1);
    while (!unit.empty() && (unit.back() == ' ' || unit.back() == '\r')) unit.remove_suffix(1);
    if (ec != std::errc() || end == rest.data() || unit != "kB" || kb > std::numeric_limits<uint64_t>::max() / 1024)
      return DataLoss(path + ": malformed line \"" + std::string(line) + "\"");
    *field = kb * 1024;
    (name == "MemTotal" ? have_total : have_available) = true;
  }
  if (!have_total) return DataLoss(path + ": no MemTotal line");
  if (!have_available) return DataLoss(path + ": no MemAvailable line (it needs Linux 3.14 or later)");
  return mi;
}

Status CheckHotAdmission(uint64_t store_bytes, uint64_t pending_bytes, const MemInfo& mi,
                         uint64_t headroom_bytes) {
  const uint64_t need = SaturatingAdd(SaturatingAdd(store_bytes, pending_bytes), headroom_bytes);
  if (mi.mem_available >= need) return OkStatus();
  std::string pending;
  if (pending_bytes > 0)
    pending = " with " + HumanBytes(pending_bytes) + " already admitted for hot stores still being locked";
  return ResourceExhausted("hot residency needs the domain's " + HumanBytes(store_bytes) +
                           " resident plus " + HumanBytes(headroom_bytes) + " headroom" + pending +
                           ", but MemAvailable is only " + HumanBytes(mi.mem_available) +
                           ": protect it with --residency paged, or free memory");
}

}  // namespace remus
