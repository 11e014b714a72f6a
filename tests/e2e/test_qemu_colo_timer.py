"""The primary QEMU survives the end of a COLO session while its checkpoint
timer's callback runs (scripts/qemu-patches/0003).

QEMU 7.2's COLO thread freed the checkpoint timer and destroyed its event
without the BQL, while the timer's callback (main loop, BQL held) could be
running and about to re-arm that timer: the primary QEMU then aborted
("malloc(): unsorted double linked list corrupted" in a CI run, or
"qemu_event_set: Assertion `ev->initialized' failed"). The window is a few
microseconds, so the test does not wait for luck: gdb holds the main thread
inside the callback, after the timer list has let go of the timer, and lets
the COLO thread run until it next asks for the BQL. Unpatched, the COLO thread
frees the timer first and the callback then uses it; patched, it asks for the
BQL before it frees anything, and frees once the callback has returned.
"""

import subprocess
import time

from conftest import DOMAIN, tail

GDB_SCRIPT = r"""
set pagination off
set confirm off
handle SIGUSR1 SIGUSR2 SIGPIPE nostop noprint pass
# 1. The COLO thread, after the failover bottom half let it go on, just
#    before it tears its session down.
break qemu_sem_destroy if $_caller_is("colo_process_checkpoint")
echo \nREMUS-STEP attached\n
continue
echo \nREMUS-STEP colo-thread-tears-down\n
python colo = gdb.selected_thread().num
delete
# 2. Only the main thread runs, until the timer's callback begins: the timer
#    list has taken the timer off and dropped its lock; the BQL is held.
set scheduler-locking on
thread 1
break colo_checkpoint_notify
continue
echo \nREMUS-STEP callback-running\n
bt 3
delete
# 3. Only the COLO thread runs, until it next asks for the BQL (unpatched:
#    after it freed the timer; patched: before).
python gdb.execute("thread %d" % colo)
python gdb.execute("break qemu_mutex_lock_iothread_impl thread %d" % colo)
continue
echo \nREMUS-STEP colo-thread-wants-the-bql\n
bt 3
delete
# 4. Everything runs on.
set scheduler-locking off
echo \nREMUS-STEP released\n
detach
quit
"""


def test_session_end_while_the_checkpoint_timer_fires(world, tmp_path):
    guest = world.start_guest(wait_boot=False)
    primary = world.start_primary()
    world.wait_booted(guest)
    backup = world.start_backup(name="B", auto_promote=False)
    world.protect(primary, backup, guest, interval_ms=30)
    world.wait_status(primary, lambda s: s["state"] == "protected", 90, "protected")

    script = tmp_path / "race.gdb"
    script.write_text(GDB_SCRIPT)
    log_path = tmp_path / "gdb.log"
    with open(log_path, "w") as log:
        gdb = subprocess.Popen(["gdb", "-q", "-nx", "-p", str(guest.pid), "-x", str(script)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        world.wait_for(lambda: "REMUS-STEP attached" in log_path.read_text(), 60, "gdb attached to the primary QEMU")
        # The backup ends the session: A's QEMU gets a stream error, remusd
        # sends x-colo-lost-heartbeat, and the COLO thread tears down.
        backup.ctl("failover", DOMAIN, timeout=120)
        world.wait_for(lambda: "REMUS-STEP released" in log_path.read_text() or gdb.poll() is not None,
                       90, "gdb to force the interleaving")
        gdb.wait(timeout=30)
    finally:
        if gdb.poll() is None:
            gdb.kill()
    text = log_path.read_text()
    for step in ("colo-thread-tears-down", "callback-running", "colo-thread-wants-the-bql", "released"):
        assert f"REMUS-STEP {step}" in text, f"gdb did not force the interleaving (no step {step}); its log:\n{text[-4000:]}"
    assert "colo_checkpoint_notify" in text.split("REMUS-STEP callback-running")[1].split("REMUS-STEP")[0], text[-4000:]

    time.sleep(1)
    assert guest.alive(), (f"the primary QEMU died (exit {guest.proc.returncode}) when its COLO session ended "
                           f"during the timer callback; its log:\n{tail(guest.dir / 'qemu.log', 10)}\ngdb:\n{text[-3000:]}")
    # It left COLO and its guest runs on, unprotected.
    world.wait_status(primary, lambda s: s["state"] == "unprotected", 60, "A unprotected")
    c0 = guest.counter()
    time.sleep(1)
    assert guest.counter() > c0, "the primary guest does not run after the session ended"
    assert guest.qmp.execute("query-status")["status"] == "running"
