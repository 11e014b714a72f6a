"""Disk mirroring end to end: the guest writes records to a virtio-blk disk
(tests/guest: remus.disk / remus.diskfs) and keeps, in memory, the last
record it knows is on disk. After a failover the restored guest's memory and
the backup's disk must agree: every record the guest believes written is
there and intact (its own verifier says DISK OK, never DISK MISMATCH)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (COUNTER_GPA, DOMAIN, REPO, check_promoted, read_store_counter, read_text, record,
                      setup_protected, tail)

DISK_MB = 64
DISK_GPA = COUNTER_GPA + 0x1000  # inside the counter's memmap=64K region
NONE = (1 << 64) - 1  # the writer's "nothing durable yet"
sys.path.insert(0, str(REPO / "tests" / "guest"))
import diskcheck  # noqa: E402


def _make_image(world, fmt, fs=False):
    img = world.dir / f"disk.{fmt}"
    raw = world.dir / "disk.raw.tmp"
    subprocess.run(["truncate", "-s", f"{DISK_MB}M", str(raw)], check=True)
    if fs:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    if fmt == "raw":
        raw.rename(img)
    else:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(img)], check=True)
        raw.unlink()
    return img


def _disk_guest(world, fmt="raw", fs=False, rate=50):
    img = _make_image(world, fmt, fs)
    knob = "remus.diskfs=vda remus.diskfsgpa" if fs else "remus.disk=vda remus.diskgpa"
    return img, {
        "extra_args": ["-drive", f"file={img},if=none,format={fmt},id=drive0,cache=none",
                       "-device", "virtio-blk-pci,drive=drive0"],
        "extra_append": f"{knob}={DISK_GPA:#x} remus.diskrate={rate} remus.diskverify=1",
    }


def check_restored_disk(world, dst, what):
    """dst promoted the guest: its disk holds every record that dst's
    committed memory believes durable (the disk writer's checker, run by the
    restored guest, found nothing missing or wrong). Returns that record."""
    believed = read_store_counter(dst.status(role="backup")["store"], DISK_GPA)
    assert believed != NONE and believed >= 0, f"{what}: no durable disk record in the committed memory"
    rserial = dst.domain_dir() / "run" / "serial.log"
    _wait_disk_ok(world, rserial, 2, timeout=60)
    good, bad = _disk_lines(rserial)
    assert not bad and _last_ok(good) >= believed, (what, good[-2:], bad, believed)
    return believed


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


def _protected_with_disk(world, fmt="raw", fs=False, wait_epochs=30, **kw):
    img, guest_kw = _disk_guest(world, fmt, fs)
    guest_kw["dirty"] = 2000
    pr = setup_protected(world, interval_ms=100, guest_kw=guest_kw, wait_epochs=wait_epochs, **kw)
    return pr, img


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.both_qemus
def test_disk_failover_memory_and_disk_agree(world, request, fmt):
    pr, img = _protected_with_disk(world, fmt)
    st = pr.pstatus()
    assert st["state"] == "protected", st
    assert [d["id"] for d in st["disks"]] == ["drive0"] and all(d["ready"] for d in st["disks"]), st
    bst = pr.bstatus()
    assert bst["disks"]["synced_epoch"] >= 0, bst
    _wait_disk_ok(world, pr.guest.serial, 3)
    c0 = pr.acked_reference()
    time.sleep(2)  # writes in flight at the kill
    p_kill = pr.guest.counter()
    good, _ = _disk_lines(pr.guest.serial)
    written_before_kill = _last_ok(good)
    pr.guest.kill()

    m = check_promoted(world, pr.backup, c0, p_kill, window_s=6)
    bst = pr.backup.status()
    # The committed memory's idea of what is on disk ...
    believed = read_store_counter(bst["store"], DISK_GPA)
    assert believed != NONE and believed >= 0, f"no durable record in the committed memory ({believed:#x})"
    # ... is on the backup's disk, and the restored guest agrees with it.
    serial = pr.backup.domain_dir() / "run" / "serial.log"
    _wait_disk_ok(world, serial, 3, timeout=60)
    good, bad = _disk_lines(serial)
    assert not bad, f"restored guest's disk disagrees with its memory:\n{tail(serial, 30)}"
    assert _last_ok(good) >= believed, (good[-3:], believed)
    image = Path(bst["disks"]["images"][0]["image"])
    r = diskcheck.check(str(image))
    assert r["prefix_ok"] and r["last_seq"] >= believed, r
    record(request, fmt=fmt, failover_ms=m["failover_ms"], epoch=m["epoch"], believed_on_disk=believed,
           written_before_kill=written_before_kill, records_on_backup=r["records"])


def test_dual_failure_recovers_a_committed_checkpoint(world, request):
    """Both hosts die (daemons and QEMUs, kill -9) while the guest writes to
    ext4. The backup's image is rebuilt from its journal alone when its remusd
    restarts: one committed checkpoint's disk, a filesystem that checks clean,
    records a prefix with no holes, at least every record the committed memory
    believes written."""
    pr, img = _protected_with_disk(world, "raw", fs=True, backup_kw={"auto_promote": False})
    _wait_disk_ok(world, pr.guest.serial, 3)
    pr.acked_reference()
    time.sleep(1.5)
    for p in (pr.guest, pr.primary, pr.backup):
        p.kill()
    b2 = world.start_backup(name=pr.backup.name, auto_promote=False)  # same state dir
    st = world.wait_status(b2, lambda s: s["state"] == "primary-lost", 30, "the restarted backup to recover")
    believed = read_store_counter(st["store"], DISK_GPA)
    assert believed != NONE, "the committed memory holds no durable record"
    image = Path(st["disks"]["images"][0]["image"])
    copy = world.dir / "recovered.img"
    shutil.copyfile(image, copy)
    # The guest's ext4 journal replays as after a power cut; then it must be clean.
    r = subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(copy)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    r = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, f"filesystem not clean:\n{r.stdout}{r.stderr}"
    mnt = world.dir / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(copy), str(mnt)], check=True)
    try:
        res = diskcheck.check(str(mnt / "records"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert res["prefix_ok"], res
    assert res["last_seq"] >= believed, (res, believed)
    record(request, believed_on_disk=believed, records=res["records"], last_seq=res["last_seq"])


def test_unprotect_cancels_the_mirror_and_the_guest_keeps_its_disk(world):
    pr, img = _protected_with_disk(world, "raw", wait_epochs=10)
    r = pr.primary.ctl("unprotect", DOMAIN)
    assert r.returncode == 0, r.stdout + r.stderr
    q = pr.guest.qmp
    assert q.execute("query-block-jobs") == [], q.execute("query-block-jobs")
    nodes = [n["node-name"] for n in q.execute("query-named-block-nodes")]
    assert not any(n.startswith("remus-") for n in nodes), nodes
    before = len(_disk_lines(pr.guest.serial)[0])
    _wait_disk_ok(world, pr.guest.serial, before + 3, timeout=30)
    assert q.status() == "running"


def test_disk_selection_errors(world):
    img, guest_kw = _disk_guest(world)
    guest = world.start_guest(check=False, **guest_kw)
    backup = world.start_backup()
    primary = world.start_primary()
    r = primary.ctl("protect", DOMAIN, "--qmp", str(guest.qmp_sock), "--backup", backup.listen,
                    "--disks", "nosuch")
    assert r.returncode != 0
    assert "no writable disk 'nosuch'" in (r.stdout + r.stderr) and "drive0" in (r.stdout + r.stderr), r.stdout + r.stderr
    assert guest.qmp.status() == "running"


def test_primary_lost_before_disk_copy_completes_is_not_promoted(world, request):
    """Until the disk's background copy is complete the backup's image matches
    no checkpoint: losing the primary then must not start a guest on it. The
    backup says why instead."""
    img = world.dir / "big.raw"
    # Incompressible data, so the mirror has to copy every byte (a few seconds).
    with open(img, "wb") as f:
        for _ in range(768):
            f.write(os.urandom(1 << 20))
    guest = world.start_guest(check=False, extra_args=[
        "-drive", f"file={img},if=none,format=raw,id=drive0,cache=none", "-device", "virtio-blk-pci,drive=drive0"])
    backup = world.start_backup()
    primary = world.start_primary()
    world.protect(primary, backup, guest, no_wait=True, extra=("--netbuf", "none"))
    st = world.wait_status(primary, lambda s: s.get("last_acked_epoch", -1) >= 0, 60, "the memory copy's ack")
    assert st["state"] == "syncing" and not st["disks"][0]["ready"], f"disk copy already done: {st}"
    guest.kill()
    bst = world.wait_status(backup, lambda s: s["state"] in ("failed", "failed-over"), 30, "the backup to react")
    assert bst["state"] == "failed", bst
    assert "disk copy" in bst["error"] and "never completed" in bst["error"], bst
    assert bst["qemu"]["pid"] == -1, f"a guest was started on an incomplete disk: {bst}"
    record(request, primary_at_kill=st["disks"][0], backup_error=bst["error"])


def test_backup_disk_full_stops_acking_with_a_clear_error(world, request):
    """The backup's filesystem fills up while the disk copy is journaled: the
    backup must not ack a checkpoint whose writes are not durable, must say
    why, and the primary's guest keeps running unprotected."""
    state = world.dir / "B"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "remus-e2e-full", str(state)], check=True)
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(state)], check=False))
    img = world.dir / "big.raw"
    with open(img, "wb") as f:
        for _ in range(512):  # 512 MiB the 300 MiB filesystem cannot journal
            f.write(os.urandom(1 << 20))
    guest = world.start_guest(wss_mib=16, dirty=1000, extra_args=[
        "-drive", f"file={img},if=none,format=raw,id=drive0,cache=none", "-device", "virtio-blk-pci,drive=drive0"])
    backup = world.start_backup(name="B")
    primary = world.start_primary()
    world.protect(primary, backup, guest, no_wait=True, extra=("--netbuf", "none"))
    st = world.wait_status(primary, lambda s: s["state"] in ("unprotected", "protected"), 120,
                           "protection to end on the full backup")
    assert st["state"] == "unprotected", f"protected although the backup's disk is full: {st}"
    assert "not durable" in st["error"] and "No space left" in st["error"] and "is full" in st["error"], st["error"]
    bst = backup.status()
    assert bst["last_committed_epoch"] >= st["last_acked_epoch"], (bst, st)
    q = guest.qmp
    assert q.status() == "running"
    assert q.execute("query-block-jobs") == [], "the mirror job outlived protection"
    c = guest.counter()
    time.sleep(1)
    assert guest.counter() > c, "the guest does not run"
    record(request, primary_error=st["error"], last_acked=st["last_acked_epoch"])
