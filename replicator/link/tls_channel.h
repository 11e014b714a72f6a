// The TLS record layer of one replication link, after its handshake
// (replicator/link/tls.h does the handshake). wire::Link owns one of these
// once the link is encrypted, and routes every frame's bytes through it.
//
// An OpenSSL SSL object may not be used by two threads at once, but a link is
// read by one thread while others write to it. So the socket is non-blocking,
// every SSL_read/SSL_write runs under one mutex and never waits inside
// OpenSSL, and the waiting (poll) happens in wire::Link without the lock.
// A write hands OpenSSL one record's worth at a time
// (SSL_MODE_ENABLE_PARTIAL_WRITE), so a reader never waits behind more than
// one record's encryption. The encrypted records collect in the channel's
// socket BIO and go to the kernel in large send(MSG_NOSIGNAL) calls, at the
// latest when the writer calls Flush at the end of its frame.
#pragma once

#include <cstddef>
#include <string>

#include "common/status.h"
#include "common/thread_annotations.h"

typedef struct ssl_st SSL;

namespace remus::wire {

class TlsChannel {
 public:
  // Takes ownership of an SSL object whose handshake completed on a
  // non-blocking socket.
  explicit TlsChannel(SSL* ssl);
  ~TlsChannel();
  TlsChannel(const TlsChannel&) = delete;
  TlsChannel& operator=(const TlsChannel&) = delete;

  // The outcome of one non-blocking step: `n` bytes moved, or none and the
  // poll(2) events to wait for before trying again.
  struct Step {
    size_t n = 0;
    short wait = 0;
  };
  // Reads decrypted bytes (at most n). Errors: Unavailable when the peer
  // closed the connection; DataLoss when a record fails authentication (the
  // stream was altered in transit) or violates TLS; the errno otherwise.
  StatusOr<Step> ReadSome(void* buf, size_t n);
  // Encrypts and writes at most one record of buf. After a step that moved
  // nothing, the next call must pass the same bytes (OpenSSL's retry rule).
  StatusOr<Step> WriteSome(const void* buf, size_t n);
  // Sends what WriteSome left in the channel's buffer, without waiting: `n`
  // bytes went to the socket; `wait` is POLLOUT while some remain, 0 once
  // all are on the socket. Errors: Unavailable when the peer closed the
  // connection, the errno otherwise.
  StatusOr<Step> Flush();
  // Best effort, never waits: tells the peer we send no more (close_notify).
  void CloseNotify();
  // "TLS_AES_128_GCM_SHA256 (TLSv1.3)": for logs and status.
  std::string Describe() const;
  // The fatal alert the peer sent (RFC 8446 section 6: 42 bad_certificate,
  // 48 unknown_ca, ...), once a read or write failed with one; else -1. In
  // TLS 1.3 a backup refuses the primary's certificate after the primary's
  // handshake ended, so the primary learns it here (tls.h's ClientHandshake).
  int peer_alert() const;

 private:
  // Turns a failed SSL call's result into a Step to wait for or an error.
  StatusOr<Step> Outcome(int ret, const char* op) REQUIRES(mu_);

  mutable Mutex mu_;
  SSL* ssl_ GUARDED_BY(mu_);
  int peer_alert_ GUARDED_BY(mu_) = -1;
};

}  // namespace remus::wire
