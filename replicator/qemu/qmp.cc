#include "replicator/qemu/qmp.h"

#include <sys/socket.h>

#include <chrono>
#include <utility>

#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr char kTag[] = "qmp";

// Serializes without throwing on invalid UTF-8 (QEMU strings can carry any bytes).
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// Maps a QMP error class to a Status code. QMP's classes are coarse; a command
// QEMU does not know (or a device it does not have) is the caller's mistake,
// anything else is a state QEMU refuses in.
Code QmpErrorCode(const std::string& cls) {
  if (cls == "CommandNotFound" || cls == "DeviceNotFound") return Code::kInvalidArgument;
  return Code::kFailedPrecondition;
}

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left < 0 ? 0 : static_cast<int>(left);
}

}  // namespace

StatusOr<std::string> QemuMonitor::HumanMonitorCommand(const std::string& command_line) {
  ASSIGN_OR_RETURN(json r, Execute("human-monitor-command", json{{"command-line", command_line}}));
  if (!r.is_string())
    return Internal("human-monitor-command '" + command_line + "' returned a non-string: " + Dump(r));
  return r.get<std::string>();
}

// ---- QmpClient -------------------------------------------------------------

QmpClient::QmpClient(std::string path, Fd fd, int pid)
    : path_(std::move(path)), fd_(std::move(fd)), pid_(pid) {}

StatusOr<std::unique_ptr<QmpClient>> QmpClient::Connect(const std::string& socket_path,
                                                        int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  auto connected = ConnectUnix(socket_path);
  if (!connected.ok())
    return Unavailable("cannot connect to QEMU monitor at " + socket_path + ": " +
                       connected.status().message());
  Fd fd = std::move(connected).value();
  ASSIGN_OR_RETURN(PeerCred cred, GetPeerCred(fd.get()));

  // The greeting arrives unasked; read it before the reader thread starts.
  std::string buf;
  size_t nl;
  FdSource src(fd.get());
  while ((nl = buf.find('\n')) == std::string::npos) {
    ASSIGN_OR_RETURN(bool readable, WaitReadable(fd.get(), RemainingMs(deadline)));
    if (!readable)
      return DeadlineExceeded("no QMP greeting from QEMU monitor at " + socket_path + " within " +
                              std::to_string(timeout_ms) + " ms");
    char chunk[4096];
    ASSIGN_OR_RETURN(size_t n, src.ReadSome(chunk, sizeof chunk));
    if (n == 0) return Unavailable("QEMU monitor at " + socket_path + " closed before its greeting");
    buf.append(chunk, n);
  }
  json greeting = json::parse(buf.substr(0, nl), nullptr, /*allow_exceptions=*/false);
  buf.erase(0, nl + 1);
  if (!greeting.is_object() || !greeting.contains("QMP") || !greeting["QMP"].is_object())
    return InvalidArgument("QEMU monitor at " + socket_path + " did not send a QMP greeting");

  std::unique_ptr<QmpClient> c(new QmpClient(socket_path, std::move(fd), cred.pid));
  c->greeting_ = greeting["QMP"];
  const json& v = c->greeting_.value("version", json::object());
  if (v.contains("qemu") && v["qemu"].is_object()) {
    const json& q = v["qemu"];
    c->version_ = std::to_string(q.value("major", 0)) + "." + std::to_string(q.value("minor", 0)) +
                  "." + std::to_string(q.value("micro", 0));
  }
  if (v.contains("package") && v["package"].is_string()) c->package_ = v["package"].get<std::string>();

  c->reader_ = std::thread([self = c.get(), rest = std::move(buf)]() mutable {
    self->ReaderLoop(std::move(rest));
  });
  auto caps = c->Execute("qmp_capabilities", json::object(), RemainingMs(deadline));
  if (!caps.ok()) return caps.status();
  LOG_INFO(kTag) << "connected to QEMU " << c->version_ << " (pid " << c->pid_ << ") at "
                 << socket_path;
  return c;
}

QmpClient::~QmpClient() {
  {
    MutexLock l(mu_);
    shutting_down_ = true;
  }
  if (fd_.valid()) ::shutdown(fd_.get(), SHUT_RDWR);
  if (reader_.joinable()) reader_.join();
}

Status QmpClient::ClosedStatus() const { return Unavailable("QEMU monitor at " + path_ + " closed"); }

bool QmpClient::connected() const {
  MutexLock l(mu_);
  return !closed_;
}

void QmpClient::SetEventHandler(std::function<void(const json&)> handler) {
  MutexLock l(mu_);
  event_handler_ = std::move(handler);
}

void QmpClient::SetDisconnectHandler(std::function<void()> handler) {
  MutexLock l(mu_);
  if (closed_ && !disconnect_fired_ && !shutting_down_) {
    disconnect_fired_ = true;
    l.Unlock();
    if (handler) handler();
    return;
  }
  disconnect_handler_ = std::move(handler);
}

StatusOr<json> QmpClient::Execute(const std::string& command, const json& args, int timeout_ms) {
  if (std::this_thread::get_id() == reader_.get_id())
    return FailedPrecondition("QMP command '" + command +
                              "' issued from the monitor's reader thread (an event handler) would "
                              "deadlock; issue it from another thread");
  auto p = std::make_shared<Pending>();
  p->command = command;
  std::string id;
  {
    MutexLock l(mu_);
    if (closed_) return ClosedStatus();
    id = "remus-" + std::to_string(next_id_++);
    pending_[id] = p;
  }
  json msg = {{"execute", command}, {"id", id}};
  if (args.is_object() && !args.empty()) msg["arguments"] = args;
  std::string line = Dump(msg) + "\n";
  Status w;
  {
    MutexLock l(write_mu_);
    w = WriteFull(fd_.get(), line.data(), line.size());
  }
  LOG_DEBUG(kTag) << "-> " << line.substr(0, line.size() - 1);

  MutexLock l(mu_);
  if (!w.ok()) {
    pending_.erase(id);
    if (closed_) return ClosedStatus();
    return Unavailable("QMP command '" + command + "' to QEMU monitor at " + path_ +
                       " not sent: " + w.message());
  }
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  if (!cv_.WaitUntil(mu_, deadline, [&]() REQUIRES(mu_) { return p->done; })) {
    pending_.erase(id);
    return DeadlineExceeded("QMP command '" + command + "' got no answer from QEMU monitor at " +
                            path_ + " within " + std::to_string(timeout_ms) + " ms");
  }
  if (!p->status.ok()) return p->status;
  return std::move(p->result);
}

void QmpClient::ReaderLoop(std::string buf) {
  FdSource src(fd_.get());
  char chunk[65536];
  for (;;) {
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty()) HandleMessage(line);
    }
    auto n = src.ReadSome(chunk, sizeof chunk);
    if (!n.ok() || *n == 0) {
      if (!n.ok()) {
        LOG_DEBUG(kTag) << "read from " << path_ << ": " << n.status().ToString();
      }
      break;
    }
    buf.append(chunk, *n);
  }
  MarkClosed();
}

void QmpClient::HandleMessage(const std::string& line) {
  json m = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!m.is_object()) {
    LOG_WARN(kTag) << "QEMU monitor at " << path_ << " sent a line that is not a JSON object: "
                   << line.substr(0, 200);
    return;
  }
  if (m.contains("event")) {
    std::function<void(const json&)> handler;
    {
      MutexLock l(mu_);
      handler = event_handler_;
    }
    LOG_DEBUG(kTag) << "event " << Dump(m["event"]);
    if (handler) handler(m);
    return;
  }
  if (!m.contains("return") && !m.contains("error")) {
    LOG_WARN(kTag) << "QEMU monitor at " << path_ << " sent an unknown message: " << line.substr(0, 200);
    return;
  }
  std::string id = m.contains("id") && m["id"].is_string() ? m["id"].get<std::string>() : "";
  MutexLock l(mu_);
  auto it = pending_.find(id);
  if (it == pending_.end()) {
    // A caller that timed out has gone away; its late answer is dropped.
    LOG_DEBUG(kTag) << "dropping answer for unknown id '" << id << "'";
    return;
  }
  Pending& p = *it->second;
  if (m.contains("error")) {
    const json& e = m["error"];
    std::string cls = e.is_object() && e.contains("class") && e["class"].is_string()
                          ? e["class"].get<std::string>() : "UnknownError";
    std::string desc = e.is_object() && e.contains("desc") && e["desc"].is_string()
                           ? e["desc"].get<std::string>() : Dump(e);
    p.status = Status(QmpErrorCode(cls), "QMP command '" + p.command + "' failed on QEMU monitor at " +
                                             path_ + ": " + cls + ": " + desc);
  } else {
    p.result = std::move(m["return"]);
  }
  p.done = true;
  pending_.erase(it);
  cv_.NotifyAll();
}

void QmpClient::MarkClosed() {
  std::function<void()> handler;
  {
    MutexLock l(mu_);
    closed_ = true;
    for (auto& [id, p] : pending_) {
      p->status = ClosedStatus();
      p->done = true;
    }
    pending_.clear();
    cv_.NotifyAll();
    if (!shutting_down_ && !disconnect_fired_) {
      if (disconnect_handler_) {
        disconnect_fired_ = true;
        handler = std::move(disconnect_handler_);
      }
      LOG_WARN(kTag) << "QEMU monitor at " << path_ << " closed (QEMU pid " << pid_ << " exited?)";
    }
  }
  if (handler) handler();
}

StatusOr<std::vector<std::string>> QmpClient::QemuArgv() const {
  if (pid_ <= 0) return FailedPrecondition("QEMU monitor at " + path_ + ": peer pid unknown");
  ASSIGN_OR_RETURN(std::string raw, ReadFileToString("/proc/" + std::to_string(pid_) + "/cmdline"));
  std::vector<std::string> argv;
  size_t start = 0;
  while (start < raw.size()) {
    size_t end = raw.find('\0', start);
    if (end == std::string::npos) end = raw.size();
    argv.push_back(raw.substr(start, end - start));
    start = end + 1;
  }
  if (argv.empty())
    return NotFound("QEMU pid " + std::to_string(pid_) + " has no command line (exited?)");
  return argv;
}

// ---- COLO probe ------------------------------------------------------------

StatusOr<ColoProbe> ProbeColo(QemuMonitor& monitor) {
  ColoProbe p;
  ASSIGN_OR_RETURN(json ver, monitor.Execute("query-version"));
  if (!ver.is_object() || !ver.contains("qemu") || !ver["qemu"].is_object())
    return Internal("query-version returned an unexpected answer: " + Dump(ver));
  const json& q = ver["qemu"];
  auto num = [&](const char* k) { return q.contains(k) && q[k].is_number_integer() ? q[k].get<int>() : 0; };
  p.major = num("major");
  p.minor = num("minor");
  p.micro = num("micro");
  p.version = std::to_string(p.major) + "." + std::to_string(p.minor) + "." + std::to_string(p.micro);
  if (ver.contains("package") && ver["package"].is_string()) p.package = ver["package"].get<std::string>();
  p.patched_tcg_fix = p.package.find(kPatchedMarker) != std::string::npos;

  ASSIGN_OR_RETURN(json caps, monitor.Execute("query-migrate-capabilities"));
  if (!caps.is_array())
    return Internal("query-migrate-capabilities returned an unexpected answer: " + Dump(caps));
  for (const json& c : caps) {
    if (c.is_object() && c.contains("capability") && c["capability"] == "x-colo") p.has_x_colo = true;
  }

  ASSIGN_OR_RETURN(json kvm, monitor.Execute("query-kvm"));
  bool kvm_on = kvm.is_object() && kvm.contains("enabled") && kvm["enabled"].is_boolean() &&
                kvm["enabled"].get<bool>();
  p.accelerator = kvm_on ? "kvm" : "tcg";
  return p;
}

// Keep in step with the table in qmp.h (and the README).
namespace {
// QEMU 10.0.0-10.0.6 and 10.1.0-10.1.2: upstream 48814111366b made the
// source pass through the "device" state, and migration_completion() still
// tested for "active" before entering COLO, so the migration completed.
// Fixed by upstream 0b5bf4ea76, in 10.0.7, 10.1.3 and 10.2.0.
bool NeverEntersColo(const ColoProbe& p) {
  return p.major == 10 && ((p.minor == 0 && p.micro < 7) || (p.minor == 1 && p.micro < 3));
}
// The releases whose COLO primary drops the BQL around qemu_savevm_live_state
// (deadlock under TCG) and frees its checkpoint timer without it: measured
// on 7.2 and 10.0.13, the same code in between.
bool HasColoBqlBugs(const ColoProbe& p) { return (p.major == 7 && p.minor >= 2) || (p.major >= 8 && p.major <= 10); }
}  // namespace

Status CheckColoSupported(const ColoProbe& p, const std::string& domain) {
  const std::string d = "domain " + domain + ": ";
  if (!p.has_x_colo)
    return FailedPrecondition(d + "QEMU " + p.version +
                              " has no COLO support (migration capability x-colo missing; a build "
                              "needs --enable-replication); use QEMU 7.2 or 10.0.7+ built with it");
  if (NeverEntersColo(p))
    return FailedPrecondition(d + "QEMU " + p.version +
                              " never enters COLO (its migration completes instead); the fix (upstream "
                              "0b5bf4ea76) is in QEMU 10.0.7, 10.1.3 and 10.2.0, so upgrade QEMU "
                              "(Debian 13's 1:10.0.13 has it)");
  if (HasColoBqlBugs(p) && p.accelerator != "kvm" && !p.patched_tcg_fix)
    return FailedPrecondition(d + "QEMU " + p.version + " under TCG deadlocks after the first COLO checkpoint "
                                  "(BQL not held around qemu_savevm_live_state); run the guest with "
                                  "KVM, or use the patched QEMU from scripts/build-qemu.sh");
  return OkStatus();  // an untested version: the caller warns (ColoWarning)
}

std::string ColoWarning(const ColoProbe& p) {
  if (p.patched_tcg_fix) return "";
  if (HasColoBqlBugs(p) && p.accelerator == "kvm") {
    std::string w = "QEMU " + p.version +
                    " without remus's patches can abort when a protection ends while its checkpoint timer "
                    "fires (the timer is freed without the BQL; scripts/qemu-patches*/ carry the fix)";
    bool tested = (p.major == 7 && p.minor == 2) || (p.major == 10 && p.minor == 0);
    if (!tested) w += "; QEMU " + p.version + " is also untested with remus, and COLO entry is verified after the initial copy";
    return w;
  }
  return "QEMU " + p.version + " is untested with remus; COLO entry is verified after the initial copy";
}

// ---- the guest's network backends -----------------------------------------

std::vector<GuestNic> ParseInfoNetwork(std::string_view text) {
  std::vector<GuestNic> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.remove_suffix(1);
    size_t b = line.find("\\ ");
    if (b == std::string_view::npos) continue;  // a NIC (frontend) line, not a backend
    line.remove_prefix(b + 2);
    size_t colon = line.find(": ");
    if (colon == std::string_view::npos) continue;
    GuestNic n;
    n.netdev = std::string(line.substr(0, colon));
    std::string_view opts = line.substr(colon + 2);
    while (!opts.empty()) {
      size_t c = opts.find(',');
      std::string_view kv = opts.substr(0, c);
      opts = c == std::string_view::npos ? std::string_view() : opts.substr(c + 1);
      size_t eq = kv.find('=');
      if (eq == std::string_view::npos) continue;
      std::string_view k = kv.substr(0, eq), v = kv.substr(eq + 1);
      if (k == "type") n.type = std::string(v);
      else if (k == "ifname") n.ifname = std::string(v);
      else if (k == "fd") n.fd = std::string(v);
    }
    if (!n.type.empty()) out.push_back(std::move(n));
  }
  return out;
}

StatusOr<std::vector<std::string>> GuestTapDevices(QemuMonitor& monitor, int qemu_pid, const std::string& domain) {
  ASSIGN_OR_RETURN(json r, monitor.Execute("human-monitor-command", {{"command-line", "info network"}}));
  if (!r.is_string()) return Internal("info network returned an unexpected answer: " + Dump(r));
  std::vector<std::string> taps;
  for (GuestNic& n : ParseInfoNetwork(r.get<std::string>())) {
    if (n.type == "tap" || n.type == "bridge") {
      if (n.ifname.empty() && !n.fd.empty() && qemu_pid > 0) {
        // "-netdev tap,fd=N": the kernel names the device in the fd's info.
        auto info = ReadFileToString("/proc/" + std::to_string(qemu_pid) + "/fdinfo/" + n.fd);
        if (info.ok()) {
          size_t k = info->find("iff:");
          if (k != std::string::npos) {
            size_t s = info->find_first_not_of(" \t", k + 4), e = info->find('\n', k);
            if (s != std::string::npos) n.ifname = info->substr(s, e == std::string::npos ? std::string::npos : e - s);
          }
        }
      }
      if (n.ifname.empty())
        return FailedPrecondition("domain " + domain + ": cannot tell which host device NIC backend " + n.netdev +
                                  " uses; name it with --netbuf-if");
      taps.push_back(n.ifname);
    } else if (n.type == "hubport") {
      continue;  // a hub's ports lead to one of the backends listed anyway
    } else {
      return FailedPrecondition("domain " + domain + ": NIC backend " + n.netdev + " is " + n.type +
                                " networking, whose packets cannot be held on the host; use a tap backend, "
                                "or --netbuf none to run without output buffering");
    }
  }
  return taps;
}

}  // namespace remus
