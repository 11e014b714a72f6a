// Temporary directories for tests, under $TEST_TMPDIR (or /tmp).
//
//   std::string d = testing::MakeTempDir("nbd");  // removed when the binary exits
//   testing::TempDir t("store");                  // removed when t goes out of scope
//
// A failure to create one is a test failure (EXPECT), not an exception.
// Thread-safety: call MakeTempDir from the test's main thread.
// Target: remus_test_fakes (tests/CMakeLists.txt).
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace remus::testing {

// A fresh directory "<base>/<prefix>-XXXXXX", removed with everything in it
// when the test binary exits.
inline std::string MakeTempDir(std::string_view prefix) {
  struct Dirs {
    std::vector<std::string> paths;
    ~Dirs() {
      for (const auto& p : paths) std::filesystem::remove_all(p);
    }
  };
  static Dirs dirs;
  const char* base = std::getenv("TEST_TMPDIR");
  std::string t = std::string(base && *base ? base : "/tmp") + "/" + std::string(prefix) + "-XXXXXX";
  char* d = ::mkdtemp(t.data());
  EXPECT_NE(d, nullptr);
  dirs.paths.push_back(t);
  return t;
}

// A fresh directory owned by this object: removed with everything in it by
// the destructor.
class TempDir {
 public:
  explicit TempDir(std::string_view prefix = "remus-test") {
    const char* base = std::getenv("TEST_TMPDIR");
    path_ = std::string(base && *base ? base : "/tmp") + "/" + std::string(prefix) + "-XXXXXX";
    EXPECT_NE(::mkdtemp(path_.data()), nullptr) << path_;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string file(std::string_view name) const { return path_ + "/" + std::string(name); }

 private:
  std::string path_;
};

}  // namespace remus::testing
