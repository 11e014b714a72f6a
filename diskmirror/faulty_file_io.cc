#include "diskmirror/faulty_file_io.h"

#include <algorithm>
#include <cerrno>
#include <functional>
#include <random>

#include "common/thread_annotations.h"

namespace remus {

class FaultyFileIo::FaultyFile final : public File {
 public:
  FaultyFile(FaultyFileIo* io, std::string path, std::shared_ptr<Node> node)
      : io_(io), path_(std::move(path)), node_(std::move(node)) {}

  Status Write(std::span<const WriteOp> ops) override {
    MutexLock l(io_->mu_);
    for (const WriteOp& op : ops) {
      if (int e = io_->Check(Op::kWrite, path_)) return ErrnoStatus("write " + path_, e);
      Unsynced u{Op::kWrite, op.offset, op.data.size(), {op.data.begin(), op.data.end()}};
      uint64_t end = op.offset + op.data.size();
      uint64_t size = node_->current.size();
      int err = 0;
      if (end > size && end - size > io_->space_left_) {
        // The disk fills up in the middle of this write: what fits lands.
        uint64_t max_end = size + io_->space_left_;
        uint64_t fit = op.offset >= max_end ? 0 : max_end - op.offset;
        u.data.resize(static_cast<size_t>(fit));
        u.len = fit;
        err = ENOSPC;
      }
      if (!u.data.empty()) {
        uint64_t new_end = u.off + u.len;
        if (new_end > size) io_->space_left_ -= new_end - size;
        Apply(&node_->current, u);
        node_->unsynced.push_back(std::move(u));
      }
      if (err) return ErrnoStatus("write " + path_, err);
    }
    return OkStatus();
  }

  StatusOr<size_t> Read(uint64_t off, std::span<uint8_t> out) override {
    MutexLock l(io_->mu_);
    if (int e = io_->Check(Op::kRead, path_)) return ErrnoStatus("read " + path_, e);
    const auto& v = node_->current;
    if (off >= v.size()) return size_t{0};
    size_t k = static_cast<size_t>(std::min<uint64_t>(out.size(), v.size() - off));
    std::copy_n(v.begin() + static_cast<ptrdiff_t>(off), k, out.begin());
    return k;
  }

  Status Sync() override {
    MutexLock l(io_->mu_);
    if (int e = io_->Check(Op::kSync, path_)) return ErrnoStatus("fdatasync " + path_, e);
    io_->syncs_++;
    node_->durable = node_->current;
    node_->unsynced.clear();
    return OkStatus();
  }

  Status Truncate(uint64_t size) override {
    MutexLock l(io_->mu_);
    if (int e = io_->Check(Op::kTruncate, path_)) return ErrnoStatus("truncate " + path_, e);
    Unsynced u{Op::kTruncate, 0, size, {}};
    Apply(&node_->current, u);
    node_->unsynced.push_back(std::move(u));
    return OkStatus();
  }

  StatusOr<uint64_t> Size() override {
    MutexLock l(io_->mu_);
    return static_cast<uint64_t>(node_->current.size());
  }

  Status Zero(uint64_t off, uint64_t len) override { return ZeroLike(Op::kZero, off, len, "zero "); }
  Status Discard(uint64_t off, uint64_t len) override { return ZeroLike(Op::kDiscard, off, len, "discard "); }

  const std::string& path() const override { return path_; }

 private:
  Status ZeroLike(Op op, uint64_t off, uint64_t len, const char* what) {
    MutexLock l(io_->mu_);
    if (int e = io_->Check(op, path_)) return ErrnoStatus(what + path_, e);
    Unsynced u{Op::kZero, off, len, {}};
    Apply(&node_->current, u);
    node_->unsynced.push_back(std::move(u));
    return OkStatus();
  }

  FaultyFileIo* io_;
  std::string path_;
  std::shared_ptr<Node> node_;  // its contents are guarded by io_->mu_
};

void FaultyFileIo::Apply(std::vector<uint8_t>* v, const Unsynced& u) {
  switch (u.op) {
    case Op::kWrite: {
      uint64_t end = u.off + u.data.size();
      if (end > v->size()) v->resize(static_cast<size_t>(end));
      std::copy(u.data.begin(), u.data.end(), v->begin() + static_cast<ptrdiff_t>(u.off));
      break;
    }
    case Op::kTruncate:
      v->resize(static_cast<size_t>(u.len));
      break;
    case Op::kZero:
    case Op::kDiscard: {
      // KEEP_SIZE: nothing past the end.
      if (u.off >= v->size()) break;
      uint64_t end = std::min<uint64_t>(v->size(), u.off + u.len);
      std::fill(v->begin() + static_cast<ptrdiff_t>(u.off), v->begin() + static_cast<ptrdiff_t>(end), 0);
      break;
    }
    default:
      break;
  }
}

int FaultyFileIo::Check(Op op, const std::string& path) {
  bool mutating = op != Op::kRead;
  if (power_left_ == 0) return EIO;
  if (mutating) {
    mutating_ops_++;
    if (power_left_ != ~0ull) power_left_--;
  }
  for (size_t i = 0; i < faults_.size(); ++i) {
    const Fault& f = faults_[i];
    if (f.op != op || path.find(f.path_contains) == std::string::npos) continue;
    uint64_t n = fault_hits_[i]++;
    if (n >= f.skip && n - f.skip < f.times) return f.err;
  }
  return 0;
}

StatusOr<std::unique_ptr<File>> FaultyFileIo::Open(const std::string& path, bool create) {
  MutexLock l(mu_);
  if (power_left_ == 0) return ErrnoStatus("open " + path, EIO);
  auto it = files_.find(path);
  if (it == files_.end()) {
    if (!create) return ErrnoStatus("open " + path, ENOENT);
    it = files_.emplace(path, std::make_shared<Node>()).first;
  }
  return std::unique_ptr<File>(new FaultyFile(this, path, it->second));
}

Status FaultyFileIo::SyncDir(const std::string& dir) {
  MutexLock l(mu_);
  if (power_left_ == 0) return ErrnoStatus("fsync directory " + dir, EIO);
  return OkStatus();
}

void FaultyFileIo::AddFault(Fault f) {
  MutexLock l(mu_);
  faults_.push_back(std::move(f));
  fault_hits_.push_back(0);
}

void FaultyFileIo::ClearFaults() {
  MutexLock l(mu_);
  faults_.clear();
  fault_hits_.clear();
  space_left_ = ~0ull;
}

void FaultyFileIo::SetSpaceLeft(uint64_t bytes) {
  MutexLock l(mu_);
  space_left_ = bytes;
}

void FaultyFileIo::CutPowerAfter(uint64_t ops) {
  MutexLock l(mu_);
  power_left_ = ops;
}

void FaultyFileIo::Crash(CrashOptions o) {
  MutexLock l(mu_);
  for (auto& [path, node] : files_) {
    std::vector<uint8_t> v = node->durable;
    if (o.random_subset_seed != 0) {
      std::mt19937 rng(o.random_subset_seed + static_cast<uint32_t>(std::hash<std::string>()(path)));
      for (const Unsynced& u : node->unsynced)
        if (rng() & 1) Apply(&v, u);
      node->durable = v;
      node->current = std::move(v);
      node->unsynced.clear();
      continue;
    }
    size_t keep = std::min(o.keep_unsynced_ops, node->unsynced.size());
    for (size_t i = 0; i < keep; ++i) Apply(&v, node->unsynced[i]);
    if (keep < node->unsynced.size() && o.tear_bytes > 0 && node->unsynced[keep].op == Op::kWrite) {
      Unsynced torn = node->unsynced[keep];
      torn.data.resize(std::min(torn.data.size(), o.tear_bytes));
      Apply(&v, torn);
    }
    node->durable = v;
    node->current = std::move(v);
    node->unsynced.clear();
  }
  power_left_ = ~0ull;
}

void FaultyFileIo::Crash() { Crash(CrashOptions{}); }

uint64_t FaultyFileIo::mutating_ops() const {
  MutexLock l(mu_);
  return mutating_ops_;
}

uint64_t FaultyFileIo::syncs() const {
  MutexLock l(mu_);
  return syncs_;
}

bool FaultyFileIo::Exists(const std::string& path) const {
  MutexLock l(mu_);
  return files_.count(path) > 0;
}

std::vector<uint8_t> FaultyFileIo::Contents(const std::string& path) const {
  MutexLock l(mu_);
  auto it = files_.find(path);
  return it == files_.end() ? std::vector<uint8_t>{} : it->second->current;
}

std::vector<uint8_t> FaultyFileIo::DurableContents(const std::string& path) const {
  MutexLock l(mu_);
  auto it = files_.find(path);
  return it == files_.end() ? std::vector<uint8_t>{} : it->second->durable;
}

void FaultyFileIo::SetContents(const std::string& path, std::vector<uint8_t> data) {
  MutexLock l(mu_);
  auto& node = files_[path];
  if (!node) node = std::make_shared<Node>();
  node->durable = data;
  node->current = std::move(data);
  node->unsynced.clear();
}

}  // namespace remus
