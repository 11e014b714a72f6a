"""The arbiter world itself (arbiter_world.py, the `arbiter_net` fixture):
before arbitration tests and the fault campaign rely on it, show that the
etcd cluster works, that partitions are blackholes in the directions asked
for and nowhere else, that heal() undoes them, and that etcd survives the
crashes and pauses the campaign will inject.

Needs root and etcd, not the remus build or QEMU (marker no_build).
"""

import base64
import os
import subprocess
import time
from pathlib import Path

import pytest

from arbiter_world import ALL_HOSTS, ETCD_MEMBERS, ArbiterNet, b64

pytestmark = pytest.mark.no_build


def _assert_everyone_reaches_everyone(net):
    bad = {h: [d for d, ok in r.items() if not ok] for h, r in net.reach_matrix().items()}
    bad = {h: ds for h, ds in bad.items() if ds}
    assert not bad, f"unreachable (src: [dst]): {bad}; rules: {net.rules()}"


def test_etcd_cluster_serves_through_every_member(arbiter_net):
    net, etcd = arbiter_net, arbiter_net.etcd
    assert etcd.endpoints() == [f"http://{net.ip(m)}:2379" for m in ETCD_MEMBERS]
    assert etcd.leader() in ETCD_MEMBERS
    for m in ETCD_MEMBERS:
        # `ip netns exec` execs etcd: the pid we hold is etcd's (pause/kill hit it).
        assert Path(f"/proc/{etcd.pid(m)}/comm").read_text().strip() == "etcd"
        etcd.put(f"/t/{m}", f"via {m}", members=[m])
    for m in ETCD_MEMBERS:  # every member reads what every member wrote
        assert [etcd.get(f"/t/{w}", members=[m]) for w in ETCD_MEMBERS] == [f"via {w}" for w in ETCD_MEMBERS]

    # The JSON gateway remusd's EtcdHttpClient uses, and a 2 s lease (the
    # shortest etcd grants with a 1 s election timeout) that expires.
    lease = etcd.gateway("/v3/lease/grant", {"TTL": 2}, member="E2")
    assert int(lease["TTL"]) == 2, lease
    etcd.gateway("/v3/kv/put", {"key": b64("/t/leased"), "value": b64("x"), "lease": lease["ID"]}, member="E3")
    got = etcd.gateway("/v3/kv/range", {"key": b64("/t/leased")}, member="E1")
    assert [base64.b64decode(kv["value"]) for kv in got["kvs"]] == [b"x"], got
    t0 = time.monotonic()
    while etcd.get("/t/leased") is not None:
        assert time.monotonic() - t0 < 6, "a 2 s lease's key still there after 6 s" + etcd.diagnostics()
        time.sleep(0.1)


def test_everyone_reaches_everyone_and_two_way_partition_is_a_blackhole(arbiter_net):
    net = arbiter_net
    _assert_everyone_reaches_everyone(net)
    # A closed port answers with RST while the path is open.
    assert net.tcp_probe("A", "B") == "refused"

    net.partition("A", "B")
    assert net.rules() == {"A": [f"-A INPUT -s {net.ip('B')}/32 -m comment --comment remus-part -j DROP"],
                           "B": [f"-A INPUT -s {net.ip('A')}/32 -m comment --comment remus-part -j DROP"]}
    # A blackhole: the connect times out, nothing refuses it.
    assert net.tcp_probe("A", "B", timeout=1.0) == "timeout"
    assert net.tcp_probe("B", "A", timeout=1.0) == "timeout"
    m = net.reach_matrix()
    assert m["A"] == {h: h != "B" for h in ALL_HOSTS if h != "A"}
    assert m["B"] == {h: h != "A" for h in ALL_HOSTS if h != "B"}
    assert all(all(m[h].values()) for h in ("C", *ETCD_MEMBERS))
    net.partition("A", "B")  # idempotent
    assert sum(map(len, net.rules().values())) == 2

    net.heal()
    assert net.rules() == {}
    _assert_everyone_reaches_everyone(net)


def test_one_way_partition_drops_one_direction_only(arbiter_net):
    net = arbiter_net
    assert (net.udp_count("A", "B"), net.udp_count("B", "A")) == (10, 10)

    net.partition("A", "B", one_way=True)
    # A's datagrams never arrive (and A's sendto() saw no error: udp_count
    # would raise); B's still do.
    assert net.udp_count("A", "B") == 0
    assert net.udp_count("B", "A") == 10
    # Only B has a rule: drops are on the receiving side.
    assert list(net.rules()) == ["B"]
    # TCP needs both directions, so neither side can connect.
    assert net.tcp_probe("A", "B") == "timeout"
    assert net.tcp_probe("B", "A") == "timeout"
    # Nobody else is affected.
    assert net.udp_count("A", "C") == 10 and net.udp_count("C", "B") == 10

    net.heal()
    assert (net.udp_count("A", "B"), net.udp_count("B", "A")) == (10, 10)


def test_isolate_cuts_a_host_from_everyone(world, arbiter_net):
    net, etcd = arbiter_net, arbiter_net.etcd
    # What the World starts with netns= runs in that host (as remusd will).
    p = world._spawn("sleeper", ["sleep", "600"], world.dir / "sleeper.log", netns=net.ns("A"))
    # (`ip netns exec` enters the namespace just after Popen returns: poll.)
    world.wait_for(lambda: subprocess.run(["ip", "netns", "identify", str(p.pid)], capture_output=True,
                                          text=True).stdout.split() == [net.ns("A")], 5,
                   f"pid {p.pid} to be in {net.ns('A')}")

    net.isolate("A")
    m = net.reach_matrix()
    assert m["A"] == {h: False for h in ALL_HOSTS if h != "A"}
    for h in ALL_HOSTS:
        if h != "A":
            assert m[h] == {d: d != "A" for d in ALL_HOSTS if d != h}, h
    # etcd is fine for everyone else, A's etcdctl cannot get through.
    etcd.put("/t/iso", "1")
    r = etcd.client("get", "/t/iso", host="A", timeout=1.5)
    assert r.returncode != 0, f"A read etcd while isolated: {r.stdout}"

    net.heal()
    _assert_everyone_reaches_everyone(net)
    assert etcd.client("get", "/t/iso", "--print-value-only", host="A").stdout.strip() == "1"


def test_partition_groups_cuts_a_and_b_from_etcd_only(arbiter_net):
    net, etcd = arbiter_net, arbiter_net.etcd
    net.partition_groups(["A", "B"], ETCD_MEMBERS)  # "A, B | etcd"
    m = net.reach_matrix()
    assert m["A"] == {"B": True, "C": True, "E1": False, "E2": False, "E3": False}
    assert m["B"] == {"A": True, "C": True, "E1": False, "E2": False, "E3": False}
    assert m["C"] == {h: True for h in ALL_HOSTS if h != "C"}
    # The members still reach each other and C: the cluster keeps its quorum.
    for e in ETCD_MEMBERS:
        assert m[e] == {h: h not in ("A", "B") for h in ALL_HOSTS if h != e}, e
    etcd.put("/t/groups", "ok")
    for h in ("A", "B"):
        r = etcd.client("get", "/t/groups", host=h, timeout=1.5)
        assert r.returncode != 0, f"{h} read etcd while cut from it: {r.stdout}"
    with pytest.raises(ValueError):
        net.partition_groups(["A"], ["A", "B"])

    net.heal()
    _assert_everyone_reaches_everyone(net)
    assert etcd.client("get", "/t/groups", "--print-value-only", host="B").stdout.strip() == "ok"


def test_killing_the_leader_elects_a_new_one_and_writes_go_on(arbiter_net, request):
    etcd = arbiter_net.etcd
    old = etcd.wait_leader()
    etcd.put("/t/before", "1")
    t0 = time.monotonic()
    etcd.kill(old)
    new = etcd.wait_leader(timeout=5.0, other_than=old)
    elect_s = time.monotonic() - t0
    rest = [m for m in ETCD_MEMBERS if m != old]
    assert new in rest
    etcd.put("/t/after", "2", members=rest)
    assert etcd.get("/t/before", members=rest) == "1"

    etcd.restart(old)
    etcd.wait_healthy(timeout=15)
    # The restarted member caught up from its data dir and the new leader.
    assert etcd.get("/t/after", members=[old]) == "2"
    request.node.user_properties.append(("election_s", round(elect_s, 2)))
    print(f"[e2e] new etcd leader {new} {elect_s:.2f}s after killing {old}")


def test_a_paused_follower_does_not_block_writes(arbiter_net):
    etcd = arbiter_net.etcd
    leader = etcd.wait_leader()
    follower = next(m for m in ETCD_MEMBERS if m != leader)
    etcd.pause(follower)
    assert Path(f"/proc/{etcd.pid(follower)}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    assert follower not in etcd.running()
    t0 = time.monotonic()
    for i in range(5):
        etcd.put(f"/t/p{i}", str(i), timeout=2.0)  # through the running members
    assert time.monotonic() - t0 < 5, "writes slowed down by a paused follower"
    assert etcd.leader() == leader

    etcd.resume(follower)
    etcd.wait_healthy(timeout=10)
    assert etcd.get("/t/p4", members=[follower]) == "4"


def test_start_removes_leftovers_and_close_removes_everything():
    """No fixture: a "crashed" run leaves its namespaces and a process in them;
    a new world with the same names starts anyway, and close() leaves nothing."""
    def ours():
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return sorted(l.split()[0] for l in out.splitlines() if l.startswith(f"rw{os.getpid()}"))

    crashed = ArbiterNet().start()
    sleeper = crashed.popen("E1", ["sleep", "600"])
    crashed.partition("A", "B")
    assert len(ours()) == len(ALL_HOSTS) + 1

    net = ArbiterNet().start()  # same names: the leftovers go first
    try:
        assert sleeper.wait(timeout=5) == -9
        assert net.rules() == {}
        assert net.reach("A", ["B"]) == {"B": True}
    finally:
        net.close()
    assert ours() == []
