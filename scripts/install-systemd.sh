#!/usr/bin/env bash
# Installs a built remus tree on this host for systemd:
#
#   build/remusd/remusd              -> /usr/local/sbin/remusd
#   build/tools/remusctl/remusctl    -> /usr/local/bin/remusctl
#   build/remusd/libremus-civetweb-{ssl,crypto}.so -> /usr/local/lib/remus/
#                                       (TLS on the metrics endpoint: remusd/civetweb_openssl3/)
#   scripts/remus-netbuf-setup       -> /usr/local/bin/remus-netbuf-setup
#   scripts/systemd/remusd.service   -> /etc/systemd/system/remusd.service
#   scripts/systemd/remusd@.service  -> /etc/systemd/system/remusd@.service
#   /etc/default/remusd              (a commented template, only if missing)
#   /etc/remus                       (directory for the key, mode 0700, if missing)
#
# then runs `systemctl daemon-reload` if systemd is running. It never creates
# or overwrites a key, never overwrites /etc/default/remusd, and never enables,
# starts or restarts remusd (a restart ends protection of this host's guests;
# do it when you choose: see docs/operator-guide.md). Idempotent: files that
# are already identical are left alone.
#
# Usage: scripts/install-systemd.sh [--dry-run] [--build-dir DIR] [--root DIR]
#   --dry-run        print what would be done, change nothing
#   --build-dir DIR  where the binaries are (default: $REMUS_BUILD_DIR or build/)
#   --root DIR       install below DIR instead of / (staging, packaging);
#                    no daemon-reload then
# Build first with scripts/build.sh. Needs root unless --dry-run or --root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${REMUS_BUILD_DIR:-$ROOT/build}
DEST=
DRY=0

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --build-dir) [ $# -ge 2 ] || usage; BUILD=$2; shift ;;
    --build-dir=*) BUILD=${1#*=} ;;
    --root) [ $# -ge 2 ] || usage; DEST=$2; shift ;;
    --root=*) DEST=${1#*=} ;;
    -h|--help) usage 0 ;;
    *) echo "install-systemd: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done
DEST=${DEST%/}

log() { printf '[install-systemd] %s\n' "$*"; }
run() {  # run CMD...: do it, or say it under --dry-run
  if [ $DRY = 1 ]; then log "would run: $*"; else "$@"; fi
}

if [ $DRY = 0 ] && [ -z "$DEST" ] && [ "$(id -u)" != 0 ]; then
  log "must run as root (or use --dry-run, or --root DIR to stage)"; exit 1
fi

SRC_REMUSD=$BUILD/remusd/remusd
SRC_REMUSCTL=$BUILD/tools/remusctl/remusctl
for f in "$SRC_REMUSD" "$SRC_REMUSCTL" "$BUILD/remusd/remus-fence" "$BUILD/remusd/libremus-civetweb-ssl.so" \
         "$BUILD/remusd/libremus-civetweb-crypto.so"; do
  if [ ! -x "$f" ]; then
    log "$f is missing: build first (scripts/build.sh, or --build-dir DIR)"; exit 1
  fi
done

changed=0
# put SRC DST MODE: install SRC as DST unless identical. Written next to the
# destination and renamed over it, so a running remusd's binary is replaced,
# not rewritten in place ("Text file busy").
put() {
  local src=$1 dst=$DEST$2 mode=$3
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    if [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
      log "unchanged: $dst"; return
    fi
    log "mode $mode: $dst"; run chmod "$mode" "$dst"; changed=1; return
  fi
  log "$([ -e "$dst" ] && echo updating || echo installing): $dst"
  run install -d -m 0755 "$(dirname "$dst")"
  run install -m "$mode" "$src" "$dst.remus-new"
  run mv -f "$dst.remus-new" "$dst"
  changed=1
}

put "$SRC_REMUSD" /usr/local/sbin/remusd 0755
# The fence watchdog remusd starts with --arbiter etcd: it looks next to itself.
put "$BUILD/remusd/remus-fence" /usr/local/sbin/remus-fence 0755
put "$SRC_REMUSCTL" /usr/local/bin/remusctl 0755
# Let Debian 12's civetweb load OpenSSL 3 for --metrics-web-config's TLS;
# remusd looks in ../lib/remus from its own directory.
for shim in ssl crypto; do
  put "$BUILD/remusd/libremus-civetweb-$shim.so" /usr/local/lib/remus/libremus-civetweb-$shim.so 0644
done
put "$ROOT/scripts/remus-netbuf-setup" /usr/local/bin/remus-netbuf-setup 0755
changed=0
put "$ROOT/scripts/systemd/remusd.service" /etc/systemd/system/remusd.service 0644
put "$ROOT/scripts/systemd/remusd@.service" /etc/systemd/system/remusd@.service 0644
units_changed=$changed

if [ -d "$DEST/etc/remus" ]; then
  log "unchanged: $DEST/etc/remus"
else
  log "creating: $DEST/etc/remus (mode 0700; the key goes here)"
  run install -d -m 0700 "$DEST/etc/remus"
fi

DEFAULTS=$DEST/etc/default/remusd
if [ -e "$DEFAULTS" ]; then
  log "kept: $DEFAULTS (never overwritten)"
else
  log "creating: $DEFAULTS (template)"
  if [ $DRY = 0 ]; then
    install -d -m 0755 "$(dirname "$DEFAULTS")"
    cat > "$DEFAULTS.remus-new" <<'EOF'
# Settings for remusd.service (read by systemd; see `remusd --help` and
# docs/man/remusd.8.md). The unit already passes
#   --state-dir /var/lib/remus --key-file /etc/remus/key
# Do not repeat those here (remusd refuses a flag given twice); override
# ExecStart with `systemctl edit remusd` to change them.
# After a change: `systemctl restart remusd`, which ends protection of the
# guests this host protects (they keep running; protect them again).
#
# Arbitration through etcd is the default and needs the cluster's client
# URLs, the same on both hosts (docs/operator-guide.md, section 10); remusd
# does not start without them unless --arbiter none is given.
#
# A host that only protects its own guests (primary):
#REMUSD_ARGS="--etcd-endpoints http://10.0.0.21:2379,http://10.0.0.22:2379,http://10.0.0.23:2379"
#
# A host that is also a backup for other hosts (needed on the host you want
# to fail back to, too). Port 7788 unless given:
#REMUSD_ARGS="--listen 0.0.0.0:7788 --etcd-endpoints http://10.0.0.21:2379,..."
#
# A backup that never promotes by itself (an operator runs
# `remusctl failover DOMAIN`): see section 10 of docs/operator-guide.md.
#REMUSD_ARGS="--listen 0.0.0.0:7788 --no-auto-promote --etcd-endpoints ..."
#
# No arbiter (fail-stop: a partition or a frozen remusd can leave two
# running copies of a guest):
#REMUSD_ARGS="--arbiter none"
#
# Other flags: --qemu PATH (QEMU binary for restored guests, default the
# qemu-system-ARCH of the primary's binary's name from this host's PATH),
# --allow-qemu-files DIR (B: where a restored guest's kernel, initrd and
# firmware may come from; section 15 of the operator guide), --heartbeat-interval-ms N (100), --heartbeat-timeout-ms N
# (1000), --metrics ADDR:PORT (Prometheus, no authentication: loopback or a
# management network), --log-level debug|info|warn|error, --config FILE
# (flags from a file, where this remusd version has it; the command line,
# including the unit's --state-dir and --key-file, wins over the file).
REMUSD_ARGS=""
EOF
    chmod 0644 "$DEFAULTS.remus-new"
    mv -f "$DEFAULTS.remus-new" "$DEFAULTS"
  else
    log "would write the template to $DEFAULTS"
  fi
fi

if [ -n "$DEST" ]; then
  log "staged below $DEST: no systemctl daemon-reload"
elif [ ! -d /run/systemd/system ]; then
  log "systemd is not running here: no daemon-reload"
elif [ $units_changed = 1 ]; then
  run systemctl daemon-reload
else
  log "unit files unchanged: no daemon-reload"
fi

[ -n "$DEST" ] || [ -e /etc/remus/key ] ||
  log "next: remusctl keygen --out /etc/remus/key, and copy it to the other host (mode 0600)"
log "next: edit /etc/default/remusd, then: systemctl enable --now remusd"
[ $DRY = 1 ] && log "dry run: nothing was changed"
exit 0
