#!/usr/bin/env python3
"""Smoke test of the remus test guest (no remus involved).

    tests/guest/smoke-test.py [--outdir build/guest] [--kernel vmlinux|vmlinuz]
                              [--qemu qemu-system-x86_64] [--dirty 10000] [--wss 32]
                              [--cases base,kv,disk,qcow2,diskfs]

Cases (each boots its own guest under TCG):

* base: counter, dirtier+checker and TCP knobs with a virtio-net NIC (slirp
  with hostfwd): a `check ok` line appears, the counter read through QMP `xp`
  increases, a TCP request gets its answer.
* kv: remus.kv on a small raw disk of random bytes: every GET's CRC is
  zlib's CRC-32 of the value's bytes; out-of-range and bad keys get err=.
* disk: remus.disk on a 64 MiB raw image (cache=none) with remus.diskgpa and a
  small remus.diskwindow (so the rolling verification runs): a few `DISK OK`
  lines, then QMP stop, last_durable read with `xp` at the GPA, QEMU killed
  (SIGKILL), and tests/guest/diskcheck.py on the image: prefix_ok and at least
  last_durable+1 records.
* qcow2: remus.disk on a 1 MiB qcow2 image (256 records): `DISK FULL`, then
  `DISK OK last=255`; after the kill the image (converted to raw) holds
  exactly records 0..255.
* diskfs: remus.diskfs on a 64 MiB raw image made with mkfs.ext4: `DISK OK`
  lines, stop, xp, kill; then on a copy the journal is replayed
  (`e2fsck -p -E journal_only`), `e2fsck -fn` must be clean, and the copy is
  mounted `-o loop,ro` to run diskcheck.py on its `records` file. Needs root
  and e2fsprogs (else skipped).

Every case fails on a CHECKER FAIL, FATAL, WORKLOAD, DISK MISMATCH or
DISK ERROR line. Exit status 0 on success.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib

GPA = 0x8000000
DISKGPA = GPA + 0x1000  # in the same memmap=64K region
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import diskcheck  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" not in r:
                if "error" in r:
                    raise RuntimeError(r["error"])
                return r["return"]

    def xp(self, gpa, n=1):
        out = self.cmd("human-monitor-command", **{"command-line": "xp /%dxg 0x%x" % (n, gpa)})
        words = [int(w, 16) for line in out.splitlines() if ":" in line
                 for w in line.split(":", 1)[1].split()]
        return words[0] if n == 1 else words[:n]


BAD = r"remus-guest: (?:CHECKER FAIL|FATAL|WORKLOAD|DISK MISMATCH|DISK ERROR)[^\n]*"
DISK_OK = r"remus-guest: DISK OK last=(-?\d+)[^\n]*\n"


class Guest:
    """One QEMU running the test guest; console in a file, QMP on a socket."""

    def __init__(self, a, tmp, name, append, extra=()):
        self.a, self.t0 = a, time.time()
        self.log = os.path.join(tmp, name + ".console.log")
        self.qsock = os.path.join(tmp, name + ".qmp.sock")
        argv = [a.qemu, "-accel", "tcg", "-machine", "pc", "-m", "256", "-nodefaults",
                "-nographic", "-vga", "none", "-serial", "file:" + self.log,
                "-kernel", os.path.join(a.outdir, a.kernel),
                "-initrd", os.path.join(a.outdir, "initrd.img"),
                "-append", "console=ttyS0 quiet " + append,
                "-qmp", "unix:%s,server=on,wait=off" % self.qsock] + list(extra)
        print("smoke[%s]: %s" % (name, " ".join(("'%s'" % x) if " " in x or "$" in x else x
                                                for x in argv)))
        self.q = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self._qmp = None

    def console(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern, start=0):
        while time.time() - self.t0 < self.a.timeout:
            m = re.compile(pattern).search(self.console(), start)
            if m:
                return m
            if self.q.poll() is not None:
                raise RuntimeError("qemu exited with %s" % self.q.returncode)
            time.sleep(0.05)
        raise RuntimeError("timeout waiting for %r" % pattern)

    def qmp(self):
        if self._qmp is None:
            self._qmp = Qmp(self.qsock)
        return self._qmp

    def no_bad_lines(self):
        bad = re.findall(BAD, self.console())
        if bad:
            raise RuntimeError("bad lines: %s" % bad[:5])

    def kill(self):
        """SIGKILL, as a host failure would (no flush, no clean shutdown)."""
        if self.q.poll() is None:
            self.q.kill()
        self.q.wait()

    def stop(self):
        if self.q.poll() is None:
            self.q.terminate()
            try:
                self.q.wait(10)
            except subprocess.TimeoutExpired:
                self.q.kill()
                self.q.wait()

    def tail(self):
        return "".join(self.console().splitlines(True)[-30:]) or "(empty)\n"


def run(cmd, **kw):
    print("smoke: $ " + " ".join(cmd))
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, **kw)


def disk_ok_lines(g, n):
    """Wait for n DISK OK lines; return the last one's last=."""
    m = None
    pos = 0
    for _ in range(n):
        m = g.wait_for(DISK_OK, pos)
        pos = m.end()
    print("smoke: %s" % m.group(0).strip())
    return int(m.group(1))


def stop_and_read_state(g):
    """QMP stop (drains the guest's I/O), read the writer's state at DISKGPA,
    SIGKILL QEMU; return last_durable (-1: none)."""
    qmp = g.qmp()
    qmp.cmd("stop")
    last, inflight, run_id, magic = qmp.xp(DISKGPA, 4)
    if magic != 0x5441545344534D52:  # "RMSDSTAT"
        raise RuntimeError("no disk state at GPA 0x%x (magic 0x%x)" % (DISKGPA, magic))
    last = -1 if last == (1 << 64) - 1 else last
    print("smoke: stopped; GPA 0x%x: last_durable=%d inflight=%s run=%016x"
          % (DISKGPA, last, "none" if inflight == (1 << 64) - 1 else inflight, run_id))
    g.kill()
    return last, run_id


def diskcheck_ok(path, need, run_id):
    r = diskcheck.check(path, run_id=run_id, expect_at_least=need)
    print("smoke: diskcheck %s: records=%d last_seq=%d prefix_ok=%s holes=%s corrupt=%s"
          % (path, r["records"], r["last_seq"], r["prefix_ok"], r["holes_count"],
             r["corrupt_count"]))
    if not r["ok"]:
        raise RuntimeError("diskcheck failed (need >= %d records): %s" % (need, json.dumps(r)))
    return r


# ------------------------------------------------------------------- cases

def case_base(a, tmp):
    port = free_port()
    append = ("memmap=64K$0x%x remus.counter=0x%x remus.dirty=%d "
              "remus.wss=%d remus.check=1 remus.ip=10.0.2.15/24 remus.tcp=7000"
              % (GPA, GPA, a.dirty, a.wss))
    g = Guest(a, tmp, "base", append,
              ["-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:7000" % port,
               "-device", "virtio-net-pci,netdev=n0,romfile="])
    try:
        m = g.wait_for(r"remus-guest: check ok [^\n]*\n")
        print("smoke: first check ok after %.1f s: %s" % (time.time() - g.t0, m.group(0).strip()))
        qmp = g.qmp()
        c1 = qmp.xp(GPA)
        time.sleep(1)
        c2 = qmp.xp(GPA)
        print("smoke: counter via QMP xp: %d -> %d" % (c1, c2))
        if not c2 > c1:
            raise RuntimeError("counter did not increase")

        g.wait_for(r"remus-guest: tcp listening")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rw")
            for i in (1, 2):
                f.write("hello %d\n" % i)
                f.flush()
                line = f.readline().strip()
                print("smoke: tcp reply: " + line)
                m = re.fullmatch(r"seq=(\d+) counter=(\d+) echo=hello %d" % i, line)
                if not m or int(m.group(1)) != i or int(m.group(2)) < c1:
                    raise RuntimeError("bad tcp reply %r" % line)

        g.wait_for(r"remus-guest: check ok [^\n]*\n", len(g.console()))
        g.no_bad_lines()
    finally:
        g.stop()
    return g


def case_kv(a, tmp):
    """remus.kv: 64 values of 16 KiB on a raw disk of random bytes; each GET's
    CRC is zlib's of the same bytes; past the end: err=out-of-range."""
    img = os.path.join(tmp, "kv.img")
    with open(img, "wb") as f:
        f.write(os.urandom(64 * 16384))
    data = open(img, "rb").read()
    port = free_port()
    append = "remus.ip=10.0.2.15/24 remus.tcp=7000 remus.kv=vda remus.kvval=16"
    g = Guest(a, tmp, "kv", append,
              ["-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:7000" % port,
               "-device", "virtio-net-pci,netdev=n0,romfile=",
               "-drive", "file=%s,if=none,format=raw,id=d0,readonly=on,cache=none" % img,
               "-device", "virtio-blk-pci,drive=d0"])
    try:
        g.wait_for(r"remus-guest: kv: 64 values of 16 KiB on /dev/vda")
        g.wait_for(r"remus-guest: tcp listening")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rw")
            for i, k in enumerate((0, 63, 17, 17, 64, "x"), 1):
                f.write("GET %s\n" % k)
                f.flush()
                line = f.readline().strip()
                print("smoke: kv reply: " + line)
                if k == 64 or k == "x":
                    want = "err=%s" % ("out-of-range" if k == 64 else "bad-key")
                    ok = re.fullmatch(r"seq=%d counter=\d+ key=%s %s" % (i, k, want), line)
                else:
                    crc = zlib.crc32(data[k * 16384:(k + 1) * 16384])
                    ok = re.fullmatch(r"seq=%d counter=\d+ key=%d crc=%08x" % (i, k, crc), line)
                if not ok:
                    raise RuntimeError("bad kv reply %r to GET %s" % (line, k))
        g.no_bad_lines()
    finally:
        g.stop()
    return g


def case_disk(a, tmp):
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    append = ("memmap=64K$0x%x remus.counter=0x%x remus.disk=/dev/vda remus.diskgpa=0x%x "
              "remus.diskrate=50 remus.diskwindow=64" % (GPA, GPA, DISKGPA))
    g = Guest(a, tmp, "disk", append,
              ["-drive", "file=%s,if=none,format=raw,id=d0,cache=none" % img,
               "-device", "virtio-blk-pci,drive=d0"])
    try:
        seen = disk_ok_lines(g, 5)
        g.wait_for(r"remus-guest: DISK OK [^\n]* full=0 ")  # rolling verification ran
        g.no_bad_lines()
        # O_DSYNC: the guest flushes after every write (virtio-blk has no FUA)
        st = g.qmp().cmd("query-blockstats")[0]["stats"]
        print("smoke: blockstats: wr_operations=%d flush_operations=%d"
              % (st["wr_operations"], st["flush_operations"]))
        if st["flush_operations"] < st["wr_operations"]:
            raise RuntimeError("fewer flushes than writes: O_DSYNC not effective?")
        last, run_id = stop_and_read_state(g)
    finally:
        g.stop()
    g.no_bad_lines()
    if last < seen:
        raise RuntimeError("last_durable %d in memory < %d on the console" % (last, seen))
    diskcheck_ok(img, last + 1, run_id)
    return g


def case_qcow2(a, tmp):
    img = os.path.join(tmp, "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
    append = ("memmap=64K$0x%x remus.disk=vda remus.diskgpa=0x%x remus.diskrate=100"
              % (GPA, DISKGPA))
    g = Guest(a, tmp, "qcow2", append,
              ["-drive", "file=%s,if=none,format=qcow2,id=d0,cache=none" % img,
               "-device", "virtio-blk-pci,drive=d0"])
    try:
        m = g.wait_for(r"remus-guest: DISK FULL [^\n]*\n")
        print("smoke: " + m.group(0).strip())
        m = g.wait_for(r"remus-guest: DISK OK last=255 [^\n]*\n", m.end())
        print("smoke: " + m.group(0).strip())
        last, run_id = stop_and_read_state(g)
    finally:
        g.stop()
    g.no_bad_lines()
    raw = os.path.join(tmp, "qcow2-as-raw.img")
    run(["qemu-img", "convert", "-O", "raw", img, raw], check=True)
    r = diskcheck_ok(raw, 256, run_id)
    if last != 255 or r["records"] != 256:
        raise RuntimeError("want exactly 256 records, last_durable 255: got %d, %d"
                           % (r["records"], last))
    return g


def case_diskfs(a, tmp):
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("e2fsck"):
        print("smoke[diskfs]: SKIPPED (needs root and e2fsprogs)")
        return None
    img = os.path.join(tmp, "fs.img")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run(["mkfs.ext4", "-qF", img], check=True)
    append = ("memmap=64K$0x%x remus.diskfs=/dev/vda remus.diskfsgpa=0x%x remus.diskrate=50"
              % (GPA, DISKGPA))
    g = Guest(a, tmp, "diskfs", append,
              ["-drive", "file=%s,if=none,format=raw,id=d0,cache=none" % img,
               "-device", "virtio-blk-pci,drive=d0"])
    try:
        seen = disk_ok_lines(g, 5)
        g.no_bad_lines()
        last, run_id = stop_and_read_state(g)
    finally:
        g.stop()
    g.no_bad_lines()
    if last < seen:
        raise RuntimeError("last_durable %d in memory < %d on the console" % (last, seen))
    # Killed while mounted: the image needs a journal replay. e2fsck -fn on
    # it as it is reports errors (it skips the replay); informational only.
    r = run(["e2fsck", "-fn", img], capture_output=True, text=True)
    print("smoke: e2fsck -fn on the image as QEMU left it: rc=%d (informational: -n skips "
          "the journal replay; both 0 and 4 happen)" % r.returncode)
    copy = os.path.join(tmp, "fs-copy.img")
    shutil.copyfile(img, copy)
    r = run(["e2fsck", "-p", "-E", "journal_only", copy], capture_output=True, text=True)
    print("smoke: journal replay rc=%d %s" % (r.returncode, (r.stdout + r.stderr).strip()))
    if r.returncode not in (0, 1):
        raise RuntimeError("journal replay failed")
    r = run(["e2fsck", "-fn", copy], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("e2fsck -fn after the journal replay: rc=%d\n%s"
                           % (r.returncode, r.stdout + r.stderr))
    print("smoke: e2fsck -fn after the journal replay: clean")
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    run(["mount", "-o", "loop,ro", copy, mnt], check=True)
    try:
        diskcheck_ok(os.path.join(mnt, "records"), last + 1, run_id)
    finally:
        run(["umount", mnt])
    return g


CASES = {"base": case_base, "kv": case_kv, "disk": case_disk, "qcow2": case_qcow2, "diskfs": case_diskfs}



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--outdir", default=os.path.join(HERE, "..", "..", "build", "guest"))
    ap.add_argument("--kernel", default="vmlinux")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    ap.add_argument("--dirty", type=int, default=10000)
    ap.add_argument("--wss", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120, help="per case, seconds")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="remus-guest-smoke.")
    failed = []
    t00 = time.time()
    try:
        for name in a.cases.split(","):
            t0 = time.time()
            try:
                CASES[name](a, tmp)
                print("smoke[%s]: OK (%.1f s)" % (name, time.time() - t0))
            except Exception as e:  # noqa: BLE001
                failed.append(name)
                print("smoke[%s]: FAILED: %s" % (name, e))
                log = os.path.join(tmp, name + ".console.log")
                if os.path.exists(log):
                    print("smoke: console log tail:\n"
                          + "".join(open(log, errors="replace").readlines()[-30:]))
    finally:
        if a.keep:
            print("smoke: kept " + tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print("smoke: FAILED: %s (%.1f s)" % (",".join(failed), time.time() - t00))
        return 1
    print("smoke: OK (%.1f s)" % (time.time() - t00))
    return 0


if __name__ == "__main__":
    sys.exit(main())
