#include "replicator/link/wire.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>
#include <nlohmann/json.hpp>

#include "common/crc32c.h"
#include "common/hex.h"
#include "common/log.h"
#include "replicator/link/json_object.h"
#include "replicator/link/tls_channel.h"

namespace remus::wire {

using json = nlohmann::json;
using SteadyTime = std::chrono::steady_clock::time_point;

namespace {

void StoreU16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
uint16_t LoadU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }

std::string FrameDesc(uint16_t type, uint64_t epoch) {
  return "frame " + MsgTypeName(type) + " epoch " + std::to_string(epoch);
}

StatusOr<std::string> RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1)
    return Internal("the OpenSSL random generator failed (RAND_bytes)");
  return out;
}

// HMAC-SHA256(key, label "\0" domain a b). The domain is the only variable-
// length field and the nonces after it are fixed-size, so the encoding is
// unambiguous; the labels keep a client proof from being reflected as a
// server proof.
std::string Proof(const Key& key, std::string_view label, std::string_view domain,
                  std::string_view a, std::string_view b) {
  std::string msg;
  msg.reserve(label.size() + 1 + domain.size() + a.size() + b.size());
  msg.append(label);
  msg.push_back('\0');
  msg.append(domain);
  msg.append(a);
  msg.append(b);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.secret.data(), static_cast<int>(key.secret.size()),
       reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out, &len);
  return std::string(reinterpret_cast<char*>(out), len);
}


std::optional<std::string> JsonString(const json& j, const char* field) {
  if (!j.is_object()) return std::nullopt;
  auto it = j.find(field);
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

}  // namespace

std::optional<json> ParseJsonObject(std::string_view payload) {
  json j = json::parse(payload, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  return j;
}

// ---- Frames -----------------------------------------------------------------

std::string MsgTypeName(uint16_t t) {
  switch (static_cast<MsgType>(t)) {
    case MsgType::kHello: return "HELLO";
    case MsgType::kChallenge: return "CHALLENGE";
    case MsgType::kAuth: return "AUTH";
    case MsgType::kAuthOk: return "AUTH_OK";
    case MsgType::kError: return "ERROR";
    case MsgType::kConfig: return "CONFIG";
    case MsgType::kSyncBegin: return "SYNC_BEGIN";
    case MsgType::kPages: return "PAGES";
    case MsgType::kDevice: return "DEVICE";
    case MsgType::kCommit: return "COMMIT";
    case MsgType::kAck: return "ACK";
    case MsgType::kHeartbeat: return "HEARTBEAT";
    case MsgType::kFailover: return "FAILOVER";
    case MsgType::kGoodbye: return "GOODBYE";
    case MsgType::kProgress: return "PROGRESS";
    case MsgType::kDisk: return "DISK";
    case MsgType::kDiskSynced: return "DISK_SYNCED";
    case MsgType::kResyncOffer: return "RESYNC_OFFER";
    case MsgType::kResyncHashes: return "RESYNC_HASHES";
    case MsgType::kKeep: return "KEEP";
    case MsgType::kSwitchover: return "SWITCHOVER";
  }
  return "TYPE_" + std::to_string(t);
}

std::string MsgTypeName(MsgType t) { return MsgTypeName(static_cast<uint16_t>(t)); }

namespace {

void BuildHeader(uint8_t* hdr, MsgType type, uint64_t epoch, uint32_t len, uint16_t flags,
                 const std::vector<std::string_view>& parts) {
  StoreU32(hdr, kMagic);
  StoreU16(hdr + 4, static_cast<uint16_t>(type));
  StoreU16(hdr + 6, flags);
  StoreU64(hdr + 8, epoch);
  StoreU32(hdr + 16, len);
  uint32_t crc = crc32c::Value(hdr, 20);
  for (std::string_view p : parts) crc = crc32c::Extend(crc, p.data(), p.size());
  StoreU32(hdr + 20, crc);
}

}  // namespace

std::string EncodeFrame(MsgType type, uint64_t epoch, std::string_view payload, uint16_t flags) {
  uint8_t hdr[kHeaderSize];
  BuildHeader(hdr, type, epoch, static_cast<uint32_t>(payload.size()), flags, {payload});
  std::string out(reinterpret_cast<char*>(hdr), kHeaderSize);
  out.append(payload);
  return out;
}

Link::Link(Fd fd) : fd_(std::move(fd)) {}
Link::~Link() = default;

void Link::UseTls(std::unique_ptr<TlsChannel> tls) { tls_ = std::move(tls); }

std::string Link::Cipher() const { return tls_ ? tls_->Describe() : std::string(); }

int Link::PeerTlsAlert() const { return tls_ ? tls_->peer_alert() : -1; }

Status Link::Send(MsgType type, uint64_t epoch, std::string_view payload, uint16_t flags) {
  return SendV(type, epoch, {payload}, flags);
}

Status Link::SendV(MsgType type, uint64_t epoch, const std::vector<std::string_view>& parts,
                   uint16_t flags) {
  MutexLock lock(send_mu_);
  return SendLocked(type, epoch, parts, flags);
}

Status Link::SendSplit(MsgType type, uint64_t epoch, std::string_view payload) {
  MutexLock lock(send_mu_);
  do {
    std::string_view chunk = payload.substr(0, kMaxPayload);
    payload.remove_prefix(chunk.size());
    RETURN_IF_ERROR(SendLocked(type, epoch, {chunk}, payload.empty() ? 0 : kFlagMore));
  } while (!payload.empty());
  return OkStatus();
}

Status Link::SendBefore(SteadyTime deadline, MsgType type, uint64_t epoch, std::string_view payload,
                        uint16_t flags, const std::function<bool()>& abandon) {
  // remus::Mutex has no timed lock: poll for it. Waiting here means another
  // thread's frame is on its way out.
  while (!send_mu_.TryLock()) {
    if (std::chrono::steady_clock::now() >= deadline || (abandon && abandon()))
      return DeadlineExceeded("cannot send " + FrameDesc(static_cast<uint16_t>(type), epoch) + " to " +
                              PeerName() + ": another frame is still being sent");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  Status s = SendLocked(type, epoch, {payload}, flags, deadline, abandon ? &abandon : nullptr);
  send_mu_.Unlock();
  return s;
}

Status Link::TrySend(MsgType type, uint64_t epoch, std::string_view payload, uint16_t flags) {
  if (!send_mu_.TryLock())
    return ResourceExhausted("the link is busy sending another frame; " +
                             FrameDesc(static_cast<uint16_t>(type), epoch) + " not sent");
  Status s = SendLocked(type, epoch, {payload}, flags);
  send_mu_.Unlock();
  return s;
}

Status Link::SendLocked(MsgType type, uint64_t epoch, const std::vector<std::string_view>& parts,
                        uint16_t flags, std::optional<SteadyTime> deadline, const std::function<bool()>* abandon) {
  size_t total = 0;
  for (std::string_view p : parts) total += p.size();
  if (total > kMaxPayload)
    return InvalidArgument("cannot send " + FrameDesc(static_cast<uint16_t>(type), epoch) +
                           ": payload of " + std::to_string(total) + " bytes exceeds the " +
                           std::to_string(kMaxPayload) + "-byte frame limit");
  if (broken_)
    return Unavailable("cannot send " + FrameDesc(static_cast<uint16_t>(type), epoch) + " to " + PeerName() +
                       ": the link broke (an earlier write timed out or was cut short)");
  uint8_t hdr[kHeaderSize];
  BuildHeader(hdr, type, epoch, static_cast<uint32_t>(total), flags, parts);
  std::vector<iovec> iov;
  iov.reserve(parts.size() + 1);
  iov.push_back({hdr, kHeaderSize});
  for (std::string_view p : parts)
    if (!p.empty()) iov.push_back({const_cast<char*>(p.data()), p.size()});
  RETURN_IF_ERROR(WriteAll(iov.data(), static_cast<int>(iov.size()), deadline, abandon)
                      .Annotate("sending " + FrameDesc(static_cast<uint16_t>(type), epoch) +
                                " to " + PeerName()));
  bytes_sent_.fetch_add(kHeaderSize + total, std::memory_order_relaxed);
  frames_sent_.fetch_add(1, std::memory_order_relaxed);
  return OkStatus();
}

Status Link::WriteAll(struct iovec* iov, int iovcnt, std::optional<SteadyTime> deadline,
                      const std::function<bool()>* abandon) {
  if (tls_) return WriteAllTls(iov, iovcnt, deadline, abandon);
  auto last_progress = std::chrono::steady_clock::now();
  bool wrote_some = false;
  while (iovcnt > 0) {
    struct msghdr mh {};
    mh.msg_iov = iov;
    mh.msg_iovlen = static_cast<size_t>(std::min(iovcnt, 1024));
    ssize_t r = ::sendmsg(fd_.get(), &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0 && errno == ENOTSOCK) r = ::writev(fd_.get(), iov, std::min(iovcnt, 1024));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      Status s = ErrnoStatus("write", errno);
      if (wrote_some) Break();
      return s;
    }
    if (r > 0) {
      wrote_some = true;
      last_progress = std::chrono::steady_clock::now();
      auto left = static_cast<size_t>(r);
      while (iovcnt > 0 && left >= iov->iov_len) {
        left -= iov->iov_len;
        iov++;
        iovcnt--;
      }
      if (iovcnt > 0) {
        iov->iov_base = static_cast<char*>(iov->iov_base) + left;
        iov->iov_len -= left;
      }
      continue;
    }
    RETURN_IF_ERROR(WaitToWrite(POLLOUT, deadline, last_progress, wrote_some, abandon));
  }
  return OkStatus();
}

Status Link::WriteAllTls(struct iovec* iov, int iovcnt, std::optional<SteadyTime> deadline,
                         const std::function<bool()>* abandon) {
  // Small parts (the header, page-record headers, 4 KiB pages) are gathered
  // into tls_out_ and encrypted from there, 256 KiB at a time; a part of at
  // least one record is encrypted where it lies, after topping tls_out_ up
  // to a whole record from its start (so a frame's header shares a record
  // with its payload).
  constexpr size_t kChunk = 256 << 10;
  constexpr size_t kRecord = 16 << 10;  // TLS's largest record
  auto last_progress = std::chrono::steady_clock::now();
  bool wrote_some = false;
  auto put = [&](const char* p, size_t n) -> Status {
    size_t off = 0;
    while (off < n) {
      auto step = tls_->WriteSome(p + off, n - off);
      if (!step.ok()) {
        if (wrote_some) Break();
        return step.status();
      }
      // OpenSSL may hold part of a record from here on: giving up now leaves
      // the stream unusable, as a cut frame does.
      wrote_some = true;
      if (step->n > 0) {
        off += step->n;
        last_progress = std::chrono::steady_clock::now();
        continue;
      }
      RETURN_IF_ERROR(WaitToWrite(step->wait, deadline, last_progress, wrote_some, abandon));
    }
    return OkStatus();
  };
  tls_out_.clear();
  for (int i = 0; i < iovcnt; i++) {
    const char* p = static_cast<const char*>(iov[i].iov_base);
    size_t n = iov[i].iov_len;
    if (n >= kRecord) {
      if (!tls_out_.empty()) {
        size_t take = std::min(n, kRecord - tls_out_.size() % kRecord);
        tls_out_.append(p, take);
        p += take;
        n -= take;
        RETURN_IF_ERROR(put(tls_out_.data(), tls_out_.size()));
        tls_out_.clear();
      }
      RETURN_IF_ERROR(put(p, n));
      continue;
    }
    tls_out_.append(p, n);
    if (tls_out_.size() >= kChunk) {
      RETURN_IF_ERROR(put(tls_out_.data(), tls_out_.size()));
      tls_out_.clear();
    }
  }
  if (!tls_out_.empty()) RETURN_IF_ERROR(put(tls_out_.data(), tls_out_.size()));
  // The frame's last records are still in the channel's buffer: a frame is
  // sent when it is wholly on the socket.
  for (;;) {
    auto step = tls_->Flush();
    if (!step.ok()) {
      if (wrote_some) Break();
      return step.status();
    }
    if (step->wait == 0) return OkStatus();
    if (step->n > 0) {
      last_progress = std::chrono::steady_clock::now();
      continue;
    }
    RETURN_IF_ERROR(WaitToWrite(step->wait, deadline, last_progress, wrote_some, abandon));
  }
}

Status Link::WaitToWrite(short events, std::optional<SteadyTime> deadline, SteadyTime last_progress,
                         bool wrote_some, const std::function<bool()>* abandon) {
  using std::chrono::milliseconds;
  const int64_t timeout_ms = send_timeout_ms_.load();
  // No room: wait for some, in slices, so a shutdown from another thread
  // is seen even where poll would not report it.
  const auto now = std::chrono::steady_clock::now();
  std::optional<SteadyTime> until = deadline;
  if (timeout_ms > 0) {
    SteadyTime stall = last_progress + milliseconds(timeout_ms);
    if (!until || stall < *until) until = stall;
  }
  if (until && now >= *until) {
    const bool stalled = timeout_ms > 0 && now >= last_progress + milliseconds(timeout_ms);
    // A frame cut in the middle leaves the peer's parser nowhere, and a
    // peer that took nothing for the send timeout is gone: break.
    if (wrote_some || stalled) Break();
    if (stalled)
      return DeadlineExceeded("the peer took no data for " + std::to_string(timeout_ms) +
                              " ms (send timeout): it stopped reading or is unreachable");
    return DeadlineExceeded("the frame was not sent before its deadline");
  }
  if (abandon && (*abandon)()) {
    if (wrote_some) Break();
    return DeadlineExceeded("the frame was abandoned before the peer took it");
  }
  int slice = abandon ? 5 : 100;
  if (until)
    slice = static_cast<int>(std::clamp<int64_t>(
        std::chrono::duration_cast<milliseconds>(*until - now).count() + 1, 1, slice));
  pollfd pfd{fd_.get(), events, 0};
  int pr = ::poll(&pfd, 1, slice);
  if (pr < 0 && errno != EINTR) return ErrnoStatus("poll", errno);
  return OkStatus();
}

void Link::Break() {
  if (broken_.exchange(true)) return;
  ::shutdown(fd_.get(), SHUT_RDWR);
}

Status Link::ReadExact(void* buf, size_t n, std::optional<SteadyTime> deadline) {
  auto* p = static_cast<char*>(buf);
  while (n > 0 && tls_) {
    // Decrypted bytes OpenSSL already holds come first: the socket may have
    // nothing more to say about them.
    ASSIGN_OR_RETURN(TlsChannel::Step step, tls_->ReadSome(p, n));
    if (step.n > 0) {
      bytes_received_.fetch_add(step.n, std::memory_order_relaxed);
      p += step.n;
      n -= step.n;
      continue;
    }
    int wait_ms = -1;
    if (deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - std::chrono::steady_clock::now())
                      .count();
      if (left <= 0) return DeadlineExceeded("timed out waiting for the peer");
      wait_ms = static_cast<int>(std::min<int64_t>(left, INT32_MAX));
    }
    pollfd pfd{fd_.get(), step.wait, 0};
    if (::poll(&pfd, 1, wait_ms) < 0 && errno != EINTR) return ErrnoStatus("poll", errno);
  }
  while (n > 0) {
    if (deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      *deadline - std::chrono::steady_clock::now())
                      .count();
      if (left <= 0) return DeadlineExceeded("timed out waiting for the peer");
      ASSIGN_OR_RETURN(bool readable, WaitReadable(fd_.get(), static_cast<int>(left)));
      if (!readable) continue;  // re-check the deadline
    }
    ssize_t r = ::read(fd_.get(), p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read", errno);
    }
    if (r == 0) return Unavailable("peer closed the connection");
    bytes_received_.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
    p += r;
    n -= static_cast<size_t>(r);
  }
  return OkStatus();
}

StatusOr<Frame> Link::Recv() { return RecvImpl(std::nullopt, kMaxPayload); }

StatusOr<Frame> Link::Recv(std::string reuse) { return RecvImpl(std::nullopt, kMaxPayload, std::move(reuse)); }

StatusOr<Frame> Link::RecvUntil(SteadyTime deadline, uint32_t max_payload) {
  return RecvImpl(deadline, max_payload);
}

StatusOr<Frame> Link::RecvImpl(std::optional<SteadyTime> deadline, uint32_t max_payload, std::string reuse) {
  uint8_t hdr[kHeaderSize];
  RETURN_IF_ERROR(ReadExact(hdr, kHeaderSize, deadline).Annotate("reading a frame header"));
  const uint32_t magic = LoadU32(hdr);
  const uint16_t type = LoadU16(hdr + 4);
  const uint16_t flags = LoadU16(hdr + 6);
  const uint64_t epoch = LoadU64(hdr + 8);
  const uint32_t len = LoadU32(hdr + 16);
  const uint32_t want_crc = LoadU32(hdr + 20);
  if (magic != kMagic) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", magic);
    return DataLoss("bad frame magic " + std::string(buf) + " from " + PeerName() +
                    " (expected 0x524d5553 \"RMUS\"): the peer is not a remus replication link "
                    "or the stream is corrupt");
  }
  // Checked before allocating: a corrupt or hostile length must not cost memory.
  if (len > max_payload)
    return DataLoss(FrameDesc(type, epoch) + " from " + PeerName() + " declares a " +
                    std::to_string(len) + "-byte payload, over the " +
                    std::to_string(max_payload) + "-byte limit");
  Frame f;
  f.payload = std::move(reuse);
  f.payload.resize(len);
  RETURN_IF_ERROR(ReadExact(f.payload.data(), len, deadline)
                      .Annotate("reading the payload of " + FrameDesc(type, epoch)));
  uint32_t crc = crc32c::Extend(crc32c::Value(hdr, 20), f.payload.data(), len);
  if (crc != want_crc)
    return DataLoss("crc mismatch on " + FrameDesc(type, epoch) + " (" + std::to_string(len) +
                    "-byte payload) from " + PeerName() + ": the data was corrupted in transit");
  frames_received_.fetch_add(1, std::memory_order_relaxed);
  if (type < kMinMsgType || type > kMaxMsgType)
    return InvalidArgument("unknown frame type " + std::to_string(type) + " (epoch " +
                           std::to_string(epoch) + ") from " + PeerName() +
                           "; is the peer running a newer remus?");
  f.type = static_cast<MsgType>(type);
  f.flags = flags;
  f.epoch = epoch;
  return f;
}

void Link::Shutdown() { ::shutdown(fd_.get(), SHUT_RDWR); }
void Link::ShutdownWrite() {
  // close_notify only between frames: a frame another thread is writing
  // must not be cut by an alert (the peer takes a FIN the same way).
  if (tls_ && send_mu_.TryLock()) {
    tls_->CloseNotify();
    send_mu_.Unlock();
  }
  ::shutdown(fd_.get(), SHUT_WR);
}

std::string Link::PeerName() const {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getpeername(fd_.get(), reinterpret_cast<sockaddr*>(&ss), &len) < 0) return "unknown peer";
  char host[INET6_ADDRSTRLEN] = {};
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(a->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(a->sin6_port));
  }
  if (ss.ss_family == AF_UNIX) return "unix socket";
  return "unknown peer";
}

std::string EncodeError(const Status& s) {
  return json{{"code", std::string(CodeName(s.code()))}, {"message", s.message()}}.dump();
}

Status DecodeError(std::string_view payload) {
  auto j = ParseJsonObject(payload);
  auto msg = j ? JsonString(*j, "message") : std::nullopt;
  if (!msg)
    return Unavailable("peer sent a malformed ERROR frame (" + std::to_string(payload.size()) +
                       " bytes)");
  Code code = Code::kUnavailable;
  if (auto name = JsonString(*j, "code")) {
    for (int c = static_cast<int>(Code::kCancelled); c <= static_cast<int>(Code::kUnauthenticated);
         c++) {
      if (CodeName(static_cast<Code>(c)) == *name) code = static_cast<Code>(c);
    }
  }
  return Status(code, *msg);
}

// ---- Keys -------------------------------------------------------------------

Key::~Key() {
  if (!secret.empty()) OPENSSL_cleanse(secret.data(), secret.size());
}

namespace {

// The checks of CheckSecretFile on an open file's stat.
Status CheckSecretStat(const std::string& path, std::string_view what, const struct stat& st) {
  const std::string name = std::string(what) + " " + path;
  if (S_ISLNK(st.st_mode))
    return InvalidArgument(name + " is a symbolic link; a secret must be a regular file in place (copy it there)");
  if (!S_ISREG(st.st_mode)) return InvalidArgument(name + " is not a regular file");
  if (st.st_uid != ::geteuid())
    return PermissionDenied(name + " is owned by uid " + std::to_string(st.st_uid) + ", not by " +
                            (::geteuid() == 0 ? std::string("root") : "uid " + std::to_string(::geteuid())) +
                            " who runs remusd; run `chown root:root " + path + "`");
  if (st.st_mode & 077) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return PermissionDenied(name + " has mode " + mode + " and is accessible to group or others; run `chmod 600 " +
                            path + "`");
  }
  return OkStatus();
}

}  // namespace

Status CheckSecretFile(const std::string& path, std::string_view what) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) < 0) {
    if (errno == ENOENT) return NotFound(std::string(what) + " " + path + " does not exist");
    return ErrnoStatus(std::string(what) + " " + path, errno);
  }
  return CheckSecretStat(path, what, st);
}

StatusOr<Key> LoadKey(const std::string& path) {
  // O_NOFOLLOW: a symlink fails here (ELOOP) instead of being followed;
  // O_NONBLOCK: a FIFO put in its place cannot block the open.
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (!fd.valid()) {
    if (errno == ENOENT)
      return NotFound("key file " + path + " does not exist; create one with `remusctl keygen --out " +
                      path + "` and copy it to both hosts");
    if (errno == ELOOP)
      return InvalidArgument("key file " + path +
                             " is a symbolic link; a key must be a regular file in place (copy it there)");
    return ErrnoStatus("open key file " + path, errno);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return ErrnoStatus("stat key file " + path, errno);
  RETURN_IF_ERROR(CheckSecretStat(path, "key file", st));
  constexpr size_t kMaxKeyFile = 64 * 1024;
  if (static_cast<uint64_t>(st.st_size) > kMaxKeyFile)
    return InvalidArgument("key file " + path + " is " + std::to_string(st.st_size) +
                           " bytes; a key file holds 64 hex digits (use `remusctl keygen`)");
  std::string content;
  char buf[4096];
  for (;;) {
    ssize_t r = ::read(fd.get(), buf, sizeof buf);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read key file " + path, errno);
    }
    if (r == 0) break;
    content.append(buf, static_cast<size_t>(r));
    if (content.size() > kMaxKeyFile) return InvalidArgument("key file " + path + " is too large");
  }
  OPENSSL_cleanse(buf, sizeof buf);

  const std::string too_short = "; a key needs at least 32 bytes (64 hex digits); generate one with "
                                "`remusctl keygen --out " + path + "`";
  std::string_view text = content;
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.remove_suffix(1);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.remove_prefix(1);
  bool all_hex = !text.empty();
  for (char c : text) all_hex = all_hex && std::isxdigit(static_cast<unsigned char>(c));
  Key key;
  if (all_hex) {
    if (text.size() < 2 * kMinKeySize)
      return InvalidArgument("key file " + path + " holds only " + std::to_string(text.size()) +
                             " hex digits" + too_short);
    auto raw = HexDecode(text);
    if (!raw)
      return InvalidArgument("key file " + path + " holds an odd number of hex digits (" +
                             std::to_string(text.size()) + ")");
    key.secret = std::move(*raw);
  } else {
    if (content.size() < kMinKeySize)
      return InvalidArgument("key file " + path + " holds only " + std::to_string(content.size()) +
                             " bytes" + too_short);
    key.secret = content;
  }
  OPENSSL_cleanse(content.data(), content.size());
  return key;
}

StatusOr<std::string> GenerateKeyHex() {
  ASSIGN_OR_RETURN(std::string raw, RandomBytes(kMinKeySize));
  std::string hex = HexEncode(raw);
  OPENSSL_cleanse(raw.data(), raw.size());
  return hex;
}

std::string KeyFingerprint(const Key& key) {
  return HexEncode(Proof(key, "remus-fingerprint", "", "", "")).substr(0, 16);
}

// ---- Commit records -----------------------------------------------------------

std::string EncodeCommit(const CommitInfo& c) {
  json j{{"page_count", c.page_count}, {"page_bytes", c.page_bytes}, {"device_bytes", c.device_bytes}};
  if (c.disk_records > 0) j["disk_records"] = c.disk_records;
  if (c.kept_pages > 0) j["kept_pages"] = c.kept_pages;
  if (!c.image_digest.empty()) j["image_digest"] = c.image_digest;
  return j.dump();
}

StatusOr<CommitInfo> DecodeCommit(std::string_view payload) {
  auto j = ParseJsonObject(payload);
  CommitInfo c;
  auto get = [&](const char* field, uint64_t* out) {
    auto it = j->find(field);
    if (it == j->end() || !it->is_number_unsigned()) return false;
    *out = it->get<uint64_t>();
    return true;
  };
  if (!j || !get("page_count", &c.page_count) || !get("page_bytes", &c.page_bytes) ||
      !get("device_bytes", &c.device_bytes))
    return DataLoss("malformed COMMIT payload (" + std::to_string(payload.size()) +
                    " bytes): expected {page_count, page_bytes, device_bytes}");
  if (j->contains("disk_records") && !get("disk_records", &c.disk_records))
    return DataLoss("malformed COMMIT payload: disk_records is not a count");
  if (j->contains("kept_pages") && !get("kept_pages", &c.kept_pages))
    return DataLoss("malformed COMMIT payload: kept_pages is not a count");
  if (j->contains("image_digest")) {
    const auto& d = (*j)["image_digest"];
    if (!d.is_string() || d.get_ref<const std::string&>().size() != 32 ||
        d.get_ref<const std::string&>().find_first_not_of("0123456789abcdef") != std::string::npos)
      return DataLoss("malformed COMMIT payload: image_digest is not 32 lowercase hex digits");
    c.image_digest = d.get<std::string>();
  }
  return c;
}

std::string EncodeDiskRecord(uint32_t disk, DiskOp op, uint64_t offset, uint64_t length, std::string_view data) {
  std::string out;
  out.reserve(kDiskRecordHeader + data.size());
  PutU32(&out, disk);
  PutU8(&out, static_cast<uint8_t>(op));
  out.append(3, '\0');
  PutU64(&out, offset);
  PutU64(&out, length);
  out.append(data);
  return out;
}

StatusOr<DiskRecord> DecodeDiskRecord(std::string_view payload) {
  if (payload.size() < kDiskRecordHeader)
    return DataLoss("DISK record of " + std::to_string(payload.size()) + " bytes is truncated");
  DiskRecord r;
  r.disk = LoadU32(payload.data());
  const uint8_t op = static_cast<uint8_t>(payload[4]);
  r.offset = LoadU64(payload.data() + 8);
  r.length = LoadU64(payload.data() + 16);
  r.data = payload.substr(kDiskRecordHeader);
  if (op < 1 || op > 3) return DataLoss("DISK record has unknown op " + std::to_string(op));
  r.op = static_cast<DiskOp>(op);
  if (r.offset + r.length < r.offset) return DataLoss("DISK record: offset + length overflows");
  const uint64_t want = r.op == DiskOp::kWrite ? r.length : 0;
  if (r.data.size() != want)
    return DataLoss("DISK record carries " + std::to_string(r.data.size()) + " data bytes, expected " +
                    std::to_string(want));
  return r;
}

}  // namespace remus::wire
