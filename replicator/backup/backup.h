// The backup side, as remusd uses it: BackupServer (server.h) with its
// options (domain.h). Kept so that includes of this header keep working.
#pragma once

#include "replicator/backup/server.h"
#include "replicator/qemu/argv_rewrite.h"
