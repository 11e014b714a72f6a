// Internal to replicator/link: the JSON object a frame's payload holds
// (ERROR, COMMIT, HELLO). The typed messages (messages.h) have their own
// decoder, which tells "not JSON" from "not an object".
#pragma once

#include <optional>
#include <string_view>

#include <nlohmann/json.hpp>

namespace remus::wire {

// The payload as a JSON object, or nullopt when it is not JSON or not an
// object. Never throws.
std::optional<nlohmann::json> ParseJsonObject(std::string_view payload);

}  // namespace remus::wire
