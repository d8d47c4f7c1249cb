"""One exception hierarchy for the whole engine.

Every message is written for the person who has to act on it: it names the
process, file or kernel feature concerned and, where there is one, what to
do. The CLI prints ``str(exc)`` on one line and exits with ``exc.exit_code``;
the library simply raises.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base of every error the engine raises on purpose.

    ``retryable``: the same command may succeed if tried again later
    unchanged (a timing or a transient condition: a thread in uninterruptible
    sleep, a link that dropped, a PID still held by a dying process), as
    opposed to a condition that needs a change first (bad input, a missing
    kernel feature, an object that is not supported). Schedulers use it
    (``--json`` errors carry it)."""

    exit_code = 1
    retryable = False

    def as_json(self) -> dict:
        return {"error": str(self), "exit_code": self.exit_code, "kind": type(self).__name__,
                "retryable": self.retryable}


class UsageError(CheckpointError):
    """Bad arguments or options given by the caller."""

    exit_code = 2


class KernelFeatureError(CheckpointError):
    """The running kernel lacks a feature the requested operation needs."""

    exit_code = 3


class TargetError(CheckpointError):
    """The target process cannot be operated on (missing, zombie, traced...)."""

    exit_code = 4

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class NoSuchProcess(TargetError):
    """The PID (or TID) does not exist."""


class PermissionDenied(TargetError):
    """The kernel refused access to the target (ptrace or procfs)."""


class TargetExited(TargetError):
    """The target (or the thread being worked on) exited under us."""


class FreezeError(TargetError):
    """The target could not be frozen (already traced, timeout, ...)."""

    retryable = True


class InjectionError(TargetError):
    """A syscall injected into a frozen thread failed or could not run."""

    def __init__(self, message: str, pid: int | None = None, errno: int | None = None):
        super().__init__(message, pid)
        self.errno = errno


class ImageError(CheckpointError):
    """An image is missing, corrupt, truncated or does not belong to the chain."""

    exit_code = 5

    def __init__(self, message: str, path: str | None = None, offset: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if offset is not None:
                where += f" at offset {offset}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.offset = offset


class UnsupportedObject(CheckpointError):
    """The target holds an object this engine cannot dump (yet): the message
    names it (fd, kind) and the option that would let the dump go on."""

    exit_code = 6


class RestoreError(CheckpointError):
    """A restore step failed; the message names the object and why. Nothing
    half-restored is left behind."""

    exit_code = 7


class NetLockError(CheckpointError):
    """The network lock of dumped TCP connections (nftables) could not be
    made, handed over or removed; the message names the lock's table and
    gives nft's error."""


class TransportError(CheckpointError):
    """Live migration: the peer, the link or the stream failed (refused,
    wrong key, truncated or corrupt stream, timeout). Nothing partial is
    kept; the source keeps running."""

    exit_code = 8
    retryable = True


class Interrupted(CheckpointError):
    """The engine was asked to stop (SIGINT/SIGTERM); targets were released."""

    exit_code = 130
