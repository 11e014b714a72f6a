#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into
tests/fuzz/corpus/<target>/seed-<name> (idempotent: same bytes, same files).

Seeds are small valid inputs: frames, batches, journal files, NBD sessions
built here byte by byte, and slices of the captured QEMU streams in
tests/data (a few records each, re-terminated so they parse). Each target's
corpus is these seeds plus what fuzzing found, minimized (-merge=1); see
scripts/fuzz.sh and docs/reliability.md, "Fuzzing".

  tests/fuzz/make_seeds.py [OUT_DIR]    (default: tests/fuzz/corpus)
"""
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fuzz", "corpus")

# ---- crc32c (Castagnoli), as common/crc32c.h --------------------------------
_T = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    _T.append(c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


u8 = lambda v: struct.pack(">B", v)
u16 = lambda v: struct.pack(">H", v)
u32 = lambda v: struct.pack(">I", v)
u64 = lambda v: struct.pack(">Q", v)


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def page(fill):
    return bytes((fill + i) & 0xFF for i in range(4096))


# ---- QEMU stream ------------------------------------------------------------
def qemu_seeds():
    init = open(os.path.join(ROOT, "tests/data/qemu72-pc-16m.initial"), "rb").read()
    ck = open(os.path.join(ROOT, "tests/data/qemu72-pc-16m.checkpoint"), "rb").read()
    # Header, configuration, commands, ram START (block list, EOS, footer).
    p = 8
    while True:
        t = init[p]
        if t == 0x07:
            p += 5 + struct.unpack(">I", init[p + 1:p + 5])[0]
        elif t == 0x08:
            p += 5 + struct.unpack(">H", init[p + 3:p + 5])[0]
        elif t == 0x01:
            q = p + 5
            q += 1 + init[q]
            q += 8
            v = struct.unpack(">Q", init[q:q + 8])[0]
            q += 8
            total, seen = v & ~0xFFF, 0
            blocks = []
            while seen < total:
                n = init[q]
                name = init[q + 1:q + 1 + n]
                q += 1 + n
                ln = struct.unpack(">Q", init[q:q + 8])[0]
                q += 8
                blocks.append((name, ln))
                seen += ln
            q += 8 + 5  # EOS, footer
            p = q
            break
        else:
            raise SystemExit("unexpected section %x" % t)
    head = init[:p]
    section = struct.unpack(">I", init[p + 1:p + 5])[0]

    def records(buf, q, limit, max_pages):
        """Copies page records from buf[q:] up to EOS: at most limit records, max_pages full pages."""
        out, n, full = b"", 0, 0
        while n < limit:
            v = struct.unpack(">Q", buf[q:q + 8])[0]
            flags = v & 0xFFF
            if flags == 0x10:
                break
            r = q + 8
            if not flags & 0x20:
                r += 1 + buf[r]
            r += 1 if flags & 0x02 else 4096
            if flags & 0x08 and flags & 0x20:  # a full page that names no block may go
                full += 1
                if full > max_pages:
                    q = r
                    continue
            out += buf[q:r]
            q, n = r, n + 1
        return out

    # The first PART section's records (zero pages, then the BIOS's pages).
    recs = records(init, p + 5, 40, 2)
    json_desc = b'{"page_size":4096,"devices":[{"name":"timer","instance_id":0,"vmsd_uid":0,"version":2}]}'
    # The real device tail: after the last footer before the VMDESCRIPTION.
    vd = init.rfind(b"\x00\x06")
    dev_end = vd + 1
    # the FULL sections start after the ram END's footer: find the last 0x7e footer of the ram section
    foot = init.rfind(b"\x7e" + u32(section), 0, vd)
    device = init[foot + 5:dev_end]
    small_device = device[:1500] + b"\x00" if len(device) > 1500 else device

    def initial(recs, device, desc):
        s = head + u8(0x03) + u32(section) + recs + u64(0x10) + u8(0x7E) + u32(section)
        return s + device + u8(0x06) + u32(len(desc)) + desc

    put("fuzz_qemu_stream", "initial-small", b"\x00" + initial(recs, small_device, json_desc))
    put("fuzz_qemu_stream", "initial-chunked", b"\x0a" + initial(records(init, p + 5, 12, 0), small_device, json_desc))
    put("fuzz_qemu_stream", "initial-part", b"\x30" + head + u8(0x02) + u32(section) + records(init, p + 5, 20, 1) + u64(0x10) +
        u8(0x7E) + u32(section) + u8(0x03) + u32(section) + u64(0x10) + u8(0x7E) + u32(section) + small_device +
        u8(0x06) + u32(len(json_desc)) + json_desc)
    put("fuzz_qemu_stream", "initial-head", b"\x00" + init[:4096])
    # Checkpoints: request, vmstate-send, END with a few records, EOF,
    # vmstate-size and the device blob (the real one, cut short).
    q = 8  # after request (1) and vmstate-send (3)
    assert ck[q] == 0x03
    ck_recs = records(ck, q + 5, 12, 1)
    blob_at = ck.rfind(u32(4))
    while True:  # the real vmstate-size: u32 4 then u64 n with n bytes to the end
        n = struct.unpack(">Q", ck[blob_at + 4:blob_at + 12])[0]
        if blob_at + 12 + n == len(ck):
            break
        blob_at = ck.rfind(u32(4), 0, blob_at)
    blob = ck[blob_at + 12:]
    small_blob = blob[:1200] + b"\x00"

    def checkpoint(recs, blob):
        return (u32(1) + u32(3) + u8(0x03) + u32(section) + recs + u64(0x10) + u8(0x7E) + u32(section) + u8(0) +
                u32(4) + u64(len(blob)) + blob)

    put("fuzz_qemu_stream", "checkpoint", b"\x01" + checkpoint(ck_recs, small_blob))
    put("fuzz_qemu_stream", "checkpoint-two", b"\x09" + checkpoint(records(ck, q + 5, 3, 0), small_blob) +
        checkpoint(b"", u8(4) + u8(0)))
    put("fuzz_qemu_stream", "checkpoint-head", b"\x01" + ck[:3000])
    # QEMU 10.0's SWITCHOVER_START (command 11, empty): before the initial
    # stream's ram END, and between vmstate-send and a checkpoint's RAM
    # (tests/data/qemu100-pc-16m.*).
    switchover = u8(0x08) + u16(11) + u16(0)
    put("fuzz_qemu_stream", "initial-switchover", b"\x00" + initial(recs, small_device, json_desc).replace(
        head + u8(0x03), head + switchover + u8(0x03), 1))
    put("fuzz_qemu_stream", "checkpoint-switchover", b"\x01" + u32(1) + u32(3) + switchover +
        checkpoint(ck_recs, small_blob)[8:])


# ---- link frames --------------------------------------------------------------
def frame(t, epoch, payload, flags=0):
    h = u32(0x524D5553) + u16(t) + u16(flags) + u64(epoch) + u32(len(payload))
    return h + u32(crc32c(payload, crc32c(h))) + payload


def page_record(block, offset, data=None):
    return u32(block) + u64(offset | (0 if data else 1)) + (data or b"")


def lz4_literals(raw):
    """An LZ4 block of literals only (valid for any input)."""
    n = len(raw)
    tok = min(n, 15) << 4
    out = bytes([tok])
    if n >= 15:
        m = n - 15
        while m >= 255:
            out += b"\xff"
            m -= 255
        out += bytes([m])
    return u32(n) + out + raw


def disk_record(disk, op, off, length, data=b""):
    return u32(disk) + u8(op) + b"\0\0\0" + u64(off) + u64(length) + data


CONFIG = json.dumps({"accelerator": "kvm", "argv": ["qemu-system-x86_64", "-m", "512"],
                     "disks": [{"file": "/img/a.qcow2", "format": "qcow2", "id": "drive0", "node": "n0",
                                "size": 1073741824}],
                     "domain": "web1", "heartbeat_interval_ms": 200, "heartbeat_timeout_ms": 3000,
                     "interval_ms": 100,
                     "libvirt": {"name": "web1", "uri": "qemu:///system",
                                 "xml": "<domain type='kvm'><name>web1</name></domain>"},
                     "qemu_package": "Debian 1:7.2+dfsg-7", "qemu_version": "7.2.0"},
                    separators=(",", ":")).encode()
SYNC = json.dumps({"blocks": [{"id": "pc.ram", "used_length": 16777216}, {"id": "vga.vram", "used_length": 8388608}],
                   "configuration": "0700000003616263", "total_bytes": 25165824}, separators=(",", ":")).encode()


def link_seeds():
    batch = page_record(0, 0) + page_record(0, 4096, page(7)) + page_record(2, 8192)
    commit = json.dumps({"page_count": 3, "page_bytes": len(batch), "device_bytes": 5, "disk_records": 1}).encode()
    epoch = [frame(6, 0, CONFIG), frame(7, 0, SYNC), frame(8, 1, batch), frame(8, 1, lz4_literals(batch), 2),
             frame(9, 1, b"\x04dev", 1), frame(9, 1, b"\x00"), frame(16, 1, disk_record(0, 1, 512, 4, b"abcd")),
             frame(16, 1, disk_record(0, 2, 0, 4096)), frame(10, 1, commit), frame(11, 1, b""), frame(12, 1, b"")]
    put("fuzz_link", "epoch", b"\x00" + b"".join(epoch))
    put("fuzz_link", "epoch-crcfix", b"\x01" + b"".join(epoch))
    put("fuzz_link", "handshake-until", b"\x06" + frame(1, 0, json.dumps({"version": 1, "domain": "web1",
                                                                        "nonce": "00" * 32}).encode()) +
        frame(5, 0, json.dumps({"code": "UNAUTHENTICATED", "message": "keys differ"}).encode()))
    put("fuzz_link", "unknown-type", b"\x12" + frame(99, 3, b"x") + frame(14, 3, b'{"reason":"bye"}') +
        frame(13, 3, b'{"reason":"QEMU exited"}') + frame(17, 3, b""))
    put("fuzz_link", "progress", b"\x02" + frame(15, 0, b'{"done_bytes":1,"total_bytes":2}') + frame(4, 0, b""))


def page_batch_seeds():
    batch = page_record(0, 0) + page_record(0, 4096, page(1)) + page_record(5, 1 << 20) + page_record(1, 0, page(9))
    put("fuzz_page_batch", "records", b"\x00" + batch)
    put("fuzz_page_batch", "zero-only", b"\x00" + page_record(0, 0) + page_record(0, 4096) + page_record(3, 8192))
    put("fuzz_page_batch", "lz4", b"\x01" + lz4_literals(batch))
    put("fuzz_page_batch", "lz4-small", b"\x05" + lz4_literals(page_record(0, 0) + page_record(1, 4096)))
    put("fuzz_page_batch", "compress", b"\x02" + batch[:600])
    put("fuzz_page_batch", "deferred", b"\x0b" + batch)
    put("fuzz_page_batch", "deferred-zero-target", b"\x03" + batch)


# ---- NBD ------------------------------------------------------------------------
def nbd_opt(opt, data=b""):
    return u64(0x49484156454F5054) + u32(opt) + u32(len(data)) + data


def nbd_go(name=b"", infos=()):
    return u32(len(name)) + name + u16(len(infos)) + b"".join(u16(i) for i in infos)


def nbd_req(typ, off, length, flags=0, payload=b"", cookie=1):
    return u32(0x25609513) + u16(flags) + u16(typ) + u64(cookie) + u64(off) + u32(length) + payload


def nbd_seeds():
    go = u32(3) + nbd_opt(7, nbd_go(b"", (1, 2, 3)))
    cmds = (nbd_req(1, 0, 512, 1, b"w" * 512, 1) + nbd_req(0, 0, 512, 0, b"", 2) + nbd_req(3, 0, 0, 0, b"", 3) +
            nbd_req(4, 512, 512, 0, b"", 4) + nbd_req(6, 1024, 1024, 2, b"", 5) + nbd_req(7, 0, 512, 0, b"", 6) +
            nbd_req(2, 0, 0))
    put("fuzz_nbd", "go-commands", b"\x00" + go + cmds)
    put("fuzz_nbd", "go-blocks", b"\x01" + go + cmds)
    put("fuzz_nbd", "readonly", b"\x02" + go + cmds)
    put("fuzz_nbd", "failing-sink", b"\x14" + go + cmds)
    put("fuzz_nbd", "options", b"\x00" + u32(1) + nbd_opt(3) + nbd_opt(8) + nbd_opt(5) + nbd_opt(6, nbd_go(b"vda", (0,))) +
        nbd_opt(99, b"xyz") + nbd_opt(6, nbd_go(b"nope")) + nbd_opt(2))
    put("fuzz_nbd", "export-name", b"\x00" + u32(1) + nbd_opt(1, b"vda") + nbd_req(0, 4096, 4096) + nbd_req(2, 0, 0))
    put("fuzz_nbd", "empty-export", b"\x03" + u32(3) + nbd_opt(7, nbd_go()) + nbd_req(0, 0, 1) + nbd_req(1, 0, 0))


# ---- journal --------------------------------------------------------------------
def superblock(seq, gen, applied=None, disk_size=8192):
    s = u64(0x524D444A524E4C31) + u32(1) + u32(1 if applied is not None else 0) + u64(seq) + u64(gen) + \
        u64(applied or 0) + u64(disk_size)
    return s + u32(crc32c(s))


def jrecord(typ, gen, epoch, off, length, data=b""):
    h = u32(0x444A5243) + u8(typ) + b"\0\0\0" + u32(length)
    rest = u64(gen) + u64(epoch) + u64(off)
    crc = crc32c(data, crc32c(rest, crc32c(h)))
    return h + u32(crc) + rest + data


def journal_seeds():
    gen = 1
    recs = (jrecord(1, gen, 5, 0, 16, b"0123456789abcdef") + jrecord(2, gen, 5, 4096, 512) +
            jrecord(3, gen, 5, 512, 512) + jrecord(4, gen, 5, 3, 0) +
            jrecord(1, gen, 6, 100, 4, b"wxyz") + jrecord(4, gen, 6, 1, 0) + jrecord(1, gen, 7, 0, 3, b"abc"))
    sb0 = superblock(1, gen)
    # compact layout: slot 0, slot 1, records; bit 3 patches checksums anyway
    put("fuzz_journal", "epochs", b"\x00" + sb0 + b"\0" * 52 + recs)
    put("fuzz_journal", "epochs-fix", b"\x08" + sb0 + b"\0" * 52 + recs)
    put("fuzz_journal", "applied", b"\x00" + superblock(2, 2, applied=4) + superblock(1, 1) +
        jrecord(1, 2, 5, 0, 2, b"hi") + jrecord(4, 2, 5, 1, 0) + jrecord(4, 1, 9, 0, 0))
    put("fuzz_journal", "discard", b"\x04" + sb0 + b"\0" * 52 + recs)
    put("fuzz_journal", "torn", b"\x00" + sb0 + b"\0" * 52 + recs[:-10])
    raw = bytearray(4096)
    raw[0:52] = superblock(1, gen)
    put("fuzz_journal", "raw", b"\x10" + bytes(raw) + recs)
    put("fuzz_journal", "uring", b"\xe0" + sb0 + b"\0" * 52 + recs)
    put("fuzz_journal", "wrong-size", b"\x01" + sb0 + b"\0" * 52 + recs)


# ---- XML, requests, config ------------------------------------------------------------
DOMAIN = b"""<domain type='qemu' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>6f1c2a52-8f1e-4c1a-9d55-7d0f6e1b2a3c</uuid>
  <metadata>
    <remus:protect xmlns:remus="https://remus.dev/xmlns/1" backup="10.0.0.2:7788"/>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <interface type='ethernet'>
      <mac address='52:54:00:77:00:02'/>
      <target dev='rtap0' managed='no'/>
      <model type='virtio'/>
    </interface>
    <interface type="bridge"><mac address="52:54:00:aa:bb:01"/><source bridge="br&amp;0"/><target dev="vnet3"/></interface>
    <!-- a comment --><memballoon model='none'/>
  </devices>
  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>
</domain>
"""


def text_seeds():
    put("fuzz_libvirt_xml", "domain", b"\x00" + DOMAIN)
    put("fuzz_libvirt_xml", "cdata", b"\x00<domain><name><![CDATA[a<b]]></name><devices><interface type='network'>"
        b"<target dev='t&#48;'/></interface></devices></domain>")
    put("fuzz_libvirt_xml", "other-root", b"\x01<?xml version='1.0'?><x a='1'><y/>text</x>")
    put("fuzz_libvirt_xml", "doctype", b"\x00<!DOCTYPE domain [<!ENTITY t 'x'>]><domain>&t;</domain>")
    reqs = {
        "protect": {"op": "protect", "domain": "web1", "qmp": "/run/q.sock", "backup": "10.0.0.2:7788",
                    "interval_ms": 100, "netbuf": "plug", "netbuf_interfaces": ["tap0"], "netbuf_fallback": True,
                    "netbuf_queue_maxlen": 65536, "compress": "lz4", "disks": "all", "async": False,
                    "retry_ms": 30000},
        "status": {"op": "status"},
        "tune": {"op": "tune", "domain": "web1", "interval_ms": 1.5},
        "unprotect": {"op": "unprotect", "domain": "web1", "domain_stopped": True, "nested": {"a": [[1], {"b": None}]}},
    }
    for k, v in reqs.items():
        put("fuzz_request", k, json.dumps(v).encode())
    put("fuzz_request", "escapes", b'{"op":"ping","domain":"w\\u00e9b\\"1","x":-0,"y":1e400}')
    conf = open(os.path.join(ROOT, "scripts/remusd.conf.example"), "rb").read()
    put("fuzz_config", "example", conf)
    put("fuzz_config", "set", b'state-dir = "/srv/remus"\nlisten = "[::1]:7000"\nheartbeat-interval-ms = 50\n'
        b'no-auto-promote = true\narbiter = "none"\netcd-endpoints = "http://a:2379,http://b:2379"\n'
        b'etcd-endpoints2 = 1\n')
    put("fuzz_config", "ini", b"; ini\n[default]\nstate-dir=/x\nlog-level=debug\nlease-ttl-ms=9000\n"
        b"etcd-endpoints=['http://a:1','http://b:2']\n")


def messages_seeds():
    put("fuzz_messages", "config", b"\x00" + CONFIG)
    put("fuzz_messages", "sync-begin", b"\x01" + SYNC)
    put("fuzz_messages", "reason", b"\x02" + b'{"reason":"QEMU exited"}')
    put("fuzz_messages", "resync-offer", b"\x03" + b'{"blocks":[{"id":"pc.ram","used_length":32768},'
        b'{"id":"rom","used_length":8192}],"epoch":7}')
    h = bytes(range(16))
    put("fuzz_messages", "resync-hashes", b"\x04" + struct.pack(">IQ", 0, 2) + h * 3)
    put("fuzz_messages", "keep", b"\x05" + struct.pack(">IQI", 0, 0, 5) + struct.pack(">IQI", 1, 9, 1))
    # Cut 2 (12 + 32 bytes): block 0 in 4 frames of 2 hashes, then block 1.
    frames = b"".join(struct.pack(">IQ", 0, i) + h * 2 for i in (0, 2, 4, 6)) + struct.pack(">IQ", 1, 0) + h * 2
    put("fuzz_messages", "resync-assemble", b"\x06\x01" + frames)


if __name__ == "__main__":
    qemu_seeds()
    link_seeds()
    page_batch_seeds()
    nbd_seeds()
    journal_seeds()
    text_seeds()
    messages_seeds()
