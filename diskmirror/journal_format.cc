#include "diskmirror/journal_format.h"

#include <cstring>

#include "common/crc32c.h"
#include "common/io.h"

namespace remus::journal {

bool IsKnownType(uint8_t t) { return t >= 1 && t <= 4; }

void EncodeSuperblock(const Superblock& sb, uint8_t* out) {
  std::memset(out, 0, kSlotSize);
  StoreU64(out, kSuperMagic);
  StoreU32(out + 8, kVersion);
  StoreU32(out + 12, sb.has_applied ? kSuperFlagHasApplied : 0);
  StoreU64(out + 16, sb.seq);
  StoreU64(out + 24, sb.generation);
  StoreU64(out + 32, sb.applied_epoch);
  StoreU64(out + 40, sb.disk_size);
  StoreU32(out + 48, crc32c::Value(out, 48));
}

std::optional<Superblock> DecodeSuperblock(const uint8_t* in) {
  if (LoadU64(in) != kSuperMagic || LoadU32(in + 8) != kVersion) return std::nullopt;
  if (LoadU32(in + 48) != crc32c::Value(in, 48)) return std::nullopt;
  uint32_t flags = LoadU32(in + 12);
  if (flags & ~kSuperFlagHasApplied) return std::nullopt;
  Superblock sb;
  sb.has_applied = (flags & kSuperFlagHasApplied) != 0;
  sb.seq = LoadU64(in + 16);
  sb.generation = LoadU64(in + 24);
  sb.applied_epoch = LoadU64(in + 32);
  sb.disk_size = LoadU64(in + 40);
  return sb;
}

uint32_t RecordCrc(const uint8_t* header, std::span<const uint8_t> data) {
  uint32_t c = crc32c::Extend(0, header, 12);
  c = crc32c::Extend(c, header + 16, kRecordHeaderSize - 16);
  return crc32c::Extend(c, data.data(), data.size());
}

uint32_t EncodeRecordHeader(RecordHeader h, std::span<const uint8_t> data, uint8_t* out) {
  std::memset(out, 0, kRecordHeaderSize);
  StoreU32(out, kRecordMagic);
  out[4] = static_cast<uint8_t>(h.type);
  StoreU32(out + 8, h.length);
  StoreU64(out + 16, h.generation);
  StoreU64(out + 24, h.epoch);
  StoreU64(out + 32, h.offset);
  uint32_t crc = RecordCrc(out, data);
  StoreU32(out + 12, crc);
  return crc;
}

bool DecodeRecordHeader(const uint8_t* in, RecordHeader* h) {
  if (LoadU32(in) != kRecordMagic) return false;
  h->type = static_cast<RecordType>(in[4]);
  h->length = LoadU32(in + 8);
  h->crc = LoadU32(in + 12);
  h->generation = LoadU64(in + 16);
  h->epoch = LoadU64(in + 24);
  h->offset = LoadU64(in + 32);
  return true;
}

}  // namespace remus::journal
