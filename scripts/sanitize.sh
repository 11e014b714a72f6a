#!/usr/bin/env bash
# Builds remus with sanitizers and runs tests under them (issue 13):
#
#   asan  ASan+UBSan (UBSan fatal) build in build-asan/: the unit tests, then a
#         representative subset of the end-to-end tests (tests/e2e) whose remusd
#         and remusctl are the ASan build's. Every sanitizer report of a process
#         the e2e tests start goes to a file in the log dir; any such file fails
#         the run (a daemon's report would otherwise only be in its log).
#   tsan  TSan build in build-tsan/: the unit tests.
#   all   both (the default).
#
#   scripts/sanitize.sh [asan|tsan|all] [--unit]
#
# --unit skips the end-to-end subset (then no QEMU or test guest is needed).
# The e2e subset needs what scripts/test.sh sets up first: root, the patched
# QEMUs (REMUS_QEMU and REMUS_QEMU_10, default: scripts/build-qemu.sh's cached 7.2 and 10.0) and the test
# guest (REMUS_GUEST_KERNEL/REMUS_GUEST_INITRD, default: $REMUS_BUILD_DIR/guest
# or build/guest, as scripts/build-guest.sh makes it).
#
# Built with clang 14 (compiles this code ~1.6x faster than gcc 12 with the
# same flags) at -O0 with line tables only, the product code too: the
# sanitizers find the same bugs, and instrumenting unoptimized code is what
# the build's time goes to. Measured on the 2-core machine: wire.cc 20.1 s
# under ASan at -O1, 7.7 s at -O0; remusctl's main.cc 46.8 s and 13.0 s;
# wire.cc under TSan 10.5 s and 5.1 s. The tests run a little slower
# (timed bounds in sanitized builds have kSchedulingSlack, tests/fakes/timing.h). The ASan build includes the benchmarks: with
# -Werror=thread-safety (every clang build has it) it is also the check of the
# thread-safety annotations on every file, so scripts/test.sh runs no separate
# pass. The TSan build leaves the benchmarks out.
# Suppressions (each one justified) are in tests/sanitizers/. What was found
# and fixed: docs/reliability.md, "Sanitizers".
#
# Environment:
#   REMUS_ASAN_BUILD_DIR  (default build-asan)   REMUS_TSAN_BUILD_DIR  (default build-tsan)
#   REMUS_SAN_LOG_DIR     sanitizer reports of the e2e run (default <asan build>/san-logs)
#   REMUS_SAN_E2E         pytest arguments replacing the default e2e subset
#   REMUS_SAN_JOBS        build and ctest parallelism (default 2)
#   CC/CXX                compilers (default clang/clang++)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHAT=all
UNIT_ONLY=0
for a in "$@"; do
  case "$a" in
    asan|tsan|all) WHAT=$a ;;
    --unit) UNIT_ONLY=1 ;;
    *) echo "usage: $0 [asan|tsan|all] [--unit]" >&2; exit 2 ;;
  esac
done
ASAN_BUILD=${REMUS_ASAN_BUILD_DIR:-$ROOT/build-asan}
TSAN_BUILD=${REMUS_TSAN_BUILD_DIR:-$ROOT/build-tsan}
JOBS=${REMUS_SAN_JOBS:-2}
SUPP=$ROOT/tests/sanitizers
say() { printf '\n==== [sanitize] %s\n' "$*"; }
# `time` on each stage: wall and CPU (user+sys is what a quiet machine needs).
TIMEFORMAT='[sanitize] time: %0R s wall, %0U s user, %0S s sys'

now() { date +%s; }

# The e2e subset: each of the daemons' paths once, about 5 minutes under ASan
# on the 2-core machine (node ids; REMUS_SAN_E2E replaces them).
E2E=tests/e2e
E2E_DEFAULT=(
  # protect, checkpoints, automatic failover: page store, restore, restored QEMU;
  # on QEMU 10.0, so its stream (SWITCHOVER_START) is parsed under ASan too
  "$E2E/test_failover.py::test_failover_after_checkpoints[qemu10.0]"
  # re-protection after a failover and fail back: status rows, history, the
  # backup's ended state; a delta resync (offer, KEEP, verified commit) after
  # an unprotect (GOODBYE, the backup retires its checkpoint)
  "$E2E/test_reprotect.py::test_failover_then_reprotect_then_fail_back"
  "$E2E/test_delta_resync.py::test_unprotect_then_protect_sends_a_delta"
  # watch/stats/metrics (the HTTP endpoint)
  "$E2E/test_cli_watch.py::test_watch_stats_metrics"
  # faults: a tampered TLS record
  "$E2E/test_faults.py::test_tampered_link_stops_protection_and_backup_does_not_promote[alter]"
  # link security: certificates (OpenSSL paths), refusals; a hostile CONFIG from an authenticated peer
  "$E2E/test_link_security.py::test_certificates_protect_and_refuse_strangers_expired_and_other_modes"
  "$E2E/test_peer_policy.py::test_hostile_config_is_refused_before_anything_is_written[qemu-commandline]"
  # disk mirroring (NBD server, journal) through a failover
  "$E2E/test_disk.py::test_disk_failover_memory_and_disk_agree[qemu7.2-raw]"
  # network buffering (nfqueue)
  "$E2E/test_netbuf.py::test_no_answer_before_its_epoch_is_acked"
  # arbitration over etcd (libcurl), lease and fencing token on promotion
  "$E2E/test_arbiter.py::test_qemu_death_backup_wins_etcd_and_promotes_with_a_token"
)

configure_build() {  # dir sanitizer bench(ON|OFF)
  local dir=$1 san=$2 bench=$3 t0
  t0=$(now)
  if [ ! -f "$dir/build.ninja" ]; then
    CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S "$ROOT" -B "$dir" -G Ninja \
      -DREMUS_SANITIZE="$san" -DREMUS_BENCH="$bench" \
      -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O0 -gline-tables-only" \
      -DCMAKE_C_FLAGS_DEBUG="-O0 -gline-tables-only" \
      ${REMUS_SAN_CMAKE_ARGS:-} >/dev/null
  fi
  time cmake --build "$dir" -j"$JOBS"
  say "built $dir in $(( $(now) - t0 ))s"
}

run_unit() {  # dir; returns ctest's exit status
  local t0 rc=0
  t0=$(now)
  (cd "$1" && time ctest --output-on-failure -j"$JOBS" --timeout 600) || rc=$?
  say "unit tests in $1: $(( $(now) - t0 ))s (ctest exit $rc)"
  return "$rc"
}

asan_env() {
  # detect_leaks: LSan at exit; abort_on_error=0 keeps exit codes (ASan 1,
  # LSan 23) rather than a core-dumping SIGABRT. UBSan is fatal already
  # (-fno-sanitize-recover=undefined); halt_on_error also covers anything
  # compiled without that flag.
  export ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:abort_on_error=0${1:+:log_path=$1/report}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${1:+:log_path=$1/report}"
  export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
}

do_asan() {
  say "ASan+UBSan build ($ASAN_BUILD)"
  configure_build "$ASAN_BUILD" address ON
  say "unit tests under ASan+UBSan"
  ( asan_env ""; run_unit "$ASAN_BUILD" ) || fail "unit tests under ASan+UBSan"
  [ "$UNIT_ONLY" = 1 ] && return 0

  say "end-to-end subset under ASan+UBSan"
  local logs=${REMUS_SAN_LOG_DIR:-$ASAN_BUILD/san-logs} t0 rc=0
  rm -rf "$logs"; mkdir -p "$logs"
  if [ -z "${REMUS_QEMU:-}" ]; then  # scripts/test.sh exports it
    REMUS_QEMU=$("$ROOT/scripts/build-qemu.sh" 7.2 | tail -n1)
  fi
  if [ -z "${REMUS_QEMU_10:-}" ]; then  # likewise (the subset's [qemu10.0] test)
    REMUS_QEMU_10=$("$ROOT/scripts/build-qemu.sh" 10.0 | tail -n1)
  fi
  # The guest is the normal build's (it does not depend on the sanitizer).
  local guest=${REMUS_BUILD_DIR:-$ROOT/build}/guest
  [ -f "$guest/vmlinux" ] || "$ROOT/scripts/build-guest.sh" "$guest"
  t0=$(now)
  (
    asan_env "$logs"
    export REMUS_QEMU REMUS_QEMU_10 REMUS_BUILD_DIR="$ASAN_BUILD"
    export REMUS_GUEST_KERNEL=${REMUS_GUEST_KERNEL:-$guest/vmlinux}
    export REMUS_GUEST_INITRD=${REMUS_GUEST_INITRD:-$guest/initrd.img}
    # Each test ends with SIGTERM to its live remusds (up to 30 s to shut
    # down) before the SIGKILLs: the shutdown path runs, LSan checks at exit.
    export REMUS_E2E_GRACEFUL_STOP=${REMUS_E2E_GRACEFUL_STOP:-30}
    cd "$ROOT"
    if [ -n "${REMUS_SAN_E2E:-}" ]; then
      # shellcheck disable=SC2086
      time /usr/bin/python3 -m pytest -v -p no:cacheprovider --durations=15 $REMUS_SAN_E2E
    else
      time /usr/bin/python3 -m pytest -v -p no:cacheprovider --durations=15 "${E2E_DEFAULT[@]}"
    fi
  ) || rc=$?
  say "e2e subset under ASan+UBSan: $(( $(now) - t0 ))s (pytest exit $rc)"
  [ "$rc" = 0 ] || fail "e2e subset under ASan+UBSan (pytest exit $rc)"
  if compgen -G "$logs/*" >/dev/null; then
    say "sanitizer reports from processes the e2e tests started ($logs):"
    for f in "$logs"/*; do
      printf -- '---- %s\n' "$f"; head -n 80 "$f"
    done
    fail "sanitizer reports in the e2e subset ($logs)"
  fi
}

do_tsan() {
  say "TSan build ($TSAN_BUILD)"
  configure_build "$TSAN_BUILD" thread OFF
  say "unit tests under TSan"
  (
    export TSAN_OPTIONS="second_deadlock_stack=1:suppressions=$SUPP/tsan.supp"
    run_unit "$TSAN_BUILD"
  ) || fail "unit tests under TSan"
}

# A failed stage does not stop the later ones; the run fails at the end.
FAILED=()
fail() { FAILED+=("$1"); say "FAILED: $1"; }

case "$WHAT" in
  asan) do_asan ;;
  tsan) do_tsan ;;
  all) do_asan; do_tsan ;;
esac
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED ($WHAT):"; printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
say "OK ($WHAT)"
