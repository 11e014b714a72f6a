"""Losing a daemon rather than the guest: the primary remusd (the backup takes
over after the heartbeat timeout) or the backup remusd (the guest keeps running
on the primary, unprotected)."""

import time

import pytest

from conftest import DEFAULT_HB_TIMEOUT_MS, DOMAIN, check_promoted, record, setup_protected


# The heartbeat timeout of both daemons (the harness default, see conftest.py).
HB_S = DEFAULT_HB_TIMEOUT_MS / 1000


def test_kill_primary_remusd(world, request):
    pr = setup_protected(world, interval_ms=100, wait_epochs=50)
    c0 = pr.acked_reference()
    bst = pr.bstatus()
    assert bst["state"] == "protected" and bst["connected"], bst
    p_kill = pr.guest.counter()
    pr.primary.kill()
    # Fail-stop assumption: a dead primary remusd stands for a dead primary
    # host. Here the old primary QEMU survives (QEMU leaves COLO when the
    # stream breaks and keeps running), so two copies of the guest run until
    # the world fixture kills the old one at cleanup. Arbitration against this
    # split brain (fencing / etcd) is a later issue; this test only checks the
    # backup side.
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=10, timeout=20)
    detect = m["detect_s"]  # from the kill until the backup reported failed-over
    # The backup waits out the heartbeat timeout before promoting.
    assert m["detect_s"] >= HB_S - 0.2, \
        f"promoted {m['detect_s']:.2f}s after the kill, before the {HB_S} s heartbeat timeout"
    assert m["detect_s"] < HB_S + 5.0, f"promotion took {m['detect_s']:.2f}s after the kill"
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"],
           kill_to_failed_over_s=round(detect, 2), committed=m["committed_counter"], p_kill=p_kill)


def _assert_keeps_running(world, guest, seconds):
    """The guest runs and its counter strictly increases over `seconds` (sampled twice a second)."""
    last = guest.counter()
    end = time.monotonic() + seconds
    samples = 0
    while time.monotonic() < end:
        time.sleep(0.5)
        st = guest.qmp.execute("query-status")
        assert st["running"] and st["status"] == "running", f"primary guest not running: {st}" + world.diagnostics()
        c = guest.counter()
        assert c > last, f"primary guest counter stuck at {c} (was {last} 0.5 s earlier)" + world.diagnostics()
        last = c
        samples += 1
    return samples


def _kill_backup_and_check(world, primary, backup, guest, running_s=5):
    backup.kill()
    t0 = time.monotonic()
    st = world.wait_status(primary, lambda s: s["state"] == "unprotected", HB_S + 1.0,
                           "state unprotected after the backup remusd died", interval=0.02)
    took = time.monotonic() - t0
    assert st["error"], f"unprotected without an error explaining why: {st}"
    _assert_keeps_running(world, guest, running_s)
    return took, st


def test_kill_backup(world, request):
    pr = setup_protected(world, interval_ms=100, wait_epochs=50)
    took, st = _kill_backup_and_check(world, pr.primary, pr.backup, pr.guest)
    record(request, unprotected_after_s=round(took, 2), error=st["error"])


def test_kill_backup_during_checkpoints_loop(world, request):
    """Kill the backup while the primary checkpoints every 20 ms (the kill lands
    at a random point of the epoch loop: inside a pause, with checkpoints
    queued, or waiting for acks), several times with the same guest and
    primary remusd: each time the guest must end up running unprotected, and
    it must be possible to protect it again."""
    primary = world.start_primary()
    guest = world.start_guest()
    results, unprotect_results = [], []
    for i in range(3):
        if i:
            # Workaround for the bug test_reprotect_after_backup_loss shows: the
            # unprotected domain's replicator keeps QEMU's (single-client)
            # monitor until it is removed, so drop it first.  unprotect then
            # reports the reason protection was lost, with exit code 1.
            r = primary.ctl("unprotect", DOMAIN)
            assert r.returncode in (0, 1), r
            assert primary.status(DOMAIN) is None
            unprotect_results.append((r.returncode, r.stderr.strip()))
        backup = world.start_backup(name=f"B{i}")
        world.protect(primary, backup, guest, interval_ms=20)
        st = world.wait_status(primary, lambda s: s["state"] == "protected", 30, "protected")
        first = st["last_acked_epoch"]
        world.wait_status(primary, lambda s: s["last_acked_epoch"] >= first + 20, 30, "20 more acks")
        took, st = _kill_backup_and_check(world, primary, backup, guest, running_s=2)
        results.append(round(took, 2))
    record(request, unprotected_after_s=results, unprotect_after_loss=unprotect_results)


def test_reprotect_after_backup_loss(world, request):
    primary = world.start_primary()
    guest = world.start_guest()
    b0 = world.start_backup(name="B0")
    world.protect(primary, b0, guest, interval_ms=100)
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 5, 30, "5 acks")
    _kill_backup_and_check(world, primary, b0, guest, running_s=1)
    b1 = world.start_backup(name="B1")
    r = primary.ctl("protect", DOMAIN, "--qmp", str(guest.qmp_sock), "--backup", b1.listen, "--interval", "100")
    assert r.returncode == 0, f"re-protect after losing the backup failed: {r.stdout}{r.stderr}"
    st = world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 5, 30, "5 acks with the new backup")
    assert st["state"] == "protected" and b1.status()["state"] == "protected"


def test_wrong_key(world, request):
    backup = world.start_backup()
    other_key = world.dir / "other.key"
    r = world.remusctl("keygen", "--out", str(other_key))
    assert r.returncode == 0, r.stderr
    primary = world.start_primary(key=other_key)
    guest = world.start_guest()
    c1 = guest.counter()
    r = primary.ctl("protect", DOMAIN, "--qmp", str(guest.qmp_sock), "--backup", backup.listen,
                    "--interval", "100")
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"protect with the wrong key succeeded: {out}"
    assert r.returncode == 5, f"expected exit code 5 (authentication), got {r.returncode}: {out}"
    low = out.lower()
    assert "key" in low and ("authenticat" in low or "differ" in low), f"message does not mention the key: {out}"
    # The backup created nothing for the domain and does not know it.
    assert not backup.domain_dir().exists(), f"{backup.domain_dir()} was created"
    assert list((backup.state_dir / "domains").iterdir()) == [], list((backup.state_dir / "domains").iterdir())
    assert backup.status(DOMAIN) is None, backup.status(DOMAIN)
    assert backup.all_status() == [], backup.all_status()
    rb = backup.ctl("status", DOMAIN, "--json")
    assert rb.returncode == 3, rb
    # The primary does not list it as protected, and the guest is untouched.
    assert primary.status(DOMAIN) is None, primary.status(DOMAIN)
    samples = _assert_keeps_running(world, guest, 2)
    assert guest.counter() > c1
    mig = guest.qmp.execute("query-migrate")
    assert mig.get("status", "none") in ("none",), f"a migration was started: {mig}"
    # The right key still works afterwards (the refusal left no state behind).
    primary2 = world.start_primary(name="A2")
    world.protect(primary2, backup, guest, interval_ms=100)
    assert backup.status()["state"] == "protected"
    record(request, exit_code=r.returncode, message=r.stderr.strip(), samples=samples)


def test_unprotect(world, request):
    pr = setup_protected(world, interval_ms=100, wait_epochs=20)
    r = pr.primary.ctl("unprotect", DOMAIN)
    assert r.returncode == 0, f"unprotect failed: {r.stdout}{r.stderr}" + world.diagnostics()
    assert "unprotected" in r.stdout, r.stdout
    st = world.wait_status(pr.backup, lambda s: s["state"] == "unprotected", 5, "backup state unprotected")
    _assert_keeps_running(world, pr.guest, 3)
    # Past the heartbeat timeout, the backup still must not have promoted.
    time.sleep(1.5)
    st = pr.backup.status()
    assert st["state"] == "unprotected", st
    assert st["promotion"]["failover_ms"] == -1 and st["promotion"]["state"] != "promoted", st
    assert st["qemu"]["pid"] == -1 and st["qmp_socket"] == "", st
    assert not (pr.backup.domain_dir() / "run" / "qemu.pid").exists()
    # The primary forgot the domain; the guest left COLO.
    assert pr.primary.status(DOMAIN) is None
    assert pr.primary.ctl("status", DOMAIN).returncode == 3
    mig = pr.guest.qmp.execute("query-migrate")
    assert mig.get("status") != "colo", mig
    _assert_keeps_running(world, pr.guest, 2)
    # Unprotecting twice: a clear not-found error.
    r2 = pr.primary.ctl("unprotect", DOMAIN)
    assert r2.returncode == 3 and "not protected" in r2.stderr, r2
    record(request, backup_state=st["state"], migration_status=mig.get("status"))


def test_backup_restart_keeps_checkpoint_for_manual_failover(world, request):
    """Kill -9 the backup remusd, then lose the primary too: a backup remusd
    restarted on the same state dir still restores the last committed
    checkpoint with `remusctl failover` (it never promotes by itself then)."""
    pr = setup_protected(world, interval_ms=100, wait_epochs=20)
    c0 = pr.acked_reference()
    acked = pr.pstatus()["last_acked_epoch"]
    _kill_backup_and_check(world, pr.primary, pr.backup, pr.guest, running_s=1)
    p_kill = pr.guest.counter()
    pr.guest.kill()
    b = world.start_backup(name=pr.backup.name)  # same state dir and control socket
    st = b.status()
    assert st is not None, "the restarted backup forgot the domain"
    assert st["state"] == "primary-lost", st
    assert st["last_committed_epoch"] >= acked, (st, acked)
    assert "remusctl failover" in st["error"], st
    time.sleep(HB_S + 0.5)
    assert b.status()["state"] == "primary-lost", "a restarted backup promoted by itself"
    r = b.ctl("failover", DOMAIN, timeout=60)
    assert r.returncode == 0, f"remusctl failover failed: {r.stdout}{r.stderr}" + world.diagnostics()
    m = check_promoted(world, b, c0, p_kill, window_s=5, timeout=10)
    record(request, failover_ms=m["failover_ms"], promoted_epoch=m["epoch"], acked_before_backup_kill=acked)


def test_blackholed_backup_unprotects_within_the_heartbeat_timeout(world, request):
    """A backup that neither reads nor answers nor closes (SIGSTOP: its kernel
    keeps the connection open with a zero window, as a pulled cable or a
    powered-off host leaves it without FIN or RST). The primary's sender
    sticks in a write and its guest waits on backpressure; the primary must
    notice from silence alone, within the heartbeat timeout + one interval
    (plus QEMU's time to leave COLO), and leave the guest running
    unprotected. Before issue 11 it waited for TCP (here: forever)."""
    import os
    import signal
    # Epochs of several MiB: a few unacked ones fill the loopback socket
    # buffers, so the sender is stuck in a write when the loss is noticed.
    interval_ms = 200
    pr = setup_protected(world, interval_ms=interval_ms, wait_epochs=10,
                         guest_kw=dict(dirty=20000, wss_mib=128))
    sent0 = pr.primary.status()["link"]["bytes_sent"]
    os.kill(pr.backup.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        st = world.wait_status(pr.primary, lambda s: s["state"] == "unprotected", HB_S + 5.0,
                               "state unprotected after the backup went silent", interval=0.02)
        took = time.monotonic() - t0
        assert "silent" in st["error"], st
        assert took <= HB_S + interval_ms / 1000 + 1.0, f"unprotected {took:.2f}s after the backup went silent"
        _assert_keeps_running(world, pr.guest, 3)
        mig = pr.guest.qmp.execute("query-migrate")
        assert mig.get("status") != "colo", mig
    finally:
        pr.backup.kill()  # SIGKILL ends a stopped process too
    record(request, unprotected_after_s=round(took, 2), error=st["error"],
           sent_after_stop_mib=round((st["link"]["bytes_sent"] - sent0) / 2**20, 1),
           backpressure_waits=st["backpressure_waits"])
