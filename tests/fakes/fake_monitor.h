// FakeMonitor: a scripted QemuMonitor (replicator/qemu/qmp.h) for tests that
// need a QEMU to answer QMP commands without running one.
//
//   FakeMonitor m;
//   m.Answer("query-version", {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 22}}}});
//   m.Fail("migrate", FailedPrecondition("busy"));
//   m.Script("query-status", [&](const json& args) -> StatusOr<json> { return ...; });
//   FakeMonitor blocks("query-block", json::array({...}));  // one answer at construction
//   ... code under test calls m.Execute(...) ...
//   EXPECT_EQ(m.count("migrate"), 1);
//   m.Emit({{"event", "STOP"}});  // runs the installed event handler, on this thread
//   m.EmitOnEventThread(ev);      // ... on a thread of the monitor's own, as QMP's
//                                 // reader and libvirt's event thread do: a command
//                                 // issued from there is refused (see refused())
//
// A command with no answer, failure or script fails with Unimplemented
// ("no scripted answer for QMP command 'x'"), so an unexpected command shows
// up in the test's error; AnswerOthers(result) answers those instead. Every
// call, answered or not, is recorded in order.
//
// Thread-safety: all methods may be called from any thread; a script runs
// without the fake's lock held, so it may call back into the fake.
// Target: remus_test_fakes (tests/CMakeLists.txt).
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <thread>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "common/thread_annotations.h"
#include "replicator/qemu/qmp.h"

namespace remus {

class FakeMonitor : public QemuMonitor {
 public:
  using Json = nlohmann::json;
  using ScriptFn = std::function<StatusOr<Json>(const Json& args)>;
  struct Call {
    std::string command;
    Json args;
    int timeout_ms;
  };

  FakeMonitor() = default;
  // A monitor that answers `command` with `result`.
  FakeMonitor(const std::string& command, Json result) { Answer(command, std::move(result)); }

  // From now on `command` returns `result` (replacing any earlier script).
  void Answer(const std::string& command, Json result) {
    Script(command, [r = std::move(result)](const Json&) -> StatusOr<Json> { return r; });
  }
  // From now on `command` fails with `s`.
  void Fail(const std::string& command, Status s) {
    Script(command, [s = std::move(s)](const Json&) -> StatusOr<Json> { return s; });
  }
  // From now on every command without a script of its own returns `result`.
  void AnswerOthers(Json result) {
    MutexLock l(mu_);
    others_ = std::move(result);
  }
  // From now on `command` runs `fn` with the command's arguments.
  void Script(const std::string& command, ScriptFn fn) {
    MutexLock l(mu_);
    scripts_[command] = std::move(fn);
  }

  StatusOr<Json> Execute(const std::string& command, const Json& args = Json::object(),
                         int timeout_ms = 10000) override {
    ScriptFn fn;
    {
      MutexLock l(mu_);
      if (std::this_thread::get_id() == event_thread_) {
        // QMP's reader thread (and libvirt's event thread) cannot wait for
        // an answer it would have to read itself.
        refused_.push_back(command);
        return FailedPrecondition("QMP command '" + command + "' issued from the monitor's event thread");
      }
      calls_.push_back({command, args, timeout_ms});
      auto it = scripts_.find(command);
      if (it != scripts_.end()) fn = it->second;
      else if (others_) return *others_;
    }
    if (!fn) return Unimplemented("no scripted answer for QMP command '" + command + "'");
    return fn(args);
  }

  void SetEventHandler(std::function<void(const Json& event)> handler) override {
    MutexLock l(mu_);
    handler_ = std::move(handler);
  }
  // Delivers `event` to the installed handler on the caller's thread; false
  // when none is installed.
  bool Emit(const Json& event) {
    std::function<void(const Json&)> h;
    {
      MutexLock l(mu_);
      h = handler_;
    }
    if (!h) return false;
    h(event);
    return true;
  }

  // Delivers `event` to the installed handler on a thread of the monitor's
  // own, and waits for the handler to return. Commands the handler issues
  // from that thread are refused, as QMP's reader thread refuses them.
  bool EmitOnEventThread(const Json& event) {
    bool delivered = false;
    std::thread t([&] {
      {
        MutexLock l(mu_);
        event_thread_ = std::this_thread::get_id();
      }
      delivered = Emit(event);
      MutexLock l(mu_);
      event_thread_ = std::thread::id();
    });
    t.join();
    return delivered;
  }
  // Commands refused because they came from the event thread.
  std::vector<std::string> refused() const {
    MutexLock l(mu_);
    return refused_;
  }

  // Every Execute so far, oldest first.
  std::vector<Call> calls() const {
    MutexLock l(mu_);
    return calls_;
  }
  // How many times `command` was executed.
  int count(const std::string& command) const {
    MutexLock l(mu_);
    int n = 0;
    for (const Call& c : calls_) n += c.command == command;
    return n;
  }

 private:
  mutable Mutex mu_;
  std::map<std::string, ScriptFn> scripts_ GUARDED_BY(mu_);
  std::vector<Call> calls_ GUARDED_BY(mu_);
  std::function<void(const Json&)> handler_ GUARDED_BY(mu_);
  std::optional<Json> others_ GUARDED_BY(mu_);
  std::thread::id event_thread_ GUARDED_BY(mu_);
  std::vector<std::string> refused_ GUARDED_BY(mu_);
};

}  // namespace remus
