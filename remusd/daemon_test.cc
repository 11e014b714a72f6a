#include "remusd/daemon.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string_view>
#include <thread>
#include <vector>

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
    o.arbiter = "none";
    o.state_dir = dir_ + "/state";
    o.control_socket = dir_ + "/control.sock";
    o.key_file = dir_ + "/key";
    o.allow_any_uid = any_uid_;
    if (idle_timeout_ms_ > 0) o.control_idle_timeout_ms = idle_timeout_ms_;
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
  bool any_uid_ = false;
  int idle_timeout_ms_ = 0;  // 0: the daemon's default
  std::unique_ptr<Daemon> daemon_;
};

bool IsOk(const json& r) { return r.is_object() && r.value("ok", false); }

// A raw control connection: bytes in, reply lines out.
class RawClient {
 public:
  explicit RawClient(const std::string& path) : fd_(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    connected_ = ::connect(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  bool connected() const { return connected_; }
  // False once the daemon stopped reading (it may hang up on a long line).
  bool Send(std::string_view bytes) {
    while (!bytes.empty()) {
      ssize_t w = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(w));
    }
    return true;
  }
  // The next reply line, parsed; null on EOF or after 10 s.
  json ReadReply() {
    size_t nl;
    char tmp[4096];
    while ((nl = buf_.find('\n')) == std::string::npos) {
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 10000) != 1) return nullptr;
      ssize_t r = ::read(fd_.get(), tmp, sizeof tmp);
      if (r <= 0) return nullptr;
      buf_.append(tmp, static_cast<size_t>(r));
    }
    std::string line = buf_.substr(0, nl);
    buf_.erase(0, nl + 1);
    return json::parse(line, nullptr, false);
  }
  json Call(std::string_view line) {
    if (!Send(std::string(line) + "\n")) return nullptr;
    return ReadReply();
  }

 private:
  Fd fd_;
  bool connected_ = false;
  std::string buf_;
};

// Serves any uid, so the socket tests run unprivileged too.
class DaemonSocketTest : public DaemonTest {
 protected:
  DaemonSocketTest() { any_uid_ = true; }
  std::string sock() const { return dir_ + "/control.sock"; }
  void ExpectServing() {
    RawClient c(sock());
    ASSERT_TRUE(c.connected());
    json r = c.Call(R"({"command":"ping"})");
    EXPECT_TRUE(IsOk(r)) << r.dump();
  }
};

TEST_F(DaemonSocketTest, HostileRequestsGetErrorRepliesAndTheDaemonKeepsServing) {
  struct Case {
    std::string line, code, text;
  };
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string protect = R"({"command":"protect","domain":"web1","qmp":"/nonexistent","backup":"127.0.0.1:1",)";
  const std::vector<Case> cases = {
      {"not json", "INVALID_ARGUMENT", "not JSON"},
      {"{\"command\":\"\xff\"}", "INVALID_ARGUMENT", "not JSON"},  // not UTF-8
      {"42", "INVALID_ARGUMENT", "not a JSON object"},
      {"null", "INVALID_ARGUMENT", "not a JSON object"},
      {R"("protect")", "INVALID_ARGUMENT", "not a JSON object"},
      {R"([{"command":"ping"}])", "INVALID_ARGUMENT", "not a JSON object"},
      {deep, "INVALID_ARGUMENT", "nested deeper than 16 levels"},
      {R"({"command":"ping","x":)" + deep + "}", "INVALID_ARGUMENT", "nested deeper"},
      {R"({"cmd":5})", "INVALID_ARGUMENT", "no 'command'"},
      {R"({"command":5})", "INVALID_ARGUMENT", "field 'command' must be a string, not an integer"},
      {R"({"command":{"a":1}})", "INVALID_ARGUMENT", "field 'command' must be a string, not an object"},
      {R"({"command":"bogus"})", "INVALID_ARGUMENT", "unknown command 'bogus'"},
      {R"({"command":"protect","domain":["x"]})", "INVALID_ARGUMENT", "field 'domain' must be a string, not a list"},
      {R"({"command":"protect","domain":5})", "INVALID_ARGUMENT", "field 'domain' must be a string"},
      {R"({"command":"protect","domain":"web1","backup":{}})", "INVALID_ARGUMENT",
       "domain web1: field 'backup' must be a string, not an object"},
      {R"({"command":"protect","domain":"web1","qmp":7})", "INVALID_ARGUMENT", "field 'qmp' must be a string"},
      {R"({"command":"protect","domain":"web1","libvirt_uri":[]})", "INVALID_ARGUMENT", "field 'libvirt_uri'"},
      {protect + R"("interval_ms":"fast"})", "INVALID_ARGUMENT",
       "domain web1: field 'interval_ms' must be an integer, not a string"},
      {protect + R"("interval_ms":1.5})", "INVALID_ARGUMENT", "'interval_ms' must be an integer, not a number"},
      {protect + R"("interval_ms":true})", "INVALID_ARGUMENT", "'interval_ms' must be an integer, not a boolean"},
      {protect + R"("interval_ms":1e400})", "INVALID_ARGUMENT", "not JSON"},
      {protect + R"("interval_ms":99999999999999999999999})", "INVALID_ARGUMENT", "'interval_ms' must be an integer"},
      {protect + R"("interval_ms":18446744073709551615})", "INVALID_ARGUMENT", "'interval_ms' is 18446744073709551615, out of range"},
      {protect + R"("interval_ms":-9223372036854775808})", "INVALID_ARGUMENT", "out of range"},
      {protect + R"("interval_ms":4294967396})", "INVALID_ARGUMENT", "out of range"},
      {protect + R"("interval_ms":0})", "INVALID_ARGUMENT", "domain web1: field 'interval_ms' is 0, out of range (expected 1..600000)"},
      {protect + R"("interval_mode":"fast"})", "INVALID_ARGUMENT", "domain web1: interval_mode 'fast' is not auto or fixed"},
      {protect + R"("interval_mode":"auto","latency_budget_ms":5})", "INVALID_ARGUMENT",
       "domain web1: --latency-budget 5 ms is out of range (10..600000)"},
      {protect + R"("interval_mode":"auto","interval_max_ms":700000})", "INVALID_ARGUMENT",
       "domain web1: field 'interval_max_ms' is 700000, out of range (expected 0..600000)"},
      {protect + R"("interval_mode":"auto","latency_budget_ms":"fast"})", "INVALID_ARGUMENT",
       "field 'latency_budget_ms' must be an integer, not a string"},
      {protect + R"("interval_mode":"auto","interval_min_ms":50,"interval_max_ms":40})", "INVALID_ARGUMENT",
       "domain web1: --interval-min 50 ms is above --interval-max 40 ms"},
      {protect + R"("interval_mode":"auto","latency_budget_ms":100,"interval_min_ms":100})", "INVALID_ARGUMENT",
       "domain web1: --interval-min 100 ms leaves nothing of the 100 ms latency budget"},
      {protect + R"("latency_budget_ms":100})", "INVALID_ARGUMENT",
       "domain web1: latency_budget_ms needs --interval auto (a fixed interval has no bounds)"},
      {protect + R"("interval_max_ms":100})", "INVALID_ARGUMENT", "interval_max_ms needs --interval auto"},
      {protect + R"("netbuf":1})", "INVALID_ARGUMENT", "field 'netbuf' must be a string"},
      {protect + R"("netbuf_interfaces":"tap0"})", "INVALID_ARGUMENT", "'netbuf_interfaces' must be a list of strings, not a string"},
      {protect + R"("netbuf_interfaces":[1]})", "INVALID_ARGUMENT", "'netbuf_interfaces' must be a list of strings; it holds an integer"},
      {protect + R"("netbuf_interfaces":["a/b"]})", "INVALID_ARGUMENT", "is not a network device name"},
      {protect + R"("netbuf_fallback":"yes"})", "INVALID_ARGUMENT", "'netbuf_fallback' must be true or false, not a string"},
      {protect + R"("netbuf_fail_open":0})", "INVALID_ARGUMENT", "'netbuf_fail_open' must be true or false"},
      {protect + R"("netbuf_queue_maxlen":"big"})", "INVALID_ARGUMENT", "'netbuf_queue_maxlen' must be an integer"},
      {protect + R"("netbuf_queue_maxlen":0})", "INVALID_ARGUMENT", "'netbuf_queue_maxlen' is 0, out of range (expected 1..4294967295)"},
      {protect + R"("netbuf_queue_maxlen":99999999999})", "INVALID_ARGUMENT", "'netbuf_queue_maxlen' is 99999999999, out of range"},
      {protect + R"("compress":false})", "INVALID_ARGUMENT", "'compress' must be a string"},
      {protect + R"("disks":["a"]})", "INVALID_ARGUMENT", "'disks' must be a string"},
      {protect + R"("async":"yes"})", "INVALID_ARGUMENT", "'async' must be true or false"},
      {protect + R"("async":true,"retry_ms":"soon"})", "INVALID_ARGUMENT", "'retry_ms' must be an integer"},
      {R"({"command":"unprotect","domain":"web9","async":1})", "INVALID_ARGUMENT", "'async' must be true or false"},
      {R"({"command":"unprotect","domain":"web9","domain_stopped":"x"})", "INVALID_ARGUMENT", "'domain_stopped'"},
      {R"({"command":"unprotect","domain":null})", "INVALID_ARGUMENT", "missing domain name"},
      {R"({"command":"status","domain":5})", "INVALID_ARGUMENT", "field 'domain' must be a string"},
      {R"({"command":"status","domain":"../x"})", "INVALID_ARGUMENT", "invalid domain name"},
      {R"({"command":"failover","domain":{}})", "INVALID_ARGUMENT", "field 'domain' must be a string"},
      {R"({"command":"tune","domain":[]})", "INVALID_ARGUMENT", "field 'domain' must be a string"},
      {R"({"command":"tune","domain":"web9","interval_ms":"fast"})", "NOT_FOUND", "unknown domain web9"},
  };
  RawClient c(sock());
  ASSERT_TRUE(c.connected());
  for (const Case& k : cases) {
    SCOPED_TRACE(k.line.substr(0, 120));
    json r = c.Call(k.line);  // one connection carries them all: none ends it
    ASSERT_TRUE(r.is_object()) << "no reply: the daemon hung up or died";
    ExpectError(r, k.code, k.text);
  }
  // The same through Handle, which tests and the socket share.
  ExpectError(Call(json::array({1, 2})), "INVALID_ARGUMENT", "not a JSON object");
  ExpectError(Call(json(5)), "INVALID_ARGUMENT", "not a JSON object");
  ExpectError(Call({{"command", "tune"}, {"domain", "web9"}, {"interval_ms", {{"x", 1}}}}), "NOT_FOUND", "web9");
  // A long but legal request is served.
  json big = c.Call(R"({"command":"ping","pad":")" + std::string(900 * 1024, 'x') + "\"}");
  EXPECT_TRUE(IsOk(big)) << big.dump().substr(0, 200);
  EXPECT_TRUE(IsOk(c.Call(R"({"command":"ping"})")));
  ExpectServing();
}

TEST_F(DaemonSocketTest, AnOversizedRequestLineGetsAClearErrorAndTheDaemonKeepsServing) {
  RawClient c(sock());
  ASSERT_TRUE(c.connected());
  // 100 MB without a newline, written while the reply is read: the daemon
  // stops reading at its limit, answers, and drains the rest for a while.
  std::thread writer([&] { c.Send(std::string(100u << 20, 'x') + "\n"); });
  json r = c.ReadReply();
  writer.join();
  ASSERT_TRUE(r.is_object()) << "no reply";
  ExpectError(r, "RESOURCE_EXHAUSTED", "request line longer than 1048576 bytes");
  EXPECT_TRUE(c.ReadReply().is_null()) << "the connection ends after that";
  ExpectServing();
}

TEST_F(DaemonSocketTest, ConnectionsBeyondTheLimitAreRefusedUntilOneEnds) {
  std::vector<std::unique_ptr<RawClient>> held;
  for (int i = 0; i < Daemon::kMaxControlClients; i++) {
    held.push_back(std::make_unique<RawClient>(sock()));
    ASSERT_TRUE(IsOk(held.back()->Call(R"({"command":"ping"})"))) << "connection " << i;
  }
  RawClient extra(sock());
  ASSERT_TRUE(extra.connected());
  json r = extra.ReadReply();
  ASSERT_TRUE(r.is_object()) << "no reply";
  ExpectError(r, "RESOURCE_EXHAUSTED", "at most 16 control connections");
  EXPECT_TRUE(extra.ReadReply().is_null());
  // The held ones are still served; once one ends, a new one is too.
  EXPECT_TRUE(IsOk(held[3]->Call(R"({"command":"ping"})")));
  held.pop_back();
  json ok;
  for (int i = 0; i < 100; i++) {
    RawClient c(sock());
    ok = c.Call(R"({"command":"ping"})");
    if (IsOk(ok)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(IsOk(ok)) << ok.dump();
}

class DaemonIdleTest : public DaemonSocketTest {
 protected:
  DaemonIdleTest() { idle_timeout_ms_ = 300; }
};

TEST_F(DaemonIdleTest, AnIdleConnectionIsClosedAndFreesItsSlot) {
  std::vector<std::unique_ptr<RawClient>> idle;
  for (int i = 0; i < Daemon::kMaxControlClients; i++) {
    idle.push_back(std::make_unique<RawClient>(sock()));
    ASSERT_TRUE(idle.back()->connected());
  }
  idle[0]->Send(R"({"command":)");  // half a request, then silence
  // Each gets told why, and the connection ends.
  for (auto& c : idle) {
    json r = c->ReadReply();
    ASSERT_TRUE(r.is_object()) << "no reply";
    ExpectError(r, "DEADLINE_EXCEEDED", "no complete request within 300 ms");
    EXPECT_TRUE(c->ReadReply().is_null());
  }
  // The slots are free again.
  json ok;
  for (int i = 0; i < 100 && !IsOk(ok); i++) {
    RawClient c(sock());
    ok = c.Call(R"({"command":"ping"})");
    if (!IsOk(ok)) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(IsOk(ok)) << ok.dump();
}

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

// A QEMU 10.0 under TCG on a unix socket whose guest dirties 40 MiB/s, for
// one connection: greeting, qmp_capabilities, the estimate's commands.
class DirtyQemu {
 public:
  explicit DirtyQemu(std::string path) : path_(std::move(path)) {
    auto l = ListenUnix(path_, 0600);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    listen_ = std::move(l).value();
    thread_ = std::thread([this] { Serve(); });
  }
  ~DirtyQemu() {
    ::shutdown(listen_.get(), SHUT_RDWR);
    if (conn_ >= 0) ::shutdown(conn_, SHUT_RDWR);
    thread_.join();
  }
  int calcs() const { return calcs_; }

 private:
  void Send(int fd, const json& j) {
    std::string s = j.dump() + "\r\n";
    (void)WriteFull(fd, s.data(), s.size());
  }
  void Serve() {
    auto a = Accept(listen_.get());
    if (!a.ok()) return;
    Fd fd = std::move(a).value();
    conn_ = fd.get();
    Send(fd.get(), {{"QMP", {{"version", {{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 13}}}, {"package", ""}}},
                             {"capabilities", json::array()}}}});
    std::string buf;
    char chunk[4096];
    int64_t calc_ms = 0;
    for (;;) {
      size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        json cmd = json::parse(buf.substr(0, nl));
        buf.erase(0, nl + 1);
        const std::string name = cmd["execute"];
        json ret = json::object();
        if (name == "query-version") ret = {{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 13}}}};
        if (name == "query-kvm") ret = {{"enabled", false}, {"present", false}};
        if (name == "query-migrate") ret = json::object();
        if (name == "query-memory-size-summary") ret = {{"base-memory", 256 << 20}};
        if (name == "calc-dirty-rate") calc_ms = cmd["arguments"]["calc-time"].get<int64_t>(), calcs_++;
        if (name == "query-dirty-rate")
          ret = {{"status", "measured"}, {"dirty-rate", 40}, {"calc-time", calc_ms}, {"mode", "page-sampling"}};
        Send(fd.get(), {{"return", ret}, {"id", cmd["id"]}});
      }
      ssize_t n = ::read(fd.get(), chunk, sizeof chunk);
      if (n <= 0) return;
      buf.append(chunk, static_cast<size_t>(n));
    }
  }
  std::string path_;
  Fd listen_;
  std::atomic<int> conn_{-1};
  std::atomic<int> calcs_{0};
  std::thread thread_;
};

TEST_F(DaemonTest, EstimateMeasuresThroughTheQmpSocket) {
  DirtyQemu q(dir_ + "/q.sock");
  json r = Call({{"command", "estimate"}, {"domain", "web1"}, {"qmp", dir_ + "/q.sock"}, {"intervals_ms", {100, 10}}});
  ASSERT_TRUE(IsOk(r)) << r.dump();
  const json& res = r["result"];
  EXPECT_EQ(res["domain"], "web1");
  EXPECT_EQ(res["intervals_ms"], json({10, 100}));
  ASSERT_EQ(res["rows"].size(), 2u);
  EXPECT_EQ(res["rows"][0]["basis"], "lower-bound");
  EXPECT_EQ(res["rows"][1]["basis"], "measured");
  EXPECT_EQ(res["rows"][1]["dirty_pages"], 1024);  // 40 MiB/s over 100 ms
  EXPECT_EQ(res["protected"], false);
  EXPECT_GE(q.calcs(), 1);
}

TEST_F(DaemonTest, EstimateErrorsNameTheDomainAndTheFix) {
  ExpectError(Call({{"command", "estimate"}}), "INVALID_ARGUMENT", "missing domain");
  ExpectError(Call({{"command", "estimate"}, {"domain", "web1"}, {"intervals_ms", {0}}}), "INVALID_ARGUMENT",
              "domain web1: --intervals: interval 0 ms is out of range");
  ExpectError(Call({{"command", "estimate"}, {"domain", "web1"}, {"intervals_ms", json::array()}}), "INVALID_ARGUMENT",
              "at least one interval");
  ExpectError(Call({{"command", "estimate"}, {"domain", "web1"}, {"intervals_ms", {"10"}}}), "INVALID_ARGUMENT",
              "must be a list of integers");
  ExpectError(Call({{"command", "estimate"}, {"domain", "web1"}, {"intervals_ms", 10}}), "INVALID_ARGUMENT",
              "a list of integers");
  ExpectError(Call({{"command", "estimate"}, {"domain", "web1"}, {"qmp", "/q"}, {"libvirt_uri", "x"}}),
              "INVALID_ARGUMENT", "not both");
  ExpectError(Call({{"command", "estimate"}, {"domain", "web1"}, {"qmp", dir_ + "/nope.qmp"}}), "UNAVAILABLE",
              "domain web1: cannot reach QEMU's monitor at " + dir_ + "/nope.qmp");
  const std::string no_libvirt = "qemu:///system?socket=" + dir_ + "/no-libvirt-sock";
  json r = Call({{"command", "estimate"}, {"domain", "web9"}, {"libvirt_uri", no_libvirt}});
  ExpectError(r, "UNAVAILABLE", "unknown domain web9: it is not protected from this host");
  ExpectError(r, "UNAVAILABLE", "give --qmp PATH");
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
  o.arbiter = "none";
  o.state_dir = dir + "/state";
  o.control_socket = dir + "/control.sock";
  o.key_file = dir + "/key";
  Daemon d(o);
  Status s = d.Start();
  EXPECT_EQ(s.code(), Code::kPermissionDenied) << s.ToString();
  EXPECT_NE(s.message().find("chmod 600"), std::string::npos) << s.message();
  std::filesystem::remove_all(dir);
}

// A FIFO as the key file would block open(2) forever (SIGTERM is blocked by
// then): Start refuses it at once.
TEST(DaemonStart, RefusesAKeyFileThatIsNotARegularFile) {
  char tmpl[] = "/tmp/remus-daemon-test.XXXXXX";
  std::string dir = mkdtemp(tmpl);
  ASSERT_EQ(::mkfifo((dir + "/key").c_str(), 0600), 0);
  DaemonOptions o;
  o.arbiter = "none";
  o.state_dir = dir + "/state";
  o.control_socket = dir + "/control.sock";
  o.key_file = dir + "/key";
  Daemon d(o);
  Status s = d.Start();
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("is not a regular file"), std::string::npos) << s.message();
  o.key_file = dir;  // a directory
  Daemon d2(o);
  s = d2.Start();
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
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
  o.arbiter = "none";
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
