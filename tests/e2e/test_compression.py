"""Compression on the link end to end: with --compress xor-lz4 the primary
sends pages it sent before as their XOR with that version (then LZ4), and the
backup rebuilds them from its committed store. The guest's page checker
(remus.check=1) after a failover is the proof that every rebuilt page is
exact: a page XOR-ed against the wrong version would be torn or stale."""

import time

from conftest import check_promoted, record, setup_protected


def test_xor_lz4_failover_keeps_memory_exact(world, request):
    pr = setup_protected(world, interval_ms=50, wait_epochs=20,
                         protect_extra=("--compress", "xor-lz4", "--xor-cache", "16"))
    s0 = pr.pstatus()
    assert s0["compress"] == "xor-lz4", s0
    time.sleep(3)  # checkpoints with the cache warm
    s1 = pr.pstatus()
    cache = s1["xor_cache"]
    assert cache["capacity_bytes"] == 16 << 20, cache
    assert 0 < cache["bytes"] <= cache["capacity_bytes"], cache
    assert cache["hits"] > 0, f"no page went as an XOR record: {cache}"
    pages = s1["dirty_pages_total"] - s0["dirty_pages_total"]
    wire = s1["link"]["bytes_sent"] - s0["link"]["bytes_sent"]
    assert pages > 1000, (s0, s1)
    per_page = wire / pages
    # The dirtier rewrites three words of each page: a whole page is 4108
    # bytes with its record header; its XOR with the last version compresses
    # to a few dozen.
    assert per_page < 0.2 * 4096, f"{per_page:.0f} wire bytes per dirty page"
    assert pr.bstatus()["compress"] == "xor-lz4", pr.bstatus()

    c0 = pr.acked_reference()
    p_kill = pr.guest.counter()
    pr.guest.kill()
    m = check_promoted(world, pr.backup, c0, p_kill, window_s=10)
    record(request, wire_bytes_per_dirty_page=round(per_page, 1), xor_hits=cache["hits"],
           xor_misses=cache["misses"], xor_cache_bytes=cache["bytes"], failover_ms=m["failover_ms"],
           promoted_epoch=m["epoch"])
