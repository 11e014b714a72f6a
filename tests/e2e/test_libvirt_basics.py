"""libvirt mode's building blocks against real libvirtd daemons.

Each test starts one or two private libvirtd "hosts" (tests/e2e/libvirt_world.py)
and runs the test guest in them as a TCG domain (Debian's QEMU, or
REMUS_LIBVIRT_QEMU).  LibvirtMonitor and RestoreDomain are driven through the
test tool libvirt_monitor_probe (replicator/libvirt/monitor_probe.cc), which
prints JSON.

Skipped (with the reason) when not root, when libvirtd/virsh are not installed,
or when the probe or the test guest is not built.
"""

import json
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import BUILD, INITRD, KERNEL, QEMU, record
from libvirt_world import finish_worlds, LibvirtWorld, guest_files, skip_reason

PROBE = BUILD / "replicator" / "libvirt" / "libvirt_monitor_probe"
DOMAIN = "web1"
BOOT_TIMEOUT = 120


GUEST_KERNEL, GUEST_INITRD, COUNTER_GPA, CMDLINE = guest_files()
_why = skip_reason(PROBE)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


# ------------------------------------------------------------------ helpers

class Worlds:
    """The libvirt worlds of one test, all stopped at its end."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="remus-lv-", dir="/tmp"))
        self.worlds = []

    def start(self, name):
        w = LibvirtWorld(self.dir / name, name=name)
        self.worlds.append(w)
        w.start()
        return w

    def stop(self):
        for w in self.worlds:
            w.stop()

    def report(self):
        return "\n".join(w.report() for w in self.worlds)


@pytest.fixture
def worlds(request):
    ws = Worlds()
    try:
        yield ws
    finally:
        finish_worlds(request, ws)


def probe(world, *args, domain=DOMAIN, timeout=120):
    """Runs libvirt_monitor_probe against world; returns (rc, [JSON lines])."""
    argv = [str(PROBE), "--uri", world.uri, "--domain", domain, "--pid-dir", str(world.pid_dir), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    if r.returncode not in (0, 1):
        raise AssertionError(f"probe {' '.join(args)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r.returncode, lines


def probe_ok(world, *args, **kw):
    rc, lines = probe(world, *args, **kw)
    assert rc == 0 and lines and lines[-1].get("ok"), f"probe {' '.join(args)}: {lines}"
    return lines[-1]


def counter(world, domain=DOMAIN):
    out = probe_ok(world, "exec", "human-monitor-command",
                   "--args", json.dumps({"command-line": f"xp /1xg {COUNTER_GPA:#x}"}), domain=domain)["return"]
    m = re.search(r":\s*0x([0-9a-fA-F]+)", out)
    assert m, f"cannot parse xp output {out!r}"
    return int(m.group(1), 16)


def wait_for(pred, timeout, what, world=None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" +
                                 (world.report() if world else ""))
        time.sleep(0.2)


def boot_guest(world, name=DOMAIN, **kw):
    """Starts the test guest as a transient domain; returns its serial log
    once the guest's checker printed its first `check ok`."""
    serial = world.dir / f"{name}.serial"
    world.create(world.guest_xml(name, GUEST_KERNEL, GUEST_INITRD, CMDLINE, serial, **kw))
    wait_for(lambda: "remus-guest: check ok" in _text(serial), BOOT_TIMEOUT, f"{name} to boot in {world.name}",
             world)
    return serial


def _text(path):
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


# -------------------------------------------------------------------- tests

def test_two_worlds_side_by_side(worlds, request):
    """Two private libvirtds on one machine, each running a domain of the same
    name: separate pid files, run dirs and QEMUs; stopping one leaves the other."""
    t0 = time.monotonic()
    a = worlds.start("A")
    b = worlds.start("B")
    start_s = time.monotonic() - t0
    boot_guest(a)
    boot_guest(b)
    assert a.running_domains() == [DOMAIN] and b.running_domains() == [DOMAIN]
    pa, pb = a.qemu_pid(DOMAIN), b.qemu_pid(DOMAIN)
    assert pa and pb and pa != pb, (pa, pb)
    assert a.domstate(DOMAIN) == ("running", "booted")
    a.stop()
    assert not a.alive()
    assert b.domstate(DOMAIN) == ("running", "booted")
    assert b.running_domains() == [DOMAIN]
    assert counter(b) > 0
    record(request, worlds_start_s=round(start_s, 1))


def test_monitor_commands_and_events(worlds, request):
    a = worlds.start("A")
    boot_guest(a)

    info = probe_ok(a, "info", "--xml-out", str(a.dir / "mig.xml"))
    assert info["pid"] == a.qemu_pid(DOMAIN)
    assert info["version"].startswith("7.2"), info
    assert "qemu-system-x86_64" in info["argv0"]
    xml = (a.dir / "mig.xml").read_text()
    assert f"<name>{DOMAIN}</name>" in xml and "<uuid>" in xml

    st = probe_ok(a, "exec", "query-status")["return"]
    assert st["status"] == "running"

    # A QMP error is the code QmpClient gives, naming domain and URI.
    rc, lines = probe(a, "exec", "no-such-command")
    assert rc == 1 and lines[-1]["code"] == "INVALID_ARGUMENT", lines
    assert "domain web1" in lines[-1]["message"] and a.uri in lines[-1]["message"]
    rc, lines = probe(a, "exec", "migrate-set-parameters", "--args", '{"x-checkpoint-delay": "soon"}')
    assert rc == 1 and lines[-1]["code"] in ("FAILED_PRECONDITION", "INVALID_ARGUMENT"), lines

    # COLO's capability is accepted through libvirt.
    probe_ok(a, "exec", "migrate-set-capabilities",
             "--args", json.dumps({"capabilities": [{"capability": "x-colo", "state": True}]}))
    caps = probe_ok(a, "exec", "query-migrate-capabilities")["return"]
    assert {"capability": "x-colo", "state": True} in caps
    probe_ok(a, "exec", "migrate-set-capabilities",
             "--args", json.dumps({"capabilities": [{"capability": "x-colo", "state": False}]}))

    # STOP/RESUME arrive in QMP's shape, with QEMU's timestamps.
    t_before = time.time()
    rc, lines = probe(a, "watch", "--stop-resume", "3", "--duration-ms", "1000")
    assert rc == 0, lines
    events = [l["event"] for l in lines if "event" in l]
    names = [e["event"] for e in events]
    assert names.count("STOP") == 3 and names.count("RESUME") == 3, names
    for e in events:
        ts = e["timestamp"]
        assert abs(ts["seconds"] - t_before) < 60 and 0 <= ts["microseconds"] < 1_000_000, e
    stops = [e for e in events if e["event"] == "STOP"]
    assert "data" not in stops[0], stops[0]
    pauses = []
    for s, r in zip(stops, [e for e in events if e["event"] == "RESUME"]):
        pauses.append((r["timestamp"]["seconds"] - s["timestamp"]["seconds"]) * 1e6 +
                      r["timestamp"]["microseconds"] - s["timestamp"]["microseconds"])
    assert all(p > 0 for p in pauses), pauses
    # libvirt followed the guest back to running.
    assert a.domstate(DOMAIN) == ("running", "unpaused")
    assert "custom-monitor" in _text(a.qemu_log(DOMAIN))
    record(request, stop_resume_pause_us=[int(p) for p in pauses])


def test_connect_errors(worlds):
    a = worlds.start("A")
    rc, lines = probe(a, "info", domain="nope")
    assert rc == 1 and lines[-1]["code"] == "NOT_FOUND", lines
    assert "list --all" in lines[-1]["message"]

    a.define(a.guest_xml("off1", GUEST_KERNEL, GUEST_INITRD, CMDLINE, a.dir / "off1.serial"))
    rc, lines = probe(a, "info", domain="off1")
    assert rc == 1 and lines[-1]["code"] == "FAILED_PRECONDITION", lines
    assert "shut off" in lines[-1]["message"] and "start off1" in lines[-1]["message"]

    gone = LibvirtWorld(worlds.dir / "nobody")
    rc, lines = probe(gone, "info")
    assert rc == 1 and lines[-1]["code"] == "UNAVAILABLE", lines
    assert str(gone.socket) in lines[-1]["message"] and "libvirtd running" in lines[-1]["message"]


def _watch_in_background(world):
    argv = [str(PROBE), "--uri", world.uri, "--domain", DOMAIN, "--pid-dir", str(world.pid_dir),
            "watch", "--until-loss", "--duration-ms", "60000"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p


def _wait_watch_ready(world):
    # The watcher is subscribed once libvirt counts the monitor command of its
    # Connect (query-version): taint appears in the QEMU log.
    wait_for(lambda: "custom-monitor" in _text(world.qemu_log(DOMAIN)), 30, "the watcher to connect", world)
    time.sleep(0.5)


def test_loss_when_domain_destroyed(worlds):
    a = worlds.start("A")
    boot_guest(a)
    w = _watch_in_background(a)
    _wait_watch_ready(a)
    pid = a.qemu_pid(DOMAIN)
    a.destroy(DOMAIN)
    out, err = w.communicate(timeout=60)
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert losses == [{"kind": "domain-stopped", "reason": "destroyed", "qemu_pid": pid, "qemu_alive": False}], \
        f"{lines}\n{err}"
    assert lines[-1] == {"ok": True, "connected": False}
    # virsh destroy SIGTERMs QEMU first: QEMU reports a SHUTDOWN that the
    # guest did not ask for (remus must not read it as a guest shutdown).
    shutdowns = [l["event"] for l in lines if l.get("event", {}).get("event") == "SHUTDOWN"]
    assert shutdowns and shutdowns[0]["data"] == {"guest": False, "reason": "host-signal"}, lines


def test_loss_when_libvirtd_dies(worlds):
    a = worlds.start("A")
    boot_guest(a)
    w = _watch_in_background(a)
    _wait_watch_ready(a)
    pid = a.qemu_pid(DOMAIN)
    a.kill_daemon()
    out, err = w.communicate(timeout=60)
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    losses = [l["loss"] for l in lines if "loss" in l]
    # libvirtd's death is not QEMU's: the guest runs on, and the loss says so.
    assert len(losses) == 1 and losses[0]["kind"] == "connection-lost", f"{lines}\n{err}"
    assert losses[0]["qemu_pid"] == pid and losses[0]["qemu_alive"] is True, losses


def _serve_unix_to_file(path, out):
    """Accepts one connection on a unix socket and copies it into a file."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        c, _ = srv.accept()
        with c, open(out, "wb") as f:
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                f.write(b)
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_migrated(world):
    def done():
        q = probe_ok(world, "exec", "query-migrate")["return"]
        assert q.get("status") not in ("failed", "cancelled"), q
        return q.get("status") == "completed"
    wait_for(done, 120, "the migration to complete", world)


def test_migrate_to_unix_socket_and_fd(worlds):
    """QEMU under libvirt (root, no security driver here) connects to a unix
    socket in the test's dir; and fd: migration works with no path at all."""
    a = worlds.start("A")
    boot_guest(a)
    sock, out = a.dir / "mig.sock", a.dir / "unix.stream"
    t = _serve_unix_to_file(sock, out)
    probe_ok(a, "exec", "migrate", "--args", json.dumps({"uri": f"unix:{sock}"}))
    _wait_migrated(a)
    t.join(30)
    assert out.read_bytes()[:8] == b"QEVM\0\0\0\3"
    # After a migration libvirt did not start, the source is paused, reason unknown.
    assert a.domstate(DOMAIN) == ("paused", "unknown")
    probe_ok(a, "exec", "cont")
    wait_for(lambda: a.domstate(DOMAIN)[0] == "running", 10, "the guest to run again", a)

    fd_out = a.dir / "fd.stream"
    probe_ok(a, "migrate-fd", "--out", str(fd_out))
    assert fd_out.read_bytes()[:8] == b"QEVM\0\0\0\3"


def test_restore_into_second_world(worlds, request):
    """The guest's state, written by QEMU on A, is restored into B's libvirt
    through a save image streamed over a FIFO: B's libvirt runs it, and the
    guest carries on from where A stopped."""
    a = worlds.start("A")
    b = worlds.start("B")
    boot_guest(a)
    wait_for(lambda: counter(a) > 2000, 60, "the counter to pass 2000", a)
    xml_path = a.dir / "mig.xml"
    probe_ok(a, "info", "--xml-out", str(xml_path))
    stream = a.dir / "fd.stream"
    probe_ok(a, "migrate-fd", "--out", str(stream))
    c_a = counter(a)  # A is stopped now (postmigrate): its last value
    a.destroy(DOMAIN)

    # The backup's own paths in the XML (here: the serial log).
    serial_b = b.dir / f"{DOMAIN}.serial"
    xml = xml_path.read_text().replace(str(a.dir / f"{DOMAIN}.serial"), str(serial_b))
    assert str(serial_b) in xml
    xml_b = b.dir / "restore.xml"
    xml_b.write_text(xml)

    res = probe_ok(b, "restore", "--xml", str(xml_b), "--stream", str(stream), "--work-dir", str(b.dir))
    assert res["qemu_pid"] == b.qemu_pid(DOMAIN)
    assert b.domstate(DOMAIN) == ("running", "restored")
    assert b.running_domains() == [DOMAIN]
    assert not list(b.dir.glob("*.fifo")), "the FIFO was left behind"

    c1 = counter(b)
    assert c1 >= c_a, (c_a, c1)
    wait_for(lambda: counter(b) > c1 + 200, 30, "the restored counter to advance", b)
    wait_for(lambda: "remus-guest: check ok" in _text(serial_b), 30, "a checker line from the restored guest", b)
    assert "CHECKER FAIL" not in _text(serial_b)

    # A second restore of a running domain is refused: it would be a second copy.
    rc, lines = probe(b, "restore", "--xml", str(xml_b), "--stream", str(stream), "--work-dir", str(b.dir))
    assert rc == 1 and lines[-1]["code"] == "FAILED_PRECONDITION" and "already running" in lines[-1]["message"]

    # The staged variant (a save image file, then restore) for comparison; and
    # libvirt reads our header back.
    b.destroy(DOMAIN)
    img = b.dir / "staged.img"
    staged = probe_ok(b, "restore", "--xml", str(xml_b), "--stream", str(stream), "--image", str(img))
    dumped = b.virsh("save-image-dumpxml", str(img)).stdout
    assert f"<name>{DOMAIN}</name>" in dumped and str(serial_b) in dumped
    assert b.domstate(DOMAIN) == ("running", "restored")

    # A truncated stream fails cleanly: QEMU's own error, nothing left running.
    b.destroy(DOMAIN)
    short = b.dir / "short.stream"
    with open(stream, "rb") as f:
        short.write_bytes(f.read(1 << 20))
    rc, lines = probe(b, "restore", "--xml", str(xml_b), "--stream", str(short), "--work-dir", str(b.dir))
    assert rc == 1 and lines[-1]["code"] == "FAILED_PRECONDITION", lines
    assert "load of migration failed" in lines[-1]["message"], lines
    assert b.running_domains() == [] and not list(b.dir.glob("*.fifo"))
    record(request, stream_mib=round(stream.stat().st_size / 2**20, 1), restore_fifo_ms=res["restore_ms"],
           restore_staged_ms=staged["restore_ms"], staged_write_ms=staged["stage_ms"])


def test_failover_from_page_store_into_libvirt(worlds, world, request):
    """The whole libvirt-mode failover path, with today's remusd on the
    primary: a libvirt-run guest (COLO-capable QEMU) protected by remusd through
    a second QMP socket, its backup's page store restored into the second
    libvirt world by RestoreDomain (the stream WriteRestoreStream makes)."""
    a = worlds.start("A")
    b = worlds.start("B")
    # The primary is libvirt's QEMU protected through QMP, not libvirt mode:
    # CONFIG carries libvirt's command line (JSON-form options, passed fds),
    # which a QMP-mode backup's peer policy refuses. This test is about the
    # restore path (the backup is a page store here), so it allows them.
    allow = [x for o in ("object", "add-fd", "chardev", "device", "audiodev", "mon", "no-acpi", "boot", "machine")
             for x in ("--allow-qemu-option", o)]
    backup = world.start_backup(auto_promote=False, extra=allow)
    primary = world.start_primary()
    qsock = a.dir / "q.sock"
    serial_a = boot_guest(a, emulator=QEMU, qemu_args=["-qmp", f"unix:{qsock},server=on,wait=off"])
    r = primary.ctl("protect", DOMAIN, "--qmp", str(qsock), "--backup", backup.listen, "--interval", "100",
                    "--netbuf", "none")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}"
    # libvirt follows COLO's per-checkpoint STOP/RESUME.
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 30, 90, "30 acked checkpoints")
    states = {a.domstate(DOMAIN) for _ in range(20)}
    assert states <= {("running", "unpaused"), ("paused", "unknown")}, states
    probe_ok(a, "info", "--xml-out", str(a.dir / "mig.xml"))
    c0 = counter(a)
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 40, 60, "10 more acked checkpoints")
    a.destroy(DOMAIN)
    st = world.wait_status(backup, lambda s: s["last_committed_epoch"] >= 40 and not s["connected"], 30,
                           "the backup to see the primary gone")
    store = st["store"]
    backup.kill()

    serial_b = b.dir / f"{DOMAIN}.serial"
    xml = (a.dir / "mig.xml").read_text().replace(str(serial_a), str(serial_b))
    (b.dir / "restore.xml").write_text(xml)
    res = probe_ok(b, "restore", "--xml", str(b.dir / "restore.xml"), "--store", store, "--work-dir", str(b.dir))
    assert b.domstate(DOMAIN) == ("running", "restored")
    c1 = counter(b)
    assert c1 >= c0, (c0, c1)
    wait_for(lambda: counter(b) > c1 + 200, 30, "the restored counter to advance", b)
    wait_for(lambda: "remus-guest: check ok" in _text(serial_b), 30, "a checker line from the restored guest", b)
    assert "CHECKER FAIL" not in _text(serial_b)
    record(request, epoch=st["last_committed_epoch"], restore_ms=res["restore_ms"],
           stream_mib=round(res["stream_bytes"] / 2**20, 1), pages=res["pages"], zero_pages=res["zero_pages"])
