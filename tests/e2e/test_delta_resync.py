"""Delta resync: a backup that holds an earlier image of the domain offers its
page hashes, and the initial copy sends only the pages that image lacks
(docs/formats/replication-link.md, "Delta resync"). Each test ends with the
strongest check there is: the primary QEMU is killed and the guest promoted on
the backup from the resynced image must run on with its memory checker happy
and nothing acked lost (check_promoted)."""

import json
import socket
import threading
import time
from pathlib import Path

from conftest import DEFAULT_HB_TIMEOUT_MS, DOMAIN, check_promoted, record, setup_protected

HB_S = DEFAULT_HB_TIMEOUT_MS / 1000
PAGE = 4096
# A guest that dirties little between two protections (the working set is
# rewritten by the checker: at most wss_mib of it differs).
GUEST = {"mem_mb": 256, "wss_mib": 16, "dirty": 2000}


def _initial(pr):
    """The primary's and the backup's view of the last initial copy."""
    return pr.pstatus()["initial_copy"], pr.bstatus()["initial_copy"]


def _unprotect(world, pr):
    r = pr.primary.ctl("unprotect", DOMAIN)
    assert r.returncode == 0, f"unprotect failed: {r.stdout}{r.stderr}" + world.diagnostics()
    world.wait_status(pr.backup, lambda s: s["state"] == "unprotected", 5, "backup state unprotected")


def _base_store(backup):
    d = backup.domain_dir()
    base = d / "base"
    assert base.exists(), f"no resync base kept in {d}: {sorted(p.name for p in d.iterdir())}"
    return d / base.read_text().strip()


def _protect_again(world, pr):
    world.protect(pr.primary, pr.backup, pr.guest, interval_ms=100)
    st = pr.pstatus()
    assert st["state"] == "protected", st
    pr.wait_acked(20)


def _kill_and_promote(world, pr, request, **kv):
    c0 = pr.acked_reference()
    p_kill = pr.guest.counter()
    pr.guest.kill()
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=8, timeout=HB_S + 20)
    record(request, promoted_epoch=m["epoch"], failover_ms=m["failover_ms"], **kv)


def _check_delta(p, b, first_wire):
    total = p["pages_sent"] + p["pages_kept"]
    assert p["mode"] == "delta" and b["mode"] == "delta", (p, b)
    assert b["verified"] is True, b
    assert p["pages_kept"] == b["kept_pages"], (p, b)
    assert p["pages_sent"] < total, (p, b)
    # Most of the guest did not change since the first copy.
    assert p["pages_kept"] > 0.5 * total, f"kept only {p['pages_kept']} of {total} pages: {p}"
    assert p["bytes_saved"] == p["pages_kept"] * PAGE, p
    assert p["wire_bytes"] < 0.5 * first_wire, \
        f"the delta resync took {p['wire_bytes']} bytes on the link, the full copy {first_wire}"


def test_unprotect_then_protect_sends_a_delta(world, request):
    pr = setup_protected(world, wait_epochs=20, guest_kw=GUEST)
    p1, b1 = _initial(pr)
    assert p1["mode"] == "full" and b1["mode"] == "full", (p1, b1)
    assert p1["pages_kept"] == 0 and p1["wire_bytes"] > 0, p1
    _unprotect(world, pr)
    base = _base_store(pr.backup)
    bst = pr.backup.status()
    assert bst["restorable"] is False, f"a retired image is restorable: {bst}"
    assert "base" in bst["initial_copy"], bst
    _protect_again(world, pr)
    p2, b2 = _initial(pr)
    _check_delta(p2, b2, p1["wire_bytes"])
    # The base is gone once the new image committed; the new store is another one.
    assert not base.exists(), f"{base} outlived the commit of the resynced image"
    assert not (pr.backup.domain_dir() / "base").exists()
    assert pr.bstatus()["store"] != str(base)
    log = Path(pr.primary.log).read_text(errors="replace")
    assert "delta resync: kept " in log, "no 'delta resync: kept N of M pages' line in the primary's log"
    _kill_and_promote(world, pr, request, first_wire=p1["wire_bytes"], delta_wire=p2["wire_bytes"],
                      kept=p2["pages_kept"], sent=p2["pages_sent"],
                      wire_ratio=round(p2["wire_bytes"] / p1["wire_bytes"], 4))


def test_backup_restart_then_protect_sends_a_delta(world, request):
    """kill -9 of the backup remusd: the restarted one keeps its checkpoint
    (for a deliberate failover); protecting again resyncs from it."""
    pr = setup_protected(world, wait_epochs=20, guest_kw=GUEST)
    p1, _ = _initial(pr)
    pr.backup.kill()
    world.wait_status(pr.primary, lambda s: s["state"] == "unprotected", HB_S + 2, "primary unprotected")
    # The primary's unprotected domain holds QEMU's monitor until removed.
    pr.primary.ctl("unprotect", DOMAIN)
    pr.backup = world.start_backup(name=pr.backup.name)
    st = pr.backup.status()
    assert st["state"] == "primary-lost" and st["restorable"], st
    _protect_again(world, pr)
    p2, b2 = _initial(pr)
    _check_delta(p2, b2, p1["wire_bytes"])
    _kill_and_promote(world, pr, request, kept=p2["pages_kept"], sent=p2["pages_sent"],
                      wire_ratio=round(p2["wire_bytes"] / p1["wire_bytes"], 4))


def _nonzero_static_pages(path, want, start):
    """Offsets of `want` non-zero pages of the file from `start` on."""
    out = []
    with open(path, "rb") as f:
        f.seek(start)
        off = start
        while len(out) < want:
            data = f.read(PAGE)
            if len(data) < PAGE:
                break
            if data.strip(b"\0"):
                out.append(off)
            off += PAGE
    return out


def test_tampered_base_pages_are_sent_and_the_result_is_correct(world, request):
    """Bytes flipped in the backup's stored image between two protections:
    the offered hashes say so, those pages are sent, and the image is right."""
    pr = setup_protected(world, wait_epochs=20, guest_kw=GUEST)
    p1, _ = _initial(pr)
    _unprotect(world, pr)
    base = _base_store(pr.backup)
    manifest = json.loads((base / "manifest.json").read_text())
    ram = next(b for b in manifest["blocks"] if b["id"] == "pc.ram")
    img = base / ram["file"]
    # Guest kernel pages (loaded low, never rewritten by the checker).
    offsets = _nonzero_static_pages(img, 8, 0x100000)
    assert len(offsets) == 8, f"found only {offsets} in {img}"
    original = {}
    with open(img, "r+b") as f:
        for off in offsets:
            f.seek(off + 100)
            b = f.read(1)
            original[off] = b
            f.seek(off + 100)
            f.write(bytes([b[0] ^ 0xff]))
    _protect_again(world, pr)
    p2, b2 = _initial(pr)
    _check_delta(p2, b2, p1["wire_bytes"])
    # The flipped pages were sent: the new image holds the guest's bytes.
    new = Path(pr.bstatus()["store"])
    with open(new / ram["file"], "rb") as f:
        for off, b in original.items():
            f.seek(off + 100)
            assert f.read(1) == b, f"page {off:#x} of the resynced image kept the tampered byte"
    _kill_and_promote(world, pr, request, kept=p2["pages_kept"], sent=p2["pages_sent"], tampered=len(offsets))


class ThrottledProxy:
    """Forwards a TCP link, primary->backup at most `rate` bytes/s, so an
    initial copy lasts long enough to be interrupted."""

    def __init__(self, world, target, rate):
        host, port = target.rsplit(":", 1)
        self.target, self.rate = (host, int(port)), rate
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.addr = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.socks, self.closed = [], False
        world._closers.append(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
                s = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            s.settimeout(None)
            self.socks += [c, s]
            threading.Thread(target=self._pump, args=(c, s, self.rate), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, None), daemon=True).start()

    def _pump(self, a, b, rate):
        t0, sent = time.monotonic(), 0
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
                sent += len(d)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.closed = True
        for s in [self.lsock, *self.socks]:
            try:
                s.close()
            except OSError:
                pass


def test_backup_killed_mid_resync_keeps_no_half_image(world, request):
    """kill -9 of the backup remusd in the middle of a delta resync: the
    restarted backup has no restorable checkpoint (the retired one never comes
    back, the new one never committed), keeps its base, and the next
    protection resyncs a correct image from it."""
    pr = setup_protected(world, wait_epochs=20, guest_kw=GUEST)
    p1, _ = _initial(pr)
    _unprotect(world, pr)
    _base_store(pr.backup)
    # Slow enough that the delta (a few MiB) takes seconds.
    proxy = ThrottledProxy(world, pr.backup.listen, rate=512 * 1024)
    world.protect(pr.primary, pr.backup, pr.guest, interval_ms=100, no_wait=True, backup_addr=proxy.addr)
    world.wait_status(pr.backup, lambda s: s["state"] == "syncing" and s["sync"]["done_bytes"] > 0, 60,
                      "the resync under way")
    st = pr.backup.status()
    assert st["last_committed_epoch"] == -1 and not st["restorable"], st
    pr.backup.kill()
    world.wait_status(pr.primary, lambda s: s["state"] == "unprotected", HB_S + 5, "primary unprotected")
    pr.primary.ctl("unprotect", DOMAIN)
    proxy.close()
    pr.backup = world.start_backup(name=pr.backup.name)
    st = pr.backup.status()
    assert st is not None and not st["restorable"], f"a half-resynced image is restorable: {st}"
    assert st["last_committed_epoch"] == -1, st
    r = pr.backup.ctl("failover", DOMAIN, timeout=30)
    assert r.returncode != 0, f"failover from a half-resynced image succeeded: {r.stdout}"
    _base_store(pr.backup)
    _protect_again(world, pr)
    p2, b2 = _initial(pr)
    _check_delta(p2, b2, p1["wire_bytes"])
    _kill_and_promote(world, pr, request, kept=p2["pages_kept"], sent=p2["pages_sent"])


def test_fail_back_resyncs_a_delta_from_the_store_the_promotion_used(world, request):
    """A -> B, B promotes; B protects the guest back to A (A holds no image:
    full), A promotes; A protects it to B again: B still holds the store it
    promoted from, which is that copy's base. Then B promotes from the
    resynced image."""
    from test_reprotect import _cycle, _reprotect
    guest = world.start_guest(wait_boot=False, **GUEST)
    b = world.start_backup("B")
    a = world.start_backup("A")
    world.wait_booted(guest)
    world.protect(a, b, guest)
    first = a.status()["initial_copy"]
    assert first["mode"] == "full", first
    _, g_b = _cycle(world, a, b, guest)
    st = _reprotect(world, b, a)
    assert st["initial_copy"]["mode"] == "full", st["initial_copy"]  # A never held an image
    _, g_a = _cycle(world, b, a, g_b)
    st = _reprotect(world, a, b)
    p = st["initial_copy"]
    total = p["pages_sent"] + p["pages_kept"]
    assert p["mode"] == "delta", p
    assert p["pages_kept"] > 0.5 * total and p["pages_sent"] < total, p
    assert p["wire_bytes"] < 0.5 * first["wire_bytes"], (p, first)
    m, _ = _cycle(world, a, b, g_a)
    record(request, kept=p["pages_kept"], sent=p["pages_sent"], promoted_epoch=m["epoch"],
           wire_ratio=round(p["wire_bytes"] / first["wire_bytes"], 4))
