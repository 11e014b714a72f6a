#include "replicator/libvirt/restore.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include "common/io.h"
#include "common/log.h"
#include "replicator/libvirt/xml.h"

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

namespace {

using libvirt_xml::Child;
using libvirt_xml::ChildProp;
using libvirt_xml::Doc;
using libvirt_xml::HasProp;
using libvirt_xml::Named;
using libvirt_xml::NewElement;
using libvirt_xml::PrependChild;
using libvirt_xml::Prop;
using libvirt_xml::SetProp;
using libvirt_xml::XPath;

// The text of the domain's child element tag (<name>, <uuid>).
StatusOr<std::string> DomainChildText(std::string_view xml, const char* tag) {
  ASSIGN_OR_RETURN(Doc doc, libvirt_xml::ParseDomain(xml));
  const xmlNode* n = Child(xmlDocGetRootElement(doc.get()), tag);
  if (!n) return NotFound(std::string("domain XML has no <") + tag + "> element");
  return libvirt_xml::Text(n);
}

// Sets the text of <devices><emulator>.
Status SetEmulator(xmlDoc* doc, const std::string& emulator) {
  xmlNode* e = XPath(doc).First("/domain/devices/emulator");
  if (!e) return NotFound("domain XML has no <emulator> element");
  libvirt_xml::SetText(e, emulator);
  return OkStatus();
}

// The domain XML text of an edited doc, ending in a newline when the
// original did.
StatusOr<std::string> Text(xmlDoc* doc, std::string_view original) {
  return libvirt_xml::Serialize(doc, !original.empty() && original.back() == '\n');
}

// Points <disk> element disk at image (see RewriteDomainXmlForRestore).
void RewriteDisk(const XPath& xp, xmlNode* disk, const std::string& image) {
  for (xmlNode* b : xp.Nodes(".//backingStore[not(ancestor::backingStore)]", disk)) libvirt_xml::Remove(b);
  xmlDoc* doc = disk->doc;
  xmlNode* source = NewElement(doc, "source", {{"file", image}});
  if (xmlNode* old = Child(disk, "source")) {
    xmlReplaceNode(old, source);
    xmlFreeNode(old);
  } else {
    PrependChild(disk, source);
  }
  if (xmlNode* driver = Child(disk, "driver")) {
    SetProp(driver, "type", "raw");
    if (!HasProp(driver, "name")) SetProp(driver, "name", "qemu");
  } else {
    PrependChild(disk, NewElement(doc, "driver", {{"name", "qemu"}, {"type", "raw"}}));
  }
  SetProp(disk, "type", "file");
}

}  // namespace

StatusOr<std::string> DomainXmlName(std::string_view xml) { return DomainChildText(xml, "name"); }

StatusOr<std::string> DomainXmlUuid(std::string_view xml) { return DomainChildText(xml, "uuid"); }

StatusOr<std::string> SetDomainXmlEmulator(std::string_view xml, const std::string& emulator) {
  ASSIGN_OR_RETURN(Doc doc, libvirt_xml::ParseDomain(xml));
  RETURN_IF_ERROR(SetEmulator(doc.get(), emulator));
  return Text(doc.get(), xml);
}

std::map<std::string, std::string> LibvirtDiskTargets(std::string_view xml) {
  std::map<std::string, std::string> out;
  auto doc = libvirt_xml::ParseDomain(xml);
  if (!doc.ok()) {
    LOG_WARN(kTag) << "cannot read the disks of the domain XML: " << doc.status().message();
    return out;
  }
  for (const xmlNode* disk : XPath(doc->get()).Nodes("/domain/devices/disk")) {
    std::string dev = ChildProp(disk, "target", "dev");
    std::string alias = ChildProp(disk, "alias", "name");
    if (!dev.empty() && !alias.empty()) out[alias] = dev;
  }
  return out;
}

StatusOr<std::string> RewriteDomainXmlForRestore(std::string_view xml, const std::string& run_dir,
                                                 const std::string& emulator,
                                                 const std::map<std::string, std::string>& disk_images) {
  ASSIGN_OR_RETURN(Doc doc, libvirt_xml::ParseDomain(xml));
  XPath xp(doc.get());
  xp.Namespace("remus", kRemusXmlNamespace);
  bool changed = false;
  // Mirrored disks: onto this host's copies.
  if (!disk_images.empty()) {
    std::map<std::string, std::string> unplaced = disk_images;
    for (xmlNode* disk : xp.Nodes("/domain/devices/disk")) {
      std::string dev = ChildProp(disk, "target", "dev");
      auto it = disk_images.find(dev);
      if (it == disk_images.end()) continue;
      unplaced.erase(dev);
      RewriteDisk(xp, disk, it->second);
      changed = true;
    }
    if (!unplaced.empty())
      return NotFound("the domain XML has no <disk> with <target dev='" + unplaced.begin()->first +
                      "'/>, the disk mirrored as " + unplaced.begin()->first);
  }
  // File-backed character devices: their files move into run_dir, the first
  // distinct path (in document order) to serial.log.
  std::map<std::string, std::string> moved;  // old -> new
  for (xmlNode* n : xp.Nodes("/domain/devices/*[self::serial or self::console or self::parallel or self::channel]"
                             "[@type='file']/*[self::source or self::log]")) {
    const char* attr = Named(n, "source") ? "path" : "file";
    if (!HasProp(n, attr)) continue;
    std::string old = Prop(n, attr);
    auto it = moved.find(old);
    if (it == moved.end()) {
      std::string name = moved.empty() ? "serial.log" : "chardev-" + std::to_string(moved.size()) + ".log";
      it = moved.emplace(old, run_dir + "/" + name).first;
    }
    SetProp(n, attr, it->second);
    changed = true;
  }
  // The peer's security labels: the backup's libvirt applies its own
  // security driver's defaults (a peer must not turn confinement off here).
  for (xmlNode* n : xp.Nodes("//seclabel")) {
    libvirt_xml::Remove(n);
    changed = true;
  }
  // remus's own metadata: <P:protect xmlns:P="kRemusXmlNamespace" .../>.
  for (xmlNode* n : xp.Nodes("//remus:protect[not(ancestor::remus:protect)]")) {
    libvirt_xml::Remove(n);
    changed = true;
  }
  if (!emulator.empty()) {
    RETURN_IF_ERROR(SetEmulator(doc.get(), emulator));
    changed = true;
  }
  // Nothing to change: libvirt's text as it was.
  if (!changed) return std::string(xml);
  return Text(doc.get(), xml);
}

Status DestroyLibvirtDomain(const std::string& uri, const std::string& name) {
  virConnectPtr conn = virConnectOpen(uri.c_str());
  if (!conn) return Unavailable("cannot connect to libvirt at " + uri + " to destroy domain " + name + ": " + LastErrorMessage());
  virDomainPtr dom = virDomainLookupByName(conn, name.c_str());
  Status s;
  if (dom) {
    if (virDomainIsActive(dom) == 1 && virDomainDestroy(dom) != 0)
      s = Internal("virDomainDestroy of " + name + " at " + uri + ": " + LastErrorMessage());
    virDomainFree(dom);
  }
  virConnectClose(conn);
  return s;
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
