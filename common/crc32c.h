// CRC-32C (Castagnoli), the checksum on every wire frame and journal record.
//
// Computed by Intel's ISA-L (libisal, Debian's libisal-dev), whose crc32_iscsi
// folds with PCLMULQDQ/VPCLMULQDQ and picks the best code for the CPU at run
// time. Debian 12 packages no other C/C++ CRC-32C library (google's crc32c is
// not in bookworm; zlib's crc32 is the other polynomial). On this project's
// test machines ISA-L runs at ~3.4x the single-stream SSE4.2 loop remus used
// before (bench/bench_crc32c).
#pragma once

#include <cstddef>
#include <cstdint>

namespace remus::crc32c {

// Continues a CRC: Extend(Extend(0, a), b) == Value(a ++ b).
uint32_t Extend(uint32_t crc, const void* data, size_t n);
inline uint32_t Value(const void* data, size_t n) { return Extend(0, data, n); }

}  // namespace remus::crc32c
