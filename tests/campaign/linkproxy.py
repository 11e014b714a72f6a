#!/usr/bin/python3
"""The replication-link proxy of tests/e2e/conftest.py (LinkProxy) as a
process of its own, for the fault campaign: it runs inside B's namespace, in
front of B's listen port, so A's link crosses it.

    linkproxy.py LISTEN_IP TARGET_HOST:PORT

Prints `listening IP:PORT` once ready. SIGUSR1 arms it: the next PAGES or
DEVICE frame from the primary gets one payload byte flipped (its crc32c then
fails on the backup); it prints `corrupted {json}` when it did.
"""

import json
import signal
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import LinkProxy  # noqa: E402


class NsLinkProxy(LinkProxy):
    def __init__(self, listen_ip, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((listen_ip, 0))
        self.lsock.listen(8)
        self.addr = f"{listen_ip}:{self.lsock.getsockname()[1]}"
        self._lock = threading.Lock()
        self._armed = None
        self.corrupted = None
        self.done = threading.Event()
        self.frames = {}
        self._socks = []
        threading.Thread(target=self._accept, daemon=True).start()


def main():
    p = NsLinkProxy(sys.argv[1], sys.argv[2])
    armed = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: armed.set())
    print(f"listening {p.addr}", flush=True)
    while True:
        if armed.wait(0.05):
            armed.clear()
            p.corrupt_next(("PAGES", "DEVICE"), min_epoch=1)
            print("armed", flush=True)
        if p.done.is_set():
            p.done.clear()
            print("corrupted " + json.dumps(p.corrupted), flush=True)


if __name__ == "__main__":
    main()
