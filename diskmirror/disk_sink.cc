#include "diskmirror/disk_sink.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

namespace remus {

StatusOr<std::unique_ptr<FileDiskSink>> FileDiskSink::Open(const std::string& path, uint64_t size) {
  Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open image " + path, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return ErrnoStatus("stat " + path, errno);
  auto file_size = static_cast<uint64_t>(st.st_size);
  if (size == 0) size = file_size;
  if (size > file_size)
    return InvalidArgument("image " + path + " has " + std::to_string(file_size) + " bytes, fewer than the " +
                           std::to_string(size) + " to export");
  return std::unique_ptr<FileDiskSink>(new FileDiskSink(path, std::move(fd), size));
}

Status FileDiskSink::CheckRange(uint64_t off, uint64_t len) const {
  if (off > size_ || len > size_ - off)
    return OutOfRange("range " + std::to_string(off) + "+" + std::to_string(len) + " is outside " + path_);
  return OkStatus();
}

Status FileDiskSink::Read(uint64_t off, std::span<uint8_t> out) {
  RETURN_IF_ERROR(CheckRange(off, out.size()));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t r = ::pread(fd_.get(), out.data() + done, out.size() - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read " + path_, errno);
    }
    if (r == 0) return DataLoss("read " + path_ + ": unexpected end of file");
    done += static_cast<size_t>(r);
  }
  return OkStatus();
}

Status FileDiskSink::Write(uint64_t off, std::span<const uint8_t> data, bool fua) {
  RETURN_IF_ERROR(CheckRange(off, data.size()));
  size_t done = 0;
  while (done < data.size()) {
    ssize_t r = ::pwrite(fd_.get(), data.data() + done, data.size() - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write " + path_, errno);
    }
    done += static_cast<size_t>(r);
  }
  return fua ? Flush() : OkStatus();
}

Status FileDiskSink::WriteZeroBuffers(uint64_t off, uint64_t len) {
  std::vector<uint8_t> zeroes(static_cast<size_t>(std::min<uint64_t>(len, 1 << 20)));
  while (len > 0) {
    size_t k = static_cast<size_t>(std::min<uint64_t>(len, zeroes.size()));
    RETURN_IF_ERROR(Write(off, {zeroes.data(), k}, false));
    off += k;
    len -= k;
  }
  return OkStatus();
}

Status FileDiskSink::WriteZeroes(uint64_t off, uint64_t len, bool may_trim) {
  RETURN_IF_ERROR(CheckRange(off, len));
  if (len == 0) return OkStatus();
  // Punching keeps the file's size and reads back as zero; ZERO_RANGE keeps
  // the blocks allocated (NO_HOLE). Filesystems without either get buffers.
  int mode = may_trim ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
  if (::fallocate(fd_.get(), mode, static_cast<off_t>(off), static_cast<off_t>(len)) == 0) return OkStatus();
  if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) return ErrnoStatus("zero " + path_, errno);
  return WriteZeroBuffers(off, len);
}

Status FileDiskSink::Trim(uint64_t off, uint64_t len) {
  RETURN_IF_ERROR(CheckRange(off, len));
  if (len == 0) return OkStatus();
  if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                  static_cast<off_t>(len)) == 0)
    return OkStatus();
  // A trim is a hint: a filesystem that cannot punch holes ignores it.
  if (errno == EOPNOTSUPP || errno == ENOSYS) return OkStatus();
  return ErrnoStatus("trim " + path_, errno);
}

Status FileDiskSink::Flush() {
  if (::fdatasync(fd_.get()) < 0) return ErrnoStatus("fdatasync " + path_, errno);
  return OkStatus();
}

}  // namespace remus
