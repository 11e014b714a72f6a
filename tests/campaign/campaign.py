#!/usr/bin/python3
"""Jepsen-style randomized fault campaign for remus arbitration.

    campaign.py --runs N --seed S [--results FILE]      (as root)
    campaign.py --seed S --only-run I                   (replay one run)
    campaign.py --summary [--markdown] [--results FILE]

Builds the arbiter world once (tests/e2e/arbiter_world.py: namespaces A, B, C,
E1-E3, a real 3-member etcd) plus a guest LAN (see README.md), then per run:
protects a small guest A -> B with --arbiter etcd, injects 1-3 random faults at
random protocol phases, heals, waits for the outcome to settle and checks the
three oracles (one running copy at a time; the guest's own checkers and
nothing acked lost; a client that never sees a fork or a regression). One JSON
line per run is appended to the results file. See README.md.
"""

import argparse
import bisect
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import conftest  # noqa: E402
from conftest import (QEMU, INITRD, BUILD, Guest, QmpEventLog, World, qmp_connect, read_store_counter,  # noqa: E402
                      read_text, pid_cmdline)
from arbiter_world import ArbiterNet, EtcdCluster, ETCD_MEMBERS, etcd_missing, pause, resume  # noqa: E402

RESULTS = HERE / "results" / "runs.jsonl"
REGRESSIONS = HERE / "regressions.json"
DOMAIN = conftest.DOMAIN

# The guest: vmlinux (PVH, boots about twice as fast as vmlinuz) with the
# counter at 0x8000000, which needs -m >= 160 (tests/guest/README.md).
KERNEL = Path(os.environ.get("REMUS_CAMPAIGN_KERNEL", BUILD / "guest" / "vmlinux"))
GPA = 0x8000000
MEM_MB, WSS_MIB, DIRTY = 160, 8, 3000
TAP, PORT, MAC = "rtap0", 7000, "52:54:00:82:00:02"

TTL_MS, MARGIN_MS, HB_TIMEOUT_MS, INTERVAL_MS = 2000, 700, 500, 100
B_TMPFS = "600m"
SAMPLE_S = 0.005

KINDS = ("qemu_kill_A", "remusd_kill_A", "remusd_kill_B", "part_A_B", "part_A_etcd", "part_B_etcd",
         "isolate_A", "pause_remusd_A", "diskfull_B")
# A run puts the link proxy in front of B (and may then corrupt a frame) with
# this probability, drawn from its own stream so that runs without it replay
# exactly as before it existed.
PROXY_P = 0.2
FIRST_PHASES = ("sync", "steady", "steady", "checkpoint")
LATER_PHASES = ("failover", "fenced", "steady")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(argv, check=True):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {r.stderr.strip()}")
    return r


PF_EXITING = 0x4
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def proc_state(pid):
    """The kernel's one-letter process state, None if the process is gone (or
    a zombie), "K" if it is dying: a SIGKILL pending (SigPnd/ShdPnd) or its
    main thread exiting (PF_EXITING).  A dying process runs no user code any
    more; a stopped (T) process that is SIGKILLed shows "R" for a moment while
    it exits, which is not the guest running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        s, flags = fields[0], int(fields[6])
    except (OSError, IndexError, ValueError):
        return None
    if s in "ZX":
        return None
    if s in "Tt":
        return s
    if flags & PF_EXITING:
        return "K"
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
                    return "K"
    except (OSError, ValueError):
        return None
    return s


# ------------------------------------------------------------------ world

class CampaignWorld:
    """The arbiter world, built once, plus the guest LAN:

    switch namespace: br0 (hosts, 10.81.X.0/24, from ArbiterNet) and gbr (the
    guest LAN, 10.82.X.0/24, a hub: ageing_time 0, so frames reach whichever
    copy runs without waiting for MAC learning).  A and B each have a bridge
    gbr holding the tap `rtap0` (A's guest; the QEMU B restores opens B's
    rtap0) and a veth into the switch's gbr; C has a second interface `geth`
    on it with 10.82.X.3.  The guest is 10.82.X.2.  Partitions are rules on
    host addresses in INPUT chains, which bridged guest frames never cross:
    a partition cuts the hosts' links (replication, heartbeats, etcd), never
    the client from a copy, so the client oracle sees any output a cut-off
    copy releases."""

    def __init__(self, base_dir):
        self.base = Path(base_dir)
        self.net = ArbiterNet()
        x = self.net.subnet.split(".")[-1]
        self.guest_ip, self.client_ip = f"10.82.{x}.2", f"10.82.{x}.3"

    def start(self):
        # br_netfilter before the switch is built (ArbiterNet turns it off there);
        # A's nfqueue netbuf needs it in A.
        if not os.path.exists("/proc/sys/net/bridge") and shutil.which("modprobe"):
            sh(["modprobe", "br_netfilter"], check=False)
        self.net.start()
        self._guest_lan()
        self.net.etcd = EtcdCluster(self.net, self.base / "etcd")
        self.net.etcd.start()
        self.net.etcd.wait_healthy()
        return self

    def _guest_lan(self):
        sw = self.net.switch
        br = ["type", "bridge", "stp_state", "0", "forward_delay", "0", "ageing_time", "0"]
        sh(["ip", "-n", sw, "link", "add", "gbr", *br])
        sh(["ip", "-n", sw, "link", "set", "gbr", "up"])
        for h in ("A", "B"):
            ns = self.net.ns(h)
            sh(["ip", "-n", ns, "link", "add", "gbr", *br])
            sh(["ip", "-n", ns, "link", "set", "gbr", "up"])
            sh(["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"])
            sh(["ip", "-n", ns, "link", "set", TAP, "master", "gbr", "up"])
            sh(["ip", "-n", sw, "link", "add", f"g{h.lower()}", "type", "veth", "peer", "name", "gv", "netns", ns])
            sh(["ip", "-n", sw, "link", "set", f"g{h.lower()}", "master", "gbr", "up"])
            sh(["ip", "-n", ns, "link", "set", "gv", "master", "gbr", "up"])
        c = self.net.ns("C")
        sh(["ip", "-n", sw, "link", "add", "gc", "type", "veth", "peer", "name", "geth", "netns", c])
        sh(["ip", "-n", sw, "link", "set", "gc", "master", "gbr", "up"])
        sh(["ip", "-n", c, "addr", "add", f"{self.client_ip}/24", "dev", "geth"])
        sh(["ip", "-n", c, "link", "set", "geth", "up"])

    def reset_hosts(self):
        """Between runs: partitions healed, leftover netbuf rules flushed,
        every process in A, B and C killed."""
        self.net.heal()
        for h in ("A", "B", "C"):
            ns = self.net.ns(h)
            r = sh(["ip", "netns", "pids", ns], check=False)
            for p in r.stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(p), signal.SIGKILL)
            if h != "C":
                for ipt in ("iptables", "ip6tables"):
                    sh(["ip", "netns", "exec", ns, ipt, "-w", "-t", "mangle", "-F"], check=False)
                    sh(["ip", "netns", "exec", ns, ipt, "-w", "-t", "mangle", "-X"], check=False)

    def ensure_etcd(self):
        etcd = self.net.etcd
        for m in ETCD_MEMBERS:
            if not etcd.alive(m):
                etcd.restart(m)
        etcd.wait_healthy(timeout=30)

    def close(self):
        self.net.close()


# ---------------------------------------------------------------- sampler

class Sampler(threading.Thread):
    """Samples the process state of every QEMU of a run every SAMPLE_S:
    A's guest (tracked from the start) and every QEMU B restores (its pid from
    B's run/qemu.pid, and a /proc scan for any QEMU with the run's directory
    on its command line as a backstop)."""

    def __init__(self, world, pidfiles):
        super().__init__(daemon=True)
        self.world, self.pidfiles = world, pidfiles
        self.pids = {}          # pid -> label
        self.samples = []       # (wall time, {pid: state or None})
        self.transitions = []   # (wall time, pid, new state)
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.max_gap = 0.0

    def track(self, pid, label):
        with self.lock:
            if pid not in self.pids:
                self.pids[pid] = label

    def _scan(self):
        frag = str(self.world.dir).encode()
        for pid_s in os.listdir("/proc"):
            if pid_s.isdigit() and int(pid_s) not in self.pids:
                argv = pid_cmdline(int(pid_s))
                if argv and b"qemu" in argv[0] and any(frag in a for a in argv):
                    bdir = (str(self.world.dir) + "/B/").encode()
                    self.track(int(pid_s), "B" if any(bdir in a for a in argv) else f"qemu-{pid_s}")

    def run(self):
        last_scan = 0.0
        last_t = None
        while not self.stop_ev.is_set():
            t = time.time()
            for pf in self.pidfiles:
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pf.read_text().strip())
                    if pid > 0 and pid not in self.pids:
                        self.track(pid, "B")
            if t - last_scan > 0.25:
                with contextlib.suppress(OSError):
                    self._scan()
                last_scan = t
            with self.lock:
                pids = list(self.pids)
            st = {p: proc_state(p) for p in pids}
            prev = self.samples[-1][1] if self.samples else {}
            for p, v in st.items():
                if prev.get(p, "new") != v:
                    self.transitions.append((t, p, v))
            self.samples.append((t, st))
            if last_t is not None:
                self.max_gap = max(self.max_gap, t - last_t)
            last_t = t
            time.sleep(SAMPLE_S)

    def stop(self):
        self.stop_ev.set()
        self.join(timeout=5)

    def latest(self, pid):
        return self.samples[-1][1].get(pid) if self.samples else None


TRACE = re.compile(r"(\d+)@(\d+\.\d+):vm_state_notify running (\d)")


class VmTimeline:
    """Per QEMU pid, its vCPUs' run state over time: QEMU's own trace of
    vm_state_notify (stamped by QEMU with gettimeofday, -msg timestamp=on) and,
    for A's guest, its QMP STOP/RESUME events (QEMU's timestamps too).  A QEMU
    with no record at all counts as running (conservative)."""

    def __init__(self):
        self.tr = {}   # pid -> sorted [(t, running)]

    def add(self, pid, t, running):
        self.tr.setdefault(pid, []).append((t, bool(running)))

    def add_trace_file(self, path):
        for m in TRACE.finditer(read_text(path)):
            self.add(int(m.group(1)), float(m.group(2)), m.group(3) == "1")

    def finish(self):
        for v in self.tr.values():
            v.sort()
        self.times = {p: [t for t, _ in v] for p, v in self.tr.items()}

    def running(self, pid, t):
        v = self.tr.get(pid)
        if not v:
            return True
        i = bisect.bisect_right(self.times[pid], t)
        return v[i - 1][1] if i else False

    def first_running(self, pid):
        for t, r in self.tr.get(pid, []):
            if r:
                return t
        return None


# -------------------------------------------------------------------- run

class Run:
    def __init__(self, cw, seed, index, opts):
        self.cw, self.net, self.seed, self.index, self.opts = cw, cw.net, seed, index, opts
        self.rng = random.Random(f"{seed}-{index}")
        self.link_rng = random.Random(f"{seed}-{index}-link")
        self.use_proxy = self.link_rng.random() < PROXY_P
        if getattr(opts, "proxy", None) is not None:
            self.use_proxy = opts.proxy
        self.proxy = None
        self.corrupt_used = False
        self.ttl, self.margin = opts.ttl_ms, opts.margin_ms
        self.faults = []
        self.violations = []
        self.warnings = []
        self.notes = {}
        self.fill_file = None
        self.paused_until = None
        self.restart_a = self.restart_b = False
        self.a_killed = self.b_killed = self.qemu_killed = False

    # ------------------------------------------------------------ setup
    def start_guest(self):
        w = self.world
        gdir = w.dir / "g"
        gdir.mkdir()
        serial, q, t, e = gdir / "serial.log", gdir / "q.sock", gdir / "t.sock", gdir / "e.sock"
        append = (f"console=ttyS0 memmap=64K${GPA:#x} remus.counter={GPA:#x} remus.dirty={DIRTY} "
                  f"remus.wss={WSS_MIB} remus.check=1 quiet remus.ip={self.cw.guest_ip}/24 remus.tcp={PORT}")
        argv = [str(QEMU), "-machine", "pc", "-accel", "tcg", "-m", str(MEM_MB), "-nodefaults", "-nographic",
                "-vga", "none", "-serial", f"file:{serial}", "-kernel", str(KERNEL), "-initrd", str(INITRD),
                "-append", append,
                "-qmp", f"unix:{q},server=on,wait=off", "-qmp", f"unix:{t},server=on,wait=off",
                "-qmp", f"unix:{e},server=on,wait=off",
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=",
                # QEMU stamps every run-state change into its log (the restored
                # QEMU inherits both options: B's run/qemu.log).
                "-msg", "timestamp=on", "-trace", "vm_state_notify"]
        p = w._spawn("qemu g", argv, gdir / "qemu.log", netns=self.net.ns("A"))
        w.logs.append(("serial g", serial))
        g = Guest(w, "g", gdir, p, serial, q, t)
        g.event_qmp_sock = e
        g.boot_marker = "remus-guest: check ok"
        g.qemu_log = gdir / "qemu.log"
        return g

    def start_a(self):
        return self.world.start_remusd("A", netns=self.net.ns("A"), etcd=self.etcd_eps(), lease_ttl_ms=self.ttl,
                                       lease_margin_ms=self.margin, host_id="A", hb_timeout_ms=HB_TIMEOUT_MS)

    def start_b(self):
        # The guest's -trace vm_state_notify is the campaign's run-state
        # oracle on B's restored copy too; B's peer policy refuses -trace
        # unless told (docs/operator-guide.md section 15).
        return self.world.start_remusd("B", listen=True, netns=self.net.ns("B"), listen_host=self.net.ip("B"),
                                       etcd=self.etcd_eps(), lease_ttl_ms=self.ttl, lease_margin_ms=self.margin,
                                       host_id="B", hb_timeout_ms=HB_TIMEOUT_MS,
                                       extra=["--allow-qemu-option", "trace"])

    def etcd_eps(self):
        # --arbiter none (an oracle self-check only): no etcd at all.
        return None if getattr(self.opts, "arbiter", "etcd") == "none" else self.eps

    def status(self, d, timeout=2.0):
        """A daemon's status of the domain; None when it has none; "dead" when it does not answer."""
        try:
            r = d.call({"command": "status", "domain": DOMAIN}, timeout=timeout)
        except (OSError, ValueError, ConnectionError):
            return "dead"
        if not r.get("ok"):
            return None
        ds = r["result"]["domains"]
        return ds[0] if ds else None

    def start_proxy(self):
        """tests/campaign/linkproxy.py in B's namespace, in front of B's listen port."""
        out = self.world.dir / "linkproxy.log"
        f = open(out, "wb")
        self.proxy = self.net.popen("B", [sys.executable, str(HERE / "linkproxy.py"), self.net.ip("B"), self.b.listen],
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        f.close()
        self.world.procs.append(("linkproxy", self.proxy))
        self.proxy_log = out
        m = self.world.wait_for(lambda: re.search(r"listening (\S+)", read_text(out)), 15, "the link proxy")
        return m.group(1)

    def counter(self):
        out = self.guest.qmp.hmp(f"xp /1xg {GPA:#x}")
        return int(re.search(r":\s*0x([0-9a-fA-F]+)", out).group(1), 16)

    def start_client(self):
        out = self.world.dir / "client.jsonl"
        f = open(out, "wb")
        p = self.net.popen("C", [sys.executable, str(HERE / "seqclient.py"), self.cw.guest_ip, str(PORT)],
                           stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        f.close()
        self.world.procs.append(("client", p))
        self.client_out = out
        return p

    def client_events(self):
        out = []
        for line in read_text(self.client_out).splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # ------------------------------------------------------------ faults
    def t_rel(self):
        return round(time.time() - self.t0, 3)

    def observe_phase(self, intended):
        bst = self.status(self.b, 1.0) if not self.b_killed else "dead"
        if isinstance(bst, dict) and bst.get("state") == "promoting":
            return "failover"
        if not self.qemu_killed and self.sampler.latest(self.guest.pid) == "T":
            return "fenced"
        if isinstance(bst, dict) and bst.get("state") == "failed-over":
            return "promoted"
        ast = self.status(self.a, 1.0) if not self.a_killed and self.paused_until is None else "dead"
        if isinstance(ast, dict) and ast.get("state") == "syncing":
            return "sync"
        # Aimed at a phase that did not come (or is over): it hit steady state.
        if intended in ("sync", "failover", "fenced"):
            return "steady"
        return intended

    def wait_phase(self, phase):
        """Waits (bounded) for the protocol phase a later fault is aimed at."""
        rng = self.rng
        if phase == "steady":
            time.sleep(rng.uniform(0.2, 2.0))
        elif phase == "checkpoint":
            e0 = None
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                st = self.status(self.a, 1.0)
                if not isinstance(st, dict):
                    break
                if e0 is None:
                    e0 = st["last_staged_epoch"]
                elif st["last_staged_epoch"] != e0:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, INTERVAL_MS / 1000))
        elif phase == "failover":
            deadline = time.monotonic() + 2 * self.ttl / 1000 + 3
            while time.monotonic() < deadline and not self.b_killed:
                st = self.status(self.b, 1.0)
                if isinstance(st, dict) and st.get("state") in ("promoting", "failed-over"):
                    break
                time.sleep(0.01)
        elif phase == "fenced":
            deadline = time.monotonic() + self.ttl / 1000 + 3
            while time.monotonic() < deadline and not self.qemu_killed:
                if self.sampler.latest(self.guest.pid) in ("T", None):
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.5))

    def pick_kind(self):
        kinds = [k for k in KINDS
                 if not (k == "qemu_kill_A" and self.qemu_killed)
                 and not (k in ("remusd_kill_A", "pause_remusd_A") and (self.a_killed or self.paused_until))
                 and not (k == "remusd_kill_B" and self.b_killed)
                 and not (k == "diskfull_B" and self.fill_file)]
        return self.rng.choice(kinds)

    def inject(self, kind, intended):
        rng, net = self.rng, self.net
        phase = self.observe_phase(intended)
        f = {"kind": kind, "phase": phase, "intended_phase": intended, "t": self.t_rel()}
        others = [h for h in net.hosts if h != "A"]
        if kind == "qemu_kill_A":
            os.kill(self.guest.pid, signal.SIGKILL)
            self.qemu_killed = True
        elif kind == "remusd_kill_A":
            os.kill(self.a.pid, signal.SIGKILL)
            self.a_killed = True
            self.restart_a = f["restart"] = rng.random() < 0.5
        elif kind == "remusd_kill_B":
            os.kill(self.b.pid, signal.SIGKILL)
            self.b_killed = True
            self.restart_b = f["restart"] = rng.random() < 0.7
        elif kind in ("part_A_B", "part_A_etcd", "part_B_etcd", "isolate_A"):
            way = rng.choice(("both", "both", "out", "in"))
            f["way"] = way
            side1 = {"part_A_B": ["A"], "part_A_etcd": ["A"], "part_B_etcd": ["B"], "isolate_A": ["A"]}[kind]
            side2 = {"part_A_B": ["B"], "part_A_etcd": list(ETCD_MEMBERS), "part_B_etcd": list(ETCD_MEMBERS),
                     "isolate_A": others}[kind]
            if way == "both":
                net.partition_groups(side1, side2)
            elif way == "out":
                net.partition_groups(side1, side2, one_way=True)
            else:
                net.partition_groups(side2, side1, one_way=True)
        elif kind == "pause_remusd_A":
            d = rng.uniform(0.5, 3.0) * self.ttl / 1000
            pause(self.a.pid)
            self.paused_until = time.monotonic() + d
            f["duration_s"] = round(d, 3)
            # SIGCONT on time whatever the main thread is waiting for.
            self.pause_timer = threading.Timer(d, self._unpause, args=(self.a.pid, f))
            self.pause_timer.start()
        elif kind == "corrupt_link":
            os.kill(self.proxy.pid, signal.SIGUSR1)
            self.corrupt_used = True
        elif kind == "diskfull_B":
            self.fill_file = self.b_state / "fill.bin"
            st = os.statvfs(self.b_state)
            free = st.f_bavail * st.f_frsize
            with open(self.fill_file, "wb") as fh:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fh.fileno(), 0, max(4096, free))
            st = os.statvfs(self.b_state)
            f["free_after"] = st.f_bavail * st.f_frsize
        f["t_done"] = self.t_rel()
        self.faults.append(f)
        log(f"  run {self.index}: fault {f}")

    def _unpause(self, pid, f):
        with contextlib.suppress(Exception):
            resume(pid)
        f["resumed_at"] = self.t_rel()
        self.paused_until = None

    def maybe_unpause(self):
        if self.paused_until is not None and time.monotonic() >= self.paused_until + 1:
            self.pause_timer.join(timeout=10)

    def heal(self):
        while self.paused_until is not None:
            self.maybe_unpause()
            time.sleep(0.01)
        self.net.heal()
        if self.fill_file:
            with contextlib.suppress(OSError):
                self.fill_file.unlink()
        w = self.world
        if self.b_killed and self.restart_b:
            w.daemons.remove(self.b)
            self.b = self.start_b()
            self.b_killed = False
        if self.a_killed and self.restart_a:
            w.daemons.remove(self.a)
            self.a = self.start_a()
            self.a_killed = False
        self.t_heal = self.t_rel()

    # ------------------------------------------------------------ flow
    def execute(self):
        rng, opts = self.rng, self.opts
        base = Path(opts.work_dir)
        self.world = w = World(None)
        self.eps = self.net.etcd.endpoints()
        self.b_state = w.dir / "B"
        self.b_state.mkdir()
        sh(["mount", "-t", "tmpfs", "-o", f"size={B_TMPFS}", "tmpfs", self.b_state])
        self.t0 = time.time()
        self.guest = self.start_guest()
        self.b = self.start_b()
        self.a = self.start_a()
        self.sampler = Sampler(w, [self.b_state / "domains" / DOMAIN / "run" / "qemu.pid"])
        self.sampler.track(self.guest.pid, "A")
        self.sampler.start()
        w.wait_booted(self.guest)
        self.events = QmpEventLog(w, self.guest.event_qmp_sock)
        self.start_client()
        backup_addr = None
        if self.use_proxy:
            backup_addr = self.start_proxy()
        n_faults = rng.choice((1, 1, 2, 2, 3))
        first_phase = rng.choice(FIRST_PHASES)
        self.c0 = None
        self.notes["boot_s"] = self.t_rel()
        extra = ["--netbuf", getattr(self.opts, "netbuf", "nfqueue")]
        if first_phase == "sync":
            w.protect(self.a, self.b, self.guest, interval_ms=INTERVAL_MS, no_wait=True, extra=extra,
                      backup_addr=backup_addr)
            time.sleep(rng.uniform(0, 0.6))
        else:
            w.protect(self.a, self.b, self.guest, interval_ms=INTERVAL_MS, extra=extra, backup_addr=backup_addr)
            w.wait_status(self.a, lambda s: s["state"] == "protected" and s["last_acked_epoch"] >= 5, 60,
                          "protected with 5 acked epochs")
            # An acked reference (conftest.Protected.acked_reference): every
            # epoch staged after c0 was read covers c0; once one is acked,
            # a promotion must never go below c0.
            c0 = self.counter()
            e0 = self.a.status()["last_staged_epoch"]
            w.wait_status(self.a, lambda s: s["last_acked_epoch"] > e0, 20, f"an ack beyond epoch {e0}")
            self.c0 = c0
            # The client sees some answers before the faults start.
            w.wait_for(lambda: sum(e["ev"] == "resp" for e in self.client_events()) >= 5, 20,
                       "5 client answers")
            self.notes["protected_s"] = self.t_rel()
            self.wait_phase(first_phase)
        # With the proxy, a corrupted frame comes on top of the drawn faults,
        # before fault number `corrupt_at` (n_faults: after the last), from
        # its own random stream.
        corrupt_at = self.link_rng.randrange(n_faults + 1) if self.use_proxy else -1
        corrupt_delay = self.link_rng.uniform(0, 1.0)
        if corrupt_at == 0:
            self.inject("corrupt_link", first_phase)
            time.sleep(corrupt_delay)
        self.inject(self.pick_kind(), first_phase)
        for k in range(1, n_faults + 1):
            if k == corrupt_at:
                time.sleep(corrupt_delay)
                self.inject("corrupt_link", "steady")
            if k == n_faults:
                break
            phase = rng.choice(LATER_PHASES)
            self.wait_phase(phase)
            self.maybe_unpause()
            self.inject(self.pick_kind(), phase)
        hold = rng.uniform(0.5, 2.5) * self.ttl / 1000
        t_end = time.monotonic() + hold
        while time.monotonic() < t_end or self.paused_until is not None:
            self.maybe_unpause()
            time.sleep(0.01)
        self.heal()
        self.settle()

    def settle(self):
        """Waits until the outcome stops changing: at least TTL + 1.5 s after
        the heal, and 3 s with the same (A state, B state, running copies)."""
        t_heal = time.monotonic()
        deadline = t_heal + 25
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            a = self.status(self.a, 2.0) if not self.a_killed else "dead"
            b = self.status(self.b, 2.0) if not self.b_killed else "dead"
            sig = (a if not isinstance(a, dict) else (a.get("state"), a.get("arbiter", {}).get("state")),
                   b if not isinstance(b, dict) else b.get("state"),
                   tuple(sorted((p, "gone" if s in (None, "K") else "stopped" if s in "Tt" else "up")
                                for p, s in (self.sampler.samples[-1][1].items() if self.sampler.samples else []))))
            now = time.monotonic()
            if sig != last:
                last, since = sig, now
            elif now - since >= 3 and now - t_heal >= self.ttl / 1000 + 1.5:
                break
            time.sleep(0.25)
        self.final_a, self.final_b = last[0], last[1]
        # The client gets a last chance to hear from whichever copy runs.
        t = time.time()
        end = time.monotonic() + 6
        self.client_heard_at_end = False
        while time.monotonic() < end:
            if any(e["ev"] == "resp" and e["t_recv"] > t for e in self.client_events()):
                self.client_heard_at_end = True
                break
            time.sleep(0.2)
        self.t_settled = self.t_rel()

    # ------------------------------------------------------------ oracles
    def check(self):
        w = self.world
        self.sampler.stop()
        # The vCPU timelines.
        vt = VmTimeline()
        vt.add_trace_file(self.guest.qemu_log)
        run_dir = self.b_state / "domains" / DOMAIN / "run"
        vt.add_trace_file(run_dir / "qemu.log")
        with self.events._lock:
            evs = list(self.events.events)
        for t, name, _ in evs:
            if name in ("STOP", "RESUME"):
                vt.add(self.guest.pid, t, name == "RESUME")
        vt.finish()
        self.check_one_copy(vt)
        if self.proxy is not None:
            for f in self.faults:
                if f["kind"] == "corrupt_link":
                    m = re.search(r"corrupted (.*)", read_text(self.proxy_log))
                    f["corrupted"] = json.loads(m.group(1)) if m else None
        b_pids = [p for p, l in self.sampler.pids.items() if p != self.guest.pid]
        t_b_run = min([t for t in (vt.first_running(p) for p in b_pids) if t is not None], default=None)
        self.t_b_run = t_b_run
        bst = self.status(self.b, 3.0) if not self.b_killed else "dead"
        promoted = t_b_run is not None
        committed = None
        if isinstance(bst, dict) and bst.get("state") == "failed-over":
            self.notes["failover_ms"] = bst.get("promotion", {}).get("failover_ms")
            self.notes["token"] = bst.get("promotion", {}).get("token")
            with contextlib.suppress(Exception):
                committed = read_store_counter(bst["store"], gpa=GPA)
        elif promoted:
            # B's remusd is gone (killed): the committed store is still there.
            cur = self.b_state / "domains" / DOMAIN / "current"
            with contextlib.suppress(Exception):
                committed = read_store_counter(cur, gpa=GPA)
        self.notes["committed_counter"] = committed
        if promoted:
            self.notes["fault_to_running_s"] = round(t_b_run - (self.t0 + self.faults[0]["t"]), 3)
        self.check_guest(run_dir, promoted, committed)
        self.check_client(t_b_run, committed)
        # The outcome: which copy runs at the end.
        last_t, last_st = self.sampler.samples[-1]
        running = [p for p, s in last_st.items() if s and s not in "TtK" and vt.running(p, last_t)]
        if len(running) > 1:
            self.outcome = "both"
        elif not running:
            self.outcome = "none"
        else:
            self.outcome = "A" if running[0] == self.guest.pid else "B"
        if self.outcome == "none":
            self.warnings.append(f"no copy runs at the end (A: {self.final_a}, B: {self.final_b})")
        elif not self.client_heard_at_end:
            self.warnings.append(f"copy {self.outcome} runs at the end but the client heard nothing after the settle")

    def check_one_copy(self, vt):
        """Oracle 1: at every sample, at most one QEMU that exists, is not
        stopped (T) and whose vCPUs run."""
        overlaps, cur = [], None
        prev_t = None
        for t, st in self.sampler.samples:
            running = sorted(p for p, s in st.items() if s and s not in "TtK" and vt.running(p, t))
            if len(running) > 1:
                if cur is None:
                    cur = {"start": t, "end": t, "samples": 0, "pids": running,
                           "labels": [self.sampler.pids[p] for p in running], "first_states": dict(st),
                           "prev": prev_t and round(t - prev_t, 4)}
                cur["end"] = t
                cur["last_states"] = dict(st)
                cur["samples"] += 1
            elif cur is not None:
                cur["next_sample"] = t
                overlaps.append(cur)
                cur = None
            prev_t = t
        if cur is not None:
            overlaps.append(cur)
        with contextlib.suppress(OSError):
            with open(self.world.dir / "process-states.txt", "w") as f:
                for t, p, v in self.sampler.transitions:
                    f.write(f"{t - self.t0:.4f} {p} {self.sampler.pids.get(p)} {v}\n")
        self.notes["sampler_max_gap_ms"] = round(self.sampler.max_gap * 1000, 1)
        self.notes["samples"] = len(self.sampler.samples)
        for o in overlaps:
            dur = o["end"] - o["start"]
            desc = (f"two running copies ({', '.join(o['labels'])}, pids {o['pids']}) from t={o['start'] - self.t0:.3f}"
                    f" to t={o['end'] - self.t0:.3f} s ({dur * 1000:.0f} ms, {o['samples']} samples; "
                    f"process states first {o['first_states']}, last {o['last_states']}; previous sample "
                    f"{o['prev']} s before)")
            # Tolerance: one sample (the two states were read microseconds
            # apart, but a transition can fall between reads).
            if o["samples"] >= 2:
                self.violations.append({"oracle": "one-copy", "what": desc})
            else:
                self.warnings.append("tolerated single-sample overlap: " + desc)

    def check_guest(self, run_dir, promoted, committed):
        """Oracle 2: no CHECKER FAIL in any copy's serial log; when B promoted,
        its committed counter covers everything acked."""
        for name, path in (("A", self.guest.serial), ("B restored", run_dir / "serial.log")):
            text = read_text(path)
            if "CHECKER FAIL" in text:
                line = next(l for l in text.splitlines() if "CHECKER FAIL" in l)
                self.violations.append({"oracle": "guest-checker", "what": f"{name}: {line.strip()}"})
        if promoted:
            if committed is None:
                self.warnings.append("B promoted but its committed counter could not be read")
            elif self.c0 is not None and committed < self.c0:
                self.violations.append({"oracle": "guest-checker",
                                        "what": f"acked state lost: committed counter {committed} < {self.c0}, "
                                                f"covered by an acked checkpoint"})
            text = read_text(run_dir / "serial.log")
            if "remus-guest: check ok" not in text and self.outcome_hint_b():
                self.warnings.append("the restored guest printed no 'check ok' line")

    def outcome_hint_b(self):
        return self.sampler.samples and any(l == "B" for l in self.sampler.pids.values())

    def check_client(self, t_b_run, committed):
        """Oracle 3: per connection, answers i = seq = 1, 2, 3, ... with the
        right echo (no gap, no regression, no fork); over the whole run the
        counters the client saw never go down; nothing the client saw from A
        before B ran is beyond B's committed state."""
        ev = self.client_events()
        resp = [e for e in ev if e["ev"] == "resp"]
        self.notes["client_answers"] = len(resp)
        self.notes["client_conns"] = len({e["conn"] for e in ev if e["ev"] == "connected"})
        self.notes["client_errors"] = [e["what"] for e in ev if e["ev"] == "error"][:5]
        by_conn = {}
        for r in resp:
            by_conn.setdefault(r["conn"], []).append(r)
        for c, rs in by_conn.items():
            for k, r in enumerate(rs, 1):
                if r["i"] != k or r["seq"] != k or r["echo"] != f"ping {c}-{k}":
                    self.violations.append({"oracle": "client", "what":
                                            f"connection {c}: answer #{k} is seq={r['seq']} for request {r['i']} "
                                            f"echo {r['echo']!r} (a gap, a regression or a fork)"})
                    break
        rs = sorted(resp, key=lambda r: r["t_recv"])
        for a, b in zip(rs, rs[1:]):
            if b["counter"] < a["counter"]:
                self.violations.append({"oracle": "client", "what":
                                        f"counter regressed from {a['counter']} (conn {a['conn']} seq {a['seq']}, "
                                        f"t={a['t_recv'] - self.t0:.3f}) to {b['counter']} (conn {b['conn']} "
                                        f"seq {b['seq']}, t={b['t_recv'] - self.t0:.3f})"})
                break
        if t_b_run is not None and committed is not None:
            before = [r for r in resp if r["t_recv"] < t_b_run]
            if before:
                m = max(before, key=lambda r: r["counter"])
                if m["counter"] > committed:
                    self.violations.append({"oracle": "client", "what":
                                            f"the client saw counter {m['counter']} (t={m['t_recv'] - self.t0:.3f}) "
                                            f"before B ran, beyond B's committed {committed}: output the "
                                            f"surviving copy did not produce"})
            self.notes["client_max_before_b"] = max((r["counter"] for r in before), default=None)
            after = [r for r in resp if r["t_recv"] > t_b_run]
            self.notes["client_answers_from_b"] = len(after)

    # ------------------------------------------------------------ record
    def record(self, error=None):
        rec = {"seed": self.seed, "run": self.index,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": self.opts.commit, "remusd": self.build, "ttl_ms": self.ttl, "margin_ms": self.margin,
               "faults": self.faults, "outcome": getattr(self, "outcome", None),
               "violations": self.violations, "warnings": self.warnings,
               "failover_ms": self.notes.get("failover_ms"),
               "fault_to_running_s": self.notes.get("fault_to_running_s"),
               "duration_s": round(time.time() - self.t_start, 2), "notes": self.notes}
        if error:
            rec["error"] = error
        return rec

    def cleanup(self, keep):
        w = getattr(self, "world", None)
        if w is None:
            return
        with contextlib.suppress(Exception):
            self.sampler.stop()
        w.cleanup()
        self.cw.reset_hosts()
        run_dir = self.b_state / "domains" / DOMAIN / "run"
        if keep and run_dir.is_dir():
            shutil.copytree(run_dir, w.dir / "B-run", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        for _ in range(20):
            if sh(["umount", self.b_state], check=False).returncode == 0 or not os.path.ismount(self.b_state):
                break
            time.sleep(0.2)
        if keep:
            log(f"  run {self.index}: kept {w.dir}")
        else:
            shutil.rmtree(w.dir, ignore_errors=True)

    def go(self):
        self.t_start = time.time()
        self.build = remusd_build()
        error = None
        try:
            self.execute()
            self.check()
        except Exception as e:  # noqa: BLE001 - a harness error is recorded, not a violation
            error = f"{type(e).__name__}: {e}"[:4000]
            log(f"  run {self.index}: harness error: {traceback.format_exc()[-3000:]}")
        except BaseException:
            self.cleanup(keep=True)
            raise
        rec = self.record(error)
        self.cleanup(keep=self.opts.keep or (bool(self.violations or error) and not self.opts.no_keep))
        return rec


# ----------------------------------------------------------------- driver

def git_commit():
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def remusd_build():
    """Which remusd binary a run used: its mtime and size (the build dir can be
    refreshed under a long campaign)."""
    try:
        st = os.stat(conftest.REMUSD)
    except OSError:
        return None
    mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return f"{mtime} {st.st_size}"


def requirements_missing():
    why = conftest._missing_requirements()
    if why:
        return why
    if not KERNEL.is_file():
        return f"the test guest's vmlinux is not built ({KERNEL} missing; run scripts/build-guest.sh)"
    return etcd_missing()


def run_campaign(seed, indices, results=None, opts=None, on_record=None, overrides=None):
    """Runs the given run indices of a seed in one world; returns the records.
    Appends each record to `results` (a path) as soon as it is done."""
    opts = opts or default_opts()
    base = Path(opts.work_dir)
    base.mkdir(parents=True, exist_ok=True)
    cw = CampaignWorld(Path(os.path.join(base, f"world-{os.getpid()}")))
    records = []
    try:
        cw.start()
        for i in indices:
            cw.ensure_etcd()
            log(f"run {i} (seed {seed})")
            o = opts
            if overrides and i in overrides:
                o = argparse.Namespace(**{**vars(opts), **overrides[i]})
            rec = Run(cw, seed, i, o).go()
            records.append(rec)
            log(f"run {i}: outcome {rec['outcome']}, {len(rec['violations'])} violations, "
                f"{rec['duration_s']} s, notes {json.dumps(rec['notes'])}{', ERROR ' + rec['error'][:200] if rec.get('error') else ''}"
                + "".join(f"\n    VIOLATION {v}" for v in rec["violations"]))
            if results:
                Path(results).parent.mkdir(parents=True, exist_ok=True)
                with open(results, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if on_record:
                on_record(rec)
    finally:
        cw.close()
        shutil.rmtree(cw.base, ignore_errors=True)
    return records


def default_opts(**kw):
    ns = argparse.Namespace(ttl_ms=TTL_MS, margin_ms=MARGIN_MS, work_dir="/tmp/remus-campaign", no_keep=False, keep=False,
                            proxy=None,
                            commit=git_commit())
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


# ---------------------------------------------------------------- summary

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def summary(results, markdown=False):
    recs = []
    for line in Path(results).read_text().splitlines():
        with contextlib.suppress(ValueError):
            recs.append(json.loads(line))
    done = [r for r in recs if not r.get("error")]
    errors = [r for r in recs if r.get("error")]
    viol = [r for r in done if r["violations"]]
    phases = sorted({f["phase"] for r in done for f in r["faults"]})
    table = {}
    for r in done:
        for f in r["faults"]:
            table.setdefault(f["kind"], {}).setdefault(f["phase"], 0)
            table[f["kind"]][f["phase"]] += 1
    outcomes = {}
    for r in done:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    fo = [r["failover_ms"] for r in done if r.get("failover_ms") is not None]
    fr = [r["fault_to_running_s"] for r in done if r.get("fault_to_running_s") is not None]
    dur = [r["duration_s"] for r in done]
    seeds = sorted({str(r["seed"]) for r in recs})
    builds = {}
    for r in done:
        b = builds.setdefault(r.get("remusd") or "not recorded", [0, 0])
        b[0] += 1
        b[1] += bool(r["violations"])
    out = []
    if markdown:
        out.append(f"| runs | harness errors | violations (runs) | seeds | median run s |")
        out.append("|---|---|---|---|---|")
        out.append(f"| {len(done)} | {len(errors)} | {len(viol)} | {', '.join(seeds)} | {pct(dur, 0.5)} |")
        out.append("")
        out.append("| remusd build (mtime, size) | runs | runs with violations |")
        out.append("|---|---|---|")
        for b, (n, v) in sorted(builds.items()):
            out.append(f"| {b} | {n} | {v} |")
        out.append("")
        out.append("| fault \\ phase | " + " | ".join(phases) + " | total |")
        out.append("|---|" + "---|" * (len(phases) + 1))
        for k in sorted(table):
            row = [table[k].get(p, 0) for p in phases]
            out.append(f"| {k} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
        out.append("")
        out.append("| outcome | runs |")
        out.append("|---|---|")
        for k, v in sorted(outcomes.items(), key=lambda kv: str(kv[0])):
            out.append(f"| {k} | {v} |")
        out.append("")
        out.append("| failover time | n | p50 | p90 | p99 | max |")
        out.append("|---|---|---|---|---|---|")
        out.append(f"| detection -> running (ms) | {len(fo)} | {pct(fo, .5)} | {pct(fo, .9)} | {pct(fo, .99)} | "
                   f"{max(fo) if fo else None} |")
        out.append(f"| first fault -> running (s) | {len(fr)} | {pct(fr, .5)} | {pct(fr, .9)} | {pct(fr, .99)} | "
                   f"{max(fr) if fr else None} |")
        if viol:
            out.append("")
            out.append("| seed | run | faults | violation |")
            out.append("|---|---|---|---|")
            for r in viol:
                fs = ", ".join(f"{f['kind']}@{f['phase']}" for f in r["faults"])
                out.append(f"| {r['seed']} | {r['run']} | {fs} | {r['violations'][0]['what'][:160]} |")
    else:
        out.append(f"runs: {len(done)} (harness errors: {len(errors)}), seeds: {', '.join(seeds)}")
        out.append(f"runs with violations: {len(viol)}")
        for b, (n, v) in sorted(builds.items()):
            out.append(f"  remusd build {b}: {n} runs, {v} with violations")
        for r in viol:
            fs = ", ".join(f"{f['kind']}@{f['phase']}" for f in r["faults"])
            out.append(f"  seed {r['seed']} run {r['run']} [{fs}]: {r['violations'][0]['what'][:200]}")
        out.append("faults by kind x phase:")
        w = max([len(k) for k in table] + [10])
        out.append("  " + "".ljust(w) + "".join(p.rjust(10) for p in phases) + "     total")
        for k in sorted(table):
            row = [table[k].get(p, 0) for p in phases]
            out.append("  " + k.ljust(w) + "".join(str(x).rjust(10) for x in row) + str(sum(row)).rjust(10))
        out.append("outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=lambda kv: str(kv[0]))))
        out.append(f"failover detection->running ms: n={len(fo)} p50={pct(fo, .5)} p90={pct(fo, .9)} "
                   f"p99={pct(fo, .99)} max={max(fo) if fo else None}")
        out.append(f"first fault->running s: n={len(fr)} p50={pct(fr, .5)} p90={pct(fr, .9)} "
                   f"p99={pct(fr, .99)} max={max(fr) if fr else None}")
        out.append(f"run duration s: p50={pct(dur, .5)} max={max(dur) if dur else None}")
    return "\n".join(out)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    # SIGTERM (kill, nohup's end) tears the world down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--first-run", type=int, default=0, help="start at this run index")
    ap.add_argument("--only-run", type=int, help="replay this one run of the seed")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--no-results", action="store_true", help="do not append to the results file")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--ttl-ms", type=int, default=TTL_MS)
    ap.add_argument("--margin-ms", type=int, default=MARGIN_MS)
    ap.add_argument("--work-dir", default="/tmp/remus-campaign")
    ap.add_argument("--no-keep", action="store_true", help="delete the run directory even after a violation")
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    ap.add_argument("--proxy", choices=("on", "off"), help="force the link proxy (and its corrupted frame) on or off")
    ap.add_argument("--netbuf", default="nfqueue", choices=("nfqueue", "none"),
                    help="oracle self-check: 'none' releases output unbuffered (the client oracle must object)")
    ap.add_argument("--arbiter", default="etcd", choices=("etcd", "none"),
                    help="oracle self-check: 'none' is fail-stop (a partition must give two running copies)")
    a = ap.parse_args()
    if a.summary:
        print(summary(a.results, a.markdown))
        return 0
    why = requirements_missing()
    if why:
        print(f"campaign.py: {why}", file=sys.stderr)
        return 2
    opts = default_opts(ttl_ms=a.ttl_ms, margin_ms=a.margin_ms, work_dir=a.work_dir, no_keep=a.no_keep, keep=a.keep,
                        proxy=None if a.proxy is None else a.proxy == "on", netbuf=a.netbuf, arbiter=a.arbiter)
    idx = [a.only_run] if a.only_run is not None else range(a.first_run, a.first_run + a.runs)
    recs = run_campaign(a.seed, idx, None if a.no_results else a.results, opts)
    nv = sum(1 for r in recs if r["violations"])
    ne = sum(1 for r in recs if r.get("error"))
    print(f"{len(recs)} runs, {nv} with violations, {ne} harness errors")
    return 1 if nv else 0


if __name__ == "__main__":
    sys.exit(main())
