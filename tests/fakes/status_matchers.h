// Checking a Status's code in tests, with the whole Status printed when the
// code differs:
//
//   EXPECT_CODE(link->Recv().status(), Code::kDataLoss);
//
// Target: remus_test_fakes (tests/CMakeLists.txt).
#pragma once

#include <gtest/gtest.h>

#include "common/status.h"

namespace remus::testing {

inline ::testing::AssertionResult HasCode(const Status& s, Code want) {
  if (s.code() == want) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "want " << CodeName(want) << ", got " << s.ToString();
}

}  // namespace remus::testing

// Checks the specific error code; the message is printed on failure.
#define EXPECT_CODE(expr, want) EXPECT_TRUE(::remus::testing::HasCode((expr), (want)))
