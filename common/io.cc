#include "common/io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <utility>

#include "common/thread_annotations.h"

namespace remus {

void Fd::Reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Status ReadFull(int fd, void* buf, size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read", errno);
    }
    if (r == 0) return Unavailable("peer closed the connection");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return OkStatus();
}

Status WriteFull(int fd, const void* buf, size_t n) {
  const auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = ::send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == ENOTSOCK) r = ::write(fd, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write", errno);
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return OkStatus();
}

namespace {
// Drops the first n bytes of the iovec array (what one write call took).
void AdvanceIov(struct iovec*& iov, int& iovcnt, size_t n) {
  while (iovcnt > 0 && n >= iov->iov_len) {
    n -= iov->iov_len;
    iov++;
    iovcnt--;
  }
  if (iovcnt > 0) {
    iov->iov_base = static_cast<char*>(iov->iov_base) + n;
    iov->iov_len -= n;
  }
}
}  // namespace

Status PwriteVecFull(int fd, struct iovec* iov, int iovcnt, uint64_t off) {
  while (iovcnt > 0) {
    ssize_t r = ::pwritev(fd, iov, std::min(iovcnt, IOV_MAX), static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write", errno);
    }
    if (r == 0) return ErrnoStatus("write", EIO);  // cannot happen for a non-empty iov
    off += static_cast<uint64_t>(r);
    AdvanceIov(iov, iovcnt, static_cast<size_t>(r));
  }
  return OkStatus();
}

Status WriteVecFull(int fd, struct iovec* iov, int iovcnt) {
  while (iovcnt > 0) {
    struct msghdr mh {};
    mh.msg_iov = iov;
    mh.msg_iovlen = static_cast<size_t>(std::min(iovcnt, 1024));
    ssize_t r = ::sendmsg(fd, &mh, MSG_NOSIGNAL);
    if (r < 0 && errno == ENOTSOCK) r = ::writev(fd, iov, std::min(iovcnt, 1024));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write", errno);
    }
    AdvanceIov(iov, iovcnt, static_cast<size_t>(r));
  }
  return OkStatus();
}

std::string HostPort::ToString() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

StatusOr<HostPort> ParseHostPort(std::string_view s, uint16_t default_port) {
  HostPort hp;
  std::string_view port_part;
  if (s.empty()) return InvalidArgument("empty address; expected HOST[:PORT]");
  if (s.front() == '[') {
    auto close = s.find(']');
    if (close == std::string_view::npos) return InvalidArgument("bad address '" + std::string(s) + "': missing ']'");
    hp.host = std::string(s.substr(1, close - 1));
    auto rest = s.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return InvalidArgument("bad address '" + std::string(s) + "'");
      port_part = rest.substr(1);
    }
  } else {
    auto colon = s.rfind(':');
    if (colon != std::string_view::npos && s.find(':') == colon) {
      hp.host = std::string(s.substr(0, colon));
      port_part = s.substr(colon + 1);
    } else {
      hp.host = std::string(s);
    }
  }
  if (hp.host.empty()) return InvalidArgument("bad address '" + std::string(s) + "': empty host");
  if (port_part.empty()) {
    hp.port = default_port;
  } else {
    unsigned long v = 0;
    for (char c : port_part) {
      if (c < '0' || c > '9') return InvalidArgument("bad port in '" + std::string(s) + "'");
      v = v * 10 + static_cast<unsigned long>(c - '0');
      if (v > 65535) return InvalidArgument("port out of range in '" + std::string(s) + "'");
    }
    if (v == 0) return InvalidArgument("port 0 in '" + std::string(s) + "'");
    hp.port = static_cast<uint16_t>(v);
  }
  return hp;
}

namespace {

StatusOr<sockaddr_un> UnixAddr(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof(a.sun_path)) return InvalidArgument("unix socket path too long: " + path);
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return a;
}

StatusOr<addrinfo*> Resolve(const HostPort& hp, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  std::string port = std::to_string(hp.port);
  int rc = ::getaddrinfo(hp.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return Unavailable("cannot resolve '" + hp.host + "': " + gai_strerror(rc));
  return res;
}

}  // namespace

StatusOr<Fd> ListenUnix(const std::string& path, unsigned mode) {
  ASSIGN_OR_RETURN(sockaddr_un a, UnixAddr(path));
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("socket", errno);
  ::unlink(path.c_str());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) < 0)
    return ErrnoStatus("bind " + path, errno);
  if (::chmod(path.c_str(), mode) < 0) return ErrnoStatus("chmod " + path, errno);
  if (::listen(fd.get(), 16) < 0) return ErrnoStatus("listen " + path, errno);
  return fd;
}

StatusOr<Fd> ConnectUnix(const std::string& path) {
  ASSIGN_OR_RETURN(sockaddr_un a, UnixAddr(path));
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("socket", errno);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) < 0)
    return ErrnoStatus("connect " + path, errno);
  return fd;
}

StatusOr<Fd> ListenTcp(const HostPort& hp) {
  ASSIGN_OR_RETURN(addrinfo * res, Resolve(hp, true));
  Status last = Unavailable("no address for " + hp.ToString());
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) { last = ErrnoStatus("socket", errno); continue; }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) < 0) {
      last = ErrnoStatus("bind " + hp.ToString(), errno);
      continue;
    }
    if (::listen(fd.get(), 16) < 0) { last = ErrnoStatus("listen", errno); continue; }
    ::freeaddrinfo(res);
    return fd;
  }
  ::freeaddrinfo(res);
  return last;
}

StatusOr<Fd> ConnectTcp(const HostPort& hp, int timeout_ms) {
  ASSIGN_OR_RETURN(addrinfo * res, Resolve(hp, false));
  Status last = Unavailable("no address for " + hp.ToString());
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (!fd.valid()) { last = ErrnoStatus("socket", errno); continue; }
    int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    if (rc < 0 && errno != EINPROGRESS) {
      last = ErrnoStatus("connect " + hp.ToString(), errno);
      continue;
    }
    if (rc < 0) {
      pollfd p{fd.get(), POLLOUT, 0};
      int pr = ::poll(&p, 1, timeout_ms);
      if (pr == 0) { last = DeadlineExceeded("connect " + hp.ToString() + ": timed out"); continue; }
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) { last = ErrnoStatus("connect " + hp.ToString(), err); continue; }
    }
    int flags = ::fcntl(fd.get(), F_GETFL);
    ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(fd.get(), SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    ::freeaddrinfo(res);
    return fd;
  }
  ::freeaddrinfo(res);
  return last;
}

StatusOr<Fd> Accept(int listen_fd) {
  for (;;) {
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      return Fd(fd);
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EINVAL || errno == EBADF) return Cancelled("listener closed");
    return ErrnoStatus("accept", errno);
  }
}

StatusOr<bool> WaitReadable(int fd, int timeout_ms) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoStatus("poll", errno);
    return r > 0;
  }
}

StatusOr<PeerCred> GetPeerCred(int fd) {
  ucred c{};
  socklen_t len = sizeof c;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len) < 0) return ErrnoStatus("SO_PEERCRED", errno);
  return PeerCred{c.pid, c.uid, c.gid};
}

bool ProcessRunning(int pid) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) < 0 && errno == ESRCH) return false;
  auto stat = ReadFileToString("/proc/" + std::to_string(pid) + "/stat");
  if (!stat.ok()) return false;
  size_t p = stat->rfind(')');
  if (p == std::string::npos || p + 2 >= stat->size()) return true;
  const char state = (*stat)[p + 2];
  return state != 'Z' && state != 'X';
}

StatusOr<std::string> ReadFileToString(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open " + path, errno);
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t r = ::read(fd.get(), buf, sizeof buf);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read " + path, errno);
    }
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  return out;
}

Status WriteFileAtomic(const std::string& path, std::string_view data) {
  std::string tmp = path + ".tmp";
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) return ErrnoStatus("open " + tmp, errno);
  RETURN_IF_ERROR(WriteFull(fd.get(), data.data(), data.size()).Annotate(tmp));
  if (::fsync(fd.get()) < 0) return ErrnoStatus("fsync " + tmp, errno);
  fd.Reset();
  if (::rename(tmp.c_str(), path.c_str()) < 0) return ErrnoStatus("rename " + path, errno);
  return OkStatus();
}

Status MakeDirs(const std::string& path, unsigned mode) {
  if (path.empty()) return OkStatus();
  std::string cur;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    cur = path.substr(0, j);
    if (!cur.empty() && ::mkdir(cur.c_str(), mode) < 0 && errno != EEXIST)
      return ErrnoStatus("mkdir " + cur, errno);
    i = j + 1;
  }
  return OkStatus();
}

StatusOr<size_t> FdSource::ReadSome(void* buf, size_t n) {
  for (;;) {
    ssize_t r = ::read(fd_, buf, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read", errno);
    }
    return static_cast<size_t>(r);
  }
}

StatusOr<size_t> MemorySource::ReadSome(void* buf, size_t n) {
  size_t k = std::min({n, data_.size() - pos_, max_chunk_});
  std::memcpy(buf, data_.data() + pos_, k);
  pos_ += k;
  return k;
}

BufferedReader::BufferedReader(Source* src, size_t bufsize) : src_(src), buf_(bufsize) {}

BufferPool::BufferPool(size_t buffer_size, size_t max_pooled) : size_(buffer_size), max_(max_pooled) {}

std::vector<uint8_t> BufferPool::Get() {
  {
    MutexLock g(mu_);
    if (!free_.empty()) {
      std::vector<uint8_t> b = std::move(free_.back());
      free_.pop_back();
      return b;
    }
  }
  return std::vector<uint8_t>(size_);
}

void BufferPool::Put(std::vector<uint8_t> b) {
  if (b.size() != size_) return;
  MutexLock g(mu_);
  if (free_.size() < max_) free_.push_back(std::move(b));
}

size_t BufferPool::pooled() const {
  MutexLock g(mu_);
  return free_.size();
}

void BufferedReader::StartRetaining(BufferPool* pool) { retain_pool_ = pool; }

void BufferedReader::Rotate() {
  std::vector<uint8_t> next = retain_pool_->Get();
  size_t rem = end_ - pos_;
  std::memcpy(next.data(), buf_.data() + pos_, rem);
  retained_.push_back(std::move(buf_));
  buf_ = std::move(next);
  pos_ = 0;
  end_ = rem;
}

std::vector<std::vector<uint8_t>> BufferedReader::TakeRetained() {
  if (retain_pool_ == nullptr) return {};
  Rotate();
  retain_pool_ = nullptr;
  return std::exchange(retained_, {});
}

Status BufferedReader::Fill(size_t want) {
  if (end_ - pos_ >= want) return OkStatus();
  if (retain_pool_ != nullptr) {
    if (buf_.size() - pos_ < want) Rotate();  // never overwrite bytes already handed out
  } else if (pos_ > 0) {
    std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
    end_ -= pos_;
    pos_ = 0;
  }
  while (end_ - pos_ < want) {
    ASSIGN_OR_RETURN(size_t r, src_->ReadSome(buf_.data() + end_, buf_.size() - end_));
    if (r == 0) return Unavailable("stream ended after " + std::to_string(offset_ + (end_ - pos_)) + " bytes");
    end_ += r;
  }
  return OkStatus();
}

Status BufferedReader::Read(void* out, size_t n) {
  auto* o = static_cast<uint8_t*>(out);
  while (n > 0) {
    if (pos_ == end_) {
      // Large reads bypass the buffer.
      if (n >= buf_.size()) {
        ASSIGN_OR_RETURN(size_t r, src_->ReadSome(o, n));
        if (r == 0) return Unavailable("stream ended after " + std::to_string(offset_) + " bytes");
        o += r;
        n -= r;
        offset_ += r;
        continue;
      }
      RETURN_IF_ERROR(Fill(1));
    }
    size_t k = std::min(n, end_ - pos_);
    std::memcpy(o, buf_.data() + pos_, k);
    pos_ += k;
    o += k;
    n -= k;
    offset_ += k;
  }
  return OkStatus();
}

Status BufferedReader::Skip(size_t n) {
  char tmp[4096];
  while (n > 0) {
    size_t k = std::min(n, sizeof tmp);
    RETURN_IF_ERROR(Read(tmp, k));
    n -= k;
  }
  return OkStatus();
}

StatusOr<uint8_t> BufferedReader::U8() {
  RETURN_IF_ERROR(Fill(1));
  offset_ += 1;
  return buf_[pos_++];
}

StatusOr<uint8_t> BufferedReader::PeekU8() {
  RETURN_IF_ERROR(Fill(1));
  return buf_[pos_];
}

StatusOr<uint16_t> BufferedReader::U16() {
  RETURN_IF_ERROR(Fill(2));
  uint16_t v = static_cast<uint16_t>(buf_[pos_] << 8 | buf_[pos_ + 1]);
  pos_ += 2;
  offset_ += 2;
  return v;
}

StatusOr<uint32_t> BufferedReader::U32() {
  RETURN_IF_ERROR(Fill(4));
  uint32_t v = LoadU32(buf_.data() + pos_);
  pos_ += 4;
  offset_ += 4;
  return v;
}

StatusOr<uint64_t> BufferedReader::U64() {
  RETURN_IF_ERROR(Fill(8));
  uint64_t v = LoadU64(buf_.data() + pos_);
  pos_ += 8;
  offset_ += 8;
  return v;
}

void BufferedReader::Unread(size_t n) {
  pos_ -= n;
  offset_ -= n;
}

StatusOr<const uint8_t*> BufferedReader::ReadSpan(size_t n) {
  if (n > buf_.size()) return InvalidArgument("span larger than the read buffer");
  RETURN_IF_ERROR(Fill(n));
  const uint8_t* p = buf_.data() + pos_;
  pos_ += n;
  offset_ += n;
  return p;
}

StatusOr<size_t> BufferedReader::ReadAvailable(std::string* out, size_t max) {
  if (pos_ == end_) RETURN_IF_ERROR(Fill(1));
  size_t k = std::min(max, end_ - pos_);
  out->append(reinterpret_cast<const char*>(buf_.data() + pos_), k);
  pos_ += k;
  offset_ += k;
  return k;
}

StatusOr<std::string> BufferedReader::Bytes(size_t n) {
  std::string s(n, '\0');
  RETURN_IF_ERROR(Read(s.data(), n));
  return s;
}

void PutU16(std::string* s, uint16_t v) {
  s->push_back(static_cast<char>(v >> 8));
  s->push_back(static_cast<char>(v));
}
void PutU32(std::string* s, uint32_t v) {
  char b[4];
  StoreU32(b, v);
  s->append(b, 4);
}
void PutU64(std::string* s, uint64_t v) {
  char b[8];
  StoreU64(b, v);
  s->append(b, 8);
}
uint32_t LoadU32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return __builtin_bswap32(v);
}
uint64_t LoadU64(const void* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}
void StoreU32(void* p, uint32_t v) {
  v = __builtin_bswap32(v);
  std::memcpy(p, &v, 4);
}
void StoreU64(void* p, uint64_t v) {
  v = __builtin_bswap64(v);
  std::memcpy(p, &v, 8);
}

Status SyncDir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open " + dir, errno);
  if (::fsync(fd.get()) < 0) return ErrnoStatus("fsync " + dir, errno);
  return OkStatus();
}

Status WriteDurable(const std::string& dir, const std::string& file, const std::string& data) {
  RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + file, data));
  return SyncDir(dir);
}

}  // namespace remus
