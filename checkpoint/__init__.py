"""Incremental checkpoint/restore engine for Linux processes.

Library entry points live in :mod:`checkpoint.api`; the command line
(``checkpoint`` / ``python -m checkpoint``) is a thin layer over them.
"""

from .errors import (  # noqa: F401
    CheckpointError,
    FreezeError,
    ImageError,
    InjectionError,
    Interrupted,
    KernelFeatureError,
    NoSuchProcess,
    PermissionDenied,
    TargetError,
    TargetExited,
    UsageError,
)

__version__ = "0.1.0"
