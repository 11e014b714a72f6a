// libFuzzer target for the replication link's receiving side
// (replicator/link/wire.h): wire::Link::Recv / RecvUntil reading frames from
// a socket, and the payload decoders of the frames that arrive (COMMIT,
// DISK, ERROR, PAGES incl. LZ4, CONFIG, SYNC_BEGIN, FAILOVER/GOODBYE).
//
// Input: byte 0 selects how to receive, the rest is what the peer sends.
//   bit 0     patch the crc of each whole frame in the input first, so the
//             fuzzer gets past the checksum to the payload decoders
//   bit 1     RecvUntil (deadline, max_payload from bits 2-3: kMaxPayload,
//             kMaxHandshakePayload, 0, 64) instead of Recv
//   bit 4     Recv(reuse) with a 100-byte buffer to reuse
// The bytes are written into a pipe whose write end is then closed (inputs
// are capped at 64 KiB, below the pipe's capacity; a pipe is cheaper than a
// socketpair, and Link reads it the same way). Frames are read
// until an error other than InvalidArgument.
// Checks: the documented errors (Unavailable for a closed peer or a
// truncated frame, DataLoss for magic/length/crc, InvalidArgument for an
// unknown type, after which the next frame still reads); every frame
// received re-encodes (EncodeFrame) to exactly the bytes it came from; each
// decoder's errors have its documented code and what decodes re-encodes to
// an equal value.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "common/crc32c.h"
#include "common/io.h"
#include "replicator/link/messages.h"
#include "replicator/link/page_batch.h"
#include "replicator/link/wire.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
namespace w = remus::wire;
constexpr const char* kTarget = "fuzz_link";
constexpr size_t kMaxInput = 64 * 1024;

template <typename Msg, typename Decode, typename Encode>
void RoundTrip(std::string_view payload, Decode decode, Encode encode, const char* what) {
  auto m = decode(payload);
  if (!m.ok()) return fuzz::CheckCode(m.status(), {Code::kDataLoss, Code::kInvalidArgument}, kTarget, what);
  auto again = decode(encode(*m));
  fuzz::Check(again.ok() && *again == *m, kTarget, what);
}

void CheckPages(std::string_view batch) {
  std::string again;
  Status s = w::ForEachPageRecord(batch, [&](uint32_t block, uint64_t offset, const uint8_t* data) {
    fuzz::Check(offset % w::kPageSize == 0, kTarget, "page offset not aligned");
    w::AppendPageRecord(&again, block, offset, data);
    return OkStatus();
  });
  if (!s.ok()) return fuzz::CheckCode(s, {Code::kDataLoss}, kTarget, "PAGES: unexpected error code");
  fuzz::Check(again == batch, kTarget, "PAGES: records do not re-encode to the payload");
}

void DecodePayload(const w::Frame& f) {
  fuzz::Debug(kTarget, w::MsgTypeName(f.type).c_str());
  const std::string_view p = f.payload;
  switch (f.type) {
    case w::MsgType::kCommit: {
      auto c = w::DecodeCommit(p);
      if (!c.ok()) return fuzz::CheckCode(c.status(), {Code::kDataLoss}, kTarget, "COMMIT: unexpected error code");
      auto again = w::DecodeCommit(w::EncodeCommit(*c));
      fuzz::Check(again.ok() && *again == *c, kTarget, "COMMIT: round trip");
      break;
    }
    case w::MsgType::kDisk: {
      auto r = w::DecodeDiskRecord(p);
      if (!r.ok()) return fuzz::CheckCode(r.status(), {Code::kDataLoss}, kTarget, "DISK: unexpected error code");
      fuzz::Check(r->op == w::DiskOp::kWrite ? r->data.size() == r->length : r->data.empty(), kTarget,
                  "DISK: data does not match the length");
      fuzz::Check(r->offset + r->length >= r->offset, kTarget, "DISK: extent overflows");
      std::string enc = w::EncodeDiskRecord(r->disk, r->op, r->offset, r->length, r->data);
      auto again = w::DecodeDiskRecord(enc);
      fuzz::Check(again.ok() && again->disk == r->disk && again->op == r->op && again->offset == r->offset &&
                      again->length == r->length && again->data == r->data,
                  kTarget, "DISK: round trip");
      break;
    }
    case w::MsgType::kError: {
      Status e = w::DecodeError(p);
      fuzz::Check(!e.ok(), kTarget, "ERROR decoded to OK");
      Status again = w::DecodeError(w::EncodeError(e));
      fuzz::Check(again.code() == e.code() && again.message() == e.message(), kTarget, "ERROR: round trip");
      break;
    }
    case w::MsgType::kPages:
      if (f.flags & w::kFlagLz4) {
        auto raw = w::DecompressBatch(p, 1 << 20);
        if (!raw.ok())
          return fuzz::CheckCode(raw.status(), {Code::kDataLoss}, kTarget, "LZ4: unexpected error code");
        CheckPages(*raw);
      } else {
        CheckPages(p);
      }
      break;
    case w::MsgType::kConfig:
      RoundTrip<w::ConfigMsg>(p, w::DecodeConfig, w::EncodeConfig, "CONFIG: round trip");
      break;
    case w::MsgType::kSyncBegin:
      RoundTrip<w::SyncBeginMsg>(p, w::DecodeSyncBegin, w::EncodeSyncBegin, "SYNC_BEGIN: round trip");
      break;
    case w::MsgType::kFailover:
    case w::MsgType::kGoodbye:
      RoundTrip<w::ReasonMsg>(p, w::DecodeReason, w::EncodeReason, "REASON: round trip");
      break;
    default:
      break;
  }
}

// Patches the crc of each whole frame, walking by the length fields.
void FixCrcs(std::string* s) {
  size_t pos = 0;
  while (s->size() - pos >= w::kHeaderSize) {
    auto* h = reinterpret_cast<uint8_t*>(s->data() + pos);
    uint32_t len = LoadU32(h + 16);
    if (len > s->size() - pos - w::kHeaderSize) return;
    uint32_t crc = crc32c::Extend(crc32c::Value(h, 20), h + w::kHeaderSize, len);
    StoreU32(h + 20, crc);
    pos += w::kHeaderSize + len;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > kMaxInput + 1) return 0;
  const uint8_t sel = data[0];
  std::string in(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (sel & 1) FixCrcs(&in);
  static constexpr uint32_t kLimits[] = {w::kMaxPayload, w::kMaxHandshakePayload, 0, 64};
  const bool until = sel & 2;
  const uint32_t limit = until ? kLimits[(sel >> 2) & 3] : w::kMaxPayload;

  int sv[2];  // read end, write end
  if (::pipe2(sv, O_CLOEXEC) != 0) fuzz::Fail(kTarget, "pipe2 failed");
  ::fcntl(sv[1], F_SETPIPE_SZ, 256 << 10);
  ::fcntl(sv[1], F_SETFL, O_NONBLOCK);
  if (!in.empty()) {
    ssize_t n = ::write(sv[1], in.data(), in.size());
    if (n != static_cast<ssize_t>(in.size())) fuzz::Fail(kTarget, "the input does not fit the socket buffer");
  }
  ::close(sv[1]);

  try {
    w::Link link{Fd(sv[0])};
    size_t pos = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    for (int frames = 0;; ++frames) {
      StatusOr<w::Frame> f = until ? link.RecvUntil(deadline, limit)
                             : (sel & 16) ? link.Recv(std::string(100, 'x'))
                                          : link.Recv();
      const size_t left = in.size() - pos;
      if (!f.ok()) {
        const Status& s = f.status();
        fuzz::Debug(kTarget, "Recv", s);
        fuzz::CheckCode(s, {Code::kUnavailable, Code::kDataLoss, Code::kInvalidArgument}, kTarget,
                        "Recv: unexpected error code");
        if (s.code() == Code::kUnavailable) {
          // Only a stream that ends inside a frame.
          fuzz::Check(left < w::kHeaderSize || LoadU32(in.data() + pos + 16) > left - w::kHeaderSize, kTarget,
                      "Unavailable although a whole frame was there");
          return 0;
        }
        fuzz::Check(left >= w::kHeaderSize, kTarget, "a header error without a whole header");
        if (s.code() == Code::kDataLoss) return 0;
        // InvalidArgument: an unknown type; the frame was consumed.
        const uint16_t type = static_cast<uint16_t>(static_cast<uint8_t>(in[pos + 4]) << 8 |
                                                    static_cast<uint8_t>(in[pos + 5]));
        fuzz::Check(type < w::kMinMsgType || type > w::kMaxMsgType, kTarget, "InvalidArgument for a known type");
        pos += w::kHeaderSize + LoadU32(in.data() + pos + 16);
        continue;
      }
      fuzz::Check(left >= w::kHeaderSize + f->payload.size(), kTarget, "a frame longer than the input");
      fuzz::Check(f->payload.size() <= limit, kTarget, "a payload over the limit");
      std::string enc = w::EncodeFrame(f->type, f->epoch, f->payload, f->flags);
      fuzz::Check(in.compare(pos, enc.size(), enc) == 0, kTarget, "a frame does not re-encode to its bytes");
      pos += enc.size();
      DecodePayload(*f);
    }
  } catch (...) {
    fuzz::Fail(kTarget, "the link or a decoder threw");
  }
  return 0;
}
