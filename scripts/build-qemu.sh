#!/usr/bin/env bash
# Builds the test QEMUs from Debian's own source packages, qemu-system-x86_64
# only, each cached in its own directory outside the repository:
#
#   scripts/build-qemu.sh [7.2]   Debian 12's 1:7.2+dfsg with our patches
#                                 (scripts/qemu-patches/), whose COLO primary works
#                                 under TCG      -> /var/cache/remus/qemu-7.2-colo
#   scripts/build-qemu.sh 10.0    Debian 13's 1:10.0.x+ds: the QEMU a Debian 13
#                                 user runs, plus only the patches its COLO
#                                 primary needs under TCG (scripts/qemu-patches-10.0/:
#                                 the BQL fix, and the timer fix that KVM needs
#                                 too; we found no upstream fix for either)
#                                 -> /var/cache/remus/qemu-10.0-colo
#   scripts/build-qemu.sh 10.0-stock   the same source with no patch at all, for
#                                 measuring what stock does (not used by the tests)
#                                 -> /var/cache/remus/qemu-10.0-stock
#
# Debian 12's qemu-system-x86 (1:7.2+dfsg) has defects that break a COLO
# primary under -accel tcg (see docs/architecture.md, "Known QEMU defects"):
#   0001  the COLO thread saves the live state without the BQL and deadlocks on
#         it after the first checkpoint;
#   0002  TCG dirty tracking stops logging writes through already-dirty TLB
#         entries after the first migration bitmap sync, so checkpoints miss pages;
#   0003  the checkpoint timer is freed without the BQL while the main loop
#         may re-arm it (use-after-free at the end of a session).
# The source comes from `apt-get source qemu/<suite>` (bookworm for 7.2,
# trixie for 10.0: install-deps.sh adds deb-src entries for both; no trixie
# binary package is installed). dpkg-source unpacks it and applies Debian's
# patch series, then ours are applied in name order.
# QEMU 10.0 needs meson >= 1.5 and Debian 12 has 1.0: the script unpacks
# bookworm-backports' meson 1.7 .deb into the work directory and uses it for
# this build only (the system's meson is not touched).
#
# The binary finds BIOS and option ROMs in Debian's /usr/share/qemu,
# /usr/share/seabios and /usr/lib/ipxe/qemu (packages qemu-system-data, seabios,
# ipxe-qemu; configured with --firmwarepath, so no wrapper or -L is needed).
#
# Idempotent: if the binary exists and the stamp file records the same hash of
# this script + the patches, it prints the path and exits 0 at once.
# The last line printed on success is always the binary's path.
#
# Environment:
#   REMUS_QEMU_CACHE        install dir        (default per version, above)
#   REMUS_QEMU_WORK         build tree         (default $REMUS_QEMU_CACHE.work)
#   REMUS_QEMU_JOBS         ninja -j           (default 2)
#   REMUS_QEMU_DEB_VERSION  pin the Debian source version, e.g. 1:7.2+dfsg-7+deb12u18
#                           (default: the suite's current one; must match the version)
#   REMUS_QEMU_KEEP_WORK    1 keeps the build tree after success (default 1)
#   REMUS_QEMU_FORCE        1 rebuilds even if the stamp matches
set -euo pipefail

log() { printf '[build-qemu %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
VERSION=${1:-7.2}
case "$VERSION" in
    7.2)  SUITE=bookworm; DEB_GLOB='1:7.2+dfsg-*'; PATCH_DIR="$SCRIPT_DIR/qemu-patches"
          DEFAULT_CACHE=/var/cache/remus/qemu-7.2-colo; PKG_SUFFIX=" + remus colo patches" ;;
    10.0) SUITE=trixie; DEB_GLOB='1:10.0.*'; PATCH_DIR="$SCRIPT_DIR/qemu-patches-10.0"
          DEFAULT_CACHE=/var/cache/remus/qemu-10.0-colo; PKG_SUFFIX=" + remus colo patches" ;;
    10.0-stock)
          SUITE=trixie; DEB_GLOB='1:10.0.*'; PATCH_DIR=/nonexistent
          DEFAULT_CACHE=/var/cache/remus/qemu-10.0-stock; PKG_SUFFIX="" ;;
    -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
    *) echo "build-qemu.sh: unknown QEMU version '$VERSION' (7.2, 10.0 or 10.0-stock)" >&2; exit 2 ;;
esac
CACHE=${REMUS_QEMU_CACHE:-$DEFAULT_CACHE}
CACHE=${CACHE%/}
WORK=${REMUS_QEMU_WORK:-$CACHE.work}
JOBS=${REMUS_QEMU_JOBS:-2}
BIN="$CACHE/bin/qemu-system-x86_64"
STAMP="$CACHE/.remus-build-stamp"
FIRMWAREPATH=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu

shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)
shopt -u nullglob
[ "$VERSION" = 10.0-stock ] || [ ${#PATCHES[@]} -gt 0 ] || die "no patches found in $PATCH_DIR"

# Hash of everything that determines the result: this script and the patches
# (names and contents, in apply order).
input_hash() {
    {
        printf 'script\n'; cat "$SCRIPT_PATH"
        for p in "${PATCHES[@]}"; do printf 'patch %s\n' "$(basename "$p")"; cat "$p"; done
    } | sha256sum | cut -d' ' -f1
}
HASH=$(input_hash)

stamp_ok() {
    [ -x "$BIN" ] && [ -f "$STAMP" ] && grep -qx "hash=$HASH" "$STAMP"
}

if [ "${REMUS_QEMU_FORCE:-0}" != 1 ] && stamp_ok; then
    log "up to date ($(grep '^debian_version=' "$STAMP" | cut -d= -f2), hash ${HASH:0:12})"
    echo "$BIN"
    exit 0
fi

mkdir -p "$(dirname "$CACHE")"
# One build per cache dir at a time (CI jobs may race).
exec 9>"$CACHE.lock"
if ! flock -n 9; then
    log "another build holds $CACHE.lock; waiting"
    flock 9
fi
if [ "${REMUS_QEMU_FORCE:-0}" != 1 ] && stamp_ok; then
    log "built by a concurrent run"
    echo "$BIN"
    exit 0
fi

T_START=$(date +%s)

# ---------------------------------------------------------------- build deps
# Minimal list (not `apt-get build-dep qemu`): compiler, meson/ninja, glib,
# pixman, zlib, flex/bison, dpkg-dev for dpkg-source, libfdt (x86_64-softmmu
# requires fdt in 7.2, for microvm; the source package ships no dtc copy),
# slirp for -netdev user.
# Firmware comes from the installed runtime packages.
DEPS=(build-essential pkg-config ninja-build meson python3 libglib2.0-dev
      libpixman-1-dev zlib1g-dev flex bison dpkg-dev patch libfdt-dev libslirp-dev
      qemu-system-data seabios ipxe-qemu)
missing=()
for p in "${DEPS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages (run as root or install): ${missing[*]}"
    log "installing build deps: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "build deps present"
fi

# ------------------------------------------------------------------- source
DL="$WORK/download"
SRC="$WORK/src"
mkdir -p "$DL"
want="qemu${REMUS_QEMU_DEB_VERSION:+=$REMUS_QEMU_DEB_VERSION}"
[ -n "${REMUS_QEMU_DEB_VERSION:-}" ] || want="qemu/$SUITE"
shopt -s nullglob
dscs=("$DL"/qemu_*.dsc)
shopt -u nullglob
if [ -n "${REMUS_QEMU_DEB_VERSION:-}" ]; then
    v=${REMUS_QEMU_DEB_VERSION#*:}
    dscs=(); [ -f "$DL/qemu_$v.dsc" ] && dscs=("$DL/qemu_$v.dsc")
fi
if [ ${#dscs[@]} -eq 0 ]; then
    log "downloading Debian source package ($want)"
    # apt as root cannot drop to _apt for a directory _apt cannot write; harmless.
    (cd "$DL" && apt-get source --download-only -qq "$want" 2>&1 \
        | grep -v 'Download is performed unsandboxed' >&2) || true
    shopt -s nullglob
    dscs=("$DL"/qemu_*.dsc)
    shopt -u nullglob
    [ ${#dscs[@]} -gt 0 ] || die "apt-get source $want failed (deb-src for $SUITE configured? scripts/install-deps.sh adds it)"
else
    log "using downloaded source ${dscs[-1]##*/}"
fi
DSC=${dscs[-1]}
DEBVER=$(sed -n 's/^Version: //p' "$DSC")
# shellcheck disable=SC2254
case "$DEBVER" in
    $DEB_GLOB) ;;
    *) die "source package is qemu $DEBVER; QEMU $VERSION needs $DEB_GLOB" ;;
esac
log "unpacking qemu $DEBVER with dpkg-source (applies Debian's patch series)"
rm -rf "$SRC"
dpkg-source --no-check -x "$DSC" "$SRC" >"$WORK/dpkg-source.log" 2>&1 \
    || { tail -20 "$WORK/dpkg-source.log" >&2; die "dpkg-source -x failed"; }
log "Debian patches applied: $(grep -c 'applying' "$WORK/dpkg-source.log")"

for p in "${PATCHES[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --batch --forward --no-backup-if-mismatch <"$p" >&2 \
        || die "patch $(basename "$p") does not apply to qemu $DEBVER"
done

# ---------------------------------------------------------------- configure
# --without-default-features turns every optional feature off; only what the
# COLO primary and the tests need is switched back on:
#   tcg (the test accelerator), kvm (production parity, costs little),
#   replication (CONFIG_REPLICATION: without it x-colo cannot be enabled and the
#   COLO thread calls abort()), fdt (required by x86_64-softmmu), slirp
#   (-netdev user, handy in tests).
# Always built on Linux regardless: tap netdev, socket/unix/tcp chardevs, QMP,
# migration, virtio-net, virtio-blk (default device set of x86_64-softmmu).
CONFIGURE_FLAGS=(
    --prefix="$CACHE"
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-tcg
    --enable-kvm
    --enable-replication
    --enable-slirp
    --enable-fdt=system
    --disable-docs
    --disable-werror
    --disable-install-blobs
    --disable-user
    --disable-linux-user
    --disable-tools
    --disable-guest-agent
    --disable-gtk --disable-sdl --disable-vnc --disable-spice --disable-opengl
    --disable-xen --disable-curses --disable-virglrenderer
    --audio-drv-list=
    --firmwarepath="$FIRMWAREPATH"
    --with-pkgversion="Debian $DEBVER$PKG_SUFFIX"
)
if [ "$VERSION" = 7.2 ]; then
    CONFIGURE_FLAGS+=(--with-git-submodules=ignore)
else
    # No network at build time: the source package carries the subprojects it needs.
    CONFIGURE_FLAGS+=(--disable-download)
fi
if [ "$VERSION" != 7.2 ]; then
    # meson >= 1.5 from bookworm-backports, unpacked for this build only.
    MESON_DIR="$WORK/meson"
    if ! PYTHONPATH="$MESON_DIR/usr/lib/python3/dist-packages" python3 -c \
            'import sys, mesonbuild.coredata as c; sys.exit(tuple(map(int, c.version.split(".")[:2])) < (1, 5))' 2>/dev/null; then
        log "fetching meson from bookworm-backports (QEMU $VERSION needs meson >= 1.5; the system's is not changed)"
        rm -rf "$MESON_DIR" "$WORK"/meson_*.deb
        (cd "$WORK" && apt-get download -qq meson/bookworm-backports 2>&1 \
            | grep -v 'Download is performed unsandboxed' >&2) || true
        debs=("$WORK"/meson_*.deb)
        [ -f "${debs[0]}" ] || die "apt-get download meson/bookworm-backports failed (is bookworm-backports configured? scripts/install-deps.sh adds it)"
        dpkg-deb -x "${debs[0]}" "$MESON_DIR"
    fi
    export PYTHONPATH="$MESON_DIR/usr/lib/python3/dist-packages${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$MESON_DIR/usr/bin:$PATH"
fi
BUILD="$SRC/build"
mkdir -p "$BUILD"
log "configure: ${CONFIGURE_FLAGS[*]}"
(cd "$BUILD" && ../configure "${CONFIGURE_FLAGS[@]}") >"$WORK/configure.log" 2>&1 \
    || { tail -40 "$WORK/configure.log" >&2; die "configure failed (log: $WORK/configure.log)"; }
T_CONF=$(date +%s)
log "configured in $((T_CONF - T_START))s"

# -------------------------------------------------------------------- build
log "building qemu-system-x86_64 with ninja -j$JOBS (log: $WORK/ninja.log; about 5-10 min on 2 cores)"
ninja -C "$BUILD" -j"$JOBS" qemu-system-x86_64 >"$WORK/ninja.log" 2>&1 &
ninja_pid=$!
trap 'kill "$ninja_pid" 2>/dev/null || true' EXIT
next_report=$(( $(date +%s) + 60 ))
while kill -0 "$ninja_pid" 2>/dev/null; do
    sleep 2
    if [ "$(date +%s)" -ge "$next_report" ]; then
        next_report=$(( next_report + 60 ))
        log "  ninja $(grep -o '^\[[0-9]*/[0-9]*\]' "$WORK/ninja.log" | tail -1) after $(( $(date +%s) - T_CONF ))s"
    fi
done
wait "$ninja_pid" || { tail -40 "$WORK/ninja.log" >&2; die "ninja failed (log: $WORK/ninja.log)"; }
trap - EXIT
T_BUILD=$(date +%s)
log "compiled in $((T_BUILD - T_CONF))s"

# ------------------------------------------------------------------ install
rm -f "$STAMP"
mkdir -p "$CACHE/bin"
install -m 0755 "$BUILD/qemu-system-x86_64" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"

# Smoke test: firmware lookup (bios-256k.bin, efi-virtio.rom) and QMP.
log "smoke test"
out=$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-status"}' '{"execute":"quit"}' \
    | timeout 30 "$BIN" -machine pc -accel tcg -m 64 -nodefaults -display none \
        -device virtio-net-pci -qmp stdio 2>&1) \
    || die "smoke test failed: $out"
grep -q '"status"' <<<"$out" || die "smoke test: no query-status reply: $out"
"$BIN" -version | head -1 >&2

T_END=$(date +%s)
{
    echo "hash=$HASH"
    echo "debian_version=$DEBVER"
    echo "patches=$(for p in "${PATCHES[@]}"; do basename "$p"; done | paste -sd,)"
    echo "configure=${CONFIGURE_FLAGS[*]}"
    echo "build_seconds=$((T_END - T_START))"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"

if [ "${REMUS_QEMU_KEEP_WORK:-1}" != 1 ]; then
    rm -rf "$SRC"
fi
log "done in $((T_END - T_START))s (configure $((T_CONF - T_START))s, compile $((T_BUILD - T_CONF))s)"
echo "$BIN"
