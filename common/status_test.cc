#include "common/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace remus {
namespace {

StatusOr<int> Half(int v) {
  if (v % 2) return InvalidArgument("odd");
  return v / 2;
}

Status UseHalf(int v, int* out) {
  ASSIGN_OR_RETURN(*out, Half(v));
  return OkStatus();
}

TEST(Status, ErrnoMapping) {
  EXPECT_EQ(ErrnoStatus("write", ENOSPC).code(), Code::kResourceExhausted);
  EXPECT_EQ(ErrnoStatus("read", ECONNRESET).code(), Code::kUnavailable);
  EXPECT_EQ(ErrnoStatus("open", ENOENT).code(), Code::kNotFound);
  EXPECT_NE(ErrnoStatus("open", ENOENT).message().find("open: "), std::string::npos);
}

TEST(Status, AssignOrReturn) {
  int out = 0;
  EXPECT_TRUE(UseHalf(8, &out).ok());
  EXPECT_EQ(out, 4);
  Status s = UseHalf(3, &out);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.Annotate("ctx").message(), "ctx: odd");
}

}  // namespace
}  // namespace remus
