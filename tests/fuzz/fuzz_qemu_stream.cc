// libFuzzer target for the QEMU migration stream codec
// (replicator/qemu/qemu_stream.h), the bytes QEMU sends the primary.
//
// Input: byte 0 selects the mode and the reader's shape, the rest is stream.
//   bit 0     0: the initial stream (ReadInitial);
//             1: checkpoints, after a fixed valid initial stream with the
//                block list of tests/data/qemu72-pc-16m.initial (COLO
//                messages, ReadCheckpointRam, ReadCheckpointDevices)
//   bits 1-3  the source's chunking (whole, 1, 3, 7, 64, 511, 4093, 4096 bytes)
//   bits 4-5  the reader's buffer size (256 KiB, 4096, 4097, 8192)
// Checks: errors have the codes the parser documents; every page the sink
// sees is page aligned and inside a block the stream declared (offset +
// 4096 without overflow); what parses re-encodes (StreamWriter) to a stream
// that parses to the same blocks, pages and device state.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "common/io.h"
#include "replicator/qemu/qemu_stream.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
using namespace remus::qemu;
constexpr const char* kTarget = "fuzz_qemu_stream";

struct PageRec {
  uint32_t block;
  uint64_t offset;
  bool zero;  // a zero page (fill 0): no data
  std::string data;
  bool operator==(const PageRec&) const = default;
};

class CheckingSink final : public PageSink {
 public:
  explicit CheckingSink(const StreamParser* p) : p_(p) {}
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    const auto& blocks = p_->blocks();
    fuzz::Check(block < blocks.size(), kTarget, "page of an undeclared block");
    fuzz::Check(offset % kPageSize == 0, kTarget, "page offset not page aligned");
    fuzz::Check(offset < blocks[block].used_length && blocks[block].used_length - offset >= kPageSize, kTarget,
                "page beyond its block");
    pages.push_back({block, offset, data == nullptr,
                     data ? std::string(reinterpret_cast<const char*>(data), kPageSize) : std::string()});
    return OkStatus();
  }
  std::vector<PageRec> pages;

 private:
  const StreamParser* p_;
};

void CheckError(const Status& s) {
  fuzz::Debug(kTarget, "ended", s);
  fuzz::CheckCode(s,
                  {Code::kDataLoss, Code::kUnavailable, Code::kUnimplemented, Code::kFailedPrecondition,
                   Code::kResourceExhausted},
                  kTarget, "unexpected error code");
}

const std::vector<RamBlock>& RealBlocks() {
  static const std::vector<RamBlock> b = {{"pc.ram", 16u << 20},
                                          {"/rom@etc/acpi/tables", 131072},
                                          {"pc.bios", 262144},
                                          {"pc.rom", 131072},
                                          {"/rom@etc/table-loader", 4096},
                                          {"/rom@etc/acpi/rsdp", 4096}};
  return b;
}

std::string DeviceTail(std::string_view device_state, std::string_view json) {
  std::string s(device_state);
  PutU8(&s, kSecVmDescription);
  PutU32(&s, static_cast<uint32_t>(json.size()));
  s.append(json);
  return s;
}

// Header, configuration, enable-colo, the ram START section (blocks, EOS,
// footer) and an END section holding `pages`, then the device tail.
std::string Initial(const std::string& configuration, bool colo, uint32_t id, const std::vector<RamBlock>& blocks,
                    const std::vector<PageRec>& pages) {
  std::string out;
  StreamWriter w(&out);
  w.Header();
  w.Raw(configuration);
  if (colo) w.Command(kCmdEnableColo, {});
  w.RamStart(id, blocks);
  w.Eos();
  w.Footer(id);
  w.RamSectionBegin(kSecEnd, id);
  for (const auto& p : pages) {
    if (p.zero) w.ZeroPage(p.block, blocks, p.offset);
    else w.Page(p.block, blocks, p.offset, reinterpret_cast<const uint8_t*>(p.data.data()));
  }
  w.Eos();
  w.Footer(id);
  w.Raw(std::string(1, static_cast<char>(kSecEof)));
  return out;
}

std::string InitialWithTail(const std::string& configuration, bool colo, uint32_t id,
                            const std::vector<RamBlock>& blocks, const std::vector<PageRec>& pages,
                            std::string_view device_state, std::string_view json) {
  std::string s = Initial(configuration, colo, id, blocks, pages);
  s.pop_back();  // the EOF byte is part of device_state
  return s + DeviceTail(device_state, json);
}

const std::string& CheckpointPrefix() {
  static const std::string p = InitialWithTail(MakeConfigurationSection("pc-i440fx-7.2"), true, 2, RealBlocks(), {},
                                               std::string("\x04\x00", 2) + std::string(1, '\0'),
                                               R"({"page_size":4096,"devices":[]})");
  return p;
}

void FuzzInitial(std::string_view stream, size_t chunk, size_t bufsize) {
  MemorySource src{std::string(stream), chunk};
  BufferedReader in(&src, bufsize);
  StreamParser p(&in);
  CheckingSink sink(&p);
  InitialInfo info;
  Status s = p.ReadInitial(&sink, &info);
  if (!s.ok()) return CheckError(s);
  fuzz::Debug(kTarget, "initial stream parsed");
  fuzz::Check(info.pages == sink.pages.size(), kTarget, "page count differs from the pages seen");
  fuzz::Check(!info.device_state.empty() && static_cast<uint8_t>(info.device_state.back()) == kSecEof, kTarget,
              "device state does not end in EOF");
  // Round trip. The device tail has no framing, so where it ends depends on
  // how the bytes arrived; compare it only when they arrived at once.
  std::string again = InitialWithTail(info.configuration, info.colo_enabled, info.ram_section_id, info.blocks,
                                      sink.pages, info.device_state, info.vmdescription_json);
  MemorySource src2{again};
  BufferedReader in2(&src2);
  StreamParser p2(&in2);
  CheckingSink sink2(&p2);
  InitialInfo info2;
  Status s2 = p2.ReadInitial(&sink2, &info2);
  if (!s2.ok()) fuzz::Fail(kTarget, "a parsed initial stream does not parse after re-encoding", s2);
  fuzz::Check(info2.blocks == info.blocks, kTarget, "blocks changed in a round trip");
  fuzz::Check(sink2.pages == sink.pages, kTarget, "pages changed in a round trip");
  fuzz::Check(info2.configuration == info.configuration && info2.colo_enabled == info.colo_enabled, kTarget,
              "configuration changed in a round trip");
  if (chunk == SIZE_MAX && stream.size() <= bufsize)
    fuzz::Check(info2.device_state == info.device_state && info2.vmdescription_json == info.vmdescription_json,
                kTarget, "device state changed in a round trip");
}

void FuzzCheckpoints(std::string_view stream, size_t chunk, size_t bufsize) {
  MemorySource src{CheckpointPrefix() + std::string(stream), chunk};
  BufferedReader in(&src, bufsize);
  StreamParser p(&in);
  CheckingSink initial_sink(&p);
  InitialInfo info;
  Status s = p.ReadInitial(&initial_sink, &info);
  if (!s.ok()) fuzz::Fail(kTarget, "the fixed initial stream does not parse", s);
  for (int round = 0; round < 64; ++round) {
    StatusOr<uint32_t> m = p.ReadColoMessage();
    if (!m.ok()) return CheckError(m.status());
    if (*m != static_cast<uint32_t>(ColoMessage::kVmstateSend)) continue;
    CheckingSink sink(&p);
    StatusOr<uint64_t> n = p.ReadCheckpointRam(&sink);
    if (!n.ok()) return CheckError(n.status());
    fuzz::Check(*n == sink.pages.size(), kTarget, "checkpoint page count differs from the pages seen");
    StatusOr<std::string> dev = p.ReadCheckpointDevices();
    if (!dev.ok()) return CheckError(dev.status());
    fuzz::Debug(kTarget, "checkpoint parsed");
    // Re-encode this checkpoint after the same initial stream.
    std::string again = CheckpointPrefix();
    StreamWriter w(&again);
    w.Colo(ColoMessage::kVmstateSend);
    w.RamSectionBegin(kSecEnd, 2);
    for (const auto& pg : sink.pages) {
      if (pg.zero) w.ZeroPage(pg.block, RealBlocks(), pg.offset);
      else w.Page(pg.block, RealBlocks(), pg.offset, reinterpret_cast<const uint8_t*>(pg.data.data()));
    }
    w.Eos();
    w.Footer(2);
    w.Raw(std::string(1, static_cast<char>(kSecEof)));
    w.ColoValue(ColoMessage::kVmstateSize, dev->size());
    w.Raw(*dev);
    MemorySource src2{again};
    BufferedReader in2(&src2);
    StreamParser p2(&in2);
    CheckingSink sink2(&p2);
    InitialInfo info2;
    Status s2 = p2.ReadInitial(&sink2, &info2);
    if (s2.ok()) s2 = p2.ExpectColoMessage(ColoMessage::kVmstateSend);
    sink2.pages.clear();
    StatusOr<uint64_t> n2 = s2.ok() ? p2.ReadCheckpointRam(&sink2) : StatusOr<uint64_t>(s2);
    if (!n2.ok()) fuzz::Fail(kTarget, "a parsed checkpoint does not parse after re-encoding", n2.status());
    fuzz::Check(sink2.pages == sink.pages, kTarget, "checkpoint pages changed in a round trip");
    StatusOr<std::string> dev2 = p2.ReadCheckpointDevices();
    if (!dev2.ok()) fuzz::Fail(kTarget, "re-encoded device state does not parse", dev2.status());
    fuzz::Check(*dev2 == *dev, kTarget, "device state changed in a round trip");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static constexpr size_t kChunks[] = {SIZE_MAX, 1, 3, 7, 64, 511, 4093, 4096};
  static constexpr size_t kBufs[] = {256 * 1024, 4096, 4097, 8192};
  const uint8_t sel = data[0];
  std::string_view stream(reinterpret_cast<const char*>(data) + 1, size - 1);
  const size_t chunk = kChunks[(sel >> 1) & 7];
  const size_t buf = kBufs[(sel >> 4) & 3];
  try {
    if (sel & 1) FuzzCheckpoints(stream, chunk, buf);
    else FuzzInitial(stream, chunk, buf);
  } catch (...) {
    fuzz::Fail(kTarget, "the codec threw");
  }
  return 0;
}
