#include "replicator/qemu/version.h"

#include <sys/stat.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <map>
#include <utility>

#include "common/command.h"
#include "common/thread_annotations.h"

namespace remus::qemu {

std::string QemuRelease::ToString() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(micro);
}

StatusOr<QemuRelease> ParseQemuRelease(std::string_view v) {
  QemuRelease r;
  int* parts[] = {&r.major, &r.minor, &r.micro};
  const char* p = v.data();
  const char* end = v.data() + v.size();
  for (int i = 0; i < 3; i++) {
    auto [next, ec] = std::from_chars(p, end, *parts[i]);
    if (ec != std::errc() || *parts[i] < 0) return InvalidArgument("'" + std::string(v) + "' is not a QEMU version");
    p = next;
    if (i < 2) {
      if (p == end || *p != '.') return InvalidArgument("'" + std::string(v) + "' is not a QEMU version");
      ++p;
    }
  }
  // Development builds say "10.0.50"; a suffix ("-rc1") is not expected from
  // query-version's numbers, but tolerated from -version's text.
  return r;
}

StatusOr<QemuRelease> ParseVersionOutput(std::string_view out) {
  constexpr std::string_view kPrefix = "QEMU emulator version ";
  size_t at = out.find(kPrefix);
  if (at == std::string_view::npos)
    return InvalidArgument("not QEMU's -version output: '" + std::string(out.substr(0, 80)) + "'");
  std::string_view rest = out.substr(at + kPrefix.size());
  size_t end = rest.find_first_of(" \n(");
  return ParseQemuRelease(rest.substr(0, end));
}

namespace {

Mutex cache_mu;
std::map<std::pair<std::string, int64_t>, QemuRelease> cache GUARDED_BY(cache_mu);

}  // namespace

StatusOr<QemuRelease> QemuBinaryVersion(const std::string& binary) {
  struct stat st {};
  if (::stat(binary.c_str(), &st) != 0) return ErrnoStatus("QEMU binary " + binary, errno);
  auto key = std::make_pair(binary, static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
  {
    MutexLock g(cache_mu);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  ASSIGN_OR_RETURN(CommandResult run, RunCommand({binary, "-version"}, std::chrono::seconds(5)));
  if (run.exit_code != 0)
    return FailedPrecondition(binary + " -version failed (exit " + std::to_string(run.exit_code) +
                              "): " + (run.err.empty() ? run.out : run.err).substr(0, 200));
  ASSIGN_OR_RETURN(QemuRelease r, ParseVersionOutput(run.out));
  MutexLock g(cache_mu);
  cache[key] = r;
  return r;
}

Status CheckSameRelease(const std::string& domain, const QemuRelease& primary, const QemuRelease& backup,
                        const std::string& backup_binary) {
  if (primary.major == backup.major && primary.minor == backup.minor) return OkStatus();
  return FailedPrecondition("domain " + domain + ": the primary runs QEMU " + primary.ToString() +
                            " but this backup would restore it with QEMU " + backup.ToString() + " (" +
                            backup_binary + "); a checkpoint is restored only by the same QEMU release "
                            "(major.minor), so install the same QEMU release on both hosts");
}

}  // namespace remus::qemu
