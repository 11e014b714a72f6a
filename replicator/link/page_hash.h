// Per-page content hashes for the delta resync (docs/formats/replication-link.md,
// "Delta resync"): XXH3-128 of a page's 4096 bytes, and the image digest, an
// XXH3-128 over the pages' hashes in a defined order. 128 bits per page, so a
// collision between two different pages is not a practical concern.
//
// Thread-safety: pure functions and value types; an ImageDigest is used by
// one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace remus::wire {

// One page's XXH3-128. On the wire: 16 bytes, high half first, big-endian.
struct PageHash {
  uint64_t hi = 0;
  uint64_t lo = 0;
  bool operator==(const PageHash&) const = default;
};
inline constexpr size_t kPageHashSize = 16;

// XXH3-128 of the kPageSize bytes at data; nullptr is the zero page.
PageHash HashPage(const uint8_t* data_or_null);
// HashPage(nullptr), computed once.
const PageHash& ZeroPageHash();

void AppendPageHash(std::string* out, const PageHash& h);
PageHash LoadPageHash(const uint8_t* p);  // 16 bytes
std::string PageHashHex(const PageHash& h);                   // 32 lowercase hex digits
std::optional<PageHash> PageHashFromHex(std::string_view hex);  // exactly 32 hex digits

// The digest of an image: XXH3-128 over the 16-byte wire form of each page's
// hash, block by block in the initial copy's block order (SYNC_BEGIN), page
// by page in offset order, every page of every block exactly once.
class ImageDigest {
 public:
  ImageDigest();
  ~ImageDigest();
  ImageDigest(const ImageDigest&) = delete;
  ImageDigest& operator=(const ImageDigest&) = delete;
  void Add(const PageHash& h);
  void Add(const PageHash* h, size_t n);
  PageHash Finish() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace remus::wire
