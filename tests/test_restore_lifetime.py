"""A dying restore leaves nothing behind: the engine SIGKILLed or Ctrl-C'd
at random and at chosen points of a restore leaves no process holding the
dumped PID, nothing stopped or traced, no holder of its stdout; the next
restore works. And --pidfile: no symlink followed, no predictable
temporary name, a missing directory refused before anything is restored."""

from __future__ import annotations

import ctypes
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.kernel.syscalls import libc
from checkpoint.restorer import restore
from conftest import build_target, proc_state, tracer_of
from test_dump_restore import Channel, check_ok

CLI = [sys.executable, "-m", "checkpoint"]
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper():
    """Orphans of a killed engine come to this test process (not to an init
    that may not reap), so the test sees and reaps them by PID."""
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    adopted: list[int] = []
    yield adopted
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    for pid in adopted:
        _kill_reap(pid)


def _kill_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


class Image:
    def __init__(self, pid, images, ch, keys):
        self.pid, self.images, self.ch, self.keys = pid, images, ch, keys

    def inherit_args(self) -> tuple[list[str], tuple[int, int]]:
        """The restored copy gets the test's ends of its stdin/stdout pipes
        (not the engine's stdout): it lives on, and answers."""
        fds = (self.ch.in_r, self.ch.out_w)
        return [f"--inherit-fd=fd[{fd}]:{key}" for fd, key in zip(fds, self.keys)], fds


@pytest.fixture
def image(tmp_path):
    """A dumped restore_target (6 threads, 16 MiB, files, pipes)."""
    data = tmp_path / "data.bin"
    data.write_bytes(b"D" * 4096 + b"E" * 4096 + b"F" * 4096)  # what restore_target checks
    work = tmp_path / "work"
    work.mkdir()
    ch = Channel()
    p = ch.popen([build_target("restore_target"), work, data])
    ch.expect("READY")
    keys = [os.readlink(f"/proc/{p.pid}/fd/{n}") for n in (0, 1)]
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    p.wait(10)
    yield Image(p.pid, tmp_path / "img", ch, keys)
    ch.close()


def read_to_eof(fd: int, timeout: float) -> bytes:
    """What `$(...)` does with the engine's stdout: read until every writer
    is gone. Fails when something still holds the pipe after ``timeout``."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the engine's stdout is still held open by some process"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                return out
            out += chunk


def settle(pid: int, engine: int, tree: set[int], adopted: list[int]) -> str:
    """After the engine died: wait until the dumped PID is free or is the
    complete restored program (the kill came after the restore); reap what
    was orphaned to us. Returns "free" or "restored"."""
    deadline = time.monotonic() + 5
    for p in tree | {pid}:
        adopted.append(p)
    while True:
        for p in tree | {pid}:
            if proc_state(p) == "Z":
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass
        alive = {p: proc_state(p) for p in tree | {pid} if proc_state(p) not in ("", "Z", "X")}
        stopped = {p: s for p, s in alive.items() if s in ("t", "T")}
        if not alive:
            return "free"
        restored = pid in alive and _is_restored(pid)
        if restored and set(alive) == {pid} and not stopped:
            return "restored"
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind after the engine {engine} died: {alive} "
                                 f"(stopped/traced: {stopped}, tracer of {pid}: "
                                 f"{tracer_of(pid)})")
        time.sleep(0.01)


def _is_restored(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe.endswith("/restore_target") and tracer_of(pid) == 0 and \
        len(os.listdir(f"/proc/{pid}/task")) == 6


def run_and_kill(img: Image, adopted, *, delay=None, at=None, sig=signal.SIGKILL,
                 extra=()) -> tuple[str, int]:
    """Start `checkpoint restore -d`, kill it after ``delay`` s or when its
    stderr (-v) shows ``at`` (or ``at`` is a callable that says so), then
    check what is left. Returns (outcome, engine status)."""
    pid = img.pid
    args, fds = img.inherit_args()
    eng = subprocess.Popen([*CLI, "restore", "-D", img.images, "-d", "-v",
                            "--no-inherit-stdio", *args, *extra], pass_fds=fds,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        err = b""
        if delay is not None:
            time.sleep(delay)
        else:
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, f"never reached {at!r}: {err!r}"
                if callable(at):
                    if at(eng.pid):
                        break
                    time.sleep(0.0002)
                    continue
                r, _, _ = select.select([eng.stderr], [], [], 0.5)
                if r:
                    chunk = os.read(eng.stderr.fileno(), 4096)
                    err += chunk
                    if at.encode() in err or not chunk:
                        break
        tree = descendants(eng.pid)
        eng.send_signal(sig)
        tree |= descendants(eng.pid)
        status = eng.wait(20)
        read_to_eof(eng.stdout.fileno(), 10)
        return settle(pid, eng.pid, tree, adopted), status
    finally:
        if eng.poll() is None:
            eng.kill()
            eng.wait()
        eng.stdout.close()
        eng.stderr.close()


def placeholder_started(pid):
    return lambda eng: proc_state(pid) not in ("", "Z") and tracer_of(pid) == 0


def placeholder_traced(pid):
    return lambda eng: tracer_of(pid) == eng


POINTS = ["building PID", "pages written", "restored PID"]


def test_engine_killed_anywhere_leaves_nothing(image, subreaper):
    pid = image.pid
    args, fds = image.inherit_args()
    t0 = time.monotonic()
    res = subprocess.run([*CLI, "restore", "-D", image.images, "-d", "--no-inherit-stdio",
                          *args], pass_fds=fds, capture_output=True, text=True, timeout=60)
    full = time.monotonic() - t0
    assert res.returncode == 0 and int(res.stdout) == pid, res.stderr
    subreaper.append(pid)
    check_ok(image.ch, pid)
    _kill_reap(pid)
    outcomes = []
    for at in (placeholder_started(pid), placeholder_traced(pid), *POINTS):
        outcomes.append(run_and_kill(image, subreaper, at=at)[0])
        if outcomes[-1] == "restored":
            _kill_reap(pid)
    assert outcomes == ["free"] * 4 + ["restored"], outcomes  # after the build it lives on
    rng = random.Random(1234)
    for _ in range(30):
        outcome, _ = run_and_kill(image, subreaper, delay=rng.uniform(0, full * 1.1))
        outcomes.append(outcome)
        if outcome == "restored":
            _kill_reap(pid)
    mid = outcomes[5:].count("free")
    print(f"engine run {full * 1000:.0f} ms; of 30 random kills {mid} landed before the "
          f"restore was complete, {30 - mid} after")
    assert mid >= 5, outcomes  # the random kills did land inside restores
    _restore_works(image)


@pytest.mark.parametrize("at", POINTS[:2])
def test_ctrl_c_mid_restore_leaves_nothing(image, subreaper, at):
    outcome, status = run_and_kill(image, subreaper, at=at, sig=signal.SIGINT)
    assert outcome == "free" and status == 130
    _restore_works(image)


@pytest.mark.parametrize("at", ["placeholder", *POINTS[:2]])
def test_pid_ns_engine_killed_leaves_nothing(image, subreaper, at):
    """--pid-ns: the keeper and the namespace's init die with the engine too."""
    def in_ns(eng):  # the namespace's placeholder exists
        return len(descendants(eng)) >= 3
    outcome, _ = run_and_kill(image, subreaper, at=in_ns if at == "placeholder" else at,
                              extra=("--pid-ns",))
    assert outcome == "free"


def _restore_works(image: Image) -> None:
    """The PID is free again: a restore succeeds and the copy answers."""
    inherit = dict(zip(image.keys, (image.ch.in_r, image.ch.out_w)))
    r = restore(image.images, inherit=inherit, inherit_stdio=False)
    try:
        assert r.pid == image.pid and _is_restored(image.pid)
        check_ok(image.ch, image.pid)
    finally:
        r.kill()
        r.wait(10)


# --------------------------------------------------------------------------
# --pidfile


@pytest.fixture
def sleeper(tmp_path):
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # the restored copy holds no engine fd
    time.sleep(0.1)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    p.wait(10)
    return p.pid, tmp_path / "img"


def _restore_cli(images, *args):
    return subprocess.Popen([*CLI, "restore", "-D", images, "-d", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pidfile_replaces_a_planted_symlink_never_follows_it(sleeper, tmp_path, subreaper):
    pid, images = sleeper
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile = tmp_path / "restored.pid"
    os.symlink(victim, pidfile)
    eng = _restore_cli(images, "--pidfile", pidfile)
    # the old engine wrote FILE.tmp<its PID> first: plant that name too
    old_tmp = f"{pidfile}.tmp{eng.pid}"
    os.symlink(victim, old_tmp)
    out, err = eng.communicate(timeout=60)
    subreaper.append(pid)
    assert eng.returncode == 0, err
    assert victim.read_text() == "precious\n"
    st = os.stat(pidfile, follow_symlinks=False)
    assert not os.path.islink(pidfile) and (st.st_mode & 0o777) == 0o644
    assert pidfile.read_text() == f"{pid}\n" == out
    assert os.path.islink(old_tmp)  # untouched, not written through
    assert sorted(os.listdir(tmp_path)) == sorted(["img", "victim", "restored.pid",
                                                   os.path.basename(old_tmp)])
    _kill_reap(pid)


def test_pidfile_in_a_missing_directory_fails_before_restoring(sleeper, tmp_path):
    pid, images = sleeper
    eng = _restore_cli(images, "--pidfile", tmp_path / "nodir" / "x.pid")
    out, err = eng.communicate(timeout=60)
    assert eng.returncode == 2 and out == ""
    assert err.count("\n") == 1 and "does not exist" in err, err
    assert proc_state(pid) == ""  # nothing was restored
