#include "remusd/config_file.h"

#include <sstream>
#include <stdexcept>

namespace remus {

void AddRemusdFlags(CLI::App* app, RemusdFlags* f) {
  DaemonOptions& o = f->daemon;
  // Every flag below may also come from a TOML or INI file (keys are the long
  // names without dashes: state-dir = "/var/lib/remus"); flags given on the
  // command line win. Sample: scripts/remusd.conf.example.
  app->set_config("--config", "", "read flags from this TOML/INI file (command-line flags override it)");
  app->allow_config_extras(CLI::config_extras_mode::error);  // a misspelt key is an error, not ignored
  app->add_option("--state-dir", o.state_dir, "where page stores and run files live")->capture_default_str();
  CLI::Option* key_file =
      app->add_option("--key-file", o.key_file, "shared key (remusctl keygen --out PATH), root-owned, mode 0600")
          ->capture_default_str();
  // Certificates instead of the key file: one way to authenticate links.
  app->add_option("--tls-cert", o.tls_cert,
                  "replication links: this host's certificate (PEM chain), instead of --key-file; with --tls-key and "
                  "--tls-ca")
      ->excludes(key_file);
  app->add_option("--tls-key", o.tls_key, "the private key of --tls-cert (PEM; root-owned, mode 0600)")->excludes(key_file);
  app->add_option("--tls-ca", o.tls_ca, "the CA that signed the peers' certificates (PEM)")->excludes(key_file);
  app->add_option("--tls-peer-name", o.tls_peer_name,
                  "the name (DNS or IP) the peer's certificate must carry; primary default: the --backup host; "
                  "backup default: any certificate the CA signed");
  app->add_option("--control", o.control_socket, "control socket path (root only)")->capture_default_str();
  app->add_option("--listen", f->listen, "act as a backup, accepting primaries on HOST:PORT (port 7788 by default)");
  app->add_option("--heartbeat-interval-ms", f->heartbeat_interval_ms, "heartbeat period")
      ->capture_default_str()
      ->check(CLI::Range(1, 60000));
  app->add_option("--heartbeat-timeout-ms", f->heartbeat_timeout_ms, "peer counts as lost after this much silence")
      ->capture_default_str()
      ->check(CLI::Range(2, 600000));
  app->add_option("--qemu", o.qemu_binary,
                  "QEMU binary for restored guests (default: the primary's qemu-system-ARCH, found in this host's "
                  "PATH; the primary's path is never run)");
  app->add_option("--allow-qemu-option", o.peer_policy.extra_options,
                  "backup: accept this QEMU option (e.g. vnc) in a primary's command line, with any value "
                  "(repeatable; see 'What the backup accepts from a peer' in docs/operator-guide.md)");
  app->add_option("--allow-qemu-device", o.peer_policy.extra_devices,
                  "backup: accept this -device driver in a primary's command line (repeatable)");
  app->add_option("--allow-qemu-files", o.peer_policy.file_dirs,
                  "backup: a directory whose files (kernels, initrds, firmware, read-only images) a restored guest "
                  "may read (repeatable; none by default)");
  app->add_option("--allow-shared-disks", o.peer_policy.shared_disk_dirs,
                  "backup: shared storage: a writable disk this backup does not mirror may be opened at the "
                  "primary's path when it lies under this directory (repeatable; none by default)");
  app->add_option("--allow-libvirt-element", o.peer_policy.extra_libvirt_elements,
                  "backup: accept this <devices> element (e.g. hostdev) in a primary's libvirt XML (repeatable)");
  app->add_flag("!--no-auto-promote", o.auto_promote, "backup: never promote by itself; wait for remusctl failover");
  app->add_option("--reprotect-to", o.reprotect_to,
                  "primary: after a failover, the backup protects the promoted guest again to this remusd: 'self' "
                  "(this host's --listen address), HOST:PORT (another host), or 'none'")
      ->capture_default_str();
  app->add_flag("!--no-auto-reprotect", o.auto_reprotect,
                "backup: do not protect a promoted guest again on its own, whatever its primary asked for");
  app->add_option("--libvirt-uri", o.libvirt_uri,
                  "libvirt of this host: protect without --qmp uses it (unless --connect), and a backup restores "
                  "libvirt domains into it")
      ->capture_default_str();
  app->add_option("--libvirt-pid-dir", o.libvirt_pid_dir, "where that libvirt keeps its <domain>.pid files")
      ->capture_default_str();
  app->add_option("--restore", o.restore,
                  "backup: how a failover restores a guest: map (its main RAM becomes the page store's own file, so "
                  "promotion time does not grow with the guest; falls back to stream where the command line does not "
                  "allow it) or stream (every page through QEMU's migration stream)")
      ->capture_default_str()
      ->check(CLI::IsMember({"map", "stream"}));
  app->add_option("--hot-headroom-mib", o.hot_headroom_mib,
                  "backup: a domain protected with --residency hot is admitted only while MemAvailable covers its "
                  "guest RAM plus this many MiB")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30));
  app->add_option("--ack-delay-ms", o.ack_delay_ms, "backup: hold each ACK this long (tests and benchmarks)")
      ->check(CLI::Range(0, 60000));
  app->add_option("--fault", o.fault, "test-only fault injection, e.g. stall-after-reply@60");
  app->add_option("--metrics", o.metrics_listen,
                  "serve Prometheus metrics on http://ADDR:PORT/metrics (numeric IPv4 address, e.g. 127.0.0.1:9100); "
                  "off by default");
  app->add_option("--metrics-web-config,--web.config.file", f->metrics_web_config,
                  "TLS and basic auth for --metrics: a Prometheus exporter web config file (YAML: tls_server_config, "
                  "basic_auth_users)");
  app->add_option("--arbiter", o.arbiter,
                  "who decides that a backup may take over: etcd (the default; needs --etcd-endpoints) or none "
                  "(fail-stop: a network partition or a frozen remusd can leave two running copies)")
      ->capture_default_str()
      ->check(CLI::IsMember({"etcd", "none"}));
  app->add_option("--etcd-endpoints", o.etcd_endpoints, "etcd client URLs, comma-separated (http://10.0.0.5:2379,...)")
      ->delimiter(',');
  app->add_option("--etcd-prefix", o.etcd_prefix, "key prefix in etcd, the same on both hosts")->capture_default_str();
  app->add_option("--etcd-cacert", o.etcd_cacert, "CA certificate etcd's server certificate is checked against");
  app->add_option("--etcd-cert", o.etcd_cert, "client certificate for etcd");
  app->add_option("--etcd-key", o.etcd_key, "client key for etcd");
  app->add_option("--host-id", o.host_id, "this host's name in etcd's ownership records (default: the hostname)");
  app->add_option("--lease-ttl-ms", o.lease_ttl_ms,
                  "ownership lease TTL: a backup takes over this long after the primary's last renewal")
      ->capture_default_str();
  app->add_option("--lease-margin-ms", o.lease_margin_ms,
                  "the primary pauses its guest this long before its lease could expire")
      ->capture_default_str();
  // One-shot actions: not from a config file (remusd would never start).
  app->add_flag("--cleanup-netbuf", f->cleanup_netbuf,
                "remove output-buffering rules and devices left by a dead remusd, then exit")
      ->configurable(false);
  app->add_option("--check-netbuf", f->check_netbuf,
                  "say whether this kernel can run a netbuf mode (plug, nfqueue), then exit")
      ->check(CLI::IsMember({"plug", "nfqueue"}))
      ->configurable(false);
  app->add_option("--log-level", f->log_level, "debug, info, warn or error")
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}));
}

Status FinishRemusdFlags(RemusdFlags* f) {
  if (f->heartbeat_interval_ms >= f->heartbeat_timeout_ms)
    return InvalidArgument("--heartbeat-interval-ms must be less than --heartbeat-timeout-ms");
  f->daemon.heartbeat = {std::chrono::milliseconds(f->heartbeat_interval_ms),
                         std::chrono::milliseconds(f->heartbeat_timeout_ms)};
  f->daemon.listen.reset();
  if (!f->listen.empty()) {
    auto hp = ParseHostPort(f->listen, 7788);
    if (!hp.ok()) return InvalidArgument("--listen: " + hp.status().message());
    f->daemon.listen = *hp;
  }
  return OkStatus();
}

std::string DescribeConfigError(const CLI::ParseError& e, const std::string& config_path) {
  std::string what = e.what(), unknown = "INI was not able to parse ";
  if (what.rfind(unknown, 0) == 0)
    return "--config " + config_path + ": unknown setting '" + what.substr(unknown.size()) +
           "'; keys are remusd's long flag names without the dashes, outside any [section] (see "
           "scripts/remusd.conf.example)";
  if (dynamic_cast<const CLI::FileError*>(&e) || dynamic_cast<const CLI::ConfigError*>(&e))
    return "--config " + config_path + ": " + what + " (see scripts/remusd.conf.example)";
  return "";
}

const char kValueTooLarge[] = "a flag's value is a number too large for it (a flag takes true, false or a small count)";

namespace {

// Parses text into *f through app (AddRemusdFlags'd to f, parse state clear).
Status ParseInto(std::string_view text, CLI::App* app, RemusdFlags* f) {
  try {
    std::istringstream in{std::string(text)};
    app->parse_from_stream(in);
  } catch (const CLI::ParseError& e) {
    std::string m = DescribeConfigError(e, "<text>");
    return InvalidArgument(m.empty() ? "--config <text>: " + std::string(e.what()) : m);
  } catch (const std::out_of_range&) {
    // CLI11 2.1 reads a flag's number with std::stoll and lets its
    // out_of_range through (no-auto-promote = 99999999999999999999).
    return InvalidArgument(std::string("--config <text>: ") + kValueTooLarge);
  }
  return FinishRemusdFlags(f);
}

}  // namespace

StatusOr<RemusdFlags> ParseRemusdConfig(std::string_view text) {
  RemusdFlags f;
  CLI::App app;
  AddRemusdFlags(&app, &f);
  RETURN_IF_ERROR(ParseInto(text, &app, &f));
  return f;
}

RemusdConfigParser::RemusdConfigParser() { AddRemusdFlags(&app_, &flags_); }

StatusOr<RemusdFlags> RemusdConfigParser::Parse(std::string_view text) {
  // The options hold references into flags_: assign the defaults in place.
  flags_ = RemusdFlags{};
  app_.clear();  // the counts and results of the last parse (excludes, config extras)
  RETURN_IF_ERROR(ParseInto(text, &app_, &flags_));
  return flags_;
}

}  // namespace remus
