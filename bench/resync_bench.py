#!/usr/bin/env python3
"""Delta resync: the initial copy's time and wire bytes, full against delta,
side by side in one run (docs/performance.md, "Delta resync").

Each round: a fresh backup (no earlier image: the copy is full) protects the
test guest, then `unprotect`, a gap while the guest runs on unprotected
(dirtying pages), and `protect` again: that copy is a delta from the image the
backup kept. Measured per copy: the time `remusctl protect` takes (it returns
once the backup acked the initial copy), the bytes the primary sent until then
(`initial_copy.wire_bytes`), pages sent and kept. The summary gives the
medians and the delta/full ratios. Also runs build/bench/bench_page_hash (the
hashing's own cost) unless --skip-hash.

Root; the prerequisites of run_bench.py. The JSON goes to stdout and to
bench/results/resync-<timestamp>.json; a summary to stderr.

  /usr/bin/python3 bench/resync_bench.py --quick     # 1 round, ~1-2 min
  /usr/bin/python3 bench/resync_bench.py             # 3 rounds
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_bench as rb  # noqa: E402
from run_bench import DEFAULT_QEMU, DOMAIN, ROOT, BenchError, RemusPair, loadavg, log, machine_info, write_results  # noqa: E402


def wait_backup(env, pair, pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = env.status(pair.b_sock)
        if st and pred(st):
            return st
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for the backup: {what}")


def one_copy(env, pair, guest, kind):
    t0 = time.monotonic()
    pair.protect(guest, 100)
    took = time.monotonic() - t0
    st = env.status(pair.a_sock)
    ic = st["initial_copy"]
    if ic["mode"] != kind:
        raise BenchError(f"expected a {kind} copy, the primary made a {ic['mode']} one: {ic}")
    b = env.status(pair.b_sock)["initial_copy"]
    return {"kind": kind, "protect_s": took, "wire_bytes": ic["wire_bytes"], "pages_sent": ic["pages_sent"],
            "pages_kept": ic["pages_kept"], "bytes_saved": ic["bytes_saved"], "verified": b.get("verified"),
            "load": loadavg()}


def unprotect(env, pair):
    env.ctl("unprotect", DOMAIN, sock=pair.a_sock, timeout=60)
    wait_backup(env, pair, lambda s: s["state"] == "unprotected", "state unprotected")


def run_round(env, args, i):
    wd = os.path.join(env.tmp, f"round-{i}")
    guest = rb.Guest(env, os.path.join(wd, "guest"), args.mem, args.dirty, args.wss)
    pair = RemusPair(env, wd)
    try:
        guest.wait_workload()
        time.sleep(args.settle)
        full = one_copy(env, pair, guest, "full")
        unprotect(env, pair)
        time.sleep(args.gap)
        delta = one_copy(env, pair, guest, "delta")
        unprotect(env, pair)
        r = {"round": i, "full": full, "delta": delta,
             "wire_ratio": delta["wire_bytes"] / full["wire_bytes"],
             "time_ratio": delta["protect_s"] / full["protect_s"]}
        log(f"round {i}: full {full['protect_s']:.2f} s {full['wire_bytes'] >> 20} MiB; "
            f"delta {delta['protect_s']:.2f} s {delta['wire_bytes'] >> 20} MiB "
            f"(kept {delta['pages_kept']}, sent {delta['pages_sent']})")
        return r
    finally:
        pair.stop()
        guest.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="default 3; quick 1")
    ap.add_argument("--mem", type=int, default=1024, help="guest memory, MiB")
    ap.add_argument("--wss", type=int, default=256, help="dirtier working set, MiB")
    ap.add_argument("--dirty", type=int, default=1000, help="dirtier rate, pages/s")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds the workload runs before the first copy")
    ap.add_argument("--gap", type=float, default=5.0, help="seconds unprotected between the two copies")
    ap.add_argument("--skip-hash", action="store_true", help="do not run bench_page_hash")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--qemu", default=DEFAULT_QEMU)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    env = rb.Env(args)
    t0 = time.monotonic()
    doc = {"bench": "resync", "mode": "quick" if args.quick else "full", "machine": machine_info(env),
           "config": {k: v for k, v in vars(args).items()}, "rounds": []}
    try:
        for i in range(args.rounds):
            doc["rounds"].append(run_round(env, args, i))
        if not args.skip_hash:
            exe = os.path.join(args.build, "bench", "bench_page_hash")
            r = subprocess.run([exe, "--reps", "5"], capture_output=True, text=True, timeout=600)
            doc["hash"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
    except KeyboardInterrupt:
        doc["interrupted"] = True
    finally:
        env.cleanup()
    rounds = doc["rounds"]
    if rounds:
        med = lambda xs: statistics.median(xs)  # noqa: E731
        doc["summary"] = {
            "full_protect_s_p50": med([r["full"]["protect_s"] for r in rounds]),
            "delta_protect_s_p50": med([r["delta"]["protect_s"] for r in rounds]),
            "full_wire_bytes_p50": med([r["full"]["wire_bytes"] for r in rounds]),
            "delta_wire_bytes_p50": med([r["delta"]["wire_bytes"] for r in rounds]),
            "delta_kept_pages_p50": med([r["delta"]["pages_kept"] for r in rounds]),
            "delta_sent_pages_p50": med([r["delta"]["pages_sent"] for r in rounds]),
            "wire_ratio_delta_over_full_p50": med([r["wire_ratio"] for r in rounds]),
            "time_ratio_delta_over_full_p50": med([r["time_ratio"] for r in rounds]),
            "all_verified": all(r["delta"]["verified"] is True for r in rounds),
        }
    doc["machine"]["loadavg_end"] = loadavg()
    doc["elapsed_s"] = time.monotonic() - t0

    def summary(d):
        s = d.get("summary")
        if s:
            log(f"full copy: {s['full_protect_s_p50']:.2f} s, {s['full_wire_bytes_p50'] / 2**20:.1f} MiB; "
                f"delta: {s['delta_protect_s_p50']:.2f} s, {s['delta_wire_bytes_p50'] / 2**20:.1f} MiB; "
                f"ratios (delta/full): wire {s['wire_ratio_delta_over_full_p50']:.3f}, "
                f"time {s['time_ratio_delta_over_full_p50']:.3f}")
        h = d.get("hash")
        if h and "xxh3_128_per_page_gbps_p50" in h:
            log(f"XXH3-128 per page {h['xxh3_128_per_page_gbps_p50']:.2f} GB/s, memcpy "
                f"{h['memcpy_per_page_gbps_p50']:.2f} GB/s (hash/memcpy time {h['hash_time_over_memcpy_time_p50']:.2f})")
    write_results(doc, args.out, "resync-", args.quick, summary)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
