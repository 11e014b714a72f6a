// HttpClient against real etcd processes (/usr/bin/etcd from Debian's
// etcd-server, which CI installs): a single member shared by most tests, and
// a three-member cluster for failover. A missing etcd is a failure, not a
// skip: these tests are the only check of the gateway mapping.
#include "arbiter/etcd_http.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/fakes/temp_dir.h"

namespace remus::etcd {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using std::chrono::steady_clock;

constexpr char kEtcd[] = "/usr/bin/etcd";

// Ports the kernel picks, all bound at once so they differ; closed again
// before etcd binds them (a small race other processes rarely win).
std::vector<int> FreePorts(int n) {
  std::vector<int> fds, ports;
  for (int i = 0; i < n; i++) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      ADD_FAILURE() << "cannot pick a free port";
      return {};
    }
    fds.push_back(fd);
    ports.push_back(ntohs(a.sin_port));
  }
  for (int fd : fds) ::close(fd);
  return ports;
}

std::string Url(int port) { return "http://127.0.0.1:" + std::to_string(port); }

// GET url with libcurl; the body, or "" on any failure.
std::string HttpGet(const std::string& url) {
  CURL* h = curl_easy_init();
  std::string body;
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_PROXY, "");
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 1000L);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, +[](char* p, size_t s, size_t n, void* ud) {
    static_cast<std::string*>(ud)->append(p, s * n);
    return s * n;
  });
  CURLcode rc = curl_easy_perform(h);
  curl_easy_cleanup(h);
  return rc == CURLE_OK ? body : "";
}

// One etcd member, killed (SIGKILL) by the destructor. The child also dies
// with the test binary (PR_SET_PDEATHSIG) so a crashed test leaves nothing.
class EtcdMember {
 public:
  EtcdMember(const std::string& name, int client_port, int peer_port, const std::string& initial_cluster,
             const std::string& data_dir)
      : client_url_(Url(client_port)) {
    std::vector<std::string> args = {
        kEtcd,
        "--name=" + name,
        "--data-dir=" + data_dir + "/" + name,
        "--listen-client-urls=" + client_url_,
        "--advertise-client-urls=" + client_url_,
        "--listen-peer-urls=" + Url(peer_port),
        "--initial-advertise-peer-urls=" + Url(peer_port),
        "--initial-cluster=" + initial_cluster,
        "--initial-cluster-state=new",
        "--initial-cluster-token=remus-test-" + std::to_string(::getpid()),
        "--logger=zap",
        "--log-level=error",
        "--log-outputs=" + data_dir + "/" + name + ".log",
    };
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      int null = ::open("/dev/null", O_RDWR);
      ::dup2(null, 1);
      ::execv(kEtcd, argv.data());
      ::_exit(127);
    }
    EXPECT_GT(pid_, 0) << "fork failed";
  }
  ~EtcdMember() { Kill(); }
  EtcdMember(const EtcdMember&) = delete;
  EtcdMember& operator=(const EtcdMember&) = delete;

  void Kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  bool Healthy() const { return HttpGet(client_url_ + "/health").find("\"health\":\"true\"") != std::string::npos; }
  const std::string& url() const { return client_url_; }

 private:
  std::string client_url_;
  pid_t pid_ = -1;
};

// A cluster of `n` members on loopback, healthy (a leader elected) when
// Start returns true.
class EtcdCluster {
 public:
  explicit EtcdCluster(int n) : n_(n) {}
  ::testing::AssertionResult Start() {
    if (::access(kEtcd, X_OK) != 0)
      return ::testing::AssertionFailure() << kEtcd << " is missing: install Debian's etcd-server "
                                           << "(scripts/install-deps.sh); these tests need a real etcd";
    std::vector<int> ports = FreePorts(2 * n_);
    if (ports.size() != static_cast<size_t>(2 * n_)) return ::testing::AssertionFailure() << "no free ports";
    std::string initial;
    for (int i = 0; i < n_; i++) {
      if (i) initial += ",";
      initial += "m" + std::to_string(i) + "=" + Url(ports[2 * i + 1]);
    }
    for (int i = 0; i < n_; i++)
      members_.push_back(std::make_unique<EtcdMember>("m" + std::to_string(i), ports[2 * i], ports[2 * i + 1],
                                                      initial, dir_.path()));
    auto deadline = steady_clock::now() + seconds(20);
    for (auto& m : members_) {
      while (!m->Healthy()) {
        if (steady_clock::now() > deadline)
          return ::testing::AssertionFailure() << "etcd at " << m->url() << " not healthy after 20 s; logs in "
                                               << dir_.path();
        std::this_thread::sleep_for(milliseconds(50));
      }
    }
    return ::testing::AssertionSuccess();
  }
  std::vector<std::string> urls() const {
    std::vector<std::string> u;
    for (auto& m : members_) u.push_back(m->url());
    return u;
  }
  EtcdMember& member(size_t i) { return *members_[i]; }

 private:
  int n_;
  testing::TempDir dir_{"etcd-test"};
  std::vector<std::unique_ptr<EtcdMember>> members_;
};

std::unique_ptr<HttpClient> MustCreate(HttpClientOptions o) {
  auto c = HttpClient::Create(std::move(o));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

// ---- one member, shared by the suite ----

class EtcdHttpTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cluster_ = new EtcdCluster(1);
    start_ = new ::testing::AssertionResult(cluster_->Start());
  }
  static void TearDownTestSuite() {
    delete cluster_;
    delete start_;
    cluster_ = nullptr;
    start_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(*start_);
    client_ = MustCreate({.endpoints = cluster_->urls()});
    ASSERT_NE(client_, nullptr);
  }
  // A key no other test uses.
  std::string Key(const std::string& suffix = "") {
    return std::string("/remus-test/") + ::testing::UnitTest::GetInstance()->current_test_info()->name() + suffix;
  }

  static EtcdCluster* cluster_;
  static ::testing::AssertionResult* start_;
  std::unique_ptr<HttpClient> client_;
};
EtcdCluster* EtcdHttpTest::cluster_ = nullptr;
::testing::AssertionResult* EtcdHttpTest::start_ = nullptr;

TEST_F(EtcdHttpTest, LeaseGrantKeepAliveTimeToLiveRevoke) {
  auto id = client_->Grant(30);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  EXPECT_NE(*id, 0);
  auto ttl = client_->KeepAlive(*id);
  ASSERT_TRUE(ttl.ok()) << ttl.status().ToString();
  EXPECT_EQ(*ttl, 30);
  auto left = client_->TimeToLive(*id);
  ASSERT_TRUE(left.ok()) << left.status().ToString();
  EXPECT_GT(*left, 0);
  EXPECT_LE(*left, 30);

  ASSERT_TRUE(client_->Revoke(*id).ok());
  ttl = client_->KeepAlive(*id);  // a dead lease: TTL 0, not an error
  ASSERT_TRUE(ttl.ok()) << ttl.status().ToString();
  EXPECT_EQ(*ttl, 0);
  left = client_->TimeToLive(*id);
  ASSERT_TRUE(left.ok()) << left.status().ToString();
  EXPECT_EQ(*left, -1);
  EXPECT_TRUE(client_->Revoke(*id).ok()) << "revoking a gone lease is OK";
}

TEST_F(EtcdHttpTest, GrantRejectsNonPositiveTtl) {
  EXPECT_EQ(client_->Grant(0).status().code(), Code::kInvalidArgument);
}

TEST_F(EtcdHttpTest, GetOfAbsentKeyIsNullopt) {
  auto kv = client_->Get(Key());
  ASSERT_TRUE(kv.ok()) << kv.status().ToString();
  EXPECT_FALSE(kv->has_value());
}

TEST_F(EtcdHttpTest, CreateIfAbsentSucceedsOnceThenReturnsTheHolder) {
  const std::string k = Key();
  auto create = [&](const std::string& v) {
    return client_->Txn({.compare = {Compare::Absent(k)}, .success = {Op::Put(k, v)}, .failure = {Op::Get(k)}});
  };
  auto first = create("node-a");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_TRUE(first->succeeded);
  EXPECT_TRUE(first->gets.empty());

  auto kv = client_->Get(k);
  ASSERT_TRUE(kv.ok() && kv->has_value());
  EXPECT_EQ((*kv)->value, "node-a");
  EXPECT_EQ((*kv)->mod_revision, first->revision) << "the txn's revision is its write's";
  EXPECT_EQ((*kv)->create_revision, first->revision);
  EXPECT_EQ((*kv)->version, 1);
  EXPECT_EQ((*kv)->lease, 0);

  auto second = create("node-b");
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_FALSE(second->succeeded);
  ASSERT_EQ(second->gets.size(), 1u);
  ASSERT_TRUE(second->gets[0].has_value());
  EXPECT_EQ(second->gets[0]->value, "node-a");
  EXPECT_EQ(second->gets[0]->mod_revision, first->revision);
  EXPECT_EQ(second->revision, first->revision) << "a failed read-only branch writes nothing";
}

TEST_F(EtcdHttpTest, CompareValueLeaseModRevisionAndDelete) {
  const std::string k = Key();
  auto lease = client_->Grant(30);
  ASSERT_TRUE(lease.ok());
  auto put = client_->Txn({.success = {Op::Put(k, "v1", *lease)}});
  ASSERT_TRUE(put.ok()) << put.status().ToString();
  EXPECT_TRUE(put->succeeded) << "no compares: the success branch runs";

  auto t = client_->Txn({.compare = {Compare::ValueIs(k, "v1"), Compare::LeaseIs(k, *lease),
                                     Compare::ModRevisionIs(k, put->revision)},
                         .success = {Op::Get(k), Op::Put(k, "v2", *lease), Op::Get(k)}});
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_TRUE(t->succeeded);
  ASSERT_EQ(t->gets.size(), 2u);
  ASSERT_TRUE(t->gets[0] && t->gets[1]);
  EXPECT_EQ(t->gets[0]->value, "v1");
  EXPECT_EQ(t->gets[1]->value, "v2");
  EXPECT_EQ(t->gets[1]->lease, *lease);
  EXPECT_EQ(t->gets[1]->version, 2);

  auto wrong = client_->Txn({.compare = {Compare::ValueIs(k, "v1")}, .success = {Op::Delete(k)}});
  ASSERT_TRUE(wrong.ok());
  EXPECT_FALSE(wrong->succeeded);
  auto del = client_->Txn({.compare = {Compare::ModRevisionIs(k, t->revision)}, .success = {Op::Delete(k), Op::Get(k)}});
  ASSERT_TRUE(del.ok());
  EXPECT_TRUE(del->succeeded);
  ASSERT_EQ(del->gets.size(), 1u);
  EXPECT_FALSE(del->gets[0].has_value());
  EXPECT_TRUE(client_->Revoke(*lease).ok());
}

TEST_F(EtcdHttpTest, EmptyValueIsPresentNotAbsent) {
  const std::string k = Key();
  ASSERT_TRUE(client_->Txn({.success = {Op::Put(k, "")}}).ok());
  auto kv = client_->Get(k);  // the gateway omits the empty "value"
  ASSERT_TRUE(kv.ok() && kv->has_value());
  EXPECT_EQ((*kv)->value, "");
  auto t = client_->Txn({.compare = {Compare::ValueIs(k, "")}, .success = {Op::Delete(k)}});
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->succeeded);
}

TEST_F(EtcdHttpTest, PutWithUnknownLeaseIsNotFound) {
  auto t = client_->Txn({.success = {Op::Put(Key(), "v", 12345)}});
  EXPECT_EQ(t.status().code(), Code::kNotFound) << t.status().ToString();
  EXPECT_NE(t.status().message().find("lease not found"), std::string::npos) << t.status().message();
}

TEST_F(EtcdHttpTest, KeyOnRevokedLeaseVanishes) {
  const std::string k = Key();
  auto lease = client_->Grant(30);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(client_->Txn({.success = {Op::Put(k, "held", *lease)}}).ok());
  auto kv = client_->Get(k);
  ASSERT_TRUE(kv.ok() && kv->has_value());
  ASSERT_TRUE(client_->Revoke(*lease).ok());
  kv = client_->Get(k);
  ASSERT_TRUE(kv.ok());
  EXPECT_FALSE(kv->has_value());
}

TEST_F(EtcdHttpTest, LeaseNotKeptAliveExpiresWithItsKey) {
  const std::string k = Key();
  auto lease = client_->Grant(2);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(client_->Txn({.success = {Op::Put(k, "held", *lease)}}).ok());
  auto start = steady_clock::now();
  bool gone = false;
  while (steady_clock::now() - start < seconds(8)) {
    auto kv = client_->Get(k);
    ASSERT_TRUE(kv.ok()) << kv.status().ToString();
    if (!kv->has_value()) {
      gone = true;
      break;
    }
    std::this_thread::sleep_for(milliseconds(200));
  }
  EXPECT_TRUE(gone) << "the key of a 2 s lease outlived 8 s";
  EXPECT_GE(steady_clock::now() - start, milliseconds(1500)) << "the lease expired early";
  auto ka = client_->KeepAlive(*lease);
  ASSERT_TRUE(ka.ok());
  EXPECT_EQ(*ka, 0);
  auto ttl = client_->TimeToLive(*lease);
  ASSERT_TRUE(ttl.ok());
  EXPECT_EQ(*ttl, -1);
}

TEST_F(EtcdHttpTest, BinaryKeysAndValuesRoundTrip) {
  const std::string k = Key(std::string("\0\xff\x01/", 4));
  const std::string v("\0\xff\xfe\x00zz\n\"\\", 10);
  auto t = client_->Txn({.compare = {Compare::Absent(k)}, .success = {Op::Put(k, v)}});
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE(t->succeeded);
  auto kv = client_->Get(k);
  ASSERT_TRUE(kv.ok() && kv->has_value());
  EXPECT_EQ((*kv)->key, k);
  EXPECT_EQ((*kv)->value, v);
  auto eq = client_->Txn({.compare = {Compare::ValueIs(k, v)}, .success = {Op::Delete(k)}});
  ASSERT_TRUE(eq.ok());
  EXPECT_TRUE(eq->succeeded);
}

TEST_F(EtcdHttpTest, FailsOverFromAClosedPort) {
  int closed = FreePorts(1).at(0);
  auto c = MustCreate({.endpoints = {Url(closed), cluster_->urls()[0]}});
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 3; i++) {
    auto kv = c->Get(Key());
    ASSERT_TRUE(kv.ok()) << kv.status().ToString();
  }
  EXPECT_EQ(c->PreferredEndpoint(), cluster_->urls()[0]);
}

// A server that answers every request with an endless stream of bytes:
// the client must give up on it (body cap) and use the next endpoint.
TEST_F(EtcdHttpTest, OversizedAnswerIsRefusedAndTheNextEndpointUsed) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  std::atomic<bool> stop{false};
  std::thread server([&] {
    int c = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) return;
    std::string head = "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n";
    ::send(c, head.data(), head.size(), MSG_NOSIGNAL);
    std::string junk(64 << 10, '[');
    while (!stop && ::send(c, junk.data(), junk.size(), MSG_NOSIGNAL) > 0) {
    }
    ::close(c);
  });
  auto c = MustCreate({.endpoints = {Url(ntohs(a.sin_port)), cluster_->urls()[0]},
                       .request_timeout = seconds(3)});
  ASSERT_NE(c, nullptr);
  auto kv = c->Get(Key());
  EXPECT_TRUE(kv.ok()) << kv.status().ToString();
  stop = true;
  ::shutdown(fd, SHUT_RDWR);
  ::close(fd);
  server.join();
}

TEST_F(EtcdHttpTest, ConcurrentCallsFromFourThreads) {
  auto lease = client_->Grant(30);
  ASSERT_TRUE(lease.ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; i++) {
        std::string k = Key("/" + std::to_string(t) + "/" + std::to_string(i));
        std::string v = "value-" + std::to_string(t * 100 + i);
        auto txn = client_->Txn(
            {.compare = {Compare::Absent(k)}, .success = {Op::Put(k, v, *lease)}, .failure = {Op::Get(k)}});
        auto kv = client_->Get(k);
        auto ka = client_->KeepAlive(*lease);
        if (!txn.ok() || !txn->succeeded || !kv.ok() || !kv->has_value() || (*kv)->value != v || !ka.ok() ||
            *ka != 30)
          failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_TRUE(client_->Revoke(*lease).ok());
}

// ---- no etcd needed ----

TEST(EtcdHttpNoServer, AllEndpointsDeadIsUnavailableWithinTheDeadline) {
  std::vector<int> ports = FreePorts(2);
  ASSERT_EQ(ports.size(), 2u);
  auto c = MustCreate({.endpoints = {Url(ports[0]), Url(ports[1])}});
  ASSERT_NE(c, nullptr);
  auto start = steady_clock::now();
  auto kv = c->Get("k");
  EXPECT_LT(steady_clock::now() - start, seconds(5));
  ASSERT_EQ(kv.status().code(), Code::kUnavailable) << kv.status().ToString();
  EXPECT_NE(kv.status().message().find(Url(ports[0])), std::string::npos) << kv.status().message();
  EXPECT_NE(kv.status().message().find(Url(ports[1])), std::string::npos) << kv.status().message();
  EXPECT_EQ(c->Grant(5).status().code(), Code::kUnavailable);
}

// 192.0.2.0/24 (TEST-NET-1) is never routed: a connect there hangs until the
// connect timeout, and the whole call still ends at the request timeout.
TEST(EtcdHttpNoServer, UnroutableEndpointEndsAtTheRequestTimeout) {
  auto c = MustCreate({.endpoints = {"http://192.0.2.1:2379", "http://192.0.2.2:2379"},
                       .request_timeout = milliseconds(800),
                       .connect_timeout = milliseconds(300)});
  ASSERT_NE(c, nullptr);
  auto start = steady_clock::now();
  auto kv = c->Get("k");
  EXPECT_EQ(kv.status().code(), Code::kUnavailable) << kv.status().ToString();
  EXPECT_LT(steady_clock::now() - start, seconds(2));
}

TEST(EtcdHttpCreate, RejectsBadEndpointsNamingThem) {
  for (std::string bad : {"ftp://x", "http://", "notaurl", "http://host", "http://:2379", "http://h:0",
                          "http://h:99999", "http://h:12x", "https://[::1", "http://a b:1", "http://u@h:1",
                          "http://h:1/v3"}) {
    auto c = HttpClient::Create({.endpoints = {"http://127.0.0.1:2379", bad}});
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_EQ(c.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_NE(c.status().message().find("\"" + bad + "\""), std::string::npos) << c.status().message();
  }
  EXPECT_EQ(HttpClient::Create({}).status().code(), Code::kInvalidArgument);
}

TEST(EtcdHttpCreate, AcceptsGoodEndpoints) {
  for (std::string good : {"http://127.0.0.1:2379", "https://etcd-1.example:2379/", "http://[::1]:2379",
                           "http://localhost:1"}) {
    EXPECT_TRUE(ValidateEndpoint(good).ok()) << ValidateEndpoint(good).ToString();
  }
  auto c = HttpClient::Create({.endpoints = {"http://127.0.0.1:2379/"}});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->PreferredEndpoint(), "http://127.0.0.1:2379");
}

TEST(EtcdHttpCreate, RejectsUnreadableTlsFiles) {
  testing::TempDir d("etcd-tls");
  auto c = HttpClient::Create({.endpoints = {"https://127.0.0.1:2379"}, .cacert = d.file("missing-ca.pem")});
  ASSERT_EQ(c.status().code(), Code::kInvalidArgument);
  EXPECT_NE(c.status().message().find("missing-ca.pem"), std::string::npos) << c.status().message();
  c = HttpClient::Create({.endpoints = {"https://127.0.0.1:2379"}, .key = "/etc/hostname"});
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument) << "a key without a certificate";
  c = HttpClient::Create({.endpoints = {"http://127.0.0.1:2379"}, .request_timeout = Nanos(0)});
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument);
}

TEST(Base64, RoundTripsEveryLength) {
  std::string s;
  for (int i = 0; i < 40; i++) {
    auto back = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(back.ok()) << i;
    EXPECT_EQ(*back, s);
    s.push_back(static_cast<char>(i * 37 + 255));
  }
  EXPECT_EQ(Base64Encode("foo"), "Zm9v");
  EXPECT_EQ(Base64Encode("fo"), "Zm8=");
  EXPECT_EQ(Base64Encode(""), "");
  EXPECT_EQ(*Base64Decode("YQ=="), "a");
}

TEST(Base64, RejectsMalformedText) {
  for (std::string bad : {"YQ=", "Y===", "Y@==", "YQ==YQ==", "=YQ=", " YQ=", "YQ\n="}) {
    EXPECT_EQ(Base64Decode(bad).status().code(), Code::kInvalidArgument) << bad;
  }
}

// ---- three members ----

TEST(EtcdHttpCluster, KilledMemberIsFailedOver) {
  EtcdCluster cluster(3);
  ASSERT_TRUE(cluster.Start());
  auto c = MustCreate({.endpoints = cluster.urls()});
  ASSERT_NE(c, nullptr);
  auto lease = c->Grant(30);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  auto put = c->Txn({.compare = {Compare::Absent("/owner")}, .success = {Op::Put("/owner", "a", *lease)}});
  ASSERT_TRUE(put.ok() && put->succeeded);

  const std::string used = c->PreferredEndpoint();
  size_t victim = 0;
  while (cluster.urls()[victim] != used) victim++;
  cluster.member(victim).Kill();

  // The two survivors keep quorum; when the victim led, they elect a new
  // leader first (about an election timeout, 1 s by default).
  auto start = steady_clock::now();
  StatusOr<std::optional<KeyValue>> kv = Unavailable("not yet");
  StatusOr<int64_t> ka = Unavailable("not yet");
  while (steady_clock::now() - start < seconds(10)) {
    kv = c->Get("/owner");
    ka = c->KeepAlive(*lease);
    if (kv.ok() && ka.ok()) break;
    std::this_thread::sleep_for(milliseconds(100));
  }
  ASSERT_TRUE(kv.ok()) << kv.status().ToString();
  ASSERT_TRUE(ka.ok()) << ka.status().ToString();
  ASSERT_TRUE(kv->has_value());
  EXPECT_EQ((*kv)->value, "a");
  EXPECT_EQ(*ka, 30);
  EXPECT_NE(c->PreferredEndpoint(), used);
  auto again = c->Txn({.compare = {Compare::Absent("/owner")}, .success = {Op::Put("/owner", "b")},
                       .failure = {Op::Get("/owner")}});
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_FALSE(again->succeeded);
  ASSERT_EQ(again->gets.size(), 1u);
  EXPECT_EQ(again->gets[0]->value, "a");
}

}  // namespace
}  // namespace remus::etcd
