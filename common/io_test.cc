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
