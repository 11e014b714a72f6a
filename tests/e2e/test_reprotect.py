"""After a failover, protection comes back: the host that promoted the guest
protects it again (to the host that lost it, now a backup), and the guest can
fail back. Both remusds listen, as on two hosts that back each other up.

Every step checks the guest's memory checker and counter (check_promoted):
nothing acknowledged is lost, nothing from after a kill is restored, and the
restored guest runs on."""

import os
import signal
import time

from conftest import DOMAIN, Protected, check_promoted, read_store_counter, record


class PromotedGuest:
    """The guest a backup promoted, seen through the operators' QMP socket
    that check_promoted opened (remusd uses its own, remusd-qmp.sock)."""

    def __init__(self, m):
        self.q, self.pid = m["qmp"], m["pid"]

    def counter(self):
        return self.q.counter()

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        self.q.close()


def _reprotect(world, host, to, interval_ms=100):
    """`remusctl protect` on the host that promoted the guest: no --qmp, the
    host knows its guest."""
    r = host.ctl("protect", DOMAIN, "--backup", to.listen, "--interval", str(interval_ms))
    assert r.returncode == 0, f"re-protection refused (rc {r.returncode}): {r.stdout}{r.stderr}" + world.diagnostics()
    st = world.wait_status(host, lambda s: s["role"] == "primary" and s["state"] == "protected", 120,
                           "the re-protection to reach protected")
    return st


def _cycle(world, primary, backup, guest, min_acked=20):
    """Protected primary -> backup: wait for acks, kill the guest's QEMU,
    check the backup's promotion. Returns (measurements, promoted guest)."""
    pr = Protected(world, primary, backup, guest)
    pr.wait_acked(min_acked)
    c0 = pr.acked_reference()
    p_kill = guest.counter()
    guest.kill()
    m = check_promoted(world, backup, c0, p_kill, window_s=5)
    return m, PromotedGuest(m)


def test_failover_then_reprotect_then_fail_back(world, request):
    guest = world.start_guest(wait_boot=False)
    b = world.start_backup("B")
    a = world.start_backup("A")  # listens too: it becomes B's backup after the failover
    world.wait_booted(guest)
    world.protect(a, b, guest)

    m1, g_b = _cycle(world, a, b, guest)
    st_b = b.status()
    assert st_b["state"] == "failed-over" and st_b["role"] == "primary (promoted)", st_b
    # A's row: its protection failed over.
    assert a.status()["state"] == "failed-over", a.status()

    # A promoted guest cannot be backed up to the host it runs on.
    r = b.ctl("protect", DOMAIN, "--backup", b.listen)
    assert r.returncode != 0 and "runs here" in (r.stdout + r.stderr), f"{r.stdout}{r.stderr}"

    # B protects the promoted guest back to A, through remusd's own monitor:
    # the operators' QMP socket (open in this test) stays theirs.
    st = _reprotect(world, b, a)
    assert [o["state"] for o in st.get("other_roles", [])] == ["failed-over"], st
    assert g_b.counter() > 0  # the operators' monitor still answers
    st_a = world.wait_status(a, lambda s: s["role"] == "backup" and s["state"] == "protected", 60,
                             "A to back the guest up")
    assert [o["state"] for o in st_a.get("other_roles", [])] == ["failed-over"], st_a

    # ... and it fails back to A.
    m2, g_a = _cycle(world, b, a, g_b)
    st_b = world.wait_status(b, lambda s: s["state"] == "failed-over" and s["role"] == "primary", 10,
                             "B's protection to end in failed-over")
    assert sorted(o["state"] for o in st_b.get("other_roles", [])) == ["ended"], st_b
    # The checkpoint B's guest ran from is never promoted again.
    r = b.ctl("failover", DOMAIN)
    assert r.returncode != 0, f"B promoted a stale checkpoint: {r.stdout}{r.stderr}"

    # A third protection, A -> B again: B takes a session over its ended copy.
    _reprotect(world, a, b)
    m3, _ = _cycle(world, a, b, g_a)

    # Each host's history says where the guest ran, in order.
    hist_a = [h["text"] for h in a.status()["history"]]
    expect_a = ["protected to", "failed over to", "backing up for primary", "failed over from",
                "protected to", "failed over to"]
    it = iter(hist_a)
    assert all(any(t.startswith(e) or e in t for t in it) for e in expect_a), hist_a
    hist_b = [h["text"] for h in b.status()["history"]]
    assert any("re-protection of the guest promoted here" in t for t in hist_b), hist_b
    out = b.ctl("status").stdout
    assert hist_b[-1] in out and "also primary: failed-over" in out, out
    record(request, failover1_ms=m1["failover_ms"], failover2_ms=m2["failover_ms"],
           failover3_ms=m3["failover_ms"], epochs=[m1["epoch"], m2["epoch"], m3["epoch"]])


def test_reprotect_with_etcd_moves_ownership_and_fails_back(world, arbiter_net, request):
    """The same with arbitration (real 3-member etcd, A and B in their own
    namespaces): B's re-protection takes the domain over from its promotion's
    lease (one owner key, B's new session), the promotion's lease is handed
    over (it neither fences the guest nor counts as a win later), and the
    failback to A wins etcd with a newer token."""
    from test_arbiter import etcd_get
    net = arbiter_net
    eps = net.etcd.endpoints()
    kw = dict(etcd=eps, lease_ttl_ms=3000, lease_margin_ms=1000)
    guest = world.start_guest(wait_boot=False, netns=net.ns("A"))
    b = world.start_backup("B", netns=net.ns("B"), listen_host=net.ip("B"), host_id="B", **kw)
    a = world.start_backup("A", netns=net.ns("A"), listen_host=net.ip("A"), host_id="A", **kw)
    world.wait_booted(guest)
    world.protect(a, b, guest)
    prefix = f"/remus-{world.dir.name}/domains/{DOMAIN}"

    def owner():
        import json
        v = etcd_get(net, f"{prefix}/owner")
        return None if v is None else dict(json.loads(v["value"]), mod_revision=v["mod_revision"])

    m1, g_b = _cycle(world, a, b, guest)
    t1 = m1_token = b.status(DOMAIN)["promotion"]["token"]
    assert owner()["host"] == "B" and owner()["mod_revision"] == t1, (owner(), t1)

    st = _reprotect(world, b, a)
    o = owner()
    assert o["host"] == "B" and o["session"] == st["arbiter"]["session"] and o["mod_revision"] > t1, (o, st["arbiter"])
    assert etcd_get(net, f"{prefix}/session")["value"] == o["session"]
    # Past a TTL: the promotion's old lease fenced nothing, and the guest counts on.
    c = g_b.counter()
    time.sleep(4.5)
    assert g_b.counter() > c, "the guest stopped after the re-protection took the domain over"
    world.wait_status(b, lambda s: s["last_acked_epoch"] >= 20 and s["arbiter"]["state"] == "held", 60,
                      "B's protection to hold its lease and be acked")

    m2, _ = _cycle(world, b, a, g_b)
    st_a = a.status()
    t2 = st_a["promotion"]["token"]
    assert t2 > o["mod_revision"] and owner()["host"] == "A" and owner()["mod_revision"] == t2, (owner(), t2)
    record(request, token1=m1_token, reprotect_token=o["mod_revision"], token2=t2,
           failover1_ms=m1["failover_ms"], failover2_ms=m2["failover_ms"])


def test_automatic_reprotection_waits_for_the_lost_host(world, request):
    """A dies whole (its remusd and its QEMU): B promotes and keeps trying to
    protect the guest back to A, saying so in status, until A's remusd is
    back at its address; then protection resumes with no command."""
    guest = world.start_guest(wait_boot=False)
    b = world.start_backup("B", extra=("--reprotect-to", "self"))
    a = world.start_backup("A", extra=("--reprotect-to", "self"))
    world.wait_booted(guest)
    world.protect(a, b, guest)
    pr = Protected(world, a, b, guest)
    pr.wait_acked(20)
    c0 = pr.acked_reference()
    p_kill = guest.counter()
    a.kill()
    guest.kill()
    m = check_promoted(world, b, c0, p_kill, window_s=3)
    st = world.wait_status(b, lambda s: s.get("reprotect", {}).get("attempts", 0) >= 2, 30,
                           "B to try A more than once")
    assert st["reprotect"]["state"] in ("waiting", "trying") and "unreachable" in st["reprotect"].get("error", ""), st
    assert st["state"] == "failed-over", st
    port = int(a.listen.rsplit(":", 1)[1])
    a2 = world.start_backup("A2", extra=("--reprotect-to", "self"), listen_port=port, state_name="A")
    st = world.wait_status(b, lambda s: s["role"] == "primary" and s["state"] == "protected", 120,
                           "B to protect the guest to A once A's remusd is back")
    assert st["reprotect"]["state"] == "done", st
    world.wait_status(a2, lambda s: s["role"] == "backup" and s["state"] == "protected", 30, "A2 backing up")
    m2, _ = _cycle(world, b, a2, PromotedGuest(m))
    record(request, failover_ms=m["failover_ms"], attempts=st["reprotect"]["attempts"], failback_ms=m2["failover_ms"])


def test_ten_alternating_failovers(world, request):
    """Ten failovers in a row, A -> B -> A -> ..., each followed by the
    automatic re-protection to the host that lost the guest (both remusd run
    --reprotect-to self: no command after the first protect), with every
    checker on every step: a mirrored disk (the guest's disk writer keeps a
    record of what is durable in memory and verifies it after each restore),
    the memory checker and counter, and one TCP client connection through
    output commit (nfqueue) for all ten. At every step: nothing acked is lost,
    nothing after the kill is restored, the disk holds every record the
    restored memory believes durable, the connection carries on, and exactly
    one copy of the guest runs."""
    from conftest import live_qemus
    from test_disk import _disk_guest, _wait_disk_ok, check_restored_disk
    from test_netbuf import Net, events
    net = Net(world)
    try:
        img, disk_kw = _disk_guest(world)
        nkw = net.guest_kw()
        guest = world.start_guest(wait_boot=False, dirty=2000, extra_args=[*disk_kw["extra_args"], *nkw["extra_args"]],
                                  extra_append=disk_kw["extra_append"] + " " + nkw["extra_append"])
        hosts = [world.start_backup("A", extra=("--reprotect-to", "self")),
                 world.start_backup("B", extra=("--reprotect-to", "self"))]
        world.wait_booted(guest)
        world.protect(hosts[0], hosts[1], guest, extra=["--netbuf", "nfqueue"])
        world.wait_status(hosts[0], lambda s: s["last_acked_epoch"] >= 20 and s["disks"][0]["ready"], 120,
                          "20 acks with the disk copy complete")
        _wait_disk_ok(world, guest.serial, 3)
        client, out = net.client(duration=900, name="client")
        world.wait_for(lambda: sum(e["ev"] == "resp" for e in events(out)) >= 20, 60, "20 answers")
        g = guest
        times, epochs, answers = [], [], []
        for i in range(10):
            src, dst = hosts[i % 2], hosts[(i + 1) % 2]
            if i > 0:
                st = world.wait_status(src, lambda s: s["role"] == "primary" and s["state"] == "protected"
                                       and s["disks"] and s["disks"][0]["ready"], 120,
                                       f"cycle {i}: the automatic re-protection from {src.name} with its disk")
                assert st["backup"] == dst.listen, st
                assert st["reprotect"]["state"] == "done" and st["reprotect"]["to"] == dst.listen, st["reprotect"]
                assert any("re-protecting automatically to " + dst.listen in h["text"] for h in st["history"]), st
            copies = live_qemus(world.dir)
            assert len(copies) == 1, f"cycle {i}: {len(copies)} copies of the guest run: {copies}"
            pr = Protected(world, src, dst, g)
            pr.wait_acked(10)
            c0 = pr.acked_reference()
            time.sleep(0.5)  # disk writes in flight at the kill
            p_kill = g.counter()
            n = sum(e["ev"] == "resp" for e in events(out))
            t_kill = time.time()
            g.kill()
            m = check_promoted(world, dst, c0, p_kill, window_s=5)
            copies = live_qemus(world.dir)
            assert copies == [m["pid"]], f"cycle {i}: copies {copies}, promoted {m['pid']}"
            check_restored_disk(world, dst, f"cycle {i}")
            world.wait_for(lambda: any(e["ev"] == "resp" and e["t_recv"] > t_kill for e in events(out)), 60,
                           f"cycle {i}: answers from the restored guest on the same connection")
            g = PromotedGuest(m)
            times.append(m["failover_ms"])
            epochs.append(m["epoch"])
            answers.append(n)
        client.kill()
        client.wait()
        ev = events(out)
        assert not [e for e in ev if e["ev"] == "error"], [e for e in ev if e["ev"] == "error"]
        assert sum(e["ev"] == "connected" for e in ev) == 1, "the client reconnected"
        seqs = [e["seq"] for e in ev if e["ev"] == "resp"]
        assert seqs == list(range(1, len(seqs) + 1)), f"answers out of sequence: {seqs[:50]}..."
        assert answers == sorted(answers) and len(seqs) > answers[-1], (len(seqs), answers)
        record(request, failover_ms=times, epochs=epochs, answers=len(seqs))
    finally:
        world.cleanup()
        net.close()
