"""What madvise, mlock and PR_SET_THP_DISABLE leave on an address space:
VmFlags of each VMA (smaps' two-letter codes, kept in VmaEntry.vmflags) and
the mm's THP-disable bit (MmEntry.thp_disabled).

The codes fall in three sets. ``ADVICE`` and the lock codes are state a
syscall made, applied again at restore. ``KEPT`` come back with the mapping
itself (prot, MAP_* flags, the file), are the kernel's or the engine's own
(soft-dirty, userfaultfd-wp of a tracker): nothing to do. Anything else
(sealed, droppable, shadow stack, a code this engine does not know) is state
no restore makes: the dump refuses it, and so does a restore of an image
that names one.
"""

from __future__ import annotations

import functools
import os

from ..batch import BatchError
from ..errors import CheckpointError, RestoreError, UnsupportedObject
from ..kernel import procfs
from ..kernel.syscalls import NR

NR_MADVISE, NR_MLOCK2 = NR["madvise"], NR["mlock2"]

MADV_RANDOM, MADV_SEQUENTIAL, MADV_DONTFORK, MADV_MERGEABLE = 1, 2, 10, 12
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTDUMP, MADV_WIPEONFORK = 14, 15, 16, 18
MLOCK_ONFAULT = 1
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
PR_THP_DISABLE_EXCEPT_ADVISED = 1 << 1
PR_GET_MEMORY_MERGE = 68
PAGE, MAP_PRIVATE_ANON, MAP_FIXED_NOREPLACE = 4096, 0x22, 0x100000

#: VmFlag -> the madvise advice that sets it
ADVICE = {"sr": MADV_SEQUENTIAL, "rr": MADV_RANDOM, "dc": MADV_DONTFORK,
          "dd": MADV_DONTDUMP, "hg": MADV_HUGEPAGE, "nh": MADV_NOHUGEPAGE,
          "mg": MADV_MERGEABLE, "wf": MADV_WIPEONFORK}
LOCKS = frozenset({"lo", "lf"})
KEPT = frozenset({"rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "pf", "io", "de",
                  "ac", "nr", "ht", "sf", "ar", "sd", "mm", "um", "uw", "ui"})
_NAMES = {"sl": "sealed (mseal)", "dp": "droppable (MAP_DROPPABLE)",
          "ss": "a shadow stack"}


def unrestorable(flags) -> str | None:
    """Why a VMA with these VmFlags cannot be restored, or None."""
    return _unrestorable(tuple(flags))


_last_flags: tuple = (None, 0, [])


def _flags_of(mm) -> list[tuple[str, ...]]:
    """The VmFlags of each of ``mm``'s VMAs as tuples, read once for the
    three passes of a restore (check, advice, locks): reading a protobuf
    string list costs ~1.5 us a VMA."""
    global _last_flags
    held, n, flags = _last_flags
    if held is not mm or n != len(mm.vmas):
        flags = [tuple(v.vmflags) for v in mm.vmas]
        _last_flags = (mm, len(flags), flags)
    return flags


@functools.lru_cache(maxsize=1024)
def _unrestorable(flags: tuple) -> str | None:
    # cached: a process with 30,000 VMAs has a handful of distinct VmFlags sets
    bad = sorted(set(flags) - KEPT - LOCKS - set(ADVICE))
    if bad:
        return ", ".join(_NAMES.get(f, f"VmFlag {f[:8]!r} unknown to this engine")
                         for f in bad[:4])
    if "lf" in flags and "lo" not in flags:
        return "VmFlag 'lf' without 'lo'"
    if {"hg", "nh"} <= set(flags) or {"sr", "rr"} <= set(flags):
        return "contradictory VmFlags"
    return None


def _what(v) -> str:
    return f"VMA {v.start:#x}-{v.end:#x} {v.path}".rstrip()


def check_image(mm, special) -> None:
    """Refuse an image whose VmFlags name state no restore makes."""
    all_flags = _flags_of(mm)
    bad = {f for f in set(all_flags) if _unrestorable(f)}
    if not bad:   # the usual case: a few distinct sets, none refused; no step a VMA
        return
    for v, flags in zip(mm.vmas, all_flags):
        if flags in bad and v.path not in special:
            raise RestoreError(f"{_what(v)} in the image is {_unrestorable(flags)}: "
                               "not restorable")


@functools.lru_cache(maxsize=1024)
def _advice(flags: tuple) -> tuple[tuple[str, int], ...]:
    """(code, advice) to apply for these VmFlags, or () for the kernel's own
    mappings ('io', 'pf': their flags come back with them)."""
    if {"io", "pf"} & set(flags):
        return ()
    return tuple((code, ADVICE[code]) for code in sorted(set(flags) & set(ADVICE)))


def apply_advice(r, mm, special) -> None:
    """madvise each VMA as dumped, and the THP-disable bit (set either way:
    the placeholder inherits the engine's). Runs after every page is
    written, so that no advice (WIPEONFORK, DONTFORK) meets the writes."""
    table, named = [], []  # one batch of madvise calls (checkpoint/batch.py)
    all_flags = _flags_of(mm)
    # the VmFlags sets that ask for advice, of the few distinct ones: the
    # usual process has none, and then no step a VMA
    advised = {f for f in set(all_flags) if _advice(f)}
    for v, flags in zip(mm.vmas, all_flags) if advised else ():
        if flags in advised and v.path not in special:
            for code, advice in _advice(flags):
                table.append((NR_MADVISE, v.start, v.end - v.start, advice))
                named.append((code, v))
    try:
        r.batch(table)
    except BatchError as e:
        code, v = named[e.index]
        hint = " (is KSM built into this kernel?)" if code == "mg" else ""
        raise RestoreError(f"madvise {code!r} on {_what(v)}: "
                           f"{os.strerror(-e.result)}{hint}") from None
    res = r.syscall("prctl", PR_SET_THP_DISABLE, int(mm.thp_disabled), 0, 0, 0)
    if res < 0:
        raise RestoreError(f"PR_SET_THP_DISABLE {int(mm.thp_disabled)}: {os.strerror(-res)}")


def apply_locks(r, mm, special) -> None:
    """mlock the VMAs that were locked (MLOCK_ONFAULT for 'lf'). Call it with
    the dumped credentials in effect and the dumped RLIMIT_MEMLOCK set: the
    kernel then checks what the original process could lock."""
    table, named = [], []  # one batch of mlock2 calls (checkpoint/batch.py)
    all_flags = _flags_of(mm)
    locked = {f for f in set(all_flags) if _lock(f) is not None}   # as for advice
    for v, flags in zip(mm.vmas, all_flags) if locked else ():
        if flags in locked and v.path not in special:
            table.append((NR_MLOCK2, v.start, v.end - v.start, _lock(flags)))
            named.append(v)
    try:
        r.batch(table)
    except BatchError as e:
        raise RestoreError(f"mlock2 on {_what(named[e.index])}: {os.strerror(-e.result)} "
                           "(bounded by RLIMIT_MEMLOCK without CAP_IPC_LOCK)") from None


@functools.lru_cache(maxsize=1024)
def _lock(flags: tuple) -> int | None:
    """The mlock2 flags for these VmFlags, None when not locked."""
    if "lo" not in flags:
        return None
    return MLOCK_ONFAULT if "lf" in flags else 0


def refuse_mm_wide(remote) -> None:
    """What applies to the mappings a process makes later, not to a VMA:
    the image has no room for it, refused. KSM for the whole process
    (PR_SET_MEMORY_MERGE); mlockall(MCL_FUTURE), which shows nowhere in
    procfs (it is the mm's def_flags): a page mapped now in the target is
    locked, or not (VmLck grows)."""
    pid = remote.proc.pid
    if remote.syscall("prctl", PR_GET_MEMORY_MERGE, 0, 0, 0, 0) > 0:  # -EINVAL: no KSM
        raise UnsupportedObject(f"process {pid}: KSM for all its mappings "
                                "(PR_SET_MEMORY_MERGE) is not restorable")
    # at a page free in the frozen target (maps read now: the engine's own
    # pages too), known before the call: an engine interrupted around the
    # mmap, its result lost, still unmaps it (nothing else maps there)
    at = _free_page(procfs.read_maps(pid))
    before = _vmlck(pid)
    got = None
    try:
        got = remote.syscall("mmap", at, PAGE, 0, MAP_PRIVATE_ANON | MAP_FIXED_NOREPLACE, -1, 0)
        if got != at:
            raise CheckpointError(f"process {pid}: probing mlockall: mmap at {at:#x} gave "
                                  f"{os.strerror(-got) if -4096 < got < 0 else hex(got)}")
        locked = _vmlck(pid) > before
    finally:
        if got is None or got == at:
            remote.syscall("munmap", at, PAGE)
    if locked:
        raise UnsupportedObject(f"process {pid}: mlockall(MCL_FUTURE) (new mappings locked) "
                                "is not restorable")


def _free_page(vmas) -> int:
    """The page just below the first mapping (above mmap_min_addr's usual
    64 KiB) that has a free page under it."""
    prev_end = 0x10000
    for v in sorted(vmas, key=lambda v: v.start):
        if v.start - prev_end >= PAGE:
            return v.start - PAGE
        prev_end = max(prev_end, v.end)
    raise UnsupportedObject("no free page in the address space to probe mlockall")


def _vmlck(pid: int) -> int:
    return int(procfs.read_status(pid).raw["VmLck"].split()[0])


def thp_disabled(remote) -> bool:
    """PR_GET_THP_DISABLE in the target; the 'except advised' mode has no
    room in the image: refused."""
    res = remote.call("prctl", PR_GET_THP_DISABLE, 0, 0, 0, 0)
    if res & PR_THP_DISABLE_EXCEPT_ADVISED:
        raise UnsupportedObject(f"process {remote.proc.pid}: THP disabled except where "
                                "advised (PR_THP_DISABLE_EXCEPT_ADVISED) is not restorable")
    return bool(res)
