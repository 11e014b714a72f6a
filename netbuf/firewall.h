// The iptables/ip6tables rules of the nfqueue backend, as argument vectors,
// and the parsers that read rulesets back (crash cleanup, queue numbers in
// use). Pure functions: the commands run through command.h.
//
// Per domain, in the mangle table of both iptables and ip6tables:
//   -N REMUS-<domain>
//   -A REMUS-<domain> -m comment --comment <owner> -j NFQUEUE --queue-num Q
//   -I PREROUTING -m physdev --physdev-in TAP -m comment --comment <owner> -j REMUS-<domain>
//      (a bridge port: needs br_netfilter; a routed tap: -i TAP instead)
// A dedicated chain makes teardown and crash cleanup exact: our rules are the
// chain and the jumps to it, nothing else is touched. No --queue-bypass: if
// remusd dies, the guest's output is dropped (fail closed) until the backup
// has taken over and CleanupStaleNetbuf removes the rules.
//
// Why exec iptables rather than a library: libiptc has no stable API (and
// programs the legacy backend, not the nf_tables one Debian 12 uses); nft's
// native `queue` statement (CONFIG_NFT_QUEUE) is not in every kernel (not in
// this one); and libnftables cannot express the xt NFQUEUE target and physdev
// match that iptables-nft emits through its xt compat layer.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "netbuf/naming.h"

namespace remus::netbuf {

using Argv = std::vector<std::string>;

struct RuleInterface {
  std::string name;
  bool bridge_port = false;  // match with physdev (bridged frames) instead of -i
};

// Arguments after the binary name (iptables or ip6tables); both families use
// the same rules.
struct NfqueueRules {
  std::string chain;
  std::vector<Argv> setup;     // in order
  std::vector<Argv> teardown;  // in order; each may fail harmlessly if already gone
};
NfqueueRules BuildNfqueueRules(std::string_view chain, const std::vector<RuleInterface>& ifs, uint16_t queue_num,
                               std::string_view owner_tag);

// Splits one line of `iptables -S` output into arguments ("..." quoted
// strings with \" escapes become one argument).
Argv SplitRuleLine(std::string_view line);

// One of our chains found in `iptables -t mangle -S` output, with the
// commands (arguments after the binary name) that remove it.
struct FoundChain {
  std::string chain;
  std::optional<Owner> owner;  // from the comment on any of its rules; none if untagged
  std::vector<Argv> remove;    // -D of every rule jumping to it, then -F, -X
};
std::vector<FoundChain> FindOurChains(std::string_view mangle_dump);

// Queue numbers referenced by NFQUEUE rules in `iptables-save` output
// (--queue-num N, --queue-balance A:B), so an automatic pick never takes a
// number another program's rules send packets to.
std::set<uint16_t> QueuesInUse(std::string_view save_dump);

// One line of /proc/net/netfilter/nfnetlink_queue.
struct NfqueueProcStats {
  uint32_t queue_num = 0;
  uint32_t portid = 0;
  uint32_t queue_total = 0;     // packets queued now
  uint32_t queue_dropped = 0;   // dropped: queue full (queue_maxlen), not fail-open
  uint32_t user_dropped = 0;    // dropped: could not be sent to our socket
  uint32_t id_sequence = 0;
};
std::vector<NfqueueProcStats> ParseNfqueueProc(std::string_view text);

}  // namespace remus::netbuf
