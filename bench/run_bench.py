#!/usr/bin/env python3
"""remus benchmark driver (stdlib only). Not a test: it measures and reports.

Parts (see bench/README.md):

  pause     For each dirty rate, boots a fresh test guest per run and protects
            it with one of five receivers, interleaved round by round so that
            machine noise hits all of them alike:
              ours      two remusd on loopback (primary + backup)
              null      bench/colo_null_sink: QEMU's own checkpoint cost with
                        zero receiver work (the limit)
              colo      a stock QEMU COLO secondary (bench/stock_colo.py):
                        what a QEMU user would run instead, over loopback TCP
              colo-unix the same over a unix socket (no Nagle stall: QEMU's
                        own COLO work alone, the stricter comparison)
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
  failover-size  (only with --failover-sizes or --only failover-size)
            Failover time against guest size: for each size, the backup
            started with --restore map and --restore stream, the store
            resident and evicted from the page cache, interleaved round by
            round; failover_ms, outside view, promotion.restored_by, the
            store's residency before the failover (measured, not assumed).
  n-to-one  (only with --only n-to-one; issue 16) N light guests (8 x 256 MiB,
            2000 pages/s, interval 200 ms) protected through one primary
            remusd to one backup remusd: each guest's pause protected alone
            (the others running unprotected) against all N protected at
            once, alternating round by round; the backup's receive/commit
            throughput and CPU. All N guests run throughout, so the CPU the
            N guests take is the same in both conditions; what differs is
            remus protecting one of them or all N at once.
  apply     build/bench/bench_apply: PageStore::Commit throughput vs memcpy.

Output: one JSON document on stdout and in bench/results/<timestamp>.json;
a human-readable summary on stderr.

Usage: python3 bench/run_bench.py [--quick] [--skip-pause] [--skip-failover]
                                  [--skip-apply] [--rounds N] [--seconds S] ...
       python3 bench/run_bench.py --only failover-size [--failover-sizes 256,1024,4096,8192]
       python3 bench/run_bench.py --only n-to-one [--rounds 2] [--n-to-one-seconds 30]
"""

import argparse
import ctypes
import datetime
import errno
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from stock_colo import ColoError, ColoSecondary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_QEMU = os.environ.get("REMUS_QEMU", "/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64")
# The guest's counter page: above the kernel image, which the uncompressed PVH
# vmlinux (booted when present: ~4 s faster under TCG) occupies up to ~66 MiB.
def counter_gpa(kernel):
    return "0x8000000" if os.path.basename(kernel) == "vmlinux" else "0x4000000"
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
        gpa = counter_gpa(env.kernel)
        append = (f"console=ttyS0 memmap=64K${gpa} remus.counter={gpa} "
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
        self.kernel = os.path.join(self.build, "guest", "vmlinux")
        if not os.path.exists(self.kernel):
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

    def status(self, sock, domain=DOMAIN):
        r = self.ctl("status", domain, "--json", sock=sock, timeout=10, check=False)
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

    def __init__(self, env, workdir, ack_delay_ms=0, auto_promote=False, etcd=None, restore=None):
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
        if restore:
            # how a failover restores the guest: map (pc.ram is the store's file) or stream
            b_argv += ["--restore", restore]
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
        # --remusd-nice N: both daemons at that nice value (the guests' QEMUs
        # stay at 0): does giving remus the CPU first shorten the pause? Every
        # process here starts its own session, and with the kernel's
        # autogroups (sched_autogroup_enabled) the CPU is shared between
        # sessions first: a process's own nice then only ranks it within its
        # session. So the daemons' autogroups get the nice value.
        nice = getattr(env.args, "remusd_nice", None)
        if nice is not None:
            for p in (self.a, self.b):
                os.setpriority(os.PRIO_PROCESS, p.pid, nice)
                try:
                    with open(f"/proc/{p.pid}/autogroup", "w") as f:
                        f.write(f"{nice}\n")
                except OSError:
                    pass  # no autogroups: the process's nice is what counts
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.a_sock) and os.path.exists(self.b_sock)):
            if time.monotonic() > deadline or self.a.poll() is not None or self.b.poll() is not None:
                raise BenchError(f"remusd did not start; see {workdir}/a.log and b.log")
            time.sleep(0.05)

    def protect(self, guest, interval_ms, timeout_s=120, extra=(), domain=DOMAIN):
        self.env.ctl("protect", domain, "--qmp", guest.qmp_receiver, "--backup", f"127.0.0.1:{self.port}",
                     "--interval", str(interval_ms), "--timeout", str(timeout_s), *extra, sock=self.a_sock,
                     timeout=timeout_s + 30)

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
    colo = colo_primary = None
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
        elif receiver in ("colo", "colo-unix"):
            uri = (f"tcp:127.0.0.1:{free_port()}" if receiver == "colo"
                   else f"unix:{os.path.join(workdir, 'colo-migrate.sock')}")
            colo = ColoSecondary(env, os.path.join(workdir, "secondary"), guest, QMP, uri)
            colo_primary = QMP(guest.qmp_receiver)
            t = time.time()
            ColoSecondary.start_primary(colo_primary, uri, args.interval)
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
                          "remusd_backup": pair.b.pid if pair else None, "null_sink": sink.pid if sink else None,
                          "colo_secondary": colo.proc.pid if colo else None})
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
        elif colo:
            # No pages per checkpoint: QEMU 7.2 and 10.0 report no ram
            # counters while in COLO (query-migrate says only the status).
            res["pages_per_epoch_p50"] = None
            res["colo_status"] = {"primary": colo_primary.cmd("query-migrate").get("status"),
                                  "secondary": colo.state()}
            if res["colo_status"]["primary"] != "colo":
                res["error"] = f"COLO primary left COLO ({res['colo_status']})"
            ColoSecondary.leave(colo_primary)
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
    except (BenchError, ColoError, subprocess.SubprocessError, OSError) as e:
        res["error"] = str(e)
    finally:
        if sink is not None and sink.poll() is None:
            env.reap(sink, timeout=15)
        if colo_primary is not None:
            colo_primary.close()
        if colo is not None:
            colo.stop()
        guest.stop()
        if pair:
            pair.stop()
    res["load_after"] = loadavg()
    pm = res.get("pause_ms", {})
    # REPLY written -> LOADED written on the receiver's clock: the part of the
    # pause the receiver is in; the rest is QEMU stopping and resuming.
    stage = ((res.get("remus_status") or {}).get("stage_ms") or (res.get("sink") or {}).get("receiver_ms") or {})
    res["stage_ms_p50"] = stage.get("p50")
    stage_p50 = "n/a" if stage.get("p50") is None else f"{stage['p50']:.2f}"
    log(f"  {receiver:8s} rate {rate:>7}/s round {rnd}: pause p50 {pm.get('p50') or 0:7.2f} ms  "
        f"(REPLY->LOADED p50 {stage_p50})  "
        f"p99 {pm.get('p99') or 0:7.2f}  mean {pm.get('mean') or 0:7.2f}  n={pm.get('n', 0):3d}  "
        f"pages/epoch p50 {res.get('pages_per_epoch_p50')}  cpu% {res.get('cpu_percent')}"
        + (f"  ERROR {res['error']}" if res.get("error") else ""))
    if not args.keep_samples:
        res.pop("pause_samples_ms", None)
    return res, ms


ALL_RECEIVERS = ["ours", "null", "colo", "colo-unix", "delayed"]
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
        c = row["receivers"].get("colo", empty)["pause_ms"]
        cu = row["receivers"].get("colo-unix", empty)["pause_ms"]
        row["ratio_ours_null"] = {s: ratio(o.get(s), n.get(s)) for s in ("p50", "p99", "mean")}
        # Against what a QEMU user would run instead (issue 17's aim: <= 0.35
        # at small checkpoints, <= 0.2 at large ones), over TCP as deployed
        # and over a unix socket (no Nagle stall: the stricter one).
        row["ratio_ours_colo"] = {s: ratio(o.get(s), c.get(s)) for s in ("p50", "p99", "mean")}
        row["ratio_ours_colo_unix"] = {s: ratio(o.get(s), cu.get(s)) for s in ("p50", "p99", "mean")}
        if "null-retain" in row["receivers"]:
            r_ = row["receivers"]["null-retain"]["pause_ms"]
            row["ratio_ours_null_retain"] = {s: ratio(o.get(s), r_.get(s)) for s in ("p50", "p99", "mean")}
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
def run_failover_once(env, args, i, mem=None, wss=None, dirty=None, protected_s=None, restore=None,
                      evict=None, name=None, protect_residency=None):
    """One failover: a protected guest, the primary side killed, `remusctl
    failover` on the backup. The failover part calls it with its own options;
    the failover-size part passes the guest size, the backup's --restore mode,
    protect --residency (hot|paged, where remusctl has it) and evict: False
    (the store as the backup left it) or True (the store's block files
    evicted from the page cache first); with evict None the store is not
    looked at."""
    mem = mem or args.failover_mem
    wss = wss or args.failover_wss
    dirty = dirty or args.failover_dirty
    protected_s = protected_s if protected_s is not None else args.failover_protected_s
    workdir = os.path.join(env.tmp, name or f"failover-{i}")
    res = {"repeat": i, "load_before": loadavg()}
    guest = Guest(env, os.path.join(workdir, "guest"), mem, dirty, wss)
    pair = None
    rq = None
    restored_pid = None
    files = []
    try:
        # A big TCG guest boots and copies slower: more time for both.
        res["boot_s"] = guest.wait_workload(timeout=90 + mem / 64)
        time.sleep(0.5)
        pair = RemusPair(env, workdir, auto_promote=False, restore=restore)
        t = time.monotonic()
        pair.protect(guest, args.interval, timeout_s=120 + mem // 32,
                     extra=["--residency", protect_residency] if protect_residency else [])
        res["protect_s"] = time.monotonic() - t
        time.sleep(protected_s)
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
        if evict is not None:
            res["restore_plan"] = b.get("restore_plan")
            res["backup_residency_status"] = b.get("residency")  # builds with protect --residency
            files = store_block_files(b.get("store"))
            res["store"] = prepare_store(files, evict, args.evict_steps, pair.b.pid)
        t0 = time.monotonic()
        env.ctl("failover", DOMAIN, sock=pair.b_sock, timeout=300)
        t1 = time.monotonic()
        b = env.status(pair.b_sock) or {}
        prom = b.get("promotion", {})
        res["failover_ms"] = prom.get("failover_ms")
        res["restored_by"] = prom.get("restored_by")
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
            if time.monotonic() - t0 > 300:
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
        if files:
            # What the restore and the first seconds of the restored guest
            # brought (back) into the page cache.
            res["store"]["resident_bytes_after_running"] = page_cache_bytes(files)
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
        if evict is not None:
            # Page stores of up to 8 GiB (fallocated) per run: gone after each
            # run, even with --keep (which keeps the logs).
            for d in glob.glob(os.path.join(workdir, "b", "domains", DOMAIN, "store-*")):
                shutil.rmtree(d, ignore_errors=True)
            res["promotion_phases_ms"] = promotion_phases(os.path.join(workdir, "b.log"))
    rb = res.get("restored_by") or {}
    st = res.get("store") or {}
    log(f"  {name or f'failover {i}'}: failover_ms {res.get('failover_ms')}  outside {res.get('outside_ms') or 0:.0f} ms  "
        f"(remusctl {res.get('command_ms') or 0:.0f} ms) epoch {res.get('last_committed_epoch')}"
        + (f"  restored {rb.get('mode')} stream {rb.get('stream_bytes')} B mapped {rb.get('mapped_bytes')} B"
           if rb else "")
        + (f"  store resident {mib(st.get('resident_bytes'))}/{mib(st.get('data_bytes'))} MiB of data"
           f" (at start {mib(st.get('resident_bytes_at_start'))})" if st else "")
        + (f"  guest ok {res.get('restored_guest_check_ok')}" if "restored_guest_check_ok" in res else "")
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


# ------------------------------------------- failover against guest size
# The backup's page store: one sparse, fallocated file per RAM block
# (<store>/ram-NNN-<id>.img), mapped MAP_SHARED by the backup remusd for as
# long as it holds the store. "Evicted" below means: none of those files'
# pages in the page cache when `remusctl failover` runs, as after a long
# protection on a backup whose page cache went to other guests.

MADV_PAGEOUT = 21
SYS_PROCESS_MADVISE = 440  # the same number on x86_64 and aarch64
EVICT_STEPS_ALL = ["fadvise", "dropcaches", "pageout"]


def mib(b):
    return None if b is None else round(b / 2**20, 1)


def store_block_files(store_dir):
    if not store_dir:
        raise BenchError("the backup's status names no store")
    files = sorted(glob.glob(os.path.join(store_dir, "ram-*.img")))
    if not files:
        raise BenchError(f"no ram-*.img in {store_dir}")
    return files


def page_cache_bytes(files):
    """Bytes of the files in the page cache: util-linux fincore (mincore(2) on
    a fresh mapping; faults nothing in)."""
    try:
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                           capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise BenchError(f"fincore: {e} (util-linux)")
    if r.returncode != 0:
        raise BenchError(f"fincore failed: {r.stderr.strip()}")
    return sum(int(x) for x in r.stdout.split())


def data_bytes(path):
    """Bytes of the file that are data (SEEK_DATA/SEEK_HOLE): what the store
    wrote. ext4 counts a fallocated, never written extent as a hole unless the
    page cache holds pages of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = total = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            total += h - d
            off = h
        return total
    finally:
        os.close(fd)


def fsync_fadvise(files):
    """fsync (the pages become clean), then POSIX_FADV_DONTNEED. The kernel
    drops clean pages no process maps; the backup remusd maps the store."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def mapped_ranges(pid, files):
    """[(start, end)] of pid's mappings of the files, from /proc/pid/maps."""
    want = {os.path.realpath(f) for f in files}
    out = []
    with open(f"/proc/{pid}/maps") as m:
        for line in m:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].rstrip("\n") in want:
                s, e = parts[0].split("-")
                out.append((int(s, 16), int(e, 16)))
    return out


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def pageout(pid, ranges):
    """process_madvise(MADV_PAGEOUT) on pid's ranges: the kernel unmaps the
    pages from that process (if no other maps them) and reclaims them; clean
    file pages are simply freed. Returns the bytes advised."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pidfd = os.pidfd_open(pid)
    done = 0
    try:
        for start, end in ranges:
            off = start
            while off < end:
                n = min(end - off, 1 << 30)  # one call moves at most MAX_RW_COUNT
                iov = _Iovec(off, n)
                r = libc.syscall(ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_int(pidfd), ctypes.byref(iov),
                                 ctypes.c_size_t(1), ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0))
                if r < 0:
                    e = ctypes.get_errno()
                    raise BenchError(f"process_madvise(MADV_PAGEOUT) pid {pid}: {os.strerror(e)}")
                done += r
                off += n
    finally:
        os.close(pidfd)
    return done


def fsync_files(files):
    """Writes the files' dirty pages back, so that eviction may drop them."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict_step(step, files, backup_pid):
    if step == "fadvise":
        fsync_fadvise(files)
        return {}
    if step == "dropcaches":
        # Machine-wide: every clean, unmapped page-cache page.
        fsync_files(files)
        with open("/proc/sys/vm/drop_caches", "w") as d:
            d.write("1\n")
        return {}
    if step == "pageout":
        fsync_files(files)
        ranges = mapped_ranges(backup_pid, files)
        advised = pageout(backup_pid, ranges)
        fsync_fadvise(files)  # whatever pageout left unmapped but cached
        return {"backup_mapped_bytes": sum(e - s for s, e in ranges), "advised_bytes": advised}
    raise BenchError(f"unknown eviction step {step}")


def prepare_store(files, evict, steps, backup_pid):
    """The store's residency right before the failover; with evict, the
    eviction steps first, each followed by a measurement."""
    out = {"dir": os.path.dirname(files[0]), "files": [os.path.basename(f) for f in files],
           "file_bytes": sum(os.path.getsize(f) for f in files),
           "data_bytes": sum(data_bytes(f) for f in files),
           "resident_bytes_at_start": page_cache_bytes(files), "eviction": []}
    resident = out["resident_bytes_at_start"]
    if evict:
        for step in steps:
            t = time.monotonic()
            r = evict_step(step, files, backup_pid)
            ms = (time.monotonic() - t) * 1000.0
            resident = page_cache_bytes(files)
            out["eviction"].append({"step": step, "ms": round(ms, 1), "resident_bytes": resident, **r})
    out["resident_bytes"] = resident
    out["resident_fraction_of_data"] = resident / out["data_bytes"] if out["data_bytes"] else None
    out["resident_fraction_of_file"] = resident / out["file_bytes"] if out["file_bytes"] else None
    return out


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z ")


def promotion_phases(b_log):
    """Where the promotion's time went, from the backup remusd's log (ms
    timestamps): prepare (decision -> the restore starts the new QEMU: checks,
    the promoting.json marker written durably), qemu_start (-> its monitor
    answers), load (-> the restore stream written: device state, plus every
    page when streaming), running (-> promoted)."""
    marks = {}
    order = [("promoting", "promoting: "), ("restoring", "restoring epoch "), ("qmp", "qmp: connected to QEMU"),
             ("stream", "restore: restore stream for "), ("promoted", "promoted in ")]
    try:
        with open(b_log, errors="replace") as f:
            for line in f:
                m = LOG_TS.match(line)
                if not m:
                    continue
                for key, text in order:
                    if text in line:
                        # a fallback from mapping to streaming restarts QEMU: the last one counts
                        marks[key] = datetime.datetime.fromisoformat(m.group(1)).timestamp()
    except OSError:
        return None
    out = {}
    for (a, _), (b, _) in zip(order, order[1:]):
        name = {"restoring": "prepare", "qmp": "qemu_start", "stream": "load", "promoted": "running"}[b]
        if a in marks and b in marks:
            out[name] = round((marks[b] - marks[a]) * 1000.0, 1)
    return out or None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remusctl_has_residency(env):
    """Whether this build's `remusctl protect` takes --residency hot|paged."""
    if not hasattr(env, "_has_residency"):
        r = subprocess.run([env.remusctl, "protect", "--help"], capture_output=True, text=True)
        env._has_residency = "--residency" in (r.stdout + r.stderr)
    return env._has_residency


def spread(values):
    """median (nearest rank, as everywhere here), min, max, n."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": pct(values, 0.5), "min": min(values), "max": max(values)}


# issue 16: decision -> running
FAILOVER_SIZE_TARGETS_MS = {256: 300, 8192: 500}


def bench_failover_size(env, args):
    """For each guest size: restore=map and restore=stream, store resident and
    evicted, interleaved round by round (sizes alternate direction; the four
    cases rotate each round)."""
    cases = [(m, r) for r in args.failover_size_residency for m in args.failover_size_modes]
    # resident and evicted differ only in the page cache: the store unlocked
    # (protect --residency paged, where the build has it: its default, hot,
    # locks the whole store, which nothing can evict). hot: the store locked.
    has_res = remusctl_has_residency(env)
    if "hot" in args.failover_size_residency and not has_res:
        raise BenchError("residency case hot: this build's remusctl protect has no --residency")
    policy = {"resident": "paged" if has_res else None, "evicted": "paged" if has_res else None, "hot": "hot"}
    runs = []
    idx = 0
    for rnd in range(args.failover_size_rounds):
        for size in (args.failover_sizes if rnd % 2 == 0 else args.failover_sizes[::-1]):
            k = rnd % len(cases)
            for mode, resid in cases[k:] + cases[:k]:
                if (mode == "stream" and args.failover_size_stream_rounds is not None
                        and size >= args.failover_size_stream_from and rnd >= args.failover_size_stream_rounds):
                    continue
                idx += 1
                res = run_failover_once(env, args, idx, mem=size, wss=args.failover_size_wss,
                                        dirty=args.failover_size_dirty,
                                        protected_s=args.failover_size_protected_s, restore=mode,
                                        evict=(resid == "evicted"), name=f"fsize-{idx:03d}-{size}-{mode}-{resid}",
                                        protect_residency=policy[resid])
                res.update({"round": rnd, "mem_mib": size, "restore": mode, "residency": resid,
                            "protect_residency": policy[resid]})
                runs.append(res)
    summary_rows = []
    for size in args.failover_sizes:
        for resid in args.failover_size_residency:
            for mode in args.failover_size_modes:
                mine = [r for r in runs if (r["mem_mib"], r["restore"], r["residency"]) == (size, mode, resid)]
                ok = [r for r in mine if not r.get("error")]
                col = lambda f: [f(r) for r in ok if f(r) is not None]
                rb = lambda r: r.get("restored_by") or {}
                st = lambda r: r.get("store") or {}
                summary_rows.append({
                    "mem_mib": size, "restore": mode, "residency": resid,
                    "runs": len(mine), "runs_ok": len(ok),
                    "failover_ms": spread(col(lambda r: r.get("failover_ms"))),
                    "outside_ms": spread(col(lambda r: r.get("outside_ms"))),
                    "command_ms": spread(col(lambda r: r.get("command_ms"))),
                    "restored_modes": sorted(set(col(lambda r: rb(r).get("mode")))),
                    "stream_bytes": spread(col(lambda r: rb(r).get("stream_bytes"))),
                    "mapped_bytes": spread(col(lambda r: rb(r).get("mapped_bytes"))),
                    "store_data_bytes": spread(col(lambda r: st(r).get("data_bytes"))),
                    "resident_bytes_before_failover": spread(col(lambda r: st(r).get("resident_bytes"))),
                    "resident_fraction_of_data": spread(col(lambda r: st(r).get("resident_fraction_of_data"))),
                    "resident_bytes_after_running": spread(col(lambda r: st(r).get("resident_bytes_after_running"))),
                    "phases_ms_median": {k: pct(col(lambda r: (r.get("promotion_phases_ms") or {}).get(k)), 0.5)
                                         for k in ("prepare", "qemu_start", "load", "running")},
                    "protect_s": spread(col(lambda r: r.get("protect_s"))),
                    "restored_guests_ok": sum(1 for r in ok if r.get("restored_guest_check_ok")
                                              and not r.get("restored_guest_checker_failures")),
                })
    ratios = []
    for size in args.failover_sizes:
        for resid in args.failover_size_residency:
            get = lambda mode: next((s for s in summary_rows if (s["mem_mib"], s["restore"], s["residency"])
                                     == (size, mode, resid)), None)
            m, s = get("map"), get("stream")
            if not (m and s):
                continue
            # Per round too: map and stream of the same round ran back to back.
            per_round = []
            for rnd in range(args.failover_size_rounds):
                pick = lambda mode: next((r.get("failover_ms") for r in runs if not r.get("error") and
                                          (r["mem_mib"], r["restore"], r["residency"], r["round"]) ==
                                          (size, mode, resid, rnd)), None)
                rr = ratio(pick("map"), pick("stream"))
                if rr is not None:
                    per_round.append(round(rr, 3))
            ratios.append({"mem_mib": size, "residency": resid,
                           "map_over_stream_failover_ms": ratio(m["failover_ms"]["median"], s["failover_ms"]["median"]),
                           "map_over_stream_outside_ms": ratio(m["outside_ms"]["median"], s["outside_ms"]["median"]),
                           "map_over_stream_failover_ms_per_round": per_round})
    targets = {}
    for s in summary_rows:
        limit = FAILOVER_SIZE_TARGETS_MS.get(s["mem_mib"])
        if limit is not None and s["failover_ms"]["median"] is not None:
            targets[f"failover_ms_le_{limit}@{s['mem_mib']}MiB/{s['restore']}/{s['residency']}"] = \
                s["failover_ms"]["median"] <= limit
    return {"sizes_mib": args.failover_sizes, "modes": args.failover_size_modes,
            "residency": args.failover_size_residency, "rounds": args.failover_size_rounds,
            "wss_mib": args.failover_size_wss, "dirty_rate": args.failover_size_dirty,
            "protected_s": args.failover_size_protected_s, "evict_steps": args.evict_steps,
            "protect_residency": {k: v for k, v in policy.items() if k in args.failover_size_residency},
            "remusd_sha256": file_sha256(env.remusd),
            "runs": runs, "summary": summary_rows, "ratios": ratios, "targets": targets}


# ------------------------------------------------------ N-to-1 (issue 16)
N_TO_ONE_TARGET = 1.2  # each guest's pause with all on one backup, over its pause alone


def median(values):
    """The median of a few values (windows, guests): of two, their mean."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def status_rows(env, sock):
    """Every domain's status row on one remusd (one `remusctl status --json`),
    by name, and the time it was taken (the middle of the call)."""
    t = time.monotonic()
    r = env.ctl("status", "--json", sock=sock, timeout=10, check=False)
    try:
        rows = json.loads(r.stdout) if r.returncode == 0 else []
    except ValueError:
        rows = []
    return (t + time.monotonic()) / 2, {d.get("domain"): d for d in rows}


def run_delay_s(pid):
    """Seconds the threads of a process (those alive now) have spent runnable
    but waiting for a CPU (/proc/PID/task/*/schedstat)."""
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(f) as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def counter_delta(r0, r1, *path):
    """r1 - r0 of a counter at path in two status rows (None where missing)."""
    v = []
    for r in (r0, r1):
        for k in path:
            r = r.get(k) if isinstance(r, dict) else None
        v.append(r)
    return None if None in v else v[1] - v[0]


def hist_mean_ms(r0, r1, *path):
    """The mean, in ms, of what a cumulative histogram (seconds) got between two status rows."""
    n, s = counter_delta(r0, r1, *path, "count"), counter_delta(r0, r1, *path, "sum")
    return 1000.0 * s / n if n else None


def run_n_to_one_window(env, args, pair, guests, protect, cond, rnd):
    """Protects the domains in `protect` (names in `guests`, a dict name ->
    Guest, all running) to the one backup, records each one's pauses over a
    window, and unprotects them. The CPU meter covers every guest's QEMU."""
    res = {"condition": cond, "round": rnd, "domains": protect, "load_before": loadavg()}
    try:
        t = time.monotonic()
        for d in protect:
            pair.protect(guests[d], args.n_to_one_interval, timeout_s=300, domain=d)
        res["protect_s"] = time.monotonic() - t
        t_from = time.time() + args.warmup
        t_to = t_from + args.n_to_one_seconds
        pids = {"remusd_backup": pair.b.pid, "remusd_primary": pair.a.pid,
                **{f"qemu_{d}": g.proc.pid for d, g in guests.items()}}
        meter = CpuMeter(pids)
        time.sleep(max(0.0, t_from - time.time()))
        off = {d: guests[d].serial_size() for d in protect}
        (_, a0), (tb, b0) = status_rows(env, pair.a_sock), status_rows(env, pair.b_sock)
        w0, tw = {k: run_delay_s(p) for k, p in pids.items()}, time.monotonic()
        meter.start()
        time.sleep(max(0.0, t_to - time.time()))
        cpu = meter.stop()
        wait = {k: 100.0 * (run_delay_s(p) - w0[k]) / (time.monotonic() - tw) for k, p in pids.items()}
        (_, a1), (tb1, b1) = status_rows(env, pair.a_sock), status_rows(env, pair.b_sock)
        for m in (cpu, wait):
            m["qemu_all"] = round(sum(m.pop(f"qemu_{d}", 0) for d in guests), 1)
        res["cpu_percent"] = cpu
        # Time runnable but not running, summed over threads (% of the window):
        # how long the CPU kept each side waiting.
        res["runqueue_wait_percent"] = {k: round(v, 1) for k, v in wait.items()}
        # The backup counts no committed bytes: once the initial copies are
        # done, every byte it receives belongs to a checkpoint it commits.
        total = lambda *path: sum(counter_delta(b0.get(d), b1.get(d), *path) or 0 for d in protect)
        res["backup"] = {"bytes_per_s": total("link", "bytes_received") / (tb1 - tb),
                         "commits_per_s": total("checkpoints_total") / (tb1 - tb)}
        time.sleep(0.3)  # the last RESUME of the window
        res["guests"] = {}
        for d in protect:
            g = guests[d]
            ms = [p for _, p in pauses_in_window(g.qmp.events_snapshot(), t_from, t_to)]
            st, p0, q0, q1 = a1.get(d) or {}, a0.get(d), b0.get(d), b1.get(d)
            res["guests"][d] = {"pause_samples_ms": [round(p, 3) for p in ms], "pause_ms": summary(ms),
                                "guest_rate_pages_per_s": pct(guest_rates(g.serial_text(off[d])), 0.5),
                                "pages_per_epoch_p50": (st.get("dirty_pages_per_epoch") or {}).get("p50"),
                                # over the window: checkpoints that waited for the backup (the guest
                                # paused), LOADED -> ACK, the backup's commit of a checkpoint
                                "backpressure_waits": counter_delta(p0, st, "backpressure_waits"),
                                "ack_ms_mean": hist_mean_ms(p0, st, "histograms", "ack_seconds"),
                                "apply_ms_mean": hist_mean_ms(q0, q1, "histograms", "apply_seconds"),
                                "state": st.get("state")}
            if st.get("state") != "protected":
                res["error"] = f"{d}: primary state {st.get('state')}: {st.get('error')}"
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        res["error"] = str(e)
    finally:
        for d in protect:
            env.ctl("unprotect", d, sock=pair.a_sock, timeout=60, check=False)
        # unprotect returns before the backup has read the primary's GOODBYE
        # (behind the checkpoints it has yet to apply). A new protect would
        # wait for that (up to two heartbeat timeouts; before that fix it was
        # refused); the bench waits here, so that no window overlaps the
        # previous one's tail, and records how long the release took.
        t = time.monotonic()
        while time.monotonic() - t < 60:
            rows = status_rows(env, pair.b_sock)[1]
            if not any((rows.get(d) or {}).get("connected") for d in protect):
                break
            time.sleep(0.1)
        res["backup_release_s"] = time.monotonic() - t
    res["load_after"] = loadavg()
    p50 = {d: (g["pause_ms"].get("p50") or 0) for d, g in res.get("guests", {}).items()}
    log(f"  {cond:6s} round {rnd} {','.join(protect)}: pause p50 "
        + " ".join(f"{v:.1f}" for v in p50.values())
        + f" ms  backup {mib((res.get('backup') or {}).get('bytes_per_s')) or 0:.1f} MiB/s  "
          f"cpu% {res.get('cpu_percent')}  run-queue wait% {res.get('runqueue_wait_percent')}  "
          f"released {res['backup_release_s']:.1f} s  load {res['load_after']}"
        + (f"  ERROR {res['error']}" if res.get("error") else ""))
    return res


def bench_n_to_one(env, args):
    """N light guests, all booted and running throughout (the CPU of N TCG
    guests is the same in both conditions). Per round: 'alone', each guest in
    turn protected by itself to the one backup; 'shared', all N protected at
    once; the order of the two alternates round by round."""
    names = [f"vm{i}" for i in range(args.n_to_one_guests)]
    workdir = os.path.join(env.tmp, "n-to-one")
    guests, runs, pair = {}, [], None
    try:
        for d in names:
            guests[d] = Guest(env, os.path.join(workdir, d), args.n_to_one_mem, args.n_to_one_dirty,
                              args.n_to_one_wss)
        boot_s = {d: round(g.wait_workload(timeout=120 + 30 * len(names)), 1) for d, g in guests.items()}
        log(f"n-to-one: {len(names)} guests running (boot {max(boot_s.values()):.0f} s), load {loadavg()}")
        pair = RemusPair(env, workdir)
        for rnd in range(args.n_to_one_rounds):
            for cond in (("alone", "shared") if rnd % 2 == 0 else ("shared", "alone")):
                if cond == "shared":
                    runs.append(run_n_to_one_window(env, args, pair, guests, names, cond, rnd))
                else:
                    for d in (names if rnd % 2 == 0 else names[::-1]):
                        runs.append(run_n_to_one_window(env, args, pair, guests, [d], cond, rnd))
        checker = {d: g.serial_text().count("CHECKER FAIL") for d, g in guests.items()}
    finally:
        for g in guests.values():
            g.stop()
        if pair:
            pair.stop()
    rows = []
    for d in names:
        row = {"domain": d}
        for cond in ("alone", "shared"):
            mine = [r["guests"][d] for r in runs if r["condition"] == cond and d in r.get("guests", {})]
            col = lambda k: [g[k] for g in mine if g.get(k) is not None]
            row[cond] = {"pause_ms": summary([p for g in mine for p in g["pause_samples_ms"]]),
                         "pause_p50_per_round": [g["pause_ms"].get("p50") for g in mine],
                         "backpressure_waits": sum(col("backpressure_waits")),
                         **{k: median(col(k)) for k in ("guest_rate_pages_per_s", "pages_per_epoch_p50",
                                                        "ack_ms_mean", "apply_ms_mean")}}
        row["ratio_shared_alone"] = {s: ratio(row["shared"]["pause_ms"].get(s), row["alone"]["pause_ms"].get(s))
                                     for s in ("p50", "p99", "mean")}
        row["checker_failures"] = checker.get(d)
        rows.append(row)
    if not args.keep_samples:
        for r in runs:
            for g in r.get("guests", {}).values():
                g.pop("pause_samples_ms", None)
    r50 = [r["ratio_shared_alone"]["p50"] for r in rows if r["ratio_shared_alone"]["p50"] is not None]
    worst = max(rows, key=lambda r: r["ratio_shared_alone"]["p50"] or 0)
    backup = {}
    for cond in ("alone", "shared"):
        mine = [r for r in runs if r["condition"] == cond and not r.get("error")]
        col = lambda f: median([f(r) for r in mine])
        backup[cond] = {"windows": len(mine),
                        "bytes_per_s_median": col(lambda r: r["backup"]["bytes_per_s"]),
                        "commits_per_s_median": col(lambda r: r["backup"]["commits_per_s"]),
                        "cpu_percent_median": {k: col(lambda r, k=k: r["cpu_percent"].get(k)) for k in
                                               ("remusd_backup", "remusd_primary", "qemu_all", "machine_busy",
                                                "others")},
                        "runqueue_wait_percent_median": {k: col(lambda r, k=k: r["runqueue_wait_percent"].get(k))
                                                         for k in ("remusd_backup", "remusd_primary", "qemu_all")},
                        "apply_ms_mean_median": median([g.get("apply_ms_mean") for r in mine
                                                        for g in r["guests"].values()]),
                        "backup_release_s_max": max((r["backup_release_s"] for r in mine), default=None)}
    return {"guests": args.n_to_one_guests, "mem_mib": args.n_to_one_mem, "dirty_rate": args.n_to_one_dirty,
            "wss_mib": args.n_to_one_wss, "interval_ms": args.n_to_one_interval, "rounds": args.n_to_one_rounds,
            "seconds": args.n_to_one_seconds, "warmup_s": args.warmup, "boot_s": boot_s,
            "note": "all guests run throughout in both conditions; what differs is remus (one primary remusd, "
                    "one backup remusd) protecting one of them or all at once",
            "runs": runs, "summary": rows, "backup": backup,
            "median_ratio_p50": median(r50), "worst": {"domain": worst["domain"], **worst["ratio_shared_alone"]},
            "targets": {f"n_to_one_pause_p50_within_{N_TO_ONE_TARGET}x_alone":
                        bool(r50) and len(r50) == len(rows) and max(r50) <= N_TO_ONE_TARGET}}


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
            oc, ou = row.get("ratio_ours_colo") or {}, row.get("ratio_ours_colo_unix") or {}
            log(f"  {'':8} ours/null p50 {fmt(on['p50'])} mean {fmt(on['mean'])} -> target <=1.10 "
                f"{verdict(row['target_ours_null_le_1_10'], 'met', 'MISSED')};  ours/colo p50 "
                f"{fmt(oc.get('p50'))} mean {fmt(oc.get('mean'))};  ours/colo-unix p50 {fmt(ou.get('p50'))} "
                f"mean {fmt(ou.get('mean'))};  delayed/ours p50 {fmt(dn['p50'])} "
                f"mean {fmt(dn['mean'])} -> "
                f"{verdict(row['target_delayed_eq_ours_within_10pct'], '~equal', 'DIFFERENT')}")
    f = doc.get("failover")
    if f:
        fmt0 = lambda x: "n/a" if x is None else f"{x:.0f}"
        log(f"failover ({f['guest_mem_mib']} MiB guest): median failover_ms {fmt0(f['median_failover_ms'])}, "
            f"outside {fmt0(f['median_outside_ms'])} ms, runs ok {f['runs_ok']}/{len(f['runs'])}")
    fs = doc.get("failover_size")
    if fs:
        fmt0 = lambda x: "n/a" if x is None else f"{x:.0f}"
        log("failover against guest size (failover_ms = the backup's decision -> running; outside = command "
            "issued -> query-status running), median [min-max]:")
        log(f"  {'MiB':>5} {'restore':7} {'store':8} {'failover_ms':>18} {'outside_ms':>18} {'stream MiB':>10} "
            f"{'resident':>9} {'mode':9} {'ok':>5}")
        rng = lambda d: f"{fmt0(d['median'])} [{fmt0(d['min'])}-{fmt0(d['max'])}]"
        for row in fs["summary"]:
            fr = row["resident_fraction_of_data"]["median"]
            sb = row["stream_bytes"]["median"]
            log(f"  {row['mem_mib']:>5} {row['restore']:7} {row['residency']:8} {rng(row['failover_ms']):>18} "
                f"{rng(row['outside_ms']):>18} {'n/a' if sb is None else f'{mib(sb):.1f}':>10} "
                f"{'n/a' if fr is None else f'{100 * fr:.0f}%':>9} {','.join(row['restored_modes']):9} "
                f"{row['restored_guests_ok']}/{row['runs']}")
        for r in fs["ratios"]:
            x = r["map_over_stream_failover_ms"]
            log(f"  map/stream {r['mem_mib']} MiB {r['residency']}: failover_ms "
                f"{'n/a' if x is None else f'{x:.2f}'} (per round {r['map_over_stream_failover_ms_per_round']})")
        for k, v in fs["targets"].items():
            log(f"  target {k}: {'met' if v else 'MISSED'}")
    n = doc.get("n_to_one")
    if n:
        fmt = lambda x, f=".2f": "n/a" if x is None else format(x, f)
        r1 = lambda d: {k: None if v is None else round(v, 1) for k, v in d.items()}
        log(f"n-to-one: {n['guests']} guests on one backup, pause (ms, QMP STOP->RESUME) alone vs shared; "
            f"all {n['guests']} guests ran in both conditions:")
        log(f"  {'domain':6} {'alone p50':>9} {'p99':>7} {'shared p50':>10} {'p99':>7} {'ratio p50':>9} {'p99':>6} "
            f"{'pages/ep':>8} {'ack ms a/s':>11} {'waits':>5} {'n':>7}")
        for r in n["summary"]:
            a, s, x = r["alone"], r["shared"], r["ratio_shared_alone"]
            log(f"  {r['domain']:6} {fmt(a['pause_ms'].get('p50')):>9} {fmt(a['pause_ms'].get('p99')):>7} "
                f"{fmt(s['pause_ms'].get('p50')):>10} {fmt(s['pause_ms'].get('p99')):>7} {fmt(x['p50']):>9} "
                f"{fmt(x['p99']):>6} {str(s['pages_per_epoch_p50']):>8} "
                f"{fmt(a['ack_ms_mean'], '.0f') + '/' + fmt(s['ack_ms_mean'], '.0f'):>11} {s['backpressure_waits']:>5} "
                f"{a['pause_ms'].get('n', 0):>3}/{s['pause_ms'].get('n', 0):<3}")
        for cond, b in n["backup"].items():
            log(f"  backup {cond:6}: {fmt(mib(b['bytes_per_s_median']), '.1f')} MiB/s received and committed, "
                f"{fmt(b['commits_per_s_median'], '.1f')} commits/s, apply {fmt(b['apply_ms_mean_median'], '.1f')} ms "
                f"per commit; cpu% (of one core, median) {r1(b['cpu_percent_median'])}; "
                f"run-queue wait% {r1(b['runqueue_wait_percent_median'])}")
        w = n["worst"]
        log(f"  median ratio p50 {fmt(n['median_ratio_p50'])}, worst {w['domain']} p50 {fmt(w['p50'])} "
            f"p99 {fmt(w['p99'])}")
        for k, v in n["targets"].items():
            log(f"  target {k}: {'met' if v else 'MISSED'}")
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
                    help="which of ours,null,colo,colo-unix,delayed to run (default all five; colo is a "
                         "stock QEMU COLO secondary over TCP, colo-unix the same over a unix socket, "
                         "bench/stock_colo.py); diagnostics: null-touch,null-retain,ours-etcd")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval, ms")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per run (default 10; quick 4)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds after protection before measuring "
                    "(default 2; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the receivers (default 3; quick 1)")
    ap.add_argument("--mem", type=int, default=512, help="guest memory for the pause bench, MiB")
    ap.add_argument("--wss", type=int, default=200, help="dirtier working set, MiB")
    ap.add_argument("--ack-delay", type=int, default=50, help="--ack-delay-ms of the 'delayed' backup")
    ap.add_argument("--failover-repeats", type=int, default=None, help="default 5; quick 1")
    ap.add_argument("--failover-mem", type=int, default=256)
    ap.add_argument("--failover-wss", type=int, default=64)
    ap.add_argument("--failover-dirty", type=int, default=10000)
    ap.add_argument("--failover-protected-s", type=float, default=None, help="default 5; quick 3")
    ap.add_argument("--failover-sizes", nargs="?", const="256,1024,4096,8192", default=None,
                    help="run the failover-size part (off unless asked for, or with --only failover-size): "
                         "guest sizes in MiB, comma separated (default 256,1024,4096,8192)")
    ap.add_argument("--failover-size-modes", default="map,stream", help="the backup's --restore modes to compare")
    ap.add_argument("--failover-size-residency", default="resident,evicted",
                    help="the store's page-cache state at the failover: resident (as the backup left it), "
                         "evicted (its block files dropped from the page cache first); both protect with "
                         "--residency paged where remusctl has that option; hot: protect --residency hot "
                         "(the store locked in memory)")
    ap.add_argument("--failover-size-rounds", type=int, default=None, help="default --rounds (3; quick 1)")
    ap.add_argument("--failover-size-stream-rounds", type=int, default=None,
                    help="restore=stream only in this many rounds at sizes >= --failover-size-stream-from "
                         "(when streaming a big guest takes too long); default: every round")
    ap.add_argument("--failover-size-stream-from", type=int, default=8192)
    ap.add_argument("--failover-size-wss", type=int, default=128, help="dirtier working set, MiB")
    ap.add_argument("--failover-size-dirty", type=int, default=10000, help="dirty rate, pages/s")
    ap.add_argument("--failover-size-protected-s", type=float, default=None, help="default 4; quick 3")
    ap.add_argument("--remusd-nice", type=int, default=None,
                    help="start both remusd at this nice value (e.g. -10; the QEMUs stay at 0)")
    ap.add_argument("--n-to-one-guests", type=int, default=8, help="n-to-one: guests protected to one backup")
    ap.add_argument("--n-to-one-mem", type=int, default=256, help="n-to-one: guest memory, MiB (256 at least: "
                    "the counter page at GPA 64 MiB)")
    ap.add_argument("--n-to-one-dirty", type=int, default=2000, help="n-to-one: dirty rate, pages/s")
    ap.add_argument("--n-to-one-wss", type=int, default=16, help="n-to-one: dirtier working set, MiB")
    ap.add_argument("--n-to-one-interval", type=int, default=200, help="n-to-one: checkpoint interval, ms")
    ap.add_argument("--n-to-one-seconds", type=float, default=None, help="n-to-one: measured seconds per window "
                    "(default 30; quick 5)")
    ap.add_argument("--n-to-one-rounds", type=int, default=None, help="n-to-one: rounds of alone/shared "
                    "(default --rounds if given, else 2; quick 1)")
    ap.add_argument("--evict-steps", default="fadvise,pageout",
                    help=f"how 'evicted' evicts, in order, measuring after each ({','.join(EVICT_STEPS_ALL)}; "
                         "dropcaches is machine-wide)")
    ap.add_argument("--apply-sizes", default=None, help="store sizes, MiB (default 256,1024; quick 256)")
    ap.add_argument("--apply-large", default=None, help="large store sizes, MiB, run with fewer reps "
                    "(default 4096; quick none; 0 for none)")
    ap.add_argument("--apply-reps", type=int, default=None, help="default 10; quick 3")
    ap.add_argument("--apply-dir", default=None, help="where bench_apply puts its stores (default /var/tmp)")
    ap.add_argument("--skip-pause", action="store_true")
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--only", choices=["pause", "failover", "failover-size", "apply", "n-to-one"], default=None,
                    help="run this part alone")
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
    if args.n_to_one_rounds is None:
        args.n_to_one_rounds = args.rounds if args.rounds is not None else (1 if q else 2)
    args.n_to_one_seconds = args.n_to_one_seconds if args.n_to_one_seconds is not None else (5.0 if q else 30.0)
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
    if args.only:
        args.skip_pause = args.only != "pause"
        args.skip_failover = args.only != "failover"
        args.skip_apply = args.only != "apply"
        if args.only == "failover-size" and args.failover_sizes is None:
            args.failover_sizes = "256,1024,4096,8192"
        elif args.only != "failover-size":
            args.failover_sizes = None
    if args.failover_sizes is not None:
        try:
            args.failover_sizes = [int(x) for x in args.failover_sizes.split(",") if x]
        except ValueError:
            ap.error("--failover-sizes: MiB,MiB,...")
        args.failover_size_modes = [x for x in args.failover_size_modes.split(",") if x]
        args.failover_size_residency = [x for x in args.failover_size_residency.split(",") if x]
        args.evict_steps = [x for x in args.evict_steps.split(",") if x]
        if not args.failover_size_modes or any(x not in ("map", "stream") for x in args.failover_size_modes):
            ap.error("--failover-size-modes: map,stream")
        if (not args.failover_size_residency
                or any(x not in ("resident", "evicted", "hot") for x in args.failover_size_residency)):
            ap.error("--failover-size-residency: resident,evicted,hot")
        if any(x not in EVICT_STEPS_ALL for x in args.evict_steps):
            ap.error(f"--evict-steps: choose from {','.join(EVICT_STEPS_ALL)}")
        if args.failover_size_rounds is None:
            args.failover_size_rounds = args.rounds
        if args.failover_size_protected_s is None:
            args.failover_size_protected_s = 3.0 if q else 4.0

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
        if args.failover_sizes:
            log(f"failover-size: sizes {args.failover_sizes} MiB, {args.failover_size_rounds} round(s) x "
                f"restore {'/'.join(args.failover_size_modes)} x store {'/'.join(args.failover_size_residency)}, "
                f"wss {args.failover_size_wss} MiB, eviction {'+'.join(args.evict_steps)}")
            doc["failover_size"] = bench_failover_size(env, args)
        if args.only == "n-to-one":
            log(f"n-to-one: {args.n_to_one_guests} guests x {args.n_to_one_mem} MiB (dirty "
                f"{args.n_to_one_dirty}/s, wss {args.n_to_one_wss} MiB), interval {args.n_to_one_interval} ms, "
                f"{args.n_to_one_rounds} round(s) of alone/shared, {args.n_to_one_seconds:g} s windows; "
                f"all guests run throughout, so the CPU the guests take is the same in both conditions")
            doc["n_to_one"] = bench_n_to_one(env, args)
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
    for part in ("failover_size", "n_to_one"):
        if doc.get(part):
            targets.update(doc[part]["targets"])
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
