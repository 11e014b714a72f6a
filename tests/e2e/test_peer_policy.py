"""What a backup accepts from an authenticated primary (docs/operator-guide.md
section 15): a real remusd backup, and tests/tools/link_peer as a primary that
holds the key (so TLS lets it in) but sends a hostile CONFIG. Each must be
refused with the reason in an ERROR frame, before anything is written or
started, and the backup must never promote it. (The primary's binary path is
never run at all: the backup runs its own --qemu, or the qemu-system-ARCH of
that name from its own PATH; replicator/backup/domain_test.cc covers that.)"""

import json
import subprocess
import time

import pytest

from conftest import BUILD, read_text, tail

LINK_PEER = BUILD / "tests" / "link_peer"

BASE = {"domain": "evil", "qemu_version": "7.2.0", "accelerator": "tcg", "interval_ms": 100,
        "heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 1000, "session": "s1", "arbiter": "none"}

CASES = {
    "tap-script": (["qemu-system-x86_64", "-m", "64", "-netdev",
                    "tap,id=n0,ifname=evil0,script=/tmp/evil.sh,downscript=no"], None, "-netdev"),
    "add-fd": (["qemu-system-x86_64", "-m", "64", "-add-fd", "fd=3,set=1"], None, "-add-fd"),
    "virtfs": (["qemu-system-x86_64", "-m", "64", "-virtfs",
                "local,path=/,mount_tag=root,security_model=passthrough"], None, "-virtfs"),
    "unknown-option": (["qemu-system-x86_64", "-m", "64", "-plugin", "/tmp/evil.so"], None, "-plugin"),
    "qemu-commandline": (["qemu-system-x86_64"],
                         "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                         "<name>evil</name><memory unit='KiB'>65536</memory><os><type>hvm</type></os><devices/>"
                         "<qemu:commandline><qemu:arg value='-plugin'/><qemu:arg value='/tmp/evil.so'/>"
                         "</qemu:commandline></domain>", "qemu:commandline"),
    "hostdev": (["qemu-system-x86_64"],
                "<domain type='kvm'><name>evil</name><memory unit='KiB'>65536</memory><os><type>hvm</type></os>"
                "<devices><hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='2' "
                "function='0'/></source></hostdev></devices></domain>", "hostdev"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_config_is_refused_before_anything_is_written(world, case):
    assert LINK_PEER.exists(), f"{LINK_PEER} is missing: build the tree (scripts/build.sh)"
    argv, xml, names = CASES[case]
    backup = world.start_backup()
    cfg = dict(BASE, argv=argv)
    if xml:
        cfg["libvirt"] = {"xml": xml, "name": "evil", "uri": "qemu:///system"}
    path = world.dir / f"{case}.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([str(LINK_PEER), "--connect", backup.listen, "--key-file", str(world.key), "--domain", "evil",
                        "--config", str(path), "--timeout-ms", "5000"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"link_peer: {r.returncode}\n{r.stdout}{r.stderr}"
    frames = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    errors = [f for f in frames if f.get("type") == "ERROR"]
    assert errors, f"the backup answered a hostile CONFIG without an ERROR: {frames}\n{tail(backup.log)}"
    err = errors[0]["payload"]
    assert err["code"] == "PERMISSION_DENIED", err
    assert names in err["message"] and "refuses to protect" in err["message"], err
    assert not any(f.get("type") in ("ACK",) for f in frames), frames
    # Nothing written, nothing started, and no promotion past the heartbeat timeout.
    time.sleep(1.5)
    assert not backup.domain_dir("evil").exists(), f"the backup wrote {backup.domain_dir('evil')}"
    st = backup.status("evil")
    assert st is None or st["state"] == "unprotected", st
    if st:
        assert names in st["error"], st
    assert names in read_text(backup.log), tail(backup.log)
    assert not (world.dir / "B" / "domains" / "evil" / "promoted.json").exists()
