#!/usr/bin/env python3
"""Captures what a real QEMU sends to a COLO receiver, for the codec's tests.

Starts QEMU (no guest OS: SeaBIOS finds nothing to boot and idles), enables
x-colo, migrates to a unix socket we listen on and records every byte QEMU
sends: the initial stream, then one checkpoint (we answer reply, received and
loaded). Writes OUT.initial (the initial stream) and OUT.checkpoint (the bytes
QEMU sent after checkpoint-ready: request, vmstate-send, ram, vmstate-size,
devices). Usage: capture_colo_stream.py QEMU OUTPREFIX [MEM_MB]
"""
import json, os, socket, struct, subprocess, sys, tempfile, time

def qmp(sock, f, cmd, args=None):
    msg = {"execute": cmd}
    if args: msg["arguments"] = args
    sock.sendall(json.dumps(msg).encode() + b"\n")
    while True:
        r = json.loads(f.readline())
        if "return" in r: return r["return"]
        if "error" in r: raise RuntimeError(f"{cmd}: {r['error']}")

def read_until_quiet(c, quiet=1.0, limit=30.0):
    data = b""; start = time.time()
    c.settimeout(quiet)
    while time.time() - start < limit:
        try:
            b = c.recv(1 << 20)
        except socket.timeout:
            if data: return data
            continue
        if not b: return data
        data += b
    return data

def main():
    qemu, out = sys.argv[1], sys.argv[2]
    mem = sys.argv[3] if len(sys.argv) > 3 else "16"
    d = tempfile.mkdtemp()
    qsock, msock = os.path.join(d, "q.sock"), os.path.join(d, "m.sock")
    lst = socket.socket(socket.AF_UNIX); lst.bind(msock); lst.listen(1)
    p = subprocess.Popen([qemu, "-machine", "pc", "-accel", "tcg", "-m", mem, "-nodefaults",
                          "-nographic", "-vga", "none", "-qmp", f"unix:{qsock},server=on,wait=off"])
    try:
        for _ in range(100):
            if os.path.exists(qsock): break
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX); s.connect(qsock); f = s.makefile()
        f.readline(); qmp(s, f, "qmp_capabilities")
        qmp(s, f, "migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
        qmp(s, f, "migrate-set-parameters", {"x-checkpoint-delay": 300})
        qmp(s, f, "migrate", {"uri": f"unix:{msock}"})
        c, _ = lst.accept()
        initial = read_until_quiet(c)
        open(out + ".initial", "wb").write(initial)
        c.sendall(struct.pack(">I", 0))  # checkpoint-ready
        c.settimeout(10); req = c.recv(4)
        assert req == struct.pack(">I", 1), req
        c.sendall(struct.pack(">I", 2))  # reply
        rest = read_until_quiet(c, quiet=1.0, limit=20)
        open(out + ".checkpoint", "wb").write(req + rest)
        c.sendall(struct.pack(">II", 5, 6))
        print(json.dumps({"initial": len(initial), "checkpoint": len(req) + len(rest)}))
        qmp(s, f, "x-colo-lost-heartbeat")
    finally:
        p.kill(); p.wait()

if __name__ == "__main__":
    main()
