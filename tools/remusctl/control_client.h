// Client side of remusd's control socket: one JSON request, one JSON reply.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace remus {

// Sends `request` to the daemon at socket_path and returns its reply's
// "result"; an error reply becomes a Status carrying the daemon's message.
StatusOr<nlohmann::json> ControlCall(const std::string& socket_path, const nlohmann::json& request);

}  // namespace remus
