// CRC-32C (Castagnoli), the checksum on every wire frame and journal record.
//
// Written here because Debian 12 packages no C/C++ CRC-32C library (google's
// crc32c is not in bookworm; zlib's crc32 is the other polynomial). Uses the
// SSE4.2 crc32 instruction when the CPU has it and a table otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace remus::crc32c {

// Continues a CRC: Extend(Extend(0, a), b) == Value(a ++ b).
uint32_t Extend(uint32_t crc, const void* data, size_t n);
inline uint32_t Value(const void* data, size_t n) { return Extend(0, data, n); }

}  // namespace remus::crc32c
