#include "replicator/estimate/estimate.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace remus::estimate {

using nlohmann::json;

std::vector<int64_t> DefaultIntervals() { return {10, 25, 50, 100, 200}; }

StatusOr<std::vector<int64_t>> CheckIntervals(std::vector<int64_t> v) {
  if (v.empty()) return InvalidArgument("give at least one interval (ms)");
  if (v.size() > kMaxIntervals)
    return InvalidArgument("at most " + std::to_string(kMaxIntervals) + " intervals, not " + std::to_string(v.size()));
  for (int64_t ms : v)
    if (ms < 1 || ms > kMaxIntervalMs)
      return InvalidArgument("interval " + std::to_string(ms) + " ms is out of range (1.." +
                             std::to_string(kMaxIntervalMs) + " ms)");
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

namespace {

// One sample per window: an exact source wins over a sampled one.
std::map<int64_t, Sample> ByWindow(const std::vector<Sample>& samples) {
  std::map<int64_t, Sample> m;
  for (const Sample& s : samples) {
    auto it = m.find(s.window_ms);
    if (it == m.end() || (s.exact() && !it->second.exact())) m[s.window_ms] = s;
  }
  return m;
}

}  // namespace

std::vector<Row> Rows(const std::vector<int64_t>& intervals, const std::vector<Sample>& samples, double extra_bytes,
                      double ratio) {
  const std::map<int64_t, Sample> by = ByWindow(samples);
  std::vector<Row> rows;
  for (int64_t w : intervals) {
    Row r;
    r.interval_ms = w;
    if (auto it = by.find(w); it != by.end()) {
      r.pages = it->second.pages;
      r.pages_low = r.pages_high = r.pages;
      r.basis = "measured";
      r.method = it->second.method;
      r.from_window_ms = w;
    } else {
      // Bounds from every window (see the header): monotone and subadditive.
      std::optional<double> low, high;
      const Sample* low_from = nullptr;
      const Sample* high_from = nullptr;
      auto raise = [&](double v, const Sample& s) {
        if (!low || v > *low) low = v, low_from = &s;
      };
      auto lower = [&](double v, const Sample& s) {
        if (!high || v < *high) high = v, high_from = &s;
      };
      bool any_above = false;
      for (const auto& [win, s] : by) {
        const double scaled = s.pages * static_cast<double>(w) / static_cast<double>(win);
        if (win < w) {
          raise(s.pages, s);
          lower(scaled, s);
        } else {
          any_above = true;
          raise(scaled, s);
          lower(s.pages, s);
        }
      }
      // Sampled windows are noisy: never let the bounds cross.
      if (low && high && *low > *high) high = low, high_from = low_from;
      r.pages_low = low;
      r.pages_high = high;
      // Shorter than every window: only rate x interval is a figure worth
      // showing (the upper bound is the shortest window's whole count).
      const bool below_all = by.begin()->first > w;
      r.basis = below_all ? "lower-bound" : "upper-bound";
      r.pages = below_all ? *low : *high;
      const Sample* from = below_all ? low_from : high_from;
      r.method = from->method;
      r.from_window_ms = from->window_ms;
      (void)any_above;
    }
    const double page_bytes = r.pages * static_cast<double>(kPageBytes);
    r.bytes = page_bytes + extra_bytes;
    const double per_s = 1000.0 / static_cast<double>(w);
    r.mb_per_s = r.bytes * per_s / 1e6;
    r.gbit_per_s = r.bytes * per_s * 8 / 1e9;
    if (ratio > 0) {
      const double z = page_bytes / ratio + extra_bytes;
      r.mb_per_s_compressed = z * per_s / 1e6;
      r.gbit_per_s_compressed = z * per_s * 8 / 1e9;
    }
    rows.push_back(r);
  }
  return rows;
}

json RowJson(const Row& r) {
  json j = {{"interval_ms", r.interval_ms},
            {"dirty_pages", std::round(r.pages)},
            {"basis", r.basis},
            {"method", r.method},
            {"from_window_ms", r.from_window_ms},
            {"bytes_per_checkpoint", std::round(r.bytes)},
            {"mb_per_s", r.mb_per_s},
            {"gbit_per_s", r.gbit_per_s}};
  j["dirty_pages_low"] = r.pages_low ? json(std::round(*r.pages_low)) : json();
  j["dirty_pages_high"] = r.pages_high ? json(std::round(*r.pages_high)) : json();
  if (r.mb_per_s_compressed)
    j["compressed"] = {{"mb_per_s", *r.mb_per_s_compressed}, {"gbit_per_s", *r.gbit_per_s_compressed}};
  return j;
}

std::vector<Window> PlanWindows(const DirtyRateSupport& s, const std::vector<int64_t>& intervals) {
  std::vector<int64_t> wins;
  if (s.millisecond) {
    // Each interval its own window, from QEMU's minimum up to 2 s.
    for (int64_t w : intervals) wins.push_back(std::clamp<int64_t>(w, s.min_window_ms(), 2000));
  } else {
    // Whole seconds: 1 s, and 2 s when an interval is that long.
    wins.push_back(1000);
    if (intervals.back() >= 2000) wins.push_back(2000);
  }
  std::sort(wins.begin(), wins.end());
  wins.erase(std::unique(wins.begin(), wins.end()), wins.end());
  std::vector<Window> plan;
  int64_t total = 0;
  for (int64_t w : wins) {
    // About half a second of measuring per window, at most 5 repeats.
    Window win{w, static_cast<int>(std::clamp<int64_t>(500 / w, 1, 5))};
    while (win.reps > 1 && total + win.ms * win.reps > kMeasureBudgetMs) win.reps--;
    if (total + win.ms * win.reps > kMeasureBudgetMs) break;  // longer ones are bounded instead
    total += win.ms * win.reps;
    plan.push_back(win);
  }
  return plan;
}

int64_t PlannedMs(const std::vector<Window>& plan) {
  int64_t t = 0;
  for (const Window& w : plan) t += w.ms * w.reps;
  return t;
}

double ProtectionFigures::compression_ratio() const {
  if (!compress || page_bytes_wire == 0 || page_bytes_raw == 0) return 0;
  return static_cast<double>(page_bytes_raw) / static_cast<double>(page_bytes_wire);
}

std::optional<ProtectionFigures> FiguresFromStatus(const json& st) {
  if (!st.is_object() || st.value("state", "") != "protected") return std::nullopt;
  ProtectionFigures f;
  f.checkpoints = st.value("checkpoints_total", uint64_t{0});
  f.interval_ms = st.value("interval_ms", int64_t{0});
  if (f.checkpoints < kMinCheckpoints || f.interval_ms <= 0) return std::nullopt;
  const json dp = st.value("dirty_pages_per_epoch", json::object());
  const json bp = st.value("bytes_per_epoch", json::object());
  f.pages_per_checkpoint = dp.value("mean", 0.0);
  f.bytes_per_checkpoint = bp.value("mean", 0.0);
  f.compress = st.value("compress", "none") == "lz4";
  const json cp = st.value("checkpoint_page_bytes", json::object());
  f.page_bytes_raw = cp.value("raw", uint64_t{0});
  f.page_bytes_wire = cp.value("wire", uint64_t{0});
  return f;
}

Estimator::Estimator(QemuMonitor* monitor, const Clock& clock, DirtyRateMeter::SleepFn sleep)
    : monitor_(monitor), clock_(clock), sleep_(std::move(sleep)) {}

StatusOr<json> Estimator::Run(const std::string& domain, const std::vector<int64_t>& intervals,
                              const std::optional<ProtectionFigures>& protection) {
  const TimePoint start = clock_.Now();
  const TimePoint deadline = start + std::chrono::milliseconds(kMaxDurationMs);
  json out = {{"domain", domain}, {"intervals_ms", intervals}, {"page_bytes", kPageBytes}};
  json notes = json::array();
  std::vector<Sample> samples;
  // QEMU's measurement; a failure with protection figures at hand is a note.
  Status qemu_status = OkStatus();
  json qemu = json::object();
  auto measure = [&]() -> Status {
    if (!monitor_) return Unavailable("QEMU's monitor is not connected");
    ASSIGN_OR_RETURN(DirtyRateSupport s, ProbeDirtyRate(*monitor_));
    qemu = {{"version", s.version}, {"accelerator", s.kvm ? "kvm" : "tcg"}, {"migration_active", s.migration_active}};
    const std::vector<Window> plan = PlanWindows(s, intervals);
    DirtyRateMeter meter(monitor_, clock_, sleep_);
    json windows = json::array();
    for (const Window& w : plan) {
      double sum = 0;
      json rates = json::array();
      std::string method;
      for (int i = 0; i < w.reps; i++) {
        ASSIGN_OR_RETURN(DirtyWindow dw, meter.Measure(&s, w.ms, deadline));
        // QEMU's own window may overshoot; scale to the one asked for.
        sum += dw.pages() * static_cast<double>(w.ms) / static_cast<double>(dw.measured_ms);
        rates.push_back(dw.mib_per_s);
        method = dw.mode;
      }
      const double pages = sum / w.reps;
      samples.push_back({w.ms, pages, method});
      windows.push_back({{"window_ms", w.ms}, {"reps", w.reps}, {"mib_per_s", rates}, {"dirty_pages", std::round(pages)},
                         {"method", method}});
    }
    qemu["mode"] = s.mode;
    qemu["mode_reason"] = s.mode_reason;
    qemu["min_window_ms"] = s.min_window_ms();
    qemu["windows"] = windows;
    if (s.mode == "page-sampling") {
      qemu["sample_pages_per_gib"] = s.sample_pages;
      notes.push_back("QEMU's figures are page-sampling estimates (" + std::to_string(s.sample_pages) +
                      " pages per GiB hashed at each window's start and end): " + s.mode_reason +
                      ". Expect tens of percent of noise on short windows and low rates.");
    }
    if (!s.millisecond)
      notes.push_back("QEMU " + s.version +
                      " measures whole seconds only (calc-time-unit needs QEMU 8.2): shorter intervals show the 1 s "
                      "window's rate x interval, a LOWER bound; the upper bound is dirty_pages_high.");
    return OkStatus();
  };
  qemu_status = measure();
  if (!qemu_status.ok()) {
    samples.clear();
    if (!protection)
      return Status(qemu_status.code(), "domain " + domain + ": measuring the dirty rate with QEMU failed: " +
                                            qemu_status.message());
    qemu["error"] = qemu_status.message();
    notes.push_back("QEMU's dirty-rate measurement failed (" + qemu_status.message() +
                    "); only the protection's own figures are used");
  }
  out["qemu"] = qemu;
  double extra = 0, ratio = 0;
  if (protection) {
    const ProtectionFigures& p = *protection;
    samples.push_back({p.interval_ms, p.pages_per_checkpoint, "checkpoints"});
    extra = std::max(0.0, p.bytes_per_checkpoint - p.pages_per_checkpoint * static_cast<double>(kPageBytes));
    ratio = p.compression_ratio();
    out["protection"] = {{"interval_ms", p.interval_ms},
                         {"checkpoints", p.checkpoints},
                         {"dirty_pages_per_checkpoint", p.pages_per_checkpoint},
                         {"bytes_per_checkpoint", p.bytes_per_checkpoint},
                         {"other_bytes_per_checkpoint", extra},
                         {"compress", p.compress ? "lz4" : "none"},
                         {"compression_ratio", ratio > 0 ? json(ratio) : json()}};
    notes.push_back("bytes per checkpoint include " + std::to_string(static_cast<int64_t>(std::round(extra))) +
                    " bytes of device state and disk writes per checkpoint, as the protection measured");
    if (ratio == 0)
      notes.push_back(p.compress ? "no compressed checkpoint pages sent yet: no compression ratio"
                                 : "no compression ratio measured: the protection runs without --compress lz4");
  } else {
    out["protection"] = json();
    notes.push_back("bytes per checkpoint count pages only: each checkpoint also carries the guest's device state "
                    "(typically a few hundred KB) and its disk writes; protect the domain to measure them");
  }
  std::vector<Row> rows = Rows(intervals, samples, extra, ratio);
  json jr = json::array();
  bool lower = false, upper = false;
  for (const Row& r : rows) {
    jr.push_back(RowJson(r));
    lower |= r.basis == "lower-bound";
    upper |= r.basis == "upper-bound";
  }
  if (lower)
    notes.push_back("\"at least\" rows: the interval is shorter than every window measured; rate x interval is a lower "
                    "bound, since a shorter checkpoint has fewer chances to write a page twice");
  if (upper)
    notes.push_back("\"at most\" rows: bounded by a shorter window's rate x interval (a steady guest dirties at most "
                    "that many distinct pages) or by a longer window's count");
  out["compression_ratio"] = ratio > 0 ? json(ratio) : json();
  out["rows"] = std::move(jr);
  out["notes"] = std::move(notes);
  out["took_ms"] = static_cast<int64_t>(ToMillis(clock_.Now() - start));
  return out;
}

}  // namespace remus::estimate
