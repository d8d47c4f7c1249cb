"""Process-wide identity and attributes: exe, comm, cmdline, personality,
umask, rlimits, credentials, pgid/sid; and the pstree entry."""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import CheckpointError, RestoreError, UnsupportedObject
from ..images.pb import process_pb2, pstree_pb2
from ..inject import Injector
from ..kernel import procfs
from . import sched

PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_GET_SECUREBITS = 2, 3, 27
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
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
                                 umask=ss.umask or 0, tty_nr=st.tty_nr,
                                 exit_signal=st.exit_signal, tty_pgrp=st.tpgid, **vdso)
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
    c.cap_amb = int(ss.raw.get("CapAmb", "0"), 16)
    c.no_new_privs = int(ss.raw.get("NoNewPrivs", "0"))
    c.securebits = remote.call("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0)
    c.has_securebits = True
    p.dumpable = remote.call("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0)
    remote.write(remote.scratch, bytes(4))
    remote.call("prctl", PR_GET_PDEATHSIG, remote.scratch, 0, 0, 0)
    p.pdeath_signal = int.from_bytes(remote.read(remote.scratch, 4), "little", signed=True)
    remote.write(remote.scratch, bytes(4))
    remote.call("prctl", PR_GET_CHILD_SUBREAPER, remote.scratch, 0, 0, 0)
    p.child_subreaper = remote.read(remote.scratch, 4) != bytes(4)
    _same_creds_in_every_thread(pid, ss)
    sched.dump_oom(p, pid)
    return p


CRED_LINES = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _same_creds_in_every_thread(pid: int, leader: procfs.Status) -> None:
    """Credentials are per thread in the kernel; the image keeps one set (the
    leader's) and the restore gives it to every thread: refuse a process
    whose threads differ (a raw setuid syscall in one thread) rather than
    restore it wrong."""
    want = {k: leader.raw.get(k, "") for k in CRED_LINES}
    for tid in procfs.list_tasks(pid):
        if tid == pid:
            continue
        try:
            st = procfs.read_status(pid, tid)
        except CheckpointError:
            continue  # the thread is gone: the freezer forgot it too
        for k in CRED_LINES:
            if st.raw.get(k, "") != want[k]:
                raise UnsupportedObject(
                    f"thread {tid} of process {pid} has other credentials than the leader"
                    f" ({k}: {st.raw.get(k, '')!r} vs {want[k]!r}): threads with different"
                    " credentials are not supported")


# --------------------------------------------------------------------------
# restore: checks before anything starts, then credentials in the placeholder

NGROUPS_MAX = 65536
NO_ID = 0xFFFF_FFFF  # (uid_t)-1: "no change" to the kernel, never a real id
NRLIMITS = 16
# <linux/personality.h>: PER_LINUX / PER_LINUX32 and the flags of the upper bits
PERSONALITY_BASES = {0x0000: "PER_LINUX", 0x0008: "PER_LINUX32"}
PERSONALITY_FLAGS = (0x0040000 | 0x0080000 | 0x0100000 | 0x0200000 | 0x0400000 | 0x0800000
                     | 0x1000000 | 0x2000000 | 0x4000000 | 0x8000000)
# <linux/securebits.h>: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS, NO_CAP_AMBIENT_RAISE,
# EXEC_RESTRICT_FILE, EXEC_DENY_INTERACTIVE, each with its lock bit
SECUREBITS_ALL = 0xFFF
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
# <linux/capability.h>
CAP_NAMES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
             "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
             "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
             "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
             "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
             "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
             "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
             "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
             "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
             "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]
CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_SYS_CHROOT, CAP_SYS_ADMIN = 6, 7, 8, 18, 21
CAP_CHECKPOINT_RESTORE = 40
LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECUREBITS = 1, 4, 28
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 38, 47
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
NSIG = 64


def cap_name(bit: int) -> str:
    return CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"capability {bit}"


def cap_names(mask: int) -> str:
    return ", ".join(cap_name(b) for b in range(64) if mask >> b & 1)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(CAP_NAMES) - 1


@dataclass(frozen=True)
class Creds:
    """One task's credentials as the kernel shows them (/proc/PID/status)
    plus its securebits."""

    uid: tuple[int, int, int, int]
    gid: tuple[int, int, int, int]
    groups: tuple[int, ...]
    eff: int
    prm: int
    inh: int
    bnd: int
    amb: int
    securebits: int = 0

    @classmethod
    def of_status(cls, st: procfs.Status, securebits: int = 0) -> "Creds":
        r = st.raw
        return cls(tuple(st.uid), tuple(st.gid),
                   tuple(int(g) for g in r.get("Groups", "").split()),
                   int(r.get("CapEff", "0"), 16), int(r.get("CapPrm", "0"), 16),
                   int(r.get("CapInh", "0"), 16), int(r.get("CapBnd", "0"), 16),
                   int(r.get("CapAmb", "0"), 16), securebits)

    @classmethod
    def of_entry(cls, c: process_pb2.CredsEntry, current: "Creds") -> "Creds":
        return cls(tuple(c.uid), tuple(c.gid), tuple(c.groups), c.cap_eff, c.cap_prm,
                   c.cap_inh, c.cap_bnd, c.cap_amb,
                   c.securebits if c.has_securebits else current.securebits)

    def has(self, cap: int) -> bool:
        return bool(self.eff >> cap & 1)


def caller_creds() -> Creds:
    """The engine's own credentials: what a restore may give at most."""
    from ..kernel.syscalls import libc
    sb = libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    return Creds.of_status(procfs.read_status(os.getpid()), max(sb, 0))


def validate(p: process_pb2.ProcessEntry, cores, caller: Creds) -> None:
    """Every field of the process and creds records (and the per-thread
    security fields), before anything starts: one RestoreError naming the
    field. Then what the caller may grant: never more than it has."""
    def bad(field: str, what: str):
        raise RestoreError(f"image field process.{field}: {what}; refusing to restore")

    c = p.creds
    if len(c.uid) != 4:
        bad("creds.uid", f"{len(c.uid)} values, expected 4 (real, effective, saved, fs)")
    if len(c.gid) != 4:
        bad("creds.gid", f"{len(c.gid)} values, expected 4 (real, effective, saved, fs)")
    for name, ids in (("creds.uid", c.uid), ("creds.gid", c.gid), ("creds.groups", c.groups)):
        if NO_ID in ids:
            bad(name, f"holds {NO_ID} ((uid_t)-1), which is no id")
    if len(c.groups) > NGROUPS_MAX:
        bad("creds.groups", f"{len(c.groups)} groups, more than NGROUPS_MAX ({NGROUPS_MAX})")
    valid_caps = (1 << (last_cap() + 1)) - 1
    for name in ("cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"):
        extra = getattr(c, name) & ~valid_caps
        if extra:
            bad(f"creds.{name}", f"bits {extra:#x} name no capability of this kernel")
    if c.cap_eff & ~c.cap_prm:
        bad("creds.cap_eff", f"{cap_names(c.cap_eff & ~c.cap_prm)} effective but not permitted")
    if c.cap_amb & ~(c.cap_prm & c.cap_inh):
        bad("creds.cap_amb", f"{cap_names(c.cap_amb & ~(c.cap_prm & c.cap_inh))} ambient but "
            "not permitted and inheritable")
    if c.securebits & ~SECUREBITS_ALL:
        bad("creds.securebits", f"unknown bits {c.securebits & ~SECUREBITS_ALL:#x}")
    if c.no_new_privs not in (0, 1):
        bad("creds.no_new_privs", f"{c.no_new_privs}, expected 0 or 1")
    seen = set()
    for lim in p.rlimits:
        if lim.resource >= NRLIMITS:
            bad("rlimits", f"resource {lim.resource} is no RLIMIT_*")
        if lim.resource in seen:
            bad("rlimits", f"resource {lim.resource} given twice")
        seen.add(lim.resource)
        if lim.cur > lim.max:
            bad("rlimits", f"resource {lim.resource}: soft limit {lim.cur} above the hard "
                f"limit {lim.max}")
    if p.personality & 0xFF not in PERSONALITY_BASES or \
            p.personality & ~(PERSONALITY_FLAGS | 0xFF):
        bad("personality", f"{p.personality:#x} is not PER_LINUX or PER_LINUX32 with known "
            "flags")
    if p.umask > 0o777:
        bad("umask", f"{p.umask:#o}")
    if p.dumpable not in (0, 1, 2):
        bad("dumpable", f"{p.dumpable}, expected 0, 1 or 2")
    if not 0 <= p.pdeath_signal <= NSIG:
        bad("pdeath_signal", f"{p.pdeath_signal} is no signal")
    if not 0 <= p.exit_signal <= NSIG:
        bad("exit_signal", f"{p.exit_signal} is no signal")
    if p.has_oom_score_adj and not -1000 <= p.oom_score_adj <= 1000:
        bad("oom_score_adj", f"{p.oom_score_adj}, expected -1000..1000")
    from .threads import check_seccomp
    for core in cores:
        check_seccomp(core)
        sched.validate(core)
    if cores:  # a final record (a first pre-copy layer's has no timers, no threads)
        from .timers import validate as validate_timers
        validate_timers(p, [core.tid for core in cores])

    # never more than the caller has
    def refuse(what: str):
        raise RestoreError(f"the image asks for {what}, which this restore does not have "
                           "(restoring never grants more than the caller has)")

    wanted = c.cap_eff | c.cap_prm | c.cap_inh | c.cap_amb
    if wanted & ~caller.eff:
        refuse(f"capabilities {cap_names(wanted & ~caller.eff)}")
    if c.cap_bnd & ~caller.bnd:
        refuse(f"{cap_names(c.cap_bnd & ~caller.bnd)} in the bounding set")
    if c.cap_bnd != caller.bnd and not caller.has(CAP_SETPCAP):
        refuse("another capability bounding set (dropping needs CAP_SETPCAP)")
    if c.has_securebits and c.securebits != caller.securebits and not caller.has(CAP_SETPCAP):
        refuse(f"securebits {c.securebits:#x} (setting them needs CAP_SETPCAP)")
    if not caller.has(CAP_SETUID) and set(c.uid) - set(caller.uid):
        refuse(f"uids {sorted(set(c.uid) - set(caller.uid))} (needs CAP_SETUID)")
    if not caller.has(CAP_SETGID):
        if set(c.gid) - set(caller.gid):
            refuse(f"gids {sorted(set(c.gid) - set(caller.gid))} (needs CAP_SETGID)")
        if sorted(c.groups) != sorted(caller.groups):
            refuse("other supplementary groups (needs CAP_SETGID)")
    if any(core.seccomp_mode for core in cores) and not caller.has(CAP_SYS_ADMIN):
        refuse("seccomp (restoring it needs CAP_SYS_ADMIN: PTRACE_O_SUSPEND_SECCOMP keeps "
               "the installed filters from stopping the restore's own calls)")


class Privs:
    """Switches the credentials of one placeholder thread between the
    restorer's (the caller's, which it was started with) and the dumped
    process's for everything that opens or creates what the image names:
    supplementary groups, fsgid, fsuid, and the effective capabilities
    lowered to the dumped effective set ∩ the caller's. Permitted stays
    the caller's, so raising back is a capset."""

    def __init__(self, remote: Injector, dumped: Creds, current: Creds):
        self.r = remote
        self.dumped = dumped
        self.cur = current
        self.lowered = False

    def _capset(self, eff: int, prm: int, inh: int) -> None:
        capset(self.r, eff, prm, inh)

    def _call(self, name: str, *args: int, what: str) -> int:
        res = self.r.syscall(name, *args)
        if res < 0:
            raise RestoreError(f"{what}: {name} failed in process {self.r.proc.pid}:"
                               f" {os.strerror(-res)}")
        return res

    def _set_groups(self, groups: tuple[int, ...], what: str) -> None:
        raw = struct.pack(f"<{len(groups)}I", *groups) if groups else b"\0\0\0\0"
        buf = self.r.scratch
        if len(raw) > procfs.PAGE_SIZE:
            raise RestoreError(f"{what}: {len(groups)} supplementary groups do not fit the "
                               "scratch page")
        self.r.write(buf, raw)
        self._call("setgroups", len(groups), buf, what=what)

    def _set_fs(self, uid: int, gid: int, what: str) -> None:
        # setfs[ug]id answer the previous id and never fail: read back with -1
        self.r.syscall("setfsgid", gid)
        self.r.syscall("setfsuid", uid)
        got = (self.r.syscall("setfsuid", NO_ID), self.r.syscall("setfsgid", NO_ID))
        if got != (uid, gid):
            raise RestoreError(f"{what}: fsuid/fsgid are {got}, wanted {(uid, gid)}")

    def lower(self) -> None:
        if self.lowered:
            return
        d, cur = self.dumped, self.cur
        what = f"switching to the dumped credentials (uid {d.uid[3]}, gid {d.gid[3]})"
        if sorted(d.groups) != sorted(cur.groups):
            self._set_groups(d.groups, what)
        self._set_fs(d.uid[3], d.gid[3], what)
        self._capset(d.eff & cur.eff, cur.prm, cur.inh)
        self.lowered = True

    def raise_(self) -> None:
        if not self.lowered:
            return
        cur = self.cur
        what = "switching back to the restorer's credentials"
        self._capset(cur.eff, cur.prm, cur.inh)
        self._set_fs(cur.uid[3], cur.gid[3], what)
        if sorted(self.dumped.groups) != sorted(cur.groups):
            self._set_groups(cur.groups, what)
        self.lowered = False

    @contextmanager
    def as_dumped(self):
        """Opens and creations with the dumped process's credentials."""
        was = self.lowered
        self.lower()
        try:
            yield
        finally:
            if not was:
                self.raise_()

    @contextmanager
    def privileged(self):
        """A step that needs the restorer's own privilege (chroot, prctl)."""
        was = self.lowered
        self.raise_()
        try:
            yield
        finally:
            if was:
                self.lower()


def capset(r: Injector, eff: int, prm: int, inh: int) -> None:
    hdr = struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0)
    data = struct.pack("<6I", eff & 0xFFFF_FFFF, prm & 0xFFFF_FFFF, inh & 0xFFFF_FFFF,
                       eff >> 32, prm >> 32, inh >> 32)
    base = r.scratch
    r.write(base, hdr + data)
    res = r.syscall("capset", base, base + 8)
    if res < 0:
        raise RestoreError(f"capset(effective {eff:#x}, permitted {prm:#x}, inheritable "
                           f"{inh:#x}) failed in thread {r.tid}: {os.strerror(-res)}")


def apply_creds(r: Injector, dumped: Creds, current: Creds, nnp: bool,
                seccomp=None) -> None:
    """Give the thread behind ``r`` (which has ``current``, the caller's
    credentials) the dumped credentials exactly. Order matters:
    NO_SETUID_FIXUP keeps the capabilities through the uid change; the
    inheritable set comes before the bounding set shrinks; ambient caps are
    raised while permitted is still the caller's; ``seccomp`` (a callable
    installing the thread's filters) runs while the effective set still has
    CAP_SYS_ADMIN; securebits are set while CAP_SETPCAP is effective; the
    capability sets last, then no_new_privs."""
    tid = r.tid

    def prctl(what: str, *args: int) -> None:
        res = r.syscall("prctl", *args)
        if res < 0:
            raise RestoreError(f"{what} failed in thread {tid}: {os.strerror(-res)}")

    d, cur = dumped, current
    changes_ids = (d.uid, d.gid, sorted(d.groups)) != (cur.uid, cur.gid, sorted(cur.groups))
    sb = cur.securebits
    if changes_ids and not sb & SECBIT_NO_SETUID_FIXUP:
        if sb & SECBIT_NO_SETUID_FIXUP_LOCKED:
            raise RestoreError("the restorer's securebits lock NO_SETUID_FIXUP off: the "
                               "dumped uids cannot be set without losing capabilities")
        prctl("PR_SET_SECUREBITS (NO_SETUID_FIXUP)", PR_SET_SECUREBITS,
              sb | SECBIT_NO_SETUID_FIXUP, 0, 0, 0)
        sb |= SECBIT_NO_SETUID_FIXUP
    if d.inh != cur.inh:
        capset(r, cur.eff, cur.prm, d.inh)
    for cap in range(last_cap() + 1):
        if cur.bnd >> cap & 1 and not d.bnd >> cap & 1:
            prctl(f"dropping {cap_name(cap)} from the bounding set", PR_CAPBSET_DROP, cap,
                  0, 0, 0)
    if changes_ids:
        p = Privs(r, d, cur)
        what = f"credentials (uid {list(d.uid)}, gid {list(d.gid)})"
        p._set_groups(d.groups, what)
        p._call("setresgid", *d.gid[:3], what=what)
        p._call("setresuid", *d.uid[:3], what=what)
        p._set_fs(d.uid[3], d.gid[3], what)
    if cur.amb:
        prctl("PR_CAP_AMBIENT_CLEAR_ALL", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if d.amb >> cap & 1:
            prctl(f"raising ambient {cap_name(cap)}", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE,
                  cap, 0, 0)
    if seccomp is not None:
        seccomp(r)
    if d.securebits != sb:
        prctl(f"PR_SET_SECUREBITS {d.securebits:#x}", PR_SET_SECUREBITS, d.securebits,
              0, 0, 0)
    if (d.eff, d.prm, d.inh) != (cur.eff, cur.prm, cur.inh):
        capset(r, d.eff, d.prm, d.inh)
    if nnp:
        prctl("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def finish_leader(r: Injector, p: process_pb2.ProcessEntry) -> None:
    """Leader-only attributes that any change of credentials resets: the
    parent-death signal and the dumpable flag (prctl(2)); after apply_creds."""
    res = r.syscall("prctl", PR_SET_PDEATHSIG, p.pdeath_signal, 0, 0, 0)
    if res < 0:
        raise RestoreError(f"PR_SET_PDEATHSIG {p.pdeath_signal}: {os.strerror(-res)}")
    if p.child_subreaper:
        res = r.syscall("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if res < 0:
            raise RestoreError(f"PR_SET_CHILD_SUBREAPER: {os.strerror(-res)}")
    if p.dumpable in (0, 1):  # 2 (suid_dumpable) cannot be set by prctl
        res = r.syscall("prctl", PR_SET_DUMPABLE, p.dumpable, 0, 0, 0)
        if res < 0:
            raise RestoreError(f"PR_SET_DUMPABLE {p.dumpable}: {os.strerror(-res)}")


def check_applied(pid: int, tid: int, dumped: Creds, nnp: bool, seccomp_mode: int) -> None:
    """Read back what the kernel now says of the thread: the restore is
    exact or it fails."""
    st = procfs.read_status(pid, tid)
    got = Creds.of_status(st, dumped.securebits)
    want = dumped
    diffs = [name for name in ("uid", "gid", "eff", "prm", "inh", "bnd", "amb")
             if getattr(got, name) != getattr(want, name)]
    if sorted(got.groups) != sorted(want.groups):
        diffs.append("groups")
    if int(st.raw.get("NoNewPrivs", "0")) != int(nnp):
        diffs.append("no_new_privs")
    if int(st.raw.get("Seccomp", "0")) != seccomp_mode:
        diffs.append("seccomp mode")
    if diffs:
        raise RestoreError(f"thread {tid}: after restoring its credentials the kernel shows "
                           f"other {', '.join(diffs)}")


# --------------------------------------------------------------------------
# what a single-process dump refuses by name


def zombie_leader(pid: int) -> None:
    """A thread group whose leader called pthread_exit while other threads
    run on: its leader is a zombie, which ptrace cannot stop or inject
    into; refused with that reason (not 'exited during the dump')."""
    try:
        state = procfs.read_stat(pid).state
        others = [t for t in procfs.list_tasks(pid) if t != pid]
    except CheckpointError:
        return
    if state == "Z" and others:
        raise UnsupportedObject(f"the main thread of process {pid} has exited while "
                                f"{len(others)} other thread(s) run on (a zombie thread-group "
                                "leader): not supported")


def children(pid: int, tids) -> list[int]:
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return sorted(set(out))


def refuse_children(pid: int, tids, skip: bool) -> None:
    """Where the tree is not taken (live migration moves one process): a
    process with children (zombies included) is refused unless ``skip``
    (--skip-children) accepts that the restored process has none."""
    kids = children(pid, tids)
    if not kids or skip:
        return
    named = []
    for k in kids[:5]:
        try:
            st = procfs.read_stat(k)
            named.append(f"{k} ({st.comm}{', a zombie' if st.state == 'Z' else ''})")
        except CheckpointError:
            named.append(str(k))
    more = f" and {len(kids) - 5} more" if len(kids) > 5 else ""
    raise UnsupportedObject(
        f"process {pid} has child process{'es' if len(kids) > 1 else ''} "
        f"{', '.join(named)}{more}: live migration does not move process trees yet; "
        f"--skip-children takes {pid} alone (its children are not in the image and keep "
        "running; the restored process has no children)")


SHM_DEST = 0o1000


def _sysv_segments() -> dict[int, tuple[int, int]]:
    """shmid -> (perms, nattch) from /proc/sysvipc/shm."""
    out = {}
    try:
        with open("/proc/sysvipc/shm") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return out
    for row in rows:
        col = row.split()
        out[int(col[1])] = (int(col[2], 8), int(col[6]))
    return out


def refuse_sysv_shm(vmas) -> None:
    """A SysV shared memory segment attached (shmat): its pages are the IPC
    namespace's segment, which others may attach; a copy would silently stop
    being shared. The one case restored is a segment already removed
    (IPC_RMID) that this process alone has attached: nobody else can reach
    it, so it is this process's shared memory like a MAP_SHARED|MAP_ANONYMOUS
    mapping, and is restored as one, with its content."""
    segs = None
    for v in vmas:
        if not v.path.startswith("/SYSV"):
            continue
        segs = _sysv_segments() if segs is None else segs
        perms, nattch = segs.get(v.inode, (0, 0))
        if perms & SHM_DEST and nattch == 1:
            continue
        key = v.path[5:13]
        why = "attached by other processes too" if nattch > 1 else "not removed (IPC_RMID)"
        raise UnsupportedObject(
            f"SysV shared memory segment (key 0x{key}, shmid {v.inode}) attached at "
            f"{v.start:#x}-{v.end:#x}, {why}: not supported (its pages are the segment's, "
            "which others can attach; a removed segment only this process holds is restored)")
