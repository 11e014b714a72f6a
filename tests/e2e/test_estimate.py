"""remusctl estimate: the bandwidth each checkpoint interval needs, from the
guest's dirty rate measured by QEMU (calc-dirty-rate) or by the protection
itself, against a guest dirtying pages at a known rate (remus.dirty, a
sequential sweep over remus.wss, so D(W) = rate x W for W up to wss/rate)."""

import json
import math
import re

import pytest

from conftest import DOMAIN, read_text, setup_protected

RATE = 4000  # pages/s asked of the guest's dirtier
WSS_MIB = 64  # 16384 pages: the sweep does not wrap within 4 s
FACTOR = 2.5  # page-sampling noise and the guest's own writes


def _achieved_rate(guest):
    """The dirtier's achieved page writes per second, from its latest console
    lines (TCG on a loaded host may fall short of RATE)."""
    rates = [float(x) for x in re.findall(r"rate=(\d+)/s target", read_text(guest.serial))]
    assert rates, f"no dirtier rate lines in {guest.serial}"
    recent = rates[-3:]
    return sum(recent) / len(recent)


def _estimate(daemon, *args):
    r = daemon.ctl("estimate", DOMAIN, "--json", *args, timeout=60)
    assert r.returncode == 0, f"estimate failed (rc {r.returncode}): {r.stdout}{r.stderr}"
    assert "measuring" in r.stderr, r.stderr
    return json.loads(r.stdout)


def _check_consistent(est, rate):
    """Every row within FACTOR of rate x interval; bandwidth per second never
    grows with the interval beyond the figures' noise; bounds bracket."""
    rows = est["rows"]
    page = est["page_bytes"]
    for row in rows:
        want = rate * row["interval_ms"] / 1000
        got = row["dirty_pages"]
        assert want / FACTOR <= got <= want * FACTOR + 64, f"{row}: want about {want:.0f} pages (rate {rate:.0f}/s)"
        lo, hi = row["dirty_pages_low"], row["dirty_pages_high"]
        assert lo is None or hi is None or lo <= hi, row
        if row["basis"] == "measured":
            assert lo == hi == got, row
        # Bandwidth: bytes per checkpoint x checkpoints per second.
        assert row["mb_per_s"] == pytest.approx(row["bytes_per_checkpoint"] * 1000 / row["interval_ms"] / 1e6,
                                                rel=1e-3, abs=1e-3)
        assert row["gbit_per_s"] == pytest.approx(row["mb_per_s"] * 8 / 1000, rel=1e-3, abs=1e-6)
        # And the raw rate: pages only, so at least rate x 4096 B / FACTOR.
        assert row["mb_per_s"] >= rate * page / 1e6 / FACTOR, row
    # An upper-bound row never needs more per second than the window it is
    # bounded by (rate x interval from a shorter window).
    by_window = {r["interval_ms"]: r for r in rows}
    for row in rows:
        src = by_window.get(row["from_window_ms"])
        if row["basis"] == "upper-bound" and src is not None and src["basis"] == "measured":
            assert row["mb_per_s"] <= src["mb_per_s"] * (1 + 1e-6), (row, src)


@pytest.mark.both_qemus
def test_estimate_unprotected(world, qemu_under_test):
    g = world.start_guest(dirty=RATE, wss_mib=WSS_MIB, wait_boot=False)
    a = world.start_primary()
    world.wait_booted(g)
    world.wait_for(lambda: len(re.findall(r"rate=\d+/s target", read_text(g.serial))) >= 3, 30,
                   "three dirtier rate lines")
    est = _estimate(a, "--qmp", str(g.qmp_sock), "--intervals", "10,25,50,100,200,400")
    rate = _achieved_rate(g)
    q = est["qemu"]
    assert q["accelerator"] == "tcg" and q["mode"] == "page-sampling", q
    assert est["protection"] is None
    basis = {r["interval_ms"]: r["basis"] for r in est["rows"]}
    if q["version"].startswith("7."):
        # Whole seconds only: every interval here is a lower bound from 1 s.
        assert [w["window_ms"] for w in q["windows"]] == [1000], q
        assert set(basis.values()) == {"lower-bound"}, basis
        assert any("whole seconds" in n for n in est["notes"]), est["notes"]
        for r in est["rows"]:
            assert r["dirty_pages_high"] >= r["dirty_pages"], r
    else:
        assert [w["window_ms"] for w in q["windows"]] == [50, 100, 200, 400], q
        assert basis == {10: "lower-bound", 25: "lower-bound", 50: "measured", 100: "measured",
                         200: "measured", 400: "measured"}, basis
    _check_consistent(est, rate)
    assert est["took_ms"] < 8000, est["took_ms"]

    # The text form names the basis of each row.
    r = a.ctl("estimate", DOMAIN, "--qmp", str(g.qmp_sock), "--intervals", "10,100", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "INTERVAL" in r.stdout and "at least" in r.stdout, r.stdout

    # The guest kept running consistently while QEMU measured it.
    assert "CHECKER FAIL" not in read_text(g.serial)


def test_estimate_errors(world):
    g = world.start_guest(dirty=RATE, wss_mib=WSS_MIB, wait_boot=False)
    a = world.start_primary()
    world.wait_booted(g)
    # Bad intervals: refused before QEMU is asked anything.
    for bad, words in [("0", "interval 0 ms is out of range"), ("600001", "out of range"),
                       (",".join(["5"] * 3 + [str(i) for i in range(1, 16)]), "at most 16 intervals")]:
        r = a.ctl("estimate", DOMAIN, "--qmp", str(g.qmp_sock), "--intervals", bad)
        assert r.returncode == 1 and words in r.stderr, f"--intervals {bad}: rc {r.returncode} {r.stderr}"
    r = a.ctl("estimate", DOMAIN, "--qmp", str(g.qmp_sock), "--intervals", "abc")
    assert r.returncode == 2, r.stderr
    # A QEMU that cannot be reached.
    r = a.ctl("estimate", DOMAIN, "--qmp", str(world.dir / "no-such.sock"))
    assert r.returncode != 0 and "cannot reach QEMU's monitor" in r.stderr and "no-such.sock" in r.stderr, r.stderr
    # An unknown domain: not protected here, and no libvirt domain of that
    # name (libvirt's default URI, which no libvirtd serves in this world).
    r = a.ctl("estimate", "nosuchdomain", "--connect", f"qemu:///system?socket={world.dir}/no-libvirt-sock")
    assert r.returncode in (3, 4) and "nosuchdomain" in r.stderr and "--qmp" in r.stderr, r.stderr


@pytest.mark.both_qemus
def test_estimate_protected(world, qemu_under_test):
    # lz4: the protection measures a compression ratio the estimate uses.
    pr = setup_protected(world, interval_ms=100, guest_kw={"dirty": RATE, "wss_mib": WSS_MIB}, wait_epochs=30,
                         protect_extra=("--compress", "lz4"))
    a = pr.primary
    est = _estimate(a, "--intervals", "25,50,100,200")
    rate = _achieved_rate(pr.guest)
    p = est["protection"]
    assert p is not None and p["interval_ms"] == 100 and p["checkpoints"] >= 5, est
    assert est["qemu"].get("migration_active") is True or "error" in est["qemu"], est["qemu"]
    row = {r["interval_ms"]: r for r in est["rows"]}
    # The protection's own count is the measured figure at its interval.
    assert row[100]["basis"] == "measured" and row[100]["method"] == "checkpoints", row[100]
    # std::round rounds halves away from zero; Python's round() to even.
    assert row[100]["dirty_pages"] == math.floor(p["dirty_pages_per_checkpoint"] + 0.5), (row[100], p)
    # Device state and disk writes ride along.
    assert p["other_bytes_per_checkpoint"] > 0, p
    assert row[100]["bytes_per_checkpoint"] > row[100]["dirty_pages"] * 4096, row[100]
    # Pages that hold a generation number in three words compress well.
    ratio = est["compression_ratio"]
    assert ratio is not None and ratio > 1.5, est
    for r in est["rows"]:
        assert r["compressed"]["mb_per_s"] < r["mb_per_s"], r
    # A checkpoint of a 100 ms interval lasts longer under TCG (the pause),
    # and the dirtier catches up on the paused time: rate x (interval + pause).
    pause = pr.pstatus()["pause_ms"]["p50"]
    want = rate * (100 + pause) / 1000
    assert want / FACTOR <= row[100]["dirty_pages"] <= want * FACTOR + 64, (row[100], rate, pause)
    assert row[200]["mb_per_s"] <= row[100]["mb_per_s"] * (1 + 1e-6) or row[200]["basis"] == "measured", row
    # The protection went on undisturbed.
    e0 = pr.pstatus()["last_acked_epoch"]
    pr.wait_acked(e0 + 10, timeout=60)
    assert pr.pstatus()["state"] == "protected"
    assert "CHECKER FAIL" not in read_text(pr.guest.serial)
