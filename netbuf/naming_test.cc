// Chain and IFB names within the kernel's limits, owner tags, /proc/<pid>/stat.
#include "netbuf/naming.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <set>
#include <string>
#include <vector>

namespace remus::netbuf {
namespace {

TEST(netbuf_naming, PlainDomainsKeepTheirName) {
  EXPECT_EQ(ChainName("web1"), "REMUS-web1");
  EXPECT_EQ(ChainName("db.prod-2_a"), "REMUS-db.prod-2_a");
  EXPECT_EQ(ChainName("abcdefghijklmnopqrstuv"), "REMUS-abcdefghijklmnopqrstuv");  // 22: fits exactly
  EXPECT_EQ(ChainName("abcdefghijklmnopqrstuv").size(), kMaxChainName);
}

TEST(netbuf_naming, OtherDomainsAreSanitizedAndHashed) {
  for (std::string d : std::vector<std::string>{"abcdefghijklmnopqrstuvw", "web 1", "web/1", "wéb", "-web", "", "a!b",
                        std::string(300, 'x')}) {
    std::string c = ChainName(d);
    EXPECT_LE(c.size(), kMaxChainName) << d;
    EXPECT_EQ(c.substr(0, 6), "REMUS-") << d;
    for (char ch : c.substr(6))
      EXPECT_TRUE(isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-' || ch == '.') << c;
  }
  EXPECT_EQ(ChainName("web 1"), "REMUS-web_1-" + ChainName("web 1").substr(12));
  // Sanitizing must not merge distinct domains.
  EXPECT_NE(ChainName("web 1"), ChainName("web/1"));
  EXPECT_NE(ChainName("web 1"), ChainName("web_1"));
  EXPECT_NE(ChainName(std::string(30, 'x') + "a"), ChainName(std::string(30, 'x') + "b"));
}

TEST(netbuf_naming, IfbNamesFitIfnamsizAndDiffer) {
  std::set<std::string> seen;
  for (std::string d : std::vector<std::string>{"web1", "web2", std::string(200, 'd')})
    for (std::string t : {"vnet0", "vnet1", "tap-with-long-n"}) {
      std::string n = IfbName(d, t);
      EXPECT_LE(n.size(), kMaxIfName);
      EXPECT_EQ(n.substr(0, 4), "ifr-");
      EXPECT_TRUE(ValidInterfaceName(n));
      seen.insert(n);
    }
  EXPECT_EQ(seen.size(), 9u);
  EXPECT_EQ(IfbName("web1", "vnet0"), IfbName("web1", "vnet0"));
  EXPECT_NE(IfbName("a", "bc"), IfbName("ab", "c"));
}

TEST(netbuf_naming, InterfaceNames) {
  EXPECT_TRUE(ValidInterfaceName("vnet0"));
  EXPECT_TRUE(ValidInterfaceName("123456789012345"));
  EXPECT_FALSE(ValidInterfaceName("1234567890123456"));
  EXPECT_FALSE(ValidInterfaceName(""));
  EXPECT_FALSE(ValidInterfaceName("a/b"));
  EXPECT_FALSE(ValidInterfaceName("a b"));
  EXPECT_FALSE(ValidInterfaceName(".."));
}

TEST(netbuf_naming, OwnerTagsRoundTrip) {
  Owner o{4242, 1234567890123};
  EXPECT_EQ(FormatOwnerTag(o), "remus:pid=4242,start=1234567890123");
  EXPECT_EQ(ParseOwnerTag(FormatOwnerTag(o)), o);
  EXPECT_EQ(ParseOwnerTag("-A X -m comment --comment \"remus:pid=7,start=8\" -j Y"), (Owner{7, 8}));
  EXPECT_EQ(ParseOwnerTag("remus:pid=7,start=8;domain=web1;tap=vnet0"), (Owner{7, 8}));
  EXPECT_FALSE(ParseOwnerTag("remus:pid=,start=8").has_value());
  EXPECT_FALSE(ParseOwnerTag("remus:pid=7").has_value());
  EXPECT_FALSE(ParseOwnerTag("something else").has_value());
}

TEST(netbuf_naming, ParsesProcStatWithAnAwkwardCommand) {
  auto p = ParseProcStat("123 (a) b (c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10\n");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->first, 'S');
  EXPECT_EQ(p->second, 98765u);
  EXPECT_FALSE(ParseProcStat("123 (x) S 1").has_value());
}

TEST(netbuf_naming, OwnerAliveTellsLiveFromDeadAndReused) {
  Owner self = SelfOwner();
  EXPECT_EQ(self.pid, getpid());
  EXPECT_GT(self.start_ticks, 0u);
  EXPECT_TRUE(OwnerAlive(self));
  EXPECT_FALSE(OwnerAlive(Owner{self.pid, self.start_ticks + 1}));  // same pid, later process
  pid_t child = fork();
  if (child == 0) _exit(0);
  int st;
  ASSERT_EQ(waitpid(child, &st, 0), child);
  EXPECT_FALSE(OwnerAlive(Owner{child, 0}));
}

}  // namespace
}  // namespace remus::netbuf
