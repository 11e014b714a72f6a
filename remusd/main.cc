// remusd: thin main; the daemon lives in daemon.cc.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <stdexcept>
#include <thread>

#include "common/log.h"
#include "netbuf/netbuf.h"
#include "remusd/config_file.h"
#include "remusd/daemon.h"

int main(int argc, char** argv) {
  remus::RemusdFlags f;
  CLI::App app{"remusd: Remus-style high availability for QEMU/KVM guests"};
  remus::AddRemusdFlags(&app, &f);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's own exit codes (100-127) as before; config-file errors get a
    // sentence naming the file and the fix.
    std::string cfg = app.get_config_ptr() ? app.get_config_ptr()->as<std::string>() : "";
    std::string why = remus::DescribeConfigError(e, cfg);
    if (why.empty()) return app.exit(e);
    std::fprintf(stderr, "remusd: %s\n", why.c_str());
    return e.get_exit_code();
  } catch (const std::out_of_range&) {
    std::fprintf(stderr, "remusd: %s\n", remus::kValueTooLarge);
    return 2;
  }
  if (remus::Status fin = remus::FinishRemusdFlags(&f); !fin.ok()) {
    std::fprintf(stderr, "remusd: %s\n", fin.message().c_str());
    return 2;
  }
  remus::DaemonOptions& o = f.daemon;
  const std::string& log_level = f.log_level;
  remus::SetLogLevel(log_level == "debug" ? remus::LogLevel::kDebug
                     : log_level == "warn" ? remus::LogLevel::kWarn
                     : log_level == "error" ? remus::LogLevel::kError
                                            : remus::LogLevel::kInfo);
  if (f.cleanup_netbuf) {
    remus::Status c = remus::CleanupStaleNetbuf();
    if (!c.ok()) std::fprintf(stderr, "remusd: %s\n", c.message().c_str());
    return c.ok() ? 0 : 1;
  }
  if (!f.check_netbuf.empty()) {
    remus::Status c = remus::CheckNetbufSupport(f.check_netbuf);
    std::printf("%s: %s\n", f.check_netbuf.c_str(), c.ok() ? "supported" : c.message().c_str());
    return c.ok() ? 0 : 1;
  }
  if (const std::string& metrics_web_config = f.metrics_web_config; !metrics_web_config.empty()) {
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
