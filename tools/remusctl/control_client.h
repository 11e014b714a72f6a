// Client side of remusd's control socket: one JSON request, one JSON reply.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace remus {

// Sends `request` to the daemon at socket_path and returns its reply's
// "result"; an error reply becomes a Status carrying the daemon's message.
// A socket this user may not open is PermissionDenied (remusctl exit 5), as
// is remusd's own refusal of a non-root client; no daemon there is
// Unavailable (exit 4).
StatusOr<nlohmann::json> ControlCall(const std::string& socket_path, const nlohmann::json& request);

}  // namespace remus
