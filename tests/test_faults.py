"""An engine killed or signalled at any point of a round never corrupts a later
checkpoint and never leaves its target stopped, traced or damaged.

For each verb (``pre-dump``, ``dump -R``, ``dump``): SIGKILL at every named
fault point the round goes through (and at a sample of its injection steps),
SIGTERM/SIGINT at a few, and SIGKILL/SIGTERM after random delays; each run is
followed by a final dump and a restore whose memory is compared page by page
with the target's memory frozen in that dump (tests/fault_helpers.py). The
long mode is ``tools/fault_inject.py`` (100 random runs per verb).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest

import checkpoint
import fault_helpers as fh
from checkpoint.images import open_chain
from checkpoint.tracking import parked
from conftest import build_target

VERBS = ["pre-dump", "dump-R", "dump"]
RANDOM_RUNS = 4


def points_of(verb: str, exe: str, tmp_path) -> list[str]:
    t = fh.Mem.start(exe, 16, 2, 500)
    try:
        images = str(tmp_path / f"points-{verb}")
        base = subprocess.run(fh.engine_cmd("pre-dump", t.pid, images), capture_output=True,
                              text=True, timeout=60)
        assert base.returncode == 0, base.stderr
        return fh.fault_points(verb, t, images)
    finally:
        t.kill()
        t.popen.wait()


def plan(points: list[str], rng: random.Random) -> list[str]:
    """Every named point once with SIGKILL, two injection steps, and the
    stop signals at a few points (SIGTERM/SIGINT must give exit 130 and no
    layer, or exit 0 past the commit point)."""
    named = list(dict.fromkeys(p for p in points if not p.startswith("inject.")))
    faults = [f"{p}:kill" for p in named]
    inj = [i + 1 for i, p in enumerate(points) if p.startswith("inject.")]
    faults += [f"*@{k}:kill" for k in rng.sample(inj, min(2, len(inj)))]
    faults += ["round.frozen:term", "round.collected:int", "round.pages:term",
               "round.published:term", f"*@{rng.choice(inj)}:int"]
    return faults


@pytest.mark.parametrize("verb", VERBS)
def test_killed_rounds_never_corrupt_the_next_checkpoint(verb, tmp_path):
    exe = str(build_target("memcheck"))
    rng = random.Random(hash(verb) & 0xFFFF)
    faults = plan(points_of(verb, exe, tmp_path), rng)
    runner = fh.Runner(str(tmp_path), exe, rng=rng)
    outcomes = []
    try:
        for fault in faults:
            outcomes.append(runner.run(verb, fault=fault))
        for i in range(RANDOM_RUNS):
            sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
            outcomes.append(runner.run(verb, delay=rng.uniform(0.0, 0.25), sig=sig))
    finally:
        runner.close()
    print(f"{verb}: {len(outcomes)} runs, "
          f"{sum(o.published for o in outcomes)} with the killed round published, "
          f"{sum(bool(o.note) for o in outcomes)} followed by a full layer; "
          f"{sum(o.pages_compared for o in outcomes)} pages compared, none differ")
    # a kill after the dirty set was taken and before publication must make
    # the next layer full (or there would be nothing to compare against)
    lost = [o for o in outcomes if o.fault.startswith(("round.collected", "round.thawed",
                                                       "round.pages", "round.written",
                                                       "round.publish:"))
            and o.engine_rc < 0]
    assert lost and all(o.note for o in lost), [(o.fault, o.note) for o in lost]


def test_parked_fds_of_another_chain_are_never_the_programs(tmp_path):
    """A pre-dump into one directory (its fds stay parked in the target), a
    failed pre-dump into a second, then a dump into a third: no refusal of
    the engine's own uffd, no --external-fds needed, and the restored process
    holds none of the engine's fds."""
    exe = str(build_target("memcheck"))
    t = fh.Mem.start(exe, 8, 1, 500)
    try:
        with checkpoint.Checkpointer(t.pid, tmp_path / "a", progress=False) as ck:
            ck.pre_dump()
        mine = parked.engine_fds(t.pid)
        assert len(mine) == 2, mine
        r = subprocess.run(fh.engine_cmd("pre-dump", t.pid, str(tmp_path / "b")),
                           env={**os.environ, "CHECKPOINT_FAULT": "round.pages:kill"},
                           capture_output=True)
        assert r.returncode == -signal.SIGKILL
        with checkpoint.Checkpointer(t.pid, tmp_path / "c", progress=False) as ck:
            st = ck.dump()
        assert st.full_reason  # another chain's state: a full layer, never a refusal
        fh._reap(t)
        with open_chain(tmp_path / "c") as chain:
            fds = [f.fd for f in chain.records("files")[0][1].fds]
        assert not set(fds) & mine, (fds, mine)
        rest = checkpoint.restore(tmp_path / "c", inherit=t.keys, inherit_stdio=False)
        t.pid, t.popen = rest.pid, None
        assert parked.engine_fds(rest.pid) == set()
        assert t.cmd("check").startswith("good")
    finally:
        t.kill()
        fh._reap(t)


def test_predumps_of_a_program_unmapping_memory_never_fail(tmp_path):
    """A program that maps and unmaps buffers all the time (numpy, glibc's
    mmap'ed mallocs): pages that vanish after the thaw are skipped and
    counted, never an I/O error, and the restore is still exact."""
    exe = str(build_target("memcheck"))
    t = fh.Mem.start(exe, 8, 1, 0)
    try:
        assert t.cmd("churn on") == "churn on" and t.cmd("run") == "running"
        vanished = 0
        with checkpoint.Checkpointer(t.pid, tmp_path / "img", progress=False) as ck:
            for _ in range(30):
                vanished += ck.pre_dump().pages_vanished
            assert t.cmd("pause") == "paused"
            snap = {}
            ck.on_frozen = lambda proc: snap.update(fh.private_pages(proc.pid, proc.mem.fd))
            ck.dump()
        print(f"30 pre-dumps of a churning program: {vanished} pages vanished under them")
        fh._reap(t)
        assert fh.chain_mismatches(str(tmp_path / "img"), t.pid, snap) == []
        rest = checkpoint.restore(tmp_path / "img", inherit=t.keys, inherit_stdio=False)
        t.pid, t.popen = rest.pid, None
        assert t.cmd("check").startswith("good")
    finally:
        t.kill()
        fh._reap(t)
