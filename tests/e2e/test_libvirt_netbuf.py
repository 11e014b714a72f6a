"""Output buffering (netbuf, nfqueue) of a libvirt domain, end to end.

World: test_netbuf.py's namespaces (H: bridge br0 with the persistent tap
rtap0 and both remusd; C: the client on a veth into br0), plus private
libvirtds (tests/e2e/libvirt_world.py) run inside H: A for the primary, B for
the backup's restore.  The domain is the test guest with
<interface type='ethernet'><target dev='rtap0' managed='no'/>: libvirt opens
the tap and hands QEMU its fd.  remusd is given no --netbuf-if: in libvirt
mode it takes the taps from the live domain XML.

- No answer before its epoch is acked: with acks delayed 300 ms, every answer
  to the client arrives after the ACK of the epoch that produced it, replies
  take longer than the delay (unprotected ones do not), and the primary's
  status shows packets held and released on the tap named in the XML.
- A TCP connection survives `virsh destroy` on A: B's libvirt restores the
  guest on the same tap, the connection goes on without a gap, and the client
  never saw an answer from beyond the checkpoint the backup resumed from.
- An interface whose packets cannot be held (user networking) is refused
  with a message naming the domain, the interface and --netbuf none; with
  --netbuf none the domain is protected.

Skipped (with the reason) as test_libvirt_mode.py.
"""

import threading
import time

import pytest

from conftest import BUILD, QEMU, read_store_counter, record
from libvirt_world import finish_worlds, LibvirtWorlds, guest_files, skip_reason
from test_netbuf import GUEST_IP, PORT, TAP, Net, epoch_times, events, quantile, run_client

PROBE = BUILD / "replicator" / "libvirt" / "libvirt_monitor_probe"
DOMAIN = "web1"
BOOT_TIMEOUT = 120
CHECK_OK = "remus-guest: check ok"
MAC = "52:54:00:77:00:02"

GUEST_KERNEL, GUEST_INITRD, COUNTER_GPA, CMDLINE = guest_files()
_why = skip_reason(PROBE)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

# The guest's NIC on the tap of test_netbuf's world; no vhost-net (QEMU's own
# virtio-net datapath, as the QMP-mode tests) and no option ROM (the COLO
# QEMU build ships none).
ETHERNET = (f"<interface type='ethernet'><mac address='{MAC}'/><target dev='{TAP}' managed='no'/>"
            "<model type='virtio'/><driver name='qemu'/><rom enabled='no'/></interface>")


@pytest.fixture
def lvnet(world, request):
    """(net, LibvirtWorlds): the namespaces; libvirt worlds go in net.h."""
    net = Net(world)
    ws = LibvirtWorlds(prefix="remus-lvn-")
    try:
        yield net, ws
    finally:
        ws.stop()  # libvirtd lives in net's namespace: stop it before the namespace goes
        world.cleanup()
        net.close()
        finish_worlds(request, ws)


def domain_xml(lvw, devices=(ETHERNET,)):
    return lvw.guest_xml(DOMAIN, GUEST_KERNEL, GUEST_INITRD,
                         f"{CMDLINE} remus.ip={GUEST_IP}/24 remus.tcp={PORT}",
                         lvw.dir / f"{DOMAIN}.serial", emulator=QEMU, devices=devices)


def wait_booted(world, lvw):
    serial = lvw.dir / f"{DOMAIN}.serial"
    world.wait_for(lambda: CHECK_OK in serial.read_text(errors="replace") if serial.exists() else False,
                   BOOT_TIMEOUT, f"{DOMAIN} to boot in libvirt world {lvw.name} ({serial})", interval=0.2)


def daemons(world, a, b=None, ack_delay_ms=None, auto_promote=True):
    bextra = ["--libvirt-uri", b.uri, "--libvirt-pid-dir", str(b.pid_dir)] if b else []
    backup = world.start_backup(ack_delay_ms=ack_delay_ms, auto_promote=auto_promote, extra=bextra)
    primary = world.start_primary(extra=["--libvirt-pid-dir", str(a.pid_dir)])
    return primary, backup


def protect(world, primary, backup, a, interval_ms, netbuf="nfqueue", check=True):
    r = primary.ctl("protect", DOMAIN, "--backup", backup.listen, "--connect", a.uri,
                    "--interval", str(interval_ms), "--netbuf", netbuf, "--disks", "none")
    if check:
        assert r.returncode == 0, f"protect: {r.stdout}{r.stderr}" + world.diagnostics()
    return r


# -------------------------------------------------------------------- tests

def test_libvirt_no_answer_before_its_epoch_is_acked(world, lvnet, request):
    net, ws = lvnet
    a = ws.start("A", netns=net.h)
    primary, backup = daemons(world, a, ack_delay_ms=300, auto_promote=False)
    a.create(domain_xml(a))
    wait_booted(world, a)
    base = run_client(net, 3, "unprotected")
    base_rtt = [r["t_recv"] - r["t_send"] for r in base]
    assert len(base) >= 10, base

    protect(world, primary, backup, a, 200)
    st = world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 3, 60, "3 acks")
    # The tap comes from the live XML (no --netbuf-if given).
    assert st["netbuf"]["mode"] == "nfqueue" and st["netbuf"]["interfaces"] == [TAP], st["netbuf"]
    assert st["netbuf"]["active"] and st["libvirt"]["uri"] == a.uri, st
    assert "NFQUEUE" in net.iptables_rules(), net.iptables_rules()

    # Held packets show in the status while answers wait for delayed ACKs.
    held, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            s = primary.status()
            if s:
                held.append(s["netbuf"]["buffered_packets"])
            time.sleep(0.05)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        resp = run_client(net, 8, "protected")
    finally:
        stop.set()
        t.join(timeout=10)
    time.sleep(0.5)  # the last ACK lines reach the log
    barrier, ack = epoch_times(primary.log)
    assert len(resp) >= 10, resp
    rtts = []
    for r in resp:
        # As test_netbuf: the answer's epoch is the first whose barrier comes
        # after the request; it may leave only once that epoch is acked.
        later = [e for e, tb in barrier.items() if tb > r["t_send"]]
        assert later, f"no barrier after request {r}"
        e = min(later)
        assert e in ack, f"epoch {e} never acked, yet answer {r} arrived"
        assert r["t_recv"] >= ack[e] - 0.0005, (
            f"answer {r['i']} arrived {1000 * (ack[e] - r['t_recv']):.1f} ms before epoch {e} was acked "
            f"(barrier {barrier[e]:.6f}, ack {ack[e]:.6f}, recv {r['t_recv']:.6f})" + world.diagnostics())
        rtts.append(r["t_recv"] - r["t_send"])
    assert min(rtts) >= 0.3, f"an answer came back in {min(rtts) * 1000:.1f} ms, under the 300 ms ack delay"
    assert quantile(base_rtt, 0.5) < 0.3, f"unprotected answers already took {quantile(base_rtt, 0.5)}s"
    assert max(held) > 0, f"the status never showed a held packet: {held}"
    st = primary.status()
    assert st["netbuf"]["released_packets"] >= len(resp), st["netbuf"]
    assert st["netbuf"]["dropped_packets"] == 0, st["netbuf"]
    record(request, answers=len(resp), rtt_p50_ms=round(quantile(rtts, 0.5) * 1000, 1),
           rtt_p99_ms=round(quantile(rtts, 0.99) * 1000, 1),
           unprotected_rtt_p50_ms=round(quantile(base_rtt, 0.5) * 1000, 2), max_held_packets=max(held))

    # Unprotect releases what is held and removes the rules.
    r = primary.ctl("unprotect", DOMAIN)
    assert r.returncode == 0, r.stderr
    assert "NFQUEUE" not in net.iptables_rules(), net.iptables_rules()
    after = run_client(net, 2, "after-unprotect")
    assert quantile([x["t_recv"] - x["t_send"] for x in after], 0.5) < 0.3


def test_libvirt_tcp_connection_survives_destroy(world, lvnet, request):
    net, ws = lvnet
    a = ws.start("A", netns=net.h)
    b = ws.start("B", netns=net.h)
    primary, backup = daemons(world, a, b)
    a.create(domain_xml(a))
    wait_booted(world, a)
    protect(world, primary, backup, a, 100)
    st = world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 5, 60, "5 acks")
    assert st["netbuf"]["interfaces"] == [TAP], st["netbuf"]
    p, out = net.client(duration=60, name="client")
    world.wait_for(lambda: len([e for e in events(out) if e["ev"] == "resp"]) >= 30, 30, "30 answers")
    # Before the call: `virsh destroy` returns only after libvirt's cleanup,
    # when the restored guest may already be answering.
    t_kill = time.time()
    a.destroy(DOMAIN)
    t_destroyed = time.time()
    bst = world.wait_status(backup, lambda s: s["state"] in ("failed-over", "failed"), 90, "promotion")
    assert bst["state"] == "failed-over", bst
    assert bst["libvirt"] == {"uri": b.uri, "domain": DOMAIN}, bst
    assert b.domstate(DOMAIN)[0] == "running", b.domstate(DOMAIN)
    # B's QEMU opened the same tap, from the XML the primary sent.
    assert f"<target dev='{TAP}'" in b.virsh("dumpxml", DOMAIN).stdout
    committed = read_store_counter(bst["store"], gpa=COUNTER_GPA)
    world.wait_status(primary, lambda s: s["state"] == "failed-over", 30, "primary failed-over")
    assert "NFQUEUE" not in net.iptables_rules(), net.iptables_rules()
    world.wait_for(lambda: any(e["ev"] == "resp" and e["t_recv"] > t_kill + 0.001 and e["counter"] > committed
                               for e in events(out)), 60, "answers from the restored guest")
    p.kill()
    p.wait()
    ev = events(out)
    errs = [e for e in ev if e["ev"] == "error"]
    assert not errs, f"the connection broke: {errs}" + world.diagnostics()
    resp = [e for e in ev if e["ev"] == "resp"]
    seqs = [r["seq"] for r in resp]
    assert seqs == list(range(1, len(seqs) + 1)), f"answers out of sequence: {seqs}"
    assert [r["i"] for r in resp] == seqs, "answers do not match their requests"
    # Answers before the destroy came from A; while it runs (libvirt's
    # SIGTERM, then its cleanup) A's last acked output may still be released
    # and B's guest may already answer; afterwards only B's guest answers.
    before = [r for r in resp if r["t_recv"] <= t_kill]
    after = [r for r in resp if r["t_recv"] > t_destroyed]
    assert before and after
    # Output commit: everything the client saw from A came from a state no
    # later than the checkpoint B resumed from.
    assert max(r["counter"] for r in before) <= committed, (
        f"the client saw counter {max(r['counter'] for r in before)} from the primary, "
        f"beyond the committed {committed}")
    assert max(r["counter"] for r in after) > committed
    # B's guest went on from the committed counter: an answer A had sent from
    # beyond it would show as the counter going back.
    counters = [r["counter"] for r in resp]
    back = [(x, y) for x, y in zip(counters, counters[1:]) if y < x]
    assert not back, f"the guest's counter went back across the failover: {back} (committed {committed})"
    resumed = next(r for r in resp if r["counter"] > committed)
    last_before = max((r for r in resp if r["t_recv"] < resumed["t_recv"]), key=lambda r: r["t_recv"])
    record(request, answers_before=len(before), answers_after=len(after), committed=committed,
           outage_s=round(resumed["t_recv"] - last_before["t_recv"], 2),
           failover_ms=bst["promotion"]["failover_ms"])


def test_libvirt_interface_that_cannot_be_held_is_refused(world, lvnet):
    net, ws = lvnet
    a = ws.start("A", netns=net.h)
    primary, backup = daemons(world, a, auto_promote=False)
    user = ("<interface type='user'><mac address='52:54:00:77:00:09'/><model type='virtio'/>"
            "<rom enabled='no'/></interface>")
    a.create(domain_xml(a, devices=(ETHERNET, user)))
    r = protect(world, primary, backup, a, 100, check=False)
    assert r.returncode != 0, r.stdout
    # Named from the live XML: libvirt's alias and the MAC.
    assert f"domain {DOMAIN}: interface net1 (52:54:00:77:00:09) is user networking" in r.stderr, r.stderr
    assert "cannot be held on the host" in r.stderr and "--netbuf none" in r.stderr, r.stderr
    assert "NFQUEUE" not in net.iptables_rules(), net.iptables_rules()
    assert a.domstate(DOMAIN)[0] == "running"
    # Without output buffering the same domain is protected.
    protect(world, primary, backup, a, 100, netbuf="none")
    st = world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 3, 60, "3 acks")
    assert st["netbuf"]["mode"] == "none" and st["netbuf"]["interfaces"] == [], st["netbuf"]
