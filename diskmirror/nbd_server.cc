#include "diskmirror/nbd_server.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string_view>

#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {
namespace {

// Bounds on what a client may make us buffer during option haggling. The
// largest legitimate option is NBD_OPT_GO/INFO with a 4096-byte name and a
// few info requests; 64 KiB is generous. A client that haggles forever is
// disconnected after kMaxOptions options.
constexpr uint32_t kMaxOptionLen = 64 * 1024;
constexpr int kMaxOptions = 4096;

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint16_t LoadU16(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  return static_cast<uint16_t>(b[0] << 8 | b[1]);
}

// A connection that broke the protocol: closed, counted, logged as a warning.
Status Violation(std::string m) { return Aborted("protocol violation: " + std::move(m)); }

uint32_t NbdErrorFor(const Status& s) {
  switch (s.code()) {
    case Code::kResourceExhausted: return nbd::kEnospc;
    case Code::kInvalidArgument:
    case Code::kOutOfRange: return nbd::kEinval;
    case Code::kPermissionDenied: return nbd::kEperm;
    case Code::kUnimplemented: return nbd::kEnotsup;
    default: return nbd::kEio;
  }
}

std::string Hex(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

// One connection: the handshake, then the transmission phase, as the two
// message sequences of the spec. Runs on the connection's own thread.
class NbdServer::Session {
 public:
  Session(NbdServer* server, int fd) : s_(server), fd_(fd) {}

  Status Run() {
    Status st = Handshake();
    if (st.ok() && go_) st = Transmission();
    if (st.ok()) {
      LOG_DEBUG(s_->opts_.tag) << "connection closed by the client";
    } else if (st.code() == Code::kAborted) {
      s_->stats_.protocol_violations++;
      LOG_WARN(s_->opts_.tag) << "closing connection: " << st.message();
    } else {
      LOG_INFO(s_->opts_.tag) << "connection ended: " << st.message();
    }
    return st;
  }

 private:
  // ---- handshake ----------------------------------------------------------

  Status Handshake() {
    // S: NBDMAGIC, IHAVEOPT, handshake flags.
    std::string hello;
    PutU64(&hello, nbd::kMagic);
    PutU64(&hello, nbd::kOptMagic);
    PutU16(&hello, nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
    RETURN_IF_ERROR(WriteFull(fd_, hello.data(), hello.size()));
    // C: client flags. Unknown bits MUST make the server drop the connection.
    uint8_t cf[4];
    RETURN_IF_ERROR(ReadFull(fd_, cf, sizeof cf));
    uint32_t client_flags = LoadU32(cf);
    if (client_flags & ~(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes))
      return Violation("unknown client flags " + Hex(client_flags));
    no_zeroes_ = (client_flags & nbd::kClientFlagNoZeroes) != 0;

    for (int n = 0; n < kMaxOptions; ++n) {
      // C: IHAVEOPT, option, length, data.
      uint8_t h[16];
      RETURN_IF_ERROR(ReadFull(fd_, h, sizeof h));
      uint64_t magic = LoadU64(h);
      uint32_t opt = LoadU32(h + 8);
      uint32_t len = LoadU32(h + 12);
      if (magic != nbd::kOptMagic) return Violation("bad option magic " + Hex(magic));
      if (len > kMaxOptionLen) return Violation("option " + std::to_string(opt) + " is " + std::to_string(len) + " bytes long");
      std::string data(len, '\0');
      RETURN_IF_ERROR(ReadFull(fd_, data.data(), len));

      switch (opt) {
        case nbd::kOptExportName:
          return ExportName(data);
        case nbd::kOptAbort:
          // The client may already have closed; a failed ACK does not matter.
          (void)OptReply(opt, nbd::kRepAck, {});
          return OkStatus();
        case nbd::kOptList:
          RETURN_IF_ERROR(List(data));
          break;
        case nbd::kOptInfo:
        case nbd::kOptGo:
          RETURN_IF_ERROR(InfoOrGo(opt, data));
          if (go_) return OkStatus();
          break;
        case nbd::kOptStructuredReply:
          RETURN_IF_ERROR(OptReply(opt, nbd::kRepErrUnsup, "structured replies are not supported; simple replies only"));
          break;
        case nbd::kOptStartTls:
          RETURN_IF_ERROR(OptReply(opt, nbd::kRepErrUnsup, "TLS is not supported (local unix socket)"));
          break;
        default:
          RETURN_IF_ERROR(OptReply(opt, nbd::kRepErrUnsup, "option " + std::to_string(opt) + " is not supported"));
          break;
      }
    }
    return Violation("more than " + std::to_string(kMaxOptions) + " options");
  }

  bool Selects(std::string_view name) const { return name.empty() || name == s_->exp_.name; }

  // S: u64 magic, u32 option, u32 reply type, u32 length, data.
  Status OptReply(uint32_t opt, uint32_t type, std::string_view data) {
    std::string r;
    PutU64(&r, nbd::kRepMagic);
    PutU32(&r, opt);
    PutU32(&r, type);
    PutU32(&r, static_cast<uint32_t>(data.size()));
    r.append(data);
    return WriteFull(fd_, r.data(), r.size());
  }

  std::string InfoExport() const {
    std::string d;
    PutU16(&d, nbd::kInfoExport);
    PutU64(&d, s_->exp_.size);
    PutU16(&d, s_->transmission_flags());
    return d;
  }

  // NBD_OPT_EXPORT_NAME: no reply on success but the export's size and flags;
  // an unknown name can only be answered by closing the connection.
  Status ExportName(std::string_view name) {
    if (!Selects(name)) return NotFound("client asked for unknown export '" + std::string(name) + "'");
    std::string r;
    PutU64(&r, s_->exp_.size);
    PutU16(&r, s_->transmission_flags());
    if (!no_zeroes_) r.append(nbd::kExportNameZeroes, '\0');
    RETURN_IF_ERROR(WriteFull(fd_, r.data(), r.size()));
    go_ = true;
    LOG_INFO(s_->opts_.tag) << "client entered transmission (NBD_OPT_EXPORT_NAME)";
    return OkStatus();
  }

  Status List(std::string_view data) {
    if (!data.empty()) return OptReply(nbd::kOptList, nbd::kRepErrInvalid, "NBD_OPT_LIST takes no data");
    std::string srv;
    PutU32(&srv, static_cast<uint32_t>(s_->exp_.name.size()));
    srv += s_->exp_.name;
    srv += s_->exp_.description;
    RETURN_IF_ERROR(OptReply(nbd::kOptList, nbd::kRepServer, srv));
    return OptReply(nbd::kOptList, nbd::kRepAck, {});
  }

  // NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 n, n x u16.
  Status InfoOrGo(uint32_t opt, std::string_view data) {
    if (data.size() < 6) return OptReply(opt, nbd::kRepErrInvalid, "option data shorter than 6 bytes");
    uint32_t name_len = LoadU32(data.data());
    if (name_len > data.size() - 6) return OptReply(opt, nbd::kRepErrInvalid, "export name longer than the option");
    if (name_len > nbd::kMaxString) return OptReply(opt, nbd::kRepErrTooBig, "export name longer than 4096 bytes");
    std::string_view name = data.substr(4, name_len);
    size_t p = 4 + name_len;
    uint16_t n = LoadU16(data.data() + p);
    p += 2;
    if (data.size() != p + 2u * n) return OptReply(opt, nbd::kRepErrInvalid, "information request count does not match the option length");
    bool want_name = false, want_desc = false, want_bs = false;
    for (uint16_t i = 0; i < n; ++i) {
      switch (LoadU16(data.data() + p + 2u * i)) {
        case nbd::kInfoName: want_name = true; break;
        case nbd::kInfoDescription: want_desc = true; break;
        case nbd::kInfoBlockSize: want_bs = true; break;
        default: break;  // MUST ignore requests it does not understand
      }
    }
    if (!Selects(name)) return OptReply(opt, nbd::kRepErrUnknown, "no export named '" + std::string(name) + "'");

    RETURN_IF_ERROR(OptReply(opt, nbd::kRepInfo, InfoExport()));
    const NbdExport& e = s_->exp_;
    if (want_name) {
      std::string d;
      PutU16(&d, nbd::kInfoName);
      d += e.name;
      RETURN_IF_ERROR(OptReply(opt, nbd::kRepInfo, d));
    }
    if (want_desc && !e.description.empty()) {
      std::string d;
      PutU16(&d, nbd::kInfoDescription);
      d += e.description;
      RETURN_IF_ERROR(OptReply(opt, nbd::kRepInfo, d));
    }
    // Sent unasked too when we enforce a minimum block above the default 1.
    if (want_bs || e.min_block > 1) {
      std::string d;
      PutU16(&d, nbd::kInfoBlockSize);
      PutU32(&d, e.min_block);
      PutU32(&d, e.preferred_block);
      PutU32(&d, e.max_payload);
      RETURN_IF_ERROR(OptReply(opt, nbd::kRepInfo, d));
    }
    RETURN_IF_ERROR(OptReply(opt, nbd::kRepAck, {}));
    if (opt == nbd::kOptGo) {
      go_ = true;
      LOG_INFO(s_->opts_.tag) << "client entered transmission (NBD_OPT_GO, export '" << e.name << "', "
                              << e.size << " bytes)";
    }
    return OkStatus();
  }

  // ---- transmission -------------------------------------------------------

  Status Reply(uint64_t cookie, uint32_t error, std::span<const uint8_t> data = {}) {
    uint8_t h[nbd::kSimpleReplySize];
    StoreU32(h, nbd::kSimpleReplyMagic);
    StoreU32(h + 4, error);
    StoreU64(h + 8, cookie);
    if (error != 0) s_->stats_.error_replies++;
    iovec iov[2] = {{h, sizeof h}, {const_cast<uint8_t*>(data.data()), data.size()}};
    return WriteVecFull(fd_, iov, data.empty() ? 1 : 2);
  }

  // 0 if [off, off+len) lies within the export and is aligned; else the error
  // the spec recommends for this command (beyond the end: `beyond`).
  uint32_t CheckRange(uint64_t off, uint64_t len, uint32_t beyond) const {
    const NbdExport& e = s_->exp_;
    if (off > e.size || len > e.size - off) return beyond;
    if (e.min_block > 1 && (off % e.min_block != 0 || len % e.min_block != 0)) return nbd::kEinval;
    return 0;
  }

  template <typename F>
  Status CallSink(F&& f) {
    MutexLock l(s_->sink_mu_);
    return f(*s_->sink_);
  }

  Status Transmission() {
    const NbdExport& e = s_->exp_;
    for (;;) {
      uint8_t h[nbd::kRequestSize];
      RETURN_IF_ERROR(ReadFull(fd_, h, sizeof h));
      uint32_t magic = LoadU32(h);
      uint16_t flags = LoadU16(h + 4);
      uint16_t type = LoadU16(h + 6);
      uint64_t cookie = LoadU64(h + 8);
      uint64_t off = LoadU64(h + 16);
      uint32_t len = LoadU32(h + 24);
      if (magic != nbd::kRequestMagic) return Violation("bad request magic " + Hex(magic));
      s_->stats_.requests++;
      const bool fua = (flags & nbd::kCmdFlagFua) != 0;

      switch (type) {
        case nbd::kCmdRead: {
          uint32_t err = (flags & ~nbd::kCmdFlagFua) ? nbd::kEinval : 0;
          if (!err && len > e.max_payload) err = nbd::kEinval;
          if (!err) err = CheckRange(off, len, nbd::kEinval);
          if (err) {
            RETURN_IF_ERROR(Reply(cookie, err));
            break;
          }
          buf_.resize(len);
          Status st = len == 0 ? OkStatus() : CallSink([&](DiskSink& k) { return k.Read(off, {buf_.data(), len}); });
          if (!st.ok()) {
            LOG_WARN(s_->opts_.tag) << "read " << off << "+" << len << ": " << st.message();
            RETURN_IF_ERROR(Reply(cookie, NbdErrorFor(st)));
            break;
          }
          s_->stats_.bytes_read += len;
          RETURN_IF_ERROR(Reply(cookie, 0, {buf_.data(), len}));
          break;
        }
        case nbd::kCmdWrite: {
          // The payload follows the header; past the maximum we neither read
          // nor allocate it, so the stream cannot be resynchronized: say why,
          // then hang up.
          if (len > e.max_payload) {
            (void)Reply(cookie, nbd::kEinval);
            return Violation("write of " + std::to_string(len) + " bytes exceeds the maximum payload");
          }
          buf_.resize(len);
          RETURN_IF_ERROR(ReadFull(fd_, buf_.data(), len));
          uint32_t err = e.read_only ? nbd::kEperm : 0;
          if (!err && (flags & ~nbd::kCmdFlagFua)) err = nbd::kEinval;
          if (!err) err = CheckRange(off, len, nbd::kEnospc);
          if (err) {
            RETURN_IF_ERROR(Reply(cookie, err));
            break;
          }
          Status st = len == 0 ? OkStatus()
                               : CallSink([&](DiskSink& k) { return k.Write(off, {buf_.data(), len}, fua); });
          if (!st.ok()) LOG_WARN(s_->opts_.tag) << "write " << off << "+" << len << ": " << st.message();
          else s_->stats_.bytes_written += len;
          RETURN_IF_ERROR(Reply(cookie, st.ok() ? 0 : NbdErrorFor(st)));
          break;
        }
        case nbd::kCmdDisc:
          // Every earlier request has been answered (we are sequential).
          return OkStatus();
        case nbd::kCmdFlush: {
          uint32_t err = (flags & ~nbd::kCmdFlagFua) || off != 0 || len != 0 ? nbd::kEinval : 0;
          Status st = err ? OkStatus() : CallSink([](DiskSink& k) { return k.Flush(); });
          if (!st.ok()) {
            LOG_WARN(s_->opts_.tag) << "flush: " << st.message();
            err = NbdErrorFor(st);
          }
          RETURN_IF_ERROR(Reply(cookie, err));
          break;
        }
        case nbd::kCmdTrim: {
          uint32_t err = e.read_only ? nbd::kEperm : 0;
          if (!err && (flags & ~nbd::kCmdFlagFua)) err = nbd::kEinval;
          if (!err) err = CheckRange(off, len, nbd::kEinval);
          Status st;
          if (!err && len > 0) {
            st = CallSink([&](DiskSink& k) {
              RETURN_IF_ERROR(k.Trim(off, len));
              return fua ? k.Flush() : OkStatus();
            });
          }
          if (!st.ok()) {
            LOG_WARN(s_->opts_.tag) << "trim " << off << "+" << len << ": " << st.message();
            err = NbdErrorFor(st);
          }
          RETURN_IF_ERROR(Reply(cookie, err));
          break;
        }
        case nbd::kCmdWriteZeroes: {
          // NBD_CMD_FLAG_FAST_ZERO is not advertised, so it is an error here.
          uint32_t err = e.read_only ? nbd::kEperm : 0;
          if (!err && (flags & ~(nbd::kCmdFlagFua | nbd::kCmdFlagNoHole))) err = nbd::kEinval;
          if (!err) err = CheckRange(off, len, nbd::kEnospc);
          Status st;
          if (!err && len > 0) {
            bool may_trim = (flags & nbd::kCmdFlagNoHole) == 0;
            st = CallSink([&](DiskSink& k) {
              RETURN_IF_ERROR(k.WriteZeroes(off, len, may_trim));
              return fua ? k.Flush() : OkStatus();
            });
          }
          if (!st.ok()) {
            LOG_WARN(s_->opts_.tag) << "write zeroes " << off << "+" << len << ": " << st.message();
            err = NbdErrorFor(st);
          }
          RETURN_IF_ERROR(Reply(cookie, err));
          break;
        }
        default:
          // Unknown or unadvertised (CACHE, BLOCK_STATUS, ...): NBD_EINVAL.
          // None of them carries a payload, so the stream stays in step.
          RETURN_IF_ERROR(Reply(cookie, nbd::kEinval));
          break;
      }
    }
  }

  NbdServer* s_;
  int fd_;
  bool no_zeroes_ = false;
  bool go_ = false;
  std::vector<uint8_t> buf_;
};

uint16_t NbdServer::transmission_flags() const {
  uint16_t f = nbd::kFlagHasFlags | nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendTrim |
               nbd::kFlagSendWriteZeroes;
  if (exp_.read_only) f |= nbd::kFlagReadOnly;
  return f;
}

Status NbdServer::ServeConnection(int fd) {
  stats_.connections++;
  return Session(this, fd).Run();
}

std::string NbdServer::UnixUri() const { return "nbd+unix:///" + exp_.name + "?socket=" + opts_.unix_path; }

StatusOr<std::unique_ptr<NbdServer>> NbdServer::Start(NbdExport exp, DiskSink* sink, NbdServerOptions opts) {
  if (sink == nullptr) return InvalidArgument("NBD export '" + exp.name + "' has no sink");
  if (exp.name.size() > nbd::kMaxString || exp.description.size() > nbd::kMaxString)
    return InvalidArgument("NBD export name or description longer than 4096 bytes");
  if (!IsPowerOfTwo(exp.min_block) || exp.min_block > 65536 || !IsPowerOfTwo(exp.preferred_block) ||
      exp.preferred_block < std::max<uint32_t>(exp.min_block, 512) || exp.max_payload < exp.preferred_block ||
      exp.max_payload > nbd::kMaxPayload)
    return InvalidArgument("NBD export '" + exp.name + "': bad block size constraints");
  if (exp.size % exp.min_block != 0)
    return InvalidArgument("NBD export '" + exp.name + "': size is not a multiple of the minimum block");
  if (opts.unix_path.empty() && !opts.tcp) return InvalidArgument("NBD server needs a unix socket path or a TCP address");

  std::unique_ptr<NbdServer> s(new NbdServer(std::move(exp), sink, std::move(opts)));
  if (!s->opts_.unix_path.empty()) {
    ASSIGN_OR_RETURN(s->unix_listener_, ListenUnix(s->opts_.unix_path, s->opts_.unix_mode));
  }
  if (s->opts_.tcp) {
    ASSIGN_OR_RETURN(s->tcp_listener_, ListenTcp(*s->opts_.tcp));
    sockaddr_storage a{};
    socklen_t alen = sizeof a;
    if (::getsockname(s->tcp_listener_.get(), reinterpret_cast<sockaddr*>(&a), &alen) < 0)
      return ErrnoStatus("getsockname", errno);
    s->tcp_port_ = a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                           : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
  }
  NbdServer* raw = s.get();
  if (s->unix_listener_.valid()) s->acceptors_.emplace_back([raw] { raw->AcceptLoop(raw->unix_listener_.get()); });
  if (s->tcp_listener_.valid()) s->acceptors_.emplace_back([raw] { raw->AcceptLoop(raw->tcp_listener_.get()); });
  LOG_INFO(s->opts_.tag) << "serving export '" << s->exp_.name << "' (" << s->exp_.size << " bytes) on "
                         << (s->opts_.unix_path.empty() ? "" : s->opts_.unix_path)
                         << (s->opts_.tcp ? " tcp port " + std::to_string(s->tcp_port_) : "");
  return s;
}

NbdServer::~NbdServer() { Stop(); }

void NbdServer::ReapFinished() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void NbdServer::AcceptLoop(int listen_fd) {
  for (;;) {
    StatusOr<Fd> fd = Accept(listen_fd);
    if (!fd.ok()) {
      if (fd.status().code() == Code::kCancelled) return;
      {
        MutexLock l(mu_);
        if (stopping_) return;
      }
      LOG_WARN(opts_.tag) << "accept: " << fd.status().message();
      // E.g. EMFILE: do not spin; connections wait in the backlog meanwhile.
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    MutexLock l(mu_);
    if (stopping_) return;
    ReapFinished();
    if (conns_.size() >= opts_.max_connections) {
      LOG_WARN(opts_.tag) << "refusing a connection: " << conns_.size() << " already open";
      continue;  // closes it
    }
    stats_.connections++;
    auto c = std::make_unique<Conn>();
    c->fd = std::move(fd).value();
    Conn* raw = c.get();
    raw->thread = std::thread([this, raw] {
      (void)Session(this, raw->fd.get()).Run();
      // Hang up now, not when the thread is reaped. Under mu_, so Stop()
      // never shuts down a descriptor number that was reused meanwhile.
      MutexLock g(mu_);
      raw->fd.Reset();
      raw->done = true;
    });
    conns_.push_back(std::move(c));
  }
}

void NbdServer::Stop() {
  {
    MutexLock l(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (unix_listener_.valid()) ::shutdown(unix_listener_.get(), SHUT_RDWR);
  if (tcp_listener_.valid()) ::shutdown(tcp_listener_.get(), SHUT_RDWR);
  for (auto& t : acceptors_) t.join();
  acceptors_.clear();
  std::list<std::unique_ptr<Conn>> conns;
  {
    MutexLock l(mu_);
    for (auto& c : conns_)
      if (c->fd.valid()) ::shutdown(c->fd.get(), SHUT_RDWR);
    conns.swap(conns_);
  }
  for (auto& c : conns) c->thread.join();
  unix_listener_.Reset();
  tcp_listener_.Reset();
  if (!opts_.unix_path.empty()) ::unlink(opts_.unix_path.c_str());
}

}  // namespace remus
