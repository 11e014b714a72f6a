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

// fuzz_config found it (tests/fuzz/regressions/fuzz_config/): CLI11 2.1 let
// std::stoll's out_of_range escape for a flag given a huge number.
TEST(RemusdConfig, AHugeNumberForAFlagIsAnErrorNotAThrow) {
  for (const char* text : {"no-auto-promote = 22222222222222222222222\n", "no-auto-promote = -99999999999999999999\n"}) {
    StatusOr<RemusdFlags> f = InvalidArgument("not run");
    // CLI11 2.1 (Debian 12) throws std::out_of_range from inside its parse,
    // which becomes our "too large" error; CLI11 2.4.1 (Debian 13) reads such a
    // flag value without throwing. Either way: no exception, and no other error.
    auto check = [&](const StatusOr<RemusdFlags>& r) {
      if (r.ok()) return;
      EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << text;
      EXPECT_NE(r.status().message().find("too large"), std::string::npos) << r.status().message();
    };
    EXPECT_NO_THROW(f = ParseRemusdConfig(text)) << text;
    check(f);
    RemusdConfigParser parser;
    EXPECT_NO_THROW(f = parser.Parse(text)) << text;
    check(f);
  }
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

// Everything a config file can set, as text, to compare two parses.
std::string Summary(const StatusOr<RemusdFlags>& r) {
  if (!r.ok()) return r.status().ToString();
  const RemusdFlags& f = *r;
  const DaemonOptions& o = f.daemon;
  std::ostringstream s;
  auto list = [&](const std::vector<std::string>& v) {
    for (const auto& x : v) s << x << ',';
    s << ';';
  };
  s << o.state_dir << ';' << o.key_file << ';' << o.tls_cert << ';' << o.tls_key << ';' << o.tls_ca << ';'
    << o.tls_peer_name << ';' << o.control_socket << ';' << f.listen << ';'
    << (o.listen ? o.listen->host + ":" + std::to_string(o.listen->port) : "-") << ';' << f.heartbeat_interval_ms
    << ';' << f.heartbeat_timeout_ms << ';' << o.heartbeat.interval.count() << ';' << o.heartbeat.timeout.count()
    << ';' << o.qemu_binary << ';' << o.auto_promote << ';' << o.libvirt_uri << ';' << o.libvirt_pid_dir << ';'
    << o.ack_delay_ms << ';' << o.fault << ';' << o.metrics_listen << ';' << f.metrics_web_config << ';' << o.arbiter
    << ';' << o.etcd_prefix << ';' << o.etcd_cacert << ';' << o.etcd_cert << ';' << o.etcd_key << ';' << o.host_id
    << ';' << o.lease_ttl_ms << ';' << o.lease_margin_ms << ';' << f.cleanup_netbuf << ';' << f.check_netbuf << ';'
    << f.log_level << ';';
  list(o.etcd_endpoints);
  list(o.peer_policy.extra_options);
  list(o.peer_policy.extra_devices);
  list(o.peer_policy.file_dirs);
  list(o.peer_policy.shared_disk_dirs);
  list(o.peer_policy.extra_libvirt_elements);
  return s.str();
}

// One parser, many texts (the fuzz target's way): each result is a fresh
// parse's, whatever the text before it set or where it failed.
TEST(RemusdConfig, AReusedParserStartsFromTheDefaults) {
  const std::vector<std::string> texts = {
      "state-dir = \"/srv/remus\"\nlisten = \"10.0.0.2:7000\"\nno-auto-promote = true\n"
      "etcd-endpoints = \"http://a:2379,http://b:2379\"\nallow-qemu-device = [\"a\", \"b\"]\n",
      "",
      "key-file = \"/k\"\ntls-cert = \"/c\"\n",  // excludes: an error
      "heartbeat-interval-ms = 50\nlog-level = \"warn\"\n",
      "heartbeat-interval-ms = 500\nheartbeat-timeout-ms = 400\n",  // fails after setting both
      "stat-dir = \"/x\"\n",
      "allow-qemu-device = \"c\"\narbiter = \"none\"\n",
      "tls-cert = \"/c\"\ntls-key = \"/k\"\ntls-ca = \"/ca\"\n",
      "no-auto-promote = false\n",
      "",
  };
  RemusdConfigParser parser;
  for (int round = 0; round < 2; round++)
    for (const std::string& t : texts) EXPECT_EQ(Summary(parser.Parse(t)), Summary(ParseRemusdConfig(t))) << t;
  // And the texts did set something, so the comparison could fail.
  EXPECT_NE(Summary(ParseRemusdConfig(texts[0])), Summary(ParseRemusdConfig("")));
  EXPECT_FALSE(ParseRemusdConfig(texts[2]).ok());
  EXPECT_TRUE(ParseRemusdConfig(texts[7]).ok());
}

}  // namespace
}  // namespace remus
