#include "replicator/libvirt_restore.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/log.h"

namespace remus {
namespace {

constexpr char kTag[] = "libvirt-restore";
using Clock = std::chrono::steady_clock;

int64_t MsSince(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
}

std::string LastErrorMessage() {
  virErrorPtr e = virGetLastError();
  return e && e->message ? e->message : "unknown libvirt error";
}

void PutNative32(std::string* s, uint32_t v) {
  char b[4];
  std::memcpy(b, &v, 4);  // libvirt writes its header in host byte order
  s->append(b, 4);
}

// The text between <tag> and </tag> (first occurrence), with its offsets.
struct ElementText {
  size_t begin = 0;  // first byte of the text
  size_t end = 0;    // one past its last byte
};

StatusOr<ElementText> FindElementText(std::string_view xml, const std::string& tag) {
  const std::string open = "<" + tag + ">", close = "</" + tag + ">";
  size_t b = xml.find(open);
  if (b == std::string_view::npos) return NotFound("domain XML has no <" + tag + "> element");
  b += open.size();
  size_t e = xml.find(close, b);
  if (e == std::string_view::npos) return NotFound("domain XML has no </" + tag + ">");
  return ElementText{b, e};
}

// Feeds the FIFO: opens it for writing once libvirtd opened it for reading
// (polling with O_NONBLOCK, so a restore that fails before libvirtd opens the
// path cannot leave this thread blocked in open), then writes the image.
class FifoFeeder {
 public:
  FifoFeeder(std::string path, std::string prefix, const StreamWriter& write_stream)
      : path_(std::move(path)), prefix_(std::move(prefix)), write_stream_(write_stream) {
    thread_ = std::thread([this] { status_ = Run(); });
  }
  // Stops waiting for a reader (the restore call returned) and joins.
  Status Finish() {
    cancel_ = true;
    if (thread_.joinable()) thread_.join();
    return status_;
  }
  ~FifoFeeder() { (void)Finish(); }

 private:
  Status Run() {
    // libvirt or QEMU closing the read end mid-stream must be an EPIPE error
    // for this thread, not a SIGPIPE for the process.
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, nullptr);
    Status s = Feed();
    const struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, nullptr, &zero) == SIGPIPE) {
    }
    return s;
  }

  Status Feed() {
    Fd fd;
    while (!fd.valid()) {
      int f = ::open(path_.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      if (f >= 0) {
        fd = Fd(f);
        break;
      }
      if (errno != ENXIO) return ErrnoStatus("opening the restore FIFO " + path_, errno);
      if (cancel_) return Cancelled("libvirt never opened the restore FIFO " + path_);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    int fl = ::fcntl(fd.get(), F_GETFL);
    if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK) < 0)
      return ErrnoStatus("making the restore FIFO blocking", errno);
    // A bigger pipe means fewer wakeups of QEMU's reader (the default is 64 KiB).
    (void)::fcntl(fd.get(), F_SETPIPE_SZ, 1 << 20);
    RETURN_IF_ERROR(WriteFull(fd.get(), prefix_.data(), prefix_.size()).Annotate("writing the save image header"));
    return write_stream_(fd.get());
  }

  const std::string path_;
  const std::string prefix_;
  const StreamWriter& write_stream_;
  std::atomic<bool> cancel_{false};
  Status status_;
  std::thread thread_;
};

}  // namespace

StatusOr<std::string> EncodeSaveImagePrefix(std::string_view xml, bool was_running) {
  if (xml.find('\0') != std::string_view::npos) return InvalidArgument("domain XML holds a NUL byte");
  const uint64_t data_len = xml.size() + 1 + kLibvirtSaveXmlPadding;
  if (data_len > 0x7fffffff) return InvalidArgument("domain XML too large for a save image");
  std::string out;
  out.reserve(kLibvirtSaveHeaderSize + data_len);
  out.append(kLibvirtSaveMagic, sizeof(kLibvirtSaveMagic) - 1);
  PutNative32(&out, kLibvirtSaveVersion);
  PutNative32(&out, static_cast<uint32_t>(data_len));
  PutNative32(&out, was_running ? 1 : 0);
  PutNative32(&out, 0);  // compressed: raw
  PutNative32(&out, 0);  // cookieOffset: no cookie
  out.append(14 * 4, '\0');
  out.append(xml);
  out.append(1 + kLibvirtSaveXmlPadding, '\0');
  return out;
}

Status WriteSaveImage(int fd, std::string_view xml, bool was_running, const StreamWriter& write_stream) {
  ASSIGN_OR_RETURN(std::string prefix, EncodeSaveImagePrefix(xml, was_running));
  RETURN_IF_ERROR(WriteFull(fd, prefix.data(), prefix.size()).Annotate("writing the save image header"));
  return write_stream(fd);
}

StatusOr<std::string> DomainXmlName(std::string_view xml) {
  ASSIGN_OR_RETURN(ElementText t, FindElementText(xml, "name"));
  return std::string(xml.substr(t.begin, t.end - t.begin));
}

StatusOr<std::string> DomainXmlUuid(std::string_view xml) {
  ASSIGN_OR_RETURN(ElementText t, FindElementText(xml, "uuid"));
  return std::string(xml.substr(t.begin, t.end - t.begin));
}

StatusOr<std::string> SetDomainXmlEmulator(std::string_view xml, const std::string& emulator) {
  ASSIGN_OR_RETURN(ElementText t, FindElementText(xml, "emulator"));
  std::string out(xml.substr(0, t.begin));
  for (char c : emulator) {
    if (c == '&') out += "&amp;";
    else if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else out += c;
  }
  out.append(xml.substr(t.end));
  return out;
}

namespace {

// An attribute value inside one start tag [tag_begin, tag_end) ('<' to '>').
struct AttrValue {
  size_t begin = 0, end = 0;  // the value, without its quotes
  bool found = false;
};

AttrValue FindAttr(std::string_view xml, size_t tag_begin, size_t tag_end, std::string_view name) {
  for (size_t pos = tag_begin;;) {
    size_t i = xml.find(name, pos);
    if (i == std::string_view::npos || i + name.size() + 2 > tag_end) return {};
    pos = i + 1;
    if (!std::isspace(static_cast<unsigned char>(xml[i - 1])) || xml[i + name.size()] != '=') continue;
    char q = xml[i + name.size() + 1];
    if (q != '\'' && q != '"') continue;
    size_t vb = i + name.size() + 2, ve = xml.find(q, vb);
    if (ve == std::string_view::npos || ve >= tag_end) return {};
    return {vb, ve, true};
  }
}

std::string XmlAttrEscape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '&') out += "&amp;";
    else if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '\'') out += "&apos;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

struct Edit {
  size_t begin, end;
  std::string text;
};

}  // namespace

StatusOr<std::string> RewriteDomainXmlForRestore(std::string_view xml, const std::string& run_dir,
                                                 const std::string& emulator) {
  if (xml.find("<domain") == std::string_view::npos) return InvalidArgument("not a domain XML (no <domain> element)");
  std::vector<Edit> edits;
  // File-backed character devices: their files move into run_dir.
  std::vector<AttrValue> paths;
  for (const char* kind : {"serial", "console", "parallel", "channel"}) {
    const std::string open = std::string("<") + kind, close = std::string("</") + kind + ">";
    for (size_t pos = 0;;) {
      size_t b = xml.find(open, pos);
      if (b == std::string_view::npos) break;
      pos = b + open.size();
      char after = pos < xml.size() ? xml[pos] : '\0';
      if (after != ' ' && after != '>') continue;  // <serialx ...>
      size_t te = xml.find('>', b);
      if (te == std::string_view::npos) break;
      AttrValue type = FindAttr(xml, b, te, "type");
      if (!type.found || xml.substr(type.begin, type.end - type.begin) != "file" || xml[te - 1] == '/') continue;
      size_t ee = xml.find(close, te);
      if (ee == std::string_view::npos) break;
      for (const auto& [child, attr] : {std::pair<const char*, const char*>{"<source", "path"}, {"<log", "file"}}) {
        for (size_t cp = te;;) {
          size_t cb = xml.find(child, cp);
          if (cb == std::string_view::npos || cb >= ee) break;
          size_t cte = xml.find('>', cb);
          cp = cb + 1;
          if (cte == std::string_view::npos || cte > ee) break;
          AttrValue v = FindAttr(xml, cb, cte, attr);
          if (v.found) paths.push_back(v);
        }
      }
      pos = ee;
    }
  }
  std::sort(paths.begin(), paths.end(), [](const AttrValue& a, const AttrValue& b) { return a.begin < b.begin; });
  std::map<std::string, std::string> moved;  // old (as escaped in the XML) -> new
  for (const auto& v : paths) {
    std::string old(xml.substr(v.begin, v.end - v.begin));
    auto it = moved.find(old);
    if (it == moved.end()) {
      std::string name = moved.empty() ? "serial.log" : "chardev-" + std::to_string(moved.size()) + ".log";
      it = moved.emplace(old, XmlAttrEscape(run_dir + "/" + name)).first;
    }
    edits.push_back({v.begin, v.end, it->second});
  }
  // remus's own metadata: <P:protect xmlns:P="kRemusXmlNamespace" .../>.
  for (size_t pos = 0;;) {
    size_t ns = xml.find(kRemusXmlNamespace, pos);
    if (ns == std::string_view::npos) break;
    pos = ns + 1;
    size_t b = xml.rfind('<', ns);
    if (b == std::string_view::npos) continue;
    size_t ne = b + 1;
    while (ne < xml.size() && !std::isspace(static_cast<unsigned char>(xml[ne])) && xml[ne] != '>' && xml[ne] != '/') ne++;
    std::string name(xml.substr(b + 1, ne - b - 1));
    if (name != "protect" && (name.size() < 8 || name.compare(name.size() - 8, 8, ":protect") != 0)) continue;
    size_t te = xml.find('>', ns);
    if (te == std::string_view::npos) break;
    size_t e = te + 1;
    if (xml[te - 1] != '/') {
      size_t ce = xml.find("</" + name + ">", te);
      if (ce == std::string_view::npos) continue;
      e = ce + name.size() + 3;
    }
    while (b > 0 && (xml[b - 1] == ' ' || xml[b - 1] == '\t')) b--;  // its indentation and line
    if (e < xml.size() && xml[e] == '\n') e++;
    edits.push_back({b, e, ""});
    pos = e;
  }
  std::sort(edits.begin(), edits.end(), [](const Edit& a, const Edit& b) { return a.begin > b.begin; });
  std::string out(xml);
  for (const auto& e : edits) out.replace(e.begin, e.end - e.begin, e.text);
  if (!emulator.empty()) {
    ASSIGN_OR_RETURN(out, SetDomainXmlEmulator(out, emulator));
  }
  return out;
}

StatusOr<LibvirtRestoreResult> RestoreDomain(const LibvirtRestoreOptions& opts, const std::string& xml,
                                             const StreamWriter& write_stream) {
  LibvirtRestoreResult r;
  ASSIGN_OR_RETURN(r.domain, DomainXmlName(xml));
  const std::string where = "domain " + r.domain + " (libvirt " + opts.uri + ")";
  const bool was_running = !opts.start_paused;
  ASSIGN_OR_RETURN(std::string prefix, EncodeSaveImagePrefix(xml, was_running));

  RETURN_IF_ERROR(libvirt_internal::AcquireEventLoop());
  struct LoopRef {
    ~LoopRef() { libvirt_internal::ReleaseEventLoop(); }
  } loop_ref;
  virConnectPtr conn = virConnectOpen(opts.uri.c_str());
  if (!conn)
    return Unavailable("cannot connect to libvirt at " + opts.uri + " to restore domain " + r.domain + ": " +
                       LastErrorMessage() + "; is libvirtd running (systemctl status libvirtd)?");
  struct ConnRef {
    virConnectPtr c;
    ~ConnRef() { virConnectClose(c); }
  } conn_ref{conn};

  if (virDomainPtr old = virDomainLookupByName(conn, r.domain.c_str())) {
    int active = virDomainIsActive(old);
    virDomainFree(old);
    if (active == 1)
      return FailedPrecondition(where + " is already running; restoring it would start a second copy (destroy it "
                                "first if it is stale: virsh -c " + opts.uri + " destroy " + r.domain + ")");
  }

  unsigned int flags = opts.start_paused ? VIR_DOMAIN_SAVE_PAUSED : VIR_DOMAIN_SAVE_RUNNING;
  std::string path;
  Status fed;
  auto t0 = Clock::now();
  int rc;
  if (!opts.image_path.empty()) {
    // Staged: a regular save image file, then restore from it.
    path = opts.image_path;
    {
      int f = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (f < 0) return ErrnoStatus("creating the save image " + path, errno);
      Fd fd(f);
      Status w = WriteFull(fd.get(), prefix.data(), prefix.size());
      if (w.ok()) w = write_stream(fd.get());
      if (!w.ok()) return w.Annotate("writing the save image " + path);
      if (::fsync(fd.get()) < 0) return ErrnoStatus("syncing the save image " + path, errno);
    }
    r.stage_ms = MsSince(t0);
    t0 = Clock::now();
    rc = virDomainRestoreFlags(conn, path.c_str(), nullptr, flags);
  } else {
    RETURN_IF_ERROR(MakeDirs(opts.work_dir, 0700));
    path = opts.work_dir + "/restore-" + r.domain + "." + std::to_string(::getpid()) + ".fifo";
    ::unlink(path.c_str());
    if (::mkfifo(path.c_str(), 0600) < 0) return ErrnoStatus("creating the restore FIFO " + path, errno);
    struct Unlink {
      std::string p;
      ~Unlink() { ::unlink(p.c_str()); }
    } unlink_fifo{path};
    FifoFeeder feeder(path, prefix, write_stream);
    rc = virDomainRestoreFlags(conn, path.c_str(), nullptr, flags);
    std::string err = rc < 0 ? LastErrorMessage() : "";
    fed = feeder.Finish();
    if (rc < 0) {
      std::string why = where + ": libvirt could not restore it: " + err;
      // A writer that failed on its own (e.g. a page store read error) is the
      // cause; a broken pipe (Unavailable) is only libvirt or QEMU giving up.
      if (!fed.ok() && fed.code() != Code::kCancelled && fed.code() != Code::kUnavailable)
        why += " (the stream writer failed first: " + fed.message() + ")";
      return FailedPrecondition(why);
    }
    if (!fed.ok()) {
      // QEMU loaded everything it needed and closed the FIFO before the
      // writer's last bytes (the empty VMDESCRIPTION trailer).
      LOG_WARN(kTag) << where << ": restored, but the stream writer ended with: " << fed.message();
    }
  }
  if (rc < 0) return FailedPrecondition(where + ": libvirt could not restore it: " + LastErrorMessage());
  r.restore_ms = MsSince(t0);

  virDomainPtr dom = virDomainLookupByName(conn, r.domain.c_str());
  if (!dom) return Internal(where + ": restored, but libvirt cannot find it: " + LastErrorMessage());
  char uuid[VIR_UUID_STRING_BUFLEN] = {0};
  if (virDomainGetUUIDString(dom, uuid) == 0) r.uuid = uuid;
  int state = 0, reason = 0;
  int st = virDomainGetState(dom, &state, &reason, 0);
  virDomainFree(dom);
  if (st < 0) return Internal(where + ": restored, but its state is unreadable: " + LastErrorMessage());
  if (state != (opts.start_paused ? VIR_DOMAIN_PAUSED : VIR_DOMAIN_RUNNING))
    return Internal(where + ": restored, but libvirt reports state " + std::to_string(state) + " reason " +
                    std::to_string(reason));
  auto text = ReadFileToString(opts.pid_dir + "/" + r.domain + ".pid");
  if (text.ok()) {
    auto pid = libvirt_internal::ParsePidFile(*text, opts.pid_dir);
    if (pid.ok()) r.qemu_pid = *pid;
  }
  LOG_INFO(kTag) << where << " restored in " << r.restore_ms << " ms"
                 << (r.stage_ms ? " (+" + std::to_string(r.stage_ms) + " ms staging the image)" : std::string())
                 << "; QEMU pid " << r.qemu_pid;
  return r;
}

}  // namespace remus
