"""The replication link's security, end to end with real remusd processes:
TLS 1.3 with the shared key or with certificates, and every way a peer is
refused before any state moves (docs/formats/replication-link.md,
"Handshake"; docs/operator-guide.md, "Link security").

Each refusal is checked three ways: the sentence the operator sees (remusctl
protect's output, or remusd's own exit), the backup's log, and that the
backup holds nothing of the domain afterwards (no domain in its status, no
domain directory). The on-path attacker (a record altered, injected or
replayed after the handshake) is test_faults.py's
test_tampered_link_stops_protection_and_backup_does_not_promote."""

import datetime
import ipaddress
import json
import socket
import struct
import subprocess
import time

import pytest

from conftest import DOMAIN, REMUSD, read_text, tail

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # scripts/install-deps.sh installs python3-cryptography
    x509 = None


# ------------------------------------------------------------ certificates

class Pki:
    """A CA and the certificates it signs, as PEM files in `dir`."""

    def __init__(self, dir, name="remus test CA"):
        assert x509 is not None, "python3-cryptography is missing (scripts/install-deps.sh installs it)"
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = dir / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name, san_ip="127.0.0.1", valid_from_s=-3600, valid_for_s=86400):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now + datetime.timedelta(seconds=valid_from_s))
                .not_valid_after(now + datetime.timedelta(seconds=valid_from_s + valid_for_s))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        crt, kf = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        kf.chmod(0o600)
        return crt, kf

    def flags(self, name, **kw):
        crt, kf = self.issue(name, **kw)
        return ["--tls-cert", str(crt), "--tls-key", str(kf), "--tls-ca", str(self.ca_file)]


def cert_daemon(world, name, flags, **kw):
    """remusd with certificates instead of the key file: the world's
    start_remusd passes --key-file, which certificate mode refuses, so the
    key-file argument is dropped from its argv here."""
    return world.start_remusd(name, extra=flags, key_file=False, **kw)


# ------------------------------------------------------------ checks

def protect_fails(world, primary, backup, guest, backup_addr=None, domain=DOMAIN):
    r = primary.ctl("protect", domain, "--qmp", str(guest.qmp_sock), "--backup", backup_addr or backup.listen,
                    "--interval", "100", timeout=60)
    assert r.returncode != 0, f"protect succeeded against a peer it must refuse:\n{r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def assert_backup_holds_nothing(backup, domain=DOMAIN):
    doms = backup.all_status()
    assert not any(d.get("domain") == domain for d in doms), f"the backup holds state for {domain}: {doms}"
    assert not backup.domain_dir(domain).exists(), f"the backup wrote {backup.domain_dir(domain)} for a refused peer"


def assert_guest_runs_unprotected(primary, guest):
    assert guest.qmp.status() == "running", "the primary's guest does not run after the refused protect"
    st = primary.call({"command": "status", "domain": DOMAIN})
    state = (st.get("result", {}).get("domains") or [{}])[0].get("state") if st.get("ok") else None
    assert state in (None, "unprotected", "failed"), f"primary's view after a refused protect: {st}"


def wait_log(path, text, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read_text(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{tail(path, 40)}")


# ------------------------------------------------------------ the shared key

def test_wrong_key_is_refused_on_both_sides_before_any_state(world):
    guest = world.start_guest(wait_boot=False)
    other = world.dir / "other.key"
    r = world.remusctl("keygen", "--out", str(other))
    assert r.returncode == 0, r.stdout + r.stderr
    backup = world.start_backup(key=other)
    primary = world.start_primary()
    world.wait_booted(guest)
    out = protect_fails(world, primary, backup, guest)
    assert "holds a different key" in out and "key files differ" in out, out
    wait_log(backup.log, "the key files differ")
    # B's log names both fingerprints, so an operator can tell which host holds which key.
    fps = [ln.split("fingerprint ")[1].split()[0].strip(",)") for ln in read_text(backup.log).splitlines()
           if "ready:" in ln and "fingerprint" in ln]
    assert fps, tail(backup.log)
    refusal = next(ln for ln in read_text(backup.log).splitlines() if "the key files differ" in ln)
    assert fps[0] in refusal and "its fingerprint is" in refusal, refusal
    assert_backup_holds_nothing(backup)
    assert_guest_runs_unprotected(primary, guest)


def test_plain_tcp_peers_are_refused(world):
    """A peer that does not speak TLS, either way round: a primary of the
    release before link encryption (a plain HELLO frame), anything else (an
    HTTP request), and a backup address that answers in plain text."""
    guest = world.start_guest(wait_boot=False)
    backup = world.start_backup()
    primary = world.start_primary()
    host, port = backup.listen.rsplit(":", 1)

    # Version 1's plain HELLO gets a plain ERROR frame it can show.
    hello = json.dumps({"version": 1, "domain": DOMAIN, "nonce": "00" * 32}).encode()
    hdr = struct.pack(">IHHQI", 0x524D5553, 1, 0, 0, len(hello))
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(hdr + struct.pack(">I", 0) + hello)
        s.settimeout(5)
        got = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            got += b
    assert got[:4] == b"RMUS" and b"requires TLS" in got, got[:200]
    wait_log(backup.log, "does not speak TLS: it runs a remus release without link encryption")

    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            answer = s.recv(4096)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b"", f"the backup answered an HTTP request: {answer[:100]!r}"
    wait_log(backup.log, "does not speak TLS (its first bytes are 47 45 54 20)")

    # A "backup" that answers in plain text.
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    world._closers.append(plain.close)

    def answer():
        try:
            c, _ = plain.accept()
            c.recv(4096)
            c.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            time.sleep(1)
            c.close()
        except OSError:
            pass
    import threading
    threading.Thread(target=answer, daemon=True).start()
    world.wait_booted(guest)
    out = protect_fails(world, primary, backup, guest, backup_addr=f"127.0.0.1:{plain.getsockname()[1]}")
    assert "does not speak TLS" in out, out
    assert_backup_holds_nothing(backup)
    assert_guest_runs_unprotected(primary, guest)


# ------------------------------------------------------------ certificates

@pytest.mark.skipif(x509 is None, reason="python3-cryptography is missing (scripts/install-deps.sh installs it)")
def test_certificates_protect_and_refuse_strangers_expired_and_other_modes(world):
    pki = Pki(world.dir / "pki")
    guest = world.start_guest(wait_boot=False)
    backup = cert_daemon(world, "B", pki.flags("b"), listen=True)
    good_a = cert_daemon(world, "A", pki.flags("a"))
    world.wait_booted(guest)

    # Certificates from the same CA: protected, checkpoints flow.
    world.protect(good_a, backup, guest)
    world.wait_status(good_a, lambda s: s["last_acked_epoch"] >= 5, 60, "5 acked epochs over certificate TLS")
    assert "certificate" in read_text(backup.log) and "link from primary" in read_text(backup.log)
    r = good_a.ctl("unprotect", DOMAIN)
    assert r.returncode == 0, r.stdout + r.stderr
    world.wait_for(lambda: not any(d.get("domain") == DOMAIN and d.get("state") == "protected"
                                   for d in backup.all_status()), 20, "B to let go of the domain")

    # A stranger: a certificate from another CA.
    stranger_pki = Pki(world.dir / "pki-other", name="someone else's CA")
    flags = stranger_pki.flags("a2")
    flags[-1] = str(pki.ca_file)  # it trusts B's CA, but B does not trust its CA
    stranger = cert_daemon(world, "A2", flags)
    out = protect_fails(world, stranger, backup, guest, domain="intruder")
    assert "refused this host's certificate" in out, out
    wait_log(backup.log, "presented a certificate this host does not trust")

    # A certificate that expired while its remusd ran.
    short = cert_daemon(world, "A3", pki.flags("a3", valid_for_s=3605))  # valid from 1 h ago for 3605 s
    time.sleep(6.0)
    out = protect_fails(world, short, backup, guest, domain="intruder")
    assert 'refused this host\'s certificate (TLS alert "certificate expired")' in out, out
    wait_log(backup.log, "certificate has expired on")

    # remusd refuses to start with an expired certificate at all.
    crt, kf = pki.issue("old", valid_from_s=-7200, valid_for_s=3600)
    p = subprocess.run([str(REMUSD), "--state-dir", str(world.dir / "old"), "--control", str(world.dir / "old.sock"),
                        "--arbiter", "none", "--tls-cert", str(crt), "--tls-key", str(kf), "--tls-ca",
                        str(pki.ca_file)], capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and "expired on" in p.stderr, (p.returncode, p.stderr)

    # A private key others may read.
    crt, kf = pki.issue("loose")
    kf.chmod(0o644)
    p = subprocess.run([str(REMUSD), "--state-dir", str(world.dir / "loose"), "--control",
                        str(world.dir / "loose.sock"), "--arbiter", "none", "--tls-cert", str(crt), "--tls-key",
                        str(kf), "--tls-ca", str(pki.ca_file)], capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and f"chmod 600 {kf}" in p.stderr, (p.returncode, p.stderr)

    # A primary with the shared key against a certificate backup.
    psk_a = world.start_primary(name="A4")
    out = protect_fails(world, psk_a, backup, guest, domain="intruder")
    assert "answered with a certificate instead of the shared key" in out, out

    assert_backup_holds_nothing(backup, "intruder")
    assert guest.qmp.status() == "running"
