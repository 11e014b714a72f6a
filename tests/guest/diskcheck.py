#!/usr/bin/env python3
"""Host-side checker for the records of the test guest's disk writer.

    tests/guest/diskcheck.py [--run-id HEX] [--expect-at-least N]
                             [--payload none|sample|all] [--max-list N] PATH

PATH is a raw disk image or block device (`remus.disk=`), or the `records`
file of a mounted ext4 filesystem (`remus.diskfs=`). Record i lives at byte
i*4096. Layout of one 4096-byte record (little-endian; the writer is
remus-guest.c's run_disk):

    offset  size  field
         0     8  magic  b"RMSDREC1"
         8     8  seq    (= the record's index i)
        16     8  run id (random per boot of the guest)
        24     4  version (1)
        28     4  kind   (1 raw device, 2 file on ext4)
        32     8  write time, guest CLOCK_REALTIME ns (informational)
        40  4052  payload: the first 4052 bytes of the little-endian
                  splitmix64 stream seeded with seq
      4092     4  crc32 (zlib.crc32) of bytes 0..4091

A record is *valid* when magic, crc and seq match and its run id is the
reference run id (--run-id, else the run id of the first record with good
magic, crc and seq). Records of other run ids (left over from an earlier
boot) are counted as "foreign" and treated like missing ones.

Prints one JSON object:

    {"records": N,          # valid records
     "last_seq": n,         # highest valid seq, -1 if none
     "prefix_ok": bool,     # records 0..last_seq all valid (no holes)
     "holes": [...],        # seqs <= last_seq that are not valid
     "corrupt": [...],      # seqs anywhere with a record header (magic) that
                            # fails crc/seq/payload checks
     "foreign": [...], "run_id": "hex", "size": bytes, "slots": n,
     "partial_tail": bytes, # trailing bytes that are not a whole record
     "payload_checked": n, "expect_at_least": N|null, "ok": bool}

Lists are cut at --max-list entries (the *_count fields have the totals).
Invalid records after last_seq (e.g. one torn by a crash) do not make
prefix_ok false; they show in "corrupt". Exit status: 0 if prefix_ok (and
records >= --expect-at-least), 1 if not, 2 on usage or I/O errors.

As a library: check(path, ...) returns the dict; make_record(seq, run_id)
builds a record; classify(buf, seq) checks one.
"""
import argparse
import json
import os
import struct
import sys
import zlib

REC = 4096
HDR = struct.Struct("<8sQQIIQ")  # magic seq run version kind wtime (40 bytes)
PAYLOAD = REC - HDR.size - 4  # 4052
MAGIC = b"RMSDREC1"
MASK = (1 << 64) - 1
ZERO = bytes(REC)


def payload(seq):
    """The 4052 pseudo-random payload bytes of record seq (splitmix64)."""
    s = seq & MASK
    out = []
    for _ in range((PAYLOAD + 7) // 8):
        s = (s + 0x9E3779B97F4A7C15) & MASK
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return struct.pack("<%dQ" % len(out), *out)[:PAYLOAD]


def make_record(seq, run_id, kind=1, wtime=0):
    """A valid record, as the guest writes it (for tests of this checker)."""
    body = HDR.pack(MAGIC, seq, run_id, 1, kind, wtime) + payload(seq)
    return body + struct.pack("<I", zlib.crc32(body))


def parse(buf):
    magic, seq, run, version, kind, wtime = HDR.unpack_from(buf)
    return {"magic": magic, "seq": seq, "run": run, "version": version,
            "kind": kind, "wtime": wtime,
            "crc": struct.unpack_from("<I", buf, REC - 4)[0]}


def classify(buf, seq, check_payload=False):
    """Return (status, run_id): status is "ok", "zero", "short", "garbage"
    (no magic) or "corrupt:<why>" (magic but bad crc/seq/payload)."""
    if len(buf) < REC:
        return "short", None
    if buf[:8] != MAGIC:
        return ("zero" if buf == ZERO else "garbage"), None
    h = parse(buf)
    if zlib.crc32(buf[:REC - 4]) != h["crc"]:
        return "corrupt:crc", None
    if h["seq"] != seq:
        return "corrupt:seq(got=%d)" % h["seq"], None
    if check_payload and buf[HDR.size:REC - 4] != payload(seq):
        return "corrupt:payload", None
    return "ok", h["run"]


def check(path, run_id=None, expect_at_least=None, check_payload="sample",
          max_list=50):
    """Scan PATH from record 0; return the report dict (see module doc)."""
    status = []  # per slot: "ok", "zero", "garbage", "corrupt:<why>"
    runs = []  # per slot: the run id of an "ok" record, else None
    payload_checked = 0
    size = partial = 0
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            buf = f.read(REC)
            size += len(buf)
            if len(buf) < REC:
                partial = len(buf)  # a regular file may end mid-record
                break
            i = len(status)
            full_payload = check_payload == "all" or (
                check_payload == "sample" and i % 64 == 0)
            st, run = classify(buf, i, full_payload)
            if st == "ok" and full_payload:
                payload_checked += 1
            status.append(st)
            runs.append(run)
    if run_id is None:
        run_id = next((r for r in runs if r is not None), None)
    valid = [st == "ok" and r == run_id for st, r in zip(status, runs)]
    last = max((i for i, v in enumerate(valid) if v), default=-1)
    holes = [i for i in range(last + 1) if not valid[i]]
    corrupt = [i for i, st in enumerate(status) if st.startswith("corrupt")]
    foreign = [i for i, (st, r) in enumerate(zip(status, runs))
               if st == "ok" and r != run_id]
    records = sum(valid)
    prefix_ok = not holes
    ok = prefix_ok and (expect_at_least is None or records >= expect_at_least)
    return {
        "path": path,
        "records": records,
        "last_seq": last,
        "prefix_ok": prefix_ok,
        "holes": holes[:max_list], "holes_count": len(holes),
        "corrupt": corrupt[:max_list], "corrupt_count": len(corrupt),
        "corrupt_why": {str(i): status[i] for i in corrupt[:max_list]},
        "foreign": foreign[:max_list], "foreign_count": len(foreign),
        "run_id": None if run_id is None else "%016x" % run_id,
        "size": size,
        "slots": len(status),
        "partial_tail": partial,
        "payload_checked": payload_checked,
        "expect_at_least": expect_at_least,
        "ok": ok,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--run-id", type=lambda s: int(s, 16), default=None,
                    help="reference run id (hex); default: that of the first valid record")
    ap.add_argument("--expect-at-least", type=int, default=None, metavar="N",
                    help="also fail unless at least N valid records")
    ap.add_argument("--payload", choices=("none", "sample", "all"), default="sample",
                    help="compare payloads too: none, every 64th record (default), all (slow: ~0.5 ms/record)")
    ap.add_argument("--max-list", type=int, default=50)
    a = ap.parse_args(argv)
    try:
        r = check(a.path, a.run_id, a.expect_at_least, a.payload, a.max_list)
    except OSError as e:
        print(json.dumps({"path": a.path, "error": str(e), "ok": False}))
        return 2
    print(json.dumps(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
