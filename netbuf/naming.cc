#include "netbuf/naming.h"

#include <unistd.h>

#include <cstdio>

#include "common/io.h"

namespace remus::netbuf {
namespace {

constexpr size_t kMaxDomainPart = kMaxChainName - kChainPrefix.size();  // 22

bool PlainChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
         c == '-';
}

std::string Hex8(uint32_t v) {
  char b[9];
  std::snprintf(b, sizeof b, "%08x", v);
  return b;
}

}  // namespace

uint32_t NameHash(std::string_view s) {
  uint32_t h = 2166136261u;
  for (unsigned char c : s) {
    h ^= c;
    h *= 16777619u;
  }
  return h;
}

std::string ChainName(std::string_view domain) {
  bool plain = !domain.empty() && domain.size() <= kMaxDomainPart && domain.front() != '-';
  std::string clean;
  for (char c : domain) {
    if (!PlainChar(c)) plain = false;
    clean.push_back(PlainChar(c) ? c : '_');
  }
  if (plain) return std::string(kChainPrefix) + clean;
  // 13 readable characters, '-', 8 hex digits: 22.
  clean.resize(std::min(clean.size(), kMaxDomainPart - 9));
  return std::string(kChainPrefix) + clean + "-" + Hex8(NameHash(domain));
}

std::string IfbName(std::string_view domain, std::string_view tap) {
  std::string key(domain);
  key.push_back('\0');  // "a"+"bc" and "ab"+"c" differ
  key.append(tap);
  return std::string(kIfbPrefix) + Hex8(NameHash(key));
}

bool ValidInterfaceName(std::string_view name) {
  if (name.empty() || name.size() > kMaxIfName || name == "." || name == "..") return false;
  for (char c : name)
    if (c == '/' || c == ':' || c == ' ' || c == '\t' || c == '\n' || c == '\0') return false;
  return true;
}

std::string FormatOwnerTag(const Owner& o) {
  return std::string(kOwnerPrefix) + "pid=" + std::to_string(o.pid) + ",start=" + std::to_string(o.start_ticks);
}

std::optional<Owner> ParseOwnerTag(std::string_view s) {
  size_t at = s.find(std::string(kOwnerPrefix) + "pid=");
  if (at == std::string_view::npos) return std::nullopt;
  s.remove_prefix(at + kOwnerPrefix.size() + 4);
  auto number = [&s]() -> std::optional<uint64_t> {
    uint64_t v = 0;
    size_t n = 0;
    while (n < s.size() && s[n] >= '0' && s[n] <= '9' && n < 20) v = v * 10 + static_cast<uint64_t>(s[n++] - '0');
    if (n == 0) return std::nullopt;
    s.remove_prefix(n);
    return v;
  };
  auto pid = number();
  if (!pid || *pid == 0 || *pid > 0x7fffffff || s.substr(0, 7) != ",start=") return std::nullopt;
  s.remove_prefix(7);
  auto start = number();
  if (!start) return std::nullopt;
  return Owner{static_cast<int>(*pid), *start};
}

std::optional<std::pair<char, uint64_t>> ParseProcStat(std::string_view stat) {
  // "pid (comm) S ppid ..." where comm may contain spaces and parentheses:
  // the fields start after the last ')'.
  size_t close = stat.rfind(')');
  if (close == std::string_view::npos) return std::nullopt;
  std::string_view rest = stat.substr(close + 1);
  // Field 3 is the state, field 22 the start time; rest begins at field 3.
  int field = 2;
  char state = 0;
  size_t i = 0;
  while (i < rest.size()) {
    while (i < rest.size() && rest[i] == ' ') i++;
    size_t j = i;
    while (j < rest.size() && rest[j] != ' ' && rest[j] != '\n') j++;
    if (j == i) break;
    field++;
    std::string_view tok = rest.substr(i, j - i);
    if (field == 3) state = tok[0];
    if (field == 22) {
      uint64_t v = 0;
      for (char c : tok) {
        if (c < '0' || c > '9') return std::nullopt;
        v = v * 10 + static_cast<uint64_t>(c - '0');
      }
      return std::make_pair(state, v);
    }
    i = j;
  }
  return std::nullopt;
}

Owner SelfOwner() {
  Owner o;
  o.pid = static_cast<int>(::getpid());
  auto stat = ReadFileToString("/proc/self/stat");
  if (stat.ok()) {
    if (auto p = ParseProcStat(*stat)) o.start_ticks = p->second;
  }
  return o;
}

bool OwnerAlive(const Owner& o) {
  if (o.pid <= 0) return false;
  auto stat = ReadFileToString("/proc/" + std::to_string(o.pid) + "/stat");
  if (!stat.ok()) return false;
  auto p = ParseProcStat(*stat);
  if (!p) return true;  // unreadable: keep, never remove a live remusd's rules
  return p->first != 'Z' && p->first != 'X' && p->second == o.start_ticks;
}

}  // namespace remus::netbuf
