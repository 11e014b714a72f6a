// libFuzzer target for remusd's config file (remusd/config_file.h: CLI11's
// TOML/INI reader with remusd's flags).
//
// Input: the config file's text.
// Checks: ParseRemusdConfig fails only with InvalidArgument and never throws
// (a throw would kill remusd at start with no sentence); what parses has a
// heartbeat interval below its timeout, a parsed --listen, and every value
// the command line would check within its range or set (the validators
// apply to the file too); nothing one-shot comes from a file. (No round trip
// through CLI11's config writer: CLI11 2.1.2 writes a set negated flag,
// no-auto-promote = true, back as no-auto-promote=false.)
// Speed: one RemusdConfigParser for all inputs (CLI11's option table is
// built once, not per input); every 64th input is also parsed afresh by
// ParseRemusdConfig and the two results must agree.
#include <cstdint>
#include <string>
#include <string_view>

#include "remusd/config_file.h"
#include "tests/fuzz/fuzz_check.h"

namespace {
constexpr const char* kTarget = "fuzz_config";
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace remus;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    static RemusdConfigParser parser;
    static uint64_t inputs = 0;
    auto f = parser.Parse(text);
    if (inputs++ % 64 == 0) {
      auto fresh = ParseRemusdConfig(text);
      fuzz::Check(f.ok() == fresh.ok() && (f.ok() ? f->daemon.state_dir == fresh->daemon.state_dir &&
                                                        f->listen == fresh->listen &&
                                                        f->daemon.auto_promote == fresh->daemon.auto_promote &&
                                                        f->daemon.etcd_endpoints == fresh->daemon.etcd_endpoints &&
                                                        f->daemon.peer_policy.extra_options ==
                                                            fresh->daemon.peer_policy.extra_options &&
                                                        f->log_level == fresh->log_level
                                                  : f.status().message() == fresh.status().message()),
                  kTarget, "the reused parser and a fresh one disagree");
    }
    if (!f.ok())
      return fuzz::CheckCode(f.status(), {Code::kInvalidArgument}, kTarget, "unexpected error code"), 0;
    fuzz::Check(f->heartbeat_interval_ms < f->heartbeat_timeout_ms, kTarget, "heartbeat interval not below timeout");
    fuzz::Check(f->listen.empty() == !f->daemon.listen.has_value(), kTarget, "--listen not parsed");
    fuzz::Check(!f->cleanup_netbuf && f->check_netbuf.empty(), kTarget, "a one-shot action came from the file");
    const DaemonOptions& o = f->daemon;
    fuzz::Check(f->heartbeat_interval_ms >= 1 && f->heartbeat_interval_ms <= 60000 &&
                    f->heartbeat_timeout_ms >= 2 && f->heartbeat_timeout_ms <= 600000,
                kTarget, "a heartbeat setting outside its range");
    fuzz::Check(o.ack_delay_ms >= 0 && o.ack_delay_ms <= 60000, kTarget, "ack-delay-ms outside its range");
    fuzz::Check(o.arbiter == "etcd" || o.arbiter == "none", kTarget, "an arbiter that is not etcd or none");
    fuzz::Check(f->log_level == "debug" || f->log_level == "info" || f->log_level == "warn" ||
                    f->log_level == "error",
                kTarget, "a log level outside the set");
  } catch (...) {
    fuzz::Fail(kTarget, "threw");
  }
  return 0;
}
