#include "common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>

#include "common/thread_annotations.h"

namespace remus {
namespace {
std::atomic<LogLevel> g_level{LogLevel::kInfo};
Mutex g_mu;  // one line at a time on stderr
}  // namespace

void SetLogLevel(LogLevel l) { g_level = l; }
LogLevel GetLogLevel() { return g_level; }

void LogLine(LogLevel l, std::string_view tag, std::string_view msg) {
  static constexpr char kLetters[] = {'D', 'I', 'W', 'E'};
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  MutexLock g(g_mu);
  std::fprintf(stderr, "%s.%03dZ %c %.*s: %.*s\n", ts, ms, kLetters[static_cast<int>(l)],
               static_cast<int>(tag.size()), tag.data(), static_cast<int>(msg.size()), msg.data());
  std::fflush(stderr);
}

}  // namespace remus
