#!/usr/bin/env bash
# Checks the thread-safety annotations (common/thread_annotations.h) with
# clang: every project .cc file in the build's compile_commands.json is
# compiled with `clang++ -fsyntax-only -Wthread-safety -Werror=thread-safety`,
# two at a time. Fails if clang reports anything at all for any file (a
# thread-safety warning, or a file clang cannot compile).
#
#   scripts/check-thread-safety.sh [BUILD_DIR [FILE...]]
#
# BUILD_DIR defaults to $REMUS_BUILD_DIR or build/; FILEs (paths relative to
# the repository) restrict the run to those files.
#
# The build must have been configured (CMAKE_EXPORT_COMPILE_COMMANDS is on in
# the top CMakeLists.txt). GCC's warning flags are dropped, not translated:
# this run is about the analysis only; gcc's own build keeps them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-${REMUS_BUILD_DIR:-$ROOT/build}}
shift || true
BUILD=$(cd "$BUILD" && pwd)
DB=$BUILD/compile_commands.json
CLANG=${CLANGXX:-clang++}
say() { printf '[thread-safety] %s\n' "$*" >&2; }

[ -f "$DB" ] || { say "no $DB: configure the build first (scripts/build.sh)"; exit 2; }
command -v "$CLANG" >/dev/null || { say "$CLANG not found: install Debian's clang (scripts/install-deps.sh)"; exit 2; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# One response file per project .cc: the compile command with the compiler,
# output and warning flags replaced.
python3 - "$DB" "$ROOT" "$BUILD" "$WORK" "$@" <<'EOF'
import json, os, shlex, sys
db, root, build, work = sys.argv[1:5]
only = {os.path.normpath(p) for p in sys.argv[5:]}
seen = set()
n = 0
for e in json.load(open(db)):
    f = os.path.realpath(os.path.join(e.get("directory", ""), e["file"]))
    rel = os.path.relpath(f, root)
    if (not f.endswith(".cc") or rel.startswith("..") or f.startswith(build + os.sep)
            or rel.startswith("build") or f in seen or (only and rel not in only)):
        continue
    seen.add(f)
    args = e["arguments"] if "arguments" in e else shlex.split(e["command"])
    out, skip = [], False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-c", f, e["file"]) or a.startswith("-W") or a in ("-MD", "-MMD"):
            continue
        # GCC-only code generation flags clang would reject.
        if a.startswith(("-fno-semantic-interposition", "-fcf-protection=", "-fstack-clash-protection")):
            continue
        out.append(a)
    out += ["-fsyntax-only", "-Wthread-safety", "-Werror=thread-safety", f]
    n += 1
    with open(os.path.join(work, "%04d.rsp" % n), "w") as r:
        r.write(" ".join(shlex.quote(a) for a in out) + "\n")
    with open(os.path.join(work, "%04d.name" % n), "w") as r:
        r.write(rel + "\n")
EOF

start=$(date +%s.%N)
export CLANG
find "$WORK" -name '*.rsp' -print0 | sort -z |
  xargs -0 -n1 -P2 sh -c 'cd "$0" 2>/dev/null; "$CLANG" "@$1" >"${1%.rsp}.log" 2>&1 || echo $? >"${1%.rsp}.rc"' "$BUILD" || true
elapsed=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$start" "$(date +%s.%N)")

total=0
bad=()
for rsp in "$WORK"/*.rsp; do
  total=$((total + 1))
  base=${rsp%.rsp}
  if [ -e "$base.rc" ] || [ -s "$base.log" ]; then
    bad+=("$(cat "$base.name")")
    printf '\n---- %s\n' "$(cat "$base.name")" >&2
    cat "$base.log" >&2
  fi
done
if [ ${#bad[@]} -eq 0 ]; then
  say "OK: $total files, no thread-safety warnings ($CLANG, ${elapsed}s)"
  exit 0
fi
say "FAILED: ${#bad[@]} of $total files have clang diagnostics (${elapsed}s):"
printf '  %s\n' "${bad[@]}" >&2
exit 1
