#include "remusd/daemon.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "tools/remusctl/control_client.h"

namespace remus {
namespace {

using nlohmann::json;

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/remus-daemon-test.XXXXXX";
    dir_ = mkdtemp(tmpl);
    ASSERT_TRUE(WriteFileAtomic(dir_ + "/key", std::string(64, 'a')).ok());
    ::chmod((dir_ + "/key").c_str(), 0600);
    DaemonOptions o;
    o.state_dir = dir_ + "/state";
    o.control_socket = dir_ + "/control.sock";
    o.key_file = dir_ + "/key";
    daemon_ = std::make_unique<Daemon>(o);
    Status s = daemon_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  void TearDown() override {
    daemon_.reset();
    std::filesystem::remove_all(dir_);
  }
  json Call(const json& req) { return daemon_->Handle(req); }
  static void ExpectError(const json& r, const std::string& code, const std::string& text) {
    EXPECT_FALSE(r.value("ok", true)) << r.dump();
    EXPECT_EQ(r.value("code", ""), code) << r.dump();
    EXPECT_NE(r.value("error", "").find(text), std::string::npos) << r.dump();
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_F(DaemonTest, ErrorsNameTheDomainAndTheFix) {
  ExpectError(Call({{"command", "bogus"}}), "INVALID_ARGUMENT", "unknown command 'bogus'");
  ExpectError(Call({{"command", "protect"}, {"domain", "../etc"}}), "INVALID_ARGUMENT", "invalid domain name");
  // Without --qmp the domain is libvirt's (remusd's --libvirt-uri, or the request's).
  const std::string no_libvirt = "qemu:///system?socket=" + dir_ + "/no-libvirt-sock";
  ExpectError(Call({{"command", "protect"}, {"domain", "web1"}, {"backup", "127.0.0.1:1"}, {"libvirt_uri", no_libvirt}}),
              "UNAVAILABLE", "cannot connect to libvirt at " + no_libvirt + " for domain web1");
  ExpectError(Call({{"command", "protect"}, {"domain", "web1"}, {"backup", "b:1"}, {"qmp", "/q"}, {"libvirt_uri", "x"}}),
              "INVALID_ARGUMENT", "not both");
  ExpectError(Call({{"command", "protect"}, {"domain", "web1"}, {"qmp", dir_ + "/nope.qmp"}, {"backup", "b:99999"}}),
              "INVALID_ARGUMENT", "port out of range");
  json r = Call({{"command", "protect"}, {"domain", "web1"}, {"qmp", dir_ + "/nope.qmp"}, {"backup", "127.0.0.1:1"}});
  ExpectError(r, "UNAVAILABLE", "domain web1: cannot reach QEMU's monitor at " + dir_ + "/nope.qmp");
  ExpectError(Call({{"command", "status"}, {"domain", "web9"}}), "NOT_FOUND", "unknown domain web9");
  ExpectError(Call({{"command", "unprotect"}, {"domain", "web9"}}), "NOT_FOUND", "unknown domain web9");
  ExpectError(Call({{"command", "tune"}, {"domain", "web9"}, {"interval_ms", 5}}), "NOT_FOUND", "unknown domain web9");
  ExpectError(Call({{"command", "failover"}, {"domain", "web9"}}), "FAILED_PRECONDITION", "not a backup");
  json st = Call({{"command", "status"}});
  EXPECT_TRUE(st.value("ok", false));
  EXPECT_TRUE(st["result"]["domains"].empty());
}

TEST_F(DaemonTest, AsyncProtectAnswersAtOnceAndReportsTheOutcomeInStatus) {
  // libvirt's hook: the reply comes before any connection is tried.
  const std::string no_libvirt = "qemu:///system?socket=" + dir_ + "/no-libvirt-sock";
  json r = Call({{"command", "protect"}, {"domain", "web1"}, {"backup", "127.0.0.1:1"}, {"libvirt_uri", no_libvirt},
                 {"async", true}, {"retry_ms", 0}});
  ASSERT_TRUE(r.value("ok", false)) << r.dump();
  EXPECT_EQ(r["result"]["domain"], "web1");
  json st;
  for (int i = 0; i < 200; i++) {
    st = Call({{"command", "status"}, {"domain", "web1"}});
    ASSERT_TRUE(st.value("ok", false)) << st.dump();
    if (st["result"]["domains"][0]["state"] != "starting") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const json& d = st["result"]["domains"][0];
  EXPECT_EQ(d["state"], "unprotected") << d.dump();
  EXPECT_NE(d.value("error", "").find("libvirtd running"), std::string::npos) << d.dump();
  EXPECT_EQ(d["libvirt"]["uri"], no_libvirt);
  EXPECT_EQ(d["qmp_socket"], "");
  // The hook's stop notice leaves an ended protection as it is; unprotect clears it.
  EXPECT_TRUE(Call({{"command", "unprotect"}, {"domain", "web1"}, {"async", true}, {"domain_stopped", true}})
                  .value("ok", false));
  EXPECT_TRUE(Call({{"command", "unprotect"}, {"domain", "web1"}}).value("ok", false));
  ExpectError(Call({{"command", "status"}, {"domain", "web1"}}), "NOT_FOUND", "unknown domain web1");
}

TEST_F(DaemonTest, ControlSocketIsRootOnly) {
  struct stat sb {};
  ASSERT_EQ(::stat((dir_ + "/control.sock").c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0600u);
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a client as another user";
  // Even with the file mode opened up, the daemon checks the peer's uid.
  ::chmod((dir_ + "/control.sock").c_str(), 0666);
  ::chmod(dir_.c_str(), 0755);
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) _exit(10);
    auto r = ControlCall(dir_ + "/control.sock", {{"command", "status"}});
    if (r.ok()) _exit(11);
    if (r.status().code() != Code::kPermissionDenied) _exit(12);
    if (r.status().message().find("root only") == std::string::npos) _exit(13);
    _exit(0);
  }
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 0) << "10: setuid failed, 11: accepted, 12: wrong code, 13: wrong message";
  // Root is served.
  auto r = ControlCall(dir_ + "/control.sock", {{"command", "ping"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["backup"], false);
}

TEST(DaemonStart, RefusesAWorldReadableKey) {
  char tmpl[] = "/tmp/remus-daemon-test.XXXXXX";
  std::string dir = mkdtemp(tmpl);
  ASSERT_TRUE(WriteFileAtomic(dir + "/key", std::string(64, 'a')).ok());
  ::chmod((dir + "/key").c_str(), 0644);
  DaemonOptions o;
  o.state_dir = dir + "/state";
  o.control_socket = dir + "/control.sock";
  o.key_file = dir + "/key";
  Daemon d(o);
  Status s = d.Start();
  EXPECT_EQ(s.code(), Code::kPermissionDenied) << s.ToString();
  EXPECT_NE(s.message().find("chmod 600"), std::string::npos) << s.message();
  std::filesystem::remove_all(dir);
}

// One HTTP/1.0 GET on 127.0.0.1:port; everything the server sent.
std::string HttpGet(int port, const std::string& path) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return "connect failed";
  std::string req = "GET " + path + " HTTP/1.0\r\n\r\n";
  if (!WriteFull(fd.get(), req.data(), req.size()).ok()) return "write failed";
  std::string out;
  char buf[4096];
  for (;;) {
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) return out + "<timeout>";
    ssize_t r = ::read(fd.get(), buf, sizeof buf);
    if (r <= 0) return out;
    out.append(buf, static_cast<size_t>(r));
  }
}

TEST(DaemonMetrics, ServesPrometheusTextWhileRunning) {
  char tmpl[] = "/tmp/remus-daemon-test.XXXXXX";
  std::string dir = mkdtemp(tmpl);
  ASSERT_TRUE(WriteFileAtomic(dir + "/key", std::string(64, 'a')).ok());
  ::chmod((dir + "/key").c_str(), 0600);
  DaemonOptions o;
  o.state_dir = dir + "/state";
  o.control_socket = dir + "/control.sock";
  o.key_file = dir + "/key";
  o.listen = HostPort{"127.0.0.1", 0};  // a backup, so the role="backup" count is there
  o.metrics_listen = "127.0.0.1:0";
  {
    Daemon d(o);
    Status s = d.Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_GT(d.metrics_port(), 0);
    std::string r = HttpGet(d.metrics_port(), "/metrics");
    EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
    EXPECT_NE(r.find("Content-Type: text/plain; version=0.0.4"), std::string::npos) << r;
    EXPECT_NE(r.find("# TYPE remus_domains gauge\n"), std::string::npos) << r;
    EXPECT_NE(r.find("remus_domains{role=\"primary\"} 0\n"), std::string::npos) << r;
    EXPECT_NE(r.find("remus_domains{role=\"backup\"} 0\n"), std::string::npos) << r;
    EXPECT_EQ(HttpGet(d.metrics_port(), "/").rfind("HTTP/1.1 404", 0), 0u);
    // The control socket keeps working alongside.
    EXPECT_TRUE(d.Handle({{"command", "ping"}}).value("ok", false));
    auto t0 = std::chrono::steady_clock::now();
    d.Shutdown();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2)) << "--metrics slowed the shutdown";
  }
  // A port that is taken: Start fails naming the address and the fix.
  Fd holder(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(holder.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(holder.get(), 1), 0);
  socklen_t len = sizeof a;
  ::getsockname(holder.get(), reinterpret_cast<sockaddr*>(&a), &len);
  o.listen.reset();
  o.metrics_listen = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  Daemon d(o);
  Status s = d.Start();
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find("cannot serve metrics on " + o.metrics_listen), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("--metrics"), std::string::npos) << s.message();
  d.Shutdown();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace remus
