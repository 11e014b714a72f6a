"""Disk mirroring of libvirt domains end to end: libvirt attaches the <disk>s
with -blockdev; remus names each by its <target dev=> (vda), mirrors it from
its top node, and on failover the backup restores the domain into its own
libvirt with that <disk> pointed at its raw copy (STATE/domains/D/disks/vda.img).

As tests/e2e/test_disk.py: the guest writes records to vda (tests/guest:
remus.disk) and keeps, in memory, the last record it knows is on disk; the
restored guest's memory and the backup's disk must agree (its own verifier
says DISK OK, never DISK MISMATCH; tests/guest/diskcheck.py on the image).

Needs root, libvirtd/virsh and the test guest (see test_libvirt_mode.py).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QEMU, REPO, read_store_counter, read_text, record, tail
from libvirt_world import finish_worlds, LibvirtWorlds, guest_files, skip_reason
from test_libvirt_mode import CHECK_OK, PROBE, counter, libvirt_daemons, probe, wait_booted

sys.path.insert(0, str(REPO / "tests" / "guest"))
import diskcheck  # noqa: E402

DOMAIN = "web1"
DISK_MB = 64
GUEST_KERNEL, GUEST_INITRD, COUNTER_GPA, CMDLINE = guest_files()
DISK_GPA = COUNTER_GPA + 0x1000  # inside the counter's memmap=64K region
NONE = (1 << 64) - 1  # the writer's "nothing durable yet"

_why = skip_reason(PROBE)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture
def lvworlds(request):
    ws = LibvirtWorlds(prefix="remus-lvd-")
    try:
        yield ws
    finally:
        finish_worlds(request, ws)


def _make_image(dir, fmt, mb=DISK_MB, random=False):
    img = Path(dir) / f"{DOMAIN}-vda.{fmt}"
    raw = Path(dir) / "vda.raw.tmp"
    if random:
        # Incompressible, so the mirror must copy every byte (seconds).
        with open(raw, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
    else:
        subprocess.run(["truncate", "-s", f"{mb}M", str(raw)], check=True)
    if fmt == "raw":
        raw.rename(img)
    else:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(img)], check=True)
        raw.unlink()
    return img


def _disk_domain_xml(world, img, fmt, writer=True):
    cmdline = CMDLINE.replace("remus.dirty=10000", "remus.dirty=2000")
    if writer:
        cmdline += f" remus.disk=vda remus.diskgpa={DISK_GPA:#x} remus.diskrate=50 remus.diskverify=1"
    xml = world.guest_xml(DOMAIN, GUEST_KERNEL, GUEST_INITRD, cmdline, world.dir / f"{DOMAIN}.serial",
                          emulator=QEMU, disks=[img])
    if fmt != "raw":
        xml = xml.replace("<driver name='qemu' type='raw'/>", f"<driver name='qemu' type='{fmt}'/>")
    return xml


def _disk_lines(serial):
    text = read_text(serial)
    return ([l for l in text.splitlines() if "remus-guest: DISK OK" in l],
            [l for l in text.splitlines() if "DISK MISMATCH" in l or "DISK ERROR" in l])


def _last_ok(lines):
    return int(lines[-1].split("last=")[1].split()[0]) if lines else -1


def _wait_disk_ok(world, serial, n, timeout=90):
    def ok():
        good, bad = _disk_lines(serial)
        assert not bad, f"disk writer reports problems:\n{tail(serial, 30)}"
        return len(good) >= n
    world.wait_for(ok, timeout, f"{n} 'DISK OK' lines in {serial}", interval=0.2)


@pytest.mark.parametrize("fmt,select", [("raw", "all"), ("qcow2", "vda")])
def test_libvirt_disk_failover_memory_and_disk_agree(lvworlds, world, request, fmt, select):
    """`virsh destroy` on A: the backup restores the domain into B's libvirt
    on its copy of vda, and the restored guest finds on it every record its
    memory believes written."""
    a = lvworlds.start("A")
    b = lvworlds.start("B")
    primary, backup = libvirt_daemons(world, a, b)
    img = _make_image(a.dir, fmt)
    a.define(_disk_domain_xml(a, img, fmt))
    a.start_domain(DOMAIN)
    serial_a = wait_booted(world, a)
    assert img.name in a.virsh("domblklist", DOMAIN).stdout

    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--connect", a.uri, "--interval", "100",
                    "--netbuf", "none", "--disks", select)
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    st = world.wait_status(primary, lambda s: s["state"] == "protected" and s["last_acked_epoch"] >= 30, 120,
                           "30 acked checkpoints")
    assert [d["id"] for d in st["disks"]] == ["vda"] and all(d["ready"] for d in st["disks"]), st
    bst = backup.status()
    assert bst["disks"]["synced_epoch"] >= 0, bst
    assert [d["id"] for d in bst["disks"]["images"]] == ["vda"], bst
    _wait_disk_ok(world, serial_a, 3)

    # Acked reference (see conftest.Protected.acked_reference).
    c0 = counter(a)
    e0 = primary.status()["last_staged_epoch"]
    world.wait_status(primary, lambda s: s["last_acked_epoch"] > e0, 30, f"an ack beyond epoch {e0}")
    time.sleep(2)  # writes in flight at the kill
    written_before_kill = _last_ok(_disk_lines(serial_a)[0])
    a.destroy(DOMAIN)

    bst = world.wait_status(backup, lambda s: s["state"] in ("failed-over", "failed"), 60, "promotion")
    assert bst["state"] == "failed-over", json.dumps(bst, indent=1) + world.diagnostics()
    assert bst["libvirt"] == {"uri": b.uri, "domain": DOMAIN}, bst
    assert b.domstate(DOMAIN)[0] == "running", b.domstate(DOMAIN)
    image = Path(bst["disks"]["images"][0]["image"])
    assert image == backup.domain_dir() / "disks" / "vda.img", bst
    # B's libvirt runs it on the backup's raw copy, not A's image.
    blk = b.virsh("domblklist", DOMAIN).stdout
    assert str(image) in blk and str(img) not in blk, blk
    restored_xml = (backup.domain_dir() / "run" / "domain.xml").read_text()
    quoted = restored_xml.replace('"', "'")  # libxml2 writes attributes in double quotes
    assert f"<source file='{image}'/>" in quoted and "type='raw'" in quoted, restored_xml
    assert str(img) not in restored_xml and "qcow2" not in restored_xml, restored_xml

    # The committed memory's idea of what is on disk ...
    believed = read_store_counter(bst["store"], DISK_GPA)
    assert believed != NONE and believed >= 0, f"no durable record in the committed memory ({believed:#x})"
    # ... is on the backup's disk, and the restored guest agrees with it.
    serial_b = backup.domain_dir() / "run" / "serial.log"
    _wait_disk_ok(world, serial_b, 3, timeout=60)
    good, bad = _disk_lines(serial_b)
    assert not bad, f"restored guest's disk disagrees with its memory:\n{tail(serial_b, 30)}"
    assert _last_ok(good) >= believed, (good[-3:], believed)
    res = diskcheck.check(str(image))
    assert res["prefix_ok"] and res["last_seq"] >= believed, res
    c1 = counter(b)
    assert c1 >= c0, (c0, c1)
    world.wait_for(lambda: counter(b) > c1 + 500, 30, "the restored counter to advance", interval=0.5)
    record(request, fmt=fmt, failover_ms=bst["promotion"]["failover_ms"], epoch=bst["last_committed_epoch"],
           believed_on_disk=believed, written_before_kill=written_before_kill, records_on_backup=res["records"])


def test_libvirt_disk_selection_errors(lvworlds, world):
    """--disks names the <target dev=>s `virsh domblklist` shows; an unknown
    one is refused naming those there are, and the guest runs on."""
    a = lvworlds.start("A")
    primary, backup = libvirt_daemons(world, a)
    img = _make_image(a.dir, "raw", mb=16)
    a.create(_disk_domain_xml(a, img, "raw", writer=False))
    r = primary.ctl("protect", DOMAIN, "--connect", a.uri, "--backup", backup.listen, "--netbuf", "none",
                    "--disks", "vdz")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "no writable disk 'vdz'" in r.stderr and "vda" in r.stderr and "domblklist" in r.stderr, r.stderr
    assert a.domstate(DOMAIN)[0] == "running"
    assert primary.status(DOMAIN) is None


def test_libvirt_primary_lost_before_disk_copy_completes_is_not_promoted(lvworlds, world, request):
    """Until vda's background copy is complete the backup's image matches no
    checkpoint: losing the primary then must not start the domain in B."""
    a = lvworlds.start("A")
    b = lvworlds.start("B")
    primary, backup = libvirt_daemons(world, a, b)
    img = _make_image(a.dir, "raw", mb=768, random=True)
    a.create(_disk_domain_xml(a, img, "raw", writer=False))
    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--connect", a.uri, "--netbuf", "none",
                    "--no-wait")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    st = world.wait_status(primary, lambda s: s.get("last_acked_epoch", -1) >= 0, 60, "the memory copy's ack")
    assert st["state"] == "syncing" and not st["disks"][0]["ready"], f"disk copy already done: {st}"
    a.destroy(DOMAIN)
    bst = world.wait_status(backup, lambda s: s["state"] in ("failed", "failed-over"), 30, "the backup to react")
    assert bst["state"] == "failed", bst
    assert "disk copy" in bst["error"] and "never completed" in bst["error"], bst
    assert DOMAIN not in b.running_domains(), b.running_domains()
    record(request, primary_at_kill=st["disks"][0], backup_error=bst["error"])


def test_libvirt_unprotect_cancels_the_mirror_and_the_guest_keeps_its_disk(lvworlds, world):
    """Ending protection cancels the mirror job and removes the nbd node
    through libvirt; the guest writes on to its own disk."""
    a = lvworlds.start("A")
    primary, backup = libvirt_daemons(world, a, auto_promote=False)
    img = _make_image(a.dir, "raw")
    a.create(_disk_domain_xml(a, img, "raw"))
    serial_a = wait_booted(world, a)
    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--connect", a.uri, "--netbuf", "none")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    world.wait_status(primary, lambda s: s["state"] == "protected" and s["last_acked_epoch"] >= 10, 120,
                      "10 acked checkpoints")
    jobs = probe(a, "exec", "query-block-jobs")["return"]
    assert [j["device"] for j in jobs] == ["remus-vda"], jobs
    r = primary.ctl("unprotect", DOMAIN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert probe(a, "exec", "query-block-jobs")["return"] == []
    nodes = [n["node-name"] for n in probe(a, "exec", "query-named-block-nodes")["return"]]
    assert not any(n.startswith("remus-") for n in nodes), nodes
    before = len(_disk_lines(serial_a)[0])
    _wait_disk_ok(world, serial_a, before + 3, timeout=30)
    assert a.domstate(DOMAIN)[0] == "running"


def test_libvirt_switchover_there_and_back_with_disk(lvworlds, world, request):
    """`remusctl switchover` of a libvirt domain with a mirrored disk, A -> B
    and back: each hop's final checkpoint is restored into the other side's
    libvirt on that side's copy of vda; the old side's domain is destroyed
    through its libvirt; the new side protects the guest back, its disk too
    (reverse protection into the old side's libvirt); the restored guest's
    memory checker passes and its disk holds every record its memory believes
    written, on both hops."""
    a = lvworlds.start("A")
    b = lvworlds.start("B")
    # Both remusds listen and know their libvirt: each is the other's backup in turn.
    db = world.start_backup("B", extra=["--libvirt-uri", b.uri, "--libvirt-pid-dir", str(b.pid_dir)])
    da = world.start_backup("A", extra=["--libvirt-uri", a.uri, "--libvirt-pid-dir", str(a.pid_dir)])
    img = _make_image(a.dir, "raw")
    a.define(_disk_domain_xml(a, img, "raw"))
    a.start_domain(DOMAIN)
    serial_a = wait_booted(world, a)
    r = da.ctl("protect", DOMAIN, "--backup", db.listen, "--interval", "100", "--netbuf", "none")
    assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    _wait_disk_ok(world, serial_a, 3)
    hops = []
    for hop, (src, sw, dst, dw) in enumerate([(da, a, db, b), (db, b, da, a)]):
        world.wait_status(src, lambda s: s["role"] == "primary" and s["state"] == "protected"
                          and s["last_acked_epoch"] >= 20 and s["disks"] and all(d["ready"] for d in s["disks"]),
                          120, f"hop {hop}: 20 acked checkpoints with the disk copy complete")
        c0 = counter(sw)
        e0 = src.status(role="primary")["last_staged_epoch"]
        world.wait_status(src, lambda s: s["last_acked_epoch"] > e0, 30, f"an ack beyond epoch {e0}")
        r = src.ctl("switchover", DOMAIN, timeout=180)
        assert r.returncode == 0, f"hop {hop}: switchover rc {r.returncode}\n{r.stdout}{r.stderr}" + world.diagnostics()
        assert "protected again, from" in r.stdout, r.stdout
        pst = src.call({"command": "status", "domain": DOMAIN, "role": "primary"})["result"]["domains"][0]
        final = pst["switchover"]["final_epoch"]
        assert pst["state"] == "switched-over" and pst["switchover"]["phase"] == "done", pst["switchover"]
        # The old side's domain was destroyed through its libvirt (after the
        # backup was told): A's defined domain is left shut off, B's restored
        # (transient) one is gone.
        world.wait_for(lambda: sw.domstate(DOMAIN)[0] == ("shut off" if hop == 0 else ""), 30,
                       f"hop {hop}: the old side's domain off in its libvirt", interval=0.2)
        bst = dst.call({"command": "status", "domain": DOMAIN, "role": "backup"})["result"]["domains"][0]
        assert bst["last_committed_epoch"] == final and bst["promotion"]["switchover_epoch"] == final, bst
        assert bst["libvirt"] == {"uri": dw.uri, "domain": DOMAIN}, bst
        # Protected again in reverse: libvirt shows the guest "paused" during
        # each checkpoint's pause, so running is what it comes back to.
        world.wait_for(lambda: dw.domstate(DOMAIN)[0] == "running", 10,
                       f"hop {hop}: the guest running in its new host's libvirt", interval=0.05)
        # dw's libvirt runs it on dst's own copy of vda.
        image = Path(bst["disks"]["images"][0]["image"])
        assert image == dst.domain_dir() / "disks" / "vda.img", bst
        assert str(image) in dw.virsh("domblklist", DOMAIN).stdout
        c1 = counter(dw)
        assert c1 >= c0, (c0, c1)
        world.wait_for(lambda: counter(dw) > c1 + 500, 30, "the restored counter to advance", interval=0.5)
        serial = dst.domain_dir() / "run" / "serial.log"
        before = read_text(serial).count(CHECK_OK)
        world.wait_for(lambda: read_text(serial).count(CHECK_OK) >= before + 2, 30,
                       "more 'check ok' lines from the restored guest", interval=0.5)
        assert "CHECKER FAIL" not in read_text(serial)
        # The disk: every record the final checkpoint's memory believes durable is on it.
        believed = read_store_counter(bst["store"], DISK_GPA)
        assert believed != NONE and believed >= 0, f"hop {hop}: no durable disk record in the final checkpoint"
        _wait_disk_ok(world, serial, 2, timeout=60)
        good, bad = _disk_lines(serial)
        assert not bad and _last_ok(good) >= believed, (hop, good[-2:], bad, believed)
        # The reverse protection runs from dst's libvirt to src's, with the disk.
        st = world.wait_status(dst, lambda s: s["role"] == "primary" and s["state"] == "protected"
                               and s["disks"] and all(d["ready"] for d in s["disks"]), 120,
                               f"hop {hop}: the reverse protection with its disk")
        assert st["libvirt"]["uri"] == dw.uri, st
        hops.append({"final_epoch": final, "took_ms": pst["switchover"]["took_ms"],
                     "failover_ms": bst["promotion"]["failover_ms"], "disk_record": believed})
    assert a.domstate(DOMAIN)[0] == "running" and b.running_domains() == [], (a.domstate(DOMAIN), b.running_domains())
    record(request, hops=hops)
