"""madvise state, mlock and THP disable, end to end on a real target
(tests/targets/mem_attrs_target.py): each mapping carries one VmFlag; after
dump, kill and restore, smaps of the restored process shows every flag on
its mapping again, /proc/PID/status shows THP disabled, and the target finds
its memory as it was. State no restore makes (a droppable mapping) fails the
dump naming it, and so does an image naming it."""

from __future__ import annotations

import json
import os
import sys

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import RestoreError, UnsupportedObject
from checkpoint.freezer import freeze_process
from checkpoint.images import open_chain
from checkpoint.inject import Injector
from checkpoint.kernel import procfs
from checkpoint.restorer import restore
from image_edit import edited_copy, one
from test_dump_restore import Channel, reaper  # noqa: F401  (the fixture)

TARGET = os.path.join(os.path.dirname(__file__), "targets", "mem_attrs_target.py")
CAP_IPC_LOCK, RLIMIT_MEMLOCK = 14, 8
CODES = ("sr", "rr", "dc", "mg", "hg", "nh", "dd", "wf", "lo", "lf")


def vma_at(pid: int, addr: int) -> procfs.Vma:
    (v,) = [v for v in procfs.read_smaps(pid) if v.start <= addr < v.end]
    return v


def start(reaper, *args):
    ch = Channel()
    p = ch.popen([sys.executable, TARGET, *args])
    reaper.append(p.pid)
    addrs = json.loads(ch.expect("READY").split(" ", 1)[1])
    return ch, p, addrs


def test_vmflags_and_thp_disable_come_back(tmp_path, reaper):
    ch, p, addrs = start(reaper)
    assert ch.ask("check", "STATE") == "STATE ok"
    for code in CODES:  # the target set them: the test would see them missing
        assert code in vma_at(p.pid, addrs[code]).vmflags, code
    inherit = ch.inherit(p.pid)
    images = tmp_path / "img"
    with Checkpointer(p.pid, images) as ck:
        ck.dump()
    with open_chain(images) as chain:
        (mm,) = [m for _, m in chain.records("mm")]
    assert mm.thp_disabled
    p.wait(10)
    r = restore(images, detach=True, inherit=inherit, inherit_stdio=False)
    try:
        for code in CODES:
            v = vma_at(r.pid, addrs[code])
            assert code in v.vmflags, (code, sorted(v.vmflags))
            # one flag each: no advice leaked onto another mapping
            assert not (set(CODES) - {code, "lo"}) & v.vmflags, (code, sorted(v.vmflags))
        assert procfs.read_status(r.pid).raw["THP_enabled"] == "0"
        assert ch.ask("check", "STATE") == "STATE ok"
    finally:
        r.kill()
        r.wait(10)
        ch.close()


def test_flags_changed_after_a_predump_are_the_dumped_ones(tmp_path, reaper):
    """madvise on a whole VMA changes no line of maps: the final dump must
    read the flags again inside its freeze, not keep the pre-dump's."""
    ch, p, addrs = start(reaper)
    images = tmp_path / "img"
    with Checkpointer(p.pid, images) as ck:
        ck.pre_dump()
        # the program changes its mind (injected here: process_madvise takes
        # only the reclaim advices): MADV_NORMAL on a whole VMA, THP back on
        proc = freeze_process(p.pid, 5.0)
        try:
            with Injector(proc, p.pid) as r:
                assert r.call("madvise", addrs["rr"], 4 * 4096, 0) == 0  # MADV_NORMAL
                assert r.call("prctl", 41, 0, 0, 0, 0) == 0
        finally:
            proc.thaw()
        ck.dump()
    with open_chain(images) as chain:
        mm = [m for _, m in chain.records("mm")][-1]
    # (without its advice the VMA may have merged with a neighbour)
    (rr,) = [v for v in mm.vmas if v.start <= addrs["rr"] < v.end]
    assert "rr" not in rr.vmflags and not mm.thp_disabled
    ch.close()


def test_droppable_mapping_is_refused_by_dump_and_restore(tmp_path, reaper):
    ch, p, addrs = start(reaper, "droppable")
    assert "dp" in vma_at(p.pid, addrs["dp"]).vmflags
    with pytest.raises(UnsupportedObject, match=f"VMA {addrs['dp']:#x}-.*droppable"):
        with Checkpointer(p.pid, tmp_path / "img") as ck:
            ck.dump()
    ch.close()


def test_image_naming_unknown_vmflag_is_refused(tmp_path, reaper):
    ch, p, addrs = start(reaper)
    inherit = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    p.wait(10)

    def edit(records):
        for v in one(records, "mm").vmas:
            if v.start == addrs["dd"]:
                v.vmflags.append("zz")
    bad = edited_copy(tmp_path / "img", tmp_path / "bad", edit)
    with pytest.raises(RestoreError, match=f"VMA {addrs['dd']:#x}-.*'zz' unknown"):
        restore(bad, detach=True, inherit=inherit, inherit_stdio=False)
    ch.close()


def test_mlock_is_checked_with_the_dumped_limit_and_capabilities(tmp_path, reaper):
    """The engine (root) may lock anything; the restored program only what
    its RLIMIT_MEMLOCK and capabilities let it. An image whose process has
    no CAP_IPC_LOCK and RLIMIT_MEMLOCK 0 cannot have locked VMAs: the
    restore names the VMA instead of locking it with the engine's power."""
    ch, p, addrs = start(reaper)
    inherit = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    p.wait(10)

    def edit(records):
        proc = one(records, "process")
        proc.creds.cap_eff &= ~(1 << CAP_IPC_LOCK)
        for lim in proc.rlimits:
            if lim.resource == RLIMIT_MEMLOCK:
                lim.cur = lim.max = 0
    bad = edited_copy(tmp_path / "img", tmp_path / "bad", edit)
    with pytest.raises(RestoreError, match=f"mlock2 on VMA ({addrs['lo']:#x}|{addrs['lf']:#x})"):
        restore(bad, detach=True, inherit=inherit, inherit_stdio=False)
    ch.close()


@pytest.mark.parametrize("arg,what", [("mcl_future", r"mlockall\(MCL_FUTURE\)"),
                                      ("merge_all", r"KSM for all its mappings")])
def test_mm_wide_state_is_refused(tmp_path, reaper, arg, what):
    """State for the mappings a process makes later has no room in the
    image: refused. MCL_FUTURE is in no procfs file: the dump probes it with
    a page mapped in the target."""
    ch, p, _ = start(reaper, arg)
    with pytest.raises(UnsupportedObject, match=f"process {p.pid}: {what}"):
        with Checkpointer(p.pid, tmp_path / "img") as ck:
            ck.dump()
    assert ch.ask("check", "STATE") == "STATE ok"  # the refused dump left it running
    ch.close()


def test_live_migration_restores_them(tmp_path):
    """The stager maps the VMAs layer by layer and applies the final layer's
    pages last: the flags come after those, through the same finish."""
    import test_migrate as tm
    from netns import two_hosts
    tm.libc.prctl(tm.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    pids: list[int] = []
    try:
        with two_hosts() as (src, dst):
            t = tm.Target.start_in(src, [sys.executable, TARGET], ready=None)
            pids.append(t.pid)
            first = t.line(20)
            assert first.startswith("READY"), first
            addrs = json.loads(first.split(" ", 1)[1])
            srv = tm.Server(dst, str(tmp_path / "dst"), t, str(key))
            r = tm.migrate(src, t.pid, srv.addr, str(key))
            assert r.returncode == 0, r.stderr
            res = srv.result()
            assert res["ok"], res
            pid = res["restored_pid"]
            pids.append(pid)
            for code in CODES:
                v = vma_at(pid, addrs[code])
                assert code in v.vmflags, (code, sorted(v.vmflags))
            assert procfs.read_status(pid).raw["THP_enabled"] == "0"
            assert t.cmd("check") == "STATE ok"
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for _ in pids:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        tm.libc.prctl(tm.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
