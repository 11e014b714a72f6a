// bench_page_hash: what the delta resync's hashing costs (page_hash.h,
// store_hash.h). In one run, on the same 256 MiB of guest-like data:
//   - XXH3-128 of every 4 KiB page (the primary hashes each page of the
//     initial copy; the backup hashes its image to offer it and to verify the
//     result), against memcpy of the same bytes (what receiving costs anyway);
//   - StoreDigest over a 256 MiB page store, full of data and all holes.
// Each rep times hash and memcpy interleaved; the result is the median.
//
// Output: one JSON object on stdout.
// Usage: bench_page_hash [--reps N] [--dir D]
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "replicator/backup/store_hash.h"
#include "replicator/link/page_hash.h"

namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 7;
  std::string dir = "/var/tmp";
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--dir" && i + 1 < argc) {
      dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: bench_page_hash [--reps N] [--dir D]\n");
      return 2;
    }
  }
  constexpr size_t kBytes = size_t{256} << 20;
  constexpr size_t kPage = 4096;
  std::vector<uint8_t> src(kBytes), dst(kBytes);
  for (size_t i = 0; i < kBytes; i++) src[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  std::memset(dst.data(), 1, dst.size());
  std::vector<double> hash_gbps, copy_gbps, ratio;
  uint64_t sink = 0;
  for (int r = 0; r < reps; r++) {
    auto t0 = std::chrono::steady_clock::now();
    for (size_t off = 0; off < kBytes; off += kPage) sink ^= remus::wire::HashPage(src.data() + off).lo;
    double h = Since(t0);
    t0 = std::chrono::steady_clock::now();
    for (size_t off = 0; off < kBytes; off += kPage) std::memcpy(dst.data() + off, src.data() + off, kPage);
    double c = Since(t0);
    sink ^= dst[r * 4099 % kBytes];
    hash_gbps.push_back(kBytes / h / 1e9);
    copy_gbps.push_back(kBytes / c / 1e9);
    ratio.push_back(h / c);
  }

  // The backup's side: a store's digest, all data and all holes.
  nlohmann::json store;
  std::string sdir = dir + "/remus-bench-page-hash-" + std::to_string(::getpid());
  auto s = remus::PageStore::Create(sdir, {{"pc.ram", kBytes}});
  if (!s.ok()) {
    store = {{"error", s.status().ToString()}};
  } else {
    std::vector<double> holes_gbps, data_gbps;
    for (int r = 0; r < reps; r++) {
      auto t0 = std::chrono::steady_clock::now();
      auto d = remus::StoreDigest(**s);
      holes_gbps.push_back(kBytes / Since(t0) / 1e9);
      sink ^= d.ok() ? d->lo : 0;
    }
    for (size_t off = 0; off < kBytes; off += kPage) (void)(*s)->ApplyPage(0, off, src.data() + off);
    for (int r = 0; r < reps; r++) {
      auto t0 = std::chrono::steady_clock::now();
      auto d = remus::StoreDigest(**s);
      data_gbps.push_back(kBytes / Since(t0) / 1e9);
      sink ^= d.ok() ? d->lo : 0;
    }
    store = {{"bytes", kBytes}, {"digest_all_data_gbps_p50", Median(data_gbps)},
             {"digest_all_holes_gbps_p50", Median(holes_gbps)}, {"dir", dir}};
    s->reset();
    std::string rm = "rm -rf '" + sdir + "'";
    (void)std::system(rm.c_str());
  }
  nlohmann::json out = {{"bench", "page_hash"},
                        {"bytes", kBytes},
                        {"reps", reps},
                        {"xxh3_128_per_page_gbps_p50", Median(hash_gbps)},
                        {"memcpy_per_page_gbps_p50", Median(copy_gbps)},
                        {"hash_time_over_memcpy_time_p50", Median(ratio)},
                        {"store", store},
                        {"sink", sink & 1}};
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
