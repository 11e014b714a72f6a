#include "common/crc32c.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

namespace remus {
namespace {

TEST(Crc32c, KnownVectors) {
  // RFC 3720 (iSCSI) appendix B.4 test vectors.
  std::string zeros(32, '\0');
  EXPECT_EQ(crc32c::Value(zeros.data(), zeros.size()), 0x8a9136aau);
  std::string ones(32, '\xff');
  EXPECT_EQ(crc32c::Value(ones.data(), ones.size()), 0x62a8ab43u);
  std::string inc;
  for (int i = 0; i < 32; i++) inc.push_back(static_cast<char>(i));
  EXPECT_EQ(crc32c::Value(inc.data(), inc.size()), 0x46dd794eu);
  EXPECT_EQ(crc32c::Value("123456789", 9), 0xe3069283u);
}

TEST(Crc32c, ExtendEqualsWhole) {
  std::string s = "the quick brown fox jumps over the lazy dog, twice over";
  for (size_t cut = 0; cut <= s.size(); cut++) {
    uint32_t a = crc32c::Extend(crc32c::Value(s.data(), cut), s.data() + cut, s.size() - cut);
    EXPECT_EQ(a, crc32c::Value(s.data(), s.size())) << cut;
  }
}

// Bit-at-a-time CRC-32C, straight from the definition: the reference the
// library's folded code must agree with at every length and alignment.
uint32_t Reference(const uint8_t* p, size_t n) {
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

TEST(Crc32c, AgreesWithReferenceAtEveryLengthAndAlignment) {
  std::string buf(70000, '\0');
  uint32_t x = 12345;
  for (auto& ch : buf) ch = static_cast<char>((x = x * 1103515245u + 12345u) >> 16);
  const auto* p = reinterpret_cast<const uint8_t*>(buf.data());
  for (size_t off = 0; off < 16; off++)
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{15}, size_t{63}, size_t{255}, size_t{256},
                     size_t{1023}, size_t{4096}, size_t{4099}, size_t{65536}})
      EXPECT_EQ(crc32c::Value(p + off, n), Reference(p + off, n)) << "offset " << off << " length " << n;
}

}  // namespace
}  // namespace remus
