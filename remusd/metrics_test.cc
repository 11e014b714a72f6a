#include "remusd/metrics.h"

#include <civetweb.h>
#include <crypt.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <map>
#include <regex>
#include <sstream>

#include "common/stats.h"

namespace remus {
namespace {

using nlohmann::json;

json PrimaryStatus(const std::string& name) {
  Histogram pause(Histogram::LatencySeconds()), ack(Histogram::LatencySeconds()), dirty(Histogram::PageCounts());
  for (double v : {0.0004, 0.003, 0.003, 0.02, 0.7, 30.0}) pause.Observe(v);
  ack.Observe(0.01);
  dirty.Observe(300);
  return {{"domain", name},
          {"role", "primary"},
          {"state", "protected"},
          {"last_acked_epoch", 41},
          {"unacked_epochs", 2},
          {"unacked_bytes", 8192},
          {"interval_ms", 100},
          {"checkpoints_total", 42},
          {"backpressure_waits", 3},
          {"initial_copy", {{"mode", "delta"}, {"pages_sent", 655}, {"pages_kept", 65290}, {"bytes_saved", 267427840}}},
          {"link", {{"bytes_sent", 123456789012ull}}},
          {"netbuf", {{"mode", "nfqueue"}, {"buffered_packets", 5}, {"dropped_packets", 1}, {"released_packets", 9}}},
          {"histograms",
           {{"pause_seconds", HistogramToJson(pause.Snapshot())},
            {"ack_seconds", HistogramToJson(ack.Snapshot())},
            {"dirty_pages", HistogramToJson(dirty.Snapshot())}}}};
}

// The value of the one sample line that starts with `series` + " ".
std::string Sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line, found;
  int n = 0;
  while (std::getline(in, line))
    if (line.rfind(series + " ", 0) == 0) {
      found = line.substr(series.size() + 1);
      n++;
    }
  EXPECT_EQ(n, 1) << series << " in\n" << text;
  return found;
}

TEST(RenderMetrics, CountersGaugesAndStateEnum) {
  std::string t = RenderMetrics(json::array({PrimaryStatus("web1")}));
  EXPECT_NE(t.find("# TYPE remus_checkpoints_total counter\n"), std::string::npos) << t;
  EXPECT_EQ(std::stod(Sample(t, R"(remus_checkpoints_total{domain="web1",role="primary"})")), 42);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_wire_sent_bytes_total{domain="web1",role="primary"})")), 123456789012.0);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_last_acked_epoch{domain="web1",role="primary"})")), 41);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_unacked_epochs{domain="web1",role="primary"})")), 2);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_netbuf_buffered_packets{domain="web1",role="primary"})")), 5);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_netbuf_dropped_packets_total{domain="web1",role="primary"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_checkpoint_interval_seconds{domain="web1",role="primary"})")), 0.1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_initial_copy_pages_sent{domain="web1",role="primary"})")), 655);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_initial_copy_pages_kept{domain="web1",role="primary"})")), 65290);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_initial_copy_saved_bytes{domain="web1",role="primary"})")), 267427840);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_domains{role="primary"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_domains{role="backup"})")), 0);
  // Enum style: every state of the role, exactly one of them 1.
  EXPECT_EQ(std::stod(Sample(t, R"(remus_state{domain="web1",role="primary",state="protected"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_state{domain="web1",role="primary",state="syncing"})")), 0);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_state{domain="web1",role="primary",state="unprotected"})")), 0);
  // Backup-only families are not invented for a primary.
  EXPECT_EQ(t.find("remus_failovers_total{"), std::string::npos);
}

TEST(RenderMetrics, ArbiterLeaseRenewalsFencesAndToken) {
  json d = PrimaryStatus("web1");
  Histogram renew(Histogram::LatencySeconds());
  renew.Observe(0.002);
  renew.Observe(0.004);
  d["arbiter"] = {{"name", "etcd"},   {"state", "fenced"},   {"renewals", 17},
                  {"renewal_failures", 2}, {"fence_events", 1}, {"token", 1234},
                  {"deadline_in_ms", -250}, {"histograms", {{"renewal_seconds", HistogramToJson(renew.Snapshot())}}}};
  std::string t = RenderMetrics(json::array({d}));
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_lease_renewals_total{domain="web1",role="primary"})")), 17);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_lease_renewal_failures_total{domain="web1",role="primary"})")), 2);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_fence_events_total{domain="web1",role="primary"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_fencing_token{domain="web1",role="primary"})")), 1234);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_lease_deadline_seconds{domain="web1",role="primary"})")), -0.25);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_lease_state{domain="web1",role="primary",state="fenced"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_lease_state{domain="web1",role="primary",state="held"})")), 0);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_arbiter_lease_renewal_seconds_count{domain="web1",role="primary"})")), 2);
  // --arbiter none: no lease families at all.
  d["arbiter"] = {{"name", "none"}, {"warning", "..."}};
  t = RenderMetrics(json::array({d}));
  EXPECT_EQ(t.find("remus_arbiter_"), std::string::npos) << t;
}

TEST(RenderMetrics, HistogramBucketsAreCumulativeWithInf) {
  std::string t = RenderMetrics(json::array({PrimaryStatus("web1")}));
  EXPECT_NE(t.find("# TYPE remus_pause_seconds histogram\n"), std::string::npos) << t;
  std::regex bucket(R"re(remus_pause_seconds_bucket\{domain="web1",role="primary",le="([^"]+)"\} (\S+))re");
  std::vector<std::pair<std::string, double>> buckets;
  for (std::sregex_iterator it(t.begin(), t.end(), bucket), end; it != end; ++it)
    buckets.emplace_back((*it)[1], std::stod((*it)[2]));
  ASSERT_EQ(buckets.size(), Histogram::LatencySeconds().size() + 1) << t;
  double prev_le = -1, prev_count = 0;
  for (size_t i = 0; i + 1 < buckets.size(); i++) {
    double le = std::stod(buckets[i].first);
    EXPECT_GT(le, prev_le);
    EXPECT_GE(buckets[i].second, prev_count) << "bucket le=" << buckets[i].first;
    prev_le = le;
    prev_count = buckets[i].second;
  }
  EXPECT_EQ(buckets.back().first, "+Inf");
  double count = std::stod(Sample(t, R"(remus_pause_seconds_count{domain="web1",role="primary"})"));
  EXPECT_EQ(buckets.back().second, count);
  EXPECT_EQ(count, 6);
  EXPECT_GE(buckets.back().second, prev_count);
  EXPECT_EQ(prev_count, 5);  // 30 s is above the last bound: only in +Inf
  EXPECT_NEAR(std::stod(Sample(t, R"(remus_pause_seconds_sum{domain="web1",role="primary"})")),
              0.0004 + 0.003 + 0.003 + 0.02 + 0.7 + 30.0, 1e-9);
  // le="0.0005" holds the 0.4 ms sample; le="0.0025" not yet the 3 ms ones.
  EXPECT_EQ(buckets[0].first, "0.0005");
  EXPECT_EQ(buckets[0].second, 1);
  EXPECT_EQ(buckets[2].second, 1);
  EXPECT_EQ(buckets[3].second, 3);
  EXPECT_NE(t.find("remus_ack_latency_seconds_count{domain=\"web1\",role=\"primary\"} 1"), std::string::npos);
  EXPECT_NE(t.find("remus_dirty_pages_per_epoch_sum{domain=\"web1\",role=\"primary\"} 300"), std::string::npos);
}

TEST(RenderMetrics, LabelValuesAreEscaped) {
  std::string t = RenderMetrics(json::array({PrimaryStatus("we\"b\\1\nx")}));
  EXPECT_NE(t.find(R"(remus_checkpoints_total{domain="we\"b\\1\nx",role="primary"} 42)"), std::string::npos) << t;
  // No raw newline inside a sample line: every line is a comment or a sample.
  std::istringstream in(t);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    EXPECT_TRUE(line[0] == '#' || line.rfind("remus_", 0) == 0) << "stray line: " << line;
  }
}

TEST(RenderMetrics, BackupAfterFailoverAndMalformedInput) {
  Histogram apply(Histogram::LatencySeconds());
  apply.Observe(0.002);
  json b = {{"domain", "db"},
            {"role", "primary (promoted)"},
            {"state", "failed-over"},
            {"last_committed_epoch", 7},
            {"checkpoints_total", 7},
            {"failovers_total", 1},
            {"connected", false},
            {"link", {{"bytes_received", 999}}},
            {"histograms", {{"apply_seconds", HistogramToJson(apply.Snapshot())}}}};
  json broken = PrimaryStatus("web2");
  broken["histograms"]["pause_seconds"]["cumulative"][0] = 1000;  // not cumulative any more
  std::string t = RenderMetrics(json::array({b, broken, 17}));
  EXPECT_EQ(std::stod(Sample(t, R"(remus_failovers_total{domain="db",role="backup"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_state{domain="db",role="backup",state="failed-over"})")), 1);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_state{domain="db",role="backup",state="waiting"})")), 0);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_last_committed_epoch{domain="db",role="backup"})")), 7);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_wire_received_bytes_total{domain="db",role="backup"})")), 999);
  EXPECT_EQ(std::stod(Sample(t, R"(remus_apply_seconds_count{domain="db",role="backup"})")), 1);
  // A malformed histogram is left out, not exported wrong.
  EXPECT_EQ(t.find(R"(remus_pause_seconds_count{domain="web2")"), std::string::npos) << t;
  EXPECT_NE(t.find(R"(remus_ack_latency_seconds_count{domain="web2")"), std::string::npos) << t;
  // Each family's TYPE line appears once even with several domains.
  size_t first = t.find("# TYPE remus_state gauge"), again = t.find("# TYPE remus_state gauge", first + 1);
  EXPECT_NE(first, std::string::npos);
  EXPECT_EQ(again, std::string::npos);
}

// One HTTP exchange on 127.0.0.1:port; returns everything the server sent
// before closing.
std::string HttpExchange(int port, const std::string& request) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) break;
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r <= 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  ::close(fd);
  return out;
}

TEST(MetricsServer, ServesGetMetricsOnly) {
  int calls = 0;
  auto s = MetricsServer::Start("127.0.0.1:0", [&] {
    calls++;
    return json::array({PrimaryStatus("web1")});
  });
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  int port = (*s)->port();
  ASSERT_GT(port, 0);

  std::string r = HttpExchange(port, "GET /metrics HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
  EXPECT_NE(r.find("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), std::string::npos) << r;
  EXPECT_NE(r.find("remus_checkpoints_total{domain=\"web1\",role=\"primary\"} 42\n"), std::string::npos) << r;
  EXPECT_EQ(calls, 1);

  r = HttpExchange(port, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;

  r = HttpExchange(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 404 ", 0), 0u) << r;
  r = HttpExchange(port, "GET /etc/passwd HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 404 ", 0), 0u) << r;
  r = HttpExchange(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 405 ", 0), 0u) << r;
  EXPECT_NE(r.find("Allow: GET\r\n"), std::string::npos) << r;
  r = HttpExchange(port, "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 405 ", 0), 0u) << r;
  EXPECT_EQ(calls, 2);

  // Headers past the bound: refused, never collected.
  std::string big = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + std::string(64 * 1024, 'a') + "\r\n\r\n";
  r = HttpExchange(port, big);
  EXPECT_EQ(r.find("HTTP/1.1 200"), std::string::npos) << r.substr(0, 200);
  EXPECT_EQ(calls, 2);
  // ... and the server still answers afterwards.
  r = HttpExchange(port, "GET /metrics HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
}

TEST(MetricsServer, BasicAuthGuardsEveryPath) {
  char salt[CRYPT_GENSALT_OUTPUT_SIZE];
  ASSERT_NE(crypt_gensalt_rn("$2b$", 4, nullptr, 0, salt, sizeof salt), nullptr);
  crypt_data data{};
  WebConfig web;
  web.path = "web.yml";
  web.basic_auth_users["alice"] = crypt_rn("pw", salt, &data, sizeof data);
  auto s = MetricsServer::Start("127.0.0.1:0", [] { return json::array({PrimaryStatus("web1")}); }, &web);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_FALSE((*s)->tls());
  int port = (*s)->port();
  std::string r = HttpExchange(port, "GET /metrics HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 401 ", 0), 0u) << r;
  EXPECT_NE(r.find("WWW-Authenticate: Basic realm="), std::string::npos) << r;
  EXPECT_EQ(r.find("remus_"), std::string::npos) << r;
  // "alice:px", then "alice:pw", base64.
  r = HttpExchange(port, "GET /metrics HTTP/1.0\r\nAuthorization: Basic YWxpY2U6cHg=\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 401 ", 0), 0u) << r;
  r = HttpExchange(port, "GET / HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 401 ", 0), 0u) << r;
  r = HttpExchange(port, "GET /metrics HTTP/1.0\r\nAuthorization: Basic YWxpY2U6cHc=\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
  EXPECT_NE(r.find("remus_checkpoints_total{domain=\"web1\",role=\"primary\"} 42\n"), std::string::npos) << r;
  r = HttpExchange(port, "GET / HTTP/1.0\r\nAuthorization: Basic YWxpY2U6cHc=\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 404 ", 0), 0u) << r;
}

TEST(MetricsServer, TlsErrorsNameTheFile) {
  WebConfig web;
  web.path = "/etc/remus/web.yml";
  web.tls = WebTlsConfig{};
  web.tls->cert_file = "/nonexistent/metrics.crt";
  web.tls->key_file = "/nonexistent/metrics.key";
  auto s = MetricsServer::Start("127.0.0.1:0", [] { return json::array(); }, &web);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Code::kFailedPrecondition) << s.status().ToString();
  EXPECT_NE(s.status().message().find("metrics web config /etc/remus/web.yml: tls_server_config.cert_file "
                                      "/nonexistent/metrics.crt: "),
            std::string::npos)
      << s.status().message();
}

TEST(MetricsServer, AddressErrorsSayWhatToUse) {
  for (std::string bad : {"9100", "localhost:9100", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:9100s",
                          "1.2.3.4:80,5.6.7.8:90", "[::1:9100"}) {
    auto s = MetricsServer::Start(bad, [] { return json::array(); });
    EXPECT_EQ(s.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_NE(s.status().message().find("--metrics " + bad), std::string::npos) << s.status().message();
    EXPECT_NE(s.status().message().find("ADDR:PORT"), std::string::npos) << s.status().message();
  }
  auto v6 = MetricsServer::Start("[::1]:0", [] { return json::array(); });
  if (mg_check_feature(MG_FEATURES_IPV6)) {
    EXPECT_TRUE(v6.ok()) << v6.status().ToString();
  } else {
    EXPECT_EQ(v6.status().code(), Code::kInvalidArgument);
    EXPECT_NE(v6.status().message().find("no IPv6 support, use IPv4"), std::string::npos) << v6.status().message();
  }
  auto first = MetricsServer::Start("127.0.0.1:0", [] { return json::array(); });
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  std::string taken = "127.0.0.1:" + std::to_string((*first)->port());
  auto second = MetricsServer::Start(taken, [] { return json::array(); });
  EXPECT_EQ(second.status().code(), Code::kUnavailable);
  EXPECT_NE(second.status().message().find("cannot serve metrics on " + taken), std::string::npos)
      << second.status().message();
}

}  // namespace
}  // namespace remus
