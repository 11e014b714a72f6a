#include "replicator/libvirt/monitor.h"

#include <fcntl.h>
#include <signal.h>

#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <thread>
#include <utility>

#include "common/io.h"
#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {
namespace libvirt_internal {

using json = nlohmann::json;

// Serializes without throwing on invalid UTF-8 (QEMU strings can carry any bytes).
static std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// The callbacks' view of one monitor. libvirt holds a shared_ptr to it per
// registered callback (freed by libvirt's freecb), so it outlives the monitor
// if libvirt delivers late.
struct MonitorSink {
  std::string where;
  int pid = -1;

  Mutex mu;
  std::function<void(const json&)> event_handler GUARDED_BY(mu);
  std::function<void(const MonitorLoss&)> loss_handler GUARDED_BY(mu);
  bool lost GUARDED_BY(mu) = false;
  bool loss_fired GUARDED_BY(mu) = false;
  MonitorLoss loss GUARDED_BY(mu);
  // Held while a callback runs a handler; the destructor takes it to wait out
  // a handler in progress before it returns.
  Mutex dispatch_mu;
  bool alive GUARDED_BY(dispatch_mu) = true;
};

json MakeEvent(const char* name, long long seconds, unsigned int micros, const char* details) {
  json ev = json::object();
  ev["event"] = name ? name : "";
  if (details) {
    json d = json::parse(details, nullptr, /*allow_exceptions=*/false);
    if (!d.is_discarded()) ev["data"] = std::move(d);
  }
  if (seconds < 0) {
    ev["timestamp"] = {{"seconds", -1}, {"microseconds", -1}};
  } else {
    ev["timestamp"] = {{"seconds", seconds}, {"microseconds", micros}};
  }
  return ev;
}

std::string MakeCommand(const std::string& command, const json& args) {
  json msg = {{"execute", command}};
  if (args.is_object() && !args.empty()) msg["arguments"] = args;
  return Dump(msg);
}

// Same mapping as QmpClient's (qmp.cc): a command QEMU does not know, or a
// device it does not have, is the caller's mistake; anything else is a state
// QEMU refuses in.
static Code QmpErrorCode(const std::string& cls) {
  if (cls == "CommandNotFound" || cls == "DeviceNotFound") return Code::kInvalidArgument;
  return Code::kFailedPrecondition;
}

StatusOr<json> ParseReply(const std::string& command, const std::string& where, const char* reply) {
  if (!reply) return Internal("QMP command '" + command + "' on " + where + ": libvirt returned no reply");
  json m = json::parse(reply, nullptr, /*allow_exceptions=*/false);
  if (!m.is_object())
    return Internal("QMP command '" + command + "' on " + where + ": reply is not a JSON object: " +
                    std::string(reply).substr(0, 200));
  if (m.contains("error")) {
    const json& e = m["error"];
    std::string cls = e.is_object() && e.contains("class") && e["class"].is_string()
                          ? e["class"].get<std::string>() : "UnknownError";
    std::string desc = e.is_object() && e.contains("desc") && e["desc"].is_string()
                           ? e["desc"].get<std::string>() : Dump(e);
    return Status(QmpErrorCode(cls), "QMP command '" + command + "' failed on " + where + ": " + cls + ": " + desc);
  }
  if (!m.contains("return"))
    return Internal("QMP command '" + command + "' on " + where + ": reply has neither return nor error: " +
                    Dump(m).substr(0, 200));
  return std::move(m["return"]);
}

Code CodeForLibvirtError(int vir_error_number, bool domain_active) {
  switch (vir_error_number) {
    case VIR_ERR_OPERATION_TIMEOUT:  // "cannot acquire state change lock": another job holds the domain
      return Code::kDeadlineExceeded;
    case VIR_ERR_NO_CONNECT:
    case VIR_ERR_INVALID_CONN:
    case VIR_ERR_RPC:
    case VIR_ERR_SYSTEM_ERROR:
    case VIR_ERR_NO_DOMAIN:
      return Code::kUnavailable;
    case VIR_ERR_ARGUMENT_UNSUPPORTED:
    case VIR_ERR_INVALID_ARG:
    case VIR_ERR_NO_SUPPORT:
      return Code::kInvalidArgument;
    case VIR_ERR_AUTH_FAILED:
    case VIR_ERR_AUTH_CANCELLED:
    case VIR_ERR_AUTH_UNAVAILABLE:
    case VIR_ERR_ACCESS_DENIED:
    case VIR_ERR_OPERATION_DENIED:
      return Code::kPermissionDenied;
    default:
      // "domain is not running", "End of file from qemu monitor", ...: on a
      // domain that is gone these are the closed monitor QmpClient reports.
      return domain_active ? Code::kInternal : Code::kUnavailable;
  }
}

StatusOr<int> ParsePidFile(std::string_view text, const std::string& path) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\r')) text.remove_suffix(1);
  if (text.empty() || text.size() > 10) return InvalidArgument("pid file " + path + " does not hold a pid");
  long v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return InvalidArgument("pid file " + path + " does not hold a pid: '" + std::string(text) + "'");
    v = v * 10 + (c - '0');
  }
  if (v <= 0 || v > 0x3fffffff) return InvalidArgument("pid file " + path + " holds an invalid pid " + std::to_string(v));
  return static_cast<int>(v);
}

std::string StoppedDetailName(int detail) {
  switch (detail) {
    case VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: return "shutdown";
    case VIR_DOMAIN_EVENT_STOPPED_DESTROYED: return "destroyed";
    case VIR_DOMAIN_EVENT_STOPPED_CRASHED: return "crashed";
    case VIR_DOMAIN_EVENT_STOPPED_MIGRATED: return "migrated";
    case VIR_DOMAIN_EVENT_STOPPED_SAVED: return "saved";
    case VIR_DOMAIN_EVENT_STOPPED_FAILED: return "failed";
    case VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: return "from-snapshot";
    default: return "stopped(" + std::to_string(detail) + ")";
  }
}

std::string CloseReasonName(int reason) {
  switch (reason) {
    case VIR_CONNECT_CLOSE_REASON_ERROR: return "error";
    case VIR_CONNECT_CLOSE_REASON_EOF: return "eof";
    case VIR_CONNECT_CLOSE_REASON_KEEPALIVE: return "keepalive";
    case VIR_CONNECT_CLOSE_REASON_CLIENT: return "client";
    default: return "close(" + std::to_string(reason) + ")";
  }
}

}  // namespace libvirt_internal

namespace {

using json = nlohmann::json;
using libvirt_internal::MonitorSink;
using Clock = std::chrono::steady_clock;

constexpr char kTag[] = "libvirt";

// The last libvirt error of this thread (libvirt keeps it thread-local).
struct VirError {
  int code = VIR_ERR_OK;
  std::string message;
};

VirError LastError() {
  VirError e;
  virErrorPtr err = virGetLastError();
  if (err) {
    e.code = err->code;
    e.message = err->message ? err->message : "unknown libvirt error";
  } else {
    e.message = "unknown libvirt error";
  }
  return e;
}

// ---- the process-wide event loop --------------------------------------------

// libvirt's default event loop implementation is process-wide: registered
// once, before the first connection, and run by one thread. That thread runs
// while at least one LibvirtMonitor exists.
class EventLoop {
 public:
  static EventLoop& Get() {
    static EventLoop* loop = new EventLoop();  // never destroyed: threads may outlive main's statics
    return *loop;
  }

  Status Acquire() {
    MutexLock l(mu_);
    if (!registered_) {
      if (virInitialize() < 0) return Internal("libvirt: virInitialize failed");
      // Errors reach callers as Status values; libvirt's default handler would
      // also print each to stderr.
      virSetErrorFunc(nullptr, [](void*, virErrorPtr) {});
      if (virEventRegisterDefaultImpl() < 0)
        return Internal("libvirt: cannot register the default event loop: " + LastError().message);
      registered_ = true;
    }
    if (refs_++ == 0) {
      stop_ = false;
      thread_ = std::thread([this] { Run(); });
    }
    return OkStatus();
  }

  void Release() {
    MutexLock l(mu_);
    if (--refs_ > 0) return;
    stop_ = true;
    // A zero timeout fires on the loop's next iteration and wakes its poll;
    // the callback removes itself.
    int t = virEventAddTimeout(0, [](int timer, void*) { virEventRemoveTimeout(timer); }, nullptr, nullptr);
    if (t < 0) LOG_WARN(kTag) << "cannot wake libvirt's event loop: " << LastError().message;
    if (std::this_thread::get_id() == thread_.get_id()) {
      thread_.detach();  // the last monitor died inside a handler: the loop ends on its own
    } else if (thread_.joinable()) {
      thread_.join();
    }
  }

  bool OnLoopThread() const { return std::this_thread::get_id() == loop_id_.load(); }

 private:
  void Run() {
    loop_id_ = std::this_thread::get_id();
    while (!stop_) {
      if (virEventRunDefaultImpl() < 0) {
        LOG_WARN(kTag) << "libvirt event loop: " << LastError().message;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    loop_id_ = std::thread::id();
  }

  Mutex mu_;
  bool registered_ GUARDED_BY(mu_) = false;
  int refs_ GUARDED_BY(mu_) = 0;
  std::thread thread_ GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::atomic<std::thread::id> loop_id_{};
};

// ---- callbacks (on the event loop thread) ------------------------------------

void FreeSink(void* opaque) { delete static_cast<std::shared_ptr<MonitorSink>*>(opaque); }
void* NewSinkRef(const std::shared_ptr<MonitorSink>& s) { return new std::shared_ptr<MonitorSink>(s); }
MonitorSink& SinkOf(void* opaque) { return **static_cast<std::shared_ptr<MonitorSink>*>(opaque); }

void OnQemuEvent(virConnectPtr, virDomainPtr, const char* event, long long seconds, unsigned int micros,
                 const char* details, void* opaque) {
  MonitorSink& s = SinkOf(opaque);
  MutexLock d(s.dispatch_mu);
  if (!s.alive) return;
  std::function<void(const json&)> handler;
  {
    MutexLock l(s.mu);
    handler = s.event_handler;
  }
  LOG_DEBUG(kTag) << "event " << (event ? event : "?") << " from " << s.where;
  if (handler) handler(libvirt_internal::MakeEvent(event, seconds, micros, details));
}

void Lose(MonitorSink& s, MonitorLoss loss) {
  MutexLock d(s.dispatch_mu);
  if (!s.alive) return;
  std::function<void(const MonitorLoss&)> handler;
  {
    MutexLock l(s.mu);
    if (s.lost) return;
    s.lost = true;
    s.loss = loss;
    if (s.loss_handler && !s.loss_fired) {
      s.loss_fired = true;
      handler = std::move(s.loss_handler);
    }
  }
  if (loss.kind == MonitorLoss::Kind::kDomainStopped) {
    LOG_WARN(kTag) << s.where << " stopped (" << loss.reason << "); QEMU pid " << loss.qemu_pid << " is gone";
  } else {
    LOG_WARN(kTag) << "connection to libvirt lost (" << loss.reason << ") for " << s.where << "; QEMU pid "
                   << loss.qemu_pid << (loss.qemu_alive ? " still runs" : " is gone");
  }
  if (handler) handler(loss);
}

int OnLifecycle(virConnectPtr, virDomainPtr, int event, int detail, void* opaque) {
  if (event != VIR_DOMAIN_EVENT_STOPPED) return 0;
  MonitorSink& s = SinkOf(opaque);
  MonitorLoss loss;
  loss.kind = MonitorLoss::Kind::kDomainStopped;
  loss.reason = libvirt_internal::StoppedDetailName(detail);
  loss.qemu_pid = s.pid;
  loss.qemu_alive = ProcessRunning(s.pid);
  Lose(s, std::move(loss));
  return 0;
}

void OnClose(virConnectPtr, int reason, void* opaque) {
  MonitorSink& s = SinkOf(opaque);
  MonitorLoss loss;
  loss.kind = MonitorLoss::Kind::kConnectionLost;
  loss.reason = libvirt_internal::CloseReasonName(reason);
  loss.qemu_pid = s.pid;
  loss.qemu_alive = ProcessRunning(s.pid);
  Lose(s, std::move(loss));
}

// ---- one monitor command on a worker thread ----------------------------------

// libvirt's call has no timeout of its own; it runs on a thread of its own so
// the caller can give up at its deadline. The call keeps references to the
// domain (and through it the connection) until it returns.
struct Call {
  Mutex mu;
  CondVar cv;
  bool done GUARDED_BY(mu) = false;
  int rc GUARDED_BY(mu) = -1;
  std::string reply GUARDED_BY(mu);
  VirError error GUARDED_BY(mu);
  bool domain_active GUARDED_BY(mu) = true;
};

}  // namespace

namespace libvirt_internal {
Status AcquireEventLoop() { return EventLoop::Get().Acquire(); }
void ReleaseEventLoop() { EventLoop::Get().Release(); }
}  // namespace libvirt_internal

// ---- LibvirtMonitor ----------------------------------------------------------

LibvirtMonitor::LibvirtMonitor(LibvirtMonitorOptions opts, void* conn, void* dom)
    : opts_(std::move(opts)), conn_(conn), dom_(dom), sink_(std::make_shared<MonitorSink>()) {}

std::string LibvirtMonitor::Where() const { return "domain " + opts_.domain + " (libvirt " + opts_.uri + ")"; }

StatusOr<std::unique_ptr<LibvirtMonitor>> LibvirtMonitor::Connect(const LibvirtMonitorOptions& opts) {
  if (opts.domain.empty()) return InvalidArgument("libvirt monitor: no domain name given");
  RETURN_IF_ERROR(EventLoop::Get().Acquire());
  virConnectPtr conn = virConnectOpen(opts.uri.c_str());
  if (!conn) {
    VirError e = LastError();
    EventLoop::Get().Release();
    return Unavailable("cannot connect to libvirt at " + opts.uri + " for domain " + opts.domain + ": " + e.message +
                       "; is libvirtd running (systemctl status libvirtd) and is the URI right?");
  }
  virDomainPtr dom = virDomainLookupByName(conn, opts.domain.c_str());
  if (!dom) {
    VirError e = LastError();
    virConnectClose(conn);
    EventLoop::Get().Release();
    if (e.code == VIR_ERR_NO_DOMAIN)
      return NotFound("libvirt at " + opts.uri + " has no domain " + opts.domain + "; `virsh -c " + opts.uri +
                      " list --all` lists the known ones");
    return Unavailable("cannot look up domain " + opts.domain + " on libvirt at " + opts.uri + ": " + e.message);
  }
  // From here on the destructor cleans up.
  std::unique_ptr<LibvirtMonitor> m(new LibvirtMonitor(opts, conn, dom));
  m->loop_acquired_ = true;
  const std::string where = m->Where();
  m->sink_->where = where;

  char uuid[VIR_UUID_STRING_BUFLEN] = {0};
  if (virDomainGetUUIDString(dom, uuid) == 0) m->uuid_ = uuid;

  if (virConnectSetKeepAlive(conn, opts.keepalive_interval_s, opts.keepalive_count) < 0) {
    VirError e = LastError();
    // Local drivers (test:///) have no keepalive; a remote libvirtd should.
    if (e.code != VIR_ERR_NO_SUPPORT) LOG_WARN(kTag) << "cannot set keepalive on libvirt " << opts.uri << ": " << e.message;
  }

  auto check_running = [&]() -> Status {
    int state = 0, reason = 0;
    if (virDomainGetState(dom, &state, &reason, 0) < 0)
      return Unavailable("cannot read the state of " + where + ": " + LastError().message);
    if (state == VIR_DOMAIN_RUNNING || state == VIR_DOMAIN_PAUSED) return OkStatus();
    std::string st = state == VIR_DOMAIN_SHUTOFF ? "shut off"
                     : state == VIR_DOMAIN_CRASHED ? "crashed"
                     : state == VIR_DOMAIN_SHUTDOWN ? "shutting down"
                     : "not running (state " + std::to_string(state) + ")";
    return FailedPrecondition(where + " is " + st + "; start it first (virsh -c " + opts.uri + " start " +
                              opts.domain + ")");
  };
  RETURN_IF_ERROR(check_running());

  // Callbacks, then the state again, so a stop in between is not missed.
  // libvirt calls FreeSink on a callback's ref when the callback is
  // deregistered; a registration that fails leaves the ref to us.
  void* ref = NewSinkRef(m->sink_);
  m->qemu_event_cb_ = virConnectDomainQemuMonitorEventRegister(conn, dom, nullptr, OnQemuEvent, ref, FreeSink, 0);
  if (m->qemu_event_cb_ < 0) {
    VirError e = LastError();
    FreeSink(ref);
    if (e.code == VIR_ERR_NO_SUPPORT)
      return FailedPrecondition(where + " is not run by libvirt's QEMU driver (no QEMU monitor): " + e.message);
    return Unavailable("cannot subscribe to QEMU events of " + where + ": " + e.message);
  }
  ref = NewSinkRef(m->sink_);
  m->lifecycle_cb_ = virConnectDomainEventRegisterAny(conn, dom, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                      VIR_DOMAIN_EVENT_CALLBACK(OnLifecycle), ref, FreeSink);
  if (m->lifecycle_cb_ < 0) {
    VirError e = LastError();
    FreeSink(ref);
    return Unavailable("cannot subscribe to lifecycle events of " + where + ": " + e.message);
  }
  ref = NewSinkRef(m->sink_);
  if (virConnectRegisterCloseCallback(conn, OnClose, ref, FreeSink) < 0) {
    VirError e = LastError();
    FreeSink(ref);
    return Unavailable("cannot register a close callback on libvirt " + opts.uri + ": " + e.message);
  }
  m->close_cb_registered_ = true;
  RETURN_IF_ERROR(check_running());

  const std::string pid_path = opts.pid_dir + "/" + opts.domain + ".pid";
  auto text = ReadFileToString(pid_path);
  if (!text.ok())
    return FailedPrecondition("cannot read QEMU's pid of " + where + " from " + pid_path + ": " +
                              text.status().message() + " (remus must run on the domain's host, as root; "
                              "set the pid directory if libvirt keeps its run files elsewhere)");
  ASSIGN_OR_RETURN(int pid, libvirt_internal::ParsePidFile(*text, pid_path));
  if (!ProcessRunning(pid))
    return FailedPrecondition(where + ": " + pid_path + " names pid " + std::to_string(pid) + ", which is not running");
  m->pid_ = pid;
  m->sink_->pid = pid;

  ASSIGN_OR_RETURN(json ver, m->Execute("query-version"));
  if (ver.is_object() && ver.contains("qemu") && ver["qemu"].is_object()) {
    const json& q = ver["qemu"];
    m->version_ = std::to_string(q.value("major", 0)) + "." + std::to_string(q.value("minor", 0)) + "." +
                  std::to_string(q.value("micro", 0));
  }
  if (ver.is_object() && ver.contains("package") && ver["package"].is_string())
    m->package_ = ver["package"].get<std::string>();
  LOG_INFO(kTag) << "connected to QEMU " << m->version_ << " (pid " << pid << ") of " << where;
  return m;
}

LibvirtMonitor::~LibvirtMonitor() {
  auto* conn = static_cast<virConnectPtr>(conn_);
  auto* dom = static_cast<virDomainPtr>(dom_);
  if (conn) {
    if (qemu_event_cb_ >= 0) virConnectDomainQemuMonitorEventDeregister(conn, qemu_event_cb_);
    if (lifecycle_cb_ >= 0) virConnectDomainEventDeregisterAny(conn, lifecycle_cb_);
    if (close_cb_registered_) virConnectUnregisterCloseCallback(conn, OnClose);
  }
  {
    // Waits out a handler in progress on the loop thread, unless this is
    // that thread: then no other thread dispatches, and a handler below us
    // on this stack may hold dispatch_mu already (it is not recursive).
    if (EventLoop::Get().OnLoopThread()) {
      sink_->dispatch_mu.AssertHeld();
      sink_->alive = false;
    } else {
      MutexLock d(sink_->dispatch_mu);
      sink_->alive = false;
    }
  }
  if (dom) virDomainFree(dom);
  if (conn) virConnectClose(conn);
  if (loop_acquired_) EventLoop::Get().Release();
}

void LibvirtMonitor::SetEventHandler(std::function<void(const json&)> handler) {
  MutexLock l(sink_->mu);
  sink_->event_handler = std::move(handler);
}

void LibvirtMonitor::SetDisconnectHandler(std::function<void(const MonitorLoss&)> handler) {
  MutexLock l(sink_->mu);
  if (sink_->lost && !sink_->loss_fired) {
    sink_->loss_fired = true;
    MonitorLoss loss = sink_->loss;
    l.Unlock();
    if (handler) handler(loss);
    return;
  }
  sink_->loss_handler = std::move(handler);
}

bool LibvirtMonitor::connected() const {
  MutexLock l(sink_->mu);
  return !sink_->lost;
}

StatusOr<json> LibvirtMonitor::Execute(const std::string& command, const json& args, int timeout_ms) {
  return Run(command, args, -1, timeout_ms);
}

StatusOr<json> LibvirtMonitor::ExecuteWithFd(const std::string& command, const json& args, int fd, int timeout_ms) {
  if (fd < 0) return InvalidArgument("QMP command '" + command + "' on " + Where() + ": no fd to pass");
  return Run(command, args, fd, timeout_ms);
}

Status LibvirtMonitor::PassFd(const std::string& fdname, int fd, int timeout_ms) {
  return ExecuteWithFd("getfd", {{"fdname", fdname}}, fd, timeout_ms).status();
}

StatusOr<json> LibvirtMonitor::Run(const std::string& command, const json& args, int fd, int timeout_ms) {
  if (EventLoop::Get().OnLoopThread())
    return FailedPrecondition("QMP command '" + command + "' on " + Where() +
                              " issued from libvirt's event loop thread (an event handler) would stall every "
                              "event; issue it from another thread");
  {
    MutexLock l(sink_->mu);
    if (sink_->lost) {
      MonitorLoss loss = sink_->loss;
      if (loss.kind == MonitorLoss::Kind::kDomainStopped)
        return Unavailable(Where() + " stopped (" + loss.reason + "); QMP command '" + command + "' not sent");
      return Unavailable("connection to libvirt at " + opts_.uri + " lost (" + loss.reason + "); QMP command '" +
                         command + "' to domain " + opts_.domain + " not sent");
    }
  }
  Fd dup_fd;
  if (fd >= 0) {
    dup_fd = Fd(::fcntl(fd, F_DUPFD_CLOEXEC, 3));
    if (!dup_fd.valid()) return ErrnoStatus("duplicating the fd for QMP command '" + command + "'", errno);
  }
  auto call = std::make_shared<Call>();
  auto* dom = static_cast<virDomainPtr>(dom_);
  if (virDomainRef(dom) < 0) return Internal("libvirt: virDomainRef failed for " + Where());
  std::string cmd = libvirt_internal::MakeCommand(command, args);
  LOG_DEBUG(kTag) << "-> " << opts_.domain << " " << cmd;
  std::thread([call, dom, cmd = std::move(cmd), pass = dup_fd.Release()]() mutable {
    char* reply = nullptr;
    int rc;
    if (pass >= 0) {
      int fds[1] = {pass};
      rc = virDomainQemuMonitorCommandWithFiles(dom, cmd.c_str(), 1, fds, nullptr, nullptr, &reply, 0);
      ::close(pass);
    } else {
      rc = virDomainQemuMonitorCommand(dom, cmd.c_str(), &reply, 0);
    }
    VirError err;
    bool active = true;
    if (rc < 0) {
      err = LastError();
      active = virDomainIsActive(dom) == 1;
    }
    virDomainFree(dom);
    MutexLock l(call->mu);
    call->rc = rc;
    if (reply) {
      call->reply = reply;
      free(reply);
    }
    call->error = std::move(err);
    call->domain_active = active;
    call->done = true;
    call->cv.NotifyAll();
  }).detach();

  MutexLock l(call->mu);
  if (!call->cv.WaitFor(call->mu, std::chrono::milliseconds(timeout_ms), [&]() REQUIRES(call->mu) { return call->done; }))
    return DeadlineExceeded("QMP command '" + command + "' got no answer from " + Where() + " within " +
                            std::to_string(timeout_ms) + " ms");
  if (call->rc < 0) {
    Code code = libvirt_internal::CodeForLibvirtError(call->error.code, call->domain_active);
    return Status(code, "QMP command '" + command + "' on " + Where() + " failed in libvirt: " + call->error.message);
  }
  return libvirt_internal::ParseReply(command, Where(), call->reply.c_str());
}

StatusOr<std::string> LibvirtMonitor::MigratableXml() const {
  char* xml = virDomainGetXMLDesc(static_cast<virDomainPtr>(dom_), VIR_DOMAIN_XML_MIGRATABLE | VIR_DOMAIN_XML_SECURE);
  if (!xml) return Unavailable("cannot read the XML of " + Where() + ": " + LastError().message);
  std::string s(xml);
  free(xml);
  return s;
}

StatusOr<std::string> LibvirtMonitor::LiveXml() const {
  char* xml = virDomainGetXMLDesc(static_cast<virDomainPtr>(dom_), 0);
  if (!xml) return Unavailable("cannot read the live XML of " + Where() + ": " + LastError().message);
  std::string s(xml);
  free(xml);
  return s;
}

StatusOr<std::vector<std::string>> LibvirtMonitor::QemuArgv() const {
  if (pid_ <= 0) return FailedPrecondition(Where() + ": QEMU's pid unknown");
  ASSIGN_OR_RETURN(std::string raw, ReadFileToString("/proc/" + std::to_string(pid_) + "/cmdline"));
  std::vector<std::string> argv;
  size_t start = 0;
  while (start < raw.size()) {
    size_t end = raw.find('\0', start);
    if (end == std::string::npos) end = raw.size();
    argv.push_back(raw.substr(start, end - start));
    start = end + 1;
  }
  if (argv.empty()) return NotFound("QEMU pid " + std::to_string(pid_) + " of " + Where() + " has no command line (exited?)");
  return argv;
}

}  // namespace remus
