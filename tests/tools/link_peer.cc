// link_peer: an authenticated but hostile primary, for end-to-end tests of
// what a backup accepts (docs/operator-guide.md, "What the backup accepts
// from a peer"). It holds the key, so TLS lets it in; then it sends the
// CONFIG it is given, verbatim, and prints every frame the backup answers
// with as one JSON line ({"type","epoch","payload"}) until the backup closes
// the link or the timeout passes.
//
// Usage: link_peer --connect HOST:PORT --key-file PATH --domain NAME
//                  --config FILE [--timeout-ms N]
// Exit: 0 once the backup answered or closed, 1 on a failed handshake, 2 on
// bad usage.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/io.h"
#include "common/log.h"
#include "replicator/link/tls.h"
#include "replicator/link/wire.h"

int main(int argc, char** argv) {
  std::string connect, key_file, domain, config_file;
  int timeout_ms = 5000;
  CLI::App app{"link_peer: send a CONFIG as an authenticated primary and print the backup's answer"};
  app.add_option("--connect", connect, "the backup's HOST:PORT")->required();
  app.add_option("--key-file", key_file, "the shared key")->required();
  app.add_option("--domain", domain, "the domain named in HELLO")->required();
  app.add_option("--config", config_file, "the CONFIG payload to send, verbatim")->required();
  app.add_option("--timeout-ms", timeout_ms, "how long to wait for the backup's answer");
  CLI11_PARSE(app, argc, argv);
  remus::SetLogLevel(remus::LogLevel::kWarn);

  std::ifstream in(config_file);
  std::stringstream ss;
  ss << in.rdbuf();
  auto hp = remus::ParseHostPort(connect, 7788);
  auto key = remus::wire::LoadKey(key_file);
  if (!hp.ok() || !key.ok() || !in) {
    std::fprintf(stderr, "link_peer: bad --connect, --key-file or --config\n");
    return 2;
  }
  remus::wire::LinkSecurity sec;
  sec.key = *key;
  auto ctx = remus::wire::TlsContext::Create(sec, remus::wire::TlsRole::kPrimary);
  auto fd = remus::ConnectTcp(*hp, timeout_ms);
  if (!ctx.ok() || !fd.ok()) {
    std::fprintf(stderr, "link_peer: %s\n", (ctx.ok() ? fd.status() : ctx.status()).ToString().c_str());
    return 1;
  }
  remus::wire::Link link(std::move(*fd));
  remus::Status hs = remus::wire::ClientHandshake(link, **ctx, hp->host, domain, timeout_ms);
  if (!hs.ok()) {
    std::fprintf(stderr, "link_peer: %s\n", hs.ToString().c_str());
    return 1;
  }
  remus::Status s = link.Send(remus::wire::MsgType::kConfig, 0, ss.str());
  if (!s.ok()) std::fprintf(stderr, "link_peer: sending CONFIG: %s\n", s.ToString().c_str());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto f = link.RecvUntil(deadline);
    if (!f.ok()) {
      std::printf("%s\n", nlohmann::json{{"end", f.status().ToString()}}.dump().c_str());
      return 0;
    }
    nlohmann::json line = {{"type", remus::wire::MsgTypeName(f->type)}, {"epoch", f->epoch}};
    line["payload"] = nlohmann::json::parse(f->payload, nullptr, false).is_discarded()
                          ? nlohmann::json(std::to_string(f->payload.size()) + " bytes")
                          : nlohmann::json::parse(f->payload);
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
  }
}
