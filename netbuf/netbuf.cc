#include "netbuf/netbuf.h"

namespace remus {

StatusOr<std::unique_ptr<OutputBuffer>> MakeOutputBuffer(std::string_view mode) {
  if (mode == "none") return std::unique_ptr<OutputBuffer>(std::make_unique<NoOutputBuffer>());
  if (mode == "plug" || mode == "nfqueue")
    return Unimplemented("netbuf mode '" + std::string(mode) +
                         "' is not available in this build; use --netbuf none");
  return InvalidArgument("unknown netbuf mode '" + std::string(mode) + "'; expected plug, nfqueue or none");
}

}  // namespace remus
