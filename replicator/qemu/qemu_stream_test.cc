#include "replicator/qemu/qemu_stream.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

namespace remus::qemu {
namespace {

std::string LoadData(const std::string& name) {
  auto s = ReadFileToString(std::string(REMUS_TEST_DATA) + "/" + name);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? *s : std::string();
}

struct RecordingSink : PageSink {
  std::map<std::pair<uint32_t, uint64_t>, bool> pages;  // -> is zero
  uint64_t count = 0;
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    pages[{block, offset}] = data == nullptr;
    count++;
    return OkStatus();
  }
};

// Streams captured from Debian's QEMU 7.2 and Debian 13's QEMU 10.0 (16 MiB
// pc guest, x-colo on) by tests/tools/capture_colo_stream.py. 10.0 adds the
// SWITCHOVER_START command: in the initial stream before the device state,
// and in every checkpoint between vmstate-send and the RAM.
struct Capture {
  const char* name;     // tests/data/<name>.initial and .checkpoint
  const char* machine;  // the resolved machine type in CONFIGURATION
};
class RealStream : public ::testing::TestWithParam<Capture> {};
INSTANTIATE_TEST_SUITE_P(Qemu, RealStream,
                         ::testing::Values(Capture{"qemu72-pc-16m", "pc-i440fx-7.2"},
                                           Capture{"qemu100-pc-16m", "pc-i440fx-10.0"}),
                         [](const auto& info) { std::string n = info.param.name; return n.substr(0, n.find('-')); });

TEST_P(RealStream, ParsesTheInitialStream) {
  std::string data = LoadData(std::string(GetParam().name) + ".initial");
  MemorySource src(data, 4093);  // odd chunking exercises buffer refills
  BufferedReader in(&src);
  StreamParser p(&in);
  RecordingSink sink;
  InitialInfo info;
  Status s = p.ReadInitial(&sink, &info);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(info.colo_enabled);
  EXPECT_NE(info.configuration.find(GetParam().machine), std::string::npos);
  ASSERT_FALSE(info.blocks.empty());
  EXPECT_EQ(info.blocks[0].id, "pc.ram");
  EXPECT_EQ(info.blocks[0].used_length, 16u << 20);
  // Every page of every block is sent once in the first pass.
  uint64_t total_pages = 0;
  for (const auto& b : info.blocks) total_pages += b.used_length / kPageSize;
  EXPECT_EQ(sink.pages.size(), total_pages);
  EXPECT_EQ(info.pages, sink.count);
  EXPECT_GT(info.zero_pages, 0u);
  EXPECT_EQ(static_cast<uint8_t>(info.device_state.front()), kSecFull);
  EXPECT_EQ(static_cast<uint8_t>(info.device_state.back()), kSecEof);
  EXPECT_NE(info.vmdescription_json.find("\"devices\""), std::string::npos);
  EXPECT_EQ(in.offset(), data.size());  // consumed exactly the initial stream
}

TEST_P(RealStream, ParsesACheckpoint) {
  std::string data = LoadData(std::string(GetParam().name) + ".initial") +
                     LoadData(std::string(GetParam().name) + ".checkpoint");
  MemorySource src(data);
  BufferedReader in(&src);
  StreamParser p(&in);
  RecordingSink sink;
  InitialInfo info;
  ASSERT_TRUE(p.ReadInitial(&sink, &info).ok());
  ASSERT_TRUE(p.ExpectColoMessage(ColoMessage::kCheckpointRequest).ok());
  ASSERT_TRUE(p.ExpectColoMessage(ColoMessage::kVmstateSend).ok());
  RecordingSink ck;
  auto n = p.ReadCheckpointRam(&ck);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_GT(*n, 0u);  // the BIOS dirtied something
  auto blob = p.ReadCheckpointDevices();
  ASSERT_TRUE(blob.ok()) << blob.status().ToString();
  EXPECT_EQ(static_cast<uint8_t>(blob->back()), kSecEof);
  EXPECT_EQ(in.offset(), data.size());
}

TEST_P(RealStream, EveryTruncationIsAClearErrorNotACrash) {
  std::string data = LoadData(std::string(GetParam().name) + ".initial");
  // Cut points across the header, configuration, block list, pages and tail.
  for (size_t cut : {size_t{0}, size_t{3}, size_t{8}, size_t{12}, size_t{30}, size_t{60}, size_t{100},
                     size_t{5000}, data.size() / 2, data.size() - 200, data.size() - 1}) {
    MemorySource src(data.substr(0, cut));
    BufferedReader in(&src);
    StreamParser p(&in);
    RecordingSink sink;
    InitialInfo info;
    Status s = p.ReadInitial(&sink, &info);
    EXPECT_EQ(s.code(), Code::kUnavailable) << "cut " << cut << ": " << s.ToString();
    EXPECT_NE(s.message().find("stream ended"), std::string::npos) << s.message();
  }
}

// A checkpoint may open with SWITCHOVER_START (QEMU 10.0) and nothing else.
TEST_P(RealStream, OnlyAnEmptySwitchoverStartMayPrecedeTheCheckpointRam) {
  std::string initial = LoadData(std::string(GetParam().name) + ".initial");
  std::string ck = LoadData(std::string(GetParam().name) + ".checkpoint");
  // Past request and vmstate-send; drop 10.0's command so each case adds its own.
  std::string body = ck.substr(8);
  if (static_cast<uint8_t>(body[0]) == kSecCommand) body = body.substr(5);
  auto read = [&](std::string_view prefix) {
    std::string data = initial + ck.substr(0, 8) + std::string(prefix) + body;
    MemorySource src(data);
    BufferedReader in(&src);
    StreamParser p(&in);
    RecordingSink sink;
    InitialInfo info;
    EXPECT_TRUE(p.ReadInitial(&sink, &info).ok());
    EXPECT_TRUE(p.ExpectColoMessage(ColoMessage::kCheckpointRequest).ok());
    EXPECT_TRUE(p.ExpectColoMessage(ColoMessage::kVmstateSend).ok());
    RecordingSink pages;
    return p.ReadCheckpointRam(&pages).status();
  };
  EXPECT_TRUE(read("").ok());
  EXPECT_TRUE(read(std::string("\x08\x00\x0b\x00\x00", 5)).ok());
  Status enable_colo = read(std::string("\x08\x00\x08\x00\x00", 5));
  EXPECT_EQ(enable_colo.code(), Code::kDataLoss);
  EXPECT_NE(enable_colo.message().find("unexpected command 8"), std::string::npos) << enable_colo.ToString();
  EXPECT_EQ(read(std::string("\x08\x00\x0b\x00\x01\x00", 6)).code(), Code::kDataLoss);
  // Two in a row: the second is where the END section should be.
  EXPECT_EQ(read(std::string("\x08\x00\x0b\x00\x00\x08\x00\x0b\x00\x00", 10)).code(), Code::kDataLoss);
}

// Hand-built streams.
std::vector<RamBlock> Blocks() { return {{"pc.ram", 8 * kPageSize}, {"pc.bios", 2 * kPageSize}}; }

std::string DeviceTail() {
  std::string dev;
  PutU8(&dev, kSecFull);
  dev += "opaque device bytes with } and \x00\x06 inside";
  PutU8(&dev, kSecEof);
  std::string json = R"({"page_size":4096,"devices":[]})";
  PutU8(&dev, kSecVmDescription);
  PutU32(&dev, static_cast<uint32_t>(json.size()));
  dev += json;
  return dev;
}

std::string BuildInitial(const std::function<void(StreamWriter&, std::string&)>& pages) {
  std::string out;
  StreamWriter w(&out);
  w.Header();
  w.Raw(MakeConfigurationSection("pc-i440fx-7.2"));
  w.Command(kCmdEnableColo, "");
  w.RamStart(2, Blocks());
  w.Eos();
  w.Footer(2);
  w.RamSectionBegin(kSecPart, 2);
  pages(w, out);
  w.Eos();
  w.Footer(2);
  w.RamSectionBegin(kSecEnd, 2);
  w.Eos();
  w.Footer(2);
  out += DeviceTail();
  return out;
}

Status ParseInitial(const std::string& s, RecordingSink* sink = nullptr, InitialInfo* info = nullptr) {
  MemorySource src(s);
  BufferedReader in(&src);
  StreamParser p(&in);
  RecordingSink local;
  InitialInfo li;
  return p.ReadInitial(sink ? sink : &local, info ? info : &li);
}

TEST(QemuStream, WriterRoundTrip) {
  uint8_t page[kPageSize];
  for (size_t i = 0; i < kPageSize; i++) page[i] = static_cast<uint8_t>(i);
  std::string s = BuildInitial([&](StreamWriter& w, std::string&) {
    auto b = Blocks();
    w.Page(0, b, 0, page);
    w.ZeroPage(0, b, kPageSize);   // CONTINUE
    w.Page(1, b, kPageSize, page);  // block switch
    w.ZeroPage(0, b, 7 * kPageSize);
  });
  RecordingSink sink;
  InitialInfo info;
  Status st = ParseInitial(s, &sink, &info);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(info.blocks, Blocks());
  ASSERT_EQ(sink.pages.size(), 4u);
  EXPECT_FALSE((sink.pages[{0, 0}]));
  EXPECT_TRUE((sink.pages[{0, kPageSize}]));
  EXPECT_FALSE((sink.pages[{1, kPageSize}]));
  EXPECT_TRUE((sink.pages[{0, 7 * kPageSize}]));
  EXPECT_EQ(info.zero_pages, 2u);
}

// The device tail has no length: the parser looks for `00 06 <len> <json>`
// at the end of what arrived. A big tail full of `00 06` look-alikes whose
// lengths point past the end, arriving in small reads, is judged in linear
// time (each candidate once, the incomplete ones again); this took seconds
// before, rescanning the whole tail on every read (found while making
// tests/fuzz/fuzz_qemu_stream fast).
TEST(QemuStream, LongDeviceTailInSmallReads) {
  std::string s = BuildInitial([](StreamWriter&, std::string&) {});
  std::string tail = DeviceTail();
  const size_t at = s.size() - tail.size();
  std::string dev;
  PutU8(&dev, kSecFull);
  for (int i = 0; i < 300000; ++i) dev += std::string("\x00\x06\x00\x10\x00\x00 ", 7);  // 1 MiB descriptions: never complete
  PutU8(&dev, kSecEof);
  std::string json = R"({"page_size":4096,"devices":[]})";
  std::string big = s.substr(0, at) + dev;
  PutU8(&big, kSecVmDescription);
  PutU32(&big, static_cast<uint32_t>(json.size()));
  big += json;
  big += "COLO";  // what follows the description is left unread
  MemorySource src(big, 512);
  BufferedReader in(&src, 4096);  // small reads reach the parser as such
  StreamParser p(&in);
  RecordingSink sink;
  InitialInfo info;
  Status st = p.ReadInitial(&sink, &info);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(info.device_state, dev);
  EXPECT_EQ(info.vmdescription_json, json);
  EXPECT_EQ(in.offset(), big.size() - 4);

}

// An offset whose end wraps past 2^64 is beyond the block too, not page 0
// of it (found by tests/fuzz/fuzz_qemu_stream's check of every page's range).
TEST(QemuStream, PageOffsetThatWrapsIsRefused) {
  std::string s = BuildInitial([](StreamWriter& w, std::string&) {
    w.ZeroPage(0, Blocks(), 0xFFFFFFFFFFFFF000ull);
  });
  RecordingSink sink;
  Status st = ParseInitial(s, &sink);
  EXPECT_EQ(st.code(), Code::kDataLoss) << st.ToString();
  EXPECT_NE(st.message().find("beyond block 'pc.ram'"), std::string::npos) << st.message();
  EXPECT_TRUE(sink.pages.empty());
}

TEST(QemuStream, UnknownRamFlagsRefused) {
  std::string s = BuildInitial([](StreamWriter&, std::string& out) {
    PutU64(&out, 0x40 /* XBZRLE */);
  });
  Status st = ParseInitial(s);
  EXPECT_EQ(st.code(), Code::kDataLoss);
  EXPECT_NE(st.message().find("unsupported ram record flags 0x40"), std::string::npos) << st.message();
}

TEST(QemuStream, WrongSectionIdRefused) {
  std::string s;
  StreamWriter w(&s);
  w.Header();
  w.RamStart(2, Blocks());
  w.Eos();
  w.Footer(2);
  w.RamSectionBegin(kSecPart, 9);
  Status st = ParseInitial(s);
  EXPECT_EQ(st.code(), Code::kDataLoss);
  EXPECT_NE(st.message().find("section id 9"), std::string::npos) << st.message();
}

TEST(QemuStream, WrongFooterRefused) {
  std::string s;
  StreamWriter w(&s);
  w.Header();
  w.RamStart(2, Blocks());
  w.Eos();
  w.Footer(3);
  Status st = ParseInitial(s);
  EXPECT_EQ(st.code(), Code::kDataLoss);
  EXPECT_NE(st.message().find("names section 3"), std::string::npos) << st.message();
}

TEST(QemuStream, OversizedLengthsRefusedWithoutAllocating) {
  {
    std::string s;
    StreamWriter w(&s);
    w.Header();
    PutU8(&s, kSecConfiguration);
    PutU32(&s, 0xfffffff0u);
    Status st = ParseInitial(s);
    EXPECT_EQ(st.code(), Code::kDataLoss);
    EXPECT_NE(st.message().find("too long"), std::string::npos);
  }
  {
    // vmstate-size far beyond the limit.
    std::string s;
    StreamWriter w(&s);
    w.ColoValue(ColoMessage::kVmstateSize, 1ull << 60);
    MemorySource src(s);
    BufferedReader in(&src);
    StreamParser p(&in);
    auto r = p.ReadCheckpointDevices();
    EXPECT_EQ(r.status().code(), Code::kDataLoss);
    EXPECT_NE(r.status().message().find("exceeds the limit"), std::string::npos);
  }
  {
    // A block list whose block overruns the total.
    std::string s;
    StreamWriter w(&s);
    w.Header();
    PutU8(&s, kSecStart);
    PutU32(&s, 2);
    PutU8(&s, 3);
    s += "ram";
    PutU32(&s, 0);
    PutU32(&s, 4);
    PutU64(&s, 4096 | kRamFlagMemSize);
    PutU8(&s, 6);
    s += "pc.ram";
    PutU64(&s, 1ull << 40);
    Status st = ParseInitial(s);
    EXPECT_EQ(st.code(), Code::kDataLoss);
    EXPECT_NE(st.message().find("overruns"), std::string::npos) << st.message();
  }
}

TEST(QemuStream, PageBeyondBlockRefused) {
  std::string s = BuildInitial([](StreamWriter& w, std::string&) {
    uint8_t page[kPageSize] = {};
    w.Page(1, Blocks(), 2 * kPageSize, page);  // pc.bios has 2 pages
  });
  Status st = ParseInitial(s);
  EXPECT_EQ(st.code(), Code::kDataLoss);
  EXPECT_NE(st.message().find("beyond block 'pc.bios'"), std::string::npos) << st.message();
}

TEST(QemuStream, UnknownBlockAndBadMagicRefused) {
  std::string s = BuildInitial([](StreamWriter&, std::string& out) {
    PutU64(&out, kRamFlagZero);
    PutU8(&out, 4);
    out += "nope";
    PutU8(&out, 0);
  });
  Status st = ParseInitial(s);
  EXPECT_EQ(st.code(), Code::kDataLoss);
  EXPECT_NE(st.message().find("unknown block 'nope'"), std::string::npos);
  EXPECT_EQ(ParseInitial("GARBAGE!").code(), Code::kDataLoss);
}

TEST(QemuStream, ReturnPathRefused) {
  std::string s;
  StreamWriter w(&s);
  w.Header();
  w.Command(kCmdOpenReturnPath, "");
  Status st = ParseInitial(s);
  EXPECT_EQ(st.code(), Code::kFailedPrecondition);
  EXPECT_NE(st.message().find("return-path"), std::string::npos);
}

TEST(QemuStream, UnexpectedColoMessage) {
  std::string s;
  StreamWriter w(&s);
  w.Colo(ColoMessage::kVmstateSend);
  PutU32(&s, 77);
  MemorySource src(s);
  BufferedReader in(&src);
  StreamParser p(&in);
  Status st = p.ExpectColoMessage(ColoMessage::kCheckpointRequest);
  EXPECT_EQ(st.code(), Code::kDataLoss);
  EXPECT_NE(st.message().find("expected COLO checkpoint-request, got vmstate-send"), std::string::npos);
  EXPECT_EQ(p.ReadColoMessage().status().code(), Code::kDataLoss);
}

}  // namespace
}  // namespace remus::qemu
