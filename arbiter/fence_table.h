// The fence watchdog's table: deadlines shared between remusd and
// remus-fence, a separate process that stops (SIGSTOP) a guest's QEMU when
// its lease deadline passes, whatever remusd is doing (docs/architecture.md,
// "Arbitration", fence watchdog).
//
// Why a second process: remusd's own watchdog thread fences at the deadline,
// but a remusd that is frozen (SIGSTOP, a stalled page fault, a hung disk)
// fences nothing, and its QEMU, a separate process, runs on. The lease then
// expires in etcd and a backup promotes: two running copies. sanlock's wdmd
// and VMware FT's loser-kills-itself rule answer the same question. The
// watchdog does one thing, on deadlines remusd wrote before it froze.
//
// The table is a memfd mapped by both, with lock-free atomics per slot (a
// std::atomic that is always lock-free is address-free, so it works across
// processes). remusd owns every transition but one: armed -> fenced, which
// the watchdog makes when it stops a process.
//
//   free --Arm--> armed --deadline passes (watchdog: SIGSTOP)--> fenced
//                   ^  SetDeadline moves it          |
//                   +-------- Rearm (remusd renewed; it sends SIGCONT) --+
//   any --Free--> free
//
// Deadlines are CLOCK_BOOTTIME nanoseconds (BootClock), so a host that
// suspended wakes up past them.
//
// Thread-safety: every method is safe from any thread of either process.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "common/status.h"

namespace remus {

struct FenceSlot {
  enum : int32_t { kFree = 0, kArmed = 1, kFenced = 2, kClaimed = 3 };
  std::atomic<int32_t> state{kFree};
  std::atomic<int32_t> pid{-1};
  std::atomic<uint64_t> pid_start{0};  // /proc/PID/stat start time: a reused pid is never stopped
  std::atomic<int64_t> deadline_ns{0};
  std::atomic<uint64_t> fenced_at_ns{0};
};
static_assert(std::atomic<int32_t>::is_always_lock_free && std::atomic<int64_t>::is_always_lock_free &&
              std::atomic<uint64_t>::is_always_lock_free);

class FenceTable {
 public:
  static constexpr int kSlots = 256;
  static constexpr uint32_t kMagic = 0x52464e43;  // "RFNC"

  // remusd: a new table in a memfd (close-on-exec; pass fd() on purpose).
  static StatusOr<std::unique_ptr<FenceTable>> Create();
  // remus-fence: maps the table remusd created and passed as `fd`.
  static StatusOr<std::unique_ptr<FenceTable>> Map(int fd);
  ~FenceTable();
  FenceTable(const FenceTable&) = delete;
  FenceTable& operator=(const FenceTable&) = delete;

  int fd() const { return fd_; }

  // A slot armed for pid with this deadline; -1 when all are taken.
  int Arm(int pid, uint64_t pid_start, int64_t deadline_ns);
  void SetDeadline(int slot, int64_t deadline_ns);
  // fenced -> armed with a new deadline (set first). Returns false if the
  // slot was not fenced (then only the deadline moved).
  bool Rearm(int slot, int64_t deadline_ns);
  void Free(int slot);
  bool Fenced(int slot) const;

  // The watchdog's pass: every armed slot past its deadline whose process is
  // still the one armed (start_time(pid) == pid_start) is stopped and marked
  // fenced. Returns the number of slots still armed.
  int Enforce(int64_t now_ns, const std::function<uint64_t(int)>& start_time, const std::function<void(int)>& stop);

 private:
  struct Layout;
  FenceTable(int fd, Layout* map) : fd_(fd), map_(map) {}
  FenceSlot& at(int slot) const;

  int fd_;
  Layout* map_;
};

// The CLOCK_BOOTTIME now, in nanoseconds (the table's time scale).
int64_t BootNanos();

}  // namespace remus
