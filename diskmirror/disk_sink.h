// DiskSink: what the NBD server hands every request to (on the primary, the
// epoch-tagging write log; in tests, a plain image file).
//
// Contract: the server has already bounds-checked every request (off + length
// within the export size, no overflow) before it calls the sink, and calls it
// from one thread at a time (it serializes calls across connections), in the
// order requests arrived on a connection. A sink returns a Status; the server
// turns it into an NBD error (ResourceExhausted -> ENOSPC, InvalidArgument and
// OutOfRange -> EINVAL, PermissionDenied -> EPERM, Unimplemented -> ENOTSUP,
// anything else -> EIO).
//
// Durability: Write(..., fua=true), and Flush(), return only when the data
// (for Flush: every write that returned before it) is on stable storage.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/io.h"
#include "common/status.h"

namespace remus {

class DiskSink {
 public:
  virtual ~DiskSink() = default;
  virtual Status Read(uint64_t off, std::span<uint8_t> out) = 0;
  virtual Status Write(uint64_t off, std::span<const uint8_t> data, bool fua) = 0;
  // Makes [off, off+len) read back as zero. may_trim: the range may be
  // deallocated (NBD_CMD_FLAG_NO_HOLE was not set).
  virtual Status WriteZeroes(uint64_t off, uint64_t len, bool may_trim) = 0;
  // A hint that [off, off+len) is no longer needed; its contents are then
  // undefined until written again.
  virtual Status Trim(uint64_t off, uint64_t len) = 0;
  virtual Status Flush() = 0;
};

// A raw image file read and written with pread/pwrite. The export covers the
// first `size` bytes of the file (the file may be longer: tests put a guard
// pattern behind it). Thread-compatible: the NBD server serializes calls.
class FileDiskSink final : public DiskSink {
 public:
  // size 0 means "the file's current size". InvalidArgument if size exceeds the
  // file's size.
  static StatusOr<std::unique_ptr<FileDiskSink>> Open(const std::string& path, uint64_t size = 0);

  uint64_t size() const { return size_; }

  Status Read(uint64_t off, std::span<uint8_t> out) override;
  Status Write(uint64_t off, std::span<const uint8_t> data, bool fua) override;
  Status WriteZeroes(uint64_t off, uint64_t len, bool may_trim) override;
  Status Trim(uint64_t off, uint64_t len) override;
  Status Flush() override;

 private:
  FileDiskSink(std::string path, Fd fd, uint64_t size) : path_(std::move(path)), fd_(std::move(fd)), size_(size) {}
  // REQUIRES: off + len <= size_ (the sink never touches bytes past the export).
  Status CheckRange(uint64_t off, uint64_t len) const;
  Status WriteZeroBuffers(uint64_t off, uint64_t len);

  std::string path_;
  Fd fd_;
  uint64_t size_;
};

}  // namespace remus
