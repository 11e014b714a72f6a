#!/usr/bin/python3
"""The experience after a failover, plotted (issue 16). Not a test: it
measures and reports.

A guest serves a key-value store (tests/guest: remus.kv) whose data set, on
a read-only virtio-blk disk both hosts share (--disks none, cache=none), is
larger than the guest's memory, so the guest's page cache holds the hot part
of it and a miss goes to the disk. A client in its own network namespace
(bench/kvclient.py) asks for Zipf-distributed keys at a fixed rate on one TCP
connection and records every request's latency across a failover. Three
cases, interleaved round by round:

  hot     remus, output commit (nfqueue), the backup's store locked in its
          memory (protect --residency hot); the failover restores by mapping
  paged   the same with --residency paged and the store's pages evicted from
          the backup's page cache right before the failover
          (process_madvise(MADV_PAGEOUT) on the backup's mappings, as
          run_bench.py's failover-size part does): the restored guest's
          memory, page cache included, faults in from the backup's disk
  cold    no remus: the guest runs unprotected and is restarted on the same
          host from its disk, as Pacemaker- or Proxmox-style HA does; the
          client reconnects once its connection stops answering (--give-up)

Each case: the guest boots; the client runs W s against the unprotected guest
(the cache warms), then (hot, paged) the guest is protected for P s; then the
primary remusd and QEMU are killed with SIGKILL and, at once, `remusctl
failover` is run on the backup (hot, paged) or the guest's QEMU is started
again (cold): detection is excluded from all three alike. The client goes on
for A s after.

Figures per case: the outage (the kill to the first answer after it, as the
client sees it), latency percentiles of the requests sent before (unprotected,
protected) and in the first 10 s after service came back, requests lost, and
the ratio the issue's target is about: p99 over the first 10 s after / p99
before (protected). Output: JSON on stdout and in bench/results/; the plot (a
PNG, matplotlib) with --plot; --plot-only RESULTS.json redraws one.

The harness is the end-to-end tests' (tests/e2e/conftest.py World,
test_netbuf.py Net): the same namespaces, tap, daemons and guest.

Usage (root):
  python3 bench/failover_latency.py --plot docs/img/failover-latency.png
  python3 bench/failover_latency.py --plot-only bench/results/failover-latency-<ts>.json --plot out.png
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(HERE))

from conftest import DOMAIN, World  # noqa: E402  (tests/e2e: the end-to-end tests' harness)
from run_bench import log, page_cache_bytes, pct, prepare_store, store_block_files  # noqa: E402
from test_netbuf import GUEST_IP, PORT, Net  # noqa: E402

CASES = ("hot", "paged", "cold")
DATA_ID = "kvdata"


def make_data(path, values, value_kib):
    """The data set: random bytes (a value's CRC then names it)."""
    size = values * value_kib * 1024
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


class FakeRequest:
    """World keeps pytest's request only to name things; a bench has none."""
    node = None


def guest_kwargs(net, data, args):
    kw = net.guest_kw()
    kw["extra_args"] = kw["extra_args"] + [
        "-drive", f"file={data},if=none,format=raw,id={DATA_ID},readonly=on,cache=none"
                  + (f",throttling.iops-total={args.data_iops}" if args.data_iops else ""),
        "-device", f"virtio-blk-pci,drive={DATA_ID}"]
    kw["extra_append"] += f" remus.kv=vda remus.kvval={args.value_kib}"
    return kw


def start_client(net, world, args, name):
    out = world.dir / f"{name}.jsonl"
    stop = world.dir / f"{name}.stop"
    argv = ["ip", "netns", "exec", net.c, sys.executable, str(HERE / "kvclient.py"), GUEST_IP, str(PORT),
            "--rate", str(args.rate), "--duration", "3600", "--stop-file", str(stop),
            "--keys", str(args.values), "--zipf", str(args.zipf), "--give-up", str(args.give_up)]
    f = open(out, "wb")
    p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    f.close()
    world.procs.append((name, p))
    return p, out, stop


def drop_output_commit_rules(ns):
    """Deletes the mangle rules and chains remusd's nfqueue backend made in
    namespace ns (REMUS-<domain>); returns how many rules went."""
    ipt = ["ip", "netns", "exec", ns, "iptables", "-w", "-t", "mangle"]
    rules = subprocess.run(ipt + ["-S"], capture_output=True, text=True, check=True).stdout.splitlines()
    n = 0
    for r in rules:
        w = shlex.split(r)
        if w[0] == "-A" and "REMUS-" in r and not w[1].startswith("REMUS-"):
            subprocess.run(ipt + ["-D"] + w[1:], check=True)
            n += 1
    for r in rules:
        if r.startswith("-N REMUS-"):
            subprocess.run(ipt + ["-F", r.split()[1]], check=True)
            subprocess.run(ipt + ["-X", r.split()[1]], check=True)
    return n


def read_events(path):
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"ev": "junk", "line": line[:200]})
    return out


def answered_after(path, t):
    """Whether the client has recorded an answer received after t (reads the
    end of its output only: the newest lines are in it)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 65536))
        tail = f.read().decode(errors="replace").splitlines()[1:]
    for line in reversed(tail):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("ev") == "resp":
            return e["t_recv"] > t
    return False


def wait_answers(path, n, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for e in read_events(path) if e.get("ev") == "resp") >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what}: fewer than {n} answers in {timeout} s; see {path}")


def run_case(case, args, data, rnd):
    world = World(FakeRequest(), Path(args.qemu))
    net = Net(world)
    res = {"case": case, "round": rnd, "load_before": os.getloadavg()[0]}
    client = None
    try:
        gkw = guest_kwargs(net, data, args)
        guest = world.start_guest(mem_mb=args.mem, wss_mib=16, dirty=args.dirty, wait_boot=False, **gkw)
        if case != "cold":
            backup = world.start_backup(auto_promote=False,
                                        extra=["--restore", "map", "--allow-qemu-files", str(data.parent)])
            primary = world.start_primary()
        world.wait_booted(guest)
        client, out, stop = start_client(net, world, args, f"client-{case}")
        wait_answers(out, 1, 60, "first answer")
        res["t_client"] = time.time()
        time.sleep(args.warm)
        if case != "cold":
            res["t_protect"] = time.time()
            world.protect(primary, backup, guest, interval_ms=args.interval, timeout=300,
                          extra=["--netbuf", "nfqueue", "--residency", case, "--disks", "none"])
            res["t_protected"] = time.time()
            res["protect_s"] = res["t_protected"] - res["t_protect"]
        time.sleep(args.protected)
        if case == "paged":
            st = backup.status()
            files = store_block_files(st.get("store"))
            res["store"] = prepare_store(files, True, ["pageout"], backup.pid)
        if case != "cold":
            res["backup_residency"] = (backup.status() or {}).get("residency")
        # The primary host dies: remusd first (else it would tell the backup
        # its guest is gone and promotion would start on its own), its QEMU.
        res["t_fail"] = time.time()
        if case != "cold":
            primary.kill()
        guest.kill()
        if case != "cold":
            # ... and with it that host's kernel: its output-commit rules. On
            # one machine they would go on queueing the tap's packets (which
            # the restored QEMU opens) to a queue nobody reads.
            res["dead_host_rules_removed"] = drop_output_commit_rules(net.h)
        if case == "cold":
            world.start_guest(name="restarted", mem_mb=args.mem, wss_mib=16, dirty=args.dirty,
                              wait_boot=False, **gkw)
        else:
            r = backup.ctl("failover", DOMAIN, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"remusctl failover failed: {r.stdout}{r.stderr}")
            prom = (backup.status() or {}).get("promotion") or {}
            res["failover_ms"] = prom.get("failover_ms")
            res["restored_by"] = prom.get("restored_by")
        res["t_action_done"] = time.time()
        # `after` seconds of service: counted from the first answer after the
        # kill (a cold boot takes a minute under TCG here).
        deadline = time.monotonic() + args.outage_limit
        while time.monotonic() < deadline and not answered_after(out, res["t_fail"]):
            time.sleep(0.5)
        time.sleep(args.after)
        stop.touch()
        try:
            client.wait(timeout=args.give_up + 30)
        except subprocess.TimeoutExpired:
            res["client_killed"] = True  # its events so far still count
        if case == "paged":
            # What the restored guest brought back into the page cache.
            res["store"]["resident_bytes_after"] = page_cache_bytes(files)
    except Exception as e:  # a failed case is reported, the others still run
        res["error"] = f"{type(e).__name__}: {e}"
        try:
            res["diagnostics"] = world.diagnostics()[-4000:]
        except Exception:
            pass
    finally:
        if client and client.poll() is None:
            client.kill()
        if client:
            res["events"] = read_events(out)
        world.cleanup()
        net.close()
        if args.keep:
            log(f"  kept {world.dir}")
        else:
            shutil.rmtree(world.dir, ignore_errors=True)
    return res


def analyse(res, window=10.0):
    """Figures of one case from its client events (wall clock)."""
    ev = res.get("events") or []
    t_fail = res.get("t_fail")
    if t_fail is None:
        return {}
    resp = [(e["t_send"], e["t_recv"]) for e in ev if e.get("ev") == "resp"]
    lat = lambda lo, hi: [(r - s) * 1000.0 for s, r in resp if lo <= s < hi]
    t_prot = res.get("t_protected")
    before_unprot = lat(t_fail - 20 if t_prot is None else t_prot - 20, t_fail if t_prot is None else t_prot)
    before_prot = lat(t_fail - 20, t_fail) if t_prot is not None else []
    after = [r for s, r in resp if r > t_fail]
    t_back = min(after) if after else None
    first = lat(t_back, t_back + window) if t_back else []
    incl = lat(t_fail, t_fail + window)
    later = lat(t_back + window, t_back + 3 * window) if t_back else []
    summ = lambda xs: {"n": len(xs), "p50_ms": pct(xs, 0.5), "p90_ms": pct(xs, 0.9), "p99_ms": pct(xs, 0.99),
                       "max_ms": max(xs) if xs else None}
    crcs, mismatches = {}, 0
    for e in ev:
        if e.get("ev") == "resp":
            if crcs.setdefault(e["key"], e["crc"]) != e["crc"]:
                mismatches += 1
    before = before_prot if t_prot is not None else before_unprot
    p99_before, p99_first = summ(before)["p99_ms"], summ(first)["p99_ms"]
    # Back to normal: the first 5 s window (sliding by 1 s from t_back) whose
    # p99 is within 2x of the unprotected p99 before; the same yardstick for
    # all three cases (after a failover the guest runs unprotected).
    ref = summ(before_unprot)["p99_ms"]
    normal = None
    if t_back and ref:
        last_send = max(s for s, _ in resp)
        k = 0
        while t_back + k + 5 <= last_send:
            w = lat(t_back + k, t_back + k + 5)
            if w and pct(w, 0.99) <= 2 * ref:
                normal = t_back + k - t_fail
                break
            k += 1
    return {
        "outage_ms": (t_back - t_fail) * 1000.0 if t_back else None,
        "normal_after_s": normal,
        "unprotected_before": summ(before_unprot),
        "protected_before": summ(before_prot) if t_prot is not None else None,
        "first_10s_after_service_back": summ(first),
        "first_10s_after_failover_incl_outage": summ(incl),
        "10s_to_30s_after": summ(later),
        "p99_first_10s_over_p99_before": (p99_first / p99_before) if p99_first and p99_before else None,
        "p99_first_10s_over_p99_unprotected": (p99_first / ref) if p99_first and ref else None,
        "lost": sum(1 for e in ev if e.get("ev") == "lost"),
        "unsent": sum(e.get("n", 0) for e in ev if e.get("ev") == "unsent"),
        "errors": sum(1 for e in ev if e.get("ev") in ("err", "error", "junk")),
        "reconnects": max(0, sum(1 for e in ev if e.get("ev") == "connected") - 1),
        "crc_mismatches": mismatches,
    }


def plot(doc, path):
    try:
        import matplotlib
    except ImportError:
        sys.exit("the plot needs matplotlib: apt-get install python3-matplotlib, and run this with "
                 "/usr/bin/python3 (Debian's)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in doc["runs"] if r.get("events") and r.get("t_fail")]
    cases = [c for c in CASES if any(r["case"] == c for r in runs)]
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 2.8 * len(cases)), sharex=True, sharey=True, squeeze=False)
    titles = {"hot": "remus, hot store (mlocked), restore by mapping",
              "paged": "remus, paged store evicted before the failover, restore by mapping",
              "cold": "cold restart of the guest from its disk (no remus)"}
    x_max = max((r.get("analysis") or {}).get("outage_ms") or 0 for r in runs) / 1000.0 + doc["config"]["after"]
    for ax, case in zip(axes[:, 0], cases):
        r = next(r for r in runs if r["case"] == case)  # the first round's
        t0 = r["t_fail"]
        pts = [(e["t_send"] - t0, (e["t_recv"] - e["t_send"]) * 1000.0) for e in r["events"] if e.get("ev") == "resp"]
        lost = [e["t_send"] - t0 for e in r["events"] if e.get("ev") == "lost"]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, alpha=0.5, label="request latency")
        if lost:
            ax.scatter(lost, [1.0] * len(lost), s=8, marker="x", color="red", label=f"lost ({len(lost)})")
        ax.axvline(0, color="black", lw=0.8)
        if r.get("t_protected"):
            ax.axvspan(r["t_protected"] - t0, 0, color="orange", alpha=0.08, label="protected (output commit)")
        a = r.get("analysis") or {}
        ax.set_title(f"{titles[case]}: outage {a.get('outage_ms') or 0:.0f} ms, p99 first 10 s "
                     f"{a.get('first_10s_after_service_back', {}).get('p99_ms') or 0:.0f} ms", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_xlim(-before_window(doc), x_max)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("request sent at (s, 0 = the primary is killed)")
    iops = doc["config"].get("data_iops")
    fig.suptitle(f"Request latency across a failover: {doc['config']['values']} x {doc['config']['value_kib']} KiB "
                 f"values on disk{f' ({iops} IOPS)' if iops else ''}, {doc['config']['mem']} MiB guest, "
                 f"Zipf s={doc['config']['zipf']}, "
                 f"{doc['config']['rate']:g} req/s (TCG, 2 cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


def before_window(doc):
    c = doc["config"]
    return min(c["protected"] + c["warm"], 40)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default=os.environ.get("REMUS_QEMU", "/var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--mem", type=int, default=512, help="guest MiB")
    ap.add_argument("--values", type=int, default=16384, help="values in the data set")
    ap.add_argument("--value-kib", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=0.99)
    ap.add_argument("--data-iops", type=int, default=100,
                    help="the data disk's I/O operations per second (QEMU throttling; 0: as fast as this "
                         "host's disk): a networked volume's baseline, not this VM's cached virtual disk")
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second")
    ap.add_argument("--dirty", type=int, default=1000, help="the guest's dirtier, pages/s")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval (ms)")
    ap.add_argument("--warm", type=float, default=60.0, help="s of requests before protection")
    ap.add_argument("--protected", type=float, default=30.0, help="s protected before the failover")
    ap.add_argument("--after", type=float, default=60.0, help="s after the failover")
    ap.add_argument("--outage-limit", type=float, default=300.0,
                    help="s to wait for the first answer after the kill before the after-phase counts anyway")
    ap.add_argument("--give-up", type=float, default=3.0, help="the client reconnects after this long unanswered")
    ap.add_argument("--plot", default=None, help="write the plot (PNG) here")
    ap.add_argument("--plot-only", default=None, help="redraw the plot from this results JSON")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), args.plot or "failover-latency.png")
        return 0
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {CASES}")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces, remusd's control socket)")
    scratch = Path("/var/tmp/remus-bench-kv")
    scratch.mkdir(exist_ok=True)
    data = scratch / f"kv-{args.values}x{args.value_kib}k.img"
    log(f"data set: {data} ({args.values * args.value_kib >> 10} MiB)")
    make_data(data, args.values, args.value_kib)
    doc = {"bench": "failover-latency", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "config": {k: getattr(args, k) for k in ("mem", "values", "value_kib", "zipf", "data_iops", "rate", "dirty", "interval",
                                                    "warm", "protected", "after", "give_up", "qemu")},
           "runs": []}
    for rnd in range(args.rounds):
        for case in cases:
            log(f"round {rnd + 1}/{args.rounds}: {case}")
            r = run_case(case, args, data, rnd)
            r["analysis"] = a = analyse(r)
            before = a.get("protected_before") or a.get("unprotected_before") or {}
            log(f"  {case}: " + (f"ERROR {r['error']}; " if r.get("error") else "")
                + (f"outage {a['outage_ms']} ms, p99 before {before.get('p99_ms')} ms, first 10 s after "
                   f"{a['first_10s_after_service_back']['p99_ms']} ms (ratio {a['p99_first_10s_over_p99_before']}), "
                   f"normal after {a['normal_after_s']} s, lost {a['lost']}, reconnects {a['reconnects']}, crc mismatches {a['crc_mismatches']}"
                   if a else "no figures"))
            doc["runs"].append(r)
    doc["summary"] = {c: [r["analysis"] for r in doc["runs"] if r["case"] == c] for c in cases}
    os.makedirs(HERE / "results", exist_ok=True)
    out = HERE / "results" / f"failover-latency-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(doc))
    log(f"results: {out}")
    json.dump({"config": doc["config"], "summary": doc["summary"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if args.plot:
        plot(doc, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
