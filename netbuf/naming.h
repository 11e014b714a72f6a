// Names and owner tags of the kernel objects netbuf creates.
//
//   iptables chain  REMUS-<domain>   (mangle table, iptables and ip6tables);
//                   at most 28 characters (XT_EXTENSION_MAXNAMELEN - 1)
//   IFB device      ifr-<8 hex>      (hash of domain + tap); at most 15
//                   characters (IFNAMSIZ - 1)
//   owner tag       remus:pid=<pid>,start=<ticks>
//                   on every rule (-m comment) and as each IFB's ifalias
//
// A domain that is not a plain [A-Za-z0-9_.-] name of <= 22 characters gets a
// readable prefix plus a hash of its full name, so distinct domains keep
// distinct chains. The owner tag lets CleanupStaleNetbuf tell a crashed
// remusd's objects (owner gone, or pid reused by a process that started
// later) from those of a remusd that is still running.
//
// Thread-safety: pure functions, except the /proc reads of OwnerAlive/Self.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace remus::netbuf {

inline constexpr std::string_view kChainPrefix = "REMUS-";
inline constexpr std::string_view kIfbPrefix = "ifr-";
inline constexpr std::string_view kOwnerPrefix = "remus:";
inline constexpr size_t kMaxChainName = 28;  // iptables: XT_EXTENSION_MAXNAMELEN 29 incl. NUL
inline constexpr size_t kMaxIfName = 15;     // IFNAMSIZ 16 incl. NUL

// 32-bit FNV-1a: stable across builds and hosts, which the names need.
uint32_t NameHash(std::string_view s);

// "REMUS-<domain>", sanitized and within kMaxChainName.
std::string ChainName(std::string_view domain);
// "ifr-<8 hex digits>" for one tap of one domain, within kMaxIfName.
std::string IfbName(std::string_view domain, std::string_view tap);
// Whether `name` is a valid interface name we could be handed (1..15
// characters, no '/', ':' or whitespace, not "." or "..").
bool ValidInterfaceName(std::string_view name);

// The process that owns a kernel object.
struct Owner {
  int pid = 0;
  uint64_t start_ticks = 0;  // field 22 of /proc/<pid>/stat
  bool operator==(const Owner&) const = default;
};
std::string FormatOwnerTag(const Owner& o);
// Parses a tag (or a string containing one, e.g. an iptables -S line).
std::optional<Owner> ParseOwnerTag(std::string_view s);
// This process.
Owner SelfOwner();
// True if the process exists, is not a zombie and started at start_ticks.
bool OwnerAlive(const Owner& o);
// Parses the contents of /proc/<pid>/stat into (state, start time).
std::optional<std::pair<char, uint64_t>> ParseProcStat(std::string_view stat);

}  // namespace remus::netbuf
