"""The `colo` receiver of bench/run_bench.py: a stock QEMU COLO secondary.

What a QEMU user would run instead of remus: a second QEMU, started with the
guest's own command line and `-incoming`, with the x-colo capability on both
sides, and the primary checkpointing on its x-checkpoint-delay timer (COLO's
periodic mode: no colo-compare, so no checkpoint is forced by diverging
output). Each checkpoint the primary QEMU stops the guest, sends the dirty
pages and the device state, and waits for the secondary's
COLO_MESSAGE_VMSTATE_LOADED; the secondary stops its own copy of the guest,
loads the device state, flushes its RAM cache (the pages it received and the
pages its own running copy dirtied) into guest RAM, and resumes its copy. The
primary's pause covers all of that, measured like every other receiver's: the
primary's QMP STOP/RESUME events.

Nothing here is patched for the bench: the secondary is the same QEMU binary
as the primary (scripts/build-qemu.sh; our patches touch only the primary's
checkpoint path) with QEMU's own COLO code, configured as docs/COLO-FT.txt
describes, minus block replication (the bench guest has no disk) and the
network proxies (periodic mode only).

Two transports:
  tcp   (receiver `colo`) loopback TCP, as COLO-FT.txt deploys it between two
        hosts. QEMU sets no TCP_NODELAY on the migration channel (only
        multifd's channels get it, in 7.2 and 10.0 alike), so the secondary's
        VMSTATE_LOADED, a few bytes written right after VMSTATE_RECEIVED,
        waits in Nagle's algorithm for the primary's delayed ACK of the
        first: about 40 ms on Linux, inside the guest's pause, every
        checkpoint. That is what a stock deployment pays.
  unix  (receiver `colo-unix`, the stricter comparison) a unix socket, which
        has no Nagle: QEMU's own COLO work alone, what a QEMU with the one-line
        fix would pay.

On this 2-core machine the secondary's running copy of the guest competes
with the primary for the CPU; on two hosts it runs on the other host. Its CPU
time is reported (cpu_percent.colo_secondary) so the reader can see it.
"""

import os
import subprocess
import time


class ColoError(Exception):
    pass


class ColoSecondary:
    """A stock QEMU COLO secondary for `guest` (a run_bench.Guest), receiving
    on loopback TCP or a unix socket. qmp_class: run_bench.QMP (passed in, so that this
    module imports nothing from the driver)."""

    def __init__(self, env, workdir, guest, qmp_class, uri):
        """uri: where the secondary listens, tcp:127.0.0.1:PORT or unix:PATH."""
        self.env = env
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.uri = uri
        self.qmp_sock = os.path.join(workdir, "qmp.sock")
        # The guest's own command line (same machine, memory, kernel and
        # option ROMs, so the RAM blocks match), its own serial file and one
        # QMP socket, and -incoming defer: x-colo must be on before the
        # incoming migration starts.
        argv, skip = [], 0
        for a in guest.proc.args:
            if skip:
                skip -= 1
                continue
            if a in ("-qmp", "-serial"):
                skip = 1
                continue
            argv.append(a)
        argv += ["-serial", f"file:{os.path.join(workdir, 'serial.log')}",
                 "-qmp", f"unix:{self.qmp_sock},server=on,wait=off", "-incoming", "defer"]
        self.log = open(os.path.join(workdir, "qemu.log"), "wb")
        self.proc = env.spawn(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = qmp_class(self.qmp_sock)
        self.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
        self.qmp.cmd("migrate-incoming", uri=uri)

    @staticmethod
    def start_primary(primary_qmp, uri, interval_ms, timeout_s=120.0):
        """Turns the guest's QEMU into the COLO primary and waits until it is
        in COLO (the initial copy done). max-bandwidth is lifted as for the
        null sink and remus, so no receiver is throttled by QEMU's default."""
        primary_qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
        primary_qmp.cmd("migrate-set-parameters", **{"x-checkpoint-delay": interval_ms,
                                                     "max-bandwidth": 1 << 40})
        primary_qmp.cmd("migrate", uri=uri)
        deadline = time.monotonic() + timeout_s
        while True:
            st = primary_qmp.cmd("query-migrate")
            if st.get("status") == "colo":
                return
            if st.get("status") in ("failed", "cancelled", "completed"):
                raise ColoError(f"COLO primary: migration {st.get('status')}: {st.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise ColoError(f"COLO primary not in COLO after {timeout_s:g} s (status {st.get('status')})")
            time.sleep(0.05)

    def state(self):
        """The secondary's view at the end: its COLO mode and run state."""
        try:
            return {"colo": self.qmp.cmd("query-colo-status", timeout=5),
                    "status": self.qmp.cmd("query-status", timeout=5).get("status")}
        except Exception as e:  # noqa: BLE001 -- a diagnostic only
            return {"error": str(e)}

    @staticmethod
    def leave(primary_qmp):
        """Ends COLO on the primary the way an operator would when the
        secondary is gone: x-colo-lost-heartbeat, after which the primary's
        guest runs on alone."""
        primary_qmp.cmd("x-colo-lost-heartbeat")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if primary_qmp.cmd("query-migrate").get("status") != "colo":
                return
            time.sleep(0.05)
        raise ColoError("the COLO primary did not leave COLO after x-colo-lost-heartbeat")

    def stop(self):
        try:
            self.qmp.cmd("quit", timeout=5)
        except Exception:  # noqa: BLE001 -- killed below if it lingers
            pass
        self.qmp.close()
        self.env.reap(self.proc)
        self.log.close()
