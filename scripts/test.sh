#!/usr/bin/env bash
# Builds and runs every test: unit tests (CTest/GoogleTest), the end-to-end
# tests against a real QEMU (tests/e2e, pytest), the libFuzzer targets for a
# bounded time (scripts/fuzz.sh), and the unit tests plus an e2e subset under
# ASan+UBSan and the unit tests under TSan (scripts/sanitize.sh; its clang
# ASan build, with -Werror=thread-safety, is the check of the thread-safety
# annotations). Sets everything up first: packages, the two test QEMUs (7.2
# and 10.0, cached in /var/cache/remus), the test guest. Idempotent. Needs
# root (packages, QEMU processes, network namespaces).
#
#   scripts/test.sh            everything
#   scripts/test.sh --unit     unit tests and the thread-safety check only
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${REMUS_BUILD_DIR:-$ROOT/build}
# Each stage's heading says how long the run has taken so far, so that a CI
# log shows where the time goes.
T0=$(date +%s)
say() { printf '\n==== [%s +%ds] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*"; }

say "dependencies"
"$ROOT/scripts/install-deps.sh"
say "build"
"$ROOT/scripts/build.sh"
say "unit tests"
(cd "$BUILD" && ctest --output-on-failure -j2 --timeout 300)
if [ "${1:-}" = "--unit" ]; then
  # The full run checks them in the ASan build (scripts/sanitize.sh).
  say "thread-safety annotations (clang -Wthread-safety)"
  "$ROOT/scripts/check-thread-safety.sh" "$BUILD"
  exit 0
fi

say "test QEMUs: Debian 12's 7.2 and Debian 13's 10.0, with the COLO patches TCG needs"
REMUS_QEMU=$("$ROOT/scripts/build-qemu.sh" 7.2 | tail -n1)
REMUS_QEMU_10=$("$ROOT/scripts/build-qemu.sh" 10.0 | tail -n1)
export REMUS_QEMU REMUS_QEMU_10
say "test guest"
"$ROOT/scripts/build-guest.sh" "$BUILD/guest"
# The guest's key-value service (bench/failover_latency.py's) is checked here;
# its other workloads are exercised by the end-to-end tests.
python3 "$ROOT/tests/guest/smoke-test.py" --outdir "$BUILD/guest" --qemu "$REMUS_QEMU" --cases kv
say "QEMU COLO self-test (1000 checkpoints each)"
python3 "$ROOT/scripts/qemu-colo-selftest.py" --qemu "$REMUS_QEMU" --count 1000
python3 "$ROOT/scripts/qemu-colo-selftest.py" --qemu "$REMUS_QEMU_10" --count 1000
say "end-to-end tests"
REMUS_BUILD_DIR="$BUILD" /usr/bin/python3 -m pytest -v -p no:cacheprovider --durations=15 "$ROOT/tests/e2e"
say "fuzz targets (libFuzzer): regressions, then each target on its corpus for a bounded time"
"$ROOT/scripts/fuzz.sh" --budget 120  # build included
say "sanitizers (ASan+UBSan: thread-safety, unit tests + e2e subset; TSan: unit tests)"
REMUS_BUILD_DIR="$BUILD" "$ROOT/scripts/sanitize.sh" all
say "all tests passed"
