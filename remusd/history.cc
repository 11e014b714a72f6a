#include "remusd/history.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <vector>

#include "common/log.h"

namespace remus {

using nlohmann::json;

namespace {

std::string NowUtc() {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::vector<json> ReadAll(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("text")) out.push_back(std::move(j));  // a torn line is skipped
  }
  return out;
}

bool WriteAllFd(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t w = ::write(fd, s.data() + off, s.size() - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

DomainHistory::DomainHistory(std::string dir) : dir_(std::move(dir)) {}

std::string DomainHistory::Path(const std::string& domain) const { return dir_ + "/" + domain + ".jsonl"; }

void DomainHistory::Record(const std::string& domain, json event) {
  if (!event.contains("text") || event["text"].get<std::string>().empty()) return;
  json line = {{"at", NowUtc()}};
  line.update(event);
  const std::string s = line.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  MutexLock l(mu_);
  std::deque<json>& cached = Cached(domain);  // before the append: the file without this line
  ::mkdir(dir_.c_str(), 0700);
  int fd = ::open(Path(domain).c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0 || !WriteAllFd(fd, s)) {
    LOG_WARN("remusd") << "domain " << domain << ": cannot write its history to " << Path(domain) << ": "
                       << std::strerror(errno);
    if (fd >= 0) ::close(fd);
    return;
  }
  ::close(fd);
  cached.push_back(std::move(line));
  while (cached.size() > kMaxKept) cached.pop_front();
  if (++lines_[domain] > 2 * kMaxKept) Compact(domain);  // Cached counted the file's lines
}

void DomainHistory::Compact(const std::string& domain) {
  // The cache holds exactly what is kept: the file's last kMaxKept entries.
  const std::deque<json>& kept = Cached(domain);
  std::string s;
  for (const json& e : kept) s += e.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  const std::string tmp = Path(domain) + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return;
  bool ok = WriteAllFd(fd, s);
  ::close(fd);
  if (ok && ::rename(tmp.c_str(), Path(domain).c_str()) == 0) lines_[domain] = kept.size();
  else ::unlink(tmp.c_str());
}

std::deque<json>& DomainHistory::Cached(const std::string& domain) const {
  auto it = recent_.find(domain);
  if (it != recent_.end()) return it->second;
  std::vector<json> all = ReadAll(Path(domain));
  lines_[domain] = all.size();
  std::deque<json> d;
  for (size_t i = all.size() > kMaxKept ? all.size() - kMaxKept : 0; i < all.size(); i++) d.push_back(std::move(all[i]));
  return recent_.emplace(domain, std::move(d)).first->second;
}

json DomainHistory::Recent(const std::string& domain, size_t n) const {
  MutexLock l(mu_);
  const std::deque<json>& all = Cached(domain);
  json out = json::array();
  for (size_t i = all.size() > n ? all.size() - n : 0; i < all.size(); i++) out.push_back(all[i]);
  return out;
}

std::string DomainHistory::PrimaryText(const std::string& to, const std::string& peer, const std::string& why) {
  const std::string reason = why.empty() ? "" : ": " + why;
  if (to == "protected") return "protected to " + peer;
  if (to == "failed-over") return "the guest's QEMU died here; failed over to " + peer + reason;
  if (to == "unprotected") return "protection to " + peer + " lost; the guest runs on here unprotected" + reason;
  if (to == "stopped") return "protection to " + peer + " ended" + reason;
  if (to == "switched-over") return "switched over to " + peer + ": the guest runs there from the final checkpoint";
  if (to == "fenced") return "fenced: another host owns the guest; the copy here was destroyed" + reason;
  return "";
}

std::string DomainHistory::BackupText(const std::string& to, const std::string& peer, const json& detail) {
  auto num = [&](const char* k) { return std::to_string(detail.value(k, int64_t{0})); };
  const std::string token = detail.value("token", int64_t{0}) > 0 ? ", token " + num("token") : "";
  if (to == "protected") return "backing up for primary " + peer;
  if (to == "primary-lost") return "lost primary " + peer;
  if (to == "unprotected") return "primary " + peer + " ended protection";
  if (to == "failed-over" && detail.value("switchover", false))
    return "switched over from " + peer + ": the guest runs here from its final checkpoint " + num("epoch") + token;
  if (to == "failed-over")
    return "failed over from " + peer + ": the guest runs here from checkpoint " + num("epoch") + token;
  if (to == "failed") return "promotion failed: " + detail.value("error", std::string());
  if (to == "ended") return "the guest promoted here (checkpoint " + num("epoch") + ") no longer runs here";
  return "";
}

}  // namespace remus
