// FileIo: the file boundary of the backup's disk journal and of applying
// journaled writes to the disk image (leveldb's Env, reduced to what the
// journal needs). The real implementation submits every read, write, fsync
// and fallocate through io_uring (liburing); tests swap in FaultyFileIo
// (faulty_file_io.h), which keeps files in memory, drops what was not synced
// on a simulated crash, fails fsync, fills the disk and cuts the power.
//
// errno becomes a Status here and nowhere else in the journal: ENOSPC and
// EDQUOT are ResourceExhausted, EIO is DataLoss (see ErrnoStatus).
//
// Thread-safety: a FileIo may be shared; one File is used by one thread at a
// time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/status.h"

namespace remus {

// One buffer to write at one offset.
struct WriteOp {
  uint64_t offset = 0;
  std::span<const uint8_t> data;
};

class File {
 public:
  virtual ~File() = default;

  // Writes every op. Ops in one call may be carried out concurrently and in
  // any order, so REQUIRES: they do not overlap. On error an unknown subset of
  // the ops (and a prefix of one) may have reached the file.
  virtual Status Write(std::span<const WriteOp> ops) = 0;
  Status Write(uint64_t off, std::span<const uint8_t> data) {
    WriteOp op{off, data};
    return Write(std::span<const WriteOp>(&op, 1));
  }
  // Reads up to out.size() bytes at off; fewer only at end of file. Returns
  // the count read.
  virtual StatusOr<size_t> Read(uint64_t off, std::span<uint8_t> out) = 0;
  // fdatasync: every completed write, and the file's size, are durable.
  virtual Status Sync() = 0;
  // Sets the file's size (not durable until Sync()).
  virtual Status Truncate(uint64_t size) = 0;
  virtual StatusOr<uint64_t> Size() = 0;
  // Makes [off, off+len) read back as zeroes, keeping the file's size.
  virtual Status Zero(uint64_t off, uint64_t len) = 0;
  // Deallocates [off, off+len) where the filesystem can (reads back as zero
  // there); a no-op where it cannot. Keeps the file's size.
  virtual Status Discard(uint64_t off, uint64_t len) = 0;

  virtual const std::string& path() const = 0;
};

class FileIo {
 public:
  virtual ~FileIo() = default;
  // Opens for reading and writing; with create, a missing file is created
  // (mode 0600), else NotFound.
  virtual StatusOr<std::unique_ptr<File>> Open(const std::string& path, bool create) = 0;
  // Makes the directory's entries (a created file) durable.
  virtual Status SyncDir(const std::string& dir) = 0;
};

// The io_uring implementation: one ring of queue_depth entries per open
// File. Unavailable (with the reason) where the kernel refuses io_uring
// (io_uring_disabled sysctl, seccomp).
StatusOr<std::unique_ptr<FileIo>> NewUringFileIo(unsigned queue_depth = 64);

}  // namespace remus
