#!/usr/bin/python3
"""The fault campaign's client: drives the test guest's `remus.tcp` line
service for a whole run, from the client namespace C.

Like tests/e2e/netclient.py (one request in flight, the next sent as soon as
the answer arrived), but it never gives up: when a connection fails (an
error, or no answer within --answer-timeout) it opens a new one and goes on.
Every connection has a number; request i of connection c is the line
`ping <c>-<i>`, so an answer names exactly the request it belongs to.

One JSON line per event on stdout (flushed at once):

  {"ev": "connected", "conn": 1, "t": ..}
  {"ev": "resp", "conn": 1, "i": 7, "seq": 7, "counter": 1234, "echo": "ping 1-7",
   "t_send": .., "t_recv": ..}
  {"ev": "error", "conn": 1, "what": "...", "t": ..}

t_recv is the kernel's receive timestamp (SO_TIMESTAMPNS, wall clock).
Runs until killed (or --duration). stdlib only.
"""

import argparse
import json
import re
import socket
import struct
import sys
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
RESP = re.compile(rb"seq=(\d+) counter=(\d+) echo=(.*)")


def emit(**kv):
    sys.stdout.write(json.dumps(kv) + "\n")
    sys.stdout.flush()


def session(host, port, conn, answer_timeout, end):
    s = socket.create_connection((host, port), timeout=2)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(answer_timeout)
    emit(ev="connected", conn=conn, t=time.time())
    buf = b""
    i = 0
    try:
        while time.time() < end:
            i += 1
            t_send = time.time()
            s.sendall(b"ping %d-%d\n" % (conn, i))
            t_recv = None
            while b"\n" not in buf:
                data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
                if not data:
                    raise ConnectionError("connection closed by the guest")
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(cdata) >= 16:
                        sec, nsec = struct.unpack("qq", cdata[:16])
                        t_recv = sec + nsec / 1e9
                buf += data
            line, buf = buf.split(b"\n", 1)
            m = RESP.match(line)
            if not m:
                emit(ev="error", conn=conn, what=f"bad answer {line!r}", t=time.time())
                continue
            emit(ev="resp", conn=conn, i=i, seq=int(m.group(1)), counter=int(m.group(2)),
                 echo=m.group(3).decode("utf-8", "replace"), t_send=t_send, t_recv=t_recv or time.time())
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--answer-timeout", type=float, default=15.0)
    a = ap.parse_args()
    end = time.time() + a.duration
    conn = 0
    while time.time() < end:
        conn += 1
        try:
            session(a.host, a.port, conn, a.answer_timeout, end)
        except (OSError, ConnectionError) as e:
            emit(ev="error", conn=conn, what=f"{type(e).__name__}: {e}", t=time.time())
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
