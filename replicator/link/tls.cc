#include "replicator/link/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <nlohmann/json.hpp>

#include "common/log.h"
#include "replicator/link/json_object.h"
#include "replicator/link/messages.h"
#include "replicator/link/tls_channel.h"

namespace remus::wire {

using json = nlohmann::json;
using SteadyTime = std::chrono::steady_clock::time_point;

namespace {

constexpr char kTag[] = "tls";
constexpr char kPskIdentityPrefix[] = "remus-psk1:";
constexpr char kPskLabel[] = "remus link psk v1";
// TLS_AES_128_GCM_SHA256: the PSK's hash must be the suite's; AES-GCM runs
// on AES-NI here and on every x86 server remus targets.
constexpr unsigned char kPskSuite[2] = {0x13, 0x01};
constexpr unsigned int kExtPreSharedKey = 41;

// The first queued OpenSSL error's reason text, and the queue cleared.
std::string TakeSslError() {
  unsigned long e = ERR_get_error();
  std::string out;
  if (e != 0) {
    const char* r = ERR_reason_error_string(e);
    out = r ? r : "error " + std::to_string(ERR_GET_REASON(e));
  }
  ERR_clear_error();
  return out.empty() ? "unknown TLS error" : out;
}

// The alert the peer sent (its reason code is 1000 + the alert), or -1.
int ReceivedAlert(unsigned long err) {
  if (ERR_GET_LIB(err) != ERR_LIB_SSL) return -1;
  int r = ERR_GET_REASON(err);
  return r >= SSL_AD_REASON_OFFSET && r < SSL_AD_REASON_OFFSET + 256 ? r - SSL_AD_REASON_OFFSET : -1;
}

// Alerts that mean "your certificate": in TLS 1.3 the primary's handshake is
// over before the backup checks its certificate, so these also arrive on
// the first read after it.
bool IsCertificateAlert(int alert) {
  return alert == SSL_AD_CERTIFICATE_EXPIRED || alert == SSL_AD_BAD_CERTIFICATE || alert == SSL_AD_UNKNOWN_CA ||
         alert == SSL_AD_CERTIFICATE_UNKNOWN || alert == SSL_AD_CERTIFICATE_REVOKED || alert == SSL_AD_ACCESS_DENIED ||
         alert == SSL_AD_UNSUPPORTED_CERTIFICATE || alert == SSL_AD_CERTIFICATE_REQUIRED;
}

std::string CertSubject(X509* cert) {
  if (!cert) return "(none)";
  BIO* b = BIO_new(BIO_s_mem());
  X509_NAME_print_ex(b, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char* p = nullptr;
  long n = BIO_get_mem_data(b, &p);
  std::string out(p, static_cast<size_t>(n));
  BIO_free(b);
  return out;
}

std::string AsnTime(const ASN1_TIME* t) {
  struct tm tm {};
  if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return "?";
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

bool IsIpAddress(const std::string& s) {
  unsigned char buf[sizeof(in6_addr)];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

Status SetNonBlocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return ErrnoStatus("fcntl O_NONBLOCK", errno);
  return OkStatus();
}

// What the handshake learned, for the error message: filled by callbacks.
struct Notes {
  const TlsContext* ctx = nullptr;
  bool no_psk_offered = false;        // backup: the primary offered no key
  std::string offered_identity;       // backup: the one it offered instead of ours
  bool peer_sent_certificate = false; // primary in PSK mode: the backup answered with one
  std::string expected_name;          // certificate mode: the name checked, if any
  int verify_error = 0;               // certificate mode: why the peer's certificate failed
  std::string failed_subject, failed_not_before, failed_not_after;
};

// The SSL ex_data slot for Notes (allocated once, thread-safe).
int NotesIndex() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

Notes* NotesOf(SSL* ssl) { return static_cast<Notes*>(SSL_get_ex_data(ssl, NotesIndex())); }

}  // namespace

// Callbacks need the context's private fields.
struct TlsInternals {
  static SSL_SESSION* PskSession(SSL* ssl, const TlsContext& c) {
    const SSL_CIPHER* suite = SSL_CIPHER_find(ssl, kPskSuite);
    SSL_SESSION* s = suite ? SSL_SESSION_new() : nullptr;
    if (!s) return nullptr;
    if (SSL_SESSION_set1_master_key(s, reinterpret_cast<const unsigned char*>(c.psk_.data()), c.psk_.size()) != 1 ||
        SSL_SESSION_set_cipher(s, suite) != 1 || SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION) != 1) {
      SSL_SESSION_free(s);
      return nullptr;
    }
    return s;
  }

  // Primary: offer the key under its identity.
  static int UsePsk(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* idlen, SSL_SESSION** sess) {
    Notes* n = NotesOf(ssl);
    *sess = nullptr;
    if (!n || !n->ctx->psk()) return 1;
    const SSL_CIPHER* suite = SSL_CIPHER_find(ssl, kPskSuite);
    if (md != nullptr && (!suite || md != SSL_CIPHER_get_handshake_digest(suite))) return 1;
    *sess = PskSession(ssl, *n->ctx);
    if (!*sess) return 0;
    *id = reinterpret_cast<const unsigned char*>(n->ctx->psk_identity_.data());
    *idlen = n->ctx->psk_identity_.size();
    return 1;
  }

  // Backup: the key, for our identity only (ClientHello already checked it).
  static int FindPsk(SSL* ssl, const unsigned char* id, size_t idlen, SSL_SESSION** sess) {
    Notes* n = NotesOf(ssl);
    *sess = nullptr;
    if (!n || !n->ctx->psk()) return 1;
    if (std::string_view(reinterpret_cast<const char*>(id), idlen) != n->ctx->psk_identity_) return 1;
    *sess = PskSession(ssl, *n->ctx);
    return *sess ? 1 : 0;
  }

  // Backup in PSK mode: read the identity the primary offers before OpenSSL
  // does, so that another key ends the handshake with the alert made for it
  // (unknown_psk_identity, RFC 8446 6.2) and our log can name both
  // fingerprints. OpenSSL gives the raw extension only; its layout
  // (RFC 8446 4.2.11): u16 identities length, then per identity u16 length,
  // the identity, u32 obfuscated age.
  static int ClientHello(SSL* ssl, int* al, void*) {
    Notes* n = NotesOf(ssl);
    if (!n || !n->ctx->psk()) return SSL_CLIENT_HELLO_SUCCESS;
    const unsigned char* p = nullptr;
    size_t len = 0;
    if (SSL_client_hello_get0_ext(ssl, kExtPreSharedKey, &p, &len) != 1) {
      n->no_psk_offered = true;
      *al = SSL_AD_HANDSHAKE_FAILURE;
      return SSL_CLIENT_HELLO_ERROR;
    }
    if (len >= 4) {
      size_t ids = static_cast<size_t>(p[0]) << 8 | p[1];
      size_t idl = static_cast<size_t>(p[2]) << 8 | p[3];
      if (ids >= 2 + idl && len >= 4 + idl) {
        std::string_view id(reinterpret_cast<const char*>(p + 4), idl);
        if (id == n->ctx->psk_identity_) return SSL_CLIENT_HELLO_SUCCESS;
        n->offered_identity = std::string(id.substr(0, 64));
      }
    }
    *al = SSL_AD_UNKNOWN_PSK_IDENTITY;
    return SSL_CLIENT_HELLO_ERROR;
  }

  // Primary in PSK mode: a backup that answers with a certificate did not
  // take our key. Never accepted: the handshake ends here.
  static int RefuseCertificate(int, X509_STORE_CTX* store) {
    SSL* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
    if (Notes* n = ssl ? NotesOf(ssl) : nullptr) n->peer_sent_certificate = true;
    return 0;
  }

  // Certificate mode: remembers which certificate failed and why (OpenSSL
  // forgets the peer's certificate when the handshake fails).
  static int RecordVerify(int ok, X509_STORE_CTX* store) {
    if (ok) return ok;
    SSL* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
    Notes* n = ssl ? NotesOf(ssl) : nullptr;
    if (n && n->verify_error == 0) {
      X509* cert = X509_STORE_CTX_get_current_cert(store);
      n->verify_error = X509_STORE_CTX_get_error(store);
      n->failed_subject = CertSubject(cert);
      if (cert) {
        n->failed_not_before = AsnTime(X509_get0_notBefore(cert));
        n->failed_not_after = AsnTime(X509_get0_notAfter(cert));
      }
    }
    return ok;
  }

  static const std::string& Fingerprint(const TlsContext& c) { return c.fingerprint_; }
  static const std::string& PeerName(const TlsContext& c) { return c.peer_name_; }
  static SSL_CTX* Ctx(const TlsContext& c) { return c.ctx_; }
};

// ---- The socket BIO --------------------------------------------------------------

namespace {

// Written here because OpenSSL's socket BIO writes each record with its own
// write(2) (one syscall and, over TCP, one small segment per 16 KiB), and
// with write(2), not send(MSG_NOSIGNAL), so a peer that hung up raises
// SIGPIPE; a BIO_f_buffer in front of it would batch the writes but keep
// write(2). This BIO keeps the encrypted records of a frame in memory and
// hands them to the kernel in large send(MSG_NOSIGNAL) calls: when kFlushAt
// bytes are waiting, and at the end of every frame (TlsChannel::Flush);
// beyond kMaxBuffered unsent, it takes no more until the socket takes some
// (the writer polls, as on any full socket). It reads with recv(2) into a
// buffer of its own, kReadChunk at a time, and hands OpenSSL each record's
// header and body from there. (OpenSSL's read-ahead would read as much
// itself, but before every record it moves all the buffered bytes after it
// to the front of its buffer, to align the payload: with a large buffer
// that copies each byte many times over; bench/bench_link measured it.)
constexpr size_t kFlushAt = 256 << 10;
constexpr size_t kReadChunk = 256 << 10;
// Beyond this much unsent, writes wait (SSL_ERROR_WANT_WRITE, then poll):
// what a stalled peer can make us hold, over the socket buffer.
constexpr size_t kMaxBuffered = 1 << 20;

struct SocketBio {
  int fd = -1;
  bool eof = false;
  std::string out;  // encrypted bytes not yet on the socket, from out_off
  size_t out_off = 0;
  std::unique_ptr<char[]> in;  // received, not yet handed to OpenSSL: [in_off, in_end)
  size_t in_off = 0, in_end = 0;

  size_t pending() const { return out.size() - out_off; }
  // Sends what it can without waiting. Returns the bytes sent, or -1 with
  // errno (EAGAIN: nothing could be sent now).
  ssize_t Send() {
    size_t sent = 0;
    while (pending() > 0) {
      ssize_t r = ::send(fd, out.data() + out_off, pending(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        if (sent > 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return -1;
      }
      out_off += static_cast<size_t>(r);
      sent += static_cast<size_t>(r);
    }
    if (out_off == out.size()) {
      out.clear();
      out_off = 0;
    } else if (out_off >= kFlushAt) {
      out.erase(0, out_off);  // keep the buffer from growing with a slow peer
      out_off = 0;
    }
    return static_cast<ssize_t>(sent);
  }
};

SocketBio* BioState(BIO* b) { return static_cast<SocketBio*>(BIO_get_data(b)); }

bool WouldBlock(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

int BioWrite(BIO* b, const char* in, size_t n, size_t* written) {
  SocketBio* s = BioState(b);
  BIO_clear_retry_flags(b);
  *written = 0;
  if (s->pending() >= kFlushAt && s->Send() < 0 && !WouldBlock(errno)) return 0;  // errno says why
  if (s->pending() >= kMaxBuffered) {
    BIO_set_retry_write(b);
    return 0;
  }
  s->out.append(in, n);
  *written = n;
  return 1;
}

int BioRead(BIO* b, char* buf, size_t n, size_t* got) {
  SocketBio* s = BioState(b);
  BIO_clear_retry_flags(b);
  *got = 0;
  if (s->in_off == s->in_end) {
    if (!s->in) s->in = std::make_unique<char[]>(kReadChunk);
    s->in_off = s->in_end = 0;
    for (;;) {
      ssize_t r = ::recv(s->fd, s->in.get(), kReadChunk, MSG_DONTWAIT);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        if (WouldBlock(errno)) BIO_set_retry_read(b);
        return 0;
      }
      if (r == 0) {
        s->eof = true;
        return 0;
      }
      s->in_end = static_cast<size_t>(r);
      break;
    }
  }
  size_t take = std::min(n, s->in_end - s->in_off);
  std::memcpy(buf, s->in.get() + s->in_off, take);
  s->in_off += take;
  *got = take;
  return 1;
}

long BioCtrl(BIO* b, int cmd, long, void*) {
  SocketBio* s = BioState(b);
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      // OpenSSL flushes after each handshake flight and alert.
      BIO_clear_retry_flags(b);
      if (s->pending() > 0 && s->Send() < 0 && !WouldBlock(errno)) return 0;
      if (s->pending() == 0) return 1;
      BIO_set_retry_write(b);
      return 0;
    case BIO_CTRL_EOF:
      return s->eof ? 1 : 0;
    case BIO_CTRL_WPENDING:
      return static_cast<long>(s->pending());
    case BIO_CTRL_PENDING:
      return static_cast<long>(s->in_end - s->in_off);
    default:
      return 0;  // no kTLS, no dup, no fd queries
  }
}

int BioCreate(BIO* b) {
  BIO_set_data(b, new SocketBio());
  BIO_set_init(b, 1);
  return 1;
}

int BioDestroy(BIO* b) {
  delete BioState(b);
  BIO_set_data(b, nullptr);
  return 1;
}

// A BIO of that kind over fd (not owned), or null.
BIO* NewSocketBio(int fd) {
  static BIO_METHOD* const method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "remus link socket");
    if (m && (BIO_meth_set_write_ex(m, BioWrite) != 1 || BIO_meth_set_read_ex(m, BioRead) != 1 ||
              BIO_meth_set_ctrl(m, BioCtrl) != 1 || BIO_meth_set_create(m, BioCreate) != 1 ||
              BIO_meth_set_destroy(m, BioDestroy) != 1)) {
      BIO_meth_free(m);
      m = nullptr;
    }
    return m;
  }();
  BIO* b = method ? BIO_new(method) : nullptr;
  if (b) BioState(b)->fd = fd;
  return b;
}

}  // namespace

// ---- TlsChannel ---------------------------------------------------------------

TlsChannel::TlsChannel(SSL* ssl) : ssl_(ssl) {}

TlsChannel::~TlsChannel() {
  MutexLock g(mu_);
  SSL_free(ssl_);
}

StatusOr<TlsChannel::Step> TlsChannel::Outcome(int ret, const char* op) {
  const int err = SSL_get_error(ssl_, ret);
  switch (err) {
    case SSL_ERROR_WANT_READ:
      return Step{0, POLLIN};
    case SSL_ERROR_WANT_WRITE:
      return Step{0, POLLOUT};
    case SSL_ERROR_ZERO_RETURN:
      ERR_clear_error();
      return Unavailable("peer closed the connection");
    case SSL_ERROR_SYSCALL: {
      const int e = errno;
      ERR_clear_error();
      if (e == 0 || e == EPIPE || e == ECONNRESET) return Unavailable("peer closed the connection");
      return ErrnoStatus(op, e);
    }
    default: {
      const unsigned long e = ERR_peek_error();
      const bool mac = ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC;
      const int alert = ReceivedAlert(e);
      if (alert >= 0) peer_alert_ = alert;
      std::string why = TakeSslError();
      if (mac)
        return DataLoss("a TLS record failed authentication (" + why +
                        "): the stream was altered, injected into or replayed in transit");
      if (alert == SSL_AD_BAD_RECORD_MAC)
        return DataLoss("the peer refused a TLS record of ours: it failed authentication there (TLS alert \"bad "
                        "record mac\"): the stream was altered, injected into or replayed in transit");
      if (IsCertificateAlert(alert))
        return Unauthenticated(std::string("refused this host's certificate (TLS alert \"") +
                               SSL_alert_desc_string_long(alert) + "\")");
      if (alert >= 0)
        return Unavailable(std::string("the peer ended TLS with alert \"") + SSL_alert_desc_string_long(alert) + "\"");
      return DataLoss("a TLS record from the peer is invalid (" + why +
                      "): the stream was altered, injected into or replayed in transit");
    }
  }
}

StatusOr<TlsChannel::Step> TlsChannel::ReadSome(void* buf, size_t n) {
  MutexLock g(mu_);
  ERR_clear_error();
  errno = 0;
  size_t got = 0;
  int r = SSL_read_ex(ssl_, buf, n, &got);
  if (r == 1) return Step{got, 0};
  return Outcome(r, "read");
}

StatusOr<TlsChannel::Step> TlsChannel::WriteSome(const void* buf, size_t n) {
  MutexLock g(mu_);
  ERR_clear_error();
  errno = 0;
  size_t put = 0;
  int r = SSL_write_ex(ssl_, buf, n, &put);
  if (r == 1) return Step{put, 0};
  return Outcome(r, "write");
}

StatusOr<TlsChannel::Step> TlsChannel::Flush() {
  MutexLock g(mu_);
  SocketBio* s = BioState(SSL_get_wbio(ssl_));
  if (s->pending() == 0) return Step{0, 0};
  ssize_t r = s->Send();
  if (r < 0 && !WouldBlock(errno)) {
    const int e = errno;
    if (e == EPIPE || e == ECONNRESET) return Unavailable("peer closed the connection");
    return ErrnoStatus("write", e);
  }
  return Step{r > 0 ? static_cast<size_t>(r) : 0, static_cast<short>(s->pending() > 0 ? POLLOUT : 0)};
}

void TlsChannel::CloseNotify() {
  MutexLock g(mu_);
  ERR_clear_error();
  (void)SSL_shutdown(ssl_);
  ERR_clear_error();
}

int TlsChannel::peer_alert() const {
  MutexLock g(mu_);
  return peer_alert_;
}

std::string TlsChannel::Describe() const {
  MutexLock g(mu_);
  const SSL_CIPHER* c = SSL_get_current_cipher(ssl_);
  return std::string(c ? SSL_CIPHER_get_name(c) : "?") + " (" + SSL_get_version(ssl_) + ")";
}

// ---- TlsContext ---------------------------------------------------------------

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

StatusOr<std::shared_ptr<const TlsContext>> TlsContext::Create(const LinkSecurity& sec, TlsRole role) {
  const bool certs = !sec.cert_file.empty() || !sec.key_file.empty() || !sec.ca_file.empty();
  if (certs && sec.key)
    return InvalidArgument("choose one way to authenticate replication links: the shared key (--key-file) or "
                           "certificates (--tls-cert, --tls-key, --tls-ca), not both");
  if (!certs && !sec.key)
    return InvalidArgument("replication links need a shared key (--key-file) or certificates (--tls-cert, --tls-key, "
                           "--tls-ca)");
  if (certs && (sec.cert_file.empty() || sec.key_file.empty() || sec.ca_file.empty()))
    return InvalidArgument("certificate mode needs all three of --tls-cert, --tls-key and --tls-ca");

  std::shared_ptr<TlsContext> c(new TlsContext());
  c->role_ = role;
  c->peer_name_ = sec.peer_name;
  c->ctx_ = SSL_CTX_new(role == TlsRole::kPrimary ? TLS_client_method() : TLS_server_method());
  if (!c->ctx_) return Internal("OpenSSL: cannot create a TLS context: " + TakeSslError());
  SSL_CTX* ctx = c->ctx_;
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  // A FIN ends a link like close_notify does: the frames carry their own
  // lengths, so a cut stream is a truncated frame, never a short one.
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_TICKET);
  SSL_CTX_set_num_tickets(ctx, 0);  // links are long-lived; nothing to resume
  // No read-ahead: the link's BIO reads many records per recv(2) itself
  // (NewSocketBio says why).
  if (SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256") != 1)
    return Internal("OpenSSL: cannot set the TLS 1.3 cipher suites: " + TakeSslError());

  if (sec.key) {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    HMAC(EVP_sha256(), sec.key->secret.data(), static_cast<int>(sec.key->secret.size()),
         reinterpret_cast<const unsigned char*>(kPskLabel), sizeof kPskLabel - 1, out, &len);
    c->psk_.assign(reinterpret_cast<char*>(out), len);
    OPENSSL_cleanse(out, sizeof out);
    c->fingerprint_ = KeyFingerprint(*sec.key);
    c->psk_identity_ = kPskIdentityPrefix + c->fingerprint_;
    c->description_ = "shared key, fingerprint " + c->fingerprint_;
    if (role == TlsRole::kPrimary) {
      SSL_CTX_set_psk_use_session_callback(ctx, &TlsInternals::UsePsk);
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, &TlsInternals::RefuseCertificate);
    } else {
      SSL_CTX_set_psk_find_session_callback(ctx, &TlsInternals::FindPsk);
      SSL_CTX_set_client_hello_cb(ctx, &TlsInternals::ClientHello, nullptr);
    }
    return std::shared_ptr<const TlsContext>(std::move(c));
  }

  // Certificate mode.
  RETURN_IF_ERROR(CheckSecretFile(sec.key_file, "--tls-key"));
  if (SSL_CTX_use_certificate_chain_file(ctx, sec.cert_file.c_str()) != 1)
    return InvalidArgument("--tls-cert " + sec.cert_file + ": cannot load a PEM certificate chain (" + TakeSslError() + ")");
  if (SSL_CTX_use_PrivateKey_file(ctx, sec.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    if (ERR_GET_REASON(ERR_peek_error()) == X509_R_KEY_VALUES_MISMATCH) {
      ERR_clear_error();
      return InvalidArgument("--tls-key " + sec.key_file + " is not the private key of --tls-cert " + sec.cert_file);
    }
    return InvalidArgument("--tls-key " + sec.key_file + ": cannot load a PEM private key (" + TakeSslError() + ")");
  }
  if (SSL_CTX_check_private_key(ctx) != 1)
    return InvalidArgument("--tls-key " + sec.key_file + " is not the private key of --tls-cert " + sec.cert_file);
  if (SSL_CTX_load_verify_locations(ctx, sec.ca_file.c_str(), nullptr) != 1)
    return InvalidArgument("--tls-ca " + sec.ca_file + ": cannot load PEM CA certificates (" + TakeSslError() + ")");
  X509* own = SSL_CTX_get0_certificate(ctx);
  if (X509_cmp_current_time(X509_get0_notAfter(own)) <= 0)
    return InvalidArgument("--tls-cert " + sec.cert_file + " (" + CertSubject(own) + ") expired on " +
                           AsnTime(X509_get0_notAfter(own)) + "; peers would refuse it");
  if (X509_cmp_current_time(X509_get0_notBefore(own)) > 0)
    return InvalidArgument("--tls-cert " + sec.cert_file + " (" + CertSubject(own) + ") is not valid before " +
                           AsnTime(X509_get0_notBefore(own)) + "; check this host's clock");
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, &TlsInternals::RecordVerify);
  c->description_ = "certificate " + CertSubject(own) + " (expires " + AsnTime(X509_get0_notAfter(own)) + "), CA " +
                    sec.ca_file;
  return std::shared_ptr<const TlsContext>(std::move(c));
}

// ---- Handshakes -----------------------------------------------------------------

namespace {

int MsLeft(SteadyTime deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(left);
}

// Why a handshake failed, in one sentence, from the side that saw it.
Status HandshakeError(SSL* ssl, const TlsContext& ctx, const Notes& notes, const std::string& peer, int ret,
                      const std::string& mine) {
  const int err = SSL_get_error(ssl, ret);
  const unsigned long e = ERR_peek_error();
  const int alert = ReceivedAlert(e);
  const int reason = ERR_GET_LIB(e) == ERR_LIB_SSL ? ERR_GET_REASON(e) : 0;
  const std::string why = err == SSL_ERROR_SSL ? TakeSslError() : (ERR_clear_error(), std::string());
  const bool primary = ctx.role() == TlsRole::kPrimary;
  const char* them = primary ? "backup" : "primary";

  // The key files differ.
  if (!notes.offered_identity.empty()) {
    std::string fp = notes.offered_identity.rfind(kPskIdentityPrefix, 0) == 0
                         ? notes.offered_identity.substr(sizeof kPskIdentityPrefix - 1)
                         : "(not a remus key identity)";
    return Unauthenticated(peer + " holds a different key (its fingerprint is " + fp + ", this host's is " +
                           TlsInternals::Fingerprint(ctx) + "): the key files differ; copy one key file to both hosts");
  }
  if (primary && ctx.psk() && alert == SSL_AD_UNKNOWN_PSK_IDENTITY)
    return Unauthenticated(peer + " holds a different key (this host's fingerprint is " +
                           TlsInternals::Fingerprint(ctx) + "): the key files differ; copy one key file to both hosts");
  // The two hosts authenticate differently.
  if (notes.no_psk_offered)
    return Unauthenticated(peer + " offered no shared key: it is configured for certificates (--tls-cert) and this "
                           "backup for a shared key (--key-file); configure both hosts the same way");
  if (notes.peer_sent_certificate)
    return Unauthenticated(peer + " answered with a certificate instead of the shared key: it is configured for "
                           "certificates (--tls-cert) and this primary for a shared key (--key-file); configure both "
                           "hosts the same way");
  if (primary && ctx.psk() && alert == SSL_AD_HANDSHAKE_FAILURE)
    return Unauthenticated(peer + " refused the handshake: it is configured for certificates (--tls-cert) or runs "
                           "another remus release; this primary uses a shared key (--key-file)");
  // A certificate was refused, by us or by the peer.
  if (reason == SSL_R_CERTIFICATE_VERIFY_FAILED || notes.verify_error != 0) {
    long v = notes.verify_error != 0 ? notes.verify_error : SSL_get_verify_result(ssl);
    std::string detail = X509_verify_cert_error_string(v);
    if (v == X509_V_ERR_CERT_HAS_EXPIRED) detail += " on " + notes.failed_not_after;
    if (v == X509_V_ERR_CERT_NOT_YET_VALID) detail += "; valid from " + notes.failed_not_before + " (check the clocks)";
    if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH)
      detail += " (expected " + notes.expected_name + ")";
    return Unauthenticated(peer + " presented a certificate this host does not trust: " + detail + " (subject " +
                           (notes.failed_subject.empty() ? std::string("unknown") : notes.failed_subject) + ")");
  }
  if (reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE)
    return Unauthenticated(peer + " presented no certificate; this " + std::string(primary ? "primary" : "backup") +
                           " requires one (--tls-cert on both hosts)");
  if (IsCertificateAlert(alert))
    return Unauthenticated(peer + " refused this host's certificate (TLS alert \"" +
                           SSL_alert_desc_string_long(alert) + "\"); its log says why. This host presents " +
                           ctx.description());
  // Not TLS at all.
  if (reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG ||
      reason == SSL_R_UNEXPECTED_MESSAGE ||
      reason == SSL_R_HTTP_REQUEST || reason == SSL_R_UNKNOWN_PROTOCOL)
    return Unauthenticated(peer + " does not speak TLS (" + why + "): it is not a remus " + them +
                           ", or a remus release without link encryption");
  if (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN)
    return Unauthenticated(peer + " closed the connection during the TLS handshake: it is not a remus " + them +
                           " with link encryption, or it refused this host (its log says why)");
  if (alert >= 0)
    return Unauthenticated(peer + " ended the TLS handshake with alert \"" + SSL_alert_desc_string_long(alert) +
                           "\"; this host uses " + mine);
  return Unauthenticated("TLS handshake with " + peer + " failed: " + why);
}

// Drives SSL_connect/SSL_accept to the end on a non-blocking socket.
Status RunHandshake(Link& link, SSL* ssl, const TlsContext& ctx, Notes& notes, const std::string& peer,
                    SteadyTime deadline, int timeout_ms) {
  const bool primary = ctx.role() == TlsRole::kPrimary;
  for (;;) {
    ERR_clear_error();
    errno = 0;
    int r = primary ? SSL_connect(ssl) : SSL_accept(ssl);
    if (r == 1) break;
    int err = SSL_get_error(ssl, r);
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
      return HandshakeError(ssl, ctx, notes, peer, r, ctx.description());
    int left = MsLeft(deadline);
    if (left == 0)
      return DeadlineExceeded(peer + " did not complete the TLS handshake within the " + std::to_string(timeout_ms) +
                              " ms handshake timeout");
    pollfd pfd{link.fd(), static_cast<short>(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT), 0};
    if (::poll(&pfd, 1, left) < 0 && errno != EINTR) return ErrnoStatus("poll", errno);
  }
  ERR_clear_error();
  // A PSK link must have used the key: nothing else authenticated the peer.
  if (ctx.psk() && !SSL_session_reused(ssl))
    return Unauthenticated(peer + " completed TLS without the shared key; refusing the link");
  return OkStatus();
}

// Backup: before any TLS, look at the first bytes. A remus primary from
// before link encryption opens with a plain HELLO frame ("RMUS"): answer with
// a plain ERROR frame it can show, and stop. Anything else that is not a TLS
// handshake record is refused by name.
Status CheckSpeaksTls(Link& link, const std::string& peer, SteadyTime deadline, int timeout_ms) {
  unsigned char head[4] = {};
  ssize_t got = 0;
  for (;;) {
    int left = MsLeft(deadline);
    if (left == 0) {
      if (got > 0) break;  // judge what came
      return DeadlineExceeded(peer + " sent nothing within the " + std::to_string(timeout_ms) +
                              " ms handshake timeout");
    }
    // Once something came, the rest of the 4 bytes is waited for in steps
    // (the socket stays readable, so poll would not wait), unless the peer
    // already closed its side: then what came is all there is.
    pollfd pfd{link.fd(), POLLIN | POLLRDHUP, 0};
    int pr = got > 0 ? ::poll(nullptr, 0, std::min(left, 10)) : ::poll(&pfd, 1, left);
    if (pr < 0 && errno != EINTR) return ErrnoStatus("poll", errno);
    if (got > 0) {
      pfd.revents = 0;
      if (::poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP))) {
        ssize_t r = ::recv(link.fd(), head, sizeof head, MSG_PEEK | MSG_DONTWAIT);
        if (r > 0) got = r;
        break;  // judge what came
      }
    }
    ssize_t r = ::recv(link.fd(), head, sizeof head, MSG_PEEK | MSG_DONTWAIT);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (r < 0) return ErrnoStatus("recv", errno);
    if (r == 0) {
      if (got > 0) break;
      return Unavailable(peer + " closed the connection before the TLS handshake");
    }
    got = r;
    if (head[0] == 0x16 || got == sizeof head) break;  // 0x16: a TLS handshake record
  }
  if (head[0] == 0x16) return OkStatus();
  if (got >= 4 && std::memcmp(head, "RMUS", 4) == 0) {
    const std::string e = EncodeFrame(MsgType::kError, 0,
                                      EncodeError(Unauthenticated("this backup requires TLS on the replication "
                                                                  "link; upgrade remus on the primary")));
    // Consume what it sent first: closing with unread data would reset the
    // connection and could destroy the ERROR on its way.
    char sink[4096];
    for (int i = 0; i < 16 && ::recv(link.fd(), sink, sizeof sink, MSG_DONTWAIT) > 0; i++) {
    }
    (void)::send(link.fd(), e.data(), e.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    ::shutdown(link.fd(), SHUT_WR);
    return Unauthenticated(peer + " does not speak TLS: it runs a remus release without link encryption (it sent a "
                           "plain HELLO frame); upgrade it");
  }
  char hex[16];
  std::snprintf(hex, sizeof hex, "%02x %02x %02x %02x", head[0], got > 1 ? head[1] : 0, got > 2 ? head[2] : 0,
                got > 3 ? head[3] : 0);
  return Unauthenticated(peer + " does not speak TLS (its first bytes are " + hex + "): it is not a remus primary");
}

// Creates the SSL object, runs the handshake, and moves the link onto it.
Status StartTls(Link& link, const TlsContext& ctx, const std::string& host, const std::string& peer,
                SteadyTime deadline, int timeout_ms) {
  RETURN_IF_ERROR(SetNonBlocking(link.fd()));
  SSL* ssl = SSL_new(TlsInternals::Ctx(ctx));
  if (!ssl) return Internal("OpenSSL: cannot create a TLS session: " + TakeSslError());
  auto channel = std::make_unique<TlsChannel>(ssl);  // frees ssl on every path
  Notes notes;
  notes.ctx = &ctx;
  SSL_set_ex_data(ssl, NotesIndex(), &notes);
  BIO* bio = NewSocketBio(link.fd());
  if (!bio) return Internal("OpenSSL: cannot create the link's BIO: " + TakeSslError());
  SSL_set_bio(ssl, bio, bio);  // one reference, owned by ssl
  if (!ctx.psk()) {
    // Certificate mode: whose name the peer's certificate must carry.
    std::string name = TlsInternals::PeerName(ctx);
    if (name.empty() && ctx.role() == TlsRole::kPrimary) name = host;
    if (!name.empty()) {
      notes.expected_name = name;
      X509_VERIFY_PARAM* vp = SSL_get0_param(ssl);
      int ok = IsIpAddress(name) ? X509_VERIFY_PARAM_set1_ip_asc(vp, name.c_str())
                                 : X509_VERIFY_PARAM_set1_host(vp, name.c_str(), 0);
      if (ok != 1) return InvalidArgument("cannot check peer name '" + name + "': " + TakeSslError());
      if (ctx.role() == TlsRole::kPrimary && !IsIpAddress(name)) SSL_set_tlsext_host_name(ssl, name.c_str());
    }
  }
  Status s = RunHandshake(link, ssl, ctx, notes, peer, deadline, timeout_ms);
  SSL_set_ex_data(ssl, NotesIndex(), nullptr);
  if (!s.ok()) {
    ERR_clear_error();
    return s;
  }
  LOG_DEBUG(kTag) << "TLS with " << peer << ": " << channel->Describe() << ", " << ctx.description();
  link.UseTls(std::move(channel));
  return OkStatus();
}

StatusOr<Frame> RecvHandshake(Link& link, SteadyTime deadline, int timeout_ms, const std::string& peer,
                              std::string_view waiting_for) {
  auto f = link.RecvUntil(deadline, kMaxHandshakePayload);
  if (f.ok()) return f;
  const Status& s = f.status();
  if (s.code() == Code::kDeadlineExceeded)
    return DeadlineExceeded(peer + " did not send " + std::string(waiting_for) + " within the " +
                            std::to_string(timeout_ms) + " ms handshake timeout");
  return s.Annotate("handshake with " + peer + ", waiting for " + std::string(waiting_for));
}

Status SendErrorAndFail(Link& link, const Status& s, const Status& to_peer) {
  (void)link.Send(MsgType::kError, 0, EncodeError(to_peer));
  return s;
}

}  // namespace

Status StartTls(Link& link, const TlsContext& ctx, std::string_view host, int timeout_ms) {
  const SteadyTime deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  const bool primary = ctx.role() == TlsRole::kPrimary;
  const std::string peer = std::string(primary ? "backup at " : "primary at ") + link.PeerName();
  if (!primary) RETURN_IF_ERROR(CheckSpeaksTls(link, peer, deadline, timeout_ms));
  return StartTls(link, ctx, std::string(host), peer, deadline, timeout_ms);
}

Status ClientHandshake(Link& link, const TlsContext& ctx, std::string_view host, std::string_view domain,
                       int timeout_ms) {
  const SteadyTime deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  const std::string peer = "backup at " + link.PeerName();
  const std::string dom(domain);
  if (ctx.role() != TlsRole::kPrimary) return Internal("ClientHandshake needs a primary's TLS context");
  if (!ValidName(domain))
    return InvalidArgument("domain name '" + dom.substr(0, 64) + "' is not a usable name (letters, digits, '.', "
                           "'-', '_'; 1..64 bytes; not starting with '.' or '-')");
  RETURN_IF_ERROR(StartTls(link, ctx, std::string(host), peer, deadline, timeout_ms));

  json hello = {{"version", kProtocolVersion}, {"domain", dom}};
  // A backup that refused our certificate already hung up, and the send may
  // fail: its alert is still to be read, and says why.
  Status sent = link.Send(MsgType::kHello, 0, hello.dump());
  const SteadyTime recv_deadline =
      sent.ok() ? deadline : std::min(deadline, std::chrono::steady_clock::now() + std::chrono::seconds(1));
  auto got = RecvHandshake(link, recv_deadline, timeout_ms, peer, "AUTH_OK");
  if (!got.ok()) {
    // TLS 1.3: the backup checks our certificate after our handshake ended,
    // and its refusal (an alert) is the first thing we read.
    const int alert = link.PeerTlsAlert();
    if (IsCertificateAlert(alert))
      return Unauthenticated(peer + " refused this host's certificate (TLS alert \"" +
                             SSL_alert_desc_string_long(alert) + "\"); its log says why. This host presents " +
                             ctx.description());
  }
  if (!sent.ok()) return sent;
  ASSIGN_OR_RETURN(Frame ok, std::move(got));
  if (ok.type == MsgType::kError) {
    Status e = DecodeError(ok.payload);
    return Status(e.code(), peer + " refused domain " + dom + ": " + e.message());
  }
  if (ok.type != MsgType::kAuthOk)
    return Unauthenticated(peer + " sent " + MsgTypeName(ok.type) + " instead of AUTH_OK");
  LOG_INFO(kTag) << "[" << dom << "] link to " << peer << " authenticated (" << ctx.description() << ")";
  return OkStatus();
}

StatusOr<std::string> ServerHandshake(Link& link, const TlsContext& ctx, int timeout_ms) {
  const SteadyTime deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  const std::string peer = "primary at " + link.PeerName();
  if (ctx.role() != TlsRole::kBackup) return Internal("ServerHandshake needs a backup's TLS context");
  RETURN_IF_ERROR(CheckSpeaksTls(link, peer, deadline, timeout_ms));
  RETURN_IF_ERROR(StartTls(link, ctx, "", peer, deadline, timeout_ms));

  ASSIGN_OR_RETURN(Frame hello, RecvHandshake(link, deadline, timeout_ms, peer, "HELLO"));
  if (hello.type != MsgType::kHello)
    return SendErrorAndFail(link, InvalidArgument(peer + " sent " + MsgTypeName(hello.type) + " instead of HELLO"),
                            InvalidArgument("expected HELLO"));
  auto j = ParseJsonObject(hello.payload);
  auto v = j ? j->find("version") : json::iterator{};
  if (!j || v == j->end() || !v->is_number_integer())
    return SendErrorAndFail(link, InvalidArgument(peer + " sent a malformed HELLO"), InvalidArgument("malformed HELLO"));
  if (v->get<int64_t>() != kProtocolVersion) {
    Status s = FailedPrecondition("protocol version mismatch: " + peer + " speaks version " +
                                  std::to_string(v->get<int64_t>()) + ", this backup speaks version " +
                                  std::to_string(kProtocolVersion) + "; run the same remus release on both hosts");
    return SendErrorAndFail(link, s, s);
  }
  auto d = j->find("domain");
  if (d == j->end() || !d->is_string())
    return SendErrorAndFail(link, InvalidArgument(peer + " sent a malformed HELLO"), InvalidArgument("malformed HELLO"));
  std::string dom = d->get<std::string>();
  // Before AUTH_OK: the name becomes a directory here.
  if (!ValidName(dom)) {
    const std::string shown = json(dom.substr(0, 64)).dump(-1, ' ', false, json::error_handler_t::replace);
    return SendErrorAndFail(link, InvalidArgument(peer + " asked for domain " + shown + ", not a usable name"),
                            InvalidArgument("invalid domain name " + shown));
  }
  RETURN_IF_ERROR(link.Send(MsgType::kAuthOk, 0, ""));
  LOG_INFO(kTag) << "[" << dom << "] link from " << peer << " authenticated (" << ctx.description() << ")";
  return dom;
}

}  // namespace remus::wire
