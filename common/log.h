// Minimal leveled logging to stderr: one line per event, prefixed with a
// wall-clock timestamp and a component tag, e.g.
//   2026-11-23T08:40:01.123Z I colo[web1]: epoch 42 staged 812 pages
// Protocol state changes are logged at info, like QEMU's trace-events.
//
// Thread-safety: lines from concurrent threads never interleave.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace remus {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

void SetLogLevel(LogLevel l);
LogLevel GetLogLevel();
void LogLine(LogLevel l, std::string_view tag, std::string_view msg);

namespace log_internal {
class Line {
 public:
  Line(LogLevel l, std::string_view tag) : level_(l), tag_(tag) {}
  ~Line() { LogLine(level_, tag_, os_.str()); }
  template <typename T>
  Line& operator<<(const T& v) {
    os_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  std::string tag_;
  std::ostringstream os_;
};
// Lets the macro below be one expression, so `if (x) LOG_INFO(t) << y; else`
// binds the way it reads (glog's LogMessageVoidify).
struct Voidify {
  void operator&(const Line&) {}
};
}  // namespace log_internal

}  // namespace remus

#define REMUS_LOG(level, tag)                                 \
  (::remus::LogLevel::level < ::remus::GetLogLevel())         \
      ? (void)0                                               \
      : ::remus::log_internal::Voidify() & ::remus::log_internal::Line(::remus::LogLevel::level, tag)

#define LOG_DEBUG(tag) REMUS_LOG(kDebug, tag)
#define LOG_INFO(tag) REMUS_LOG(kInfo, tag)
#define LOG_WARN(tag) REMUS_LOG(kWarn, tag)
#define LOG_ERROR(tag) REMUS_LOG(kError, tag)
