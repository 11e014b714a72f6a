#include "replicator/backup/store_hash.h"

#include <algorithm>
#include <vector>

namespace remus {

Status HashStoreBlock(const PageStore& store, size_t i, size_t chunk_pages,
                      const std::function<Status(uint64_t first_page, const wire::PageHash* hashes, size_t n)>& fn) {
  const uint64_t len = store.blocks()[i].used_length;
  const uint64_t pages = len / wire::kPageSize;
  const uint8_t* base = store.BlockData(i);
  chunk_pages = std::max<size_t>(1, chunk_pages);
  std::vector<wire::PageHash> buf;
  buf.reserve(std::min<uint64_t>(chunk_pages, pages));
  uint64_t first = 0;
  // Where the data is: [data_from, data_to) may hold data, the rest are holes.
  uint64_t data_from = 0, data_to = 0;
  for (uint64_t p = 0; p < pages; p++) {
    uint64_t off = p * wire::kPageSize;
    if (off >= data_to) {
      ASSIGN_OR_RETURN(data_from, store.NextData(i, off));
      data_from -= data_from % wire::kPageSize;
      if (data_from < len) {
        ASSIGN_OR_RETURN(data_to, store.NextHole(i, data_from));
        data_to = std::max(data_to, data_from + wire::kPageSize);
      } else {
        data_to = len;
      }
    }
    bool hole = off < data_from || data_from >= len;
    buf.push_back(hole ? wire::ZeroPageHash() : wire::HashPage(base + off));
    if (buf.size() == chunk_pages) {
      RETURN_IF_ERROR(fn(first, buf.data(), buf.size()));
      first += buf.size();
      buf.clear();
    }
  }
  if (!buf.empty()) RETURN_IF_ERROR(fn(first, buf.data(), buf.size()));
  return OkStatus();
}

StatusOr<wire::PageHash> StoreDigest(const PageStore& store) {
  wire::ImageDigest d;
  for (size_t i = 0; i < store.blocks().size(); i++) {
    RETURN_IF_ERROR(HashStoreBlock(store, i, 65536, [&](uint64_t, const wire::PageHash* h, size_t n) {
      d.Add(h, n);
      return OkStatus();
    }));
  }
  return d.Finish();
}

}  // namespace remus
