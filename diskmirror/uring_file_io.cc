// FileIo on io_uring: writes are batched (up to the ring's depth in flight at
// once), reads, fdatasync and fallocate are single submissions. Truncate and
// stat stay plain syscalls (IORING_OP_FTRUNCATE needs Linux 6.9).
#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <vector>

#include "common/io.h"
#include "diskmirror/file_io.h"

namespace remus {
namespace {

class UringFile final : public File {
 public:
  UringFile(std::string path, Fd fd, unsigned depth) : path_(std::move(path)), fd_(std::move(fd)), depth_(depth) {}
  ~UringFile() override {
    if (ring_ok_) io_uring_queue_exit(&ring_);
  }

  Status Init() {
    int r = io_uring_queue_init(depth_, &ring_, 0);
    if (r < 0) return Unavailable("io_uring for " + path_ + ": " + std::strerror(-r));
    ring_ok_ = true;
    return OkStatus();
  }

  Status Write(std::span<const WriteOp> ops) override {
    if (broken_) return Broken();
    struct Pending {
      uint64_t off;
      const uint8_t* p;
      size_t len;
      iovec iov;
    };
    std::vector<Pending> todo;
    todo.reserve(ops.size());
    for (const WriteOp& op : ops)
      if (!op.data.empty()) todo.push_back({op.offset, op.data.data(), op.data.size(), {}});
    std::deque<size_t> queue;
    for (size_t i = 0; i < todo.size(); ++i) queue.push_back(i);

    Status first_err;
    unsigned inflight = 0;
    while ((!queue.empty() && first_err.ok()) || inflight > 0) {
      while (!queue.empty() && first_err.ok() && inflight < depth_) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        if (sqe == nullptr) break;
        size_t i = queue.front();
        queue.pop_front();
        Pending& w = todo[i];
        w.iov = {const_cast<uint8_t*>(w.p), w.len};
        io_uring_prep_writev(sqe, fd_.get(), &w.iov, 1, w.off);
        io_uring_sqe_set_data64(sqe, i);
        inflight++;
      }
      int r = io_uring_submit_and_wait(&ring_, 1);
      if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
        // Nothing of this submission reached the kernel; what did is drained
        // below before the buffers go away.
        if (first_err.ok()) first_err = ErrnoStatus("io_uring_submit " + path_, -r);
        // Prepared entries may still sit in the submission ring pointing at
        // caller buffers; this ring must never submit again.
        broken_ = true;
        DrainAfterFailure(&inflight);
        return first_err;
      }
      io_uring_cqe* cqe;
      unsigned head, seen = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        seen++;
        inflight--;
        size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
        Pending& w = todo[i];
        int res = cqe->res;
        if (res == -EINTR || res == -EAGAIN) {
          queue.push_back(i);
        } else if (res < 0) {
          if (first_err.ok()) first_err = ErrnoStatus("write " + path_ + " at " + std::to_string(w.off), -res);
        } else if (res == 0) {
          if (first_err.ok()) first_err = DataLoss("write " + path_ + " at " + std::to_string(w.off) + " made no progress");
        } else if (static_cast<size_t>(res) < w.len) {
          w.off += static_cast<uint64_t>(res);
          w.p += res;
          w.len -= static_cast<size_t>(res);
          queue.push_back(i);
        }
      }
      io_uring_cq_advance(&ring_, seen);
    }
    return first_err;
  }

  StatusOr<size_t> Read(uint64_t off, std::span<uint8_t> out) override {
    size_t done = 0;
    while (done < out.size()) {
      iovec iov{out.data() + done, out.size() - done};
      ASSIGN_OR_RETURN(int res, RunOne([&](io_uring_sqe* sqe) { io_uring_prep_readv(sqe, fd_.get(), &iov, 1, off + done); }));
      if (res < 0) return ErrnoStatus("read " + path_ + " at " + std::to_string(off + done), -res);
      if (res == 0) break;
      done += static_cast<size_t>(res);
    }
    return done;
  }

  Status Sync() override {
    ASSIGN_OR_RETURN(int res, RunOne([&](io_uring_sqe* sqe) { io_uring_prep_fsync(sqe, fd_.get(), IORING_FSYNC_DATASYNC); }));
    if (res < 0) return ErrnoStatus("fdatasync " + path_, -res);
    return OkStatus();
  }

  Status Truncate(uint64_t size) override {
    if (::ftruncate(fd_.get(), static_cast<off_t>(size)) < 0) return ErrnoStatus("truncate " + path_, errno);
    return OkStatus();
  }

  StatusOr<uint64_t> Size() override {
    struct stat st {};
    if (::fstat(fd_.get(), &st) < 0) return ErrnoStatus("stat " + path_, errno);
    return static_cast<uint64_t>(st.st_size);
  }

  Status Zero(uint64_t off, uint64_t len) override {
    if (len == 0) return OkStatus();
    ASSIGN_OR_RETURN(int res, Fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len));
    if (res == -EOPNOTSUPP || res == -EINVAL) {
      ASSIGN_OR_RETURN(res, Fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len));
    }
    if (res == -EOPNOTSUPP || res == -EINVAL) {
      // No hole punching here: write zeroes (never past the file's end, to
      // keep its size, like KEEP_SIZE).
      ASSIGN_OR_RETURN(uint64_t size, Size());
      if (off >= size) return OkStatus();
      len = std::min(len, size - off);
      std::vector<uint8_t> z(static_cast<size_t>(std::min<uint64_t>(len, 1 << 20)));
      while (len > 0) {
        size_t k = static_cast<size_t>(std::min<uint64_t>(len, z.size()));
        RETURN_IF_ERROR(File::Write(off, {z.data(), k}));
        off += k;
        len -= k;
      }
      return OkStatus();
    }
    if (res < 0) return ErrnoStatus("zero " + path_ + " at " + std::to_string(off), -res);
    return OkStatus();
  }

  Status Discard(uint64_t off, uint64_t len) override {
    if (len == 0) return OkStatus();
    ASSIGN_OR_RETURN(int res, Fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len));
    if (res == -EOPNOTSUPP || res == -EINVAL) return OkStatus();  // a hint only
    if (res < 0) return ErrnoStatus("discard " + path_ + " at " + std::to_string(off), -res);
    return OkStatus();
  }

  const std::string& path() const override { return path_; }

 private:
  StatusOr<int> Fallocate(int mode, uint64_t off, uint64_t len) {
    return RunOne([&](io_uring_sqe* sqe) {
      io_uring_prep_fallocate(sqe, fd_.get(), mode, static_cast<off_t>(off), static_cast<off_t>(len));
    });
  }

  // Submits one operation and waits for it; returns its cqe->res (negative
  // errno on failure). Retries EINTR/EAGAIN results.
  template <typename Prep>
  StatusOr<int> RunOne(Prep prep) {
    if (broken_) return Broken();
    for (;;) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) return Internal("io_uring for " + path_ + ": submission queue full");
      prep(sqe);
      int r;
      do {
        r = io_uring_submit(&ring_);
      } while (r == -EINTR || r == -EAGAIN);
      if (r < 0) {
        broken_ = true;
        return ErrnoStatus("io_uring_submit " + path_, -r);
      }
      io_uring_cqe* cqe = nullptr;
      do {
        r = io_uring_wait_cqe(&ring_, &cqe);
      } while (r == -EINTR);
      if (r < 0) {
        broken_ = true;
        return ErrnoStatus("io_uring_wait_cqe " + path_, -r);
      }
      int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (res == -EINTR || res == -EAGAIN) continue;
      return res;
    }
  }

  void DrainAfterFailure(unsigned* inflight) {
    while (*inflight > 0) {
      io_uring_cqe* cqe = nullptr;
      int r = io_uring_wait_cqe(&ring_, &cqe);
      if (r == -EINTR) continue;
      if (r < 0) break;
      io_uring_cqe_seen(&ring_, cqe);
      (*inflight)--;
    }
  }

  Status Broken() const { return Internal("io_uring for " + path_ + " failed earlier; reopen the file"); }

  std::string path_;
  Fd fd_;
  unsigned depth_;
  io_uring ring_{};
  bool ring_ok_ = false;
  bool broken_ = false;
};

class UringFileIo final : public FileIo {
 public:
  explicit UringFileIo(unsigned depth) : depth_(depth) {}

  StatusOr<std::unique_ptr<File>> Open(const std::string& path, bool create) override {
    int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0);
    Fd fd(::open(path.c_str(), flags, 0600));
    if (!fd.valid()) return ErrnoStatus("open " + path, errno);
    auto f = std::make_unique<UringFile>(path, std::move(fd), depth_);
    RETURN_IF_ERROR(f->Init());
    return std::unique_ptr<File>(std::move(f));
  }

  Status SyncDir(const std::string& dir) override {
    Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid()) return ErrnoStatus("open directory " + dir, errno);
    if (::fsync(fd.get()) < 0) return ErrnoStatus("fsync directory " + dir, errno);
    return OkStatus();
  }

 private:
  unsigned depth_;
};

}  // namespace

StatusOr<std::unique_ptr<FileIo>> NewUringFileIo(unsigned queue_depth) {
  if (queue_depth == 0 || queue_depth > 4096) return InvalidArgument("io_uring queue depth must be 1..4096");
  io_uring probe{};
  int r = io_uring_queue_init(1, &probe, 0);
  if (r < 0) return Unavailable(std::string("io_uring is not available on this kernel: ") + std::strerror(-r));
  io_uring_queue_exit(&probe);
  return std::unique_ptr<FileIo>(new UringFileIo(queue_depth));
}

}  // namespace remus
