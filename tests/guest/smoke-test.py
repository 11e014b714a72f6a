#!/usr/bin/env python3
"""Smoke test of the remus test guest (no remus involved).

    tests/guest/smoke-test.py [--outdir build/guest] [--kernel vmlinux|vmlinuz]
                              [--qemu qemu-system-x86_64] [--dirty 10000] [--wss 32]

Boots the guest under TCG with the counter, dirtier+checker and TCP knobs and a
virtio-net NIC (slirp with hostfwd), then checks: a `check ok` line appears,
the counter read through QMP `xp` increases, a TCP request gets its answer,
and no CHECKER FAIL / FATAL / EXITED line shows. Exit status 0 on success.
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

GPA = 0x8000000


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

    def xp(self, gpa):
        out = self.cmd("human-monitor-command", **{"command-line": "xp /1xg 0x%x" % gpa})
        return int(out.split(":")[1].strip(), 16)


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--outdir", default=os.path.join(here, "..", "..", "build", "guest"))
    ap.add_argument("--kernel", default="vmlinux")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    ap.add_argument("--dirty", type=int, default=10000)
    ap.add_argument("--wss", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="remus-guest-smoke.")
    log, qsock = os.path.join(tmp, "console.log"), os.path.join(tmp, "qmp.sock")
    port = free_port()
    append = ("console=ttyS0 quiet memmap=64K$0x%x remus.counter=0x%x remus.dirty=%d "
              "remus.wss=%d remus.check=1 remus.ip=10.0.2.15/24 remus.tcp=7000"
              % (GPA, GPA, a.dirty, a.wss))
    argv = [a.qemu, "-accel", "tcg", "-machine", "pc", "-m", "256", "-nodefaults",
            "-nographic", "-vga", "none", "-serial", "file:" + log,
            "-kernel", os.path.join(a.outdir, a.kernel),
            "-initrd", os.path.join(a.outdir, "initrd.img"), "-append", append,
            "-qmp", "unix:%s,server=on,wait=off" % qsock,
            "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:7000" % port,
            "-device", "virtio-net-pci,netdev=n0,romfile="]
    print("smoke: " + " ".join(("'%s'" % x) if " " in x or "$" in x else x for x in argv))
    t0 = time.time()
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    ok = False
    try:
        def console():
            try:
                with open(log, errors="replace") as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        def wait_for(pattern, start=0):
            while time.time() - t0 < a.timeout:
                m = re.compile(pattern).search(console(), start)
                if m:
                    return m
                if q.poll() is not None:
                    raise RuntimeError("qemu exited with %s" % q.returncode)
                time.sleep(0.05)
            raise RuntimeError("timeout waiting for %r" % pattern)

        m = wait_for(r"remus-guest: check ok [^\n]*\n")
        print("smoke: first check ok after %.1f s: %s" % (time.time() - t0, m.group(0).strip()))
        qmp = Qmp(qsock)
        c1 = qmp.xp(GPA)
        time.sleep(1)
        c2 = qmp.xp(GPA)
        print("smoke: counter via QMP xp: %d -> %d" % (c1, c2))
        if not c2 > c1:
            raise RuntimeError("counter did not increase")

        wait_for(r"remus-guest: tcp listening")
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

        n = len(console())
        wait_for(r"remus-guest: check ok [^\n]*\n", n)
        bad = re.findall(r"remus-guest: (?:CHECKER FAIL|FATAL|WORKLOAD)[^\n]*", console())
        if bad:
            raise RuntimeError("bad lines: %s" % bad[:5])
        ok = True
        print("smoke: OK (%.1f s)" % (time.time() - t0))
    except Exception as e:  # noqa: BLE001
        print("smoke: FAILED: %s" % e)
        print("smoke: console log tail:\n" + "".join(open(log, errors="replace").readlines()[-30:])
              if os.path.exists(log) else "smoke: no console log")
    finally:
        q.terminate()
        try:
            q.wait(10)
        except subprocess.TimeoutExpired:
            q.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
