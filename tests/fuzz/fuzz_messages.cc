// libFuzzer target for the link's JSON message codecs (replicator/link/messages.h).
// The first byte picks the decoder, the rest is the payload. Checks: no
// decoder throws or crashes (ASan/UBSan), every error is DataLoss or
// InvalidArgument, and whatever decodes re-encodes to a payload that decodes
// to the same message.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "replicator/link/messages.h"

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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  namespace w = remus::wire;
  try {
    switch (data[0] % 3) {
      case 0: RoundTrip<w::ConfigMsg>(payload, w::DecodeConfig, w::EncodeConfig); break;
      case 1: RoundTrip<w::SyncBeginMsg>(payload, w::DecodeSyncBegin, w::EncodeSyncBegin); break;
      case 2: RoundTrip<w::ReasonMsg>(payload, w::DecodeReason, w::EncodeReason); break;
    }
  } catch (...) {
    Check(false, "a codec threw");
  }
  return 0;
}
