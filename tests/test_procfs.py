"""procfs parsers on synthetic input and on live processes."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

import pytest

from checkpoint.errors import NoSuchProcess
from checkpoint.kernel import procfs

SMAPS = """\
55d4a5a00000-55d4a5a02000 r--p 00000000 fd:01 1311 /usr/bin/odd name (deleted)
Size:                  8 kB
VmFlags: rd mr mw me dw sd
7ffd1c9e0000-7ffd1ca01000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
VmFlags: rd wr mr mw me gd ac
7ffd1cbf6000-7ffd1cbf8000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de sd
"""


def test_parse_smaps_synthetic():
    vmas = procfs.parse_smaps(SMAPS)
    assert [v.path for v in vmas] == ["/usr/bin/odd name (deleted)", "[stack]", "[vdso]"]
    assert vmas[0].deleted and vmas[0].is_file and vmas[0].dev_major == 0xFD
    assert "gd" in vmas[1].vmflags and vmas[1].writable and not vmas[1].shared
    assert vmas[2].is_special and vmas[2].executable
    assert vmas[1].pages == 0x21


def test_parse_stat_with_hostile_comm():
    fields = ["S"] + [str(i) for i in range(4, 53)]
    text = "1234 (a) b) (c) " + " ".join(fields)
    st = procfs.parse_stat(text)
    assert st.pid == 1234 and st.comm == "a) b) (c" and st.state == "S"
    assert st.ppid == 4 and st.start_code == 26 and st.env_end == 51 and st.exit_code == 52


def test_live_self():
    pid = os.getpid()
    st, ss = procfs.read_stat(pid), procfs.read_status(pid)
    assert st.pid == pid == ss.pid == ss.tgid and not st.is_kernel_thread
    assert st.start_code < st.end_code and st.start_brk > 0 and st.arg_start < st.arg_end
    assert pid in procfs.list_tasks(pid)
    m = mmap.mmap(-1, 3 * 4096)
    buf = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(buf)
    vmas = procfs.read_smaps(pid)
    mine = [v for v in vmas if v.start <= addr < v.end]
    # Python's anonymous mmap is MAP_SHARED: shmem, shown as "/dev/zero (deleted)"
    assert len(mine) == 1 and mine[0].writable and mine[0].shared and "sh" in mine[0].vmflags
    assert mine[0].is_shared_anon and not mine[0].is_file
    assert any(v.path == "[stack]" and "gd" in v.vmflags for v in vmas)
    del buf
    m.close()


def test_auxv_and_fds():
    aux = dict(procfs.read_auxv(os.getpid()))
    assert aux[6] == 4096  # AT_PAGESZ
    r, w = os.pipe()
    try:
        fds = {f.fd: f for f in procfs.read_fds(os.getpid())}
        assert fds[r].kind == "pipe" and fds[w].kind == "pipe"
        assert fds[w].flags & os.O_WRONLY
        with open(__file__, "rb") as f:
            f.read(10)
            info = {x.fd: x for x in procfs.read_fds(os.getpid())}[f.fileno()]
            assert info.kind == "file" and info.target == os.path.abspath(__file__)
            assert info.pos == os.lseek(f.fileno(), 0, os.SEEK_CUR)
    finally:
        os.close(r)
        os.close(w)


def test_parse_auxv_stops_at_null():
    data = struct.pack("<6Q", 6, 4096, 0, 0, 99, 99)
    assert procfs.parse_auxv(data) == [(6, 4096)]


def test_missing_process():
    with pytest.raises(NoSuchProcess):
        procfs.read_status(4_000_000)
