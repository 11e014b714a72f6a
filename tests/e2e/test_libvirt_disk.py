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
from test_libvirt_mode import PROBE, counter, libvirt_daemons, probe, wait_booted

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
