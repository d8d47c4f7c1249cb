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
    RestoreError,
    TargetError,
    TargetExited,
    TransportError,
    UnsupportedObject,
    UsageError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # the library API, imported on first use so `checkpoint check` stays light
    if name in ("Checkpointer", "DumpStats", "Restored", "restore", "check", "migrate",
                "page_server"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'checkpoint' has no attribute {name!r}")
