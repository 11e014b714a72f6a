"""remusd's metrics endpoint with a Prometheus exporter web config file
(--metrics-web-config, alias --web.config.file): HTTPS with a self-signed
certificate, basic auth with bcrypt hashes, client certificates, and the
refusals of bad files. Starts remusd only (no QEMU, no guest)."""

import base64
import http.client
import socket
import ssl
import subprocess
import warnings

import pytest

from conftest import REMUSD, free_port

pytestmark = pytest.mark.no_qemu


def bcrypt(password):
    """A $2b$ hash through Python's crypt (libxcrypt), as the operator guide shows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def self_signed(dir, name, cn):
    """name.crt and name.key: a self-signed certificate for 127.0.0.1 (its own CA)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(dir / f"{name}.key"), "-out", str(dir / f"{name}.crt"),
                    "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return dir / f"{name}.crt", dir / f"{name}.key"


def get(port, ctx=None, auth=None, path="/metrics"):
    """(status, headers, body) of GET path over HTTPS (ctx) or HTTP (no ctx)."""
    if ctx is None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def client_ctx(cafile, cert=None):
    ctx = ssl.create_default_context(cafile=str(cafile))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def test_https_and_basic_auth(world):
    d = world.dir / "tls"
    d.mkdir()
    crt, key = self_signed(d, "server", "remusd-test")
    cfg = d / "web.yml"
    # Relative paths: relative to the file's directory, not remusd's cwd.
    cfg.write_text("tls_server_config:\n"
                   "  cert_file: server.crt\n"
                   "  key_file: server.key\n"
                   "  min_version: TLS12\n"
                   "basic_auth_users:\n"
                   f"  alice: {bcrypt('s3cret')}\n"
                   f"  bob: '{bcrypt('other')}'\n")
    port = free_port()
    world.start_primary(extra=["--metrics", f"127.0.0.1:{port}", "--metrics-web-config", str(cfg)])
    ctx = client_ctx(crt)

    code, headers, body = get(port, ctx, auth=("alice", "s3cret"))
    assert code == 200, (code, body)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    assert 'remus_domains{role="primary"} 0' in body, body
    assert get(port, ctx, auth=("bob", "other"))[0] == 200

    code, headers, body = get(port, ctx)
    assert code == 401, (code, body)
    assert headers.get("WWW-Authenticate", "").startswith("Basic realm="), headers
    assert "remus_" not in body
    assert get(port, ctx, auth=("alice", "wrong"))[0] == 401
    assert get(port, ctx, auth=("alice", "other"))[0] == 401     # bob's password
    assert get(port, ctx, auth=("carol", "s3cret"))[0] == 401
    # Other paths need the credentials too, then 404 as before.
    assert get(port, ctx, path="/")[0] == 401
    assert get(port, ctx, auth=("alice", "s3cret"), path="/")[0] == 404

    # Plain HTTP on the TLS port: no HTTP answer.
    with pytest.raises((http.client.HTTPException, ConnectionError, socket.timeout)):
        get(port, None, auth=("alice", "s3cret"))
    # A client that does not trust the certificate refuses it.
    with pytest.raises(ssl.SSLCertVerificationError):
        get(port, ssl.create_default_context(), auth=("alice", "s3cret"))
    # min_version TLS12: a TLS 1.2 client is served.
    tls12 = client_ctx(crt)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert get(port, tls12, auth=("alice", "s3cret"))[0] == 200

    # The daemon still answers after all that.
    assert get(port, ctx, auth=("alice", "s3cret"))[0] == 200


def test_client_certificate_required(world):
    d = world.dir / "mtls"
    d.mkdir()
    crt, key = self_signed(d, "server", "remusd-test")
    client = self_signed(d, "client", "prometheus")
    stranger = self_signed(d, "stranger", "prometheus")
    cfg = d / "web.yml"
    cfg.write_text("tls_server_config:\n"
                   f"  cert_file: {crt}\n"
                   f"  key_file: {key}\n"
                   "  client_ca_file: client.crt\n"
                   "  client_auth_type: RequireAndVerifyClientCert\n"
                   "  min_version: TLS13\n")
    port = free_port()
    # The exporter-toolkit flag name works too.
    world.start_primary(extra=["--metrics", f"127.0.0.1:{port}", "--web.config.file", str(cfg)])

    code, _, body = get(port, client_ctx(crt, client))
    assert code == 200 and "remus_domains" in body, (code, body)
    # TLS 1.3 reports a missing or unknown client certificate after the
    # handshake, on the first read: an SSL error or a reset, never a reply.
    for cert in (None, stranger):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            get(port, client_ctx(crt, cert))
    # min_version TLS13: a TLS 1.2 client is refused in the handshake.
    tls12 = client_ctx(crt, client)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, tls12)
    assert get(port, client_ctx(crt, client))[0] == 200


def run_remusd(world, *args):
    return subprocess.run([str(REMUSD), "--state-dir", str(world.dir / "x"), "--key-file", str(world.key),
                           "--control", str(world.dir / "x.sock"), "--arbiter", "none", *args],
                          capture_output=True, text=True, timeout=30)


def test_bad_web_configs_are_refused(world):
    d = world.dir
    crt, key = self_signed(d, "server", "remusd-test")
    other_crt, other_key = self_signed(d, "other", "other")
    port = free_port()
    cases = [
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  ciphers: x\n",
         "tls_server_config.ciphers: unknown key"),
        ("basic_auth_users:\n  alice: s3cret\n", "basic_auth_users.alice: not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: server.crt\n", "tls_server_config.key_file: missing"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: nokey.pem\n",
         f"tls_server_config.key_file: cannot read {d}/nokey.pem"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
         "  client_auth_type: RequireAnyClientCert\n  client_ca_file: server.crt\n",
         "RequireAnyClientCert is not supported by remusd"),
    ]
    for i, (text, want) in enumerate(cases):
        cfg = d / f"bad{i}.yml"
        cfg.write_text(text)
        r = run_remusd(world, "--metrics", f"127.0.0.1:{port}", "--metrics-web-config", str(cfg))
        assert r.returncode == 2, (text, r.returncode, r.stderr)
        assert f"metrics web config {cfg}: " in r.stderr and want in r.stderr, (want, r.stderr)

    cfg = d / "ok.yml"
    cfg.write_text("basic_auth_users: {}\n")
    r = run_remusd(world, "--metrics-web-config", str(cfg))
    assert r.returncode == 2 and "--metrics-web-config needs --metrics" in r.stderr, r.stderr

    # A key that does not belong to the certificate: found when TLS is set up.
    cfg = d / "mismatch.yml"
    cfg.write_text(f"tls_server_config:\n  cert_file: {crt}\n  key_file: {other_key}\n")
    r = run_remusd(world, "--metrics", f"127.0.0.1:{port}", "--metrics-web-config", str(cfg))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"metrics web config {cfg}: tls_server_config.key_file {other_key}" in r.stderr, r.stderr
    assert f"the one of cert_file {crt}?" in r.stderr and "key values mismatch" in r.stderr, r.stderr
