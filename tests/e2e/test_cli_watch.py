"""The operator's live views against real daemons: `remusctl watch`, `remusctl
stats --histogram`, remusd's Prometheus endpoint (--metrics) and --config."""

import json
import re
import subprocess
import urllib.error
import urllib.request

from conftest import DOMAIN, REMUSD, free_port, record, setup_protected


def _out(r):
    return (r.stdout + r.stderr).strip()


def scrape(port, path="/metrics", method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def samples(text):
    """{series: value} of every sample line of an exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def check_histogram(s, name, labels):
    """Buckets cumulative and ending in +Inf == _count."""
    pat = re.compile(re.escape(name) + r'_bucket\{' + re.escape(labels) + r',le="([^"]+)"\}')
    buckets = [(m.group(1), v) for k, v in s.items() for m in [pat.fullmatch(k)] if m]
    assert buckets, f"no {name} buckets for {labels}"
    assert buckets[-1][0] == "+Inf", buckets
    finite = [(float(le), v) for le, v in buckets[:-1]]
    assert finite == sorted(finite), f"{name}: le or counts not increasing: {buckets}"
    assert all(a[1] <= b[1] for a, b in zip(finite, finite[1:])), buckets
    assert buckets[-1][1] == s[f"{name}_count{{{labels}}}"], buckets
    assert buckets[-1][1] >= finite[-1][1]
    return buckets[-1][1]


def test_watch_stats_metrics(world, request):
    pport, bport = free_port(), free_port()
    pr = setup_protected(world, interval_ms=100, wait_epochs=10,
                         primary_kw={"extra": ["--metrics", f"127.0.0.1:{pport}"]},
                         backup_kw={"extra": ["--metrics", f"127.0.0.1:{bport}"]})
    a, b = pr.primary, pr.backup

    # watch: two refreshes, plain lines (stdout is not a terminal here).
    r = a.ctl("watch", "--count", "2", "--interval-s", "1", timeout=30)
    assert r.returncode == 0, _out(r)
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["TIME", "DOMAIN", "ROLE"], r.stdout
    rows = [l.split() for l in lines[1:]]
    assert len(rows) == 2, r.stdout
    for row in rows:
        assert row[1:4] == [DOMAIN, "primary", "protected"], r.stdout
        assert float(row[5]) > 0, f"no epochs/s in {row}: {r.stdout}"    # EPOCHS/S
        assert row[6].endswith("ms") and row[7].endswith("ms"), row     # PAUSE p50/p99
        assert float(row[9]) > 0, f"nothing on the wire in {row}"        # WIRE MB/s
    assert "\033[" not in r.stdout, "ANSI escapes in non-terminal output"

    r = b.ctl("watch", DOMAIN, "--count", "1", "--interval-s", "0.5", timeout=30)
    assert r.returncode == 0, _out(r)
    row = r.stdout.strip().splitlines()[1].split()
    assert row[1:3] == [DOMAIN, "backup"] and float(row[5]) > 0, r.stdout

    # stats --histogram: text, then JSON.
    r = a.ctl("stats", DOMAIN, "--histogram")
    assert r.returncode == 0, _out(r)
    assert "guest pause per checkpoint:" in r.stdout and "ack latency" in r.stdout, r.stdout
    assert "#" in r.stdout, r.stdout
    r = a.ctl("stats", DOMAIN, "--histogram", "--json")
    assert r.returncode == 0, _out(r)
    st = json.loads(r.stdout)[0]
    pause = st["histograms"]["pause_seconds"]
    assert pause["count"] > 0 and pause["buckets"][-1]["le"] == "+Inf", pause
    assert sum(x["count"] for x in pause["buckets"]) == pause["count"], pause
    assert st["histograms"]["ack_seconds"]["count"] > 0, st
    assert st["counters"]["checkpoints_total"] >= 10, st
    r = b.ctl("stats", DOMAIN, "--histogram")
    assert r.returncode == 0 and "time to commit a checkpoint" in r.stdout, _out(r)

    # Unknown domains: exit code 3, the domain named, and the fix.
    for args in (["stats", "nosuchdomain", "--histogram"], ["watch", "nosuchdomain", "--count", "1"]):
        r = a.ctl(*args)
        assert r.returncode == 3, f"{args}: rc {r.returncode}: {_out(r)}"
        assert "unknown domain nosuchdomain" in r.stderr and "remusctl status" in r.stderr, _out(r)

    # Metrics on both sides.
    code, ctype, text = scrape(pport)
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4"), (code, ctype)
    s = samples(text)
    pl = f'domain="{DOMAIN}",role="primary"'
    assert s[f"remus_checkpoints_total{{{pl}}}"] >= 10, text
    assert s[f'remus_state{{{pl},state="protected"}}'] == 1, text
    assert s[f'remus_state{{{pl},state="unprotected"}}'] == 0, text
    assert s[f"remus_wire_sent_bytes_total{{{pl}}}"] > 0, text
    assert s[f"remus_last_acked_epoch{{{pl}}}"] >= 10, text
    assert f"remus_unacked_epochs{{{pl}}}" in s and f"remus_netbuf_buffered_packets{{{pl}}}" in s, text
    assert check_histogram(s, "remus_pause_seconds", pl) > 0
    assert check_histogram(s, "remus_ack_latency_seconds", pl) > 0
    check_histogram(s, "remus_dirty_pages_per_epoch", pl)

    code, ctype, text = scrape(bport)
    assert code == 200, code
    s = samples(text)
    bl = f'domain="{DOMAIN}",role="backup"'
    assert s[f"remus_last_committed_epoch{{{bl}}}"] >= 10, text
    assert s[f"remus_failovers_total{{{bl}}}"] == 0, text
    assert s[f"remus_wire_received_bytes_total{{{bl}}}"] > 0, text
    assert s[f'remus_state{{{bl},state="protected"}}'] == 1, text
    check_histogram(s, "remus_apply_seconds", bl)

    assert scrape(pport, "/")[0] == 404
    assert scrape(pport, "/metrics", method="POST")[0] == 405
    record(request, watch_row=" ".join(rows[-1]))


def test_config_file(world):
    port = free_port()
    cfg = world.dir / "remusd.conf"
    cfg.write_text(f'# test\nmetrics = "127.0.0.1:{port}"\nlog-level = "info"\nheartbeat-timeout-ms = 50\n')
    # heartbeat-timeout-ms from the file is overridden on the command line
    # (start_remusd passes 3000): with the file's 50 (below the 100 ms
    # interval) remusd would refuse to start.
    d = world.start_primary(extra=["--config", str(cfg)])
    code, _, text = scrape(port)
    assert code == 200 and 'remus_domains{role="primary"} 0' in text, text

    bad = world.dir / "bad.conf"
    bad.write_text("metrcs = \"127.0.0.1:1\"\n")
    r = world.remusctl("--socket", str(d.control), "status")
    assert r.returncode == 0, _out(r)
    p = subprocess.run([str(REMUSD), "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode >= 100, (p.returncode, p.stderr)  # CLI11's usage errors, as for flags
    assert "unknown setting 'metrcs'" in p.stderr and str(bad) in p.stderr, p.stderr
