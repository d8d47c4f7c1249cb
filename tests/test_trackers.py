"""Dirty-page trackers (full, hash, soft-dirty) and the registry, against
real targets (tests/targets/scan_target.c) and synthetic pagemap input."""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from checkpoint.errors import KernelFeatureError, NoSuchProcess, UsageError
from checkpoint.kernel.procfs import PAGE_SIZE, Vma, read_maps
from checkpoint.tracking import base as base_mod
from checkpoint.tracking import softdirty
from checkpoint.tracking.base import (
    REGION_ZERO, FullTracker, Tracker, choose_tracker, mm_identity, tracker_status,
)
from checkpoint.tracking.hashing import HashTracker
from checkpoint.tracking.softdirty import SoftDirtyTracker, classic_batches, soft_dirty_probe
from test_scan import target  # noqa: F401  (fixture)

PS = PAGE_SIZE
ROUNDS = int(os.environ.get("SCAN_ROUNDS", "100"))  # the issue asks for 100


def run_round(tracker: Tracker, pid: int, lo: int | None = None, hi: int | None = None):
    """One round over the whole target; returns (data pages, zero pages) as
    page indices relative to ``lo`` restricted to [lo, hi), and arms."""
    vmas = read_maps(pid)
    data, zero = set(), set()
    for batch in tracker.collect(pid, vmas):
        assert batch.regions.ndim in (1, 2)
        for s, e, f in batch.regions.tolist():
            assert batch.vma.start <= s < e <= batch.vma.end
            for p in range(s, e, PS):
                if lo is None or lo <= p < hi:
                    idx = p if lo is None else (p - lo) // PS
                    assert idx not in data and idx not in zero, "page reported twice"
                    (zero if f & REGION_ZERO else data).add(idx)
    tracker.arm(pid, vmas)
    return data, zero


# --------------------------------------------------------------------------
# registry


def test_registry_auto_order(monkeypatch):
    from checkpoint.kerndat import probe_all
    status = tracker_status()
    assert status["full"] is None and status["hash"] is None
    # the registry agrees with `checkpoint check` on what works here
    usable = [n for n in base_mod.AUTO_ORDER if status[n] is None]
    assert usable == probe_all().trackers
    assert choose_tracker("auto").name == usable[0]
    assert choose_tracker("full") is FullTracker

    # auto takes the first available in order: hide the better ones
    for name in base_mod.AUTO_ORDER[:2]:
        monkeypatch.setattr(base_mod.TRACKERS[name], "probe", classmethod(lambda cls: "off"))
    assert choose_tracker("auto") is HashTracker
    with pytest.raises(UsageError, match="unknown"):
        choose_tracker("nope")


def test_registry_unavailable_named(monkeypatch):
    monkeypatch.setattr(SoftDirtyTracker, "probe", classmethod(lambda cls: "off here"))
    with pytest.raises(KernelFeatureError, match="off here"):
        choose_tracker("soft-dirty")


# --------------------------------------------------------------------------
# soft-dirty


def test_soft_dirty_probe_logic(monkeypatch):
    SD = 1 << 55
    for seq, ok in (([SD, 0, SD], True), ([0], False), ([SD, SD], False), ([SD, 0, 0], False)):
        it = iter(seq)
        monkeypatch.setattr(softdirty, "_entry", lambda path, addr: next(it))
        reason = softdirty._probe_self()
        assert (reason is None) == ok, (seq, reason)
    monkeypatch.setattr(softdirty, "_entry", lambda path, addr: 0)
    assert "CONFIG_MEM_SOFT_DIRTY is off" in softdirty._probe_self()


def _vma(start, pages, perms="rw-p", inode=0):
    return Vma(start, start + pages * PS, perms, 0, 0, 0, inode, "")


def test_soft_dirty_classic_parsing_synthetic():
    P, S, F, SD = 1 << 63, 1 << 62, 1 << 61, 1 << 55
    base = 0x7000_0000_0000
    entries = struct.pack("<8Q", P | SD, P, 0, S | SD, P | F | SD, SD, P | SD, P | 7)
    vma = _vma(base, 8)
    rows = [r for b in classic_batches(vma, entries, base, whole=False) for r in b.regions.tolist()]
    p = lambda i, j, f=0: [base + i * PS, base + j * PS, f]  # noqa: E731
    # data: soft-dirty with private content (0, 3, 6); zero: no private content (2, 4, 5)
    assert rows == [p(0, 1), p(2, 3, REGION_ZERO), p(3, 4), p(4, 6, REGION_ZERO), p(6, 7)]
    rows = [r for b in classic_batches(vma, entries, base, whole=True) for r in b.regions.tolist()]
    assert rows == [p(0, 2), p(3, 4), p(6, 8)]
    shared = _vma(base, 8, "rw-s", inode=5)
    rows = [r for b in classic_batches(shared, entries, base, whole=False) for r in b.regions.tolist()]
    assert rows == [p(0, 1), p(3, 5), p(6, 7)]


def test_soft_dirty_real_kernel(target):
    reason = soft_dirty_probe()
    if reason is not None:
        print(f"soft-dirty unavailable: {reason}")
        pytest.skip(f"soft-dirty unavailable on this kernel: {reason}")
    d = target()
    mid, base = d.map("anon", 64)
    d.cmd(f"w {mid} 0 64")
    for use_ioctl in (True, False):
        t = SoftDirtyTracker(use_ioctl=use_ioctl)
        data, _ = run_round(t, d.pid, base, base + 64 * PS)
        assert data == set(range(64))
        d.cmd(f"w {mid} 0 64 3")
        data, _ = run_round(t, d.pid, base, base + 64 * PS)
        assert data == set(range(0, 64, 3))


def test_soft_dirty_classic_full_round_matches_full(target, tmp_path):
    """The classic-pagemap reader on a real target: its full round is what
    the full tracker reports (no soft-dirty bit needed for that)."""
    f = tmp_path / "data"
    f.write_bytes(os.urandom(8 * PS))
    d = target()
    mid, base = d.map("anon", 64)
    d.cmd(f"w {mid} 0 64 2")
    fid, fbase = d.map("file", 8, f)
    d.cmd(f"r {fid} 0 8")
    d.cmd(f"w {fid} 1 3")
    sd, full = SoftDirtyTracker(use_ioctl=False), FullTracker()
    a, _ = run_round(sd, d.pid)
    b, _ = run_round(full, d.pid)

    def ours(pages):   # the two rounds are two freezes: the target's own
        # runtime may touch a new page in between (seen once: one page more)
        return {p for p in pages if base <= p < base + 64 * PS or fbase <= p < fbase + 8 * PS}
    assert ours(a) == ours(b)
    assert {(p - fbase) // PS for p in a if fbase <= p < fbase + 8 * PS} == {1, 2}


# --------------------------------------------------------------------------
# full tracker


def test_full_tracker(target, tmp_path):
    f = tmp_path / "data"
    f.write_bytes(os.urandom(16 * PS))
    d = target()
    mid, base = d.map("anon", 64)
    d.cmd(f"w {mid} 0 64 2")
    d.cmd(f"z {mid} 0 8")
    d.cmd(f"r {mid} 0 4")          # zero page
    fid, fbase = d.map("file", 16, f)
    d.cmd(f"r {fid} 0 16")
    d.cmd(f"w {fid} 5")
    t = FullTracker()
    assert t.full_reason(d.pid)
    for _ in range(2):  # every round is the same full set
        data, zero = run_round(t, d.pid, base, base + 64 * PS)
        assert data == set(range(8, 64, 2)) and zero == {0, 1, 2, 3}
        fdata, fzero = run_round(t, d.pid, fbase, fbase + 16 * PS)
        assert fdata == {5} and fzero == set()


def test_full_tracker_random_rounds(target):
    """The property test for `full`: every round reports exactly the pages
    written so far (all of them: full layers), nothing lost."""
    rng = random.Random(5)
    d = target()
    n = 10_000
    mid, base = d.map("anon", n)
    t = FullTracker(vec_len=64)
    ever: set[int] = set()
    for _ in range(ROUNDS):
        written = set(rng.sample(range(n), rng.randint(1, 500)))
        d.write(mid, sorted(written))
        ever |= written
        data, zero = run_round(t, d.pid, base, base + n * PS)
        assert data == ever and not zero


@pytest.mark.parametrize("kind", ["shared", "memfd", "thp"])
def test_full_tracker_other_memory(target, kind):
    d = target()
    mid, base = d.map(kind, 512)
    d.cmd(f"w {mid} 0 512 3")
    data, zero = run_round(FullTracker(), d.pid, base, base + 512 * PS)
    assert data >= set(range(0, 512, 3)) and not zero
    if kind != "thp":  # a write faults a whole 2 MiB huge page in: all present
        assert data == set(range(0, 512, 3))


# --------------------------------------------------------------------------
# hash tracker


def test_hash_tracker_rounds(target, tmp_path):
    f = tmp_path / "data"
    f.write_bytes(os.urandom(16 * PS))
    d = target()
    mid, base = d.map("anon", 256)
    d.cmd(f"w {mid} 0 256 2")
    fid, fbase = d.map("file", 16, f)
    d.cmd(f"r {fid} 0 16")
    t = HashTracker(vec_len=4)
    assert t.full_reason(d.pid) == "first round"
    data, zero = run_round(t, d.pid, base, base + 256 * PS)
    assert data == set(range(0, 256, 2)) and not zero
    assert t.full_reason(d.pid) is None
    # nothing written: nothing reported in our mappings (elsewhere the kernel
    # may write the rseq area or the stack on a CPU migration)
    assert run_round(t, d.pid, base, base + 256 * PS) == (set(), set())
    d.cmd(f"w {mid} 1 256 10")
    d.cmd(f"w {mid} 4")
    d.cmd(f"z {mid} 100 110")      # present ones become zero
    d.cmd(f"w {fid} 3")            # COW of a private file page
    data, zero = run_round(t, d.pid, base, base + 256 * PS)
    assert data == set(range(1, 256, 10)) - set(range(100, 110)) | {4}
    assert zero == set(range(100, 110, 2))
    fdata, _ = run_round(t, d.pid, fbase, fbase + 16 * PS)
    assert fdata == set()          # already taken in the previous round
    d.cmd(f"w {fid} 7")
    d.cmd(f"r {mid} 100 102")      # zero page read back: no change
    d.cmd(f"prot {mid} 0 16 0")    # PROT_NONE pages are still read
    data, zero = run_round(t, d.pid)
    assert {(p - fbase) // PS for p in data if fbase <= p < fbase + 16 * PS} == {7}
    assert not {(p - base) // PS for p in data | zero if base <= p < base + 256 * PS}


def test_hash_tracker_new_vma_remap_and_state(target):
    d = target()
    mid, base = d.map("anon", 32)
    d.cmd(f"w {mid} 0 32")
    t = HashTracker()
    run_round(t, d.pid)
    nid, nbase = d.map("anon", 16)
    d.cmd(f"w {nid} 0 16 4")
    d.cmd(f"prot {nid} 0 16 1")
    data, zero = run_round(t, d.pid, nbase, nbase + 16 * PS)
    assert data == {0, 4, 8, 12} and not zero
    d.cmd(f"map fixed {mid}")      # fresh empty mapping: old pages gone
    data, zero = run_round(t, d.pid, base, base + 32 * PS)
    assert data == set() and zero == set(range(32))
    d.cmd(f"w {mid} 3")
    blob = t.state_bytes()
    t2 = HashTracker.from_state(blob)
    assert t2.full_reason(d.pid) is None and t2.state_bytes() == blob
    data, zero = run_round(t2, d.pid, base, base + 32 * PS)
    assert data == {3} and not zero
    t2.reset("tracker lost")
    assert t2.full_reason(d.pid) == "tracker lost"
    data, _ = run_round(t2, d.pid, base, base + 32 * PS)
    assert data == {3}


@pytest.mark.parametrize("kind", ["shared", "memfd", "thp"])
def test_hash_tracker_other_memory(target, kind):
    d = target()
    mid, base = d.map(kind, 512)
    d.cmd(f"w {mid} 0 512")
    t = HashTracker()
    assert run_round(t, d.pid, base, base + 512 * PS)[0] == set(range(512))
    d.cmd(f"w {mid} 5 512 7")
    assert run_round(t, d.pid, base, base + 512 * PS) == (set(range(5, 512, 7)), set())


def test_hash_tracker_random_rounds(target):
    rng = random.Random(99)
    d = target()
    n = 10_000
    mid, base = d.map("anon", n)
    d.cmd(f"w {mid} 0 {n}")
    t = HashTracker(vec_len=64)
    run_round(t, d.pid)
    for _ in range(ROUNDS):
        written = set(rng.sample(range(n), rng.randint(1, 500)))
        d.write(mid, sorted(written))
        data, zero = run_round(t, d.pid, base, base + n * PS)
        assert data == written and not zero


def test_exec_detected(spawn):
    t = spawn(["/bin/sh", "-c", "echo started; read x; exec sleep 30"])
    t.expect("started")
    ident = mm_identity(t.pid)
    tr = HashTracker()
    run_round(tr, t.pid)
    assert tr.full_reason(t.pid) is None and mm_identity(t.pid) == ident
    t.send("go\n")
    deadline = time.monotonic() + 10
    while open(f"/proc/{t.pid}/comm").read().strip() != "sleep":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert mm_identity(t.pid) != ident
    assert "exec" in tr.full_reason(t.pid)


def test_tracker_no_such_process(target):
    d = target()
    pid = d.pid
    d.t.stop()
    for cls in (FullTracker, HashTracker):
        with pytest.raises(NoSuchProcess):
            list(cls().collect(pid, []))
