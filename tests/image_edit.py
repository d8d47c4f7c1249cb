"""Hand-edit the records of a dumped chain, as an attacker with write access
to an images directory would: through the public image API only (read the
chain, write a new one-layer chain with the LayerWriter and a LocalSink)."""

from __future__ import annotations

import os

from checkpoint.images import LayerWriter, LocalSink, open_chain


def edited_copy(src, dst, edit) -> str:
    """Write into ``dst`` a one-layer final dump with every page of the chain
    in ``src`` and its records, after ``edit(records)`` changed them in place
    (``records``: {kind: [message, ...]}). Returns ``dst``."""
    dst = os.fspath(dst)
    with open_chain(os.fspath(src)) as chain:
        records: dict[str, list] = {}
        for kind, msg in chain.records():
            records.setdefault(kind, []).append(msg)
        edit(records)
        top = chain.top.inventory
        w = LayerWriter(LocalSink(dst, 0), index=0, kind="dump", tracker=top.tracker)
        with w:
            for kind, msgs in records.items():
                for m in msgs:
                    w.add_record(kind, m)
            for pid in chain.pids():
                for run in chain.iter_runs(pid, zero_data=False):
                    if run.zero:
                        w.add_zero(pid, run.addr, run.npages)
                    else:
                        w.add_pages(pid, run.addr, run.data)
    return dst


def one(records: dict, kind: str):
    """The single record of ``kind`` (process, files, mm, pstree...)."""
    (msg,) = records[kind]
    return msg
