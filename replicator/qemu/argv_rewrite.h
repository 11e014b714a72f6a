// Rewrites a primary's QEMU command line so the guest can be restored on the
// backup host. Pure: no I/O; unit-tested in argv_rewrite_test.cc.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace remus {

// The restored QEMU's monitors, in run_dir: the operators' and remusd's own.
inline constexpr const char* kRestoredQmpSocket = "qmp.sock";
inline constexpr const char* kRestoredRemusdQmpSocket = "remusd-qmp.sock";

// The primary's argv made fit for a restore on this host: two monitors
// (kRestoredQmpSocket, kRestoredRemusdQmpSocket),
// pidfile and serial/chardev paths under run_dir, `-incoming defer`, no
// -daemonize, -S, -incoming or monitors of the primary. qemu_binary, when not
// empty, replaces argv[0]. drive_images maps -drive ids to the backup's raw
// images: their file= is replaced and format= set to raw.
std::vector<std::string> RewriteArgvForRestore(const std::vector<std::string>& argv, const std::string& run_dir,
                                               const std::string& qemu_binary,
                                               const std::map<std::string, std::string>& drive_images = {});

}  // namespace remus
