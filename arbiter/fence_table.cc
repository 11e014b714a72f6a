#include "arbiter/fence_table.h"

#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <new>

namespace remus {

struct FenceTable::Layout {
  uint32_t magic;
  uint32_t slots;
  FenceSlot slot[kSlots];
};

int64_t BootNanos() {
  timespec ts{};
  ::clock_gettime(CLOCK_BOOTTIME, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

StatusOr<std::unique_ptr<FenceTable>> FenceTable::Create() {
  int fd = ::memfd_create("remus-fence", MFD_CLOEXEC);
  if (fd < 0) return ErrnoStatus("memfd_create for the fence table", errno);
  if (::ftruncate(fd, sizeof(Layout)) != 0) {
    int e = errno;
    ::close(fd);
    return ErrnoStatus("sizing the fence table", e);
  }
  void* p = ::mmap(nullptr, sizeof(Layout), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    ::close(fd);
    return ErrnoStatus("mapping the fence table", e);
  }
  auto* l = new (p) Layout();
  l->magic = kMagic;
  l->slots = kSlots;
  return std::unique_ptr<FenceTable>(new FenceTable(fd, l));
}

StatusOr<std::unique_ptr<FenceTable>> FenceTable::Map(int fd) {
  void* p = ::mmap(nullptr, sizeof(Layout), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return ErrnoStatus("mapping the fence table (fd " + std::to_string(fd) + ")", errno);
  auto* l = static_cast<Layout*>(p);
  if (l->magic != kMagic || l->slots != kSlots) {
    ::munmap(p, sizeof(Layout));
    return InvalidArgument("fd " + std::to_string(fd) + " is not a remus fence table");
  }
  return std::unique_ptr<FenceTable>(new FenceTable(fd, l));
}

FenceTable::~FenceTable() {
  ::munmap(map_, sizeof(Layout));
  ::close(fd_);
}

FenceSlot& FenceTable::at(int slot) const { return map_->slot[slot]; }

int FenceTable::Arm(int pid, uint64_t pid_start, int64_t deadline_ns) {
  for (int i = 0; i < kSlots; i++) {
    FenceSlot& s = at(i);
    int32_t expect = FenceSlot::kFree;
    // Claimed first, so the watchdog never sees a half-written slot armed.
    if (!s.state.compare_exchange_strong(expect, FenceSlot::kClaimed)) continue;
    s.pid = pid;
    s.pid_start = pid_start;
    s.deadline_ns = deadline_ns;
    s.fenced_at_ns = 0;
    s.state = FenceSlot::kArmed;
    return i;
  }
  return -1;
}

void FenceTable::SetDeadline(int slot, int64_t deadline_ns) {
  if (slot >= 0) at(slot).deadline_ns = deadline_ns;
}

bool FenceTable::Rearm(int slot, int64_t deadline_ns) {
  if (slot < 0) return false;
  FenceSlot& s = at(slot);
  s.deadline_ns = deadline_ns;
  int32_t expect = FenceSlot::kFenced;
  return s.state.compare_exchange_strong(expect, FenceSlot::kArmed);
}

void FenceTable::Free(int slot) {
  if (slot >= 0) at(slot).state = FenceSlot::kFree;
}

bool FenceTable::Fenced(int slot) const { return slot >= 0 && at(slot).state == FenceSlot::kFenced; }

int FenceTable::Enforce(int64_t now_ns, const std::function<uint64_t(int)>& start_time,
                        const std::function<void(int)>& stop) {
  int armed = 0;
  for (int i = 0; i < kSlots; i++) {
    FenceSlot& s = at(i);
    if (s.state.load() != FenceSlot::kArmed) continue;
    if (now_ns < s.deadline_ns.load()) {
      armed++;
      continue;
    }
    const int pid = s.pid.load();
    // A deadline that moved meanwhile is re-read after the claim: remusd
    // renews by moving the deadline, and a renewal that arrives now wins.
    int32_t expect = FenceSlot::kArmed;
    if (!s.state.compare_exchange_strong(expect, FenceSlot::kFenced)) continue;
    if (now_ns < s.deadline_ns.load()) {
      expect = FenceSlot::kFenced;
      s.state.compare_exchange_strong(expect, FenceSlot::kArmed);
      armed++;
      continue;
    }
    if (pid > 0 && start_time(pid) == s.pid_start.load()) stop(pid);
    s.fenced_at_ns = static_cast<uint64_t>(now_ns);
  }
  return armed;
}

}  // namespace remus
