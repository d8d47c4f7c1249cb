"""The uffd-wp tracker against real targets: injected uffd, parked state,
exact dirty sets over many rounds, loss and takeover detection."""

from __future__ import annotations

import os
import random

import pytest

from checkpoint.freezer import freeze
from checkpoint.kernel.procfs import PAGE_SIZE
from checkpoint.tracking.base import choose_tracker
from checkpoint.tracking.uffd_wp import TAG_NAME, UffdWpTracker
from test_scan import target  # noqa: F401  (fixture)
from test_trackers import ROUNDS, run_round

PS = PAGE_SIZE


def frozen_round(t: UffdWpTracker, pid: int, lo=None, hi=None):
    """run_round inside a freeze (the tracker injects into the target)."""
    with freeze(pid) as proc:
        t.bind(proc)
        return run_round(t, pid, lo, hi)


def parked_fds(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return {fd: l for fd, l in out.items() if "userfaultfd" in l or TAG_NAME in l}


def test_auto_picks_uffd_wp_here():
    assert choose_tracker("auto") is UffdWpTracker


def test_rounds_written_and_zapped_pages(target):
    d = target()
    mid, base = d.map("anon", 256)
    d.cmd(f"w {mid} 0 256 2")
    t = UffdWpTracker(vec_len=8)
    assert t.full_reason(d.pid) == "first round"
    data, zero = frozen_round(t, d.pid, base, base + 256 * PS)
    assert data == set(range(0, 256, 2)) and not zero
    fds = parked_fds(d.pid)
    assert len(fds) == 2 and min(fds) > 900, fds  # parked high, close-on-exec
    assert frozen_round(t, d.pid, base, base + 256 * PS) == (set(), set())
    d.cmd(f"w {mid} 1 256 10")
    d.cmd(f"z {mid} 100 110")
    data, zero = frozen_round(t, d.pid, base, base + 256 * PS)
    assert zero == set(range(100, 110))
    assert data == set(range(1, 256, 10)) - zero
    # zapped pages read back as zero are not dirty; writing them is
    d.cmd(f"r {mid} 100 105")
    d.cmd(f"w {mid} 107")
    assert frozen_round(t, d.pid, base, base + 256 * PS) == ({107}, set())


def test_random_writes_over_10000_pages(target):
    rng = random.Random(7)
    d = target()
    n = 10_000
    mid, base = d.map("anon", n)
    d.cmd(f"w {mid} 0 {n} 3")
    t = UffdWpTracker(vec_len=64)
    frozen_round(t, d.pid)
    for _ in range(ROUNDS):
        written = set(rng.sample(range(n), rng.randint(1, 800)))
        d.write(mid, sorted(written))
        data, zero = frozen_round(t, d.pid, base, base + n * PS)
        assert data == written and not zero


def test_new_vma_reported_whole_then_tracked(target, tmp_path):
    d = target()
    mid, base = d.map("anon", 16)
    d.cmd(f"w {mid} 0 16")
    t = UffdWpTracker()
    frozen_round(t, d.pid)
    nid, nbase = d.map("anon", 32)
    d.cmd(f"w {nid} 0 32 4")
    data, _ = frozen_round(t, d.pid, nbase, nbase + 32 * PS)
    assert data == set(range(0, 32, 4))
    d.cmd(f"w {nid} 5")
    assert frozen_round(t, d.pid, nbase, nbase + 32 * PS) == ({5}, set())
    # mprotect splits the VMA: the pieces are new (reported whole), then tracked
    d.cmd(f"prot {mid} 0 4 1")
    data, _ = frozen_round(t, d.pid, base, base + 16 * PS)
    assert data == set(range(16))
    d.cmd(f"w {mid} 9")
    assert frozen_round(t, d.pid, base, base + 16 * PS) == ({9}, set())
    # MAP_FIXED over it: a new, empty mapping: nothing of the old pages
    d.cmd(f"map fixed {mid}")
    data, zero = frozen_round(t, d.pid, base, base + 16 * PS)
    assert data == set() and zero == set()


def test_private_file_mapping_only_written_pages(target, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(os.urandom(16 * PS))
    d = target()
    fid, fbase = d.map("file", 16, f)
    d.cmd(f"r {fid} 0 16")
    d.cmd(f"w {fid} 3")
    t = UffdWpTracker()
    assert frozen_round(t, d.pid, fbase, fbase + 16 * PS) == ({3}, set())
    d.cmd(f"r {fid} 0 16")
    d.cmd(f"w {fid} 7")
    assert frozen_round(t, d.pid, fbase, fbase + 16 * PS) == ({7}, set())


@pytest.mark.parametrize("kind", ["shared", "memfd", "thp"])
def test_other_memory_kinds(target, kind):
    d = target()
    mid, base = d.map(kind, 512)
    d.cmd(f"w {mid} 0 512")
    t = UffdWpTracker()
    assert frozen_round(t, d.pid, base, base + 512 * PS)[0] == set(range(512))
    d.cmd(f"w {mid} 5 512 7")
    data, zero = frozen_round(t, d.pid, base, base + 512 * PS)
    key = [k for k in t.unregisterable if k[0] == base]
    if key:  # shmem without WP support falls back to full content, with a reason
        assert data == set(range(512)), t.unregisterable
    else:
        assert (data, zero) == (set(range(5, 512, 7)), set())


def test_state_survives_a_new_engine(target):
    d = target()
    mid, base = d.map("anon", 64)
    d.cmd(f"w {mid} 0 64")
    t = UffdWpTracker()
    frozen_round(t, d.pid)
    blob = t.state_bytes()
    t.close()
    del t
    d.cmd(f"w {mid} 11")
    t2 = UffdWpTracker.from_state(blob)  # as a later `checkpoint dump` would
    assert t2.full_reason(d.pid) is None
    assert frozen_round(t2, d.pid, base, base + 64 * PS) == ({11}, set())


def test_second_engine_forces_full_layers(target):
    d = target()
    mid, base = d.map("anon", 64)
    d.cmd(f"w {mid} 0 64")
    a = UffdWpTracker()
    frozen_round(a, d.pid)
    d.cmd(f"w {mid} 1")
    b = UffdWpTracker()  # another chain on the same target
    frozen_round(b, d.pid)  # b's first round is full and clears the dirty bits
    d.cmd(f"w {mid} 2")
    reason = a.full_reason(d.pid)
    assert reason and "another engine" in reason
    data, _ = frozen_round(a, d.pid, base, base + 64 * PS)
    assert data == set(range(64))  # full: page 1 is not lost
    assert "another engine" in b.full_reason(d.pid)


def test_target_closing_its_fds_forces_a_full_layer(target):
    d = target()
    mid, base = d.map("anon", 32)
    d.cmd(f"w {mid} 0 32")
    t = UffdWpTracker()
    frozen_round(t, d.pid)
    d.cmd(f"w {mid} 4")
    with freeze(d.pid) as proc:  # the program closes every fd it does not know
        from checkpoint.inject import Injector
        with Injector(proc) as r:
            for fd in parked_fds(d.pid):
                r.call("close", fd)
    reason = t.full_reason(d.pid)
    assert reason and "no longer holds" in reason
    data, _ = frozen_round(t, d.pid, base, base + 32 * PS)
    assert data == set(range(32))
    d.cmd(f"w {mid} 6")
    assert frozen_round(t, d.pid, base, base + 32 * PS) == ({6}, set())


def test_every_unregistered_vma_has_a_reason(spawn, python_exe):
    t_ = spawn([python_exe, "-c", "import time,sys; print('READY', flush=True); time.sleep(30)"])
    t_.expect("READY")
    t = UffdWpTracker()
    frozen_round(t, t_.pid)
    for key, why in t.unregisterable.items():
        assert why and ":" in why
    data, zero = frozen_round(t, t_.pid)
    # an idle interpreter writes (almost) nothing between two rounds
    assert len(data) < 64

