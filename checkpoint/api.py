"""The library API for orchestrators; the CLI is a thin layer over it.

    import checkpoint

    with checkpoint.Checkpointer(pid, "/var/lib/ck/app", track="auto") as ck:
        ck.pre_dump()                   # -> DumpStats (layer, frozen_ms, pages_written ...)
        ck.pre_dump()
        ck.dump(leave_running=False)    # the final layer; the target is killed after it

    r = checkpoint.restore("/var/lib/ck/app", inherit_stdio=True)   # -> Restored
    r.wait()

Every failure raises a subclass of :class:`checkpoint.CheckpointError` with a
message naming what failed; targets are never left frozen.
"""

from __future__ import annotations

from .dumper import Checkpointer, DumpStats
from .kerndat import KernDat, probe_all
from .errors import RestoreError
from .restorer import Restored, restore


def check() -> KernDat:
    """What this kernel offers (``checkpoint check``)."""
    return probe_all()


__all__ = ["Checkpointer", "DumpStats", "Restored", "RestoreError", "restore", "check"]
