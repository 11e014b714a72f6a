"""Planned switchover (`remusctl switchover`), QMP mode, end to end.

World (as test_netbuf.py): namespace H holds both remusd daemons, the guest's
QEMU (virtio-net on the persistent tap rtap0 in bridge br0) and the QEMU B's
promotion restores (it opens the same tap once A's QEMU is gone); namespace C
holds a TCP client on a veth into br0. The guest runs the memory checker, the
1 kHz counter and the TCP service (`seq=<s> counter=<c>` answers).

- test_switchover_moves_the_guest_with_nothing_lost: a TCP client doing
  request/response through output commit (nfqueue), the switchover A -> B:
  B promotes from exactly A's final checkpoint, A's QEMU is gone, every
  counter value read from A's guest (polled throughout) is <= the committed
  one (A's guest never ran past its final checkpoint), the client's
  connection survives without a gap or an answer B's guest does not know it
  sent, and the restored guest passes check_promoted.
- test_switchover_refusals: unknown domain (exit 3), asked on the backup
  (exit 6), a second switchover after it ended (exit 6).
- test_backup_killed_before_the_final_ack_resumes_the_guest_on_a: B acks
  1.5 s late; kill -9 of B's remusd while A waits for the final ACK: A's
  guest resumes, unprotected, and runs on; nothing was restored.
- test_link_lost_after_the_backup_was_told_ends_a_and_b_promotes: B accepts
  but never answers (fault switchover-no-answer); the link is then cut
  (iptables DROP both ways, no FIN): A ends its QEMU (never resumes it), B
  promotes from exactly the final checkpoint after the heartbeat timeout.
- test_backup_killed_after_it_was_told: the same, but B's remusd is killed
  -9: A ends its QEMU; a restarted B keeps the checkpoint and `remusctl
  failover` restores exactly the final epoch.
"""

import subprocess
import threading
import time

import pytest

from conftest import (DOMAIN, REMUSCTL, Protected, check_promoted, read_store_counter, record, setup_protected)
from test_netbuf import Net, events

GUEST_IP, PORT = "10.77.0.2", 7000


@pytest.fixture
def net(world):
    n = Net(world)
    try:
        yield n
    finally:
        world.cleanup()
        n.close()


class CounterPoller:
    """Reads A's guest counter over the test's own QMP socket until it fails
    (A's QEMU ended): every value A's guest ever showed."""

    def __init__(self, guest):
        self.guest, self.values, self.stop = guest, [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                self.values.append((time.time(), self.guest.counter()))
            except Exception:  # noqa: BLE001 - QEMU went away
                return
            time.sleep(0.01)

    def close(self):
        self.stop.set()
        self.t.join(timeout=15)


def switchover_async(world, daemon):
    out = world.dir / "switchover.out"
    f = open(out, "wb")
    p = subprocess.Popen([str(REMUSCTL), "--socket", str(daemon.control), "switchover", DOMAIN],
                         stdout=f, stderr=subprocess.STDOUT)
    f.close()
    world.procs.append(("remusctl switchover", p))
    return p, out


def test_switchover_moves_the_guest_with_nothing_lost(world, net, request):
    guest = world.start_guest(wait_boot=False, **net.guest_kw())
    backup = world.start_backup()
    primary = world.start_primary()
    world.wait_booted(guest)
    world.protect(primary, backup, guest, interval_ms=100, extra=["--netbuf", "nfqueue"])
    world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 20, 60, "20 acks")
    p, out = net.client(duration=60, name="client")
    world.wait_for(lambda: len([e for e in events(out) if e["ev"] == "resp"]) >= 30, 30, "30 answers")
    c0 = guest.counter()
    e0 = primary.status()["last_staged_epoch"]
    world.wait_status(primary, lambda s: s["last_acked_epoch"] > e0, 30, f"an ack beyond {e0}")
    poller = CounterPoller(guest)
    t_start = time.time()
    r = primary.ctl("switchover", DOMAIN, timeout=120)
    t_done = time.time()  # A's QEMU is gone by now, and B starts its guest only after that
    poller.close()
    assert r.returncode == 0, f"switchover failed (rc {r.returncode}):\n{r.stdout}{r.stderr}" + world.diagnostics()
    assert "switched over in" in r.stdout, r.stdout
    ast = primary.status()
    assert ast["state"] == "switched-over", ast
    sw = ast["switchover"]
    assert sw["phase"] == "done" and sw["took_ms"] >= 0, sw
    final = sw["final_epoch"]
    # A's QEMU is gone (it must never run again), and so are its netbuf rules.
    world.wait_for(lambda: not guest.alive(), 10, "A's QEMU to be gone")
    assert "NFQUEUE" not in net.iptables_rules(), net.iptables_rules()

    st = world.wait_status(backup, lambda s: s["state"] in ("failed-over", "failed"), 30, "B promoted")
    assert st["state"] == "failed-over", st
    assert st["last_committed_epoch"] == final, (st["last_committed_epoch"], final)
    assert st["promotion"]["switchover_epoch"] == final, st["promotion"]
    assert "planned switchover" in st["promotion"]["reason"], st["promotion"]
    committed = read_store_counter(st["store"])
    seen_on_a = [v for _, v in poller.values]
    assert seen_on_a, "no counter read from A's guest during the switchover"
    # A's guest stayed paused from the final checkpoint's capture on: nothing
    # it showed is later than what B resumes from.
    assert max(seen_on_a) <= committed, (
        f"A's guest showed counter {max(seen_on_a)}, beyond the final checkpoint's {committed}" + world.diagnostics())
    res = check_promoted(world, backup, c0, max(seen_on_a), window_s=10, exact_epoch=final)

    # The client's connection lives on with B's guest, in sequence.
    world.wait_for(lambda: any(e["ev"] == "resp" and e["t_recv"] > t_start and e["counter"] > committed
                               for e in events(out)), 60, "answers from B's guest")
    p.kill()
    p.wait()
    ev = events(out)
    errs = [e for e in ev if e["ev"] == "error"]
    assert not errs, f"the connection broke: {errs}" + world.diagnostics()
    resp = [e for e in ev if e["ev"] == "resp"]
    seqs = [x["seq"] for x in resp]
    assert seqs == list(range(1, len(seqs) + 1)), f"answers out of sequence: {seqs}"
    from_a = [x for x in resp if x["t_recv"] <= t_done]
    from_b = [x for x in resp if x["t_recv"] > t_done]
    assert from_a and from_b, (len(from_a), len(from_b))
    # Output commit: every answer from A came from a state no later than the
    # one B resumed from; B's guest answers from there on.
    assert max(x["counter"] for x in from_a) <= committed, (
        f"the client saw counter {max(x['counter'] for x in from_a)} from A, beyond the final checkpoint's "
        f"{committed}" + world.diagnostics())
    assert min(x["counter"] for x in from_b) >= committed, from_b[:3]
    outage = from_b[0]["t_recv"] - from_a[-1]["t_recv"]
    record(request, final_epoch=final, took_ms=sw["took_ms"], committed=committed,
           last_seen_on_a=max(seen_on_a), answers_from_a=len(from_a), answers_from_b=len(from_b),
           client_outage_s=round(outage, 2), failover_ms=res["failover_ms"])


def test_switchover_refusals(world):
    pr = setup_protected(world, wait_epochs=5)
    r = pr.primary.ctl("switchover", "nosuch")
    assert r.returncode == 3, (r.returncode, r.stderr)
    r = pr.backup.ctl("switchover", DOMAIN)
    assert r.returncode == 6 and "on its primary" in r.stderr, (r.returncode, r.stderr)
    r = pr.primary.ctl("switchover", DOMAIN)
    assert r.returncode == 0, r.stdout + r.stderr + world.diagnostics()
    r = pr.primary.ctl("switchover", DOMAIN)
    assert r.returncode == 6 and "switched-over, not protected" in r.stderr, (r.returncode, r.stderr)
    st = pr.primary.status()
    assert st["state"] == "switched-over"
    r = pr.primary.ctl("status", DOMAIN)
    assert "switchover done (final checkpoint" in r.stdout, r.stdout


def test_backup_killed_before_the_final_ack_resumes_the_guest_on_a(world, request):
    pr = setup_protected(world, wait_epochs=5, backup_kw={"ack_delay_ms": 1500})
    p, out = switchover_async(world, pr.primary)
    world.wait_status(pr.primary, lambda s: s.get("switchover", {}).get("phase") == "final-ack", 20,
                      "the final checkpoint staged, its ack pending")
    t_kill = time.monotonic()
    pr.backup.kill()
    p.wait(timeout=30)
    assert p.returncode != 0, out.read_text()
    st = world.wait_status(pr.primary, lambda s: s["state"] == "unprotected", 10, "A unprotected")
    resumed_s = time.monotonic() - t_kill
    assert st["switchover"]["phase"] == "aborted", st["switchover"]
    assert "switchover" in out.read_text() and "aborted" in out.read_text(), out.read_text()
    # The guest runs on here.
    assert pr.guest.alive()
    assert pr.guest.qmp.status() == "running"
    c1 = pr.guest.counter()
    time.sleep(1.0)
    assert pr.guest.counter() > c1, "A's guest does not run after the aborted switchover"
    assert not world.restored_qemu_pids(), world.restored_qemu_pids()
    record(request, resumed_s=round(resumed_s, 2))


def _told_then(world, pr, cut):
    """pr: protected, with B faulted to accept SWITCHOVER without answering.
    The switchover reaches its handover phase (B accepted), then cut(pr)
    breaks things. Returns (c0, final epoch, highest counter A's guest showed)."""
    c0 = pr.acked_reference()
    poller = CounterPoller(pr.guest)
    p, out = switchover_async(world, pr.primary)
    st = world.wait_status(pr.primary, lambda s: s.get("switchover", {}).get("phase") == "handover", 20,
                           "SWITCHOVER sent")
    final = st["switchover"]["final_epoch"]
    world.wait_status(pr.backup, lambda s: s["state"] == "switching-over", 10, "B accepted")
    cut(pr)
    p.wait(timeout=60)
    poller.close()
    assert p.returncode != 0, out.read_text()
    ast = world.wait_status(pr.primary, lambda s: s["state"] == "switched-over", 15, "A switched-over")
    assert ast["switchover"]["phase"] == "failed", ast["switchover"]
    assert "told to take over" in ast["error"], ast["error"]
    world.wait_for(lambda: not pr.guest.alive(), 10, "A's QEMU to be ended")
    seen = [v for _, v in poller.values]
    assert seen
    return c0, final, max(seen)


def test_link_lost_after_the_backup_was_told_ends_a_and_b_promotes(world, netns_pair, request):
    ns = netns_pair
    guest = world.start_guest(wait_boot=False, netns=ns.a)
    backup = world.start_backup(netns=ns.b, listen_host=ns.B_IP, fault="switchover-no-answer")
    primary = world.start_primary(netns=ns.a)
    world.wait_booted(guest)
    world.protect(primary, backup, guest, interval_ms=100)
    pr = Protected(world, primary, backup, guest)
    pr.wait_acked(10)
    t = {}

    def cut(pr):
        ns.blackhole(ns.b)
        t["cut"] = time.monotonic()

    c0, final, last_a = _told_then(world, pr, cut)
    a_ended_s = time.monotonic() - t["cut"]
    res = check_promoted(world, backup, c0, last_a, window_s=10, exact_epoch=final)
    committed = read_store_counter(backup.status()["store"])
    assert last_a <= committed, (last_a, committed)
    record(request, final_epoch=final, a_ended_s=round(a_ended_s, 2), b_detect_s=round(res["detect_s"], 2))


def test_backup_killed_after_it_was_told(world, request):
    pr = setup_protected(world, wait_epochs=10, backup_kw={"fault": "switchover-no-answer"})
    c0, final, last_a = _told_then(world, pr, lambda pr: pr.backup.kill())
    # B is dead and A ended its QEMU: the guest is down until B is back. B
    # recorded its acceptance durably before A could hear it, so a restarted
    # B promotes the final checkpoint by itself (after the heartbeat timeout),
    # --no-auto-promote or not: no operator needed.
    b2 = world.start_backup(name=pr.backup.name, auto_promote=False)
    st = world.wait_status(b2, lambda s: s["state"] in ("primary-lost", "promoting", "failed-over"), 20,
                           "B recovered its checkpoint")
    assert st["last_committed_epoch"] == final, (st, final)
    st = world.wait_status(b2, lambda s: s["state"] in ("failed-over", "failed"), 60, "B's promotion after its restart")
    assert st["state"] == "failed-over", st
    assert st["promotion"]["switchover_epoch"] == final, st["promotion"]
    assert "accepted before remusd restarted" in st["promotion"]["reason"], st["promotion"]
    res = check_promoted(world, b2, c0, last_a, window_s=5, exact_epoch=final)
    assert last_a <= read_store_counter(b2.status()["store"])
    record(request, final_epoch=final, failover_ms=res["failover_ms"])


class QmpCounter:
    def __init__(self, q):
        self.q = q

    def counter(self):
        return self.q.counter()


def test_switchover_there_and_back_with_reverse_protection(world, net, request):
    """A -> B, B protects the guest back to A (both remusds listen), then
    B -> A the same way, with every checker: one TCP connection through both,
    the memory checker, and a mirrored disk whose writer verifies after each
    promotion that the disk holds every record the memory believes durable."""
    from test_disk import _disk_guest, _wait_disk_ok, check_restored_disk
    img, disk_kw = _disk_guest(world)
    nkw = net.guest_kw()
    guest = world.start_guest(wait_boot=False, extra_args=[*disk_kw["extra_args"], *nkw["extra_args"]],
                              extra_append=disk_kw["extra_append"] + " " + nkw["extra_append"])
    b = world.start_backup("B")
    a = world.start_backup("A")  # listens: it becomes B's backup
    world.wait_booted(guest)
    world.protect(a, b, guest, interval_ms=100, extra=["--netbuf", "nfqueue"])
    world.wait_status(a, lambda s: s["last_acked_epoch"] >= 20 and s["disks"][0]["ready"], 120,
                      "20 acks with the disk copy complete")
    _wait_disk_ok(world, guest.serial, 3)
    p, out = net.client(duration=180, name="client")
    world.wait_for(lambda: len([e for e in events(out) if e["ev"] == "resp"]) >= 30, 30, "30 answers")
    results = []
    src_guest = guest
    for hop, (src, dst) in enumerate([(a, b), (b, a)]):
        c0 = src_guest.counter()
        time.sleep(0.5)  # an epoch after c0 is acked (interval 100 ms)
        poller = CounterPoller(src_guest)
        r = src.ctl("switchover", DOMAIN, timeout=300)
        poller.close()
        assert r.returncode == 0, f"hop {hop}: rc {r.returncode}\n{r.stdout}{r.stderr}" + world.diagnostics()
        assert "protected again, from" in r.stdout, r.stdout
        pst = src.call({"command": "status", "domain": DOMAIN, "role": "primary"})["result"]["domains"][0]
        final = pst["switchover"]["final_epoch"]
        assert pst["state"] == "switched-over" and pst["switchover"]["reprotect_to"] == src.listen, pst
        seen = [v for _, v in poller.values]
        assert seen and max(seen) <= read_store_counter(dst.status(role="backup")["store"]), seen[-3:]
        # check_promoted follows dst's backup-side record (its promotion).
        m = check_promoted(world, dst, c0, max(seen), window_s=5, exact_epoch=final)
        # The disk: every record the final checkpoint's memory believes durable is on it.
        check_restored_disk(world, dst, f"hop {hop}")
        # dst protects the guest back to src (its disk too): dst's row is its protection now.
        world.wait_status(dst, lambda s: s["role"] == "primary" and s["state"] == "protected"
                          and s["disks"] and s["disks"][0]["ready"], 120, "the reverse protection with its disk")
        world.wait_status(dst, lambda s: s["last_acked_epoch"] >= 10, 60, "acks of the reverse protection")
        results.append((final, m["failover_ms"], pst["switchover"]["took_ms"]))
        src_guest = QmpCounter(m["qmp"])
    time.sleep(2)
    p.kill()
    p.wait()
    ev = events(out)
    errs = [e for e in ev if e["ev"] == "error"]
    assert not errs, f"the connection broke: {errs}" + world.diagnostics()
    resp = [e for e in ev if e["ev"] == "resp"]
    seqs = [x["seq"] for x in resp]
    assert seqs == list(range(1, len(seqs) + 1)), f"answers out of sequence: {seqs[:50]}..."
    record(request, hops=results, answers=len(resp))


def test_switchover_with_etcd_hands_ownership_over_at_once(world, arbiter_net, request):
    """--arbiter etcd (real 3-member cluster, A and B in namespaces of their
    own, lease TTL 3 s): A gives its lease up once its QEMU ended, so B wins
    etcd at once (well under a TTL), with a token; nothing fences B's guest
    afterwards (it counts on past two TTLs), and A's lease is released."""
    from test_arbiter import TTL_MS, ArbiterSetup, process_state
    s = ArbiterSetup(world, arbiter_net)
    assert s.owner()["host"] == "A", s.owner()
    c0 = s.guest.counter()
    time.sleep(0.5)
    poller = CounterPoller(s.guest)
    t0 = time.monotonic()
    r = s.a.ctl("switchover", DOMAIN, timeout=120)
    t_a = time.monotonic() - t0
    poller.close()
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}{r.stderr}" + world.diagnostics()
    ast = s.a.status()
    final = ast["switchover"]["final_epoch"]
    assert ast["state"] == "switched-over" and ast["arbiter"]["state"] == "released", (ast["state"], ast["arbiter"])
    bst = world.wait_status(s.b, lambda x: x["state"] in ("failed-over", "failed"), 30, "B promoted")
    t_b = time.monotonic() - t0
    assert bst["state"] == "failed-over", bst
    world.extra_pids.append(("restored qemu", bst["qemu"]["pid"]))
    # Won at once: the lease was handed over, not left to expire.
    assert t_b < TTL_MS / 1000, f"B promoted {t_b:.2f} s after the switchover began: it waited for A's lease TTL"
    token = bst["promotion"]["token"]
    owner = s.owner()
    assert token > 0 and owner["host"] == "B" and owner["mod_revision"] == token, (owner, token)
    assert s.session_value().startswith("promoted:"), s.session_value()
    seen = [v for _, v in poller.values]
    m = check_promoted(world, s.b, c0, max(seen), window_s=2 * TTL_MS / 1000 + 1, exact_epoch=final)
    # The fence watchdog froze nothing: B's guest ran on throughout the window.
    assert process_state(bst["qemu"]["pid"]) not in ("T", None), process_state(bst["qemu"]["pid"])
    assert s.b.status()["arbiter"]["state"] == "held", s.b.status()["arbiter"]
    record(request, final_epoch=final, a_done_s=round(t_a, 2), b_promoted_s=round(t_b, 2), token=token,
           failover_ms=m["failover_ms"])
