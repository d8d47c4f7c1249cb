"""`checkpoint pre-dump` and `checkpoint dump` (CRIU's verbs and short options)."""

from __future__ import annotations

import logging

from . import MAX_PID, MAX_THREADS, ZSTD_LEVELS, int_range


def _common(p) -> None:
    p.add_argument("-t", "--tree", dest="pid", type=int_range(1, MAX_PID), required=True, metavar="PID",
                   help="the process to checkpoint, with all its descendants (the tree)")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                   help="directory of the layer chain (created 0700)")
    p.add_argument("--track", default="auto",
                   choices=["auto", "uffd-wp", "soft-dirty", "hash", "full"],
                   help="dirty-page tracker (default: the best this kernel offers)")
    p.add_argument("--compress-level", type=int_range(*ZSTD_LEVELS), default=1, metavar="N",
                   help="zstd level, 1-22 (default 1)")
    p.add_argument("--threads", type=int_range(0, MAX_THREADS), default=0, metavar="N",
                   help="compression threads (default: every core; 1 spares a busy target "
                        "during pre-dumps)")
    p.add_argument("--max-pages", type=int_range(0, 1 << 40), default=0, metavar="N",
                   help="PAGEMAP_SCAN page budget per call (0: none)")
    p.add_argument("--prev-images-dir", metavar="DIR",
                   help="start from the chain of an earlier checkpoint of the same process "
                        "(after dump -R): only what changed since goes into DIR; its layers "
                        "are hard-linked, so each directory restores on its own")
    p.add_argument("--action-script", action="append", default=[], metavar="FILE",
                   help="run FILE before freezing (pre-dump) and once the layer is published "
                        "with the target still frozen (post-dump); CHECKPOINT_ACTION says which "
                        "(CRIU's CRTOOLS_SCRIPT_ACTION too); non-zero aborts")
    p.add_argument("--sign-key", metavar="FILE",
                   help="sign each layer with this key (32+ bytes, not readable by others); "
                        "a signed chain is continued only with its key")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens on stderr")
    p.add_argument("--json", action="store_true", help="print the round's stats as JSON")
    p.add_argument("--file-locks", action="store_true",
                   help="dump the file locks (flock, POSIX, OFD) the target holds and take "
                        "them again at restore; without it a target holding one is refused. "
                        "The locks are let go when the target dies: another process may take "
                        "them before the restore (which then fails)")
    p.add_argument("--skip-children", action="store_true",
                   help="dump the process alone, without its descendants: the children are "
                        "not in the image and keep running; the restored process has none")
    p.add_argument("--freeze-cgroup", metavar="PATH",
                   help="a cgroup v2 directory holding the tree: frozen while the tree is "
                        "seized, so a tree that forks faster than ptrace follows is caught "
                        "whole (CRIU's --freeze-cgroup)")


def register(sub) -> None:
    p = sub.add_parser("pre-dump", help="dump memory only; the target keeps running",
                       description="Add one memory layer to the chain (the first is full, "
                                   "later ones hold the pages written since); the target "
                                   "keeps running and tracking stays armed.")
    _common(p)
    p.set_defaults(func=run, final=False)
    p = sub.add_parser("dump", help="final dump of the complete state",
                       description="Add the final layer with the complete process state. "
                                   "The target is killed once the layer is published, "
                                   "unless -R.")
    _common(p)
    p.add_argument("-R", "--leave-running", action="store_true",
                   help="leave the target running after the dump")
    p.add_argument("--external-fds", action="store_true",
                   help="record unsupported fds (sockets ...) as external instead of "
                        "failing; restore them with --inherit-fd")
    tcp_options(p)
    p.set_defaults(func=run, final=True)


def tcp_options(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tcp-established", dest="tcp", action="store_const", const="established",
                   help="dump established TCP connections through TCP_REPAIR (their packets "
                        "are dropped by a nftables rule from the dump until the restore); "
                        "without it or --tcp-close a target holding one is refused")
    g.add_argument("--tcp-close", dest="tcp", action="store_const", const="close",
                   help="restore TCP connections closed (their peers see them end)")


def run(args) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="checkpoint: %(message)s")
    # imported here: `checkpoint --help` and the other verbs do not pay for
    # the engine (protobuf, zstandard, the rooms: ~0.1 s)
    from ..dumper import Checkpointer
    from ..images import load_sign_key
    with Checkpointer(args.pid, args.images_dir, track=args.track,
                      compress_level=args.compress_level, threads=args.threads,
                      max_pages=args.max_pages,
                      external_fds=getattr(args, "external_fds", False),
                      file_locks=args.file_locks, tcp=getattr(args, "tcp", None),
                      skip_children=args.skip_children,
                      freeze_cgroup=args.freeze_cgroup,
                      sign_key=load_sign_key(args.sign_key) if args.sign_key else None,
                      prev_images_dir=args.prev_images_dir,
                      action_scripts=args.action_script,
                      progress=None if not args.json else False) as ck:
        st = ck.dump(leave_running=args.leave_running) if args.final else ck.pre_dump()
    if args.json:
        from ..cli import emit_json
        emit_json(st.as_json())
    else:
        reason = f" ({st.full_reason})" if st.full_reason else ""
        n = len(st.processes) + len(st.zombies)
        tree = f" and {n - 1} descendant(s)" if n > 1 else ""
        print(f"{st.kind} layer {st.layer} of {args.pid}{tree}: {st.pages_written} pages written, "
              f"{st.pages_zero} zero, {st.pages_skipped_parent} in parent{reason}; "
              f"{st.bytes_raw / 2**20:.1f} MiB -> {st.bytes_stored / 2**20:.1f} MiB; "
              f"frozen {st.frozen_ms:.1f} ms")
    return 0
