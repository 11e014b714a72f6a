"""A private libvirtd per simulated host, for end-to-end tests of libvirt mode.

Debian 12 ships the monolithic `libvirtd` (libvirt 9.0; no virtqemud).  As
root it is "privileged" and its QEMU driver uses fixed paths: /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt.  Two
daemons on one machine would share them (pid files, domain status XML, the
per-domain dirs, the caps cache).  So each world runs its libvirtd in a mount
namespace of its own (`unshare --mount`), with those five directories bind
mounted from the world's temp dir.  The QEMUs it starts inherit the namespace.
From outside, the same files are under the world's dir: `run/qemu/<dom>.pid`
is /run/libvirt/qemu/<dom>.pid as the daemon sees it (LibvirtMonitor's
pid_dir).  The client socket lives in `<dir>/sock` (libvirtd.conf
unix_sock_dir), outside the bind mounts, and is reached with
`qemu:///system?socket=<dir>/sock/libvirt-sock`.

qemu.conf: QEMU runs as root (user/group "root"), security_driver "none", no
per-domain mount namespace, no cgroups (this kind of machine has no systemd and
a read-mostly cgroup tree), QEMU's stdout/stderr to a plain file (no virtlogd).
Production differs: see docs/libvirt-notes.md.

Debian's libvirtd resolves its built-in QEMU user "libvirt-qemu" at start even
when qemu.conf says root; the user comes with libvirt-daemon-system, which
these machines do not install (it pulls in systemd).  ensure_libvirt_qemu_user()
creates it (a system user and group, as that package's postinst does).

QEMU capability probing takes seconds per binary on the first connection.
Probes are kept in CAPS_CACHE and seeded into every world's cache dir; libvirt
re-probes by itself when a binary or libvirt changed.

stdlib only.  Use as a context manager, or call start()/stop():

    with LibvirtWorld(tmp / "A") as a:
        a.create(a.guest_xml("web1", serial=tmp / "A.serial"))
        a.virsh("domstate", "--reason", "web1")
"""

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape

LIBVIRTD = os.environ.get("REMUS_LIBVIRTD", shutil.which("libvirtd") or "/usr/sbin/libvirtd")
VIRSH = shutil.which("virsh") or "/usr/bin/virsh"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
# QEMU for libvirt worlds: Debian's, unless a test needs COLO (then the patched one).
LIBVIRT_QEMU = os.environ.get("REMUS_LIBVIRT_QEMU", "/usr/bin/qemu-system-x86_64")
CAPS_CACHE = Path(os.environ.get("REMUS_LIBVIRT_CAPS_CACHE", "/var/cache/remus/libvirt-qemu-caps"))

# The libvirt paths of a privileged daemon, and the world subdirs mounted there.
_BINDS = [("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
          ("cache", "/var/cache/libvirt"), ("log", "/var/log/libvirt")]

QEMU_CONF = """\
# remus test world (tests/e2e/libvirt_world.py)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
"""


def missing_requirements():
    """A reason why libvirt worlds cannot run here, or None."""
    if os.geteuid() != 0:
        return "libvirt worlds need root (a privileged libvirtd, mount namespaces)"
    for what, p in [("libvirtd", LIBVIRTD), ("virsh", VIRSH), ("unshare", UNSHARE)]:
        if not (p and os.access(p, os.X_OK)):
            return f"{what} is not installed ({p}; apt-get install libvirt-daemon libvirt-clients)"
    if not Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so").exists():
        return "libvirt's QEMU driver is not installed (apt-get install libvirt-daemon-driver-qemu)"
    r = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "true"], capture_output=True)
    if r.returncode != 0:
        return f"cannot make a mount namespace (unshare --mount): {r.stderr.decode(errors='replace').strip()}"
    return None


def ensure_libvirt_qemu_user():
    """Creates the system user/group libvirt-qemu if missing (see the module doc)."""
    if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True, capture_output=True)
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt",
                        "-s", "/usr/sbin/nologin", "-c", "Libvirt Qemu", "libvirt-qemu"],
                       check=True, capture_output=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


class LibvirtError(AssertionError):
    pass


class LibvirtWorld:
    """One private libvirtd ("host") with its own dirs under `dir`."""

    def __init__(self, dir, name=None, netns=None):
        self.dir = Path(dir)
        self.name = name or self.dir.name
        # A network namespace (`ip netns add`) to run libvirtd in: its QEMUs
        # then open their taps there.  None: the caller's.
        self.netns = netns
        self.sock_dir = self.dir / "sock"
        self.socket = self.sock_dir / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.pid_dir = self.dir / "run" / "qemu"      # /run/libvirt/qemu inside
        self.qemu_log_dir = self.dir / "log" / "qemu"  # /var/log/libvirt/qemu inside
        self.daemon_log = self.dir / "libvirtd.log"
        # /etc/libvirt/hooks as the daemon sees it.  libvirt looks for hook
        # scripts when it starts: install them before start().
        self.hook_dir = self.dir / "etc" / "hooks"
        self.stdout_log = self.dir / "libvirtd.stdout"
        self.proc = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=60):
        ensure_libvirt_qemu_user()
        for sub, _ in _BINDS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        for _, target in _BINDS:
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points on the host
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        conf = self.dir / "etc" / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.daemon_log}"\n')
        caps = self.dir / "cache" / "qemu" / "capabilities"
        caps.mkdir(parents=True, exist_ok=True)
        if CAPS_CACHE.is_dir():
            for f in CAPS_CACHE.glob("*.xml"):
                shutil.copy2(f, caps / f.name)
        mounts = " && ".join(f"mount --bind {self.dir / sub} {target}" for sub, target in _BINDS)
        script = f"{mounts} && exec {LIBVIRTD} -f {conf} -p {self.dir / 'libvirtd.pid'}"
        out = open(self.stdout_log, "ab")
        try:
            # unshare execs sh, sh execs libvirtd: proc.pid is libvirtd's pid.
            # `ip netns exec` execs unshare in the namespace: still libvirtd's pid.
            netns = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen(
                [*netns, UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C"})
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd of world {self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.tail(self.stdout_log)}\n{self.tail(self.daemon_log)}")
            if self.socket.exists():
                r = self.virsh("uri", check=False, timeout=10)
                if r.returncode == 0:
                    break
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd of world {self.name} did not answer on {self.socket} "
                                   f"within {timeout}s:\n{self.tail(self.daemon_log)}")
            time.sleep(0.1)
        return self

    def stop(self):
        """Destroys every domain, stops libvirtd, kills any QEMU left over."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                r = self.virsh("list", "--name", check=False, timeout=20)
                for name in r.stdout.split():
                    self.virsh("destroy", name, check=False, timeout=30)
        self.kill_daemon()
        self.kill_qemus()
        self._save_caps()

    def kill_daemon(self, sig=signal.SIGTERM):
        """Stops libvirtd (its QEMUs run on, as with a real libvirtd restart)."""
        if not self.proc or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)

    def kill_qemus(self):
        for pidfile in self.pid_dir.glob("*.pid"):
            if pidfile.name == "driver.pid":
                continue
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().strip())
                argv = _cmdline(pid)
                # Only a QEMU of this domain: the pid may have been reused.
                if _pid_alive(pid) and any(b"qemu" in a for a in argv[:1]) and \
                        any(a.split(b",")[0] == b"guest=" + pidfile.stem.encode() for a in argv):
                    os.kill(pid, signal.SIGKILL)

    def _save_caps(self):
        caps = self.dir / "cache" / "qemu" / "capabilities"
        with contextlib.suppress(OSError):
            CAPS_CACHE.mkdir(parents=True, exist_ok=True)
            for f in caps.glob("*.xml"):
                dst = CAPS_CACHE / f.name
                if dst.exists() and dst.read_bytes() == f.read_bytes():
                    continue
                tmp = CAPS_CACHE / f".{f.name}.{os.getpid()}"
                shutil.copy2(f, tmp)
                os.replace(tmp, dst)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- virsh
    def virsh(self, *args, check=True, timeout=60):
        r = subprocess.run([VIRSH, "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise LibvirtError(f"world {self.name}: virsh {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stderr.strip() or r.stdout.strip()}")
        return r

    def define(self, xml):
        p = self.dir / "define.xml"
        p.write_text(xml)
        self.virsh("define", str(p))

    def create(self, xml, paused=False):
        """Starts a transient domain from xml."""
        p = self.dir / "create.xml"
        p.write_text(xml)
        self.virsh("create", str(p), *(["--paused"] if paused else []), timeout=120)

    def start_domain(self, name):
        self.virsh("start", name, timeout=120)

    def destroy(self, name):
        self.virsh("destroy", name, check=False)

    def domstate(self, name):
        """(state, reason), e.g. ("running", "booted"); ("", "") if unknown."""
        r = self.virsh("domstate", "--reason", name, check=False)
        line = r.stdout.strip()
        if r.returncode != 0 or not line:
            return ("", "")
        state, _, reason = line.partition(" (")
        return (state, reason.rstrip(")"))

    def running_domains(self):
        return self.virsh("list", "--name").stdout.split()

    def qemu_pid(self, name):
        with contextlib.suppress(OSError, ValueError):
            return int((self.pid_dir / f"{name}.pid").read_text().strip())
        return None

    def qemu_log(self, name):
        return self.qemu_log_dir / f"{name}.log"

    # --------------------------------------------------------------- domains
    @staticmethod
    def guest_xml(name, kernel, initrd, cmdline, serial, emulator=None, memory_mib=256, uuid=None,
                  qemu_args=(), metadata="", disks=(), devices=()):
        """A TCG domain for the test guest: direct kernel boot, serial to a
        file, no graphics, no network (unless devices has one), no USB or
        balloon.  qemu_args are passed to QEMU as is (<qemu:commandline>),
        e.g. a second -qmp socket;
        metadata is XML put inside <metadata>; disks are raw image paths
        (virtio, vda, vdb, ...); devices are more XML elements put in
        <devices> as they are (e.g. an <interface>)."""
        ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" if qemu_args else ""
        parts = [f"<domain type='qemu'{ns}>",
                 f"  <name>{escape(name)}</name>"]
        if uuid:
            parts.append(f"  <uuid>{escape(uuid)}</uuid>")
        if metadata:
            parts += ["  <metadata>", f"    {metadata}", "  </metadata>"]
        parts += [
            f"  <memory unit='MiB'>{memory_mib}</memory>",
            "  <vcpu>1</vcpu>",
            "  <os>",
            "    <type arch='x86_64' machine='pc'>hvm</type>",
            f"    <kernel>{escape(str(kernel))}</kernel>",
            f"    <initrd>{escape(str(initrd))}</initrd>",
            f"    <cmdline>{escape(cmdline)}</cmdline>",
            "  </os>",
            # ACPI on, as QMP-mode test guests have it: without <acpi/> libvirt 9.0
            # passes -no-acpi, which QEMU 9.0 and later no longer accept.
            "  <features><acpi/></features>",
            "  <on_poweroff>destroy</on_poweroff>",
            "  <on_reboot>destroy</on_reboot>",
            "  <on_crash>destroy</on_crash>",
            "  <devices>",
            f"    <emulator>{escape(str(emulator or LIBVIRT_QEMU))}</emulator>",
            f"    <serial type='file'><source path='{escape(str(serial))}'/><target port='0'/></serial>",
            *[f"    <disk type='file' device='disk'><driver name='qemu' type='raw'/>"
              f"<source file='{escape(str(d))}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
              for i, d in enumerate(disks)],
            *[f"    {d}" for d in devices],
            "    <controller type='usb' model='none'/>",
            "    <memballoon model='none'/>",
            "  </devices>"]
        if qemu_args:
            parts.append("  <qemu:commandline>")
            parts += [f"    <qemu:arg value='{escape(str(a), {chr(39): '&apos;'})}'/>" for a in qemu_args]
            parts.append("  </qemu:commandline>")
        parts.append("</domain>")
        return "\n".join(parts) + "\n"

    # ------------------------------------------------------------ reporting
    @staticmethod
    def tail(path, n=25):
        try:
            lines = Path(path).read_bytes().decode("utf-8", "replace").splitlines()
        except OSError as e:
            return f"    <{path}: {e.strerror}>"
        return "\n".join("    " + l for l in lines[-n:]) or "    <empty>"

    def report(self):
        """Logs worth reading when a test failed."""
        out = [f"--- world {self.name} ({self.dir}): libvirtd.log", self.tail(self.daemon_log)]
        for log in sorted(self.qemu_log_dir.glob("*.log")):
            out += [f"--- world {self.name}: {log.name}", self.tail(log, 15)]
        return "\n".join(out)


class LibvirtWorlds:
    """The libvirt worlds of one test (one per simulated host) under one temp
    dir, all stopped by stop()."""

    def __init__(self, prefix="remus-lv-"):
        import tempfile
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.worlds = []

    def make(self, name, netns=None):
        """A world not started yet (e.g. to install hooks first)."""
        w = LibvirtWorld(self.dir / name, name=name, netns=netns)
        self.worlds.append(w)
        return w

    def start(self, name, netns=None):
        return self.make(name, netns=netns).start()

    def stop(self):
        for w in self.worlds:
            w.stop()

    def report(self):
        return "\n".join(w.report() for w in self.worlds)


def guest_files():
    """The test guest for libvirt domains: (kernel, initrd, counter GPA, kernel
    command line): the e2e tests' kernel and counter address (conftest.py)."""
    from conftest import COUNTER_GPA, INITRD, KERNEL
    kernel, gpa = KERNEL, COUNTER_GPA
    cmdline = (f"console=ttyS0 quiet memmap=64K${gpa:#x} remus.counter={gpa:#x} "
               "remus.dirty=10000 remus.wss=64 remus.check=1")
    return kernel, INITRD, gpa, cmdline


def skip_reason(probe):
    """Why the libvirt tests cannot run here, or None."""
    why = missing_requirements()
    if why:
        return why
    if not Path(probe).is_file():
        return f"{probe} is not built (cmake --build <build> --target libvirt_monitor_probe)"
    kernel, initrd, _, _ = guest_files()
    if not (Path(kernel).is_file() and Path(initrd).is_file()):
        return f"the test guest is not built ({kernel}; run scripts/build-guest.sh)"
    return None


def finish_worlds(request, ws):
    """Teardown for a test's worlds: stops them, then keeps their dir (and
    prints where, with each daemon's report) if the test failed, or removes it."""
    ws.stop()
    failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
    if failed:
        print(f"[libvirt] kept {ws.dir}\n{ws.report()}")
    else:
        shutil.rmtree(ws.dir, ignore_errors=True)
