"""The address space: VMAs with their backing files' identity, the mm fields
of /proc/PID/stat, brk, auxv and the exe link; the vDSO's identity."""

from __future__ import annotations

import hashlib
import os

from ..errors import UnsupportedObject
from ..images.pb import mm_pb2
from ..inject import Injector, ProcMem
from ..kernel import procfs
from . import madvise

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_GROWSDOWN, MAP_NORESERVE = 0x0100, 0x4000

VMA_SKIP_PAGES = 1  # kernel-provided ([vdso], [vvar]...): never dumped
VMA_DELETED = 2  # backing file deleted
VMA_SHARED_ANON = 4  # MAP_SHARED|MAP_ANONYMOUS (shmem)
VMA_CONTENT_IN_FILE = 8  # MAP_SHARED of a live file: its pages are the file's, not dumped

SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


def content_in_file(v: procfs.Vma) -> bool:
    """A shared mapping of a file that still exists: every write went to the
    file, so the pages are not dumped; restore maps the file again (memfd,
    shmem and deleted files keep their pages in the image)."""
    return v.shared and v.is_file and not v.deleted and not v.path.startswith("/memfd:")


def taken_whole(v: procfs.Vma) -> bool:
    """VMAs dumped whole, every page as data, every round: shared anonymous
    memory and memfds (pages of the object need not be in this process's page
    tables), and mappings of deleted files (the restore has no file to map)."""
    return v.is_shared_anon or v.path.startswith("/memfd:") or (v.is_file and v.deleted)


def vma_prot(v: procfs.Vma) -> int:
    return ((PROT_READ if v.readable else 0) | (PROT_WRITE if v.writable else 0)
            | (PROT_EXEC if v.executable else 0))


def vma_entry(pid: int, v: procfs.Vma) -> mm_pb2.VmaEntry:
    e = mm_pb2.VmaEntry(start=v.start, end=v.end, prot=vma_prot(v), offset=v.offset,
                        path=v.path, inode=v.inode,
                        dev=os.makedev(v.dev_major, v.dev_minor))
    flags = MAP_SHARED if v.shared else MAP_PRIVATE
    status = 0
    if v.path in SPECIAL:
        status |= VMA_SKIP_PAGES
    if v.is_shared_anon:
        status |= VMA_SHARED_ANON
        flags |= MAP_ANONYMOUS
    elif not v.is_file:
        flags |= MAP_ANONYMOUS
    if "gd" in v.vmflags:
        flags |= MAP_GROWSDOWN
    if "nr" in v.vmflags:
        flags |= MAP_NORESERVE
    if content_in_file(v):
        status |= VMA_CONTENT_IN_FILE
    if v.is_file:
        if v.deleted:
            status |= VMA_DELETED
        try:  # the mapped file itself, even when deleted or renamed
            st = os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}")
            e.file_size, e.file_mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    e.flags, e.status = flags, status
    why = madvise.unrestorable(v.vmflags) if v.path not in SPECIAL else None
    if why:
        what = f"VMA {v.start:#x}-{v.end:#x} {v.path}".rstrip()
        raise UnsupportedObject(f"process {pid}: {what} is {why}: not restorable")
    e.vmflags.extend(sorted(v.vmflags))
    return e


def vdso_identity(pid: int, vmas: list[procfs.Vma], mem: ProcMem) -> dict:
    """SHA-256 of the [vdso] text and the sizes of the vDSO block, to refuse
    a restore on another kernel's vDSO."""
    out = {"vdso_digest": b"", "vdso_size": 0, "vvar_size": 0, "vvar_vclock_size": 0}
    for v in vmas:
        if v.path == "[vdso]":
            out["vdso_digest"] = hashlib.sha256(mem.read(v.start, v.size)).digest()
            out["vdso_size"] = v.size
        elif v.path == "[vvar]":
            out["vvar_size"] = v.size
        elif v.path == "[vvar_vclock]":
            out["vvar_vclock_size"] = v.size
    return out


def read_brk(remote: Injector) -> int:
    return remote.call("brk", 0)


def dump_mm(pid: int, vmas: list[procfs.Vma], brk: int,
            thp_disabled: bool = False) -> mm_pb2.MmEntry:
    """Everything but the pages (the tracker and the layer writer do those)."""
    st = procfs.read_stat(pid)
    mm = mm_pb2.MmEntry(pid=pid, thp_disabled=thp_disabled)
    mm.vmas.extend(vma_entry(pid, v) for v in vmas)
    mm.mm_start_code, mm.mm_end_code = st.start_code, st.end_code
    mm.mm_start_data, mm.mm_end_data = st.start_data, st.end_data
    mm.mm_start_stack, mm.mm_start_brk, mm.mm_brk = st.start_stack, st.start_brk, brk
    mm.mm_arg_start, mm.mm_arg_end = st.arg_start, st.arg_end
    mm.mm_env_start, mm.mm_env_end = st.env_start, st.env_end
    for k, val in procfs.read_auxv(pid):
        mm.auxv.extend((k, val))
    try:
        mm.exe_path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pass
    return mm
