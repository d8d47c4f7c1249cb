"""The network lock: packets of dumped TCP connections are dropped, not reset.

Between the dump of an established TCP connection (its socket put in
TCP_REPAIR mode, the process killed) and its restore, no socket owns the
connection's 4-tuple: a segment from the peer would be answered with an RST
and the peer would give the connection up. The lock makes the kernel drop
those segments instead; the peer retransmits, and once the restored socket
is back and the lock released, TCP's retransmission carries on as if the
link had been down for a while.

One lock is one nftables table of family ``inet``, ``checkpoint_<id>``, in
the network namespace of the calling thread (setns before to lock another
one), made in one atomic transaction::

    table inet checkpoint_1a2b3c4d5e6f {
        comment "checkpoint netlock v1 owner=PID:START pidns=INO conns=DIGEST"
        set in4 {                  # what the sockets receive: saddr . sport . daddr . dport
            type ipv4_addr . inet_service . ipv4_addr . inet_service
            elements = { R . RP . L . LP, ... }
        }
        set out4 { ... L . LP . R . RP, ... }      # what they send
        chain input {
            type filter hook input priority -350; policy accept;
            ip saddr . tcp sport . ip daddr . tcp dport @in4 counter drop
        }
        chain output {
            type filter hook output priority -350; policy accept;
            ip saddr . tcp sport . ip daddr . tcp dport @out4 counter drop
        }
    }

and ``in6``/``out6`` with ``ip6`` rules when there are IPv6 connections (an
IPv6 socket with IPv4-mapped addresses sends IPv4: it goes in the ``4``
sets). L:LP is the dumped socket's own address and port, R:RP its peer's.
One set lookup per packet whatever the number of connections, and a lock
of 1000 connections is made 3-4 times faster than with a rule each (2000
rules: 37 ms, sets: 9 ms). Both hooks are needed: a peer on another host
reaches the socket through input, and on one host (loopback) a live peer's
segments cross output and then input, where ``in`` drops them; ``out``
drops what a socket of the lock would send (the restored one before the
release). Input and output (not prerouting and postrouting) see the
addresses the socket itself sees, after destination NAT and before source
NAT; priority -350 runs before conntrack's output hook (-200) and before
the raw (-300), mangle and filter chains of iptables and of most nftables
rule sets, so no other rule answers those segments first. The counters say
how many segments the lock dropped (``nft list table inet NAME``).

The comment records the owner, the engine process that made the lock (its
PID, its start time in clock ticks, its PID namespace), and a digest of the
sets' elements. A dump that succeeds **hands the lock over** to its image
(:meth:`NetLock.hand_over` adds an empty regular chain ``handed_over``
whose comment names the image; the image records the table name): the lock
then outlives the engine until the restore removes it with
:func:`release_lock`. :func:`sweep` removes the locks of the current
network namespace whose owner died before handing over (an engine killed
mid-dump); a lock handed over, one whose owner lives, one recorded in
another PID namespace (its PID means nothing here) and any table not made
by this module are left alone.

API::

    Conn(family, laddr, lport, raddr, rport)     # one connection, as its socket sees it
    lock(conns, owner=None, name=None) -> NetLock
    NetLock.name, .owner, .conns, .handed_over
    NetLock.hand_over(image="")                  # keep it for the restore
    NetLock.release()                            # same as release_lock(name)
    with lock(conns) as lk: ...                  # released on exit unless handed over
    release_lock(name)                           # a table already gone is not an error
    sweep() -> list[str]                         # names of the stale locks removed
    close()                                      # free the cached libnftables context

``lock`` is idempotent: a table of that name with the same connections is
the same lock (a retried dump does not fail on "File exists"); a dead
owner's is taken over, atomically. A table of that name with other
connections is an error.

nftables is driven through libnftables (``libnftables.so.1``) by ctypes, or
by ``nft -f -`` when the library cannot be loaded: a lock of one
connection costs 0.5-1 ms and a release 0.3-0.4 ms through the library,
against ~3.5 and ~13 ms through the command (tools/bench/bench_netlock.py).
The library's context is kept for the next call in the same network
namespace: its netlink socket belongs to the namespace it was made in, and
closing a netlink socket right after a table was deleted waits for an RCU
grace period (~10-20 ms) that a kept socket never waits for. ``close()`` frees it (the socket pins its network
namespace: a caller about to delete a namespace it locked in calls it). The
library opens that socket inheritable; it is made close-on-exec at once, so
no process the engine starts holds it.

Errors: :class:`~checkpoint.errors.NetLockError`, one line naming the lock
and nft's own error text; no nftables at all is a
:class:`~checkpoint.errors.KernelFeatureError` naming the package.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Iterable

from .errors import KernelFeatureError, NetLockError

PREFIX = "checkpoint_"
NAME_RE = re.compile(r"checkpoint_[0-9a-z]{1,32}")
PRIORITY = -350
_MARK = "checkpoint netlock v1"
_COMMENT_RE = re.compile(
    r"checkpoint netlock v1 owner=(\d+):(\d+) pidns=(\d+) conns=([0-9a-f]{16})")
_IMAGE_UNSAFE = re.compile(r"[^A-Za-z0-9 ._/:@+=,-]")
_MAPPED = b"\0" * 10 + b"\xff\xff"


@dataclass(frozen=True)
class Conn:
    """One established TCP connection, as its socket sees it: ``family``
    ``socket.AF_INET`` (4-byte addresses) or ``AF_INET6`` (16 bytes);
    ``laddr``/``lport`` the socket's own address and port, ``raddr``/``rport``
    its peer's."""

    family: int
    laddr: bytes
    lport: int
    raddr: bytes
    rport: int

    def __post_init__(self):
        size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(self.family)
        if size is None:
            raise NetLockError(f"network lock: address family {self.family} is not IPv4 or IPv6")
        for what, addr, port in (("local", self.laddr, self.lport),
                                 ("remote", self.raddr, self.rport)):
            if not isinstance(addr, bytes) or len(addr) != size:
                raise NetLockError(f"network lock: {what} address {addr!r} is not "
                                   f"{size} bytes")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise NetLockError(f"network lock: {what} port {port!r} is not 1-65535")
        if (self.family == socket.AF_INET6
                and self.laddr.startswith(_MAPPED) != self.raddr.startswith(_MAPPED)):
            raise NetLockError("network lock: an IPv6 connection with one IPv4-mapped "
                               "address and one not")

    def elements(self) -> tuple[str, str, str]:
        """("4" or "6", the input element, the output element): the
        ``saddr . sport . daddr . dport`` of the segments this connection
        receives and of those it sends."""
        if self.family == socket.AF_INET6 and self.laddr.startswith(_MAPPED):
            v, l, r = "4", self.laddr[12:], self.raddr[12:]
        else:
            v, l, r = ("4" if self.family == socket.AF_INET else "6"), self.laddr, self.raddr
        la, ra = ipaddress.ip_address(l).compressed, ipaddress.ip_address(r).compressed
        return (v, f"{ra} . {self.rport} . {la} . {self.lport}",
                f"{la} . {self.lport} . {ra} . {self.rport}")


@dataclass(frozen=True)
class _Owner:
    pid: int
    start: int      # field 22 of /proc/PID/stat: a reused PID has another
    pidns: int      # inode of the PID namespace the PID is counted in

    @classmethod
    def of(cls, pid: int) -> _Owner | None:
        start = _start_time(pid)
        return None if start is None else cls(pid, start, _pidns())

    def dead(self) -> bool:
        """Known to be dead: a PID of our PID namespace that is gone, a
        zombie or another process now. One of another namespace is not
        known to be anything."""
        return self.pidns == _pidns() and _start_time(self.pid) != self.start


def _start_time(pid: int) -> int | None:
    """The start time of a live (not zombie) process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _netns() -> int:
    """The calling thread's network namespace (setns(2) is per thread)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@dataclass
class NetLock:
    """A lock that exists (``lock`` made or found it). ``owner`` is the PID
    recorded in it."""

    name: str
    owner: int
    conns: tuple[Conn, ...]
    handed_over: bool = False
    netns: int = field(default_factory=lambda: _netns(), repr=False)

    def hand_over(self, image: str = "") -> None:
        """Keep the lock after this engine exits, for the restore of ``image``
        (a note for whoever lists the table: the image records the name)."""
        self._here()
        note = _IMAGE_UNSAFE.sub("_", f"image {image}" if image else "image")[:120]
        try:
            _nft().run(f'add chain inet {self.name} handed_over {{ comment "{note}"; }}\n')
        except NetLockError as exc:
            raise NetLockError(f"network lock {self.name}: cannot hand it over: "
                               f"{exc.args[0]}") from None
        self.handed_over = True

    def release(self) -> None:
        """Remove the lock (also when handed over)."""
        self._here("released")
        release_lock(self.name)

    def _here(self, verb: str = "handed over") -> None:
        """Both methods work in the calling thread's network namespace: it
        must be the lock's."""
        if _netns() != self.netns:
            raise NetLockError(f"network lock {self.name}: made in network namespace "
                               f"net:[{self.netns}], {verb} from net:[{_netns()}]")

    def __enter__(self) -> NetLock:
        return self

    def __exit__(self, *exc) -> None:
        if not self.handed_over:
            self.release()


@dataclass(frozen=True)
class _Table:
    """A ``checkpoint_*`` table as listed: its handle, and what its comment
    and chains say (None when it is not one of ours)."""

    handle: int
    owner: _Owner | None
    digest: str | None
    handed_over: bool


def lock(conns: Iterable[Conn], owner: int | None = None, name: str | None = None) -> NetLock:
    """Drop every packet of ``conns`` (at least one) in the calling thread's
    network namespace until released. ``owner``: the engine process the lock
    belongs to (default: this one); ``name``: the table's (default: a new
    ``checkpoint_`` + 12 hex digits)."""
    conns = tuple(dict.fromkeys(conns))
    if not conns:
        raise ValueError("lock() needs at least one connection")
    name = _checked(name) if name is not None else PREFIX + secrets.token_hex(6)
    pid = os.getpid() if owner is None else owner
    who = _Owner.of(pid)
    if who is None:
        raise NetLockError(f"network lock {name}: owner process {pid} does not exist")
    body, digest = _table_text(name, conns)
    nft = _nft()
    try:
        nft.run(f"create table inet {name} {{ {_comment(who, digest)} }}\n" + body)
        return NetLock(name, pid, conns)
    except NetLockError as exc:
        failure = exc.args[0]
    try:
        table = _read(nft, name)
    except NetLockError:
        table = None
    if table is None:
        raise NetLockError(f"network lock {name}: cannot make the table: {failure}")
    if table.digest != digest:
        raise NetLockError(f"network lock {name}: a table of that name exists with other "
                           f"connections (remove it with: nft delete table inet {name})")
    if table.handed_over or not table.owner.dead():
        return NetLock(name, table.owner.pid, conns, table.handed_over)
    try:   # its owner died: take it over, with no instant unlocked
        nft.run(f"delete table inet handle {table.handle}\n"
                f"add table inet {name} {{ {_comment(who, digest)} }}\n" + body)
    except NetLockError as exc:
        raise NetLockError(f"network lock {name}: cannot take over the table of dead "
                           f"process {table.owner.pid}: {exc.args[0]}") from None
    return NetLock(name, pid, conns)


def release_lock(name: str) -> None:
    """Remove lock ``name`` from the calling thread's network namespace; a
    lock already gone is not an error."""
    _checked(name)
    try:   # add first: the transaction never fails on a table already gone
        _nft().run(f"add table inet {name}\ndelete table inet {name}\n")
    except NetLockError as exc:
        raise NetLockError(f"network lock {name}: cannot remove it: {exc.args[0]}") from None


def sweep() -> list[str]:
    """Remove the stale locks of the calling thread's network namespace
    (owner dead, never handed over); return their names."""
    nft = _nft()
    try:
        listing = nft.run("list tables inet\n")
    except NetLockError as exc:
        raise NetLockError(f"network lock sweep: cannot list the tables: {exc.args[0]}") from None
    names = re.findall(r"^table inet (checkpoint_[0-9a-z]{1,32})$", listing, re.M)
    removed = []
    for name in names:
        table = _read(nft, name)
        if table is None or table.owner is None or table.handed_over or not table.owner.dead():
            continue
        try:   # by handle: a table taken over meanwhile is another one
            nft.run(f"delete table inet handle {table.handle}\n")
        except NetLockError as exc:
            now = _read(nft, name)
            if now is not None and now.handle == table.handle:
                raise NetLockError(f"network lock {name}: cannot remove this stale lock: "
                                   f"{exc.args[0]}") from None
            continue
        removed.append(name)
    return removed


def close() -> None:
    """Free the cached libnftables context (and its netlink socket)."""
    with _cache_lock:
        backend = _cache.get("backend")
        if isinstance(backend, Libnftables):
            backend.close()


def _checked(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise NetLockError(f"network lock: {name!r} is not a lock name "
                           f"(checkpoint_ and 1-32 lowercase letters or digits)")
    return name


def _comment(who: _Owner, digest: str) -> str:
    return (f'comment "{_MARK} owner={who.pid}:{who.start} pidns={who.pidns} '
            f'conns={digest}";')


def _table_text(name: str, conns: tuple[Conn, ...]) -> tuple[str, str]:
    """Everything of the table but itself, and the digest of what it drops."""
    found: dict[str, set[str]] = {}
    for c in conns:
        v, inp, out = c.elements()
        found.setdefault(f"in{v}", set()).add(inp)
        found.setdefault(f"out{v}", set()).add(out)
    sets = sorted((set_name, sorted(elements)) for set_name, elements in found.items())
    lines = [f"add chain inet {name} {hook} {{ type filter hook {hook} priority {PRIORITY}; "
             f"policy accept; }}" for hook in ("input", "output")]
    for set_name, elements in sets:
        ip, addr = ("ip", "ipv4_addr") if set_name.endswith("4") else ("ip6", "ipv6_addr")
        hook = "input" if set_name.startswith("in") else "output"
        lines += [f"add set inet {name} {set_name} {{ type {addr} . inet_service . {addr} . "
                  f"inet_service; }}",
                  f"add rule inet {name} {hook} {ip} saddr . tcp sport . {ip} daddr . "
                  f"tcp dport @{set_name} counter drop",
                  f"add element inet {name} {set_name} {{ {', '.join(elements)} }}"]
    digest = hashlib.sha256(repr(sets).encode()).hexdigest()[:16]
    return "\n".join(lines) + "\n", digest


def _read(nft, name: str) -> _Table | None:
    """The table ``name`` as listed now, None if there is none."""
    try:
        text = nft.run(f"list table inet {name}\n", handles=True)
    except NetLockError as exc:
        failure = exc.args[0]
        try:   # one more listing tells a table that is gone from nft failing
            gone = name not in re.findall(r"^table inet (\S+)$", nft.run("list tables inet\n"),
                                          re.M)
        except NetLockError:
            gone = False
        if gone:
            return None
        raise NetLockError(f"network lock {name}: cannot list it: {failure}") from None
    head = re.search(r"^table inet \S+ \{ # handle (\d+)$", text, re.M)
    if head is None:
        raise NetLockError(f"network lock {name}: cannot read nft's listing of it")
    m = _COMMENT_RE.search(text)
    owner = _Owner(int(m[1]), int(m[2]), int(m[3])) if m else None
    return _Table(int(head[1]), owner, m[4] if m else None,
                  re.search(r"^\tchain handed_over \{", text, re.M) is not None)


class Libnftables:
    """nftables through libnftables.so.1 (ctypes). One context is kept, for
    the network namespace and the process it was made in."""

    NFT_CTX_OUTPUT_HANDLE = 1 << 3     # nftables/libnftables.h

    def __init__(self):
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib
        self.ctx = None
        self.key = None
        self.lock = threading.Lock()

    def _context(self):
        key = (os.getpid(), _netns())
        if self.ctx is not None and self.key != key:
            if self.key[0] == key[0]:
                self.lib.nft_ctx_free(self.ctx)
            self.ctx = None   # a forked child leaves its parent's context alone
        if self.ctx is None:
            if not _has_net_admin():   # the library would print its complaint on stderr
                raise NetLockError("nft: Operation not permitted (CAP_NET_ADMIN is needed)")
            before = _sockets()
            ctx = self.lib.nft_ctx_new(0)
            if not ctx or self.lib.nft_ctx_buffer_output(ctx) or self.lib.nft_ctx_buffer_error(ctx):
                if ctx:
                    self.lib.nft_ctx_free(ctx)
                raise NetLockError("network lock: libnftables could not make a context")
            _set_cloexec(_sockets().items() - before.items())
            self.ctx, self.key = ctx, key
        return self.ctx

    def run(self, text: str, handles: bool = False) -> str:
        with self.lock:
            ctx = self._context()
            flags = self.lib.nft_ctx_output_get_flags(ctx)
            want = (flags | self.NFT_CTX_OUTPUT_HANDLE if handles
                    else flags & ~self.NFT_CTX_OUTPUT_HANDLE)
            if want != flags:
                self.lib.nft_ctx_output_set_flags(ctx, want)
            rc = self.lib.nft_run_cmd_from_buffer(ctx, text.encode())
            out = self.lib.nft_ctx_get_output_buffer(ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(ctx) or b""
        if rc != 0:
            raise NetLockError(_first_error(err.decode(errors="replace")))
        return out.decode(errors="replace")

    def close(self) -> None:
        with self.lock:
            if self.ctx is not None and self.key[0] == os.getpid():
                self.lib.nft_ctx_free(self.ctx)
            self.ctx = self.key = None


def _sockets() -> dict[int, str]:
    """This process's socket fds and their inodes."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue      # the listing's own fd, or one closed meanwhile
        if link.startswith("socket:"):
            out[int(fd)] = link
    return out


def _set_cloexec(new: Iterable[tuple[int, str]]) -> None:
    """libnftables opens its netlink socket without O_CLOEXEC (1.0.6): a
    process the engine starts must not inherit it. Only the new netfilter
    netlink sockets are touched."""
    for fd, _ in new:
        try:
            with socket.socket(fileno=os.dup(fd)) as s:
                ours = s.family == socket.AF_NETLINK and s.proto == 12   # NETLINK_NETFILTER
            if ours:
                fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError:
            continue


def _has_net_admin() -> bool:
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> 12 & 1)    # CAP_NET_ADMIN


class NftCommand:
    """nftables through the ``nft`` command, ``nft -f -`` per call."""

    def __init__(self, path: str):
        self.path = path

    def run(self, text: str, handles: bool = False) -> str:
        argv = [self.path, *(["-a"] if handles else []), "-f", "-"]
        try:
            res = subprocess.run(argv, input=text, capture_output=True, text=True,
                                 env={**os.environ, "LC_ALL": "C"}, errors="replace")
        except OSError as exc:
            raise NetLockError(f"cannot run {self.path}: {exc.strerror}") from None
        if res.returncode != 0:
            raise NetLockError(_first_error(res.stderr))
        return res.stdout


def _first_error(text: str) -> str:
    """nft's first error line, without the input line and caret it quotes."""
    for line in text.splitlines():
        if "Error:" in line:
            return "nft: " + line[line.index("Error:"):].strip()
    return "nft: " + (text.strip().splitlines() or ["failed, saying nothing"])[0]


_cache: dict = {}
_cache_lock = threading.Lock()


def _nft():
    """The nftables backend: libnftables, else the nft command."""
    with _cache_lock:
        backend = _cache.get("backend")
        if backend is None:
            try:
                backend = Libnftables()
            except (OSError, AttributeError):
                path = shutil.which("nft") or next(
                    (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
                if path is None:
                    raise KernelFeatureError(
                        "the network lock needs nftables (libnftables.so.1 or the nft "
                        "command): install the nftables package") from None
                backend = NftCommand(path)
            _cache["backend"] = backend
        return backend
