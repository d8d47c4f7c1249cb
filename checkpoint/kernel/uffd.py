"""userfaultfd UAPI (include/uapi/linux/userfaultfd.h), the parts used for
write-protect dirty tracking (UFFD_FEATURE_WP_ASYNC)."""

from __future__ import annotations

import ctypes

from .ioctl import _IOR, _IOWR

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # userfaultfd() flag

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


_UFFDIO = 0xAA
UFFDIO_API = _IOWR(_UFFDIO, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = _IOWR(_UFFDIO, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _IOR(_UFFDIO, 0x01, ctypes.sizeof(uffdio_range))
UFFDIO_WRITEPROTECT = _IOWR(_UFFDIO, 0x06, ctypes.sizeof(uffdio_writeprotect))
