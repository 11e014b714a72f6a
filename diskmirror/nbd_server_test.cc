// NBD protocol conformance, driven byte by byte: the handshake and option
// replies, each command, and hostile requests (bad magic, out-of-range and
// overflowing offsets, oversized lengths, unknown commands and flags).
#include "diskmirror/nbd_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "common/io.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

constexpr uint64_t kSize = 1 << 20;   // the export
constexpr uint64_t kGuard = 64 << 10; // file bytes after it that must never change
constexpr uint8_t kGuardByte = 0xc7;

std::string TempDir() { return remus::testing::MakeTempDir("nbd"); }

uint16_t Load16(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  return static_cast<uint16_t>(b[0] << 8 | b[1]);
}

// A client that speaks the protocol by hand.
class RawClient {
 public:
  explicit RawClient(Fd fd) : fd_(std::move(fd)) {}
  int fd() const { return fd_.get(); }

  // Reads the greeting; returns the handshake flags.
  uint16_t Hello() {
    uint8_t h[18];
    EXPECT_TRUE(ReadFull(fd(), h, sizeof h).ok());
    EXPECT_EQ(LoadU64(h), nbd::kMagic);
    EXPECT_EQ(LoadU64(h + 8), nbd::kOptMagic);
    return Load16(h + 16);
  }
  void ClientFlags(uint32_t f) {
    uint8_t b[4];
    StoreU32(b, f);
    ASSERT_TRUE(WriteFull(fd(), b, 4).ok());
  }
  void Option(uint32_t opt, std::string_view data, uint64_t magic = nbd::kOptMagic) {
    std::string m;
    PutU64(&m, magic);
    PutU32(&m, opt);
    PutU32(&m, static_cast<uint32_t>(data.size()));
    m.append(data);
    ASSERT_TRUE(WriteFull(fd(), m.data(), m.size()).ok());
  }
  struct OptReply {
    uint32_t opt = 0;
    uint32_t type = 0;
    std::string data;
  };
  OptReply ReadOptReply() {
    OptReply r;
    uint8_t h[20];
    Status s = ReadFull(fd(), h, sizeof h);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!s.ok()) return r;
    EXPECT_EQ(LoadU64(h), nbd::kRepMagic);
    r.opt = LoadU32(h + 8);
    r.type = LoadU32(h + 12);
    r.data.resize(LoadU32(h + 16));
    EXPECT_TRUE(ReadFull(fd(), r.data.data(), r.data.size()).ok());
    return r;
  }
  static std::string GoData(std::string_view name, std::vector<uint16_t> infos) {
    std::string d;
    PutU32(&d, static_cast<uint32_t>(name.size()));
    d.append(name);
    PutU16(&d, static_cast<uint16_t>(infos.size()));
    for (uint16_t i : infos) PutU16(&d, i);
    return d;
  }
  // Full handshake with NBD_OPT_GO; returns the export's transmission flags.
  uint16_t HandshakeGo() {
    Hello();
    ClientFlags(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
    Option(nbd::kOptGo, GoData("", {}));
    uint16_t flags = 0;
    for (;;) {
      OptReply r = ReadOptReply();
      if (r.type == nbd::kRepInfo && r.data.size() == 12 && Load16(r.data.data()) == nbd::kInfoExport)
        flags = Load16(r.data.data() + 10);
      if (r.type != nbd::kRepInfo) {
        EXPECT_EQ(r.type, nbd::kRepAck);
        break;
      }
    }
    return flags;
  }

  void Request(uint16_t type, uint64_t off, uint32_t len, uint16_t flags = 0, std::string_view payload = {},
               uint32_t magic = nbd::kRequestMagic) {
    std::string m;
    PutU32(&m, magic);
    PutU16(&m, flags);
    PutU16(&m, type);
    PutU64(&m, ++cookie_);
    PutU64(&m, off);
    PutU32(&m, len);
    m.append(payload);
    Status s = WriteFull(fd(), m.data(), m.size());
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  // Reads a simple reply; if it has no error and data_len > 0, its data.
  // Returns the error field, or -1 if the connection closed instead.
  int64_t Reply(size_t data_len = 0, std::string* data = nullptr) {
    uint8_t h[16];
    if (!ReadFull(fd(), h, sizeof h).ok()) return -1;
    EXPECT_EQ(LoadU32(h), nbd::kSimpleReplyMagic);
    EXPECT_EQ(LoadU64(h + 8), cookie_) << "replies in order, with the request's cookie";
    uint32_t err = LoadU32(h + 4);
    if (err == 0 && data_len > 0) {
      std::string d(data_len, '\0');
      EXPECT_TRUE(ReadFull(fd(), d.data(), d.size()).ok());
      if (data) *data = std::move(d);
    }
    return err;
  }
  // Sends a request and returns the reply's error.
  int64_t Do(uint16_t type, uint64_t off, uint32_t len, uint16_t flags = 0, std::string_view payload = {}) {
    Request(type, off, len, flags, payload);
    return Reply(type == nbd::kCmdRead ? len : 0);
  }
  // True if the server closed the connection (within 2 s).
  bool Closed() {
    pollfd p{fd(), POLLIN, 0};
    if (::poll(&p, 1, 2000) <= 0) return false;
    char c;
    ssize_t r = ::recv(fd(), &c, 1, 0);
    return r == 0 || (r < 0 && errno == ECONNRESET);
  }

 private:
  Fd fd_;
  uint64_t cookie_ = 0;
};

class FailingSink final : public DiskSink {
 public:
  Status Read(uint64_t, std::span<uint8_t>) override { return DataLoss("media error"); }
  Status Write(uint64_t, std::span<const uint8_t>, bool) override { return ResourceExhausted("journal full"); }
  Status WriteZeroes(uint64_t, uint64_t, bool) override { return PermissionDenied("no"); }
  Status Trim(uint64_t, uint64_t) override { return Unimplemented("no trim"); }
  Status Flush() override { return DataLoss("fsync failed"); }
};

class NbdServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    image_ = dir_ + "/disk.img";
    std::vector<uint8_t> init(kSize + kGuard);
    for (size_t i = 0; i < kSize; ++i) init[i] = static_cast<uint8_t>(i * 31 + 7);
    std::fill(init.begin() + kSize, init.end(), kGuardByte);
    Fd fd(::open(image_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600));
    ASSERT_TRUE(fd.valid());
    ASSERT_TRUE(WriteFull(fd.get(), init.data(), init.size()).ok());
    auto sink = FileDiskSink::Open(image_, kSize);
    ASSERT_TRUE(sink.ok()) << sink.status().ToString();
    sink_ = std::move(sink).value();
  }

  void StartServer(NbdExport e = {}, DiskSink* sink = nullptr) {
    if (e.size == 0) e.size = kSize;
    if (e.name.empty()) e.name = "vda";
    NbdServerOptions o;
    o.unix_path = dir_ + "/nbd.sock";
    o.tcp = HostPort{"127.0.0.1", 0};
    o.max_connections = 4;
    auto s = NbdServer::Start(e, sink ? sink : sink_.get(), o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
  }

  RawClient Connect() {
    auto fd = ConnectUnix(server_->unix_path());
    EXPECT_TRUE(fd.ok()) << fd.status().ToString();
    return RawClient(std::move(fd).value());
  }

  std::vector<uint8_t> File() const {
    std::vector<uint8_t> v(kSize + kGuard + 1);
    Fd fd(::open(image_.c_str(), O_RDONLY));
    ssize_t n = ::pread(fd.get(), v.data(), v.size(), 0);
    v.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return v;
  }

  void ExpectGuardIntact() {
    auto f = File();
    ASSERT_EQ(f.size(), kSize + kGuard) << "the image file changed size";
    for (size_t i = kSize; i < f.size(); ++i) ASSERT_EQ(f[i], kGuardByte) << "byte " << i << " past the export changed";
  }

  std::string dir_, image_;
  std::unique_ptr<FileDiskSink> sink_;
  std::unique_ptr<NbdServer> server_;
};

// ---- handshake --------------------------------------------------------------

TEST_F(NbdServerTest, GreetingAndGoWithInformation) {
  StartServer({"vda", "the first disk", kSize});
  RawClient c = Connect();
  EXPECT_EQ(c.Hello(), nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
  c.ClientFlags(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
  c.Option(nbd::kOptGo, RawClient::GoData("vda", {nbd::kInfoName, nbd::kInfoBlockSize, nbd::kInfoDescription, 77}));
  bool export_seen = false, name_seen = false, bs_seen = false, desc_seen = false;
  for (;;) {
    auto r = c.ReadOptReply();
    EXPECT_EQ(r.opt, nbd::kOptGo);
    if (r.type == nbd::kRepAck) break;
    ASSERT_EQ(r.type, nbd::kRepInfo);
    ASSERT_GE(r.data.size(), 2u);
    switch (Load16(r.data.data())) {
      case nbd::kInfoExport:
        ASSERT_EQ(r.data.size(), 12u);
        EXPECT_EQ(LoadU64(r.data.data() + 2), kSize);
        EXPECT_EQ(Load16(r.data.data() + 10), nbd::kFlagHasFlags | nbd::kFlagSendFlush | nbd::kFlagSendFua |
                                                  nbd::kFlagSendTrim | nbd::kFlagSendWriteZeroes);
        export_seen = true;
        break;
      case nbd::kInfoName:
        EXPECT_EQ(r.data.substr(2), "vda");
        name_seen = true;
        break;
      case nbd::kInfoDescription:
        EXPECT_EQ(r.data.substr(2), "the first disk");
        desc_seen = true;
        break;
      case nbd::kInfoBlockSize:
        ASSERT_EQ(r.data.size(), 14u);
        EXPECT_EQ(LoadU32(r.data.data() + 2), 1u);
        EXPECT_EQ(LoadU32(r.data.data() + 6), 4096u);
        EXPECT_EQ(LoadU32(r.data.data() + 10), 32u << 20);
        bs_seen = true;
        break;
      default:
        ADD_FAILURE() << "unexpected info type";
    }
  }
  EXPECT_TRUE(export_seen && name_seen && bs_seen && desc_seen);
  std::string data;
  c.Request(nbd::kCmdRead, 0, 16);
  ASSERT_EQ(c.Reply(16, &data), 0);
  EXPECT_EQ(static_cast<uint8_t>(data[1]), 38);
}

TEST_F(NbdServerTest, ExportNameWithAndWithoutZeroes) {
  StartServer();
  for (bool no_zeroes : {false, true}) {
    RawClient c = Connect();
    c.Hello();
    c.ClientFlags(nbd::kClientFlagFixedNewstyle | (no_zeroes ? nbd::kClientFlagNoZeroes : 0));
    c.Option(nbd::kOptExportName, "vda");
    uint8_t h[10];
    ASSERT_TRUE(ReadFull(c.fd(), h, sizeof h).ok());
    EXPECT_EQ(LoadU64(h), kSize);
    EXPECT_TRUE(Load16(h + 8) & nbd::kFlagHasFlags);
    if (!no_zeroes) {
      uint8_t z[nbd::kExportNameZeroes];
      ASSERT_TRUE(ReadFull(c.fd(), z, sizeof z).ok());
      for (uint8_t b : z) ASSERT_EQ(b, 0);
    }
    EXPECT_EQ(c.Do(nbd::kCmdRead, 0, 512), 0) << "transmission follows directly";
  }
}

TEST_F(NbdServerTest, UnsupportedOptionsAreRefusedAndNegotiationGoesOn) {
  StartServer();
  RawClient c = Connect();
  c.Hello();
  c.ClientFlags(nbd::kClientFlagFixedNewstyle);
  struct Case {
    uint32_t opt;
    std::string data;
    uint32_t want;
  };
  std::string bad_count = RawClient::GoData("", {3});
  bad_count.pop_back();
  std::string long_name;
  PutU32(&long_name, 100);  // name longer than the option
  PutU16(&long_name, 0);
  const std::vector<Case> cases = {
      {nbd::kOptStructuredReply, "", nbd::kRepErrUnsup},
      {nbd::kOptStartTls, "", nbd::kRepErrUnsup},
      {nbd::kOptListMetaContext, RawClient::GoData("", {}) + "xx", nbd::kRepErrUnsup},
      {nbd::kOptSetMetaContext, "", nbd::kRepErrUnsup},
      {4242, std::string(100, 'z'), nbd::kRepErrUnsup},
      {nbd::kOptList, "x", nbd::kRepErrInvalid},
      {nbd::kOptInfo, "abc", nbd::kRepErrInvalid},
      {nbd::kOptInfo, long_name, nbd::kRepErrInvalid},
      {nbd::kOptInfo, bad_count, nbd::kRepErrInvalid},
      {nbd::kOptGo, RawClient::GoData("vdb", {}), nbd::kRepErrUnknown},
  };
  for (const Case& k : cases) {
    c.Option(k.opt, k.data);
    auto r = c.ReadOptReply();
    EXPECT_EQ(r.opt, k.opt);
    EXPECT_EQ(r.type, k.want) << "option " << k.opt;
  }
  // NBD_OPT_LIST: one server entry, then ACK.
  c.Option(nbd::kOptList, "");
  auto r = c.ReadOptReply();
  ASSERT_EQ(r.type, nbd::kRepServer);
  ASSERT_GE(r.data.size(), 4u);
  EXPECT_EQ(LoadU32(r.data.data()), 3u);
  EXPECT_EQ(r.data.substr(4, 3), "vda");
  EXPECT_EQ(c.ReadOptReply().type, nbd::kRepAck);
  // NBD_OPT_INFO does not enter transmission; NBD_OPT_GO then does.
  c.Option(nbd::kOptInfo, RawClient::GoData("vda", {}));
  EXPECT_EQ(c.ReadOptReply().type, nbd::kRepInfo);
  EXPECT_EQ(c.ReadOptReply().type, nbd::kRepAck);
  c.Option(nbd::kOptGo, RawClient::GoData("", {}));
  EXPECT_EQ(c.ReadOptReply().type, nbd::kRepInfo);
  EXPECT_EQ(c.ReadOptReply().type, nbd::kRepAck);
  EXPECT_EQ(c.Do(nbd::kCmdRead, 4096, 4096), 0);
}

TEST_F(NbdServerTest, AbortIsAcknowledgedThenClosed) {
  StartServer();
  RawClient c = Connect();
  c.Hello();
  c.ClientFlags(nbd::kClientFlagFixedNewstyle);
  c.Option(nbd::kOptAbort, "");
  auto r = c.ReadOptReply();
  EXPECT_EQ(r.opt, nbd::kOptAbort);
  EXPECT_EQ(r.type, nbd::kRepAck);
  EXPECT_TRUE(c.Closed());
}

TEST_F(NbdServerTest, HostileHandshakesAreClosed) {
  StartServer();
  {
    RawClient c = Connect();
    c.Hello();
    c.ClientFlags(0x80);  // unknown client flag
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c = Connect();
    c.Hello();
    c.ClientFlags(nbd::kClientFlagFixedNewstyle);
    c.Option(nbd::kOptGo, RawClient::GoData("", {}), 0x1122334455667788ull);  // bad option magic
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c = Connect();
    c.Hello();
    c.ClientFlags(nbd::kClientFlagFixedNewstyle);
    std::string m;  // a 1 GiB option: never buffered
    PutU64(&m, nbd::kOptMagic);
    PutU32(&m, nbd::kOptGo);
    PutU32(&m, 1u << 30);
    ASSERT_TRUE(WriteFull(c.fd(), m.data(), m.size()).ok());
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c = Connect();
    c.Hello();
    c.ClientFlags(nbd::kClientFlagFixedNewstyle);
    c.Option(nbd::kOptExportName, "nosuch");  // can only be refused by closing
    EXPECT_TRUE(c.Closed());
  }
  EXPECT_EQ(server_->stats().protocol_violations.load(), 3u);
  RawClient ok = Connect();
  ok.HandshakeGo();
  EXPECT_EQ(ok.Do(nbd::kCmdRead, 0, 1), 0) << "the server still serves";
}

// ---- transmission -------------------------------------------------------------

TEST_F(NbdServerTest, ReadWriteFlushTrimWriteZeroes) {
  StartServer();
  RawClient c = Connect();
  uint16_t flags = c.HandshakeGo();
  EXPECT_TRUE(flags & nbd::kFlagSendFua);
  std::string pat(65536, '\xab');
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 0, 65536, nbd::kCmdFlagFua, pat), 0);
  std::string back;
  c.Request(nbd::kCmdRead, 0, 65536);
  ASSERT_EQ(c.Reply(65536, &back), 0);
  EXPECT_EQ(back, pat);
  EXPECT_EQ(c.Do(nbd::kCmdFlush, 0, 0), 0);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, 4096, 8192), 0);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, 20000, 100, nbd::kCmdFlagNoHole | nbd::kCmdFlagFua), 0);
  EXPECT_EQ(c.Do(nbd::kCmdTrim, 131072, 65536, nbd::kCmdFlagFua), 0);
  EXPECT_EQ(c.Do(nbd::kCmdWrite, kSize - 3, 3, 0, "xyz"), 0) << "the last bytes";
  EXPECT_EQ(c.Do(nbd::kCmdRead, 0, 0), 0) << "zero length: no error, no data";
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 0, 0), 0);
  auto f = File();
  for (size_t i = 0; i < 65536; ++i) {
    bool zero = (i >= 4096 && i < 12288) || (i >= 20000 && i < 20100);
    ASSERT_EQ(f[i], zero ? 0 : 0xab) << i;
  }
  for (size_t i = 131072; i < 196608; ++i) ASSERT_EQ(f[i], 0) << "trimmed (punched) " << i;
  EXPECT_EQ(std::string(f.begin() + kSize - 3, f.begin() + kSize), "xyz");
  c.Request(nbd::kCmdDisc, 0, 0);
  EXPECT_TRUE(c.Closed());
  ExpectGuardIntact();
  EXPECT_EQ(server_->stats().bytes_written.load(), 65536u + 3);
}

TEST_F(NbdServerTest, HostileRequestsGetErrorsAndNeverWriteOutsideTheDisk) {
  StartServer();
  RawClient c = Connect();
  c.HandshakeGo();
  const uint64_t huge = ~0ull - 100;
  std::string page(4096, 'p');
  // Out of range and overflowing: EINVAL for reads and trims, ENOSPC for
  // writes and write-zeroes, as the spec recommends.
  EXPECT_EQ(c.Do(nbd::kCmdRead, kSize, 1), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, kSize - 100, 4096), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, huge, 4096), nbd::kEinval) << "offset + length overflows";
  EXPECT_EQ(c.Do(nbd::kCmdWrite, kSize - 10, 4096, 0, page), nbd::kEnospc);
  EXPECT_EQ(c.Do(nbd::kCmdWrite, huge, 4096, 0, page), nbd::kEnospc);
  EXPECT_EQ(c.Do(nbd::kCmdWrite, kSize, 4096, 0, page), nbd::kEnospc);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, kSize - 1, 2), nbd::kEnospc);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, huge, ~0u), nbd::kEnospc);
  EXPECT_EQ(c.Do(nbd::kCmdTrim, huge, 4096), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdTrim, 0, kSize + 1), nbd::kEinval);
  // Oversized: a 1 GiB read is refused without a payload.
  EXPECT_EQ(c.Do(nbd::kCmdRead, 0, 1u << 30), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, 0, (32u << 20) + 1), nbd::kEinval);
  // Unknown or unadvertised commands and flags.
  EXPECT_EQ(c.Do(99, 0, 4096), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdCache, 0, 4096), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdBlockStatus, 0, 4096), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, 0, 4096, 1 << 9), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, 0, 4096, nbd::kCmdFlagDf), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, 0, 4096, nbd::kCmdFlagFastZero), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 0, 4096, nbd::kCmdFlagNoHole, page), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdFlush, 0, 10), nbd::kEinval);
  // After all that the connection is in step and still works.
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 8192, 4096, 0, page), 0);
  EXPECT_EQ(server_->stats().error_replies.load(), 20u);
  auto f = File();
  EXPECT_EQ(std::string(f.begin() + 8192, f.begin() + 12288), page);
  EXPECT_EQ(f[0], 7) << "refused writes changed nothing";
  EXPECT_EQ(f[kSize - 10], static_cast<uint8_t>((kSize - 10) * 31 + 7));

  // A 1 GiB write: the payload is never read or allocated; EINVAL, then the
  // connection is closed (it cannot be resynchronized).
  c.Request(nbd::kCmdWrite, 0, 1u << 30);
  EXPECT_EQ(c.Reply(), nbd::kEinval);
  EXPECT_TRUE(c.Closed());

  // Bad request magic: closed.
  RawClient d = Connect();
  d.HandshakeGo();
  d.Request(nbd::kCmdRead, 0, 512, 0, {}, 0x25609514);
  EXPECT_TRUE(d.Closed());
  ExpectGuardIntact();
}

TEST_F(NbdServerTest, RandomRequestsNeverCrashOrEscapeTheDisk) {
  StartServer();
  std::mt19937_64 rng(12345);
  const std::vector<uint64_t> offs = {0, 1, kSize - 1, kSize, kSize + 1, kSize + kGuard, ~0ull, ~0ull - 4095,
                                      1ull << 63};
  const std::vector<uint32_t> lens = {0, 1, 512, 4096, 65536, kSize, (32u << 20) + 1, 1u << 30, ~0u};
  RawClient c = Connect();
  c.HandshakeGo();
  int reconnects = 0;
  for (int i = 0; i < 400; ++i) {
    uint16_t type = static_cast<uint16_t>(rng() % 10);
    uint16_t flags = rng() % 4 == 0 ? static_cast<uint16_t>(rng()) : 0;
    uint64_t off = rng() % 3 == 0 ? rng() % (kSize + kGuard) : offs[rng() % offs.size()];
    uint32_t len = lens[rng() % lens.size()];
    if (type == nbd::kCmdWrite && len > 65536 && len <= (32u << 20)) len = 65536;  // keep the test fast
    bool sends_payload = type == nbd::kCmdWrite && len <= (32u << 20);
    c.Request(type, off, len, flags, sends_payload ? std::string(len, static_cast<char>(0xee)) : std::string());
    if (type == nbd::kCmdDisc) {
      EXPECT_TRUE(c.Closed());
      c = Connect();
      c.HandshakeGo();
      reconnects++;
      continue;
    }
    int64_t err = c.Reply(type == nbd::kCmdRead ? len : 0);
    if (type == nbd::kCmdWrite && len > (32u << 20)) {
      EXPECT_EQ(err, nbd::kEinval);
      EXPECT_TRUE(c.Closed());
      c = Connect();
      c.HandshakeGo();
      reconnects++;
      continue;
    }
    ASSERT_GE(err, 0) << "request " << i << " closed the connection";
  }
  EXPECT_GT(reconnects, 0);
  ExpectGuardIntact();
}

TEST_F(NbdServerTest, SinkErrorsBecomeNbdErrors) {
  FailingSink failing;
  StartServer({}, &failing);
  RawClient c = Connect();
  c.HandshakeGo();
  EXPECT_EQ(c.Do(nbd::kCmdRead, 0, 4096), nbd::kEio) << "and no payload follows";
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 0, 3, 0, "abc"), nbd::kEnospc);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, 0, 3), nbd::kEperm);
  EXPECT_EQ(c.Do(nbd::kCmdTrim, 0, 3), nbd::kEnotsup);
  EXPECT_EQ(c.Do(nbd::kCmdFlush, 0, 0), nbd::kEio);
}

TEST_F(NbdServerTest, MinimumBlockIsAdvertisedAndEnforced) {
  NbdExport e{"vda", "", kSize};
  e.min_block = 512;
  StartServer(e);
  RawClient c = Connect();
  c.Hello();
  c.ClientFlags(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
  c.Option(nbd::kOptGo, RawClient::GoData("", {}));
  bool bs = false;
  for (;;) {
    auto r = c.ReadOptReply();
    if (r.type == nbd::kRepAck) break;
    if (Load16(r.data.data()) == nbd::kInfoBlockSize) bs = LoadU32(r.data.data() + 2) == 512;
  }
  EXPECT_TRUE(bs) << "sent even unasked when the minimum is above 1";
  EXPECT_EQ(c.Do(nbd::kCmdRead, 1, 512), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, 512, 100), nbd::kEinval);
  EXPECT_EQ(c.Do(nbd::kCmdRead, 512, 1024), 0);
  NbdExport bad{"x", "", 1000};
  bad.min_block = 512;
  EXPECT_EQ(NbdServer::Start(bad, sink_.get(), {dir_ + "/x.sock"}).status().code(), Code::kInvalidArgument);
}

TEST_F(NbdServerTest, ReadOnlyExportRefusesWrites) {
  NbdExport e{"vda", "", kSize};
  e.read_only = true;
  StartServer(e);
  RawClient c = Connect();
  EXPECT_TRUE(c.HandshakeGo() & nbd::kFlagReadOnly);
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 0, 3, 0, "abc"), nbd::kEperm);
  EXPECT_EQ(c.Do(nbd::kCmdTrim, 0, 3), nbd::kEperm);
  EXPECT_EQ(c.Do(nbd::kCmdWriteZeroes, 0, 3), nbd::kEperm);
  EXPECT_EQ(File()[0], 7);
}

TEST_F(NbdServerTest, TcpListenerAndConnectionLimit) {
  StartServer();
  ASSERT_NE(server_->tcp_port(), 0);
  auto fd = ConnectTcp({"127.0.0.1", server_->tcp_port()}, 2000);
  ASSERT_TRUE(fd.ok());
  RawClient t(std::move(fd).value());
  t.HandshakeGo();
  EXPECT_EQ(t.Do(nbd::kCmdRead, 0, 4096), 0);
  std::vector<RawClient> more;
  for (int i = 0; i < 3; ++i) {
    more.push_back(Connect());
    more.back().Hello();
  }
  RawClient fifth = Connect();  // max_connections = 4
  EXPECT_TRUE(fifth.Closed());
}

TEST_F(NbdServerTest, StopReturnsPromptlyWithClientsConnected) {
  StartServer();
  RawClient a = Connect();  // mid-handshake
  a.Hello();
  RawClient b = Connect();  // in transmission, idle
  b.HandshakeGo();
  auto t0 = std::chrono::steady_clock::now();
  server_->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_TRUE(a.Closed());
  EXPECT_TRUE(b.Closed());
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/nbd.sock"));
}

// ServeConnection runs the session of an accepted connection on the calling
// thread and says how it ended (tests/fuzz/fuzz_nbd.cc relies on it).
TEST_F(NbdServerTest, ServeConnectionServesOneClientOnTheCallingThread) {
  StartServer();
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Fd server_end(sv[0]);
  RawClient c{Fd(sv[1])};
  Status ended;
  std::thread t([&] { ended = server_->ServeConnection(server_end.get()); });
  c.HandshakeGo();
  EXPECT_EQ(c.Do(nbd::kCmdWrite, 4096, 4, 0, "abcd"), 0);
  std::string d;
  c.Request(nbd::kCmdRead, 4096, 4);
  EXPECT_EQ(c.Reply(4, &d), 0);
  EXPECT_EQ(d, "abcd");
  c.Request(nbd::kCmdDisc, 0, 0);
  t.join();
  EXPECT_TRUE(ended.ok()) << ended.ToString();
  EXPECT_EQ(File()[4096], 'a');

  // A protocol violation is Aborted.
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Fd server_end2(sv[0]);
  RawClient c2{Fd(sv[1])};
  std::thread t2([&] { ended = server_->ServeConnection(server_end2.get()); });
  c2.Hello();
  c2.ClientFlags(0x80);
  t2.join();
  EXPECT_EQ(ended.code(), Code::kAborted) << ended.ToString();
  EXPECT_EQ(server_->stats().protocol_violations.load(), 1u);
}

}  // namespace
}  // namespace remus
