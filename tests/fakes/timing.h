// Scheduling slack for the few unit tests that check a real-time bound of the
// product (how long a guest may stay paused by us): the bound under test plus
// this much. The slack absorbs what the test machine adds, not the product:
// a thread woken a little late on 2 shared cores. Sanitized builds run every
// thread several times slower, so they get more. A real regression (waiting
// for a TCP timeout, or for a GOODBYE that cannot come) is seconds, far
// beyond either figure.
#pragma once

#include <chrono>

namespace remus::testing {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

inline constexpr std::chrono::milliseconds kSchedulingSlack{kSanitized ? 400 : 100};

}  // namespace remus::testing
