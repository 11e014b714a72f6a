#include "replicator/qemu/dirty_rate.h"

#include <algorithm>

namespace remus {

using nlohmann::json;

namespace {

int64_t IntField(const json& j, const char* key, int64_t def) {
  auto it = j.find(key);
  return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : def;
}

}  // namespace

int SamplePagesFor(uint64_t ram_bytes) {
  constexpr double kMaxHashed = 65536;  // pages per pass
  const double gib = std::max(1.0 / 1024, static_cast<double>(ram_bytes) / (1ull << 30));
  const double per_gib = std::min<double>(kSamplePagesMax, kMaxHashed / gib);
  return std::max(kSamplePagesMin, static_cast<int>(per_gib));
}

StatusOr<DirtyRateSupport> ProbeDirtyRate(QemuMonitor& m) {
  DirtyRateSupport s;
  ASSIGN_OR_RETURN(json v, m.Execute("query-version"));
  const json q = v.value("qemu", json::object());
  const int64_t major = IntField(q, "major", 0), minor = IntField(q, "minor", 0);
  s.version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(IntField(q, "micro", 0));
  s.millisecond = major > 8 || (major == 8 && minor >= 2);
  ASSIGN_OR_RETURN(json kvm, m.Execute("query-kvm"));
  s.kvm = kvm.value("enabled", false);
  ASSIGN_OR_RETURN(json mig, m.Execute("query-migrate"));
  const std::string ms = mig.value("status", "none");
  s.migration_active = ms != "none" && ms != "completed" && ms != "failed" && ms != "cancelled";
  ASSIGN_OR_RETURN(json mem, m.Execute("query-memory-size-summary"));
  s.ram_bytes = mem.value("base-memory", uint64_t{0}) + mem.value("plugged-memory", uint64_t{0});
  if (!s.kvm) {
    s.mode = "page-sampling";
    s.mode_reason = "QEMU's dirty-bitmap mode counts only KVM's dirty log, and this QEMU runs without KVM";
  } else if (s.migration_active) {
    s.mode = "page-sampling";
    s.mode_reason = "a migration (" + ms + ") is running, whose own dirty-log harvests would distort dirty-bitmap";
  } else {
    s.mode = "dirty-bitmap";
    s.mode_reason = "KVM's dirty log, exact";
  }
  s.sample_pages = SamplePagesFor(s.ram_bytes);
  return s;
}

double DirtyWindow::pages() const {
  // MiB/s * 256 pages/MiB * seconds.
  return static_cast<double>(mib_per_s) * 256.0 * static_cast<double>(measured_ms) / 1000.0;
}

DirtyRateMeter::DirtyRateMeter(QemuMonitor* monitor, const Clock& clock, SleepFn sleep)
    : monitor_(monitor), clock_(clock), sleep_(std::move(sleep)) {}

StatusOr<DirtyWindow> DirtyRateMeter::Measure(DirtyRateSupport* support, int64_t window_ms, TimePoint deadline) {
  if (window_ms < support->min_window_ms())
    return InvalidArgument("a dirty-rate window of " + std::to_string(window_ms) + " ms is below QEMU " +
                           support->version + "'s minimum of " + std::to_string(support->min_window_ms()) + " ms");
  if (!support->millisecond && window_ms % 1000 != 0)
    return InvalidArgument("QEMU " + support->version + " measures whole seconds only, not " +
                           std::to_string(window_ms) + " ms");
  json args = {{"mode", support->mode}};
  if (support->millisecond) {
    args["calc-time"] = window_ms;
    args["calc-time-unit"] = "millisecond";
  } else {
    args["calc-time"] = window_ms / 1000;
  }
  if (support->mode == "page-sampling") args["sample-pages"] = support->sample_pages;
  auto started = monitor_->Execute("calc-dirty-rate", args);
  if (!started.ok() && support->mode == "dirty-bitmap" &&
      started.status().message().find("not enabled") != std::string::npos) {
    // KVM's dirty ring is on: dirty-bitmap is refused there.
    support->mode = "page-sampling";
    support->mode_reason = "QEMU refused dirty-bitmap (KVM's dirty ring is on)";
    return Measure(support, window_ms, deadline);
  }
  if (!started.ok()) return started.status().Annotate("calc-dirty-rate");
  const json query_args = support->millisecond ? json{{"calc-time-unit", "millisecond"}} : json::object();
  // The answer cannot come before the window ends.
  sleep_(std::chrono::milliseconds(window_ms));
  for (;;) {
    ASSIGN_OR_RETURN(json r, monitor_->Execute("query-dirty-rate", query_args));
    if (r.value("status", "") == "measured") {
      DirtyWindow w;
      w.requested_ms = window_ms;
      w.measured_ms = IntField(r, "calc-time", window_ms / (support->millisecond ? 1 : 1000));
      if (!support->millisecond) w.measured_ms *= 1000;
      if (w.measured_ms <= 0) w.measured_ms = window_ms;
      w.mib_per_s = std::max<int64_t>(0, IntField(r, "dirty-rate", 0));
      w.mode = r.value("mode", support->mode);
      return w;
    }
    if (clock_.Now() >= deadline)
      return DeadlineExceeded("QEMU had not finished measuring a " + std::to_string(window_ms) +
                              " ms dirty-rate window in time (status " + r.value("status", "?") + ")");
    sleep_(kPoll);
  }
}

}  // namespace remus
