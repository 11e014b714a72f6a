// bench_journal_apply: how fast the backup makes a checkpoint's disk writes
// durable in its journal (Journal::Commit) and how fast committed epochs get
// from the journal onto the disk image (ApplyAll), with the real io_uring
// FileIo (NewUringFileIo), against plain writes + fdatasync of the same bytes
// to a file on the same filesystem.
//
// Workloads (the writes of one checkpoint epoch, repeated until --total-mib
// of data):
//   rand4k   4 KiB writes at random 4 KiB-aligned offsets of the disk,
//            256 per epoch (1 MiB per epoch)
//   seq1m    1 MiB writes, sequential, 8 per epoch (8 MiB per epoch)
//   seq4k    4 KiB writes, sequential, 32 per epoch (128 KiB per epoch): the
//            test guest's disk writer at ~300 records/s and 100 ms epochs
//
// Per workload and repetition, each on fresh files (sparse image, new journal):
//   commit   DiskReplicaSet::Write for every write of the epoch, then
//            Commit(epoch), for every epoch; no apply in between. Times the
//            appends and each Commit separately.
//   apply    then ApplyAll once: every committed epoch to the image (journal
//            re-read and crc-checked, image writes via io_uring, fdatasync of
//            the image, superblock, journal truncated). MB/s of data bytes.
//   loop     as the backup's receive loop does: Write*, Commit, MaybeApply
//            (applies every 16 epochs or 64 MiB of journal), per epoch.
//            loop_epoch_ms is Commit + MaybeApply: what stands between the
//            last disk write of a checkpoint and its ACK (the page-store
//            commit not included); loop_mbps counts the appends too (the
//            sustained rate of the backup's disk path).
// Baselines, plain syscalls on the same filesystem (fresh files):
//   seq_fsync        pwrite of the same number of bytes, sequential, 1 MiB at a
//                    time, one fdatasync at the end: the disk's sequential rate
//                    (the reference for apply, as the issue asks)
//   same_offsets     pwrite of the same writes (offsets and sizes) to a sparse
//                    file of the disk's size, one fdatasync: what apply must do
//                    at least for this pattern
//   epoch_fsync      per epoch, the epoch's bytes appended with one pwrite plus
//                    one fdatasync: the least a durable per-epoch journal
//                    commit costs (Commit does two fdatasyncs: records, then
//                    COMMIT)
//
// Every timed section ends with its own files durable (fdatasync), so no
// section leaves writeback for the next (a system-wide sync() would also wait
// for other processes' dirty data on a shared machine). MB = 1e6 bytes of
// write data (record headers not counted).
//
// Output: one JSON object on stdout. Progress on stderr.
//
// Usage: bench_journal_apply [--dir DIR] [--disk-mib N] [--total-mib N]
//                            [--workloads rand4k,seq1m,seq4k] [--reps N]
//                            [--seed N] [--keep]
#include <fcntl.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "diskmirror/disk_replica.h"
#include "diskmirror/file_io.h"

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Workload {
  std::string name;
  size_t write_bytes;
  uint64_t writes_per_epoch;
  bool random;
};

const std::vector<Workload> kWorkloads = {
    {"rand4k", 4096, 256, true},
    {"seq1m", 1u << 20, 8, false},
    {"seq4k", 4096, 32, false},
};

struct Args {
  std::string dir;
  uint64_t disk_mib = 1024;
  uint64_t total_mib = 64;
  std::vector<std::string> workloads = {"rand4k", "seq1m", "seq4k"};
  int reps = 3;
  uint64_t seed = 42;
  bool keep = false;
};

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr,
               "bench_journal_apply: %s\nusage: bench_journal_apply [--dir DIR] [--disk-mib N] [--total-mib N]\n"
               "       [--workloads rand4k,seq1m,seq4k] [--reps N] [--seed N] [--keep]\n",
               why);
  std::exit(2);
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i++) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) Usage(("missing value for " + k).c_str());
      return argv[++i];
    };
    if (k == "--dir") a.dir = val();
    else if (k == "--disk-mib") a.disk_mib = std::strtoull(val().c_str(), nullptr, 10);
    else if (k == "--total-mib") a.total_mib = std::strtoull(val().c_str(), nullptr, 10);
    else if (k == "--reps") a.reps = std::atoi(val().c_str());
    else if (k == "--seed") a.seed = std::strtoull(val().c_str(), nullptr, 10);
    else if (k == "--keep") a.keep = true;
    else if (k == "--workloads") {
      a.workloads.clear();
      std::string s = val();
      size_t p = 0;
      while (p <= s.size()) {
        size_t q = s.find(',', p);
        if (q == std::string::npos) q = s.size();
        if (q > p) a.workloads.push_back(s.substr(p, q - p));
        p = q + 1;
      }
    } else Usage(("unknown argument " + k).c_str());
  }
  if (a.reps < 1) Usage("--reps must be >= 1");
  if (a.disk_mib == 0 || a.total_mib == 0) Usage("sizes must be > 0");
  for (const auto& w : a.workloads)
    if (std::none_of(kWorkloads.begin(), kWorkloads.end(), [&](const Workload& x) { return x.name == w; }))
      Usage(("unknown workload " + w).c_str());
  if (a.dir.empty()) a.dir = "/var/tmp/remus-bench-journal." + std::to_string(::getpid());
  return a;
}

std::string FsType(const std::string& dir) {
  struct statfs s;
  if (::statfs(dir.c_str(), &s) != 0) return "unknown";
  switch (static_cast<unsigned long>(s.f_type)) {
    case 0xEF53: return "ext4";
    case 0x01021994: return "tmpfs";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    default: {
      char b[32];
      std::snprintf(b, sizeof b, "0x%lx", static_cast<unsigned long>(s.f_type));
      return b;
    }
  }
}

double Sec(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

json Summary(std::vector<double> v) {
  if (v.empty()) return json{{"n", 0}};
  std::sort(v.begin(), v.end());
  auto q = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))]; };
  double sum = std::accumulate(v.begin(), v.end(), 0.0);
  return json{{"n", v.size()}, {"min", v.front()}, {"p50", q(0.5)}, {"p99", q(0.99)}, {"max", v.back()},
              {"mean", sum / static_cast<double>(v.size())}};
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Fail {
  std::string what;
};

void Check(const remus::Status& s, const std::string& what) {
  if (!s.ok()) throw Fail{what + ": " + s.ToString()};
}

// One write of an epoch.
struct Op {
  uint64_t epoch;
  uint64_t off;
};

// The writes of a run: epochs 1..n, each writes_per_epoch writes.
std::vector<Op> MakeOps(const Workload& w, uint64_t epochs, uint64_t disk_bytes, std::mt19937_64& rng) {
  std::vector<Op> ops;
  ops.reserve(epochs * w.writes_per_epoch);
  uint64_t slots = disk_bytes / w.write_bytes;
  std::uniform_int_distribution<uint64_t> d(0, slots - 1);
  uint64_t next = 0;
  for (uint64_t e = 1; e <= epochs; e++)
    for (uint64_t i = 0; i < w.writes_per_epoch; i++) {
      uint64_t slot = w.random ? d(rng) : (next++ % slots);
      ops.push_back({e, slot * w.write_bytes});
    }
  return ops;
}

int OpenFresh(const std::string& path, uint64_t size) {
  ::unlink(path.c_str());
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw Fail{"open " + path + ": " + std::strerror(errno)};
  if (size && ::ftruncate(fd, static_cast<off_t>(size)) != 0) throw Fail{"ftruncate " + path + ": " + std::strerror(errno)};
  return fd;
}

void PwriteAll(int fd, const uint8_t* p, size_t n, uint64_t off, const std::string& what) {
  while (n > 0) {
    ssize_t r = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw Fail{"pwrite " + what + ": " + std::strerror(errno)};
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
}

void Datasync(int fd, const std::string& what) {
  if (::fdatasync(fd) != 0) throw Fail{"fdatasync " + what + ": " + std::strerror(errno)};
}

}  // namespace

int main(int argc, char** argv) {
  Args a = ParseArgs(argc, argv);
  std::error_code ec;
  std::filesystem::create_directories(a.dir, ec);
  if (ec) {
    std::fprintf(stderr, "bench_journal_apply: cannot create %s: %s\n", a.dir.c_str(), ec.message().c_str());
    return 1;
  }
  auto io_or = remus::NewUringFileIo();
  if (!io_or.ok()) {
    std::printf("%s\n", json{{"ok", false}, {"error", io_or.status().ToString()}}.dump().c_str());
    return 1;
  }
  std::unique_ptr<remus::FileIo> io = std::move(io_or).value();
  const std::string fs = FsType(a.dir);
  const uint64_t disk_bytes = a.disk_mib << 20;
  const uint64_t total_bytes = a.total_mib << 20;
  std::mt19937_64 rng(a.seed);
  // Write data: random bytes (not zero, not compressible), reused.
  std::vector<uint8_t> data(8u << 20);
  {
    auto* w = reinterpret_cast<uint64_t*>(data.data());
    for (size_t i = 0; i < data.size() / 8; i++) w[i] = rng() | 1;
  }
  json results = json::array();
  auto t_all = Clock::now();
  bool ok = true;
  std::string error;

  try {
    for (const std::string& wname : a.workloads) {
      const Workload& w = *std::find_if(kWorkloads.begin(), kWorkloads.end(),
                                        [&](const Workload& x) { return x.name == wname; });
      const uint64_t epoch_bytes = w.write_bytes * w.writes_per_epoch;
      const uint64_t epochs = std::max<uint64_t>(1, total_bytes / epoch_bytes);
      const uint64_t bytes = epochs * epoch_bytes;
      const double mb = static_cast<double>(bytes) / 1e6;
      auto chunk = [&](size_t i) {  // data for the i-th write
        size_t slots = data.size() / w.write_bytes;
        return std::span<const uint8_t>(data.data() + (i % slots) * w.write_bytes, w.write_bytes);
      };
      std::vector<double> append_s, commit_total_s, apply_s, loop_total_s, seq_s, same_s, epoch_fsync_total_s;
      std::vector<double> commit_ms_all, append_commit_ms_all, loop_ms_all, epoch_fsync_ms_all;
      uint64_t loop_applies = 0;
      for (int rep = 0; rep < a.reps; rep++) {
        std::vector<Op> ops = MakeOps(w, epochs, disk_bytes, rng);
        const std::string rdir = a.dir + "/" + w.name + "-" + std::to_string(rep);
        std::filesystem::remove_all(rdir, ec);
        std::filesystem::create_directories(rdir + "/commit", ec);
        std::filesystem::create_directories(rdir + "/loop", ec);
        // A fresh replica set (image + journal) in rdir/sub.
        auto open_set = [&](const std::string& sub) {
          auto set_or = remus::DiskReplicaSet::Open(io.get(), rdir + "/" + sub, rdir + "/" + sub,
                                                    {{"vda", disk_bytes}}, std::nullopt);
          Check(set_or.status(), "open the replica set");
          return std::move(set_or).value();
        };
        // The writes of epoch e (ops[k..]), appended to the journal.
        auto append_epoch = [&](remus::DiskReplicaSet* set, uint64_t e, size_t* k) {
          for (uint64_t i = 0; i < w.writes_per_epoch; i++, (*k)++)
            Check(set->Write(0, e, ops[*k].off, chunk(*k)), "write");
        };

        // commit, then apply
        {
          auto set = open_set("commit");
          double app = 0, com = 0;
          size_t k = 0;
          for (uint64_t e = 1; e <= epochs; e++) {
            auto t0 = Clock::now();
            append_epoch(set.get(), e, &k);
            auto t1 = Clock::now();
            Check(set->Commit(e), "commit");
            auto t2 = Clock::now();
            app += Sec(t1 - t0);
            com += Sec(t2 - t1);
            commit_ms_all.push_back(Sec(t2 - t1) * 1e3);
            append_commit_ms_all.push_back(Sec(t2 - t0) * 1e3);
          }
          append_s.push_back(app);
          commit_total_s.push_back(com);
          auto t0 = Clock::now();
          Check(set->ApplyAll(), "apply");
          apply_s.push_back(Sec(Clock::now() - t0));
        }
        // the backup's loop: write, commit, maybe apply
        {
          auto set = open_set("loop");
          double total = 0;
          size_t k = 0;
          for (uint64_t e = 1; e <= epochs; e++) {
            auto ta = Clock::now();
            append_epoch(set.get(), e, &k);
            auto t0 = Clock::now();
            total += Sec(t0 - ta);
            uint64_t before = set->journal_bytes();
            Check(set->Commit(e), "commit");
            Check(set->MaybeApply(), "maybe apply");
            if (set->journal_bytes() < before) loop_applies++;
            double s = Sec(Clock::now() - t0);
            total += s;
            loop_ms_all.push_back(s * 1e3);
          }
          loop_total_s.push_back(total);
        }
        // baselines
        {
          std::string f = rdir + "/seq.dat";
          int fd = OpenFresh(f, 0);
          auto t0 = Clock::now();
          for (uint64_t off = 0; off < bytes; off += 1u << 20) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(1u << 20, bytes - off));
            PwriteAll(fd, data.data() + (off % data.size()), n, off, f);
          }
          Datasync(fd, f);
          seq_s.push_back(Sec(Clock::now() - t0));
          ::close(fd);
          ::unlink(f.c_str());
        }
        {
          std::string f = rdir + "/same.img";
          int fd = OpenFresh(f, disk_bytes);
          auto t0 = Clock::now();
          for (size_t k = 0; k < ops.size(); k++) PwriteAll(fd, chunk(k).data(), w.write_bytes, ops[k].off, f);
          Datasync(fd, f);
          same_s.push_back(Sec(Clock::now() - t0));
          ::close(fd);
          ::unlink(f.c_str());
        }
        {
          std::string f = rdir + "/epochs.dat";
          int fd = OpenFresh(f, 0);
          double total = 0;
          uint64_t off = 0;
          size_t k = 0;
          std::vector<uint8_t> ebuf(epoch_bytes);
          for (uint64_t e = 1; e <= epochs; e++) {
            for (uint64_t i = 0; i < w.writes_per_epoch; i++, k++)
              std::memcpy(ebuf.data() + i * w.write_bytes, chunk(k).data(), w.write_bytes);
            auto t0 = Clock::now();
            PwriteAll(fd, ebuf.data(), ebuf.size(), off, f);
            off += ebuf.size();
            Datasync(fd, f);
            double s = Sec(Clock::now() - t0);
            total += s;
            epoch_fsync_ms_all.push_back(s * 1e3);
          }
          epoch_fsync_total_s.push_back(total);
          ::close(fd);
          ::unlink(f.c_str());
        }
        if (!a.keep) std::filesystem::remove_all(rdir, ec);
        std::fprintf(stderr,
                     "bench_journal_apply: [%5.1fs] %-6s rep %d: %llu epochs x %llu B: commit %.3f s (%.1f MB/s), "
                     "apply %.3f s (%.1f MB/s), loop %.3f s, seq+fsync %.3f s (%.1f MB/s), same offsets %.3f s, "
                     "epoch+fsync %.3f s\n",
                     Sec(Clock::now() - t_all), w.name.c_str(), rep, static_cast<unsigned long long>(epochs),
                     static_cast<unsigned long long>(epoch_bytes), commit_total_s.back(), mb / commit_total_s.back(),
                     apply_s.back(), mb / apply_s.back(), loop_total_s.back(), seq_s.back(), mb / seq_s.back(),
                     same_s.back(), epoch_fsync_total_s.back());
      }
      // Ratios per repetition (the sections of one repetition run back to
      // back, so they share the machine's load), then their median.
      std::vector<double> r_seq, r_same, r_commit;
      for (size_t i = 0; i < apply_s.size(); i++) {
        r_seq.push_back(seq_s[i] / apply_s[i]);
        r_same.push_back(same_s[i] / apply_s[i]);
        r_commit.push_back(epoch_fsync_total_s[i] / (append_s[i] + commit_total_s[i]));
      }
      const double apply_med = Median(apply_s), seq_med = Median(seq_s), same_med = Median(same_s);
      const double commit_med = Median(commit_total_s), efs_med = Median(epoch_fsync_total_s);
      const double append_med = Median(append_s), loop_med = Median(loop_total_s);
      json r = {
          {"workload", w.name},
          {"write_bytes", w.write_bytes},
          {"writes_per_epoch", w.writes_per_epoch},
          {"random", w.random},
          {"epochs", epochs},
          {"epoch_bytes", epoch_bytes},
          {"data_bytes", bytes},
          {"reps", a.reps},
          // medians over reps of the whole-run times
          {"append_s", append_med},
          {"append_mbps", mb / append_med},
          {"commit_s", commit_med},
          {"commit_mbps", mb / commit_med},
          {"commit_ms", Summary(commit_ms_all)},  // per epoch, pooled over reps
          // the epoch's appends (records encoded, crc, 1 MiB buffered writes) and its Commit
          {"append_commit_ms", Summary(append_commit_ms_all)},
          {"append_commit_mbps", mb / (append_med + commit_med)},
          {"apply_s", apply_med},
          {"apply_mbps", mb / apply_med},
          {"loop_s", loop_med},
          {"loop_mbps", mb / loop_med},
          {"loop_epoch_ms", Summary(loop_ms_all)},
          {"loop_applies", loop_applies},
          {"seq_fsync_s", seq_med},
          {"seq_fsync_mbps", mb / seq_med},
          {"same_offsets_s", same_med},
          {"same_offsets_mbps", mb / same_med},
          {"epoch_fsync_s", efs_med},
          {"epoch_fsync_mbps", mb / efs_med},
          {"epoch_fsync_ms", Summary(epoch_fsync_ms_all)},
          // < 1: slower than the reference; median of the per-repetition ratios
          {"ratio_apply_vs_seq_fsync", Median(r_seq)},
          {"ratio_apply_vs_same_offsets", Median(r_same)},
          {"ratio_append_commit_vs_epoch_fsync", Median(r_commit)},
          {"ratio_apply_vs_seq_fsync_per_rep", r_seq},
          {"apply_s_all", apply_s},
          {"seq_fsync_s_all", seq_s},
          {"commit_s_all", commit_total_s},
      };
      results.push_back(r);
      std::fprintf(stderr,
                   "bench_journal_apply: %-6s median: apply %.1f MB/s vs seq+fsync %.1f MB/s (ratio %.2f), same offsets "
                   "%.1f MB/s; append+commit p50 %.2f ms/epoch vs epoch+fsync p50 %.2f ms\n",
                   w.name.c_str(), mb / apply_med, mb / seq_med, Median(r_seq), mb / same_med,
                   r["append_commit_ms"]["p50"].get<double>(), r["epoch_fsync_ms"]["p50"].get<double>());
    }
  } catch (const Fail& f) {
    ok = false;
    error = f.what;
    std::fprintf(stderr, "bench_journal_apply: %s\n", f.what.c_str());
  }
  if (!a.keep) std::filesystem::remove_all(a.dir, ec);
  json out = {{"bench", "journal_apply"}, {"ok", ok},       {"dir", a.dir},
              {"fs", fs},
              {"disk_mib", a.disk_mib}, {"total_mib", a.total_mib}, {"reps", a.reps},
              {"seconds", Sec(Clock::now() - t_all)}, {"results", results}};
  if (!ok) out["error"] = error;
  std::printf("%s\n", out.dump().c_str());
  return ok ? 0 : 1;
}
