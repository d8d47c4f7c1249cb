"""Live migration's transport: the framed, authenticated stream (wire.py),
the destination's page server (server.py) and the source's layer store that
streams to it (client.py). Layers travel whole, byte for byte as they are
written to disk, so the destination publishes exactly what a local dump
would have; docs/migrate.md describes the protocol."""

from __future__ import annotations

import os


def host_facts() -> dict:
    """What a peer must match for a migration: the kernel (its vDSO, which a
    restored program's libc points into), the CPU's features, the page size."""
    from .. import __version__
    from ..restorer import _own_vdso
    digest, vdso, vvar, vclock = _own_vdso()
    return {"engine": __version__, "kernel": os.uname().release,
            "vdso": digest.hex(), "vdso_layout": [vdso, vvar, vclock],
            "cpu_flags": sorted(cpu_flags()), "page_size": os.sysconf("SC_PAGE_SIZE"),
            "host": os.uname().nodename}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def mismatch(source: dict, dest: dict) -> str | None:
    """Why a process dumped on ``source`` cannot run on ``dest``, or None."""
    if source.get("page_size") != dest.get("page_size"):
        return f"page size {source.get('page_size')} here, {dest.get('page_size')} there"
    if source.get("vdso") != dest.get("vdso") or source.get("vdso_layout") != dest.get("vdso_layout"):
        return (f"another kernel's vDSO (source {source.get('kernel')}, destination "
                f"{dest.get('kernel')}): restore on the kernel the process runs on")
    missing = set(source.get("cpu_flags", [])) - set(dest.get("cpu_flags", []))
    if missing:
        return ("the destination CPU lacks features the source CPU has (the program may "
                f"use them): {' '.join(sorted(missing)[:12])}")
    return None
