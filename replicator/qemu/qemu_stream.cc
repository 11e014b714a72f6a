#include "replicator/qemu/qemu_stream.h"

#include <cstring>
#include <map>
#include <optional>

#include <nlohmann/json.hpp>

namespace remus::qemu {
namespace {

std::string Hex(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

std::string_view ColoMessageName(uint32_t m) {
  static constexpr std::string_view kNames[] = {
      "checkpoint-ready", "checkpoint-request", "checkpoint-reply", "vmstate-send",
      "vmstate-size",     "vmstate-received",   "vmstate-loaded"};
  return m < std::size(kNames) ? kNames[m] : std::string_view("unknown");
}

namespace {

StatusOr<std::string> ReadIdstr(BufferedReader* in) {
  ASSIGN_OR_RETURN(uint8_t len, in->U8());
  return in->Bytes(len);
}

}  // namespace

Status StreamParser::ReadFooter(uint32_t section_id) {
  uint64_t at = in_->offset();
  ASSIGN_OR_RETURN(uint8_t t, in_->U8());
  if (t != kSecFooter)
    return DataLoss("expected section footer at offset " + std::to_string(at) + ", found byte " + Hex(t));
  ASSIGN_OR_RETURN(uint32_t id, in_->U32());
  if (id != section_id)
    return DataLoss("section footer at offset " + std::to_string(at) + " names section " +
                    std::to_string(id) + ", expected " + std::to_string(section_id));
  return OkStatus();
}

Status StreamParser::ReadRamStart(InitialInfo* info) {
  ASSIGN_OR_RETURN(uint64_t v, in_->U64());
  if ((v & kRamFlagMask) != kRamFlagMemSize)
    return DataLoss("ram START section does not begin with the block list (flags " + Hex(v & kRamFlagMask) + ")");
  uint64_t total = v & ~kRamFlagMask;
  uint64_t seen = 0;
  blocks_.clear();
  while (seen < total) {
    if (blocks_.size() >= kMaxRamBlocks)
      return DataLoss("ram block list exceeds " + std::to_string(kMaxRamBlocks) + " blocks");
    ASSIGN_OR_RETURN(std::string id, ReadIdstr(in_));
    ASSIGN_OR_RETURN(uint64_t len, in_->U64());
    if (len == 0 || len % kPageSize != 0)
      return DataLoss("ram block '" + id + "' has length " + std::to_string(len) + ", not a multiple of 4096");
    if (len > total - seen)
      return DataLoss("ram block '" + id + "' overruns the announced total of " + std::to_string(total) + " bytes");
    for (const auto& b : blocks_)
      if (b.id == id) return DataLoss("ram block '" + id + "' listed twice");
    seen += len;
    blocks_.push_back(RamBlock{std::move(id), len});
  }
  // Page records may follow the block list inside the START section; the
  // sender of QEMU 7.2 sends none, but the loader accepts them.
  uint64_t zero = 0;
  ASSIGN_OR_RETURN(uint64_t n, ReadRamRecords(nullptr, &zero));
  if (n != 0) return DataLoss("ram START section carried page records before any sink was ready");
  info->blocks = blocks_;
  return OkStatus();
}

StatusOr<uint64_t> StreamParser::ReadRamRecords(PageSink* sink, uint64_t* zero_pages) {
  uint64_t count = 0;
  for (;;) {
    uint64_t at = in_->offset();
    ASSIGN_OR_RETURN(uint64_t v, in_->U64());
    uint64_t flags = v & kRamFlagMask;
    uint64_t offset = v & ~kRamFlagMask;
    if (flags == kRamFlagEos) return count;
    if (flags & ~(kRamFlagZero | kRamFlagPage | kRamFlagContinue))
      return DataLoss("unsupported ram record flags " + Hex(flags) + " at offset " + std::to_string(at) +
                      " (xbzrle, compression, multifd and rdma must be off)");
    bool zero = flags & kRamFlagZero;
    bool page = flags & kRamFlagPage;
    if (zero == page) return DataLoss("ram record at offset " + std::to_string(at) + " is neither a zero page nor a page (flags " + Hex(flags) + ")");
    if (!(flags & kRamFlagContinue)) {
      ASSIGN_OR_RETURN(std::string id, ReadIdstr(in_));
      current_block_ = -1;
      for (size_t i = 0; i < blocks_.size(); i++)
        if (blocks_[i].id == id) current_block_ = static_cast<int64_t>(i);
      if (current_block_ < 0) return DataLoss("ram record at offset " + std::to_string(at) + " names unknown block '" + id + "'");
    } else if (current_block_ < 0) {
      return DataLoss("ram record at offset " + std::to_string(at) + " continues a block but none was named");
    }
    const RamBlock& b = blocks_[static_cast<size_t>(current_block_)];
    // Not offset + kPageSize > used_length: that wraps for an offset near 2^64.
    if (offset >= b.used_length || b.used_length - offset < kPageSize)
      return DataLoss("ram record at offset " + std::to_string(at) + " writes " + Hex(offset) + " beyond block '" +
                      b.id + "' of " + std::to_string(b.used_length) + " bytes");
    const uint8_t* data = nullptr;
    if (zero) {
      ASSIGN_OR_RETURN(uint8_t fill, in_->U8());
      if (fill != 0) {
        page_buf_.assign(kPageSize, fill);
        data = page_buf_.data();
      } else {
        ++*zero_pages;
      }
    } else {
      ASSIGN_OR_RETURN(data, in_->ReadSpan(kPageSize));
    }
    if (sink == nullptr) return DataLoss("unexpected page record at offset " + std::to_string(at));
    RETURN_IF_ERROR(sink->OnPage(static_cast<uint32_t>(current_block_), offset, data));
    count++;
  }
}

Status StreamParser::ReadInitialDeviceTail(InitialInfo* info) {
  // The device sections carry no lengths. QEMU writes them, EOF and the
  // VMDESCRIPTION, then waits for checkpoint-ready, so the stream pauses
  // right after `00 06 <be32 L> <L bytes of JSON>`. After each read, the
  // earliest candidate whose description has all arrived and is valid wins.
  //
  // Each position is judged once when it arrives: not a candidate, or
  // rejected for good (a length over the limit), or pending until its
  // description is complete, then judged for good. So a tail that arrives
  // in many small reads costs O(n log n), not a rescan of it all per read.
  std::string buf;
  size_t scanned = 0;                         // positions before this were judged
  std::multimap<size_t, size_t> pending;      // end of the description -> candidate
  auto valid = [&](size_t p, size_t end) {    // REQUIRES end <= buf.size()
    return end > p + 6 && buf[end - 1] == '}' &&
           nlohmann::json::accept(std::string_view(buf.data() + p + 6, end - p - 6));
  };
  for (;;) {
    if (buf.size() >= kMaxDeviceState + kMaxVmDescriptionLen)
      return ResourceExhausted("initial device state exceeds " + std::to_string(kMaxDeviceState) + " bytes");
    RETURN_IF_ERROR(in_->ReadAvailable(&buf, 1 << 20).status());
    std::optional<size_t> found;
    // Candidates that completed with this read (all before the new bytes).
    while (!pending.empty() && pending.begin()->first <= buf.size()) {
      auto [end, p] = *pending.begin();
      pending.erase(pending.begin());
      if (valid(p, end) && (!found || p < *found)) found = p;
    }
    // New positions: after every pending one, so the first valid one is
    // only needed when none completed.
    for (size_t p = scanned; !found && p + 6 <= buf.size(); p++) {
      if (buf[p] != 0 || buf[p + 1] != kSecVmDescription) continue;
      uint32_t len = LoadU32(buf.data() + p + 2);
      if (len > kMaxVmDescriptionLen) continue;
      size_t end = p + 6 + len;
      if (end > buf.size()) pending.emplace(end, p);
      else if (valid(p, end)) found = p;
    }
    scanned = buf.size() >= 5 ? buf.size() - 5 : 0;  // a header needs 6 bytes
    if (!found) continue;
    const size_t p = *found;
    const size_t end = p + 6 + LoadU32(buf.data() + p + 2);
    info->vmdescription_json = buf.substr(p + 6, end - p - 6);
    info->device_state = buf.substr(0, p + 1);  // up to and including EOF
    // Bytes past the description belong to the COLO exchange.
    in_->Unread(buf.size() - end);
    if (static_cast<uint8_t>(info->device_state[0]) != kSecFull)
      return DataLoss("initial device state does not start with a FULL section");
    return OkStatus();
  }
}

namespace {
class CountingSink final : public PageSink {
 public:
  CountingSink(PageSink* inner, uint64_t* pages) : inner_(inner), pages_(pages) {}
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    ++*pages_;
    return inner_->OnPage(block, offset, data);
  }

 private:
  PageSink* inner_;
  uint64_t* pages_;
};
}  // namespace

Status StreamParser::ReadInitial(PageSink* sink, InitialInfo* info) {
  ASSIGN_OR_RETURN(uint32_t magic, in_->U32());
  if (magic != kFileMagic) return DataLoss("not a QEMU migration stream: magic " + Hex(magic) + ", expected 0x5145564d");
  ASSIGN_OR_RETURN(uint32_t version, in_->U32());
  if (version != kFileVersion)
    return DataLoss("QEMU migration stream version " + std::to_string(version) + " is not supported (expected 3)");
  bool have_ram = false;
  CountingSink counting(sink, &info->pages);
  for (;;) {
    uint64_t at = in_->offset();
    ASSIGN_OR_RETURN(uint8_t type, in_->U8());
    switch (type) {
      case kSecConfiguration: {
        ASSIGN_OR_RETURN(uint32_t len, in_->U32());
        if (len > kMaxConfigurationLen) return DataLoss("configuration section of " + std::to_string(len) + " bytes is too long");
        ASSIGN_OR_RETURN(std::string name, in_->Bytes(len));
        info->configuration.clear();
        PutU8(&info->configuration, kSecConfiguration);
        PutU32(&info->configuration, len);
        info->configuration += name;
        ASSIGN_OR_RETURN(uint8_t next, in_->PeekU8());
        if (next == kSecSubsection)
          return Unimplemented("configuration subsections (x-ignore-shared, validate-uuid) are not supported");
        break;
      }
      case kSecCommand: {
        ASSIGN_OR_RETURN(uint16_t cmd, in_->U16());
        ASSIGN_OR_RETURN(uint16_t len, in_->U16());
        if (len > kMaxCommandLen) return DataLoss("command " + std::to_string(cmd) + " of " + std::to_string(len) + " bytes is too long");
        if (cmd == kCmdOpenReturnPath)
          return FailedPrecondition("QEMU opened a return path: turn the return-path migration capability off");
        RETURN_IF_ERROR(in_->Skip(len));
        if (cmd == kCmdEnableColo) info->colo_enabled = true;
        break;
      }
      case kSecStart: {
        ASSIGN_OR_RETURN(uint32_t id, in_->U32());
        ASSIGN_OR_RETURN(std::string name, ReadIdstr(in_));
        ASSIGN_OR_RETURN(uint32_t instance, in_->U32());
        ASSIGN_OR_RETURN(uint32_t ver, in_->U32());
        (void)instance;
        if (name != "ram")
          return Unimplemented("iterable section '" + name + "' is not supported (turn off block migration and dirty-bitmap migration)");
        if (have_ram) return DataLoss("second ram START section");
        if (ver != 4) return DataLoss("ram section version " + std::to_string(ver) + " is not supported (expected 4)");
        ram_section_id_ = id;
        info->ram_section_id = id;
        have_ram = true;
        RETURN_IF_ERROR(ReadRamStart(info));
        RETURN_IF_ERROR(ReadFooter(id));
        break;
      }
      case kSecPart:
      case kSecEnd: {
        ASSIGN_OR_RETURN(uint32_t id, in_->U32());
        if (!have_ram || id != ram_section_id_)
          return DataLoss("section id " + std::to_string(id) + " at offset " + std::to_string(at) + " is not the ram section");
        RETURN_IF_ERROR(ReadRamRecords(&counting, &info->zero_pages).status());
        RETURN_IF_ERROR(ReadFooter(id));
        if (type == kSecEnd) return ReadInitialDeviceTail(info);
        break;
      }
      default:
        return DataLoss("unexpected section type " + Hex(type) + " at offset " + std::to_string(at) +
                        " in the initial stream");
    }
  }
}

StatusOr<uint32_t> StreamParser::ReadColoMessage() {
  ASSIGN_OR_RETURN(uint32_t m, in_->U32());
  if (m > static_cast<uint32_t>(ColoMessage::kVmstateLoaded))
    return DataLoss("unknown COLO message " + std::to_string(m) + " at offset " + std::to_string(in_->offset() - 4));
  return m;
}

Status StreamParser::ExpectColoMessage(ColoMessage want) {
  ASSIGN_OR_RETURN(uint32_t m, ReadColoMessage());
  if (m != static_cast<uint32_t>(want))
    return DataLoss("expected COLO " + std::string(ColoMessageName(static_cast<uint32_t>(want))) + ", got " +
                    std::string(ColoMessageName(m)));
  return OkStatus();
}

StatusOr<uint64_t> StreamParser::ReadCheckpointRam(PageSink* sink) {
  uint64_t at = in_->offset();
  ASSIGN_OR_RETURN(uint8_t type, in_->U8());
  if (type == kSecCommand) {
    // QEMU 10.0+: SWITCHOVER_START (empty) between vmstate-send and the RAM.
    ASSIGN_OR_RETURN(uint16_t cmd, in_->U16());
    ASSIGN_OR_RETURN(uint16_t len, in_->U16());
    if (cmd != kCmdSwitchoverStart || len != 0)
      return DataLoss("checkpoint: unexpected command " + std::to_string(cmd) + " of " + std::to_string(len) +
                      " bytes at offset " + std::to_string(at));
    at = in_->offset();
    ASSIGN_OR_RETURN(type, in_->U8());
  }
  if (type != kSecEnd) return DataLoss("checkpoint: expected ram END section at offset " + std::to_string(at) + ", found type " + Hex(type));
  ASSIGN_OR_RETURN(uint32_t id, in_->U32());
  if (id != ram_section_id_)
    return DataLoss("checkpoint: section id " + std::to_string(id) + " is not the ram section " + std::to_string(ram_section_id_));
  uint64_t zero = 0;
  ASSIGN_OR_RETURN(uint64_t n, ReadRamRecords(sink, &zero));
  RETURN_IF_ERROR(ReadFooter(id));
  ASSIGN_OR_RETURN(uint8_t eof, in_->U8());
  if (eof != kSecEof) return DataLoss("checkpoint: expected EOF after the ram section, found " + Hex(eof));
  return n;
}

StatusOr<std::string> StreamParser::ReadCheckpointDevices() {
  RETURN_IF_ERROR(ExpectColoMessage(ColoMessage::kVmstateSize));
  ASSIGN_OR_RETURN(uint64_t n, in_->U64());
  if (n > kMaxDeviceState) return DataLoss("checkpoint: device state of " + std::to_string(n) + " bytes exceeds the limit");
  ASSIGN_OR_RETURN(std::string blob, in_->Bytes(n));
  if (n < 2 || static_cast<uint8_t>(blob.front()) != kSecFull || static_cast<uint8_t>(blob.back()) != kSecEof)
    return DataLoss("checkpoint: device state is not FULL sections ending in EOF");
  return blob;
}

// ---- writer ----

void StreamWriter::Header() {
  PutU32(out_, kFileMagic);
  PutU32(out_, kFileVersion);
}

void StreamWriter::Command(uint16_t cmd, std::string_view data) {
  PutU8(out_, kSecCommand);
  PutU16(out_, cmd);
  PutU16(out_, static_cast<uint16_t>(data.size()));
  out_->append(data);
}

namespace {
void PutIdstr(std::string* out, std::string_view s) {
  PutU8(out, static_cast<uint8_t>(s.size()));
  out->append(s);
}
}  // namespace

void StreamWriter::RamStart(uint32_t section_id, const std::vector<RamBlock>& blocks) {
  PutU8(out_, kSecStart);
  PutU32(out_, section_id);
  PutIdstr(out_, "ram");
  PutU32(out_, 0);  // instance
  PutU32(out_, 4);  // version
  uint64_t total = 0;
  for (const auto& b : blocks) total += b.used_length;
  PutU64(out_, total | kRamFlagMemSize);
  for (const auto& b : blocks) {
    PutIdstr(out_, b.id);
    PutU64(out_, b.used_length);
  }
  current_block_ = -1;
}

void StreamWriter::RamSectionBegin(SectionType type, uint32_t section_id) {
  PutU8(out_, type);
  PutU32(out_, section_id);
}

void StreamWriter::PageHeader(uint32_t block_index, const std::vector<RamBlock>& blocks, uint64_t offset,
                              uint64_t flags) {
  bool cont = current_block_ == static_cast<int64_t>(block_index);
  PutU64(out_, offset | flags | (cont ? kRamFlagContinue : 0));
  if (!cont) {
    PutIdstr(out_, blocks[block_index].id);
    current_block_ = block_index;
  }
}

void StreamWriter::Page(uint32_t block_index, const std::vector<RamBlock>& blocks, uint64_t offset,
                        const uint8_t* data) {
  PageHeader(block_index, blocks, offset, kRamFlagPage);
  out_->append(reinterpret_cast<const char*>(data), kPageSize);
}

void StreamWriter::ZeroPage(uint32_t block_index, const std::vector<RamBlock>& blocks, uint64_t offset) {
  PageHeader(block_index, blocks, offset, kRamFlagZero);
  PutU8(out_, 0);
}

void StreamWriter::Eos() { PutU64(out_, kRamFlagEos); }

void StreamWriter::Footer(uint32_t section_id) {
  PutU8(out_, kSecFooter);
  PutU32(out_, section_id);
}

void StreamWriter::EmptyVmDescription() {
  PutU8(out_, kSecVmDescription);
  PutU32(out_, 0);
}

void StreamWriter::Colo(ColoMessage m) { PutU32(out_, static_cast<uint32_t>(m)); }

void StreamWriter::ColoValue(ColoMessage m, uint64_t v) {
  PutU32(out_, static_cast<uint32_t>(m));
  PutU64(out_, v);
}

std::string MakeConfigurationSection(std::string_view machine) {
  std::string s;
  PutU8(&s, kSecConfiguration);
  PutU32(&s, static_cast<uint32_t>(machine.size()));
  s.append(machine);
  return s;
}

}  // namespace remus::qemu
