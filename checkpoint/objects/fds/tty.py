"""Terminals and ptys (CRIU's tty.c, the fd side; the session and the
controlling terminal are objects/process.py's).

dump: the path, whether it is a pty master and its index (TIOCGPTN or
/dev/pts/N), its settings (TCGETS2: struct termios2) and window size
(TIOCGWINSZ). restore: a master and its slave as a new pair (TIOCGPTPEER),
the placeholder's own terminal kept (the restorer's), or the path reopened;
then, once every fd is placed, each terminal gets its dumped settings and,
unless it is the restorer's terminal, its window size. On the restorer's
terminal the size is the terminal's own: if it differs from the dumped one
the process gets a SIGWINCH, as after any resize."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import struct

from ...images.pb import files_pb2
from ...kernel.syscalls import pidfd_getfd, pidfd_open
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, reopen_flags

# <asm-generic/ioctls.h>
TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int)
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
TIOCGPTPEER = 0x5441  # _IO('T', 0x41)
TCGETS2 = 0x802C542A  # _IOR('T', 0x2A, struct termios2)
TCSETS2 = 0x402C542B  # _IOW('T', 0x2B, struct termios2)
TIOCGWINSZ, TIOCSWINSZ = 0x5413, 0x5414
TERMIOS2_SIZE = 44


def is_tty_major(major: int) -> bool:
    # <linux/major.h>: TTY_MAJOR 4, TTYAUX_MAJOR 5 (/dev/tty, console, ptmx),
    # UNIX98_PTY_SLAVE_MAJOR 136..143; other serial drivers have their own
    return major in (4, 5) or 136 <= major <= 143 or major >= 188


def tty_details(ctx: DumpCtx, fd: int):
    """(pty master?, pty index or None, TtyState) for a tty, None for another char device."""
    own = ctx.getfd(fd)
    try:
        if not os.isatty(own):
            return None
        state = files_pb2.TtyState(termios=fcntl.ioctl(own, TCGETS2, b"\0" * TERMIOS2_SIZE))
        state.rows, state.cols, state.xpixel, state.ypixel = struct.unpack(
            "HHHH", fcntl.ioctl(own, TIOCGWINSZ, b"\0" * 8))
        try:
            idx = struct.unpack("I", fcntl.ioctl(own, TIOCGPTN, b"\0" * 4))[0]
            return True, idx, state
        except OSError:
            pass  # not a pty master
    finally:
        os.close(own)
    link = os.readlink(ctx.fd_path(fd))
    if link.startswith("/dev/pts/") and link[len("/dev/pts/"):].isdigit():
        return False, int(link[len("/dev/pts/"):]), state
    return False, None, state


def claims(p: Probe) -> bool:
    return p.kind == "file" and stat.S_ISCHR(p.st.st_mode)  # after devnull: a tty or refused


def dump(ctx: DumpCtx, p: Probe):
    from .refused import refuse_chardev
    e = p.e
    got = tty_details(ctx, p.fd)
    if got is None or not is_tty_major(os.major(p.st.st_rdev)):
        return refuse_chardev(ctx, p)
    e.type = files_pb2.FD_TTY
    e.pty_master, index, state = got
    if index is not None:
        e.pty_index = index
    if p.e.HasField("dup_of"):
        return e  # the settings live with the first fd of the description
    e.tty.CopyFrom(state)
    return e


def restore(R: RestoreCore, it: Item) -> None:
    e = it.e
    if e.pty_master:
        fd = R.open_image_path(it, e.flags | os.O_NOCTTY)
        scratch = R.r.scratch
        R.r.write(scratch, b"\0\0\0\0")
        R.call("ioctl", fd, TIOCSPTLCK, scratch, it=it)
        if it.pty_index is not None:
            R.pty_new_index[it.pty_index] = e.fd
        return R.place(fd, it)
    idx = it.pty_index
    if idx is not None and idx in R.pty_new_index:  # the slave of a master restored above
        master = R.pty_new_index[idx]
        flags = reopen_flags(e.flags) | os.O_NOCTTY | os.O_CLOEXEC
        fd = R.fresh(R.call("ioctl", master, TIOCGPTPEER, flags, it=it))
        return R.place(fd, it)
    if e.fd in R.original and placeholder_is_tty(R, R.moved.get(e.fd, e.fd)):
        R.inherited.add(e.fd)  # the restorer's terminal: its window size is its own
        fd = R.moved.get(e.fd, e.fd)
        R.setfl(fd, it)
        return R.place(fd, it, close_tmp=False)
    R.place(R.open_image_path(it, e.flags | os.O_NOCTTY), it)


def placeholder_is_tty(R: RestoreCore, fd: int) -> bool:
    try:
        st = os.stat(f"/proc/{R.pid}/fd/{fd}")
    except OSError:
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    pidfd = pidfd_open(R.pid)
    try:
        own = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        return os.isatty(own)
    finally:
        os.close(own)


def finish(R: RestoreCore, it: Item) -> None:
    """Settings and window size, through the fd now at its number (an
    inherited stand-in too: a program that put its terminal in raw mode
    finds it raw)."""
    e = it.e
    if not e.HasField("tty") or len(e.tty.termios) != TERMIOS2_SIZE:
        return
    if e.fd in R.inherited and not placeholder_is_tty(R, e.fd):
        return  # the stand-in is no terminal (a pipe given for a tty): nothing to set
    R.r.write(R.r.scratch, e.tty.termios)
    res = R.r.syscall("ioctl", e.fd, TCSETS2, R.r.scratch)
    if res < 0:
        raise R.fail(it, f"cannot set the terminal's settings (TCSETS2): {os.strerror(-res)}")
    want = struct.pack("HHHH", e.tty.rows, e.tty.cols, e.tty.xpixel, e.tty.ypixel)
    if e.fd in R.inherited:
        R.call("ioctl", e.fd, TIOCGWINSZ, R.r.scratch, it=it)
        if R.r.read(R.r.scratch, 8) != want and not R.winch_sent:
            R.winch_sent = True  # its size changed meanwhile: tell it, once
            R.call("kill", R.call("getpid"), signal.SIGWINCH, it=it)
        return
    R.r.write(R.r.scratch, want)
    R.call("ioctl", e.fd, TIOCSWINSZ, R.r.scratch, it=it)


def check(R: RestoreCore, it: Item, st: os.stat_result) -> None:
    if not is_tty_major(os.major(st.st_rdev)):
        raise R.fail(it, f"{it.e.path} (device {os.major(st.st_rdev)}:"
                         f"{os.minor(st.st_rdev)}) is not a terminal")


KIND = FdKind("terminal", (files_pb2.FD_TTY,), claims, dump, restore, finish=finish,
              check=check)
