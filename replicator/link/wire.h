// The replication link between a primary and its backup: one TCP connection
// per protected domain carrying length-prefixed, checksummed frames inside
// TLS 1.3 (replicator/link/tls.h: the handshake, with a shared key or with
// certificates). A Link without TLS exists for unit tests and benchmarks
// only: remusd never reads a frame that did not come through TLS. The byte
// format, every
// message type and the message sequences are specified in
// docs/formats/replication-link.md; the constants here must match it.
//
// Frame (all integers big-endian):
//   0  u32 magic 0x524d5553 ("RMUS")
//   4  u16 type (MsgType)
//   6  u16 flags (kFlagMore)
//   8  u64 epoch
//  16  u32 payload length (<= kMaxPayload)
//  20  u32 crc32c over header bytes 0..19, then the payload
//  24  payload
//
// Thread-safety: Link::Send/SendV/SendSplit/SendBefore/TrySend may be called
// from any number of threads at once (frames never interleave). Recv/RecvUntil
// must be called by one thread at a time. Shutdown, SetSendTimeout, fd and the
// counters are safe from any thread. Everything else here is a pure function
// or a value type.
//
// Writes never wait forever once a send timeout is set: a peer that stops
// reading (a pulled cable, a powered-off host: no FIN, no RST) makes the
// write fail after the timeout instead of after TCP's own retransmission
// limit (about 15 minutes). A frame cut short that way leaves the stream
// unusable, so the link is then broken: both directions are shut down and
// every later send fails at once.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/io.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "replicator/link/page_batch.h"

namespace remus::wire {

inline constexpr uint32_t kMagic = 0x524d5553;  // "RMUS"
inline constexpr size_t kHeaderSize = 24;
inline constexpr uint32_t kMaxPayload = 16u << 20;  // 16 MiB
// Handshake frames (HELLO..AUTH_OK, ERROR during the handshake) are tiny; an
// unauthenticated peer may not make us allocate more than this.
inline constexpr uint32_t kMaxHandshakePayload = 4096;
inline constexpr int kProtocolVersion = 2;  // 2: TLS 1.3 (2026-12)
inline constexpr size_t kMinKeySize = 32;

// Frame flags.
inline constexpr uint16_t kFlagMore = 0x1;  // more frames of this logical message follow
inline constexpr uint16_t kFlagLz4 = 0x2;   // PAGES payload is LZ4-compressed (page_batch.h)

enum class MsgType : uint16_t {
  kHello = 1,       // primary -> backup, handshake (inside TLS)
  kChallenge = 2,   // reserved (version 1's HMAC handshake)
  kAuth = 3,        // reserved (version 1's HMAC handshake)
  kAuthOk = 4,      // backup -> primary, handshake
  kError = 5,       // either way: {"code","message"}, sender closes afterwards
  kConfig = 6,      // primary -> backup: domain configuration (JSON)
  kSyncBegin = 7,   // primary -> backup: initial full copy starts (SyncBeginMsg, messages.h)
  kPages = 8,       // primary -> backup: page records (AppendPageRecord)
  kDevice = 9,      // primary -> backup: device state blob, split with kFlagMore
  kCommit = 10,     // primary -> backup: end of checkpoint `epoch` (CommitInfo)
  kAck = 11,        // backup -> primary: checkpoint `epoch` applied
  kHeartbeat = 12,  // both ways
  kFailover = 13,   // primary -> backup: primary guest lost, promote now
  kGoodbye = 14,    // primary -> backup: protection ended on purpose, do not promote
  kProgress = 15,   // primary -> backup: initial sync progress (JSON)
  kDisk = 16,       // primary -> backup: one disk write of epoch `epoch` (DiskRecord)
  kDiskSynced = 17, // primary -> backup: every disk copy is complete as of checkpoint `epoch`
  kResyncOffer = 18,   // backup -> primary: the image it offers for a delta resync (ResyncOfferMsg)
  kResyncHashes = 19,  // backup -> primary: page hashes of the offered image (ResyncHashesMsg)
  kKeep = 20,          // primary -> backup: initial-copy pages kept from the offered image (KeepRun)
  kSwitchover = 21,    // primary -> backup: planned switchover from final checkpoint `epoch`;
                       // backup -> primary: accepted, it promotes from `epoch`
};
inline constexpr uint16_t kMinMsgType = 1;
inline constexpr uint16_t kMaxMsgType = 21;

// "HELLO", "PAGES", ...; "TYPE_<n>" for values outside the enum.
std::string MsgTypeName(MsgType t);
std::string MsgTypeName(uint16_t t);

struct Frame {
  MsgType type = MsgType::kHeartbeat;
  uint16_t flags = 0;
  uint64_t epoch = 0;
  std::string payload;
};

// Encodes one frame (header + payload) into a string. For tests and tools;
// Link::SendV does the same without copying the payload.
std::string EncodeFrame(MsgType type, uint64_t epoch, std::string_view payload, uint16_t flags = 0);

// A connected stream socket speaking frames. Owns the fd.
//
// Errors: a closed peer or a truncated frame is Unavailable; bad magic, a
// length over the limit, or a crc mismatch is DataLoss; a well-formed frame of
// an unknown type is InvalidArgument. After any error other than
// InvalidArgument from Recv the stream position is lost: close the link.
class TlsChannel;

class Link {
 public:
  explicit Link(Fd fd);
  ~Link();
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  // From now on every byte goes through `tls` (its handshake is done; tls.h
  // calls this). Before any other thread uses the link.
  void UseTls(std::unique_ptr<TlsChannel> tls);
  // True once UseTls ran; the negotiated suite, e.g. "TLS_AES_128_GCM_SHA256
  // (TLSv1.3)", or "" for a plain link.
  bool encrypted() const { return tls_ != nullptr; }
  std::string Cipher() const;
  // The fatal TLS alert the peer sent, once a read or write failed with one
  // (TlsChannel::peer_alert); -1 for none or a plain link.
  int PeerTlsAlert() const;

  // REQUIRES: payload.size() <= kMaxPayload (else InvalidArgument, nothing sent).
  Status Send(MsgType type, uint64_t epoch, std::string_view payload, uint16_t flags = 0);
  // The payload is the concatenation of parts; written with one writev and
  // no copy. REQUIRES: total size <= kMaxPayload.
  Status SendV(MsgType type, uint64_t epoch, const std::vector<std::string_view>& parts,
               uint16_t flags = 0);
  // Sends a payload of any size as consecutive frames of at most kMaxPayload
  // bytes, all but the last flagged kFlagMore (an empty payload is one frame).
  // The frames are sent under one lock, so no other frame interleaves.
  Status SendSplit(MsgType type, uint64_t epoch, std::string_view payload);

  // As Send, but fails with DeadlineExceeded if the frame is not wholly on
  // the socket by `deadline`, or as soon as abandon() returns true (checked
  // every few ms while waiting); the time spent waiting for another thread's
  // frame counts. Nothing is sent if it gives up before the first byte; a
  // frame cut short breaks the link. For last words (GOODBYE, FAILOVER):
  // worth waiting for while the peer lives, never for longer.
  Status SendBefore(std::chrono::steady_clock::time_point deadline, MsgType type, uint64_t epoch,
                    std::string_view payload, uint16_t flags = 0,
                    const std::function<bool()>& abandon = nullptr);
  // As Send if no other thread is sending; otherwise ResourceExhausted at
  // once and nothing is sent. For heartbeats: a link busy with another frame
  // is carrying data anyway, and a heartbeat must never queue behind a write
  // stuck on a silent peer.
  Status TrySend(MsgType type, uint64_t epoch, std::string_view payload, uint16_t flags = 0);
  // Every later write fails with DeadlineExceeded (and breaks the link) when
  // it makes no progress for `t`: a slow peer that keeps reading is fine,
  // one that stopped is not. Zero (the default): writes wait as TCP does.
  void SetSendTimeout(std::chrono::milliseconds t) { send_timeout_ms_.store(t.count()); }
  // True once a write timed out or was cut short: the stream is unusable.
  bool broken() const { return broken_.load(); }

  // Blocks until a whole frame arrived.
  StatusOr<Frame> Recv();
  // As Recv, reading the payload into `reuse`'s memory: a receiver that hands
  // back the buffers of frames it is done with (the backup's page batches)
  // saves a fresh allocation, its page faults and the zero-fill of a resize
  // for each frame. Only the part beyond reuse's current size is zeroed.
  StatusOr<Frame> Recv(std::string reuse);
  // As Recv, but fails with DeadlineExceeded if the whole frame has not
  // arrived by `deadline`, and with DataLoss if the length field exceeds
  // max_payload (nothing is allocated for it).
  StatusOr<Frame> RecvUntil(std::chrono::steady_clock::time_point deadline,
                            uint32_t max_payload = kMaxPayload);

  // shutdown(2) both directions: a blocked Recv or Send returns with an error
  // (a send within its next poll interval, at most 100 ms). The fd stays
  // open until the Link is destroyed.
  void Shutdown();
  // Sends close_notify (TLS) and FIN after everything queued, but keeps reading: the last frame
  // (FAILOVER, GOODBYE) reaches the peer instead of being cut off by a reset
  // when unread data meets a closed socket.
  void ShutdownWrite();
  int fd() const { return fd_.get(); }
  // "10.0.0.2:7800", "unix socket" or "unknown peer": for error messages.
  std::string PeerName() const;

  uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }
  uint64_t bytes_received() const { return bytes_received_.load(std::memory_order_relaxed); }
  uint64_t frames_sent() const { return frames_sent_.load(std::memory_order_relaxed); }
  uint64_t frames_received() const { return frames_received_.load(std::memory_order_relaxed); }

 private:
  Status SendLocked(MsgType type, uint64_t epoch, const std::vector<std::string_view>& parts,
                    uint16_t flags, std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt,
                    const std::function<bool()>* abandon = nullptr) REQUIRES(send_mu_);
  // Writes all of iov: non-blocking writes, poll for room in between, so a
  // shutdown or the deadline/send timeout ends the wait.
  Status WriteAll(struct iovec* iov, int iovcnt, std::optional<std::chrono::steady_clock::time_point> deadline,
                  const std::function<bool()>* abandon) REQUIRES(send_mu_);
  // WriteAll through TLS: small parts are gathered in tls_out_ (a record
  // needs contiguous bytes), large ones encrypted in place; the frame is
  // sent when the channel's buffer is flushed onto the socket.
  Status WriteAllTls(struct iovec* iov, int iovcnt, std::optional<std::chrono::steady_clock::time_point> deadline,
                     const std::function<bool()>* abandon) REQUIRES(send_mu_);
  // Waits for room to write (events), in slices, until the deadline, the
  // send timeout since last_progress, or abandon(); an error says which
  // (and breaks the link if wrote_some or the peer stalled).
  Status WaitToWrite(short events, std::optional<std::chrono::steady_clock::time_point> deadline,
                     std::chrono::steady_clock::time_point last_progress, bool wrote_some,
                     const std::function<bool()>* abandon);
  // Marks the stream unusable and shuts the socket down both ways.
  void Break();
  StatusOr<Frame> RecvImpl(std::optional<std::chrono::steady_clock::time_point> deadline,
                           uint32_t max_payload, std::string reuse = {});
  Status ReadExact(void* buf, size_t n,
                   std::optional<std::chrono::steady_clock::time_point> deadline);

  Fd fd_;
  std::unique_ptr<TlsChannel> tls_;  // set once, before the link is shared
  Mutex send_mu_;  // serializes whole frames on the socket
  std::string tls_out_ GUARDED_BY(send_mu_);
  std::atomic<int64_t> send_timeout_ms_{0};
  std::atomic<bool> broken_{false};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> frames_sent_{0};
  std::atomic<uint64_t> frames_received_{0};
};

// kError payload: {"code":"UNAUTHENTICATED","message":"..."}.
std::string EncodeError(const Status& s);
// Turns a received kError payload back into a Status (code kept when known,
// else Unavailable). Never returns OK.
Status DecodeError(std::string_view payload);

// ---- Keys and the handshake ------------------------------------------------

// The shared secret. Wiped from memory on destruction. Never logged or sent.
struct Key {
  std::string secret;  // raw bytes, size >= kMinKeySize
  Key() = default;
  explicit Key(std::string s) : secret(std::move(s)) {}
  Key(const Key&) = default;
  Key& operator=(const Key&) = default;
  ~Key();
};

// Reads a key file: >= 64 hex digits (surrounding whitespace ignored), or
// >= 32 raw bytes. The file must pass CheckSecretFile. Errors: NotFound
// (missing; says how to create one), PermissionDenied (see
// CheckSecretFile), InvalidArgument (too short, odd hex, not a regular
// file, a symlink).
StatusOr<Key> LoadKey(const std::string& path);
// A file holding a secret (the key file, --tls-key) must be a regular file,
// not a symlink, owned by the user remusd runs as (root), and not readable
// or writable by group or others. Says what is wrong and the command that
// fixes it. `what` names the file in messages ("key file", "--tls-key").
Status CheckSecretFile(const std::string& path, std::string_view what);
// 32 random bytes as 64 lowercase hex digits (no newline), for `remusctl keygen`.
StatusOr<std::string> GenerateKeyHex();
// A short non-secret fingerprint (16 hex digits) so operators can compare the
// keys on two hosts without revealing them.
std::string KeyFingerprint(const Key& key);

// The handshake (TLS, then HELLO/AUTH_OK inside it): replicator/link/tls.h.

// ---- Checkpoint payloads ----------------------------------------------------

// Page records (kPages payloads): replicator/link/page_batch.h.

// kCommit payload (JSON; unknown fields are ignored so fields can be added).
struct CommitInfo {
  uint64_t page_count = 0;    // page records in this epoch's kPages frames
  uint64_t page_bytes = 0;    // sum of those frames' payload sizes
  uint64_t device_bytes = 0;  // size of the reassembled kDevice blob
  uint64_t disk_records = 0;  // kDisk frames of this epoch (absent: 0)
  // Epoch 0 of a delta resync: pages kept (KEEP), and the digest of the
  // image the initial copy must give (page_hash.h; 32 hex digits, "" absent).
  uint64_t kept_pages = 0;
  std::string image_digest;
  bool operator==(const CommitInfo&) const = default;
};
std::string EncodeCommit(const CommitInfo& c);
// DataLoss for a payload that is not a valid commit record.
StatusOr<CommitInfo> DecodeCommit(std::string_view payload);

// A kDisk payload: be32 disk index (into CONFIG's "disks"), u8 op, 3 zero
// bytes, be64 offset, be64 length, then `length` data bytes for a write
// (none for zero and trim). docs/formats/replication-link.md.
enum class DiskOp : uint8_t { kWrite = 1, kZero = 2, kTrim = 3 };
inline constexpr size_t kDiskRecordHeader = 24;
// The largest write one kDisk frame carries; the NBD export tells QEMU so.
inline constexpr uint32_t kMaxDiskWrite = 4u << 20;
struct DiskRecord {
  uint32_t disk = 0;
  DiskOp op = DiskOp::kWrite;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::string_view data;  // into the payload; length bytes for kWrite
};
std::string EncodeDiskRecord(uint32_t disk, DiskOp op, uint64_t offset, uint64_t length,
                             std::string_view data = {});
// DataLoss for a truncated record, an unknown op, data that does not match
// the length, or offset + length overflowing.
StatusOr<DiskRecord> DecodeDiskRecord(std::string_view payload);

}  // namespace remus::wire
