// The QMP boundary: commands to and events from a running QEMU.
//
// QemuMonitor is the interface the rest of the replicator talks to, so that a
// libvirt-backed monitor (virDomainQemuMonitorCommand) can replace the direct
// socket client, and tests can use a fake. QmpClient speaks QMP over QEMU's
// unix socket (`-qmp unix:PATH,server=on,wait=off`).
//
// Threads: QmpClient owns one reader thread, started by Connect and joined by
// the destructor. Execute may be called from any number of threads at once;
// each command carries a unique "id" and its response is routed back to its
// caller. The event and disconnect handlers run on the reader thread: they must
// not block for long and must not call Execute synchronously (Execute from the
// reader thread returns FailedPrecondition instead of deadlocking).
//
// Errors: a QMP "error" reply becomes FailedPrecondition (InvalidArgument for
// CommandNotFound/DeviceNotFound) naming the command, the QMP class and desc;
// a timeout is DeadlineExceeded naming the command; a closed monitor (QEMU
// exited) is Unavailable("QEMU monitor at PATH closed") for pending and all
// later commands.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus {

class QemuMonitor {
 public:
  virtual ~QemuMonitor() = default;

  // Runs one QMP command and returns its "return" value.
  virtual StatusOr<nlohmann::json> Execute(const std::string& command,
                                           const nlohmann::json& args = nlohmann::json::object(),
                                           int timeout_ms = 10000) = 0;

  // Installs the handler for asynchronous events. Each event is QMP's object as
  // sent: {"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}.
  // Called on the monitor's reader thread. Replaces any previous handler.
  virtual void SetEventHandler(std::function<void(const nlohmann::json& event)> handler) = 0;

  // HMP through QMP ("human-monitor-command"); returns the HMP output text.
  virtual StatusOr<std::string> HumanMonitorCommand(const std::string& command_line);
};

class QmpClient final : public QemuMonitor {
 public:
  // Connects to QEMU's QMP unix socket, reads the greeting and negotiates
  // capabilities (qmp_capabilities), each bounded by timeout_ms.
  static StatusOr<std::unique_ptr<QmpClient>> Connect(const std::string& socket_path,
                                                      int timeout_ms = 5000);

  // Shuts the socket down and joins the reader thread. The disconnect handler
  // does not fire for this clean shutdown. REQUIRES: no Execute in flight.
  ~QmpClient() override;

  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  StatusOr<nlohmann::json> Execute(const std::string& command,
                                   const nlohmann::json& args = nlohmann::json::object(),
                                   int timeout_ms = 10000) override;
  void SetEventHandler(std::function<void(const nlohmann::json& event)> handler) override;

  // Fires once, on the reader thread, when the monitor connection is lost
  // (QEMU exited or closed it). If already lost, fires at once on the caller's thread.
  void SetDisconnectHandler(std::function<void()> handler);

  // False once the connection is lost.
  bool connected() const;

  const std::string& socket_path() const { return path_; }
  // QEMU's process id (SO_PEERCRED of the monitor socket).
  int pid() const { return pid_; }
  // From the greeting: "7.2.22" and QMP's "package" string.
  const std::string& version() const { return version_; }
  const std::string& package() const { return package_; }
  // The greeting's full "QMP" object (version, capabilities).
  const nlohmann::json& greeting() const { return greeting_; }

  // QEMU's command line from /proc/<pid>/cmdline, argv[0] first.
  StatusOr<std::vector<std::string>> QemuArgv() const;

 private:
  struct Pending {
    std::string command;  // for error messages
    bool done = false;
    Status status;
    nlohmann::json result;
  };

  QmpClient(std::string path, Fd fd, int pid);
  void ReaderLoop(std::string buffered);
  void HandleMessage(const std::string& line);
  void MarkClosed();
  Status ClosedStatus() const;

  const std::string path_;
  Fd fd_;
  const int pid_;
  std::string version_;
  std::string package_;
  nlohmann::json greeting_;

  Mutex write_mu_;  // serializes whole commands on the socket

  mutable Mutex mu_;
  CondVar cv_;
  bool closed_ GUARDED_BY(mu_) = false;
  bool shutting_down_ GUARDED_BY(mu_) = false;
  bool disconnect_fired_ GUARDED_BY(mu_) = false;
  uint64_t next_id_ GUARDED_BY(mu_) = 1;
  std::map<std::string, std::shared_ptr<Pending>> pending_ GUARDED_BY(mu_);
  std::function<void(const nlohmann::json&)> event_handler_ GUARDED_BY(mu_);
  std::function<void()> disconnect_handler_ GUARDED_BY(mu_);

  std::thread reader_;
};

// ---- COLO support probe ----------------------------------------------------

// query-version's "package" of a QEMU built by scripts/build-qemu.sh, which
// configures it with --with-pkgversion containing this marker (7.2 and 10.0).
// That build carries the fix that takes the BQL around qemu_savevm_live_state().
inline constexpr char kPatchedMarker[] = "remus colo patches";

struct ColoProbe {
  std::string version;  // "7.2.22"
  int major = 0;
  int minor = 0;
  int micro = 0;
  std::string package;       // query-version "package", e.g. "Debian 1:7.2+dfsg-7+deb12u18"
  bool has_x_colo = false;   // migration capability x-colo exists
  std::string accelerator;   // "kvm" or "tcg"
  bool patched_tcg_fix = false;  // package contains kPatchedMarker
};

// Asks the running QEMU: query-version, query-migrate-capabilities, query-kvm.
StatusOr<ColoProbe> ProbeColo(QemuMonitor& monitor);

// Whether this QEMU's COLO primary can be used to protect `domain`.
//
// Support table (the README and docs/operator-guide.md carry it per
// distribution; "patched" = scripts/build-qemu.sh, package has kPatchedMarker):
//
//   QEMU                      accel  result
//   ------------------------  -----  ---------------------------------------------
//   no x-colo capability      any    refused: no COLO support
//   10.0.0-10.0.6,            any    refused: never enters COLO (the migration
//   10.1.0-10.1.2                    completes); fixed in 10.0.7, 10.1.3, 10.2.0
//   7.2 or 10.0.7+, patched   any    supported (tested: 7.2 and 10.0.13 under TCG)
//   7.2 .. 10.x, stock        tcg    refused: deadlocks after the first checkpoint
//                                    (BQL not held around qemu_savevm_live_state;
//                                    measured on 7.2 and 10.0.13)
//   7.2 .. 10.x, stock        kvm    allowed with a warning: the primary QEMU can
//                                    abort when a session ends (checkpoint timer
//                                    freed without the BQL); untested beyond
//                                    7.2 and 10.0
//   < 7.2, >= 11              any    allowed, untested: the caller warns; COLO entry
//                                    is verified after the initial sync anyway
//
// Refusals are FailedPrecondition with one sentence naming the domain, the
// problem and what to do.
Status CheckColoSupported(const ColoProbe& probe, const std::string& domain);

// The warning the caller logs for a QEMU that CheckColoSupported allows: a
// stock QEMU under KVM and the "allowed, untested" rows of the table above.
// Empty for a patched build.
std::string ColoWarning(const ColoProbe& probe);

// ---- the guest's network backends (for netbuf) ------------------------------

struct GuestNic {
  std::string netdev;  // backend id, e.g. "n0"
  std::string type;    // "tap", "user", "socket", "bridge", ...
  std::string ifname;  // host device for tap/bridge backends, "" if unknown
  std::string fd;      // tap opened by the caller (libvirt): the fd in QEMU
};

// Parses HMP `info network` (QEMU has no QMP command that names a tap's host
// device in 7.2). Only backend lines ("\ id: index=..,type=..") count.
std::vector<GuestNic> ParseInfoNetwork(std::string_view text);

// The host-side devices of the guest's NICs, for output buffering. A tap
// passed in by fd (libvirt) is named through /proc/PID/fdinfo ("iff:").
// FailedPrecondition when a NIC's packets cannot be held on the host
// (user-mode networking leaves through QEMU's own sockets).
StatusOr<std::vector<std::string>> GuestTapDevices(QemuMonitor& monitor, int qemu_pid, const std::string& domain);

}  // namespace remus
