"""Every kind of fd, end to end on a real target that checks itself: dump,
kill, restore, and the restored program finds its fd as it was and working
(tests/targets/fd_kinds_target.py). Every kind the state table marks
refused makes the dump fail with one line naming the fd, and with the
option the dump goes on and a restore with a stand-in runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time

import pytest

from checkpoint import state
from checkpoint.dumper import Checkpointer
from checkpoint.errors import UnsupportedObject
from checkpoint.images import open_chain
from checkpoint.kernel.syscalls import pidfd_getfd, pidfd_open
from checkpoint.restorer import restore
from test_dump_restore import Channel

TARGET = os.path.join(os.path.dirname(__file__), "targets", "fd_kinds_target.py")


@pytest.fixture
def reaper():
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


class Run:
    """One target of one kind with its channel, dumped and restored on demand."""

    def __init__(self, kind, tmp_path, reaper):
        self.ch = Channel()
        self.tmp = tmp_path
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.p = self.ch.popen([sys.executable, TARGET, kind, str(self.work)])
        self.pid = self.p.pid
        reaper.append(self.pid)
        self.reaper = reaper
        self.info = json.loads(self.ch.expect("READY").split(" ", 1)[1])
        self.images = tmp_path / "img"

    def state(self) -> str:
        return self.ch.ask("check", "STATE")

    def dump(self, **kw):
        self.stdio = self.ch.inherit(self.pid)
        with Checkpointer(self.pid, self.images, **kw) as ck:
            return ck.dump()

    def restore(self, inherit=None, **kw):
        self.p.wait(10)
        r = restore(self.images, inherit={**self.stdio, **(inherit or {})},
                    inherit_stdio=False, **kw)
        self.reaper.append(r.pid)
        return r

    def files(self):
        with open_chain(self.images) as chain:
            return [m for _, m in chain.records("files")][-1]


@pytest.fixture
def run(tmp_path, reaper):
    made = []

    def start(kind):
        r = Run(kind, tmp_path, reaper)
        made.append(r)
        return r
    yield start
    for r in made:
        r.ch.close()


def test_procfs_files_are_the_restored_process(run):
    """/proc/stat at its offset, the process's own /proc/self/status and
    /proc/self directory: with a new PID they are the new PID's."""
    t = run("procfs")
    assert t.state() == "STATE ok"
    t.dump()
    e = {x.fd: x for x in t.files().fds}
    own = e[t.info["status"]]
    assert own.procfs.own and own.procfs.rest == "/status"
    assert not e[t.info["stat"]].procfs.own and e[t.info["stat"]].path == "/proc/stat"
    r = t.restore(new_pids=True)
    assert r.pid != t.pid
    assert t.state() == "STATE ok"


def test_procfs_files_same_pid(run):
    t = run("procfs")
    t.dump()
    t.restore()
    assert t.state() == "STATE ok"


def test_epoll_registrations_of_moved_and_reused_fds(run):
    t = run("epoll")
    assert t.state() == "STATE ok"
    t.dump()
    ep = {x.fd: x for x in t.files().fds}[t.info["ep"]]
    regs = {r.tfd: (r.file_fd if r.HasField("file_fd") else None) for r in ep.epoll}
    assert regs == {t.info["r1"]: t.info["r1_moved"], t.info["r2"]: t.info["r2_moved"],
                    t.info["r3"]: None}
    t.restore()
    assert t.state() == "STATE ok"
    assert t.state() == "STATE ok"


def test_memfd_mapped_and_held_is_one_object(run):
    t = run("memfd")
    assert t.state() == "STATE ok"
    t.dump()
    t.restore()
    assert t.state() == "STATE ok"


def test_inherited_stand_in_gets_the_dumped_status_flags(run):
    """A socket left to the restore side (--external-fds) and given back with
    --inherit-fd: the stand-in (blocking here) gets the dumped O_NONBLOCK."""
    t = run("inherit")
    with pytest.raises(UnsupportedObject):
        t.dump()
    t.dump(external_fds=True)
    import fcntl
    a, b = socket.socketpair()
    try:
        assert not fcntl.fcntl(a.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        t.restore(inherit={f"fd{t.info['sock']}": a.fileno(), f"fd{t.info['peer']}": b.fileno()})
        assert t.state() == "STATE ok"
        assert fcntl.fcntl(a.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # one description, shared with the stand-in's giver
    finally:
        a.close()
        b.close()


def test_inotify_watches_keep_their_wds(run):
    t = run("inotify")
    assert t.state() == "STATE ok"
    t.dump()
    e = {x.fd: x for x in t.files().fds}[t.info["inotify"]]
    assert [(w.wd, w.path) for w in e.inotify] == [
        (t.info["wd_dir"], str(t.work / "watched")), (t.info["wd_file"], str(t.work / "file"))]
    t.restore()
    assert t.state() == "STATE ok"
    assert t.state() == "STATE ok"


def test_inotify_watch_gone_at_restore_is_refused(run):
    from checkpoint.errors import RestoreError
    t = run("inotify")
    t.dump()
    os.rename(t.work / "file", t.work / "moved")
    with pytest.raises(RestoreError, match=rf"fd {t.info['inotify']} .*watched "
                                           rf"{re.escape(str(t.work))}/file .*is gone"):
        t.restore()


def test_timerfd_counts_what_it_missed_while_dumped(run):
    """Unread expirations of a periodic timer, a one-shot that expires while
    no process runs (it fires after restore), a disarmed timer."""
    t = run("timerfd")
    t.dump()
    e = {x.fd: x for x in t.files().fds}
    per = e[t.info["periodic"]].timerfd
    assert per.clockid == 1 and per.interval_ns == 100_000_000 and per.ticks >= 3
    assert e[t.info["oneshot"]].timerfd.value_ns > 0
    assert e[t.info["idle"]].timerfd.value_ns == 0
    time.sleep(1.6)  # the one-shot expires now, while no process runs
    t.restore()
    assert t.state() == "STATE ok"  # it fired once, the periodic one counted every period


def test_tty_settings_and_window_size(run):
    t = run("tty")
    assert t.state() == "STATE ok"
    t.dump()
    t.restore()
    assert t.state() == "STATE ok"


def test_tty_stand_in_gets_the_settings_keeps_its_size(run):
    """A terminal given with --inherit-fd (the restorer's) gets the dumped
    termios (raw stays raw); its window size stays its own, and the process
    gets one SIGWINCH since it differs from the dumped one."""
    import fcntl
    import pty
    import struct
    import termios
    t = run("tty-inherit")
    t.dump()
    m, s = pty.openpty()
    try:
        fcntl.ioctl(s, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert termios.tcgetattr(s)[:6] != t.info["attrs"]  # cooked
        t.restore(inherit={f"fd{t.info['slave']}": s})
        assert termios.tcgetattr(s)[:6] == t.info["attrs"]
        assert t.state() == "STATE ok"
    finally:
        os.close(m)
        os.close(s)


# --------------------------------------------------------------------------
# refused kinds: one target each, the one line, and --external-fds

REFUSED = {
    # state-table kind name -> [(target kind, what the line says)]
    "unix sockets connected outside the dumped processes (or to a server whose process "
    "lacks the listener), listeners with clients waiting from outside the dump, waiting "
    "clients that sent data, bound sockets with unread data": [
        ("unix-pending", "a unix socket"), ("unix-bound", "a unix socket"),
        ("unix-outside", "a unix socket")],
    "file descriptors in flight (SCM_RIGHTS queued, not yet received)": [
        ("scm-rights", "a unix socket")],
    "unread data on a socket with SO_PASSCRED": [("passcred", "a unix socket")],
    # (an established connection without --tcp-established: the same line)
    "TCP listeners with connections waiting, UDP sockets with unread "
    "data, packet and other sockets": [("tcp", "a TCP connection"), ("packet", "a socket")],
    "netlink sockets with a message unread": [("netlink", "a netlink socket")],
    "fanotify, pidfd, io_uring, userfaultfd, other devices": [
        ("pidfd", "a pidfd"), ("fanotify", "a fanotify instance"),
        ("io_uring", "an io_uring instance"), ("userfaultfd", "a userfaultfd"),
        ("chardev", "a character device")],
    "shared anonymous or SysV shared memory held as an fd": [
        ("shmem", "shared anonymous memory held as an fd"),
        ("sysvshm", "SysV shared memory held as an fd")],
    "files of another process's /proc": [("procfs-other", "a file of /proc of another "
                                                          "process")],
    "inotify instances with queued events, or watching a deleted file": [
        ("inotify-queued", "an inotify instance"), ("inotify-deleted", "an inotify instance")],
    "file leases": [("lease", "a file holding a lease")],
    "deleted directories, FIFOs, devices and O_PATH files held open": [
        ("deleted-dir", "a deleted directory")],
    "hugetlb memfds": [("hugetlb-memfd", "a hugetlb memfd")],
    "epoll registrations of files no fd holds": [("epoll-orphan", "an epoll instance")],
}
CASES = [c for cases in REFUSED.values() for c in cases]


def test_every_refused_fd_kind_has_a_case():
    fd_refused = {k.name for k in state.KINDS if k.status == state.REFUSED
                  and k.room.startswith("objects/fds/")}
    assert fd_refused == set(REFUSED) | {"a deleted working directory"}


def test_deleted_cwd_is_refused_naming_it(run):
    t = run("deleted-cwd")
    with pytest.raises(UnsupportedObject) as exc:
        t.dump(external_fds=True, file_locks=True)  # no option accepts it
    assert str(exc.value) == (f"the working directory of process {t.pid} was deleted "
                              f"({t.work}/cwd (deleted)); restoring it is not supported")
    assert t.state() == "STATE ok"


@pytest.mark.parametrize("kind,what", CASES, ids=[c[0] for c in CASES])
def test_refused_kind_names_the_fd_and_the_option(run, kind, what):
    t = run(kind)
    fd = t.info["fd"]
    if kind == "epoll-orphan":  # the pipe lives on in the test only
        pidfd = pidfd_open(t.pid)
        held = pidfd_getfd(pidfd, t.info["pipe"])
        os.close(pidfd)
        t.ch.ask(f"close {t.info['pipe']}", "CLOSED")
    with pytest.raises(UnsupportedObject) as exc:
        t.dump()
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"fd {fd} is {what}")
    assert "--external-fds" in line and exc.value.exit_code == 6
    assert t.state() == "STATE ok"  # the failed dump left it running
    t.dump(external_fds=True)
    e = {x.fd: x for x in t.files().fds}
    assert e[fd].external
    with open("/dev/null") as stand_in:
        given = {f"fd{x.fd}": stand_in.fileno() for x in e.values() if x.external}
        if kind == "epoll-orphan":   # its pipe's write end lost its reader: a stand-in too
            given.update({f"fd{x.fd}": stand_in.fileno() for x in e.values()
                          if x.path.startswith("pipe:") and x.fd > 2})
        t.restore(inherit=given)
    assert t.state() == "STATE ok"
    if kind == "epoll-orphan":
        os.close(held)
