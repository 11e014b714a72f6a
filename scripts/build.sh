#!/usr/bin/env bash
# Configures and builds remus into build/ (or $REMUS_BUILD_DIR). Idempotent.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${REMUS_BUILD_DIR:-$ROOT/build}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=${REMUS_BUILD_TYPE:-RelWithDebInfo} >/dev/null
fi
cmake --build "$BUILD" -j"$(nproc)"
