"""Image verbs: show, verify, squash (a thin layer over checkpoint.images)."""

from __future__ import annotations

import os

from ..errors import ImageError


def register(subparsers) -> None:
    p = subparsers.add_parser("show", help="describe the layers of an images directory")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser("verify", help="check every checksum and link of a chain")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("squash", help="merge the first N layers (default all) into one")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    p.add_argument("--into", type=int, default=None, metavar="N",
                   help="squash the first N layers into one (default: all)")
    p.add_argument("--level", type=int, default=None, help="zstd level (default: the layers')")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_squash)


def describe(images_dir: str) -> dict:
    """Everything `show` prints, as a JSON-ready dict."""
    from ..images import open_chain
    from ..images.reader import leftover_temps

    with open_chain(images_dir) as chain:
        layers = []
        prev = None
        for layer in chain.layers:
            inv, tr, s = layer.inventory, layer.trailer, layer.stats
            layers.append({
                "index": inv.index, "parent": prev, "id": inv.layer_id,
                "parent_id": inv.parent_id or None, "kind": inv.kind, "tracker": inv.tracker,
                "kernel_release": inv.kernel_release, "created_unix_ns": inv.created_unix_ns,
                "file": os.path.basename(layer.path), "file_bytes": layer.size,
                "squashed_from": inv.squashed_first if inv.squashed else None,
                "frames": tr.frames, "records": tr.records,
                "pages_written": s.pages_written, "pages_zero": s.pages_zero,
                "pages_scanned": s.pages_scanned, "pages_skipped_parent": s.pages_skipped_parent,
                "bytes_raw": s.bytes_raw, "bytes_stored": s.bytes_stored,
                "freezing_ms": s.freezing_ms, "frozen_ms": s.frozen_ms,
                "memdump_ms": s.memdump_ms, "memwrite_ms": s.memwrite_ms,
            })
            prev = inv.index
        procs = {}
        for _, e in chain.records("pstree"):
            procs[e.pid] = {"pid": e.pid, "ppid": e.ppid, "pgid": e.pgid, "sid": e.sid,
                            "comm": e.comm, "threads": list(e.threads), "vmas": []}
        for _, mm in chain.records("mm"):
            proc = procs.setdefault(mm.pid, {"pid": mm.pid, "threads": [], "vmas": []})
            proc["vmas"] = [{"start": v.start, "end": v.end, "prot": v.prot, "path": v.path}
                            for v in mm.vmas]
        for _, fe in chain.records("files"):
            proc = procs.setdefault(fe.pid, {"pid": fe.pid, "threads": [], "vmas": []})
            proc["fds"] = [_fd_info(f) for f in fe.fds]
        for pid in chain.pids():
            procs.setdefault(pid, {"pid": pid, "threads": [], "vmas": []})
        for proc in procs.values():
            proc.setdefault("fds", [])
        return {"dir": images_dir, "layers": layers,
                "processes": [procs[p] for p in sorted(procs)],
                "threads": sum(1 for _ in chain.records("core")),
                "stale": [os.path.basename(p) for p in chain.stale],
                "leftovers": [os.path.basename(p) for p in leftover_temps(images_dir)]}


def _fd_info(f) -> dict:
    """One FdEntry of the final layer's fd table, as `show` prints it."""
    from ..images.pb import files_pb2

    name = files_pb2.FdType.Name(f.type) if f.type in files_pb2.FdType.values() else str(f.type)
    return {"fd": f.fd, "type": name.removeprefix("FD_").lower(), "path": f.path,
            "pos": f.pos, "flags": f.flags}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_show(args) -> int:
    info = describe(args.images_dir)
    if args.json:
        from ..cli import emit_json
        emit_json(info)
        return 0
    print(f"{info['dir']}: {len(info['layers'])} layer(s)")
    for L in info["layers"]:
        parent = "-" if L["parent"] is None else L["parent"]
        sq = f" squashed from {L['squashed_from']}" if L["squashed_from"] is not None else ""
        ratio = L["bytes_raw"] / L["bytes_stored"] if L["bytes_stored"] else 0.0
        print(f"  layer {L['index']:4d} parent {parent:>4} {L['kind']:8s} tracker {L['tracker']}"
              f"{sq}  id {L['id'][:12]}")
        print(f"      pages {L['pages_written']} written, {L['pages_zero']} zero, "
              f"{L['pages_skipped_parent']} in parent; {_mib(L['bytes_raw'])} raw -> "
              f"{_mib(L['bytes_stored'])} stored (x{ratio:.2f}), file {_mib(L['file_bytes'])}")
        print(f"      freezing {L['freezing_ms']:.1f} ms, frozen {L['frozen_ms']:.1f} ms, "
              f"memdump {L['memdump_ms']:.1f} ms, memwrite {L['memwrite_ms']:.1f} ms")
    for p in info["processes"]:
        print(f"  process {p['pid']} ppid {p.get('ppid', '?')} threads {p['threads']} "
              f"vmas {len(p['vmas'])}")
    for v in (p for p in info["processes"] for p in p["vmas"]):
        print(f"      {v['start']:#x}-{v['end']:#x} prot {v['prot']} {v['path']}")
    for p in info["processes"]:
        if p["fds"]:
            print(f"  process {p['pid']} fds {len(p['fds'])}")
        for f in p["fds"]:
            print(f"      fd {f['fd']:4d} {f['type']:8s} pos {f['pos']:<10d} "
                  f"flags {f['flags']:#o} {f['path']}")
    for name in info["stale"]:
        print(f"  note: {name} was superseded by a squash and is ignored")
    for name in info["leftovers"]:
        print(f"  note: {name} is a partial layer left by an interrupted writer; ignored")
    return 0


def cmd_verify(args) -> int:
    from ..images import open_chain
    from ..images.reader import leftover_temps

    with open_chain(args.images_dir, threads=args.threads) as chain:
        rep = chain.verify()
    rep["leftovers"] = [os.path.basename(p) for p in leftover_temps(args.images_dir)]
    if args.json:
        from ..cli import emit_json
        emit_json({"ok": True, **rep})
    else:
        print(f"{args.images_dir}: ok: {rep['layers']} layer(s), {rep['frames']} frame(s), "
              f"{_mib(rep['bytes_raw'])} of pages verified")
        for name in rep["leftovers"]:
            print(f"  note: {name} is a partial layer left by an interrupted writer; ignored")
    return 0


def cmd_squash(args) -> int:
    from ..images.squash import squash

    if args.into is not None and args.into < 1:
        raise ImageError("--into needs a layer count of at least 1", path=args.images_dir)
    st = squash(args.images_dir, args.into, level=args.level, threads=args.threads)
    if args.json:
        from ..cli import emit_json
        emit_json({"squashed": st is not None, "index": st.index if st else None,
                   "pages": st.pages if st else 0, "bytes_stored": st.bytes_stored if st else 0})
    elif st is None:
        print(f"{args.images_dir}: nothing to squash")
    else:
        print(f"{args.images_dir}: squashed into {os.path.basename(st.path)}: {st.pages} pages, "
              f"{_mib(st.bytes_stored)} stored")
    return 0
