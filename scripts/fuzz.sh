#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with clang in their own build
# directory and runs each on its corpus: first every regression input
# (tests/fuzz/regressions/<target>/, inputs that once crashed), then fuzzing
# for a bounded time. Fails on any crash, leak, timeout or failed check.
# Prints per target: executions, coverage (cov/ft from libFuzzer's final
# stats), new corpus inputs found, crashes.
#
# The committed corpus (tests/fuzz/corpus/<target>/) is only read: new
# inputs go to a temporary directory, dropped at the end unless --merge.
# Idempotent; needs clang (Debian's clang-14 with libFuzzer).
#
#   scripts/fuzz.sh                      CI: about 4 minutes in all, the build included
#                                        (--budget 240): each target gets an equal share
#                                        of what the build left, 5..15 s
#   scripts/fuzz.sh --seconds 60         each target 60 s
#   scripts/fuzz.sh --runs 10000000      long runs, by executions, no time bound
#   scripts/fuzz.sh --targets "fuzz_nbd fuzz_link" ...
#   scripts/fuzz.sh --merge ...          afterwards minimize corpus + new inputs
#                                        (-merge=1 -use_counters=0) into tests/fuzz/corpus (not in CI)
# Environment: REMUS_FUZZ_BUILD_DIR (default build-fuzz), CCACHE_DIR; a crash
# leaves its input in $REMUS_FUZZ_BUILD_DIR/fuzz-artifacts/<target>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${REMUS_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
FUZZ=$ROOT/tests/fuzz
ALL="fuzz_messages fuzz_qemu_stream fuzz_link fuzz_page_batch fuzz_nbd fuzz_journal fuzz_libvirt_xml fuzz_request fuzz_config fuzz_tls_handshake"
SECONDS_EACH=""
BUDGET=240
RUNS=""
TARGETS=$ALL
MERGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --merge) MERGE=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Longest input per target: small inputs keep the slow targets fast; each
# is above the largest seed.
max_len() {
  case "$1" in
    fuzz_qemu_stream) echo 16384 ;;
    fuzz_link) echo 65536 ;;       # the harness caps at 64 KiB (pipe capacity)
    fuzz_page_batch) echo 20000 ;;
    fuzz_nbd) echo 8192 ;;
    fuzz_journal) echo 16384 ;;
    fuzz_libvirt_xml) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ is not installed (apt-get install clang)" >&2; exit 1; }
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
t0=$(date +%s)
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_C_COMPILER=clang -DREMUS_FUZZ=ON "${launcher[@]}" >"$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log" >&2; exit 1; }
  rm -f "$BUILD.configure.log"
fi
ninja -C "$BUILD" -j"${REMUS_FUZZ_JOBS:-2}" $TARGETS >/dev/null || { ninja -C "$BUILD" -j1 $TARGETS >&2; exit 1; }
ntargets=$(echo $TARGETS | wc -w)
built=$(( $(date +%s) - t0 ))
if [ -z "$SECONDS_EACH" ]; then
  # What the build left of the budget, shared; a few seconds per target go
  # to loading its corpus and the regressions.
  SECONDS_EACH=$(( (BUDGET - built) / ntargets - 3 ))
  [ $SECONDS_EACH -gt 15 ] && SECONDS_EACH=15
  [ $SECONDS_EACH -lt 5 ] && SECONDS_EACH=5
fi
if [ -n "$RUNS" ]; then how="for $RUNS runs"; else how="for $SECONDS_EACH s"; fi
echo "fuzz.sh: built $ntargets targets in $built s; fuzzing each $how"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/remus-fuzz.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export REMUS_FUZZ_TMP=$TMP  # fuzz_journal's io_uring files
failed=()
printf '%-18s %12s %8s %8s %8s %8s  %s\n' target executions cov ft corpus new result
for t in $TARGETS; do
  bin=$BUILD/tests/fuzz/$t
  corpus=$FUZZ/corpus/$t
  out=$TMP/$t.new
  art=$BUILD/fuzz-artifacts/$t
  mkdir -p "$out" "$art"
  corpora=("$out")
  [ -d "$corpus" ] && corpora+=("$corpus")
  log=$TMP/$t.log
  # 1. Regressions: every input that ever crashed must now pass.
  regs=$FUZZ/regressions/$t
  if [ -d "$regs" ] && [ -n "$(ls -A "$regs" 2>/dev/null)" ]; then
    if ! "$bin" -runs=1 -artifact_prefix="$art/" "$regs"/* >"$log" 2>&1; then
      echo "fuzz.sh: $t fails on a regression input:" >&2
      tail -n 30 "$log" >&2
      failed+=("$t(regression)")
      continue
    fi
  fi
  # 2. Fuzzing. New inputs go to $out (libFuzzer writes only to the first
  # corpus directory); the committed corpus is read.
  bound=(-max_total_time="$SECONDS_EACH")
  [ -n "$RUNS" ] && bound=(-runs="$RUNS")
  rc=0
  "$bin" "${bound[@]}" -max_len="$(max_len "$t")" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$art/" "${corpora[@]}" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -n1 || true)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  new=$(find "$out" -type f | wc -l)
  size=$(find "$corpus" -type f 2>/dev/null | wc -l)
  result=ok
  if [ $rc -ne 0 ]; then
    result="CRASH (exit $rc; input in $art)"
    failed+=("$t")
  fi
  printf '%-18s %12s %8s %8s %8s %8s  %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$size" "$new" "$result"
  if [ $rc -ne 0 ]; then
    grep -E -A25 '^==[0-9]+==ERROR|^fuzz_[a-z_]+: |runtime error|^SUMMARY' "$log" | head -n 40 >&2 || tail -n 40 "$log" >&2
  elif [ $MERGE = 1 ] && [ "$new" -gt 0 ]; then
    merged=$TMP/$t.merged
    mkdir -p "$merged" "$corpus"
    # -use_counters=0: one input per new edge, not per hit-count bucket,
    # which keeps the committed corpus small (a third of the files).
    "$bin" -merge=1 -use_counters=0 -max_len="$(max_len "$t")" "$merged" "$corpus" "$out" >"$TMP/$t.merge.log" 2>&1 \
      || { tail -n 20 "$TMP/$t.merge.log" >&2; failed+=("$t(merge)"); continue; }
    find "$corpus" -type f ! -name 'seed-*' -delete
    # Seeds stay, by name (tests/fuzz/make_seeds.py); the rest go by content hash.
    for f in "$merged"/*; do
      [ -e "$f" ] || continue
      h=$(sha1sum "$f" | cut -c1-40)
      seed=$(cd "$corpus" && for s in seed-*; do
        if [ -e "$s" ] && [ "$(sha1sum "$s" | cut -c1-40)" = "$h" ]; then echo "$s"; fi
      done | head -n1)
      [ -n "$seed" ] || cp "$f" "$corpus/$h"
    done
    echo "fuzz.sh: $t corpus merged: $(find "$corpus" -type f | wc -l) inputs, $(du -sk "$corpus" | cut -f1) KiB"
  fi
done
echo "fuzz.sh: total $(( $(date +%s) - t0 )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: all targets passed"
