"""`checkpoint migrate` (the source) and `checkpoint page-server` (the destination)."""

from __future__ import annotations

import logging
import re
import sys

from ..errors import UsageError
from . import MAX_PID, MAX_THREADS, ZSTD_LEVELS, int_range

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def bandwidth(text: str) -> float:
    """"1G", "100M", "500k" bits per second (or with a trailing "B": bytes) ->
    bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]?)(bit|b|B)?(?:/s|ps)?", text.strip())
    if not m:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 1G, 200M (bits/s) or 50MB "
                                         "(bytes/s)")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    v = v if m.group(3) == "B" else v / 8
    if v < 1000:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: under 8 kbit/s")
    return v


def _auth(p, server: bool) -> None:
    p.add_argument("--auth-key", metavar="FILE",
                   help="pre-shared key (32+ bytes, mode 0600): challenge-response and a MAC "
                        "on every message; mandatory off loopback unless TLS")
    p.add_argument("--tls-cert", metavar="FILE", help="this side's certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="this side's private key (PEM)")
    p.add_argument("--tls-cacert", metavar="FILE",
                   help="CA that signed the peer's certificate (mutual TLS)")
    p.add_argument("--timeout", type=int_range(1, 3600), default=60, metavar="S",
                   help="seconds a peer may stay silent (default 60)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens on stderr")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _security(args, server: bool):
    from ..transport.wire import load_key, tls_context
    if args.auth_key and (args.tls_cert or args.tls_key or args.tls_cacert):
        raise UsageError("--auth-key and the TLS options exclude each other")
    key = load_key(args.auth_key) if args.auth_key else None
    tls = tls_context(server, args.tls_cert, args.tls_key, args.tls_cacert) \
        if (args.tls_cert or args.tls_key or args.tls_cacert) else None
    return key, tls


def register(sub) -> None:
    p = sub.add_parser("migrate", help="live-migrate a process to a page server",
                       description="Iterative pre-copy to `checkpoint page-server --restore` "
                                   "on the destination, then a short final freeze; the "
                                   "source is killed once the destination runs the copy, "
                                   "and keeps running if anything fails before.")
    p.add_argument("-t", "--tree", dest="pid", type=int_range(1, MAX_PID), required=True,
                   metavar="PID", help="the process to migrate")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the page server")
    p.add_argument("--downtime-limit", type=float, default=50.0, metavar="MS",
                   help="switch over when the predicted downtime is this low (default 50)")
    p.add_argument("--max-rounds", type=int_range(0, 1000), default=8, metavar="N",
                   help="pre-copy rounds at most before the final one (default 8)")
    p.add_argument("--bandwidth", type=bandwidth, default=None, metavar="RATE",
                   help="cap the stream, e.g. 1G or 200M bits/s, 50MB bytes/s")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle a process that dirties memory faster than the link carries "
                        "it (it stays frozen for part of each round) instead of stopping "
                        "the world")
    p.add_argument("--track", default="auto",
                   choices=["auto", "uffd-wp", "soft-dirty", "hash", "full"])
    p.add_argument("--compress-level", type=int_range(*ZSTD_LEVELS), default=1, metavar="N")
    p.add_argument("--threads", type=int_range(0, MAX_THREADS), default=0, metavar="N")
    p.add_argument("--skip-children", action="store_true",
                   help="migrate a process that has children alone (as for dump)")
    p.add_argument("--file-locks", action="store_true",
                   help="migrate the file locks it holds (as for dump; the destination must "
                        "see the same files)")
    p.add_argument("--external-fds", action="store_true",
                   help="record unsupported fds as external (as for dump); give their "
                        "stand-ins to page-server --inherit-fd")
    from .dump import tcp_options
    tcp_options(p)
    p.add_argument("--action-script", action="append", default=[], metavar="FILE",
                   help="run FILE at network-unlock (CHECKPOINT_ACTION): the copy runs on the "
                        "destination and the source is gone; the source's lock on the TCP "
                        "connections is released right after: move their address there")
    _auth(p, server=False)
    p.set_defaults(func=run_migrate)

    p = sub.add_parser("page-server", help="receive migrations (and restore them)",
                       description="Receive layer streams into DIR/<pid>-<time>/ (each layer "
                                   "published atomically once checked); with --restore, "
                                   "build the process as the layers arrive and run it when "
                                   "the final one is in.")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int_range(0, 65535), required=True,
                   help="port to listen on (0: any; printed)")
    p.add_argument("--restore", action="store_true",
                   help="restore each migration as its layers arrive")
    p.add_argument("--pid-ns", action="store_true",
                   help="restore into a new PID namespace (needed when source and "
                        "destination share a PID space, as on one machine)")
    p.add_argument("--inherit-fd", action="append", default=[], metavar="fd[N]:KEY",
                   help="give the restored process this server's fd N in place of the "
                        "dumped fd whose link was KEY")
    p.add_argument("--once", action="store_true", help="exit after one migration")
    p.add_argument("--status-fd", type=int, default=None, metavar="FD",
                   help="write a zero byte to FD and close it once listening")
    _auth(p, server=True)
    p.set_defaults(func=run_page_server)


def _line(obj) -> None:
    import json
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _logging(args) -> None:
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="checkpoint: %(message)s")


def run_migrate(args) -> int:
    from ..migration import migrate
    _logging(args)
    if not 0 < args.downtime_limit <= 1e6:
        raise UsageError("--downtime-limit must be within (0, 1000000] ms")
    key, tls = _security(args, server=False)
    st = migrate(args.pid, args.to, downtime_limit_ms=args.downtime_limit,
                 max_rounds=args.max_rounds, bandwidth=args.bandwidth, key=key, tls=tls,
                 auto_converge=args.auto_converge, track=args.track, threads=args.threads,
                 compress_level=args.compress_level, progress=None if not args.json else False,
                 timeout=args.timeout, skip_children=args.skip_children,
                 file_locks=args.file_locks, external_fds=args.external_fds, tcp=args.tcp,
                 action_scripts=args.action_script)
    if args.json:
        from ..cli import emit_json
        emit_json(st.as_json())
    else:
        print(f"migrated {args.pid} to {args.to}: PID {st.remote_pid} there; {st.rounds} "
              f"rounds, downtime {st.downtime_ms:.1f} ms (predicted "
              f"{st.predicted_downtime_ms:.1f}), {st.bytes_sent / 2**20:.1f} MiB sent for "
              f"{st.bytes_raw / 2**20:.1f} MiB of pages"
              + ("" if st.converged else f"; {st.reason}"))
    return 0


def run_page_server(args) -> int:
    from ..transport.server import PageServer
    from .restore import parse_inherit
    _logging(args)
    key, tls = _security(args, server=True)
    srv = PageServer(args.images_dir, address=args.address, port=args.port, key=key, tls=tls,
                     restore=args.restore, pid_ns=args.pid_ns,
                     inherit=parse_inherit(args.inherit_fd), timeout=args.timeout)
    from .restore import check_status_fd, notify_status
    check_status_fd(args.status_fd)
    port = srv.bind()
    # the ready line (port 0 picks one): on stderr, or as JSON on stdout
    if args.json:   # one JSON object a line: the ready line, then one per migration
        _line({"listening": f"{args.address}:{port}", "port": port})
    else:
        print(f"page-server listening on {args.address}:{port}", file=sys.stderr, flush=True)
    notify_status(args.status_fd)

    def done(m) -> None:
        if args.json:
            _line(m.as_json())
        elif m.ok:
            print(f"page-server: migration from {m.peer}: {m.layers} layers into {m.images}"
                  + (f", restored as PID {m.restored_pid}" if m.restored_pid else ""),
                  file=sys.stderr, flush=True)
        else:
            print(f"page-server: migration from {m.peer} failed: {m.error}", file=sys.stderr,
                  flush=True)
    from .. import interrupt
    try:
        srv.serve(once=args.once, on_done=done, stop=interrupt.pending)
    finally:
        srv.close()
    served = srv.served
    if args.once and served and not served[-1].ok:
        return 8
    return 0
