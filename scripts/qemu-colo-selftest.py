#!/usr/bin/env python3
"""Prove that a QEMU binary's COLO primary checkpoints indefinitely under TCG.

Starts QEMU (-accel tcg) with a tiny guest, turns on the x-colo migration
capability (return-path stays off), migrates to a unix socket this script
listens on, and acts as a stand-in COLO secondary following
docs/design qemu-colo-stream.md:

  initial stream: magic, version, CONFIGURATION, COMMAND ENABLE_COLO,
                  START/PART/END ram (page records parsed), FULL device
                  sections (no lengths: found by the EOF + VMDESCRIPTION
                  framing 00 06 <be32 L> <L bytes JSON>)
  we send checkpoint-ready (0)
  per checkpoint: <- request (1), -> reply (2), <- vmstate-send (3),
                  [<- COMMAND SWITCHOVER_START (QEMU >= 10.0)]
                  <- END ram page records, EOS, footer, 00,
                  <- vmstate-size (4) be64 N, <- N bytes of device state,
                  -> received (5), -> loaded (6)

The guest is a 512-byte boot sector on a virtio-blk disk that increments a
16-bit counter at the start of each 4 KiB page of guest-physical
0x10000-0x8ffff forever, so every checkpoint carries ~128 dirty pages.  The
receiver keeps those counters as the stream delivers them and, every
--verify-every checkpoints while the guest is stopped, compares them with the
primary's RAM (QMP pmemsave): a QEMU that checkpoints but loses dirty pages
(7.2 TCG without patch 0002) fails here, and one that deadlocks on the BQL
(7.2 TCG without patch 0001) fails because QMP no longer answers.
--stall-test additionally stops reading in the middle of a checkpoint and
checks the recovery path: OOB `yank` of the migration channel, then
x-colo-lost-heartbeat.

After --count checkpoints it runs x-colo-lost-heartbeat and checks that the
guest runs again (query-status "running", query-migrate "completed" and the
guest counter still advancing).  Success: exit 0 and one JSON line on stdout.
Failure (including not reaching --count before --timeout): exit 1 with a
message saying how many checkpoints were seen and where it stalled.

stdlib only.  Usage:
  qemu-colo-selftest.py --qemu /var/cache/remus/qemu-7.2-colo/bin/qemu-system-x86_64
  qemu-colo-selftest.py --qemu /usr/bin/qemu-system-x86_64 --count 10 --timeout 20
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

# ---------------------------------------------------------------- constants
QEVM_MAGIC = 0x5145564D
QEVM_VERSION = 3

SEC_EOF = 0x00
SEC_START = 0x01
SEC_PART = 0x02
SEC_END = 0x03
SEC_FULL = 0x04
SEC_SUBSECTION = 0x05
SEC_VMDESCRIPTION = 0x06
SEC_CONFIGURATION = 0x07
SEC_COMMAND = 0x08
SEC_FOOTER = 0x7E

CMD_ENABLE_COLO = 8
CMD_SWITCHOVER_START = 11      # QEMU >= 10.0: empty, before device state (initial) and per checkpoint

COLO_CHECKPOINT_READY = 0
COLO_CHECKPOINT_REQUEST = 1
COLO_CHECKPOINT_REPLY = 2
COLO_VMSTATE_SEND = 3
COLO_VMSTATE_SIZE = 4
COLO_VMSTATE_RECEIVED = 5
COLO_VMSTATE_LOADED = 6

RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_KNOWN = RAM_ZERO | RAM_MEM_SIZE | RAM_PAGE | RAM_EOS | RAM_CONTINUE
PAGE_SIZE = 4096
FLAG_MASK = 0xFFF

# The guest: real-mode boot sector.
#   cli; xor ax,ax; mov ss,ax; mov sp,0x7c00
# outer:    mov bx,0x1000
# seg:      mov es,bx; xor di,di; mov cx,16
# page:     inc word [es:di]; add di,0x1000; loop page
#           add bx,0x1000; cmp bx,0x9000; jb seg; jmp outer
BOOT_CODE = bytes([
    0xFA, 0x31, 0xC0, 0x8E, 0xD0, 0xBC, 0x00, 0x7C,
    0xBB, 0x00, 0x10,
    0x8E, 0xC3, 0x31, 0xFF, 0xB9, 0x10, 0x00,
    0x26, 0xFF, 0x05, 0x81, 0xC7, 0x00, 0x10, 0xE2, 0xF7,
    0x81, 0xC3, 0x00, 0x10, 0x81, 0xFB, 0x00, 0x90, 0x72, 0xE6,
    0xEB, 0xE1,
])
COUNTER_GPA = 0x10000          # first counter, inside pc.ram (offset == GPA below 640K)
COUNTER_END = 0x90000          # the guest increments the first word of every page below this
MAIN_RAM_BLOCK = b"pc.ram"


class SelftestError(Exception):
    pass


class Stalled(SelftestError):
    pass


def log(msg):
    print(f"[colo-selftest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- QMP
class QMP:
    def __init__(self, path, timeout, proc=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc is not None and proc.poll() is not None:
                    raise SelftestError(f"QEMU exited with status {proc.returncode} at startup")
                if time.monotonic() > deadline:
                    raise SelftestError(f"QMP socket {path} did not come up")
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        self.replies = {}
        self.next_id = 0
        greeting = self._read_msg(timeout)
        if "QMP" not in greeting:
            raise SelftestError(f"unexpected QMP greeting {greeting}")
        # Out-of-band execution (for `yank`, which works without the BQL).
        self.oob = "oob" in greeting["QMP"].get("capabilities", [])
        if self.oob:
            self.cmd("qmp_capabilities", enable=["oob"])
        else:
            self.cmd("qmp_capabilities")

    def _read_msg(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stalled("QMP did not answer")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Stalled("QMP did not answer") from None
            if not chunk:
                raise SelftestError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, name, oob=False, **args):
        """Send a command without waiting; returns its id."""
        self.next_id += 1
        msg = {"exec-oob" if oob else "execute": name, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return self.next_id

    def wait(self, cmd_id, name, timeout=10.0):
        if cmd_id in self.replies:
            resp = self.replies.pop(cmd_id)
        else:
            deadline = time.monotonic() + timeout
            while True:
                resp = self._read_msg(max(0.0, deadline - time.monotonic()))
                if "event" in resp:
                    self.events.append(resp)
                    continue
                if resp.get("id") != cmd_id:
                    self.replies[resp.get("id")] = resp   # a late reply to another command
                    continue
                break
        if "error" in resp:
            raise SelftestError(f"QMP {name} failed: {resp['error']}")
        return resp["return"]

    def cmd(self, name, timeout=10.0, oob=False, **args):
        return self.wait(self.send(name, oob=oob, **args), name, timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------ stream reader
class Reader:
    """Exact-length reads from the migration socket with a global deadline."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.pos = 0
        self.total = 0          # bytes consumed
        self.step = "start"     # what we are waiting for (for stall reports)

    def _fill(self, need):
        while len(self.buf) - self.pos < need:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Stalled(f"no data while waiting for {self.step}")
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise SelftestError(f"migration socket closed by QEMU while waiting for {self.step}")
            if self.pos > (1 << 20):
                del self.buf[:self.pos]
                self.pos = 0
            self.buf += chunk

    def read(self, n):
        self._fill(n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        self.total += n
        return out

    def skip(self, n):
        self._fill(n)
        self.pos += n
        self.total += n

    def u8(self):
        self._fill(1)
        v = self.buf[self.pos]
        self.pos += 1
        self.total += 1
        return v

    def be16(self):
        return struct.unpack(">H", self.read(2))[0]

    def be32(self):
        return struct.unpack(">I", self.read(4))[0]

    def be64(self):
        return struct.unpack(">Q", self.read(8))[0]

    def idstr(self):
        return self.read(self.u8())

    def pending(self):
        """Bytes already received but not consumed."""
        return bytes(self.buf[self.pos:])

    def recv_some(self, timeout):
        """Receive whatever arrives within timeout (used for the device tail)."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except socket.timeout:
            return None
        if not chunk:
            raise SelftestError(f"migration socket closed by QEMU while waiting for {self.step}")
        self.buf += chunk
        return chunk

    def consume_all(self):
        n = len(self.buf) - self.pos
        self.pos = len(self.buf)
        self.total += n


# --------------------------------------------------------------- the parser
class ColoReceiver:
    def __init__(self, rd, sock):
        self.rd = rd
        self.sock = sock
        self.ram_section_id = None
        self.blocks = {}          # idstr -> used_length
        self.cur_block = None     # persists across sections and checkpoints
        self.counter_value = None
        self.counter_updates = 0
        self.image = {}           # pc.ram page offset -> first u16, for the counter pages
        self.device_names = []
        self.pages = 0
        self.zero_pages = 0

    def send(self, value):
        self.sock.sendall(struct.pack(">I", value))

    def expect_msg(self, want, name):
        self.rd.step = name
        got = self.rd.be32()
        if got != want:
            raise SelftestError(f"expected COLO message {want} ({name}), got {got}")

    # -- ram -----------------------------------------------------------
    def ram_records(self):
        """Page records up to and including EOS. Returns pages seen."""
        rd = self.rd
        n = 0
        while True:
            word = rd.be64()
            flags = word & FLAG_MASK
            addr = word & ~FLAG_MASK
            if flags & ~RAM_KNOWN:
                raise SelftestError(f"unsupported RAM flags {flags:#x} at stream byte {rd.total}")
            if flags & RAM_MEM_SIZE:
                total = addr
                seen = 0
                while seen < total:
                    name = rd.idstr()
                    length = rd.be64()
                    self.blocks[name] = length
                    seen += length
                if seen != total:
                    raise SelftestError(f"RAM block list sums to {seen}, header says {total}")
                continue
            if flags & RAM_EOS:
                return n
            if flags & (RAM_ZERO | RAM_PAGE):
                if not flags & RAM_CONTINUE:
                    name = rd.idstr()
                    if name not in self.blocks:
                        raise SelftestError(f"page for unknown RAM block {name!r}")
                    self.cur_block = name
                elif self.cur_block is None:
                    raise SelftestError("CONTINUE page record before any block was named")
                if addr >= self.blocks[self.cur_block]:
                    raise SelftestError(f"page offset {addr:#x} beyond block {self.cur_block!r}")
                if flags & RAM_ZERO:
                    fill = rd.u8()
                    if fill != 0:
                        raise SelftestError(f"ZERO page with fill byte {fill}")
                    self.zero_pages += 1
                    data = None
                else:
                    data = rd.read(PAGE_SIZE)
                    self.pages += 1
                if self.cur_block == MAIN_RAM_BLOCK and COUNTER_GPA <= addr < COUNTER_END:
                    value = 0 if data is None else struct.unpack_from("<H", data, 0)[0]
                    self.image[addr] = value
                    if addr == COUNTER_GPA:
                        if self.counter_value is not None and value != self.counter_value:
                            self.counter_updates += 1
                        self.counter_value = value
                n += 1
                continue
            raise SelftestError(f"RAM record without page/EOS flags: {word:#x}")

    def footer(self, section_id):
        t = self.rd.u8()
        if t != SEC_FOOTER:
            raise SelftestError(f"expected section footer 0x7e, got {t:#x} at stream byte {self.rd.total}")
        sid = self.rd.be32()
        if sid != section_id:
            raise SelftestError(f"footer for section {sid}, expected {section_id}")

    # -- initial stream --------------------------------------------------
    def initial_stream(self):
        rd = self.rd
        rd.step = "stream header"
        magic, version = rd.be32(), rd.be32()
        if magic != QEVM_MAGIC or version != QEVM_VERSION:
            raise SelftestError(f"bad stream header {magic:#x} v{version}")
        colo_enabled = False
        info = {}
        while True:
            rd.step = "initial stream section"
            t = rd.u8()
            if t == SEC_CONFIGURATION:
                info["machine"] = rd.read(rd.be32()).decode()
            elif t == SEC_COMMAND:
                cmd, length = rd.be16(), rd.be16()
                rd.skip(length)
                if cmd == CMD_ENABLE_COLO:
                    colo_enabled = True
                elif cmd == CMD_SWITCHOVER_START and length == 0:
                    info["switchover_start"] = True
                else:
                    raise SelftestError(f"unexpected command {cmd} in initial stream "
                                        "(return-path on?)")
            elif t == SEC_START:
                sid = rd.be32()
                name = rd.idstr()
                rd.be32()  # instance
                rd.be32()  # version
                if name != b"ram":
                    raise SelftestError(f"unexpected iterable section {name!r}")
                self.ram_section_id = sid
                self.ram_records()
                self.footer(sid)
            elif t in (SEC_PART, SEC_END):
                sid = rd.be32()
                if sid != self.ram_section_id:
                    raise SelftestError(f"PART/END for section {sid}, not ram")
                self.ram_records()
                self.footer(sid)
                if t == SEC_END:
                    break
            else:
                raise SelftestError(f"unexpected section type {t:#x} in initial stream")
        if not colo_enabled:
            raise SelftestError("initial stream had no ENABLE_COLO command")
        info["ram_blocks"] = {k.decode(): v for k, v in self.blocks.items()}
        info.update(self.device_tail())
        return info

    def device_tail(self):
        """FULL device sections, EOF, VMDESCRIPTION. Found by the trailing framing."""
        rd = self.rd
        rd.step = "device sections + VMDESCRIPTION of the initial stream"
        deadline = rd.deadline
        while True:
            data = rd.pending()
            if data.endswith(b"}"):
                found = find_vmdesc(data)
                if found is not None:
                    eof_pos, desc = found
                    break
            if time.monotonic() > deadline:
                raise Stalled(f"no data while waiting for {rd.step}")
            rd.recv_some(min(1.0, max(0.01, deadline - time.monotonic())))
        devices = desc.get("devices", [])
        self.device_names = [d.get("name") for d in devices]
        # Check the first FULL header against the description.
        body = data[:eof_pos]
        if devices:
            if body[0] != SEC_FULL:
                raise SelftestError(f"device area starts with {body[0]:#x}, not FULL")
            n = body[5]
            first = body[6:6 + n].decode(errors="replace")
            if first != devices[0].get("name"):
                raise SelftestError(f"first device section {first!r} but VMDESCRIPTION says "
                                    f"{devices[0].get('name')!r}")
            if body[-5] != SEC_FOOTER:
                raise SelftestError("device area does not end in a section footer")
        rd.consume_all()
        return {"initial_stream_bytes": rd.total, "device_sections": len(devices),
                "device_bytes": eof_pos}

    # -- checkpoints -------------------------------------------------------
    def checkpoint(self, verify=None):
        """One checkpoint. verify(receiver) runs while the guest is stopped,
        after all of this checkpoint's data arrived and before we ack it."""
        rd = self.rd
        self.expect_msg(COLO_CHECKPOINT_REQUEST, "checkpoint-request")
        self.send(COLO_CHECKPOINT_REPLY)
        self.expect_msg(COLO_VMSTATE_SEND, "vmstate-send")
        rd.step = "ram END section"
        t = rd.u8()
        if t == SEC_COMMAND:           # QEMU >= 10.0: SWITCHOVER_START first
            cmd, length = rd.be16(), rd.be16()
            if cmd != CMD_SWITCHOVER_START or length != 0:
                raise SelftestError(f"checkpoint: unexpected command {cmd} ({length} bytes)")
            t = rd.u8()
        if t != SEC_END:
            raise SelftestError(f"checkpoint: expected ram END section, got type {t:#x}")
        sid = rd.be32()
        if sid != self.ram_section_id:
            raise SelftestError(f"checkpoint: END for section {sid}, not ram ({self.ram_section_id})")
        pages = self.ram_records()
        self.footer(sid)
        t = rd.u8()
        if t != SEC_EOF:
            raise SelftestError(f"checkpoint: expected EOF after ram END, got {t:#x}")
        self.expect_msg(COLO_VMSTATE_SIZE, "vmstate-size")
        size = rd.be64()
        rd.step = f"device state ({size} bytes)"
        blob = rd.read(size)
        if size < 2 or blob[0] != SEC_FULL or blob[-1] != SEC_EOF:
            raise SelftestError(f"checkpoint: device blob of {size} bytes is not FULL ... EOF")
        if self.device_names:
            n = blob[5]
            first = blob[6:6 + n].decode(errors="replace")
            if first != self.device_names[0]:
                raise SelftestError(f"checkpoint: first device {first!r}, expected {self.device_names[0]!r}")
        if verify is not None:
            verify(self)
        self.send(COLO_VMSTATE_RECEIVED)
        self.send(COLO_VMSTATE_LOADED)
        return pages, size


def find_vmdesc(data):
    """Locate `00 06 <be32 L> <L bytes JSON>` ending exactly at the end of data.

    Returns (offset of the EOF byte, parsed JSON) or None."""
    start = 0
    while True:
        p = data.find(b"\x00\x06", start)
        if p < 0 or p + 6 > len(data):
            return None
        (length,) = struct.unpack_from(">I", data, p + 2)
        if p + 6 + length == len(data):
            try:
                desc = json.loads(data[p + 6:])
            except ValueError:
                desc = None
            if isinstance(desc, dict) and "devices" in desc:
                return p, desc
        start = p + 1


# ----------------------------------------------------------------- the run
def make_disk(path):
    sector = bytearray(512)
    sector[:len(BOOT_CODE)] = BOOT_CODE
    sector[510:512] = b"\x55\xAA"
    with open(path, "wb") as f:
        f.write(sector)
        f.write(bytes(1024 * 1024 - 512))   # SeaBIOS cannot read a tiny (64 KiB) disk


def qemu_argv(args, tmp):
    return [args.qemu,
            "-machine", "pc", "-accel", "tcg", "-m", "64",
            "-nodefaults", "-nographic", "-vga", "none",
            "-chardev", f"socket,id=qmp,path={tmp}/qmp.sock,server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-drive", f"if=none,id=d0,file={tmp}/boot.img,format=raw",
            "-device", "virtio-blk-pci,drive=d0,bootindex=0",
            "-netdev", "hubport,id=n0,hubid=0",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", "none", "-monitor", "none"]


def verify_image(qmp, rx, tmp, number):
    """Compare the counters our stream image holds with the stopped guest's RAM.

    Catches a primary that checkpoints but does not send every dirty page
    (QEMU 7.2 TCG without the dirty-tracking fix)."""
    path = f"{tmp}/pmem.bin"
    try:
        qmp.cmd("pmemsave", val=COUNTER_GPA, size=COUNTER_END - COUNTER_GPA, filename=path)
    except Stalled:
        raise Stalled(f"checkpoint {number}: QMP unresponsive while the guest is stopped for the "
                      "checkpoint: the main loop cannot take the BQL (the known TCG COLO deadlock "
                      "of QEMU 7.2-10.x: BQL not held around qemu_savevm_live_state)") from None
    with open(path, "rb") as f:
        mem = f.read()
    bad = []
    for off in range(COUNTER_GPA, COUNTER_END, PAGE_SIZE):
        want = struct.unpack_from("<H", mem, off - COUNTER_GPA)[0]
        got = rx.image.get(off)
        if got != want:
            bad.append((off, got, want))
    if bad:
        off, got, want = bad[0]
        raise SelftestError(f"checkpoint {number}: {len(bad)} of "
                            f"{(COUNTER_END - COUNTER_GPA) // PAGE_SIZE} counter pages differ from the "
                            f"stopped guest (first: pc.ram+{off:#x} stream {got} guest {want}); "
                            "the primary does not send all dirty pages")


def stall_test(qmp, rx):
    """Stop reading in the middle of a checkpoint and recover with yank."""
    rx.expect_msg(COLO_CHECKPOINT_REQUEST, "checkpoint-request (stall test)")
    rx.send(COLO_CHECKPOINT_REPLY)
    rx.expect_msg(COLO_VMSTATE_SEND, "vmstate-send (stall test)")
    # ~129 dirty pages (> 500 KiB) do not fit the socket buffers: QEMU blocks in
    # write() inside qemu_savevm_live_state(), holding the BQL (patch 0001).
    time.sleep(1.0)
    out = {}
    t0 = time.monotonic()
    qid = qmp.send("query-status")
    try:
        qmp.wait(qid, "query-status", timeout=3.0)
        out["inband_qmp_while_stalled"] = "answered"
    except Stalled:
        out["inband_qmp_while_stalled"] = "blocked"
    log(f"stall test: in-band QMP while QEMU is blocked writing RAM: "
        f"{out['inband_qmp_while_stalled']}")
    if not qmp.oob:
        raise SelftestError("stall test: QMP offers no OOB capability, cannot yank")
    t1 = time.monotonic()
    qmp.cmd("yank", oob=True, timeout=5.0, instances=[{"type": "migration"}])
    out["yank_s"] = round(time.monotonic() - t1, 3)
    if out["inband_qmp_while_stalled"] == "blocked":
        st = qmp.wait(qid, "query-status", timeout=10.0)   # the queued in-band command
        out["inband_qmp_after_yank"] = st.get("status")
    out["recovered_after_s"] = round(time.monotonic() - t0, 3)
    log(f"stall test: {out}")
    return out


def guest_counter(qmp):
    out = qmp.cmd("human-monitor-command", **{"command-line": f"xp /1hx {COUNTER_GPA:#x}"})
    # "0000000000010000: 0x1234"
    return int(out.strip().split()[-1], 16)


def _die_with_parent():
    """In the QEMU child: get SIGKILL when this script dies, so a killed test
    does not leave a (possibly deadlocked, SIGTERM-deaf) QEMU behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--count", type=int, default=1000, help="checkpoints to see (default 1000)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds from `migrate` until --count checkpoints (default 600)")
    ap.add_argument("--delay", type=int, default=20, help="x-checkpoint-delay ms (default 20)")
    ap.add_argument("--verify-every", type=int, default=10, metavar="N",
                    help="every N checkpoints compare the received RAM image with the stopped "
                         "guest's memory (pmemsave); 0 = never (default 10)")
    ap.add_argument("--stall-test", action="store_true",
                    help="after --count checkpoints, stop reading in the middle of a checkpoint's "
                         "RAM and check how QEMU recovers: in-band QMP blocks while the COLO "
                         "thread writes RAM under the BQL; OOB `yank` frees it; then "
                         "x-colo-lost-heartbeat resumes the guest")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (QEMU log, sockets)")
    args = ap.parse_args()
    # SIGTERM (e.g. from `timeout`) runs the cleanup in the finally block below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not os.access(args.qemu, os.X_OK):
        print(f"FAIL: {args.qemu} is not executable", file=sys.stderr)
        return 1

    tmp = tempfile.mkdtemp(prefix="colo-selftest-")
    make_disk(f"{tmp}/boot.img")
    qemu_log = open(f"{tmp}/qemu.log", "wb")
    argv = qemu_argv(args, tmp)
    log("starting " + " ".join(argv))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
                            start_new_session=True, preexec_fn=_die_with_parent)
    qmp = None
    lsock = conn = None
    seen = 0
    result = None
    stage = "startup"
    t_migrate = None
    try:
        qmp = QMP(f"{tmp}/qmp.sock", 15.0, proc)
        ver = qmp.cmd("query-version")
        q = ver["qemu"]
        version = f"{q['major']}.{q['minor']}.{q['micro']}"
        package = ver.get("package", "").strip()
        log(f"QEMU {version} {package}")
        caps = {c["capability"]: c["state"] for c in qmp.cmd("query-migrate-capabilities")}
        if "x-colo" not in caps:
            raise SelftestError("this QEMU has no x-colo capability")
        if caps.get("return-path"):
            raise SelftestError("return-path is on; it must stay off")
        qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-colo", "state": True}])
        qmp.cmd("migrate-set-parameters", **{"x-checkpoint-delay": args.delay})

        # Let the guest boot and start dirtying memory.
        deadline = time.monotonic() + 15
        c0 = guest_counter(qmp)
        while guest_counter(qmp) == c0:
            if time.monotonic() > deadline:
                raise SelftestError("guest counter does not move: boot sector not running")
            time.sleep(0.1)

        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(f"{tmp}/mig.sock")
        lsock.listen(1)
        stage = "migrate"
        t_migrate = time.monotonic()
        deadline = t_migrate + args.timeout
        qmp.cmd("migrate", uri=f"unix:{tmp}/mig.sock")
        lsock.settimeout(10)
        conn, _ = lsock.accept()
        rd = Reader(conn, deadline)
        rx = ColoReceiver(rd, conn)

        stage = "initial stream"
        info = rx.initial_stream()
        t_init = time.monotonic() - t_migrate
        log(f"initial stream: {info['initial_stream_bytes']} bytes, machine {info.get('machine')}, "
            f"{len(info['ram_blocks'])} RAM blocks, {info['device_sections']} device sections, "
            f"{t_init:.2f}s")
        rx.send(COLO_CHECKPOINT_READY)

        stage = "checkpoints"
        t_first = time.monotonic()
        t_last = t_first
        total_pages = 0
        max_dev = 0
        verified = 0

        def verify(r):
            nonlocal verified
            verify_image(qmp, r, tmp, seen + 1)
            verified += 1

        while seen < args.count:
            check = args.verify_every > 0 and (seen % args.verify_every == 0
                                               or seen + 1 == args.count)
            pages, dev = rx.checkpoint(verify if check else None)
            seen += 1
            t_last = time.monotonic()
            total_pages += pages
            max_dev = max(max_dev, dev)
            if seen == 1 or seen % 100 == 0:
                log(f"checkpoint {seen}: {pages} pages, {dev} device bytes, "
                    f"counter {rx.counter_value}")
        t_cp = time.monotonic() - t_first

        stall = None
        if args.stall_test:
            stage = "stall test"
            stall = stall_test(qmp, rx)

        stage = "failover"
        st = qmp.cmd("query-status")
        qmp.cmd("x-colo-lost-heartbeat")
        # QEMU shuts the migration socket down; drain it until EOF.
        conn.settimeout(0.2)
        drain_deadline = time.monotonic() + 10
        mig_status = None
        while time.monotonic() < drain_deadline:
            try:
                if not conn.recv(65536):
                    break
            except socket.timeout:
                pass
            except OSError:
                break
        while time.monotonic() < drain_deadline:
            st = qmp.cmd("query-status")
            mig_status = qmp.cmd("query-migrate").get("status")
            if st.get("status") == "running" and mig_status == "completed":
                break
            time.sleep(0.1)
        if st.get("status") != "running":
            raise SelftestError(f"guest not running after x-colo-lost-heartbeat: {st}")
        if mig_status != "completed":
            raise SelftestError(f"query-migrate status {mig_status!r} after x-colo-lost-heartbeat")
        c1 = guest_counter(qmp)
        time.sleep(0.3)
        c2 = guest_counter(qmp)
        if c1 == c2:
            raise SelftestError("guest counter stopped after x-colo-lost-heartbeat")
        colo_exit = [e for e in qmp.events if e.get("event") == "COLO_EXIT"]

        if rx.counter_updates < seen // 2:
            raise SelftestError(f"guest counter page changed in only {rx.counter_updates} of "
                                f"{seen} checkpoints")
        result = {
            "result": "pass",
            "checkpoints": seen,
            "elapsed_s": round(time.monotonic() - t_migrate, 2),
            "initial_stream_s": round(t_init, 2),
            "checkpoint_phase_s": round(t_cp, 2),
            "checkpoints_per_s": round(seen / t_cp, 1) if t_cp > 0 else None,
            "x_checkpoint_delay_ms": args.delay,
            "dirty_pages_total": total_pages,
            "counter_page_updates": rx.counter_updates,
            "ram_image_verified": verified,
            "max_device_state_bytes": max_dev,
            "device_sections": info["device_sections"],
            "stall_test": stall,
            "after_failover": {"status": st.get("status"), "migrate": mig_status,
                               "colo_exit": colo_exit[0]["data"] if colo_exit else None},
            "qemu": args.qemu,
            "qemu_version": version,
            "qemu_package": package,
        }
    except SelftestError as e:
        elapsed = time.monotonic() - t_migrate if t_migrate else 0.0
        kind = "TIMEOUT" if isinstance(e, Stalled) else "FAIL"
        print(f"{kind}: {e}", file=sys.stderr)
        print(f"{kind}: saw {seen} of {args.count} checkpoints in {elapsed:.1f}s "
              f"(stage: {stage}, qemu: {args.qemu})", file=sys.stderr)
        if stage == "checkpoints" and qmp is not None:
            try:
                st = qmp.cmd("query-status", timeout=3)
                print(f"{kind}: QMP still answers, status {st.get('status')}", file=sys.stderr)
            except SelftestError as e2:
                print(f"{kind}: QMP unresponsive ({e2}): main loop cannot take the BQL "
                      "(the known TCG COLO deadlock of QEMU 7.2-10.x, scripts/qemu-patches*/)", file=sys.stderr)
        print(json.dumps({"result": "fail", "checkpoints": seen,
                          "elapsed_s": round(elapsed, 2), "stage": stage,
                          "error": str(e), "qemu": args.qemu}))
    finally:
        for s in (conn, lsock):
            if s is not None:
                s.close()
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        qemu_log.close()
        if result is None:
            try:
                with open(f"{tmp}/qemu.log", "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace").strip()
                if tail:
                    print("QEMU log tail:\n" + tail, file=sys.stderr)
            except OSError:
                pass
        if args.keep or result is None and os.environ.get("COLO_SELFTEST_KEEP"):
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if result is None:
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
