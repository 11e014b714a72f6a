#include "common/crc32c.h"

#include <isa-l/crc.h>

namespace remus::crc32c {

// ISA-L's crc32_iscsi takes and returns the raw register (no pre- or
// post-inversion); the standard CRC-32C inverts both.
uint32_t Extend(uint32_t crc, const void* data, size_t n) {
  auto* p = static_cast<unsigned char*>(const_cast<void*>(data));  // ISA-L's signature is not const
  // crc32_iscsi's length is an int: feed larger buffers in pieces.
  uint32_t c = ~crc;
  constexpr size_t kMaxChunk = size_t{1} << 30;
  while (n > 0) {
    size_t k = n < kMaxChunk ? n : kMaxChunk;
    c = crc32_iscsi(p, static_cast<int>(k), c);
    p += k;
    n -= k;
  }
  return ~c;
}

}  // namespace remus::crc32c
