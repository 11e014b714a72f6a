// libvirt_monitor_probe: a test tool that drives LibvirtMonitor and
// RestoreDomain against a real libvirtd (tests/e2e/test_libvirt_basics.py).
// Every subcommand prints JSON on stdout (events one per line) and exits 0 on
// success, 1 on error (then {"ok": false, "code", "message"}), 2 on bad usage.
//
//   libvirt_monitor_probe --uri URI --domain D [--pid-dir DIR] info [--xml-out FILE]
//   ... exec COMMAND [--args JSON] [--timeout-ms N]
//   ... watch [--duration-ms N] [--stop-resume N] [--until-loss]
//   ... migrate-fd (--out FILE | --connect-unix PATH [--no-wait]) [--timeout-ms N]
//   ... restore --xml FILE (--stream FILE | --store DIR) [--paused] [--image FILE] [--work-dir DIR]
//   ... save-image --xml FILE --stream FILE --out FILE
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/io.h"
#include "common/log.h"
#include "common/thread_annotations.h"
#include "replicator/backup/page_store.h"
#include "replicator/backup/restore.h"
#include "replicator/libvirt/monitor.h"
#include "replicator/libvirt/restore.h"

namespace remus {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

Mutex out_mu;

void Print(const json& j) {
  MutexLock l(out_mu);
  std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
}

int Fail(const Status& s) {
  Print({{"ok", false}, {"code", std::string(CodeName(s.code()))}, {"message", s.message()}});
  return 1;
}

json LossJson(const MonitorLoss& l) {
  return {{"kind", l.kind == MonitorLoss::Kind::kDomainStopped ? "domain-stopped" : "connection-lost"},
          {"reason", l.reason},
          {"qemu_pid", l.qemu_pid},
          {"qemu_alive", l.qemu_alive}};
}

// Copies a file into fd (the "stream writer" of restore tests).
Status CopyFile(const std::string& path, int fd) {
  int f = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f < 0) return ErrnoStatus("opening " + path, errno);
  Fd in(f);
  std::string buf(1 << 20, '\0');
  for (;;) {
    ssize_t n = ::read(in.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("reading " + path, errno);
    }
    if (n == 0) return OkStatus();
    RETURN_IF_ERROR(WriteFull(fd, buf.data(), static_cast<size_t>(n)));
  }
}

int Main(int argc, char** argv) {
  CLI::App app{"Drives LibvirtMonitor / RestoreDomain against a real libvirtd (test tool)"};
  LibvirtMonitorOptions mo;
  bool verbose = false;
  app.add_option("--uri", mo.uri, "libvirt URI");
  app.add_option("--domain", mo.domain, "domain name");
  app.add_option("--pid-dir", mo.pid_dir, "libvirt's QEMU pid file directory");
  app.add_flag("-v,--verbose", verbose, "debug logging");
  app.require_subcommand(1);

  auto* info = app.add_subcommand("info", "connect; print pid, version, uuid");
  std::string xml_out;
  info->add_option("--xml-out", xml_out, "write the migratable XML here");

  auto* exec = app.add_subcommand("exec", "run one QMP command");
  std::string command, args_text = "{}";
  int timeout_ms = 10000;
  exec->add_option("command", command)->required();
  exec->add_option("--args", args_text, "arguments as a JSON object");
  exec->add_option("--timeout-ms", timeout_ms);

  auto* watch = app.add_subcommand("watch", "print QMP events (and the loss) as JSON lines");
  int duration_ms = 3000, stop_resume = 0;
  bool until_loss = false;
  watch->add_option("--duration-ms", duration_ms);
  watch->add_option("--stop-resume", stop_resume, "issue stop + cont this many times while watching");
  watch->add_flag("--until-loss", until_loss, "end early when the monitor is lost");

  auto* mig = app.add_subcommand("migrate-fd", "migrate into a file handed to QEMU by fd (getfd)");
  std::string mig_out, mig_unix;
  bool no_wait = false;
  auto* out_opt = mig->add_option("--out", mig_out, "a file to migrate into");
  mig->add_option("--connect-unix", mig_unix, "connect to this unix socket and migrate into the connection "
                                              "(e.g. a COLO receiver)")
      ->excludes(out_opt);
  mig->add_flag("--no-wait", no_wait, "return once `migrate` is accepted (COLO never completes)");
  mig->add_option("--timeout-ms", timeout_ms);

  auto* restore = app.add_subcommand("restore", "restore a domain from its XML and a QEMU stream file");
  std::string xml_file, stream_file, store_dir, image, work_dir = "/tmp";
  bool paused = false;
  restore->add_option("--xml", xml_file)->required();
  auto* stream_opt = restore->add_option("--stream", stream_file, "a QEMU migration stream file");
  restore->add_option("--store", store_dir, "a backup page store (store-N/ with configuration.bin): "
                                            "the stream remusd's promotion writes")
      ->excludes(stream_opt);
  restore->add_option("--image", image, "stage a save image file here instead of streaming");
  restore->add_option("--work-dir", work_dir, "directory for the FIFO");
  restore->add_flag("--paused", paused);

  auto* save = app.add_subcommand("save-image", "write a libvirt save image file");
  std::string save_out;
  save->add_option("--xml", xml_file)->required();
  save->add_option("--stream", stream_file)->required();
  save->add_option("--out", save_out)->required();

  CLI11_PARSE(app, argc, argv);
  SetLogLevel(verbose ? LogLevel::kDebug : LogLevel::kWarn);

  if (*save) {
    auto x = ReadFileToString(xml_file);
    if (!x.ok()) return Fail(x.status());
    int f = ::open(save_out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (f < 0) return Fail(ErrnoStatus("creating " + save_out, errno));
    Fd fd(f);
    Status s = WriteSaveImage(fd.get(), *x, true, [&](int out) { return CopyFile(stream_file, out); });
    if (!s.ok()) return Fail(s);
    Print({{"ok", true}, {"out", save_out}});
    return 0;
  }

  if (*restore) {
    auto x = ReadFileToString(xml_file);
    if (!x.ok()) return Fail(x.status());
    LibvirtRestoreOptions ro;
    ro.uri = mo.uri;
    ro.work_dir = work_dir;
    ro.start_paused = paused;
    ro.image_path = image;
    ro.pid_dir = mo.pid_dir;
    StreamWriter writer = [&](int out) { return CopyFile(stream_file, out); };
    std::unique_ptr<PageStore> store;
    std::string configuration;
    RestoreStats rs;
    if (!store_dir.empty()) {
      auto st = PageStore::Open(store_dir);
      if (!st.ok()) return Fail(st.status());
      store = std::move(st).value();
      auto cfg = ReadFileToString(store_dir + "/configuration.bin");
      if (!cfg.ok()) return Fail(cfg.status());
      configuration = std::move(cfg).value();
      writer = [&](int out) { return WriteRestoreStream(*store, configuration, out, &rs); };
    } else if (stream_file.empty()) {
      return Fail(InvalidArgument("restore needs --stream or --store"));
    }
    auto t0 = Clock::now();
    auto r = RestoreDomain(ro, *x, writer);
    auto total = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
    if (!r.ok()) return Fail(r.status());
    Print({{"ok", true},
           {"pages", rs.pages},
           {"zero_pages", rs.zero_pages},
           {"stream_bytes", rs.bytes},
           {"domain", r->domain},
           {"uuid", r->uuid},
           {"qemu_pid", r->qemu_pid},
           {"restore_ms", r->restore_ms},
           {"stage_ms", r->stage_ms},
           {"total_ms", total}});
    return 0;
  }

  auto m = LibvirtMonitor::Connect(mo);
  if (!m.ok()) return Fail(m.status());
  LibvirtMonitor& mon = **m;

  if (*info) {
    auto xml = mon.MigratableXml();
    if (!xml.ok()) return Fail(xml.status());
    if (!xml_out.empty()) {
      Status w = WriteFileAtomic(xml_out, *xml);
      if (!w.ok()) return Fail(w);
    }
    auto argv0 = mon.QemuArgv();
    Print({{"ok", true},
           {"pid", mon.pid()},
           {"version", mon.version()},
           {"package", mon.package()},
           {"uuid", mon.uuid()},
           {"argv0", argv0.ok() && !argv0->empty() ? (*argv0)[0] : ""},
           {"xml_bytes", xml->size()}});
    return 0;
  }

  if (*exec) {
    json args = json::parse(args_text, nullptr, false);
    if (!args.is_object()) return Fail(InvalidArgument("--args is not a JSON object"));
    auto r = mon.Execute(command, args, timeout_ms);
    if (!r.ok()) return Fail(r.status());
    Print({{"ok", true}, {"return", *r}});
    return 0;
  }

  if (*watch) {
    Mutex mu;
    CondVar cv;
    bool lost = false;
    mon.SetEventHandler([](const json& ev) {
      // Wall-clock arrival, to compare with QEMU's timestamp (delivery delay).
      auto now = std::chrono::system_clock::now().time_since_epoch();
      Print({{"event", ev}, {"received_us", std::chrono::duration_cast<std::chrono::microseconds>(now).count()}});
    });
    mon.SetDisconnectHandler([&](const MonitorLoss& l) {
      Print({{"loss", LossJson(l)}});
      MutexLock g(mu);
      lost = true;
      cv.NotifyAll();
    });
    for (int i = 0; i < stop_resume; i++) {
      auto s = mon.Execute("stop");
      if (!s.ok()) return Fail(s.status());
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      auto c = mon.Execute("cont");
      if (!c.ok()) return Fail(c.status());
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    MutexLock l(mu);
    cv.WaitFor(mu, std::chrono::milliseconds(duration_ms), [&] { return until_loss && lost; });
    Print({{"ok", true}, {"connected", mon.connected()}});
    return 0;
  }

  if (*mig) {
    Fd fd;
    if (!mig_unix.empty()) {
      auto c = ConnectUnix(mig_unix);
      if (!c.ok()) return Fail(c.status());
      fd = std::move(c).value();
    } else if (!mig_out.empty()) {
      int f = ::open(mig_out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (f < 0) return Fail(ErrnoStatus("creating " + mig_out, errno));
      fd = Fd(f);
    } else {
      return Fail(InvalidArgument("migrate-fd needs --out or --connect-unix"));
    }
    Status p = mon.PassFd("remus-probe-mig", fd.get());
    if (!p.ok()) return Fail(p);
    fd.Reset();  // QEMU holds its own copy now
    auto r = mon.Execute("migrate", {{"uri", "fd:remus-probe-mig"}});
    if (!r.ok()) return Fail(r.status());
    if (no_wait) {
      Print({{"ok", true}});
      return 0;
    }
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      auto q = mon.Execute("query-migrate");
      if (!q.ok()) return Fail(q.status());
      std::string st = q->value("status", "");
      if (st == "completed") {
        Print({{"ok", true}, {"query-migrate", *q}});
        return 0;
      }
      if (st == "failed" || st == "cancelled")
        return Fail(FailedPrecondition("migration to fd ended " + st + ": " + q->dump()));
      if (Clock::now() > deadline) return Fail(DeadlineExceeded("migration to fd not completed: " + q->dump()));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  return 2;
}

}  // namespace
}  // namespace remus

int main(int argc, char** argv) { return remus::Main(argc, argv); }
