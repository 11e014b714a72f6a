#include "replicator/qemu/qmp.h"

#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/thread_annotations.h"
#include "tests/fakes/fake_monitor.h"

extern char** environ;

namespace remus {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Contains;

std::string MakeTempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "qmp_test.XXXXXX").string();
  char* d = ::mkdtemp(tmpl.data());
  EXPECT_NE(d, nullptr);
  return tmpl;
}

// A QMP server in a thread of the test: greeting, capabilities negotiation,
// then each command is handed to a responder that may answer, emit events,
// hold the answer back, or hang up.
class FakeQmpServer {
 public:
  class Conn {
   public:
    explicit Conn(int fd) : fd_(fd) {}
    void Send(const json& j) {
      std::string s = j.dump() + "\r\n";  // QEMU ends lines with CRLF
      ASSERT_TRUE(WriteFull(fd_, s.data(), s.size()).ok());
    }
    void Return(const json& cmd, const json& value) { Send({{"return", value}, {"id", cmd["id"]}}); }
    void Error(const json& cmd, const std::string& cls, const std::string& desc) {
      Send({{"error", {{"class", cls}, {"desc", desc}}}, {"id", cmd["id"]}});
    }
    void HangUp() { ::shutdown(fd_, SHUT_RDWR); }

   private:
    int fd_;
  };
  // Returns false to stop serving (connection closed).
  using Responder = std::function<void(const json& cmd, Conn& conn)>;

  explicit FakeQmpServer(Responder r) : dir_(MakeTempDir()), path_(dir_ + "/qmp.sock"), responder_(std::move(r)) {
    auto l = ListenUnix(path_, 0600);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    listen_ = std::move(l).value();
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeQmpServer() {
    ::shutdown(listen_.get(), SHUT_RDWR);
    if (conn_fd_ >= 0) ::shutdown(conn_fd_, SHUT_RDWR);
    thread_.join();
    std::filesystem::remove_all(dir_);
  }
  const std::string& path() const { return path_; }
  std::vector<std::string> commands() {
    MutexLock l(mu_);
    return commands_;
  }

 private:
  void Serve() {
    auto a = Accept(listen_.get());
    if (!a.ok()) return;
    Fd fd = std::move(a).value();
    conn_fd_ = fd.get();
    Conn conn(fd.get());
    conn.Send({{"QMP",
                {{"version", {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 22}}},
                              {"package", "Debian 1:7.2+dfsg-7+deb12u18"}}},
                 {"capabilities", json::array({"oob"})}}}});
    FdSource src(fd.get());
    std::string buf;
    char chunk[4096];
    for (;;) {
      size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        json cmd = json::parse(buf.substr(0, nl));
        buf.erase(0, nl + 1);
        std::string name = cmd["execute"];
        {
          MutexLock l(mu_);
          commands_.push_back(name);
        }
        if (name == "qmp_capabilities") {
          conn.Return(cmd, json::object());
        } else {
          responder_(cmd, conn);
        }
      }
      auto n = src.ReadSome(chunk, sizeof chunk);
      if (!n.ok() || *n == 0) return;
      buf.append(chunk, *n);
    }
  }

  std::string dir_;
  std::string path_;
  Responder responder_;
  Fd listen_;
  std::atomic<int> conn_fd_{-1};
  std::thread thread_;
  Mutex mu_;
  std::vector<std::string> commands_ GUARDED_BY(mu_);
};

TEST(QmpClientTest, ConnectReadsGreetingAndNegotiates) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) { c.Return(cmd, json::object()); });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ((*c)->version(), "7.2.22");
  EXPECT_EQ((*c)->package(), "Debian 1:7.2+dfsg-7+deb12u18");
  EXPECT_TRUE((*c)->connected());
  EXPECT_EQ(server.commands(), std::vector<std::string>{"qmp_capabilities"});
}

TEST(QmpClientTest, CommandRoundTripWithArguments) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) {
    if (cmd["execute"] == "query-status") {
      EXPECT_FALSE(cmd.contains("arguments"));
      c.Return(cmd, {{"status", "prelaunch"}, {"running", false}});
    } else if (cmd["execute"] == "migrate-set-parameters") {
      c.Return(cmd, {{"echo", cmd["arguments"]}});
    } else if (cmd["execute"] == "human-monitor-command") {
      c.Return(cmd, "0000000000001000: 0x2a\r\n" + cmd["arguments"]["command-line"].get<std::string>());
    }
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto st = (*c)->Execute("query-status");
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ((*st)["status"], "prelaunch");
  EXPECT_EQ((*st)["running"], false);

  json args = {{"x-checkpoint-delay", 100}};
  auto r = (*c)->Execute("migrate-set-parameters", args);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["echo"], args);

  auto h = (*c)->HumanMonitorCommand("xp /1wx 0x1000");
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_THAT(*h, HasSubstr("0x2a"));
  EXPECT_THAT(*h, HasSubstr("xp /1wx 0x1000"));
}

TEST(QmpClientTest, QmpErrorsMapToStatusNamingTheCommand) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) {
    if (cmd["execute"] == "migrate")
      c.Error(cmd, "GenericError", "There's a migration process in progress");
    else
      c.Error(cmd, "CommandNotFound", "The command " + cmd["execute"].get<std::string>() + " has not been found");
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();

  auto r = (*c)->Execute("migrate", {{"uri", "unix:/x"}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("'migrate'"));
  EXPECT_THAT(r.status().message(), HasSubstr("GenericError"));
  EXPECT_THAT(r.status().message(), HasSubstr("There's a migration process in progress"));

  auto r2 = (*c)->Execute("x-nonsense");
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r2.status().message(), HasSubstr("'x-nonsense'"));
  EXPECT_THAT(r2.status().message(), HasSubstr("CommandNotFound"));
}

TEST(QmpClientTest, EventsAreDeliveredWithTimestamps) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) {
    // The event arrives before the answer, as QEMU's STOP precedes "stop"'s return.
    c.Send({{"event", "STOP"}, {"timestamp", {{"seconds", 1763887201}, {"microseconds", 123456}}}});
    c.Send({{"event", "MIGRATION"},
            {"data", {{"status", "colo"}}},
            {"timestamp", {{"seconds", 1763887202}, {"microseconds", 7}}}});
    c.Return(cmd, json::object());
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  Mutex mu;
  std::vector<json> events;
  (*c)->SetEventHandler([&](const json& e) {
    MutexLock l(mu);
    events.push_back(e);
  });
  ASSERT_TRUE((*c)->Execute("stop").ok());
  MutexLock l(mu);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0]["event"], "STOP");
  EXPECT_EQ(events[0]["timestamp"]["seconds"], 1763887201);
  EXPECT_EQ(events[0]["timestamp"]["microseconds"], 123456);
  EXPECT_EQ(events[1]["event"], "MIGRATION");
  EXPECT_EQ(events[1]["data"]["status"], "colo");
  EXPECT_EQ(events[1]["timestamp"]["microseconds"], 7);
}

TEST(QmpClientTest, ExecuteFromEventHandlerIsRefusedNotDeadlocked) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) {
    c.Send({{"event", "RESUME"}, {"timestamp", {{"seconds", 1}, {"microseconds", 2}}}});
    c.Return(cmd, json::object());
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  QmpClient* client = c->get();
  Status inner;
  client->SetEventHandler([&](const json&) { inner = client->Execute("query-status").status(); });
  ASSERT_TRUE(client->Execute("cont").ok());
  EXPECT_EQ(inner.code(), Code::kFailedPrecondition);
  EXPECT_THAT(inner.message(), HasSubstr("reader thread"));
}

TEST(QmpClientTest, ConcurrentExecutesGetTheirOwnAnswers) {
  // Hold the answers until all four commands are in, then answer in reverse
  // order, so only id matching can pair them up.
  std::vector<json> held;
  FakeQmpServer server([&held](const json& cmd, FakeQmpServer::Conn& c) {
    held.push_back(cmd);
    if (held.size() < 4) return;
    for (auto it = held.rbegin(); it != held.rend(); ++it)
      c.Return(*it, {{"n", (*it)["arguments"]["n"]}});
    held.clear();
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();

  std::vector<std::thread> threads;
  std::vector<StatusOr<json>> results(4, Internal("unset"));
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { results[i] = (*c)->Execute("echo", {{"n", i}}, 5000); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(results[i].ok()) << i << ": " << results[i].status().ToString();
    EXPECT_EQ((*results[i])["n"], i);
  }
}

TEST(QmpClientTest, TimeoutIsDeadlineExceededAndLateAnswerIsDropped) {
  std::vector<json> held;
  FakeQmpServer server([&held](const json& cmd, FakeQmpServer::Conn& c) {
    if (cmd["execute"] == "slow") {
      held.push_back(cmd);  // answered only when the next command comes
      return;
    }
    for (const json& h : held) c.Return(h, "late");
    held.clear();
    c.Return(cmd, "fast");
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto t0 = std::chrono::steady_clock::now();
  auto r = (*c)->Execute("slow", json::object(), 100);
  auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDeadlineExceeded);
  EXPECT_THAT(r.status().message(), HasSubstr("'slow'"));
  EXPECT_GE(took, std::chrono::milliseconds(100));
  EXPECT_LT(took, std::chrono::seconds(5));

  auto f = (*c)->Execute("fast");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(*f, "fast");
}

TEST(QmpClientTest, DisconnectFailsPendingAndLaterCommandsAndFiresHandlerOnce) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) {
    if (cmd["execute"] == "quit") c.HangUp();  // QEMU died mid-command
  });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  std::promise<void> fired;
  std::atomic<int> count{0};
  (*c)->SetDisconnectHandler([&] {
    if (count.fetch_add(1) == 0) fired.set_value();
  });

  auto r = (*c)->Execute("quit", json::object(), 5000);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_EQ(r.status().message(), "QEMU monitor at " + server.path() + " closed");
  ASSERT_EQ(fired.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_FALSE((*c)->connected());

  auto r2 = (*c)->Execute("query-status");
  EXPECT_EQ(r2.status().code(), Code::kUnavailable);
  EXPECT_THAT(r2.status().message(), HasSubstr("closed"));
  EXPECT_EQ(count.load(), 1);
}

TEST(QmpClientTest, PeerPidAndArgvComeFromTheSocketPeer) {
  FakeQmpServer server([](const json& cmd, FakeQmpServer::Conn& c) { c.Return(cmd, json::object()); });
  auto c = QmpClient::Connect(server.path());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ((*c)->pid(), ::getpid());
  auto argv = (*c)->QemuArgv();
  ASSERT_TRUE(argv.ok()) << argv.status().ToString();
  ASSERT_FALSE(argv->empty());
  auto self = ReadFileToString("/proc/self/cmdline");
  ASSERT_TRUE(self.ok());
  EXPECT_EQ((*argv)[0], std::string(self->c_str()));  // up to the first NUL: our argv[0]
}

TEST(QmpClientTest, ConnectToMissingSocketIsUnavailable) {
  auto c = QmpClient::Connect("/nonexistent/qmp.sock", 200);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kUnavailable);
  EXPECT_THAT(c.status().message(), HasSubstr("/nonexistent/qmp.sock"));
}

// ---- ProbeColo + support table ---------------------------------------------

TEST(ProbeColoTest, ReadsVersionCapabilitiesAndAccelerator) {
  FakeMonitor m;
  json version = {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 22}}},
                  {"package", "Debian 1:7.2+dfsg-7+deb12u18 + remus colo patches"}};
  m.Answer("query-version", version);
  m.Answer("query-migrate-capabilities",
           json::array({{{"capability", "xbzrle"}, {"state", false}}, {{"capability", "x-colo"}, {"state", false}}}));
  m.Answer("query-kvm", {{"enabled", true}, {"present", true}});
  auto p = ProbeColo(m);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->version, "7.2.22");
  EXPECT_EQ(p->major, 7);
  EXPECT_EQ(p->minor, 2);
  EXPECT_EQ(p->micro, 22);
  EXPECT_TRUE(p->has_x_colo);
  EXPECT_EQ(p->accelerator, "kvm");
  EXPECT_TRUE(p->patched_tcg_fix);

  m.Answer("query-migrate-capabilities", json::array({{{"capability", "xbzrle"}, {"state", false}}}));
  m.Answer("query-kvm", {{"enabled", false}, {"present", true}});
  version["package"] = "Debian 1:7.2+dfsg-7+deb12u18";
  m.Answer("query-version", version);
  p = ProbeColo(m);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_FALSE(p->has_x_colo);
  EXPECT_EQ(p->accelerator, "tcg");
  EXPECT_FALSE(p->patched_tcg_fix);
}

ColoProbe Probe(int major, int minor, int micro, const std::string& accel, bool patched = false,
                bool x_colo = true) {
  ColoProbe p;
  p.major = major;
  p.minor = minor;
  p.micro = micro;
  p.version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(micro);
  p.package = patched ? std::string("Debian 1:7.2+dfsg-7+deb12u18 + remus colo patches") : "Debian";
  p.patched_tcg_fix = patched;
  p.accelerator = accel;
  p.has_x_colo = x_colo;
  return p;
}

TEST(CheckColoSupportedTest, MissingXColoIsRefused) {
  Status s = CheckColoSupported(Probe(7, 2, 22, "kvm", false, /*x_colo=*/false), "web1");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "domain web1: QEMU 7.2.22 has no COLO support (migration capability x-colo missing; a build "
            "needs --enable-replication); use QEMU 7.2 or 10.0.7+ built with it");
}

TEST(CheckColoSupportedTest, StockUnderTcgIsRefused) {
  for (ColoProbe p : {Probe(7, 2, 22, "tcg"), Probe(10, 0, 13, "tcg"), Probe(8, 2, 2, "tcg"), Probe(10, 2, 0, "tcg")}) {
    Status s = CheckColoSupported(p, "web1");
    EXPECT_EQ(s.code(), Code::kFailedPrecondition) << p.version;
    EXPECT_EQ(s.message(), "domain web1: QEMU " + p.version +
                               " under TCG deadlocks after the first COLO checkpoint (BQL not held "
                               "around qemu_savevm_live_state); run the guest with KVM, or use the "
                               "patched QEMU from scripts/build-qemu.sh");
  }
}

TEST(CheckColoSupportedTest, KvmOrPatchedTcgIsSupported) {
  for (auto [major, minor, micro] : {std::tuple{7, 2, 22}, {7, 2, 0}, {10, 0, 13}, {10, 0, 7}, {10, 1, 3}}) {
    EXPECT_TRUE(CheckColoSupported(Probe(major, minor, micro, "kvm"), "web1").ok());
    ColoProbe patched = Probe(major, minor, micro, "tcg", /*patched=*/true);
    EXPECT_TRUE(CheckColoSupported(patched, "web1").ok()) << patched.version;
    EXPECT_EQ(ColoWarning(patched), "");
    EXPECT_EQ(ColoWarning(Probe(major, minor, micro, "kvm", /*patched=*/true)), "");
  }
}

TEST(CheckColoSupportedTest, StockWithKvmIsWarnedAboutTheTimerRace) {
  EXPECT_EQ(ColoWarning(Probe(7, 2, 22, "kvm")),
            "QEMU 7.2.22 without remus's patches can abort when a protection ends while its checkpoint "
            "timer fires (the timer is freed without the BQL; scripts/qemu-patches*/ carry the fix)");
  EXPECT_EQ(ColoWarning(Probe(10, 0, 13, "kvm")),
            "QEMU 10.0.13 without remus's patches can abort when a protection ends while its checkpoint "
            "timer fires (the timer is freed without the BQL; scripts/qemu-patches*/ carry the fix)");
  // Same code, not run here: said so.
  EXPECT_EQ(ColoWarning(Probe(8, 2, 2, "kvm")),
            "QEMU 8.2.2 without remus's patches can abort when a protection ends while its checkpoint "
            "timer fires (the timer is freed without the BQL; scripts/qemu-patches*/ carry the fix); "
            "QEMU 8.2.2 is also untested with remus, and COLO entry is verified after the initial copy");
}

TEST(CheckColoSupportedTest, ReleasesThatNeverEnterColoAreRefusedNamingTheFix) {
  for (auto [minor, micro] : {std::pair{0, 0}, {0, 6}, {1, 0}, {1, 2}}) {
    for (const char* accel : {"kvm", "tcg"}) {
      for (bool patched : {false, true}) {
        ColoProbe p = Probe(10, minor, micro, accel, patched);
        Status s = CheckColoSupported(p, "db");
        EXPECT_EQ(s.code(), Code::kFailedPrecondition) << p.version;
        EXPECT_EQ(s.message(), "domain db: QEMU " + p.version +
                                   " never enters COLO (its migration completes instead); the fix "
                                   "(upstream 0b5bf4ea76) is in QEMU 10.0.7, 10.1.3 and 10.2.0, so "
                                   "upgrade QEMU (Debian 13's 1:10.0.13 has it)");
      }
    }
  }
  EXPECT_TRUE(CheckColoSupported(Probe(10, 0, 7, "kvm"), "db").ok());
  EXPECT_TRUE(CheckColoSupported(Probe(10, 1, 3, "kvm"), "db").ok());
}

TEST(CheckColoSupportedTest, OtherVersionsAreAllowedButUntested) {
  for (ColoProbe p : {Probe(11, 0, 0, "tcg"), Probe(11, 0, 0, "kvm"), Probe(7, 1, 0, "kvm"), Probe(6, 2, 0, "tcg")}) {
    EXPECT_TRUE(CheckColoSupported(p, "web1").ok()) << p.version;
    EXPECT_EQ(ColoWarning(p), "QEMU " + p.version + " is untested with remus; COLO entry is verified after the initial copy");
  }
}

// ---- Against the real QEMU ---------------------------------------------------

constexpr char kQemu[] = "/usr/bin/qemu-system-x86_64";

// ---- the guest's NICs (netbuf) ------------------------------------------------

// Captured from QEMU 7.2 with a tap and a user-mode NIC.
constexpr char kInfoNetwork[] =
    "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
    " \\ n0: index=0,type=tap,ifname=tapq,script=no,downscript=no\r\n"
    "e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57\r\n"
    " \\ n1: index=0,type=user,net=10.0.2.0,restrict=off\r\n";

TEST(GuestNicsTest, ParsesBackendsOfInfoNetwork) {
  auto nics = ParseInfoNetwork(kInfoNetwork);
  ASSERT_EQ(nics.size(), 2u);
  EXPECT_EQ(nics[0].netdev, "n0");
  EXPECT_EQ(nics[0].type, "tap");
  EXPECT_EQ(nics[0].ifname, "tapq");
  EXPECT_EQ(nics[1].netdev, "n1");
  EXPECT_EQ(nics[1].type, "user");
  EXPECT_TRUE(ParseInfoNetwork("").empty());
  EXPECT_TRUE(ParseInfoNetwork("garbage\n \\ nocolon\n").empty());
}

TEST(GuestNicsTest, TapsAreListedAndUserNetworkingIsRefused) {
  FakeMonitor m;
  m.Answer("human-monitor-command", std::string(
      "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
      " \\ n0: index=0,type=tap,ifname=tap0,script=no,downscript=no\r\n"
      "virtio-net-pci.1: index=1,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:58\r\n"
      " \\ n2: index=0,type=tap,ifname=tap1,script=no,downscript=no\r\n"));
  auto taps = GuestTapDevices(m, -1, "vm1");
  ASSERT_TRUE(taps.ok()) << taps.status().ToString();
  EXPECT_EQ(*taps, (std::vector<std::string>{"tap0", "tap1"}));
  m.Answer("human-monitor-command", std::string(kInfoNetwork));
  auto refused = GuestTapDevices(m, -1, "vm1");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("n1 is user networking"));
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("--netbuf none"));
  m.Answer("human-monitor-command", std::string(""));  // no NICs: nothing to hold
  auto none = GuestTapDevices(m, -1, "vm1");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(RealQemuTest, ProbeRefusesStock72UnderTcgAndQuitClosesTheMonitor) {
  if (::access(kQemu, X_OK) != 0) GTEST_SKIP() << kQemu << " is not installed (apt-get install qemu-system-x86)";
  std::string dir = MakeTempDir();
  std::string sock = dir + "/q.sock";
  std::vector<std::string> args = {kQemu, "-machine", "pc", "-accel", "tcg", "-m", "32",
                                   "-nodefaults", "-nographic", "-vga", "none", "-S",
                                   "-qmp", "unix:" + sock + ",server=on,wait=off"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  ASSERT_EQ(::posix_spawn(&pid, kQemu, nullptr, nullptr, argv.data(), environ), 0);
  struct Reaper {
    pid_t pid;
    std::string dir;
    ~Reaper() {
      if (::waitpid(pid, nullptr, WNOHANG) == 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
      std::filesystem::remove_all(dir);
    }
  } reaper{pid, dir};

  StatusOr<std::unique_ptr<QmpClient>> c = Unavailable("not tried");
  for (int i = 0; i < 200 && !c.ok(); ++i) {
    c = QmpClient::Connect(sock, 5000);
    if (!c.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  QmpClient& q = **c;
  EXPECT_EQ(q.pid(), pid);

  auto st = q.Execute("query-status");
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ((*st)["status"], "prelaunch");
  EXPECT_EQ((*st)["running"], false);

  auto p = ProbeColo(q);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->major, 7);
  EXPECT_EQ(p->minor, 2);
  EXPECT_THAT(p->version, ::testing::StartsWith("7.2."));
  EXPECT_EQ(p->version, q.version());
  EXPECT_EQ(p->accelerator, "tcg");
  EXPECT_TRUE(p->has_x_colo);
  EXPECT_FALSE(p->patched_tcg_fix) << p->package;
  Status s = CheckColoSupported(*p, "test-vm");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("domain test-vm: QEMU " + p->version + " under TCG deadlocks"));

  auto argv_read = q.QemuArgv();
  ASSERT_TRUE(argv_read.ok()) << argv_read.status().ToString();
  EXPECT_THAT(*argv_read, Contains("-accel"));
  EXPECT_EQ(*argv_read, args);

  auto bad = q.Execute("no-such-command");
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("CommandNotFound"));

  std::promise<void> gone;
  q.SetDisconnectHandler([&] { gone.set_value(); });
  auto quit = q.Execute("quit");
  ASSERT_TRUE(quit.ok()) << quit.status().ToString();
  ASSERT_EQ(gone.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  auto after = q.Execute("query-status");
  EXPECT_EQ(after.status().code(), Code::kUnavailable);
  EXPECT_EQ(after.status().message(), "QEMU monitor at " + sock + " closed");
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  EXPECT_TRUE(WIFEXITED(wstatus)) << wstatus;
}

}  // namespace
}  // namespace remus
