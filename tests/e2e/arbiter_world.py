"""The test world for arbitration and the fault campaign.

Six simulated hosts, each in a network namespace of its own: the primary A,
the backup B, the client C and the three etcd members E1, E2, E3.  Each has
one veth (`eth0`, an address in 10.81.X.0/24) whose other end is a port of
one Linux bridge.  The bridge lives in a namespace of its own (the "switch"),
so the root namespace's interfaces, routes and firewall are never touched, and
two runs (different pids: different names, different X) never meet.

    A 10.81.X.1   B .2   C .3   E1 .11   E2 .12   E3 .13
       \\          |      |       |        |        /
        +------------ br0 (switch namespace) ------+

Faults (docs: /work/shared/design/failover-safety.md, "The fault campaign"):

* **Partitions** are iptables DROP rules, tagged with the comment
  `remus-part`, in the *receiving* host's INPUT chain, matching the sender's
  address: a partition src -> dst is `-A INPUT -s <src> -j DROP` in dst's
  namespace.  A DROP is a blackhole: the packet vanishes, nothing answers (no
  RST, no ICMP, no FIN), so the sender learns nothing except by timeouts, as
  with a cut cable or a hung host.  REJECT would hand the peer an instant,
  unambiguous error, which real partitions never do, and would test the easy
  path only.  Dropping in the receiver's INPUT rather than in the sender's
  OUTPUT matters for the same reason: a DROP in OUTPUT makes the sender's own
  kernel fail the send (a UDP sendto() raises EPERM at once; TCP's
  transmissions fail locally), which is again an error a real partition does
  not give.  ARP is not filtered, so the sender does not get EHOSTUNREACH
  either.
* **Process pauses** are SIGSTOP / SIGCONT (`pause`, `resume`).
* **Crashes** are SIGKILL (`EtcdCluster.kill`).

IPv6 is disabled in every namespace: the partitions are IPv4 iptables rules,
and link-local IPv6 would otherwise be a way around them.

br_netfilter: when the module is loaded (it is on the CI machines, Docker
loads it), bridged IPv4 frames are passed through iptables and conntrack of
the namespace that owns the bridge (net.bridge.bridge-nf-call-iptables, per
namespace since Linux 5.3, default 1).  The switch namespace turns that off,
so the bridge is a plain layer-2 switch and a rule in one host's namespace is
the only thing that can drop a packet.

stdlib only.  Use via the `arbiter_net` fixture in conftest.py, or by hand:

    net = ArbiterNet()
    net.start()
    net.etcd = EtcdCluster(net, Path("/tmp/x/etcd"))
    net.etcd.start(); net.etcd.wait_healthy()
    ...
    net.close()   # kills every process in the namespaces, deletes them
"""

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ETCD = os.environ.get("REMUS_ETCD", shutil.which("etcd") or "/usr/bin/etcd")
ETCDCTL = os.environ.get("REMUS_ETCDCTL", shutil.which("etcdctl") or "/usr/bin/etcdctl")

HOSTS = ("A", "B", "C")
ETCD_MEMBERS = ("E1", "E2", "E3")
ALL_HOSTS = HOSTS + ETCD_MEMBERS
# Last octet of each host's address.
_OCTET = {"A": 1, "B": 2, "C": 3, "E1": 11, "E2": 12, "E3": 13}

PART_COMMENT = "remus-part"
CLIENT_PORT, PEER_PORT = 2379, 2380
# A port nothing listens on: a TCP connect there is refused when the path is
# open and times out when it is blackholed.
CLOSED_PORT = 9


def etcd_missing():
    """None, or a sentence saying which etcd binary is missing."""
    for what, p in (("etcd", ETCD), ("etcdctl", ETCDCTL)):
        if not (os.path.isfile(p) and os.access(p, os.X_OK)):
            return (f"{what} is not installed ({p} missing): the arbiter world needs a real etcd "
                    f"cluster (Debian: apt-get install etcd-server etcd-client; or set "
                    f"REMUS_ETCD / REMUS_ETCDCTL)")
    return None


def _run(argv, check=True, **kw):
    r = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed (rc {r.returncode}): {r.stderr.strip()}")
    return r


def b64(text):
    """base64 of a str, as etcd's JSON gateway wants keys and values."""
    return base64.b64encode(text.encode()).decode()


def _thread_states(pid):
    """The state letters of all threads of pid ("R", "S", "T", ...)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
    return states


def _wait_states(pid, pred, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        states = _thread_states(pid)
        if pred(states):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"pid {pid} not {what} within {timeout}s (thread states {states})")
        time.sleep(0.005)


def pause(pid):
    """SIGSTOP: the process freezes (no syscalls, no timers, sockets stay open and
    their buffers fill up), as a remusd stuck on a stalled disk would.  Returns
    once every thread is stopped: the signal is delivered asynchronously, and a
    multithreaded process (etcd, remusd) can still run for a moment after kill()."""
    os.kill(pid, signal.SIGSTOP)
    _wait_states(pid, lambda st: st and all(s in "Tt" for s in st), "stopped")


def resume(pid):
    """SIGCONT: a paused process carries on where it stopped.  Returns once no
    thread is in the stopped state any more."""
    os.kill(pid, signal.SIGCONT)
    _wait_states(pid, lambda st: not any(s == "T" for s in st), "resumed")


def _kill_namespace_pids(ns):
    """SIGKILLs every process in network namespace ns (a namespace that is
    deleted while processes are still in it lives on, unnamed, with them)."""
    r = _run(["ip", "netns", "pids", ns], check=False)
    for pid_s in r.stdout.split():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_s), signal.SIGKILL)


# The probe programs run with this Python inside a namespace.
_TCP_PROBE = r"""
import errno, json, socket, sys, threading
targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
out = {}
def probe(key, ip, port):
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        out[key] = "ok"
    except socket.timeout:
        out[key] = "timeout"
    except ConnectionRefusedError:
        out[key] = "refused"
    except OSError as e:
        out[key] = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
ts = [threading.Thread(target=probe, args=t) for t in targets]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))
"""

_UDP_RECV = r"""
import socket, sys, time
ip, port, src, n, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, port))
print("ready", flush=True)
sys.stdin.readline()                      # the sender is done
got, deadline = 0, time.monotonic() + wait
while got < n and time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        _, (peer, _) = s.recvfrom(2048)
    except socket.timeout:
        break
    got += peer == src
print(got, flush=True)
"""

_UDP_SEND = r"""
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(b"remus %d" % i, (ip, port))   # raises if the local kernel refuses
    time.sleep(0.01)
print("sent", n)
"""


class ArbiterNet:
    """The namespaces, the switch, and partitions between named hosts.

    Hosts are named "A", "B", "C", "E1", "E2", "E3".  Every method that takes
    host names raises KeyError on an unknown one.
    """

    def __init__(self, pid=None):
        pid = os.getpid() if pid is None else pid
        self.tag = str(pid)
        # 10.81.X.0/24, X from the pid: different runs differ even in their
        # addresses, which makes captures and logs unambiguous (the switches
        # are separate anyway).
        self.subnet = f"10.81.{pid % 200 + 20}"
        self.switch = f"rw{self.tag}sw"
        self._ns = {h: f"rw{self.tag}{h.lower()}" for h in ALL_HOSTS}
        self._procs = []
        self.etcd = None      # an EtcdCluster, set by whoever starts one (the fixture)
        self.started = False

    # ----------------------------------------------------------- addressing
    @property
    def hosts(self):
        return ALL_HOSTS

    def ns(self, host):
        """The network namespace of a host (for `ip netns exec`, World.start_remusd(netns=))."""
        return self._ns[self._check(host)]

    def ip(self, host):
        """The host's IPv4 address on the switch."""
        return f"{self.subnet}.{_OCTET[self._check(host)]}"

    def host_of(self, ip):
        """The host name that owns an address, or None."""
        return next((h for h in ALL_HOSTS if self.ip(h) == ip), None)

    @staticmethod
    def _check(host):
        if host not in _OCTET:
            raise KeyError(f"unknown host {host!r}; the arbiter world has {', '.join(ALL_HOSTS)}")
        return host

    # ------------------------------------------------------------- lifecycle
    def namespaces(self):
        return [self.switch, *self._ns.values()]

    def start(self):
        """Creates the switch and the hosts.  Leftovers of a crashed run with the
        same names (same pid) are removed first."""
        self._remove_namespaces()
        try:
            self._build()
        except BaseException:
            self._remove_namespaces()
            raise
        self.started = True
        return self

    @staticmethod
    def _sysctl(ns, *settings):
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])

    def _build(self):
        for ns in self.namespaces():
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        # The switch forwards frames and nothing else: with br_netfilter loaded,
        # bridged traffic would otherwise go through this namespace's iptables
        # and conntrack.  The sysctls exist only while the module is loaded.
        if _run(["ip", "netns", "exec", self.switch, "test", "-e", "/proc/sys/net/bridge"],
                check=False).returncode == 0:
            self._sysctl(self.switch, "net.bridge.bridge-nf-call-iptables=0",
                         "net.bridge.bridge-nf-call-ip6tables=0", "net.bridge.bridge-nf-call-arptables=0")
        sw = self.switch
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for h in ALL_HOSTS:
            port = f"p{h.lower()}"
            _run(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns(h)])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", self.ns(h), "addr", "add", f"{self.ip(h)}/24", "dev", "eth0"])
            _run(["ip", "-n", self.ns(h), "link", "set", "eth0", "up"])

    def _remove_namespaces(self):
        existing = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        for ns in self.namespaces():
            if ns in existing:
                _kill_namespace_pids(ns)
                _run(["ip", "netns", "del", ns], check=False)

    def close(self):
        """Kills what runs in the namespaces (etcd, anything from popen, and any
        process a test started there) and deletes them with the bridge."""
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop_all()
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()
        for p in self._procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        self._remove_namespaces()
        self.started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------- running
    def _argv(self, host, argv):
        return ["ip", "netns", "exec", self.ns(host), *[str(a) for a in argv]]

    def exec(self, host, argv, timeout=30, check=False, **kw):
        """Runs argv inside the host's namespace to completion; returns the
        CompletedProcess (text, stdout and stderr captured)."""
        r = subprocess.run(self._argv(host, argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{host}: {shlex.join(map(str, argv))} failed (rc {r.returncode}): "
                                 f"{r.stderr.strip()}")
        return r

    def popen(self, host, argv, **kw):
        """Starts argv inside the host's namespace (subprocess.Popen keywords
        pass through; a new session unless told otherwise).  `ip netns exec`
        execs the program, so the Popen's pid is the program's own (pause()
        and kill work on it), though it enters the namespace a moment after
        Popen returns.  Killed by close() if still running."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self._argv(host, argv), **kw)
        self._procs.append(p)
        return p

    # ------------------------------------------------------------ partitions
    def _rule(self, src, dst):
        """The iptables rule (in dst's namespace) that drops src -> dst."""
        return ["INPUT", "-s", f"{self.ip(src)}/32", "-m", "comment", "--comment", PART_COMMENT, "-j", "DROP"]

    def _iptables(self, host, *args, check=True):
        # -w: wait for the xtables lock instead of failing when another
        # iptables (netbuf's, another helper's) holds it.
        return self.exec(host, ["iptables", "-w", *args], check=check)

    def drop(self, src, dst):
        """Blackholes the packets from src to dst (one direction only): a DROP
        in dst's INPUT chain for src's address.  Idempotent."""
        if self._check(src) == self._check(dst):
            raise ValueError(f"cannot partition {src} from itself")
        rule = self._rule(src, dst)
        if self._iptables(dst, "-C", *rule, check=False).returncode != 0:
            self._iptables(dst, "-I", *rule)

    def partition(self, src, dst, one_way=False):
        """Cuts src from dst: packets src -> dst are dropped, and with
        one_way=False (the default) dst -> src too.  One-way: dst still reaches
        src, but nothing src sends arrives (TCP cannot connect either way, since
        a handshake needs both directions; UDP shows the asymmetry)."""
        self.drop(src, dst)
        if not one_way:
            self.drop(dst, src)

    def partition_groups(self, side1, side2, one_way=False):
        """Cuts every host of side1 from every host of side2 (one_way: only
        side1 -> side2).  Hosts on the same side still reach each other:
        partition_groups(["A", "B"], ETCD_MEMBERS) is "A, B | etcd"."""
        both = set(side1) & set(side2)
        if both:
            raise ValueError(f"{sorted(both)} on both sides of a partition")
        for a in side1:
            for b in side2:
                self.partition(a, b, one_way=one_way)

    def isolate(self, host):
        """Cuts host from every other host, both ways ("A | all")."""
        self.partition_groups([host], [h for h in ALL_HOSTS if h != host])

    def rules(self):
        """{host: [rule, ...]}: our partition rules now in force (iptables -S lines)."""
        out = {}
        for h in ALL_HOSTS:
            lines = self._iptables(h, "-S", "INPUT").stdout.splitlines()
            mine = [l for l in lines if PART_COMMENT in l and l.startswith("-A ")]
            if mine:
                out[h] = mine
        return out

    def heal(self):
        """Removes every partition rule (only those tagged remus-part: rules
        that remusd or a test added in the same chains stay)."""
        for h, lines in self.rules().items():
            for line in lines:
                self._iptables(h, "-D", *shlex.split(line)[1:])

    # ---------------------------------------------------------------- probes
    def _probe_many(self, jobs, timeout):
        """jobs: {src: {key: (host, port)}}.  Runs one prober per source
        namespace, all at the same time; returns {src: {key: result}}."""
        procs = {}
        try:
            for src, targets in jobs.items():
                spec = [(k, self.ip(h), int(p)) for k, (h, p) in targets.items()]
                procs[src] = subprocess.Popen(
                    self._argv(src, [sys.executable, "-c", _TCP_PROBE, json.dumps(spec), str(timeout)]),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out = {}
            for src, p in procs.items():
                stdout, stderr = p.communicate(timeout=timeout + 30)
                if p.returncode != 0:
                    raise AssertionError(f"TCP prober in {src} failed (rc {p.returncode}): {stderr.strip()}")
                out[src] = json.loads(stdout)
            return out
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def tcp_probes(self, src, targets, timeout=1.0):
        """TCP connects from src, all at once, each with `timeout` seconds.
        targets: {key: (host, port)}.  Returns {key: "ok" | "refused" |
        "timeout" | errno name}.  "refused" means the path is open both ways
        (the RST came back); "timeout" is what a blackhole gives."""
        return self._probe_many({src: targets}, timeout)[src]

    def tcp_probe(self, src, dst, port=CLOSED_PORT, timeout=1.0):
        """One TCP connect from src to dst:port (see tcp_probes)."""
        return self.tcp_probes(src, {dst: (dst, port)}, timeout)[dst]

    @staticmethod
    def _reach_targets(src, dsts):
        # Members: their etcd client port (ok); the others: a closed port (refused).
        return {d: (d, CLIENT_PORT if d in ETCD_MEMBERS else CLOSED_PORT) for d in (dsts or ALL_HOSTS) if d != src}

    def reach(self, src, dsts=None, timeout=1.0):
        """{dst: bool}: can src talk to dst both ways (a TCP handshake)?  To the
        etcd client port of members, to a closed port of the others, where
        "refused" proves the path as well as "ok" does.  Takes `timeout` when
        something is cut."""
        res = self.tcp_probes(src, self._reach_targets(src, dsts), timeout)
        return {d: v in ("ok", "refused") for d, v in res.items()}

    def reach_matrix(self, srcs=None, timeout=1.0):
        """{src: {dst: bool}} for every pair (reach() from all sources at once:
        one `timeout` in all)."""
        res = self._probe_many({s: self._reach_targets(s, None) for s in (srcs or ALL_HOSTS)}, timeout)
        return {s: {d: v in ("ok", "refused") for d, v in r.items()} for s, r in res.items()}

    def udp_count(self, src, dst, n=10, port=7001, wait=1.0):
        """Sends n UDP datagrams from src to dst and returns how many arrived
        (counted by a listener in dst, by source address).  Works one
        direction at a time, so it shows one-way partitions.  The sender must
        not notice anything: its sendto() raising fails the probe."""
        recv = self.popen(dst, [sys.executable, "-c", _UDP_RECV, self.ip(dst), port, self.ip(src), n, wait],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = recv.stdout.readline().strip()
            if line != "ready":
                raise AssertionError(f"UDP listener in {dst} did not start: {line!r} {recv.stderr.read()}")
            self.exec(src, [sys.executable, "-c", _UDP_SEND, self.ip(dst), port, n], check=True)
            out, err = recv.communicate("done\n", timeout=wait + 10)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        if recv.returncode != 0:
            raise AssertionError(f"UDP listener in {dst} failed: {err}")
        return int(out.strip())


class EtcdCluster:
    """A real etcd cluster, one member per etcd namespace of an ArbiterNet.

    Members are named like their hosts ("E1", "E2", "E3"); each keeps its data
    dir (<dir>/<name>.data) and log (<dir>/<name>.log, zap JSON lines) in `dir`.
    Tuned for fast failure handling: heartbeat 100 ms, election timeout 1 s (a
    new leader about 1-2 s after the old one dies; the smallest lease TTL etcd
    grants is about 1.5 election timeouts, so TTLs of 2-3 s work).  Pre-vote
    is on (etcd 3.5's default): a member coming back from a partition does not
    depose a healthy leader.

    All etcdctl calls run from the client host C (client(), put(), get()),
    so partitions that cut C matter to them.
    """

    def __init__(self, net, dir, members=ETCD_MEMBERS, heartbeat_ms=100, election_ms=1000):
        self.net, self.dir = net, Path(dir)
        self.members = tuple(members)
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self.token = f"remus-{net.tag}"
        self.procs = {}       # name -> Popen of the running (or last) process
        self.paused = set()
        self.ids = {}         # name -> member id (from the first healthy status)

    # ---------------------------------------------------------- addressing
    def endpoint(self, member):
        return f"http://{self.net.ip(self._check(member))}:{CLIENT_PORT}"

    def endpoints(self, members=None):
        """Client URLs ("http://IP:2379") of the given members (default: all)."""
        return [self.endpoint(m) for m in (members or self.members)]

    def log(self, member):
        return self.dir / f"{member}.log"

    def data_dir(self, member):
        return self.dir / f"{member}.data"

    def _check(self, member):
        if member not in self.members:
            raise KeyError(f"unknown etcd member {member!r}; members: {', '.join(self.members)}")
        return member

    # ------------------------------------------------------------ processes
    def _argv(self, member, state):
        ip = self.net.ip(member)
        cluster = ",".join(f"{m}=http://{self.net.ip(m)}:{PEER_PORT}" for m in self.members)
        return [ETCD, "--name", member, "--data-dir", str(self.data_dir(member)),
                "--listen-client-urls", f"http://{ip}:{CLIENT_PORT}",
                "--advertise-client-urls", f"http://{ip}:{CLIENT_PORT}",
                "--listen-peer-urls", f"http://{ip}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"http://{ip}:{PEER_PORT}",
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token,
                "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
                "--pre-vote=true", "--logger", "zap", "--log-outputs", "stderr"]

    def _spawn(self, member, state):
        if self.alive(member):
            raise AssertionError(f"etcd {member} is already running (pid {self.pid(member)})")
        with open(self.log(member), "ab") as f:
            f.write(f"---- {time.strftime('%H:%M:%S')} starting ({state})\n".encode())
            f.flush()
            self.procs[member] = self.net.popen(member, self._argv(member, state), stdout=f,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.paused.discard(member)

    def start(self):
        """Starts every member of a new cluster (fresh data dirs); returns at
        once: call wait_healthy()."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            shutil.rmtree(self.data_dir(m), ignore_errors=True)
            self._spawn(m, "new")
        return self

    def pid(self, member):
        p = self.procs.get(self._check(member))
        return p.pid if p else None

    def alive(self, member):
        p = self.procs.get(self._check(member))
        return p is not None and p.poll() is None

    def kill(self, member):
        """SIGKILL: a crash (the data dir stays; restart() brings it back)."""
        p = self.procs.get(self._check(member))
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        self.paused.discard(member)

    def restart(self, member):
        """Starts a member again on its existing data dir (killing it first if it runs)."""
        self.kill(member)
        self._spawn(member, "existing")

    def pause(self, member):
        """SIGSTOP the member: it holds its sockets but answers nothing."""
        pause(self.pid(member))
        self.paused.add(member)

    def resume(self, member):
        resume(self.pid(member))
        self.paused.discard(member)

    def stop_all(self):
        """SIGKILLs every member (data dirs stay)."""
        for m in self.members:
            self.kill(m)

    def running(self):
        """Members that run and are not paused."""
        return [m for m in self.members if self.alive(m) and m not in self.paused]

    # --------------------------------------------------------------- client
    def client(self, *args, members=None, host="C", timeout=5.0):
        """etcdctl (API v3) from `host` against the given members' endpoints
        (default: all running ones).  Returns the CompletedProcess."""
        eps = ",".join(self.endpoints(members or self.running() or self.members))
        env = dict(os.environ, ETCDCTL_API="3")
        argv = [ETCDCTL, f"--endpoints={eps}", "--dial-timeout=1s", f"--command-timeout={timeout:g}s", *args]
        return self.net.exec(host, argv, timeout=timeout + 10, env=env)

    def put(self, key, value, members=None, timeout=5.0):
        r = self.client("put", key, value, members=members, timeout=timeout)
        if r.returncode != 0 or r.stdout.strip() != "OK":
            raise AssertionError(f"etcd put {key} via {members or 'running members'} failed "
                                 f"(rc {r.returncode}): {r.stdout.strip()} {r.stderr.strip()}")

    def get(self, key, members=None, timeout=5.0):
        """The value of key (a linearizable read), or None if it is absent."""
        r = self.client("get", key, "-w", "json", members=members, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"etcd get {key} via {members or 'running members'} failed "
                                 f"(rc {r.returncode}): {r.stderr.strip()}")
        kvs = json.loads(r.stdout).get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    def gateway(self, path, body, member=None, host="C", timeout=3.0):
        """POSTs a JSON body to etcd's JSON gateway (/v3/...) of one member
        (default: the first running one), with curl from `host`, as remusd's
        EtcdHttpClient does.  Keys and values in body must be base64 already
        (b64()).  Returns the parsed answer; raises AssertionError if curl fails."""
        member = member or (self.running() or self.members)[0]
        url = f"{self.endpoint(member)}{path}"
        r = self.net.exec(host, ["curl", "-sS", "--fail-with-body", "-m", f"{timeout:g}", "-X", "POST",
                                 "-H", "Content-Type: application/json", "-d", json.dumps(body), url],
                          timeout=timeout + 10)
        if r.returncode != 0:
            raise AssertionError(f"POST {url} {body} from {host} failed (curl rc {r.returncode}): "
                                 f"{r.stdout.strip()} {r.stderr.strip()}")
        return json.loads(r.stdout)

    def status(self, members=None, timeout=1.0):
        """{member: status dict or None}: etcdctl endpoint status of each
        member asked (default: the running ones) that answered within timeout.
        A dict has leader, raft_term, member_id, ... (etcd's JSON)."""
        asked = list(members or self.running())
        out = {m: None for m in asked}
        if not asked:
            return out
        r = self.client("endpoint", "status", "-w", "json", members=asked, timeout=timeout)
        with contextlib.suppress(ValueError):  # rc 1 when some did not answer; the rest print
            for e in json.loads(r.stdout or "[]"):
                m = self.net.host_of(e["Endpoint"].split("//")[1].split(":")[0])
                st, hdr = e["Status"], e["Status"].get("header", {})
                # Zero fields are left out of etcd's JSON (leader: 0 = none known).
                out[m] = {"member_id": hdr.get("member_id", 0), "leader": st.get("leader", 0),
                          "raft_term": st.get("raftTerm", 0), "raft_index": st.get("raftIndex", 0),
                          "revision": hdr.get("revision", 0)}
                if out[m]["member_id"]:
                    self.ids[m] = out[m]["member_id"]
        return out

    def leader(self, members=None):
        """The name of the leader that a majority of the whole cluster agrees
        on, among the members asked (default: the running ones), or None
        (no quorum, election in progress, or members disagree)."""
        st = {m: s for m, s in self.status(members).items() if s}
        by_id = {v: k for k, v in self.ids.items()}
        votes = {}
        for s in st.values():
            if s["leader"]:
                votes[s["leader"]] = votes.get(s["leader"], 0) + 1
        for lid, n in votes.items():
            name = by_id.get(lid)
            # The leader must answer too and agree about itself (an isolated old
            # leader's followers may still name it for up to an election timeout).
            if name in st and st[name]["leader"] == lid and n > len(self.members) // 2:
                return name
        return None

    def wait_leader(self, timeout=10.0, other_than=None, members=None):
        """Waits for a leader (one that is not `other_than`); returns its name."""
        deadline = time.monotonic() + timeout
        while True:
            ldr = self.leader(members)
            if ldr and ldr != other_than:
                return ldr
            if time.monotonic() >= deadline:
                raise AssertionError(f"no etcd leader{' other than ' + other_than if other_than else ''} "
                                     f"within {timeout}s; status: {self.status(members)}" + self.diagnostics())
            time.sleep(0.1)

    def wait_healthy(self, timeout=20.0):
        """Waits until every member runs, answers `endpoint health` (a quorum
        read through each) and they agree on a leader.  Returns the leader."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            for m in self.members:
                if not self.alive(m):
                    raise AssertionError(f"etcd {m} exited with {self.procs[m].returncode}" + self.diagnostics())
            r = self.client("endpoint", "health", members=self.members, timeout=1.0)
            last = (r.stdout + r.stderr).strip()
            if r.returncode == 0:
                ldr = self.leader(self.members)
                if ldr:
                    return ldr
            if time.monotonic() >= deadline:
                raise AssertionError(f"etcd cluster not healthy within {timeout}s: {last}" + self.diagnostics())
            time.sleep(0.1)

    def diagnostics(self, n=15):
        out = ["", "---- etcd ----"]
        for m in self.members:
            out.append(f"--- {m} (pid {self.pid(m)}, alive {self.alive(m)}, paused {m in self.paused}): "
                       f"{self.log(m)} (tail)")
            with contextlib.suppress(OSError):
                out += ["    " + l for l in self.log(m).read_text(errors="replace").splitlines()[-n:]]
        return "\n".join(out)
