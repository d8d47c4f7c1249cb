"""The writer side: directories 0700, dead writers' temp files, and an
abort that never hangs and never leaves anything behind. Real files, real
processes and real signals; no mocks."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from checkpoint.errors import ImageError
from checkpoint.images import LayerWriter, LocalSink, StreamSink, open_chain, open_layer_for_write
from checkpoint.images import writer as W
from checkpoint.images.writer import make_images_dir
from images_helpers import PS, page_content

ROOT = Path(__file__).resolve().parent.parent


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def no_new_threads(before, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(threading.enumerate()) <= before:
            return True
        time.sleep(0.01)
    return False


def entries(d) -> list[str]:
    return sorted(os.listdir(d))


# --------------------------------------------------------------- directories

def test_make_images_dir_every_created_directory_0700(tmp_path):
    old = os.umask(0o022)
    try:
        leaf = tmp_path / "a" / "b" / "c"
        assert make_images_dir(leaf) == str(leaf)
        for p in (tmp_path / "a", tmp_path / "a" / "b", leaf):
            assert mode(p) == 0o700, p
        os.umask(0o277)             # a umask that would leave even the owner without w
        leaf2 = tmp_path / "x" / "y"
        make_images_dir(leaf2)
        assert mode(tmp_path / "x") == 0o700 and mode(leaf2) == 0o700
        # LocalSink creates its directory (and parents) the same way
        os.umask(0o022)
        sink = LocalSink(tmp_path / "p" / "q", 0)
        sink.abort()
        assert mode(tmp_path / "p") == 0o700 and mode(tmp_path / "p" / "q") == 0o700
        # an existing leaf keeps its mode
        os.chmod(leaf, 0o750)
        make_images_dir(leaf)
        assert mode(leaf) == 0o750
    finally:
        os.umask(old)


def test_make_images_dir_refuses_non_directories(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    (tmp_path / "to-file").symlink_to(f)
    (tmp_path / "to-dir").symlink_to(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ImageError, match="images directory is not a directory"):
        make_images_dir(f)
    with pytest.raises(ImageError, match="symbolic link to something that is not a directory"):
        make_images_dir(tmp_path / "to-file")
    with pytest.raises(ImageError, match="dangling symbolic link"):
        make_images_dir(tmp_path / "dangling")
    with pytest.raises(ImageError, match="a parent is not a directory"):
        make_images_dir(f / "sub")
    assert make_images_dir(tmp_path / "to-dir") == str(tmp_path / "to-dir")
    with pytest.raises(ImageError) as ei:
        LocalSink(f, 0)
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------ temp files

WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from checkpoint.images import open_layer_for_write
    w = open_layer_for_write({d!r}, frame_size=65536)
    w.add_pages(1, 0, os.urandom(4096 * 100))
    print("writing", flush=True)
    if sys.stdin.readline().strip() == "close":
        w.close()
        print("closed", flush=True)
""")


def start_writer(d):
    p = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), d=str(d))],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def verify_json(d) -> dict:
    res = subprocess.run([sys.executable, "-m", "checkpoint", "verify", "-D", str(d), "--json"],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_dead_writers_temp_is_reported_then_removed_live_ones_never(tmp_path):
    d = tmp_path / "img"
    with open_layer_for_write(d, frame_size=64 << 10) as w:
        w.add_pages(1, 0, page_content(1))
        w.close()
    live = start_writer(d)
    killed = start_writer(d)
    try:
        temps = [n for n in entries(d) if n.startswith(".layer-0001.img.tmp-")]
        assert len(temps) == 2
        killed.kill()                              # SIGKILL mid-write: no cleanup ran
        killed.wait(10)
        rep = verify_json(d)
        states = {t["file"]: t["state"] for t in rep["temps"]}
        assert sorted(states.values()) == ["dead", "live"], states
        dead = next(n for n, s in states.items() if s == "dead")
        alive = next(n for n, s in states.items() if s == "live")
        res = subprocess.run([sys.executable, "-m", "checkpoint", "show", "-D", str(d)],
                             capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert f"{dead} is a partial layer left by an interrupted writer" in res.stdout
        assert f"{alive} is a layer being written by a running writer" in res.stdout
        # the next writer removes the dead one, and only it
        sink = LocalSink(d, 7)
        assert sink.removed_temps == [dead]
        sink.abort()
        assert dead not in entries(d) and alive in entries(d)
        # the live writer is unharmed and publishes its layer
        live.stdin.write("close\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "closed"
        assert live.wait(10) == 0
        assert entries(d) == ["layer-0000.img", "layer-0001.img"]
        assert verify_json(d)["temps"] == []
        with open_chain(d) as c:
            assert len(c.layers) == 2
    finally:
        for p in (live, killed):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_temp_file_is_locked_from_the_moment_it_has_its_name(tmp_path):
    """Many writers creating and aborting temps while a cleaner runs in a
    loop: the cleaner never removes the temp of a writer that is alive."""
    d = tmp_path / "img"
    make_images_dir(d)
    stop = threading.Event()
    removed: list[str] = []
    errors: list[BaseException] = []

    def cleaner():
        from checkpoint.images import fsutil
        fd = fsutil.open_dir(str(d))
        try:
            while not stop.is_set():
                removed.extend(fsutil.remove_dead_temps(fd, str(d)))
        except BaseException as exc:    # reported below
            errors.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=cleaner)
    t.start()
    try:
        for i in range(200):
            sink = LocalSink(d, 1)
            assert os.path.exists(sink.temp)      # never removed under a live writer
            sink.write([b"x" * 100])
            sink.abort()
    finally:
        stop.set()
        t.join()
    assert errors == [] and removed == []


# ---------------------------------------------------------------------- abort

class SlowSink(LocalSink):
    """A LocalSink whose writes take `delay` seconds each (a slow disk)."""

    def __init__(self, *a, delay: float, **kw):
        super().__init__(*a, **kw)
        self.delay = delay
        self.writes = 0

    def write(self, buffers) -> None:
        self.writes += 1
        time.sleep(self.delay)
        super().write(buffers)


def test_abort_while_the_io_thread_is_blocked_on_a_slow_sink(tmp_path):
    """The queue is full and the I/O thread sits in a slow write: abort()
    returns after that write, not after the dozens still queued."""
    d = tmp_path / "img"
    before = set(threading.enumerate())
    sink = SlowSink(d, 0, delay=0.3)
    w = LayerWriter(sink, frame_size=64 << 10)
    data = os.urandom(16 * PS)
    t = time.monotonic()
    for i in range(24):          # more than the queue holds: add_pages waits for room
        w.add_pages(1, i * 16 * PS, data)
    assert time.monotonic() - t > 0.5       # the writer was indeed held back by the sink
    t = time.monotonic()
    w.abort()
    took = time.monotonic() - t
    assert took < 1.0, took
    assert sink.writes < 10
    assert entries(d) == []
    assert no_new_threads(before)
    w.abort()                                 # twice: harmless


def test_abort_with_a_sink_blocked_for_good(tmp_path):
    """A socket whose peer never reads: the I/O thread is stuck in sendall.
    abort() gives up waiting after a bounded time, shuts the socket down
    (which unblocks the thread), and no thread is left."""
    before = set(threading.enumerate())
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        w = LayerWriter(StreamSink(a), frame_size=64 << 10)
        data = os.urandom(16 * PS)
        done = threading.Event()

        def produce():
            try:
                for i in range(1000):
                    w.add_pages(1, i * 16 * PS, data)
            except BaseException:
                pass
            finally:
                done.set()
        # the producer blocks for room in the queue (the caller of a dump)
        th = threading.Thread(target=produce)
        th.start()
        time.sleep(0.5)
        assert not done.is_set()
        t = time.monotonic()
        w.abort()
        took = time.monotonic() - t
        assert took < 2 * W.ABORT_WAIT + 1, took
        th.join(5)
        assert done.is_set()
    finally:
        a.close()
        b.close()
    assert no_new_threads(before)


class InterruptingSink(LocalSink):
    """Raises KeyboardInterrupt from write number `at` (on the I/O thread),
    or from commit after the layer was linked (`at_commit`)."""

    def __init__(self, *a, at: int = 0, at_commit: bool = False, **kw):
        super().__init__(*a, **kw)
        self.at, self.at_commit, self.n = at, at_commit, 0

    def write(self, buffers) -> None:
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        super().write(buffers)

    def commit(self):
        path = super().commit()
        if self.at_commit:
            raise KeyboardInterrupt       # published, then interrupted
        return path


@pytest.mark.parametrize("threads", [1, 2])
def test_keyboard_interrupt_anywhere_in_close_publishes_nothing(tmp_path, threads):
    before = set(threading.enumerate())
    data = b"".join(page_content(i) for i in range(40))
    # count the writes of a whole layer first
    probe = InterruptingSink(tmp_path / "probe", 0)
    w = LayerWriter(probe, frame_size=64 << 10, threads=threads)
    w.add_pages(1, 0, data)
    w.add_record("pstree", b"")
    w.close()
    total = probe.n
    cases = [dict(at=k) for k in range(1, total + 1)] + [dict(at_commit=True)]
    for i, kw in enumerate(cases):
        d = tmp_path / f"img{i}"
        sink = InterruptingSink(d, 0, **kw)
        w = LayerWriter(sink, frame_size=64 << 10, threads=threads)
        with pytest.raises(KeyboardInterrupt):
            with w:     # an error from add_* aborts too; from close(), close aborts
                w.add_pages(1, 0, data)
                w.add_record("pstree", b"")
                w.close()
        assert entries(d) == [], (kw, entries(d))
        w.abort()           # after the failed close: harmless
        assert entries(d) == []
    assert no_new_threads(before)


def test_async_keyboard_interrupt_during_close(tmp_path):
    """SIGALRM raising KeyboardInterrupt in the main thread at many moments
    of close() on a slow sink: either the layer is complete and published,
    or nothing is left; no thread survives either way."""
    before = set(threading.enumerate())
    data = os.urandom(64 * PS)

    def boom(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    outcomes = set()
    try:
        for i, delay in enumerate([0.001, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3]):
            d = tmp_path / f"img{i}"
            w = LayerWriter(SlowSink(d, 0, delay=0.02), frame_size=64 << 10)
            w.add_pages(1, 0, data)
            st = None
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                try:
                    st = w.close()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                pass
            if st is not None:
                outcomes.add("published")
                assert entries(d) == ["layer-0000.img"]
                with open_chain(d, verify_frames=True) as c:
                    assert c.read_page(1, 0) == data[:PS]
            else:
                outcomes.add("interrupted")
                w.abort()
                assert entries(d) == [], (delay, entries(d))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert "interrupted" in outcomes
    assert no_new_threads(before)


def test_abort_after_a_successful_close_keeps_the_layer(tmp_path):
    d = tmp_path / "img"
    w = LayerWriter(LocalSink(d, 0), frame_size=64 << 10)
    w.add_pages(1, 0, page_content(3))
    st = w.close()
    w.abort()
    w.abort()
    del w                   # nor does the finalizer of a closed writer touch it
    gc.collect()
    assert entries(d) == ["layer-0000.img"]
    with open_chain(d) as c:
        assert c.read_page(1, 0) == page_content(3)
    assert st.path == str(d / "layer-0000.img")


def test_a_writer_dropped_without_close_leaves_nothing(tmp_path):
    before = set(threading.enumerate())
    d = tmp_path / "img"
    w = LayerWriter(LocalSink(d, 0), frame_size=64 << 10)
    w.add_pages(1, 0, os.urandom(40 * PS))
    del w
    gc.collect()
    assert no_new_threads(before)
    assert entries(d) == []
