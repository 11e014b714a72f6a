#!/usr/bin/python3
"""Open-loop client of the test guest's key-value service (tests/guest:
remus.kv), for bench/failover_latency.py. stdlib only.

Runs in the client network namespace. Sends "GET <k>" at a fixed rate on ONE
TCP connection, pipelined (the schedule does not wait for answers, so a
stalled server shows as the latency of every request scheduled meanwhile,
not as requests never made), keys Zipf-distributed over the data set (rank r
drawn with weight 1/r^s; ranks mapped to keys by a fixed permutation so the
hot keys lie scattered over the disk). Writes one JSON line per event:

  {"ev": "connected", "t": ..}
  {"ev": "resp", "t_send": .., "t_recv": .., "key": k, "crc": "..."}   (wall clock)
  {"ev": "err", "t_send": .., "t_recv": .., "key": k, "what": "..."}   (the guest's err=)
  {"ev": "lost", "t_send": .., "key": k, "why": ".."}   (sent, never answered: connection gone)
  {"ev": "disconnected", "t": .., "why": ".."}
  {"ev": "unsent", "t": .., "n": ..}   (scheduled while not connected)
  {"ev": "end", "t": .., "sent": .., "answered": ..}

A connection whose oldest unanswered request is older than --give-up seconds
is dropped and a new one made (what a client of a restarted server must do);
a connection that carries on across a failover never hits that.
"""

import argparse
import bisect
import collections
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time

RESP = re.compile(rb"seq=\d+ counter=\d+ key=(\d+) (crc|err)=(\S+)")


def emit(lock, **kv):
    with lock:
        sys.stdout.write(json.dumps(kv) + "\n")
        sys.stdout.flush()


class Zipf:
    def __init__(self, n, s, seed):
        self.rng = random.Random(seed)
        acc, self.cdf = 0.0, []
        for r in range(1, n + 1):
            acc += 1.0 / r ** s
            self.cdf.append(acc)
        self.keys = list(range(n))
        random.Random(seed + 1).shuffle(self.keys)

    def draw(self):
        i = bisect.bisect_left(self.cdf, self.rng.random() * self.cdf[-1])
        return self.keys[min(i, len(self.keys) - 1)]


class Conn:
    """One connection and its FIFO of unanswered (t_send, key)."""

    def __init__(self, sock):
        self.sock = sock
        self.pending = collections.deque()
        self.lock = threading.Lock()
        self.dead = None


def reader(conn, out):
    buf = b""
    try:
        while True:
            data = conn.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the peer")
            t = time.time()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                m = RESP.match(line)
                with conn.lock:
                    t_send, key = conn.pending.popleft() if conn.pending else (None, None)
                if not m or t_send is None or int(m.group(1)) != key:
                    raise ConnectionError(f"unexpected answer {line[:80]!r} to key {key}")
                if m.group(2) == b"crc":
                    emit(out, ev="resp", t_send=t_send, t_recv=t, key=key, crc=m.group(3).decode())
                else:
                    emit(out, ev="err", t_send=t_send, t_recv=t, key=key, what=m.group(3).decode())
    except (OSError, ConnectionError) as e:
        with conn.lock:
            if conn.dead is None:
                conn.dead = str(e) or type(e).__name__


def connect(host, port, timeout):
    s = socket.create_connection((host, port), timeout=timeout)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A send may not block the schedule: a peer that stopped acknowledging
    # fills the send buffer, and the give-up check must still run.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
    return s


def drop(conn, why, out):
    with conn.lock:
        if conn.dead is None:
            conn.dead = why
        lost = list(conn.pending)
        conn.pending.clear()
        why = conn.dead
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.sock.close()
    for t_send, key in lost:
        emit(out, ev="lost", t_send=t_send, key=key, why=why)
    emit(out, ev="disconnected", t=time.time(), why=why)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second")
    ap.add_argument("--duration", type=float, required=True, help="seconds at most")
    ap.add_argument("--stop-file", default=None, help="stop making requests once this file exists")
    ap.add_argument("--keys", type=int, required=True, help="values in the data set")
    ap.add_argument("--zipf", type=float, default=0.99, help="Zipf exponent s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--give-up", type=float, default=5.0,
                    help="drop a connection whose oldest request is unanswered this long (s)")
    ap.add_argument("--connect-timeout", type=float, default=60.0,
                    help="keep trying to make the first connection this long (s)")
    a = ap.parse_args()
    out = threading.Lock()
    zipf = Zipf(a.keys, a.zipf, a.seed)
    sent = 0
    conn = None
    t_start = time.time()
    end = t_start + a.duration
    first_deadline = time.monotonic() + a.connect_timeout
    unsent = 0
    next_t = time.monotonic()
    period = 1.0 / a.rate
    while time.time() < end and not (a.stop_file and os.path.exists(a.stop_file)):
        if conn is None or conn.dead is not None:
            if conn is not None:
                drop(conn, conn.dead, out)
                conn = None
            try:
                conn = Conn(connect(a.host, a.port, 0.5))
            except OSError as e:
                if time.monotonic() > first_deadline and sent == 0:
                    emit(out, ev="error", what=f"no connection: {e}", t=time.time())
                    return 1
                time.sleep(0.1)
                # requests scheduled meanwhile are not made: counted, not timed
                while next_t <= time.monotonic():
                    unsent += 1
                    next_t += period
                continue
            emit(out, ev="connected", t=time.time())
            if unsent:
                emit(out, ev="unsent", t=time.time(), n=unsent)
                unsent = 0
            threading.Thread(target=reader, args=(conn, out), daemon=True).start()
            next_t = max(next_t, time.monotonic())
        now = time.monotonic()
        if next_t > now:
            time.sleep(min(next_t - now, 0.05))
            continue
        with conn.lock:
            oldest = conn.pending[0][0] if conn.pending else None
        if oldest is not None and time.time() - oldest > a.give_up:
            drop(conn, f"no answer for {a.give_up:g} s", out)
            conn = None
            continue
        key = zipf.draw()
        t_send = time.time()
        with conn.lock:
            conn.pending.append((t_send, key))
        try:
            conn.sock.sendall(f"GET {key}\n".encode())
            sent += 1
        except OSError as e:
            with conn.lock:
                if conn.dead is None:
                    conn.dead = str(e)
        next_t += period
    if conn is not None:
        # Answers to the last requests: up to give-up seconds.
        deadline = time.time() + a.give_up
        while time.time() < deadline:
            with conn.lock:
                if not conn.pending or conn.dead:
                    break
            time.sleep(0.02)
        drop(conn, "end of run", out)
    if unsent:
        emit(out, ev="unsent", t=time.time(), n=unsent)
    emit(out, ev="end", t=time.time(), sent=sent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
