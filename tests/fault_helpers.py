"""Fault-injection runs shared by tests/test_faults.py (a quick CI sample) and
tools/fault_inject.py (the long mode): an engine round killed or signalled
at a point of its work, then a new round, a restore, and the restored
memory compared page by page with the target's memory as it was frozen.

One run:
1. the target (tests/targets/memcheck.c) runs: its writers (and maybe its
   churn thread) rewrite pages while an engine subprocess runs the verb
   (``pre-dump``, ``dump -R`` or ``dump``) and is killed at a fault point
   (CHECKPOINT_FAULT) or after a random delay;
2. checks: the target is neither stopped nor traced and still answers;
   every published layer still verifies; a layer was published only if the
   engine got past its commit point; SIGTERM/SIGINT gave exit 130 (or 0
   when the work was complete);
3. the target is paused and a final ``dump`` (library) snapshots every
   private page of the target inside its freeze (``on_frozen``);
4. restore (same PID), ``check`` inside the restored process, then every
   page of its private writable memory compared with the snapshot.
The restored process is the next run's target (a restored process must be
as checkpointable as any other).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import checkpoint
from checkpoint.freezer import FrozenProcess
from checkpoint.images import open_chain
from checkpoint.images.reader import list_layers
from checkpoint.kernel import procfs

ROOT = Path(__file__).resolve().parent.parent
TARGETS = Path(__file__).parent / "targets"


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Mem:
    """A memcheck process we talk to over two pipes we own both ends of (so
    a restored copy gets the same pipes through ``inherit``)."""

    def __init__(self, pid: int, to_w: int, from_r: int, keys: dict[str, int], popen=None):
        self.pid, self.to_w, self.from_r, self.keys, self.popen = pid, to_w, from_r, keys, popen
        self.buf = b""
        self.region = (0, 0)  # the memcheck pages

    @classmethod
    def start(cls, exe: str, mib: int, writers: int, pause_us: int = 0) -> "Mem":
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        p = subprocess.Popen([exe, str(mib), str(writers), str(pause_us)], stdin=in_r, stdout=out_w)
        keys = {os.readlink(f"/proc/self/fd/{in_r}"): in_r,
                os.readlink(f"/proc/self/fd/{out_w}"): out_w}
        m = cls(p.pid, in_w, out_r, keys, p)
        ready = m.line(20).split()
        assert ready[0] == "READY", "memcheck did not start"
        m.region = (int(ready[2], 16), int(ready[2], 16) + int(ready[3]) * 4096)
        return m

    def line(self, timeout: float = 10.0) -> str:
        import select
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.from_r], [], [], max(0.0, left))
            if not r:
                raise TimeoutError(f"memcheck {self.pid} silent for {timeout}s")
            chunk = os.read(self.from_r, 4096)
            if not chunk:
                raise EOFError(f"memcheck {self.pid} closed its stdout")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def cmd(self, text: str, timeout: float = 10.0) -> str:
        os.write(self.to_w, text.encode() + b"\n")
        return self.line(timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def private_pages(pid: int, mem_fd: int) -> dict[int, bytes]:
    """Every page of the private writable mappings of ``pid`` (frozen), with
    where a restore must take it from when no layer holds it: ``(page,
    (path, offset) | None)`` (None: anonymous, zero)."""
    out = {}
    for v in procfs.read_maps(pid):
        if v.shared or not v.writable or v.path.startswith("["):
            if v.path not in ("[heap]", "[stack]"):
                continue
        for a in range(v.start, v.end, 1 << 20):
            n = min(1 << 20, v.end - a)
            try:
                data = os.pread(mem_fd, n, a)
            except OSError:
                continue
            for o in range(0, len(data), 4096):
                src = (v.path, v.offset + a + o - v.start) if v.is_file else None
                out[a + o] = (data[o:o + 4096], src)
    return out


def chain_mismatches(images: str, pid: int, snap: dict) -> list[int]:
    """Pages where what the chain restores differs from the frozen target."""
    bad = []
    files: dict[str, int] = {}
    with open_chain(images) as chain:
        for addr, (page, src) in snap.items():
            got = chain.read_page(pid, addr)
            if got is None:
                if src is None:
                    got = bytes(4096)
                else:
                    fd = files.get(src[0])
                    if fd is None:
                        fd = files[src[0]] = os.open(src[0], os.O_RDONLY)
                    got = os.pread(fd, 4096, src[1]).ljust(4096, b"\0")
            if got != page:
                bad.append(addr)
    for fd in files.values():
        os.close(fd)
    return bad


@dataclass
class Outcome:
    verb: str
    fault: str
    engine_rc: int
    published: bool
    pages_compared: int
    mismatched: list[int] = field(default_factory=list)
    note: str = ""


def engine_cmd(verb: str, pid: int, images: str) -> list[str]:
    base = [sys.executable, "-m", "checkpoint"]
    if verb == "pre-dump":
        return base + ["pre-dump", "-t", str(pid), "-D", images]
    if verb == "dump-R":
        return base + ["dump", "-R", "-t", str(pid), "-D", images]
    return base + ["dump", "-t", str(pid), "-D", images]


def fault_points(verb: str, target: Mem, images: str) -> list[str]:
    """The fault points a round of ``verb`` reaches, in order (one dry run
    that does the round for real: it becomes part of the chain)."""
    log = f"{images}.points"
    env = dict(os.environ, CHECKPOINT_FAULT_LOG=log)
    r = subprocess.run(engine_cmd(verb, target.pid, images), env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(log) as f:
        pts = f.read().split()
    os.unlink(log)
    return pts


class Runner:
    """Runs faults against one lineage of targets (each restored copy is the
    next target)."""

    def __init__(self, workdir: str, exe: str, mib: int = 16, writers: int = 2,
                 churn: bool = False, pause_us: int = 500, rng: random.Random | None = None):
        self.work = workdir
        self.exe = exe
        self.mib, self.writers, self.churn = mib, writers, churn
        self.rng = rng or random.Random(1)
        self.n = 0
        self._dirs: list[str] = []
        self.target = Mem.start(exe, mib, writers, pause_us)
        self.pages = mib * 256
        if churn:
            assert self.target.cmd("churn on") == "churn on"

    def close(self) -> None:
        self.target.kill()
        _reap(self.target)
        for fd in (self.target.to_w, self.target.from_r, *self.target.keys.values()):
            try:
                os.close(fd)
            except OSError:
                pass

    def _dir(self) -> str:
        self.n += 1
        d = tempfile.mkdtemp(prefix=f"run{self.n:04d}-", dir=self.work)
        self._dirs.append(d)
        return os.path.join(d, "img")

    def _forget_old_runs(self) -> None:
        """The chains of finished runs are not needed again (the restored copy
        is the next target): free their disk space."""
        import shutil
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def run(self, verb: str, fault: str | None = None, delay: float | None = None,
            sig: int = signal.SIGKILL) -> Outcome:
        """One run; ``fault`` (CHECKPOINT_FAULT) or ``delay`` (seconds after
        the engine starts, then ``sig``) says when the engine dies."""
        self._forget_old_runs()
        t = self.target
        images = self._dir()
        # a base layer first, so the killed round is an incremental one; then
        # many pages written that only the killed round saw dirty (the writers
        # run on, slowly, so they rewrite few of them before the next round)
        base = subprocess.run(engine_cmd("pre-dump", t.pid, images), capture_output=True,
                              text=True, timeout=60)
        assert base.returncode == 0, base.stderr
        assert t.cmd(f"w {self.rng.randrange(1 << 30)} {self.pages // 2}") == "ok"
        assert t.cmd("run") == "running"
        before = set(list_layers(images))
        env = dict(os.environ)
        if fault:
            env["CHECKPOINT_FAULT"] = fault
        ready = f"{images}.log"
        if delay is not None:  # counted from the engine's first instruction (cli.ready)
            env["CHECKPOINT_FAULT_LOG"] = ready
        eng = subprocess.Popen(engine_cmd(verb, t.pid, images), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if delay is not None:
            deadline = time.monotonic() + 30
            while not (os.path.exists(ready) and "cli.ready" in open(ready).read()):
                assert time.monotonic() < deadline and eng.poll() is None, "engine never started"
                time.sleep(0.001)
            time.sleep(delay)
            try:
                eng.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            _, err = eng.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            eng.kill()
            _, err = eng.communicate()
            raise AssertionError(f"engine hung ({verb}, {fault or delay})")
        rc = eng.returncode
        label = fault or f"{signal.Signals(sig).name}@{delay * 1e3:.0f}ms"
        published = set(list_layers(images)) - before
        # the engine never exits by a signal it could catch
        if sig != signal.SIGKILL or (fault and not fault.endswith(":kill")):
            assert rc in (0, 130), f"{label}: exit {rc}: {err}"
            if rc == 130:
                assert not published, f"{label}: interrupted but published {published}"
        assert rc == 0 or rc < 0 or rc == 130, f"{label}: exit {rc}: {err}"
        if rc == 0:
            assert published, f"{label}: success without a layer"
        target_alive = proc_state(t.pid) not in ("", "Z", "X")
        if target_alive:
            for tid in procfs.list_tasks(t.pid):
                assert proc_state(tid) not in ("t", "T"), f"{label}: thread {tid} left stopped"
                assert tracer_of(tid) == 0, f"{label}: thread {tid} left traced"
        with open_chain(images, verify_frames=True) as chain:
            final = chain.top.kind == "dump"
        out = Outcome(verb, label, rc, bool(published), 0)
        if not target_alive:  # the verb was `dump` and it got as far as killing it
            assert verb == "dump" and final, f"{label}: target died"
            self._restore_and_check(images, None, out)
            return out
        assert t.cmd("pause") == "paused"
        if final:  # the chain is closed (dump -R or dump published): a new one
            images = self._dir()
        snap: dict[int, bytes] = {}

        def on_frozen(proc: FrozenProcess) -> None:
            snap.update(private_pages(proc.pid, proc.mem.fd))

        with checkpoint.Checkpointer(t.pid, images, on_frozen=on_frozen, progress=False) as ck:
            st = ck.dump()
        out.note = st.full_reason
        self._restore_and_check(images, snap, out)
        return out

    def _restore_and_check(self, images: str, snap: dict | None, out: Outcome) -> None:
        """Restore; every page the chain gives back compared with the frozen
        target's; the memcheck region compared again inside the restored
        process (nothing touches it while paused; its threads' stacks and
        condition variables legitimately move once they run); then the
        process checks itself."""
        t = self.target
        _reap(t)
        if snap is not None:
            out.mismatched = chain_mismatches(images, t.pid, snap)
            out.pages_compared = len(snap)
        assert not out.mismatched, (f"{out.fault}: {len(out.mismatched)} pages of the chain "
                                    f"differ from the frozen target: "
                                    f"{[hex(a) for a in out.mismatched[:8]]}")
        r = checkpoint.restore(images, inherit=t.keys, inherit_stdio=False)
        new = Mem(r.pid, t.to_w, t.from_r, t.keys)
        new.buf, new.region = t.buf, t.region
        self.target = new
        if snap is not None:
            lo, hi = t.region
            fd = os.open(f"/proc/{r.pid}/mem", os.O_RDONLY)
            try:
                for a in range(lo, hi, 1 << 20):
                    data = os.pread(fd, min(1 << 20, hi - a), a)
                    for o in range(0, len(data), 4096):
                        if snap[a + o][0] != data[o:o + 4096]:
                            out.mismatched.append(a + o)
            finally:
                os.close(fd)
        assert not out.mismatched, (f"{out.fault}: {len(out.mismatched)} restored pages "
                                    f"differ: {[hex(a) for a in out.mismatched[:8]]}")
        got = new.cmd("check", timeout=30)
        assert got.startswith("good"), f"{out.fault}: restored memory fails its own check: {got}"


def _reap(t: Mem) -> None:
    """Wait for a dead target (the engine that killed it as its tracer may
    have reaped it already)."""
    if t.popen is not None:
        t.popen.wait()
        return
    try:
        os.waitpid(t.pid, 0)
    except ChildProcessError:
        pass
