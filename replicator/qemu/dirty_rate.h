// Measuring a guest's dirty rate with QEMU's own measurement (QMP
// `calc-dirty-rate`, then `query-dirty-rate` until it says "measured"), for
// `remusctl estimate` (replicator/estimate/estimate.h does the arithmetic).
//
// What QEMU offers, read from qapi/migration.json and migration/dirtyrate.c
// of the two QEMUs we ship (7.2 and 10.0), and checked on them under TCG:
//
//   calc-time        7.2: whole seconds, 1..60. 8.2+ (so 10.0): with
//                    calc-time-unit "millisecond", 50..60000 ms.
//   dirty-bitmap     exact (distinct pages whose dirty bit KVM set in the
//                    window), but only pages harvested from KVM's dirty log
//                    are counted: under TCG it reports 0 whatever the guest
//                    does (measured: 0 MiB/s for a guest dirtying 2000
//                    pages/s). Refused ("mode dirty-bitmap is not enabled")
//                    where KVM's dirty ring is on.
//   page-sampling    an estimate: hashes sample-pages pages per GiB at the
//                    window's start and end. Works under TCG and KVM, reads
//                    guest memory only.
//   result           "dirty-rate" in MiB/s, an integer rounded down: at a
//                    50 ms window one unit is 12.8 pages.
//   refusals         a second measurement while one runs ("the dirty rate is
//                    already being measured"); nothing refuses a measurement
//                    while a migration (COLO) runs. dirty-bitmap then is not
//                    exact either: the checkpoints' own harvests of KVM's log
//                    count too (a page dirtied in two checkpoints of the
//                    window counts twice) and the measurement clears KVM's
//                    dirty log under the COLO engine. So while a migration is
//                    active we use page-sampling, and the protection's own
//                    count of pages per checkpoint is the exact figure.
//
// Thread-safety: DirtyRateMeter is not thread-safe (one measurement at a
// time per QEMU; QEMU refuses a second one anyway). The monitor must outlive
// it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "common/clock.h"
#include "common/status.h"
#include "replicator/qemu/qmp.h"

namespace remus {

inline constexpr int64_t kDirtyRateMinWindowMs = 50;          // QEMU 8.2+, millisecond unit
inline constexpr int64_t kDirtyRateMinWindowSecondsMs = 1000;  // QEMU < 8.2: whole seconds
inline constexpr int kSamplePagesMax = 16384;                 // QEMU's range, per GiB
inline constexpr int kSamplePagesMin = 128;

// What this QEMU's dirty-rate measurement can do (ProbeDirtyRate).
struct DirtyRateSupport {
  std::string version;       // "10.0.13"
  bool millisecond = false;  // calc-time-unit exists (8.2+)
  bool kvm = false;          // query-kvm enabled
  bool migration_active = false;  // query-migrate: a migration (COLO) runs
  uint64_t ram_bytes = 0;    // query-memory-size-summary base-memory
  // "dirty-bitmap" (KVM, no migration: exact) or "page-sampling".
  std::string mode;
  int sample_pages = 0;  // per GiB, page-sampling only
  // Why `mode` (one phrase for the output's notes).
  std::string mode_reason;
  int64_t min_window_ms() const { return millisecond ? kDirtyRateMinWindowMs : kDirtyRateMinWindowSecondsMs; }
};

// Asks QEMU: query-version, query-kvm, query-migrate,
// query-memory-size-summary. Errors are the monitor's, annotated.
StatusOr<DirtyRateSupport> ProbeDirtyRate(QemuMonitor& monitor);

// Sample pages per GiB for a guest of `ram_bytes`: as many as QEMU allows,
// but at most ~64 Ki pages hashed per pass on a large guest.
int SamplePagesFor(uint64_t ram_bytes);

// One window QEMU measured.
struct DirtyWindow {
  int64_t requested_ms = 0;
  int64_t measured_ms = 0;  // QEMU's calc-time (it may overshoot a little)
  int64_t mib_per_s = 0;    // QEMU's dirty-rate
  std::string mode;         // as QEMU reports it
  // Distinct pages dirtied in the window: mib_per_s * 256 * measured_ms / 1000.
  double pages() const;
};

class DirtyRateMeter {
 public:
  using SleepFn = std::function<void(std::chrono::milliseconds)>;
  // REQUIRES: monitor outlives the meter. `sleep` waits between polls
  // (tests pass one that advances a FakeClock).
  DirtyRateMeter(QemuMonitor* monitor, const Clock& clock, SleepFn sleep);

  // Measures one window of `window_ms` (a multiple of 1000 without the
  // millisecond unit). DeadlineExceeded when QEMU has not finished by
  // `deadline`; FailedPrecondition with QEMU's words when it refuses.
  // A dirty-bitmap mode QEMU refuses (KVM's dirty ring) switches `support`
  // to page-sampling and measures again.
  StatusOr<DirtyWindow> Measure(DirtyRateSupport* support, int64_t window_ms, TimePoint deadline);

  static constexpr std::chrono::milliseconds kPoll{20};

 private:
  QemuMonitor* monitor_;
  const Clock& clock_;
  SleepFn sleep_;
};

}  // namespace remus
