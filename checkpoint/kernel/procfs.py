"""Parsers of /proc/PID files into frozen dataclasses.

One parser per file; each has a ``parse_*`` function over text (testable on
synthetic input) and a ``read_*`` function that reads the live file and maps
a vanished process to :class:`NoSuchProcess`.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from ..errors import NoSuchProcess, PermissionDenied

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _proc_open_error(exc: OSError, pid: int, what: str):
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        return NoSuchProcess(f"process {pid} does not exist (reading {what})", pid)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"not permitted to read {what} of process {pid}", pid)
    return exc


def open_proc_fd(pid: int, name: str, flags: int = os.O_RDONLY) -> int:
    """os.open of /proc/PID/<name> (close-on-exec), a vanished process as
    NoSuchProcess and a refusal as PermissionDenied."""
    path = f"/proc/{pid}/{name}"
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise _proc_open_error(exc, pid, path) from None


def _read_text(pid: int, name: str, tid: int | None = None) -> str:
    path = f"/proc/{pid}/{name}" if tid is None else f"/proc/{pid}/task/{tid}/{name}"
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise _proc_open_error(exc, pid, path) from None


def _read_bytes(pid: int, name: str) -> bytes:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _proc_open_error(exc, pid, path) from None


# --------------------------------------------------------------------------
# maps + smaps VmFlags


@dataclass(frozen=True, slots=True)
class Vma:
    start: int
    end: int
    perms: str  # "rwxp" / "r--s" as in maps
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str  # "" for anonymous; "[heap]", "[stack]", "[vdso]", ... ; may end in " (deleted)"
    vmflags: frozenset[str] = field(default_factory=frozenset)
    anon_kb: int = field(default=0, compare=False)  # smaps "Anonymous:" (0 from maps)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def is_special(self) -> bool:
        """Kernel-provided mappings: [vdso], [vvar], [vvar_vclock], [vsyscall], [uprobes]."""
        return self.path in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")

    @property
    def is_shared_anon(self) -> bool:
        """MAP_SHARED|MAP_ANONYMOUS memory: shmem named "/dev/zero (deleted)"."""
        return self.shared and self.path == "/dev/zero (deleted)" and self.dev_major == 0

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and not self.path.startswith("[") and not self.is_shared_anon

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


def _parse_maps_line(line: str) -> Vma:
    # 7f0000000000-7f0000001000 rw-p 00000000 fd:01 1234   /path with spaces
    parts = line.split(None, 5)
    if len(parts) < 5:
        raise ValueError(f"malformed maps line: {line!r}")
    lo, hi = parts[0].split("-")
    major, minor = parts[3].split(":")
    path = parts[5].rstrip("\n") if len(parts) == 6 else ""
    return Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
               int(major, 16), int(minor, 16), int(parts[4]), path.lstrip())


def parse_maps(text: str) -> list[Vma]:
    return [_parse_maps_line(line) for line in text.splitlines() if line.strip()]


def parse_smaps(text: str) -> list[Vma]:
    """Parse /proc/PID/smaps: maps lines, each followed by key lines incl. VmFlags."""
    vmas: list[Vma] = []
    cur: Vma | None = None
    flags: frozenset[str] = frozenset()
    anon = 0
    for line in text.splitlines():
        if not line:
            continue
        head = line.split(None, 1)[0]
        if head.endswith(":"):
            if head == "VmFlags:":
                flags = frozenset(line.split()[1:])
            elif head == "Anonymous:":
                anon = int(line.split()[1])
            continue
        if cur is not None:
            vmas.append(with_flags(cur, flags, anon))
        cur, flags, anon = _parse_maps_line(line), frozenset(), 0
    if cur is not None:
        vmas.append(with_flags(cur, flags, anon))
    return vmas


def with_flags(v: Vma, flags: frozenset[str], anon_kb: int = 0) -> Vma:
    return Vma(v.start, v.end, v.perms, v.offset, v.dev_major, v.dev_minor, v.inode,
               v.path, flags, anon_kb)


def read_maps(pid: int) -> list[Vma]:
    return parse_maps(_read_text(pid, "maps"))


def read_smaps(pid: int) -> list[Vma]:
    """VMAs with their VmFlags (``gd`` grows-down, ``nr`` noreserve, ``dd``, ...)."""
    return parse_smaps(_read_text(pid, "smaps"))


# --------------------------------------------------------------------------
# status


@dataclass(frozen=True, slots=True)
class Status:
    name: str
    state: str  # one letter: R S D T t Z X I
    tgid: int
    pid: int
    ppid: int
    tracer_pid: int
    uid: tuple[int, int, int, int]
    gid: tuple[int, int, int, int]
    threads: int
    sig_pnd: int
    shd_pnd: int
    sig_blk: int
    sig_ign: int
    sig_cgt: int
    cap_eff: int
    nspid: tuple[int, ...]
    umask: int | None
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def parse_status(text: str) -> Status:
    raw: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        raw[key] = value.strip()

    def ints(k: str) -> tuple[int, ...]:
        return tuple(int(x) for x in raw.get(k, "").split())

    def hexv(k: str) -> int:
        return int(raw.get(k, "0"), 16)

    uid, gid = ints("Uid"), ints("Gid")
    return Status(
        name=raw.get("Name", ""),
        state=raw.get("State", "?")[:1],
        tgid=int(raw["Tgid"]),
        pid=int(raw["Pid"]),
        ppid=int(raw.get("PPid", "0")),
        tracer_pid=int(raw.get("TracerPid", "0")),
        uid=uid,  # type: ignore[arg-type]
        gid=gid,  # type: ignore[arg-type]
        threads=int(raw.get("Threads", "1")),
        sig_pnd=hexv("SigPnd"),
        shd_pnd=hexv("ShdPnd"),
        sig_blk=hexv("SigBlk"),
        sig_ign=hexv("SigIgn"),
        sig_cgt=hexv("SigCgt"),
        cap_eff=hexv("CapEff"),
        nspid=ints("NSpid") or (int(raw["Pid"]),),
        umask=int(raw["Umask"], 8) if "Umask" in raw else None,
        raw=raw,
    )


def read_status(pid: int, tid: int | None = None) -> Status:
    return parse_status(_read_text(pid, "status", tid))


# --------------------------------------------------------------------------
# stat

PF_KTHREAD = 0x00200000


@dataclass(frozen=True, slots=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    flags: int
    num_threads: int
    starttime: int
    # mm fields (proc(5) fields 26-28, 45-51)
    start_code: int
    end_code: int
    start_stack: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int
    exit_signal: int = 0  # field 38: the signal the parent gets at its exit
    tpgid: int = 0        # field 8: the foreground group of its controlling terminal

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(text: str) -> Stat:
    # comm may hold spaces and parentheses: split at the last ')'
    lpar, rpar = text.index("("), text.rindex(")")
    pid = int(text[:lpar])
    comm = text[lpar + 1:rpar]
    rest = text[rpar + 2:].split()
    f = [0, 0, 0] + rest  # f[n] is proc(5) field n (1-based; 1=pid, 2=comm)

    def i(n: int) -> int:
        return int(f[n]) if n < len(f) else 0

    return Stat(
        pid=pid, comm=comm, state=f[3], ppid=i(4), pgrp=i(5), session=i(6), tty_nr=i(7),
        flags=i(9), num_threads=i(20), starttime=i(22),
        start_code=i(26), end_code=i(27), start_stack=i(28),
        start_data=i(45), end_data=i(46), start_brk=i(47), arg_start=i(48),
        arg_end=i(49), env_start=i(50), env_end=i(51), exit_code=i(52),
        exit_signal=i(38), tpgid=int(f[8]) if len(f) > 8 else 0,
    )


def read_stat(pid: int, tid: int | None = None) -> Stat:
    return parse_stat(_read_text(pid, "stat", tid))


# --------------------------------------------------------------------------
# tasks


def list_tasks(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as exc:
        raise _proc_open_error(exc, pid, f"/proc/{pid}/task") from None


# --------------------------------------------------------------------------
# auxv

AT_NULL = 0


def parse_auxv(data: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a_type, a_val in struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]):
        if a_type == AT_NULL:
            break
        out.append((a_type, a_val))
    return out


def read_auxv(pid: int) -> list[tuple[int, int]]:
    return parse_auxv(_read_bytes(pid, "auxv"))


# --------------------------------------------------------------------------
# fd + fdinfo


@dataclass(frozen=True, slots=True)
class FdInfo:
    fd: int
    target: str  # readlink of /proc/PID/fd/N: a path, "pipe:[123]", "socket:[..]", "anon_inode:[eventfd]"
    pos: int
    flags: int  # octal in fdinfo: O_* flags incl. O_CLOEXEC
    mnt_id: int
    ino: int
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        t = self.target
        if t.startswith("pipe:"):
            return "pipe"
        if t.startswith("socket:"):
            return "socket"
        if t.startswith("anon_inode:"):
            return t[len("anon_inode:"):].strip("[]") or "anon_inode"
        if t.startswith("/memfd:"):
            return "memfd"
        return "file"


def parse_fdinfo(fd: int, target: str, text: str) -> FdInfo:
    pos = flags = mnt_id = ino = 0
    extra: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "pos":
            pos = int(value)
        elif key == "flags":
            flags = int(value, 8)
        elif key == "mnt_id":
            mnt_id = int(value)
        elif key == "ino":
            ino = int(value)
        elif key:
            extra[key] = value
    return FdInfo(fd, target, pos, flags, mnt_id, ino, extra)


def read_fds(pid: int) -> list[FdInfo]:
    """Every open fd of ``pid`` with its fdinfo; fds closed meanwhile are skipped."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError as exc:
        raise _proc_open_error(exc, pid, base) from None
    out = []
    for name in sorted(names, key=int):
        fd = int(name)
        try:
            target = os.readlink(f"{base}/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _proc_open_error(exc, pid, f"{base}/{fd}") from None
        out.append(parse_fdinfo(fd, target, text))
    return out
