"""What the engine parks inside a target between engine runs, and how any
engine recognises it.

A tracker whose state lives in the target (the uffd-wp registration, the
soft-dirty bits) must survive from one ``checkpoint`` invocation to the
next, and must tell a later engine whether that state still matches the
chain it continues. Its *tag* is a small memfd named ``checkpoint-track``
that the engine parks at a high, close-on-exec fd of the target; it holds
one JSON object, padded to a fixed size and rewritten in place by one
``pwrite`` (a dying engine leaves either the old or the new content)::

    {"tracker": "uffd-wp", "token": "<chain token>", "round": N, "uffd": FD}

The crash-safety rule: ``round`` is advanced in the tag *before* the first
step that destroys tracking information in the target (a get-and-clear, a
soft-dirty clear), and the layer written by that round records the same
token and round. A later engine continues incrementally only when the
chain's newest layer names exactly the tag's token and round; a round that
died between clearing and publishing leaves the tag one round ahead, so the
next layer is full. Nothing is written after the publication: the chain
itself says which rounds were published.

The uffd sits right above its tag (``tag_fd + 1``, where the kernel gives
the lowest free fd from there), so an engine that died between creating
the uffd and naming it in the tag still leaves a recognisable pair.
:func:`engine_fds` finds every such fd of any engine and any chain; they
are never dumped as the program's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

TAG_NAME = "checkpoint-track"
TAG_LINK = f"/memfd:{TAG_NAME} (deleted)"
UFFD_LINK = "anon_inode:[userfaultfd]"
TAG_SIZE = 512          # the tag is always this many bytes: one pwrite replaces it whole
F_DUPFD_CLOEXEC = 1030
MFD_CLOEXEC = 1


def fd_link(pid: int, fd: int) -> str | None:
    if fd < 0:
        return None
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _fds(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return []


def read_tag(pid: int, fd: int) -> dict | None:
    """The tag at ``fd`` of ``pid``, {} for a tag without (valid) content,
    None when ``fd`` is not a tag."""
    if fd_link(pid, fd) != TAG_LINK:
        return None
    try:
        with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
            raw = f.read(TAG_SIZE)
        tag = json.loads(raw.rstrip(b" \0") or b"{}")
    except (OSError, ValueError):
        return {}
    return tag if isinstance(tag, dict) else {}


def write_tag(pid: int, fd: int, tag: dict) -> None:
    """Replace the tag's content in one pwrite (never truncated first)."""
    raw = json.dumps(tag, sort_keys=True).encode()
    if len(raw) > TAG_SIZE:
        raise ValueError("tracking tag too large")
    wfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(wfd, raw.ljust(TAG_SIZE), 0)
    finally:
        os.close(wfd)


@dataclass(frozen=True)
class Parked:
    tag_fd: int
    tag: dict
    uffd_fd: int = -1       # -1: none (soft-dirty), or not named and not found


def _uffd_of(pid: int, tag_fd: int, tag: dict) -> int:
    named = tag.get("uffd", -1)
    if isinstance(named, int) and fd_link(pid, named) == UFFD_LINK:
        return named
    if fd_link(pid, tag_fd + 1) == UFFD_LINK:
        return tag_fd + 1
    return -1


def find_parked(pid: int, tracker: str | None = None) -> Parked | None:
    """The engine state parked in ``pid`` (the first intact tag, of
    ``tracker`` if given), or None."""
    for fd in _fds(pid):
        tag = read_tag(pid, fd)
        if not tag:
            continue
        if tracker is not None and tag.get("tracker", "uffd-wp") != tracker:
            continue
        return Parked(fd, tag, _uffd_of(pid, fd, tag))
    return None


def engine_fds(pid: int) -> set[int]:
    """Every fd of ``pid`` that a checkpoint engine parked there (tags, and
    the uffds they name or sit below), whichever engine or chain did it."""
    out: set[int] = set()
    for fd in _fds(pid):
        tag = read_tag(pid, fd)
        if tag is None:
            continue
        out.add(fd)
        uffd = _uffd_of(pid, fd, tag)
        if uffd >= 0:
            out.add(uffd)
    return out


def high_fd_base(pid: int) -> int:
    """Park near the top of the target's RLIMIT_NOFILE, out of its way."""
    soft = 1024
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    v = line.split()[3]
                    soft = int(v) if v.isdigit() else 1 << 20
    except OSError:
        pass
    return max(3, min(soft, 1 << 20) - 64)


def create_tag(remote, tag: dict) -> int:
    """Park a new tag memfd in the target behind ``remote`` (an Injector) at
    a high fd, holding ``tag``; returns its fd number there."""
    pid = remote.proc.pid
    remote.write(remote.scratch, TAG_NAME.encode() + b"\0")
    mfd = remote.call("memfd_create", remote.scratch, MFD_CLOEXEC)
    try:
        fd = remote.call("fcntl", mfd, F_DUPFD_CLOEXEC, high_fd_base(pid))
    finally:
        remote.syscall("close", mfd)
    write_tag(pid, fd, tag)
    return fd


class TagState:
    """Mixin for trackers whose state lives in the target: the chain token,
    the round counter and the tag fd, checked and advanced as the module
    docstring says. The round counter only grows, so a lost round never
    matches a later one."""

    name: str
    token: str
    round: int
    tag_fd: int
    _in_flight: bool

    def _init_tag(self) -> None:
        import secrets
        self.token = secrets.token_hex(8)
        self.round = 0          # the round of the newest layer (or of the one being made)
        self.tag_fd = -1
        self._in_flight = False  # this round advanced the tag already

    def _tag(self) -> dict:
        return {"tracker": self.name, "token": self.token, "round": self.round}

    def _check_tag(self, pid: int) -> str | None:
        """Why the parked tag does not match this chain, or None."""
        tag = read_tag(pid, self.tag_fd) if self.tag_fd >= 0 else None
        if tag is None:
            return "tracking state lost: the target no longer holds the parked tracking fds"
        if tag.get("token") != self.token:
            return "tracking taken over by another engine or chain (token differs)"
        if tag.get("round") != self.round:
            return (f"tracking state is at round {tag.get('round')}, this chain at {self.round}"
                    " (a round that was not published, or another engine's round)")
        return None

    def _advance(self, pid: int) -> None:
        """Mark this round in flight in the target; call before the first
        step that clears dirty information."""
        if self._in_flight:
            return
        self.round += 1
        write_tag(pid, self.tag_fd, self._tag())
        self._in_flight = True

    def _park_new_tag(self, remote) -> None:
        """A fresh tag for this chain, already marking this round in flight."""
        self.round += 1
        self.tag_fd = create_tag(remote, self._tag())
        self._in_flight = True

    def _tag_state(self) -> dict:
        return {"token": self.token, "round": self.round, "tag_fd": self.tag_fd}

    def _load_tag_state(self, d: dict) -> None:
        self.token, self.round, self.tag_fd = str(d["token"]), int(d["round"]), int(d["tag_fd"])
