// Shared by the libFuzzer targets in this directory: a check that aborts
// with a message (libFuzzer then saves the input as a crash), and the
// status codes a decoder may answer bad input with.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "common/status.h"

namespace remus::fuzz {

[[noreturn]] inline void Fail(const char* target, const char* what, const Status& s = OkStatus()) {
  std::fprintf(stderr, "%s: %s%s%s\n", target, what, s.ok() ? "" : ": ", s.ok() ? "" : s.ToString().c_str());
  std::abort();
}

inline void Check(bool ok, const char* target, const char* what) {
  if (!ok) Fail(target, what);
}

// Aborts unless s is an error with one of the codes.
inline void CheckCode(const Status& s, std::initializer_list<Code> codes, const char* target, const char* what) {
  if (s.ok()) Fail(target, what);
  for (Code c : codes)
    if (s.code() == c) return;
  Fail(target, what, s);
}

// With REMUS_FUZZ_DEBUG set in the environment, prints how an input ended
// (to check that seeds get as far as meant).
inline void Debug(const char* target, const char* what, const Status& s = OkStatus()) {
  static const bool on = std::getenv("REMUS_FUZZ_DEBUG") != nullptr;
  if (on) std::fprintf(stderr, "%s: %s: %s\n", target, what, s.ToString().c_str());
}

}  // namespace remus::fuzz
