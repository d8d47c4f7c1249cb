"""Files of an images directory, opened as untrusted input.

Everything the reader or the writer opens inside an images directory is
opened relative to a directory fd, never through a symbolic link, never
blocking (a FIFO planted under a layer name must not hang the engine), and
only accepted when ``fstat`` says it is a regular file owned by the caller
(effective uid) or by root and not writable by everybody. No message ever
quotes the content of such a file.

Temporary layers (``.layer-NNNN.img.tmp-XXXXXXXX``) are ``flock``-ed by
their writer for its whole life; a temp file whose lock can be taken belongs
to a writer that is gone. A writer takes a shared lock on the directory
itself while it creates and locks its temp file, and whoever removes dead
temp files holds the exclusive one, so a temp file is never seen unlocked
between its creation and its writer's lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time

from ..errors import ImageError

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC

TEMP_RE = re.compile(r"^\.layer-(\d{4,})\.img\.tmp-[0-9a-f]{8}$")
LOCK_WAIT = 5.0     # seconds a writer or a cleaner waits for the directory lock

_KINDS = ((stat.S_ISLNK, "a symbolic link (never followed in an images directory)"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def open_dir(path: str) -> int:
    """An fd of the images directory ``path`` (which may itself be reached
    through symbolic links: the caller named it)."""
    try:
        return os.open(path, DIR_FLAGS)
    except FileNotFoundError:
        raise ImageError("images directory does not exist", path=path) from None
    except NotADirectoryError:
        raise ImageError("not a directory", path=path) from None
    except OSError as exc:
        raise ImageError(f"cannot open the images directory: {exc.strerror}",
                         path=path) from None


def refuse_reason(st: os.stat_result) -> str | None:
    """Why a file with this stat may not be read as part of an image, or None."""
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        for test, what in _KINDS:
            if test(mode):
                return f"is {what}, not a regular file"
        return "is not a regular file"
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        return f"is owned by uid {st.st_uid}, not by you (uid {euid}) or root"
    if mode & stat.S_IWOTH:
        return f"is writable by everybody (mode {stat.S_IMODE(mode):04o})"
    return None


def open_entry(dir_fd: int, name: str, display: str) -> tuple[int, os.stat_result]:
    """Open ``name`` in the directory ``dir_fd`` for reading, safely: the
    entry is looked at first through an O_PATH fd (which opens nothing: no
    device, FIFO or automount side effect), then opened with O_NOFOLLOW |
    O_NONBLOCK and checked to be the very inode looked at. ``display`` is
    the path used in messages. Returns (fd, fstat)."""
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ImageError("vanished while the images directory was read", path=display) from None
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", path=display) from None
    try:
        st = os.fstat(pfd)
    finally:
        os.close(pfd)
    why = refuse_reason(st)
    if why:
        raise ImageError(f"refused: {why}", path=display)
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", path=display) from None
    try:
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise ImageError("refused: replaced while being opened", path=display)
        why = refuse_reason(st2)
        if why:
            raise ImageError(f"refused: {why}", path=display)
    except BaseException:
        os.close(fd)
        raise
    return fd, st2


def list_names(dir_fd: int, display: str) -> list[str]:
    """The entry names of the directory ``dir_fd`` (its own fd is untouched)."""
    try:
        return os.listdir(dir_fd)
    except OSError as exc:
        raise ImageError(f"cannot list the images directory: {exc.strerror}",
                         path=display) from None


# ------------------------------------------------------------ directories

def make_images_dir(path: str | os.PathLike) -> str:
    """Create the images directory ``path`` and every missing parent, each
    mode 0700 whatever the umask (os.makedirs' mode applies to the leaf
    only, and through the umask). An existing leaf must be a directory (or a
    symbolic link to one); its mode is left as it is. Returns the path.
    Raises ImageError with one line."""
    path = os.fspath(path)
    if not path:
        raise ImageError("empty images directory path")
    absolute = os.path.abspath(path)
    parts = [p for p in absolute.split("/") if p]
    fd = os.open("/", DIR_FLAGS)
    try:
        walked = ""
        for i, part in enumerate(parts):
            walked += "/" + part
            leaf = i == len(parts) - 1
            created = False
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise ImageError(f"cannot create directory: {exc.strerror}",
                                 path=walked) from None
            # a created directory is opened without following links, so the
            # chmod reaches the directory made here and nothing planted since
            flags = DIR_FLAGS | (os.O_NOFOLLOW if created else 0)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except NotADirectoryError:
                what = "is not a directory"
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        what = "is a symbolic link to something that is not a directory"
                except OSError:
                    pass
                raise ImageError(f"{'images directory' if leaf else 'a parent'} {what}",
                                 path=walked) from None
            except FileNotFoundError:
                raise ImageError("is a dangling symbolic link", path=walked) from None
            except OSError as exc:
                raise ImageError(f"cannot open directory: {exc.strerror}",
                                 path=walked) from None
            os.close(fd)
            fd = nfd
            if created:
                try:
                    os.fchmod(fd, 0o700)    # the umask may have taken bits away
                except OSError as exc:
                    raise ImageError(f"cannot set mode 0700: {exc.strerror}",
                                     path=walked) from None
    finally:
        os.close(fd)
    return path


# ------------------------------------------------------------- temp files

def _lock(fd: int, how: int, what: str, display: str) -> None:
    """flock ``fd`` without ever blocking for more than LOCK_WAIT seconds."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ImageError(f"{what} stayed locked by another process for "
                                 f"{LOCK_WAIT:.0f} s", path=display) from None
            time.sleep(0.01)


def lock_dir_shared(dir_fd: int, display: str) -> None:
    _lock(dir_fd, fcntl.LOCK_SH, "the images directory", display)


def lock_dir_exclusive(dir_fd: int, display: str) -> None:
    _lock(dir_fd, fcntl.LOCK_EX, "the images directory", display)


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def temp_state(dir_fd: int, name: str) -> str:
    """'live' (its writer still holds its lock), 'dead' (nobody holds it: the
    writer is gone), or 'odd: WHY' for an entry that is no regular file of
    ours. Takes the file's lock for an instant at most; never blocks."""
    try:
        fd, _ = open_entry(dir_fd, name, name)
    except ImageError as exc:
        return "odd: " + str(exc).split(": ", 1)[-1]
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "live"
        except OSError as exc:
            return f"odd: cannot lock: {exc.strerror}"
        return "dead"
    finally:
        os.close(fd)     # drops the lock if we took it


def temp_names(names) -> list[str]:
    return sorted(n for n in names if TEMP_RE.match(n))


def remove_dead_temps(dir_fd: int, display: str) -> list[str]:
    """Unlink every temp file of a dead writer in ``dir_fd``; returns their
    names. Holds the directory's exclusive lock meanwhile, so no writer is
    between creating its temp file and locking it. A temp file is removed
    only while this process holds that file's own lock and the name still
    refers to the inode locked."""
    removed = []
    lock_dir_exclusive(dir_fd, display)
    try:
        for name in temp_names(list_names(dir_fd, display)):
            try:
                fd, st = open_entry(dir_fd, name, name)
            except ImageError:
                continue            # not ours to remove; show/verify report it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue        # a live writer
                try:
                    now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    continue
                try:
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(name)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
        if removed:
            os.fsync(dir_fd)
    finally:
        unlock(dir_fd)
    return removed
