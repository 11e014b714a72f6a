"""remusctl's error paths against real daemons: exit codes and messages an
operator can act on."""

import os
from pathlib import Path

import pytest

from conftest import DOMAIN, QEMU, QEMU_10, free_port, record, setup_protected

DEBIAN_QEMU = Path("/usr/bin/qemu-system-x86_64")


def _out(r):
    return (r.stdout + r.stderr).strip()


def test_cli_errors(world, request):
    seen = {}

    # No daemon behind the socket.
    missing = world.dir / "nobody.sock"
    r = world.remusctl("--socket", str(missing), "status")
    assert r.returncode == 4, f"rc {r.returncode}: {_out(r)}"
    assert "remusd" in r.stderr and str(missing) in r.stderr, _out(r)
    seen["missing_socket"] = r.stderr.strip()

    # keygen refuses to overwrite an existing key.
    before = world.key.read_bytes()
    mode = os.stat(world.key).st_mode & 0o777
    assert mode == 0o600, oct(mode)
    r = world.remusctl("keygen", "--out", str(world.key))
    assert r.returncode != 0, f"keygen overwrote {world.key}: {_out(r)}"
    assert "exist" in r.stderr.lower(), _out(r)
    assert world.key.read_bytes() == before, "keygen changed the existing key file"
    seen["keygen_exists"] = r.stderr.strip()

    pr = setup_protected(world, interval_ms=100, wait_epochs=5)
    a, b = pr.primary, pr.backup

    # Bad --backup values: refused before anything is touched.
    for bad in ["127.0.0.1:notaport", "127.0.0.1:70000", ":7788"]:
        r = a.ctl("protect", "web2", "--qmp", str(pr.guest.qmp_sock), "--backup", bad)
        assert r.returncode != 0, f"--backup {bad} accepted: {_out(r)}"
        assert "--backup" in r.stderr and bad in r.stderr, _out(r)
        seen[f"bad_backup {bad}"] = r.stderr.strip()
    assert a.status("web2") is None

    # A monitor socket that does not exist.
    r = a.ctl("protect", "web3", "--qmp", str(world.dir / "no-such-qmp.sock"), "--backup", b.listen)
    assert r.returncode != 0 and "monitor" in r.stderr, _out(r)
    seen["bad_qmp"] = r.stderr.strip()

    # Protecting an already protected domain.
    r = a.ctl("protect", DOMAIN, "--qmp", str(pr.guest.qmp_sock), "--backup", b.listen)
    assert r.returncode == 6, f"rc {r.returncode}: {_out(r)}"
    assert "already protected" in r.stderr, _out(r)
    assert a.status()["state"] == "protected", "the refused protect disturbed the running protection"
    seen["already_protected"] = r.stderr.strip()

    # Status of an unknown domain: exit code 3, on both daemons.
    for d in (a, b):
        r = d.ctl("status", "nosuchdomain")
        assert r.returncode == 3, f"{d.name}: rc {r.returncode}: {_out(r)}"
        assert "nosuchdomain" in r.stderr, _out(r)
    seen["unknown_domain"] = r.stderr.strip()

    # Failover asked of the primary daemon (not a backup).
    r = a.ctl("failover", DOMAIN)
    assert r.returncode == 6, f"rc {r.returncode}: {_out(r)}"
    assert "not a backup" in r.stderr, _out(r)
    seen["failover_on_primary"] = r.stderr.strip()
    # ... and of a domain the backup does not have.
    r = b.ctl("failover", "nosuchdomain")
    assert r.returncode == 3, f"rc {r.returncode}: {_out(r)}"

    # Invalid domain names and intervals.
    r = a.ctl("status", "../etc")
    assert r.returncode != 0, _out(r)
    r = a.ctl("tune", DOMAIN, "--interval", "0")
    assert r.returncode != 0, _out(r)

    # The happy paths still work and print what they should.
    r = a.ctl("status")
    assert r.returncode == 0 and DOMAIN in r.stdout and "protected" in r.stdout, _out(r)
    r = b.ctl("status", DOMAIN)
    assert r.returncode == 0 and DOMAIN in r.stdout, _out(r)

    # None of this disturbed the protection.
    assert a.status()["state"] == "protected"
    assert b.status()["state"] == "protected"
    pr.wait_acked(a.status()["last_acked_epoch"] + 5, timeout=15)
    for k, v in seen.items():
        record(request, **{k.replace(" ", "_").replace(":", "_").replace(".", "_"): v})


def test_cli_refuses_unreachable_backup_and_broken_qemu(world, request):
    """The two refusals an operator meets first: a backup with no remusd
    listening, and a QEMU whose COLO engine is known broken (Debian 12's own
    QEMU 7.2 under TCG deadlocks after the first checkpoint). Each names the
    domain and the fix, and leaves the guest running untouched."""
    backup = world.start_backup()
    primary = world.start_primary()
    guest = world.start_guest(check=False)

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    r = primary.ctl("protect", DOMAIN, "--qmp", str(guest.qmp_sock), "--backup", dead, "--netbuf", "none")
    out = _out(r)
    assert r.returncode != 0, out
    assert DOMAIN in out and dead in out and "unreachable" in out and "remusd --listen" in out, out
    assert primary.status() is None or primary.status()["state"] != "protected", primary.status()
    assert guest.qmp.status() == "running"
    record(request, backup_unreachable=r.stderr.strip())

    if not DEBIAN_QEMU.exists():
        pytest.fail(f"{DEBIAN_QEMU} (Debian's qemu-system-x86) is missing; scripts/install-deps.sh installs it")
    old = world.start_guest(name="old", check=False, qemu=DEBIAN_QEMU)
    r = primary.ctl("protect", "web9", "--qmp", str(old.qmp_sock), "--backup", backup.listen, "--netbuf", "none")
    out = _out(r)
    assert r.returncode != 0, out
    assert "web9" in out and "QEMU 7.2." in out and "under TCG deadlocks" in out and "scripts/build-qemu.sh" in out, out
    assert old.qmp.status() == "running", "the refused protect left the guest stopped"
    assert old.qmp.execute("query-migrate").get("status") in (None, "none"), "a migration was started"
    assert backup.status("web9") is None, "the backup got state for a refused domain"
    record(request, colo_broken=r.stderr.strip())


def test_protect_refuses_another_qemu_release_on_the_backup(world, request):
    """The version rule: a guest on QEMU 10.0 cannot be protected to a backup
    that would restore it with QEMU 7.2 (its --qemu). The backup refuses when
    CONFIG arrives, before any copy, naming both releases and the fix; the
    guest runs on untouched and the backup keeps nothing."""
    backup = world.start_backup(qemu=QEMU)  # 7.2
    primary = world.start_primary()
    guest = world.start_guest(check=False, qemu=QEMU_10)
    r = primary.ctl("protect", DOMAIN, "--qmp", str(guest.qmp_sock), "--backup", backup.listen, "--netbuf", "none")
    out = _out(r)
    assert r.returncode != 0, out
    assert f"domain {DOMAIN}: the primary runs QEMU 10.0." in out, out
    assert "but this backup would restore it with QEMU 7.2." in out and f"({QEMU})" in out, out
    assert "install the same QEMU release on both hosts" in out, out
    assert guest.qmp.status() == "running", "the refused protect left the guest stopped"
    assert guest.qmp.execute("query-migrate").get("status") in (None, "none", "cancelled", "completed"), \
        guest.qmp.execute("query-migrate")
    st = backup.status(DOMAIN)
    assert st is None or st["state"] == "unprotected", st
    assert not any(backup.domain_dir().glob("store-*")), "the backup created a page store"
    pst = primary.status()
    assert pst is None or pst["state"] != "protected", pst
    record(request, version_refusal=out.splitlines()[-1])
