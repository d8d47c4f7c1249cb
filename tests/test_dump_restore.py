"""Dump and restore of real processes, end to end: pre-dumps, a final dump,
kill, restore, and the restored program proving its own state."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import CheckpointError, ImageError, TargetExited
from checkpoint.images import open_chain
from checkpoint.kernel import procfs
from checkpoint.restorer import RestoreError, restore
from conftest import build_target, proc_state, read_pty, tracer_of

PS = procfs.PAGE_SIZE


class Channel:
    """stdin/stdout pipes of a target that survive its restore: the test
    keeps its ends, the restored process gets the other ends back."""

    def __init__(self):
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.lines: list[str] = []
        self._buf = b""

    def popen(self, argv, **kw):
        p = subprocess.Popen(argv, stdin=self.in_r, stdout=self.out_w,
                             stderr=subprocess.DEVNULL, **kw)
        return p

    def inherit(self, pid: int) -> dict[str, int]:
        """Map the dumped stdin/stdout pipes to our (kept) ends."""
        return {os.readlink(f"/proc/{pid}/fd/0"): self.in_r,
                os.readlink(f"/proc/{pid}/fd/1"): self.out_w}

    def send(self, text: str) -> None:
        os.write(self.in_w, text.encode())

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        import select
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, _, self._buf = self._buf.partition(b"\n")
                text = line.decode()
                self.lines.append(text)
                if text.startswith(prefix):
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} line; got {self.lines[-5:]}")
            r, _, _ = select.select([self.out_r], [], [], left)
            if r:
                chunk = os.read(self.out_r, 65536)
                if not chunk:
                    raise EOFError(f"target closed its stdout; got {self.lines[-5:]}")
                self._buf += chunk

    def ask(self, cmd: str, prefix: str) -> str:
        self.send(cmd + "\n")
        return self.expect(prefix)

    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("ERR")]

    def close(self):
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def reaper():
    """Processes (pids) that must be dead and reaped when the test ends."""
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


@pytest.fixture
def rt(tmp_path, reaper):
    """A running restore_target with its channel."""
    data = tmp_path / "data.bin"
    data.write_bytes(b"D" * 4096 + b"E" * 4096 + b"F" * 4096)
    os.utime(data, ns=(1_000_000_000, 1_000_000_000))  # an mtime that cannot tie by chance
    work = tmp_path / "work"
    work.mkdir()
    ch = Channel()
    p = ch.popen([build_target("restore_target"), work, data])
    reaper.append(p.pid)
    ch.expect("READY")
    yield p, ch, tmp_path
    ch.close()


def tgkill(tgid: int, tid: int, sig: int) -> None:
    from checkpoint.kernel.syscalls import tgkill as _tgkill
    _tgkill(tgid, tid, sig)


def check_ok(ch: Channel, pid: int | None = None) -> dict:
    line = ch.ask("check", "CHECK")
    assert "errors=0" in line, (line, ch.errors())
    if pid is not None:
        assert f"pid={pid}" in line
    return dict(re.findall(r"(\w+)=(\S+)", line))


def killed(p: subprocess.Popen) -> None:
    p.wait(10)
    assert proc_state(p.pid) == ""


def test_predumps_dump_kill_restore_continues(rt, reaper):
    p, ch, tmp = rt
    images = tmp / "img"
    check_ok(ch, p.pid)
    inherit = ch.inherit(p.pid)
    with Checkpointer(p.pid, images) as ck:
        s0 = ck.pre_dump()
        assert s0.full_reason == "first round" and s0.pages_written >= BUF_PAGES
        for n in (5, 77, 4000):
            ch.ask(f"write {n}", "OK")
        s1 = ck.pre_dump()
        assert s1.full_reason == "" and s1.pages_written < 200
        ch.ask("write 77", "OK")
        ch.ask("write 1234", "OK")
        # a signal pending (blocked) in the main thread must survive
        tgkill(p.pid, p.pid, signal.SIGUSR2)
        assert check_ok(ch)["pending_usr2"] == "1"
        s2 = ck.dump()
    killed(p)
    assert s2.kind == "dump" and s2.layer == 2
    r = restore(images, inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    assert r.pid == p.pid and r.layers == 3
    assert len(procfs.list_tasks(r.pid)) == 6  # original TIDs, checked by pthread_kill
    assert tracer_of(r.pid) == 0
    assert check_ok(ch, p.pid)["pending_usr2"] == "1"
    assert ch.ask("pipe", "PIPE") == "PIPE ok"
    ch.send("quit\n")
    assert r.wait(10) == 0


BUF_PAGES = 4096


def test_restore_twice_gives_two_independent_copies(rt, reaper):
    p, ch, tmp = rt
    images = tmp / "img"
    inherit = ch.inherit(p.pid)
    with Checkpointer(p.pid, images) as ck:
        ck.dump()
    killed(p)
    for _ in range(2):
        r = restore(images, inherit=inherit, inherit_stdio=False)
        reaper.append(r.pid)
        check_ok(ch, p.pid)
        ch.ask("write 9", "OK")  # changes this copy only
        r.kill()
        assert r.wait(10) == -signal.SIGKILL


def test_dump_leave_running_and_layer_content_matches_memory(rt):
    """The layers hold exactly the target's memory at the freeze: compare
    with /proc/PID/mem read by the test inside the same freeze."""
    p, ch, tmp = rt
    images = tmp / "img"
    seen: dict[int, bytes] = {}

    def grab(proc):
        with open(f"/proc/{proc.pid}/mem", "rb", buffering=0) as mem:
            for v in procfs.read_maps(proc.pid):
                if v.writable and not v.shared and v.path in ("", "[heap]", "[stack]"):
                    for a in range(v.start, v.end, PS):
                        mem.seek(a)
                        seen[a] = mem.read(PS)

    with Checkpointer(p.pid, images, on_frozen=grab) as ck:
        ck.pre_dump()
        ch.ask("write 3", "OK")
        seen.clear()
        st = ck.dump(leave_running=True)
    assert st.pages_written > 0
    check_ok(ch, p.pid)  # -R: still running, state intact
    with open_chain(images) as chain:
        mismatches = 0
        for addr, data in seen.items():
            page = chain.read_page(p.pid, addr)
            if page is None:
                page = bytes(PS)  # never-touched page: not dumped, reads as zero
            if page != data:
                mismatches += 1
        assert mismatches == 0


@pytest.mark.parametrize("max_pages", [0, 5])
def test_incremental_layer_holds_only_written_pages(rt, max_pages):
    p, ch, tmp = rt
    images = tmp / "img"
    with Checkpointer(p.pid, images, max_pages=max_pages) as ck:
        ck.pre_dump()
        ck.pre_dump()  # settle what the program writes by itself
        for n in range(100, 140):
            ch.ask(f"write {n}", "OK")
        st = ck.pre_dump()
    with open_chain(images) as chain:
        buf = [v for v in chain.records("mm")][0][1]
    # the 40 buffer pages, plus the few the program and libc touch on their own
    assert 40 <= st.pages_written < 40 + 40
    assert buf.pid == p.pid


def test_python_program_continues_with_its_state(tmp_path, reaper):
    ch = Channel()
    prog = textwrap.dedent("""
        import hashlib, os, resource, signal, sys, threading, time
        data = bytearray(os.urandom(1 << 20)) * 24          # a 24 MiB heap
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (321, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        open("/proc/self/comm", "w").write("ckpt-py")
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        def attrs():
            u = os.umask(0o027)
            comm = open("/proc/self/comm").read().strip()
            return (u, resource.getrlimit(resource.RLIMIT_NOFILE)[0], comm,
                    signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN)
        want = attrs()
        digest = hashlib.sha256(data).hexdigest()
        f = open(sys.argv[1], "rb"); f.read(777)
        ticks = [0]
        def worker():
            while True:
                time.sleep(0.01); ticks[0] += 1
        threading.Thread(target=worker, daemon=True).start()
        print("READY", flush=True)
        for line in sys.stdin:
            t0 = ticks[0]; time.sleep(0.2)
            ok = (hashlib.sha256(data).hexdigest() == digest and f.tell() == 777
                  and ticks[0] > t0 and f.read(3) == b"xyz" and attrs() == want
                  and want == (0o027, 321, "ckpt-py", True))
            f.seek(777)
            print("STATE", "ok" if ok else "bad", os.getpid(), flush=True)
    """)
    src = tmp_path / "f.txt"
    src.write_bytes(b"a" * 777 + b"xyz")
    p = ch.popen([sys.executable, "-c", prog, src])
    reaper.append(p.pid)
    ch.expect("READY")
    assert ch.ask("x", "STATE") == f"STATE ok {p.pid}"
    inherit = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.pre_dump()
        ck.dump()
    killed(p)
    r = restore(tmp_path / "img", inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    assert ch.ask("x", "STATE") == f"STATE ok {p.pid}"
    assert ch.ask("x", "STATE") == f"STATE ok {p.pid}"
    ch.close()


def test_tampered_mapped_file_is_refused(rt, reaper):
    p, ch, tmp = rt
    images = tmp / "img"
    with Checkpointer(p.pid, images) as ck:
        ck.dump()
    killed(p)
    data = tmp / "data.bin"
    with open(data, "r+b") as f:  # same inode, new content and mtime
        f.seek(0)
        f.write(b"X")
    children_before = _children()
    with pytest.raises(RestoreError, match="data.bin changed since the dump"):
        restore(images, inherit_stdio=False)
    assert _children() == children_before  # nothing was started


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if procfs.read_stat(int(d)).ppid == me:
                    out.add(int(d))
            except CheckpointError:
                pass
    return out


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "missing-layer", "predump-only"])
def test_bad_images_fail_before_anything_starts(rt, damage):
    p, ch, tmp = rt
    images = tmp / "img"
    with Checkpointer(p.pid, images) as ck:
        ck.pre_dump()
        if damage != "predump-only":
            ck.dump(leave_running=True)
    layers = sorted(images.iterdir())
    if damage == "truncate":
        raw = layers[-1].read_bytes()
        layers[-1].write_bytes(raw[: len(raw) // 2])
    elif damage == "bitflip":
        raw = bytearray(layers[0].read_bytes())
        raw[len(raw) // 2] ^= 0x10
        layers[0].write_bytes(bytes(raw))
    elif damage == "missing-layer":
        layers[0].unlink()
    before = _children()
    with pytest.raises(ImageError):
        restore(images, inherit_stdio=False)
    assert _children() == before


def test_dump_error_paths(rt, tmp_path, spawn, python_exe):
    p, ch, tmp = rt
    # no such process
    with pytest.raises(CheckpointError, match="4000000"):
        Checkpointer(4_000_000, tmp / "x").pre_dump()
    # a directory holding another process's chain
    # (it keeps writing memory, so the dump below always has pages to read
    # after the target died)
    other = spawn([python_exe, "-c", "import time\nb = bytearray(1 << 22)\nprint('READY', "
                                     "flush=True)\nwhile True:\n    b[0] ^= 1\n"
                                     "    time.sleep(0.001)"])
    other.expect("READY")
    Checkpointer(other.pid, tmp / "chain").pre_dump()
    with pytest.raises(ImageError, match=f"another process \\(PID {other.pid}"):
        Checkpointer(p.pid, tmp / "chain").pre_dump()
    # the target exits in the middle of the dump: nothing published, no traces
    before = sorted(os.listdir(tmp / "chain"))

    def die(proc):
        os.kill(other.pid, signal.SIGKILL)

    with pytest.raises(TargetExited):
        Checkpointer(other.pid, tmp / "chain", on_frozen=die).dump()
    assert sorted(os.listdir(tmp / "chain")) == before
    # the target itself was not disturbed by all this
    check_ok(ch, p.pid)


def test_disk_full_publishes_nothing_and_target_runs_on(rt, tmp_path):
    p, ch, tmp = rt
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full path untested")
    try:
        with pytest.raises(CheckpointError, match="no space left"):
            Checkpointer(p.pid, mnt / "img").pre_dump()
        # nothing published, nothing left: the directory it made is gone again
        assert not os.path.exists(mnt / "img")
        assert proc_state(p.pid) not in ("t", "T") and tracer_of(p.pid) == 0
        check_ok(ch, p.pid)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_unsupported_fd_kind_fails_the_dump_clearly(spawn, python_exe, tmp_path):
    t = spawn([python_exe, "-c", "import socket, time; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0); "
                                 "print('READY', s.fileno(), flush=True); time.sleep(30)"])
    fd = int(t.expect("READY").split()[1])
    with pytest.raises(CheckpointError, match=f"fd {fd} is a socket"):
        Checkpointer(t.pid, tmp_path / "img").dump(leave_running=True)
    assert not (tmp_path / "img").exists()  # nothing written: no directory left
    assert tracer_of(t.pid) == 0


def test_cli_dump_and_restore(rt, reaper):
    p, ch, tmp = rt
    images = tmp / "img"
    cli = [sys.executable, "-m", "checkpoint"]
    out = subprocess.run([*cli, "pre-dump", "-t", str(p.pid), "-D", images, "--json"],
                         capture_output=True, text=True, check=True)
    import json
    st = json.loads(out.stdout)
    for key in ("layer", "tracker", "freezing_ms", "frozen_ms", "memdump_ms", "memwrite_ms",
                "pages_scanned", "pages_written", "pages_skipped_parent", "pages_zero",
                "bytes_raw", "bytes_stored"):
        assert key in st
    subprocess.run([*cli, "dump", "-t", str(p.pid), "-D", images], check=True,
                   capture_output=True)
    killed(p)
    fd_in, fd_out = ch.in_r, ch.out_w
    key_in = _dumped_key(images, 0)
    key_out = _dumped_key(images, 1)
    pidfile = tmp / "pid"
    res = subprocess.run([*cli, "restore", "-D", images, "-d", "--json", "--pidfile", pidfile,
                          f"--inherit-fd=fd[{fd_in}]:{key_in}",
                          f"--inherit-fd=fd[{fd_out}]:{key_out}", "--no-inherit-stdio"],
                         capture_output=True, text=True, pass_fds=(fd_in, fd_out))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["pid"] == p.pid == int(pidfile.read_text())
    reaper.append(info["pid"])
    check_ok(ch, p.pid)
    ch.send("quit\n")


def test_cli_restore_shows_progress_on_a_terminal_only(rt, reaper):
    """A restore's page writing shows a bar on a terminal; with --json (or
    piped) it stays silent."""
    import pty
    p, ch, tmp = rt
    images = tmp / "img"
    cli = [sys.executable, "-m", "checkpoint"]
    subprocess.run([*cli, "dump", "-t", str(p.pid), "-D", images], check=True,
                   capture_output=True)
    killed(p)
    fds = (ch.in_r, ch.out_w)
    args = [*cli, "restore", "-D", images, "-d", "--no-inherit-stdio",
            f"--inherit-fd=fd[{fds[0]}]:{_dumped_key(images, 0)}",
            f"--inherit-fd=fd[{fds[1]}]:{_dumped_key(images, 1)}"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stderr=slave, stdout=subprocess.PIPE, pass_fds=fds)
    os.close(slave)
    out = read_pty(master)
    assert proc.wait(30) == 0, out
    os.close(master)
    reaper.append(p.pid)
    text = out.decode(errors="replace")
    assert "restore: [" in text and "100.0%" in text, text
    check_ok(ch, p.pid)
    ch.send("quit\n")


def _dumped_key(images, fd: int) -> str:
    with open_chain(images) as chain:
        files = [m for _, m in chain.records("files")][0]
    return [e.path for e in files.fds if e.fd == fd][0]


@pytest.mark.parametrize("how", ["quit", "sigterm"])
def test_cli_restore_stays_parent_and_exits_with_status(rt, reaper, how):
    p, ch, tmp = rt
    images = tmp / "img"
    cli = [sys.executable, "-m", "checkpoint"]
    subprocess.run([*cli, "dump", "-t", str(p.pid), "-D", images], check=True,
                   capture_output=True)
    killed(p)
    fd_in, fd_out = ch.in_r, ch.out_w
    eng = subprocess.Popen([*cli, "restore", "-D", images, "--no-inherit-stdio",
                            f"--inherit-fd=fd[{fd_in}]:{_dumped_key(images, 0)}",
                            f"--inherit-fd=fd[{fd_out}]:{_dumped_key(images, 1)}"],
                           pass_fds=(fd_in, fd_out), stderr=subprocess.PIPE)
    reaper.append(eng.pid)
    check_ok(ch, p.pid)
    assert procfs.read_stat(p.pid).ppid == eng.pid  # the engine is the parent
    if how == "quit":
        ch.send("quit\n")
        assert eng.wait(10) == 0
    else:
        eng.send_signal(signal.SIGTERM)  # forwarded: the program dies of it
        assert eng.wait(10) == 128 + signal.SIGTERM
    assert proc_state(p.pid) == ""


def test_restore_a_program_running_the_placeholder_binary(tmp_path, reaper):
    """coreutils sleep, like the placeholder: the exe link must stay (changing
    it while the same binary is mapped is EBUSY); the sleep then finishes."""
    p = subprocess.Popen(["sleep", "1.5"])
    reaper.append(p.pid)
    time.sleep(0.3)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    killed(p)
    t0 = time.monotonic()
    r = restore(tmp_path / "img")
    reaper.append(r.pid)
    assert os.readlink(f"/proc/{r.pid}/exe") == os.path.realpath(subprocess.check_output(
        ["sh", "-c", "command -v sleep"], text=True).strip())
    assert r.wait(10) == 0
    assert time.monotonic() - t0 < 5


def test_pid_ns_restores_while_the_original_runs(rt, reaper):
    """-R leaves the original running (its PID taken): the plain restore says
    so and suggests --pid-ns; --pid-ns gives a copy with the original PIDs
    inside a new PID namespace."""
    p, ch, tmp = rt
    images = tmp / "img"
    tgkill(p.pid, p.pid, signal.SIGUSR2)  # pending: must be re-queued inside the namespace
    with Checkpointer(p.pid, images) as ck:
        ck.dump(leave_running=True)
    with pytest.raises(RestoreError, match="taken on this host.*--pid-ns"):
        restore(images, stdio="null")
    ch2 = Channel()
    try:
        inherit = {_dumped_key(images, 0): ch2.in_r, _dumped_key(images, 1): ch2.out_w}
        r = restore(images, pid_ns=True, inherit=inherit, inherit_stdio=False)
        reaper.append(r.waiter)
        assert r.pid != p.pid
        nspid = procfs.read_status(r.pid).nspid
        assert nspid[-1] == p.pid and len(nspid) == 2
        tids = procfs.list_tasks(r.pid)
        assert sorted(procfs.read_status(r.pid, t).nspid[-1] for t in tids) == \
            sorted(procfs.read_status(p.pid, t).nspid[-1] for t in procfs.list_tasks(p.pid))
        # getpid() inside answers the original PID; the pending signal is there
        assert check_ok(ch2, p.pid)["pending_usr2"] == "1"
        check_ok(ch, p.pid)   # and the original goes on, independent
        r.kill(signal.SIGTERM)
        assert r.wait(10) == -signal.SIGTERM
    finally:
        ch2.close()


def test_not_permitted_and_unwritable_dir(rt, tmp_path):
    p, ch, tmp = rt
    cli = [sys.executable, "-m", "checkpoint"]
    import shutil
    import tempfile
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*as_nobody, *cli, "--help"], capture_output=True, cwd="/").returncode:
        pytest.skip("the engine cannot run as nobody from this checkout (directory modes): "
                    "the not-permitted path is untested here")
    shared = tempfile.mkdtemp(prefix="ck-nobody-", dir="/tmp")  # reachable by nobody
    os.chmod(shared, 0o777)
    try:
        res = subprocess.run([*as_nobody, *cli, "pre-dump", "-t", str(p.pid), "-D", f"{shared}/img"],
                             capture_output=True, text=True, cwd="/")
    finally:
        shutil.rmtree(shared)
    assert res.returncode == 4, res.stderr
    assert res.stderr.startswith(f"checkpoint: error: not permitted to ptrace process {p.pid}")
    assert res.stderr.count("\n") == 1
    # an images "dir" that is a file, and a read-only one
    (tmp_path / "file").write_text("x")
    res = subprocess.run([*cli, "pre-dump", "-t", str(p.pid), "-D", tmp_path / "file"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "is not a directory" in res.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        res = subprocess.run([*cli, "pre-dump", "-t", str(p.pid), "-D", ro],
                             capture_output=True, text=True)
        assert res.returncode == 1 and "not writable" in res.stderr, res.stderr
    finally:
        subprocess.run(["umount", str(ro)])
    assert tracer_of(p.pid) == 0
    check_ok(ch, p.pid)


def test_another_kernels_vdso_is_refused(rt):
    """check_images() compares the dumped vDSO with this kernel's: an image
    whose [vdso] digest differs (another kernel) is refused up front."""
    from checkpoint.restorer import check_images
    p, ch, tmp = rt
    with Checkpointer(p.pid, tmp / "img") as ck:
        ck.dump(leave_running=True)
    with open_chain(tmp / "img") as chain:
        process = [m for _, m in chain.records("process")][0]
        mm = [m for _, m in chain.records("mm")][0]
    check_images(process, mm)  # this kernel: fine
    process.vdso_digest = bytes(32)
    with pytest.raises(RestoreError, match="another kernel's vDSO"):
        check_images(process, mm)


def test_a_failed_round_makes_the_next_one_full(rt):
    """The tracker clears the dirty bits inside the freeze; if that round's
    layer is then lost, the next layer must not be incremental."""
    p, ch, tmp = rt
    calls = []

    def fail_second(proc):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("orchestrator hook failed")

    with Checkpointer(p.pid, tmp / "img", on_frozen=fail_second) as ck:
        assert ck.pre_dump().full_reason == "first round"
        ch.ask("write 42", "OK")
        with pytest.raises(RuntimeError):
            ck.pre_dump()
        assert tracer_of(p.pid) == 0
        st = ck.pre_dump()
        assert "failed before its layer was published" in st.full_reason
        assert st.pages_written >= BUF_PAGES  # everything again, page 42 included
    assert sorted(os.listdir(tmp / "img")) == ["layer-0000.img", "layer-0001.img"]
    check_ok(ch, p.pid)


def test_failed_restore_leaves_nothing_and_names_the_object(spawn, python_exe, tmp_path):
    """A (packet) socket dumped as external with no stand-in: the restore fails in the
    middle (files), names the fd, and kills its half-built process."""
    t = spawn([python_exe, "-c", "import socket, time; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0); "
                                 "print('READY', s.fileno(), flush=True); time.sleep(30)"])
    fd = int(t.expect("READY").split()[1])
    with Checkpointer(t.pid, tmp_path / "img", external_fds=True) as ck:
        ck.dump()
    t.proc.wait(5)
    before = _children()
    with pytest.raises(RestoreError, match=f"fd {fd}"):
        restore(tmp_path / "img", stdio="null")   # (its stdin pipe stood in for)
    assert _children() == before
    assert proc_state(t.pid) == ""  # the PID is free again: nothing half-restored holds it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_dump_publishes_nothing_and_releases_the_target(tmp_path, sig):
    """Ctrl-C or SIGTERM in the middle of a long dump: exit 130, no layer,
    the target untraced and running."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools/bench"))
    from common import Workload
    with Workload(768, 0.0) as w:
        eng = subprocess.Popen([sys.executable, "-m", "checkpoint", "dump", "-t", str(w.pid),
                                "-D", tmp_path / "img", "--threads", "1"],
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while tracer_of(w.pid) != eng.pid:  # wait until it holds the target
            assert time.monotonic() < deadline and eng.poll() is None
            time.sleep(0.002)
        time.sleep(0.05)
        eng.send_signal(sig)
        assert eng.wait(20) == 130, eng.stderr.read()
        err = eng.stderr.read()
        assert err.count("\n") == 1 and "released" in err
        # no layer, no temp file: not even the directory it made is left
        assert not (tmp_path / "img").exists()
        assert tracer_of(w.pid) == 0 and proc_state(w.pid) in ("S", "R")


@pytest.mark.parametrize("track", ["uffd-wp", "hash", "full"])
def test_racing_writer_loses_nothing(spawn, tmp_path, track):
    """Pre-dumps while a thread rewrites random pages as fast as it can, then
    a final dump: the chain's newest content of every page equals the
    target's memory (a page written during a round comes in that round or
    the next, never lost)."""
    from test_scan import Driver
    d = Driver(spawn([build_target("scan_target")]))
    mid, base = d.map("anon", 2048)
    d.cmd(f"w {mid} 0 2048")
    with Checkpointer(d.pid, tmp_path / "img", track=track) as ck:
        d.cmd(f"racer {mid}")
        rounds = [ck.pre_dump() for _ in range(4)]
        writes = int(d.cmd("stop").split()[1])
        ck.dump(leave_running=True)
    assert writes > 0 and rounds[0].pages_written >= 2048
    with open(f"/proc/{d.pid}/mem", "rb", buffering=0) as mem, open_chain(tmp_path / "img") as c:
        for i in range(2048):
            addr = base + i * PS
            mem.seek(addr)
            assert c.read_page(d.pid, addr) == mem.read(PS), f"page {i} differs"


def test_eventfd_signalfd_epoll_survive(tmp_path, reaper):
    ch = Channel()
    p = ch.popen([build_target("anonfd_target")])
    reaper.append(p.pid)
    ch.expect("READY")
    assert ch.ask("check", "CHECK") == "CHECK ok 0"  # count 5 -> 4
    inherit = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    killed(p)
    r = restore(tmp_path / "img", inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    for _ in range(4):  # 4 -> 0: the semaphore count came back exactly
        assert ch.ask("check", "CHECK") == "CHECK ok 0"
    assert ch.ask("check", "CHECK") == "CHECK bad 3"  # empty now: not ready, no read
    ch.close()


def test_strict_seccomp_process_is_dumped_and_restored(tmp_path, reaper):
    """A process in seccomp strict mode may only read and write: the engine's
    injected syscalls would kill it, so the freezer suspends its filter
    while it is traced (PTRACE_O_SUSPEND_SECCOMP)."""
    exe = build_target("strict_echo")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    p = subprocess.Popen([exe], stdin=in_r, stdout=out_w)
    reaper.append(p.pid)
    assert os.read(out_r, 100) == b"READY\n"
    os.write(in_w, b"one\n")
    assert os.read(out_r, 100) == b"ECHO one\n"
    keys = {os.readlink(f"/proc/self/fd/{in_r}"): in_r, os.readlink(f"/proc/self/fd/{out_w}"): out_w}
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.pre_dump()
        ck.dump()
    p.wait(10)  # (the dump succeeded: a filter-killed target fails it with TargetExited)
    r = restore(tmp_path / "img", inherit=keys, inherit_stdio=False)
    reaper.append(r.pid)
    assert procfs.read_status(r.pid).raw["Seccomp"] == "1"
    os.write(in_w, b"two\n")
    assert os.read(out_r, 100) == b"ECHO two\n"
    os.close(in_w)
    assert r.wait(10) == 0
    for fd in (in_r, out_r, out_w):
        os.close(fd)


def test_signed_chain_end_to_end(rt, reaper):
    """--sign-key on pre-dump, dump and restore: a signed chain is continued
    and restored only with its key; an unsigned round into it, a wrong key
    and an edited layer are refused before anything runs."""
    import json
    import shutil
    p, ch, tmp = rt
    images = tmp / "img"
    cli = [sys.executable, "-m", "checkpoint"]
    key, other = tmp / "key", tmp / "other"
    for k in (key, other):
        k.write_bytes(os.urandom(32))
        k.chmod(0o600)
    run = lambda *a: subprocess.run([*cli, *map(str, a)], capture_output=True, text=True)
    assert run("pre-dump", "-t", p.pid, "-D", images, "--sign-key", key).returncode == 0
    r = run("pre-dump", "-t", p.pid, "-D", images)          # no key: refused
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    r = run("pre-dump", "-t", p.pid, "-D", images, "--sign-key", other)
    assert r.returncode == 5, r.stderr
    assert run("dump", "-t", p.pid, "-D", images, "--sign-key", key).returncode == 0
    killed(p)
    keys = {_dumped_key(images, 0): ch.in_r, _dumped_key(images, 1): ch.out_w}
    inherit = [f"--inherit-fd=fd[{fd}]:{k}" for k, fd in keys.items()]
    # an edited copy: one byte of the last layer's records changed, its CRCs fixed
    edited = tmp / "edited"
    shutil.copytree(images, edited)
    with open_chain(edited) as chain:
        top, off = chain.top.path, chain.top.record_offsets[0]
    raw = bytearray(open(top, "rb").read())
    from checkpoint.images import format as F
    import zlib
    n = int.from_bytes(raw[off + 4:off + 8], "little")
    raw[off + 24 + n - 1] ^= 1
    raw[off + 16:off + 20] = zlib.crc32(bytes(raw[off + 24:off + 24 + n])).to_bytes(4, "little")
    seed = F.layer_seed(chain.top.layer_id)
    raw[off:off + 24] = F.pack_block_header(*F.BLOCK.unpack(bytes(raw[off:off + 24]))[:4],
                                            off, seed)
    open(top, "wb").write(raw)
    assert run("verify", "-D", edited).returncode == 0   # the CRCs alone see nothing
    for d, k in ((edited, key), (images, other)):
        r = subprocess.run([*cli, "restore", "-D", d, "-d", "--sign-key", k, *inherit,
                            "--no-inherit-stdio"], capture_output=True, text=True,
                           pass_fds=tuple(keys.values()))
        assert r.returncode == 5, r.stderr
        assert proc_state(p.pid) in ("", "Z")   # nothing was started
    r = subprocess.run([*cli, "restore", "-D", images, "-d", "--json", "--sign-key", key,
                        *inherit, "--no-inherit-stdio"], capture_output=True, text=True,
                       pass_fds=tuple(keys.values()))
    assert r.returncode == 0, r.stderr
    reaper.append(json.loads(r.stdout)["pid"])
    check_ok(ch, p.pid)
