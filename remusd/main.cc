// remusd: thin main; the daemon lives in daemon.cc.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <thread>

#include "common/log.h"
#include "netbuf/netbuf.h"
#include "remusd/daemon.h"

int main(int argc, char** argv) {
  remus::DaemonOptions o;
  std::string listen, log_level = "info";
  int hb_interval = 100, hb_timeout = 1000;
  CLI::App app{"remusd: Remus-style high availability for QEMU/KVM guests"};
  // Every flag below may also come from a TOML or INI file (keys are the long
  // names without dashes: state-dir = "/var/lib/remus"); flags given on the
  // command line win. Sample: scripts/remusd.conf.example.
  app.set_config("--config", "", "read flags from this TOML/INI file (command-line flags override it)");
  app.allow_config_extras(CLI::config_extras_mode::error);  // a misspelt key is an error, not ignored
  app.add_option("--state-dir", o.state_dir, "where page stores and run files live")->capture_default_str();
  app.add_option("--key-file", o.key_file, "shared key (remusctl keygen --out PATH), mode 0600")->capture_default_str();
  app.add_option("--tls-cert", o.tls_cert,
                 "replication links: this host's certificate (PEM chain), instead of --key-file; with --tls-key and --tls-ca");
  app.add_option("--tls-key", o.tls_key, "the private key of --tls-cert (PEM; root-owned, mode 0600)");
  app.add_option("--tls-ca", o.tls_ca, "the CA that signed the peers' certificates (PEM)");
  app.add_option("--tls-peer-name", o.tls_peer_name,
                 "the name (DNS or IP) the peer's certificate must carry; primary default: the --backup host; "
                 "backup default: any certificate the CA signed");
  app.add_option("--control", o.control_socket, "control socket path (root only)")->capture_default_str();
  app.add_option("--listen", listen, "act as a backup, accepting primaries on HOST:PORT (port 7788 by default)");
  app.add_option("--heartbeat-interval-ms", hb_interval, "heartbeat period")->capture_default_str()->check(CLI::Range(1, 60000));
  app.add_option("--heartbeat-timeout-ms", hb_timeout, "peer counts as lost after this much silence")
      ->capture_default_str()->check(CLI::Range(2, 600000));
  app.add_option("--qemu", o.qemu_binary,
                 "QEMU binary for restored guests (default: the primary's qemu-system-ARCH, found in this host's "
                 "PATH; the primary's path is never run)");
  app.add_option("--allow-qemu-option", o.peer_policy.extra_options,
                 "backup: accept this QEMU option (e.g. vnc) in a primary's command line, with any value "
                 "(repeatable; see 'What the backup accepts from a peer' in docs/operator-guide.md)");
  app.add_option("--allow-qemu-device", o.peer_policy.extra_devices,
                 "backup: accept this -device driver in a primary's command line (repeatable)");
  app.add_option("--allow-qemu-files", o.peer_policy.file_dirs,
                 "backup: a directory whose files (kernels, initrds, firmware, read-only images) a restored guest "
                 "may read (repeatable; none by default)");
  app.add_option("--allow-shared-disks", o.peer_policy.shared_disk_dirs,
                 "backup: shared storage: a writable disk this backup does not mirror may be opened at the primary's "
                 "path when it lies under this directory (repeatable; none by default)");
  app.add_option("--allow-libvirt-element", o.peer_policy.extra_libvirt_elements,
                 "backup: accept this <devices> element (e.g. hostdev) in a primary's libvirt XML (repeatable)");
  app.add_flag("!--no-auto-promote", o.auto_promote, "backup: never promote by itself; wait for remusctl failover");
  app.add_option("--libvirt-uri", o.libvirt_uri,
                 "libvirt of this host: protect without --qmp uses it (unless --connect), and a backup restores "
                 "libvirt domains into it")
      ->capture_default_str();
  app.add_option("--libvirt-pid-dir", o.libvirt_pid_dir, "where that libvirt keeps its <domain>.pid files")
      ->capture_default_str();
  app.add_option("--ack-delay-ms", o.ack_delay_ms, "backup: hold each ACK this long (tests and benchmarks)")
      ->check(CLI::Range(0, 60000));
  app.add_option("--fault", o.fault, "test-only fault injection, e.g. stall-after-reply@60");
  app.add_option("--metrics", o.metrics_listen,
                 "serve Prometheus metrics on http://ADDR:PORT/metrics (numeric IPv4 address, e.g. 127.0.0.1:9100); off by default");
  std::string metrics_web_config;
  app.add_option("--metrics-web-config,--web.config.file", metrics_web_config,
                 "TLS and basic auth for --metrics: a Prometheus exporter web config file (YAML: tls_server_config, "
                 "basic_auth_users)");
  app.add_option("--arbiter", o.arbiter,
                 "who decides that a backup may take over: etcd (the default; needs --etcd-endpoints) or none "
                 "(fail-stop: a network partition or a frozen remusd can leave two running copies)")
      ->capture_default_str()
      ->check(CLI::IsMember({"etcd", "none"}));
  app.add_option("--etcd-endpoints", o.etcd_endpoints, "etcd client URLs, comma-separated (http://10.0.0.5:2379,...)")
      ->delimiter(',');
  app.add_option("--etcd-prefix", o.etcd_prefix, "key prefix in etcd, the same on both hosts")->capture_default_str();
  app.add_option("--etcd-cacert", o.etcd_cacert, "CA certificate etcd's server certificate is checked against");
  app.add_option("--etcd-cert", o.etcd_cert, "client certificate for etcd");
  app.add_option("--etcd-key", o.etcd_key, "client key for etcd");
  app.add_option("--host-id", o.host_id, "this host's name in etcd's ownership records (default: the hostname)");
  app.add_option("--lease-ttl-ms", o.lease_ttl_ms,
                 "ownership lease TTL: a backup takes over this long after the primary's last renewal")
      ->capture_default_str();
  app.add_option("--lease-margin-ms", o.lease_margin_ms,
                 "the primary pauses its guest this long before its lease could expire")
      ->capture_default_str();
  bool cleanup_only = false;
  std::string check_mode;
  // One-shot actions: not from a config file (remusd would never start).
  app.add_flag("--cleanup-netbuf", cleanup_only,
               "remove output-buffering rules and devices left by a dead remusd, then exit")
      ->configurable(false);
  app.add_option("--check-netbuf", check_mode, "say whether this kernel can run a netbuf mode (plug, nfqueue), then exit")
      ->check(CLI::IsMember({"plug", "nfqueue"}))
      ->configurable(false);
  app.add_option("--log-level", log_level, "debug, info, warn or error")->check(CLI::IsMember({"debug", "info", "warn", "error"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's own exit codes (100-127) as before; config-file errors get a
    // sentence naming the file and the fix.
    std::string what = e.what(), unknown = "INI was not able to parse ";
    std::string cfg = app.get_config_ptr() ? app.get_config_ptr()->as<std::string>() : "";
    if (what.rfind(unknown, 0) == 0)
      std::fprintf(stderr,
                   "remusd: --config %s: unknown setting '%s'; keys are remusd's long flag names without the dashes, "
                   "outside any [section] (see scripts/remusd.conf.example)\n",
                   cfg.c_str(), what.substr(unknown.size()).c_str());
    else if (dynamic_cast<const CLI::FileError*>(&e) || dynamic_cast<const CLI::ConfigError*>(&e))
      std::fprintf(stderr, "remusd: --config %s: %s (see scripts/remusd.conf.example)\n", cfg.c_str(), what.c_str());
    else
      return app.exit(e);
    return e.get_exit_code();
  }
  if (app.count("--key-file") > 0 && (!o.tls_cert.empty() || !o.tls_key.empty() || !o.tls_ca.empty())) {
    std::fprintf(stderr, "remusd: choose one way to authenticate replication links: --key-file or --tls-cert/--tls-key/--tls-ca\n");
    return 2;
  }
  if (hb_interval >= hb_timeout) {
    std::fprintf(stderr, "remusd: --heartbeat-interval-ms must be less than --heartbeat-timeout-ms\n");
    return 2;
  }
  o.heartbeat = {std::chrono::milliseconds(hb_interval), std::chrono::milliseconds(hb_timeout)};
  remus::SetLogLevel(log_level == "debug" ? remus::LogLevel::kDebug
                     : log_level == "warn" ? remus::LogLevel::kWarn
                     : log_level == "error" ? remus::LogLevel::kError
                                            : remus::LogLevel::kInfo);
  if (cleanup_only) {
    remus::Status c = remus::CleanupStaleNetbuf();
    if (!c.ok()) std::fprintf(stderr, "remusd: %s\n", c.message().c_str());
    return c.ok() ? 0 : 1;
  }
  if (!check_mode.empty()) {
    remus::Status c = remus::CheckNetbufSupport(check_mode);
    std::printf("%s: %s\n", check_mode.c_str(), c.ok() ? "supported" : c.message().c_str());
    return c.ok() ? 0 : 1;
  }
  if (!metrics_web_config.empty()) {
    if (o.metrics_listen.empty()) {
      std::fprintf(stderr, "remusd: --metrics-web-config needs --metrics ADDR:PORT\n");
      return 2;
    }
    auto web = remus::LoadWebConfig(metrics_web_config);
    if (!web.ok()) {
      std::fprintf(stderr, "remusd: %s\n", web.status().message().c_str());
      return 2;
    }
    o.metrics_web = std::move(*web);
  }
  if (remus::Status a = remus::ValidateArbiterOptions(o); !a.ok()) {
    std::fprintf(stderr, "remusd: %s\n", a.message().c_str());
    return 2;
  }
  if (!listen.empty()) {
    auto hp = remus::ParseHostPort(listen, 7788);
    if (!hp.ok()) {
      std::fprintf(stderr, "remusd: --listen: %s\n", hp.status().message().c_str());
      return 2;
    }
    o.listen = *hp;
  }
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // threads inherit this; one thread waits for them
  remus::Daemon d(o);
  remus::Status s = d.Start();
  if (!s.ok()) {
    std::fprintf(stderr, "remusd: %s\n", s.message().c_str());
    return 1;
  }
  std::thread sig([&] {
    int sno = 0;
    sigwait(&set, &sno);
    LOG_INFO("remusd") << "signal " << sno << ": shutting down";
    d.Shutdown();
  });
  d.Wait();  // returns once the signal thread has begun Shutdown()
  sig.join();
  return 0;
}
