#include "replicator/link/page_hash.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "common/io.h"
#include "replicator/link/page_batch.h"

namespace remus::wire {

namespace {
PageHash FromXxh(XXH128_hash_t h) { return {h.high64, h.low64}; }
}  // namespace

PageHash HashPage(const uint8_t* data) {
  if (!data) return ZeroPageHash();
  return FromXxh(XXH3_128bits(data, kPageSize));
}

const PageHash& ZeroPageHash() {
  static const PageHash zero = [] {
    static const uint8_t zeros[kPageSize] = {};
    return FromXxh(XXH3_128bits(zeros, kPageSize));
  }();
  return zero;
}

void AppendPageHash(std::string* out, const PageHash& h) {
  PutU64(out, h.hi);
  PutU64(out, h.lo);
}

PageHash LoadPageHash(const uint8_t* p) { return {LoadU64(p), LoadU64(p + 8)}; }

std::string PageHashHex(const PageHash& h) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; i++) {
    out[15 - i] = kDigits[(h.hi >> (4 * i)) & 0xf];
    out[31 - i] = kDigits[(h.lo >> (4 * i)) & 0xf];
  }
  return out;
}

std::optional<PageHash> PageHashFromHex(std::string_view hex) {
  if (hex.size() != 32) return std::nullopt;
  uint64_t v[2] = {0, 0};
  for (size_t i = 0; i < 32; i++) {
    char c = hex[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (d < 0) return std::nullopt;
    v[i / 16] = (v[i / 16] << 4) | static_cast<uint64_t>(d);
  }
  return PageHash{v[0], v[1]};
}

struct ImageDigest::State {
  XXH3_state_t* s = XXH3_createState();
  ~State() { XXH3_freeState(s); }
};

ImageDigest::ImageDigest() : state_(std::make_unique<State>()) { XXH3_128bits_reset(state_->s); }
ImageDigest::~ImageDigest() = default;

void ImageDigest::Add(const PageHash& h) {
  uint8_t b[kPageHashSize];
  for (int i = 0; i < 8; i++) {
    b[i] = static_cast<uint8_t>(h.hi >> (56 - 8 * i));
    b[8 + i] = static_cast<uint8_t>(h.lo >> (56 - 8 * i));
  }
  XXH3_128bits_update(state_->s, b, sizeof b);
}

void ImageDigest::Add(const PageHash* h, size_t n) {
  std::string buf;
  buf.reserve(std::min<size_t>(n, 4096) * kPageHashSize);
  for (size_t i = 0; i < n; i++) {
    AppendPageHash(&buf, h[i]);
    if (buf.size() >= 4096 * kPageHashSize) {
      XXH3_128bits_update(state_->s, buf.data(), buf.size());
      buf.clear();
    }
  }
  if (!buf.empty()) XXH3_128bits_update(state_->s, buf.data(), buf.size());
}

PageHash ImageDigest::Finish() const { return FromXxh(XXH3_128bits_digest(state_->s)); }

}  // namespace remus::wire
