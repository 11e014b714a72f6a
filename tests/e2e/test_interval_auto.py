"""`remusctl protect --interval auto` (issue 17): the checkpoint interval
follows the replication link.

A proxy between the primary and the backup delays what the backup sends
(ACKs, heartbeats) by an amount the test changes while the guest runs: a
slow link or a slow backup, as the primary sees it. With --interval auto
the interval rises until checkpoints keep pace with the ACKs (backpressure
stays rare), and falls back once the link recovers. The same slow link
under a fixed short interval (`remusctl tune --interval 20`) piles up
unacked checkpoints and stalls the guest on backpressure again and again.
"""

import collections
import contextlib
import socket
import threading
import time

from conftest import DOMAIN, Protected, record

SLOW_MS = 800  # the ACK delay while the link is "slow"


class AckDelayProxy:
    """TCP proxy: primary->backup unchanged, backup->primary held `delay_ms`
    (changeable at any time; order is kept)."""

    def __init__(self, world, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.delay_ms = 0
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.addr = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self._socks = []
        world._closers.append(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=10)
                s.settimeout(None)
            except OSError:
                c.close()
                continue
            self._socks += [c, s]
            threading.Thread(target=self._pipe, args=(c, s), daemon=True).start()
            q = collections.deque()
            cv = threading.Condition()
            threading.Thread(target=self._delayed_reader, args=(s, q, cv), daemon=True).start()
            threading.Thread(target=self._delayed_writer, args=(c, q, cv), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                b = src.recv(1 << 20)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _delayed_reader(self, src, q, cv):
        try:
            while True:
                b = src.recv(1 << 16)
                with cv:
                    q.append((time.monotonic() + self.delay_ms / 1000.0, b))
                    cv.notify()
                if not b:
                    return
        except OSError:
            with cv:
                q.append((0, b""))
                cv.notify()

    @staticmethod
    def _delayed_writer(dst, q, cv):
        try:
            while True:
                with cv:
                    while not q:
                        cv.wait()
                    due, b = q[0]
                    now = time.monotonic()
                    if due > now:
                        cv.wait(due - now)
                        continue
                    q.popleft()
                if not b:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(b)
        except OSError:
            pass

    def close(self):
        with contextlib.suppress(OSError):
            self.lsock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def test_auto_interval_follows_a_slow_link(world, request):
    guest = world.start_guest(wait_boot=False, dirty=2000, wss_mib=32)
    backup = world.start_backup()
    primary = world.start_primary()
    proxy = AckDelayProxy(world, backup.listen)
    world.wait_booted(guest)
    r = primary.ctl("protect", DOMAIN, "--qmp", str(guest.qmp_sock), "--backup", proxy.addr, "--interval", "auto",
                    "--latency-budget", "3000", "--interval-min", "20", "--interval-max", "3000")
    assert r.returncode == 0 and " ms, auto)" in r.stdout, r.stdout + r.stderr + world.diagnostics()
    pr = Protected(world, primary, backup, guest)
    st = primary.status()
    assert st["interval_mode"] == "auto" and st["latency_budget_ms"] == 3000, st
    assert st["interval_auto"]["min_ms"] == 20 and st["interval_auto"]["max_ms"] == 3000, st
    r = primary.ctl("status", DOMAIN)
    assert r.returncode == 0 and "(auto, latency budget 3000 ms)" in r.stdout, r.stdout + r.stderr
    pr.wait_acked(st["last_acked_epoch"] + 30, timeout=60)
    fast = primary.status()
    fast_ms = fast["interval_ms"]
    # Acks on localhost take tens of ms under TCG: well under the slow link's.
    assert fast_ms < SLOW_MS, fast

    # The link slows: every ACK arrives SLOW_MS later. Keeping pace needs
    # 1.5 x the ack time.
    proxy.delay_ms = SLOW_MS
    t0 = time.monotonic()
    st = world.wait_status(primary, lambda s: s["interval_ms"] >= 1.3 * SLOW_MS, 40,
                           f"the automatic interval to rise above {1.3 * SLOW_MS:.0f} ms")
    rise_s = time.monotonic() - t0
    assert st["interval_reason"].startswith("keeping pace: acks take "), st["interval_reason"]
    # Settled: backpressure stays rare over the next checkpoints.
    time.sleep(3)
    w0, e0 = primary.status()["backpressure_waits"], primary.status()["last_acked_epoch"]
    time.sleep(8)
    slow = primary.status()
    auto_waits = slow["backpressure_waits"] - w0
    auto_epochs = slow["last_acked_epoch"] - e0
    assert auto_epochs >= 2, slow
    assert auto_waits <= 1, f"{auto_waits} backpressure waits at interval {slow['interval_ms']} ms: {slow}"

    # Recovered: the interval comes back down.
    proxy.delay_ms = 0
    t0 = time.monotonic()
    rec = world.wait_status(primary, lambda s: s["interval_ms"] <= slow["interval_ms"] / 2, 40,
                            "the automatic interval to fall back")
    fall_s = time.monotonic() - t0

    # The same slow link under a fixed 20 ms interval: checkpoints pile up
    # to max_unacked_epochs and the guest waits on backpressure.
    r = primary.ctl("tune", DOMAIN, "--interval", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    fixed = primary.status()
    assert fixed["interval_mode"] == "fixed" and fixed["interval_ms"] == 20, fixed
    assert fixed["interval_reason"] == "fixed by remusctl tune", fixed
    proxy.delay_ms = SLOW_MS
    time.sleep(3)
    w0 = primary.status()["backpressure_waits"]
    time.sleep(8)
    fixed_end = primary.status()
    fixed_waits = fixed_end["backpressure_waits"] - w0
    assert fixed_end["interval_ms"] == 20, fixed_end  # no automatic change any more
    assert fixed_waits >= 3 and fixed_waits > 2 * auto_waits, (fixed_waits, auto_waits, fixed_end)

    # And back to automatic through tune.
    proxy.delay_ms = 0
    r = primary.ctl("tune", DOMAIN, "--interval", "auto", "--latency-budget", "500")
    assert r.returncode == 0 and "interval automatic (latency budget 500 ms)" in r.stdout, r.stdout + r.stderr
    assert primary.status()["interval_mode"] == "auto"
    r = primary.ctl("tune", DOMAIN, "--interval", "auto", "--latency-budget", "5")
    assert r.returncode != 0 and "--latency-budget 5 ms is out of range (10..600000)" in r.stderr, r.stderr
    assert primary.status()["state"] == "protected"
    figures = {"fast_interval_ms": fast_ms, "slow_interval_ms": slow["interval_ms"],
                 "slow_ack_p50_ms": slow["ack_ms"]["p50"], "rise_s": round(rise_s, 1),
                 "recovered_interval_ms": rec["interval_ms"], "fall_s": round(fall_s, 1),
                 "auto_backpressure_waits_8s": auto_waits, "auto_epochs_8s": auto_epochs,
                 "fixed20_backpressure_waits_8s": fixed_waits,
                 "slow_reason": slow["interval_reason"]}
    record(request, **figures)
    print(figures)
