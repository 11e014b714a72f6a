#!/usr/bin/python3
"""A request/response client for the test guest's `remus.tcp` line protocol.

Runs in the client network namespace (started with `ip netns exec`). Holds
ONE TCP connection and sends the next request as soon as the previous answer
arrived. Writes one JSON line per event to stdout:

  {"ev": "connected", "local": "10.77.0.3:41234", "peer": "10.77.0.2:7000", "t": ..}
  {"ev": "resp", "i": 7, "seq": 7, "counter": 1234, "t_send": .., "t_recv": ..}
  {"ev": "error", "what": "...", "t": ..}
  {"ev": "end", "t": ..}

t_recv is the kernel's receive timestamp of the answer's bytes (SO_TIMESTAMPNS,
wall clock), t_send the wall clock just before send(). stdlib only.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    ap.add_argument("--gap-ms", type=float, default=0.0, help="pause between requests")
    a = ap.parse_args()

    deadline = time.time() + a.connect_timeout
    while True:
        try:
            s = socket.create_connection((a.host, a.port), timeout=5)
            break
        except OSError as e:
            if time.time() > deadline:
                emit(ev="error", what=f"connect: {e}", t=time.time())
                return 1
            time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(120)
    emit(ev="connected", local="%s:%d" % s.getsockname()[:2], peer="%s:%d" % s.getpeername()[:2], t=time.time())
    end = time.time() + a.duration
    buf = b""
    i = 0
    while time.time() < end:
        i += 1
        t_send = time.time()
        try:
            s.sendall(b"ping %d\n" % i)
            t_recv = None
            while b"\n" not in buf:
                data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
                if not data:
                    emit(ev="error", what="connection closed by the guest", t=time.time())
                    return 1
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(cdata) >= 16:
                        sec, nsec = struct.unpack("qq", cdata[:16])
                        t_recv = sec + nsec / 1e9
                buf += data
        except OSError as e:
            emit(ev="error", what=f"{type(e).__name__}: {e}", t=time.time())
            return 1
        line, buf = buf.split(b"\n", 1)
        m = RESP.match(line)
        if not m:
            emit(ev="error", what=f"bad answer {line!r}", t=time.time())
            return 1
        emit(ev="resp", i=i, seq=int(m.group(1)), counter=int(m.group(2)),
             echo=m.group(3).decode("utf-8", "replace"), t_send=t_send, t_recv=t_recv or time.time())
        if a.gap_ms:
            time.sleep(a.gap_ms / 1000)
    emit(ev="end", t=time.time())
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
