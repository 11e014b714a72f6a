#include "replicator/link/wire.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>

#include "common/crc32c.h"
#include "common/io.h"
#include "tests/fakes/loopback_link.h"
#include "tests/fakes/status_matchers.h"

namespace remus::wire {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// Both ends of a link over a socketpair (tests/fakes/loopback_link.h).
using Pair = remus::testing::LinkPair;
Pair SocketPair(int buffer_bytes = 0) { return remus::testing::MakeLoopbackLinks(buffer_bytes); }

// A raw socket pair: one side a Link, the other a plain fd the test writes
// arbitrary bytes to.
struct RawPair {
  std::unique_ptr<Link> link;
  Fd raw;
};

RawPair RawSocketPair() {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  return {std::make_unique<Link>(Fd(sv[0])), Fd(sv[1])};
}


// ---- Framing ----------------------------------------------------------------

TEST(WireDisk, RecordRoundTripAndBadRecords) {
  std::string data(4096, 'd');
  // DiskRecord::data points into the payload: keep it alive.
  const std::string payload = EncodeDiskRecord(3, DiskOp::kWrite, 1 << 20, data.size(), data);
  auto w = DecodeDiskRecord(payload);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(w->disk, 3u);
  EXPECT_EQ(w->op, DiskOp::kWrite);
  EXPECT_EQ(w->offset, 1u << 20);
  EXPECT_EQ(w->length, 4096u);
  EXPECT_EQ(w->data, data);
  auto z = DecodeDiskRecord(EncodeDiskRecord(0, DiskOp::kZero, 0, 1ull << 30));
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(z->op, DiskOp::kZero);
  EXPECT_EQ(z->length, 1ull << 30);
  EXPECT_TRUE(z->data.empty());
  // Truncated header, data not matching the length, data on a trim, an
  // unknown op, an extent that wraps: all DataLoss, nothing applied.
  std::string rec = EncodeDiskRecord(0, DiskOp::kWrite, 0, data.size(), data);
  EXPECT_EQ(DecodeDiskRecord(rec.substr(0, 10)).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeDiskRecord(rec.substr(0, rec.size() - 1)).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeDiskRecord(EncodeDiskRecord(0, DiskOp::kTrim, 0, 4, "abcd")).status().code(), Code::kDataLoss);
  std::string bad_op = EncodeDiskRecord(0, DiskOp::kZero, 0, 8);
  bad_op[4] = 9;
  EXPECT_EQ(DecodeDiskRecord(bad_op).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecodeDiskRecord(EncodeDiskRecord(0, DiskOp::kZero, ~0ull - 10, 100)).status().code(), Code::kDataLoss);
}

TEST(WireDisk, CommitCarriesTheDiskRecordCount) {
  CommitInfo c{10, 20, 30, 7};
  auto back = DecodeCommit(EncodeCommit(c));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, c);
  // Without disks the field is left out, and reads back as 0.
  CommitInfo n{1, 2, 3, 0};
  EXPECT_EQ(EncodeCommit(n).find("disk_records"), std::string::npos);
  EXPECT_EQ(*DecodeCommit(EncodeCommit(n)), n);
  EXPECT_EQ(DecodeCommit(R"({"page_count":1,"page_bytes":2,"device_bytes":3,"disk_records":-1})").status().code(),
            Code::kDataLoss);
}

TEST(WireFrame, RoundTripEveryType) {
  auto [a, b] = SocketPair();
  for (uint16_t t = kMinMsgType; t <= kMaxMsgType; t++) {
    const auto type = static_cast<MsgType>(t);
    const std::string payload = "payload of " + MsgTypeName(type);
    const uint64_t epoch = 0x0102030405060708ull + t;
    const uint16_t flags = (t % 2) ? kFlagMore : 0;
    ASSERT_TRUE(a->Send(type, epoch, payload, flags).ok());
    auto f = b->Recv();
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->type, type);
    EXPECT_EQ(f->epoch, epoch);
    EXPECT_EQ(f->flags, flags);
    EXPECT_EQ(f->payload, payload);
    EXPECT_THAT(MsgTypeName(type), ::testing::Not(HasSubstr("TYPE_")));
  }
  EXPECT_EQ(a->frames_sent(), kMaxMsgType);
  EXPECT_EQ(b->frames_received(), kMaxMsgType);
  EXPECT_EQ(a->bytes_sent(), b->bytes_received());
}

TEST(WireFrame, EmptyAndLargePayloads) {
  auto [a, b] = SocketPair();
  ASSERT_TRUE(a->Send(MsgType::kAck, 9, "").ok());
  auto f = b->Recv();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->type, MsgType::kAck);
  EXPECT_EQ(f->epoch, 9u);
  EXPECT_TRUE(f->payload.empty());
  EXPECT_EQ(a->bytes_sent(), kHeaderSize);

  std::string big(kMaxPayload, '\0');
  for (size_t i = 0; i < big.size(); i++) big[i] = static_cast<char>(i * 31);
  std::thread sender([&, &a = a] { EXPECT_TRUE(a->Send(MsgType::kPages, 10, big).ok()); });
  f = b->Recv();
  sender.join();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->payload, big);
}

TEST(WireFrame, SendVWritesTheSameBytesAsSend) {
  auto [link, raw] = RawSocketPair();
  const std::string want = EncodeFrame(MsgType::kDevice, 77, "abcdef-ghij", kFlagMore);
  ASSERT_TRUE(link->SendV(MsgType::kDevice, 77, {"abc", "", "def-", "ghij"}, kFlagMore).ok());
  std::string got(want.size(), '\0');
  ASSERT_TRUE(ReadFull(raw.get(), got.data(), got.size()).ok());
  EXPECT_EQ(got, want);
  ASSERT_TRUE(link->Send(MsgType::kDevice, 77, "abcdef-ghij", kFlagMore).ok());
  ASSERT_TRUE(ReadFull(raw.get(), got.data(), got.size()).ok());
  EXPECT_EQ(got, want);
  EXPECT_EQ(link->bytes_sent(), 2 * want.size());
}

TEST(WireFrame, HeaderLayoutMatchesTheSpec) {
  const std::string f = EncodeFrame(MsgType::kCommit, 0x1122334455667788ull, "xyz", kFlagMore);
  ASSERT_EQ(f.size(), kHeaderSize + 3);
  EXPECT_EQ(f.substr(0, 4), "RMUS");
  EXPECT_EQ(f.substr(4, 2), std::string("\x00\x0a", 2));
  EXPECT_EQ(f.substr(6, 2), std::string("\x00\x01", 2));
  EXPECT_EQ(LoadU64(f.data() + 8), 0x1122334455667788ull);
  EXPECT_EQ(LoadU32(f.data() + 16), 3u);
  uint32_t crc = crc32c::Extend(crc32c::Value(f.data(), 20), "xyz", 3);
  EXPECT_EQ(LoadU32(f.data() + 20), crc);
}

TEST(WireFrame, CorruptPayloadByteIsDataLoss) {
  auto [link, raw] = RawSocketPair();
  std::string f = EncodeFrame(MsgType::kPages, 42, std::string(100, 'p'));
  f[kHeaderSize + 50] ^= 0x01;
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  auto r = link->Recv();
  EXPECT_CODE(r.status(), Code::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("crc mismatch on frame PAGES epoch 42"));
}

TEST(WireFrame, CorruptHeaderByteIsDataLoss) {
  auto [link, raw] = RawSocketPair();
  std::string f = EncodeFrame(MsgType::kAck, 5, "");
  f[15] ^= 0x10;  // epoch field
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  EXPECT_CODE(link->Recv().status(), Code::kDataLoss);
}

TEST(WireFrame, BadMagicIsDataLoss) {
  auto [link, raw] = RawSocketPair();
  std::string f = EncodeFrame(MsgType::kAck, 5, "");
  f[0] = 'X';
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  auto r = link->Recv();
  EXPECT_CODE(r.status(), Code::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("bad frame magic"));
}

TEST(WireFrame, OversizedLengthIsDataLossWithoutReadingOn) {
  for (uint32_t len : {kMaxPayload + 1, 0xffffffffu}) {
    auto [link, raw] = RawSocketPair();
    std::string f = EncodeFrame(MsgType::kPages, 3, "");
    StoreU32(f.data() + 16, len);
    // Only the header is written and the writer stays open: if Recv tried to
    // allocate and read the payload it would block here forever.
    ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
    auto r = link->Recv();
    EXPECT_CODE(r.status(), Code::kDataLoss);
    EXPECT_THAT(r.status().message(), HasSubstr(std::to_string(len) + "-byte payload"));
    EXPECT_THAT(r.status().message(), HasSubstr("PAGES epoch 3"));
  }
}

TEST(WireFrame, RecvUntilEnforcesASmallerLimit) {
  auto [a, b] = SocketPair();
  ASSERT_TRUE(a->Send(MsgType::kHello, 0, std::string(5000, 'h')).ok());
  auto r = b->RecvUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5), 4096);
  EXPECT_CODE(r.status(), Code::kDataLoss);
}

TEST(WireFrame, PeerCloseMidFrameIsUnavailable) {
  {
    auto [link, raw] = RawSocketPair();
    std::string f = EncodeFrame(MsgType::kPages, 1, std::string(1000, 'x'));
    ASSERT_TRUE(WriteFull(raw.get(), f.data(), 500).ok());
    raw.Reset();
    EXPECT_CODE(link->Recv().status(), Code::kUnavailable);
  }
  {
    auto [link, raw] = RawSocketPair();
    std::string f = EncodeFrame(MsgType::kPages, 1, "");
    ASSERT_TRUE(WriteFull(raw.get(), f.data(), 10).ok());  // half a header
    raw.Reset();
    EXPECT_CODE(link->Recv().status(), Code::kUnavailable);
  }
  {
    auto [link, raw] = RawSocketPair();
    raw.Reset();  // clean close between frames
    EXPECT_CODE(link->Recv().status(), Code::kUnavailable);
  }
}

TEST(WireFrame, UnknownTypeIsInvalidArgumentAndTheStreamContinues) {
  auto [link, raw] = RawSocketPair();
  std::string f = EncodeFrame(static_cast<MsgType>(99), 8, "future");
  f += EncodeFrame(MsgType::kHeartbeat, 9, "");
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  auto r = link->Recv();
  EXPECT_CODE(r.status(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("unknown frame type 99"));
  auto next = link->Recv();
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->type, MsgType::kHeartbeat);
  EXPECT_EQ(next->epoch, 9u);
}

TEST(WireFrame, SendRefusesOversizedPayload) {
  auto [a, b] = SocketPair();
  std::string big(kMaxPayload + 1, 'x');
  EXPECT_CODE(a->Send(MsgType::kPages, 1, big), Code::kInvalidArgument);
  EXPECT_CODE(a->SendV(MsgType::kPages, 1, {std::string_view(big).substr(0, 10), big}),
              Code::kInvalidArgument);
  EXPECT_EQ(a->bytes_sent(), 0u);
}

TEST(WireFrame, SendSplitFlagsAllButTheLastFrame) {
  auto [a, b] = SocketPair();
  std::string blob(2 * kMaxPayload + 5, '\0');
  for (size_t i = 0; i < blob.size(); i++) blob[i] = static_cast<char>(i % 251);
  std::thread sender([&, &a = a] { EXPECT_TRUE(a->SendSplit(MsgType::kDevice, 4, blob).ok()); });
  std::string got;
  int frames = 0;
  for (;;) {
    auto f = b->Recv();
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->type, MsgType::kDevice);
    EXPECT_EQ(f->epoch, 4u);
    got += f->payload;
    frames++;
    if (!(f->flags & kFlagMore)) break;
  }
  sender.join();
  EXPECT_EQ(frames, 3);
  EXPECT_EQ(got, blob);

  ASSERT_TRUE(a->SendSplit(MsgType::kDevice, 5, "").ok());
  auto f = b->Recv();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->flags, 0);
  EXPECT_TRUE(f->payload.empty());
}

TEST(WireFrame, ConcurrentSendsNeverInterleave) {
  auto [a, b] = SocketPair();
  constexpr int kThreads = 4, kPerThread = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t, &a = a] {
      std::string payload(1000 + t * 3000, static_cast<char>('a' + t));
      for (int i = 0; i < kPerThread; i++)
        EXPECT_TRUE(a->SendV(MsgType::kPages, t, {payload, payload}).ok());
    });
  }
  int counts[kThreads] = {};
  for (int i = 0; i < kThreads * kPerThread; i++) {
    auto f = b->Recv();
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ASSERT_LT(f->epoch, static_cast<uint64_t>(kThreads));
    const int t = static_cast<int>(f->epoch);
    EXPECT_EQ(f->payload, std::string(2 * (1000 + t * 3000), static_cast<char>('a' + t)));
    counts[t]++;
  }
  for (auto& th : threads) th.join();
  for (int c : counts) EXPECT_EQ(c, kPerThread);
}

TEST(WireFrame, ShutdownUnblocksRecv) {
  auto [a, b] = SocketPair();
  Status got;
  std::thread reader([&, &b = b] { got = b->Recv().status(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  b->Shutdown();
  reader.join();
  EXPECT_CODE(got, Code::kUnavailable);
}

TEST(WireFrame, ErrorPayloadRoundTrip) {
  Status s = DecodeError(EncodeError(FailedPrecondition("domain web1 is already protected")));
  EXPECT_CODE(s, Code::kFailedPrecondition);
  EXPECT_EQ(s.message(), "domain web1 is already protected");
  EXPECT_CODE(DecodeError("not json"), Code::kUnavailable);
  EXPECT_CODE(DecodeError(R"({"code":"NOPE","message":"x"})"), Code::kUnavailable);
}

// ---- Keys ---------------------------------------------------------------------

class KeyFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/remus-wire-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (auto& p : files_) ::unlink(p.c_str());
    ::rmdir(dir_.c_str());
  }
  std::string Write(const std::string& name, std::string_view content, mode_t mode) {
    std::string path = dir_ + "/" + name;
    Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600));
    EXPECT_TRUE(fd.valid());
    EXPECT_TRUE(WriteFull(fd.get(), content.data(), content.size()).ok());
    EXPECT_EQ(::fchmod(fd.get(), mode), 0);
    files_.push_back(path);
    return path;
  }
  std::string dir_;
  std::vector<std::string> files_;
};

TEST_F(KeyFileTest, LoadsHexWithTrailingNewline) {
  auto hex = GenerateKeyHex();
  ASSERT_TRUE(hex.ok());
  EXPECT_EQ(hex->size(), 64u);
  EXPECT_EQ(hex->find_first_not_of("0123456789abcdef"), std::string::npos);
  auto key = LoadKey(Write("k.hex", *hex + "\n", 0600));
  ASSERT_TRUE(key.ok()) << key.status().ToString();
  EXPECT_EQ(key->secret.size(), 32u);
  auto again = LoadKey(Write("k2.hex", *hex, 0400));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->secret, key->secret);
  EXPECT_EQ(KeyFingerprint(*again), KeyFingerprint(*key));
  EXPECT_EQ(KeyFingerprint(*key).size(), 16u);
}

TEST_F(KeyFileTest, LoadsRawBytes) {
  std::string raw(40, '\0');
  for (size_t i = 0; i < raw.size(); i++) raw[i] = static_cast<char>(0x80 + i);
  auto key = LoadKey(Write("k.bin", raw, 0600));
  ASSERT_TRUE(key.ok()) << key.status().ToString();
  EXPECT_EQ(key->secret, raw);
}

TEST_F(KeyFileTest, RefusesGroupOrWorldReadable) {
  auto hex = GenerateKeyHex();
  ASSERT_TRUE(hex.ok());
  for (mode_t mode : {0644, 0640, 0604, 0660}) {
    std::string path = Write("k" + std::to_string(mode), *hex, mode);
    auto key = LoadKey(path);
    EXPECT_CODE(key.status(), Code::kPermissionDenied);
    EXPECT_THAT(key.status().message(), HasSubstr(path));
    EXPECT_THAT(key.status().message(), HasSubstr("chmod 600"));
  }
}

TEST_F(KeyFileTest, MissingFileSaysHowToCreateOne) {
  std::string path = dir_ + "/absent.key";
  auto key = LoadKey(path);
  EXPECT_CODE(key.status(), Code::kNotFound);
  EXPECT_THAT(key.status().message(), HasSubstr("remusctl keygen --out " + path));
}

TEST_F(KeyFileTest, RefusesShortKeys) {
  EXPECT_CODE(LoadKey(Write("short.hex", std::string(62, 'a') + "\n", 0600)).status(),
              Code::kInvalidArgument);
  EXPECT_CODE(LoadKey(Write("odd.hex", std::string(65, 'a'), 0600)).status(), Code::kInvalidArgument);
  EXPECT_CODE(LoadKey(Write("short.bin", "\x01\x02\x03 not enough", 0600)).status(),
              Code::kInvalidArgument);
  EXPECT_CODE(LoadKey(Write("empty", "", 0600)).status(), Code::kInvalidArgument);
}

TEST_F(KeyFileTest, RefusesSymlinksOthersFilesAndLooseModes) {
  auto hex = GenerateKeyHex();
  ASSERT_TRUE(hex.ok());
  std::string real = Write("real.key", *hex, 0600);
  std::string link = dir_ + "/link.key";
  ASSERT_EQ(::symlink(real.c_str(), link.c_str()), 0);
  files_.push_back(link);
  auto k = LoadKey(link);
  EXPECT_CODE(k.status(), Code::kInvalidArgument);
  EXPECT_THAT(k.status().message(), HasSubstr("symbolic link"));
  EXPECT_CODE(CheckSecretFile(link, "--tls-key"), Code::kInvalidArgument);

  std::string loose = Write("loose.key", *hex, 0640);
  k = LoadKey(loose);
  EXPECT_CODE(k.status(), Code::kPermissionDenied);
  EXPECT_THAT(k.status().message(), HasSubstr("chmod 600 " + loose));

  // Owned by someone else (needs root to chown).
  if (::geteuid() == 0) {
    std::string theirs = Write("theirs.key", *hex, 0600);
    ASSERT_EQ(::chown(theirs.c_str(), 65534, 65534), 0);
    k = LoadKey(theirs);
    EXPECT_CODE(k.status(), Code::kPermissionDenied);
    EXPECT_THAT(k.status().message(), HasSubstr("owned by uid 65534"));
    EXPECT_THAT(k.status().message(), HasSubstr("chown root:root " + theirs));
    EXPECT_CODE(CheckSecretFile(theirs, "--tls-key"), Code::kPermissionDenied);
  }
  EXPECT_TRUE(CheckSecretFile(real, "--tls-key").ok());
  EXPECT_CODE(CheckSecretFile(dir_ + "/absent", "--tls-key"), Code::kNotFound);
}

// ---- Page records and commits ---------------------------------------------------

struct Rec {
  uint32_t block;
  uint64_t offset;
  std::string data;  // empty = zero page
  bool operator==(const Rec&) const = default;
};

std::vector<Rec> Decode(std::string_view payload, Status* st) {
  std::vector<Rec> out;
  *st = ForEachPageRecord(payload, [&](uint32_t b, uint64_t o, const uint8_t* d) {
    out.push_back({b, o, d ? std::string(reinterpret_cast<const char*>(d), kPageSize) : ""});
    return OkStatus();
  });
  return out;
}

TEST(WirePages, RoundTripWithZeroPages) {
  std::string p1(kPageSize, 'A'), p2(kPageSize, '\x7f');
  std::string payload;
  AppendPageRecord(&payload, 0, 0, reinterpret_cast<const uint8_t*>(p1.data()));
  AppendPageRecord(&payload, 0, 0x1000, nullptr);
  AppendPageRecord(&payload, 3, 0xfffff000ull << 8, reinterpret_cast<const uint8_t*>(p2.data()));
  AppendPageRecord(&payload, 7, 0x5000, nullptr);
  EXPECT_EQ(payload.size(), 2 * PageRecordSize(false) + 2 * PageRecordSize(true));
  Status st;
  auto recs = Decode(payload, &st);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<Rec> want = {{0, 0, p1}, {0, 0x1000, ""}, {3, 0xfffff000ull << 8, p2}, {7, 0x5000, ""}};
  EXPECT_EQ(recs, want);
  // The wire bytes of a zero record: be32 block, be64 offset|1.
  EXPECT_EQ(LoadU32(payload.data() + PageRecordSize(false)), 0u);
  EXPECT_EQ(LoadU64(payload.data() + PageRecordSize(false) + 4), 0x1001u);

  Decode("", &st);
  EXPECT_TRUE(st.ok());
}

TEST(WirePages, EveryTruncationIsDataLoss) {
  std::string page(kPageSize, 'z');
  std::string payload;
  AppendPageRecord(&payload, 1, 0x3000, nullptr);
  AppendPageRecord(&payload, 1, 0x4000, reinterpret_cast<const uint8_t*>(page.data()));
  const size_t boundary = PageRecordSize(true);
  for (size_t cut = 1; cut < payload.size(); cut++) {
    if (cut == boundary) continue;
    Status st;
    Decode(std::string_view(payload).substr(0, cut), &st);
    EXPECT_CODE(st, Code::kDataLoss) << "cut at " << cut;
  }
}

TEST(WirePages, UnalignedOffsetIsDataLoss) {
  std::string payload;
  PutU32(&payload, 0);
  PutU64(&payload, 0x1000 | 0x200 | kPageFlagZero);
  Status st;
  Decode(payload, &st);
  EXPECT_CODE(st, Code::kDataLoss);
  EXPECT_THAT(st.message(), HasSubstr("not page-aligned"));
}

TEST(WirePages, CallbackErrorStopsTheWalk) {
  std::string payload;
  AppendPageRecord(&payload, 0, 0, nullptr);
  AppendPageRecord(&payload, 0, 0x1000, nullptr);
  int calls = 0;
  Status st = ForEachPageRecord(payload, [&](uint32_t, uint64_t, const uint8_t*) {
    calls++;
    return OutOfRange("block 0 has no page at 0x0");
  });
  EXPECT_CODE(st, Code::kOutOfRange);
  EXPECT_EQ(calls, 1);
}

TEST(WireCommit, RoundTrip) {
  CommitInfo c{1234, 1234 * 4108ull, 1ull << 33};
  auto d = DecodeCommit(EncodeCommit(c));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(*d, c);
  // Unknown fields are ignored.
  auto e = DecodeCommit(R"({"page_count":1,"page_bytes":2,"device_bytes":3,"disk_bytes":4})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(*e, (CommitInfo{1, 2, 3}));
}

TEST(WireCommit, MalformedIsDataLoss) {
  EXPECT_CODE(DecodeCommit("").status(), Code::kDataLoss);
  EXPECT_CODE(DecodeCommit("[1,2,3]").status(), Code::kDataLoss);
  EXPECT_CODE(DecodeCommit(R"({"page_count":1,"page_bytes":2})").status(), Code::kDataLoss);
  EXPECT_CODE(DecodeCommit(R"({"page_count":-1,"page_bytes":2,"device_bytes":3})").status(),
              Code::kDataLoss);
}


// ---- A peer that stops reading (blackhole: no FIN, no RST) --------------------

// A pair whose side b never reads, with small buffers so a few hundred KiB
// fill them.
Pair SilentPeerPair() { return SocketPair(16 * 1024); }

using Steady = std::chrono::steady_clock;
int64_t MsSince(Steady::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Steady::now() - t).count();
}

TEST(WireBlackhole, SendTimeoutEndsAWriteToASilentPeerAndBreaksTheLink) {
  Pair p = SilentPeerPair();
  p.a->SetSendTimeout(std::chrono::milliseconds(200));
  std::string big(4u << 20, 'x');
  auto t0 = Steady::now();
  Status s = p.a->Send(MsgType::kDevice, 1, big);
  int64_t took = MsSince(t0);
  EXPECT_CODE(s, Code::kDeadlineExceeded);
  EXPECT_THAT(s.message(), HasSubstr("send timeout"));
  EXPECT_GE(took, 190);
  EXPECT_LT(took, 1000);
  EXPECT_TRUE(p.a->broken());
  // The stream is cut mid-frame: every later send fails at once.
  t0 = Steady::now();
  EXPECT_CODE(p.a->Send(MsgType::kHeartbeat, 0, ""), Code::kUnavailable);
  EXPECT_LT(MsSince(t0), 50);
}

TEST(WireBlackhole, TrySendDoesNotQueueBehindAStuckWrite) {
  Pair p = SilentPeerPair();
  std::string big(4u << 20, 'x');
  Status bulk;
  std::thread sender([&] { bulk = p.a->Send(MsgType::kDevice, 1, big); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the sender is stuck now
  auto t0 = Steady::now();
  EXPECT_CODE(p.a->TrySend(MsgType::kHeartbeat, 0, ""), Code::kResourceExhausted);
  EXPECT_LT(MsSince(t0), 50);
  // SendBefore waits no longer than its deadline, and sends nothing.
  t0 = Steady::now();
  EXPECT_CODE(p.a->SendBefore(Steady::now() + std::chrono::milliseconds(150), MsgType::kGoodbye, 0, "{}"),
              Code::kDeadlineExceeded);
  int64_t took = MsSince(t0);
  EXPECT_GE(took, 140);
  EXPECT_LT(took, 600);
  EXPECT_FALSE(p.a->broken());
  // ... and gives up as soon as abandon() says so.
  t0 = Steady::now();
  auto abandon_at = Steady::now() + std::chrono::milliseconds(30);
  EXPECT_CODE(p.a->SendBefore(Steady::now() + std::chrono::seconds(10), MsgType::kGoodbye, 0, "{}", 0,
                              [&] { return Steady::now() >= abandon_at; }),
              Code::kDeadlineExceeded);
  EXPECT_LT(MsSince(t0), 300);
  // shutdown(2) from another thread unblocks the stuck sender.
  t0 = Steady::now();
  p.a->Shutdown();
  sender.join();
  EXPECT_FALSE(bulk.ok());
  EXPECT_LT(MsSince(t0), 500);
}

TEST(WireBlackhole, SendBeforeCutsAFrameAtItsDeadlineAndBreaksTheLink) {
  Pair p = SilentPeerPair();
  std::string big(4u << 20, 'x');
  auto t0 = Steady::now();
  EXPECT_CODE(p.a->SendBefore(Steady::now() + std::chrono::milliseconds(150), MsgType::kDevice, 0, big),
              Code::kDeadlineExceeded);
  EXPECT_LT(MsSince(t0), 600);
  EXPECT_TRUE(p.a->broken());
}

TEST(WireBlackhole, ASlowReaderIsNotASilentOne) {
  // The send timeout counts time without progress, not the frame's total time.
  Pair p = SilentPeerPair();
  p.a->SetSendTimeout(std::chrono::milliseconds(150));
  std::string big(1u << 20, 'y');
  std::thread reader([&] {
    char buf[8192];
    size_t got = 0;
    while (got < big.size() + kHeaderSize) {
      ssize_t r = ::read(p.b->fd(), buf, sizeof buf);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  auto t0 = Steady::now();
  EXPECT_TRUE(p.a->Send(MsgType::kDevice, 1, big).ok());
  reader.join();
  EXPECT_GT(MsSince(t0), 150);  // longer than the timeout in total
  EXPECT_FALSE(p.a->broken());
}

}  // namespace
}  // namespace remus::wire
