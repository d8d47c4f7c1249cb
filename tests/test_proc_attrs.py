"""Process-wide state besides memory, threads and files, end to end on a
real target that checks itself (tests/targets/proc_attrs_target.py): each
kind is restored exactly, or the dump refuses it naming the object and the
option that accepts the loss."""

from __future__ import annotations

import json
import os
import sys

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import RestoreError
from checkpoint.restorer import restore
from test_dump_restore import Channel, reaper  # noqa: F401  (fixture)

TARGET = os.path.join(os.path.dirname(__file__), "targets", "proc_attrs_target.py")


class Run:
    def __init__(self, kind, tmp_path, reaper, *args):
        self.ch = Channel()
        self.p = self.ch.popen([sys.executable, TARGET, kind, *map(str, args)])
        self.pid = self.p.pid
        reaper.append(self.pid)
        self.reaper = reaper
        self.info = json.loads(self.ch.expect("READY").split(" ", 1)[1])
        self.images = tmp_path / "img"
        self.inherit = self.ch.inherit(self.pid)

    def check(self) -> str:
        return self.ch.ask("check", "CHECK")

    def dump(self, **kw):
        with Checkpointer(self.pid, self.images, **kw) as ck:
            st = ck.dump()
        self.p.wait(10)
        return st

    def restore(self, **kw):
        r = restore(self.images, inherit=self.inherit, inherit_stdio=False, **kw)
        self.reaper.append(r.pid)
        assert r.pid == self.pid
        return r

    def close(self):
        self.ch.close()


@pytest.fixture
def run(tmp_path, reaper):
    runs = []

    def _run(kind, *args):
        r = Run(kind, tmp_path, reaper, *args)
        runs.append(r)
        return r
    yield _run
    for r in runs:
        r.close()


@pytest.mark.skipif(os.cpu_count() < 2, reason="CPU affinity needs two CPUs to mean anything")
def test_scheduling_attributes_and_oom_score_adj(run):
    t = run("sched")
    assert t.check() == "CHECK ok"
    t.dump()
    t.restore()
    assert t.check() == "CHECK ok"
    # checked from outside too: the kernel's view of each thread
    assert os.sched_getscheduler(t.pid) == os.SCHED_BATCH
    assert os.getpriority(os.PRIO_PROCESS, t.pid) == 7
    assert os.sched_getscheduler(t.info["idle_tid"]) == os.SCHED_IDLE
    t.ch.send("quit\n")


def ids(pid: int) -> tuple[int, int]:
    return os.getsid(pid), os.getpgid(pid)


@pytest.mark.parametrize("kind", ["leader", "ctty", "group", "plain"])
def test_session_and_process_group_come_back(run, kind):
    t = run(kind)
    before = ids(t.pid)
    assert before == (t.info["sid"], t.info["pgid"])
    if kind in ("leader", "ctty"):
        assert before == (t.pid, t.pid)
    elif kind == "group":
        assert before == (os.getsid(0), t.pid)
    t.dump()
    t.restore()
    assert ids(t.pid) == before
    assert t.check() == "CHECK ok"
    t.ch.send("quit\n")


def _in_session_of_a_gone_leader(ch, stay: bool):
    """The target started by a process that made a new session and then
    exited (stay=False: its PID is free) or sleeps on (stay=True)."""
    code = ("import os, subprocess, sys, time; os.setsid(); "
            f"p = subprocess.Popen([sys.executable, {TARGET!r}, 'plain']); "
            "print('KEEPER', os.getpid(), flush=True); "
            + ("p.wait(); time.sleep(1000)" if stay else ""))
    return ch.popen([sys.executable, "-c", code])


def _refused_then_shell_job(ch, pid, images, inherit, reaper, match):
    """The restore refuses the dumped session by name; with --shell-job the
    copy joins this session and group, and runs."""
    with pytest.raises(RestoreError, match=match):
        restore(images, inherit=inherit, inherit_stdio=False)
    r = restore(images, inherit=inherit, inherit_stdio=False, shell_job=True)
    reaper.append(r.pid)
    assert ids(pid) == (os.getsid(0), os.getpgid(0))
    assert ch.ask("check", "CHECK") == "CHECK ok"


@pytest.mark.parametrize("stay", [False, True], ids=["leader-gone", "leader-alive"])
def test_session_whose_leader_is_elsewhere(tmp_path, reaper, stay):
    ch = Channel()
    try:
        wrapper = _in_session_of_a_gone_leader(ch, stay)
        reaper.append(wrapper.pid)
        sid = int(ch.expect("KEEPER").split()[1])
        info = json.loads(ch.expect("READY").split(" ", 1)[1])
        pid = info["pid"]
        reaper.append(pid)
        if not stay:
            wrapper.wait(10)
        assert ids(pid) == (sid, sid) and os.getsid(0) != sid
        inherit = ch.inherit(pid)
        images = tmp_path / "img"
        with Checkpointer(pid, images) as ck:
            ck.dump()
        if not stay:
            r = restore(images, inherit=inherit, inherit_stdio=False)
            reaper.append(r.pid)
            assert ids(pid) == (sid, sid)          # the same session, made again
            assert os.getsid(sid) == sid and os.getppid() != sid
            assert ch.ask("check", "CHECK") == "CHECK ok"
            os.kill(pid, 9)
            assert r.wait(10) == -9                # the keeper passes the status on
            assert not os.path.exists(f"/proc/{sid}")
            return
        _refused_then_shell_job(ch, pid, images, inherit, reaper, f"session {sid}.*--shell-job")
    finally:
        ch.close()


def test_children_are_refused_by_name_or_skipped(run):
    """Without the tree (tree=False: what live migration does), a process
    with children is refused naming them; --skip-children dumps it alone."""
    from checkpoint.errors import UnsupportedObject

    t = run("child")
    child = t.info["child"]
    try:
        with pytest.raises(UnsupportedObject, match=f"child process {child} \\(sleep\\).*"
                                                   "--skip-children"):
            with Checkpointer(t.pid, t.images, tree=False) as ck:
                ck.dump()
        assert not (t.images / "0.layer").exists()
        assert t.check() == "CHECK ok"            # refused: it runs on untouched
        t.dump(skip_children=True)
        t.restore()
        assert t.check() == "CHECK ok"
        assert os.path.exists(f"/proc/{child}")   # left running, not in the image
    finally:
        os.kill(child, 9)


def test_sysv_shared_memory_is_refused_by_name(run):
    """(A removed segment only the process holds is restored: test_fd_kinds.py, sysvshm.)"""
    from checkpoint.errors import UnsupportedObject

    import ctypes
    t = run("sysv")
    try:
        with pytest.raises(UnsupportedObject, match=f"SysV shared memory.*shmid "
                                                   f"{t.info['shmid']}.*{t.info['addr']:#x}"
                                                   ".*not removed"):
            with Checkpointer(t.pid, t.images) as ck:
                ck.dump()
        assert t.check() == "CHECK ok"
    finally:
        ctypes.CDLL(None).shmctl(t.info["shmid"], 0, None)  # IPC_RMID


def test_zombie_leader_is_refused_with_its_reason(spawn, tmp_path):
    from checkpoint.errors import UnsupportedObject
    from conftest import build_target

    t = spawn([build_target("zombie_leader")])
    t.expect("READY")
    with pytest.raises(UnsupportedObject, match="main thread of process .* has exited"):
        with Checkpointer(t.pid, tmp_path / "img") as ck:
            ck.pre_dump()


def test_read_only_shared_memory_keeps_its_pages_and_protection(run):
    """Pages of shared anonymous memory that is read-only or PROT_NONE now
    (the kernel refuses forced writes into such a mapping through
    /proc/PID/mem: it is filled writable, then protected as dumped)."""
    t = run("shared-ro")
    assert t.check() == "CHECK ok"
    t.dump()
    t.restore()
    assert t.check() == "CHECK ok"
    t.ch.send("quit\n")


def test_read_only_shared_file_mapping_may_become_writable(run, tmp_path):
    """A shared file mapping that is read-only but whose file was opened
    read-write (VM_MAYWRITE) can be made writable after restore, as before."""
    path = tmp_path / "data"
    path.write_bytes(b"r" * 4096)
    t = run("shared-file", path)
    t.dump()
    t.restore()
    assert t.check() == "CHECK ok"
    assert path.read_bytes()[:1] == b"W"   # the write went to the file
    t.ch.send("quit\n")


def test_verbose_dump_lists_what_it_found(run):
    import subprocess
    t = run("sched")
    out = subprocess.run([sys.executable, "-m", "checkpoint", "dump", "-t", str(t.pid), "-D",
                          str(t.images), "-v"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = [ln.split("found ", 1)[1] for ln in out.stderr.splitlines() if "found " in ln]
    assert "threads: 2" in found, found
    assert any(f.startswith("memory: ") and " VMAs (" in f for f in found), found
    assert any(f.startswith("files: ") and "pipe" in f for f in found), found
    assert "timers: 0 interval, 0 POSIX" in found, found
    assert "scheduling: 1 thread(s) SCHED_BATCH, 1 thread(s) SCHED_IDLE" in found, found


def test_sched_deadline_is_refused_by_name(spawn, tmp_path):
    """SCHED_DEADLINE (runtime, deadline, period) is not restored: the dump
    names the thread and says what to do."""
    import ctypes
    import struct
    from checkpoint.errors import UnsupportedObject

    t = spawn([sys.executable, "-c", "import sys, time; print('READY', flush=True); "
               "time.sleep(1000)"])
    t.expect("READY")
    # struct sched_attr: size, policy, flags, nice, priority, runtime, deadline, period
    attr = struct.pack("<IIQiIQQQ", 48, 6, 0, 0, 0, 1_000_000, 10_000_000, 10_000_000)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr)
    if libc.syscall(314, t.pid, buf, 0) != 0:  # sched_setattr
        pytest.skip(f"SCHED_DEADLINE not permitted here: {os.strerror(ctypes.get_errno())}")
    with pytest.raises(UnsupportedObject, match=f"thread {t.pid} runs under SCHED_DEADLINE"):
        with Checkpointer(t.pid, tmp_path / "img") as ck:
            ck.dump()
    assert not (tmp_path / "img" / "layer-0000.img").exists()


def test_group_of_a_gone_leader_in_a_gone_session_is_refused(tmp_path, reaper):
    """Session and group leaders both gone: a keeper could make the session
    but not the group; the restore refuses by name, --shell-job restores."""
    ch = Channel()
    try:
        code = ("import os, subprocess, sys\n"
                "os.setsid()\n"
                "g = os.fork()\n"
                "if g == 0:\n"
                "    os.setpgid(0, 0)\n"
                f"    p = subprocess.Popen([sys.executable, {TARGET!r}, 'plain'])\n"
                "    print('GROUP', os.getpid(), os.getsid(0), flush=True)\n"
                "    os._exit(0)\n"
                "os.waitpid(g, 0)\n")
        w = ch.popen([sys.executable, "-c", code])
        reaper.append(w.pid)
        _, gpid, sid = ch.expect("GROUP").split()
        info = json.loads(ch.expect("READY").split(" ", 1)[1])
        pid = info["pid"]
        reaper.append(pid)
        w.wait(10)
        assert ids(pid) == (int(sid), int(gpid)) and not os.path.exists(f"/proc/{gpid}")
        inherit = ch.inherit(pid)
        images = tmp_path / "img"
        with Checkpointer(pid, images) as ck:
            ck.dump()
        _refused_then_shell_job(ch, pid, images, inherit, reaper,
                                f"process group {gpid} of session {sid}.*--shell-job")
    finally:
        ch.close()
