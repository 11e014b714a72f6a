// Link security: every replication link is TLS 1.3, mutually authenticated,
// before a single frame is read (docs/formats/replication-link.md,
// "Handshake").
//
// Two ways to authenticate, chosen per host and the same on both:
//   - the shared key file (--key-file): an external TLS 1.3 PSK. The key is
//     never used directly: the PSK is HMAC-SHA256(key, "remus link psk v1"),
//     offered under the identity "remus-psk1:<fingerprint>", so a backup
//     holding another key says so instead of failing with a generic alert.
//     The handshake still runs (EC)DHE (psk_dhe_ke): a leaked key does not
//     decrypt recorded sessions.
//   - certificates (--tls-cert, --tls-key, --tls-ca): both sides present a
//     certificate the CA signed. The primary checks that the backup's carries
//     the name it connected to (or --tls-peer-name); a backup given
//     --tls-peer-name checks the primary's the same way.
//
// A backup whose handshake fails has read nothing but the TLS handshake: no
// frame, no state. Every error says which of these went wrong, in one
// sentence: the peer does not speak TLS, the keys differ, a certificate was
// refused (which, why), the two hosts use different modes, or time ran out.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"
#include "replicator/link/wire.h"

typedef struct ssl_ctx_st SSL_CTX;

namespace remus::wire {

// How this host authenticates its replication links: exactly one of a key
// or a certificate.
struct LinkSecurity {
  std::optional<Key> key;  // PSK mode
  std::string cert_file;   // certificate mode: PEM chain, leaf first
  std::string key_file;    // its private key (root-owned, mode 0600)
  std::string ca_file;     // the CA the peer's certificate must chain to
  // Certificate mode: the DNS name or IP address the peer's certificate must
  // carry. A primary checks the backup against it (empty: the host it
  // connects to); a backup checks primaries only when it is set.
  std::string peer_name;
};

enum class TlsRole { kPrimary, kBackup };  // TLS client, TLS server

// An SSL_CTX configured for one role. Thread-safe once created: handshakes on
// any number of threads share it.
class TlsContext {
 public:
  // Errors: InvalidArgument (no key and no certificate, or both; unreadable
  // or mismatched certificate files; a certificate that expired or is not
  // yet valid), PermissionDenied (a private key file others may read), and
  // the errors of LoadKey.
  static StatusOr<std::shared_ptr<const TlsContext>> Create(const LinkSecurity& sec, TlsRole role);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  TlsRole role() const { return role_; }
  bool psk() const { return !psk_.empty(); }
  // "shared key, fingerprint 0123456789abcdef" or
  // "certificate CN=a.example (expires 2027-01-01), CA /etc/remus/ca.pem".
  const std::string& description() const { return description_; }

 private:
  TlsContext() = default;
  friend struct TlsInternals;
  TlsRole role_ = TlsRole::kPrimary;
  SSL_CTX* ctx_ = nullptr;
  std::string psk_;             // derived; empty in certificate mode
  std::string psk_identity_;    // "remus-psk1:<fingerprint>"
  std::string fingerprint_;
  std::string peer_name_;
  std::string description_;
};

// The TLS handshake alone (no HELLO after it), as the primary (host: as for
// ClientHandshake) or the backup (host ignored). For tests and tools that
// speak frames of their own inside TLS.
Status StartTls(Link& link, const TlsContext& ctx, std::string_view host, int timeout_ms);

// The primary's side: the TLS handshake on link's socket (which must not
// have carried anything yet), then HELLO {version, domain} inside it and the
// backup's AUTH_OK. `host` is the name or address the primary connected to,
// checked against the backup's certificate when peer_name is empty. The
// whole exchange must finish within timeout_ms.
// Errors: Unauthenticated (keys differ, a certificate was refused, modes
// differ, the peer is not TLS), FailedPrecondition (protocol versions
// differ), DeadlineExceeded, the backup's own refusal, and link errors.
Status ClientHandshake(Link& link, const TlsContext& ctx, std::string_view host, std::string_view domain,
                       int timeout_ms);
// The backup's side. Returns the domain the primary asked for, only after
// TLS authenticated it; reads nothing but the TLS handshake before that, and
// at most kMaxHandshakePayload bytes of HELLO after.
StatusOr<std::string> ServerHandshake(Link& link, const TlsContext& ctx, int timeout_ms);

}  // namespace remus::wire
