// A fresh directory under $TEST_TMPDIR (or /tmp) for one test binary,
// removed with everything in it when the binary exits.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace remus::testing {

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

}  // namespace remus::testing
