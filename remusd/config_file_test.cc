#include "remusd/config_file.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

namespace remus {
namespace {

TEST(RemusdConfig, ReadsSettingsAndKeepsDefaults) {
  auto f = ParseRemusdConfig(
      "state-dir = \"/srv/remus\"\n"
      "listen = \"10.0.0.2\"\n"
      "heartbeat-interval-ms = 50\n"
      "no-auto-promote = true\n"
      "arbiter = \"none\"\n"
      "etcd-endpoints = \"http://a:2379,http://b:2379\"\n"
      "log-level = \"debug\"\n");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->daemon.state_dir, "/srv/remus");
  ASSERT_TRUE(f->daemon.listen.has_value());
  EXPECT_EQ(f->daemon.listen->host, "10.0.0.2");
  EXPECT_EQ(f->daemon.listen->port, 7788);
  EXPECT_EQ(f->daemon.heartbeat.interval, std::chrono::milliseconds(50));
  EXPECT_EQ(f->daemon.heartbeat.timeout, std::chrono::milliseconds(1000));
  EXPECT_FALSE(f->daemon.auto_promote);
  EXPECT_EQ(f->daemon.arbiter, "none");
  EXPECT_EQ(f->daemon.etcd_endpoints, (std::vector<std::string>{"http://a:2379", "http://b:2379"}));
  EXPECT_EQ(f->log_level, "debug");
  EXPECT_EQ(f->daemon.key_file, "/etc/remus/key");  // default kept
}

TEST(RemusdConfig, TheSampleConfigParses) {
  std::ifstream in(std::string(REMUS_SOURCE_DIR) + "/scripts/remusd.conf.example");
  std::stringstream ss;
  ss << in.rdbuf();
  ASSERT_FALSE(ss.str().empty());
  auto f = ParseRemusdConfig(ss.str());
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->daemon.state_dir, "/var/lib/remus");
}

TEST(RemusdConfig, ErrorsNameTheProblem) {
  auto unknown = ParseRemusdConfig("stat-dir = \"/x\"\n");
  EXPECT_EQ(unknown.status().code(), Code::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("unknown setting 'stat-dir'"), std::string::npos)
      << unknown.status().message();
  auto range = ParseRemusdConfig("heartbeat-interval-ms = 0\n");
  EXPECT_EQ(range.status().code(), Code::kInvalidArgument);
  auto order = ParseRemusdConfig("heartbeat-interval-ms = 500\nheartbeat-timeout-ms = 400\n");
  EXPECT_EQ(order.status().code(), Code::kInvalidArgument);
  EXPECT_NE(order.status().message().find("--heartbeat-interval-ms must be less"), std::string::npos);
  auto listen = ParseRemusdConfig("listen = \"[::1\"\n");
  EXPECT_EQ(listen.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(listen.status().message().rfind("--listen: ", 0), 0u) << listen.status().message();
  // One-shot actions are not settings.
  EXPECT_EQ(ParseRemusdConfig("cleanup-netbuf = true\n").status().code(), Code::kInvalidArgument);
}

TEST(RemusdConfig, ValuesAreCheckedAsOnTheCommandLine) {
  EXPECT_EQ(ParseRemusdConfig("arbiter = \"zookeeper\"\n").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseRemusdConfig("log-level = \"loud\"\n").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseRemusdConfig("ack-delay-ms = 60001\n").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ParseRemusdConfig("lease-ttl-ms = \"soon\"\n").status().code(), Code::kInvalidArgument);
  auto f = ParseRemusdConfig("no-auto-promote = false\n");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_TRUE(f->daemon.auto_promote);
}

}  // namespace
}  // namespace remus
