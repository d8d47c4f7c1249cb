"""Process-wide identity and attributes: exe, comm, cmdline, personality,
umask, rlimits, credentials, pgid/sid; and the pstree entry."""

from __future__ import annotations

import os

from ..images.pb import process_pb2, pstree_pb2
from ..inject import Injector
from ..kernel import procfs

PR_GET_DUMPABLE = 3
RLIM_INFINITY = (1 << 64) - 1

# /proc/PID/limits row titles -> RLIMIT_* numbers (asm-generic/resource.h)
RLIMITS = {
    "Max cpu time": 0, "Max file size": 1, "Max data size": 2, "Max stack size": 3,
    "Max core file size": 4, "Max resident set": 5, "Max processes": 6,
    "Max open files": 7, "Max locked memory": 8, "Max address space": 9,
    "Max file locks": 10, "Max pending signals": 11, "Max msgqueue size": 12,
    "Max nice priority": 13, "Max realtime priority": 14, "Max realtime timeout": 15,
}


def parse_limits(text: str) -> list[tuple[int, int, int]]:
    out = []
    for line in text.splitlines()[1:]:
        for title, res in RLIMITS.items():
            if line.startswith(title):
                soft, hard = line[len(title):].split()[:2]
                conv = (lambda v: RLIM_INFINITY if v == "unlimited" else int(v))
                out.append((res, conv(soft), conv(hard)))
    return sorted(out)


def start_time(pid: int) -> int:
    return procfs.read_stat(pid).starttime


def dump_pstree(pid: int, tids: list[int]) -> pstree_pb2.PstreeEntry:
    st = procfs.read_stat(pid)
    return pstree_pb2.PstreeEntry(pid=pid, ppid=st.ppid, pgid=st.pgrp, sid=st.session,
                                  threads=[pid] + [t for t in tids if t != pid], comm=st.comm,
                                  start_time=st.starttime)


def dump_process(remote: Injector, vdso: dict) -> process_pb2.ProcessEntry:
    pid = remote.proc.pid
    st, ss = procfs.read_stat(pid), procfs.read_status(pid)
    p = process_pb2.ProcessEntry(pid=pid, start_time=st.starttime, comm=st.comm,
                                 pgid=st.pgrp, sid=st.session, ppid=st.ppid,
                                 umask=ss.umask or 0, **vdso)
    try:
        p.exe_path = os.readlink(f"/proc/{pid}/exe")
        est = os.stat(f"/proc/{pid}/exe")
        p.exe_dev, p.exe_inode = est.st_dev, est.st_ino
    except OSError:
        pass
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        p.cmdline = f.read()
    with open(f"/proc/{pid}/personality") as f:
        p.personality = int(f.read().strip(), 16)
    with open(f"/proc/{pid}/limits") as f:
        for res, cur, mx in parse_limits(f.read()):
            p.rlimits.add(resource=res, cur=cur, max=mx)
    c = p.creds
    c.uid.extend(ss.uid)
    c.gid.extend(ss.gid)
    c.groups.extend(int(g) for g in ss.raw.get("Groups", "").split())
    c.cap_eff = ss.cap_eff
    c.cap_prm = int(ss.raw.get("CapPrm", "0"), 16)
    c.cap_inh = int(ss.raw.get("CapInh", "0"), 16)
    c.cap_bnd = int(ss.raw.get("CapBnd", "0"), 16)
    c.no_new_privs = int(ss.raw.get("NoNewPrivs", "0"))
    p.dumpable = remote.call("prctl", PR_GET_DUMPABLE)
    return p
