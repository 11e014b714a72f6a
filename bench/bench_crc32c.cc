// bench_crc32c: CRC-32C throughput of remus's crc32c (ISA-L's crc32_iscsi)
// against the alternative it replaced, a single dependency chain of the SSE4.2
// crc32 instruction (kept here only as the comparison).
//
// Each rep times both on the same buffer, interleaved, so a noisy neighbour
// hits both alike; the result is the per-rep ratio's median. Sizes are those on
// the wire: a 4 KiB page record, a 4 MiB PAGES batch, a 16 MiB frame.
//
// Output: one JSON object on stdout.
// Usage: bench_crc32c [--reps N]
#include <nmmintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/crc32c.h"

namespace {

__attribute__((target("sse4.2"))) uint32_t SingleChainSse42(const uint8_t* p, size_t n) {
  uint64_t c = 0xffffffffu;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

template <typename F>
double SecondsFor(size_t total_bytes, size_t size, F&& f) {
  auto t0 = std::chrono::steady_clock::now();
  for (size_t done = 0; done < total_bytes; done += size) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 15;
  for (int i = 1; i < argc; i++) {
    if (std::string(argv[i]) == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: bench_crc32c [--reps N]\n");
      return 2;
    }
  }
  if (reps < 1) reps = 1;
  constexpr size_t kTotal = size_t{256} << 20;  // bytes per measurement
  std::vector<uint8_t> buf(size_t{16} << 20);
  for (size_t i = 0; i < buf.size(); i++) buf[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  nlohmann::json results = nlohmann::json::array();
  for (size_t size : {size_t{4096}, size_t{4} << 20, size_t{16} << 20}) {
    std::vector<double> ours, alt, ratio;
    volatile uint32_t sink = 0;
    for (int r = 0; r < reps; r++) {
      // Each call starts at a different offset so no result can be hoisted.
      size_t off = 0;
      double a = SecondsFor(kTotal, size, [&] {
        sink = sink ^ remus::crc32c::Value(buf.data() + off, size);
        off = (off + size) % (buf.size() - size + 1);
      });
      off = 0;
      double b = SecondsFor(kTotal, size, [&] {
        sink = sink ^ SingleChainSse42(buf.data() + off, size);
        off = (off + size) % (buf.size() - size + 1);
      });
      ours.push_back(kTotal / a / 1e9);
      alt.push_back(kTotal / b / 1e9);
      ratio.push_back(b / a);
    }
    if (remus::crc32c::Value(buf.data(), size) != SingleChainSse42(buf.data(), size)) {
      std::fprintf(stderr, "bench_crc32c: the two CRCs disagree at %zu bytes\n", size);
      return 1;
    }
    results.push_back({{"bytes", size},
                       {"isal_gbps_p50", Median(ours)},
                       {"sse42_single_chain_gbps_p50", Median(alt)},
                       {"speedup_p50", Median(ratio)},
                       {"reps", reps}});
  }
  std::printf("%s\n", nlohmann::json{{"bench", "crc32c"}, {"results", results}}.dump(2).c_str());
  return 0;
}
