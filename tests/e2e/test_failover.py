"""Failover end to end: kill the primary QEMU after checkpoints and check that
the backup resumes the guest from a state no older than anything acked and no
newer than the kill, and that the restored guest is consistent."""

import re
import time

import pytest

from conftest import DEFAULT_HB_TIMEOUT_MS, DOMAIN, check_promoted, read_text, record, setup_protected


@pytest.mark.both_qemus
def test_failover_after_checkpoints(world, request):
    pr = setup_protected(world, interval_ms=100, wait_epochs=50)
    c0 = pr.acked_reference()
    st = pr.pstatus()
    assert st["state"] == "protected" and st["last_acked_epoch"] >= 50, st
    assert st["checkpoints_total"] >= 50, st
    assert pr.bstatus()["state"] == "protected", pr.bstatus()

    p_kill = pr.guest.counter()
    pr.guest.kill()
    t_kill = time.monotonic()

    m = check_promoted(world, pr.backup, c0, p_kill, window_s=20)
    pst = pr.pstatus()
    assert pst["state"] == "failed-over", f"primary after its QEMU died: {pst}"
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"],
           acked_at_kill=st["last_acked_epoch"], c0=c0, committed=m["committed_counter"], p_kill=p_kill,
           restored_start=m["restored_counter_start"], detect_to_failed_over_s=round(m["detect_s"], 2),
           kill_to_check_s=round(time.monotonic() - t_kill, 1), pause_p50=st["pause_ms"]["p50"],
           pause_p99=st["pause_ms"]["p99"])


def _manual_failover(world, backup):
    r = backup.ctl("failover", DOMAIN, timeout=60)
    assert r.returncode == 0, f"remusctl failover failed: {r.stdout}{r.stderr}" + world.diagnostics()
    assert "running here" in r.stdout and "qmp.sock" in r.stdout, r.stdout
    return r.stdout.strip()


def test_manual_failover_after_primary_remusd_loss(world, request):
    """--no-auto-promote: the backup notices the primary's loss but waits for the
    operator; `remusctl failover` then promotes from the last committed epoch."""
    pr = setup_protected(world, interval_ms=100, backup_kw={"auto_promote": False}, wait_epochs=20)
    c0 = pr.acked_reference()
    p_kill = pr.guest.counter()
    pr.primary.kill()
    # Fail-stop assumption as in test_kill_primary_remusd: the old QEMU keeps
    # running until cleanup.
    st = world.wait_status(pr.backup, lambda s: not s["connected"], 5, "the backup to lose the primary")
    time.sleep(DEFAULT_HB_TIMEOUT_MS / 1000 + 1.5)  # well past the heartbeat timeout
    st = pr.backup.status()
    assert st["state"] not in ("promoting", "failed-over"), f"promoted despite --no-auto-promote: {st}"
    assert st["state"] == "primary-lost", st
    assert st["qemu"]["pid"] == -1 and st["promotion"]["failover_ms"] == -1, st
    assert "lost the primary" in st["error"], st
    out = _manual_failover(world, pr.backup)
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=5, timeout=5)
    # A second failover is refused: it cannot promote twice.
    r = pr.backup.ctl("failover", DOMAIN)
    assert r.returncode != 0, f"second failover accepted: {r.stdout}{r.stderr}"
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"], output=out,
           second_failover=r.stderr.strip())


def test_no_auto_promote_when_primary_qemu_dies(world, request):
    pr = setup_protected(world, interval_ms=100, backup_kw={"auto_promote": False}, wait_epochs=5)
    c0 = pr.acked_reference()
    p_kill = pr.guest.counter()
    pr.guest.kill()
    time.sleep(2.0)
    st = pr.backup.status()
    # The FAILOVER frame must arrive (the primary shuts down only its write
    # side after it, so a reset cannot cut it off).
    assert "primary reports its guest lost" in read_text(pr.backup.log), st
    assert st["state"] == "primary-lost", st
    assert st["state"] not in ("promoting", "failed-over"), (
        f"promoted on the primary's FAILOVER despite --no-auto-promote: {st['promotion']}")
    assert st["qemu"]["pid"] == -1, st
    _manual_failover(world, pr.backup)
    check_promoted(world, pr.backup, c0, p_kill, window_s=5, timeout=5)


def test_manual_failover_shows_progress(world, request):
    """remusctl failover reports the promotion's phase and how much guest
    memory has been streamed into the new QEMU while it runs (plain lines when
    stdout is not a terminal). A 1 GiB guest streamed (--restore stream) takes
    long enough to restore here for the 150 ms polls to see it."""
    pr = setup_protected(world, interval_ms=100, backup_kw={"auto_promote": False, "extra": ["--restore", "stream"]},
                         wait_epochs=5, guest_kw={"mem_mb": 1024, "wss_mib": 640, "dirty": 20000})
    assert pr.bstatus()["restore_plan"]["mode"] == "streamed", pr.bstatus()
    c0 = pr.acked_reference()
    p_kill = pr.guest.counter()
    pr.primary.kill()
    world.wait_status(pr.backup, lambda s: s["state"] == "primary-lost", 15, "the backup to notice the loss")
    t0 = time.monotonic()
    out = _manual_failover(world, pr.backup)
    took = time.monotonic() - t0
    lines = [l for l in out.splitlines() if "of guest memory streamed" in l]
    assert lines, f"no progress line in {took:.2f} s of failover:\n{out}"
    # Every progress line names the phase and counts against the guest's RAM
    # (1 GiB plus QEMU's ROMs), never past it.
    for l in lines:
        done, total = (int(x) for x in re.search(r"(\d+) of (\d+) MiB", l).groups())
        assert 1024 <= total < 1200 and 0 <= done <= total, l
    assert "checkpoint streamed" in out and "--restore stream" in out, out
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=5, timeout=10)
    assert pr.backup.status()["promotion"].get("phase") is None, "a finished promotion still reports a phase"
    record(request, failover_ms=m["failover_ms"], progress_lines=lines, output=out)


def test_failover_maps_main_ram_from_the_hot_store(world, request):
    """The default: the backup keeps the store locked in memory (residency
    hot) and a failover maps the guest's main RAM from it (restore by
    mapping). Only device state and the small RAM blocks are streamed; the
    store still holds the committed checkpoint afterwards (check_promoted
    reads the committed counter from it), and the guest runs on."""
    pr = setup_protected(world, interval_ms=100, backup_kw={"auto_promote": False}, wait_epochs=5,
                         guest_kw={"mem_mb": 1024, "wss_mib": 640, "dirty": 20000})
    b = pr.bstatus()
    res = b["residency"]
    assert res["policy"] == "hot" and res["resident_percent"] == 100.0, res
    assert res["locked_bytes"] == res["total_bytes"] >= 1024 << 20, res
    plan = b["restore_plan"]
    assert plan["mode"] == "mapped" and plan["mapped_bytes"] == 1024 << 20, plan
    c0 = pr.acked_reference()
    p_kill = pr.guest.counter()
    pr.primary.kill()
    world.wait_status(pr.backup, lambda s: s["state"] == "primary-lost", 15, "the backup to notice the loss")
    out = _manual_failover(world, pr.backup)
    assert "main RAM mapped from the page store (1024 MiB)" in out, out
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=5, timeout=10)
    rb = pr.backup.status()["promotion"]["restored_by"]
    assert rb["mode"] == "mapped" and rb["mapped_bytes"] == 1024 << 20, rb
    # Device state plus firmware and video RAM: far below the guest's size.
    assert rb["stream_bytes"] < 64 << 20, rb
    record(request, failover_ms=m["failover_ms"], stream_bytes=rb["stream_bytes"], output=out)
