"""Image verbs: show, verify, squash (a thin layer over checkpoint.images).

Images are untrusted input: whatever is in the directory, these verbs print
one line and exit 5 (ImageError) on a bad chain, never a traceback, and the
text they print escapes control characters taken from the image.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError, ImageError, UsageError
from . import MAX_THREADS, ZSTD_LEVELS, int_range


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "show", help="describe the layers of an images directory",
        description="Describe a layer chain: a summary of its layers and processes by "
                    "default; --tree, --mm, --files and --pages show more (as "
                    "checkpointctl inspect). Every checksum of the records is checked; "
                    "use verify for the frames too.")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                   help="the images directory")
    p.add_argument("--tree", action="store_true",
                   help="the process tree: pid, ppid, pgid, sid, threads, state")
    p.add_argument("--mm", action="store_true", help="every memory mapping (as /proc/PID/maps)")
    p.add_argument("--files", action="store_true", help="every open file")
    p.add_argument("--pages", action="store_true",
                   help="the page counts, bytes and round times of each layer")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser(
        "verify", help="check every checksum and link of a chain",
        description="Read every block of every layer: header and record checksums, "
                    "every frame's checksum and decompressed size, the chain's links; "
                    "with --sign-key every layer's MAC. Exit 0 only when all of it is "
                    "sound, 5 otherwise.")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                   help="the images directory")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=os.cpu_count() or 1,
                   metavar="N", help="threads checking frames (default: every core)")
    p.add_argument("--sign-key", metavar="FILE", default=None,
                   help="key file: every layer must be signed with it and its MAC verify")
    p.add_argument("--json", action="store_true",
                   help='print {"ok": true|false, ...} as one JSON object')
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "squash", help="merge the first N layers (default all) into one",
        description="Merge the first N layers of a chain into one layer holding the same "
                    "content, published by one rename (a crash leaves a readable chain); "
                    "the older files are then removed.")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                   help="the images directory")
    p.add_argument("--into", type=int_range(1, 1 << 31), default=None, metavar="N",
                   help="squash the first N layers into one (default: all)")
    p.add_argument("--level", type=int_range(*ZSTD_LEVELS), default=None, metavar="N",
                   help="zstd level, 1-22 (default: the layers')")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=1, metavar="N",
                   help="compression threads (default 1)")
    p.add_argument("--sign-key", metavar="FILE", default=None,
                   help="key file: check the merged layers' MACs and sign the result")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_squash)


def _safe(text) -> str:
    """``text`` from an image, with control characters escaped (no terminal
    escape sequence from an image reaches the terminal)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _os_error(exc: OSError, where: str) -> ImageError:
    return ImageError(exc.strerror or str(exc), path=exc.filename or where)


def _key(args) -> bytes | None:
    if args.sign_key is None:
        return None
    from ..images.signing import load_sign_key
    return load_sign_key(args.sign_key)


def describe(images_dir: str) -> dict:
    """Everything `show` prints, as a JSON-ready dict."""
    from ..images import open_chain
    from ..images.reader import temp_report

    with open_chain(images_dir) as chain:
        layers = []
        prev = None
        for layer in chain.layers:
            inv, tr, s = layer.inventory, layer.trailer, layer.stats
            layers.append({
                "index": inv.index, "parent": prev, "layer_id": inv.layer_id,
                "id": inv.layer_id,
                "parent_id": inv.parent_id or None, "kind": inv.kind, "tracker": inv.tracker,
                "kernel_release": inv.kernel_release, "created_unix_ns": inv.created_unix_ns,
                "path": os.path.abspath(layer.path),
                "file": os.path.basename(layer.path), "file_bytes": layer.size,
                "squashed_from": inv.squashed_first if inv.squashed else None,
                "signed_with": layer.key_id,
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
                            "comm": e.comm, "threads": list(e.threads), "vmas": [],
                            "state": "zombie" if e.zombie else "live"}
            if e.zombie:
                procs[e.pid]["exit_status"] = e.exit_code
        for _, mm in chain.records("mm"):
            proc = procs.setdefault(mm.pid, {"pid": mm.pid, "threads": [], "vmas": []})
            proc["vmas"] = [{"start": v.start, "end": v.end, "prot": v.prot,
                             "perms": _perms(v), "offset": v.offset, "path": v.path}
                            for v in mm.vmas]
        for _, fe in chain.records("files"):
            proc = procs.setdefault(fe.pid, {"pid": fe.pid, "threads": [], "vmas": []})
            proc["fds"] = [_fd_info(f) for f in fe.fds]
        for pid in chain.pids():
            procs.setdefault(pid, {"pid": pid, "threads": [], "vmas": []})
        for proc in procs.values():
            proc.setdefault("fds", [])
        temps = temp_report(images_dir)
        return {"dir": images_dir, "layers": layers,
                "processes": list(procs.values()),   # the tree's order: the root first
                "threads": sum(1 for _ in chain.records("core")),
                "stale": [os.path.basename(p) for p in chain.stale],
                "leftovers": [n for n, _ in temps],
                "temps": [{"file": n, "state": st} for n, st in temps]}


def _fd_info(f) -> dict:
    """One FdEntry of the final layer's fd table, as `show` prints it."""
    from ..images.pb import files_pb2

    name = files_pb2.FdType.Name(f.type) if f.type in files_pb2.FdType.values() else str(f.type)
    return {"fd": f.fd, "type": name.removeprefix("FD_").lower(), "path": f.path,
            "pos": f.pos, "flags": f.flags}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _temp_notes(temps) -> list[str]:
    out = []
    for t in temps:
        name, state = _safe(t["file"]), t["state"]
        if state == "live":
            out.append(f"  note: {name} is a layer being written by a running writer")
        elif state == "dead":
            out.append(f"  note: {name} is a partial layer left by an interrupted writer "
                       f"(no process holds it; the next writer removes it); ignored")
        else:
            out.append(f"  note: {name} looks like a writer's temp file but {_safe(state[5:])}; "
                       f"ignored")
    return out


def _perms(v) -> str:
    """A VMA's protection as /proc/PID/maps prints it: r-xp, rw-s ..."""
    return ("r" if v.prot & 1 else "-") + ("w" if v.prot & 2 else "-") + \
        ("x" if v.prot & 4 else "-") + ("s" if v.flags & 0x01 else "p")


def cmd_show(args) -> int:
    try:
        info = describe(args.images_dir)
    except OSError as exc:
        raise _os_error(exc, args.images_dir) from None
    if args.json:
        from ..cli import emit_json
        emit_json(info)
        return 0
    layers, procs = info["layers"], info["processes"]
    raw = sum(L["bytes_raw"] for L in layers)
    stored = sum(L["bytes_stored"] for L in layers)
    top = layers[-1] if layers else None
    print(f"{_safe(info['dir'])}: {len(layers)} layer(s), {_mib(raw)} of pages in "
          f"{_mib(stored)} stored; newest: {_safe(top['kind']) if top else '-'}"
          + (" (restorable)" if top and top["kind"] == "dump" else " (not restorable: "
             "it ends with a pre-dump)"))
    for L in layers:
        parent = "-" if L["parent"] is None else L["parent"]
        sq = f" squashed from {L['squashed_from']}" if L["squashed_from"] is not None else ""
        sig = f" signed with key {L['signed_with']}" if L["signed_with"] else ""
        print(f"  layer {L['index']:4d} parent {parent:>4} {_safe(L['kind']):8s} tracker "
              f"{_safe(L['tracker'])}{sq}{sig}  {L['pages_written']} pages  id {L['id'][:12]}")
        if args.pages:
            ratio = L["bytes_raw"] / L["bytes_stored"] if L["bytes_stored"] else 0.0
            print(f"      pages {L['pages_written']} written, {L['pages_zero']} zero, "
                  f"{L['pages_skipped_parent']} in parent; {_mib(L['bytes_raw'])} raw -> "
                  f"{_mib(L['bytes_stored'])} stored (x{ratio:.2f}), file "
                  f"{_mib(L['file_bytes'])}")
            print(f"      freezing {L['freezing_ms']:.1f} ms, frozen {L['frozen_ms']:.1f} ms, "
                  f"memdump {L['memdump_ms']:.1f} ms, memwrite {L['memwrite_ms']:.1f} ms")
    if args.tree:
        print(f"  {'PID':>7} {'PPID':>7} {'PGID':>7} {'SID':>7}  threads  state   comm")
    for p in procs:
        if args.tree:
            state = p.get("state", "?")
            if state == "zombie":
                state = f"Z({p['exit_status']:#x})"
            print(f"  {p['pid']:>7} {p.get('ppid', '?'):>7} {p.get('pgid', '?'):>7} "
                  f"{p.get('sid', '?'):>7}  {len(p['threads']):>7}  {state:<7} "
                  f"{_safe(p.get('comm', ''))}")
        else:
            print(f"  process {p['pid']} ({_safe(p.get('comm', ''))}): {len(p['threads'])} "
                  f"thread(s), {len(p['vmas'])} mappings, {len(p['fds'])} fds")
    for p in procs if args.mm else ():
        print(f"  process {p['pid']} mappings:")
        for v in p["vmas"]:
            print(f"      {v['start']:x}-{v['end']:x} {v['perms']} {v['offset']:08x} "
                  f"{_safe(v['path'])}")
    for p in procs if args.files else ():
        print(f"  process {p['pid']} fds:")
        for f in p["fds"]:
            print(f"      fd {f['fd']:4d} {_safe(f['type']):8s} pos {f['pos']:<10d} "
                  f"flags {f['flags']:#o} {_safe(f['path'])}")
    for name in info["stale"]:
        print(f"  note: {_safe(name)} was superseded by a squash and is ignored")
    for line in _temp_notes(info["temps"]):
        print(line)
    return 0


def cmd_verify(args) -> int:
    from ..images import open_chain
    from ..images.reader import temp_report

    d = args.images_dir
    try:
        key = _key(args)
        with open_chain(d, threads=max(1, args.threads), sign_key=key) as chain:
            rep = chain.verify()
            unchecked = sorted({layer.key_id for layer in chain.layers if layer.key_id}) \
                if key is None else []
        temps = temp_report(d)
    except OSError as exc:
        err: CheckpointError = _os_error(exc, d)
    except CheckpointError as exc:
        err = exc
    else:
        err = None
    if err is not None:
        if args.json:
            from ..cli import emit_json
            emit_json({"ok": False, "error": str(err), "exit_code": err.exit_code,
                       "path": getattr(err, "path", None), "offset": getattr(err, "offset", None)})
            import sys
            print(f"checkpoint: error: {err}", file=sys.stderr)
            return err.exit_code
        raise err
    rep["temps"] = [{"file": n, "state": st} for n, st in temps]
    rep["leftovers"] = [n for n, _ in temps]
    rep["signed_unchecked"] = unchecked
    if args.json:
        from ..cli import emit_json
        emit_json({"ok": True, **rep})
        return 0
    sig = f", MACs verified with key {rep['signed_with']}" if rep["signed_with"] else ""
    print(f"{_safe(d)}: ok: {rep['layers']} layer(s), {rep['frames']} frame(s), "
          f"{_mib(rep['bytes_raw'])} of pages verified{sig}")
    for kid in unchecked:
        print(f"  note: layers are signed with key {kid}; MACs not checked (no --sign-key)")
    for line in _temp_notes(rep["temps"]):
        print(line)
    return 0


def cmd_squash(args) -> int:
    from ..images.squash import squash

    if args.into is not None and args.into < 1:
        raise ImageError("--into needs a layer count of at least 1", path=args.images_dir)
    key = _key(args)
    try:
        st = squash(args.images_dir, args.into, level=args.level, threads=max(1, args.threads),
                    sign_key=key)
    except OSError as exc:
        raise _os_error(exc, args.images_dir) from None
    except ValueError as exc:   # e.g. a zstd level out of range
        raise UsageError(str(exc)) from None
    if args.json:
        from ..cli import emit_json
        emit_json({"squashed": st is not None, "index": st.index if st else None,
                   "pages": st.pages if st else 0, "bytes_stored": st.bytes_stored if st else 0,
                   "signed_with": st and key and _kid(key)})
    elif st is None:
        print(f"{_safe(args.images_dir)}: nothing to squash")
    else:
        sig = f", signed with key {_kid(key)}" if key else ""
        print(f"{_safe(args.images_dir)}: squashed into {os.path.basename(st.path)}: "
              f"{st.pages} pages, {_mib(st.bytes_stored)} stored{sig}")
    return 0


def _kid(key: bytes) -> str:
    from ..images.signing import key_id
    return key_id(key)
