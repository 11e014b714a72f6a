#!/usr/bin/env bash
# The main job on one machine: boot a guest, protect it to a backup remusd on
# loopback, watch checkpoints flow, kill the primary QEMU, and watch the guest
# carry on on the backup from the last committed checkpoint.
# Sets everything up itself (packages, build, patched QEMU, test guest).
# Idempotent; cleans up after itself. Needs root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${REMUS_BUILD_DIR:-$ROOT/build}
say() { printf '\n\033[1m==== %s\033[0m\n' "$*"; }

say "setting up (packages, build, patched QEMU, test guest)"
"$ROOT/scripts/install-deps.sh"
"$ROOT/scripts/build.sh" >/dev/null
QEMU=$("$ROOT/scripts/build-qemu.sh" | tail -n1)
"$ROOT/scripts/build-guest.sh" "$BUILD/guest" >/dev/null

REMUSD=$BUILD/remusd/remusd
REMUSCTL=$BUILD/tools/remusctl/remusctl
D=$(mktemp -d /tmp/remus-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$D/b/domains/demo/run/qemu.pid" ] && kill "$(cat "$D/b/domains/demo/run/qemu.pid")" 2>/dev/null || true
  sleep 0.5
  rm -rf "$D"
}
trap cleanup EXIT
qmp() {  # qmp SOCKET COMMAND-JSON
  printf '{"execute":"qmp_capabilities"}\n%s\n' "$2" | socat -t2 - UNIX-CONNECT:"$1" | tail -n1
}
counter() {
  qmp "$1" '{"execute":"human-monitor-command","arguments":{"command-line":"xp /1ug 0x4000000"}}' |
    sed -n 's/.*: *\([0-9][0-9]*\).*/\1/p'
}

"$REMUSCTL" keygen --out "$D/key" >/dev/null
PORT=$((20000 + RANDOM % 20000))
# Arbitration: the backup takes over only after winning the domain in etcd,
# which the primary holds through a lease (docs/architecture.md,
# "Arbitration"). One etcd member on loopback stands in for the cluster a
# real deployment runs on three other hosts.
say "starting etcd (127.0.0.1:$((PORT + 1))), the arbiter both remusd use"
etcd --name demo --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$((PORT + 1))" \
  --advertise-client-urls "http://127.0.0.1:$((PORT + 1))" --listen-peer-urls "http://127.0.0.1:$((PORT + 2))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((PORT + 2))" \
  --initial-cluster "demo=http://127.0.0.1:$((PORT + 2))" >"$D/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((PORT + 1))/health" >/dev/null && break; sleep 0.1; done
ARB=(--etcd-endpoints "http://127.0.0.1:$((PORT + 1))" --lease-ttl-ms 3000)
say "starting the backup remusd (127.0.0.1:$PORT) and the primary remusd"
"$REMUSD" --state-dir "$D/b" --key-file "$D/key" --control "$D/b.sock" --listen "127.0.0.1:$PORT" \
  --allow-qemu-files "$BUILD/guest" "${ARB[@]}" --host-id backup 2>"$D/backup.log" &
PIDS+=($!)
"$REMUSD" --state-dir "$D/a" --key-file "$D/key" --control "$D/a.sock" "${ARB[@]}" --host-id primary \
  2>"$D/primary.log" &
PIDS+=($!)

say "booting the guest under TCG (memory dirtier, consistency checker, counter at 0x4000000)"
"$QEMU" -name demo -machine pc -accel tcg -m 256 -nodefaults -nographic -vga none \
  -serial "file:$D/serial.log" -kernel "$BUILD/guest/vmlinuz" -initrd "$BUILD/guest/initrd.img" \
  -append 'console=ttyS0 quiet memmap=64K$0x4000000 remus.counter=0x4000000 remus.dirty=10000 remus.wss=64 remus.check=1' \
  -qmp "unix:$D/qmp.sock,server=on,wait=off" -qmp "unix:$D/demo-qmp.sock,server=on,wait=off" 2>"$D/qemu.log" &
QPID=$!
PIDS+=($QPID)
for _ in $(seq 100); do grep -q 'check ok' "$D/serial.log" 2>/dev/null && break; sleep 0.2; done
tail -n 2 "$D/serial.log"

say "remusctl protect demo --backup 127.0.0.1:$PORT --interval 100"
"$REMUSCTL" --socket "$D/a.sock" protect demo --qmp "$D/qmp.sock" --backup "127.0.0.1:$PORT" --interval 100

for i in 1 2 3; do
  sleep 2
  say "checkpoints flowing ($i/3)"
  "$REMUSCTL" --socket "$D/a.sock" status
done

say "primary guest counter: $(counter "$D/demo-qmp.sock"); killing the primary QEMU (kill -9 $QPID)"
kill -9 "$QPID"
wait "$QPID" 2>/dev/null || true
for _ in $(seq 100); do
  "$REMUSCTL" --socket "$D/b.sock" status demo --json 2>/dev/null | grep -q '"state": "failed-over"' && break
  sleep 0.1
done
say "the backup took over"
"$REMUSCTL" --socket "$D/b.sock" status
RQMP=$D/b/domains/demo/run/qmp.sock
for i in 1 2 3; do
  sleep 2
  echo "guest counter on the backup: $(counter "$RQMP")"
done
say "the restored guest's console (its consistency checker keeps passing)"
tail -n 4 "$D/b/domains/demo/run/serial.log"
if grep -q 'CHECKER FAIL' "$D/b/domains/demo/run/serial.log"; then
  echo "demo: the consistency checker failed on the backup" >&2; exit 1
fi
say "demo done"
