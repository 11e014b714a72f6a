// Page hashes of a page store's image, for the delta resync
// (docs/formats/replication-link.md, "Delta resync"): what a backup offers
// (RESYNC_HASHES), and the digest it checks its new image against before
// committing it. Holes (never written, or punched) are zero pages and are not
// read.
//
// Thread-safety: reads the store; must not run concurrently with its writers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "common/status.h"
#include "replicator/backup/page_store.h"
#include "replicator/link/page_hash.h"

namespace remus {

// Calls fn with the hashes of block i's pages in order, at most chunk_pages
// at a time (first_page: the index of hashes[0]). Stops at fn's first error.
Status HashStoreBlock(const PageStore& store, size_t i, size_t chunk_pages,
                      const std::function<Status(uint64_t first_page, const wire::PageHash* hashes, size_t n)>& fn);

// wire::ImageDigest over every page of every block, in the store's block order.
StatusOr<wire::PageHash> StoreDigest(const PageStore& store);

}  // namespace remus
