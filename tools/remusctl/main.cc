// remusctl: the operator's CLI. Thin: parses flags, calls remusd over its
// control socket (control_client.cc), prints tables or JSON.
#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <optional>
#include <thread>

#include "common/thread_annotations.h"
#include "replicator/estimate/estimate.h"
#include "replicator/link/wire.h"
#include "tools/remusctl/control_client.h"
#include "tools/remusctl/views.h"

using nlohmann::json;

namespace {

int Fail(const remus::Status& s) {
  std::fprintf(stderr, "remusctl: %s\n", s.message().c_str());
  switch (s.code()) {
    case remus::Code::kNotFound: return 3;
    case remus::Code::kUnavailable: return 4;
    case remus::Code::kPermissionDenied:
    case remus::Code::kUnauthenticated: return 5;
    case remus::Code::kFailedPrecondition:
    case remus::Code::kAlreadyExists: return 6;
    default: return 1;
  }
}

// As Fail, for commands about a named domain: an unknown one also gets the fix.
int FailDomain(const remus::Status& s) {
  if (s.code() != remus::Code::kNotFound) return Fail(s);
  return Fail(remus::Status(s.code(), s.message() + " (run `remusctl status` to list the domains this remusd knows, "
                                                    "or --socket to ask another remusd)"));
}

std::string Fixed(double v, int prec) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

std::string StateCell(const json& d) {
  std::string s = d.value("state", "?");
  if (s == "syncing") s += " " + Fixed(d["sync"].value("percent", 0.0), 0) + "%";
  return s;
}

// History lines under each row of `status` (all of them are in --json).
constexpr size_t kHistoryLines = 5;

void PrintTable(const json& domains) {
  std::printf("%-16s %-18s %-16s %8s %8s %10s %10s %12s\n", "DOMAIN", "ROLE", "STATE", "EPOCH", "CKPT/S",
              "PAUSE p50", "PAUSE p99", "DIRTY/EPOCH");
  for (const auto& d : domains) {
    bool primary = d.value("role", "") == "primary";
    int64_t epoch = primary ? d.value("last_acked_epoch", int64_t{-1}) : d.value("last_committed_epoch", int64_t{-1});
    std::string p50 = primary ? Fixed(d["pause_ms"].value("p50", 0.0), 1) + "ms" : "-";
    std::string p99 = primary ? Fixed(d["pause_ms"].value("p99", 0.0), 1) + "ms" : "-";
    std::string rate = primary ? Fixed(d.value("checkpoints_per_sec", 0.0), 1) : "-";
    std::string dirty = primary ? Fixed(d["dirty_pages_per_epoch"].value("mean", 0.0), 0) : "-";
    std::printf("%-16s %-18s %-16s %8s %8s %10s %10s %12s\n", d.value("domain", "?").c_str(),
                d.value("role", "?").c_str(), StateCell(d).c_str(), epoch < 0 ? "-" : std::to_string(epoch).c_str(),
                rate.c_str(), p50.c_str(), p99.c_str(), dirty.c_str());
    std::string err = d.value("error", "");
    if (!err.empty()) std::printf("  error: %s\n", err.c_str());
    if (std::string iv = remus::IntervalLine(d); !iv.empty()) std::printf("%s\n", iv.c_str());
    if (primary && d.contains("netbuf")) {
      const json& nb = d["netbuf"];
      std::string ifs;
      for (const auto& i : nb.value("interfaces", json::array())) ifs += (ifs.empty() ? "" : ",") + i.get<std::string>();
      if (nb.value("mode", "") == "none")
        std::printf("  netbuf none: %s\n", nb.value("guarantee", "").c_str());
      else
        std::printf("  netbuf %s on %s: %llu packets held, %llu dropped\n", nb.value("mode", "").c_str(), ifs.c_str(),
                    static_cast<unsigned long long>(nb.value("buffered_packets", uint64_t{0})),
                    static_cast<unsigned long long>(nb.value("dropped_packets", uint64_t{0})));
    }
    if (primary && d.contains("switchover")) {
      const json& sw = d["switchover"];
      std::string took = sw.contains("took_ms") ? ", took " + std::to_string(sw.value("took_ms", int64_t{0})) + " ms"
                                                : ", " + std::to_string(sw.value("elapsed_ms", int64_t{0})) + " ms so far";
      std::printf("  switchover %s (final checkpoint %lld%s)%s%s\n", sw.value("phase", "").c_str(),
                  static_cast<long long>(sw.value("final_epoch", int64_t{-1})), took.c_str(),
                  sw.value("result", "").empty() ? "" : ": ", sw.value("result", "").c_str());
    }
    if (std::string a = remus::ArbiterLine(d); !a.empty()) std::printf("%s\n", a.c_str());
    const bool runs_here = !primary && d.value("state", "") == "failed-over";
    if (runs_here && !d.value("qmp_socket", "").empty())
      std::printf("  running here: QMP %s, pid %d\n", d.value("qmp_socket", "").c_str(), d["qemu"].value("pid", -1));
    else if (runs_here && d.contains("libvirt"))
      std::printf("  running here: libvirt domain %s (%s)\n", d["libvirt"].value("domain", "").c_str(),
                  d["libvirt"].value("uri", "").c_str());
    for (const auto& o : d.value("other_roles", json::array()))
      std::printf("  also %s: %s\n", o.value("role", "").c_str(), o.value("state", "").c_str());
    // Where the guest ran: the last few entries of this host's history.
    const json hist = d.value("history", json::array());
    for (size_t i = hist.size() > kHistoryLines ? hist.size() - kHistoryLines : 0; i < hist.size(); i++)
      std::printf("  %s  %s\n", hist[i].value("at", "").c_str(), hist[i].value("text", "").c_str());
  }
}

// A progress bar of `width` cells for pct (0..100): "####......".
std::string Bar(double pct, int width) {
  int n = std::clamp(static_cast<int>(pct * width / 100), 0, width);
  return std::string(static_cast<size_t>(n), '#') + std::string(static_cast<size_t>(width - n), '.');
}

// Shows initial-copy progress until the domain is protected: a bar on a
// terminal, plain lines otherwise.
int WaitProtected(const std::string& sock, const std::string& domain, int timeout_s) {
  bool tty = ::isatty(STDOUT_FILENO);
  auto start = std::chrono::steady_clock::now();
  int last_pct = -1;
  for (;;) {
    auto r = remus::ControlCall(sock, {{"command", "status"}, {"domain", domain}, {"role", "primary"}});
    if (!r.ok()) return Fail(r.status());
    const json& d = (*r)["domains"][0];
    std::string st = d.value("state", "");
    int pct = static_cast<int>(d["sync"].value("percent", 0.0));
    if (st == "protected") {
      if (tty) std::printf("\r[%s] 100%%\n", Bar(100, 40).c_str());
      std::printf("%s: protected (backup %s, interval %d ms%s)\n", domain.c_str(), d.value("backup", "").c_str(),
                  d.value("interval_ms", 0), d.value("interval_mode", "") == "auto" ? ", auto" : "");
      return 0;
    }
    if (st != "syncing" && st != "starting") {
      std::fprintf(stderr, "remusctl: domain %s: protection did not start: %s (%s)\n", domain.c_str(), st.c_str(),
                   d.value("error", "").c_str());
      return 1;
    }
    if (tty) {
      std::printf("\rinitial copy [%s] %3d%%", Bar(pct, 40).c_str(), pct);
      std::fflush(stdout);
    } else if (pct / 10 != last_pct / 10) {
      std::printf("%s: initial copy %d%%\n", domain.c_str(), pct);
      std::fflush(stdout);
    }
    last_pct = pct;
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(timeout_s)) {
      std::fprintf(stderr, "\nremusctl: domain %s: initial copy still running after %d s (see remusctl status)\n",
                   domain.c_str(), timeout_s);
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// Runs the failover request (it returns when the guest runs here) and, while
// it runs, shows the promotion's phase and how much of the checkpoint has
// been streamed into the new QEMU: a bar on a terminal, a line per phase and
// per 10% otherwise. Most promotions end before the first poll.
remus::StatusOr<json> FailoverWithProgress(const std::string& sock, const std::string& domain) {
  const bool tty = ::isatty(STDOUT_FILENO);
  remus::Mutex mu;
  remus::CondVar cv;
  std::optional<remus::StatusOr<json>> result;
  std::thread call([&] {
    auto r = remus::ControlCall(sock, {{"command", "failover"}, {"domain", domain}});
    remus::MutexLock g(mu);
    result = std::move(r);
    cv.NotifyAll();
  });
  std::string last_phase;
  int last_decile = -1;
  bool drew = false;
  for (;;) {
    {
      remus::MutexLock l(mu);
      if (cv.WaitFor(mu, std::chrono::milliseconds(150), [&] { return result.has_value(); })) break;
    }
    auto st = remus::ControlCall(sock, {{"command", "status"}, {"domain", domain}, {"role", "backup"}});
    if (!st.ok() || !st->contains("domains") || (*st)["domains"].empty()) continue;
    const json& p = (*st)["domains"][0].value("promotion", json::object());
    if (!p.contains("phase")) continue;  // not started yet, or finished
    std::string phase = p.value("phase", "");
    const json& rs = p.value("restore", json::object());
    double pct = rs.value("percent", 0.0);
    uint64_t done = rs.value("done_bytes", uint64_t{0}), total = rs.value("total_bytes", uint64_t{0});
    if (tty) {
      std::printf("\r\033[K%s [%s] %3.0f%% of %.0f MiB  %s", domain.c_str(), Bar(pct, 30).c_str(), pct,
                  static_cast<double>(total) / (1 << 20), phase.c_str());
      std::fflush(stdout);
      drew = true;
    } else if (phase != last_phase || static_cast<int>(pct) / 10 != last_decile) {
      std::printf("%s: %s, %llu of %llu MiB of guest memory streamed (%.0f%%)\n", domain.c_str(), phase.c_str(),
                  static_cast<unsigned long long>(done >> 20), static_cast<unsigned long long>(total >> 20), pct);
      std::fflush(stdout);
    }
    last_phase = phase;
    last_decile = static_cast<int>(pct) / 10;
  }
  call.join();
  if (drew) std::printf("\n");
  return std::move(*result);
}

// What a switchover phase (PrimaryLifecycle's status) means, for progress lines.
std::string SwitchPhaseText(const json& sw) {
  const std::string phase = sw.value("phase", "");
  const std::string e = std::to_string(sw.value("final_epoch", int64_t{-1}));
  if (phase == "final-checkpoint") return "taking the final checkpoint";
  if (phase == "final-ack") return "final checkpoint " + e + " staged, guest paused; waiting for the backup's ack";
  if (phase == "handover") return "backup committed checkpoint " + e + "; told it to take over";
  if (phase == "ending-qemu") return "backup accepted; ending QEMU here";
  return phase;
}

// Runs the switchover request (it returns when the switchover ended) and
// prints each step as the status shows it.
remus::StatusOr<json> SwitchoverWithProgress(const std::string& sock, const std::string& domain,
                                             const std::string& reprotect_to) {
  remus::Mutex mu;
  remus::CondVar cv;
  std::optional<remus::StatusOr<json>> result;
  std::thread call([&] {
    json req = {{"command", "switchover"}, {"domain", domain}};
    if (!reprotect_to.empty()) req["reprotect_to"] = reprotect_to;
    auto r = remus::ControlCall(sock, req);
    remus::MutexLock g(mu);
    result = std::move(r);
    cv.NotifyAll();
  });
  std::string last;
  for (;;) {
    {
      remus::MutexLock l(mu);
      if (cv.WaitFor(mu, std::chrono::milliseconds(50), [&] { return result.has_value(); })) break;
    }
    auto st = remus::ControlCall(sock, {{"command", "status"}, {"domain", domain}});
    if (!st.ok() || !st->contains("domains")) continue;
    for (const auto& d : (*st)["domains"]) {
      if (d.value("role", "") != "primary" || !d.contains("switchover")) continue;
      std::string text = SwitchPhaseText(d["switchover"]);
      if (text != last && d["switchover"].value("phase", "") != "done") {
        std::printf("%s: %s\n", domain.c_str(), text.c_str());
        std::fflush(stdout);
        last = text;
      }
    }
  }
  call.join();
  return std::move(*result);
}

// After a switchover that asked for reverse protection: waits until this
// host backs the guest up (the new primary protects it back here).
int WaitReverseProtection(const std::string& sock, const std::string& domain, int timeout_s) {
  auto start = std::chrono::steady_clock::now();
  std::string last;
  for (;;) {
    auto r = remus::ControlCall(sock, {{"command", "status"}, {"domain", domain}, {"role", "backup"}});
    if (r.ok() && !(*r)["domains"].empty()) {
      const json& d = (*r)["domains"][0];
      std::string st = d.value("state", "");
      if (st == "protected") {
        std::printf("%s: protected again, from %s to this host (reverse protection)\n", domain.c_str(),
                    d.value("primary", "").c_str());
        return 0;
      }
      std::string line = st + (st == "syncing" ? " " + Fixed(d["sync"].value("percent", 0.0), 0) + "%" : "");
      if (line != last && !st.empty()) {
        std::printf("%s: reverse protection: %s\n", domain.c_str(), line.c_str());
        std::fflush(stdout);
        last = line;
      }
    }
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(timeout_s)) {
      std::fprintf(stderr, "remusctl: domain %s: switched over, but not protected back to this host after %d s "
                           "(see remusctl status on both hosts)\n", domain.c_str(), timeout_s);
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

std::string ClockNow() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char b[16];
  std::strftime(b, sizeof b, "%H:%M:%S", &tm);
  return b;
}

// Refreshes every interval: rates over the interval from two status calls.
// On a terminal the screen is redrawn in place; otherwise one line per domain
// per refresh, under one header. count 0: until interrupted.
int Watch(const std::string& sock, const std::string& domain, double interval_s, int count) {
  bool tty = ::isatty(STDOUT_FILENO);
  json req = {{"command", "status"}};
  if (!domain.empty()) req["domain"] = domain;
  auto poll = [&]() -> remus::StatusOr<json> {
    auto r = remus::ControlCall(sock, req);
    if (!r.ok()) return r.status();
    return (*r)["domains"];
  };
  auto prev = poll();
  if (!prev.ok()) return FailDomain(prev.status());
  auto prev_t = std::chrono::steady_clock::now();
  auto interval = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(interval_s));
  if (!tty) {
    std::printf("%-8s %s\n", "TIME", remus::WatchHeader().c_str());
    std::fflush(stdout);
  }
  for (int n = 0; count == 0 || n < count; n++) {
    std::this_thread::sleep_until(prev_t + interval);
    auto cur = poll();
    if (!cur.ok()) return FailDomain(cur.status());
    auto now = std::chrono::steady_clock::now();
    auto rows = remus::WatchRows(*prev, *cur, std::chrono::duration<double>(now - prev_t).count());
    std::string t = ClockNow();
    if (tty) {
      std::printf("\033[H\033[2J");  // home, clear screen
      std::printf("remusctl watch: every %g s, Ctrl-C to stop   %s\n\n%s\n", interval_s, t.c_str(),
                  remus::WatchHeader().c_str());
      for (const auto& r : rows) std::printf("%s\n", remus::WatchLine(r).c_str());
      if (rows.empty()) std::printf("(no domains)\n");
      std::printf("\nrates over the last %g s; pause p50/p99 over the last 1024 checkpoints\n", interval_s);
    } else {
      for (const auto& r : rows) std::printf("%-8s %s\n", t.c_str(), remus::WatchLine(r).c_str());
      if (rows.empty()) std::printf("%-8s (no domains)\n", t.c_str());
    }
    std::fflush(stdout);
    prev = std::move(cur);
    prev_t = now;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"remusctl: control Remus-style protection of QEMU/KVM guests"};
  app.require_subcommand(1);
  std::string sock = "/run/remus/remusd.sock";
  if (const char* e = std::getenv("REMUS_SOCKET")) sock = e;
  app.add_option("--socket", sock, "remusd control socket (env REMUS_SOCKET)")->capture_default_str();

  std::string domain, qmp, connect, backup, netbuf = "plug", compress = "xor-lz4", disks = "all", out, reprotect_to;
  std::string residency = "hot";
  std::vector<std::string> netbuf_ifs;
  int timeout_s = 600, xor_cache_mib = 64;
  // --interval MS or auto; with auto, the budget and bounds.
  std::string interval = "100";
  int latency_budget = 0, interval_min = 0, interval_max = 0;
  auto add_interval_options = [&](CLI::App* c, bool required) {
    auto* o = c->add_option("--interval", interval,
                            "checkpoint interval in ms (1..600000), or auto: it moves between --interval-min and "
                            "--interval-max to keep pace with the link within --latency-budget");
    o->check(CLI::Validator(
        [](std::string& v) -> std::string {
          if (v == "auto") return "";
          char* end = nullptr;
          long n = std::strtol(v.c_str(), &end, 10);
          if (v.empty() || *end != '\0' || n < 1 || n > 600000)
            return "--interval must be auto or a number of ms in 1..600000, not '" + v + "'";
          return "";
        },
        "MS|auto"));
    if (required) o->required();
    else o->capture_default_str();
    c->add_option("--latency-budget", latency_budget,
                  "with --interval auto: the output latency to stay within, in ms (default 200; 10..600000)");
    c->add_option("--interval-min", interval_min, "with --interval auto: the shortest interval in ms (default 20)");
    c->add_option("--interval-max", interval_max, "with --interval auto: the longest interval in ms (default 2000)");
  };
  // The request fields for the interval options (remusd checks the bounds).
  auto interval_fields = [&](json* req) {
    if (interval == "auto") {
      (*req)["interval_mode"] = "auto";
    } else {
      (*req)["interval_ms"] = std::stoi(interval);
    }
    if (latency_budget) (*req)["latency_budget_ms"] = latency_budget;
    if (interval_min) (*req)["interval_min_ms"] = interval_min;
    if (interval_max) (*req)["interval_max_ms"] = interval_max;
  };
  uint32_t queue_len = 65536;
  bool json_out = false, no_wait = false, netbuf_fallback = false, fail_open = false;

  auto* protect = app.add_subcommand("protect", "start replicating a running guest to a backup");
  protect->add_option("domain", domain, "domain name")->required();
  auto* qmp_opt = protect->add_option("--qmp", qmp, "QEMU's QMP unix socket (without it: the libvirt domain of that name)");
  protect->add_option("--connect", connect,
                      "libvirt URI of the domain (default: remusd's --libvirt-uri, qemu:///system)")
      ->excludes(qmp_opt);
  protect->add_option("--backup", backup, "backup remusd, HOST[:PORT] (port 7788 by default)")->required();
  add_interval_options(protect, false);
  protect->add_option("--netbuf", netbuf,
                      "output commit: plug (sch_plug qdisc), nfqueue (NFQUEUE), or none (packets not held)")
      ->capture_default_str()->check(CLI::IsMember({"plug", "nfqueue", "none"}));
  protect->add_option("--netbuf-if", netbuf_ifs,
                      "host device of a guest NIC (repeat for several); default: the taps QEMU reports");
  protect->add_flag("--netbuf-fallback", netbuf_fallback, "with --netbuf plug: use nfqueue where the kernel lacks sch_plug");
  protect->add_option("--netbuf-queue-len", queue_len, "nfqueue: packets the kernel may hold")
      ->capture_default_str()->check(CLI::Range(1u, 1u << 24));
  protect->add_flag("--netbuf-fail-open", fail_open,
                    "nfqueue: when the queue is full, let packets out unheld (default: drop them)");
  protect->add_option("--reprotect-to", reprotect_to,
                      "after a failover, the backup protects the guest again to this remusd: self (this host's "
                      "--listen address), HOST:PORT, or none (default: remusd's --reprotect-to)");
  protect->add_option("--compress", compress,
                      "compress pages on the link: none, lz4, or xor-lz4 (a page the primary sent before goes as "
                      "its XOR with that version, then LZ4; the primary keeps --xor-cache MiB of versions)")
      ->capture_default_str()->check(CLI::IsMember({"none", "lz4", "xor-lz4"}));
  protect->add_option("--xor-cache", xor_cache_mib, "MiB of page versions the primary keeps for --compress xor-lz4")
      ->capture_default_str()->check(CLI::Range(1, 1 << 20));
  protect->add_option("--residency", residency,
                      "how the backup keeps the guest's memory: hot (locked in its RAM, so a failover starts with "
                      "the guest's memory resident; refused when the backup lacks the memory) or paged (the kernel "
                      "may page it out: for many guests on one backup)")
      ->capture_default_str()->check(CLI::IsMember({"hot", "paged"}));
  protect->add_option("--disks", disks,
                      "disks to mirror to the backup: all (every writable -drive; with --connect every "
                      "writable <disk>), none (shared storage), or drive ids a,b (with --connect: targets "
                      "as virsh domblklist shows them, e.g. vda,vdb)")
      ->capture_default_str();
  protect->add_flag("--no-wait", no_wait, "return once the initial copy has started");
  protect->add_option("--timeout", timeout_s, "seconds to wait for the initial copy")->capture_default_str();

  auto* unprotect = app.add_subcommand("unprotect", "stop protection; the guest keeps running here");
  unprotect->add_option("domain", domain, "domain name")->required();

  auto* status = app.add_subcommand("status", "show protected domains");
  status->add_option("domain", domain, "only this domain");
  status->add_flag("--json", json_out, "machine-readable output");
  std::string status_role;
  status->add_option("--role", status_role,
                     "only this side's records, unmerged: primary (what this host protects) or backup (what it "
                     "backs up or promoted)")
      ->check(CLI::IsMember({"primary", "backup"}));

  auto* failover = app.add_subcommand("failover", "on the backup: start the guest here from the last checkpoint");
  failover->add_option("domain", domain, "domain name")->required();

  auto* switchover = app.add_subcommand(
      "switchover", "on the primary: move a protected guest to its backup, nothing lost (QEMU here ends)");
  switchover->add_option("domain", domain, "domain name")->required();
  switchover->add_option("--reprotect-to", reprotect_to,
                         "where this host listens as the guest's new backup, HOST[:PORT] (default: remusd's --listen "
                         "address unless it is a wildcard), or none: the backup protects the guest back here");
  switchover->add_flag("--no-wait", no_wait, "do not wait for the reverse protection's initial copy");
  switchover->add_option("--timeout", timeout_s, "seconds to wait for the reverse protection")->capture_default_str();

  auto* tune = app.add_subcommand("tune", "change a protected domain's checkpoint interval");
  tune->add_option("domain", domain, "domain name")->required();
  add_interval_options(tune, true);

  double watch_interval_s = 1.0;
  int watch_count = 0;
  auto* watch = app.add_subcommand("watch", "live view: epochs/s, pause, dirty and wire MB/s, unacked epochs, held packets");
  watch->add_option("domain", domain, "only this domain");
  watch->add_option("--interval-s", watch_interval_s, "seconds between refreshes")
      ->capture_default_str()->check(CLI::Range(0.1, 3600.0));
  watch->add_option("--count", watch_count, "stop after N refreshes (default: until interrupted)")
      ->check(CLI::Range(1, 100000000));

  bool histogram = false;
  auto* stats = app.add_subcommand("stats", "a domain's counters; with --histogram its pause and ack latency distributions");
  stats->add_option("domain", domain, "domain name")->required();
  stats->add_flag("--histogram", histogram, "also the distributions (cumulative since protection started)");
  stats->add_flag("--json", json_out, "machine-readable output");

  std::vector<int64_t> est_intervals;
  auto* estimate = app.add_subcommand(
      "estimate", "measure a guest's dirty rate and show the link bandwidth each checkpoint interval needs");
  estimate->add_option("domain", domain, "domain name")->required();
  auto* est_qmp = estimate->add_option("--qmp", qmp,
                                       "QEMU's QMP unix socket, for a guest not protected from this host and not run "
                                       "by libvirt (a protected one is measured through its protection)");
  estimate->add_option("--connect", connect, "libvirt URI of the domain (default: remusd's --libvirt-uri)")
      ->excludes(est_qmp);
  estimate->add_option("--intervals", est_intervals, "checkpoint intervals in ms, comma-separated (default 10,25,50,100,200)")
      ->delimiter(',');
  estimate->add_flag("--json", json_out, "machine-readable output");

  auto* keygen = app.add_subcommand("keygen", "write a new shared key (copy it to both hosts)");
  keygen->add_option("--out", out, "key file to create (mode 0600)")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);  // prints help or the usage error
    return rc == 0 ? 0 : 2;
  }

  if (*keygen) {
    auto k = remus::wire::GenerateKeyHex();
    if (!k.ok()) return Fail(k.status());
    int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return Fail(remus::ErrnoStatus("create " + out, errno));
    std::string data = *k + "\n";
    remus::Status s = remus::WriteFull(fd, data.data(), data.size());
    ::close(fd);
    if (!s.ok()) return Fail(s);
    std::printf("wrote %s; copy it to the other host with the same mode (0600)\n", out.c_str());
    return 0;
  }
  if (*protect) {
    json req = {{"command", "protect"}, {"domain", domain}, {"qmp", qmp}, {"backup", backup},
                {"netbuf", netbuf}, {"netbuf_fallback", netbuf_fallback},
                {"netbuf_queue_maxlen", queue_len}, {"netbuf_fail_open", fail_open}, {"compress", compress},
                {"disks", disks}, {"residency", residency}};
    interval_fields(&req);
    if (compress == "xor-lz4") req["xor_cache_mib"] = xor_cache_mib;
    if (!netbuf_ifs.empty()) req["netbuf_interfaces"] = netbuf_ifs;
    if (!connect.empty()) req["libvirt_uri"] = connect;
    if (!reprotect_to.empty()) req["reprotect_to"] = reprotect_to;
    auto r = remus::ControlCall(sock, req);
    if (!r.ok()) return Fail(r.status());
    if (no_wait) {
      std::printf("%s: initial copy started\n", domain.c_str());
      return 0;
    }
    return WaitProtected(sock, domain, timeout_s);
  }
  if (*unprotect) {
    auto r = remus::ControlCall(sock, {{"command", "unprotect"}, {"domain", domain}});
    if (!r.ok()) return Fail(r.status());
    std::printf("%s: unprotected; the guest keeps running on this host\n", domain.c_str());
    return 0;
  }
  if (*status) {
    json req = {{"command", "status"}};
    if (!domain.empty()) req["domain"] = domain;
    if (!status_role.empty()) req["role"] = status_role;
    auto r = remus::ControlCall(sock, req);
    if (!r.ok()) return Fail(r.status());
    if (json_out) std::cout << (*r)["domains"].dump(2) << "\n";
    else PrintTable((*r)["domains"]);
    return 0;
  }
  if (*watch) return Watch(sock, domain, watch_interval_s, watch_count);
  if (*stats) {
    auto r = remus::ControlCall(sock, {{"command", "status"}, {"domain", domain}});
    if (!r.ok()) return FailDomain(r.status());
    // One entry, or two where this remusd is both the domain's primary and its backup.
    json list = json::array();
    std::string text;
    for (const auto& d : (*r)["domains"]) {
      list.push_back(remus::StatsJson(d, histogram));
      text += (text.empty() ? "" : "\n") + remus::StatsText(d, histogram);
    }
    if (json_out) std::cout << list.dump(2) << "\n";  // a list, as status --json
    else std::cout << text;
    return 0;
  }
  if (*failover) {
    std::printf("%s: promoting from the last committed checkpoint...\n", domain.c_str());
    std::fflush(stdout);
    auto r = FailoverWithProgress(sock, domain);
    if (!r.ok()) return Fail(r.status());
    const json& d = (*r)[0];
    const std::string where = !d.value("qmp_socket", "").empty()
                                  ? "QMP " + d.value("qmp_socket", "")
                                  : d.contains("libvirt") ? "libvirt domain " + d["libvirt"].value("domain", "") + " at " +
                                                                d["libvirt"].value("uri", "")
                                                          : "no monitor reported";
    std::printf("%s: running here (%s) after %lld ms\n", domain.c_str(), where.c_str(),
                static_cast<long long>(d["promotion"].value("failover_ms", int64_t{-1})));
    const json rb = d["promotion"].value("restored_by", json::object());
    if (rb.value("mode", "") == "mapped")
      std::printf("%s: main RAM mapped from the page store (%.0f MiB); %.1f MiB streamed\n", domain.c_str(),
                  static_cast<double>(rb.value("mapped_bytes", uint64_t{0})) / 1048576.0,
                  static_cast<double>(rb.value("stream_bytes", uint64_t{0})) / 1048576.0);
    else if (rb.value("mode", "") == "streamed")
      std::printf("%s: checkpoint streamed (%.1f MiB): %s\n", domain.c_str(),
                  static_cast<double>(rb.value("stream_bytes", uint64_t{0})) / 1048576.0,
                  rb.value("reason", "").c_str());
    return 0;
  }
  if (*switchover) {
    std::printf("%s: switching over to the backup...\n", domain.c_str());
    std::fflush(stdout);
    auto r = SwitchoverWithProgress(sock, domain, reprotect_to);
    if (!r.ok()) return FailDomain(r.status());
    const json& sw = r->value("switchover", json::object());
    std::printf("%s: switched over in %lld ms from checkpoint %lld; %s\n", domain.c_str(),
                static_cast<long long>(sw.value("took_ms", int64_t{-1})),
                static_cast<long long>(sw.value("final_epoch", int64_t{-1})), sw.value("result", "").c_str());
    if (sw.value("reprotect_to", "").empty() || no_wait) return 0;
    return WaitReverseProtection(sock, domain, timeout_s);
  }
  if (*estimate) {
    json req = {{"command", "estimate"}, {"domain", domain}};
    if (!est_intervals.empty()) req["intervals_ms"] = est_intervals;
    if (!qmp.empty()) req["qmp"] = qmp;
    if (!connect.empty()) req["libvirt_uri"] = connect;
    // Progress on stderr, so --json's stdout stays one document.
    std::fprintf(stderr, "%s: measuring the dirty rate (a few seconds, at most %lld s)...\n", domain.c_str(),
                 static_cast<long long>(remus::estimate::kMaxDurationMs / 1000));
    auto r = remus::ControlCall(sock, req);
    if (!r.ok()) return FailDomain(r.status());
    if (json_out) std::cout << r->dump(2) << "\n";
    else std::cout << remus::EstimateText(*r);
    return 0;
  }
  if (*tune) {
    json req = {{"command", "tune"}, {"domain", domain}};
    interval_fields(&req);
    auto r = remus::ControlCall(sock, req);
    if (!r.ok()) return Fail(r.status());
    if (interval == "auto") {
      const json& st = *r;
      std::printf("%s: interval automatic (latency budget %lld ms), now %lld ms\n", domain.c_str(),
                  static_cast<long long>(st.value("latency_budget_ms", int64_t{0})),
                  static_cast<long long>(st.value("interval_ms", int64_t{0})));
    } else {
      std::printf("%s: interval now %s ms (fixed)\n", domain.c_str(), interval.c_str());
    }
    return 0;
  }
  return 0;
}
