"""libvirt mode end to end: remusd protects a libvirt domain (no --qmp) and a
backup remusd restores it into its own libvirt.

Two private libvirtd "hosts" (tests/e2e/libvirt_world.py), A for the primary
and B for the backup, and two remusd (conftest's world).  The domain is the
test guest as a TCG domain whose <emulator> is the COLO-capable QEMU.  The
primary's remusd reaches QEMU only through A's libvirt (LibvirtSession: QMP
commands and events through libvirtd, the COLO stream over a socketpair end
passed with getfd); the backup restores through B's libvirt (a save image
streamed through a FIFO).

Skipped (with the reason) when not root, when libvirtd/virsh are missing, or
when the test guest or the probe tool is not built.
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUILD, INITRD, KERNEL, QEMU, REPO, read_text, record
from libvirt_world import finish_worlds, LibvirtWorlds, guest_files, skip_reason

PROBE = BUILD / "replicator" / "libvirt" / "libvirt_monitor_probe"
INSTALL_HOOK = REPO / "scripts" / "install-libvirt-hook.sh"
HOOK = REPO / "scripts" / "libvirt-hooks" / "qemu"
DOMAIN = "web1"
BOOT_TIMEOUT = 120
CHECK_OK = "remus-guest: check ok"


GUEST_KERNEL, GUEST_INITRD, COUNTER_GPA, CMDLINE = guest_files()
_why = skip_reason(PROBE)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


# ------------------------------------------------------------------ helpers

@pytest.fixture
def lvworlds(request):
    ws = LibvirtWorlds(prefix="remus-lvm-")
    try:
        yield ws
    finally:
        finish_worlds(request, ws)


def probe(world, *args, domain=DOMAIN, timeout=120):
    argv = [str(PROBE), "--uri", world.uri, "--domain", domain, "--pid-dir", str(world.pid_dir), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert r.returncode == 0 and lines and lines[-1].get("ok"), f"probe {' '.join(args)}: {r.stdout}{r.stderr}"
    return lines[-1]


def counter(world, domain=DOMAIN):
    """The guest's counter, read through world's libvirt."""
    out = probe(world, "exec", "human-monitor-command",
                "--args", json.dumps({"command-line": f"xp /1xg {COUNTER_GPA:#x}"}), domain=domain)["return"]
    m = re.search(r":\s*0x([0-9a-fA-F]+)", out)
    assert m, f"cannot parse xp output {out!r}"
    return int(m.group(1), 16)


def domain_xml(world, name=DOMAIN, metadata="", disks=(), emulator=QEMU):
    """world: the LibvirtWorld the domain is defined in; emulator: the QEMU
    it runs (the e2e world's, World.qemu, for both_qemus tests)."""
    return world.guest_xml(name, GUEST_KERNEL, GUEST_INITRD, CMDLINE, world.dir / f"{name}.serial",
                           emulator=emulator, metadata=metadata, disks=disks)


def wait_booted(world, lvw, name=DOMAIN):
    serial = lvw.dir / f"{name}.serial"
    world.wait_for(lambda: CHECK_OK in read_text(serial), BOOT_TIMEOUT,
                   f"{name} to boot in libvirt world {lvw.name} ({serial})", interval=0.2)
    return serial


def protect_metadata(backup, **attrs):
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f'<remus:protect xmlns:remus="https://remus.dev/xmlns/1" backup="{backup.listen}"{extra}/>'


def libvirt_daemons(world, a=None, b=None, auto_promote=True, primary_extra=()):
    """A backup remusd restoring into b (if given) and a primary remusd for a."""
    bextra = ["--libvirt-uri", b.uri, "--libvirt-pid-dir", str(b.pid_dir)] if b else []
    backup = world.start_backup(auto_promote=auto_promote, extra=bextra)
    pextra = ["--libvirt-pid-dir", str(a.pid_dir)] if a else []
    primary = world.start_primary(extra=[*pextra, *primary_extra])
    return primary, backup


# -------------------------------------------------------------------- tests

@pytest.mark.both_qemus
def test_protect_and_failover_through_libvirt(lvworlds, world, request):
    """protect with --connect (no --qmp); `virsh destroy` on A is QEMU's death,
    so the backup restores the guest into B's libvirt, where it runs on from
    the last acked checkpoint."""
    a = lvworlds.start("A")
    b = lvworlds.start("B")
    primary, backup = libvirt_daemons(world, a, b)
    a.define(domain_xml(a, emulator=world.qemu))
    a.start_domain(DOMAIN)
    wait_booted(world, a)

    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--connect", a.uri, "--interval", "100",
                    "--netbuf", "none", "--disks", "none")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    st = world.wait_status(primary, lambda s: s["state"] == "protected" and s["last_acked_epoch"] >= 30, 120,
                           "30 acked checkpoints")
    assert st["qmp_socket"] == "" and st["libvirt"]["uri"] == a.uri and st["libvirt"]["connected"], st
    assert st["qemu"]["pid"] == a.qemu_pid(DOMAIN), st
    assert st["pause_ms"]["samples"] > 0, "no pause samples: QEMU's STOP/RESUME events did not come through libvirt"
    # libvirt follows the checkpoints' pauses and is back to running after each.
    states = {a.domstate(DOMAIN) for _ in range(10)}
    assert states <= {("running", "booted"), ("running", "unpaused"), ("paused", "unknown")}, states

    # Acked reference (see conftest.Protected.acked_reference).
    c0 = counter(a)
    e0 = primary.status()["last_staged_epoch"]
    world.wait_status(primary, lambda s: s["last_acked_epoch"] > e0, 30, f"an ack beyond epoch {e0}")
    t_kill = time.monotonic()
    a.destroy(DOMAIN)

    bst = world.wait_status(backup, lambda s: s["state"] in ("failed-over", "failed"), 60, "promotion")
    detect_to_running_s = time.monotonic() - t_kill
    assert bst["state"] == "failed-over", json.dumps(bst, indent=1) + world.diagnostics()
    assert bst["libvirt"] == {"uri": b.uri, "domain": DOMAIN}, bst
    assert bst["qmp_socket"] == "", bst
    assert b.domstate(DOMAIN)[0] == "running", b.domstate(DOMAIN)
    assert DOMAIN in b.running_domains()
    assert bst["qemu"]["pid"] == b.qemu_pid(DOMAIN) and bst["qemu"]["pid"] > 0, bst
    marker = json.loads((backup.domain_dir() / "promoted.json").read_text())
    assert marker["libvirt"] == {"uri": b.uri, "domain": DOMAIN} and marker["qmp_socket"] == "", marker
    pst = world.wait_status(primary, lambda s: s["state"] == "failed-over", 30, "the primary to report failover")
    assert "QEMU exited" in pst["error"], pst

    # The guest runs on in B from where A's last acked checkpoint left it.
    c1 = counter(b)
    assert c1 >= c0, (c0, c1)
    world.wait_for(lambda: counter(b) > c1 + 500, 30, "the restored counter to advance", interval=0.5)
    serial_b = backup.domain_dir() / "run" / "serial.log"
    restored_xml = (backup.domain_dir() / "run" / "domain.xml").read_text()
    assert str(serial_b) in restored_xml and "remus.dev" not in restored_xml
    before = read_text(serial_b).count(CHECK_OK)
    world.wait_for(lambda: read_text(serial_b).count(CHECK_OK) >= before + 3, 30,
                   "three more 'check ok' lines from the restored guest", interval=0.5)
    assert "CHECKER FAIL" not in read_text(serial_b)
    record(request, failover_ms=bst["promotion"]["failover_ms"], destroy_to_running_s=round(detect_to_running_s, 2),
           epoch=bst["last_committed_epoch"], pause_p50_ms=round(st["pause_ms"]["p50"], 2),
           pause_p99_ms=round(st["pause_ms"]["p99"], 2))


def test_hook_protects_when_the_domain_starts(lvworlds, world, request):
    """The libvirt hook protects a domain carrying <remus:protect> with no
    remusctl call; `virsh destroy` then is a failover (the hook's stop
    notice never ends protection early, which would stop the backup from
    taking over).  The backup does not promote by itself here: the restore
    is the test above."""
    a = lvworlds.make("A")
    primary, backup = libvirt_daemons(world, a, auto_promote=False)
    r = subprocess.run([str(INSTALL_HOOK), "--socket", str(primary.control), "--connect", a.uri, str(a.hook_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (a.hook_dir / "qemu").is_file() and "connect = " + a.uri in (a.hook_dir / "remus.conf").read_text()
    a.start()  # libvirt finds hooks when it starts
    t0 = time.monotonic()
    a.create(domain_xml(a, metadata=protect_metadata(backup, interval=100, netbuf="none", disks="none")))
    st = world.wait_status(primary, lambda s: s["state"] == "protected" and s["last_acked_epoch"] >= 20, 180,
                           "the hook's protection: 20 acked checkpoints")
    protect_s = time.monotonic() - t0
    assert st["libvirt"]["uri"] == a.uri and st["backup"] == backup.listen and st["interval_ms"] == 100, st
    assert st["netbuf"]["mode"] == "none", st
    wait_booted(world, a)
    # A second start notice while protected is refused, and the hook never fails libvirt.
    hook = subprocess.run([str(a.hook_dir / "qemu"), DOMAIN, "started", "begin", "-"],
                          input=domain_xml(a, metadata=protect_metadata(backup)), capture_output=True, text=True,
                          timeout=30, env={"REMUS_SOCKET": str(primary.control), "PATH": "/usr/bin:/bin"})
    assert hook.returncode == 0 and "already protected" in hook.stderr, hook.stderr

    a.destroy(DOMAIN)
    pst = world.wait_status(primary, lambda s: s["state"] not in ("protected", "syncing", "starting"), 60,
                            "protection to end")
    assert pst["state"] == "failed-over", pst
    bst = world.wait_status(backup, lambda s: s["state"] == "primary-lost", 30, "the backup to hear of the failover")
    assert "primary reports its guest lost" in bst["error"], bst
    record(request, hook_start_to_protected_s=round(protect_s, 1))


def test_libvirtd_restart_keeps_protection(lvworlds, world, request):
    """libvirtd's death is not QEMU's: checkpoints go on without it and remusd
    reconnects when it is back.  If protection must end while libvirtd is
    away (here the backup dies), COLO is ended once libvirtd is back, so the
    guest is never left to QEMU's stopped COLO engine."""
    a = lvworlds.start("A")
    primary, backup = libvirt_daemons(world, a, auto_promote=False)
    a.create(domain_xml(a))
    wait_booted(world, a)
    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--connect", a.uri, "--netbuf", "none",
                    "--disks", "none")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 20, 120, "20 acked checkpoints")

    a.kill_daemon()
    down = world.wait_status(primary, lambda s: not s["libvirt"]["connected"], 30, "remusd to see libvirtd gone")
    e_down = down["last_acked_epoch"]
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= e_down + 20, 60,
                      "checkpoints to go on without libvirtd")
    assert primary.status()["state"] == "protected"
    t0 = time.monotonic()
    a.start()
    up = world.wait_status(primary, lambda s: s["libvirt"]["connected"] and s["libvirt"]["reconnects"] == 1, 60,
                           "remusd to reconnect")
    reconnect_s = time.monotonic() - t0
    assert up["state"] == "protected", up
    assert primary.call({"command": "tune", "domain": DOMAIN, "interval_ms": 50})["ok"], "a command after reconnecting"
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= up["last_acked_epoch"] + 10, 60,
                      "checkpoints after reconnecting")

    # The backup dies while libvirtd is away: protection ends, COLO waits.
    a.kill_daemon()
    world.wait_status(primary, lambda s: not s["libvirt"]["connected"], 30, "remusd to see libvirtd gone again")
    backup.kill()
    lost = world.wait_status(primary, lambda s: s["state"] == "unprotected", 30, "protection to end")
    a.start()
    world.wait_status(primary, lambda s: "COLO ended once libvirt was back" in s["error"], 60,
                      "COLO to be ended once libvirtd is back")
    assert probe(a, "exec", "query-status")["return"]["status"] == "running"
    assert probe(a, "exec", "query-migrate")["return"]["status"] != "colo"
    c = counter(a)
    world.wait_for(lambda: counter(a) > c + 500, 30, "the guest to run on, unprotected", interval=0.5)
    assert a.domstate(DOMAIN)[0] == "running"
    record(request, libvirtd_start_to_reconnected_s=round(reconnect_s, 1),
           epochs_without_libvirtd=up["last_acked_epoch"] - e_down, error_while_away=lost["error"])


def test_protect_errors(lvworlds, world):
    """Each failure names the domain or the URI and the fix."""
    a = lvworlds.start("A")
    primary, backup = libvirt_daemons(world, a)
    common = ["--backup", backup.listen, "--netbuf", "none"]

    r = primary.ctl("protect", "nosuch", "--connect", a.uri, *common, "--disks", "none")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "nosuch" in r.stderr and re.search(r"virsh -c \S+ list --all", r.stderr), r.stderr

    bad = f"qemu:///system?socket={a.dir}/nowhere/libvirt-sock"
    r = primary.ctl("protect", DOMAIN, "--connect", bad, *common, "--disks", "none")
    assert r.returncode == 4, r.stdout + r.stderr
    assert bad in r.stderr and "libvirtd" in r.stderr, r.stderr

    r = primary.ctl("protect", DOMAIN, "--connect", a.uri, "--qmp", "/x.sock", *common)
    assert r.returncode == 2 and "excludes" in r.stderr, r.stdout + r.stderr
    # Disk selection errors: test_libvirt_disk.py.


def test_hook_script_alone(tmp_path):
    """The hook without libvirt: domains without metadata are ignored,
    problems are logged, and it always exits 0."""
    xml_plain = "<domain><name>x</name></domain>"
    xml_meta = ("<domain><name>x</name><metadata><remus:protect xmlns:remus='https://remus.dev/xmlns/1' "
                "backup='h:1'/></metadata></domain>")
    env = {"PATH": "/usr/bin:/bin", "REMUS_SOCKET": str(tmp_path / "none.sock")}

    def run(xml, op="started"):
        return subprocess.run([str(HOOK), "x", op, "begin", "-"], input=xml, capture_output=True, text=True,
                              env=env, timeout=30)
    r = run(xml_plain)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run(xml_meta)
    assert r.returncode == 0 and "cannot reach remusd" in r.stderr and "none.sock" in r.stderr, r.stderr
    r = run(xml_meta, op="prepare")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r
    r = run("<domain")
    assert r.returncode == 0 and "cannot parse" in r.stderr, r.stderr

    # The request the metadata's attributes make (the hook as a module).
    import importlib.machinery
    import importlib.util
    import xml.etree.ElementTree as ET
    loader = importlib.machinery.SourceFileLoader("remus_hook", str(HOOK))
    hook = importlib.util.module_from_spec(importlib.util.spec_from_loader("remus_hook", loader))
    loader.exec_module(hook)
    el = ET.fromstring("<protect backup='h:1' interval='50' netbuf='nfqueue' reprotect-to='self'/>")
    req = hook.request_for("x", "started", el, {})
    assert req == {"command": "protect", "domain": "x", "backup": "h:1", "async": True, "interval_ms": 50,
                   "netbuf": "nfqueue", "reprotect_to": "self"}, req

    # Installing next to another program's qemu hook goes to qemu.d/, twice is a no-op.
    d = tmp_path / "hooks"
    d.mkdir()
    (d / "qemu").write_text("#!/bin/sh\nexit 0\n")
    for _ in range(2):
        i = subprocess.run([str(INSTALL_HOOK), str(d)], capture_output=True, text=True, timeout=30)
        assert i.returncode == 0, i.stderr
    assert (d / "qemu").read_text() == "#!/bin/sh\nexit 0\n"
    assert (d / "qemu.d" / "remus").read_bytes() == HOOK.read_bytes()
    assert "is up to date" in i.stdout


def test_reprotect_after_failover_and_fail_back_through_libvirt(lvworlds, world, request):
    """libvirt mode, both ways: A -> B failover into B's libvirt, then B's
    remusd protects the restored domain back to A (no --connect: it knows the
    domain it restored), then `virsh destroy` in B fails it back into A's
    libvirt. Counter and memory checker at every step."""
    a = lvworlds.start("A")
    b = lvworlds.start("B")
    backup = world.start_backup("B", extra=["--libvirt-uri", b.uri, "--libvirt-pid-dir", str(b.pid_dir)])
    primary = world.start_backup("A", extra=["--libvirt-uri", a.uri, "--libvirt-pid-dir", str(a.pid_dir)])
    a.define(domain_xml(a))
    a.start_domain(DOMAIN)
    wait_booted(world, a)
    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--interval", "100", "--netbuf", "none",
                    "--disks", "none")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()

    def fail_over(src_daemon, src_world, dst_daemon, dst_world):
        world.wait_status(src_daemon, lambda s: s["role"] == "primary" and s["state"] == "protected"
                          and s["last_acked_epoch"] >= 20, 120, "20 acked checkpoints")
        c0 = counter(src_world)
        e0 = src_daemon.status()["last_staged_epoch"]
        world.wait_status(src_daemon, lambda s: s["last_acked_epoch"] > e0, 30, f"an ack beyond epoch {e0}")
        src_world.destroy(DOMAIN)
        st = world.wait_status(dst_daemon, lambda s: s["state"] in ("failed-over", "failed") and s["role"] != "primary",
                               60, "promotion")
        assert st["state"] == "failed-over" and st["libvirt"]["uri"] == dst_world.uri, st
        c1 = counter(dst_world)
        assert c1 >= c0, (c0, c1)
        world.wait_for(lambda: counter(dst_world) > c1 + 300, 30, "the restored counter to advance", interval=0.5)
        serial = dst_daemon.domain_dir() / "run" / "serial.log"
        before = read_text(serial).count(CHECK_OK)
        world.wait_for(lambda: read_text(serial).count(CHECK_OK) >= before + 2, 30, "'check ok' lines", interval=0.5)
        assert "CHECKER FAIL" not in read_text(serial)
        return st

    st1 = fail_over(primary, a, backup, b)
    r = backup.ctl("protect", DOMAIN, "--backup", primary.listen, "--interval", "100", "--netbuf", "none",
                   "--disks", "none")
    assert r.returncode == 0, f"re-protect: {r.stdout}{r.stderr}" + world.diagnostics()
    st = world.wait_status(backup, lambda s: s["role"] == "primary" and s["state"] == "protected", 120,
                           "B's re-protection")
    assert st["libvirt"]["uri"] == b.uri, st
    st2 = fail_over(backup, b, primary, a)
    assert a.domstate(DOMAIN)[0] == "running", a.domstate(DOMAIN)
    record(request, failover1_ms=st1["promotion"]["failover_ms"], failover2_ms=st2["promotion"]["failover_ms"])
