#!/usr/bin/env python3
"""remus benchmark driver (stdlib only). Not a test: it measures and reports.

Three parts (see bench/README.md):

  pause     For each dirty rate, boots a fresh test guest per run and protects
            it with one of three receivers, interleaved round by round so that
            machine noise hits all of them alike:
              ours      two remusd on loopback (primary + backup)
              null      bench/colo_null_sink: QEMU's own checkpoint cost with
                        zero receiver work (the limit)
              delayed   ours, the backup started with --ack-delay-ms 50
              null-touch  (diagnostic, only with --receivers) the null sink
                        copying 4x each checkpoint's page bytes through
                        memory after LOADED: replication's cache traffic
                        without its work
              null-retain (diagnostic, only with --receivers) the null sink
                        holding each checkpoint in pooled read buffers until
                        LOADED, as remus's checkpoint source does
            The guest pause of every checkpoint comes from QEMU's own QMP STOP
            and RESUME event timestamps, read on a second QMP socket the bench
            owns (ground truth independent of remus's clocks).
  failover  Operator failover of a protected 256 MiB guest, detection
            excluded: the primary remusd and QEMU are killed, then
            `remusctl failover`; reports promotion.failover_ms from the
            backup's status and the outside view (command issued -> restored
            QEMU's query-status says running).
  apply     build/bench/bench_apply: PageStore::Commit throughput vs memcpy.

Output: one JSON document on stdout and in bench/results/<timestamp>.json;
a human-readable summary on stderr.

Usage: python3 bench/run_bench.py [--quick] [--skip-pause] [--skip-failover]
                                  [--skip-apply] [--rounds N] [--seconds S] ...
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_QEMU = os.environ.get("REMUS_QEMU", "/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64")
COUNTER_GPA = "0x4000000"
DOMAIN = "web1"

# dirty rate (pages/s) -> the pages per epoch it aims at with a 100 ms interval
RATE_LABELS = {10000: "~1k", 100000: "~8-10k", 1000000: "~50k (wss-bound)"}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ------------------------------------------------------------------ helpers
def pct(values, p):
    """Nearest-rank percentile, the same rule as the C++ tools."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def summary(values):
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": pct(values, 0.50),
        "p99": pct(values, 0.99),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    """user+system CPU seconds of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s():
    """(busy, total) CPU seconds of the whole machine so far, all processes."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return (sum(v) - idle) / CLK_TCK, sum(v) / CLK_TCK
    except (OSError, ValueError):
        return None


class CpuMeter:
    """CPU use of named processes and of the machine between start() and stop(),
    in percent of one core."""

    def __init__(self, pids):
        self.pids = {k: v for k, v in pids.items() if v}

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = {k: proc_cpu_s(p) for k, p in self.pids.items()}
        self.m0 = machine_busy_s()

    def stop(self):
        dt = time.monotonic() - self.t0
        out = {}
        for k, p in self.pids.items():
            c1 = proc_cpu_s(p)
            if c1 is not None and self.c0.get(k) is not None:
                out[k] = round(100.0 * (c1 - self.c0[k]) / dt, 1)
        m1 = machine_busy_s()
        if m1 and self.m0:
            out["machine_busy"] = round(100.0 * (m1[0] - self.m0[0]) / dt, 1)
            mine = sum(v for k, v in out.items() if k != "machine_busy")
            out["others"] = round(out["machine_busy"] - mine, 1)
        return out


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


# --------------------------------------------------------------------- QMP
class QMP:
    """A QMP client with a reader thread: replies by id, events recorded with
    QEMU's own timestamps (seconds since the epoch, float)."""

    def __init__(self, path, timeout=20.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise BenchError(f"QMP socket {path} did not come up")
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rb")
        greeting = json.loads(self.f.readline())
        if "QMP" not in greeting:
            raise BenchError(f"unexpected QMP greeting {greeting}")
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.replies = {}
        self.events = []  # (name, timestamp float, data)
        self.next_id = 0
        self.closed = False
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        self.reader.start()
        self.cmd("qmp_capabilities")

    def _read_loop(self):
        try:
            for line in self.f:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                with self.cv:
                    if "event" in msg:
                        ts = msg.get("timestamp", {})
                        t = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                        self.events.append((msg["event"], t, msg.get("data", {})))
                    elif "id" in msg:
                        self.replies[msg["id"]] = msg
                    self.cv.notify_all()
        except (OSError, ValueError):
            pass
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def cmd(self, name, timeout=10.0, **args):
        with self.cv:
            self.next_id += 1
            cid = self.next_id
        msg = {"execute": name, "id": cid}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise BenchError(f"QMP {name}: {e}")
        deadline = time.monotonic() + timeout
        with self.cv:
            while cid not in self.replies:
                left = deadline - time.monotonic()
                if self.closed:
                    raise BenchError(f"QMP {name}: monitor closed")
                if left <= 0:
                    raise BenchError(f"QMP {name}: no answer in {timeout}s")
                self.cv.wait(left)
            resp = self.replies.pop(cid)
        if "error" in resp:
            raise BenchError(f"QMP {name}: {resp['error']}")
        return resp["return"]

    def events_snapshot(self):
        with self.lock:
            return list(self.events)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def pauses_in_window(events, t_from, t_to):
    """Guest pauses (ms) whose STOP lies in [t_from, t_to], from QMP STOP/RESUME."""
    out = []
    stop = None
    for name, t, _ in events:
        if name == "STOP":
            stop = t
        elif name == "RESUME" and stop is not None:
            if t_from <= stop <= t_to:
                out.append((stop, (t - stop) * 1000.0))
            stop = None
    return out


# ------------------------------------------------------------------ guest
class Guest:
    """A test guest: QEMU with two QMP sockets, one for the receiver under test
    and one for the bench."""

    def __init__(self, env, workdir, mem_mib, dirty, wss_mib):
        self.env = env
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.serial = os.path.join(workdir, "serial.log")
        self.qmp_receiver = os.path.join(workdir, "qmp-receiver.sock")
        self.qmp_bench = os.path.join(workdir, "qmp-bench.sock")
        append = (f"console=ttyS0 memmap=64K$0x4000000 remus.counter={COUNTER_GPA} "
                  f"remus.dirty={dirty} remus.wss={wss_mib} remus.check=1 quiet")
        argv = [env.qemu, "-machine", "pc", "-accel", "tcg", "-m", str(mem_mib),
                "-nodefaults", "-nographic", "-vga", "none",
                "-serial", f"file:{self.serial}",
                "-kernel", env.kernel, "-initrd", env.initrd, "-append", append,
                "-qmp", f"unix:{self.qmp_receiver},server=on,wait=off",
                "-qmp", f"unix:{self.qmp_bench},server=on,wait=off"]
        self.log = open(os.path.join(workdir, "qemu.log"), "wb")
        self.t_start = time.monotonic()
        self.proc = env.spawn(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = QMP(self.qmp_bench)

    def serial_text(self, offset=0):
        try:
            with open(self.serial, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def serial_size(self):
        try:
            return os.path.getsize(self.serial)
        except OSError:
            return 0

    def wait_workload(self, timeout=90.0):
        """Until the dirtier runs (its first 'check ok' line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"guest QEMU exited ({self.proc.returncode}); see {self.dir}/qemu.log")
            if "remus-guest: check ok" in self.serial_text():
                return time.monotonic() - self.t_start
            time.sleep(0.1)
        raise BenchError(f"guest workload did not start in {timeout}s; see {self.serial}")

    def stop(self):
        try:
            self.qmp.cmd("quit", timeout=5)
        except BenchError:
            pass
        self.qmp.close()
        self.env.reap(self.proc)
        self.log.close()


def guest_rates(text):
    """Achieved dirty rates (pages/s) the guest reported in text."""
    return [float(m) for m in re.findall(r"remus-guest: check ok .*? rate=([0-9.]+)/s", text)]


# -------------------------------------------------------------- environment
class Env:
    def __init__(self, args):
        self.args = args
        self.build = os.path.abspath(args.build)
        self.qemu = args.qemu
        self.kernel = os.path.join(self.build, "guest", "vmlinuz")
        self.initrd = os.path.join(self.build, "guest", "initrd.img")
        self.remusd = os.path.join(self.build, "remusd", "remusd")
        self.remusctl = os.path.join(self.build, "tools", "remusctl", "remusctl")
        self.sink = os.path.join(self.build, "bench", "colo_null_sink")
        self.apply = os.path.join(self.build, "bench", "bench_apply")
        qemus = list(args.qemus.values()) if isinstance(getattr(args, "qemus", None), dict) else []
        for p in (self.qemu, *qemus, self.kernel, self.initrd, self.remusd, self.remusctl, self.sink, self.apply):
            if not os.path.exists(p):
                raise BenchError(f"missing {p} (build with `cmake --build build`; guest with scripts/build-guest.sh)")
        self.tmp = tempfile.mkdtemp(prefix="remus-bench.")
        self.procs = []
        self.key = os.path.join(self.tmp, "key")
        self.ctl("keygen", "--out", self.key)

    def local_etcd(self):
        """One etcd member on loopback, started on first use (the ours-etcd
        receiver): its client URL. A real deployment's etcd runs on three
        other hosts; on this box the member shares the 2 cores, which is the
        harder case for the claim that arbitration costs the pause nothing."""
        if getattr(self, "_etcd_url", None):
            return self._etcd_url
        c, p = free_port(), free_port()
        d = os.path.join(self.tmp, "etcd")
        self._etcd = self.spawn(["etcd", "--name", "bench", "--data-dir", d,
                                 "--listen-client-urls", f"http://127.0.0.1:{c}",
                                 "--advertise-client-urls", f"http://127.0.0.1:{c}",
                                 "--listen-peer-urls", f"http://127.0.0.1:{p}",
                                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                                 "--initial-cluster", f"bench=http://127.0.0.1:{p}"],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.tmp, "etcd.log"), "wb"))
        url = f"http://127.0.0.1:{c}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self._etcd.poll() is not None:
                raise BenchError(f"etcd did not start; see {self.tmp}/etcd.log")
            time.sleep(0.1)
        self._etcd_url = url
        return url

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def reap(self, p, timeout=10.0):
        """Waits for p; SIGTERM then SIGKILL it (by pid) if it lingers."""
        try:
            p.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if p.poll() is not None:
                break
            try:
                p.send_signal(sig)
                p.wait(timeout=wait)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass

    def ctl(self, *argv, sock=None, timeout=180, check=True):
        cmd = [self.remusctl] + (["--socket", sock] if sock else []) + list(argv)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def status(self, sock):
        r = self.ctl("status", DOMAIN, "--json", sock=sock, timeout=10, check=False)
        if r.returncode != 0:
            return None
        try:
            d = json.loads(r.stdout)
            return d[0] if isinstance(d, list) and d else d
        except ValueError:
            return None

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                    p.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


class RemusPair:
    """Two remusd on loopback: A (primary side) and B (backup, --listen)."""

    def __init__(self, env, workdir, ack_delay_ms=0, auto_promote=False, etcd=None):
        self.env = env
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.a_sock = os.path.join(workdir, "a.sock")
        self.b_sock = os.path.join(workdir, "b.sock")
        b_argv = [env.remusd, "--state-dir", os.path.join(workdir, "b"), "--key-file", env.key,
                  "--control", self.b_sock, "--listen", f"127.0.0.1:{self.port}",
                  # the backup's peer policy: restored guests boot from the test guest's files
                  "--allow-qemu-files", os.path.dirname(env.kernel),
                  # restores with the guest's own QEMU (the version rule: same release on both sides)
                  "--qemu", env.qemu]
        if ack_delay_ms:
            b_argv += ["--ack-delay-ms", str(ack_delay_ms)]
        if not auto_promote:
            b_argv += ["--no-auto-promote"]
        a_argv = [env.remusd, "--state-dir", os.path.join(workdir, "a"), "--key-file", env.key,
                  "--control", self.a_sock]
        if etcd:
            b_argv += ["--etcd-endpoints", etcd, "--host-id", "B", "--etcd-prefix", "/bench"]
            a_argv += ["--etcd-endpoints", etcd, "--host-id", "A", "--etcd-prefix", "/bench"]
        else:
            b_argv += ["--arbiter", "none"]
            a_argv += ["--arbiter", "none"]
        self.b_log = open(os.path.join(workdir, "b.log"), "wb")
        self.a_log = open(os.path.join(workdir, "a.log"), "wb")
        self.b = env.spawn(b_argv, stdout=self.b_log, stderr=subprocess.STDOUT)
        self.a = env.spawn(a_argv, stdout=self.a_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.a_sock) and os.path.exists(self.b_sock)):
            if time.monotonic() > deadline or self.a.poll() is not None or self.b.poll() is not None:
                raise BenchError(f"remusd did not start; see {workdir}/a.log and b.log")
            time.sleep(0.05)

    def protect(self, guest, interval_ms):
        self.env.ctl("protect", DOMAIN, "--qmp", guest.qmp_receiver, "--backup", f"127.0.0.1:{self.port}",
                     "--interval", str(interval_ms), "--timeout", "120", sock=self.a_sock, timeout=150)

    def stop(self):
        for p in (self.a, self.b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.a, self.b):
            self.env.reap(p, timeout=10)
        self.a_log.close()
        self.b_log.close()


# ------------------------------------------------------------ pause bench
def run_pause_once(env, args, receiver, rate, rnd, idx):
    workdir = os.path.join(env.tmp, f"pause-{idx:03d}-{receiver}-{rate}")
    res = {"receiver": receiver, "dirty_rate": rate, "round": rnd, "load_before": loadavg()}
    guest = Guest(env, os.path.join(workdir, "guest"), args.mem, rate, args.wss)
    pair = None
    sink = None
    try:
        res["boot_s"] = guest.wait_workload()
        time.sleep(0.5)
        if receiver in ("ours", "delayed", "ours-etcd"):
            pair = RemusPair(env, workdir, ack_delay_ms=args.ack_delay if receiver == "delayed" else 0,
                             etcd=env.local_etcd() if receiver == "ours-etcd" else None)
            t = time.time()
            pair.protect(guest, args.interval)
            t_protected = time.time()
            res["protect_s"] = t_protected - t
        else:
            sink_seconds = args.warmup + args.seconds + 1.0
            touch = {"null-touch": ["--touch-factor", "4"], "null-retain": ["--retain"]}.get(receiver, [])
            sink = env.spawn([env.sink, "--qmp", guest.qmp_receiver, "--interval", str(args.interval),
                              "--seconds", str(sink_seconds), *touch,
                              "--migrate-socket", os.path.join(workdir, "sink-migrate.sock")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            t = time.time()
            line = ""
            while "in COLO" not in line:
                line = sink.stderr.readline()
                if not line:
                    raise BenchError(f"colo_null_sink ended before COLO: {sink.stdout.read()}")
            t_protected = time.time()
            res["protect_s"] = t_protected - t
        t_from = t_protected + args.warmup
        t_to = t_from + args.seconds
        meter = CpuMeter({"qemu": guest.proc.pid, "remusd_primary": pair.a.pid if pair else None,
                          "remusd_backup": pair.b.pid if pair else None, "null_sink": sink.pid if sink else None})
        time.sleep(max(0.0, t_from - time.time()))
        off_from = guest.serial_size()
        meter.start()
        time.sleep(max(0.0, t_to - time.time()))
        res["cpu_percent"] = meter.stop()
        off_to = guest.serial_size()
        time.sleep(0.3)  # the last RESUME of the window
        pauses = pauses_in_window(guest.qmp.events_snapshot(), t_from, t_to)
        ms = [p for _, p in pauses]
        res["pause_ms"] = summary(ms)
        res["pause_samples_ms"] = [round(p, 3) for p in ms]
        res["checkpoints_per_sec"] = len(ms) / args.seconds
        window_text = guest.serial_text(off_from)[: max(0, off_to - off_from)]
        rates = guest_rates(window_text)
        res["guest_rate_pages_per_s"] = pct(rates, 0.5)
        if receiver in ("ours", "delayed", "ours-etcd"):
            a = env.status(pair.a_sock) or {}
            b = env.status(pair.b_sock) or {}
            res["pages_per_epoch_p50"] = a.get("dirty_pages_per_epoch", {}).get("p50")
            res["remus_status"] = {
                "state": a.get("state"),
                "checkpoints_total": a.get("checkpoints_total"),
                "pause_ms_remusd": a.get("pause_ms"),
                "ack_ms": a.get("ack_ms"),
                "stage_ms": a.get("stage_ms"),
                "dirty_pages_per_epoch": a.get("dirty_pages_per_epoch"),
                "bytes_per_epoch": a.get("bytes_per_epoch"),
                "backpressure_waits": a.get("backpressure_waits"),
                "unacked_epochs": a.get("unacked_epochs"),
                "error": a.get("error"),
                "backup_apply_ms": b.get("apply_ms"),
                "backup_last_committed_epoch": b.get("last_committed_epoch"),
                "arbiter": a.get("arbiter"),
            }
            if a.get("state") != "protected":
                res["error"] = f"primary state {a.get('state')}: {a.get('error')}"
            env.ctl("unprotect", DOMAIN, sock=pair.a_sock, timeout=30, check=False)
        else:
            out, err = sink.communicate(timeout=args.warmup + args.seconds + 60)
            try:
                sj = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise BenchError(f"colo_null_sink printed no JSON: {out!r} {err!r}")
            res["sink"] = {k: sj.get(k) for k in ("ok", "checkpoints", "pages_per_checkpoint", "device_bytes",
                                                   "receiver_ms", "ram_ms", "retain", "initial", "error")}
            res["pages_per_epoch_p50"] = (sj.get("pages_per_checkpoint") or {}).get("p50")
            if not sj.get("ok"):
                res["error"] = f"colo_null_sink: {sj.get('error') or sj.get('leave_error')}"
        fails = guest.serial_text().count("CHECKER FAIL")
        res["guest_checker_failures"] = fails
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        res["error"] = str(e)
    finally:
        if sink is not None and sink.poll() is None:
            env.reap(sink, timeout=15)
        guest.stop()
        if pair:
            pair.stop()
    res["load_after"] = loadavg()
    pm = res.get("pause_ms", {})
    # REPLY written -> LOADED written on the receiver's clock: the part of the
    # pause the receiver is in; the rest is QEMU stopping and resuming.
    stage = ((res.get("remus_status") or {}).get("stage_ms") or (res.get("sink") or {}).get("receiver_ms") or {})
    res["stage_ms_p50"] = stage.get("p50")
    log(f"  {receiver:8s} rate {rate:>7}/s round {rnd}: pause p50 {pm.get('p50') or 0:7.2f} ms  "
        f"(REPLY->LOADED p50 {stage.get('p50') or 0:.2f})  "
        f"p99 {pm.get('p99') or 0:7.2f}  mean {pm.get('mean') or 0:7.2f}  n={pm.get('n', 0):3d}  "
        f"pages/epoch p50 {res.get('pages_per_epoch_p50')}  cpu% {res.get('cpu_percent')}"
        + (f"  ERROR {res['error']}" if res.get("error") else ""))
    if not args.keep_samples:
        res.pop("pause_samples_ms", None)
    return res, ms


ALL_RECEIVERS = ["ours", "null", "delayed"]
# Only when named in --receivers. ours-etcd: ours with --arbiter etcd (a
# local etcd member), for the arbiter's cost: ratio_ours_etcd_ours.
DIAGNOSTIC_RECEIVERS = ["null-touch", "null-retain", "ours-etcd"]


def bench_pause(env, args):
    receivers = args.receivers
    runs = []
    samples = {}  # (rate, receiver) -> [ms]
    idx = 0
    qemus = list(args.qemus.items())
    for rnd in range(args.rounds):
        # Interleaved: every QEMU runs each round, its receivers back to back.
        for qlabel, qpath in (qemus if rnd % 2 == 0 else qemus[::-1]):
            env.qemu = qpath
            for rate in args.rates:
                # Rotate the order each round so no receiver always runs first.
                k = (rnd + args.rates.index(rate)) % len(receivers)
                order = receivers[k:] + receivers[:k]
                for rcv in order:
                    idx += 1
                    res, ms = run_pause_once(env, args, rcv, rate, rnd, idx)
                    res["qemu"] = qlabel
                    runs.append(res)
                    if not res.get("error"):
                        samples.setdefault((qlabel, rate, rcv), []).extend(ms)
    env.qemu = args.qemu
    table = []
    for (qlabel, _), rate in ((q, r) for q in qemus for r in args.rates):
        row = {"qemu": qlabel, "dirty_rate": rate, "label": RATE_LABELS.get(rate, ""), "receivers": {}}
        mine = [r for r in runs if r["qemu"] == qlabel and r["dirty_rate"] == rate]
        for rcv in receivers:
            ms = samples.get((qlabel, rate, rcv), [])
            ppe = [r.get("pages_per_epoch_p50") for r in mine
                   if r["receiver"] == rcv and r.get("pages_per_epoch_p50") is not None]
            gr = [r.get("guest_rate_pages_per_s") for r in mine
                  if r["receiver"] == rcv and r.get("guest_rate_pages_per_s") is not None]
            per_round = [r["pause_ms"].get("p50") for r in mine if r["receiver"] == rcv and r.get("pause_ms", {}).get("n")]
            row["receivers"][rcv] = {
                "pause_ms": summary(ms),
                "pause_p50_per_round": per_round,
                "pages_per_epoch_p50": pct(ppe, 0.5),
                "guest_rate_pages_per_s": pct(gr, 0.5),
                "runs_ok": sum(1 for r in mine if r["receiver"] == rcv and not r.get("error")),
            }
        empty = {"pause_ms": {"n": 0}}
        o = row["receivers"].get("ours", empty)["pause_ms"]
        n = row["receivers"].get("null", empty)["pause_ms"]
        d = row["receivers"].get("delayed", empty)["pause_ms"]
        row["ratio_ours_null"] = {s: ratio(o.get(s), n.get(s)) for s in ("p50", "p99", "mean")}
        row["ratio_delayed_ours"] = {s: ratio(d.get(s), o.get(s)) for s in ("p50", "p99", "mean")}
        if "ours-etcd" in row["receivers"]:
            e = row["receivers"]["ours-etcd"]["pause_ms"]
            row["ratio_ours_etcd_ours"] = {s: ratio(e.get(s), o.get(s)) for s in ("p50", "p99", "mean")}
        on, dn = row["ratio_ours_null"], row["ratio_delayed_ours"]
        row["target_ours_null_le_1_10"] = (None if on["p50"] is None else
                                           bool(on["p50"] <= 1.10 and on["mean"] <= 1.10))
        row["target_delayed_eq_ours_within_10pct"] = (None if dn["p50"] is None else
                                                      bool(abs(dn["p50"] - 1) <= 0.10 and abs(dn["mean"] - 1) <= 0.10))
        table.append(row)
    return {"runs": runs, "summary": table}


# --------------------------------------------------------- failover bench
def run_failover_once(env, args, i):
    workdir = os.path.join(env.tmp, f"failover-{i}")
    res = {"repeat": i, "load_before": loadavg()}
    guest = Guest(env, os.path.join(workdir, "guest"), args.failover_mem, args.failover_dirty, args.failover_wss)
    pair = None
    rq = None
    restored_pid = None
    try:
        guest.wait_workload()
        time.sleep(0.5)
        pair = RemusPair(env, workdir, auto_promote=False)
        pair.protect(guest, args.interval)
        time.sleep(args.failover_protected_s)
        a = env.status(pair.a_sock) or {}
        res["epochs_before"] = a.get("last_acked_epoch")
        # Kill the primary side: remusd first (else it would tell the backup to
        # promote when its QEMU dies), then the primary QEMU.
        pair.a.kill()
        pair.a.wait(timeout=10)
        guest.proc.kill()
        guest.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            b = env.status(pair.b_sock) or {}
            if b.get("connected") is False:
                break
            time.sleep(0.05)
        res["backup_state_before"] = b.get("state")
        res["last_committed_epoch"] = b.get("last_committed_epoch")
        t0 = time.monotonic()
        env.ctl("failover", DOMAIN, sock=pair.b_sock, timeout=120)
        t1 = time.monotonic()
        b = env.status(pair.b_sock) or {}
        prom = b.get("promotion", {})
        res["failover_ms"] = prom.get("failover_ms")
        res["command_ms"] = (t1 - t0) * 1000.0
        restored_pid = (b.get("qemu") or {}).get("pid")
        qsock = b.get("qmp_socket")
        if not qsock:
            raise BenchError(f"no restored QEMU after failover: {b}")
        rq = QMP(qsock, timeout=20)
        while True:
            st = rq.cmd("query-status")
            if st.get("status") == "running":
                break
            if time.monotonic() - t0 > 60:
                raise BenchError(f"restored guest not running: {st}")
            time.sleep(0.002)
        t2 = time.monotonic()
        res["outside_ms"] = (t2 - t0) * 1000.0
        # The restored guest must carry on (checker lines, no failures).
        rserial = os.path.join(workdir, "b", "domains", DOMAIN, "run", "serial.log")
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            try:
                with open(rserial, errors="replace") as f:
                    text = f.read()
            except OSError:
                text = ""
            if "check ok" in text:
                break
            time.sleep(0.1)
        res["restored_guest_check_ok"] = "check ok" in text
        res["restored_guest_checker_failures"] = text.count("CHECKER FAIL")
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        res["error"] = str(e)
    finally:
        if rq:
            try:
                rq.cmd("quit", timeout=5)
            except BenchError:
                pass
            rq.close()
        if restored_pid and restored_pid > 0:
            # Started by the backup remusd for this run: make sure it is gone.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.kill(restored_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                try:
                    os.kill(restored_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if guest.proc.poll() is None:
            guest.stop()
        else:
            guest.qmp.close()
            guest.log.close()
        if pair:
            pair.stop()
    log(f"  failover {i}: failover_ms {res.get('failover_ms')}  outside {res.get('outside_ms') or 0:.0f} ms  "
        f"(remusctl {res.get('command_ms') or 0:.0f} ms) epoch {res.get('last_committed_epoch')}"
        + (f"  ERROR {res['error']}" if res.get("error") else ""))
    return res


def bench_failover(env, args):
    runs = [run_failover_once(env, args, i) for i in range(args.failover_repeats)]
    ok = [r for r in runs if not r.get("error")]
    med = lambda key: pct([r[key] for r in ok if r.get(key) is not None], 0.5)
    return {
        "guest_mem_mib": args.failover_mem,
        "dirty_rate": args.failover_dirty,
        "wss_mib": args.failover_wss,
        "runs": runs,
        "median_failover_ms": med("failover_ms"),
        "median_outside_ms": med("outside_ms"),
        "median_command_ms": med("command_ms"),
        "runs_ok": len(ok),
        "all_restored_guests_ok": all(r.get("restored_guest_check_ok") and not r.get("restored_guest_checker_failures")
                                      for r in ok) if ok else None,
    }


# ------------------------------------------------------------ apply bench
def bench_apply(env, args):
    """Runs bench_apply once per size group and merges the results."""
    groups = [(args.apply_sizes, None, args.apply_reps)]
    if args.apply_large:
        # 4 GiB: slow on this kind of VM (dirty-page throttling), so fewer reps
        # and no diagnostic variant.
        groups.append((args.apply_large, "first-touch,steady", max(1, min(args.apply_reps, 3))))
    merged = None
    for sizes, modes, reps in groups:
        argv = [env.apply, "--sizes-mib", sizes, "--pages", "1000,10000,50000", "--reps", str(reps)]
        if modes:
            argv += ["--modes", modes]
        if args.apply_dir:
            argv += ["--dir", args.apply_dir]
        log(f"apply: {' '.join(argv)}")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        for line in r.stderr.splitlines():
            if line.startswith("bench_apply:"):
                log("  " + line)
        try:
            doc = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            doc = {"ok": False, "error": f"bench_apply exited {r.returncode}: {r.stderr[-2000:]}", "results": []}
        doc["argv"] = argv[1:]
        if merged is None:
            merged = doc
            merged["runs"] = [{k: doc.get(k) for k in ("argv", "seconds", "ok", "error")}]
        else:
            merged["results"] += doc.get("results", [])
            merged["fixed_cost"] = merged.get("fixed_cost", []) + doc.get("fixed_cost", [])
            merged["runs"].append({k: doc.get(k) for k in ("argv", "seconds", "ok", "error")})
            merged["ok"] = merged.get("ok") and doc.get("ok")
            merged["seconds"] = merged.get("seconds", 0) + (doc.get("seconds") or 0)
    # Verdicts over the merged results (diagnostic variants excluded).
    res = merged.get("results", [])
    steady = [r["gbps_p50"] for r in res if r["mode"] == "steady"]
    prod = [r["gbps_p50"] for r in res if r["mode"] in ("steady", "first-touch")]
    merged["worst_steady_gbps"] = min(steady) if steady else None
    merged["worst_any_gbps"] = min(prod) if prod else None
    merged["target_met_steady"] = bool(steady) and min(steady) >= 1.0
    merged["target_met_all"] = bool(prod) and min(prod) >= 1.0
    return merged


# ------------------------------------------------------------------ report
def machine_info(env):
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "accelerator": "tcg"}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            info["cpu_model"] = m.group(1) if m else None
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s*(\d+)", f.read())
            info["mem_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    try:
        info["qemu"] = subprocess.run([env.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        info["qemu"] = None
    qemus = getattr(env.args, "qemus", None)
    if isinstance(qemus, dict) and len(qemus) > 1:
        info["qemus"] = {}
        for label, path in qemus.items():
            try:
                info["qemus"][label] = subprocess.run([path, "--version"], capture_output=True,
                                                      text=True).stdout.splitlines()[0]
            except (OSError, IndexError):
                info["qemus"][label] = None
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
    p = doc.get("pause")
    if p:
        log("pause per checkpoint (ms, QMP STOP->RESUME), pooled over rounds:")
        log(f"  {'qemu':>6} {'rate/s':>8} {'pages/ep':>9} {'receiver':8} {'p50':>8} {'p99':>8} {'mean':>8} {'n':>5}")
        for row in p["summary"]:
            for rcv, r in row["receivers"].items():
                pm = r["pause_ms"]
                log(f"  {row.get('qemu', ''):>6} {row['dirty_rate']:>8} {str(r['pages_per_epoch_p50']):>9} {rcv:8} "
                    f"{pm.get('p50') or 0:8.2f} {pm.get('p99') or 0:8.2f} {pm.get('mean') or 0:8.2f} {pm.get('n', 0):5d}")
            on, dn = row["ratio_ours_null"], row["ratio_delayed_ours"]
            fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
            verdict = lambda t, yes, no: "n/a" if t is None else (yes if t else no)
            log(f"  {'':8} ours/null p50 {fmt(on['p50'])} mean {fmt(on['mean'])} -> target <=1.10 "
                f"{verdict(row['target_ours_null_le_1_10'], 'met', 'MISSED')};  delayed/ours p50 {fmt(dn['p50'])} "
                f"mean {fmt(dn['mean'])} -> "
                f"{verdict(row['target_delayed_eq_ours_within_10pct'], '~equal', 'DIFFERENT')}")
    f = doc.get("failover")
    if f:
        fmt0 = lambda x: "n/a" if x is None else f"{x:.0f}"
        log(f"failover ({f['guest_mem_mib']} MiB guest): median failover_ms {fmt0(f['median_failover_ms'])}, "
            f"outside {fmt0(f['median_outside_ms'])} ms, runs ok {f['runs_ok']}/{len(f['runs'])}")
    a = doc.get("apply")
    if a and a.get("ok"):
        log(f"apply: worst steady {a['worst_steady_gbps']:.2f} GB/s, worst any {a['worst_any_gbps']:.2f} GB/s "
            f"(target >= 1 GB/s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (under ~3 minutes)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--qemu", default=DEFAULT_QEMU)
    ap.add_argument("--qemus", default=None,
                    help="the pause bench on several QEMUs, interleaved in one run: LABEL=PATH,... "
                         "(e.g. 7.2=/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64,"
                         "10.0=/var/cache/remus/qemu-10.0-colo/bin/qemu-system-x86_64); default: --qemu alone")
    ap.add_argument("--rates", default=None, help="dirty rates in pages/s, comma separated "
                    "(default 10000,100000,1000000; quick: 10000,1000000)")
    ap.add_argument("--receivers", default=",".join(ALL_RECEIVERS),
                    help="which of ours,null,delayed to run (default all three)")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval, ms")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per run (default 10; quick 4)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds after protection before measuring "
                    "(default 2; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of ours/null/delayed (default 3; quick 1)")
    ap.add_argument("--mem", type=int, default=512, help="guest memory for the pause bench, MiB")
    ap.add_argument("--wss", type=int, default=200, help="dirtier working set, MiB")
    ap.add_argument("--ack-delay", type=int, default=50, help="--ack-delay-ms of the 'delayed' backup")
    ap.add_argument("--failover-repeats", type=int, default=None, help="default 5; quick 1")
    ap.add_argument("--failover-mem", type=int, default=256)
    ap.add_argument("--failover-wss", type=int, default=64)
    ap.add_argument("--failover-dirty", type=int, default=10000)
    ap.add_argument("--failover-protected-s", type=float, default=None, help="default 5; quick 3")
    ap.add_argument("--apply-sizes", default=None, help="store sizes, MiB (default 256,1024; quick 256)")
    ap.add_argument("--apply-large", default=None, help="large store sizes, MiB, run with fewer reps "
                    "(default 4096; quick none; 0 for none)")
    ap.add_argument("--apply-reps", type=int, default=None, help="default 10; quick 3")
    ap.add_argument("--apply-dir", default=None, help="where bench_apply puts its stores (default /var/tmp)")
    ap.add_argument("--skip-pause", action="store_true")
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    ap.add_argument("--keep-samples", action="store_true", help="include every pause sample in the JSON")
    ap.add_argument("--out", default=None, help="result file (default bench/results/<timestamp>.json)")
    args = ap.parse_args()
    q = args.quick
    if args.rates is None:
        args.rates = "10000,1000000" if q else "10000,100000,1000000"
    args.rates = [int(x) for x in args.rates.split(",")]
    if args.qemus:
        try:
            args.qemus = dict(item.split("=", 1) for item in args.qemus.split(",") if item)
        except ValueError:
            ap.error("--qemus: LABEL=PATH,LABEL=PATH")
    else:
        args.qemus = {"default": args.qemu}
    args.receivers = [x for x in args.receivers.split(",") if x]
    if not args.receivers or any(x not in ALL_RECEIVERS + DIAGNOSTIC_RECEIVERS for x in args.receivers):
        ap.error(f"--receivers: choose from {','.join(ALL_RECEIVERS + DIAGNOSTIC_RECEIVERS)}")
    args.seconds = args.seconds if args.seconds is not None else (4.0 if q else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 2.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 3)
    args.failover_repeats = args.failover_repeats if args.failover_repeats is not None else (1 if q else 5)
    args.failover_protected_s = args.failover_protected_s if args.failover_protected_s is not None else (3.0 if q else 5.0)
    args.apply_sizes = args.apply_sizes or ("256" if q else "256,1024")
    if args.apply_large is None:
        args.apply_large = "" if q else "4096"
    elif args.apply_large == "0":
        args.apply_large = ""
    args.apply_reps = args.apply_reps if args.apply_reps is not None else (3 if q else 10)

    env = Env(args)
    t_start = time.monotonic()
    doc = {"bench": "remus", "mode": "quick" if q else "full", "machine": machine_info(env),
           "config": {k: v for k, v in vars(args).items()}}

    def on_signal(signo, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not args.skip_pause:
            log(f"pause: rates {args.rates} pages/s, {args.rounds} round(s) x {'/'.join(args.receivers)}, "
                f"{args.seconds:g} s measured after {args.warmup:g} s warmup, interval {args.interval} ms")
            doc["pause"] = bench_pause(env, args)
        if not args.skip_failover:
            log(f"failover: {args.failover_repeats} repeat(s), {args.failover_mem} MiB guest")
            doc["failover"] = bench_failover(env, args)
        if not args.skip_apply:
            doc["apply"] = bench_apply(env, args)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        log("interrupted; writing what was measured")
    finally:
        env.cleanup()
    doc["machine"]["loadavg_end"] = loadavg()
    doc["elapsed_s"] = time.monotonic() - t_start
    targets = {}
    if doc.get("pause"):
        for row in doc["pause"]["summary"]:
            at = str(row["dirty_rate"]) + ("" if row["qemu"] == "default" else "/qemu" + row["qemu"])
            targets[f"pause_ours_over_null_le_1.10@{at}"] = row["target_ours_null_le_1_10"]
            targets[f"pause_delayed_eq_ours@{at}"] = row["target_delayed_eq_ours_within_10pct"]
    if doc.get("apply", {}).get("ok"):
        targets["apply_steady_ge_1GBps"] = doc["apply"]["target_met_steady"]
        targets["apply_all_ge_1GBps"] = doc["apply"]["target_met_all"]
    doc["targets"] = targets
    write_results(doc, args.out, "", q, print_summary)


def write_results(doc, out, prefix, quick, summary):
    """The JSON to `out` (default bench/results/<prefix><timestamp>[-quick].json)
    and stdout, then the readable summary to stderr."""
    if not out:
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(ROOT, "bench", "results", f"{prefix}{stamp}{'-quick' if quick else ''}.json")
    text = json.dumps(doc, indent=1)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)
    summary(doc)
    log(f"wrote {out} ({doc['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
