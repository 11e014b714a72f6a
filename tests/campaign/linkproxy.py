#!/usr/bin/python3
"""The replication-link proxy of tests/e2e/conftest.py (LinkProxy) as a
process of its own, for the fault campaign: it runs inside B's namespace, in
front of B's listen port, so A's link crosses it.

    linkproxy.py LISTEN_IP TARGET_HOST:PORT

Prints `listening IP:PORT` once ready. SIGUSR1 arms it: the next TLS record
of a checkpoint from the primary gets one byte flipped (its authentication
then fails on the backup); it prints `corrupted {json}` when it did.
"""

import json
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import LinkProxy  # noqa: E402


class NsLinkProxy(LinkProxy):
    def __init__(self, listen_ip, target):
        super().__init__(None, target, listen_ip=listen_ip)


def main():
    p = NsLinkProxy(sys.argv[1], sys.argv[2])
    armed = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: armed.set())
    print(f"listening {p.addr}", flush=True)
    while True:
        if armed.wait(0.05):
            armed.clear()
            p.tamper_next("alter")
            print("armed", flush=True)
        if p.done.is_set():
            p.done.clear()
            print("corrupted " + json.dumps(p.corrupted), flush=True)


if __name__ == "__main__":
    main()
