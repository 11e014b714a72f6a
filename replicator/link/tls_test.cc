// The link's TLS: both ways to authenticate, every way a handshake fails and
// the sentence it fails with, and a stream altered after the handshake.
#include "replicator/link/tls.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <cstdio>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "common/io.h"
#include "tests/fakes/loopback_link.h"
#include "tests/fakes/status_matchers.h"

namespace remus::wire {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// Both ends of a link over a socketpair (tests/fakes/loopback_link.h).
using Pair = remus::testing::LinkPair;
Pair SocketPair(int buffer_bytes = 0) { return remus::testing::MakeLoopbackLinks(buffer_bytes); }

Key TestKey(char fill) { return Key(std::string(32, fill)); }

std::shared_ptr<const TlsContext> Ctx(const LinkSecurity& sec, TlsRole role) {
  auto c = TlsContext::Create(sec, role);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : nullptr;
}

LinkSecurity Psk(char fill) {
  LinkSecurity s;
  s.key = TestKey(fill);
  return s;
}

struct HandshakeResult {
  Status client;
  StatusOr<std::string> server = Internal("not run");
};

HandshakeResult Handshake(Link& client, Link& server, const LinkSecurity& cs, const LinkSecurity& ss,
                          std::string_view host = "localhost", int timeout_ms = 5000) {
  auto cc = Ctx(cs, TlsRole::kPrimary);
  auto sc = Ctx(ss, TlsRole::kBackup);
  HandshakeResult r;
  if (!cc || !sc) return r;
  std::thread st([&] { r.server = ServerHandshake(server, *sc, timeout_ms); });
  r.client = ClientHandshake(client, *cc, host, "web1", timeout_ms);
  st.join();
  return r;
}

// ---- Certificates made for the tests -----------------------------------------

struct Cert {
  std::string cert, key;  // PEM file paths
  EVP_PKEY* pkey = nullptr;
  X509* x509 = nullptr;
};

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/remus-tls-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (Cert& c : certs_) {
      EVP_PKEY_free(c.pkey);
      X509_free(c.x509);
    }
    (void)std::system(("rm -rf " + dir_).c_str());
  }

  // A P-256 certificate for `cn` (also its DNS SAN, or IP SAN when it looks
  // like one), valid from now+from_s to now+to_s, signed by `issuer`
  // (self-signed CA when null).
  const Cert& Make(const std::string& name, const std::string& cn, const Cert* issuer, long from_s = -3600,
                   long to_s = 86400) {
    Cert& c = certs_.emplace_back();
    c.pkey = EVP_EC_gen("P-256");
    c.x509 = X509_new();
    X509_set_version(c.x509, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(c.x509), static_cast<long>(certs_.size()) + 1);
    X509_gmtime_adj(X509_getm_notBefore(c.x509), from_s);
    X509_gmtime_adj(X509_getm_notAfter(c.x509), to_s);
    X509_set_pubkey(c.x509, c.pkey);
    X509_NAME* n = X509_get_subject_name(c.x509);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    X509_set_issuer_name(c.x509, issuer ? X509_get_subject_name(issuer->x509) : n);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, issuer ? issuer->x509 : c.x509, c.x509, nullptr, nullptr, 0);
    auto add = [&](int nid, const std::string& value) {
      X509_EXTENSION* e = X509V3_EXT_conf_nid(nullptr, &v3, nid, value.c_str());
      ASSERT_NE(e, nullptr) << value;
      X509_add_ext(c.x509, e, -1);
      X509_EXTENSION_free(e);
    };
    if (!issuer) {
      add(NID_basic_constraints, "critical,CA:TRUE");
      add(NID_key_usage, "critical,keyCertSign,cRLSign");
    } else {
      const bool ip = cn.find_first_not_of("0123456789.") == std::string::npos;
      add(NID_subject_alt_name, (ip ? "IP:" : "DNS:") + cn);
      add(NID_ext_key_usage, "serverAuth,clientAuth");
    }
    EXPECT_GT(X509_sign(c.x509, issuer ? issuer->pkey : c.pkey, EVP_sha256()), 0);
    c.cert = dir_ + "/" + name + ".crt";
    c.key = dir_ + "/" + name + ".key";
    FILE* f = std::fopen(c.cert.c_str(), "w");
    PEM_write_X509(f, c.x509);
    std::fclose(f);
    f = std::fopen(c.key.c_str(), "w");
    PEM_write_PrivateKey(f, c.pkey, nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(f);
    ::chmod(c.key.c_str(), 0600);
    return c;
  }

  LinkSecurity Certs(const Cert& leaf, const Cert& ca, std::string peer_name = "") {
    LinkSecurity s;
    s.cert_file = leaf.cert;
    s.key_file = leaf.key;
    s.ca_file = ca.cert;
    s.peer_name = std::move(peer_name);
    return s;
  }

  std::string dir_;
  std::deque<Cert> certs_;
};

// ---- The shared key ---------------------------------------------------------------

TEST_F(TlsTest, SameKeyAuthenticatesAndEncrypts) {
  auto [c, s] = SocketPair();
  auto hex = GenerateKeyHex();
  ASSERT_TRUE(hex.ok());
  LinkSecurity sec;
  sec.key = Key(*hex);
  auto r = Handshake(*c, *s, sec, sec);
  ASSERT_TRUE(r.client.ok()) << r.client.ToString();
  ASSERT_TRUE(r.server.ok()) << r.server.status().ToString();
  EXPECT_EQ(*r.server, "web1");
  EXPECT_TRUE(c->encrypted());
  EXPECT_THAT(c->Cipher(), HasSubstr("TLSv1.3"));
  ASSERT_TRUE(c->Send(MsgType::kPages, 1, "data").ok());
  auto f = s->Recv();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->payload, "data");
  ASSERT_TRUE(s->Send(MsgType::kAck, 1, "").ok());
  f = c->Recv();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->type, MsgType::kAck);
}

TEST_F(TlsTest, WorksOverLoopbackTcpWithBigFrames) {
  auto listener = ListenTcp({"127.0.0.1", 0});
  ASSERT_TRUE(listener.ok());
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(listener->get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
  auto sc = Ctx(Psk('k'), TlsRole::kBackup);
  std::string big(kMaxPayload, 'x');
  for (size_t i = 0; i < big.size(); i += 4096) big[i] = static_cast<char>(i >> 12);
  StatusOr<std::string> server = Internal("not run");
  bool same = false;
  std::thread st([&] {
    auto fd = Accept(listener->get());
    ASSERT_TRUE(fd.ok());
    Link link(std::move(*fd));
    server = ServerHandshake(link, *sc, 5000);
    if (!server.ok()) return;
    auto f = link.Recv();
    same = f.ok() && f->payload == big;
    (void)link.Send(MsgType::kAck, 12, "");
  });
  auto fd = ConnectTcp({"127.0.0.1", ntohs(addr.sin_port)}, 5000);
  ASSERT_TRUE(fd.ok());
  Link client(std::move(*fd));
  ASSERT_TRUE(ClientHandshake(client, *cc, "127.0.0.1", "db-7", 5000).ok());
  ASSERT_TRUE(client.Send(MsgType::kPages, 12, big).ok());
  auto ack = client.Recv();
  st.join();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  EXPECT_TRUE(same);
  ASSERT_TRUE(ack.ok());
  EXPECT_EQ(ack->epoch, 12u);
}

TEST_F(TlsTest, WrongKeyNamesBothFingerprints) {
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Psk('a'), Psk('b'));
  EXPECT_CODE(r.client, Code::kUnauthenticated);
  EXPECT_THAT(r.client.message(), HasSubstr("backup at"));
  EXPECT_THAT(r.client.message(), HasSubstr("holds a different key"));
  EXPECT_THAT(r.client.message(), HasSubstr(KeyFingerprint(TestKey('a'))));
  ASSERT_FALSE(r.server.ok());
  EXPECT_CODE(r.server.status(), Code::kUnauthenticated);
  EXPECT_THAT(r.server.status().message(), HasSubstr("the key files differ"));
  EXPECT_THAT(r.server.status().message(), HasSubstr(KeyFingerprint(TestKey('a'))));
  EXPECT_THAT(r.server.status().message(), HasSubstr(KeyFingerprint(TestKey('b'))));
}

// ---- Not TLS ----------------------------------------------------------------------

TEST_F(TlsTest, BackupTellsAPlainRemusPrimaryToUpgrade) {
  auto [raw, s] = SocketPair();
  auto sc = Ctx(Psk('k'), TlsRole::kBackup);
  StatusOr<std::string> server = Internal("not run");
  std::thread st([&, &s = s] { server = ServerHandshake(*s, *sc, 5000); });
  // Version 1's opening: a plain HELLO frame.
  ASSERT_TRUE(raw->Send(MsgType::kHello, 0, R"({"version":1,"domain":"web1","nonce":"00"})").ok());
  auto err = raw->Recv();
  st.join();
  EXPECT_CODE(server.status(), Code::kUnauthenticated);
  EXPECT_THAT(server.status().message(), HasSubstr("does not speak TLS"));
  EXPECT_THAT(server.status().message(), HasSubstr("upgrade it"));
  ASSERT_TRUE(err.ok()) << err.status().ToString();
  ASSERT_EQ(err->type, MsgType::kError);
  EXPECT_THAT(DecodeError(err->payload).message(), HasSubstr("requires TLS"));
}

TEST_F(TlsTest, BackupRefusesAnythingElseByItsFirstBytes) {
  auto [raw, s] = SocketPair();
  auto sc = Ctx(Psk('k'), TlsRole::kBackup);
  StatusOr<std::string> server = Internal("not run");
  std::thread st([&, &s = s] { server = ServerHandshake(*s, *sc, 5000); });
  ASSERT_TRUE(WriteFull(raw->fd(), "GET / HTTP/1.1\r\n\r\n", 18).ok());
  st.join();
  EXPECT_CODE(server.status(), Code::kUnauthenticated);
  EXPECT_THAT(server.status().message(), HasSubstr("does not speak TLS (its first bytes are 47 45 54 20)"));
}

// A peer that sends fewer than the 4 bytes judged and hangs up is judged at
// once, not after the handshake timeout.
TEST_F(TlsTest, BackupJudgesAShortOpeningWhenThePeerHangsUp) {
  auto [raw, s] = SocketPair();
  auto sc = Ctx(Psk('k'), TlsRole::kBackup);
  ASSERT_TRUE(WriteFull(raw->fd(), "ab", 2).ok());
  ::shutdown(raw->fd(), SHUT_WR);
  auto start = std::chrono::steady_clock::now();
  auto r = ServerHandshake(*s, *sc, 5000);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(1000));
  EXPECT_CODE(r.status(), Code::kUnauthenticated);
  EXPECT_THAT(r.status().message(), HasSubstr("does not speak TLS (its first bytes are 61 62 00 00)"));
}

TEST_F(TlsTest, PrimaryRefusesABackupThatDoesNotSpeakTls) {
  auto [c, raw] = SocketPair();
  auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
  std::thread st([&, &raw = raw] {
    char buf[512];
    (void)::read(raw->fd(), buf, sizeof buf);  // the ClientHello
    (void)WriteFull(raw->fd(), "SSH-2.0-OpenSSH_9.2\r\n", 21);
  });
  Status s = ClientHandshake(*c, *cc, "localhost", "web1", 5000);
  st.join();
  EXPECT_CODE(s, Code::kUnauthenticated);
  EXPECT_THAT(s.message(), HasSubstr("does not speak TLS"));
}

TEST_F(TlsTest, PrimaryExplainsABackupThatHangsUp) {
  auto [c, raw] = SocketPair();
  auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
  std::thread st([&, &raw = raw] {
    char buf[512];
    (void)::read(raw->fd(), buf, sizeof buf);
    raw->Shutdown();  // what a remus without TLS does with a ClientHello
  });
  Status s = ClientHandshake(*c, *cc, "localhost", "web1", 5000);
  st.join();
  EXPECT_CODE(s, Code::kUnauthenticated);
  EXPECT_THAT(s.message(), HasSubstr("closed the connection during the TLS handshake"));
}

TEST_F(TlsTest, SilentPeersHitTheDeadline) {
  {
    auto [c, s] = SocketPair();
    auto sc = Ctx(Psk('k'), TlsRole::kBackup);
    auto start = std::chrono::steady_clock::now();
    auto r = ServerHandshake(*s, *sc, 300);
    EXPECT_CODE(r.status(), Code::kDeadlineExceeded);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(2000));
  }
  {
    auto [c, s] = SocketPair();
    auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
    auto start = std::chrono::steady_clock::now();
    Status r = ClientHandshake(*c, *cc, "localhost", "web1", 300);
    EXPECT_CODE(r, Code::kDeadlineExceeded);
    EXPECT_THAT(r.message(), HasSubstr("TLS handshake"));
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(2000));
  }
}

TEST_F(TlsTest, SlowDripClientHitsTheDeadline) {
  auto [raw, s] = SocketPair();
  auto sc = Ctx(Psk('k'), TlsRole::kBackup);
  std::atomic<bool> stop{false};
  std::thread dripper([&, &raw = raw] {
    const char rec[] = "\x16\x03\x01\x02\x00";  // a TLS record header promising 512 bytes
    (void)WriteFull(raw->fd(), rec, 5);
    while (!stop) {
      if (!WriteFull(raw->fd(), "\x01", 1).ok()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  auto start = std::chrono::steady_clock::now();
  auto r = ServerHandshake(*s, *sc, 300);
  EXPECT_CODE(r.status(), Code::kDeadlineExceeded);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(1000));
  stop = true;
  s->Shutdown();
  dripper.join();
}

// ---- Inside TLS: HELLO ------------------------------------------------------------

TEST_F(TlsTest, VersionMismatchInsideTlsNamesBothVersions) {
  auto [c, s] = SocketPair();
  auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
  auto sc = Ctx(Psk('k'), TlsRole::kBackup);
  StatusOr<std::string> server = Internal("not run");
  std::thread st([&, &s = s] { server = ServerHandshake(*s, *sc, 5000); });
  ASSERT_TRUE(StartTls(*c, *cc, "localhost", 5000).ok());
  ASSERT_TRUE(c->Send(MsgType::kHello, 0, R"({"version":7,"domain":"web1"})").ok());
  auto err = c->Recv();
  st.join();
  EXPECT_CODE(server.status(), Code::kFailedPrecondition);
  EXPECT_THAT(server.status().message(), HasSubstr("version 7"));
  ASSERT_TRUE(err.ok());
  EXPECT_CODE(DecodeError(err->payload), Code::kFailedPrecondition);
}

// A domain name the backup would not use (it names a directory there) is
// refused in answer to HELLO, never after AUTH_OK; the primary checks the
// same rule before it connects.
TEST_F(TlsTest, ADomainNameOutsideTheNameRuleIsRefusedBeforeAuthOk) {
  for (const std::string& bad : std::vector<std::string>{"../etc", "", "web 1", std::string(65, 'a'), "-x"}) {
    auto [c, s] = SocketPair();
    auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
    auto sc = Ctx(Psk('k'), TlsRole::kBackup);
    StatusOr<std::string> server = Internal("not run");
    std::thread st([&, &s = s] { server = ServerHandshake(*s, *sc, 5000); });
    ASSERT_TRUE(StartTls(*c, *cc, "localhost", 5000).ok());
    ASSERT_TRUE(c->Send(MsgType::kHello, 0, json{{"version", kProtocolVersion}, {"domain", bad}}.dump()).ok());
    auto answer = c->Recv();
    st.join();
    EXPECT_CODE(server.status(), Code::kInvalidArgument) << bad;
    EXPECT_THAT(server.status().message(), HasSubstr("not a usable name")) << bad;
    ASSERT_TRUE(answer.ok()) << answer.status().ToString();
    EXPECT_EQ(answer->type, MsgType::kError) << bad;  // not AUTH_OK
    EXPECT_THAT(DecodeError(answer->payload).message(), HasSubstr("invalid domain name")) << bad;
    auto [c2, s2] = SocketPair();
    Status local = ClientHandshake(*c2, *cc, "localhost", bad, 5000);
    EXPECT_CODE(local, Code::kInvalidArgument) << bad;
    EXPECT_THAT(local.message(), HasSubstr("not a usable name")) << bad;
  }
}

TEST_F(TlsTest, FramesOtherThanHelloAreRefused) {
  for (MsgType t : {MsgType::kConfig, MsgType::kFailover, MsgType::kPages}) {
    auto [c, s] = SocketPair();
    auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
    auto sc = Ctx(Psk('k'), TlsRole::kBackup);
    StatusOr<std::string> server = Internal("not run");
    std::thread st([&, &s = s] { server = ServerHandshake(*s, *sc, 5000); });
    ASSERT_TRUE(StartTls(*c, *cc, "localhost", 5000).ok());
    ASSERT_TRUE(c->Send(t, 0, "{}").ok());
    st.join();
    EXPECT_FALSE(server.ok()) << MsgTypeName(t);
    EXPECT_THAT(server.status().message(), HasSubstr("instead of HELLO"));
  }
}

// ---- Certificates -----------------------------------------------------------------

TEST_F(TlsTest, CertificatesSignedByTheCaAuthenticateWithNamesChecked) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& a = Make("a", "a.example", &ca);
  const Cert& b = Make("b", "b.example", &ca);
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Certs(a, ca), Certs(b, ca, "a.example"), "b.example");
  ASSERT_TRUE(r.client.ok()) << r.client.ToString();
  ASSERT_TRUE(r.server.ok()) << r.server.status().ToString();
  ASSERT_TRUE(c->Send(MsgType::kCommit, 3, "x").ok());
  auto f = s->Recv();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->epoch, 3u);
}

TEST_F(TlsTest, AnIpAddressIsCheckedAgainstTheIpSan) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& a = Make("a", "a.example", &ca);
  const Cert& b = Make("b", "10.0.0.2", &ca);
  {
    auto [c, s] = SocketPair();
    auto r = Handshake(*c, *s, Certs(a, ca), Certs(b, ca), "10.0.0.2");
    EXPECT_TRUE(r.client.ok()) << r.client.ToString();
  }
  {
    auto [c, s] = SocketPair();
    auto r = Handshake(*c, *s, Certs(a, ca), Certs(b, ca), "10.0.0.3");
    EXPECT_CODE(r.client, Code::kUnauthenticated);
    EXPECT_THAT(r.client.message(), HasSubstr("IP address mismatch"));
  }
}

TEST_F(TlsTest, TheBackupsNameMustMatch) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& a = Make("a", "a.example", &ca);
  const Cert& b = Make("b", "b.example", &ca);
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Certs(a, ca), Certs(b, ca), "c.example");
  EXPECT_CODE(r.client, Code::kUnauthenticated);
  EXPECT_THAT(r.client.message(), HasSubstr("does not trust: hostname mismatch"));
  EXPECT_THAT(r.client.message(), HasSubstr("CN=b.example"));
  EXPECT_THAT(r.client.message(), HasSubstr("expected c.example"));
  EXPECT_FALSE(r.server.ok());
}

TEST_F(TlsTest, TheBackupChecksThePrimarysNameWhenTold) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& a = Make("a", "a.example", &ca);
  const Cert& b = Make("b", "b.example", &ca);
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Certs(a, ca), Certs(b, ca, "z.example"), "b.example");
  EXPECT_CODE(r.server.status(), Code::kUnauthenticated);
  EXPECT_THAT(r.server.status().message(), HasSubstr("hostname mismatch (expected z.example)"));
  EXPECT_CODE(r.client, Code::kUnauthenticated);
  // One sentence from the alert itself (Link::PeerTlsAlert), not the read
  // error annotated: who refused, which alert, what this host presents.
  EXPECT_THAT(r.client.message(), ::testing::StartsWith("backup at "));
  EXPECT_THAT(r.client.message(), HasSubstr("refused this host's certificate (TLS alert"));
  EXPECT_THAT(r.client.message(), HasSubstr("This host presents certificate CN=a.example"));
  EXPECT_THAT(r.client.message(), ::testing::Not(HasSubstr("waiting for AUTH_OK")));
  EXPECT_GE(c->PeerTlsAlert(), 0);
}

TEST_F(TlsTest, ACertificateFromAnotherCaIsRefusedOnBothSides) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& other = Make("other", "someone else's CA", nullptr);
  const Cert& a = Make("a", "a.example", &other);
  const Cert& b = Make("b", "b.example", &ca);
  auto [c, s] = SocketPair();
  // The primary trusts the other CA too, so only the backup refuses.
  LinkSecurity cs = Certs(a, other);
  cs.ca_file = dir_ + "/both.pem";
  ASSERT_EQ(std::system(("cat " + ca.cert + " " + other.cert + " > " + cs.ca_file).c_str()), 0);
  auto r = Handshake(*c, *s, cs, Certs(b, ca), "b.example");
  EXPECT_CODE(r.server.status(), Code::kUnauthenticated);
  EXPECT_THAT(r.server.status().message(), HasSubstr("primary at"));
  EXPECT_THAT(r.server.status().message(), HasSubstr("does not trust"));
  EXPECT_CODE(r.client, Code::kUnauthenticated);
}

TEST_F(TlsTest, AnExpiredCertificateIsRefusedWithItsDate) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& b = Make("b", "b.example", &ca);
  const Cert& old = Make("old", "a.example", &ca, -86400 * 10, -86400);
  // Our own expired certificate is refused at start...
  auto mine = TlsContext::Create(Certs(old, ca), TlsRole::kPrimary);
  EXPECT_CODE(mine.status(), Code::kInvalidArgument);
  EXPECT_THAT(mine.status().message(), HasSubstr("expired on"));
  // ...and one that expired while remusd ran is refused by the peer.
  const Cert& soon = Make("soon", "a.example", &ca, -3600, 2);
  auto cc = Ctx(Certs(soon, ca), TlsRole::kPrimary);
  auto sc = Ctx(Certs(b, ca), TlsRole::kBackup);
  ASSERT_TRUE(cc && sc);
  std::this_thread::sleep_for(std::chrono::milliseconds(3100));
  auto [c, s] = SocketPair();
  StatusOr<std::string> server = Internal("not run");
  std::thread st([&, &s = s] { server = ServerHandshake(*s, *sc, 5000); });
  Status client = ClientHandshake(*c, *cc, "b.example", "web1", 5000);
  st.join();
  EXPECT_CODE(server.status(), Code::kUnauthenticated);
  EXPECT_THAT(server.status().message(), HasSubstr("does not trust: certificate has expired on"));
  EXPECT_CODE(client, Code::kUnauthenticated);
  EXPECT_THAT(client.message(), HasSubstr("refused this host's certificate (TLS alert \"certificate expired\")"));
}

TEST_F(TlsTest, ModesMustMatch) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& a = Make("a", "a.example", &ca);
  const Cert& b = Make("b", "b.example", &ca);
  {
    auto [c, s] = SocketPair();
    auto r = Handshake(*c, *s, Psk('k'), Certs(b, ca), "b.example");
    EXPECT_CODE(r.client, Code::kUnauthenticated);
    EXPECT_THAT(r.client.message(), HasSubstr("answered with a certificate instead of the shared key"));
    EXPECT_FALSE(r.server.ok());
  }
  {
    auto [c, s] = SocketPair();
    auto r = Handshake(*c, *s, Certs(a, ca), Psk('k'), "b.example");
    EXPECT_CODE(r.server.status(), Code::kUnauthenticated);
    EXPECT_THAT(r.server.status().message(), HasSubstr("offered no shared key"));
    EXPECT_CODE(r.client, Code::kUnauthenticated);
  }
}

TEST_F(TlsTest, ContextsRefuseBadConfigurations) {
  const Cert& ca = Make("ca", "remus test CA", nullptr);
  const Cert& a = Make("a", "a.example", &ca);
  const Cert& b = Make("b", "b.example", &ca);
  EXPECT_CODE(TlsContext::Create({}, TlsRole::kPrimary).status(), Code::kInvalidArgument);
  LinkSecurity both = Certs(a, ca);
  both.key = TestKey('k');
  auto r = TlsContext::Create(both, TlsRole::kBackup);
  EXPECT_THAT(r.status().message(), HasSubstr("not both"));
  LinkSecurity partial;
  partial.cert_file = a.cert;
  EXPECT_THAT(TlsContext::Create(partial, TlsRole::kBackup).status().message(), HasSubstr("all three"));
  LinkSecurity mismatched = Certs(a, ca);
  mismatched.key_file = b.key;
  EXPECT_THAT(TlsContext::Create(mismatched, TlsRole::kBackup).status().message(),
              HasSubstr("is not the private key of --tls-cert"));
  ASSERT_EQ(::chmod(a.key.c_str(), 0644), 0);
  auto loose = TlsContext::Create(Certs(a, ca), TlsRole::kBackup);
  EXPECT_CODE(loose.status(), Code::kPermissionDenied);
  EXPECT_THAT(loose.status().message(), HasSubstr("chmod 600"));
  LinkSecurity missing = Certs(b, ca);
  missing.ca_file = dir_ + "/absent.pem";
  EXPECT_THAT(TlsContext::Create(missing, TlsRole::kBackup).status().message(), HasSubstr("--tls-ca"));
}

// ---- After the handshake: an on-path attacker ---------------------------------------

// Forwards bytes between two sockets; `tamper` may change each chunk going
// from the primary to the backup (index = bytes forwarded before it).
class Proxy {
 public:
  using Tamper = std::function<void(std::string& chunk, size_t offset)>;
  Proxy(int primary_side, int backup_side, Tamper tamper)
      : up_([=] { Pump(primary_side, backup_side, tamper); }), down_([=] { Pump(backup_side, primary_side, nullptr); }) {}
  ~Proxy() {
    up_.join();
    down_.join();
  }

 private:
  static void Pump(int from, int to, Tamper tamper) {
    size_t off = 0;
    char buf[65536];
    for (;;) {
      ssize_t r = ::read(from, buf, sizeof buf);
      if (r <= 0) break;
      std::string chunk(buf, static_cast<size_t>(r));
      if (tamper) tamper(chunk, off);
      off += static_cast<size_t>(r);
      if (!WriteFull(to, chunk.data(), chunk.size()).ok()) break;
    }
    ::shutdown(to, SHUT_WR);
    ::shutdown(from, SHUT_RD);
  }
  std::thread up_, down_;
};

struct Wired {
  std::unique_ptr<Link> primary, backup;
  Fd p_proxy, b_proxy;
};

Wired WireThroughProxy() {
  int p[2], b[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p), 0);
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b), 0);
  return {std::make_unique<Link>(Fd(p[0])), std::make_unique<Link>(Fd(b[0])), Fd(p[1]), Fd(b[1])};
}

TEST_F(TlsTest, AFrameAlteredInTransitIsRefused) {
  for (int variant = 0; variant < 3; variant++) {
    Wired w = WireThroughProxy();
    std::atomic<bool> armed{false};
    std::string recorded;  // a record the primary sent, for the replay
    std::atomic<int> chunks{0};
    Proxy proxy(w.p_proxy.get(), w.b_proxy.get(), [&](std::string& chunk, size_t) {
      if (!armed) return;
      int n = chunks++;
      if (variant == 0) {
        chunk[chunk.size() / 2] ^= 0x40;  // alter one byte
      } else if (variant == 1) {
        chunk.insert(0, std::string("\x17\x03\x03\x00\x20", 5) + std::string(32, 'E'));  // inject a forged record
      } else if (n == 0) {
        recorded = chunk;  // first frame passes...
      } else {
        chunk = recorded + chunk;  // ...and is replayed before the next
      }
    });
    auto cc = Ctx(Psk('k'), TlsRole::kPrimary);
    auto sc = Ctx(Psk('k'), TlsRole::kBackup);
    StatusOr<std::string> server = Internal("not run");
    std::thread st([&] { server = ServerHandshake(*w.backup, *sc, 5000); });
    ASSERT_TRUE(ClientHandshake(*w.primary, *cc, "localhost", "web1", 5000).ok());
    st.join();
    ASSERT_TRUE(server.ok());
    armed = true;
    // The first frame (FAILOVER: the most dangerous to accept) goes out alone.
    ASSERT_TRUE(w.primary->Send(MsgType::kFailover, 1, "{}").ok());
    std::vector<StatusOr<Frame>> seen;
    seen.push_back(w.backup->Recv());
    if (variant == 2) {
      ASSERT_TRUE(seen[0].ok()) << seen[0].status().ToString();  // the genuine one
      ASSERT_TRUE(w.primary->Send(MsgType::kAck, 2, "").ok());
      seen.push_back(w.backup->Recv());
    }
    const StatusOr<Frame>& last = seen.back();
    EXPECT_CODE(last.status(), Code::kDataLoss) << "variant " << variant;
    EXPECT_THAT(last.status().message(), HasSubstr("failed authentication")) << "variant " << variant;
    EXPECT_THAT(last.status().message(), HasSubstr("altered, injected into or replayed in transit"));
    w.primary->Shutdown();
    w.backup->Shutdown();
  }
}

// ---- Concurrency ------------------------------------------------------------------

TEST_F(TlsTest, OneReaderAndManyWritersShareTheSession) {
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Psk('k'), Psk('k'));
  ASSERT_TRUE(r.client.ok() && r.server.ok());
  constexpr int kPerWriter = 60;
  std::atomic<int> acks{0};
  // The backup side acks every frame while the primary's writers send.
  std::thread backup([&, &s = s] {
    for (int i = 0; i < 2 * kPerWriter; i++) {
      auto f = s->Recv();
      ASSERT_TRUE(f.ok()) << f.status().ToString();
      ASSERT_EQ(f->payload.size(), static_cast<size_t>(1000 + f->epoch * 4099 % 300000));
      ASSERT_EQ(f->payload[f->payload.size() / 2], static_cast<char>('a' + f->epoch % 26));
      ASSERT_TRUE(s->Send(MsgType::kAck, f->epoch, "").ok());
    }
  });
  std::thread reader([&, &c = c] {
    for (int i = 0; i < 2 * kPerWriter; i++) {
      auto f = c->Recv();
      if (!f.ok()) return;
      acks++;
    }
  });
  auto writer = [&, &c = c](uint64_t base) {
    for (uint64_t e = base; e < base + kPerWriter; e++)
      ASSERT_TRUE(c->Send(MsgType::kPages, e, std::string(1000 + e * 4099 % 300000, static_cast<char>('a' + e % 26))).ok());
  };
  std::thread w1(writer, 0), w2(writer, 1000);
  w1.join();
  w2.join();
  backup.join();
  reader.join();
  EXPECT_EQ(acks.load(), 2 * kPerWriter);
}

TEST_F(TlsTest, ShutdownEndsABlockedRecv) {
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Psk('k'), Psk('k'));
  ASSERT_TRUE(r.client.ok() && r.server.ok());
  Status got;
  std::thread t([&, &s = s] { got = s->Recv().status(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  s->Shutdown();
  t.join();
  EXPECT_CODE(got, Code::kUnavailable);
}

TEST_F(TlsTest, ASendTimeoutBreaksALinkWhosePeerStoppedReading) {
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Psk('k'), Psk('k'));
  ASSERT_TRUE(r.client.ok() && r.server.ok());
  c->SetSendTimeout(std::chrono::milliseconds(200));
  Status st;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 100 && st.ok(); i++) st = c->Send(MsgType::kPages, 1, std::string(1 << 20, 'p'));
  EXPECT_CODE(st, Code::kDeadlineExceeded);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_TRUE(c->broken());
  EXPECT_CODE(c->Send(MsgType::kHeartbeat, 0, ""), Code::kUnavailable);
}

// The link never raises SIGPIPE (its writes are send(MSG_NOSIGNAL)), so a
// process need not ignore it, and creating a context leaves it alone.
TEST_F(TlsTest, AWriteToAPeerThatHungUpFailsWithoutSigpipe) {
  auto [c, s] = SocketPair();
  auto r = Handshake(*c, *s, Psk('k'), Psk('k'));
  ASSERT_TRUE(r.client.ok() && r.server.ok());
  struct sigaction now {};
  ASSERT_EQ(::sigaction(SIGPIPE, nullptr, &now), 0);
  ASSERT_EQ(now.sa_handler, SIG_DFL);  // a SIGPIPE would end this test process
  s.reset();                           // the peer hangs up
  Status st;
  for (int i = 0; i < 8 && st.ok(); i++) st = c->Send(MsgType::kPages, 1, std::string(1 << 20, 'p'));
  EXPECT_CODE(st, Code::kUnavailable);
  EXPECT_THAT(st.message(), HasSubstr("peer closed the connection"));
}

}  // namespace
}  // namespace remus::wire
