"""N-to-1 (issue 16): one backup remusd holds the page stores of eight
guests at once, half of them hot (locked in its memory) and half paged, and
shows what each takes (status `residency` and `resources`). One guest's
death fails over that guest alone, from a mapped store; the other seven stay
protected and keep committing checkpoints."""

from conftest import check_promoted, record

N = 8
MEM_MB = 256  # the counter's reserved page is at 64 or 128 MiB (conftest.COUNTER_GPA)


def test_one_backup_protects_eight_guests(world, request):
    backup = world.start_backup()
    primary = world.start_primary()
    guests = [world.start_guest(name=f"g{i}", mem_mb=MEM_MB, wss_mib=16, dirty=2000, wait_boot=False)
              for i in range(N)]
    for g in guests:
        world.wait_booted(g)
    policy = {f"vm{i}": "hot" if i % 2 == 0 else "paged" for i in range(N)}
    for i, g in enumerate(guests):
        world.protect(primary, backup, g, interval_ms=200, domain=f"vm{i}",
                      extra=["--residency", policy[f"vm{i}"]])
    for i in range(N):
        world.wait_status(primary, lambda s: s["last_acked_epoch"] >= 10, 180, f"vm{i} acked >= 10",
                          domain=f"vm{i}")

    rows = {d: backup.status(domain=d) for d in policy}
    locked_total = 0
    for d, st in rows.items():
        assert st["state"] == "protected", (d, st) + world.diagnostics()
        r, res = st["residency"], st["resources"]
        assert r["policy"] == policy[d], (d, r)
        assert r["total_bytes"] >= MEM_MB << 20, (d, r)
        if policy[d] == "hot":
            assert r["locked_bytes"] == r["total_bytes"] and r["resident_percent"] == 100.0, (d, r)
        else:
            assert r["locked_bytes"] == 0, (d, r)
        assert res["memory"]["locked_bytes"] == r["locked_bytes"], (d, res)
        assert res["disk"]["store_bytes"] == r["total_bytes"], (d, res)
        assert res["threads"] == {"session": 3, "apply": 1}, (d, res)
        assert st["restore_plan"]["mode"] == "mapped", (d, st["restore_plan"])
        locked_total += r["locked_bytes"]
    assert locked_total == sum(rows[d]["residency"]["total_bytes"] for d in policy if policy[d] == "hot")

    # One guest dies: its domain alone fails over.
    victim = "vm3"
    g = guests[3]
    c0 = g.counter()
    e0 = primary.status(domain=victim)["last_staged_epoch"]
    world.wait_status(primary, lambda s: s["last_acked_epoch"] > e0, 30, f"{victim} acked beyond {e0}",
                      domain=victim)
    before = {d: backup.status(domain=d)["last_committed_epoch"] for d in policy if d != victim}
    p_kill = g.counter()
    g.kill()
    m = check_promoted(world, backup, c0, p_kill, window_s=3, domain=victim)
    assert backup.status(domain=victim, role="backup")["promotion"]["restored_by"]["mode"] == "mapped"
    for d, e in before.items():
        world.wait_status(backup, lambda s, e=e: s["state"] == "protected" and s["last_committed_epoch"] >= e + 5,
                          60, f"{d} to keep committing after {victim} failed over", domain=d)
    record(request, failover_ms=m["failover_ms"], locked_bytes=locked_total,
           committed_before={d: e for d, e in before.items()})
