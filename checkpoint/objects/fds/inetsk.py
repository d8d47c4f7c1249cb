"""TCP and UDP sockets, IPv4 and IPv6 (CRIU's sk-inet.c): a TCP socket new,
bound or listening (an idle server: no connection waiting to be accepted),
a TCP connection with ``--tcp-established`` (tcpsk.py: TCP_REPAIR under a
network lock) or ``--tcp-close``, a UDP socket bound or connected with no
datagram unread.

dump: getsockname/getpeername and the options below by getsockopt on the
engine's own copy (pidfd_getfd); sock_diag (inet_diag) for a listener's
backlog and the connections waiting in its accept queue; the unread bytes
of a UDP socket by FIONREAD.

restore: socket(2), bind(2) to the dumped address with SO_REUSEADDR on for
the bind alone (a dumped connection may linger in TIME_WAIT on the port)
and listen(2) with the backlog, injected in the placeholder with the dumped
credentials (a port below 1024 needs their CAP_NET_BIND_SERVICE); then the
options, connect(2) for a connected UDP socket. A TCP connection is bound
in repair mode (it shares its port with the restored listener) and made by
tcpsk.load on the engine's copy.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import termios

from ...errors import CheckpointError, UnsupportedObject
from ...images.pb import files_pb2
from ...kernel import sockdiag
from . import tcpsk
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, refuse

SO_DOMAIN, SO_PROTOCOL, SO_ACCEPTCONN = 39, 38, 30
TCP_LISTEN, TCP_CLOSE = 10, 7
SOL_TCP = socket.IPPROTO_TCP
TIMEVAL = struct.Struct("=qq")
SO_RCVTIMEO, SO_SNDTIMEO = 20, 21
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
# (level name, level, option name, option): the options restored
OPTIONS = [
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_REUSEADDR", socket.SO_REUSEADDR),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_REUSEPORT", socket.SO_REUSEPORT),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_KEEPALIVE", socket.SO_KEEPALIVE),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_BROADCAST", socket.SO_BROADCAST),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_RCVBUF", socket.SO_RCVBUF),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_SNDBUF", socket.SO_SNDBUF),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_PRIORITY", 12),
    ("SOL_SOCKET", socket.SOL_SOCKET, "SO_MARK", 36),
]
TCP_OPTIONS = [("SOL_TCP", SOL_TCP, "TCP_NODELAY", socket.TCP_NODELAY),
               ("SOL_TCP", SOL_TCP, "TCP_DEFER_ACCEPT", socket.TCP_DEFER_ACCEPT),
               ("SOL_TCP", SOL_TCP, "TCP_CORK", socket.TCP_CORK),
               ("SOL_TCP", SOL_TCP, "TCP_KEEPIDLE", socket.TCP_KEEPIDLE),
               ("SOL_TCP", SOL_TCP, "TCP_KEEPINTVL", socket.TCP_KEEPINTVL),
               ("SOL_TCP", SOL_TCP, "TCP_KEEPCNT", socket.TCP_KEEPCNT),
               ("SOL_TCP", SOL_TCP, "TCP_USER_TIMEOUT", 18),
               ("SOL_TCP", SOL_TCP, "TCP_NOTSENT_LOWAT", 25),
               ("SOL_SOCKET", socket.SOL_SOCKET, "SO_OOBINLINE", socket.SO_OOBINLINE),
               ("SOL_SOCKET", socket.SOL_SOCKET, "SO_RCVLOWAT", socket.SO_RCVLOWAT)]
V4_OPTIONS = [("IPPROTO_IP", socket.IPPROTO_IP, "IP_TOS", socket.IP_TOS),
              ("IPPROTO_IP", socket.IPPROTO_IP, "IP_TTL", socket.IP_TTL)]
LINGER = struct.Struct("=ii")
V6_OPTIONS = [("IPPROTO_IPV6", socket.IPPROTO_IPV6, "IPV6_V6ONLY", socket.IPV6_V6ONLY)]
FAMILIES = (socket.AF_INET, socket.AF_INET6)


def claims(p: Probe) -> bool:
    return p.kind == "socket"


def _diag(ctx: DumpCtx, family: int, protocol: int) -> dict:
    cache = getattr(ctx, "_inet_diag", None)
    if cache is None:
        cache = ctx._inet_diag = {}
    key = (family, protocol)
    if key not in cache:
        cache[key] = sockdiag.inet_sockets(family, protocol)
    return cache[key]


def dump(ctx: DumpCtx, p: Probe):
    from . import refused, unixsk
    s = socket.socket(fileno=ctx.getfd(p.fd))
    try:
        family = s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
        if family == socket.AF_UNIX:
            s.close()
            s = None
            return unixsk.dump(ctx, p)
        if family == socket.AF_NETLINK:
            from . import nlsk
            return nlsk.dump(ctx, p, s)
        stype = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        proto = s.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL)
        if family not in FAMILIES or (stype, proto) not in (
                (socket.SOCK_STREAM, socket.IPPROTO_TCP), (socket.SOCK_DGRAM, socket.IPPROTO_UDP)):
            return refused.dump(ctx, p)
        info = _diag(ctx, family, proto).get(p.st.st_ino)
        if info is None and stype == socket.SOCK_STREAM and not s.getsockname()[1]:
            info = sockdiag.InetInfo(p.st.st_ino, family, TCP_CLOSE, 0, 0)  # new: in no table
        connected = stype == socket.SOCK_STREAM and info is not None and \
            info.state in tcpsk.TCP_CONNECTED
        why = "" if connected else _unsupported(s, info, stype)
        if why:
            return refuse(p.e, "socket", "a socket", "TCP connections and UDP sockets with "
                          "unread data", ctx.external, f", {why}")
        e = p.e
        e.type = files_pb2.FD_INET_SOCKET
        n = e.inet
        n.family, n.type, n.protocol = family, stype, proto
        addr = s.getsockname()
        if addr[1]:
            n.addr = socket.inet_pton(family, addr[0].split("%")[0])
            n.port = addr[1]
            if family == socket.AF_INET6:
                n.scope_id = addr[3]
        n.listening = bool(s.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN))
        n.backlog = info.wqueue if n.listening else 0
        if stype == socket.SOCK_DGRAM or connected:
            try:
                peer = s.getpeername()
                n.peer_addr = socket.inet_pton(family, peer[0].split("%")[0])
                n.peer_port = peer[1]
            except OSError:
                pass
        for lname, level, oname, opt in _options_of(n):
            n.options[f"{lname}.{oname}"] = s.getsockopt(level, opt)
        n.rcvtimeo_us, n.sndtimeo_us = _timeo(s, SO_RCVTIMEO), _timeo(s, SO_SNDTIMEO)
        onoff, linger = LINGER.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   LINGER.size))
        if onoff:
            n.options["SOL_SOCKET.SO_LINGER"] = linger
        if proto == socket.IPPROTO_TCP:
            n.congestion = s.getsockopt(SOL_TCP, socket.TCP_CONGESTION, 16) \
                .split(b"\0")[0].decode("ascii", "replace")
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).strip(b"\0"):
            return refuse(e, "socket", "a socket", "sockets bound to a device",
                          ctx.external, ", bound to a device (SO_BINDTODEVICE)")
        if connected:
            return _connection(ctx, p, s, n, info.state)
        return e
    finally:
        if s is not None:
            s.close()


def _connection(ctx: DumpCtx, p: Probe, s: socket.socket, n, state: int):
    """A TCP connection: by --tcp-established (locked and repaired, tcpsk)
    or --tcp-close (recorded closed), else refused naming both."""
    e = p.e
    mode = ctx.tcp.mode if ctx.tcp is not None else None
    if mode is None:
        if ctx.external:
            return refuse(e, "socket", "a TCP connection", "", True)
        raise UnsupportedObject(
            f"fd {e.fd} is a TCP connection ({e.path}) {tcpsk.describe(n)}, "
            f"{tcpsk.STATE_NAMES.get(state, state)}: pass --tcp-established to restore it "
            "(TCP_REPAIR; its packets are dropped until the restore), --tcp-close to "
            "restore it closed, or --external-fds to leave it to the restore side")
    if mode == "close":
        n.tcp.state, n.tcp.closed = state, True
        return e
    try:
        ctx.tcp.add(s, n, e)
    except OSError as exc:
        raise CheckpointError(f"fd {e.fd} ({e.path}): the TCP connection "
                              f"{tcpsk.describe(n)}: {exc.strerror or exc}") from None
    return e


def _options_of(n):
    out = list(OPTIONS)
    if n.protocol == socket.IPPROTO_TCP:
        out += TCP_OPTIONS
    if n.family == socket.AF_INET6:
        out += V6_OPTIONS
    else:
        out += V4_OPTIONS
    return out


def _unsupported(s: socket.socket, info, stype: int) -> str:
    if info is None:
        return "which sock_diag does not show (another network namespace?)"
    if stype == socket.SOCK_STREAM:
        if info.state == TCP_LISTEN:
            return f"listening with {info.rqueue} connection(s) waiting to be accepted" \
                if info.rqueue else ""
        if info.state != TCP_CLOSE:
            return "connected (established TCP connections are not supported yet)"
        return ""
    unread = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return f"with {unread} unread bytes" if unread else ""


def _timeo(s: socket.socket, opt: int) -> int:
    sec, usec = TIMEVAL.unpack(s.getsockopt(socket.SOL_SOCKET, opt, TIMEVAL.size))
    return sec * 1_000_000 + usec


def _sockaddr(family: int, addr: bytes, port: int, scope: int) -> bytes:
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H", port) + addr + bytes(8)
    return struct.pack("=H", family) + struct.pack("!H", port) + bytes(4) + addr + \
        struct.pack("=I", scope)


def restore(R: RestoreCore, it: Item) -> None:
    n = it.e.inet
    if n.family not in FAMILIES or (n.type, n.protocol) not in (
            (socket.SOCK_STREAM, socket.IPPROTO_TCP), (socket.SOCK_DGRAM, socket.IPPROTO_UDP)):
        raise R.fail(it, f"socket of family {n.family}, type {n.type}, protocol {n.protocol}")
    size = 4 if n.family == socket.AF_INET else 16
    for a in (n.addr, n.peer_addr):
        if a and len(a) != size:
            raise R.fail(it, f"address of {len(a)} bytes for family {n.family}")
    conn = n.HasField("tcp") and not n.tcp.closed
    if n.HasField("tcp") and (n.type != socket.SOCK_STREAM or n.listening or conn and (
            not n.addr or not n.peer_addr or not n.port or not n.peer_port)):
        raise R.fail(it, "a TCP connection without its two addresses, or not a stream")
    fd = R.fresh(R.call("socket", n.family, n.type | socket.SOCK_CLOEXEC, n.protocol, it=it))
    copy = R.own_copy(fd)
    try:
        with socket.socket(fileno=copy) as s:
            if n.family == socket.AF_INET6 and "IPPROTO_IPV6.IPV6_V6ONLY" in n.options:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                             n.options["IPPROTO_IPV6.IPV6_V6ONLY"])
            _set_options(s, n)
            if conn:
                # repair mode before the bind: it lets the connection share
                # its port with the listener that accepted it
                s.setsockopt(SOL_TCP, tcpsk.TCP_REPAIR, tcpsk.TCP_REPAIR_ON)
            bind = bool(n.addr) and not (n.HasField("tcp") and n.tcp.closed)
            # a migration's destination: the address comes once the copy runs
            away = bind and R.tcp is not None and R.tcp.transparent
            if away:
                tcpsk.transparent(s, n.family, True)
            try:
                if bind:
                    if not conn:  # for the bind alone: a connection may linger in TIME_WAIT
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    _bind(R, it, fd, n)
                    if not conn:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,
                                     n.options.get("SOL_SOCKET.SO_REUSEADDR", 0))
                if conn:
                    tcpsk.load(s, n, f"fd {it.fd} ({it.e.path})")
                elif n.peer_addr and n.type == socket.SOCK_DGRAM:
                    sa = _sockaddr(n.family, n.peer_addr, n.peer_port, n.scope_id)
                    R.r.write(R.r.scratch + 2048, sa)
                    R.call("connect", fd, R.r.scratch + 2048, len(sa), it=it)
            finally:
                if away:
                    tcpsk.transparent(s, n.family, False)
            if conn:
                R.tcp.add(socket.socket(fileno=os.dup(copy)), n,
                          f"fd {it.fd} ({it.e.path}) {tcpsk.describe(n)}")
            elif not n.addr or n.HasField("tcp"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,
                             n.options.get("SOL_SOCKET.SO_REUSEADDR", 0))
    except OSError as exc:
        what = "the TCP connection " + tcpsk.describe(n) if conn else "socket options"
        raise R.fail(it, f"{what}: {exc.strerror or exc}") from None
    if n.listening:
        R.call("listen", fd, min(n.backlog, 1 << 16), it=it)
    R.setfl(fd, it)
    R.place(fd, it)


def _bind(R: RestoreCore, it: Item, fd: int, n) -> None:
    """bind(2) in the placeholder, with its (the dumped) credentials."""
    sa = _sockaddr(n.family, n.addr, n.port, n.scope_id)
    R.r.write(R.r.scratch + 2048, sa)
    res = R.r.syscall("bind", fd, R.r.scratch + 2048, len(sa))
    if res < 0:
        ip = ipaddress.ip_address(n.addr)
        hint = ""
        if -res == errno.EADDRINUSE:
            hint = (" (another socket holds it, or connections of the dumped "
                    "process still linger on it, TIME_WAIT: the dumped socket "
                    "had no SO_REUSEADDR to share the port with them)")
        elif -res == errno.EADDRNOTAVAIL:
            hint = " (the address is not one of this host's)"
        raise R.fail(it, f"bind to {ip} port {n.port}: {os.strerror(-res)}{hint}")


def _set_options(s: socket.socket, n) -> None:
    for lname, level, oname, opt in _options_of(n):
        key = f"{lname}.{oname}"
        if key not in n.options or key in ("IPPROTO_IPV6.IPV6_V6ONLY",
                                           "SOL_SOCKET.SO_REUSEADDR"):
            continue
        v = n.options[key]
        if oname == "SO_RCVBUF":
            s.setsockopt(level, SO_RCVBUFFORCE, v // 2)
        elif oname == "SO_SNDBUF":
            s.setsockopt(level, SO_SNDBUFFORCE, v // 2)
        elif oname == "TCP_DEFER_ACCEPT":
            if v:   # getsockopt gives it back rounded to retransmits
                s.setsockopt(level, opt, v)
        else:
            s.setsockopt(level, opt, v)
    if "SOL_SOCKET.SO_LINGER" in n.options:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                     LINGER.pack(1, n.options["SOL_SOCKET.SO_LINGER"]))
    if n.congestion and n.protocol == socket.IPPROTO_TCP:
        s.setsockopt(SOL_TCP, socket.TCP_CONGESTION, n.congestion.encode("ascii", "replace"))
    for opt, us in ((SO_RCVTIMEO, n.rcvtimeo_us), (SO_SNDTIMEO, n.sndtimeo_us)):
        if us:
            s.setsockopt(socket.SOL_SOCKET, opt, TIMEVAL.pack(*divmod(us, 1_000_000)))


KIND = FdKind("TCP or UDP socket", (files_pb2.FD_INET_SOCKET,), claims, dump, restore)
