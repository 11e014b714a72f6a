// Clang thread-safety annotations, and a mutex the analysis understands.
//
// libstdc++'s std::mutex carries no capability attributes, so clang cannot
// check code that locks it. remus::Mutex wraps it with them (after abseil's
// Mutex and the example in clang's ThreadSafetyAnalysis documentation), and
// CondVar waits on it. Fields name their lock with GUARDED_BY, functions that
// expect it held with REQUIRES; `scripts/check-thread-safety.sh` (run by
// scripts/test.sh) compiles every file with clang -Wthread-safety -Werror.
// Under GCC the macros expand to nothing.
//
// A lambda that touches guarded fields while its caller holds the lock says
// so: `[&]() REQUIRES(mu_) { return !queue_.empty(); }`.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#if defined(__clang__)
#define REMUS_TSA(x) __attribute__((x))
#else
#define REMUS_TSA(x)
#endif

#define CAPABILITY(x) REMUS_TSA(capability(x))
#define SCOPED_CAPABILITY REMUS_TSA(scoped_lockable)
#define GUARDED_BY(x) REMUS_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) REMUS_TSA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) REMUS_TSA(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) REMUS_TSA(acquired_after(__VA_ARGS__))
#define REQUIRES(...) REMUS_TSA(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) REMUS_TSA(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) REMUS_TSA(acquire_capability(__VA_ARGS__))
#define RELEASE(...) REMUS_TSA(release_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) REMUS_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) REMUS_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) REMUS_TSA(assert_capability(x))
#define RETURN_CAPABILITY(x) REMUS_TSA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS REMUS_TSA(no_thread_safety_analysis)

namespace remus {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  bool TryLock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  // Tells the analysis the lock is held where it cannot see it (a callback
  // invoked under the lock). Checks nothing at run time.
  void AssertHeld() const ASSERT_CAPABILITY(this) {}

  // BasicLockable, for std::scoped_lock of several at once.
  void lock() ACQUIRE() { Lock(); }
  void unlock() RELEASE() { Unlock(); }

 private:
  friend class CondVar;
  std::mutex mu_;
};

// Holds a Mutex for its scope; Unlock/Lock in between for a call that must
// run without it.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.Lock(); }
  ~MutexLock() RELEASE() {
    if (held_) mu_.Unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;
  void Unlock() RELEASE() {
    mu_.Unlock();
    held_ = false;
  }
  void Lock() ACQUIRE() {
    mu_.Lock();
    held_ = true;
  }

 private:
  Mutex& mu_;
  bool held_ = true;
};

// A condition variable for Mutex. Every wait REQUIRES the mutex and returns
// with it held again.
//
// The predicate overloads are NO_THREAD_SAFETY_ANALYSIS inside: clang cannot
// tell that their `mu` is the capability the caller's predicate names
// (`[&]() REQUIRES(mu_) {...}`). Callers are still checked: they must hold
// mu, and the predicate's body is checked against its REQUIRES.
class CondVar {
 public:
  void Wait(Mutex& mu) REQUIRES(mu) {
    std::unique_lock<std::mutex> l(mu.mu_, std::adopt_lock);
    cv_.wait(l);
    l.release();
  }
  template <class Pred>
  void Wait(Mutex& mu, Pred pred) REQUIRES(mu) NO_THREAD_SAFETY_ANALYSIS {
    while (!pred()) Wait(mu);
  }
  // False when the time ran out.
  template <class Rep, class Period>
  bool WaitFor(Mutex& mu, std::chrono::duration<Rep, Period> d) REQUIRES(mu) {
    std::unique_lock<std::mutex> l(mu.mu_, std::adopt_lock);
    bool woken = cv_.wait_for(l, d) == std::cv_status::no_timeout;
    l.release();
    return woken;
  }
  // pred() when it returned (false: the time ran out first).
  template <class Rep, class Period, class Pred>
  bool WaitFor(Mutex& mu, std::chrono::duration<Rep, Period> d, Pred pred) REQUIRES(mu) NO_THREAD_SAFETY_ANALYSIS {
    return WaitUntil(mu, std::chrono::steady_clock::now() + d, pred);
  }
  bool WaitUntil(Mutex& mu, std::chrono::steady_clock::time_point t) REQUIRES(mu) {
    std::unique_lock<std::mutex> l(mu.mu_, std::adopt_lock);
    bool woken = cv_.wait_until(l, t) == std::cv_status::no_timeout;
    l.release();
    return woken;
  }
  template <class Pred>
  bool WaitUntil(Mutex& mu, std::chrono::steady_clock::time_point t, Pred pred) REQUIRES(mu) NO_THREAD_SAFETY_ANALYSIS {
    while (!pred()) {
      if (!WaitUntil(mu, t)) return pred();
    }
    return true;
  }
  void NotifyOne() { cv_.notify_one(); }
  void NotifyAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

}  // namespace remus
