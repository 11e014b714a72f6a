#!/bin/bash
# Install remus's libvirt hook (scripts/libvirt-hooks/qemu), which protects
# domains carrying <remus:protect .../> in their <metadata> when they start
# (README, "libvirt domains").
#
#   scripts/install-libvirt-hook.sh [--socket PATH] [--connect URI] [HOOK_DIR]
#
# HOOK_DIR: libvirt's hook directory, /etc/libvirt/hooks by default.
# - No qemu hook there yet, or ours: installed as HOOK_DIR/qemu.
# - Another qemu hook there: installed as HOOK_DIR/qemu.d/remus, which
#   libvirt (6.5 and later; Debian 12 has 9.0) runs besides it. Older libvirt
#   runs one qemu hook only: then this stops and says so.
# --socket PATH: remusd's control socket, when not /run/remus/remusd.sock.
# --connect URI: the libvirt URI remusd should use for these domains, when
#   not remusd's --libvirt-uri. Both are written to HOOK_DIR/remus.conf
#   (libvirt gives hooks almost no environment).
# Idempotent: an unchanged hook is left alone.
#
# libvirt looks for hook scripts when it starts: restart libvirtd (or
# virtqemud) after the first install.
set -euo pipefail

say() { echo "install-libvirt-hook: $*"; }
die() { echo "install-libvirt-hook: ERROR: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$REPO/scripts/libvirt-hooks/qemu
MARKER="remus libvirt hook"
SOCKET="" CONNECT="" DIR=/etc/libvirt/hooks

while [ $# -gt 0 ]; do
  case "$1" in
    --socket) [ $# -ge 2 ] || die "--socket needs a path"; SOCKET=$2; shift 2 ;;
    --connect) [ $# -ge 2 ] || die "--connect needs a libvirt URI"; CONNECT=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) DIR=$1; shift ;;
  esac
done

[ -f "$SRC" ] || die "$SRC is missing"
command -v python3 >/dev/null || die "the hook needs python3 (apt-get install python3)"
mkdir -p "$DIR"

# libvirt >= 6.5 runs every executable in HOOK_DIR/qemu.d/ as well.
hooks_dir_supported() {
  local v
  v=$( (libvirtd --version 2>/dev/null || virtqemud --version 2>/dev/null) | grep -oE '[0-9]+\.[0-9]+' | head -1) || true
  [ -z "$v" ] && return 0  # cannot tell: assume a current libvirt
  local major=${v%%.*} minor=${v#*.}
  [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 5 ]; }
}

install_to() {
  local dst=$1
  if [ -f "$dst" ] && cmp -s "$SRC" "$dst"; then
    say "$dst is up to date"
  else
    install -m 0755 "$SRC" "$dst.remus-new"
    mv -f "$dst.remus-new" "$dst"
    say "installed $dst"
  fi
}

if [ ! -e "$DIR/qemu" ] || grep -q "$MARKER" "$DIR/qemu" 2>/dev/null; then
  install_to "$DIR/qemu"
else
  hooks_dir_supported || die "$DIR/qemu is another program's hook and this libvirt runs only one qemu hook \
(qemu.d/ needs libvirt 6.5); call $SRC from it with the same arguments and stdin"
  mkdir -p "$DIR/qemu.d"
  install_to "$DIR/qemu.d/remus"
fi

if [ -n "$SOCKET" ] || [ -n "$CONNECT" ]; then
  conf=$DIR/remus.conf
  tmp=$(mktemp "$DIR/.remus.conf.XXXXXX")
  {
    echo "# remus libvirt hook settings (scripts/install-libvirt-hook.sh)"
    if [ -n "$SOCKET" ]; then echo "socket = $SOCKET"; fi
    if [ -n "$CONNECT" ]; then echo "connect = $CONNECT"; fi
  } >"$tmp"
  chmod 0644 "$tmp"
  if [ -f "$conf" ] && cmp -s "$tmp" "$conf"; then
    rm -f "$tmp"
    say "$conf is up to date"
  else
    mv -f "$tmp" "$conf"
    say "wrote $conf"
  fi
fi
say "libvirt finds new hooks when it starts: restart libvirtd (systemctl restart libvirtd) after the first install"
