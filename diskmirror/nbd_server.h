// A fixed-newstyle NBD server for ONE export, on a unix socket (and, for
// tests, optionally TCP). On the primary, QEMU's nbd block driver connects to
// it and blockdev-mirror (copy-mode write-blocking) writes every guest write
// through it to a DiskSink.
//
// Hand-written because no Debian 12 library provides an embeddable NBD
// *server*: libnbd is a client library, nbdkit is a separate process that
// loads plugins (we would have to ship a plugin and pass every write across
// another process boundary), and qemu-nbd/qemu-storage-daemon serve images,
// not a callback. The subset needed here is small and fully specified
// (NetworkBlockDevice/nbd doc/proto.md, "Baseline" plus flush/FUA/trim/zeroes).
//
// Protocol support:
//   handshake  fixed newstyle, NBD_FLAG_NO_ZEROES; no TLS (NOTLS mode)
//   options    NBD_OPT_GO, NBD_OPT_INFO (NBD_INFO_EXPORT, _NAME, _DESCRIPTION,
//              _BLOCK_SIZE), NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT;
//              every other option (STARTTLS, STRUCTURED_REPLY, meta contexts,
//              unknown ones) gets NBD_REP_ERR_UNSUP and negotiation goes on
//   replies    simple replies only
//   commands   READ, WRITE (+FUA), FLUSH, TRIM (+FUA), WRITE_ZEROES (+FUA,
//              NO_HOLE), DISC; anything else gets NBD_EINVAL
// The export is selected by its name or by the empty (default) name.
//
// Hostile clients: every request is bounds-checked before the sink sees it
// (offset + length overflow or past the export: NBD_EINVAL for read/trim,
// NBD_ENOSPC for write/write-zeroes, as the spec recommends); a READ longer
// than the maximum payload gets NBD_EINVAL; a WRITE longer than the maximum
// payload gets NBD_EINVAL and the connection is closed (its payload is never
// read or allocated); a bad request or option magic, unknown client flags, an
// option longer than 64 KiB or more than 4096 options close the connection.
// Nothing a client sends can make the sink touch bytes outside the export.
//
// Threads: an accept thread per listener and one thread per connection;
// requests on a connection are handled and answered in order. Calls into the
// sink are serialized across connections (one at a time), so a sink need not
// be thread-safe; NBD_FLAG_CAN_MULTI_CONN is not advertised.
//
// Lifetime: the sink must outlive the server. Stop() (or the destructor)
// closes the listeners and every connection and joins all threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "diskmirror/disk_sink.h"
#include "diskmirror/nbd_proto.h"

namespace remus {

struct NbdExport {
  std::string name;         // NBD_OPT_LIST shows it; "" always selects it too
  std::string description;  // optional, for NBD_INFO_DESCRIPTION / NBD_OPT_LIST
  uint64_t size = 0;        // bytes; REQUIRES a multiple of min_block
  bool read_only = false;
  // Size constraints (NBD_INFO_BLOCK_SIZE). Requests not aligned to min_block
  // get NBD_EINVAL. REQUIRES powers of two, min_block <= 65536,
  // preferred_block >= max(min_block, 512), max_payload >= preferred_block and
  // <= nbd::kMaxPayload.
  uint32_t min_block = 1;
  uint32_t preferred_block = 4096;
  uint32_t max_payload = nbd::kMaxPayload;
};

struct NbdServerOptions {
  std::string unix_path;         // "" for none
  unsigned unix_mode = 0600;
  std::optional<HostPort> tcp;   // tests only: port 0 picks a free port
  size_t max_connections = 16;   // further connections are closed at once
  std::string tag = "nbd";       // log tag, e.g. "nbd[web1/vda]"
};

struct NbdServerStats {
  std::atomic<uint64_t> connections{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> bytes_written{0};
  std::atomic<uint64_t> error_replies{0};        // requests answered with an NBD error
  std::atomic<uint64_t> protocol_violations{0};  // connections closed for breaking the protocol
};

class NbdServer {
 public:
  // Validates the export, listens, and starts accepting. InvalidArgument for
  // a bad export or no listener at all.
  static StatusOr<std::unique_ptr<NbdServer>> Start(NbdExport exp, DiskSink* sink, NbdServerOptions opts);
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Idempotent. After it returns no thread of the server touches the sink.
  void Stop();

  // Serves one connected client on the calling thread, as an accepted
  // connection is served, until the session ends; the caller keeps fd.
  // Returns how it ended: OK when the client disconnected (NBD_CMD_DISC,
  // NBD_OPT_ABORT), Aborted for a protocol violation, NotFound for an unknown
  // export name, else the I/O error (Unavailable when the client hung up
  // mid-message). For tests and the fuzz target (tests/fuzz/fuzz_nbd.cc);
  // not counted against max_connections.
  Status ServeConnection(int fd);

  const std::string& unix_path() const { return opts_.unix_path; }
  // The bound TCP port (0 without a TCP listener).
  uint16_t tcp_port() const { return tcp_port_; }
  // "nbd+unix:///?socket=PATH", the URI qemu-img and libnbd accept.
  std::string UnixUri() const;
  const NbdExport& export_info() const { return exp_; }
  const NbdServerStats& stats() const { return stats_; }
  uint16_t transmission_flags() const;

 private:
  struct Conn {
    Fd fd;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  class Session;

  NbdServer(NbdExport exp, DiskSink* sink, NbdServerOptions opts)
      : exp_(std::move(exp)), sink_(sink), opts_(std::move(opts)) {}
  void AcceptLoop(int listen_fd);
  void ReapFinished() REQUIRES(mu_);  // joins connection threads that ended

  const NbdExport exp_;
  DiskSink* const sink_ PT_GUARDED_BY(sink_mu_);
  const NbdServerOptions opts_;
  Fd unix_listener_;
  Fd tcp_listener_;
  uint16_t tcp_port_ = 0;
  std::vector<std::thread> acceptors_;

  Mutex mu_;
  std::list<std::unique_ptr<Conn>> conns_ GUARDED_BY(mu_);
  bool stopping_ GUARDED_BY(mu_) = false;

  Mutex sink_mu_;  // serializes every call into sink_
  NbdServerStats stats_;
};

}  // namespace remus
