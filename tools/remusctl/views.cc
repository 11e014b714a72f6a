#include "tools/remusctl/views.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

namespace remus {

using nlohmann::json;

namespace {

constexpr double kPageBytes = 4096;

std::string Fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

const json& Obj(const json& j, const char* k) {
  static const json kEmpty = json::object();
  return j.is_object() && j.contains(k) && j[k].is_object() ? j[k] : kEmpty;
}

double Num(const json& j, const char* k, double dflt = 0) {
  return j.is_object() && j.contains(k) && j[k].is_number() ? j[k].get<double>() : dflt;
}

bool IsPrimary(const json& d) { return d.value("role", "") == "primary"; }

// The counters rates are taken from.
struct Counters {
  double checkpoints, dirty_pages, wire_bytes;
};
Counters CountersOf(const json& d) {
  bool p = IsPrimary(d);
  return {Num(d, "checkpoints_total"), Num(d, "dirty_pages_total"),
          Num(Obj(d, "link"), p ? "bytes_sent" : "bytes_received")};
}

const json* FindDomain(const json& arr, const std::string& name, const std::string& role) {
  if (!arr.is_array()) return nullptr;
  for (const auto& d : arr)
    if (d.is_object() && d.value("domain", "") == name && d.value("role", "") == role) return &d;
  return nullptr;
}

struct HistInfo {
  const char* title;
  const char* unit;
};
const std::map<std::string, HistInfo>& HistInfos() {
  static const std::map<std::string, HistInfo> m = {
      {"pause_seconds", {"guest pause per checkpoint", "seconds"}},
      {"ack_seconds", {"ack latency (checkpoint staged to acknowledged)", "seconds"}},
      {"dirty_pages", {"dirty pages per checkpoint", "pages"}},
      {"apply_seconds", {"time to commit a checkpoint", "seconds"}},
  };
  return m;
}
// Order of the histograms in stats: the ones above first, then any other.
std::vector<std::string> HistOrder(const json& hs) {
  std::vector<std::string> out;
  for (const char* k : {"pause_seconds", "ack_seconds", "dirty_pages", "apply_seconds"})
    if (hs.contains(k)) out.push_back(k);
  for (const auto& [k, v] : hs.items())
    if (std::find(out.begin(), out.end(), k) == out.end()) out.push_back(k);
  return out;
}

std::string Bound(double v, const std::string& unit) {
  if (unit == "seconds") return v < 1 ? Fmt("%g ms", v * 1000) : Fmt("%g s", v);
  return v == std::floor(v) && std::fabs(v) < 1e15 ? Fmt("%.0f", v) : Fmt("%g", v);
}

std::string Amount(double v, const std::string& unit) {
  if (unit == "seconds") return v < 1 ? Fmt("%.2f ms", v * 1000) : Fmt("%.3f s", v);
  return Fmt("%.0f", v);
}

std::string Bytes(double b) {
  if (b >= 1024.0 * 1024 * 1024) return Fmt("%.2f GiB", b / (1024.0 * 1024 * 1024));
  if (b >= 1024.0 * 1024) return Fmt("%.1f MiB", b / (1024.0 * 1024));
  if (b >= 1024) return Fmt("%.1f KiB", b / 1024);
  return Fmt("%.0f B", b);
}

}  // namespace

std::vector<WatchRow> WatchRows(const json& prev, const json& cur, double dt_s) {
  std::vector<WatchRow> rows;
  if (!cur.is_array()) return rows;
  for (const auto& d : cur) {
    if (!d.is_object()) continue;
    WatchRow r;
    r.domain = d.value("domain", "?");
    r.role = d.value("role", "?");
    r.state = d.value("state", "?");
    r.primary = IsPrimary(d);
    r.epoch = static_cast<long long>(Num(d, r.primary ? "last_acked_epoch" : "last_committed_epoch", -1));
    if (r.primary) {
      r.pause_p50_ms = Num(Obj(d, "pause_ms"), "p50");
      r.pause_p99_ms = Num(Obj(d, "pause_ms"), "p99");
      r.unacked_epochs = static_cast<long long>(Num(d, "unacked_epochs"));
      r.buffered_packets = static_cast<long long>(Num(Obj(d, "netbuf"), "buffered_packets"));
      r.interval_ms = static_cast<long long>(Num(d, "interval_ms"));
      r.interval_mode = d.value("interval_mode", std::string("fixed"));
    }
    const json* p = FindDomain(prev, r.domain, r.role);
    if (p && dt_s > 0) {
      Counters a = CountersOf(*p), b = CountersOf(d);
      if (b.checkpoints >= a.checkpoints && b.dirty_pages >= a.dirty_pages && b.wire_bytes >= a.wire_bytes) {
        r.has_rates = true;
        r.epochs_per_s = (b.checkpoints - a.checkpoints) / dt_s;
        r.dirty_mb_per_s = (b.dirty_pages - a.dirty_pages) * kPageBytes / 1e6 / dt_s;
        r.wire_mb_per_s = (b.wire_bytes - a.wire_bytes) / 1e6 / dt_s;
      }
    }
    rows.push_back(r);
  }
  return rows;
}

std::string WatchHeader() {
  char b[256];
  std::snprintf(b, sizeof b, "%-16s %-8s %-13s %8s %9s %9s %9s %10s %9s %7s %8s %-12s", "DOMAIN", "ROLE", "STATE",
                "EPOCH", "EPOCHS/S", "PAUSE p50", "PAUSE p99", "DIRTY MB/s", "WIRE MB/s", "UNACKED", "BUFFERED",
                "INTERVAL");
  return b;
}

std::string WatchLine(const WatchRow& r) {
  auto rate = [&](double v, const char* f) { return r.has_rates ? Fmt(f, v) : std::string("-"); };
  std::string role = r.primary ? "primary" : "backup";
  std::string p50 = r.primary ? Fmt("%.1fms", r.pause_p50_ms) : "-";
  std::string p99 = r.primary ? Fmt("%.1fms", r.pause_p99_ms) : "-";
  std::string dirty = r.primary ? rate(r.dirty_mb_per_s, "%.2f") : "-";
  std::string unacked = r.primary ? std::to_string(r.unacked_epochs) : "-";
  std::string buffered = r.primary ? std::to_string(r.buffered_packets) : "-";
  // One token ("240ms/auto"), so scripts can split the line on blanks.
  std::string interval = r.primary ? std::to_string(r.interval_ms) + "ms/" + r.interval_mode : "-";
  char b[512];
  std::snprintf(b, sizeof b, "%-16s %-8s %-13s %8s %9s %9s %9s %10s %9s %7s %8s %-12s", r.domain.c_str(), role.c_str(),
                r.state.c_str(), r.epoch < 0 ? "-" : std::to_string(r.epoch).c_str(),
                rate(r.epochs_per_s, "%.1f").c_str(), p50.c_str(), p99.c_str(), dirty.c_str(),
                rate(r.wire_mb_per_s, "%.2f").c_str(), unacked.c_str(), buffered.c_str(), interval.c_str());
  return b;
}

std::string FormatHistogram(const std::string& title, const std::string& unit, const HistogramSnapshot& h) {
  std::string out = title + ": " + std::to_string(h.count) + " samples";
  if (h.count > 0)
    out += ", mean " + Amount(h.sum / static_cast<double>(h.count), unit) + ", p50 ~" + Amount(h.Quantile(0.5), unit) +
           ", p99 ~" + Amount(h.Quantile(0.99), unit);
  out += "\n";
  uint64_t most = 0;
  for (size_t i = 0; i <= h.bounds.size(); i++) most = std::max(most, h.BucketCount(i));
  constexpr int kBar = 40;
  for (size_t i = 0; i <= h.bounds.size(); i++) {
    std::string label = i < h.bounds.size() ? "<= " + Bound(h.bounds[i], unit)
                                            : "> " + (h.bounds.empty() ? std::string("-") : Bound(h.bounds.back(), unit));
    uint64_t c = h.BucketCount(i);
    // A bucket with samples shows at least one mark.
    int n = most ? static_cast<int>((c * kBar + most - 1) / most) : 0;
    char b[256];
    std::snprintf(b, sizeof b, "  %12s %10llu  %s\n", label.c_str(), static_cast<unsigned long long>(c),
                  std::string(static_cast<size_t>(n), '#').c_str());
    out += b;
  }
  return out;
}

json StatsJson(const json& d, bool histograms) {
  bool p = IsPrimary(d);
  json out = {{"domain", d.value("domain", "")}, {"role", d.value("role", "")}, {"state", d.value("state", "")}};
  json c = {{"checkpoints_total", Num(d, "checkpoints_total")}};
  if (p) {
    const json& nb = Obj(d, "netbuf");
    c["last_acked_epoch"] = Num(d, "last_acked_epoch", -1);
    c["dirty_pages_total"] = Num(d, "dirty_pages_total");
    c["epoch_bytes_total"] = Num(d, "epoch_bytes_total");
    c["wire_bytes_sent"] = Num(Obj(d, "link"), "bytes_sent");
    c["backpressure_waits"] = Num(d, "backpressure_waits");
    c["unacked_epochs"] = Num(d, "unacked_epochs");
    c["netbuf_buffered_packets"] = Num(nb, "buffered_packets");
    c["netbuf_dropped_packets"] = Num(nb, "dropped_packets");
    c["netbuf_released_packets"] = Num(nb, "released_packets");
  } else {
    c["last_committed_epoch"] = Num(d, "last_committed_epoch", -1);
    c["wire_bytes_received"] = Num(Obj(d, "link"), "bytes_received");
    c["failovers_total"] = Num(d, "failovers_total");
  }
  // Counters are integers; JSON numbers from doubles would print "12.0".
  for (auto& [k, v] : c.items()) v = static_cast<long long>(v.get<double>());
  out["counters"] = c;
  if (!histograms) return out;
  json hs = json::object();
  const json& src = Obj(d, "histograms");
  for (const auto& name : HistOrder(src)) {
    auto h = HistogramFromJson(src[name]);
    if (!h.ok()) continue;
    auto info = HistInfos().count(name) ? HistInfos().at(name) : HistInfo{"", ""};
    json buckets = json::array();
    for (size_t i = 0; i <= h->bounds.size(); i++) {
      json b = {{"count", h->BucketCount(i)}, {"cumulative", i < h->bounds.size() ? h->cumulative[i] : h->count}};
      if (i < h->bounds.size()) b["le"] = h->bounds[i];
      else b["le"] = "+Inf";
      buckets.push_back(b);
    }
    hs[name] = {{"title", info.title}, {"unit", info.unit},    {"count", h->count},
                {"sum", h->sum},       {"p50", h->Quantile(0.5)}, {"p99", h->Quantile(0.99)},
                {"buckets", buckets}};
  }
  out["histograms"] = hs;
  return out;
}

std::string StatsText(const json& d, bool histograms) {
  bool p = IsPrimary(d);
  std::string out = d.value("domain", "?") + " (" + d.value("role", "?") + ", " + d.value("state", "?") + ")\n";
  auto line = [&](const char* k, const std::string& v) {
    char b[256];
    std::snprintf(b, sizeof b, "  %-22s %s\n", k, v.c_str());
    out += b;
  };
  auto count = [&](double v) { return Fmt("%.0f", v); };
  line("checkpoints", count(Num(d, "checkpoints_total")));
  if (d.contains("initial_copy") && d["initial_copy"].is_object()) {
    // The last initial copy: a delta resync keeps what the backup's image had.
    const json& ic = d["initial_copy"];
    double kept = Num(ic, p ? "pages_kept" : "kept_pages"), sent = Num(ic, p ? "pages_sent" : "received_pages");
    std::string mode = ic.value("mode", std::string("?"));
    line("initial copy", mode + ": " + count(sent) + " pages sent" +
                             (mode == "delta" ? ", " + count(kept) + " kept (" + Bytes(Num(ic, "bytes_saved")) + " not sent)"
                                              : std::string()));
  }
  if (p) {
    double pages = Num(d, "dirty_pages_total");
    line("last acked epoch", count(Num(d, "last_acked_epoch", -1)));
    line("dirty pages", count(pages) + " (" + Bytes(pages * kPageBytes) + ")");
    line("checkpoint bytes", Bytes(Num(d, "epoch_bytes_total")));
    line("sent to the backup", Bytes(Num(Obj(d, "link"), "bytes_sent")));
    line("unacked epochs", count(Num(d, "unacked_epochs")));
    line("backpressure waits", count(Num(d, "backpressure_waits")));
    const json& nb = Obj(d, "netbuf");
    line("netbuf packets", nb.value("mode", std::string("?")) + ": held " + count(Num(nb, "buffered_packets")) +
                               ", released " + count(Num(nb, "released_packets")) + ", dropped " +
                               count(Num(nb, "dropped_packets")));
  } else {
    line("last committed epoch", count(Num(d, "last_committed_epoch", -1)));
    line("received from primary", Bytes(Num(Obj(d, "link"), "bytes_received")));
    line("failovers", count(Num(d, "failovers_total")));
  }
  if (!histograms) return out;
  const json& src = Obj(d, "histograms");
  for (const auto& name : HistOrder(src)) {
    auto h = HistogramFromJson(src[name]);
    if (!h.ok()) continue;
    auto info = HistInfos().count(name) ? HistInfos().at(name) : HistInfo{name.c_str(), ""};
    out += "\n" + FormatHistogram(info.title, info.unit, *h);
  }
  return out;
}

std::string IntervalLine(const json& d) {
  if (!IsPrimary(d) || !d.contains("interval_ms")) return "";
  std::string out = "  interval " + std::to_string(static_cast<long long>(Num(d, "interval_ms"))) + " ms";
  const std::string mode = d.value("interval_mode", std::string("fixed"));
  if (mode == "auto")
    out += " (auto, latency budget " + std::to_string(static_cast<long long>(Num(d, "latency_budget_ms"))) + " ms)";
  else
    out += " (fixed)";
  const std::string why = d.value("interval_reason", std::string());
  if (!why.empty()) out += ": " + why;
  return out;
}

std::string ArbiterLine(const json& d) {
  if (!d.is_object() || !d.contains("arbiter") || !d["arbiter"].is_object()) return "";
  const json& a = d["arbiter"];
  const std::string name = a.value("name", std::string("?"));
  if (name != "etcd") return "  arbiter " + name + (a.contains("warning") ? ": WARNING " + a.value("warning", std::string()) : "");
  std::string st = a.value("state", std::string());
  std::string token = Fmt("%.0f", Num(a, "token"));
  std::string out = "  arbiter etcd: ";
  if (st == "held") {
    out += "lease held by " + a.value("owner", std::string("?")) + ", token " + token + "; fenced in " +
           Fmt("%.1f", Num(a, "deadline_in_ms") / 1000.0) + " s without a renewal (TTL " +
           Fmt("%.1f", Num(a, "ttl_ms") / 1000.0) + " s)";
  } else if (st == "fenced") {
    out += "FENCED: the guest is paused, its output held (" + a.value("fenced_reason", std::string()) +
           "); it resumes if the lease is renewed";
  } else if (st == "lost") {
    out += "FENCED for good: host '" + a.value("winner", std::string("?")) + "' won (token " + token +
           "); this copy was destroyed";
  } else if (st == "released") {
    out += "lease released (session retired: no backup can promote it)";
  } else if (!st.empty()) {
    out += st;
  } else {
    out += "standby (host " + a.value("host", std::string("?")) + ")";
  }
  if (a.contains("retiring")) out += "; retiring the session (" + a.value("retiring", std::string()) + ")";
  if (a.contains("error")) out += "; etcd: " + a.value("error", std::string());
  const json& pr = d.contains("promotion") && d["promotion"].is_object() ? d["promotion"] : json::object();
  if (pr.contains("arbitration")) out += "\n  promotion: " + pr.value("arbitration", std::string());
  else if (a.contains("refused") && st.empty()) out += "\n  last promotion refused: " + a.value("refused", std::string());
  return out;
}

std::string EstimateText(const nlohmann::json& r) {
  using nlohmann::json;
  std::string out;
  const json rows = r.value("rows", json::array());
  bool compressed = false;
  for (const auto& row : rows) compressed |= row.contains("compressed");
  char line[256];
  std::snprintf(line, sizeof line, "%-9s %-12s %10s %10s %9s", "INTERVAL", "DIRTY PAGES", "MiB/CKPT", "MB/s", "Gbit/s");
  out += line;
  if (compressed) {
    std::snprintf(line, sizeof line, " %10s %9s", "lz4 MB/s", "lz4 Gb/s");
    out += line;
  }
  out += "  BASIS\n";
  for (const auto& row : rows) {
    const std::string basis = row.value("basis", "");
    const std::string method = row.value("method", "");
    const bool sampled = method == "page-sampling";
    std::string mark = basis == "lower-bound" ? ">=" : basis == "upper-bound" ? "<=" : sampled ? "~" : "=";
    std::string pages = mark + " " + Fmt("%.0f", row.value("dirty_pages", 0.0));
    std::string how = basis == "measured" ? "measured"
                      : basis == "lower-bound" ? "at least"
                                               : "at most";
    how += std::string(" (") + (method == "checkpoints" ? "protection's checkpoints" : "QEMU " + method);
    if (basis != "measured") how += ", " + std::to_string(row.value("from_window_ms", int64_t{0})) + " ms window";
    if (basis == "lower-bound" && row.contains("dirty_pages_high") && !row["dirty_pages_high"].is_null())
      how += "; at most " + Fmt("%.0f", row["dirty_pages_high"].get<double>()) + " pages";
    how += ")";
    std::snprintf(line, sizeof line, "%6lld ms %-12s %10s %10s %9s", static_cast<long long>(row.value("interval_ms", int64_t{0})),
                  pages.c_str(), Fmt("%.2f", row.value("bytes_per_checkpoint", 0.0) / 1048576.0).c_str(),
                  Fmt("%.1f", row.value("mb_per_s", 0.0)).c_str(), Fmt("%.3f", row.value("gbit_per_s", 0.0)).c_str());
    out += line;
    if (compressed) {
      const json z = row.value("compressed", json::object());
      std::snprintf(line, sizeof line, " %10s %9s", z.empty() ? "-" : Fmt("%.1f", z.value("mb_per_s", 0.0)).c_str(),
                    z.empty() ? "-" : Fmt("%.3f", z.value("gbit_per_s", 0.0)).c_str());
      out += line;
    }
    out += "  " + how + "\n";
  }
  const json q = r.value("qemu", json::object());
  if (q.contains("windows")) {
    out += "QEMU " + q.value("version", std::string()) + " (" + q.value("accelerator", std::string()) + "), mode " +
           q.value("mode", std::string()) + ": windows";
    for (const auto& w : q["windows"])
      out += " " + std::to_string(w.value("window_ms", int64_t{0})) + " ms x" + std::to_string(w.value("reps", 1));
    out += "\n";
  }
  const json p = r.value("protection", json());
  if (p.is_object())
    out += "protection: " + Fmt("%.0f", p.value("dirty_pages_per_checkpoint", 0.0)) + " pages per checkpoint at " +
           std::to_string(p.value("interval_ms", int64_t{0})) + " ms over its last checkpoints" +
           (p.value("compression_ratio", json()).is_number()
                ? ", lz4 ratio " + Fmt("%.2f", p["compression_ratio"].get<double>())
                : std::string()) +
           "\n";
  for (const auto& n : r.value("notes", json::array())) out += "note: " + n.get<std::string>() + "\n";
  out += "measured in " + std::to_string(r.value("took_ms", int64_t{0})) + " ms\n";
  return out;
}

}  // namespace remus
