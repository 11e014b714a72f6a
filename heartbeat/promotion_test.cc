#include "heartbeat/promotion.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace remus {
namespace {

TEST(Promotion, ExactlyOneWinnerUnderRace) {
  for (int round = 0; round < 200; round++) {
    PromotionGate gate;
    std::atomic<int> winners{0};
    std::vector<std::thread> ts;
    for (int i = 0; i < 4; i++)
      ts.emplace_back([&, i] {
        if (gate.Begin("racer " + std::to_string(i)).ok()) winners++;
      });
    for (auto& t : ts) t.join();
    EXPECT_EQ(winners.load(), 1);
    EXPECT_EQ(gate.state(), PromotionState::kPromoting);
  }
}

TEST(Promotion, SecondPromotionRefused) {
  PromotionGate gate;
  ASSERT_TRUE(gate.Begin("heartbeat timeout").ok());
  gate.Finish(OkStatus());
  EXPECT_EQ(gate.state(), PromotionState::kPromoted);
  Status s = gate.Begin("operator");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_EQ(s.message(), "already promoted (heartbeat timeout)");
}

TEST(Promotion, FailedPromotionMayBeRetried) {
  PromotionGate gate;
  ASSERT_TRUE(gate.Begin("primary lost").ok());
  gate.Finish(Unavailable("qemu did not start"));
  EXPECT_EQ(gate.state(), PromotionState::kFailed);
  EXPECT_NE(gate.error().find("qemu did not start"), std::string::npos);
  ASSERT_TRUE(gate.Begin("operator retry").ok());
  EXPECT_EQ(gate.Begin("again").code(), Code::kFailedPrecondition);
}

TEST(Promotion, FinishWithoutBeginChangesNothing) {
  PromotionGate gate;
  gate.Finish(OkStatus());
  EXPECT_EQ(gate.state(), PromotionState::kStandby);
}

}  // namespace
}  // namespace remus
