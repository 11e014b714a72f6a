// libFuzzer target for the link's message codecs (replicator/link/messages.h):
// the JSON ones and the delta resync's (RESYNC_OFFER, RESYNC_HASHES, KEEP,
// and RESYNC_HASHES through the primary's ResyncOfferAssembler).
// The first byte picks the decoder, the rest is the payload. Checks: no
// decoder throws or crashes (ASan/UBSan), every error is DataLoss or
// InvalidArgument, and whatever decodes re-encodes to a payload that decodes
// to the same message.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "replicator/link/messages.h"
#include "replicator/link/page_batch.h"
#include "replicator/link/resync.h"

namespace {

using remus::Code;
using remus::Status;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_messages: %s\n", what);
    std::abort();
  }
}

void CheckError(const Status& s) {
  Check(s.code() == Code::kDataLoss || s.code() == Code::kInvalidArgument, "unexpected error code");
}

template <typename Msg, typename Decode, typename Encode>
void RoundTrip(std::string_view payload, Decode decode, Encode encode) {
  auto m = decode(payload);
  if (!m.ok()) return CheckError(m.status());
  auto again = decode(encode(*m));
  Check(again.ok(), "a decoded message does not decode after re-encoding");
  Check(*again == *m, "a decoded message changed in a round trip");
}

std::string EncodeHashes(const remus::wire::ResyncHashesMsg& m) {
  return remus::wire::EncodeResyncHashes(m.block, m.first_page, m.hashes.data(), m.hashes.size());
}

std::string EncodeKeep(const std::vector<remus::wire::KeepRun>& runs) {
  std::string out;
  for (const auto& r : runs) remus::wire::AppendKeepRun(&out, r);
  return out;
}

// A small offer, then the payload cut into RESYNC_HASHES frames at bytes
// that the payload's first byte picks: the assembler refuses what does not
// fit the offer, and never holds more hashes than the offer has pages.
void Assemble(std::string_view payload) {
  namespace w = remus::wire;
  if (payload.empty()) return;
  w::ResyncOfferAssembler a;
  w::ResyncOfferMsg offer{{{"pc.ram", 8 * w::kPageSize}, {"rom", 2 * w::kPageSize}}, 1, ""};
  Check(a.Begin(offer).ok(), "Begin refused a valid offer");
  size_t cut = 12 + 16 * (1 + static_cast<uint8_t>(payload[0]) % 4);
  payload.remove_prefix(1);
  while (!payload.empty()) {
    auto m = w::DecodeResyncHashes(payload.substr(0, cut));
    payload.remove_prefix(std::min(cut, payload.size()));
    if (!m.ok()) {
      CheckError(m.status());
      continue;
    }
    Status s = a.Add(*m);
    if (!s.ok()) CheckError(s);
  }
  if (a.complete()) {
    auto h = a.TakeHashes();
    Check(h.size() == 2 && h[0].size() == 8 && h[1].size() == 2, "a complete offer has the wrong number of hashes");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  namespace w = remus::wire;
  try {
    switch (data[0] % 7) {
      case 0: RoundTrip<w::ConfigMsg>(payload, w::DecodeConfig, w::EncodeConfig); break;
      case 1: RoundTrip<w::SyncBeginMsg>(payload, w::DecodeSyncBegin, w::EncodeSyncBegin); break;
      case 2: RoundTrip<w::ReasonMsg>(payload, w::DecodeReason, w::EncodeReason); break;
      case 3: RoundTrip<w::ResyncOfferMsg>(payload, w::DecodeResyncOffer, w::EncodeResyncOffer); break;
      case 4: RoundTrip<w::ResyncHashesMsg>(payload, w::DecodeResyncHashes, EncodeHashes); break;
      case 5: RoundTrip<std::vector<w::KeepRun>>(payload, w::DecodeKeep, EncodeKeep); break;
      case 6: Assemble(payload); break;
    }
  } catch (...) {
    Check(false, "a codec threw");
  }
  return 0;
}
