// Codec for the subset of QEMU's migration stream that a COLO receiver sees
// (QEMU 7.2 and 10.0; byte layout and the differences between the two in
// docs/formats/qemu-colo-stream.md).
//
// Parsing is streaming: pages are handed to a PageSink one at a time straight
// out of the reader's buffer, so memory stays bounded whatever the guest size.
// Only the device-state tail of the initial stream is buffered (it has no
// length prefix; see ReadInitialDeviceTail), with a hard cap.
//
// Thread-safety: a StreamParser is used by one thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/io.h"
#include "common/status.h"

namespace remus::qemu {

inline constexpr uint32_t kFileMagic = 0x5145564d;  // "QEVM"
inline constexpr uint32_t kFileVersion = 3;
inline constexpr size_t kPageSize = 4096;

enum SectionType : uint8_t {
  kSecEof = 0x00,
  kSecStart = 0x01,
  kSecPart = 0x02,
  kSecEnd = 0x03,
  kSecFull = 0x04,
  kSecSubsection = 0x05,
  kSecVmDescription = 0x06,
  kSecConfiguration = 0x07,
  kSecCommand = 0x08,
  kSecFooter = 0x7e,
};

enum class ColoMessage : uint32_t {
  kCheckpointReady = 0,
  kCheckpointRequest = 1,
  kCheckpointReply = 2,
  kVmstateSend = 3,
  kVmstateSize = 4,
  kVmstateReceived = 5,
  kVmstateLoaded = 6,
};
std::string_view ColoMessageName(uint32_t m);

inline constexpr uint16_t kCmdOpenReturnPath = 1;
inline constexpr uint16_t kCmdPing = 2;
inline constexpr uint16_t kCmdEnableColo = 8;
// QEMU 10.0+ (migration parameter send-switchover-start, on for machine types
// 10.0 and later): empty, sent before the device state of the initial stream
// and, in COLO, after vmstate-send of every checkpoint.
inline constexpr uint16_t kCmdSwitchoverStart = 11;

inline constexpr uint64_t kRamFlagZero = 0x02;
inline constexpr uint64_t kRamFlagMemSize = 0x04;
inline constexpr uint64_t kRamFlagPage = 0x08;
inline constexpr uint64_t kRamFlagEos = 0x10;
inline constexpr uint64_t kRamFlagContinue = 0x20;
inline constexpr uint64_t kRamFlagMask = 0xfff;

// Hard limits: a stream beyond them is refused, never allocated.
inline constexpr size_t kMaxRamBlocks = 256;
inline constexpr uint64_t kMaxDeviceState = 256ull << 20;
inline constexpr uint32_t kMaxCommandLen = 4096;
inline constexpr uint32_t kMaxConfigurationLen = 4096;
inline constexpr uint32_t kMaxVmDescriptionLen = 64u << 20;

struct RamBlock {
  std::string id;
  uint64_t used_length = 0;
  bool operator==(const RamBlock&) const = default;
};

// Receives pages as they are parsed.
class PageSink {
 public:
  virtual ~PageSink() = default;
  // data is kPageSize bytes, valid only during the call; for a zero page
  // (QEMU's ZERO record) data is nullptr.
  virtual Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) = 0;
};

// What the initial stream (before COLO starts) told us.
struct InitialInfo {
  std::string configuration;         // the whole CONFIGURATION section, type byte included
  std::vector<RamBlock> blocks;
  uint32_t ram_section_id = 0;
  bool colo_enabled = false;
  std::string device_state;          // FULL sections + footers + EOF byte, as in a checkpoint
  std::string vmdescription_json;
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
};

// Parses QEMU's outgoing migration stream, as the receiving end.
class StreamParser {
 public:
  explicit StreamParser(BufferedReader* in) : in_(in) {}

  // Reads the initial stream: header, configuration, commands, ram START, all
  // PART sections, ram END, the device sections, EOF and VMDESCRIPTION. Pages
  // go to sink as they arrive. Returns when QEMU has sent the whole initial
  // stream (it then waits for checkpoint-ready).
  // progress (optional) is called after each ram section with pages so far.
  Status ReadInitial(PageSink* sink, InitialInfo* info);

  // Reads one be32 COLO message.
  StatusOr<uint32_t> ReadColoMessage();
  // Reads a COLO message and checks it is `want`.
  Status ExpectColoMessage(ColoMessage want);

  // After vmstate-send: QEMU 10.0's SWITCHOVER_START command if present, the
  // ram END section with the epoch's dirty pages, its footer and the EOF byte. Returns the number of page records.
  StatusOr<uint64_t> ReadCheckpointRam(PageSink* sink);

  // vmstate-size then the device blob.
  StatusOr<std::string> ReadCheckpointDevices();

  const std::vector<RamBlock>& blocks() const { return blocks_; }

 private:
  Status ReadRamStart(InitialInfo* info);
  // Reads page records up to EOS. Returns the count of records.
  StatusOr<uint64_t> ReadRamRecords(PageSink* sink, uint64_t* zero_pages);
  Status ReadFooter(uint32_t section_id);
  Status ReadInitialDeviceTail(InitialInfo* info);

  BufferedReader* in_;
  std::vector<RamBlock> blocks_;
  uint32_t ram_section_id_ = 0;
  // The block named by the last non-CONTINUE record; persists across sections
  // and checkpoints, as QEMU's sender state does.
  int64_t current_block_ = -1;
  std::vector<uint8_t> page_buf_;
};

// Builds a migration stream that a fresh QEMU (-incoming) loads: used by the
// backup to restore, by tests and by the benchmark's stand-ins.
class StreamWriter {
 public:
  explicit StreamWriter(std::string* out) : out_(out) {}

  void Header();
  void Raw(std::string_view bytes) { out_->append(bytes); }
  void Command(uint16_t cmd, std::string_view data);
  void RamStart(uint32_t section_id, const std::vector<RamBlock>& blocks);
  void RamSectionBegin(SectionType type, uint32_t section_id);  // PART or END
  // Page records; the writer tracks the current block for CONTINUE.
  void Page(uint32_t block_index, const std::vector<RamBlock>& blocks, uint64_t offset,
            const uint8_t* data);
  void ZeroPage(uint32_t block_index, const std::vector<RamBlock>& blocks, uint64_t offset);
  void Eos();
  void Footer(uint32_t section_id);
  void EmptyVmDescription();
  // COLO messages
  void Colo(ColoMessage m);
  void ColoValue(ColoMessage m, uint64_t v);

 private:
  void PageHeader(uint32_t block_index, const std::vector<RamBlock>& blocks, uint64_t offset,
                  uint64_t flags);
  std::string* out_;
  int64_t current_block_ = -1;
};

// Builds a CONFIGURATION section for a machine type name (tests).
std::string MakeConfigurationSection(std::string_view machine);

}  // namespace remus::qemu
