// colo_null_sink: the lower bound for the guest's pause per checkpoint.
//
// Drives a running QEMU over QMP exactly as the checkpoint source does
// (replicator/qemu/checkpoint_source.cc: x-colo on, return-path off,
// x-checkpoint-delay, max-bandwidth lifted, migrate to a unix socket we
// listen on), parses QEMU's stream with qemu::StreamParser into a PageSink
// that discards every page, and answers every COLO message at once: ready
// after the initial stream, reply to each request, received + loaded as soon
// as the device blob is read. No staging, no network, no backup: what is
// left is QEMU's own cost of stopping the guest, harvesting the dirty log and
// serializing pages and devices, plus the parse.
//
// After --seconds of COLO (counted from checkpoint-ready) it finishes the
// checkpoint in progress, runs x-colo-lost-heartbeat so the guest keeps
// running unprotected, and prints one JSON line on stdout. Progress and the
// moment COLO starts ("colo_null_sink: in COLO ...") go to stderr.
//
// Usage: colo_null_sink --qmp SOCKET [--interval MS] [--seconds N]
//                       [--migrate-socket PATH] [--request-timeout-ms MS]
//                       [--touch-factor F] [--retain]   (diagnostics)
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "common/status.h"
#include "replicator/qemu/qemu_stream.h"
#include "replicator/qemu/qmp.h"

namespace {

using nlohmann::json;
using remus::Status;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string qmp;
  std::string migrate_socket;
  int interval_ms = 100;
  double seconds = 10;
  int request_timeout_ms = 10000;
  // Diagnostic: after each LOADED, copy this many times the checkpoint's page
  // bytes through memory, as replication's copies would (sender batch, socket,
  // backup receive and apply), to see what their cache traffic alone costs
  // QEMU's next pause. 0: off (the limit).
  double touch_factor = 0;
  // Diagnostic: keep each checkpoint's bytes in the stream's read buffers
  // until LOADED, as remus's checkpoint source does (BufferedReader
  // retention over a BufferPool of 1 MiB buffers), instead of refilling one
  // buffer: what holding a checkpoint costs, with no other work.
  bool retain = false;
};

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr,
               "colo_null_sink: %s\n"
               "usage: colo_null_sink --qmp SOCKET [--interval MS] [--seconds N] "
               "[--migrate-socket PATH] [--request-timeout-ms MS] [--touch-factor F] [--retain]\n",
               why);
  std::exit(2);
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i++) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) Usage(("missing value for " + k).c_str());
      return argv[++i];
    };
    if (k == "--qmp") a.qmp = val();
    else if (k == "--interval") a.interval_ms = std::atoi(val().c_str());
    else if (k == "--seconds") a.seconds = std::atof(val().c_str());
    else if (k == "--migrate-socket") a.migrate_socket = val();
    else if (k == "--request-timeout-ms") a.request_timeout_ms = std::atoi(val().c_str());
    else if (k == "--touch-factor") a.touch_factor = std::atof(val().c_str());
    else if (k == "--retain") a.retain = true;
    else if (k == "-h" || k == "--help") Usage("help");
    else Usage(("unknown argument " + k).c_str());
  }
  if (a.qmp.empty()) Usage("--qmp is required");
  if (a.interval_ms < 1 || a.interval_ms > 600000) Usage("--interval must be 1..600000");
  if (a.seconds <= 0) Usage("--seconds must be positive");
  if (a.migrate_socket.empty())
    a.migrate_socket = "/tmp/colo_null_sink." + std::to_string(::getpid()) + ".sock";
  return a;
}

// Counts pages and throws them away.
class NullSink final : public remus::qemu::PageSink {
 public:
  Status OnPage(uint32_t, uint64_t, const uint8_t* data) override {
    pages_++;
    if (data == nullptr) zero_pages_++;
    return remus::OkStatus();
  }
  uint64_t pages() const { return pages_; }
  uint64_t zero_pages() const { return zero_pages_; }

 private:
  uint64_t pages_ = 0;
  uint64_t zero_pages_ = 0;
};

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

json Summary(std::vector<double> v) {
  if (v.empty()) return json{{"n", 0}};
  std::sort(v.begin(), v.end());
  auto q = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))]; };
  double sum = 0;
  for (double x : v) sum += x;
  return json{{"n", v.size()}, {"p50", q(0.5)}, {"p99", q(0.99)}, {"mean", sum / static_cast<double>(v.size())},
              {"max", v.back()}};
}

Status SendColo(int fd, remus::qemu::ColoMessage m1) {
  std::string b;
  remus::qemu::StreamWriter(&b).Colo(m1);
  return remus::WriteFull(fd, b.data(), b.size());
}

// Leaves COLO so the guest runs on: the same steps as CheckpointSource::GiveUp.
Status LeaveColo(remus::QemuMonitor& mon, int conn) {
  ::shutdown(conn, SHUT_RDWR);
  Status s = mon.Execute("x-colo-lost-heartbeat").status();
  if (!s.ok()) std::fprintf(stderr, "colo_null_sink: x-colo-lost-heartbeat: %s\n", s.ToString().c_str());
  for (int i = 0; i < 250; i++) {
    auto st = mon.Execute("query-status", json::object(), 2000);
    if (!st.ok()) return st.status();
    std::string status = st->value("status", "");
    if (status == "running") return remus::OkStatus();
    auto mig = mon.Execute("query-migrate", json::object(), 2000);
    std::string ms = mig.ok() ? mig->value("status", "") : "";
    if (ms != "colo" && ms != "active" && mon.Execute("cont").ok()) return remus::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return remus::Internal("QEMU did not leave COLO after x-colo-lost-heartbeat");
}

int Fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "colo_null_sink: %s: %s\n", what.c_str(), s.ToString().c_str());
  json out = {{"ok", false}, {"error", what + ": " + s.message()}};
  std::printf("%s\n", out.dump().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = ParseArgs(argc, argv);
  namespace q = remus::qemu;

  auto mon_or = remus::QmpClient::Connect(a.qmp);
  if (!mon_or.ok()) return Fail("connecting to QMP " + a.qmp, mon_or.status());
  std::unique_ptr<remus::QmpClient> mon = std::move(mon_or).value();
  auto probe = remus::ProbeColo(*mon);
  if (!probe.ok()) return Fail("probing COLO support", probe.status());
  if (Status s = remus::CheckColoSupported(*probe, "bench"); !s.ok()) return Fail("COLO support", s);

  auto lfd = remus::ListenUnix(a.migrate_socket, 0600);
  if (!lfd.ok()) return Fail("listening on " + a.migrate_socket, lfd.status());
  json caps = json::array({{{"capability", "x-colo"}, {"state", true}}, {{"capability", "return-path"}, {"state", false}}});
  if (Status s = mon->Execute("migrate-set-capabilities", {{"capabilities", caps}}).status(); !s.ok())
    return Fail("enabling x-colo", s);
  if (Status s = mon->Execute("migrate-set-parameters",
                              {{"x-checkpoint-delay", a.interval_ms}, {"max-bandwidth", int64_t{1} << 40}})
                     .status();
      !s.ok())
    return Fail("setting migration parameters", s);
  auto t_migrate = Clock::now();
  if (Status s = mon->Execute("migrate", {{"uri", "unix:" + a.migrate_socket}}).status(); !s.ok())
    return Fail("starting the migration", s);
  auto ready = remus::WaitReadable(lfd->get(), 10000);
  if (!ready.ok() || !*ready) return Fail("waiting for QEMU to connect", ready.ok() ? remus::DeadlineExceeded("timeout") : ready.status());
  auto conn_or = remus::Accept(lfd->get());
  if (!conn_or.ok()) return Fail("accept", conn_or.status());
  remus::Fd conn = std::move(conn_or).value();
  lfd->Reset();
  ::unlink(a.migrate_socket.c_str());

  remus::FdSource src(conn.get());
  remus::BufferedReader reader(&src, 1 << 20);  // as CheckpointSource
  q::StreamParser parser(&reader);
  NullSink initial_sink;
  q::InitialInfo info;
  if (Status s = parser.ReadInitial(&initial_sink, &info); !s.ok()) return Fail("reading the initial stream", s);
  if (!info.colo_enabled) return Fail("initial stream", remus::FailedPrecondition("QEMU did not enable COLO"));
  double initial_ms = Ms(Clock::now() - t_migrate);
  if (Status s = SendColo(conn.get(), q::ColoMessage::kCheckpointReady); !s.ok()) return Fail("sending ready", s);
  auto t_colo = Clock::now();
  std::fprintf(stderr, "colo_null_sink: in COLO after %.0f ms initial copy (%llu pages, %zu device bytes)\n",
               initial_ms, static_cast<unsigned long long>(initial_sink.pages()), info.device_state.size());
  std::fflush(stderr);

  std::vector<double> receiver_ms, ram_ms, pages, device_bytes;
  remus::BufferPool pool(1 << 20, 256);  // --retain: as CheckpointSource's (256 MiB)
  uint64_t total_pages = 0, total_zero = 0;
  Status err = remus::OkStatus();
  std::string err_what;
  auto deadline = t_colo + std::chrono::microseconds(static_cast<int64_t>(a.seconds * 1e6));
  while (Clock::now() < deadline) {
    // A QEMU whose COLO thread deadlocked (stock 7.2 under TCG) just goes silent.
    if (reader.Buffered() == 0) {
      auto r = remus::WaitReadable(conn.get(), a.request_timeout_ms);
      if (!r.ok() || !*r) {
        err = r.ok() ? remus::DeadlineExceeded("no checkpoint request for " + std::to_string(a.request_timeout_ms) + " ms")
                     : r.status();
        err_what = "waiting for a checkpoint request";
        break;
      }
    }
    if (err = parser.ExpectColoMessage(q::ColoMessage::kCheckpointRequest); !err.ok()) { err_what = "request"; break; }
    auto t0 = Clock::now();
    if (err = SendColo(conn.get(), q::ColoMessage::kCheckpointReply); !err.ok()) { err_what = "reply"; break; }
    if (a.retain) reader.StartRetaining(&pool);
    if (err = parser.ExpectColoMessage(q::ColoMessage::kVmstateSend); !err.ok()) { err_what = "vmstate-send"; break; }
    auto t_ram = Clock::now();
    NullSink sink;
    auto n = parser.ReadCheckpointRam(&sink);
    if (!n.ok()) { err = n.status(); err_what = "checkpoint ram"; break; }
    ram_ms.push_back(Ms(Clock::now() - t_ram));
    auto blob = parser.ReadCheckpointDevices();
    if (a.retain)
      for (auto& rb : reader.TakeRetained()) pool.Put(std::move(rb));
    if (!blob.ok()) { err = blob.status(); err_what = "checkpoint devices"; break; }
    std::string b;
    q::StreamWriter w(&b);
    w.Colo(q::ColoMessage::kVmstateReceived);
    w.Colo(q::ColoMessage::kVmstateLoaded);
    if (err = remus::WriteFull(conn.get(), b.data(), b.size()); !err.ok()) { err_what = "loaded"; break; }
    receiver_ms.push_back(Ms(Clock::now() - t0));
    if (a.touch_factor > 0) {
      // Rotating through buffers bigger than the last-level cache, as a real
      // pipeline's staging and socket buffers do.
      static std::vector<uint8_t> from(size_t{256} << 20, 1), to(size_t{256} << 20);
      static size_t pos = 0;
      size_t left = static_cast<size_t>(a.touch_factor * static_cast<double>(*n) * 4096);
      while (left > 0) {
        size_t k = std::min({left, size_t{4} << 20, from.size() - pos});
        std::memcpy(to.data() + pos, from.data() + (from.size() - pos - k), k);
        pos = (pos + k) % from.size();
        left -= k;
      }
    }
    pages.push_back(static_cast<double>(*n));
    device_bytes.push_back(static_cast<double>(blob->size()));
    total_pages += sink.pages();
    total_zero += sink.zero_pages();
  }
  double colo_s = std::chrono::duration<double>(Clock::now() - t_colo).count();
  Status left = LeaveColo(*mon, conn.get());
  json out = {
      {"ok", err.ok() && left.ok()},
      {"receiver", "null-sink"},
      {"interval_ms", a.interval_ms},
      {"seconds", colo_s},
      {"checkpoints", receiver_ms.size()},
      {"checkpoints_per_sec", colo_s > 0 ? static_cast<double>(receiver_ms.size()) / colo_s : 0.0},
      {"initial", {{"ms", initial_ms}, {"pages", initial_sink.pages()}, {"zero_pages", initial_sink.zero_pages()},
                   {"device_bytes", info.device_state.size()}}},
      {"pages_per_checkpoint", Summary(pages)},
      {"pages_total", total_pages},
      {"zero_pages_total", total_zero},
      {"device_bytes", Summary(device_bytes)},
      // REPLY written -> LOADED written, on our clock: QEMU stops the guest
      // after reading REPLY and resumes it after reading LOADED.
      {"receiver_ms", Summary(receiver_ms)},
      // VMSTATE_SEND read -> the RAM section's end read: QEMU writing the
      // pages and us reading them, the part --retain changes.
      {"ram_ms", Summary(ram_ms)},
      {"retain", a.retain},
  };
  if (!err.ok()) out["error"] = err_what + ": " + err.message();
  if (!left.ok()) out["leave_error"] = left.message();
  std::printf("%s\n", out.dump().c_str());
  std::fflush(stdout);
  return out["ok"].get<bool>() ? 0 : 1;
}
