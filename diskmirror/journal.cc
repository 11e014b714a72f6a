#include "diskmirror/journal.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "common/io.h"
#include "common/log.h"

namespace remus {

using journal::kDataStart;
using journal::kRecordHeaderSize;
using journal::RecordHeader;
using journal::RecordType;

namespace {

constexpr size_t kScanChunk = 4 << 20;
constexpr uint64_t kApplyChunk = 8 << 20;

std::string Dirname(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Reads [pos, pos+n) of a file of `size` bytes through a window buffer;
// sequential scans read kScanChunk at a time (less near the end of the file,
// so a small journal costs no 4 MiB buffer).
class Window {
 public:
  Window(File* f, uint64_t size) : f_(f), size_(size) {}
  // Returns a pointer to n bytes at pos, or nullptr if the file ends first.
  StatusOr<const uint8_t*> Get(uint64_t pos, size_t n) {
    if (pos >= pos_ && pos + n <= pos_ + len_) return buf_.data() + (pos - pos_);
    size_t want = std::max<uint64_t>(n, std::min<uint64_t>(kScanChunk, size_ > pos ? size_ - pos : 0));
    if (buf_.size() < want) buf_.resize(want);
    ASSIGN_OR_RETURN(size_t got, f_->Read(pos, {buf_.data(), want}));
    pos_ = pos;
    len_ = got;
    if (got < n) return static_cast<const uint8_t*>(nullptr);
    return static_cast<const uint8_t*>(buf_.data());
  }

 private:
  File* f_;
  uint64_t size_;
  std::vector<uint8_t> buf_;
  uint64_t pos_ = 0;
  size_t len_ = 0;
};

// Non-overlapping byte ranges of one batch of concurrent image writes.
class RangeSet {
 public:
  bool Overlaps(uint64_t off, uint64_t len) const {
    auto it = r_.upper_bound(off);
    if (it != r_.begin() && std::prev(it)->second > off) return true;
    return it != r_.end() && it->first < off + len;
  }
  void Add(uint64_t off, uint64_t len) { r_[off] = off + len; }
  void Clear() { r_.clear(); }

 private:
  std::map<uint64_t, uint64_t> r_;
};

const char* TypeName(RecordType t) {
  switch (t) {
    case RecordType::kWrite: return "write";
    case RecordType::kZero: return "zero";
    case RecordType::kTrim: return "trim";
    case RecordType::kCommit: return "commit";
  }
  return "?";
}

}  // namespace

Journal::Journal(FileIo* io, std::string path, JournalOptions opts)
    : io_(io), path_(std::move(path)), opts_(std::move(opts)) {}

Journal::~Journal() = default;

std::string Journal::Where() const {
  return "disk journal " + (opts_.name.empty() ? path_ : opts_.name + " (" + path_ + ")");
}

Status Journal::Fail(const Status& s, const std::string& what) {
  failed_ = Status(s.code(), Where() + ": " + what + ": " + s.message());
  LOG_ERROR("diskmirror") << failed_.message();
  return failed_;
}

StatusOr<std::unique_ptr<Journal>> Journal::Open(FileIo* io, const std::string& path, JournalOptions opts) {
  if (opts.disk_size == 0) return InvalidArgument("disk journal " + path + ": disk size is 0");
  std::unique_ptr<Journal> j(new Journal(io, path, std::move(opts)));
  ASSIGN_OR_RETURN(j->file_, io->Open(path, true));
  ASSIGN_OR_RETURN(uint64_t size, j->file_->Size());
  Status s = size == 0 ? j->Create() : j->Recover();
  if (!s.ok()) return Status(s.code(), j->Where() + ": " + s.message());
  return j;
}

Status Journal::Create() {
  sb_ = journal::Superblock{1, 1, false, 0, opts_.disk_size};
  recovery_ = JournalRecovery{};
  recovery_.created = true;
  // Slot 0 is zeroed with it: a file too short to read a slot from may still
  // hold a stale superblock there, which would outrank this one once the
  // file is long enough (and name another generation, killing our records).
  uint8_t slots[2][journal::kSlotSize] = {};
  journal::EncodeSuperblock(sb_, slots[1]);
  const WriteOp ops[2] = {{journal::kSlotOffset[0], {slots[0], journal::kSlotSize}},
                          {journal::kSlotOffset[1], {slots[1], journal::kSlotSize}}};
  RETURN_IF_ERROR(file_->Write(ops));
  RETURN_IF_ERROR(file_->Truncate(kDataStart));
  RETURN_IF_ERROR(file_->Sync());
  RETURN_IF_ERROR(io_->SyncDir(Dirname(path_)));
  committed_end_ = written_end_ = end_ = kDataStart;
  return OkStatus();
}

Status Journal::WriteSuperblock(const journal::Superblock& sb) {
  uint8_t slot[journal::kSlotSize];
  journal::EncodeSuperblock(sb, slot);
  RETURN_IF_ERROR(file_->Write(journal::kSlotOffset[sb.seq % 2], {slot, sizeof slot}));
  return file_->Sync();
}

Status Journal::Recover() {
  ASSIGN_OR_RETURN(uint64_t size, file_->Size());
  uint8_t head[2 * journal::kSlotSize] = {};
  ASSIGN_OR_RETURN(size_t got, file_->Read(0, {head, sizeof head}));
  std::optional<journal::Superblock> best;
  for (int i = 0; i < 2; ++i) {
    if (got < journal::kSlotOffset[i] + journal::kSlotSize) continue;
    auto sb = journal::DecodeSuperblock(head + journal::kSlotOffset[i]);
    if (sb && (!best || sb->seq > best->seq)) best = sb;
  }
  if (!best) {
    // A creation that crashed before its sync: no record was ever written.
    if (size <= kDataStart) return Create();
    return DataLoss("both superblocks are damaged; the journal cannot be read");
  }
  sb_ = *best;
  if (sb_.disk_size != opts_.disk_size)
    return FailedPrecondition("journal was made for a disk of " + std::to_string(sb_.disk_size) +
                              " bytes, but the disk has " + std::to_string(opts_.disk_size));
  if (opts_.discard_after && sb_.has_applied && sb_.applied_epoch > *opts_.discard_after)
    return FailedPrecondition("the disk image already holds epoch " + std::to_string(sb_.applied_epoch) +
                              ", after the last committed checkpoint " + std::to_string(*opts_.discard_after));
  recovery_ = JournalRecovery{};
  if (sb_.has_applied) recovery_.applied_epoch = sb_.applied_epoch;
  uint64_t valid_end = kDataStart;
  return Scan(size, &valid_end);
}

Status Journal::Scan(uint64_t size, uint64_t* valid_end) {
  struct Commit {
    uint64_t epoch;
    uint64_t end;        // file offset after the COMMIT record
    size_t entry_count;  // committed entries up to and including this epoch
  };
  std::vector<Entry> committed, open;
  std::vector<Commit> commits;
  std::optional<uint64_t> lower;  // records must be of a later epoch
  if (sb_.has_applied) lower = sb_.applied_epoch;

  Window w(file_.get(), size);
  uint64_t pos = kDataStart;
  std::string stop_reason;
  while (pos < size) {
    if (size - pos < kRecordHeaderSize) { stop_reason = "torn record header"; break; }
    ASSIGN_OR_RETURN(const uint8_t* p, w.Get(pos, kRecordHeaderSize));
    if (p == nullptr) { stop_reason = "short read"; break; }
    RecordHeader h;
    if (!journal::DecodeRecordHeader(p, &h)) { stop_reason = "bad record magic"; break; }
    if (!journal::IsKnownType(static_cast<uint8_t>(h.type))) { stop_reason = "unknown record type"; break; }
    if (h.type == RecordType::kWrite && (h.length == 0 || h.length > journal::kMaxWriteData)) {
      stop_reason = "bad write length";
      break;
    }
    uint64_t data = journal::DataBytes(h);
    if (size - pos - kRecordHeaderSize < data) { stop_reason = "torn record data"; break; }
    ASSIGN_OR_RETURN(p, w.Get(pos, kRecordHeaderSize + data));
    if (p == nullptr) { stop_reason = "short read"; break; }
    if (journal::RecordCrc(p, {p + kRecordHeaderSize, static_cast<size_t>(data)}) != h.crc) {
      stop_reason = "crc mismatch";
      break;
    }
    if (h.generation != sb_.generation) { stop_reason = "record of an earlier generation"; break; }
    // A well-formed record of this generation that does not fit the epoch
    // sequence ends the log like a torn one; CheckNoCommitAfter tells
    // whether committed data lies beyond it.
    if (lower && h.epoch <= *lower) { stop_reason = "epoch out of order"; break; }
    if (!open.empty() && open.front().epoch != h.epoch) { stop_reason = "epoch changes without a commit"; break; }
    if (h.type == RecordType::kCommit) {
      if (h.length != 0 || h.offset != open.size()) { stop_reason = "commit record count mismatch"; break; }
      committed.insert(committed.end(), open.begin(), open.end());
      open.clear();
      commits.push_back({h.epoch, pos + kRecordHeaderSize, committed.size()});
      lower = h.epoch;
    } else {
      if (h.offset > opts_.disk_size || h.length > opts_.disk_size - h.offset) {
        stop_reason = "extent beyond the disk";
        break;
      }
      open.push_back({h.type, h.epoch, h.offset, h.length, pos, h.crc});
    }
    pos += kRecordHeaderSize + data;
  }
  *valid_end = pos;
  if (pos < size) {
    RETURN_IF_ERROR(CheckNoCommitAfter(pos, size, lower));
    recovery_.torn_tail = true;
    LOG_WARN("diskmirror") << Where() << ": dropping " << (size - pos) << " bytes after offset " << pos << " ("
                           << stop_reason << "); no committed epoch follows";
  }

  // Keep the commits up to discard_after.
  size_t keep = commits.size();
  if (opts_.discard_after) {
    keep = 0;
    while (keep < commits.size() && commits[keep].epoch <= *opts_.discard_after) keep++;
  }
  for (size_t i = keep; i < commits.size(); ++i) recovery_.discarded_epochs.push_back(commits[i].epoch);
  for (size_t i = 0; i < keep; ++i) recovery_.committed_pending.push_back(commits[i].epoch);
  uint64_t cut = keep == 0 ? kDataStart : commits[keep - 1].end;
  size_t kept_entries = keep == 0 ? 0 : commits[keep - 1].entry_count;
  recovery_.dropped_records = (committed.size() - kept_entries) + open.size() + (commits.size() - keep);
  recovery_.dropped_bytes = size - cut;
  committed.resize(kept_entries);

  if (size != cut) {
    RETURN_IF_ERROR(file_->Truncate(cut));
    RETURN_IF_ERROR(file_->Sync());
  }
  entries_ = std::move(committed);
  committed_count_ = entries_.size();
  if (keep > 0) last_committed_ = commits[keep - 1].epoch;
  else if (sb_.has_applied) last_committed_ = sb_.applied_epoch;
  committed_end_ = written_end_ = end_ = cut;
  if (!recovery_.committed_pending.empty() || recovery_.dropped_records > 0)
    LOG_INFO("diskmirror") << Where() << ": recovered " << recovery_.committed_pending.size()
                           << " committed epoch(s) to apply, dropped " << recovery_.dropped_records << " record(s)";
  return OkStatus();
}

Status Journal::CheckNoCommitAfter(uint64_t from, uint64_t size, std::optional<uint64_t> lower) {
  // A window of kScanChunk candidates plus one header; only what the file holds.
  std::vector<uint8_t> buf(std::min<uint64_t>(kScanChunk, size - from) + kRecordHeaderSize);
  uint8_t magic[4];
  StoreU32(magic, journal::kRecordMagic);
  for (uint64_t base = from; base < size; base += kScanChunk) {
    ASSIGN_OR_RETURN(size_t got, file_->Read(base, {buf.data(), buf.size()}));
    size_t limit = std::min(got, kScanChunk);  // candidates starting here; the next window has the rest
    for (size_t i = 0; i < limit; ++i) {
      const void* hit = std::memchr(buf.data() + i, magic[0], limit - i);
      if (hit == nullptr) break;
      i = static_cast<size_t>(static_cast<const uint8_t*>(hit) - buf.data());
      if (i + kRecordHeaderSize > got) break;
      const uint8_t* p = buf.data() + i;
      RecordHeader h;
      if (!journal::DecodeRecordHeader(p, &h) || h.type != RecordType::kCommit || h.length != 0 ||
          h.generation < sb_.generation || journal::RecordCrc(p, {}) != h.crc)
        continue;
      // A later generation than the superblock's means the superblock that
      // started it was lost; in this generation, a later epoch was committed.
      if (h.generation == sb_.generation && lower && h.epoch <= *lower) continue;
      return DataLoss("record at offset " + std::to_string(from) + " is damaged, but the commit of epoch " +
                      std::to_string(h.epoch) + " follows at offset " + std::to_string(base + i) +
                      ": committed disk writes are lost");
    }
  }
  return OkStatus();
}

Status Journal::CheckEpochForAppend(uint64_t epoch) const {
  if (last_committed_ && epoch <= *last_committed_)
    return FailedPrecondition(Where() + ": epoch " + std::to_string(epoch) + " is not after the committed epoch " +
                              std::to_string(*last_committed_));
  if (open_epoch_ && epoch != *open_epoch_)
    return FailedPrecondition(Where() + ": epoch " + std::to_string(epoch) + " while epoch " +
                              std::to_string(*open_epoch_) + " is open");
  return OkStatus();
}

Status Journal::Append(uint64_t epoch, RecordType type, uint64_t off, uint64_t len, std::span<const uint8_t> data) {
  if (!failed_.ok()) return failed_;
  RETURN_IF_ERROR(CheckEpochForAppend(epoch));
  if (off > opts_.disk_size || len > opts_.disk_size - off)
    return OutOfRange(Where() + ": " + TypeName(type) + " " + std::to_string(off) + "+" + std::to_string(len) +
                      " is beyond the disk's " + std::to_string(opts_.disk_size) + " bytes");
  if (len == 0) return OkStatus();
  size_t at = buf_.size();
  buf_.resize(at + kRecordHeaderSize);
  RecordHeader h;
  h.type = type;
  h.length = static_cast<uint32_t>(len);
  h.generation = sb_.generation;
  h.epoch = epoch;
  h.offset = off;
  uint32_t crc = journal::EncodeRecordHeader(h, data, buf_.data() + at);
  buf_.insert(buf_.end(), data.begin(), data.end());
  entries_.push_back({type, epoch, off, static_cast<uint32_t>(len), end_, crc});
  open_epoch_ = epoch;
  end_ += kRecordHeaderSize + data.size();
  if (buf_.size() >= opts_.append_buffer) return FlushBuffer();
  return OkStatus();
}

Status Journal::AppendWrite(uint64_t epoch, uint64_t off, std::span<const uint8_t> data) {
  if (off > opts_.disk_size || data.size() > opts_.disk_size - off)
    return OutOfRange(Where() + ": write " + std::to_string(off) + "+" + std::to_string(data.size()) +
                      " is beyond the disk's " + std::to_string(opts_.disk_size) + " bytes");
  while (!data.empty()) {
    size_t k = std::min<size_t>(data.size(), journal::kMaxWriteData);
    RETURN_IF_ERROR(Append(epoch, RecordType::kWrite, off, k, data.first(k)));
    data = data.subspan(k);
    off += k;
  }
  return OkStatus();
}

Status Journal::AppendZero(uint64_t epoch, uint64_t off, uint64_t len) {
  if (off > opts_.disk_size || len > opts_.disk_size - off) return Append(epoch, RecordType::kZero, off, len, {});
  do {
    uint64_t k = std::min<uint64_t>(len, journal::kMaxExtent);
    RETURN_IF_ERROR(Append(epoch, RecordType::kZero, off, k, {}));
    off += k;
    len -= k;
  } while (len > 0);
  return OkStatus();
}

Status Journal::AppendTrim(uint64_t epoch, uint64_t off, uint64_t len) {
  if (off > opts_.disk_size || len > opts_.disk_size - off) return Append(epoch, RecordType::kTrim, off, len, {});
  do {
    uint64_t k = std::min<uint64_t>(len, journal::kMaxExtent);
    RETURN_IF_ERROR(Append(epoch, RecordType::kTrim, off, k, {}));
    off += k;
    len -= k;
  } while (len > 0);
  return OkStatus();
}

Status Journal::FlushBuffer() {
  if (buf_.empty()) return OkStatus();
  Status s = file_->Write(written_end_, buf_);
  if (!s.ok()) return Fail(s, "writing records of epoch " + std::to_string(open_epoch_.value_or(0)));
  written_end_ += buf_.size();
  buf_.clear();
  return OkStatus();
}

Status Journal::Commit(uint64_t epoch) {
  if (!failed_.ok()) return failed_;
  if (last_committed_ && epoch <= *last_committed_)
    return FailedPrecondition(Where() + ": commit of epoch " + std::to_string(epoch) + ", not after the committed epoch " +
                              std::to_string(*last_committed_));
  if (open_epoch_ && *open_epoch_ != epoch)
    return FailedPrecondition(Where() + ": commit of epoch " + std::to_string(epoch) + " while epoch " +
                              std::to_string(*open_epoch_) + " is open");
  if (!open_epoch_) {  // nothing to make durable
    last_committed_ = epoch;
    return OkStatus();
  }
  const std::string not_committed = "epoch " + std::to_string(epoch) + " is not committed (do not ack it)";
  RETURN_IF_ERROR(FlushBuffer());
  Status s = file_->Sync();
  if (!s.ok()) return Fail(s, not_committed + "; syncing its records failed");
  // Only now may the COMMIT record reach the disk.
  uint8_t rec[kRecordHeaderSize];
  RecordHeader h;
  h.type = RecordType::kCommit;
  h.generation = sb_.generation;
  h.epoch = epoch;
  h.offset = entries_.size() - committed_count_;
  journal::EncodeRecordHeader(h, {}, rec);
  s = file_->Write(written_end_, {rec, sizeof rec});
  if (!s.ok()) return Fail(s, not_committed + "; writing its commit record failed");
  s = file_->Sync();
  if (!s.ok()) return Fail(s, not_committed + "; syncing its commit record failed");
  written_end_ += kRecordHeaderSize;
  end_ = committed_end_ = written_end_;
  committed_count_ = entries_.size();
  last_committed_ = epoch;
  open_epoch_.reset();
  return OkStatus();
}

Status Journal::DropUncommitted() {
  if (!failed_.ok()) return failed_;
  if (!open_epoch_) return OkStatus();
  entries_.resize(committed_count_);
  buf_.clear();
  if (written_end_ > committed_end_) {
    Status s = file_->Truncate(committed_end_);
    if (!s.ok()) return Fail(s, "dropping the records of epoch " + std::to_string(*open_epoch_));
  }
  written_end_ = end_ = committed_end_;
  open_epoch_.reset();
  return OkStatus();
}

std::optional<uint64_t> Journal::applied_epoch() const {
  if (!sb_.has_applied) return std::nullopt;
  return sb_.applied_epoch;
}

size_t Journal::pending_epochs() const {
  size_t n = 0;
  for (size_t i = 0; i < committed_count_; ++i)
    if (i == 0 || entries_[i].epoch != entries_[i - 1].epoch) n++;
  return n;
}

Status Journal::ApplyEntries(File* image, size_t count) {
  std::vector<uint8_t> rbuf;
  std::vector<WriteOp> batch;
  RangeSet ranges;
  auto submit = [&]() -> Status {
    if (batch.empty()) return OkStatus();
    Status s = image->Write(batch);
    batch.clear();
    ranges.Clear();
    return s;
  };
  size_t i = 0;
  while (i < count) {
    // Read a run of records that are close together in the journal (only
    // commit records lie between them) with one read.
    size_t j = i;
    uint64_t first = entries_[i].pos;
    uint64_t last_end = first;
    while (j < count) {
      const Entry& e = entries_[j];
      uint64_t end = e.pos + kRecordHeaderSize + (e.type == RecordType::kWrite ? e.len : 0);
      if (j > i && end - first > kApplyChunk) break;
      last_end = end;
      j++;
    }
    rbuf.resize(static_cast<size_t>(last_end - first));
    ASSIGN_OR_RETURN(size_t got, file_->Read(first, {rbuf.data(), rbuf.size()}));
    if (got < rbuf.size()) return DataLoss("journal ends at " + std::to_string(first + got) + " inside a committed record");
    for (size_t k = i; k < j; ++k) {
      const Entry& e = entries_[k];
      const uint8_t* p = rbuf.data() + (e.pos - first);
      size_t data = e.type == RecordType::kWrite ? e.len : 0;
      RecordHeader h;
      if (!journal::DecodeRecordHeader(p, &h) || h.crc != e.crc || h.type != e.type || h.offset != e.off ||
          journal::RecordCrc(p, {p + kRecordHeaderSize, data}) != e.crc)
        return DataLoss("committed record of epoch " + std::to_string(e.epoch) + " at offset " +
                        std::to_string(e.pos) + " is damaged");
      if (e.type == RecordType::kWrite) {
        if (ranges.Overlaps(e.off, e.len)) RETURN_IF_ERROR(submit());
        batch.push_back({e.off, {p + kRecordHeaderSize, data}});
        ranges.Add(e.off, e.len);
        continue;
      }
      RETURN_IF_ERROR(submit());
      if (e.type == RecordType::kZero) RETURN_IF_ERROR(image->Zero(e.off, e.len));
      else RETURN_IF_ERROR(image->Discard(e.off, e.len));
    }
    RETURN_IF_ERROR(submit());  // before rbuf is reused
    i = j;
  }
  return OkStatus();
}

Status Journal::MoveTail(size_t first, uint64_t new_generation) {
  uint64_t to = kDataStart;
  std::vector<uint8_t> rec;
  for (size_t i = first; i < entries_.size(); ++i) {
    Entry& e = entries_[i];
    size_t data = e.type == RecordType::kWrite ? e.len : 0;
    rec.resize(kRecordHeaderSize + data);
    ASSIGN_OR_RETURN(size_t got, file_->Read(e.pos, {rec.data(), rec.size()}));
    RecordHeader h;
    if (got < rec.size() || !journal::DecodeRecordHeader(rec.data(), &h) || h.crc != e.crc)
      return DataLoss("record of open epoch " + std::to_string(e.epoch) + " at offset " + std::to_string(e.pos) +
                      " is damaged");
    // Sources lie at or after their destinations, and each record is read
    // whole before it is written, so nothing unread is overwritten.
    h.generation = new_generation;
    e.crc = journal::EncodeRecordHeader(h, {rec.data() + kRecordHeaderSize, data}, rec.data());
    RETURN_IF_ERROR(file_->Write(to, rec));
    e.pos = to;
    to += rec.size();
  }
  RETURN_IF_ERROR(file_->Truncate(to));
  entries_.erase(entries_.begin(), entries_.begin() + static_cast<ptrdiff_t>(first));
  committed_count_ = 0;
  committed_end_ = kDataStart;
  written_end_ = end_ = to;
  return OkStatus();
}

Status Journal::ApplyCommitted(File* image) {
  if (!failed_.ok()) return failed_;
  if (committed_count_ == 0) return OkStatus();
  const uint64_t from = entries_.front().epoch;
  const uint64_t through = *last_committed_;
  const std::string what = "applying epochs " + std::to_string(from) + ".." + std::to_string(through) + " to " +
                           image->path();
  Status s = FlushBuffer();
  if (!s.ok()) return s;
  s = ApplyEntries(image, committed_count_);
  if (!s.ok()) return Fail(s, what);
  s = image->Sync();
  if (!s.ok()) return Fail(s, what + " (fsync of the image)");
  // The image is durable: record it, and start a new generation so the old
  // records are dead even if the truncation below does not reach the disk.
  journal::Superblock next = sb_;
  next.seq++;
  next.generation++;
  next.has_applied = true;
  next.applied_epoch = through;
  s = WriteSuperblock(next);
  if (!s.ok()) return Fail(s, what + " (recording the applied epoch)");
  sb_ = next;
  s = MoveTail(committed_count_, next.generation);
  if (!s.ok()) return Fail(s, "truncating after " + what);
  return OkStatus();
}

}  // namespace remus
