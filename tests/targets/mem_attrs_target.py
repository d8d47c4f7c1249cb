"""A target whose mappings each carry one madvise or mlock state, with the
THP-disable bit set, checking its memory itself after a restore.

    mem_attrs_target.py [droppable] [mcl_future] [merge_all]
prints "READY {json}" ({VmFlag code: address of its mapping}); then for
each line on stdin prints "STATE ok" or "STATE bad <what>": every mapping
still holds its pattern and the THP-disable bit is still set.
``droppable``: also a MAP_DROPPABLE mapping; ``mcl_future``: mlockall(MCL_FUTURE);
``merge_all``: PR_SET_MEMORY_MERGE (state no restore makes).
"""
import ctypes
import json
import mmap
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.syscall.restype = ctypes.c_long
PAGES, PAGE = 4, 4096
SIZE = PAGES * PAGE
RW, PRIV_ANON, MAP_DROPPABLE = 3, 0x22, 0x08
NR_MLOCK2, MLOCK_ONFAULT = 325, 1
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
ADVICE = {"sr": 2, "rr": 1, "dc": 10, "mg": 12, "hg": 14, "nh": 15, "dd": 16, "wf": 18}


def fail(what):
    print(f"ERR {what}: errno {ctypes.get_errno()}", flush=True)
    sys.exit(1)


def region(flags=PRIV_ANON):
    a = libc.mmap(None, SIZE, RW, flags, -1, 0)
    if a in (None, ctypes.c_void_p(-1).value):
        fail("mmap")
    return a


def pattern(code: str) -> bytes:
    return (code.encode() * (SIZE // 2))[:SIZE]


addrs: dict[str, int] = {}
for code, adv in ADVICE.items():
    a = addrs[code] = region()
    ctypes.memmove(a, pattern(code), SIZE)
    if libc.madvise(a, SIZE, adv) != 0:
        fail(f"madvise {code}")
for code, flags in (("lo", 0), ("lf", MLOCK_ONFAULT)):
    a = addrs[code] = region()
    ctypes.memmove(a, pattern(code), SIZE // 2)  # half: onfault leaves the rest unfaulted
    if libc.syscall(NR_MLOCK2, ctypes.c_void_p(a), ctypes.c_size_t(SIZE), flags) != 0:
        fail(f"mlock2 {code}")
if "droppable" in sys.argv[1:]:
    addrs["dp"] = region(MAP_DROPPABLE | 0x20)
if "mcl_future" in sys.argv[1:] and libc.mlockall(2) != 0:
    fail("mlockall(MCL_FUTURE)")
if "merge_all" in sys.argv[1:] and libc.prctl(67, 1, 0, 0, 0) != 0:  # PR_SET_MEMORY_MERGE
    fail("PR_SET_MEMORY_MERGE")
if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
    fail("PR_SET_THP_DISABLE")
print("READY " + json.dumps(addrs), flush=True)

for line in sys.stdin:
    problems = []
    for code, a in addrs.items():
        if code == "dp":
            continue
        n = SIZE // 2 if code in ("lo", "lf") else SIZE
        got = ctypes.string_at(a, SIZE)
        if got[:n] != pattern(code)[:n] or got[n:] != bytes(SIZE - n):
            problems.append(f"{code} mapping content")
    if libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 1:
        problems.append("THP not disabled")
    print("STATE " + ("ok" if not problems else "bad " + "; ".join(problems)), flush=True)
