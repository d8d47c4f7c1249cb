"""PAGEMAP_SCAN on /proc/PID/pagemap: the merged ABI of Linux 6.7+
(include/uapi/linux/fs.h), not the seed patch's.

Also the classic 8-bytes-a-page /proc/PID/pagemap entry bits
(Documentation/admin-guide/mm/pagemap.rst) for kernels without the ioctl.
"""

from __future__ import annotations

import ctypes
import fcntl

from .ioctl import _IOWR

# page categories (include/uapi/linux/fs.h)
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8

# pm_scan_arg.flags
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class page_region(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),  # exclusive
        ("categories", ctypes.c_uint64),
    ]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


PAGEMAP_SCAN = _IOWR(ord("f"), 16, ctypes.sizeof(pm_scan_arg))

# /proc/PID/pagemap entry bits
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


def pagemap_scan(fd: int, arg: pm_scan_arg) -> int:
    """Run the ioctl; returns the number of regions written to ``arg.vec``.

    ``arg.walk_end`` is written back. Raises OSError with the kernel's errno.
    """
    return fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)


def new_scan_arg(start: int, end: int, vec, vec_len: int, *, flags: int = 0,
                 max_pages: int = 0, category_mask: int = 0,
                 category_inverted: int = 0, category_anyof_mask: int = 0,
                 return_mask: int = 0) -> pm_scan_arg:
    return pm_scan_arg(
        size=ctypes.sizeof(pm_scan_arg), flags=flags, start=start, end=end,
        walk_end=0, vec=ctypes.addressof(vec), vec_len=vec_len, max_pages=max_pages,
        category_inverted=category_inverted, category_mask=category_mask,
        category_anyof_mask=category_anyof_mask, return_mask=return_mask,
    )
