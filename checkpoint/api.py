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


def migrate(pid: int, to: str, **options):
    """Live-migrate ``pid`` to the page server at ``to`` (HOST:PORT); returns
    MigrationStats. Options as checkpoint.migrate.migrate (docs/migrate.md)."""
    from .migration import migrate as _migrate
    return _migrate(pid, to, **options)


def page_server(images_dir: str, **options):
    """A PageServer (not yet listening: ``bind()``, then ``serve()``), for an
    orchestrator that runs the destination in its own process."""
    from .transport.server import PageServer
    return PageServer(images_dir, **options)


def check() -> KernDat:
    """What this kernel offers (``checkpoint check``)."""
    return probe_all()


__all__ = ["Checkpointer", "DumpStats", "Restored", "RestoreError", "restore", "check",
           "migrate", "page_server"]
