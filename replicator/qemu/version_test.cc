#include "replicator/qemu/version.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

namespace remus::qemu {
namespace {

TEST(QemuReleaseTest, ParsesQueryVersionNumbers) {
  auto r = ParseQemuRelease("10.0.13");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, (QemuRelease{10, 0, 13}));
  EXPECT_EQ(r->ToString(), "10.0.13");
  for (const char* bad : {"", "10", "10.0", "10.x.1", "a.b.c", "-1.0.0", "10..1"})
    EXPECT_FALSE(ParseQemuRelease(bad).ok()) << bad;
}

TEST(QemuReleaseTest, ParsesDashVersionOutput) {
  auto deb13 = ParseVersionOutput(
      "QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1 + remus colo patches)\n"
      "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n");
  ASSERT_TRUE(deb13.ok()) << deb13.status().ToString();
  EXPECT_EQ(*deb13, (QemuRelease{10, 0, 13}));
  auto deb12 = ParseVersionOutput("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n");
  ASSERT_TRUE(deb12.ok());
  EXPECT_EQ(*deb12, (QemuRelease{7, 2, 22}));
  EXPECT_EQ(*ParseVersionOutput("QEMU emulator version 9.2.0\n"), (QemuRelease{9, 2, 0}));
  Status s = ParseVersionOutput("bash: qemu: command not found").status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("not QEMU's -version output"), std::string::npos) << s.ToString();
}

TEST(QemuReleaseTest, SameMajorMinorIsTheRule) {
  EXPECT_TRUE(CheckSameRelease("web1", {10, 0, 7}, {10, 0, 13}, "/usr/bin/qemu-system-x86_64").ok());
  Status s = CheckSameRelease("web1", {7, 2, 22}, {10, 0, 13}, "/usr/bin/qemu-system-x86_64");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "domain web1: the primary runs QEMU 7.2.22 but this backup would restore it with QEMU 10.0.13 "
            "(/usr/bin/qemu-system-x86_64); a checkpoint is restored only by the same QEMU release "
            "(major.minor), so install the same QEMU release on both hosts");
  EXPECT_FALSE(CheckSameRelease("web1", {10, 0, 13}, {10, 1, 3}, "q").ok());
}

// A stand-in binary: a shell script that prints what QEMU prints.
class BinaryVersionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/remus-qemu-version-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }
  std::string Script(const std::string& name, const std::string& body) {
    std::string p = dir_ + "/" + name;
    std::ofstream(p) << "#!/bin/sh\n" << body << "\n";
    ::chmod(p.c_str(), 0755);
    return p;
  }
  std::string dir_;
};

TEST_F(BinaryVersionTest, RunsTheBinaryWithDashVersion) {
  std::string q = Script("qemu-system-x86_64",
                         "[ \"$1\" = -version ] || exit 3\n"
                         "echo 'QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)'");
  auto r = QemuBinaryVersion(q);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, (QemuRelease{10, 0, 13}));
}

TEST_F(BinaryVersionTest, AFailingOrMissingBinaryIsAnError) {
  Status s = QemuBinaryVersion(Script("qemu-fails", "echo broken >&2; exit 1")).status();
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_NE(s.message().find("broken"), std::string::npos) << s.ToString();
  EXPECT_EQ(QemuBinaryVersion(dir_ + "/absent").status().code(), Code::kNotFound);
}

TEST_F(BinaryVersionTest, AHangingBinaryIsKilledAfterTheTimeout) {
  auto t0 = std::chrono::steady_clock::now();
  Status s = QemuBinaryVersion(Script("qemu-hangs", "exec sleep 60")).status();
  EXPECT_EQ(s.code(), Code::kDeadlineExceeded) << s.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
}

}  // namespace
}  // namespace remus::qemu
