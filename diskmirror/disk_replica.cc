#include "diskmirror/disk_replica.h"

#include <algorithm>

namespace remus {

namespace {
// Apply when this many epochs or journal bytes are waiting: applying costs
// an image fsync and two superblock writes, so it is batched.
constexpr size_t kApplyEpochs = 16;
constexpr uint64_t kApplyBytes = 64u << 20;
}  // namespace

StatusOr<std::unique_ptr<DiskReplicaSet>> DiskReplicaSet::Open(FileIo* io, std::string image_dir,
                                                               std::string journal_dir, std::vector<ReplicaDisk> disks,
                                                               std::optional<uint64_t> discard_after) {
  std::unique_ptr<DiskReplicaSet> set(new DiskReplicaSet(io, std::move(image_dir), std::move(journal_dir), std::move(disks)));
  for (size_t i = 0; i < set->disks_.size(); i++) {
    const ReplicaDisk& d = set->disks_[i];
    if (d.size == 0) return InvalidArgument("disk " + d.id + " has size 0");
    ASSIGN_OR_RETURN(auto image, io->Open(set->ImagePath(i), true));
    ASSIGN_OR_RETURN(uint64_t have, image->Size());
    if (have != d.size) {
      RETURN_IF_ERROR(image->Truncate(d.size));
      RETURN_IF_ERROR(image->Sync());
    }
    JournalOptions jo;
    jo.disk_size = d.size;
    jo.name = d.id;
    jo.discard_after = discard_after;
    ASSIGN_OR_RETURN(auto journal, Journal::Open(io, set->journal_dir_ + "/" + d.id + ".journal", jo));
    set->images_.push_back(std::move(image));
    set->journals_.push_back(std::move(journal));
  }
  RETURN_IF_ERROR(io->SyncDir(set->image_dir_));
  set->last_committed_ = std::nullopt;
  for (const auto& j : set->journals_) {
    auto c = j->last_committed();
    if (c && (!set->last_committed_ || *c > *set->last_committed_)) set->last_committed_ = c;
  }
  return set;
}

DiskReplicaSet::~DiskReplicaSet() = default;

std::string DiskReplicaSet::ImagePath(size_t i) const { return image_dir_ + "/" + disks_[i].id + ".img"; }

Status DiskReplicaSet::Check(uint32_t disk, uint64_t off, uint64_t len) const {
  if (disk >= disks_.size())
    return OutOfRange("disk index " + std::to_string(disk) + ", but the domain has " + std::to_string(disks_.size()) +
                      " mirrored disk(s)");
  if (off > disks_[disk].size || len > disks_[disk].size - off)
    return OutOfRange("disk " + disks_[disk].id + ": extent [" + std::to_string(off) + ", +" + std::to_string(len) +
                      ") leaves the " + std::to_string(disks_[disk].size) + "-byte disk");
  return OkStatus();
}

Status DiskReplicaSet::Write(uint32_t disk, uint64_t epoch, uint64_t off, std::span<const uint8_t> data) {
  RETURN_IF_ERROR(Check(disk, off, data.size()));
  return journals_[disk]->AppendWrite(epoch, off, data);
}

Status DiskReplicaSet::Zero(uint32_t disk, uint64_t epoch, uint64_t off, uint64_t len) {
  RETURN_IF_ERROR(Check(disk, off, len));
  return journals_[disk]->AppendZero(epoch, off, len);
}

Status DiskReplicaSet::Trim(uint32_t disk, uint64_t epoch, uint64_t off, uint64_t len) {
  RETURN_IF_ERROR(Check(disk, off, len));
  return journals_[disk]->AppendTrim(epoch, off, len);
}

Status DiskReplicaSet::Commit(uint64_t epoch) {
  for (auto& j : journals_) RETURN_IF_ERROR(j->Commit(epoch));
  last_committed_ = epoch;
  return OkStatus();
}

Status DiskReplicaSet::DropUncommitted() {
  for (auto& j : journals_) RETURN_IF_ERROR(j->DropUncommitted());
  return OkStatus();
}

Status DiskReplicaSet::MaybeApply() {
  size_t epochs = 0;
  for (const auto& j : journals_) epochs = std::max(epochs, j->pending_epochs());
  if (epochs >= kApplyEpochs || journal_bytes() >= kApplyBytes) return ApplyAll();
  return OkStatus();
}

Status DiskReplicaSet::ApplyAll() {
  for (size_t i = 0; i < journals_.size(); i++) RETURN_IF_ERROR(journals_[i]->ApplyCommitted(images_[i].get()));
  return OkStatus();
}

std::optional<uint64_t> DiskReplicaSet::last_committed() const { return last_committed_; }

uint64_t DiskReplicaSet::journal_bytes() const {
  uint64_t n = 0;
  for (const auto& j : journals_) n += j->size_bytes();
  return n;
}

}  // namespace remus
