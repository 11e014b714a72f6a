// Test helpers for the backup: a scripted primary (frames over a wire::Link),
// and a fake process launcher whose "QEMU" answers QMP on the restore's
// socket and swallows the restore stream. Header-only, tests only.
#pragma once

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "replicator/link/wire.h"
#include "replicator/qemu/launcher.h"

namespace remus::testing {

// ---- the scripted primary ----

inline nlohmann::json TestConfig(const std::string& argv0 = "qemu-system-x86_64", int heartbeat_timeout_ms = 2000) {
  return {{"domain", "vm1"}, {"argv", {argv0, "-m", "1"}}, {"heartbeat_interval_ms", 50},
          {"heartbeat_timeout_ms", heartbeat_timeout_ms}};
}

inline std::string Blob() { return std::string("\x04") + "device-state" + std::string(1, '\0'); }

// One page record dirtying page `page` with byte `fill`.
inline std::string CheckpointPages(uint64_t page, char fill) {
  std::string pages;
  std::string data(4096, fill);
  wire::AppendPageRecord(&pages, 0, page * 4096, reinterpret_cast<const uint8_t*>(data.data()));
  return pages;
}

// Reads frames until one that is not a heartbeat.
inline StatusOr<wire::Frame> NextNonHeartbeat(wire::Link& l, int seconds = 5) {
  for (;;) {
    auto f = l.RecvUntil(std::chrono::steady_clock::now() + std::chrono::seconds(seconds));
    if (!f.ok() || f->type != wire::MsgType::kHeartbeat) return f;
  }
}

inline void ExpectAck(wire::Link& l, uint64_t epoch) {
  auto f = NextNonHeartbeat(l);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->type, wire::MsgType::kAck) << wire::MsgTypeName(f->type) << " " << f->payload;
  EXPECT_EQ(f->epoch, epoch);
}

// CONFIG, SYNC_BEGIN, 4 pages filled 'a'+i (page 3 zero), DEVICE, COMMIT(0).
inline void SendInitialSync(wire::Link& l, const nlohmann::json& config = TestConfig()) {
  ASSERT_TRUE(l.Send(wire::MsgType::kConfig, 0, config.dump()).ok());
  nlohmann::json begin = {{"total_bytes", 4 * 4096},
                          {"blocks", {{{"id", "pc.ram"}, {"used_length", 4 * 4096}}}},
                          {"configuration", "0700000003616263"}};
  ASSERT_TRUE(l.Send(wire::MsgType::kSyncBegin, 0, begin.dump()).ok());
  std::string pages;
  uint8_t page[4096];
  for (uint64_t i = 0; i < 4; i++) {
    memset(page, static_cast<int>('a' + i), sizeof page);
    wire::AppendPageRecord(&pages, 0, i * 4096, i == 3 ? nullptr : page);
  }
  ASSERT_TRUE(l.Send(wire::MsgType::kPages, 0, pages).ok());
  ASSERT_TRUE(l.Send(wire::MsgType::kDevice, 0, Blob()).ok());
  ASSERT_TRUE(l.Send(wire::MsgType::kCommit, 0, wire::EncodeCommit({4, pages.size(), Blob().size()})).ok());
}

inline void InitialSync(wire::Link& l, const nlohmann::json& config = TestConfig()) {
  SendInitialSync(l, config);
  ExpectAck(l, 0);
}

// PAGES, DEVICE and COMMIT of checkpoint `epoch` with honest counts.
inline void SendCheckpoint(wire::Link& l, uint64_t epoch, const std::string& pages) {
  ASSERT_TRUE(l.Send(wire::MsgType::kPages, epoch, pages).ok());
  ASSERT_TRUE(l.Send(wire::MsgType::kDevice, epoch, Blob()).ok());
  ASSERT_TRUE(l.Send(wire::MsgType::kCommit, epoch, wire::EncodeCommit({1, pages.size(), Blob().size()})).ok());
}

// ---- a fake QEMU ----

// Serves QMP on the socket named by -qmp unix:PATH, as far as promotion uses
// it: greeting, qmp_capabilities, migrate-incoming (then reads the restore
// stream from that socket to its end), query-status ("running" once the
// stream is in).
class FakeQemu {
 public:
  explicit FakeQemu(const std::string& qmp_path) {
    auto l = ListenUnix(qmp_path, 0600);
    if (!l.ok()) return;
    qmp_listen_ = std::move(l).value();
    thread_ = std::thread([this] { Run(); });
  }
  ~FakeQemu() { Stop(); }
  void Stop() {
    stop_ = true;
    for (int fd : {qmp_listen_.get(), in_listen_.load(), client_.load()})
      if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    if (in_thread_.joinable()) in_thread_.join();
  }
  size_t stream_bytes() const { return stream_bytes_.load(); }
  bool loaded() const { return loaded_.load(); }

 private:
  void Send(int fd, const nlohmann::json& j) { (void)WriteFull(fd, (j.dump() + "\n").data(), j.dump().size() + 1); }
  void Run() {
    auto c = Accept(qmp_listen_.get());
    if (!c.ok()) return;
    Fd client = std::move(c).value();
    client_ = client.get();
    Send(client.get(), {{"QMP", {{"version", {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 0}}}}},
                                 {"capabilities", nlohmann::json::array()}}}});
    std::string buf;
    char tmp[4096];
    while (!stop_) {
      ssize_t n = ::read(client.get(), tmp, sizeof tmp);
      if (n <= 0) break;
      buf.append(tmp, static_cast<size_t>(n));
      size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        auto cmd = nlohmann::json::parse(buf.substr(0, nl), nullptr, false);
        buf.erase(0, nl + 1);
        if (!cmd.is_object()) continue;
        std::string name = cmd.value("execute", "");
        nlohmann::json ret = nlohmann::json::object();
        if (name == "migrate-incoming") StartIncoming(cmd["arguments"].value("uri", "").substr(5));
        if (name == "query-status") ret = {{"status", loaded_ ? "running" : "inmigrate"}};
        nlohmann::json reply = {{"return", ret}};
        if (cmd.contains("id")) reply["id"] = cmd["id"];
        Send(client.get(), reply);
      }
    }
    client_ = -1;
  }
  void StartIncoming(const std::string& path) {
    auto l = ListenUnix(path, 0600);
    if (!l.ok()) return;
    in_listen_fd_ = std::move(l).value();
    in_listen_ = in_listen_fd_.get();
    in_thread_ = std::thread([this] {
      auto c = Accept(in_listen_fd_.get());
      if (!c.ok()) return;
      char tmp[65536];
      for (;;) {
        ssize_t n = ::read(c->get(), tmp, sizeof tmp);
        if (n <= 0) break;
        stream_bytes_ += static_cast<size_t>(n);
      }
      loaded_ = true;
    });
  }

  Fd qmp_listen_;
  Fd in_listen_fd_;
  std::atomic<int> in_listen_{-1};
  std::atomic<int> client_{-1};
  std::atomic<bool> stop_{false};
  std::atomic<bool> loaded_{false};
  std::atomic<size_t> stream_bytes_{0};
  std::thread thread_;
  std::thread in_thread_;
};

// A ProcessLauncher that starts no process. Mode per spawn: a FakeQemu that
// restores, a process that exits at once, or one that hangs without a monitor.
class FakeLauncher final : public ProcessLauncher {
 public:
  enum class Mode { kQemu, kExitAtStart, kHang };

  StatusOr<int> Spawn(const SpawnSpec& spec) override {
    if (on_spawn) on_spawn(spec);  // without the lock: it may ask the domain, which asks Running
    std::lock_guard<std::mutex> g(mu_);
    int pid = 900000 + static_cast<int>(specs_.size());
    specs_.push_back(spec);
    running_[pid] = mode != Mode::kExitAtStart;
    if (mode == Mode::kQemu) {
      std::string qmp;
      for (size_t i = 0; i + 1 < spec.argv.size(); i++)
        if (spec.argv[i] == "-qmp") qmp = spec.argv[i + 1].substr(5, spec.argv[i + 1].find(',') - 5);
      qemus_[pid] = std::make_unique<FakeQemu>(qmp);
    }
    return pid;
  }
  bool Running(int pid) override {
    std::lock_guard<std::mutex> g(mu_);
    return running_.count(pid) && running_[pid];
  }
  Status Kill(int pid, std::chrono::milliseconds) override {
    std::unique_ptr<FakeQemu> q;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!running_.count(pid)) return NotFound("unknown pid");
      running_[pid] = false;
      killed_.push_back(pid);
      if (qemus_.count(pid)) q = std::move(qemus_[pid]);
    }
    return OkStatus();  // q stops here
  }
  int spawns() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int>(specs_.size());
  }
  std::vector<SpawnSpec> specs() {
    std::lock_guard<std::mutex> g(mu_);
    return specs_;
  }
  std::vector<int> killed() {
    std::lock_guard<std::mutex> g(mu_);
    return killed_;
  }
  FakeQemu* qemu(int pid) {
    std::lock_guard<std::mutex> g(mu_);
    return qemus_.count(pid) ? qemus_[pid].get() : nullptr;
  }

  std::atomic<Mode> mode{Mode::kQemu};
  std::function<void(const SpawnSpec&)> on_spawn;  // set before use

 private:
  std::mutex mu_;
  std::vector<SpawnSpec> specs_;
  std::map<int, bool> running_;
  std::vector<int> killed_;
  std::map<int, std::unique_ptr<FakeQemu>> qemus_;
};

}  // namespace remus::testing
