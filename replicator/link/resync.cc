#include "replicator/link/resync.h"

#include "replicator/link/page_batch.h"

namespace remus::wire {

Status ResyncOfferAssembler::Begin(ResyncOfferMsg offer) {
  if (begun_) return InvalidArgument("RESYNC_OFFER sent twice");
  begun_ = true;
  offer_ = std::move(offer);
  hashes_.assign(offer_.blocks.size(), {});
  block_ = 0;
  return OkStatus();
}

Status ResyncOfferAssembler::Add(const ResyncHashesMsg& m) {
  if (!begun_) return InvalidArgument("RESYNC_HASHES before RESYNC_OFFER");
  if (complete()) return InvalidArgument("RESYNC_HASHES after every offered page had its hash");
  if (m.block != block_)
    return InvalidArgument("RESYNC_HASHES for block " + std::to_string(m.block) + " while block " +
                           std::to_string(block_) + " is incomplete");
  std::vector<PageHash>& h = hashes_[block_];
  const uint64_t pages = offer_.blocks[block_].used_length / kPageSize;
  if (m.first_page != h.size())
    return InvalidArgument("RESYNC_HASHES for block " + std::to_string(m.block) + " starts at page " +
                           std::to_string(m.first_page) + ", expected " + std::to_string(h.size()));
  if (m.hashes.size() > pages - h.size())
    return InvalidArgument("RESYNC_HASHES for block " + std::to_string(m.block) + " runs past its " +
                           std::to_string(pages) + " pages");
  h.insert(h.end(), m.hashes.begin(), m.hashes.end());
  while (block_ < hashes_.size() && hashes_[block_].size() == offer_.blocks[block_].used_length / kPageSize) block_++;
  return OkStatus();
}

DeltaFilter::DeltaFilter(std::vector<qemu::RamBlock> offered, std::vector<std::vector<PageHash>> hashes)
    : offered_(std::move(offered)), offered_hashes_(std::move(hashes)) {}

size_t DeltaFilter::Bind(const std::vector<qemu::RamBlock>& blocks) {
  match_.assign(blocks.size(), -1);
  current_.assign(blocks.size(), {});
  matched_ = 0;
  offered_pages_ = 0;
  for (size_t i = 0; i < blocks.size(); i++) {
    current_[i].assign(blocks[i].used_length / kPageSize, ZeroPageHash());
    for (size_t j = 0; j < offered_.size(); j++) {
      if (offered_[j].id == blocks[i].id && offered_[j].used_length == blocks[i].used_length &&
          j < offered_hashes_.size() && offered_hashes_[j].size() == current_[i].size()) {
        match_[i] = static_cast<long>(j);
        matched_++;
        offered_pages_ += current_[i].size();
        break;
      }
    }
  }
  return matched_;
}

bool DeltaFilter::Decide(uint32_t block, uint64_t offset, const uint8_t* data) {
  if (block >= current_.size() || offset % kPageSize != 0 || offset / kPageSize >= current_[block].size()) {
    sent_++;
    return false;
  }
  const uint64_t page = offset / kPageSize;
  const PageHash h = HashPage(data);
  current_[block][page] = h;
  long j = match_[block];
  if (j >= 0 && offered_hashes_[static_cast<size_t>(j)][page] == h) {
    kept_++;
    return true;
  }
  sent_++;
  return false;
}

PageHash DeltaFilter::Digest() const {
  ImageDigest d;
  for (const auto& b : current_) d.Add(b.data(), b.size());
  return d.Finish();
}

void KeepRunBuilder::Add(uint32_t block, uint64_t page) {
  if (open_ && run_.block == block && run_.first_page + run_.count == page && run_.count < UINT32_MAX) {
    run_.count++;
    return;
  }
  if (open_) AppendKeepRun(&out_, run_);
  run_ = {block, page, 1};
  open_ = true;
}

std::string KeepRunBuilder::Take() {
  if (open_) AppendKeepRun(&out_, run_);
  open_ = false;
  std::string s = std::move(out_);
  out_.clear();
  return s;
}

}  // namespace remus::wire
