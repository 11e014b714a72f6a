#!/usr/bin/env bash
# The main job on one machine: boot a guest, protect it to a backup remusd on
# loopback with output commit (--netbuf nfqueue), watch checkpoints flow and a
# client's TCP connection to the guest, kill the primary QEMU, and watch the
# guest and the same connection carry on on the backup from the last committed
# checkpoint; then protection comes back on its own (the backup protects the
# guest to the primary host), and a planned switchover moves it back, the
# same connection still open.
# Network (as tests/e2e/test_netbuf.py): namespace H holds etcd, both remusd,
# the guest's QEMU (virtio-net on a persistent tap in bridge br0) and the QEMU
# the backup restores (it opens the same tap); namespace C holds the client
# (tests/e2e/netclient.py) on a veth into br0. The guest answers on TCP 7000.
# Sets everything up itself (packages, build, patched QEMU, test guest).
# Idempotent; cleans up after itself. Needs root.
# REMUS_DEMO_QEMU=10.0 runs it on Debian 13's QEMU 10.0 (scripts/build-qemu.sh
# 10.0) instead of Debian 12's 7.2, the default.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${REMUS_BUILD_DIR:-$ROOT/build}
say() { printf '\n\033[1m==== %s\033[0m\n' "$*"; }

say "setting up (packages, build, patched QEMU, test guest)"
"$ROOT/scripts/install-deps.sh"
"$ROOT/scripts/build.sh" >/dev/null
QEMU=$("$ROOT/scripts/build-qemu.sh" "${REMUS_DEMO_QEMU:-7.2}" | tail -n1)
"$ROOT/scripts/build-guest.sh" "$BUILD/guest" >/dev/null

REMUSD=$BUILD/remusd/remusd
REMUSCTL=$BUILD/tools/remusctl/remusctl
D=$(mktemp -d /tmp/remus-demo.XXXXXX)
# Namespaces named after this shell (rdemoh<pid>, rdemoc<pid>): no clash with
# the e2e tests' or another demo's. Those of a demo that died without its
# cleanup (its pid is gone) are removed first.
NSH=rdemoh$$ NSC=rdemoc$$
TAP=rdemotap0 GUEST_IP=10.79.0.2 CLIENT_IP=10.79.0.3 GPORT=7000
for ns in $(ip netns list | awk '{print $1}' | grep -E '^rdemo[hc][0-9]+$' || true); do
  kill -0 "${ns#rdemo?}" 2>/dev/null || ip netns del "$ns" 2>/dev/null || true
done
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for h in a b; do
    [ -f "$D/$h/domains/demo/run/qemu.pid" ] && kill "$(cat "$D/$h/domains/demo/run/qemu.pid")" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  ip netns del "$NSH" 2>/dev/null || true
  ip netns del "$NSC" 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# Run in namespace H. An array, not a function: "${INH[@]}" CMD & then has
# CMD's pid in $! (ip netns exec execs it), which kill -9 must reach.
INH=(ip netns exec "$NSH")
qmp() {  # qmp SOCKET COMMAND-JSON
  printf '{"execute":"qmp_capabilities"}\n%s\n' "$2" | socat -t2 - UNIX-CONNECT:"$1" | tail -n1
}
counter() {
  qmp "$1" '{"execute":"human-monitor-command","arguments":{"command-line":"xp /1ug 0x4000000"}}' |
    sed -n 's/.*: *\([0-9][0-9]*\).*/\1/p'
}

say "network: namespace $NSH (bridge br0, tap $TAP for the guest $GUEST_IP), client namespace $NSC ($CLIENT_IP)"
ip netns add "$NSH"
ip netns add "$NSC"
ip -n "$NSH" link set lo up
ip -n "$NSH" link add br0 type bridge
ip -n "$NSH" link set br0 up
ip -n "$NSH" tuntap add dev "$TAP" mode tap
ip -n "$NSH" link set "$TAP" master br0 up
ip -n "$NSH" link add vh type veth peer name vc netns "$NSC"
ip -n "$NSH" link set vh master br0 up
ip -n "$NSC" link set lo up
ip -n "$NSC" addr add "$CLIENT_IP/24" dev vc
ip -n "$NSC" link set vc up

# The client's events (tests/e2e/netclient.py, JSON lines), shown readably.
CLIENT_LOG=$D/client.jsonl
client_progress() {  # the connection and its latest answer
  python3 - "$CLIENT_LOG" <<'EOF'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
conn = next((e for e in ev if e["ev"] == "connected"), None)
resp = [e for e in ev if e["ev"] == "resp"]
for e in ev:
    if e["ev"] == "error":
        print(f"client: ERROR {e['what']}")
if not conn:
    print("client: not connected yet")
elif resp:
    r = resp[-1]
    print(f"client {conn['local']} -> {conn['peer']}: {len(resp)} answers, latest "
          f"seq={r['seq']} counter={r['counter']} echo={r['echo']!r} ({(r['t_recv'] - r['t_send']) * 1000:.1f} ms)")
else:
    print(f"client {conn['local']} -> {conn['peer']}: connected, no answer yet")
EOF
}
client_socket() {  # the kernel's view of the client's connection
  ip netns exec "$NSC" ss -tnH state established "( dport = :$GPORT )" |
    awk '{print "client socket (ss in the client namespace): ESTABLISHED " $3 " -> " $4}'
}
answers_after() {  # T: answers received after wall time T
  python3 - "$CLIENT_LOG" "$1" <<'EOF'
import json, sys
t = float(sys.argv[2])
print(sum(1 for l in open(sys.argv[1]) if l.startswith("{")
          and (e := json.loads(l))["ev"] == "resp" and e["t_recv"] > t))
EOF
}

"$REMUSCTL" keygen --out "$D/key" >/dev/null
PORT=$((20000 + RANDOM % 20000))
# Arbitration: the backup takes over only after winning the domain in etcd,
# which the primary holds through a lease (docs/architecture.md,
# "Arbitration"). One etcd member on loopback stands in for the cluster a
# real deployment runs on three other hosts.
say "starting etcd (127.0.0.1:$((PORT + 1)) in $NSH), the arbiter both remusd use"
"${INH[@]}" etcd --name demo --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$((PORT + 1))" \
  --advertise-client-urls "http://127.0.0.1:$((PORT + 1))" --listen-peer-urls "http://127.0.0.1:$((PORT + 2))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((PORT + 2))" \
  --initial-cluster "demo=http://127.0.0.1:$((PORT + 2))" >"$D/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do "${INH[@]}" curl -sf "http://127.0.0.1:$((PORT + 1))/health" >/dev/null && break; sleep 0.1; done
ARB=(--etcd-endpoints "http://127.0.0.1:$((PORT + 1))" --lease-ttl-ms 3000)
APORT=$((PORT + 3))
# Both listen and both say --reprotect-to self, as two hosts that back each
# other up: after a failover the host that promoted the guest protects it
# back to the other one on its own.
say "starting the backup remusd (127.0.0.1:$PORT) and the primary remusd (127.0.0.1:$APORT), in $NSH"
"${INH[@]}" "$REMUSD" --state-dir "$D/b" --key-file "$D/key" --control "$D/b.sock" --listen "127.0.0.1:$PORT" \
  --allow-qemu-files "$BUILD/guest" --qemu "$QEMU" --reprotect-to self "${ARB[@]}" --host-id backup \
  2>"$D/backup.log" &
PIDS+=($!)
"${INH[@]}" "$REMUSD" --state-dir "$D/a" --key-file "$D/key" --control "$D/a.sock" --listen "127.0.0.1:$APORT" \
  --allow-qemu-files "$BUILD/guest" --qemu "$QEMU" --reprotect-to self "${ARB[@]}" --host-id primary \
  2>"$D/primary.log" &
PIDS+=($!)

say "booting the guest under TCG (memory dirtier, consistency checker, counter at 0x4000000, TCP server on $GUEST_IP:$GPORT)"
"${INH[@]}" "$QEMU" -name demo -machine pc -accel tcg -m 256 -nodefaults -nographic -vga none \
  -serial "file:$D/serial.log" -kernel "$BUILD/guest/vmlinuz" -initrd "$BUILD/guest/initrd.img" \
  -append 'console=ttyS0 quiet memmap=64K$0x4000000 remus.counter=0x4000000 remus.dirty=10000 remus.wss=64 remus.check=1'" remus.ip=$GUEST_IP/24 remus.tcp=$GPORT" \
  -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" -device virtio-net-pci,netdev=n0,mac=52:54:00:79:00:02,romfile= \
  -qmp "unix:$D/qmp.sock,server=on,wait=off" -qmp "unix:$D/demo-qmp.sock,server=on,wait=off" 2>"$D/qemu.log" &
QPID=$!
PIDS+=($QPID)
for _ in $(seq 100); do grep -q 'check ok' "$D/serial.log" 2>/dev/null && break; sleep 0.2; done
tail -n 2 "$D/serial.log"

say "remusctl protect demo --backup 127.0.0.1:$PORT --interval 100 --netbuf nfqueue"
# Output commit: the guest's packets leave only once the checkpoint that
# produced them is acked by the backup.
"$REMUSCTL" --socket "$D/a.sock" protect demo --qmp "$D/qmp.sock" --backup "127.0.0.1:$PORT" --interval 100 \
  --netbuf nfqueue

say "a client in $NSC opens ONE TCP connection to $GUEST_IP:$GPORT (request, answer, next request...)"
ip netns exec "$NSC" python3 "$ROOT/tests/e2e/netclient.py" "$GUEST_IP" "$GPORT" --duration 600 \
  >"$CLIENT_LOG" 2>&1 &
CPID=$!
PIDS+=($CPID)
for _ in $(seq 150); do grep -q '"ev": "resp"' "$CLIENT_LOG" && break; sleep 0.2; done
client_socket

for i in 1 2 3; do
  sleep 2
  say "checkpoints flowing ($i/3)"
  "$REMUSCTL" --socket "$D/a.sock" status
  client_progress
done

say "primary guest counter: $(counter "$D/demo-qmp.sock"); killing the primary QEMU (kill -9 $QPID)"
T_KILL=$(date +%s.%N)
kill -9 "$QPID"
wait "$QPID" 2>/dev/null || true
OVER=0
for _ in $(seq 100); do
  "$REMUSCTL" --socket "$D/b.sock" status demo --json 2>/dev/null | grep -q '"state": "failed-over"' && OVER=1 && break
  sleep 0.1
done
if [ "$OVER" = 0 ]; then
  "$REMUSCTL" --socket "$D/b.sock" status || true
  tail -n 20 "$D/backup.log" >&2
  echo "demo: the backup did not take over" >&2; exit 1
fi
T_OVER=$(date +%s.%N)
say "the backup took over"
python3 - "$T_OVER" "$T_KILL" "$("$REMUSCTL" --socket "$D/b.sock" status demo --json --role backup)" <<'EOF'
import json, sys
d = json.loads(sys.argv[3])[0]
p = d["promotion"]
print(f"failover: the guest runs on the backup from checkpoint {d['last_committed_epoch']}, restored in "
      f"{p['failover_ms']} ms (fencing token {p['token']}); from kill -9 to running: "
      f"{float(sys.argv[1]) - float(sys.argv[2]):.2f} s (status polled every 0.1 s)")
EOF
"$REMUSCTL" --socket "$D/b.sock" status
RQMP=$D/b/domains/demo/run/qmp.sock
# The client's TCP retransmits its pending request; the restored guest, which
# has that connection in its state, answers it.
say "the same TCP connection, now answered by the restored guest"
for _ in $(seq 300); do
  [ "$(answers_after "$T_KILL")" -gt 0 ] && break
  kill -0 "$CPID" 2>/dev/null || break
  sleep 0.2
done
for i in 1 2 3; do
  echo "guest counter on the backup: $(counter "$RQMP")"
  client_progress
  sleep 2
done
client_socket

# The primary's CONFIG said --reprotect-to self: the backup protects the
# guest back to the primary host's remusd, with the same options (nfqueue).
say "protection comes back: the backup protects the guest to the primary host's remusd on its own"
PROT=0
for _ in $(seq 600); do
  "$REMUSCTL" --socket "$D/b.sock" status demo --json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)[0]
sys.exit(0 if d["role"] == "primary" and d["state"] == "protected" else 1)' && PROT=1 && break
  sleep 0.2
done
if [ "$PROT" = 0 ]; then
  "$REMUSCTL" --socket "$D/b.sock" status || true
  echo "demo: the backup did not protect the guest again" >&2; exit 1
fi
"$REMUSCTL" --socket "$D/b.sock" status
"$REMUSCTL" --socket "$D/a.sock" status
client_progress
say "the restored guest's console (its consistency checker keeps passing)"
tail -n 4 "$D/b/domains/demo/run/serial.log"
if grep -q 'CHECKER FAIL' "$D/b/domains/demo/run/serial.log"; then
  echo "demo: the consistency checker failed on the backup" >&2; exit 1
fi

# Planned: move the guest back to the primary host with nothing lost. The
# final checkpoint is acked, the primary host's remusd promotes from exactly
# it, the QEMU here ends, and the primary host protects the guest back here.
sleep 3
say "remusctl switchover demo (on the backup host, which runs the guest now): back to the primary host"
T_SWITCH=$(date +%s.%N)
"$REMUSCTL" --socket "$D/b.sock" switchover demo
"$REMUSCTL" --socket "$D/a.sock" status
"$REMUSCTL" --socket "$D/b.sock" status
sleep 2
client_progress
client_socket
say "the guest's console on the primary host after the switchover"
tail -n 3 "$D/a/domains/demo/run/serial.log"
if grep -q 'CHECKER FAIL' "$D/a/domains/demo/run/serial.log"; then
  echo "demo: the consistency checker failed after the switchover" >&2; exit 1
fi

say "the client's connection across the failover, the re-protection and the switchover"
ALIVE=1
kill -0 "$CPID" 2>/dev/null || ALIVE=0
kill "$CPID" 2>/dev/null || true
wait "$CPID" 2>/dev/null || true
python3 - "$CLIENT_LOG" "$T_KILL" "$ALIVE" "$T_SWITCH" <<'EOF' || { echo "demo: the client's TCP connection did not survive" >&2; exit 1; }
import json, sys
path, t_kill, alive, t_switch = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
ev = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
conns = [e for e in ev if e["ev"] == "connected"]
resp = [e for e in ev if e["ev"] == "resp"]
errs = [e for e in ev if e["ev"] == "error"]
before = [r for r in resp if r["t_recv"] <= t_kill]
after = [r for r in resp if r["t_recv"] > t_kill]
seq_ok = [r["seq"] for r in resp] == list(range(1, len(resp) + 1)) and all(r["i"] == r["seq"] for r in resp)
c = conns[0] if conns else {"local": "?", "peer": "?"}
print(f"connection:              {c['local']} -> {c['peer']} (connected {len(conns)} time(s))")
print(f"answers before the kill: {len(before)}" + (f" (last: seq={before[-1]['seq']} counter={before[-1]['counter']})" if before else ""))
print(f"answers after the kill:  {len(after)}" + (f" (first: seq={after[0]['seq']} counter={after[0]['counter']}, "
      f"{after[0]['t_recv'] - before[-1]['t_recv']:.1f} s after the last one from the primary)" if after and before else ""))
after_switch = [r for r in resp if r["t_recv"] > t_switch]
print(f"answers after the switchover: {len(after_switch)}")
print(f"sequence numbers:        {'1..%d, no gap, none repeated' % len(resp) if seq_ok else 'BROKEN'}")
print(f"errors:                  {len(errs)}" + "".join(f"\n  {e['what']}" for e in errs))
print(f"client still connected:  {'yes' if alive else 'NO'}")
ok = alive and not errs and len(conns) == 1 and before and after and after_switch and seq_ok
print("RESULT: the connection " + ("continued through the failover and the switchover back" if ok else "BROKE"))
sys.exit(0 if ok else 1)
EOF
say "demo done"
