"""Fixtures and helpers for the remus end-to-end tests.

Everything here drives the real thing: two remusd daemons on loopback (a
primary "A" and a backup "B", each with its own state directory), a real QEMU
running the test guest under TCG, and remusctl.  See README.md in this folder.

Cleanup guarantee: every process a test starts is registered with the `world`
fixture and SIGKILLed when the test ends, pass or fail.  That includes the QEMU
a backup remusd restores on promotion (its pid is read from
<state>/domains/<domain>/run/qemu.pid and from the backup's status), which
runs in its own session and would otherwise outlive everything.

stdlib + pytest only.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("REMUS_BUILD_DIR") or os.environ.get("REMUS_BUILD") or REPO / "build").resolve()
REMUSD = Path(os.environ.get("REMUSD", BUILD / "remusd" / "remusd"))
REMUSCTL = Path(os.environ.get("REMUSCTL", BUILD / "tools" / "remusctl" / "remusctl"))
QEMU = Path(os.environ.get("REMUS_QEMU", "/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64"))
# The test QEMUs by release (scripts/build-qemu.sh 7.2 / 10.0). Tests marked
# both_qemus run once per entry, with ids [qemu7.2] and [qemu10.0], so a
# failure says which QEMU; every other test runs on QEMU (7.2).
QEMU_10 = Path(os.environ.get("REMUS_QEMU_10", "/var/cache/remus/qemu-10.0-colo/bin/qemu-system-x86_64"))
QEMUS = {"qemu7.2": QEMU, "qemu10.0": QEMU_10}
# The uncompressed PVH vmlinux by default: QEMU enters it directly, without
# SeaBIOS and the xz decompression, which under TCG take about 4 of the
# bzImage's 7.5 s to "init done" (the suite boots over a hundred guests).
_GUEST = BUILD / "guest"
KERNEL = Path(os.environ.get("REMUS_GUEST_KERNEL")
              or (_GUEST / "vmlinux" if (_GUEST / "vmlinux").is_file() else _GUEST / "vmlinuz"))
INITRD = Path(os.environ.get("REMUS_GUEST_INITRD", BUILD / "guest" / "initrd.img"))

DOMAIN = "web1"
# The guest's counter: a u64 at this guest-physical address (reserved with
# memmap=), one tick per millisecond, so about 1000 per second; ticks missed
# while the guest is frozen are not made up (at most 10 ms of lag is).  See
# tests/guest/README.md.  It must sit above the kernel's image: 0x8000000
# (128 MiB) for vmlinux, which is loaded as is; 0x4000000 for the bzImage.
COUNTER_GPA = 0x8000000 if KERNEL.name == "vmlinux" else 0x4000000
COUNTER_MAX_RATE = 1000  # per second
BOOT_TIMEOUT = 90
# Heartbeat timeout (interval 100 ms) of every remusd the tests start unless a
# test says otherwise. Not remusd's default of 1000 ms: on a loaded 2-core
# machine the backup's own slow store I/O during the initial copy (PageStore
# creation took 2.7 s once) counts as primary silence and breaks protection
# (reported as a product issue), which would make the tests flaky.
DEFAULT_HB_TIMEOUT_MS = 3000


# ----------------------------------------------------------------- skipping

def _missing_requirements(needs_build=True, needs_qemu=True):
    if os.geteuid() != 0:
        return "the end-to-end tests need root (remusd's control socket is root-only)"
    if not needs_build:
        return None
    for what, p in [("remusd", REMUSD), ("remusctl", REMUSCTL)]:
        if not p.is_file():
            return f"{what} is not built ({p} missing; run cmake --build build)"
    if not needs_qemu:
        return None
    if not (QEMU.is_file() and os.access(QEMU, os.X_OK)):
        return (f"no COLO-capable QEMU at {QEMU} (build it with scripts/build-qemu.sh "
                f"or point REMUS_QEMU at one)")
    for what, p in [("guest kernel", KERNEL), ("guest initrd", INITRD)]:
        if not p.is_file():
            return f"the test guest is not built ({what} {p} missing; run scripts/build-guest.sh)"
    return None


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_qemus") is not None:
        metafunc.parametrize("qemu_under_test", list(QEMUS.values()), ids=list(QEMUS.keys()))


@pytest.fixture
def qemu_under_test():
    """The QEMU a test's guests, backups and libvirt domains run (World.qemu):
    QEMU unless the test is marked both_qemus (pytest_generate_tests)."""
    return QEMU


def pytest_collection_modifyitems(config, items):
    """Skips the tests whose requirements are missing.  Tests marked no_build
    (the arbiter world's own) need root but no remus build and no QEMU;
    tests marked no_qemu need the build but no QEMU and no guest."""
    here = Path(__file__).resolve().parent
    reasons = {"no_build": _missing_requirements(needs_build=False),
               "no_qemu": _missing_requirements(needs_qemu=False),
               None: _missing_requirements()}
    for item in items:
        if Path(str(item.fspath)).resolve().parent != here:
            continue
        kind = next((m for m in ("no_build", "no_qemu") if item.get_closest_marker(m) is not None), None)
        reason = reasons[kind]
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# ------------------------------------------------------------------ helpers

def tail(path, n=30):
    """The last n lines of a text file, or a note that it is missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return f"    <{path}: {e.strerror}>"
    return "\n".join("    " + l for l in lines[-n:]) or "    <empty>"


def read_text(path):
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid):
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    # A zombie counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pid_cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


class QmpError(Exception):
    pass


class Qmp:
    """A tiny synchronous QMP client over a unix socket."""

    def __init__(self, path, timeout=10.0):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.buf = b""
        self.events = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(f"{self.path}: unexpected greeting {self.greeting}")
        self.execute("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError(f"{self.path}: QEMU closed the monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, arguments=None, timeout=10.0):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.settimeout(timeout)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError(f"{command}: {r['error']}")
            return r.get("return")

    def hmp(self, cmdline):
        return self.execute("human-monitor-command", {"command-line": cmdline})

    def status(self):
        return self.execute("query-status")["status"]

    def counter(self):
        out = self.hmp(f"xp /1xg {COUNTER_GPA:#x}")
        m = re.search(r":\s*0x([0-9a-fA-F]+)", out)
        if not m:
            raise QmpError(f"cannot parse xp output {out!r}")
        return int(m.group(1), 16)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


def qmp_connect(path, timeout=10.0):
    """Connects to a QMP socket, retrying while it is not there yet."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return Qmp(path)
        except (OSError, QmpError, ValueError) as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"cannot connect to QMP at {path} within {timeout}s: {last}")


def control_call(sock_path, request, timeout=10.0):
    """One request on a remusd control socket (docs: one JSON line each way)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("remusd closed the control connection without answering")
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def read_store_counter(store_dir, gpa=COUNTER_GPA):
    """The committed guest counter, read straight from a backup page store."""
    manifest = json.loads((Path(store_dir) / "manifest.json").read_text())
    blocks = {b["id"]: b for b in manifest["blocks"]}
    assert "pc.ram" in blocks, f"no pc.ram block in {store_dir}/manifest.json: {manifest}"
    b = blocks["pc.ram"]
    assert gpa + 8 <= b["used_length"], f"GPA {gpa:#x} outside pc.ram ({b})"
    with open(Path(store_dir) / b["file"], "rb") as f:
        f.seek(gpa)
        data = f.read(8)
    assert len(data) == 8, f"short read from {b['file']} at {gpa:#x}"
    return struct.unpack("<Q", data)[0]


# --------------------------------------------------------------- processes

class Daemon:
    """One remusd."""

    def __init__(self, world, name, state_dir, control, log, proc, listen=None, key=None):
        self.world, self.name = world, name
        self.state_dir, self.control, self.log, self.proc = state_dir, control, log, proc
        self.listen, self.key = listen, key

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def call(self, request, timeout=10.0):
        return control_call(self.control, request, timeout)

    def status(self, domain=DOMAIN, role=None):
        """The status JSON of one domain, or None if this daemon has no such domain.
        role: "primary" or "backup": that side's record (default: the one row
        status shows for the domain)."""
        req = {"command": "status", "domain": domain}
        if role:
            req["role"] = role
        r = self.call(req)
        if not r.get("ok"):
            if r.get("code") == "NOT_FOUND":
                return None
            raise AssertionError(f"{self.name}: status failed: {r}")
        ds = r["result"]["domains"]
        return ds[0] if ds else None

    def all_status(self):
        r = self.call({"command": "status"})
        assert r.get("ok"), f"{self.name}: status failed: {r}"
        return r["result"]["domains"]

    def ctl(self, *args, timeout=120):
        return self.world.remusctl("--socket", str(self.control), *args, timeout=timeout)

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)

    def domain_dir(self, domain=DOMAIN):
        return Path(self.state_dir) / "domains" / domain


class Guest:
    """A QEMU running the test guest.

    Two monitors: `qmp_sock` is for remusd (protect --qmp), `test_qmp_sock`
    is this harness's own (a QMP chardev serves one client at a time, and
    remusd keeps its connection open while protecting).
    """

    def __init__(self, world, name, dir, proc, serial, qmp_sock, test_qmp_sock):
        self.world, self.name, self.dir, self.proc = world, name, dir, proc
        self.serial, self.qmp_sock, self.test_qmp_sock = serial, qmp_sock, test_qmp_sock
        self._qmp = None

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    @property
    def qmp(self):
        if self._qmp is None:
            self._qmp = qmp_connect(self.test_qmp_sock)
            self.world._closers.append(self._qmp.close)
        return self._qmp

    def counter(self):
        return self.qmp.counter()

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self._qmp:
            self._qmp.close()
            self._qmp = None


class World:
    """Per-test sandbox: a short temp dir (unix socket paths are limited to 108
    bytes), a shared key, and every process started, killed at the end."""

    def __init__(self, request, qemu=QEMU):
        self.request = request
        # The QEMU this test runs (both_qemus tests: per parameter). A missing
        # one fails the test: CI must not pass by skipping QEMU 10.0.
        self.qemu = Path(qemu)
        if self.qemu != QEMU and not (self.qemu.is_file() and os.access(self.qemu, os.X_OK)):
            pytest.fail(f"no COLO-capable QEMU at {self.qemu} (scripts/build-qemu.sh "
                        f"{'10.0' if self.qemu == QEMU_10 else '7.2'} builds it)")
        self.dir = Path(tempfile.mkdtemp(prefix="remus-e2e-", dir="/tmp"))
        self.procs = []          # (name, Popen)
        self.logs = []           # (name, path) shown on failures
        self.daemons = []
        self.extra_pids = []     # (name, pid) not started by us directly
        self._closers = []
        self.netns = None        # set by NetWorld: daemons and QEMUs run inside it
        self.key = self.dir / "key"
        # Without a build only no_build tests run (they start no remusd): no key then.
        if REMUSCTL.is_file():
            r = self.remusctl("keygen", "--out", str(self.key))
            assert r.returncode == 0, f"remusctl keygen failed: {r.stdout}{r.stderr}"

    # -------------------------------------------------------------- running
    def remusctl(self, *args, timeout=120):
        return subprocess.run([str(REMUSCTL), *args], capture_output=True, text=True, timeout=timeout)

    def _spawn(self, name, argv, log, netns=None):
        netns = netns or self.netns
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        f = open(log, "ab")
        try:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        finally:
            f.close()
        self.procs.append((name, p))
        self.logs.append((name, log))
        return p

    def start_remusd(self, name, listen=False, key=None, hb_interval_ms=100, hb_timeout_ms=None,
                     ack_delay_ms=None, fault=None, auto_promote=True, extra=(), qemu=None, netns=None,
                     listen_host="127.0.0.1", etcd=None, lease_ttl_ms=3000, lease_margin_ms=1000, host_id=None,
                     key_file=True, listen_port=None, state_name=None):
        """qemu: the backup's --qemu for restored guests (default: the suite's QEMU).
        netns: run this remusd in that network namespace (default: the world's).
        listen_host: the backup's listen address (an address of its namespace).
        etcd: a list of etcd client URLs: --arbiter etcd with them (lease TTL
        and margin as given, --host-id host_id or the daemon's name);
        without, --arbiter none (the fail-stop tests predate arbitration).
        key_file=False: no --key-file (certificate mode: pass --tls-* in extra).
        listen_port: listen there (a restarted remusd at its old address).
        state_name: the state dir's name (default: name; a restart reuses it)."""
        if hb_timeout_ms is None:
            hb_timeout_ms = DEFAULT_HB_TIMEOUT_MS
        state = self.dir / (state_name or name)
        control = self.dir / f"{name}.sock"
        log = self.dir / f"{name}.log"
        argv = [str(REMUSD), "--state-dir", str(state),
                *(["--key-file", str(key or self.key)] if key_file else []),
                "--control", str(control), "--heartbeat-interval-ms", str(hb_interval_ms),
                "--heartbeat-timeout-ms", str(hb_timeout_ms), "--log-level", "debug"]
        addr = None
        if listen:
            addr = f"{listen_host}:{listen_port or free_port()}"
            argv += ["--listen", addr, "--qemu", str(qemu or self.qemu)]
            # The test guest boots from files a restored guest reads on this
            # host: the backup must allow their directory (its peer policy).
            for d in sorted({str(KERNEL.parent), str(INITRD.parent)}):
                argv += ["--allow-qemu-files", d]
        if ack_delay_ms is not None:
            argv += ["--ack-delay-ms", str(ack_delay_ms)]
        if fault:
            argv += ["--fault", fault]
        if not auto_promote:
            argv += ["--no-auto-promote"]
        if etcd:
            argv += ["--arbiter", "etcd", "--etcd-endpoints", ",".join(etcd), "--etcd-prefix", f"/remus-{self.dir.name}",
                     "--lease-ttl-ms", str(lease_ttl_ms), "--lease-margin-ms", str(lease_margin_ms),
                     "--host-id", host_id or name]
        else:
            argv += ["--arbiter", "none"]
        argv += list(extra)
        p = self._spawn(f"remusd {name}", argv, log, netns=netns)
        d = Daemon(self, name, state, control, log, p, listen=addr, key=key or self.key)
        self.daemons.append(d)

        def ready():
            if p.poll() is not None:
                raise AssertionError(f"remusd {name} exited with {p.returncode}")
            if not control.exists():
                return False
            try:
                return d.call({"command": "ping"}, timeout=2).get("ok")
            except OSError:
                return False
        self.wait_for(ready, 15, f"remusd {name} to answer on {control}")
        return d

    def start_backup(self, name="B", **kw):
        return self.start_remusd(name, listen=True, **kw)

    def start_primary(self, name="A", **kw):
        return self.start_remusd(name, listen=False, **kw)

    def start_guest(self, name="g", mem_mb=256, wss_mib=64, dirty=10000, check=True, wait_boot=True,
                    extra_args=(), extra_append="", qemu=None, netns=None, events=False):
        """events=True adds a third QMP socket (e.sock) for a QmpEventLog."""
        gdir = self.dir / name
        gdir.mkdir()
        serial = gdir / "serial.log"
        qmp_sock = gdir / "q.sock"
        test_qmp = gdir / "t.sock"
        if events:
            extra_args = [*extra_args, "-qmp", f"unix:{gdir / 'e.sock'},server=on,wait=off"]
        append = (f"console=ttyS0 memmap=64K${COUNTER_GPA:#x} remus.counter={COUNTER_GPA:#x} "
                  f"remus.dirty={dirty} remus.wss={wss_mib} remus.check={1 if check else 0} quiet"
                  + (" " + extra_append if extra_append else ""))
        argv = [str(qemu or self.qemu), "-machine", "pc", "-accel", "tcg", "-m", str(mem_mb), "-nodefaults",
                "-nographic", "-vga", "none", "-serial", f"file:{serial}",
                "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", append,
                "-qmp", f"unix:{qmp_sock},server=on,wait=off",
                "-qmp", f"unix:{test_qmp},server=on,wait=off", *extra_args]
        p = self._spawn(f"qemu {name}", argv, gdir / "qemu.log", netns=netns)
        self.logs.append((f"serial {name}", serial))
        g = Guest(self, name, gdir, p, serial, qmp_sock, test_qmp)
        g.event_qmp_sock = gdir / "e.sock" if events else None
        g.boot_marker = "remus-guest: check ok" if check else "remus-guest: init done"
        if wait_boot:
            self.wait_booted(g)
        return g

    def wait_booted(self, g):
        self.wait_for(lambda: self._guest_up(g, g.boot_marker), BOOT_TIMEOUT,
                      f"guest {g.name} to boot ('{g.boot_marker}' in {g.serial})", interval=0.1)

    def _guest_up(self, g, marker):
        if not g.alive():
            raise AssertionError(f"QEMU for guest {g.name} exited with {g.proc.returncode}")
        return marker in read_text(g.serial)

    def protect(self, primary, backup, guest, interval_ms=100, no_wait=False, domain=DOMAIN, timeout=120,
                extra=(), backup_addr=None):
        """backup_addr: connect there instead of backup.listen (a LinkProxy in front of it)."""
        args = ["protect", domain, "--qmp", str(guest.qmp_sock), "--backup", backup_addr or backup.listen,
                "--interval", str(interval_ms), *extra]
        if no_wait:
            args.append("--no-wait")
        r = primary.ctl(*args, timeout=timeout)
        assert r.returncode == 0, (f"remusctl protect failed (rc {r.returncode}):\n{r.stdout}{r.stderr}"
                                   + self.diagnostics())
        return r

    # -------------------------------------------------------------- waiting
    def wait_for(self, pred, timeout, what, interval=0.05):
        """Polls pred() until it returns something truthy; returns that."""
        deadline = time.monotonic() + timeout
        last_exc = None
        while True:
            try:
                v = pred()
                if v:
                    return v
                last_exc = None
            except (OSError, QmpError, ConnectionError) as e:
                last_exc = e
            if time.monotonic() >= deadline:
                note = f" (last error: {last_exc!r})" if last_exc else ""
                raise AssertionError(f"timed out after {timeout}s waiting for {what}{note}"
                                     + self.diagnostics())
            time.sleep(interval)

    def wait_status(self, daemon, pred, timeout, what, domain=DOMAIN, interval=0.02, role=None):
        """Waits until pred(status) holds for daemon's status of domain; returns the status."""
        last = {}

        def check():
            st = daemon.status(domain, role=role)
            last["st"] = st
            return st if st is not None and pred(st) else None
        try:
            return self.wait_for(check, timeout, f"{daemon.name}: {what}", interval=interval)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast status of {domain} on {daemon.name}: "
                                 f"{json.dumps(last.get('st'), indent=1)}") from None

    # ------------------------------------------------------------ diagnostics
    def diagnostics(self):
        out = ["", "---- diagnostics ----"]
        for d in self.daemons:
            try:
                if d.alive():
                    out.append(f"status on {d.name}: {json.dumps(d.all_status())}")
            except Exception as e:  # noqa: BLE001 - best effort
                out.append(f"status on {d.name}: <{e}>")
        seen = set()
        logs = list(self.logs)
        for d in self.daemons:
            dd = d.state_dir / "domains"
            if dd.is_dir():
                for run in sorted(dd.glob("*/run")):
                    logs.append((f"restored serial {run.parent.name}", run / "serial.log"))
                    logs.append((f"restored qemu log {run.parent.name}", run / "qemu.log"))
        for name, path in logs:
            if path in seen or not Path(path).exists():
                continue
            seen.add(path)
            out.append(f"--- {name}: {path} (tail)")
            out.append(tail(path))
        return "\n".join(out)

    # -------------------------------------------------------------- cleanup
    def restored_qemu_pids(self):
        pids = set()
        for d in self.daemons:
            for pf in (d.state_dir / "domains").glob("*/run/qemu.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pids.add(int(pf.read_text().strip()))
        for _, pid in self.extra_pids:
            pids.add(pid)
        # Only kill what is really a QEMU we caused (never a recycled pid).
        out = []
        for pid in pids:
            argv = pid_cmdline(pid)
            if argv and b"qemu" in argv[0] and any(str(self.dir).encode() in a for a in argv):
                out.append(pid)
        return out

    def cleanup(self):
        for c in self._closers:
            with contextlib.suppress(Exception):
                c()
        # REMUS_E2E_GRACEFUL_STOP=N (scripts/sanitize.sh): SIGTERM every live
        # remusd first and give it N seconds to shut down, so that its shutdown
        # path runs and LeakSanitizer checks it at exit; then SIGKILL as usual.
        grace = float(os.environ.get("REMUS_E2E_GRACEFUL_STOP") or 0)
        if grace > 0:
            live = [d.proc for d in self.daemons if d.alive()]
            for p in live:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in live:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Restored QEMUs first (they run in their own session).
        for pid in self.restored_qemu_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for _, p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    p.kill()
        for _, p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        # Anything else still running with our temp dir on its command line
        # (a restored QEMU whose pid file was not written yet, for instance).
        for pid_s in os.listdir("/proc"):
            if not pid_s.isdigit():
                continue
            argv = pid_cmdline(int(pid_s))
            if argv and b"qemu" in argv[0] and any(str(self.dir).encode() in a for a in argv):
                with contextlib.suppress(OSError):
                    os.kill(int(pid_s), signal.SIGKILL)


@pytest.fixture
def world(request, qemu_under_test):
    w = World(request, qemu_under_test)
    try:
        yield w
    finally:
        w.cleanup()
        failed = any(getattr(request.node, "rep_" + s, None) is not None and
                     getattr(request.node, "rep_" + s).failed for s in ("setup", "call"))
        if failed or os.environ.get("REMUS_E2E_KEEP"):
            print(f"\n[e2e] kept {w.dir} for inspection")
        else:
            shutil.rmtree(w.dir, ignore_errors=True)


# ----------------------------------------------------- shared test scenarios

class Protected:
    """A protected guest: primary A, backup B, guest g."""

    def __init__(self, world, primary, backup, guest):
        self.world, self.primary, self.backup, self.guest = world, primary, backup, guest

    def pstatus(self):
        return self.primary.status()

    def bstatus(self):
        return self.backup.status()

    def wait_acked(self, n, timeout=60):
        return self.world.wait_status(self.primary, lambda s: s["last_acked_epoch"] >= n, timeout,
                                      f"last_acked_epoch >= {n}")

    def acked_reference(self, timeout=30):
        """Reads the guest counter C0, then last_staged_epoch e0, then waits until an
        epoch after e0 is acked.  Returns C0: every epoch after e0 was captured after
        C0 was read (or while the guest was paused at C0), so once one is acked,
        a promotion must never go below C0.  (Reading e0 first would race with a
        checkpoint staged between the two reads.)"""
        c0 = self.guest.counter()
        e0 = self.pstatus()["last_staged_epoch"]
        self.world.wait_status(self.primary, lambda s: s["last_acked_epoch"] > e0, timeout,
                               f"an ack beyond epoch {e0} (staged when counter {c0} was read)")
        return c0


def setup_protected(world, interval_ms=100, backup_kw=None, primary_kw=None, guest_kw=None,
                    wait_epochs=50, protect_extra=()):
    guest = world.start_guest(wait_boot=False, **(guest_kw or {}))  # boots while the daemons start
    backup = world.start_backup(**(backup_kw or {}))
    primary = world.start_primary(**(primary_kw or {}))
    world.wait_booted(guest)
    world.protect(primary, backup, guest, interval_ms=interval_ms, extra=protect_extra)
    st = primary.status()
    assert st["state"] == "protected", f"after protect returned: {st}" + world.diagnostics()
    pr = Protected(world, primary, backup, guest)
    if wait_epochs:
        pr.wait_acked(wait_epochs, timeout=max(60, wait_epochs * interval_ms / 1000 * 4))
    return pr


def check_promoted(world, backup, c0, p_kill, window_s, domain=DOMAIN, timeout=30,
                   min_epoch=None, exact_epoch=None):
    """Shared checks after the primary is lost.

    - the backup reaches "failed-over" with a restored QEMU it reports;
    - counter A committed in the page store: c0 <= A (nothing acked is lost) and
      A <= p_kill + 1 s of counting (nothing from after the kill);
    - the restored guest's counter (over its own QMP) starts at >= A and keeps going;
    - the restored serial log shows "check ok" lines throughout window_s seconds and
      never "CHECKER FAIL".
    Returns a dict of measurements (failover_ms, epoch, A, ...).
    """
    t0 = time.monotonic()
    # The backup side's record: an automatic re-protection may already have
    # made the promoted guest's row a primary one.
    st = world.wait_status(backup, lambda s: s["state"] in ("failed-over", "failed"), timeout,
                           "promotion (state failed-over)", domain=domain, role="backup")
    detect_s = time.monotonic() - t0
    assert st["state"] == "failed-over", f"promotion failed: {json.dumps(st, indent=1)}" + world.diagnostics()
    assert st["promotion"]["failover_ms"] >= 0, st
    pid = st["qemu"]["pid"]
    world.extra_pids.append(("restored qemu", pid))
    run = backup.domain_dir(domain) / "run"
    assert pid > 0 and pid_alive(pid), f"restored QEMU pid {pid} is not running: {st}" + world.diagnostics()
    pidfile = run / "qemu.pid"
    world.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() == str(pid), 5,
                   f"{pidfile} to name pid {pid}")
    assert st["qmp_socket"] == str(run / "qmp.sock"), st
    epoch = st["last_committed_epoch"]
    if exact_epoch is not None:
        assert epoch == exact_epoch, f"promoted from epoch {epoch}, expected {exact_epoch}: {st}"
    if min_epoch is not None:
        assert epoch >= min_epoch, f"promoted from epoch {epoch}, expected >= {min_epoch}: {st}"

    a = read_store_counter(st["store"])
    slack = COUNTER_MAX_RATE * 1
    assert c0 <= a, (f"acked state lost: committed counter {a} < {c0}, a value covered by an "
                     f"acked checkpoint" + world.diagnostics())
    assert a <= p_kill + slack, (f"committed counter {a} is beyond the primary's counter at the kill "
                                 f"({p_kill}) + {slack}" + world.diagnostics())

    q = qmp_connect(st["qmp_socket"])
    world._closers.append(q.close)
    assert q.status() == "running", f"restored guest not running: {q.status()}"
    r1 = q.counter()
    assert r1 >= a, f"restored guest counter {r1} < committed {a}" + world.diagnostics()

    serial = run / "serial.log"
    start = time.monotonic()
    last_r = r1
    ok_lines = 0
    while True:
        time.sleep(1.0)
        assert pid_alive(pid), "the restored QEMU died" + world.diagnostics()
        r = q.counter()
        assert r > last_r, (f"restored guest counter stuck at {r} (was {last_r} a second ago)"
                            + world.diagnostics())
        last_r = r
        text = read_text(serial)
        assert "CHECKER FAIL" not in text, f"checker failed in the restored guest:\n{tail(serial, 40)}"
        ok_lines = text.count("remus-guest: check ok")
        if time.monotonic() - start >= window_s:
            break
    text = read_text(serial)
    oks = [l for l in text.splitlines() if "remus-guest: check ok" in l]
    assert len(oks) >= window_s * 0.6, (f"only {len(oks)} 'check ok' lines in {window_s}s after "
                                        f"failover:\n{tail(serial, 40)}")
    # ... and they are still coming at the end of the window.
    before = len(oks)
    world.wait_for(lambda: read_text(serial).count("remus-guest: check ok") > before, 5,
                   "another 'check ok' line from the restored guest")
    assert "CHECKER FAIL" not in read_text(serial)
    return {"failover_ms": st["promotion"]["failover_ms"], "epoch": epoch, "committed_counter": a,
            "c0": c0, "p_kill": p_kill, "restored_counter_start": r1, "restored_counter_end": last_r,
            "check_ok_lines": ok_lines, "detect_s": detect_s, "qmp": q, "pid": pid}


def record(request, **kv):
    """Attach measurements to the test report (shown with -rA / in junit) and print them."""
    for k, v in kv.items():
        request.node.user_properties.append((k, v))
    print(f"[e2e] {request.node.name}: " + ", ".join(f"{k}={v}" for k, v in kv.items()))


# ------------------------------------------------------- fault-test helpers

def live_qemus(fragment):
    """Pids of live QEMU processes whose command line contains `fragment`
    (a path: a run dir, a socket name)."""
    out = []
    frag = str(fragment).encode()
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit():
            continue
        argv = pid_cmdline(int(pid_s))
        if argv and b"qemu" in argv[0] and any(frag in a for a in argv) and pid_alive(int(pid_s)):
            out.append(int(pid_s))
    return out


class QmpEventLog:
    """Collects a QEMU's QMP events (with QEMU's own wall-clock timestamps) on a
    dedicated monitor socket (start_guest(events=True)) from a background
    thread, so the guest's pauses can be measured from STOP/RESUME even while
    other QMP connections are busy or blocked."""

    def __init__(self, world, path):
        self.path = str(path)
        self.events = []  # (qemu wall time, name, monotonic receipt time)
        self.error = None
        self._lock = threading.Lock()
        self._qmp = qmp_connect(path)
        self._qmp.sock.settimeout(None)
        world._closers.append(self.close)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while True:
                r = self._qmp._read()
                if "event" in r:
                    ts = r.get("timestamp", {})
                    t = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                    with self._lock:
                        self.events.append((t, r["event"], time.monotonic()))
        except (OSError, QmpError, ValueError) as e:
            self.error = e

    def close(self):
        self._qmp.close()

    def count(self, name):
        with self._lock:
            return sum(1 for e in self.events if e[1] == name)

    def pauses(self, t_from, t_to=None):
        """(stop, resume) wall-time intervals of the guest's pauses that overlap
        [t_from, t_to] (t_to: now); resume is None for a pause still going on."""
        t_to = time.time() if t_to is None else t_to
        with self._lock:
            evs = sorted(self.events)
        out, stop = [], None
        for t, name, _ in evs:
            if name == "STOP" and stop is None:
                stop = t
            elif name == "RESUME" and stop is not None:
                if t >= t_from and stop <= t_to:
                    out.append((stop, t))
                stop = None
        if stop is not None and stop <= t_to:
            out.append((stop, None))
        return out

    def longest_pause(self, t_from, t_to=None):
        """The longest pause (seconds) overlapping [t_from, t_to], an ongoing one
        counted up to t_to; and that interval."""
        t_to = time.time() if t_to is None else t_to
        best, which = 0.0, None
        for stop, resume in self.pauses(t_from, t_to):
            d = (resume if resume is not None else t_to) - stop
            if d > best:
                best, which = d, (stop, resume)
        return best, which


def _sh(*argv):
    r = subprocess.run(list(argv), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(argv)} failed: {r.stderr.strip()}"
    return r.stdout


class NetnsPair:
    """Two network namespaces joined by a veth pair: `a` (10.79.0.1) for the
    primary host, `b` (10.79.0.2) for the backup host. blackhole(ns) drops every
    packet in and out of a namespace (iptables DROP: no RST, no FIN), as a
    cut cable or a hung host looks to its peer."""

    A_IP, B_IP = "10.79.0.1", "10.79.0.2"

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.a, self.b = f"rfa{tag}", f"rfb{tag}"
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", self.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", self.b)
        _sh("ip", "-n", self.a, "addr", "add", f"{self.A_IP}/24", "dev", "va")
        _sh("ip", "-n", self.b, "addr", "add", f"{self.B_IP}/24", "dev", "vb")
        _sh("ip", "-n", self.a, "link", "set", "va", "up")
        _sh("ip", "-n", self.b, "link", "set", "vb", "up")

    def blackhole(self, ns):
        for chain in ("INPUT", "OUTPUT"):
            _sh("ip", "netns", "exec", ns, "iptables", "-A", chain, "-j", "DROP")

    def close(self):
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def netns_pair(world):
    n = NetnsPair()
    try:
        yield n
    finally:
        world.cleanup()  # the processes inside first
        n.close()


@pytest.fixture
def arbiter_net(world):
    """The arbiter world (tests/e2e/arbiter_world.py): hosts A, B, C and etcd
    members E1-E3 in their own network namespaces on one bridge, with a real
    3-member etcd cluster running and healthy (`net.etcd`, an EtcdCluster; its
    data and logs under <world.dir>/etcd/, and its logs in world.diagnostics()).
    Start remusd with world.start_remusd(..., netns=net.ns("A"),
    listen_host=net.ip("B")).  At the end the world's processes are killed
    first, then etcd and everything else in the namespaces, then the
    namespaces and the bridge go.  Fails (does not skip) without etcd."""
    from arbiter_world import ArbiterNet, EtcdCluster, etcd_missing
    missing = etcd_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    net = ArbiterNet()
    try:
        net.start()
        net.etcd = EtcdCluster(net, world.dir / "etcd")
        world.logs += [(f"etcd {m}", net.etcd.log(m)) for m in net.etcd.members]
        net.etcd.start()
        net.etcd.wait_healthy()
        yield net
    finally:
        world.cleanup()  # the processes inside first
        net.close()


# The replication link is TLS 1.3 (docs/formats/replication-link.md): on the
# wire, TLS records: u8 content type, u16 version, u16 length, then the
# (encrypted) fragment. Application data is type 23.
TLS_APPDATA = 23


class LinkProxy:
    """A TCP proxy between a primary and its backup: an on-path attacker. It
    forwards the link unchanged until armed, then tampers with the next
    primary->backup TLS application-data record of at least `min_len` bytes
    (past the handshake, so a checkpoint's PAGES/DEVICE/COMMIT):
      alter:  flips one byte in the middle of the record;
      inject: sends a forged record (random bytes) before it;
      replay: sends an earlier record again before it.
    Each must fail the record's authentication on the backup.

    Point `remusctl protect --backup` at proxy.addr."""

    MODES = ("alter", "inject", "replay")

    def __init__(self, world, target, listen_ip="127.0.0.1"):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((listen_ip, 0))
        self.lsock.listen(8)
        self.addr = f"{listen_ip}:{self.lsock.getsockname()[1]}"
        self._lock = threading.Lock()
        self._armed = None  # (mode, min_len)
        self.corrupted = None  # dict once a record was tampered with
        self.done = threading.Event()
        self.frames = {}  # TLS record type -> count forwarded
        self._socks = []
        if world is not None:
            world._closers.append(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def tamper_next(self, mode="alter", min_len=256):
        assert mode in self.MODES, mode
        with self._lock:
            self._armed = (mode, min_len)

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=10)
                s.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._socks += [c, s]
            threading.Thread(target=self._c2s, args=(c, s), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c), daemon=True).start()

    @staticmethod
    def _eof(src, dst):
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _pipe(self, src, dst):
        try:
            while True:
                b = src.recv(1 << 20)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        self._eof(src, dst)

    def _c2s(self, src, dst):
        buf = bytearray()
        last_app = None  # the last application-data record forwarded, for a replay
        try:
            while True:
                b = src.recv(1 << 20)
                if not b:
                    break
                buf += b
                out = bytearray()
                while len(buf) >= 5:
                    typ, length = buf[0], int.from_bytes(buf[3:5], "big")
                    n = 5 + length
                    if len(buf) < n:
                        break
                    rec = bytes(buf[:n])
                    del buf[:n]
                    self.frames[typ] = self.frames.get(typ, 0) + 1
                    if typ == TLS_APPDATA:
                        out += self._maybe_tamper(rec, last_app)
                        last_app = rec
                    else:
                        out += rec
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        self._eof(src, dst)

    def _maybe_tamper(self, rec, last_app):
        with self._lock:
            if self._armed is None or len(rec) < self._armed[1] or (self._armed[0] == "replay" and last_app is None):
                return rec
            mode = self._armed[0]
            self._armed = None
        if mode == "alter":
            b = bytearray(rec)
            b[len(b) // 2] ^= 0x40
            out = bytes(b)
        elif mode == "inject":
            body = os.urandom(len(rec) - 5)
            out = rec[:5] + body + rec
        else:
            out = last_app + rec
        self.corrupted = {"mode": mode, "record_len": len(rec)}
        self.done.set()
        return out

    def close(self):
        with contextlib.suppress(OSError):
            self.lsock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.lsock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
