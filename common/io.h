// File descriptors, sockets and buffered big-endian reading: the socket/file
// boundary. errno becomes a Status here and nowhere else.
//
// Thread-safety: Fd is a move-only owner; one thread uses a BufferedReader.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"
#include "common/thread_annotations.h"

namespace remus {

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.Release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) Reset(o.Release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { Reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Release() { return std::exchange(fd_, -1); }
  void Reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Reads exactly n bytes. A clean EOF before n bytes is Unavailable("... closed").
Status ReadFull(int fd, void* buf, size_t n);
Status WriteFull(int fd, const void* buf, size_t n);
// Writes all iovecs (modifies the array).
Status WriteVecFull(int fd, struct iovec* iov, int iovcnt);
// pwritev(2) until all of iov is written at offset off (iov is consumed).
Status PwriteVecFull(int fd, struct iovec* iov, int iovcnt, uint64_t off);

struct HostPort {
  std::string host;
  uint16_t port = 0;
  std::string ToString() const;
};
// "host:port", "[v6]:port" or "host" (then default_port).
StatusOr<HostPort> ParseHostPort(std::string_view s, uint16_t default_port);

// Unix sockets. ListenUnix removes a stale socket file and chmods it to mode.
StatusOr<Fd> ListenUnix(const std::string& path, unsigned mode);
StatusOr<Fd> ConnectUnix(const std::string& path);
StatusOr<Fd> ListenTcp(const HostPort& hp);
// Connects with a timeout (milliseconds); enables TCP_NODELAY and keepalive.
StatusOr<Fd> ConnectTcp(const HostPort& hp, int timeout_ms);
// Blocks in accept(); returns Cancelled if the listening fd was shut down.
StatusOr<Fd> Accept(int listen_fd);
// Waits until fd is readable or timeout_ms passes; returns true if readable.
StatusOr<bool> WaitReadable(int fd, int timeout_ms);

// Peer credentials of a connected unix socket.
struct PeerCred {
  int pid = -1;
  unsigned uid = 0;
  unsigned gid = 0;
};
StatusOr<PeerCred> GetPeerCred(int fd);

StatusOr<std::string> ReadFileToString(const std::string& path);
// Whether pid is a live process (a zombie waiting for its parent is not).
bool ProcessRunning(int pid);
// Writes via a temporary file + fsync + rename, so readers see old or new.
Status WriteFileAtomic(const std::string& path, std::string_view data);
// fsync of a directory: a rename or unlink in it is durable afterwards.
Status SyncDir(const std::string& dir);
// WriteFileAtomic of dir/file, then SyncDir(dir): the new content survives a crash.
Status WriteDurable(const std::string& dir, const std::string& file, const std::string& data);
Status MakeDirs(const std::string& path, unsigned mode);

// A source of bytes: an fd, or memory in tests.
class Source {
 public:
  virtual ~Source() = default;
  // Reads up to n bytes; 0 means end of stream.
  virtual StatusOr<size_t> ReadSome(void* buf, size_t n) = 0;
};

class FdSource final : public Source {
 public:
  explicit FdSource(int fd) : fd_(fd) {}
  StatusOr<size_t> ReadSome(void* buf, size_t n) override;

 private:
  int fd_;
};

class MemorySource final : public Source {
 public:
  explicit MemorySource(std::string data, size_t max_chunk = SIZE_MAX)
      : data_(std::move(data)), max_chunk_(max_chunk) {}
  StatusOr<size_t> ReadSome(void* buf, size_t n) override;

 private:
  std::string data_;
  size_t pos_ = 0;
  size_t max_chunk_;
};

// Read buffers kept warm for a BufferedReader that retains what it reads
// (StartRetaining): a checkpoint of 50k pages is ~200 MiB, and faulting in
// fresh memory for every one would cost more than the copy it saves.
// Thread-safe: the reader takes buffers on its thread, whoever consumed the
// retained bytes gives them back on another.
class BufferPool {
 public:
  // Keeps at most max_pooled free buffers of buffer_size bytes.
  BufferPool(size_t buffer_size, size_t max_pooled);
  std::vector<uint8_t> Get();
  void Put(std::vector<uint8_t> b);
  size_t buffer_size() const { return size_; }
  size_t pooled() const;

 private:
  const size_t size_;
  const size_t max_;
  mutable Mutex mu_;
  std::vector<std::vector<uint8_t>> free_ GUARDED_BY(mu_);
};

// Buffered big-endian reader with a running byte offset (for error messages).
class BufferedReader {
 public:
  explicit BufferedReader(Source* src, size_t bufsize = 256 * 1024);

  Status Read(void* out, size_t n);
  Status Skip(size_t n);
  StatusOr<uint8_t> U8();
  StatusOr<uint16_t> U16();
  StatusOr<uint32_t> U32();
  StatusOr<uint64_t> U64();
  // Reads n bytes into a string.
  StatusOr<std::string> Bytes(size_t n);
  // Gives back the last n bytes of the previous ReadAvailable call (n no more
  // than it returned), so they are read again.
  void Unread(size_t n);
  // Returns a pointer to the next n bytes (n <= buffer size) and consumes
  // them; valid until the next call on this reader. Saves a copy per page.
  StatusOr<const uint8_t*> ReadSpan(size_t n);
  // Peeks at the next byte without consuming it.
  StatusOr<uint8_t> PeekU8();
  // Appends whatever is available: the buffered bytes, or else the result of
  // one read from the source (blocking until at least one byte). Returns the
  // count appended; end of stream is Unavailable.
  StatusOr<size_t> ReadAvailable(std::string* out, size_t max);
  // Bytes already buffered and not yet consumed.
  size_t Buffered() const { return end_ - pos_; }
  uint64_t offset() const { return offset_; }

  // Retention: from StartRetaining on, bytes read stay where they are. When
  // the buffer is full the reader moves on to a fresh one from pool instead
  // of compacting, so every pointer ReadSpan returned stays valid until the
  // buffers TakeRetained hands out are dropped. Lets a caller parse during a
  // guest pause and copy afterwards. REQUIRES pool->buffer_size() equals this
  // reader's buffer size; pool outlives the retention.
  void StartRetaining(BufferPool* pool);
  // Ends retention and returns the buffers holding everything read since
  // StartRetaining (the current one included; unconsumed bytes move to a
  // fresh buffer). Give them back with BufferPool::Put.
  std::vector<std::vector<uint8_t>> TakeRetained();

 private:
  Status Fill(size_t want);
  void Rotate();

  Source* src_;
  BufferPool* retain_pool_ = nullptr;
  std::vector<std::vector<uint8_t>> retained_;
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
  size_t end_ = 0;
  uint64_t offset_ = 0;
};

// Big-endian appenders for building streams and frames.
inline void PutU8(std::string* s, uint8_t v) { s->push_back(static_cast<char>(v)); }
void PutU16(std::string* s, uint16_t v);
void PutU32(std::string* s, uint32_t v);
void PutU64(std::string* s, uint64_t v);
uint32_t LoadU32(const void* p);
uint64_t LoadU64(const void* p);
void StoreU32(void* p, uint32_t v);
void StoreU64(void* p, uint64_t v);

}  // namespace remus
