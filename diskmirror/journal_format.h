// The on-disk format of the backup's per-disk journal (diskmirror/README.md
// draws it; this header holds the constants and the one encoder/decoder).
// Every integer is big-endian. Every superblock and record carries a CRC-32C.
//
// File layout:
//   [0, 512)      superblock slot 0
//   [512, 1024)   superblock slot 1
//   [1024, 4096)  zero
//   [4096, ...)   records, back to back, no padding
//
// Superblock slot (52 bytes used, rest zero):
//   0  u64 magic "RMDJRNL1"      24 u64 generation
//   8  u32 version (1)           32 u64 applied_epoch (valid if flags bit 0)
//   12 u32 flags (bit 0: has_applied)   40 u64 disk_size
//   16 u64 seq                   48 u32 crc32c of bytes [0, 48)
// Two slots are written alternately (slot seq % 2); the valid one with the
// higher seq wins, so a torn superblock write leaves the previous one.
//
// Record header (40 bytes), then data:
//   0  u32 magic "DJRC"          16 u64 generation
//   4  u8  type                  24 u64 epoch
//   5  u8  0, 6 u16 0            32 u64 offset (COMMIT: records in the epoch)
//   8  u32 length
//   12 u32 crc32c of header bytes [0,12) ++ [16,40) ++ data
// type WRITE carries `length` data bytes for the disk at `offset`; ZERO and
// TRIM carry none and cover [offset, offset+length) of the disk; COMMIT has
// length 0 and ends its epoch.
//
// Semantics: an epoch counts as committed only when its COMMIT record is
// durable; the journal fsyncs the epoch's records before writing COMMIT, so a
// durable COMMIT implies durable records. Records whose generation differs
// from the superblock's are dead (left behind by a truncation); recovery
// stops at the first record that is torn, fails its crc or is of another
// generation. Epochs up to applied_epoch are in the disk image already.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

namespace remus::journal {

inline constexpr uint64_t kSuperMagic = 0x524D444A524E4C31ull;  // "RMDJRNL1"
inline constexpr uint32_t kVersion = 1;
inline constexpr size_t kSlotSize = 512;
inline constexpr size_t kSuperUsed = 52;
inline constexpr uint64_t kSlotOffset[2] = {0, 512};
inline constexpr uint64_t kDataStart = 4096;
inline constexpr uint32_t kSuperFlagHasApplied = 1;

inline constexpr uint32_t kRecordMagic = 0x444A5243u;  // "DJRC"
inline constexpr size_t kRecordHeaderSize = 40;
// Bigger writes are split into several records; zero/trim extents are split
// at kMaxExtent (their length field is 32 bits).
inline constexpr uint32_t kMaxWriteData = 32u << 20;
inline constexpr uint32_t kMaxExtent = 1u << 31;

enum class RecordType : uint8_t { kWrite = 1, kZero = 2, kTrim = 3, kCommit = 4 };
bool IsKnownType(uint8_t t);

struct Superblock {
  uint64_t seq = 0;
  uint64_t generation = 0;
  bool has_applied = false;
  uint64_t applied_epoch = 0;
  uint64_t disk_size = 0;
};

// Fills kSlotSize bytes.
void EncodeSuperblock(const Superblock& sb, uint8_t* out);
// nullopt for a bad magic, version or crc.
std::optional<Superblock> DecodeSuperblock(const uint8_t* in);

struct RecordHeader {
  RecordType type = RecordType::kWrite;
  uint32_t length = 0;
  uint64_t generation = 0;
  uint64_t epoch = 0;
  uint64_t offset = 0;
  uint32_t crc = 0;  // as stored (decode) or as computed (encode)
};

// The crc of a record: header fields (crc field excluded) and data.
uint32_t RecordCrc(const uint8_t* header, std::span<const uint8_t> data);
// Writes kRecordHeaderSize bytes with the crc of header + data; returns it.
uint32_t EncodeRecordHeader(RecordHeader h, std::span<const uint8_t> data, uint8_t* out);
// Parses the fields; false if the magic is wrong. Checks nothing else.
bool DecodeRecordHeader(const uint8_t* in, RecordHeader* h);
// Bytes of data that follow a header of this type and length.
inline uint64_t DataBytes(const RecordHeader& h) { return h.type == RecordType::kWrite ? h.length : 0; }

}  // namespace remus::journal
