// The NBD server against real clients from Debian packages: QEMU's NBD
// client through qemu-img and qemu-io (qemu-utils) and through
// blockdev-mirror with copy-mode write-blocking in qemu-system-x86_64 (the
// way the primary uses it), and libnbd through nbdinfo and nbdcopy
// (libnbd-bin). A test whose tool is missing skips and names the package.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "diskmirror/nbd_server.h"
#include "tests/fakes/temp_dir.h"

namespace remus {
namespace {

constexpr uint64_t kSize = 4 << 20;

std::string TempDir() { return remus::testing::MakeTempDir("nbd-interop"); }

bool HaveTool(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/bin:/bin";
  size_t i = 0;
  while (i <= p.size()) {
    size_t j = p.find(':', i);
    if (j == std::string::npos) j = p.size();
    std::string cand = p.substr(i, j - i) + "/" + name;
    if (::access(cand.c_str(), X_OK) == 0) return true;
    i = j + 1;
  }
  return false;
}

struct ToolRun {
  int exit_code = -1;
  std::string output;
};

// Runs a shell command (with a timeout) and captures stdout and stderr.
ToolRun Sh(const std::string& cmd) {
  ToolRun r;
  std::string full = "timeout 30 " + cmd + " 2>&1";
  FILE* f = ::popen(full.c_str(), "r");
  if (f == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) r.output.append(buf, n);
  int st = ::pclose(f);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::string Quote(const std::string& s) { return "'" + s + "'"; }

std::vector<uint8_t> ReadFile(const std::string& path) {
  auto s = ReadFileToString(path);
  if (!s.ok()) return {};
  return {s->begin(), s->end()};
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& v) {
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600));
  ASSERT_TRUE(fd.valid());
  ASSERT_TRUE(WriteFull(fd.get(), v.data(), v.size()).ok());
}

class NbdInteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    image_ = dir_ + "/disk.img";
    WriteFile(image_, std::vector<uint8_t>(kSize, 0));
    auto sink = FileDiskSink::Open(image_);
    ASSERT_TRUE(sink.ok());
    sink_ = std::move(sink).value();
    NbdServerOptions o;
    o.unix_path = dir_ + "/nbd.sock";
    o.tcp = HostPort{"127.0.0.1", 0};
    auto s = NbdServer::Start({"vda", "test disk", kSize}, sink_.get(), o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
    uri_ = server_->UnixUri();
    default_uri_ = "nbd+unix:///?socket=" + server_->unix_path();
  }

  void Need(const std::string& tool, const std::string& package) {
    if (!HaveTool(tool)) GTEST_SKIP() << tool << " is not installed (Debian package " << package << ")";
  }

  std::vector<uint8_t> RandomBytes(size_t n, unsigned seed) {
    std::vector<uint8_t> v(n);
    std::mt19937 rng(seed);
    for (size_t i = 0; i < n; i += 4) {
      uint32_t x = rng();
      for (size_t k = 0; k < 4 && i + k < n; ++k) v[i + k] = static_cast<uint8_t>(x >> (8 * k));
    }
    // Some all-zero stretches, so clients use write-zeroes and holes.
    std::fill(v.begin() + 65536, v.begin() + 3 * 65536, 0);
    return v;
  }

  std::string dir_, image_, uri_, default_uri_;
  std::unique_ptr<FileDiskSink> sink_;
  std::unique_ptr<NbdServer> server_;
};

TEST_F(NbdInteropTest, QemuImgInfo) {
  Need("qemu-img", "qemu-utils");
  ToolRun r = Sh("qemu-img info --output=json " + Quote(default_uri_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"virtual-size\": " + std::to_string(kSize)), std::string::npos) << r.output;
  r = Sh("qemu-img info " + Quote(uri_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = Sh("qemu-img info " + Quote("nbd+unix:///nosuch?socket=" + server_->unix_path()));
  EXPECT_NE(r.exit_code, 0) << "an unknown export is refused: " << r.output;
}

TEST_F(NbdInteropTest, QemuIoWritesReadsZeroesDiscardsAndFlushes) {
  Need("qemu-io", "qemu-utils");
  ToolRun r = Sh("qemu-io -f raw " + Quote(default_uri_) +
             " -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k'"
             " -c 'write -P 0x11 64k 64k' -c 'write -z 64k 64k' -c 'read -P 0 64k 64k'"
             " -c 'write -f -P 0xcd 192k 4k' -c 'flush' -c 'read -P 0xcd 192k 4k'"
             " -c 'write -P 0x22 1M 64k' -c 'discard 1M 64k'"
             " -c 'write -P 0xef 4194303 1' -c 'read -P 0xef 4194303 1'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("verification failed"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("error"), std::string::npos) << r.output;
  auto f = ReadFile(image_);
  ASSERT_EQ(f.size(), kSize);
  for (size_t i = 0; i < 65536; ++i) ASSERT_EQ(f[i], 0xab) << i;
  for (size_t i = 65536; i < 131072; ++i) ASSERT_EQ(f[i], 0) << i;
  for (size_t i = 196608; i < 200704; ++i) ASSERT_EQ(f[i], 0xcd) << i;
  EXPECT_EQ(f[kSize - 1], 0xef);
  EXPECT_GT(server_->stats().requests.load(), 8u);
}

TEST_F(NbdInteropTest, QemuImgConvertIntoAndOutOfTheExport) {
  Need("qemu-img", "qemu-utils");
  auto src = RandomBytes(kSize, 1);
  WriteFile(dir_ + "/src.img", src);
  ToolRun r = Sh("qemu-img convert -n -f raw -O raw " + Quote(dir_ + "/src.img") + " " + Quote(uri_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadFile(image_) == src);
  r = Sh("qemu-img compare -f raw -F raw " + Quote(dir_ + "/src.img") + " " + Quote(uri_));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  r = Sh("qemu-img convert -f raw -O raw " + Quote(uri_) + " " + Quote(dir_ + "/out.img"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadFile(dir_ + "/out.img") == src);
}

TEST_F(NbdInteropTest, NbdinfoReportsTheExport) {
  Need("nbdinfo", "libnbd-bin");
  ToolRun r = Sh("nbdinfo --json " + Quote(default_uri_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"export-size\": " + std::to_string(kSize)), std::string::npos) << r.output;
  for (const char* cap : {"\"can_flush\": true", "\"can_fua\": true", "\"can_trim\": true", "\"can_zero\": true",
                          "\"is_read_only\": false"})
    EXPECT_NE(r.output.find(cap), std::string::npos) << cap << " in " << r.output;
  r = Sh("nbdinfo --list " + Quote(default_uri_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("vda"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("test disk"), std::string::npos) << r.output;
  r = Sh("nbdinfo --size " + Quote("nbd://127.0.0.1:" + std::to_string(server_->tcp_port()) + "/vda"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, std::to_string(kSize) + "\n");
}

TEST_F(NbdInteropTest, NbdcopyBothWays) {
  Need("nbdcopy", "libnbd-bin");
  auto src = RandomBytes(kSize, 2);
  WriteFile(dir_ + "/src.img", src);
  ToolRun r = Sh("nbdcopy --flush " + Quote(dir_ + "/src.img") + " " + Quote(uri_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadFile(image_) == src);
  WriteFile(dir_ + "/out.img", std::vector<uint8_t>(kSize, 0x5a));
  r = Sh("nbdcopy " + Quote(default_uri_) + " " + Quote(dir_ + "/out.img"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadFile(dir_ + "/out.img") == src);
}

// Just enough QMP for one test: one command at a time, events collected.
class MiniQmp {
 public:
  ~MiniQmp() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  Status Start(const std::string& socket) {
    std::vector<std::string> args = {"qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                                     "-qmp", "unix:" + socket + ",server=on,wait=off"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);  // qemu-io's chatter
    int rc = ::posix_spawnp(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return Unavailable("cannot start qemu-system-x86_64");
    for (int i = 0; i < 200; ++i) {
      auto fd = ConnectUnix(socket);
      if (fd.ok()) {
        fd_ = std::move(fd).value();
        ASSIGN_OR_RETURN(nlohmann::json greeting, ReadMessage());
        if (!greeting.contains("QMP")) return Internal("no QMP greeting: " + greeting.dump());
        return Execute("qmp_capabilities").status();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return Unavailable("QEMU's QMP socket did not appear");
  }

  StatusOr<nlohmann::json> Execute(const std::string& cmd, nlohmann::json args = nlohmann::json::object()) {
    std::string line = nlohmann::json{{"execute", cmd}, {"arguments", args}}.dump() + "\n";
    RETURN_IF_ERROR(WriteFull(fd_.get(), line.data(), line.size()));
    for (;;) {
      ASSIGN_OR_RETURN(nlohmann::json m, ReadMessage());
      if (m.contains("event")) {
        events_.push_back(m);
        continue;
      }
      if (m.contains("error")) return FailedPrecondition(cmd + ": " + m["error"].dump());
      return m["return"];
    }
  }

  // Waits for an event with this name (seen before or arriving).
  StatusOr<nlohmann::json> WaitEvent(const std::string& name) {
    for (;;) {
      for (auto it = events_.begin(); it != events_.end(); ++it) {
        if ((*it)["event"] == name) {
          nlohmann::json e = *it;
          events_.erase(it);
          return e;
        }
      }
      ASSIGN_OR_RETURN(nlohmann::json m, ReadMessage());
      if (m.contains("event")) events_.push_back(m);
    }
  }

  void Wait() {
    if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  StatusOr<nlohmann::json> ReadMessage() {
    for (;;) {
      auto nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded()) return Internal("bad QMP line: " + line);
        return j;
      }
      ASSIGN_OR_RETURN(bool readable, WaitReadable(fd_.get(), 20000));
      if (!readable) return DeadlineExceeded("QMP: nothing from QEMU for 20 s");
      char b[4096];
      ssize_t n = ::read(fd_.get(), b, sizeof b);
      if (n <= 0) return Unavailable("QMP connection closed");
      buf_.append(b, static_cast<size_t>(n));
    }
  }

  pid_t pid_ = -1;
  Fd fd_;
  std::string buf_;
  std::vector<nlohmann::json> events_;
};

// What the primary will do: QEMU adds an nbd node for our export and mirrors
// the disk into it with sync=full and copy-mode=write-blocking. The
// background copy must arrive whole, and a write through the mirror must be
// on our export by the time it completes.
TEST_F(NbdInteropTest, QemuBlockdevMirrorWriteBlocking) {
  Need("qemu-system-x86_64", "qemu-system-x86");
  auto src = RandomBytes(kSize, 3);
  const std::string src_path = dir_ + "/src.img";
  WriteFile(src_path, src);
  MiniQmp q;
  Status st = q.Start(dir_ + "/qmp.sock");
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto r = q.Execute("blockdev-add", {{"driver", "raw"}, {"node-name", "src0"},
                                      {"file", {{"driver", "file"}, {"filename", src_path}}}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  r = q.Execute("blockdev-add", {{"driver", "nbd"}, {"node-name", "tgt0"}, {"export", "vda"},
                                 {"server", {{"type", "unix"}, {"path", server_->unix_path()}}}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  r = q.Execute("blockdev-mirror", {{"job-id", "m0"}, {"device", "src0"}, {"target", "tgt0"}, {"sync", "full"},
                                    {"copy-mode", "write-blocking"}, {"filter-node-name", "mtop"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto ev = q.WaitEvent("BLOCK_JOB_READY");
  ASSERT_TRUE(ev.ok()) << ev.status().ToString();
  EXPECT_TRUE(ReadFile(image_) == src) << "the background copy is complete when the job is ready";

  // Writes through the mirror's filter node, as the guest's would go.
  for (const char* io : {"write -P 0x77 4096 65536", "write -z 131072 65536", "flush"}) {
    r = q.Execute("human-monitor-command", {{"command-line", std::string("qemu-io mtop \"") + io + "\""}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->get<std::string>(), "") << io;
  }
  auto img = ReadFile(image_);
  for (size_t i = 4096; i < 4096 + 65536; ++i) ASSERT_EQ(img[i], 0x77) << "write-blocking: written before it completed";
  for (size_t i = 131072; i < 196608; ++i) ASSERT_EQ(img[i], 0) << i;

  r = q.Execute("block-job-cancel", {{"device", "m0"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ev = q.WaitEvent("BLOCK_JOB_COMPLETED");
  ASSERT_TRUE(ev.ok()) << ev.status().ToString();
  (void)q.Execute("quit");
  q.Wait();
  EXPECT_TRUE(ReadFile(image_) == ReadFile(src_path));
}

}  // namespace
}  // namespace remus
