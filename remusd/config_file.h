// remusd's flags and its config file (TOML or INI through CLI11; sample:
// scripts/remusd.conf.example). main.cc binds the flags to a CLI::App with
// AddRemusdFlags, parses argv and finishes with FinishRemusdFlags;
// ParseRemusdConfig reads the text of a config file alone, as
// `remusd --config FILE` does, for tests; RemusdConfigParser does the same
// many times over one option table (the fuzz target,
// tests/fuzz/fuzz_config.cc).
//
// Thread-safety: pure functions; a RemusdFlags is a value; a
// RemusdConfigParser is used by one thread at a time.
#pragma once

#include <string>
#include <string_view>

#include <CLI/CLI.hpp>

#include "common/status.h"
#include "remusd/daemon.h"

namespace remus {

// Everything remusd's command line and config file set.
struct RemusdFlags {
  DaemonOptions daemon;
  std::string listen;  // --listen as given; FinishRemusdFlags parses it into daemon.listen
  std::string log_level = "info";
  int heartbeat_interval_ms = 100;
  int heartbeat_timeout_ms = 1000;
  bool cleanup_netbuf = false;  // one-shot actions: never from a config file
  std::string check_netbuf;
  std::string metrics_web_config;  // --metrics-web-config: loaded by main (remusd/web_config.h)
};

// Adds every remusd flag (and --config) to app, bound to *f, which must
// outlive the app's parsing. A config file key is a long flag name without
// its dashes; an unknown key is an error.
void AddRemusdFlags(CLI::App* app, RemusdFlags* f);

// The checks that span flags, after parsing: the heartbeat interval below the
// timeout, --listen a HOST[:PORT] (into f->daemon.listen, port 7788 by
// default), and f->daemon.heartbeat set. InvalidArgument naming the flag,
// worded for "remusd: <message>".
Status FinishRemusdFlags(RemusdFlags* f);

// For a CLI11 parse error: the sentence remusd prints about its config file
// (naming the file and the fix), or "" when the error is not about the config
// file (then CLI11's own message and exit code apply).
std::string DescribeConfigError(const CLI::ParseError& e, const std::string& config_path);

// What remusd says when CLI11 throws std::out_of_range for a flag's
// number (CLI11 2.1 does not turn that into a ParseError).
extern const char kValueTooLarge[];

// Parses the text of a config file, with no command line, then
// FinishRemusdFlags. InvalidArgument with DescribeConfigError's sentence (or
// CLI11's message) for a file remusd refuses. Never throws.
StatusOr<RemusdFlags> ParseRemusdConfig(std::string_view text);

// ParseRemusdConfig for many texts, building CLI11's option table (every
// flag, its validators and help text) once instead of per text: that table
// is most of the cost of parsing a small file. Each Parse starts from the
// defaults (the flags are reset and CLI11's parse state cleared), so its
// result is ParseRemusdConfig's for the same text (config_file_test.cc).
class RemusdConfigParser {
 public:
  RemusdConfigParser();
  RemusdConfigParser(const RemusdConfigParser&) = delete;
  RemusdConfigParser& operator=(const RemusdConfigParser&) = delete;
  StatusOr<RemusdFlags> Parse(std::string_view text);

 private:
  RemusdFlags flags_;  // bound to app_'s options: same address for the parser's life
  CLI::App app_;
};

}  // namespace remus
