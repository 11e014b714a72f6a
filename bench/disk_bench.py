#!/usr/bin/env python3
"""remus disk-mirroring benchmark (stdlib only). Not a test: it measures and reports.

Two parts (see bench/README.md):

  guest    The test guest's disk writer (remus.disk=vda: 4 KiB records,
           O_DIRECT|O_DSYNC, sequential) on a virtio-blk disk (raw image,
           cache=none). Each boot measures the same guest three times:
             U1   unprotected
             P    protected (two remusd on loopback, --netbuf none,
                  --interval 100, the disk mirrored: --disks all)
             U2   unprotected again, after `remusctl unprotect`
           so the protected phase sits between two unprotected ones of the
           same boot (drift check). Configurations, one boot each per round,
           in an order rotated every round:
             sat   remus.diskrate=100000 (saturating: as fast as it can)
             mod   remus.diskrate=<--mod-rate> (a fixed moderate rate)
             idle  remus.diskrate=0: a mirrored disk the guest does not
                   write; P only: the pause baseline (--no-idle to skip)
           plus, once, `sat` on a qcow2 image (full mode; --qcow2).
           Throughput: the guest's disk writes per wall-clock second, from
           QEMU's query-blockstats (wr_operations) at the phase's ends.
           Latency: QEMU's own accounting of the device's requests
           (wr_total_time_ns + flush_total_time_ns per write: what a
           record costs at the device, flushes included), the maximum per
           second from timed_stats (-drive stats-intervals.0=1), and, from the
           write time the guest stamps into every record (guest
           CLOCK_REALTIME), the interval between consecutive records: at
           `sat` that is the guest's per-record cycle (p50/p99). The
           checkpoint pause comes from QMP STOP/RESUME events on the bench's
           own monitor, remusd's `status --json` (pause_ms, ack_ms,
           bytes_per_epoch, ...) is recorded at the end of P.
  journal  build/bench/bench_journal_apply: the backup's journal commit and
           apply (io_uring FileIo) against plain write+fdatasync.

Output: one JSON document on stdout and in bench/results/disk-<timestamp>.json;
a human-readable summary on stderr.

Usage: python3 bench/disk_bench.py [--quick] [--skip-guest] [--skip-journal]
                                   [--rounds N] [--seconds S] ...
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_bench as rb  # noqa: E402  (Env, RemusPair, QMP, Guest, CpuMeter, helpers)
from run_bench import (DEFAULT_QEMU, DOMAIN, ROOT, BenchError, CpuMeter, RemusPair, loadavg, log,  # noqa: E402
                       machine_info, pauses_in_window, pct, ratio, summary)

sys.path.insert(0, os.path.join(ROOT, "tests", "guest"))
import diskcheck  # noqa: E402  (the record format)

DRIVE = "drive0"
SAT_RATE = 100000


# ------------------------------------------------------------------ guest
class DiskGuest(rb.Guest):
    """run_bench's Guest (two QMP sockets) with a virtio-blk disk and the
    disk writer instead of the memory dirtier."""

    def __init__(self, env, workdir, args, image, fmt, rate):
        self.env = env
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.serial = os.path.join(workdir, "serial.log")
        self.qmp_receiver = os.path.join(workdir, "qmp-receiver.sock")
        self.qmp_bench = os.path.join(workdir, "qmp-bench.sock")
        append = (f"console=ttyS0 quiet remus.disk=vda remus.diskrate={rate} remus.disksync={args.sync} "
                  f"remus.diskverify={args.verify:g} remus.diskwindow={args.window}")
        argv = [env.qemu, "-machine", "pc", "-accel", "tcg", "-m", str(args.mem),
                "-nodefaults", "-nographic", "-vga", "none",
                "-serial", f"file:{self.serial}",
                "-kernel", env.guest_kernel, "-initrd", env.initrd, "-append", append,
                "-drive", f"file={image},if=none,format={fmt},id={DRIVE},cache=none,stats-intervals.0=1",
                "-device", f"virtio-blk-pci,drive={DRIVE}",
                "-qmp", f"unix:{self.qmp_receiver},server=on,wait=off",
                "-qmp", f"unix:{self.qmp_bench},server=on,wait=off"]
        self.log = open(os.path.join(workdir, "qemu.log"), "wb")
        self.t_start = time.monotonic()
        self.proc = env.spawn(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = rb.QMP(self.qmp_bench)

    def wait_writer(self, timeout=90.0):
        """Until the disk writer has started (its 'disk started' line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"guest QEMU exited ({self.proc.returncode}); see {self.dir}/qemu.log")
            text = self.serial_text()
            if "FATAL disk" in text or "DISK ERROR" in text:
                raise BenchError(f"guest disk writer failed; see {self.serial}")
            if "remus-guest: disk started" in text:
                return time.monotonic() - self.t_start
            time.sleep(0.1)
        raise BenchError(f"guest disk writer did not start in {timeout}s; see {self.serial}")

    def blockstats(self):
        """drive0's counters, and the last complete second's timed stats."""
        for dev in self.qmp.cmd("query-blockstats"):
            if dev.get("device") == DRIVE:
                st = dev["stats"]
                out = {"t": time.time()}
                for k in ("wr_operations", "wr_bytes", "wr_total_time_ns", "flush_operations",
                          "flush_total_time_ns", "rd_operations"):
                    out[k] = st.get(k, 0)
                ts = [x for x in st.get("timed_stats", []) if x.get("interval_length") == 1]
                if ts:
                    out["max_wr_latency_ns"] = ts[0].get("max_wr_latency_ns", 0)
                    out["max_flush_latency_ns"] = ts[0].get("max_flush_latency_ns", 0)
                    out["avg_wr_latency_ns"] = ts[0].get("avg_wr_latency_ns", 0)
                    out["avg_flush_latency_ns"] = ts[0].get("avg_flush_latency_ns", 0)
                return out
        raise BenchError(f"query-blockstats: no device {DRIVE}")


def make_image(path, fmt, size_mib):
    raw = path + ".raw" if fmt != "raw" else path
    with open(raw, "wb") as f:
        f.truncate(size_mib << 20)
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, raw, path], check=True)
        os.unlink(raw)


def read_wtimes(image, fmt, first, last, workdir):
    """{seq: guest write time in s} of the records first..last-1 of the image,
    and the number of records there that are not valid. qcow2 is converted to
    raw first (qemu-img)."""
    path = image
    if fmt != "raw":
        path = os.path.join(workdir, "converted.raw")
        subprocess.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", image, path], check=True)
    out, bad = {}, 0
    try:
        with open(path, "rb") as f:
            f.seek(first * diskcheck.REC)
            for seq in range(first, last):
                buf = f.read(diskcheck.REC)
                status, _ = diskcheck.classify(buf, seq)
                if status != "ok":
                    bad += 1
                    continue
                out[seq] = diskcheck.parse(buf)["wtime"] / 1e9
    finally:
        if path != image:
            os.unlink(path)
    return out, bad


class Phase:
    """One measured window: blockstats at both ends and once a second."""

    def __init__(self, guest, name, pids):
        self.guest = guest
        self.name = name
        self.meter = CpuMeter(pids)
        self.samples = []

    def run(self, seconds):
        g = self.guest
        self.meter.start()
        s0 = g.blockstats()
        self.samples.append(s0)
        t_end = s0["t"] + seconds
        while True:
            left = t_end - time.time()
            if left <= 0:
                break
            time.sleep(min(1.0, left))
            self.samples.append(g.blockstats())
        self.cpu = self.meter.stop()
        self.t_from, self.t_to = s0["t"], self.samples[-1]["t"]
        return self

    def result(self):
        a, b = self.samples[0], self.samples[-1]
        dt = b["t"] - a["t"]
        d = {k: b[k] - a[k] for k in ("wr_operations", "wr_bytes", "wr_total_time_ns", "flush_operations",
                                      "flush_total_time_ns", "rd_operations")}
        w = d["wr_operations"]
        per_s = [(y["wr_operations"] - x["wr_operations"]) / (y["t"] - x["t"])
                 for x, y in zip(self.samples, self.samples[1:]) if y["t"] > x["t"]]
        max_wr = [s.get("max_wr_latency_ns", 0) / 1e6 for s in self.samples[1:] if s.get("max_wr_latency_ns")]
        max_fl = [s.get("max_flush_latency_ns", 0) / 1e6 for s in self.samples[1:] if s.get("max_flush_latency_ns")]
        return {
            "phase": self.name,
            "seconds": dt,
            "seq_from": a["wr_operations"],
            "seq_to": b["wr_operations"],
            "records": w,
            "rate_wall": w / dt if dt > 0 else None,
            "rate_wall_per_second": summary(per_s),
            "write_ms_mean": d["wr_total_time_ns"] / w / 1e6 if w else None,
            "flush_ms_mean": d["flush_total_time_ns"] / d["flush_operations"] / 1e6 if d["flush_operations"] else None,
            "flushes_per_write": d["flush_operations"] / w if w else None,
            # what one record costs at the device: its write and its flushes
            "device_ms_per_record": (d["wr_total_time_ns"] + d["flush_total_time_ns"]) / w / 1e6 if w else None,
            "max_write_ms": max(max_wr) if max_wr else None,
            "max_flush_ms": max(max_fl) if max_fl else None,
            "reads": d["rd_operations"],
            "cpu_percent": self.cpu,
        }


def add_record_times(res, wt):
    """Guest-clock figures of a phase from the records' write times."""
    seqs = [s for s in range(res["seq_from"], res["seq_to"]) if s in wt]
    iv = [(wt[b] - wt[a]) * 1000.0 for a, b in zip(seqs, seqs[1:]) if b == a + 1]
    res["record_interval_ms"] = summary(iv)
    if len(seqs) >= 2 and wt[seqs[-1]] > wt[seqs[0]]:
        span = wt[seqs[-1]] - wt[seqs[0]]
        res["guest_seconds"] = span
        res["rate_guest_clock"] = (len(seqs) - 1) / span
    return res


def snapshot(env, pair):
    a = env.status(pair.a_sock) or {}
    b = env.status(pair.b_sock) or {}
    return a, b


def status_delta(a0, a1, b0, b1):
    n = (a1.get("checkpoints_total") or 0) - (a0.get("checkpoints_total") or 0)
    out = {
        "state": a1.get("state"),
        "error": a1.get("error"),
        "checkpoints": n,
        "bytes_per_epoch_window_mean": (((a1.get("epoch_bytes_total") or 0) - (a0.get("epoch_bytes_total") or 0)) / n
                                        if n else None),
        "link_bytes_per_epoch_window_mean": ((((a1.get("link") or {}).get("bytes_sent") or 0)
                                              - ((a0.get("link") or {}).get("bytes_sent") or 0)) / n if n else None),
        "dirty_pages_per_epoch_window_mean": (((a1.get("dirty_pages_total") or 0) - (a0.get("dirty_pages_total") or 0))
                                              / n if n else None),
        "backpressure_waits": (a1.get("backpressure_waits") or 0) - (a0.get("backpressure_waits") or 0),
        # remusd's own rolling figures (its window, warmup included)
        "pause_ms": a1.get("pause_ms"),
        "ack_ms": a1.get("ack_ms"),
        "bytes_per_epoch": a1.get("bytes_per_epoch"),
        "dirty_pages_per_epoch": a1.get("dirty_pages_per_epoch"),
        "unacked_epochs": a1.get("unacked_epochs"),
        "disks": a1.get("disks"),
        "backup_apply_ms": b1.get("apply_ms"),
        "backup_last_committed_epoch": b1.get("last_committed_epoch"),
        "backup_error": b1.get("error"),
    }
    return out


def run_guest_once(env, args, cfg, rnd, idx):
    """One boot: U1, P, U2. Returns the result dict and the P phase's pauses."""
    rate = cfg["rate"]
    fmt = cfg["fmt"]
    workdir = os.path.join(env.tmp, f"disk-{idx:03d}-{cfg['name']}")
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, f"disk.{fmt}")
    make_image(image, fmt, args.disk_mib)
    res = {"config": cfg["name"], "rate_target": rate, "format": fmt, "round": rnd, "load_before": loadavg()}
    guest = DiskGuest(env, os.path.join(workdir, "guest"), args, image, fmt, rate)
    pair = None
    pause_ms = []
    phases = []
    try:
        res["boot_s"] = guest.wait_writer()
        time.sleep(args.warmup)
        if cfg["unprotected"]:
            phases.append(Phase(guest, "U1", {"qemu": guest.proc.pid}).run(args.seconds))

        pair = RemusPair(env, workdir)
        t0 = time.time()
        env.ctl("protect", DOMAIN, "--qmp", guest.qmp_receiver, "--backup", f"127.0.0.1:{pair.port}",
                "--netbuf", "none", "--interval", str(args.interval), "--timeout", "120",
                sock=pair.a_sock, timeout=150)
        deadline = time.monotonic() + 60
        while True:
            a = env.status(pair.a_sock) or {}
            disks = a.get("disks") or []
            if a.get("state") == "protected" and disks and all(d.get("ready") for d in disks):
                break
            if a.get("state") not in ("starting", "syncing", "protected") or time.monotonic() > deadline:
                raise BenchError(f"protection did not come up: state {a.get('state')} error {a.get('error')} "
                                 f"disks {disks}")
            time.sleep(0.1)
        res["protect_s"] = time.time() - t0
        time.sleep(args.warmup)
        a0, b0 = snapshot(env, pair)
        p = Phase(guest, "P", {"qemu": guest.proc.pid, "remusd_primary": pair.a.pid,
                               "remusd_backup": pair.b.pid}).run(args.seconds)
        phases.append(p)
        a1, b1 = snapshot(env, pair)
        time.sleep(0.3)  # the last RESUME of the window
        pauses = pauses_in_window(guest.qmp.events_snapshot(), p.t_from, p.t_to)
        pause_ms = [ms for _, ms in pauses]
        res["remus_status"] = status_delta(a0, a1, b0, b1)
        if a1.get("state") != "protected":
            raise BenchError(f"primary state {a1.get('state')}: {a1.get('error')}")
        env.ctl("unprotect", DOMAIN, sock=pair.a_sock, timeout=30)
        if cfg["unprotected"]:
            time.sleep(1.0)
            phases.append(Phase(guest, "U2", {"qemu": guest.proc.pid}).run(args.seconds))
        text = guest.serial_text()
        res["guest_disk_full"] = "DISK FULL" in text
        res["guest_disk_errors"] = text.count("DISK ERROR") + text.count("DISK MISMATCH")
        res["guest_disk_ok_lines"] = text.count("DISK OK")
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        res["error"] = str(e)
    finally:
        guest.stop()
        if pair:
            pair.stop()
    res["phases"] = [ph.result() for ph in phases]
    # Record write times (guest clock), from the image now that QEMU is gone.
    if res["phases"]:
        try:
            last = res["phases"][-1]["seq_to"]
            wt, bad = read_wtimes(image, fmt, 0, last, workdir)
            res["invalid_records"] = bad  # of the 0..last-1 the guest wrote
            for ph in res["phases"]:
                add_record_times(ph, wt)
        except (OSError, subprocess.SubprocessError) as e:
            res["record_error"] = str(e)
    if not args.keep:
        for f in os.listdir(workdir):
            if f.startswith("disk."):
                os.unlink(os.path.join(workdir, f))
    res["pause_ms"] = summary(pause_ms)
    res["checkpoints_per_sec"] = len(pause_ms) / args.seconds if pause_ms else 0
    P = next((ph for ph in res["phases"] if ph["phase"] == "P"), None)
    if P and res.get("remus_status", {}).get("checkpoints"):
        res["disk_bytes_per_epoch"] = (P["records"] * diskcheck.REC) / res["remus_status"]["checkpoints"]
    res["load_after"] = loadavg()
    fmtf = lambda x, f="{:.0f}": "n/a" if x is None else f.format(x)
    log(f"  {cfg['name']:5s} round {rnd}: " + "  ".join(
        f"{ph['phase']} {fmtf(ph['rate_wall'])}/s dev {fmtf(ph['device_ms_per_record'], '{:.2f}')} ms"
        for ph in res["phases"])
        + f"  pause p50 {fmtf(res['pause_ms'].get('p50'), '{:.2f}')} p99 {fmtf(res['pause_ms'].get('p99'), '{:.2f}')}"
        + f" n={res['pause_ms'].get('n', 0)}"
        + (f"  ERROR {res['error']}" if res.get("error") else ""))
    return res, pause_ms


def med(values):
    v = [x for x in values if x is not None]
    return pct(v, 0.5) if v else None


def summarize_config(name, runs, pauses):
    ok = [r for r in runs if not r.get("error") and r.get("phases")]

    def ph(r, n):
        return next((p for p in r["phases"] if p["phase"] == n), {})

    def stat_key(key, sub=None):
        def get(p):
            v = p.get(key)
            return v.get(sub) if sub and isinstance(v, dict) else v

        def mean_u(r):
            a, b = get(ph(r, "U1")), get(ph(r, "U2"))
            return None if a is None or b is None else (a + b) / 2

        u = [mean_u(r) for r in ok]
        p = [get(ph(r, "P")) for r in ok]
        per_round = [ratio(pp, uu) for pp, uu in zip(p, u)]
        return {"unprotected": med(u), "protected": med(p), "ratio_p_over_u": ratio(med(p), med(u)),
                "ratio_p_over_u_per_round": per_round, "ratio_p_over_u_median_of_rounds": med(per_round),
                "unprotected_U1": med([get(ph(r, "U1")) for r in ok]),
                "unprotected_U2": med([get(ph(r, "U2")) for r in ok])}

    out = {"config": name, "runs_ok": len(ok), "runs": len(runs)}
    if not ok:
        return out
    out["rate_target"] = ok[0]["rate_target"]
    out["format"] = ok[0]["format"]
    out["rate_wall"] = stat_key("rate_wall")
    out["rate_guest_clock"] = stat_key("rate_guest_clock")
    out["device_ms_per_record"] = stat_key("device_ms_per_record")
    out["write_ms_mean"] = stat_key("write_ms_mean")
    out["flush_ms_mean"] = stat_key("flush_ms_mean")
    out["max_write_ms"] = stat_key("max_write_ms")
    out["record_interval_ms_p50"] = stat_key("record_interval_ms", "p50")
    out["record_interval_ms_p99"] = stat_key("record_interval_ms", "p99")
    out["pause_ms"] = summary(pauses)
    out["pause_p50_per_round"] = [r["pause_ms"].get("p50") for r in ok]
    out["pause_p99_per_round"] = [r["pause_ms"].get("p99") for r in ok]
    out["checkpoints_per_sec"] = med([r.get("checkpoints_per_sec") for r in ok])
    rs = [r.get("remus_status", {}) for r in ok]
    out["remusd_pause_ms_p50"] = med([(s.get("pause_ms") or {}).get("p50") for s in rs])
    out["remusd_pause_ms_p99"] = med([(s.get("pause_ms") or {}).get("p99") for s in rs])
    out["ack_ms_p50"] = med([(s.get("ack_ms") or {}).get("p50") for s in rs])
    out["ack_ms_p99"] = med([(s.get("ack_ms") or {}).get("p99") for s in rs])
    out["backup_apply_ms_p50"] = med([(s.get("backup_apply_ms") or {}).get("p50") for s in rs])
    out["backup_apply_ms_p99"] = med([(s.get("backup_apply_ms") or {}).get("p99") for s in rs])
    out["bytes_per_epoch_mean"] = med([s.get("bytes_per_epoch_window_mean") for s in rs])
    out["bytes_per_epoch_p50_remusd"] = med([(s.get("bytes_per_epoch") or {}).get("p50") for s in rs])
    out["disk_bytes_per_epoch"] = med([r.get("disk_bytes_per_epoch") for r in ok])
    out["dirty_pages_per_epoch_mean"] = med([s.get("dirty_pages_per_epoch_window_mean") for s in rs])
    out["backpressure_waits"] = sum(s.get("backpressure_waits") or 0 for s in rs)
    cpu = lambda r, n, k: ph(r, n).get("cpu_percent", {}).get(k)
    out["cpu_percent_P"] = {k: med([cpu(r, "P", k) for r in ok])
                            for k in ("qemu", "remusd_primary", "remusd_backup", "machine_busy", "others")}
    out["cpu_percent_U"] = {k: med([cpu(r, "U1", k) for r in ok] + [cpu(r, "U2", k) for r in ok])
                            for k in ("qemu", "machine_busy", "others")}
    out["invalid_records"] = sum(r.get("invalid_records") or 0 for r in ok)
    out["guest_disk_errors"] = sum(r.get("guest_disk_errors") or 0 for r in ok)
    out["guest_disk_full"] = any(r.get("guest_disk_full") for r in ok)
    return out


def bench_guest(env, args):
    configs = [{"name": "sat", "rate": SAT_RATE, "fmt": "raw", "unprotected": True},
               {"name": "mod", "rate": args.mod_rate, "fmt": "raw", "unprotected": True}]
    if args.idle:
        # No writes: only the protected phase means anything (the pause
        # baseline), and it runs in every round, under the same load.
        configs.append({"name": "idle", "rate": 0, "fmt": "raw", "unprotected": False})
    extra = []
    if args.qcow2:
        extra.append({"name": "qcow2", "rate": SAT_RATE, "fmt": "qcow2", "unprotected": True})
    runs, pauses = [], {}
    idx = 0
    for rnd in range(args.rounds):
        k = rnd % len(configs)
        for cfg in configs[k:] + configs[:k]:
            idx += 1
            r, ms = run_guest_once(env, args, cfg, rnd, idx)
            runs.append(r)
            if not r.get("error"):
                pauses.setdefault(cfg["name"], []).extend(ms)
    for cfg in extra:
        idx += 1
        r, ms = run_guest_once(env, args, cfg, 0, idx)
        runs.append(r)
        if not r.get("error"):
            pauses.setdefault(cfg["name"], []).extend(ms)
    names = [c["name"] for c in configs + extra]
    table = [summarize_config(n, [r for r in runs if r["config"] == n], pauses.get(n, [])) for n in names]
    idle = next((t for t in table if t["config"] == "idle" and t.get("runs_ok")), None)
    if idle:
        for t in table:
            if t.get("runs_ok"):
                t["pause_over_idle"] = {k: ratio(t["pause_ms"].get(k), idle["pause_ms"].get(k))
                                        for k in ("p50", "p99", "mean")}
    return {"runs": runs, "summary": table}


# ------------------------------------------------------------ journal bench
def bench_journal(env, args):
    argv = [env.journal_bin, "--total-mib", str(args.journal_mib), "--reps", str(args.journal_reps)]
    if args.journal_dir:
        argv += ["--dir", args.journal_dir]
    log(f"journal: {' '.join(argv)}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    for line in r.stderr.splitlines():
        if "median" in line:
            log("  " + line)
    try:
        doc = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        doc = {"ok": False, "error": f"bench_journal_apply exited {r.returncode}: {r.stderr[-2000:]}", "results": []}
    doc["argv"] = argv[1:]
    return doc


# ------------------------------------------------------------------ report
def print_summary(doc):
    fmt = lambda x, f="{:.2f}": "n/a" if x is None else f.format(x)
    g = doc.get("guest")
    if g:
        log("guest disk writes (medians over rounds; U = mean of U1 and U2 of the same boot):")
        log(f"  {'config':6} {'target/s':>8} {'rate U':>8} {'rate P':>8} {'P/U':>5} {'dev ms U':>8} {'dev ms P':>8} "
            f"{'P/U':>5} {'ival p50 U/P':>13} {'pause p50':>9} {'p99':>7} {'mean':>6} {'ckpt/s':>6} {'B/epoch':>9} "
            f"{'disk B/ep':>9} {'ack p99':>7}")
        for s in g["summary"]:
            if not s.get("runs_ok"):
                log(f"  {s['config']:6} no successful run")
                continue
            rw, dv, iv = s["rate_wall"], s["device_ms_per_record"], s["record_interval_ms_p50"]
            log(f"  {s['config']:6} {s['rate_target']:>8} {fmt(rw['unprotected'], '{:.0f}'):>8} "
                f"{fmt(rw['protected'], '{:.0f}'):>8} {fmt(rw['ratio_p_over_u_median_of_rounds']):>5} "
                f"{fmt(dv['unprotected']):>8} {fmt(dv['protected']):>8} {fmt(dv['ratio_p_over_u_median_of_rounds']):>5} "
                f"{fmt(iv['unprotected']):>6}/{fmt(iv['protected']):<6} {fmt(s['pause_ms'].get('p50')):>9} "
                f"{fmt(s['pause_ms'].get('p99')):>7} {fmt(s['pause_ms'].get('mean')):>6} "
                f"{fmt(s['checkpoints_per_sec'], '{:.1f}'):>6} "
                f"{fmt(s['bytes_per_epoch_mean'], '{:.0f}'):>9} {fmt(s['disk_bytes_per_epoch'], '{:.0f}'):>9} "
                f"{fmt(s['ack_ms_p99'], '{:.1f}'):>7}")
    j = doc.get("journal")
    if j and j.get("ok"):
        log("backup journal (bench_journal_apply), MB/s of write data:")
        for r in j["results"]:
            log(f"  {r['workload']:6} apply {r['apply_mbps']:7.1f}  seq write+fsync {r['seq_fsync_mbps']:7.1f} "
                f"(ratio {r['ratio_apply_vs_seq_fsync']:.2f})  same offsets {r['same_offsets_mbps']:7.1f} "
                f"(ratio {r['ratio_apply_vs_same_offsets']:.2f});  commit/epoch p50 {r['commit_ms']['p50']:.2f} ms, "
                f"append+commit p50 {r['append_commit_ms']['p50']:.2f} ms vs write+fsync {r['epoch_fsync_ms']['p50']:.2f} ms;"
                f"  loop p99 {r['loop_epoch_ms']['p99']:.1f} ms max {r['loop_epoch_ms']['max']:.1f} ms")
    elif j:
        log(f"journal: failed: {j.get('error')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (under ~2 minutes)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--qemu", default=DEFAULT_QEMU)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of sat/mod/idle boots (default 3; quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per phase (default 6; quick 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds after the writer starts / after "
                    "protection before measuring")
    ap.add_argument("--mod-rate", type=int, default=200, help="records/s of the moderate configuration")
    ap.add_argument("--sync", type=int, default=1, choices=(0, 1), help="remus.disksync (default 1: O_DSYNC)")
    ap.add_argument("--verify", type=float, default=3600.0,
                    help="remus.diskverify seconds (default 3600: no verification pass during the run)")
    ap.add_argument("--window", type=int, default=64, help="remus.diskwindow")
    ap.add_argument("--mem", type=int, default=256, help="guest memory, MiB")
    ap.add_argument("--disk-mib", type=int, default=1024, help="size of the guest's (sparse) disk image")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval, ms")
    ap.add_argument("--qcow2", action=argparse.BooleanOptionalAction, default=None,
                    help="one more boot: sat on a qcow2 image (default: on; quick: off)")
    ap.add_argument("--idle", action=argparse.BooleanOptionalAction, default=True,
                    help="per round one more boot, protected phase only: a mirrored disk the guest does "
                    "not write (the pause baseline; default: on)")
    ap.add_argument("--journal-mib", type=int, default=None, help="data per journal workload (default 48; quick 32)")
    ap.add_argument("--journal-reps", type=int, default=None, help="default 3; quick 1")
    ap.add_argument("--journal-dir", default=None, help="where bench_journal_apply writes (default /var/tmp)")
    ap.add_argument("--skip-guest", action="store_true")
    ap.add_argument("--skip-journal", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/disk-<timestamp>.json)")
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 3)
    args.seconds = args.seconds if args.seconds is not None else (5.0 if q else 6.0)
    args.qcow2 = args.qcow2 if args.qcow2 is not None else not q
    args.journal_mib = args.journal_mib or (32 if q else 48)
    args.journal_reps = args.journal_reps or (1 if q else 3)

    env = rb.Env(args)
    env.journal_bin = os.path.join(env.build, "bench", "bench_journal_apply")
    if not args.skip_journal and not os.path.exists(env.journal_bin):
        raise BenchError(f"missing {env.journal_bin} (cmake --build build --target bench_journal_apply)")
    # The PVH vmlinux boots about twice as fast under TCG; no memmap= is used here.
    vmlinux = os.path.join(env.build, "guest", "vmlinux")
    env.guest_kernel = vmlinux if os.path.exists(vmlinux) else env.kernel
    t_start = time.monotonic()
    doc = {"bench": "remus-disk", "mode": "quick" if q else "full", "machine": machine_info(env),
           "config": {k: v for k, v in vars(args).items()}}
    doc["machine"]["guest_kernel"] = env.guest_kernel
    try:
        st = os.stat(env.remusd)
        doc["machine"]["remusd_mtime"] = datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")
    except OSError:
        pass

    def on_signal(signo, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not args.skip_guest:
            log(f"guest: {args.rounds} round(s) x sat/mod" + ("/idle" if args.idle else "")
                + f" (U1, P, U2: {args.seconds:g} s each), mod rate {args.mod_rate}/s, disksync={args.sync}"
                + (", + qcow2" if args.qcow2 else ""))
            doc["guest"] = bench_guest(env, args)
        if not args.skip_journal:
            doc["journal"] = bench_journal(env, args)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        log("interrupted; writing what was measured")
    finally:
        env.cleanup()
    doc["machine"]["loadavg_end"] = loadavg()
    doc["elapsed_s"] = time.monotonic() - t_start
    rb.write_results(doc, args.out, "disk-", q, print_summary)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
