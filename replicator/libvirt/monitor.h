// The QMP boundary for a QEMU that libvirt runs: QemuMonitor over the libvirt
// C API instead of QEMU's own socket (libvirt holds that one).
//
//   commands  virDomainQemuMonitorCommand[WithFiles] ({"execute", "arguments"});
//             libvirt returns QEMU's whole reply, which is parsed here, so a
//             QMP error maps to the same Status codes as QmpClient's.
//   events    virConnectDomainQemuMonitorEventRegister: every QMP event QEMU
//             sends, rebuilt into QMP's own shape {"event", "data",
//             "timestamp": {"seconds", "microseconds"}} ("data" only when QEMU
//             sent one, as QmpClient passes them).
//   loss      the domain's lifecycle event STOPPED (QEMU is gone) or the
//             connection's close callback (libvirtd is gone; QEMU may live on).
//
// Using the monitor marks the domain "tainted: custom-monitor" in libvirt's
// log; libvirt keeps working (docs/libvirt-notes.md has what was measured,
// also how libvirt's state follows COLO's STOP/RESUME).
//
// Threads: libvirt delivers events on one process-wide event loop thread,
// started by the first LibvirtMonitor and stopped when the last one is
// destroyed. The event and loss handlers run there: they must not block for
// long and must not call Execute (Execute from that thread returns
// FailedPrecondition, as QmpClient's reader thread does). Execute may be
// called from any number of other threads at once; libvirt runs one monitor
// command per domain at a time (its domain job), so calls queue there.
//
// Errors (one sentence each, naming the domain and the libvirt URI):
//   libvirt unreachable          Unavailable  (Connect: "is libvirtd running?")
//   no such domain               NotFound     (Connect)
//   domain not running           FailedPrecondition (Connect); Unavailable
//                                             for commands once it stopped
//   QMP "error" reply            FailedPrecondition, InvalidArgument for
//                                             CommandNotFound/DeviceNotFound
//   no answer within timeout_ms  DeadlineExceeded (the libvirt call keeps its
//                                             domain job until QEMU answers)
//   libvirt job lock timeout     DeadlineExceeded
//
// Process-wide side effects of the first Connect: libvirt's default event
// loop implementation is registered (virEventRegisterDefaultImpl), and
// libvirt's default error printer (to stderr) is silenced: errors reach the
// caller as Status values instead.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "replicator/qemu/qmp.h"

namespace remus {

namespace libvirt_internal {
struct MonitorSink;  // callback state shared with libvirt's event loop thread
}  // namespace libvirt_internal

inline constexpr char kDefaultLibvirtUri[] = "qemu:///system";
// Where libvirt's QEMU driver (privileged) writes <domain>.pid.
inline constexpr char kDefaultLibvirtPidDir[] = "/run/libvirt/qemu";

struct LibvirtMonitorOptions {
  std::string uri = kDefaultLibvirtUri;  // e.g. "qemu:///system?socket=/x/libvirt-sock"
  std::string domain;                    // libvirt's domain name
  // Directory of libvirt's <domain>.pid files. QEMU's pid is needed on this
  // host (taps passed by fd are named through /proc/PID/fdinfo; QEMU's argv).
  std::string pid_dir = kDefaultLibvirtPidDir;
  // libvirt keepalive: a hung libvirtd is taken as lost after about
  // interval * (count + 1) seconds. A dead one is noticed at once (EOF).
  int keepalive_interval_s = 5;
  int keepalive_count = 3;
};

// Why the monitor was lost, given to the disconnect handler.
struct MonitorLoss {
  enum class Kind {
    kDomainStopped,   // libvirt reported the domain STOPPED: QEMU is gone
    kConnectionLost,  // the connection to libvirtd closed: QEMU may still run
  };
  Kind kind = Kind::kDomainStopped;
  // kDomainStopped: libvirt's detail ("shutdown", "destroyed", "crashed",
  // "migrated", "saved", "failed", "from-snapshot"); kConnectionLost: the
  // close reason ("error", "eof", "keepalive", "client").
  std::string reason;
  int qemu_pid = -1;
  // kill(pid, 0) at the time of the loss. For kConnectionLost a live QEMU
  // means the guest still runs and must not be taken as dead (split brain).
  bool qemu_alive = false;
};

class LibvirtMonitor final : public QemuMonitor {
 public:
  // Connects to libvirt at opts.uri, finds the running domain, registers the
  // event and loss callbacks, reads QEMU's pid and asks query-version.
  // Unavailable if libvirt cannot be reached, NotFound for an unknown domain,
  // FailedPrecondition if it is not running or its pid file is unreadable.
  static StatusOr<std::unique_ptr<LibvirtMonitor>> Connect(const LibvirtMonitorOptions& opts);

  // Deregisters the callbacks (none runs after this returns) and closes the
  // connection. The disconnect handler does not fire for this clean close.
  // Execute calls that timed out may still be waiting inside libvirt; they
  // hold their own references and finish on their own.
  ~LibvirtMonitor() override;

  LibvirtMonitor(const LibvirtMonitor&) = delete;
  LibvirtMonitor& operator=(const LibvirtMonitor&) = delete;

  StatusOr<nlohmann::json> Execute(const std::string& command,
                                   const nlohmann::json& args = nlohmann::json::object(),
                                   int timeout_ms = 10000) override;
  void SetEventHandler(std::function<void(const nlohmann::json& event)> handler) override;

  // Execute with one file descriptor passed to QEMU along with the command
  // (virDomainQemuMonitorCommandWithFiles, SCM_RIGHTS through libvirtd), e.g.
  // "getfd". The caller keeps its fd.
  StatusOr<nlohmann::json> ExecuteWithFd(const std::string& command, const nlohmann::json& args, int fd,
                                         int timeout_ms = 10000);
  // Hands fd to QEMU under fdname ("getfd"): then `migrate` with uri
  // "fd:<fdname>" writes to it. Needs no path QEMU could be forbidden to open
  // (libvirt's QEMU runs as libvirt-qemu, confined by AppArmor on Debian).
  Status PassFd(const std::string& fdname, int fd, int timeout_ms = 10000);

  // Fires once, on the event loop thread, when the domain stops or the
  // connection to libvirtd is lost. If already lost, fires at once on the
  // caller's thread.
  void SetDisconnectHandler(std::function<void(const MonitorLoss&)> handler);

  // False once the domain stopped or the connection was lost.
  bool connected() const;

  const std::string& uri() const { return opts_.uri; }
  const std::string& domain() const { return opts_.domain; }
  const std::string& uuid() const { return uuid_; }
  // QEMU's process id, from <pid_dir>/<domain>.pid.
  int pid() const { return pid_; }
  // From query-version: "7.2.22" and QMP's "package" string.
  const std::string& version() const { return version_; }
  const std::string& package() const { return package_; }

  // The domain's XML as a restore on another host needs it
  // (VIR_DOMAIN_XML_MIGRATABLE | VIR_DOMAIN_XML_SECURE).
  StatusOr<std::string> MigratableXml() const;
  // The running domain's live XML (flags 0): what libvirt made of it, e.g.
  // each <interface>'s tap as <target dev='vnet0'/> (libvirt/interfaces.h).
  StatusOr<std::string> LiveXml() const;
  // QEMU's command line from /proc/<pid>/cmdline, argv[0] first.
  StatusOr<std::vector<std::string>> QemuArgv() const;

 private:
  LibvirtMonitor(LibvirtMonitorOptions opts, void* conn, void* dom);
  StatusOr<nlohmann::json> Run(const std::string& command, const nlohmann::json& args, int fd,
                               int timeout_ms);
  std::string Where() const;  // "domain web1 (libvirt qemu:///system)"

  const LibvirtMonitorOptions opts_;
  void* conn_ = nullptr;  // virConnectPtr (kept out of this header)
  void* dom_ = nullptr;   // virDomainPtr
  std::shared_ptr<libvirt_internal::MonitorSink> sink_;
  int qemu_event_cb_ = -1;
  int lifecycle_cb_ = -1;
  bool close_cb_registered_ = false;
  bool loop_acquired_ = false;
  std::string uuid_;
  int pid_ = -1;
  std::string version_;
  std::string package_;
};

// ---- internals: pure helpers (exposed for tests), the shared event loop ----

namespace libvirt_internal {

// A QMP event in QmpClient's shape from what libvirt's callback gives:
// seconds < 0 (libvirt: no timestamp) gives {"seconds": -1, "microseconds": -1}
// as QEMU itself does; details is the JSON of "data" or nullptr (no "data").
nlohmann::json MakeEvent(const char* name, long long seconds, unsigned int micros, const char* details);

// The command JSON sent through virDomainQemuMonitorCommand.
std::string MakeCommand(const std::string& command, const nlohmann::json& args);

// QEMU's reply as libvirt returns it ({"return": ...} or {"error": ...}, with
// libvirt's own "id") -> the "return" value or the Status QmpClient gives.
// where names the domain for messages.
StatusOr<nlohmann::json> ParseReply(const std::string& command, const std::string& where, const char* reply);

// A libvirt error (virErrorNumber) while running a command -> Status code.
// domain_active: whether the domain still runs (a command failing on a
// domain that stopped is Unavailable, as on a closed QMP socket).
Code CodeForLibvirtError(int vir_error_number, bool domain_active);

// Parses the text of a libvirt pid file ("1234" or "1234\n").
StatusOr<int> ParsePidFile(std::string_view text, const std::string& path);

// The process-wide libvirt event loop thread (see the top of this file), for
// other users of the libvirt API in remus (libvirt/restore.h). Each Acquire
// needs one Release.
Status AcquireEventLoop();
void ReleaseEventLoop();

// Names for libvirt's lifecycle STOPPED details and close reasons.
std::string StoppedDetailName(int detail);
std::string CloseReasonName(int reason);

}  // namespace libvirt_internal

}  // namespace remus
