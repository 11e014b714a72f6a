"""Kill the primary QEMU in each phase of the checkpoint protocol.

  (a) during the initial copy: nothing committed, the backup must not start a guest
  (b) between REQUEST and LOADED (guest paused mid-checkpoint, via --fault)
  (c) between LOADED and ACK (the backup holds its ACKs, via --ack-delay-ms)
  (d) idle, right after an ACK, with a long interval
"""

import json
import os
import re
import time

import pytest

from conftest import COUNTER_MAX_RATE, check_promoted, pid_cmdline, read_text, record, setup_protected

CHECK_WINDOW_S = 10


@pytest.mark.both_qemus
def test_kill_during_initial_sync(world, request):
    backup = world.start_backup()
    primary = world.start_primary()
    # A big guest with a big working set so the initial copy takes seconds
    # (about 4 s here for 1 GiB with 512 MiB in use), uncompressed: LZ4 sends
    # the test guest's pages (three words each) almost for free.
    guest = world.start_guest(mem_mb=1024, wss_mib=512)
    world.protect(primary, backup, guest, no_wait=True, extra=("--compress", "none"))

    def syncing_both():
        p, b = primary.status(), backup.status()
        if p is None or b is None:
            return None
        assert p["state"] in ("starting", "syncing"), f"primary left syncing before the kill: {p}"
        assert b["last_committed_epoch"] < 0, f"backup committed before the kill: {b}"
        # Kill once the copy is well under way on both sides.
        if p["state"] == "syncing" and b["state"] == "syncing" and b["sync"]["done_bytes"] >= 32 << 20:
            return p, b
        return None
    p, b = world.wait_for(syncing_both, 30, "the initial copy to be under way", interval=0.02)
    guest.kill()
    t_kill = time.monotonic()
    # The kill landed in the syncing window if the backup still had nothing committed.
    b_after = backup.status()
    assert b_after["last_committed_epoch"] < 0, f"initial copy committed before the kill landed: {b_after}"

    # The primary reports its QEMU lost (FAILOVER) or, if that frame is lost,
    # the backup notices the silence after the heartbeat timeout; either way
    # it then tries to promote, and must refuse.
    world.wait_status(backup, lambda s: s["state"] in ("failed", "failed-over") or
                      s["promotion"]["state"] in ("promoted", "promotion-failed"), 15,
                      "the backup to attempt (and refuse) a promotion")
    time.sleep(1.0)  # nothing changes afterwards
    st = backup.status()
    info = json.dumps(st, indent=1)
    assert st["state"] != "failed-over", f"backup promoted without a committed checkpoint: {info}"
    assert st["state"] != "promoting", info
    assert st["last_committed_epoch"] < 0, info
    errors = " ".join([st.get("error", ""), st["promotion"].get("error", "")]).lower()
    assert st["state"] == "failed", info
    assert st["promotion"]["state"] == "promotion-failed", info
    assert "no committed checkpoint" in errors, f"error does not explain the refusal: {info}"
    assert st["qemu"]["pid"] == -1 and not st["qmp_socket"], f"a restored QEMU is reported: {info}"
    run = backup.domain_dir() / "run"
    assert not (run / "qemu.pid").exists(), f"{run}/qemu.pid exists"
    for pid_s in [p for p in os.listdir("/proc") if p.isdigit()]:
        argv = pid_cmdline(int(pid_s))
        assert not (argv and b"qemu" in argv[0] and any(str(run).encode() in a for a in argv)), \
            f"a restored QEMU runs: pid {pid_s} {argv}"
    pst = primary.status()
    record(request, killed_at_percent=round(p["sync"]["percent"], 1),
           backup_done_mib=b["sync"]["done_bytes"] >> 20, backup_state=st["state"],
           backup_error=st["promotion"].get("error") or st.get("error"), primary_state=pst and pst["state"],
           settle_s=round(time.monotonic() - t_kill, 1))


def _stall_mid_checkpoint(world):
    """Protects with the primary stalling right after REPLY of epoch 60 (QEMU has
    paused the guest and is sending a checkpoint nobody reads any more) and
    waits until it is stalled there.  Returns (Protected, c0, p_kill, evidence)."""
    pr = setup_protected(world, interval_ms=100, primary_kw={"fault": "stall-after-reply@60"}, wait_epochs=50)
    c0 = pr.acked_reference()
    qmp = pr.guest.qmp  # connect now: QMP may stop answering during the stall (see below)
    world.wait_status(pr.primary, lambda s: s["last_acked_epoch"] >= 59, 30, "epoch 59 acked")
    world.wait_for(lambda: "stalling after REPLY of epoch 60" in read_text(pr.primary.log), 10,
                   "the primary remusd to stall in epoch 60")
    # The guest must be paused.  QEMU's COLO thread writes the checkpoint's RAM
    # while holding the BQL (qemu_savevm_live_state, the upstream fix this QEMU
    # carries); once the stalled reader lets the socket fill (a checkpoint is
    # >300 KB even with an idle guest), the main loop and with it QMP block
    # until the socket closes.  So either query-status answers "not running",
    # or it cannot answer at all, and then the serial console shows the guest
    # stopped (no counter line for 2.5 s; it prints one every second).
    try:
        qs = qmp.execute("query-status", timeout=2)
        assert not qs["running"], f"guest runs during the stalled checkpoint: {qs}"
        evidence = f"query-status {qs['status']}"
        p_kill = qmp.counter()
    except (TimeoutError, OSError):
        evidence = "QMP blocked (BQL held by the COLO thread) and console silent"
        p_kill = None
    lines = read_text(pr.guest.serial).count("remus-guest: counter=")
    time.sleep(2.5)
    assert read_text(pr.guest.serial).count("remus-guest: counter=") == lines, \
        "the guest kept printing while its checkpoint was stalled" + world.diagnostics()
    st = pr.pstatus()
    assert st["last_acked_epoch"] == 59 and st["last_staged_epoch"] == 59, st
    assert pr.bstatus()["last_committed_epoch"] == 59, pr.bstatus()
    if p_kill is None:
        # The last value the guest printed; the paused counter is at most about
        # one second of counting beyond it (check_promoted adds one more second).
        printed = [int(v) for v in re.findall(r"remus-guest: counter=(\d+)", read_text(pr.guest.serial))]
        p_kill = printed[-1] + COUNTER_MAX_RATE
    return pr, c0, p_kill, evidence


@pytest.mark.both_qemus
def test_kill_between_request_and_loaded(world, request):
    pr, c0, p_kill, evidence = _stall_mid_checkpoint(world)
    pr.guest.kill()
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=CHECK_WINDOW_S, timeout=5, exact_epoch=59)
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"], paused_evidence=evidence,
           committed=m["committed_counter"], p_kill=p_kill, detect_s=round(m["detect_s"], 2))


@pytest.mark.both_qemus
def test_kill_host_between_request_and_loaded(world, request):
    """The same phase, but the whole primary host dies (QEMU and remusd): the
    backup must promote from epoch 59 after the heartbeat timeout.  This covers
    the phase while test_kill_between_request_and_loaded is blocked by a bug."""
    pr, c0, p_kill, evidence = _stall_mid_checkpoint(world)
    pr.guest.kill()
    pr.primary.kill()
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=CHECK_WINDOW_S, timeout=20, exact_epoch=59)
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"], paused_evidence=evidence,
           committed=m["committed_counter"], p_kill=p_kill, detect_s=round(m["detect_s"], 2))


@pytest.mark.both_qemus
def test_kill_between_loaded_and_ack(world, request):
    # The backup commits at once but holds each ACK for 1.5 s, so the newest
    # checkpoints are committed on the backup and not yet acked on the primary.
    # (At most 8 epochs may be unacked, so a 100 ms interval runs at ~5
    # checkpoints/s; 3 s would take 20 s to reach 50.)
    hb = {"hb_interval_ms": 200, "hb_timeout_ms": 5000}
    pr = setup_protected(world, interval_ms=100, backup_kw=dict(ack_delay_ms=1500, **hb), primary_kw=hb,
                         wait_epochs=0)
    world.wait_status(pr.primary, lambda s: s["checkpoints_total"] >= 50, 60, "50 checkpoints")
    c0 = pr.acked_reference()
    st = world.wait_status(pr.primary, lambda s: s["unacked_epochs"] >= 1 and s["last_acked_epoch"] >= 1, 10,
                           "unacked epochs")
    p_kill = pr.guest.counter()
    st = pr.pstatus()
    pr.guest.kill()
    acked_at_kill = st["last_acked_epoch"]
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=CHECK_WINDOW_S, timeout=20,
                       min_epoch=acked_at_kill)
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"], acked_at_kill=acked_at_kill,
           staged_at_kill=st["last_staged_epoch"], unacked_at_kill=st["unacked_epochs"],
           committed=m["committed_counter"], p_kill=p_kill)


@pytest.mark.both_qemus
def test_kill_idle_after_ack(world, request):
    pr = setup_protected(world, interval_ms=2000, wait_epochs=1)
    # Read the counter (then the newest staged epoch e0), and kill right after
    # the ack of the next epoch: the guest has then run ~2 s past the
    # last checkpoint, all of it speculative.
    c0 = pr.guest.counter()
    e0 = pr.pstatus()["last_staged_epoch"]  # after c0: see Protected.acked_reference
    st = world.wait_status(pr.primary, lambda s: s["last_acked_epoch"] > e0, 10, f"an ack beyond epoch {e0}",
                           interval=0.005)
    p_kill = pr.guest.counter()
    pr.guest.kill()
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=CHECK_WINDOW_S, timeout=20,
                       min_epoch=st["last_acked_epoch"])
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"],
           acked_at_kill=st["last_acked_epoch"], committed=m["committed_counter"], p_kill=p_kill)
