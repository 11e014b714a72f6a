#include "common/io.h"

#include <gtest/gtest.h>
#include <sys/socket.h>

namespace remus {
namespace {

TEST(HostPort, Parses) {
  auto a = ParseHostPort("hostB:7788", 1);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "hostB");
  EXPECT_EQ(a->port, 7788);
  auto b = ParseHostPort("hostB", 7788);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->port, 7788);
  auto c = ParseHostPort("[::1]:99", 1);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->host, "::1");
  EXPECT_EQ(c->ToString(), "[::1]:99");
}

TEST(HostPort, RejectsBadInput) {
  EXPECT_EQ(ParseHostPort("", 1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseHostPort("h:0", 1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseHostPort("h:70000", 1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseHostPort("h:x1", 1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseHostPort(":80", 1).status().code(), Code::kInvalidArgument);
}

TEST(BufferedReader, ReadsBigEndianAcrossChunks) {
  std::string s;
  PutU8(&s, 0xab);
  PutU16(&s, 0x1234);
  PutU32(&s, 0xdeadbeef);
  PutU64(&s, 0x0102030405060708ull);
  s += std::string(10000, 'x');
  MemorySource src(s, 3);  // tiny chunks exercise refills
  BufferedReader r(&src, 16);
  EXPECT_EQ(*r.U8(), 0xab);
  EXPECT_EQ(*r.U16(), 0x1234);
  EXPECT_EQ(*r.U32(), 0xdeadbeefu);
  EXPECT_EQ(*r.U64(), 0x0102030405060708ull);
  auto rest = r.Bytes(10000);
  ASSERT_TRUE(rest.ok());
  EXPECT_EQ(*rest, std::string(10000, 'x'));
  EXPECT_EQ(r.offset(), 15u + 10000u);
  auto eof = r.U8();
  EXPECT_EQ(eof.status().code(), Code::kUnavailable);
}

// Retention: every span handed out during retention still holds its bytes
// after many more reads, and the retained buffers hold the whole stream.
TEST(BufferedReader, RetainedSpansStayValidAcrossRefills) {
  std::string s;
  for (uint32_t i = 0; i < 500; i++) {
    PutU32(&s, i);
    s += std::string(60, static_cast<char>('a' + i % 26));
  }
  MemorySource src(s, 7);
  BufferPool pool(256, 4);
  BufferedReader r(&src, 256);
  ASSERT_EQ(*r.U32(), 0u);  // read before retention starts
  ASSERT_TRUE(r.Skip(60).ok());
  r.StartRetaining(&pool);
  std::vector<std::pair<uint32_t, const uint8_t*>> spans;
  for (uint32_t i = 1; i < 400; i++) {
    auto n = r.U32();
    ASSERT_TRUE(n.ok());
    ASSERT_EQ(*n, i);
    auto p = r.ReadSpan(60);
    ASSERT_TRUE(p.ok());
    spans.push_back({i, *p});
  }
  auto bufs = r.TakeRetained();
  EXPECT_GE(bufs.size(), 400u * 64 / 256);
  for (auto& [i, p] : spans)
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(p), 60), std::string(60, static_cast<char>('a' + i % 26)))
        << "span of record " << i;
  // Reading goes on normally after retention, across the carried-over bytes.
  for (uint32_t i = 400; i < 500; i++) {
    ASSERT_EQ(*r.U32(), i);
    ASSERT_TRUE(r.Skip(60).ok());
  }
  EXPECT_EQ(r.offset(), s.size());
  for (auto& b : bufs) pool.Put(std::move(b));
  EXPECT_EQ(pool.pooled(), 4u);  // capped
  EXPECT_EQ(pool.Get().size(), 256u);
  pool.Put(std::vector<uint8_t>(100));  // wrong size: not pooled
  EXPECT_EQ(pool.pooled(), 3u);
}

TEST(Io, ReadFullReportsPeerClose) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  Fd a(sv[0]), b(sv[1]);
  ASSERT_TRUE(WriteFull(a.get(), "hey", 3).ok());
  a.Reset();
  char buf[8];
  Status s = ReadFull(b.get(), buf, 8);
  EXPECT_EQ(s.code(), Code::kUnavailable);
}

}  // namespace
}  // namespace remus
