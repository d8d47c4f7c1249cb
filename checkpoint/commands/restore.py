"""`checkpoint restore` (CRIU's verb and options)."""

from __future__ import annotations

import os
import re
import signal
import sys

from ..errors import CheckpointError, UsageError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH)


def register(sub) -> None:
    p = sub.add_parser("restore", help="restore a process from its images",
                       description="Replay the layer chain into a new process that goes on "
                                   "where the dumped one stopped, with its original PID.")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    p.add_argument("-d", "--restore-detached", action="store_true",
                   help="print the restored PID and leave it running (default: stay its "
                        "parent, forward signals, exit with its exit status)")
    p.add_argument("--pidfile", metavar="FILE", help="write the restored PID to FILE")
    p.add_argument("--inherit-fd", action="append", default=[], metavar="fd[N]:KEY",
                   help="give the restored process this engine's fd N in place of the "
                        "dumped fd whose link was KEY (e.g. fd[3]:pipe:[1234])")
    p.add_argument("--stdio", metavar="MODE", default=None,
                   help="where the dumped fds 0-2 that were pipes or terminals go: inherit "
                        "(this command's own; the default without -d), null (/dev/null), "
                        "or a FILE (appended to); with -d there is no default: a dumped "
                        "pipe or terminal on 0-2 needs --stdio or --inherit-fd")
    p.add_argument("--no-inherit-stdio", action="store_true",
                   help="do not hand this engine's stdin/stdout/stderr to the restored "
                        "process in place of dumped pipes and terminals on fds 0-2")
    p.add_argument("--new-pids", action="store_true",
                   help="let the kernel pick the PID (single-threaded processes only)")
    p.add_argument("--pid-ns", action="store_true",
                   help="restore into a new PID namespace, where the original PIDs are free")
    p.add_argument("-j", "--shell-job", action="store_true",
                   help="join this shell's session as a job (its own process group if it "
                        "led one) instead of the dumped session")
    p.add_argument("--restart-block", choices=["eintr", "reissue"], default="eintr",
                   help="a sleep interrupted by the dump returns EINTR (as CRIU) or is "
                        "issued again")
    p.add_argument("--sign-key", metavar="FILE",
                   help="refuse a chain that is not signed with this key, or was edited")
    p.add_argument("--action-script", action="append", default=[], metavar="FILE",
                   help="run FILE at pre-restore, post-restore (built, still stopped), "
                        "pre-resume and post-resume (CHECKPOINT_ACTION; CRIU's names); "
                        "non-zero before the resume aborts the restore")
    p.add_argument("--status-fd", type=int, default=None, metavar="FD",
                   help="write a zero byte to FD and close it once the process runs "
                        "(CRIU's ready notification)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens on stderr")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def parse_inherit(specs: list[str]) -> dict[str, int]:
    out = {}
    for spec in specs:
        m = re.fullmatch(r"fd\[(\d+)\]:(.+)", spec)
        if not m:
            raise UsageError(f"--inherit-fd {spec!r}: expected fd[N]:KEY")
        fd = int(m.group(1))
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"--inherit-fd {spec!r}: fd {fd} is not open") from None
        out[m.group(2)] = fd
    return out


PIDFILE_MODE = 0o644  # as daemons' pidfiles: anyone may read which PID it is


def check_pidfile(path: str) -> None:
    """Refuse a --pidfile that cannot be written, before anything is restored."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(f"--pidfile {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"--pidfile {path}: directory {d} is not writable")
    if os.path.isdir(path) and not os.path.islink(path):
        raise UsageError(f"--pidfile {path} is a directory")


def write_pidfile(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically and without following any
    symlink: a new file with a random name (O_EXCL, mkstemp) in the same
    directory, mode 0644, fsync, then renamed over ``path`` (rename replaces
    a symlink planted at ``path`` itself, never what it points to)."""
    import tempfile
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        os.fchmod(fd, PIDFILE_MODE)
        os.write(fd, f"{pid}\n".encode())
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def notify_status(fd: int | None) -> None:
    """CRIU's --status-fd: one zero byte, then the fd is closed."""
    if fd is None:
        return
    try:
        os.write(fd, b"\0")
        os.close(fd)
    except OSError as exc:
        raise UsageError(f"--status-fd {fd}: {exc.strerror}") from None


def _stdio(args) -> str:
    """The stdio contract: attached, the restored program shares this
    command's streams (it runs in the foreground, the command waits for
    it); detached, nothing is shared unless asked (the command exits at
    once, and a caller reading its stdout would wait for the program)."""
    if args.stdio is not None:
        if args.no_inherit_stdio:
            raise UsageError("--stdio and --no-inherit-stdio exclude each other")
        return args.stdio
    if args.no_inherit_stdio or args.restore_detached:
        return "none"
    return "inherit"


def check_status_fd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"--status-fd {fd}: not an open fd") from None


def run(args) -> int:
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.INFO, format="checkpoint: %(message)s")
    inherit = parse_inherit(args.inherit_fd)
    if args.pidfile:
        check_pidfile(args.pidfile)
    check_status_fd(args.status_fd)
    from ..images import load_sign_key
    from ..restorer import restore
    r = restore(args.images_dir, inherit=inherit,
                inherit_stdio=not args.no_inherit_stdio, new_pids=args.new_pids,
                stdio=_stdio(args),
                pid_ns=args.pid_ns, shell_job=args.shell_job,
                progress=False if args.json else None,
                restart_block=args.restart_block,
                sign_key=load_sign_key(args.sign_key) if args.sign_key else None,
                action_scripts=args.action_script)
    notify_status(args.status_fd)
    if args.pidfile:
        try:
            write_pidfile(args.pidfile, r.pid)
        except BaseException as exc:
            r.kill()  # never a restored process left running behind a failure
            r.wait()
            if isinstance(exc, OSError):
                raise CheckpointError(f"--pidfile {args.pidfile}: {exc.strerror}; the restored "
                                      f"process {r.pid} was killed") from None
            raise
    if args.json:
        from ..cli import emit_json
        emit_json(r.as_json())
    elif args.restore_detached:
        print(r.pid)
    sys.stdout.flush()
    if args.restore_detached:
        return 0
    # stay the parent: forward signals, exit with the restored process's status
    for s in FORWARDED:
        signal.signal(s, lambda sig, _f, pid=r.pid: os.kill(pid, sig))
    code = r.wait()
    return code if code >= 0 else 128 - code
