#include "replicator/backup/page_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "common/crc32c.h"
#include "common/io.h"
#include "common/log.h"

namespace remus {
namespace {

using qemu::kPageSize;
constexpr char kTag[] = "pagestore";
constexpr char kManifest[] = "manifest.json";
constexpr char kMeta[] = "meta.json";

// The redo record (docs/formats/page-store-redo.md), big-endian:
//   0 8 bytes magic "RMPSREDO", 8 u32 version, 12 u32 batch count n,
//   16 u64 epoch, 24 u64 device blob length, 32 u32 device blob crc32c,
//   36 u32 reserved (0), 40 n x u64 batch length, then the batches back to
//   back, then u32 crc32c of everything before it. The record starts at
//   offset 0 of the file; bytes after it (an older, longer record) are stale.
constexpr char kRedoMagic[8] = {'R', 'M', 'P', 'S', 'R', 'E', 'D', 'O'};
constexpr uint32_t kRedoVersion = 1;
constexpr size_t kRedoFixedHeader = 40;
constexpr size_t kRedoTrailer = 4;
// More batches than any checkpoint has (a batch is up to a few MiB).
constexpr uint64_t kRedoMaxBatches = 1u << 24;
// The one record file of a store, overwritten in place by every Commit.
constexpr char kRedoFile[] = "redo.log";
// It grows (fallocate) in steps of this, to the size of the largest record.
constexpr uint64_t kRedoGrowStep = 4u << 20;
// After this many commits in a row whose records each used at most a quarter
// of the file, the next one shrinks it to twice the largest of them.
constexpr uint64_t kRedoShrinkAfter = 1000;
// The CRC is computed over this much just before it is written (cache-warm).
constexpr uint64_t kRedoWriteChunk = 4u << 20;

uint64_t RoundUp(uint64_t n, uint64_t step) { return (n + step - 1) / step * step; }

std::string EpochFile(const char* prefix, uint64_t epoch, const char* suffix) {
  return prefix + std::to_string(epoch) + suffix;
}

bool EndsWith(const std::string& s, std::string_view tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string Hex32(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof(b), "0x%08x", v);
  return b;
}

struct RedoRecord {
  uint64_t length = 0;  // bytes from offset 0 to the end of the trailer
  uint64_t epoch = 0;
  uint64_t blob_length = 0;
  uint32_t blob_crc = 0;
  std::vector<std::string_view> batches;  // into the mapped file
};

// Checks a redo record's framing and CRC; n is the file's size, the record
// may be shorter (the bytes after it are ignored). Messages name the problem
// only (the caller adds the file).
StatusOr<RedoRecord> ParseRedo(const uint8_t* p, size_t n, uint64_t want_epoch) {
  const size_t min = kRedoFixedHeader + kRedoTrailer;
  if (n < min)
    return DataLoss("short: " + std::to_string(n) + " bytes, less than the smallest record (" +
                    std::to_string(min) + ")");
  if (std::memcmp(p, kRedoMagic, sizeof(kRedoMagic)) != 0) return DataLoss("bad magic (not a redo record)");
  if (uint32_t v = LoadU32(p + 8); v != kRedoVersion) return DataLoss("unsupported version " + std::to_string(v));
  const uint64_t count = LoadU32(p + 12);
  if (count > kRedoMaxBatches || count > (n - min) / 8)
    return DataLoss("short or damaged: " + std::to_string(n) + " bytes cannot hold the lengths of the " +
                    std::to_string(count) + " batches its header lists");
  const size_t header = kRedoFixedHeader + 8 * count;
  uint64_t payload = 0;
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t len = LoadU64(p + kRedoFixedHeader + 8 * i);
    if (len > kMaxGuestRam)
      return DataLoss("damaged: batch " + std::to_string(i) + " has an impossible length " + std::to_string(len));
    payload += len;  // no overflow: payload <= n before, len <= kMaxGuestRam
    if (payload > n)
      return DataLoss("short: " + std::to_string(n) + " bytes, less than the first " + std::to_string(i + 1) +
                      " batches its header lists (truncated)");
  }
  const uint64_t want = header + payload + kRedoTrailer;
  if (n < want)
    return DataLoss("short: " + std::to_string(n) + " bytes of the " + std::to_string(want) +
                    " its header describes (truncated)");
  const uint32_t stored = LoadU32(p + want - kRedoTrailer);
  const uint32_t computed = crc32c::Value(p, want - kRedoTrailer);
  if (stored != computed)
    return DataLoss("CRC-32C mismatch (stored " + Hex32(stored) + ", computed " + Hex32(computed) + ")");
  if (uint32_t r = LoadU32(p + 36); r != 0) return DataLoss("reserved header field is " + std::to_string(r));
  RedoRecord r;
  r.length = want;
  r.epoch = LoadU64(p + 16);
  if (r.epoch != want_epoch)
    return DataLoss("record of epoch " + std::to_string(r.epoch) + ", the marker names epoch " +
                    std::to_string(want_epoch));
  r.blob_length = LoadU64(p + 24);
  r.blob_crc = LoadU32(p + 32);
  size_t pos = header;
  for (uint64_t i = 0; i < count; ++i) {
    size_t len = static_cast<size_t>(LoadU64(p + kRedoFixedHeader + 8 * i));
    r.batches.emplace_back(reinterpret_cast<const char*>(p + pos), len);
    pos += len;
  }
  return r;
}

std::string Join(const std::string& dir, const std::string& name) { return dir + "/" + name; }

// A file name that cannot escape the directory and is unique through the index.
std::string BlockFileName(size_t index, const std::string& id) {
  std::string clean;
  for (char c : id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '-' || c == '_';
    clean.push_back(ok ? c : '_');
    if (clean.size() >= 64) break;
  }
  char prefix[32];
  std::snprintf(prefix, sizeof(prefix), "ram-%03zu-", index);
  return prefix + clean + ".img";
}

bool SafeFileName(const std::string& f) {
  return !f.empty() && f.size() < 200 && f.find('/') == std::string::npos && f != "." &&
         f != ".." && f.find('\0') == std::string::npos;
}

std::string ReadBootId() {
  auto s = ReadFileToString("/proc/sys/kernel/random/boot_id");
  if (!s.ok()) return "";
  std::string v = *s;
  while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.pop_back();
  return v;
}

// Replaces path via rename without fsync: atomic against a process crash,
// which is all the "applying" marker needs (a host crash is caught by the
// boot id check).
Status WriteFileReplace(const std::string& path, std::string_view data) {
  std::string tmp = path + ".tmp";
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) return ErrnoStatus("open " + tmp, errno);
  if (Status st = WriteFull(fd.get(), data.data(), data.size()); !st.ok()) {
    ::unlink(tmp.c_str());  // e.g. ENOSPC: give the space back
    return st.Annotate(tmp);
  }
  fd.Reset();
  if (::rename(tmp.c_str(), path.c_str()) < 0) return ErrnoStatus("rename " + path, errno);
  return OkStatus();
}

Status FsyncPath(const std::string& path, bool directory) {
  Fd fd(::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("open " + path, errno);
  if (::fsync(fd.get()) < 0) return ErrnoStatus("fsync " + path, errno);
  return OkStatus();
}

}  // namespace

bool IsZeroPage(const uint8_t* p) {
  // Overlapping compare: byte 0 is zero and every byte equals its successor.
  return p[0] == 0 && std::memcmp(p, p + 1, kPageSize - 1) == 0;
}

PageStore::~PageStore() {
  for (auto& m : maps_) {
    if (m.addr) ::munmap(m.addr, m.len);
    if (m.fd >= 0) ::close(m.fd);
  }
}

Status PageStore::ValidateBlocks(const std::vector<qemu::RamBlock>& blocks) {
  if (blocks.empty()) return InvalidArgument("page store: no RAM blocks");
  if (blocks.size() > qemu::kMaxRamBlocks)
    return InvalidArgument("page store: " + std::to_string(blocks.size()) +
                           " RAM blocks, more than the limit of " +
                           std::to_string(qemu::kMaxRamBlocks));
  std::set<std::string> ids;
  uint64_t total = 0;
  for (const auto& b : blocks) {
    if (b.id.empty() || b.id.size() > 255)
      return InvalidArgument("page store: RAM block id must be 1..255 bytes");
    if (!ids.insert(b.id).second)
      return InvalidArgument("page store: duplicate RAM block id '" + b.id + "'");
    if (b.used_length == 0 || b.used_length % kPageSize != 0)
      return InvalidArgument("page store: RAM block '" + b.id + "' length " +
                             std::to_string(b.used_length) + " is not a non-zero multiple of " +
                             std::to_string(kPageSize));
    if (b.used_length > kMaxGuestRam || total + b.used_length > kMaxGuestRam)
      return InvalidArgument("page store: guest RAM larger than " +
                             std::to_string(kMaxGuestRam >> 30) + " GiB");
    total += b.used_length;
  }
  return OkStatus();
}

Status PageStore::MapBlocks(bool create) {
  maps_.resize(blocks_.size());
  total_bytes_ = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Mapping& m = maps_[i];
    std::string path = Join(dir_, m.file);
    int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0);
    m.fd = ::open(path.c_str(), flags, 0600);
    if (m.fd < 0) {
      if (!create && errno == ENOENT)
        return DataLoss("page store " + dir_ + ": block file " + m.file + " is missing");
      return ErrnoStatus("open " + path, errno);
    }
    m.len = blocks_[i].used_length;
    if (create) {
      if (::ftruncate(m.fd, static_cast<off_t>(m.len)) < 0)
        return ErrnoStatus("ftruncate " + path, errno);
      RETURN_IF_ERROR(Reserve(m.fd, m.len, path));
    } else {
      struct stat st;
      if (::fstat(m.fd, &st) < 0) return ErrnoStatus("fstat " + path, errno);
      if (static_cast<uint64_t>(st.st_size) != m.len)
        return DataLoss("page store " + dir_ + ": block file " + m.file + " has " +
                        std::to_string(st.st_size) + " bytes, the manifest says " +
                        std::to_string(m.len));
    }
    void* a = ::mmap(nullptr, m.len, PROT_READ | PROT_WRITE, MAP_SHARED, m.fd, 0);
    if (a == MAP_FAILED) return ErrnoStatus("mmap " + path, errno);
    m.addr = static_cast<uint8_t*>(a);
    // Checkpoints touch scattered pages: readahead on a write fault only adds
    // work (measured: random first-touch writes ~1.5-2x faster with it off).
    ::madvise(a, m.len, MADV_RANDOM);
    total_bytes_ += m.len;
  }
  return OkStatus();
}

// Reserves the blocks a memory image needs up front. A write through a shared
// mapping into a file that cannot grow kills the process with SIGBUS, so a
// full disk must surface here, as an error, before any page is applied. The
// reserved extents stay unwritten, so they still read as holes for restore.
Status PageStore::Reserve(int fd, uint64_t len, const std::string& path) {
  // fallocate(2), not posix_fallocate: glibc's fallback writes every block.
  int r = ::fallocate(fd, 0, 0, static_cast<off_t>(len)) == 0 ? 0 : errno;
  if (r == 0) return OkStatus();
  if (r == ENOSPC || r == EDQUOT)
    return ResourceExhausted("page store " + dir_ + ": no room for " + std::to_string(len) +
                             " bytes of guest memory in " + path + "; free space or point --state-dir elsewhere");
  if (r == EOPNOTSUPP || r == EINVAL) return OkStatus();  // filesystem without fallocate
  return ErrnoStatus("fallocate " + path, r);
}

PageStore::Meta PageStore::CurrentMeta() const {
  Meta m;
  m.committed_epoch = committed_epoch_;
  m.initial_sync_complete = state_ == State::kCommitted;
  m.device_blob_file = device_blob_file_;
  m.boot_id = boot_id_;
  m.synced = synced_;
  return m;
}

Status PageStore::WriteMeta(const Meta& m, bool durable) {
  nlohmann::json j = {
      {"version", 1},
      {"committed_epoch", m.committed_epoch},
      {"initial_sync_complete", m.initial_sync_complete},
      {"device_blob", m.device_blob_file},
      {"boot_id", m.boot_id},
      {"synced", m.synced},
  };
  if (m.applying) {
    j["applying"] = m.applying_epoch;
    if (!m.redo_file.empty()) j["redo"] = m.redo_file;
  }
  std::string path = Join(dir_, kMeta);
  std::string data = j.dump() + "\n";
  return durable ? WriteFileAtomic(path, data) : WriteFileReplace(path, data);
}

StatusOr<std::unique_ptr<PageStore>> PageStore::Create(const std::string& dir,
                                                       const std::vector<qemu::RamBlock>& blocks) {
  RETURN_IF_ERROR(ValidateBlocks(blocks));
  RETURN_IF_ERROR(MakeDirs(dir, 0700));
  std::unique_ptr<PageStore> s(new PageStore(dir));
  s->blocks_ = blocks;
  s->boot_id_ = ReadBootId();
  // Invalidate first: a crash during Create must not leave an old meta
  // describing new block files.
  s->state_ = State::kSyncing;
  s->invalid_reason_ = "the initial sync has not completed";
  RETURN_IF_ERROR(s->WriteMeta(s->CurrentMeta(), true));

  nlohmann::json jb = nlohmann::json::array();
  s->maps_.resize(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    s->maps_[i].file = BlockFileName(i, blocks[i].id);
    jb.push_back({{"id", blocks[i].id},
                  {"used_length", blocks[i].used_length},
                  {"file", s->maps_[i].file}});
  }
  RETURN_IF_ERROR(s->MapBlocks(true));
  RETURN_IF_ERROR(s->PunchAll());
  nlohmann::json manifest = {{"version", 1}, {"blocks", jb}};
  RETURN_IF_ERROR(WriteFileAtomic(Join(dir, kManifest), manifest.dump(1) + "\n"));
  s->RemoveStaleBlobs("", true);
  LOG_INFO(kTag) << "created store " << dir << ": " << blocks.size() << " blocks, "
                 << (s->total_bytes_ >> 20) << " MiB";
  return s;
}

StatusOr<std::unique_ptr<PageStore>> PageStore::Open(const std::string& dir) {
  std::string mpath = Join(dir, kManifest);
  auto mtext = ReadFileToString(mpath);
  if (!mtext.ok()) {
    if (mtext.status().code() == Code::kNotFound)
      return NotFound("no page store in " + dir + " (" + kManifest + " missing)");
    return mtext.status();
  }
  std::unique_ptr<PageStore> s(new PageStore(dir));
  try {
    auto j = nlohmann::json::parse(*mtext);
    if (j.at("version").get<int>() != 1)
      return DataLoss(mpath + ": unsupported version " + j.at("version").dump());
    for (const auto& b : j.at("blocks")) {
      s->blocks_.push_back({b.at("id").get<std::string>(), b.at("used_length").get<uint64_t>()});
      Mapping m;
      m.file = b.at("file").get<std::string>();
      if (!SafeFileName(m.file)) return DataLoss(mpath + ": bad block file name '" + m.file + "'");
      s->maps_.push_back(std::move(m));
    }
  } catch (const nlohmann::json::exception& e) {
    return DataLoss(mpath + ": " + e.what());
  }
  if (Status st = ValidateBlocks(s->blocks_); !st.ok()) return DataLoss(mpath + ": " + st.message());
  RETURN_IF_ERROR(s->MapBlocks(false));

  s->boot_id_ = ReadBootId();
  std::string meta_path = Join(dir, kMeta);
  Meta meta;
  auto metatext = ReadFileToString(meta_path);
  auto unreadable = [&](const std::string& why) {
    // Not an error: the store exists, its image just cannot be trusted.
    s->state_ = State::kTorn;
    s->invalid_reason_ = "the store's meta file is unreadable (" + why + ")";
    LOG_WARN(kTag) << "opened store " << dir << " with no restorable image: " << s->invalid_reason_;
    return std::move(s);
  };
  if (!metatext.ok()) return unreadable(metatext.status().message());
  try {
    auto j = nlohmann::json::parse(*metatext);
    meta.committed_epoch = j.at("committed_epoch").get<uint64_t>();
    meta.initial_sync_complete = j.at("initial_sync_complete").get<bool>();
    meta.device_blob_file = j.at("device_blob").get<std::string>();
    meta.boot_id = j.value("boot_id", "");
    meta.synced = j.value("synced", false);
    if (j.contains("applying")) {
      meta.applying = true;
      meta.applying_epoch = j.at("applying").get<uint64_t>();
      meta.redo_file = j.value("redo", "");
    }
  } catch (const nlohmann::json::exception& e) {
    return unreadable(e.what());
  }

  s->committed_epoch_ = meta.committed_epoch;
  s->state_ = State::kTorn;
  // A torn commit's files stay for inspection; otherwise files of epochs meta
  // does not name (a crash before the marker) are removed below.
  bool keep_files = false;
  if (meta.applying) {
    keep_files = true;
    const std::string e = std::to_string(meta.applying_epoch);
    const std::string mixed = "the memory image may mix epochs " + std::to_string(meta.committed_epoch) +
                              " and " + e + " and cannot be restored";
    if (meta.boot_id != s->boot_id_) {
      s->invalid_reason_ = "the host rebooted during the commit of epoch " + e +
                           " (its redo record and the memory image were never synced); " + mixed;
    } else if (meta.redo_file.empty() || !meta.initial_sync_complete) {
      s->invalid_reason_ = "a commit of epoch " + e + " was interrupted; the memory image mixes epochs " +
                           std::to_string(meta.committed_epoch) + " and " + e + " and cannot be restored";
    } else if (!SafeFileName(meta.redo_file)) {
      s->invalid_reason_ = "a commit of epoch " + e + " was interrupted and meta names no valid redo record; " + mixed;
    } else if (Status st = s->FinishInterruptedCommit(meta); !st.ok()) {
      s->invalid_reason_ = "a commit of epoch " + e + " was interrupted and cannot be finished: " + st.message() +
                           "; " + mixed;
    } else {
      keep_files = false;
    }
  } else if (!meta.initial_sync_complete) {
    s->state_ = State::kSyncing;
    s->invalid_reason_ = "the initial sync has not completed";
    // Unknown which pages the interrupted sync wrote: treat all as written.
    s->written_.resize(s->blocks_.size());
    for (size_t i = 0; i < s->blocks_.size(); ++i)
      s->written_[i].assign((s->blocks_[i].used_length / kPageSize + 63) / 64, ~0ull);
  } else if (!meta.synced && meta.boot_id != s->boot_id_) {
    s->invalid_reason_ = "the host rebooted after epoch " + std::to_string(meta.committed_epoch) +
                         " was committed and the memory image was not synced to disk";
  } else if (!SafeFileName(meta.device_blob_file)) {
    s->invalid_reason_ = "meta names no valid device state file";
  } else {
    auto blob = ReadFileToString(Join(dir, meta.device_blob_file));
    if (!blob.ok()) {
      s->invalid_reason_ = "device state of epoch " + std::to_string(meta.committed_epoch) +
                           " unreadable: " + blob.status().message();
    } else {
      s->state_ = State::kCommitted;
      s->invalid_reason_.clear();
      s->device_blob_ = std::move(*blob);
      s->device_blob_file_ = meta.device_blob_file;
      s->synced_ = meta.synced && meta.boot_id == s->boot_id_;
    }
  }
  if (!keep_files) {
    std::vector<std::string> gone =
        s->RemoveStaleBlobs(s->has_committed() ? s->device_blob_file_ : meta.device_blob_file, false);
    if (!gone.empty()) {
      std::string names;
      for (const auto& g : gone) names += " " + g;
      LOG_INFO(kTag) << "store " << dir << ": removed files no commit needs (left by a crash):" << names;
    }
  }
  if (s->has_committed()) {
    LOG_INFO(kTag) << "opened store " << dir << " at epoch " << s->committed_epoch_;
  } else {
    LOG_WARN(kTag) << "opened store " << dir << " with no restorable image: "
                   << s->invalid_reason_;
  }
  return s;
}

StatusOr<const uint8_t*> PageStore::Page(uint32_t block, uint64_t offset) const {
  if (block >= blocks_.size())
    return OutOfRange("page store: block index " + std::to_string(block) + " of " + std::to_string(blocks_.size()));
  if (offset % kPageSize != 0)
    return DataLoss("page store: misaligned offset " + std::to_string(offset) + " in block '" + blocks_[block].id + "'");
  const Mapping& m = maps_[block];
  if (offset >= m.len || m.len - offset < kPageSize)
    return OutOfRange("page store: offset " + std::to_string(offset) + " beyond block '" + blocks_[block].id +
                      "' of " + std::to_string(m.len) + " bytes");
  return static_cast<const uint8_t*>(m.addr + offset);
}

Status PageStore::ApplyPage(uint32_t block, uint64_t offset, const uint8_t* data) {
  if (state_ != State::kSyncing)
    return FailedPrecondition("page store " + dir_ +
                              ": ApplyPage outside the initial sync (call BeginInitialSync)");
  if (block >= blocks_.size())
    return OutOfRange("page store: block index " + std::to_string(block) + " of " +
                      std::to_string(blocks_.size()));
  if (offset % kPageSize != 0)
    return DataLoss("page store: misaligned offset " + std::to_string(offset) + " in block '" +
                    blocks_[block].id + "'");
  const Mapping& m = maps_[block];
  if (offset >= m.len || m.len - offset < kPageSize)
    return OutOfRange("page store: offset " + std::to_string(offset) + " beyond block '" +
                      blocks_[block].id + "' of " + std::to_string(m.len) + " bytes");
  uint64_t page = offset / kPageSize;
  uint64_t& word = written_[block][page / 64];
  uint64_t bit = 1ull << (page % 64);
  if (data) {
    std::memcpy(m.addr + offset, data, kPageSize);
    word |= bit;
    stats_.pages_applied.fetch_add(1, std::memory_order_relaxed);
  } else {
    // The image started as holes: a never-written page is already zero, and
    // touching it would only fault in page cache.
    if ((word & bit) && !IsZeroPage(m.addr + offset)) std::memset(m.addr + offset, 0, kPageSize);
    stats_.zero_pages_applied.fetch_add(1, std::memory_order_relaxed);
  }
  stats_.bytes_applied.fetch_add(kPageSize, std::memory_order_relaxed);
  return OkStatus();
}

Status PageStore::CopyPagesFrom(const PageStore& src, size_t src_block, uint32_t block, uint64_t first_page,
                                uint64_t count) {
  if (state_ != State::kSyncing)
    return FailedPrecondition("page store " + dir_ + ": CopyPagesFrom outside the initial sync");
  if (block >= blocks_.size() || src_block >= src.blocks_.size())
    return OutOfRange("page store: block index " + std::to_string(block) + " or source block " +
                      std::to_string(src_block) + " out of range");
  const uint64_t len = maps_[block].len;
  const uint64_t pages = len / kPageSize;
  if (src.maps_[src_block].len != len || first_page > pages || count > pages - first_page)
    return OutOfRange("page store: pages " + std::to_string(first_page) + "+" + std::to_string(count) +
                      " outside block '" + blocks_[block].id + "' or its source");
  const Mapping& d = maps_[block];
  const Mapping& sm = src.maps_[src_block];
  std::vector<uint64_t>& written = written_[block];
  uint64_t off = first_page * kPageSize;
  const uint64_t end = off + count * kPageSize;
  bool kernel_copy = true;
  while (off < end) {
    ASSIGN_OR_RETURN(uint64_t data, src.NextData(src_block, off));
    data = std::min(end, data - data % kPageSize);
    for (; off < data; off += kPageSize) RETURN_IF_ERROR(ApplyPage(block, off, nullptr));  // holes: zero pages
    if (off >= end) break;
    ASSIGN_OR_RETURN(uint64_t hole, src.NextHole(src_block, off));
    hole = std::min(end, std::max(off + kPageSize, (hole + kPageSize - 1) / kPageSize * kPageSize));
    uint64_t done = off;
    while (kernel_copy && done < hole) {
      loff_t in = static_cast<loff_t>(done), out = static_cast<loff_t>(done);
      ssize_t n = ::copy_file_range(sm.fd, &in, d.fd, &out, hole - done, 0);
      if (n <= 0) {
        if (n < 0 && errno == EINTR) continue;
        kernel_copy = false;  // not here (another filesystem, an old kernel): copy below
        break;
      }
      done += static_cast<uint64_t>(n);
    }
    done -= done % kPageSize;  // a partial page is copied again below
    for (uint64_t p = done; p < hole; p += kPageSize) std::memcpy(d.addr + p, sm.addr + p, kPageSize);
    for (uint64_t p = off; p < hole; p += kPageSize) written[p / kPageSize / 64] |= 1ull << (p / kPageSize % 64);
    const uint64_t n = (hole - off) / kPageSize;
    stats_.pages_applied.fetch_add(n, std::memory_order_relaxed);
    stats_.bytes_applied.fetch_add(n * kPageSize, std::memory_order_relaxed);
    off = hole;
  }
  return OkStatus();
}

Status PageStore::PunchAll() {
  written_.assign(blocks_.size(), {});
  for (size_t i = 0; i < maps_.size(); ++i) {
    const Mapping& m = maps_[i];
    // Truncating drops the pages from the cache and from our mapping; the
    // mapping stays valid once the file has its length back.
    if (::ftruncate(m.fd, 0) < 0 || ::ftruncate(m.fd, static_cast<off_t>(m.len)) < 0)
      return ErrnoStatus("ftruncate " + Join(dir_, m.file), errno);
    RETURN_IF_ERROR(Reserve(m.fd, m.len, Join(dir_, m.file)));
    written_[i].assign((m.len / kPageSize + 63) / 64, 0);
  }
  return OkStatus();
}

Status PageStore::BeginInitialSync() {
  state_ = State::kSyncing;
  invalid_reason_ = "the initial sync has not completed";
  synced_ = false;
  RETURN_IF_ERROR(WriteMeta(CurrentMeta(), true));
  return PunchAll();
}

Status PageStore::CompleteInitialSync(std::string_view device_blob, uint64_t epoch) {
  if (state_ != State::kSyncing)
    return FailedPrecondition("page store " + dir_ + ": no initial sync in progress");
  if (device_blob.empty() || device_blob.back() != 0 || device_blob.size() > qemu::kMaxDeviceState)
    return DataLoss("page store: device state of the initial sync is empty, too large or not "
                    "terminated by EOF");
  std::string file = "device-" + std::to_string(epoch) + ".bin";
  RETURN_IF_ERROR(WriteFileReplace(Join(dir_, file), device_blob));
  Meta m = CurrentMeta();
  m.committed_epoch = epoch;
  m.initial_sync_complete = true;
  m.device_blob_file = file;
  m.synced = false;
  RETURN_IF_ERROR(WriteMeta(m, true));
  state_ = State::kCommitted;
  invalid_reason_.clear();
  written_.clear();
  written_.shrink_to_fit();
  committed_epoch_ = epoch;
  device_blob_.assign(device_blob);
  device_blob_file_ = file;
  synced_ = false;
  stats_.commits.fetch_add(1, std::memory_order_relaxed);
  // A new image: the record file is sized again by the checkpoints from here.
  RemoveStaleBlobs(file, true);
  LOG_INFO(kTag) << "initial sync complete for " << dir_ << " (epoch " << epoch << ")";
  return OkStatus();
}

Status PageStore::ValidateBatch(std::string_view batch, size_t batch_index) const {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(batch.data());
  size_t n = batch.size();
  size_t pos = 0;
  auto bad = [&](const std::string& what) {
    return DataLoss("checkpoint page batch " + std::to_string(batch_index) + " at byte " +
                    std::to_string(pos) + ": " + what);
  };
  while (pos < n) {
    if (n - pos < kBatchRecordHeader) return bad("truncated record header");
    uint32_t block = LoadU32(p + pos);
    uint64_t v = LoadU64(p + pos + 4);
    uint64_t flags = v & kBatchFlagMask;
    uint64_t offset = v & ~kBatchFlagMask;
    if (block >= blocks_.size())
      return bad("block index " + std::to_string(block) + " of " + std::to_string(blocks_.size()));
    if (flags & ~kBatchFlagZero)
      return bad("misaligned offset or unknown flags 0x" + std::to_string(flags));
    if (offset >= maps_[block].len)
      return bad("offset " + std::to_string(offset) + " beyond block '" + blocks_[block].id +
                 "' of " + std::to_string(maps_[block].len) + " bytes");
    size_t rec = kBatchRecordHeader + ((flags & kBatchFlagZero) ? 0 : kPageSize);
    if (n - pos < rec) return bad("truncated page data");
    pos += rec;
  }
  return OkStatus();
}

void PageStore::ApplyBatch(std::string_view batch) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(batch.data());
  size_t n = batch.size();
  size_t pos = 0;
  uint64_t pages = 0, zeros = 0;
  while (pos < n) {
    uint32_t block = LoadU32(p + pos);
    uint64_t v = LoadU64(p + pos + 4);
    uint8_t* dst = maps_[block].addr + (v & ~kBatchFlagMask);
    pos += kBatchRecordHeader;
    if (v & kBatchFlagZero) {
      if (!IsZeroPage(dst)) std::memset(dst, 0, kPageSize);
      ++zeros;
    } else {
      std::memcpy(dst, p + pos, kPageSize);
      pos += kPageSize;
      ++pages;
    }
  }
  stats_.pages_applied.fetch_add(pages, std::memory_order_relaxed);
  stats_.zero_pages_applied.fetch_add(zeros, std::memory_order_relaxed);
  stats_.bytes_applied.fetch_add((pages + zeros) * kPageSize, std::memory_order_relaxed);
}

Status PageStore::Commit(uint64_t epoch, Staging&& staging) {
  Staging& s = staging;
  if (state_ != State::kCommitted)
    return FailedPrecondition("page store " + dir_ + ": cannot commit epoch " +
                              std::to_string(epoch) + ": " + invalid_reason_);
  if (epoch <= committed_epoch_)
    return FailedPrecondition("page store " + dir_ + ": epoch " + std::to_string(epoch) +
                              " is not after the committed epoch " +
                              std::to_string(committed_epoch_));
  // Validate everything before the first byte of memory changes.
  const std::string& blob = s.device_blob();
  if (blob.empty() || blob.back() != 0 || blob.size() > qemu::kMaxDeviceState) {
    stats_.rejected_commits.fetch_add(1, std::memory_order_relaxed);
    return DataLoss("checkpoint " + std::to_string(epoch) +
                    ": device state is empty, too large or not terminated by EOF");
  }
  for (size_t i = 0; i < s.batches().size(); ++i) {
    if (Status st = ValidateBatch(s.batches()[i], i); !st.ok()) {
      stats_.rejected_commits.fetch_add(1, std::memory_order_relaxed);
      return st.Annotate("checkpoint " + std::to_string(epoch));
    }
  }

  // New blob under a new name: the committed one stays intact until meta moves.
  const std::string file = EpochFile("device-", epoch, ".bin");
  const std::string redo = kRedoFile;
  const std::string file_path = Join(dir_, file), redo_path = Join(dir_, redo);
  // Until the marker is written nothing is decided: a failure removes the new
  // epoch's device blob and the store stays where it was, in memory and on
  // disk. (The record file stays: no marker names it, so whatever it holds is
  // never read; WriteRedo removes it itself when writing it failed.)
  auto abandon = [&](const Status& st) {
    ::unlink(file_path.c_str());
    LOG_WARN(kTag) << "store " << dir_ << ": checkpoint " << epoch << " not committed, the store stays at epoch "
                   << committed_epoch_ << ": " << st.ToString();
    return st;
  };
  if (Status st = WriteFileReplace(file_path, blob); !st.ok()) return abandon(st);
  if (Status st = CallHook(CommitStep::kBlobWritten, 0); !st.ok()) return abandon(st);
  if (Status st = WriteRedo(redo_path, epoch, s); !st.ok()) return abandon(st);
  if (Status st = CallHook(CommitStep::kRedoWritten, 0); !st.ok()) return abandon(st);
  Meta marker = CurrentMeta();
  marker.applying = true;
  marker.applying_epoch = epoch;
  marker.redo_file = redo;
  marker.synced = false;
  if (Status st = WriteMeta(marker, false); !st.ok()) return abandon(st);  // meta.json.tmp never renamed
  if (Status st = CallHook(CommitStep::kMarkerWritten, 0); !st.ok()) {
    // Nothing applied yet: take the marker back.
    if (Status r = WriteMeta(CurrentMeta(), false); !r.ok()) {
      state_ = State::kTorn;
      invalid_reason_ = "the commit of epoch " + std::to_string(epoch) + " failed after its marker was written (" +
                        st.message() + ") and the marker could not be taken back (" + r.message() +
                        "); reopening the store finishes the commit from " + redo;
      return st;
    }
    return abandon(st);
  }

  // From here on the commit is decided: a crash is finished by Open() from
  // the redo record.
  for (size_t i = 0; i < s.batches().size(); ++i) {
    ApplyBatch(s.batches()[i]);
    if (Status st = CallHook(CommitStep::kBatchApplied, i); !st.ok()) {
      state_ = State::kTorn;
      invalid_reason_ = "the commit of epoch " + std::to_string(epoch) + " stopped after batch " + std::to_string(i) +
                        " of " + std::to_string(s.batches().size()) + " (" + st.message() +
                        "); reopening the store finishes it from " + redo;
      return st;
    }
  }

  Meta m = CurrentMeta();
  m.committed_epoch = epoch;
  m.device_blob_file = file;
  m.synced = false;
  // Atomic replace without fsync: an fsync here costs ~10 ms per epoch on the
  // ack path and buys nothing, since pages are not durable across a host crash
  // either (Open checks the boot id).
  if (Status st = WriteMeta(m, false); !st.ok()) {
    state_ = State::kTorn;
    invalid_reason_ = "epoch " + std::to_string(epoch) + " was applied but its commit record could not be written (" +
                      st.message() + "); reopening the store finishes the commit from " + redo;
    return st;
  }
  Status hook = CallHook(CommitStep::kCommitRecordWritten, 0);  // committed either way
  std::string old = device_blob_file_;
  committed_epoch_ = epoch;
  device_blob_ = s.TakeDeviceBlob();
  device_blob_file_ = file;
  synced_ = false;
  // The record file is kept for the next commit (overwritten in place).
  if (!old.empty() && old != file) ::unlink(Join(dir_, old).c_str());
  stats_.commits.fetch_add(1, std::memory_order_relaxed);
  return hook;
}

Status PageStore::WriteRedo(const std::string& path, uint64_t epoch, const Staging& s) {
  const std::vector<std::string>& batches = s.batches();
  if (batches.size() > kRedoMaxBatches)
    return InvalidArgument("checkpoint " + std::to_string(epoch) + " has " + std::to_string(batches.size()) +
                           " page batches, more than a redo record holds");
  const std::string& blob = s.device_blob();
  std::string header(kRedoMagic, sizeof(kRedoMagic));
  header.reserve(kRedoFixedHeader + 8 * batches.size());
  PutU32(&header, kRedoVersion);
  PutU32(&header, static_cast<uint32_t>(batches.size()));
  PutU64(&header, epoch);
  PutU64(&header, blob.size());
  PutU32(&header, crc32c::Value(blob.data(), blob.size()));
  PutU32(&header, 0);
  uint64_t total = header.size() + kRedoTrailer;
  for (const auto& b : batches) {
    PutU64(&header, b.size());
    total += 8 + b.size();
  }

  // Gathered, not copied: header, every batch, then the trailer. Written in
  // two parts (the header and the first half of the batches, then the rest)
  // so a test hook can stop between them; a crash can tear the record
  // anywhere anyway.
  std::vector<struct iovec> iov;
  iov.reserve(batches.size() + 1);
  iov.push_back({header.data(), header.size()});
  for (const auto& b : batches)
    if (!b.empty()) iov.push_back({const_cast<char*>(b.data()), b.size()});
  const size_t split = 1 + (iov.size() - 1) / 2;

  // The one record file, overwritten in place from offset 0: its page cache
  // and disk blocks are reused, where a new file per commit paid for fresh
  // page cache, block reservation and the unlink (docs/architecture.md,
  // "Crash-safe store commit"). Opened by name every time, so the marker
  // always names the file written.
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
  if (!fd.valid()) return ErrnoStatus("opening the redo record " + path, errno);
  // A failed write leaves no usable record; removing the file also gives its
  // space back (ENOSPC). The next commit creates it again.
  auto fail = [&](const Status& st) {
    ::unlink(path.c_str());
    redo_small_run_ = 0;
    return st;
  };
  auto failed_write = [&](const Status& st) { return fail(st.Annotate("writing the redo record " + path)); };
  struct stat sb;
  if (::fstat(fd.get(), &sb) < 0) return failed_write(ErrnoStatus("fstat", errno));
  const bool regular = S_ISREG(sb.st_mode);
  uint64_t size = regular ? static_cast<uint64_t>(sb.st_size) : 0;
  if (regular && redo_small_run_ >= kRedoShrinkAfter) {
    const uint64_t target = RoundUp(std::max(2 * redo_small_max_, total), kRedoGrowStep);
    if (target < size && ::ftruncate(fd.get(), static_cast<off_t>(target)) == 0) {
      LOG_INFO(kTag) << "store " << dir_ << ": " << kRedoFile << " shrunk from " << size << " to " << target
                     << " bytes (the last " << redo_small_run_ << " records were at most " << redo_small_max_
                     << " bytes)";
      size = target;
    }
    redo_small_run_ = 0;
  }
  if (regular && size < total) {
    // Reserve the blocks before writing: a full disk fails here, cleanly.
    const uint64_t grow = RoundUp(total, kRedoGrowStep);
    if (::fallocate(fd.get(), 0, 0, static_cast<off_t>(grow)) == 0) {
      size = grow;
    } else if (errno != EOPNOTSUPP && errno != EINVAL) {  // else: no fallocate, the writes extend it
      return failed_write(ErrnoStatus("growing it to " + std::to_string(grow) + " bytes", errno));
    }
  }

  // The CRC of each piece is computed right before the piece is written, so
  // the copy into the page cache reads it from the cache, not from memory.
  uint32_t crc = 0;
  uint64_t off = 0;
  size_t next = 0;
  auto write_to = [&](size_t end) -> Status {
    while (next < end) {
      size_t j = next;
      uint64_t bytes = 0;
      do {
        crc = crc32c::Extend(crc, iov[j].iov_base, iov[j].iov_len);
        bytes += iov[j].iov_len;
        ++j;
      } while (j < end && bytes < kRedoWriteChunk && j - next < IOV_MAX);
      RETURN_IF_ERROR(PwriteVecFull(fd.get(), iov.data() + next, static_cast<int>(j - next), off));
      off += bytes;
      next = j;
    }
    return OkStatus();
  };
  if (Status st = write_to(split); !st.ok()) return failed_write(st);
  if (Status st = CallHook(CommitStep::kRedoWriting, off); !st.ok()) return fail(st);
  if (Status st = write_to(iov.size()); !st.ok()) return failed_write(st);
  uint8_t trailer[kRedoTrailer];
  StoreU32(trailer, crc);
  struct iovec t = {trailer, sizeof(trailer)};
  if (Status st = PwriteVecFull(fd.get(), &t, 1, off); !st.ok()) return failed_write(st);

  size = std::max(size, total);
  if (total <= size / 4) {
    redo_small_max_ = redo_small_run_ == 0 ? total : std::max(redo_small_max_, total);
    ++redo_small_run_;
  } else {
    redo_small_run_ = 0;
  }
  return OkStatus();
}

Status PageStore::FinishInterruptedCommit(const Meta& meta) {
  const uint64_t epoch = meta.applying_epoch;
  const std::string path = Join(dir_, meta.redo_file);
  if (epoch <= meta.committed_epoch)
    return DataLoss("the marker's epoch " + std::to_string(epoch) + " is not after the committed epoch " +
                    std::to_string(meta.committed_epoch));
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return DataLoss("redo record " + path + " is missing");
    return ErrnoStatus("open " + path, errno);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) return ErrnoStatus("fstat " + path, errno);
  const size_t n = static_cast<size_t>(st.st_size);
  if (n < kRedoFixedHeader + kRedoTrailer)
    return DataLoss("redo record " + path + ": short: " + std::to_string(n) +
                    " bytes, less than the smallest record (" + std::to_string(kRedoFixedHeader + kRedoTrailer) + ")");
  void* addr = ::mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED) return ErrnoStatus("mmap " + path, errno);
  struct Unmap {
    void* a;
    size_t n;
    ~Unmap() { ::munmap(a, n); }
  } unmap{addr, n};
  ::madvise(addr, n, MADV_SEQUENTIAL);
  StatusOr<RedoRecord> rec = ParseRedo(static_cast<const uint8_t*>(addr), n, epoch);
  if (!rec.ok()) return DataLoss("redo record " + path + ": " + rec.status().message());
  const std::vector<std::string_view>& batches = rec->batches;
  for (size_t i = 0; i < batches.size(); ++i) {
    if (Status v = ValidateBatch(batches[i], i); !v.ok()) return DataLoss("redo record " + path + ": " + v.message());
  }
  const std::string file = EpochFile("device-", epoch, ".bin");
  auto blob = ReadFileToString(Join(dir_, file));
  if (!blob.ok())
    return DataLoss("device state of epoch " + std::to_string(epoch) + " unreadable: " + blob.status().message());
  if (blob->size() != rec->blob_length || crc32c::Value(blob->data(), blob->size()) != rec->blob_crc)
    return DataLoss(file + " (" + std::to_string(blob->size()) + " bytes) is not the device state redo record " +
                    path + " describes (" + std::to_string(rec->blob_length) + " bytes, CRC-32C " +
                    Hex32(rec->blob_crc) + ")");
  if (blob->empty() || blob->back() != 0) return DataLoss(file + " is not terminated by EOF");

  const uint64_t pages0 = stats_.pages_applied.load(), zeros0 = stats_.zero_pages_applied.load();
  for (std::string_view b : batches) ApplyBatch(b);
  Meta m = meta;
  m.applying = false;
  m.applying_epoch = 0;
  m.redo_file.clear();
  m.committed_epoch = epoch;
  m.device_blob_file = file;
  m.boot_id = boot_id_;
  m.synced = false;
  // Memory holds epoch `epoch` now; if this fails the marker stays and the
  // next Open applies the record again.
  RETURN_IF_ERROR(WriteMeta(m, false).Annotate("applied redo record " + path + " but writing the commit record"));
  state_ = State::kCommitted;
  invalid_reason_.clear();
  committed_epoch_ = epoch;
  device_blob_ = std::move(*blob);
  device_blob_file_ = file;
  synced_ = false;
  stats_.commits.fetch_add(1, std::memory_order_relaxed);
  // redo.log stays for the next commit; a redo-<epoch>.log (a store from
  // before the record file was kept) goes.
  if (meta.redo_file != kRedoFile) ::unlink(path.c_str());
  if (SafeFileName(meta.device_blob_file) && meta.device_blob_file != file)
    ::unlink(Join(dir_, meta.device_blob_file).c_str());
  LOG_INFO(kTag) << "store " << dir_ << ": finished the interrupted commit of epoch " << epoch << " from "
                 << meta.redo_file << " (" << batches.size() << " batches, " << (stats_.pages_applied.load() - pages0)
                 << " pages, " << (stats_.zero_pages_applied.load() - zeros0) << " zero pages, a record of "
                 << rec->length << " bytes); it replaces epoch " << meta.committed_epoch;
  return OkStatus();
}

Status PageStore::Sync() {
  if (state_ != State::kCommitted)
    return FailedPrecondition("page store " + dir_ + ": nothing committed to sync");
  for (size_t i = 0; i < maps_.size(); ++i) {
    if (::msync(maps_[i].addr, maps_[i].len, MS_SYNC) < 0)
      return ErrnoStatus("msync " + Join(dir_, maps_[i].file), errno);
  }
  RETURN_IF_ERROR(FsyncPath(Join(dir_, device_blob_file_), false));
  RETURN_IF_ERROR(FsyncPath(Join(dir_, kManifest), false));
  Meta m = CurrentMeta();
  m.synced = true;
  RETURN_IF_ERROR(WriteMeta(m, true));
  RETURN_IF_ERROR(FsyncPath(dir_, true));
  synced_ = true;
  return OkStatus();
}

StatusOr<uint64_t> PageStore::NextData(size_t i, uint64_t from) const {
  const Mapping& m = maps_[i];
  if (from >= m.len) return m.len;
  off_t r = ::lseek(m.fd, static_cast<off_t>(from), SEEK_DATA);
  if (r < 0) {
    if (errno == ENXIO) return m.len;  // only a hole from here on
    if (errno == EINVAL) return from;  // no SEEK_DATA: treat all as data
    return ErrnoStatus("lseek SEEK_DATA " + Join(dir_, m.file), errno);
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), m.len);
}

StatusOr<uint64_t> PageStore::NextHole(size_t i, uint64_t from) const {
  const Mapping& m = maps_[i];
  if (from >= m.len) return m.len;
  off_t r = ::lseek(m.fd, static_cast<off_t>(from), SEEK_HOLE);
  if (r < 0) {
    if (errno == EINVAL || errno == ENXIO) return m.len;
    return ErrnoStatus("lseek SEEK_HOLE " + Join(dir_, m.file), errno);
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), m.len);
}

std::vector<std::string> PageStore::RemoveStaleBlobs(const std::string& keep, bool record_file) {
  std::vector<std::string> removed;
  DIR* d = ::opendir(dir_.c_str());
  if (!d) return removed;
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    bool blob = name.rfind("device-", 0) == 0 && EndsWith(name, ".bin") && name != keep;
    bool redo = (name.rfind("redo-", 0) == 0 && EndsWith(name, ".log")) || (record_file && name == kRedoFile);
    bool tmp = name.size() > 4 && EndsWith(name, ".tmp");
    if ((blob || redo || tmp) && ::unlink(Join(dir_, name).c_str()) == 0 && !tmp) removed.push_back(name);
  }
  ::closedir(d);
  return removed;
}

}  // namespace remus
