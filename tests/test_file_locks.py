"""File locks: a sqlite3 writer in an open transaction is dumped with
--file-locks, killed and restored; a second writer blocked on its locks
stays blocked until the restored one commits, and no row is lost.

A dead process's locks are let go by the kernel: between the kill and the
restore nothing holds them (as with CRIU). The test stops the competing
writer for that window; what it shows is that the restored process has its
locks again before it runs, so the competitor stays blocked until the
restored transaction commits."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import UnsupportedObject
from checkpoint.objects.fds.locks import parse_lock
from checkpoint.restorer import RestoreError, restore
from test_dump_restore import Channel

TARGET = os.path.join(os.path.dirname(__file__), "targets", "sqlite_target.py")


def posix_locks(pid: int) -> list[tuple]:
    with open("/proc/locks") as f:
        return sorted(got for got in map(parse_lock, f) if got and got[4] == pid)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "data.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (v TEXT)")
    con.execute("INSERT INTO t VALUES ('first')")
    con.commit()
    con.close()
    return path


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in started:
        pid = p if isinstance(p, int) else p.pid
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _waiter(db, procs):
    w = subprocess.Popen([sys.executable, TARGET, str(db), "wait"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    procs.append(w)
    assert w.stdout.readline().strip() == "WAITING"
    return w


def _still_blocked(w, secs: float) -> bool:
    import select
    r, _, _ = select.select([w.stdout], [], [], secs)
    return not r and w.poll() is None


def test_sqlite_transaction_keeps_its_locks_across_restore(db, tmp_path, procs):
    ch = Channel()
    holder = ch.popen([sys.executable, TARGET, str(db), "hold"])
    procs.append(holder)
    ch.expect("READY")
    held = posix_locks(holder.pid)
    assert held, "sqlite holds POSIX locks in its write transaction"
    w = _waiter(db, procs)
    assert _still_blocked(w, 0.5)

    # without --file-locks: one line naming the fd and the lock
    with pytest.raises(UnsupportedObject) as exc:
        with Checkpointer(holder.pid, tmp_path / "refused") as ck:
            ck.dump()
    line = str(exc.value)
    assert "\n" not in line and f"({db})" in line and line.startswith("fd ")
    assert "POSIX" in line and "--file-locks" in line
    assert posix_locks(holder.pid) == held and _still_blocked(w, 0.2)

    stdio = ch.inherit(holder.pid)
    os.kill(w.pid, signal.SIGSTOP)  # nothing holds the locks between kill and restore
    with Checkpointer(holder.pid, tmp_path / "img", file_locks=True) as ck:
        ck.dump()
    holder.wait(10)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    procs.append(r.pid)
    assert [x[:4] for x in posix_locks(r.pid)] == [x[:4] for x in held]
    os.kill(w.pid, signal.SIGCONT)
    assert _still_blocked(w, 1.5), "the waiter got the lock while the restored one holds it"

    assert ch.ask("commit", "COMMITTED") == "COMMITTED"
    assert w.stdout.readline().strip() == "GOT"
    assert w.stdout.readline().strip() == "COUNT 3"  # first, held, waiter: no row lost
    assert ch.ask("count", "COUNT") == "COUNT 3"
    con = sqlite3.connect(db)
    assert sorted(v for (v,) in con.execute("SELECT v FROM t")) == ["first", "held", "waiter"]
    con.close()
    ch.close()


def test_a_lock_taken_meanwhile_fails_the_restore(db, tmp_path, procs):
    """Another process took the lock after the dump let it go: the restore
    fails naming the fd and the lock, and leaves nothing behind."""
    ch = Channel()
    holder = ch.popen([sys.executable, TARGET, str(db), "hold"])
    procs.append(holder)
    ch.expect("READY")
    stdio = ch.inherit(holder.pid)
    with Checkpointer(holder.pid, tmp_path / "img", file_locks=True) as ck:
        ck.dump()
    holder.wait(10)
    # another process takes sqlite's RESERVED byte (a plain fcntl lock: it
    # does not touch the journal the restored transaction needs)
    thief = subprocess.Popen([sys.executable, "-c", (
        "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR);"
        "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1073741825);"
        "print('HOLD', flush=True); sys.stdin.read()"), str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(thief)
    assert thief.stdout.readline().strip() == "HOLD"
    with pytest.raises(RestoreError, match=r"fd \d+ \(.*data.db\): cannot take back a POSIX "
                                           r"write lock .*another process holds"):
        restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    assert not os.path.exists(f"/proc/{holder.pid}")  # the half-built one is gone
    ch.close()


@pytest.mark.parametrize("how", ["flock", "ofd"])
def test_flock_and_ofd_locks_are_taken_again(tmp_path, procs, how):
    ch = Channel()
    prog = (
        "import fcntl, os, struct, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "if sys.argv[2] == 'flock': fcntl.flock(fd, fcntl.LOCK_SH)\n"
        "else: fcntl.fcntl(fd, 37, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 10, 5, 0))\n"
        "print('READY', flush=True)\n"
        "for line in sys.stdin:\n"
        "    print('LOCKS', ' '.join(l.split(None, 1)[1].split()[0] for l in\n"
        "          open(f'/proc/self/fdinfo/{fd}') if l.startswith('lock:')), flush=True)\n")
    path = tmp_path / "f"
    p = ch.popen([sys.executable, "-c", prog, str(path), how])
    procs.append(p)
    ch.expect("READY")
    want = ch.ask("x", "LOCKS")
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img", file_locks=True) as ck:
        ck.dump()
    p.wait(10)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    procs.append(r.pid)
    assert ch.ask("x", "LOCKS") == want
    # the lock is real: another open file description cannot take it
    import fcntl
    import struct
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            if how == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 12, 1, 0))
    finally:
        os.close(fd)
    ch.close()


def test_cli_dump_refuses_locks_without_the_option(db, tmp_path, procs):
    """checkpoint dump: exit 6 and one line naming --file-locks; with it the
    dump goes on (and the target is killed as after any dump)."""
    ch = Channel()
    holder = ch.popen([sys.executable, TARGET, str(db), "hold"])
    procs.append(holder)
    ch.expect("READY")
    cli = [sys.executable, "-m", "checkpoint", "dump", "-t", str(holder.pid)]
    res = subprocess.run([*cli, "-D", str(tmp_path / "a")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 6, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--file-locks" in lines[0] and "POSIX" in lines[0]
    assert holder.poll() is None and posix_locks(holder.pid)
    res = subprocess.run([*cli, "-D", str(tmp_path / "b"), "--file-locks"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    holder.wait(10)
    ch.close()
