#include "tools/remusctl/control_client.h"

#include <unistd.h>

#include "common/io.h"

namespace remus {

StatusOr<nlohmann::json> ControlCall(const std::string& socket_path, const nlohmann::json& request) {
  auto fd = ConnectUnix(socket_path);
  if (!fd.ok() && fd.status().code() == Code::kPermissionDenied)
    return PermissionDenied("remusd's control socket " + socket_path +
                            " is for root only: run remusctl as root (e.g. with sudo)");
  if (!fd.ok())
    return Unavailable("cannot reach remusd at " + socket_path + ": " + fd.status().message() +
                       " (is remusd running? use --socket to pick another daemon)");
  std::string line = request.dump() + "\n";
  RETURN_IF_ERROR(WriteFull(fd->get(), line.data(), line.size()));
  std::string buf;
  char tmp[65536];
  while (buf.find('\n') == std::string::npos) {
    ssize_t r = ::read(fd->get(), tmp, sizeof tmp);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return Unavailable("remusd closed the control connection without answering");
    buf.append(tmp, static_cast<size_t>(r));
  }
  buf.resize(buf.find('\n'));
  if (!nlohmann::json::accept(buf)) return Internal("remusd sent a reply that is not JSON");
  nlohmann::json reply = nlohmann::json::parse(buf);
  if (!reply.value("ok", false)) {
    std::string code = reply.value("code", "INTERNAL");
    Code c = Code::kInternal;
    for (int i = 0; i <= static_cast<int>(Code::kUnauthenticated); i++)
      if (CodeName(static_cast<Code>(i)) == code) c = static_cast<Code>(i);
    return Status(c, reply.value("error", "unknown error"));
  }
  return reply.value("result", nlohmann::json::object());
}

}  // namespace remus
