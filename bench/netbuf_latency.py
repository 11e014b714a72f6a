#!/usr/bin/python3
"""Response latency added by output commit (--netbuf), stdlib only. A benchmark:
it measures and reports, and never fails on a number.

World (as tests/e2e/test_netbuf.py): namespace H holds both remusd daemons and
the guest's QEMU (virtio-net on a persistent tap in bridge br0); namespace C
holds the client, on a veth into br0. The test guest answers every line on
TCP 7000 (tests/guest, remus.tcp).

Two request/response workloads, each run from C for --seconds:
  closed   tests/e2e/netclient.py: one connection, the next request as soon as
           the previous answer arrived. Its requests lock onto the checkpoint
           cycle (each one reaches the guest just after an ACK released the
           previous answer), so it waits about a whole checkpoint period.
  random   this script's own client (`_client` mode): --conns connections, each
           waiting a random think time, uniform in [0, P) with P the measured
           checkpoint period, before each request. Requests then reach the guest
           at a uniformly random point of an epoch: the workload the floor
           interval/2 + ack round trip describes.
RTT = client's wall clock just before send() to the kernel receive timestamp of
the answer (SO_TIMESTAMPNS).

Sequence: boot the guest; both workloads unprotected; `remusctl protect
--netbuf nfqueue --interval <first>`; for each interval: `remusctl tune`,
--settle seconds, both workloads, the primary's status; then unprotect, protect
again with --netbuf none at --control-interval (the control: no buffering,
same checkpoints); finally both workloads unprotected again (drift check).

Per-epoch figures for each window come from the primary's debug log ("epoch N:
output barrier, wall T" at the end of the guest's pause, "epoch N: acked,
releasing output, wall T"): ack = barrier -> ACK (what status calls ack_ms,
LOADED -> ACK), period = barrier -> next barrier. The status' own rolling
ack_ms/pause_ms (last 1024 checkpoints, so mixed with earlier intervals) is
recorded too.

Output: one JSON document on stdout and in bench/results/netbuf-<timestamp>.json;
a table on stderr.

Usage (root): /usr/bin/python3 bench/netbuf_latency.py [--quick] [--seconds S]
              [--intervals 200,100,50,25] [--keep]
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETCLIENT = os.path.join(ROOT, "tests", "e2e", "netclient.py")
DEFAULT_QEMU = os.environ.get("REMUS_QEMU", "/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64")
COUNTER_GPA = 0x4000000
DOMAIN = "web1"
GUEST_IP, CLIENT_IP, PORT, TAP = "10.78.0.2", "10.78.0.3", 7000, "rbtap0"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def log(msg):
    print(f"[netbuf-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def pct(values, p):
    """Nearest-rank percentile, the same rule as run_bench.py and the C++ tools."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def summary(values):
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99),
            "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def rnd(x, nd=3):
    return None if x is None else round(x, nd)


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK


def proc_cpu_s(pid):
    """user+system CPU seconds of a process (all its threads) so far, or 0."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """Over one client run, in percent of one core: the whole machine, this run's
    processes (guest QEMU, both remusd, the client and remusctl calls) and
    `others` (everything else on the machine: other people's work)."""

    def __init__(self, pids):
        self.pids = [p for p in pids if p]
        self.t0 = time.monotonic()
        self.m0, self.c0 = machine_busy_s(), children_cpu_s()
        self.p0 = sum(proc_cpu_s(p) for p in self.pids)

    def stop(self):
        dt = time.monotonic() - self.t0
        busy = 100.0 * (machine_busy_s() - self.m0) / dt
        mine = 100.0 * (sum(proc_cpu_s(p) for p in self.pids) - self.p0 + children_cpu_s() - self.c0) / dt
        return {"machine_busy": round(busy, 1), "this_run": round(mine, 1), "others": round(busy - mine, 1)}


# ------------------------------------------------------------ client mode
def client_main(argv):
    """`_client HOST PORT --duration D --conns K --think-max-ms T`: K connections,
    each sleeping uniform [0, T) ms before every request. JSON lines like
    netclient.py ("resp" with t_send/t_recv, "error", "end")."""
    ap = argparse.ArgumentParser(prog="netbuf_latency.py _client")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--think-max-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    out_lock = threading.Lock()
    failed = []

    def emit(**kv):
        with out_lock:
            sys.stdout.write(json.dumps(kv) + "\n")
            sys.stdout.flush()

    socks = []
    deadline = time.time() + 60
    for _ in range(a.conns):
        while True:
            try:
                s = socket.create_connection((a.host, a.port), timeout=5)
                break
            except OSError as e:
                if time.time() > deadline:
                    emit(ev="error", what=f"connect: {e}", t=time.time())
                    return 1
                time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(60)
        socks.append(s)
    end = time.time() + a.duration

    def run(k, s):
        rng = random.Random(a.seed * 1000 + k)
        buf, i = b"", 0
        try:
            while True:
                time.sleep(rng.uniform(0.0, a.think_max_ms / 1000.0))
                if time.time() >= end:
                    return
                i += 1
                t_send = time.time()
                s.sendall(b"c%d-%d\n" % (k, i))
                t_recv = None
                while b"\n" not in buf:
                    data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
                    if not data:
                        raise OSError("connection closed by the guest")
                    for level, typ, cdata in anc:
                        if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(cdata) >= 16:
                            sec, nsec = struct.unpack("qq", cdata[:16])
                            t_recv = sec + nsec / 1e9
                    buf += data
                line, buf = buf.split(b"\n", 1)
                if not line.startswith(b"seq="):
                    raise OSError(f"bad answer {line!r}")
                emit(ev="resp", c=k, i=i, t_send=t_send, t_recv=t_recv or time.time())
        except OSError as e:
            failed.append(k)
            emit(ev="error", what=f"conn {k}: {type(e).__name__}: {e}", t=time.time())

    threads = [threading.Thread(target=run, args=(k, s)) for k, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in socks:
        s.close()
    emit(ev="end", t=time.time())
    return 1 if failed else 0


# ------------------------------------------------------------------ world
class World:
    """Scratch dir, namespaces, every process started; cleanup() undoes it all."""

    def __init__(self, args):
        self.args = args
        self.build = os.path.abspath(args.build)
        self.remusd = os.path.join(self.build, "remusd", "remusd")
        self.remusctl = os.path.join(self.build, "tools", "remusctl", "remusctl")
        self.kernel = os.path.join(self.build, "guest", "vmlinuz")
        self.initrd = os.path.join(self.build, "guest", "initrd.img")
        self.qemu = args.qemu
        for p in (self.remusd, self.remusctl, self.kernel, self.initrd, self.qemu, NETCLIENT):
            if not os.path.exists(p):
                raise BenchError(f"missing {p} (build with `cmake --build build`; guest with "
                                 f"scripts/build-guest.sh; QEMU with scripts/build-qemu.sh)")
        if os.geteuid() != 0:
            raise BenchError("run as root (namespaces, iptables, remusd's control socket)")
        self.procs = []  # Popen, each in its own session
        self.nets = []
        self.dir = tempfile.mkdtemp(prefix="remus-nbl.", dir="/tmp")
        tag = os.getpid() % 100000
        self.h, self.c = f"rbh{tag}", f"rbc{tag}"
        self.key = os.path.join(self.dir, "key")
        self.ctl("keygen", "--out", self.key)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def sh(*argv):
        r = subprocess.run(list(argv), capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
        return r.stdout

    def spawn(self, name, argv, ns):
        logf = os.path.join(self.dir, f"{name}.log")
        with open(logf, "ab") as f:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p, logf

    def ctl(self, *argv, sock=None, timeout=180, check=True):
        cmd = [self.remusctl] + (["--socket", sock] if sock else []) + list(argv)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError(f"{' '.join(cmd[1:])} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def status(self, sock):
        r = self.ctl("status", DOMAIN, "--json", sock=sock, timeout=15, check=False)
        if r.returncode != 0:
            return None
        try:
            d = json.loads(r.stdout)
        except ValueError:
            return None
        if isinstance(d, dict) and "domains" in d:
            d = d["domains"]
        return (d[0] if d else None) if isinstance(d, list) else d

    # -------------------------------------------------------------- setup
    def make_net(self):
        for ns in (self.h, self.c):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self.sh("ip", "netns", "add", ns)
            self.nets.append(ns)
        h, c = ["ip", "-n", self.h], ["ip", "-n", self.c]
        self.sh(*h, "link", "set", "lo", "up")
        self.sh(*h, "link", "add", "br0", "type", "bridge")
        self.sh(*h, "link", "set", "br0", "up")
        self.sh(*h, "tuntap", "add", "dev", TAP, "mode", "tap")
        self.sh(*h, "link", "set", TAP, "master", "br0", "up")
        self.sh(*h, "link", "add", "vh", "type", "veth", "peer", "name", "vc", "netns", self.c)
        self.sh(*h, "link", "set", "vh", "master", "br0", "up")
        self.sh(*c, "link", "set", "lo", "up")
        self.sh(*c, "addr", "add", f"{CLIENT_IP}/24", "dev", "vc")
        self.sh(*c, "link", "set", "vc", "up")

    def start_remusd(self, name, listen_port=None):
        sock = os.path.join(self.dir, f"{name}.sock")
        argv = [self.remusd, "--state-dir", os.path.join(self.dir, name), "--key-file", self.key,
                "--control", sock, "--heartbeat-interval-ms", "100", "--heartbeat-timeout-ms", "3000",
                "--log-level", "debug"]
        if listen_port:
            argv += ["--listen", f"127.0.0.1:{listen_port}", "--qemu", self.qemu, "--no-auto-promote",
                     "--allow-qemu-files", os.path.dirname(self.kernel)]
        p, logf = self.spawn(f"remusd-{name}", argv, self.h)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if p.poll() is not None:
                raise BenchError(f"remusd {name} exited with {p.returncode}:\n{tail(logf)}")
            if time.monotonic() > deadline:
                raise BenchError(f"remusd {name} did not create {sock}:\n{tail(logf)}")
            time.sleep(0.05)
        return p, sock, logf

    def start_guest(self):
        a = self.args
        self.serial = os.path.join(self.dir, "serial.log")
        self.qmp_sock = os.path.join(self.dir, "q.sock")
        append = (f"console=ttyS0 memmap=64K${COUNTER_GPA:#x} remus.counter={COUNTER_GPA:#x} "
                  f"remus.dirty={a.dirty} remus.wss={a.wss} remus.check=0 quiet "
                  f"remus.ip={GUEST_IP}/24 remus.tcp={PORT}")
        argv = [self.qemu, "-machine", "pc", "-accel", "tcg", "-m", str(a.mem), "-nodefaults",
                "-nographic", "-vga", "none", "-serial", f"file:{self.serial}",
                "-kernel", self.kernel, "-initrd", self.initrd, "-append", append,
                "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:78:00:02,romfile="]
        self.guest, self.guest_log = self.spawn("qemu", argv, self.h)

    def wait_guest(self, timeout=120):
        t0 = time.monotonic()
        while True:
            if self.guest.poll() is not None:
                raise BenchError(f"guest QEMU exited ({self.guest.returncode}):\n{tail(self.guest_log)}")
            text = read_text(self.serial)
            if "remus-guest: tcp listening" in text:
                return time.monotonic() - t0
            if "FATAL" in text or "eth0 setup FAILED" in text:
                raise BenchError(f"guest failed:\n{tail(self.serial)}")
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"guest did not boot in {timeout}s:\n{tail(self.serial)}")
            time.sleep(0.1)

    # ------------------------------------------------------------- client
    def run_client(self, workload, seconds, name, think_max_ms=None):
        """Runs one workload from C; returns (answers, (t0, t1) wall)."""
        out = os.path.join(self.dir, f"client-{name}.jsonl")
        if workload == "closed":
            argv = [sys.executable, NETCLIENT, GUEST_IP, str(PORT), "--duration", str(seconds)]
        else:
            argv = [sys.executable, os.path.abspath(__file__), "_client", GUEST_IP, str(PORT),
                    "--duration", str(seconds), "--conns", str(self.args.conns),
                    "--think-max-ms", f"{think_max_ms:.3f}"]
        t0 = time.time()
        with open(out, "wb") as f:
            p = subprocess.Popen(["ip", "netns", "exec", self.c, *argv], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        try:
            p.wait(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            raise BenchError(f"client {name} did not finish; see {out}")
        t1 = time.time()
        ev = []
        for line in read_text(out).splitlines():
            try:
                ev.append(json.loads(line))
            except ValueError:
                pass
        errs = [e for e in ev if e.get("ev") == "error"]
        if errs or p.returncode != 0:
            raise BenchError(f"client {name} failed (rc {p.returncode}): {errs or tail(out)}")
        resp = [e for e in ev if e.get("ev") == "resp"]
        if not resp:
            raise BenchError(f"client {name}: no answers; see {out}")
        return resp, (t0, t1)

    # ------------------------------------------------------------ cleanup
    def cleanup(self, keep):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.nets:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if keep:
            log(f"kept {self.dir} (logs)")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def read_text(path, offset=0):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def tail(path, n=25):
    lines = read_text(path).splitlines()[-n:]
    return "\n".join("    " + l for l in lines) or f"    <{path} empty>"


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


EPOCH_RE = re.compile(r"epoch (\d+): (output barrier|acked, releasing output), wall ([0-9.]+)")


def epoch_times(text):
    """{epoch: wall} of output barriers and of ACKs in a slice of the primary's log."""
    barrier, ack = {}, {}
    for m in EPOCH_RE.finditer(text):
        (barrier if m.group(2) == "output barrier" else ack)[int(m.group(1))] = float(m.group(3))
    return barrier, ack


def epoch_stats(text, t0, t1):
    """Per-epoch ack (barrier -> ACK) and period (barrier -> next barrier), in ms,
    for barriers between wall times t0 and t1, from a slice of the primary's log."""
    barrier, ack = epoch_times(text)
    ep = sorted(e for e, t in barrier.items() if t0 <= t <= t1)
    acks = [(ack[e] - barrier[e]) * 1000.0 for e in ep if e in ack]
    periods = [(barrier[e + 1] - barrier[e]) * 1000.0 for e in ep if e + 1 in barrier]
    return {"epochs": len(ep), "ack_ms": summary(acks), "period_ms": summary(periods)}


def after_ack(resp, text):
    """Per answer: kernel receive time minus the ACK of the first epoch whose output
    barrier came after the request was sent (the earliest the answer could leave),
    in ms. What remus adds beyond holding the answer for its epoch: the release
    path, plus a whole period when the answer missed that epoch."""
    barrier, ack = epoch_times(text)
    bl = sorted((t, e) for e, t in barrier.items())
    out = []
    for r in resp:
        e = next((e for t, e in bl if t > r["t_send"]), None)
        if e is not None and e in ack:
            out.append((r["t_recv"] - ack[e]) * 1000.0)
    return out


# ------------------------------------------------------------------ bench
class Bench:
    def __init__(self, w, args):
        self.w, self.args = w, args
        self.rows = []
        self.base = {}  # workload -> unprotected summary (start)

    def pids(self):
        return [self.w.guest.pid] + [p.pid for p in self.daemons]

    def unprotected(self, tag):
        out = {}
        for wl in self.args.workloads:
            meter = CpuMeter(self.pids())
            resp, _ = self.w.run_client(wl, self.args.seconds, f"{tag}-{wl}",
                                        think_max_ms=self.args.base_think_ms)
            rtt = [(e["t_recv"] - e["t_send"]) * 1000.0 for e in resp]
            s = summary(rtt)
            s["cpu_percent"] = meter.stop()
            s["stalls_150ms"] = sum(1 for x in rtt if x > 150.0)
            out[wl] = s
            log(f"  unprotected {wl:6s}: rtt p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms  n={s['n']}  "
                f"stalls {s['stalls_150ms']}  "
                f"cpu% {s['cpu_percent']}")
        return out

    def settle(self, interval):
        """Waits --settle seconds; returns the checkpoint period p50 seen meanwhile."""
        off = file_size(self.a_log)
        t0 = time.time()
        time.sleep(self.args.settle)
        es = epoch_stats(read_text(self.a_log, off), t0, time.time())
        return es["period_ms"].get("p50")

    def protected(self, mode, interval, tuned):
        a = self.args
        period = self.settle(interval)
        st0 = self.w.status(self.a_sock) or {}
        if st0.get("state") != "protected":
            raise BenchError(f"primary not protected before measuring: {json.dumps(st0)}")
        if st0.get("interval_ms") not in (None, interval):
            raise BenchError(f"status interval_ms {st0.get('interval_ms')} after tune to {interval}")
        if period is None:
            pm = (st0.get("pause_ms") or {}).get("p50") or 0.0
            period = interval + pm
        for wl in a.workloads:
            off = file_size(self.a_log)
            meter = CpuMeter(self.pids())
            resp, (t0, t1) = self.w.run_client(wl, a.seconds, f"{mode}-{interval}-{wl}", think_max_ms=period)
            rtt = [(e["t_recv"] - e["t_send"]) * 1000.0 for e in resp]
            cpu = meter.stop()
            time.sleep(0.3)  # the last ACK lines reach the log
            text = read_text(self.a_log, off)
            es = epoch_stats(text, t0, t1)
            aa = summary(after_ack(resp, text)) if mode != "none" else None
            st = self.w.status(self.a_sock) or {}
            nb = st.get("netbuf") or {}
            s = summary(rtt)
            base_p50 = self.base[wl]["p50"]
            ack_win = es["ack_ms"].get("p50")
            ack_status = (st.get("ack_ms") or {}).get("p50")
            ack = ack_win if ack_win is not None else ack_status
            floor_added = interval / 2.0 + ack if ack is not None else None
            ack99 = es["ack_ms"].get("p99")
            floor_added_p99 = 0.99 * interval + ack99 if ack99 is not None else None
            per = es["period_ms"].get("p50")
            held = mode != "none"
            pause = (st.get("pause_ms") or {}).get("p50")
            floor_pause = floor_added + pause if floor_added is not None and pause is not None else None
            # TCP retransmission stalls (RTO >= 200 ms): answers later than any holding
            # explains (one whose request met the pause waits < interval + pause + ack).
            stalls = sum(1 for x in rtt if x > (interval if held else 0) + 150.0)
            row = {
                "netbuf": mode, "interval_ms": interval, "workload": wl, "tuned": tuned,
                "think_max_ms": rnd(period) if wl == "random" else None,
                "conns": a.conns if wl == "random" else 1,
                "rtt_ms": {k: rnd(v) for k, v in s.items()},
                "unprotected_rtt_p50_ms": rnd(base_p50),
                "added_p50_ms": rnd(s["p50"] - base_p50),
                "added_p99_ms": rnd(s["p99"] - base_p50),
                "ack_ms_p50": rnd(ack), "ack_ms_source": "log-window" if ack_win is not None else "status",
                "ack_ms_window": {k: rnd(v) for k, v in es["ack_ms"].items()},
                "period_ms_window": {k: rnd(v) for k, v in es["period_ms"].items()},
                "epochs_in_window": es["epochs"],
                "floor_added_ms": rnd(floor_added),
                "floor_ms": rnd(floor_added + base_p50) if floor_added is not None else None,
                "ratio": rnd((s["p50"] - base_p50) / floor_added) if floor_added and held else None,
                "floor_added_p99_ms": rnd(floor_added_p99),
                "ratio_p99": rnd((s["p99"] - base_p50) / floor_added_p99) if floor_added_p99 and held else None,
                "floor_pause_added_ms": rnd(floor_pause),
                "ratio_pause": rnd((s["p50"] - base_p50) / floor_pause) if floor_pause and held else None,
                "after_ack_ms": {k: rnd(v) for k, v in aa.items()} if aa else None,
                "stalls_150ms": stalls,
                "period_floor_added_ms": rnd(per / 2.0 + ack) if per is not None and ack is not None else None,
                "added_over_period": rnd((s["p50"] - base_p50) / per) if per and held else None,
                "status": {"state": st.get("state"), "interval_ms": st.get("interval_ms"),
                           "ack_ms": st.get("ack_ms"), "pause_ms": st.get("pause_ms"),
                           "checkpoints_per_sec": st.get("checkpoints_per_sec"),
                           "dirty_pages_per_epoch": st.get("dirty_pages_per_epoch"),
                           "backpressure_waits": st.get("backpressure_waits"), "netbuf": nb,
                           "error": st.get("error")},
                "pause_ms_p50_status": rnd((st.get("pause_ms") or {}).get("p50")),
                "cpu_percent": cpu,
            }
            if st.get("state") != "protected":
                row["error"] = f"primary state {st.get('state')}: {st.get('error')}"
            self.rows.append(row)
            log(f"  {mode:7s} {interval:4d} ms {wl:6s}: rtt p50 {s['p50']:7.2f} p99 {s['p99']:7.2f} ms  "
                f"added p50 {row['added_p50_ms']:7.2f}  floor {row['floor_added_ms']}  ratio {row['ratio']}  "
                f"ack p50 {row['ack_ms_p50']} ({row['ack_ms_source']})  period p50 {rnd(per, 1)}  "
                f"after-ack p50 {(row['after_ack_ms'] or {}).get('p50')}  stalls {stalls}  n={s['n']}  "
                f"cpu% {cpu}" + (f"  ERROR {row['error']}" if row.get("error") else ""))

    def protect(self, mode, interval):
        t = time.monotonic()
        self.w.ctl("protect", DOMAIN, "--qmp", self.w.qmp_sock, "--backup", f"127.0.0.1:{self.port}",
                   "--interval", str(interval), "--netbuf", mode, "--timeout", "300",
                   sock=self.a_sock, timeout=330)
        deadline = time.monotonic() + 60
        while True:
            st = self.w.status(self.a_sock) or {}
            nb = st.get("netbuf") or {}
            if st.get("state") == "protected" and (mode == "none" or nb.get("active")):
                break
            if st.get("state") in ("unprotected", "failed-over", "stopped") or time.monotonic() > deadline:
                raise BenchError(f"protect --netbuf {mode}: state {st.get('state')}: {json.dumps(st)}")
            time.sleep(0.1)
        if nb.get("mode") != mode:
            raise BenchError(f"asked for --netbuf {mode}, status says {nb}")
        log(f"protected with --netbuf {mode} --interval {interval} in {time.monotonic() - t:.1f} s "
            f"(netbuf {json.dumps(nb)})")
        return st

    def run(self):
        a, w = self.args, self.w
        w.make_net()
        w.start_guest()
        self.port = 7788 + (os.getpid() % 1000)
        pb, self.b_sock, self.b_log = w.start_remusd("B", listen_port=self.port)
        pa, self.a_sock, self.a_log = w.start_remusd("A")
        self.daemons = [pa, pb]
        boot = w.wait_guest()
        log(f"guest up in {boot:.1f} s; unprotected baseline")
        time.sleep(1.0)
        self.base = self.unprotected("unprotected")
        self.protect("nfqueue", a.intervals[0])
        for i, interval in enumerate(a.intervals):
            if i:
                w.ctl("tune", DOMAIN, "--interval", str(interval), sock=self.a_sock, timeout=30)
            self.protected("nfqueue", interval, tuned=bool(i))
        if a.control_interval:
            w.ctl("unprotect", DOMAIN, sock=self.a_sock, timeout=60)
            log("control: protect again with --netbuf none")
            self.protect("none", a.control_interval)
            self.protected("none", a.control_interval, tuned=False)
        w.ctl("unprotect", DOMAIN, sock=self.a_sock, timeout=60)
        log("unprotected again (drift check)")
        time.sleep(1.0)
        self.base_end = self.unprotected("unprotected-end")


# ----------------------------------------------------------------- report
def machine_info(w):
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "accelerator": "tcg"}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            info["cpu_model"] = m.group(1) if m else None
    except OSError:
        pass
    try:
        info["qemu"] = subprocess.run([w.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        info["qemu"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True, text=True).stdout
        info["git_worktree_dirty"] = bool(dirty.strip())
    except OSError:
        pass
    info["loadavg_start"] = loadavg()
    return info


def print_summary(doc):
    f = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"
    log("response latency, ms. add = RTT minus the unprotected RTT p50 of the same workload;")
    log("  floor = interval/2 + ack p50, ratio = add p50 / floor; fl+pse = floor + pause p50, rat = add p50 / fl+pse;")
    log("  flr99 = 0.99 interval + ack p99, rat99 = add p99 / flr99; aft50 = p50 of (answer received - ACK of")
    log("  its epoch); stall = answers later than interval + 150 ms (TCP retransmission timeouts)")
    for key, name in (("unprotected", "unprot."), ("unprotected_end", "unpr.end")):
        for wl, s in (doc.get(key) or {}).items():
            log(f"  {name:8s} {'':>4s} {wl:6s} {f(s.get('p50')):>7s} {f(s.get('p99')):>7s}"
                f"{'':>60s}stall {s.get('stalls_150ms')} n {s.get('n')}")
    log(f"  {'netbuf':8s} {'ivl':>4s} {'wl':6s} {'p50':>7s} {'p99':>7s} {'add50':>7s} {'add99':>7s} "
        f"{'ack50':>5s} {'pse50':>5s} {'floor':>6s} {'ratio':>5s} {'fl+pse':>6s} {'rat':>5s} {'flr99':>6s} "
        f"{'rat99':>5s} {'aft50':>5s} {'stall':>5s} {'n':>5s}")
    for r in doc.get("results", []):
        log(f"  {r['netbuf']:8s} {r['interval_ms']:>4d} {r['workload']:6s} {f(r['rtt_ms'].get('p50')):>7s} "
            f"{f(r['rtt_ms'].get('p99')):>7s} {f(r['added_p50_ms']):>7s} {f(r['added_p99_ms']):>7s} "
            f"{f(r['ack_ms_p50']):>5s} {f(r['pause_ms_p50_status']):>5s} {f(r['floor_added_ms'], 1):>6s} "
            f"{f(r['ratio']):>5s} {f(r['floor_pause_added_ms'], 1):>6s} {f(r['ratio_pause']):>5s} "
            f"{f(r['floor_added_p99_ms'], 1):>6s} {f(r['ratio_p99']):>5s} "
            f"{f((r['after_ack_ms'] or {}).get('p50')):>5s} {r['stalls_150ms']:>5d} {r['rtt_ms'].get('n', 0):>5d}"
            + (f"  ERROR {r['error']}" if r.get("error") else ""))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s per run, intervals 200 and 50")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--qemu", default=DEFAULT_QEMU)
    ap.add_argument("--intervals", default=None, help="ms, comma separated, in this order "
                    "(default 200,100,50,25; quick 200,50)")
    ap.add_argument("--control-interval", type=int, default=100,
                    help="interval of the --netbuf none control run (0: skip it)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per client run (default 8; quick 3)")
    ap.add_argument("--settle", type=float, default=None, help="seconds after protect/tune before measuring "
                    "(default 2; quick 1.5)")
    ap.add_argument("--workloads", default="closed,random", help="closed, random or both (default both)")
    ap.add_argument("--conns", type=int, default=16, help="connections of the random workload")
    ap.add_argument("--base-think-ms", type=float, default=50.0,
                    help="think time bound of the random workload when unprotected")
    ap.add_argument("--mem", type=int, default=256, help="guest memory, MiB")
    ap.add_argument("--dirty", type=int, default=1000, help="guest dirty rate, pages/s")
    ap.add_argument("--wss", type=int, default=16, help="dirtier working set, MiB")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/netbuf-<timestamp>.json)")
    args = ap.parse_args()
    q = args.quick
    args.intervals = [int(x) for x in (args.intervals or ("200,50" if q else "200,100,50,25")).split(",") if x]
    args.seconds = args.seconds if args.seconds is not None else (3.0 if q else 8.0)
    args.settle = args.settle if args.settle is not None else (1.5 if q else 2.0)
    args.workloads = [x for x in args.workloads.split(",") if x]
    if not args.intervals or any(x not in ("closed", "random") for x in args.workloads) or not args.workloads:
        ap.error("--workloads: closed and/or random; --intervals: at least one")

    def on_signal(signo, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.monotonic()
    w = World(args)
    b = Bench(w, args)
    doc = {"bench": "netbuf_latency", "mode": "quick" if q else "full", "machine": machine_info(w),
           "config": dict(vars(args))}
    keep = args.keep
    try:
        b.run()
    except KeyboardInterrupt:
        doc["interrupted"] = True
        log("interrupted; writing what was measured")
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        doc["error"] = str(e)
        log(f"error: {e}")
        for name in ("remusd-A", "remusd-B"):
            log(f"--- {name}.log (tail)\n{tail(os.path.join(w.dir, name + '.log'))}")
        keep = True
    finally:
        w.cleanup(keep)
    doc["unprotected"] = b.base
    doc["results"] = b.rows
    doc["unprotected_end"] = getattr(b, "base_end", None)
    doc["machine"]["loadavg_end"] = loadavg()
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out = args.out
    if not out:
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(ROOT, "bench", "results", f"netbuf-{stamp}{'-quick' if q else ''}.json")
    text = json.dumps(doc, indent=1)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)
    print_summary(doc)
    log(f"wrote {out} ({doc['elapsed_s']:.0f} s)")
    return 1 if doc.get("error") or doc.get("interrupted") else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
