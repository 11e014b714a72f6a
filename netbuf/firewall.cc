#include "netbuf/firewall.h"

#include <map>

namespace remus::netbuf {
namespace {

std::vector<std::string_view> Lines(std::string_view text) {
  std::vector<std::string_view> out;
  while (!text.empty()) {
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    out.push_back(line);
    if (nl == std::string_view::npos) break;
    text.remove_prefix(nl + 1);
  }
  return out;
}

std::optional<uint64_t> ParseU64(std::string_view s) {
  if (s.empty() || s.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

}  // namespace

NfqueueRules BuildNfqueueRules(std::string_view chain, const std::vector<RuleInterface>& ifs, uint16_t queue_num,
                               std::string_view owner_tag) {
  NfqueueRules r;
  r.chain = std::string(chain);
  const Argv comment = {"-m", "comment", "--comment", std::string(owner_tag)};
  r.setup.push_back({"-t", "mangle", "-N", r.chain});
  Argv q = {"-t", "mangle", "-A", r.chain};
  q.insert(q.end(), comment.begin(), comment.end());
  for (const char* a : {"-j", "NFQUEUE", "--queue-num"}) q.push_back(a);
  q.push_back(std::to_string(queue_num));
  r.setup.push_back(q);
  // Jumps go in last, so no packet meets a half-built chain.
  for (const RuleInterface& i : ifs) {
    Argv match = i.bridge_port ? Argv{"-m", "physdev", "--physdev-in", i.name} : Argv{"-i", i.name};
    match.insert(match.end(), comment.begin(), comment.end());
    match.push_back("-j");
    match.push_back(r.chain);
    Argv add = {"-t", "mangle", "-I", "PREROUTING"};
    add.insert(add.end(), match.begin(), match.end());
    r.setup.push_back(add);
    Argv del = {"-t", "mangle", "-D", "PREROUTING"};
    del.insert(del.end(), match.begin(), match.end());
    r.teardown.push_back(del);
  }
  r.teardown.push_back({"-t", "mangle", "-F", r.chain});
  r.teardown.push_back({"-t", "mangle", "-X", r.chain});
  return r;
}

Argv SplitRuleLine(std::string_view line) {
  Argv out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) i++;
    if (i >= line.size()) break;
    std::string tok;
    while (i < line.size() && line[i] != ' ' && line[i] != '\t') {
      if (line[i] == '"') {
        i++;
        while (i < line.size() && line[i] != '"') {
          if (line[i] == '\\' && i + 1 < line.size()) i++;
          tok.push_back(line[i++]);
        }
        if (i < line.size()) i++;  // closing quote
      } else {
        tok.push_back(line[i++]);
      }
    }
    out.push_back(std::move(tok));
  }
  return out;
}

std::vector<FoundChain> FindOurChains(std::string_view mangle_dump) {
  std::map<std::string, FoundChain> found;  // sorted: stable output
  std::vector<Argv> jumps;                  // rules in other chains
  auto ours = [](std::string_view c) { return c.substr(0, kChainPrefix.size()) == kChainPrefix; };
  for (std::string_view line : Lines(mangle_dump)) {
    Argv a = SplitRuleLine(line);
    if (a.size() >= 2 && a[0] == "-N" && ours(a[1])) {
      found[a[1]].chain = a[1];
      continue;
    }
    if (a.size() < 2 || a[0] != "-A") continue;
    std::string target;
    for (size_t i = 2; i + 1 < a.size(); i++)
      if (a[i] == "-j" || a[i] == "-g") target = a[i + 1];
    if (ours(a[1])) {
      FoundChain& f = found[a[1]];
      f.chain = a[1];
      if (!f.owner) f.owner = ParseOwnerTag(line);
    } else if (ours(target)) {
      FoundChain& f = found[target];
      f.chain = target;
      if (!f.owner) f.owner = ParseOwnerTag(line);
      a[0] = "-D";
      jumps.push_back(std::move(a));
    }
  }
  std::vector<FoundChain> out;
  for (auto& [name, f] : found) {
    for (const Argv& j : jumps) {
      std::string target;
      for (size_t i = 2; i + 1 < j.size(); i++)
        if (j[i] == "-j" || j[i] == "-g") target = j[i + 1];
      if (target != name) continue;
      Argv del = {"-t", "mangle"};
      del.insert(del.end(), j.begin(), j.end());
      f.remove.push_back(std::move(del));
    }
    f.remove.push_back({"-t", "mangle", "-F", name});
    f.remove.push_back({"-t", "mangle", "-X", name});
    out.push_back(std::move(f));
  }
  return out;
}

std::set<uint16_t> QueuesInUse(std::string_view save_dump) {
  std::set<uint16_t> used;
  for (std::string_view line : Lines(save_dump)) {
    Argv a = SplitRuleLine(line);
    for (size_t i = 0; i + 1 < a.size(); i++) {
      if (a[i] == "--queue-num") {
        if (auto v = ParseU64(a[i + 1]); v && *v <= 0xffff) used.insert(static_cast<uint16_t>(*v));
      } else if (a[i] == "--queue-balance") {
        std::string_view r = a[i + 1];
        size_t colon = r.find(':');
        auto lo = ParseU64(r.substr(0, colon));
        auto hi = colon == std::string_view::npos ? lo : ParseU64(r.substr(colon + 1));
        if (lo && hi && *lo <= *hi && *hi <= 0xffff)
          for (uint64_t q = *lo; q <= *hi; q++) used.insert(static_cast<uint16_t>(q));
      }
    }
  }
  return used;
}

std::vector<NfqueueProcStats> ParseNfqueueProc(std::string_view text) {
  std::vector<NfqueueProcStats> out;
  for (std::string_view line : Lines(text)) {
    Argv a = SplitRuleLine(line);
    if (a.size() < 8) continue;
    std::optional<uint64_t> v[8];
    bool ok = true;
    for (int i = 0; i < 8; i++) {
      v[i] = ParseU64(a[i]);
      if (!v[i] || *v[i] > 0xffffffffu) ok = false;
    }
    if (!ok) continue;
    // queue_number peer_portid queue_total copy_mode copy_range queue_dropped
    // user_dropped id_sequence 1   (net/netfilter/nfnetlink_queue.c seq_show)
    NfqueueProcStats s;
    s.queue_num = static_cast<uint32_t>(*v[0]);
    s.portid = static_cast<uint32_t>(*v[1]);
    s.queue_total = static_cast<uint32_t>(*v[2]);
    s.queue_dropped = static_cast<uint32_t>(*v[5]);
    s.user_dropped = static_cast<uint32_t>(*v[6]);
    s.id_sequence = static_cast<uint32_t>(*v[7]);
    out.push_back(s);
  }
  return out;
}

}  // namespace remus::netbuf
