// Lowercase hex encoding of byte strings (keys, the QEMU configuration
// section carried in JSON). Pure functions.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace remus {

std::string HexEncode(std::string_view bytes);
// nullopt on odd length or a non-hex character; accepts either case.
std::optional<std::string> HexDecode(std::string_view hex);

}  // namespace remus
