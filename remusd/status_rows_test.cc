#include "remusd/status_rows.h"

#include <gtest/gtest.h>

namespace remus {
namespace {

using nlohmann::json;

json Row(const std::string& d, const std::string& role, const std::string& state) {
  return {{"domain", d}, {"role", role}, {"state", state}, {"error", state + " because"}};
}

TEST(StatusRows, OneDomainOneRowKeepsItAsIs) {
  json rows = json::array({Row("web1", "primary", "protected"), Row("db", "backup", "protected")});
  json out = OneRowPerDomain(rows);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0], rows[0]);
  EXPECT_EQ(out[1], rows[1]);
}

// B after a failover, while it protects the promoted guest back to A.
TEST(StatusRows, AProtectionFromHereWinsOverThePromotionItCameFrom) {
  json out = OneRowPerDomain(json::array({Row("web1", "primary", "protected"),
                                          Row("web1", "primary (promoted)", "failed-over")}));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0]["role"], "primary");
  EXPECT_EQ(out[0]["state"], "protected");
  ASSERT_EQ(out[0]["other_roles"].size(), 1u);
  EXPECT_EQ(out[0]["other_roles"][0]["state"], "failed-over");
  EXPECT_EQ(out[0]["other_roles"][0]["role"], "primary (promoted)");
}

// A, after its guest failed over to B and B protects it back to A: A is B's
// backup now, and then the host the guest fails back to.
TEST(StatusRows, TheBackupSideWinsOverAnEndedProtection) {
  for (const char* b : {"waiting", "syncing", "protected", "primary-lost", "promoting", "failed-over"}) {
    json out = OneRowPerDomain(json::array({Row("web1", "primary", "failed-over"), Row("web1", "backup", b)}));
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0]["state"], b);
    EXPECT_EQ(out[0]["other_roles"][0]["state"], "failed-over");
  }
}

// B after the guest failed back to A: its protection failed over, and the
// guest it had promoted is gone.
TEST(StatusRows, AnEndedProtectionWinsOverAnEndedPromotion) {
  json out = OneRowPerDomain(json::array({Row("web1", "backup", "ended"), Row("web1", "primary", "failed-over")}));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0]["role"], "primary");
  EXPECT_EQ(out[0]["state"], "failed-over");
}

TEST(StatusRows, EmptyAndMissingFields) {
  EXPECT_EQ(OneRowPerDomain(json::array()), json::array());
  json out = OneRowPerDomain(json::array({json::object(), json::object()}));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0]["other_roles"].size(), 1u);
}

}  // namespace
}  // namespace remus
