#!/usr/bin/python3
"""What protection costs real workloads (issue 17). Not a test: it measures
and reports.

The guest is the workloads initrd (scripts/build-guest.sh --workloads:
build/guest/initrd-workloads.img): Debian 12's redis-server on the guest's
IP (no persistence) and the batch job server remus-batch (a memory-heavy LSD
radix sort of --batch-mib MiB of 64-bit keys, 4 passes through a second
buffer; tests/guest/remus-batch.c). One boot serves every case:

  world   the end-to-end tests' (tests/e2e: conftest World, test_netbuf Net):
          namespace H holds the guest's QEMU (virtio-net on a tap in bridge
          br0) and the primary remusd (the output-commit rules must live
          where the tap is); namespace C the client on a veth into br0
          (redis-benchmark, the batch requests). The backup remusd runs in a
          third namespace B, joined to H by a veth pair (vA 10.79.1.1 in H,
          vB 10.79.1.2 in B) that carries only the replication link. The
          link is shaped per case on both ends, to a rate ("10gbit",
          "1gbit") with --rtt-ms of round trip (RTT/2 each way), or
          "unshaped" (no qdisc, no delay: an in-kernel veth, what loopback
          is). With tc netem where the kernel has it; where it does not (this
          machine's kernel has neither sch_netem nor sch_fq), tbf for the
          rate and build/bench/link_delay for the delay: iptables sends the
          link's packets to an NFQUEUE, where each waits RTT/2 in the
          kernel's queue before it is accepted, so TCP sees a real RTT. Each
          case records link_delay's packets and how late its verdicts were.
  redis   prefill (unprotected, once): redis-benchmark -t set -r KEYS
          -n KEYS -d SIZE (about 60% of KEYS distinct keys, a few hundred
          MiB of the guest's memory); then each run is redis-benchmark -t
          set,get -P PIPE -c CONNS -d SIZE -r KEYS -n N with N calibrated
          so the unprotected run takes about --seconds: throughput
          (requests/s) and latency percentiles per test (its --csv).
  batch   one job per run, asked for from C over TCP; the host times the
          request (the guest's own clock stops with the VM at every pause,
          so the guest's `ms` leaves the pauses out: both are recorded).

Cases, interleaved round by round (order rotated each round; every protected
case is its own `protect` ... `unprotect` in the same boot):
  U            unprotected
  P/<link>     protect --interval I --netbuf none --compress none
  Pz/<link>    the same with --compress lz4
  Px/<link>    the same with --compress xor-lz4 (--xor-cache MiB of versions)
  C/<link>     protect --interval I --netbuf nfqueue (output commit):
               redis latency against the floor interval/2 + ack p50
  A/<link>     (only with --kinds ...A) protect --interval auto
               --interval-min I --latency-budget B --compress xor-lz4: the
               adaptive interval on the same workloads (where it settled
               and why: interval_ms_end, interval_reason_end)

Per protected window (status of the primary before and after, QMP STOP /
RESUME events of the guest): achieved / configured checkpoint rate
(checkpoints_total delta / (window / interval)), dirty pages per checkpoint,
wire bytes per dirty page (link.bytes_sent delta / dirty_pages_total delta:
TLS, framing and device state included), pause p50/p99/mean and the share
of time paused, backpressure waits, ack p50/p99, CPU of QEMU and both remusd
and of everything else on the machine (`others`).

Headline: ratios protected / unprotected (redis throughput: target >= 0.8
for P at 25 ms; batch run time: target <= 1.25), achieved/configured
checkpoint rate (target >= 0.95). Unprotected medians go with them, never
absolute protected times alone.

Usage (root, /usr/bin/python3):
  /usr/bin/python3 bench/workloads.py --quick   # ~6-8 min: unshaped link, 1 round
  /usr/bin/python3 bench/workloads.py           # ~35-45 min: 3 links, 2 rounds
JSON to stdout and bench/results/workloads-<timestamp>[-quick].json; a table
to stderr.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(HERE))

import conftest  # noqa: E402  (tests/e2e: the end-to-end tests' harness)
from conftest import DOMAIN, QmpEventLog, World  # noqa: E402
from run_bench import CpuMeter, loadavg, log, pct, ratio, write_results  # noqa: E402
from test_netbuf import GUEST_IP, Net  # noqa: E402

REDIS_PORT, BATCH_PORT = 6379, 7001
LINK_A, LINK_B = "10.79.1.1", "10.79.1.2"
LINKS = {"unshaped": None, "10gbit": "10gbit", "1gbit": "1gbit"}


class FakeRequest:
    """World keeps pytest's request only to name things; a bench has none."""
    node = None


def sh(*argv, check=True, timeout=60):
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (rc {r.returncode}): {r.stderr.strip()}")
    return r


class LinkNet:
    """Namespace B for the backup, a veth pair H:vA <-> B:vB, shaped per case."""

    def __init__(self, h, build, tool_dir):
        self.h = h
        self.b = f"rwb{os.getpid() % 100000}"
        sh("ip", "netns", "del", self.b, check=False)
        sh("ip", "netns", "add", self.b)
        sh("ip", "-n", self.b, "link", "set", "lo", "up")
        sh("ip", "-n", h, "link", "add", "vA", "type", "veth", "peer", "name", "vB", "netns", self.b)
        sh("ip", "-n", h, "addr", "add", f"{LINK_A}/24", "dev", "vA")
        sh("ip", "-n", self.b, "addr", "add", f"{LINK_B}/24", "dev", "vB")
        sh("ip", "-n", h, "link", "set", "vA", "up")
        sh("ip", "-n", self.b, "link", "set", "vB", "up")
        self.current = "unshaped"
        self.delays = []       # (ns, dev, queue, process, log) of the running link_delays
        self.delay_stats = {}  # dev -> link_delay's final JSON, after _stop_delays
        self.link_delay = Path(build) / "bench" / "link_delay"
        self.tool_dir = tool_dir

    netem = None  # whether this kernel has sch_netem (probed on first use)
    DELAY_QUEUES = {"vA": 31001, "vB": 31002}  # outside remusd's automatic 29000-29999

    def shape(self, link, rtt_ms):
        """netem delay RTT/2 + rate on both ends. On a kernel without sch_netem
        (CONFIG_NET_SCH_NETEM unset, this one): tbf at the rate, and the delay
        from build/bench/link_delay, one per end behind an iptables OUTPUT
        NFQUEUE rule on the link's device (the packets wait in the kernel's
        queue; TCP sees a real RTT). Its lateness is recorded per case."""
        rate = LINKS[link]
        self._stop_delays()
        for ns, dev in ((self.h, "vA"), (self.b, "vB")):
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
            sh(*tc, "del", "dev", dev, "root", check=False)
            if not rate:
                continue
            if LinkNet.netem is not False:
                r = sh(*tc, "add", "dev", dev, "root", "netem", "delay", f"{rtt_ms / 2:g}ms", "rate", rate,
                       "limit", "100000", check=False)
                if r.returncode == 0:
                    LinkNet.netem = True
                    continue
                if LinkNet.netem is None and "unknown" in r.stderr:
                    LinkNet.netem = False
                    log("this kernel has no sch_netem: the rate with tbf, the delay with link_delay (NFQUEUE)")
                else:
                    raise RuntimeError(f"tc netem on {dev}: {r.stderr.strip()}")
            burst = "4mb" if rate == "10gbit" else "512kb"
            sh(*tc, "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "10ms")
            if rtt_ms > 0:
                self._start_delay(ns, dev, rtt_ms)
        self.current = link

    def _start_delay(self, ns, dev, rtt_ms):
        q = self.DELAY_QUEUES[dev]
        log_path = Path(self.tool_dir) / f"link_delay-{dev}.json"
        with open(log_path, "w") as out:
            p = subprocess.Popen(["ip", "netns", "exec", ns, str(self.link_delay), "--queue", str(q),
                                  "--delay-us", str(int(rtt_ms * 500))], stdout=out, stderr=subprocess.DEVNULL)
        time.sleep(0.2)  # bound before the rule sends packets to the queue (else they would be dropped)
        if p.poll() is not None:
            raise RuntimeError(f"link_delay on {dev} exited ({p.returncode})")
        sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-o", dev, "-j", "NFQUEUE", "--queue-num", str(q))
        self.delays.append((ns, dev, q, p, log_path))

    def _stop_delays(self):
        """Removes the rules, then stops each link_delay (which accepts all it
        holds); its JSON line (packets, lateness) goes to self.delay_stats."""
        self.delay_stats = {}
        for ns, dev, q, p, log_path in self.delays:
            sh("ip", "netns", "exec", ns, "iptables", "-D", "OUTPUT", "-o", dev, "-j", "NFQUEUE",
               "--queue-num", str(q), check=False)
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
            try:
                self.delay_stats[dev] = json.loads(log_path.read_text().strip().splitlines()[-1])
            except (OSError, ValueError, IndexError):
                self.delay_stats[dev] = None
        self.delays = []

    def qdiscs(self):
        return {dev: sh("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev, check=False).stdout.strip()
                for ns, dev in ((self.h, "vA"), (self.b, "vB"))}

    RTT_SERVER = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); "
                  "s.bind((sys.argv[1],7999)); s.listen(); c,_=s.accept(); "
                  "c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
                  "while (d:=c.recv(64)): c.sendall(d)")
    RTT_CLIENT = ("import socket,sys,time\nfor i in range(50):\n  try: s=socket.create_connection((sys.argv[1],7999),1); break\n"
                  "  except OSError: time.sleep(0.1)\n"
                  "s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1); ts=[]\n"
                  "for i in range(41):\n  t=time.perf_counter(); s.sendall(b'x'); s.recv(1); ts.append(time.perf_counter()-t)\n"
                  "print(sorted(ts)[20]*1000)")

    def ping_rtt_ms(self):
        """Median TCP round trip (1 byte each way, TCP_NODELAY) from H to B
        over the link as shaped now: what the replication link's acks see
        (no ping in these namespaces)."""
        srv = subprocess.Popen(["ip", "netns", "exec", self.b, sys.executable, "-c", self.RTT_SERVER, LINK_B],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = sh("ip", "netns", "exec", self.h, sys.executable, "-c", self.RTT_CLIENT, LINK_B, check=False)
            return round(float(r.stdout.strip()), 3) if r.returncode == 0 else None
        except ValueError:
            return None
        finally:
            srv.kill()
            srv.wait()

    def close(self):
        self._stop_delays()
        sh("ip", "netns", "del", self.b, check=False)


def in_client(net, *argv, timeout=600):
    return subprocess.run(["ip", "netns", "exec", net.c, *argv], capture_output=True, text=True, timeout=timeout)


TCP_COUNTERS = ("RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPFastRetrans")


def tcp_counters(net):
    """The client namespace's TCP counters (/proc/net/snmp and netstat): its
    retransmissions show requests the guest never received."""
    r = in_client(net, "cat", "/proc/net/snmp", "/proc/net/netstat", timeout=30)
    out, lines = {}, r.stdout.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        for k, v in zip(names.split()[1:], values.split()[1:]):
            if k in TCP_COUNTERS:
                out[k] = int(v)
    return out


def random_value_command(size):
    """A SET whose value is ceil(size/12) of redis-benchmark's __rand_int__
    fields, each replaced per request by its own random number (12 decimal
    digits, zero-padded, below -r). redis-benchmark's own -t set value is
    `size` bytes of 'x', which any compressor shrinks to nothing; this is
    closer to real data (LZ4 alone gets about 2x on it, as on text or JSON:
    measured per run, in the JSON's value_lz4_ratio)."""
    return ["SET", "key:__rand_int__", "__rand_int__" * value_fields(size)]


def value_fields(size):
    """12-digit fields in a value of about `size` bytes."""
    return max(1, -(-size // 12))


def parse_redis_csv(stdout):
    """redis-benchmark --csv: {test: {rps, avg_ms, min_ms, p50_ms, p95_ms, p99_ms, max_ms}}."""
    out = {}
    keys = ("rps", "avg_ms", "min_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms")
    for line in stdout.splitlines():
        f = [x.strip('"') for x in line.strip().split(",")]
        if len(f) >= 8 and f[0] != "test":
            try:
                out[f[0]] = dict(zip(keys, map(float, f[1:8])))
            except ValueError:
                pass
    return out


def redis_bench(net, args, tests, n, extra=()):
    """redis-benchmark from C: {test: {rps, p50_ms, ...}} and the wall time.
    With --redis-values digits (the default) a SET is random_value_command,
    run on its own, then the other tests; 'x' is redis-benchmark's -t set."""
    tests = tests.split(",")
    runs = [tests]
    if args.redis_values == "digits" and "set" in tests:
        runs = [["SET*"]] + ([[t for t in tests if t != "set"]] if len(tests) > 1 else [])
    out, wall = {}, 0.0
    for run in runs:
        argv = ["redis-benchmark", "-h", GUEST_IP, "-p", str(REDIS_PORT), "-P", str(args.pipeline),
                "-c", str(args.conns), "-d", str(args.value_size), "-r", str(args.keys), "-n", str(n), "--csv",
                *extra]
        argv += random_value_command(args.value_size) if run == ["SET*"] else ["-t", ",".join(run)]
        t0 = time.monotonic()
        r = in_client(net, *argv, timeout=max(600, args.seconds * 20))
        wall += time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed (rc {r.returncode}): {r.stderr[-500:]}")
        got = parse_redis_csv(r.stdout)
        if run == ["SET*"] and len(got) == 1:
            got = {"SET": next(iter(got.values()))}  # its CSV title is the whole command line
        if not got:
            raise RuntimeError(f"redis-benchmark printed no results: {r.stdout[-500:]} {r.stderr[-500:]}")
        out.update(got)
    return out, wall


def value_lz4_ratio(size, keys, samples=2000):
    """LZ4's ratio (compressed/raw) on `samples` values as random_value_command
    makes them, concatenated: how compressible the values themselves are."""
    import random
    try:
        import lz4.block as lz4b
    except ImportError:
        return None
    raw = b"".join(b"".join(b"%012d" % random.randrange(keys) for _ in range(value_fields(size)))
                   for _ in range(samples))
    return round(len(lz4b.compress(raw, store_size=False)) / len(raw), 3)


BATCH_CLIENT = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.settimeout(3600)
t0 = time.time(); m0 = time.monotonic()
s.sendall(("RUN %s\n" % sys.argv[3]).encode())
buf = b""
while not buf.endswith(b"\n"):
    d = s.recv(4096)
    if not d:
        break
    buf += d
print(json.dumps({"t_send": t0, "host_s": time.monotonic() - m0, "line": buf.decode(errors="replace").strip()}))
"""


def batch_run(net, mib):
    r = in_client(net, sys.executable, "-c", BATCH_CLIENT, GUEST_IP, str(BATCH_PORT), str(mib), timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"batch client failed: {r.stderr[-500:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    kv = dict(w.split("=", 1) for w in d["line"].split() if "=" in w)
    if not d["line"].startswith("BATCH done") or kv.get("sorted") != "1":
        raise RuntimeError(f"batch job failed: {d['line']!r}")
    return {"host_s": d["host_s"], "guest_s": float(kv["ms"]) / 1000.0, "sort_guest_s": float(kv["sort_ms"]) / 1000.0,
            "t_send": d["t_send"]}


def hist_window(s0, s1, name):
    """What a cumulative status histogram (seconds) got between two status
    readings: n, mean and the bucket bounds (ms) of p50 and p99."""
    h0, h1 = g(s0, "histograms", name), g(s1, "histograms", name)
    if not h0 or not h1 or h0.get("le") != h1.get("le"):
        return None
    n = h1["count"] - h0["count"]
    if n <= 0:
        return {"n": 0}
    cum = [b - a for a, b in zip(h0["cumulative"], h1["cumulative"])]

    def q(p):
        for le, c in zip(h1["le"], cum):
            if c >= p * n:
                return le * 1000.0
        return None  # beyond the last bucket
    return {"n": n, "mean_ms": 1000.0 * (h1["sum"] - h0["sum"]) / n, "p50_le_ms": q(0.5), "p99_le_ms": q(0.99)}


def g(d, *path):
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def delta(s0, s1, *path):
    a, b = g(s0, *path), g(s1, *path)
    return None if a is None or b is None else b - a


class Bench:
    def __init__(self, args):
        self.args = args
        self.world = World(FakeRequest(), Path(args.qemu))
        self.net = Net(self.world)
        self.link = LinkNet(self.net.h, conftest.BUILD, self.world.dir)
        self.guest = self.primary = self.backup = None
        self.events = None
        self.protected = False
        self.runs = []

    # ------------------------------------------------------------ set-up
    def start(self):
        a, w = self.args, self.world
        kw = self.net.guest_kw()
        append = (kw["extra_append"] + f" remus.redis={REDIS_PORT} remus.batch={BATCH_PORT}"
                  f" remus.batchmib={a.batch_mib}")
        t = time.monotonic()
        self.guest = w.start_guest(mem_mb=a.mem, wss_mib=1, dirty=0, check=False, wait_boot=False, events=True,
                                   extra_args=kw["extra_args"], extra_append=append)
        self.backup = w.start_backup(netns=self.link.b, listen_host=LINK_B)
        self.primary = w.start_primary()
        w.wait_booted(self.guest)
        self.events = QmpEventLog(w, self.guest.event_qmp_sock)
        deadline = time.monotonic() + 120
        while True:
            r = in_client(self.net, "redis-cli", "-h", GUEST_IP, "-p", str(REDIS_PORT), "ping", timeout=30)
            if r.stdout.strip() == "PONG":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis does not answer: {r.stdout}{r.stderr}" + w.diagnostics())
            time.sleep(1)
        self.boot_s = time.monotonic() - t
        log(f"guest up, redis answering, in {self.boot_s:.1f} s")
        t = time.monotonic()
        _, dt = redis_bench(self.net, a, "set", a.keys)
        info = in_client(self.net, "redis-cli", "-h", GUEST_IP, "-p", str(REDIS_PORT), "info", "memory").stdout
        self.redis_mem = next((l.split(":")[1].strip() for l in info.splitlines() if l.startswith("used_memory_human")), None)
        self.dbsize = in_client(self.net, "redis-cli", "-h", GUEST_IP, "-p", str(REDIS_PORT), "dbsize").stdout.strip()
        log(f"prefill: {self.dbsize} keys, redis used_memory {self.redis_mem}, in {time.monotonic() - t:.1f} s")
        # calibrate N: the unprotected set,get run takes about --seconds
        n0 = max(20000, a.keys // 10)
        res, dt = redis_bench(self.net, a, "set,get", n0)
        self.n = max(20000, int(n0 * a.seconds / dt))
        log(f"calibration: {n0} requests per test in {dt:.1f} s -> N={self.n}")

    # ------------------------------------------------------------- cases
    def protect(self, netbuf, compress, auto=False):
        a = self.args
        t = time.monotonic()
        interval = (["--interval", "auto", "--latency-budget", str(a.latency_budget), "--interval-min", str(a.interval)]
                    if auto else ["--interval", str(a.interval)])
        r = self.primary.ctl("protect", DOMAIN, "--qmp", str(self.guest.qmp_sock), "--backup", self.backup.listen,
                             *interval, "--netbuf", netbuf, "--compress", compress,
                             "--disks", "none",
                             *(["--xor-cache", str(a.xor_cache)] if compress == "xor-lz4" else []), timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"protect failed: {r.stdout}{r.stderr}")
        while True:
            st = self.primary.status()
            if st and st.get("state") == "protected" and (netbuf == "none" or g(st, "netbuf", "active")):
                break
            if time.monotonic() - t > 900 or (st or {}).get("state") in ("unprotected", "failed-over", "stopped"):
                raise RuntimeError(f"not protected: {json.dumps(st)}")
            time.sleep(0.1)
        return time.monotonic() - t, st

    def unprotect(self):
        r = self.primary.ctl("unprotect", DOMAIN, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"unprotect failed: {r.stdout}{r.stderr}")
        # the backup ends the session; wait until it says so, so that the next
        # protect finds it ready
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = self.backup.status()
            if st is None or st.get("state") in ("unprotected", "ended", "waiting", "primary-lost"):
                return
            time.sleep(0.2)

    def window(self, fn):
        """Runs fn() with the primary's status and QMP events around it."""
        cpu = CpuMeter({"qemu": self.guest.pid, "remusd_primary": self.primary.pid, "remusd_backup": self.backup.pid})
        s0 = self.primary.status() if self.protected else None
        w0, m0 = time.time(), time.monotonic()
        cpu.start()
        out = fn()
        c = cpu.stop()
        w1, m1 = time.time(), time.monotonic()
        s1 = self.primary.status() if self.protected else None
        dt = m1 - m0
        res = {"window_s": dt, "cpu_percent": c, "load": loadavg()}
        pauses = [(r - s) * 1000.0 for s, r in self.events.pauses(w0, w1) if r is not None]
        res["pause_ms"] = {"n": len(pauses), "p50": pct(pauses, 0.5), "p99": pct(pauses, 0.99),
                           "mean": sum(pauses) / len(pauses) if pauses else None,
                           "share_paused": sum(pauses) / 1000.0 / dt if dt else None}
        if s0 and s1:
            ck = delta(s0, s1, "checkpoints_total")
            dp = delta(s0, s1, "dirty_pages_total")
            wb = delta(s0, s1, "link", "bytes_sent")
            eb = delta(s0, s1, "epoch_bytes_total")
            # Page batches alone (no device state, framing or TLS): raw is what
            # the records weigh before compression, wire what left after it.
            praw = delta(s0, s1, "checkpoint_page_bytes", "raw")
            pwire = delta(s0, s1, "checkpoint_page_bytes", "wire")
            cpu_p = (c or {}).get("remusd_primary")
            configured = dt * 1000.0 / self.args.interval
            res.update({
                "checkpoints": ck, "checkpoints_per_s": ck / dt if ck is not None else None,
                "configured_per_s": 1000.0 / self.args.interval,
                "rate_ratio": ck / configured if ck is not None else None,
                "dirty_pages": dp, "dirty_pages_per_ckpt": dp / ck if ck else None,
                "wire_bytes": wb, "wire_bytes_per_dirty_page": wb / dp if dp else None,
                "epoch_bytes_per_dirty_page": eb / dp if dp and eb is not None else None,
                "page_wire_bytes_per_dirty_page": pwire / dp if dp and pwire is not None else None,
                "page_wire_over_raw": pwire / praw if praw and pwire is not None else None,
                # The primary remusd's CPU per dirty page (its sender does the
                # compression; the rest is the same for every codec).
                "primary_cpu_us_per_dirty_page": cpu_p / 100.0 * dt / dp * 1e6 if dp and cpu_p is not None else None,
                "xor_cache": s1.get("xor_cache"),
                "wire_mb_per_s": wb / dt / 1e6 if wb is not None else None,
                "backpressure_waits": delta(s0, s1, "backpressure_waits"),
                "ack_window": hist_window(s0, s1, "ack_seconds"),
                "ack_ms": s1.get("ack_ms"), "stage_ms": s1.get("stage_ms"), "pause_ms_status": s1.get("pause_ms"),
                "unacked_epochs_end": s1.get("unacked_epochs"),
                "netbuf_dropped": delta(s0, s1, "netbuf", "dropped_packets"),
                "state_end": s1.get("state"),
                # --interval auto (kind A): where the controller ended and why
                "interval_ms_end": s1.get("interval_ms"), "interval_reason_end": s1.get("interval_reason"),
            })
        return out, res

    def run_case(self, case, rnd):
        a = self.args
        kind, _, link = case.partition("/")
        res = {"case": case, "kind": kind, "link": link or None, "round": rnd}
        self.protected = kind != "U"
        try:
            if self.protected:
                self.link.shape(link, a.rtt_ms)
                res["qdisc"] = self.link.qdiscs()
                netbuf = "nfqueue" if kind == "C" else "none"
                compress = {"Pz": "lz4", "Px": "xor-lz4", "A": "xor-lz4"}.get(kind, "none")
                res["protect_s"], st = self.protect(netbuf, compress, auto=kind == "A")
                res["initial_copy"] = st.get("initial_copy")
                ic = g(st, "initial_copy", "wire_bytes")
                res["initial_copy_mb_per_s"] = ic / res["protect_s"] / 1e6 if ic else None
                time.sleep(a.settle)
            t0 = tcp_counters(self.net)
            rb, w = self.window(lambda: redis_bench(self.net, a, "set,get", self.n))
            t1 = tcp_counters(self.net)
            res["redis"] = {"tests": rb[0], "wall_s": rb[1], **w,
                            # the client's retransmissions in the window: requests lost on the way in
                            "client_tcp": {k: t1.get(k, 0) - t0.get(k, 0) for k in TCP_COUNTERS}}
            if a.latency_requests and kind in ("U", "C", "P"):
                # request/response latency at low load: --latency-conns
                # connections, one GET outstanding on each (no pipelining)
                lat, dt = redis_bench(self.net, a, "get", a.latency_requests,
                                      extra=["-c", str(a.latency_conns), "-P", "1"])
                res["latency"] = {**lat["GET"], "wall_s": dt}
            if kind != "C" and a.batch_mib > 0:  # P, Pz, Px, A and U
                time.sleep(1)
                b, w = self.window(lambda: batch_run(self.net, a.batch_mib))
                res["batch"] = {**b, **w}
            if self.protected:
                res["status_end"] = {k: v for k, v in (self.primary.status() or {}).items() if k != "histograms"}
                self.unprotect()
        except Exception as e:  # a failed case is reported, the others still run
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"  {case}: ERROR {res['error']}")
            try:
                if self.protected:
                    self.unprotect()
            except Exception:
                pass
        finally:
            self.link.shape("unshaped", a.rtt_ms)
        if self.link.delay_stats:
            res["link_delay"] = self.link.delay_stats  # the emulated RTT's packets and lateness
        self.runs.append(res)
        log("  " + one_line(res, a))
        return res

    def close(self):
        self.world.cleanup()
        self.net.close()
        self.link.close()


def one_line(r, a):
    if r.get("error"):
        return f"{r['case']}: error"
    rd = r.get("redis", {})
    t = rd.get("tests", {})
    s = (f"{r['case']:14s} SET {g(t, 'SET', 'rps') or 0:9.0f}/s GET {g(t, 'GET', 'rps') or 0:9.0f}/s "
         f"p50 {g(t, 'SET', 'p50_ms') or 0:.1f}/{g(t, 'GET', 'p50_ms') or 0:.1f} ms "
         f"retrans {g(rd, 'client_tcp', 'RetransSegs')} (RTO {g(rd, 'client_tcp', 'TCPTimeouts')})")
    if r["kind"] != "U":
        s += (f"  ckpt {rd.get('checkpoints_per_s') or 0:.1f}/s ({rd.get('rate_ratio') or 0:.2f}) "
              f"dirty/ckpt {rd.get('dirty_pages_per_ckpt') or 0:.0f} wire/page {rd.get('wire_bytes_per_dirty_page') or 0:.0f} "
              f"pause {g(rd, 'pause_ms', 'p50') or 0:.1f}/{g(rd, 'pause_ms', 'p99') or 0:.1f} ms bp {rd.get('backpressure_waits')}")
    lt = r.get("latency")
    if lt:
        s += f" | probe GET p50 {lt['p50_ms']:.2f} p99 {lt['p99_ms']:.2f} ms"
    b = r.get("batch")
    if b:
        s += f" | batch {b['host_s']:.1f} s (guest {b['guest_s']:.1f} s)"
        if r["kind"] != "U":
            s += (f" ckpt {b.get('checkpoints_per_s') or 0:.1f}/s ({b.get('rate_ratio') or 0:.2f}) dirty/ckpt "
                  f"{b.get('dirty_pages_per_ckpt') or 0:.0f} pause {g(b, 'pause_ms', 'p50') or 0:.1f}/"
                  f"{g(b, 'pause_ms', 'p99') or 0:.1f} ms")
    return s


def med(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize(runs, a):
    ok = [r for r in runs if not r.get("error")]
    u = [r for r in ok if r["kind"] == "U"]
    base = {t: med([g(r, "redis", "tests", t, "rps") for r in u]) for t in ("SET", "GET")}
    base_lat = {t: med([g(r, "redis", "tests", t, "p50_ms") for r in u]) for t in ("SET", "GET")}
    base_batch = med([g(r, "batch", "host_s") for r in u])
    base_probe = med([g(r, "latency", "p50_ms") for r in u])
    base_batch_guest = med([g(r, "batch", "guest_s") for r in u])
    out = {"unprotected": {"redis_rps": base, "redis_p50_ms": base_lat, "latency_get_p50_ms": base_probe,
                           "redis_client_tcp": {k: med([g(r, "redis", "client_tcp", k) for r in u]) for k in TCP_COUNTERS},
                           "latency_get_p99_ms": med([g(r, "latency", "p99_ms") for r in u]), "batch_host_s": base_batch,
                           "batch_guest_s": base_batch_guest, "runs": len(u)},
           "cases": {}}
    for case in sorted({r["case"] for r in ok if r["kind"] != "U"}):
        rs = [r for r in ok if r["case"] == case]
        kind = rs[0]["kind"]
        c = {"runs": len(rs)}
        for t in ("SET", "GET"):
            rps = med([g(r, "redis", "tests", t, "rps") for r in rs])
            c[f"redis_{t.lower()}_rps"] = rps
            c[f"redis_{t.lower()}_ratio"] = ratio(rps, base[t])
            for q in ("p50_ms", "p99_ms"):
                c[f"redis_{t.lower()}_{q}"] = med([g(r, "redis", "tests", t, q) for r in rs])
        for part in ("redis", "batch"):
            for k in ("checkpoints_per_s", "rate_ratio", "dirty_pages_per_ckpt", "wire_bytes_per_dirty_page",
                      "page_wire_bytes_per_dirty_page", "page_wire_over_raw", "primary_cpu_us_per_dirty_page",
                      "wire_mb_per_s", "backpressure_waits"):
                c[f"{part}_{k}"] = med([g(r, part, k) for r in rs])
            c[f"{part}_pause_p50_ms"] = med([g(r, part, "pause_ms", "p50") for r in rs])
            c[f"{part}_pause_p99_ms"] = med([g(r, part, "pause_ms", "p99") for r in rs])
            c[f"{part}_share_paused"] = med([g(r, part, "pause_ms", "share_paused") for r in rs])
        for k in TCP_COUNTERS:
            c[f"redis_client_{k}"] = med([g(r, "redis", "client_tcp", k) for r in rs])
        c["ack_p50_ms"] = med([g(r, "redis", "ack_ms", "p50") for r in rs])
        c["ack_window_mean_ms"] = med([g(r, "redis", "ack_window", "mean_ms") for r in rs])
        c["ack_window_p99_le_ms"] = med([g(r, "redis", "ack_window", "p99_le_ms") for r in rs])
        c["latency_get_p50_ms"] = med([g(r, "latency", "p50_ms") for r in rs])
        c["latency_get_p99_ms"] = med([g(r, "latency", "p99_ms") for r in rs])
        c["latency_added_p50_ms"] = (c["latency_get_p50_ms"] - base_probe
                                     if c["latency_get_p50_ms"] is not None and base_probe is not None else None)
        c["initial_copy_mb_per_s"] = med([r.get("initial_copy_mb_per_s") for r in rs])
        if kind == "A":
            for part in ("redis", "batch"):
                c[f"{part}_interval_ms_end"] = med([g(r, part, "interval_ms_end") for r in rs])
                c[f"{part}_interval_reasons_end"] = sorted({str(g(r, part, "interval_reason_end")) for r in rs})
        if kind == "C":
            floor = a.interval / 2 + (c["ack_p50_ms"] or 0)
            c["latency_floor_ms"] = floor
            c["latency_added_over_floor"] = ratio(c["latency_added_p50_ms"], floor)
            for t in ("SET", "GET"):
                p50 = c[f"redis_{t.lower()}_p50_ms"]
                c[f"redis_{t.lower()}_added_p50_ms"] = p50 - base_lat[t] if p50 is not None and base_lat[t] is not None else None
                c[f"redis_{t.lower()}_added_over_floor"] = ratio(c[f"redis_{t.lower()}_added_p50_ms"], floor)
        else:
            bh = med([g(r, "batch", "host_s") for r in rs])
            c["batch_host_s"] = bh
            c["batch_ratio"] = ratio(bh, base_batch)
            c["batch_guest_ratio"] = ratio(med([g(r, "batch", "guest_s") for r in rs]), base_batch_guest)
        out["cases"][case] = c
    return out


def print_summary(doc):
    s = doc["summary"]
    u = s["unprotected"]
    a = doc["config"]
    log("")
    log(f"interval {a['interval']} ms; unprotected medians: redis SET {u['redis_rps']['SET'] or 0:.0f}/s GET "
        f"{u['redis_rps']['GET'] or 0:.0f}/s, batch {u['batch_host_s'] or 0:.1f} s ({a['batch_mib']} MiB sort)")
    log(f"{'case':14s} {'SET x':>6s} {'GET x':>6s} {'batch x':>7s} {'ckpt/cfg':>8s} {'dirty/ck':>8s} {'B/page':>7s} "
        f"{'pause p50/p99':>14s} {'bp':>4s} | batch: {'ckpt/cfg':>8s} {'dirty/ck':>8s} {'B/page':>7s} {'pause p50/p99':>14s}")
    f = lambda v, fmt: (fmt % v) if v is not None else "-"
    for case, c in s["cases"].items():
        log(f"{case:14s} {f(c['redis_set_ratio'], '%.2f'):>6s} {f(c['redis_get_ratio'], '%.2f'):>6s} "
            f"{f(c.get('batch_ratio'), '%.2f'):>7s} {f(c['redis_rate_ratio'], '%.2f'):>8s} "
            f"{f(c['redis_dirty_pages_per_ckpt'], '%.0f'):>8s} {f(c['redis_wire_bytes_per_dirty_page'], '%.0f'):>7s} "
            f"{f(c['redis_pause_p50_ms'], '%.1f') + '/' + f(c['redis_pause_p99_ms'], '%.1f'):>14s} "
            f"{f(c['redis_backpressure_waits'], '%d'):>4s} | {'':6s} {f(c['batch_rate_ratio'], '%.2f'):>8s} "
            f"{f(c['batch_dirty_pages_per_ckpt'], '%.0f'):>8s} {f(c['batch_wire_bytes_per_dirty_page'], '%.0f'):>7s} "
            f"{f(c['batch_pause_p50_ms'], '%.1f') + '/' + f(c['batch_pause_p99_ms'], '%.1f'):>14s}")
        log(f"{'':14s} page batches on the wire / raw: redis {f(c['redis_page_wire_over_raw'], '%.3f')} "
            f"({f(c['redis_page_wire_bytes_per_dirty_page'], '%.0f')} B/page), batch {f(c['batch_page_wire_over_raw'], '%.3f')}; "
            f"primary remusd CPU per dirty page: redis {f(c['redis_primary_cpu_us_per_dirty_page'], '%.1f')} us, "
            f"batch {f(c['batch_primary_cpu_us_per_dirty_page'], '%.1f')} us")
        if "redis_interval_ms_end" in c:
            log(f"{'':14s} --interval auto ended at: redis {f(c['redis_interval_ms_end'], '%.0f')} ms "
                f"({', '.join(c['redis_interval_reasons_end'])}), batch {f(c['batch_interval_ms_end'], '%.0f')} ms "
                f"({', '.join(c['batch_interval_reasons_end'])}); ckpt/cfg is against --interval (its minimum)")
        if "latency_floor_ms" in c:
            log(f"{'':14s} output commit: SET p50 {f(c['redis_set_p50_ms'], '%.1f')} ms p99 {f(c['redis_set_p99_ms'], '%.1f')}"
                f" ms, GET p50 {f(c['redis_get_p50_ms'], '%.1f')} p99 {f(c['redis_get_p99_ms'], '%.1f')} ms; added p50 / "
                f"floor ({c['latency_floor_ms']:.1f} ms = interval/2 + ack p50): SET {f(c['redis_set_added_over_floor'], '%.2f')}"
                f" GET {f(c['redis_get_added_over_floor'], '%.2f')} (saturating clients: queueing dominates)")
            log(f"{'':14s} low-load GET probe ({doc['config']['latency_conns']} conns, no pipelining): p50 "
                f"{f(c['latency_get_p50_ms'], '%.1f')} ms p99 {f(c['latency_get_p99_ms'], '%.1f')} ms, unprotected p50 "
                f"{f(s['unprotected']['latency_get_p50_ms'], '%.2f')} ms; added p50 {f(c['latency_added_p50_ms'], '%.1f')} ms"
                f" = {f(c['latency_added_over_floor'], '%.2f')} x floor")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default=os.environ.get("REMUS_QEMU", "/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64"))
    ap.add_argument("--initrd", default=str(conftest.BUILD / "guest" / "initrd-workloads.img"))
    ap.add_argument("--quick", action="store_true", help="unshaped link only, 1 round, shorter runs")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--links", default=None, help="comma list of unshaped,10gbit,1gbit")
    ap.add_argument("--kinds", default="P,Pz,Px,C",
                    help="protected kinds: P (no output commit), Pz (lz4), Px (xor-lz4), C (output commit), "
                         "A (xor-lz4, --interval auto from --interval up, within --latency-budget)")
    ap.add_argument("--latency-budget", type=int, default=100,
                    help="kind A: protect --latency-budget MS (the interval may grow up to what it allows)")
    ap.add_argument("--xor-cache", type=int, default=64, help="MiB of page versions for Px (protect --xor-cache)")
    ap.add_argument("--rtt-ms", type=float, default=0.2, help="RTT of a shaped link, ms (RTT/2 each way: netem, or link_delay without it); "
                    "0: the rate alone")
    ap.add_argument("--interval", type=int, default=25)
    ap.add_argument("--mem", type=int, default=1024, help="guest MiB")
    ap.add_argument("--keys", type=int, default=None, help="redis keyspace (-r); prefill sets this many")
    ap.add_argument("--value-size", type=int, default=256)
    ap.add_argument("--redis-values", choices=["digits", "x"], default="digits",
                    help="SET values: digits, random 12-digit fields (about 2x for LZ4, like text), or x, "
                         "redis-benchmark's own constant 'xxx...' (compresses to nothing)")
    ap.add_argument("--pipeline", type=int, default=16)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=None, help="target length of an unprotected redis run")
    ap.add_argument("--batch-mib", type=int, default=None, help="batch job size (peak 2x in the guest); 0: no batch")
    ap.add_argument("--latency-requests", type=int, default=None,
                    help="GETs of the low-load latency probe (U, P, C); 0: none")
    ap.add_argument("--latency-conns", type=int, default=4)
    ap.add_argument("--settle", type=float, default=2.0, help="s after protect before measuring")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    q = a.quick
    a.rounds = a.rounds or (1 if q else 2)
    a.links = [l for l in (a.links or ("unshaped" if q else "unshaped,10gbit,1gbit")).split(",") if l]
    a.keys = a.keys or (400000 if q else 1000000)
    a.seconds = a.seconds or (6.0 if q else 12.0)
    a.batch_mib = a.batch_mib if a.batch_mib is not None else (32 if q else 64)
    a.latency_requests = a.latency_requests if a.latency_requests is not None else (400 if q else 1000)
    kinds = [k for k in a.kinds.split(",") if k]
    for l in a.links:
        if l not in LINKS:
            ap.error(f"unknown link {l}; choose from {list(LINKS)}")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces, remusd's control socket)")
    if not Path(a.initrd).is_file():
        ap.error(f"no workloads initrd at {a.initrd}: run scripts/build-guest.sh --workloads build/guest")
    if not shutil.which("redis-benchmark"):
        ap.error("redis-benchmark missing: apt-get install redis-tools")
    # the harness boots conftest.INITRD; the backup's peer policy allows its directory
    conftest.INITRD = Path(a.initrd).resolve()
    t_start = time.monotonic()
    doc = {"bench": "workloads", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "config": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(a).items()},
           "machine": {"nproc": os.cpu_count(), "load_start": loadavg()}}
    doc["config"]["kinds"] = kinds
    cases = [f"{k}/{l}" for l in a.links for k in kinds]
    b = Bench(a)
    try:
        b.start()
        doc["setup"] = {"boot_s": b.boot_s, "redis_keys": b.dbsize, "redis_used_memory": b.redis_mem, "n_per_test": b.n,
                        "redis_values": a.redis_values,
                        "value_lz4_ratio": (value_lz4_ratio(a.value_size, a.keys) if a.redis_values == "digits"
                                            else None)}
        for rnd in range(a.rounds):
            order = ["U"] + cases
            k = rnd % len(order)
            order = order[k:] + order[:k]
            # the unprotected case also at the end of the round: drift check
            order.append("U")
            for case in order:
                log(f"round {rnd + 1}/{a.rounds}: {case}")
                b.run_case(case, rnd)
        if "1gbit" in a.links or "10gbit" in a.links:
            for l in ("1gbit", "10gbit"):
                if l in a.links:
                    b.link.shape(l, a.rtt_ms)
                    doc["setup"][f"ping_rtt_ms_{l}"] = b.link.ping_rtt_ms()
            b.link.shape("unshaped", a.rtt_ms)
        doc["setup"]["ping_rtt_ms_unshaped"] = b.link.ping_rtt_ms()
        doc["setup"]["shaper"] = {True: "netem", False: "tbf for the rate, link_delay (NFQUEUE) for the delay",
                                  None: None}[LinkNet.netem]
    except Exception as e:
        doc["error"] = f"{type(e).__name__}: {e}"
        log(f"error: {doc['error']}")
        try:
            doc["diagnostics"] = b.world.diagnostics()[-6000:]
        except Exception:
            pass
    finally:
        doc["runs"] = b.runs
        b.close()
        if a.keep:
            log(f"kept {b.world.dir}")
        else:
            shutil.rmtree(b.world.dir, ignore_errors=True)
    doc["summary"] = summarize(b.runs, a)
    doc["elapsed_s"] = time.monotonic() - t_start
    doc["machine"]["load_end"] = loadavg()
    write_results(doc, a.out, "workloads-", q, print_summary)
    return 1 if doc.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
