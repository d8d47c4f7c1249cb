"""The ``cpuid`` instruction from Python, and the XSAVE layout it describes.

A signal frame built by hand (``sigframe.py``) must say how many bytes of
XSAVE state it carries, and the kernel accepts no more than the thread's own
signal-frame size (``fpstate->user_size``): on a CPU with AMX that is the
size *without* the tile data (a dynamic feature, enabled per process), while
the ptrace regset is always the full size. A frame that claims more is
quietly restored as legacy FXSAVE state only, which zeroes the upper halves
of every YMM/ZMM register. The offsets and sizes of the XSAVE components,
and which of them are dynamic (XFD-capable), come from CPUID leaf 0xD.

Python has no cpuid, so a 27-byte routine (``push rbx; cpuid; store the four
registers; pop rbx; ret``) is put in an executable anonymous page and called
through ctypes. Where that page cannot be made (a W^X policy), ``layout()``
returns None and callers keep the regset's own size.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform

# push %rbx; mov %rdx,%r8; mov %edi,%eax; mov %esi,%ecx; cpuid;
# mov %eax,(%r8); mov %ebx,4(%r8); mov %ecx,8(%r8); mov %edx,12(%r8); pop %rbx; ret
_CODE = bytes.fromhex("534989d089f889f10fa2418900418958044189480841895" "00c5bc3")

_fn = None
_page = None


def _routine():
    global _fn, _page
    if _fn is None:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                 ctypes.POINTER(ctypes.c_uint32))
        _fn, _page = proto(addr), page
    return _fn


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID(leaf, subleaf); OSError where no
    executable page can be had."""
    if platform.machine() != "x86_64":
        raise OSError("cpuid: not an x86_64 machine")
    out = (ctypes.c_uint32 * 4)()
    _routine()(leaf, subleaf, out)
    return out[0], out[1], out[2], out[3]


@functools.lru_cache(maxsize=1)
def layout() -> dict[int, tuple[int, int, bool]] | None:
    """XSAVE components 2..62 the CPU supports: {index: (offset in the
    standard format, size, dynamic)}; None when cpuid cannot be run."""
    try:
        eax, _, _, edx = cpuid(0xD, 0)
        _, _, ecx1, edx1 = cpuid(0xD, 1)
        supported = eax | (edx << 32) | ecx1 | (edx1 << 32)
        comps = {}
        for i in range(2, 63):
            if not supported >> i & 1:
                continue
            size, offset, flags, _ = cpuid(0xD, i)
            if flags & 1:          # supervisor state: never in a user frame
                continue
            comps[i] = (offset, size, bool(flags & 4))
        return comps
    except (OSError, ValueError, TypeError):
        return None
