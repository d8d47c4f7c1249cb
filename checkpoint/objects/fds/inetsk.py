"""TCP and UDP sockets that hold no connection: a TCP socket new, bound or
listening (an idle server: no connection waiting to be accepted), a UDP
socket bound or connected with no datagram unread; IPv4 and IPv6 (CRIU's
sk-inet.c; established TCP connections need TCP_REPAIR and a network lock,
and are refused by name here for now).

dump: getsockname/getpeername and the options below by getsockopt on the
engine's own copy (pidfd_getfd); sock_diag (inet_diag) for a listener's
backlog and the connections waiting in its accept queue; the unread bytes
of a UDP socket by FIONREAD.

restore: socket(2), bind(2) to the dumped address with SO_REUSEADDR on for
the bind alone (a dumped connection may linger in TIME_WAIT on the port)
and listen(2) with the backlog, injected in the placeholder with the dumped
credentials (a port below 1024 needs their CAP_NET_BIND_SERVICE); then the
options, connect(2) for a connected UDP socket.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import termios

from ...images.pb import files_pb2
from ...kernel import sockdiag
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
               ("SOL_TCP", SOL_TCP, "TCP_DEFER_ACCEPT", socket.TCP_DEFER_ACCEPT)]
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
        why = _unsupported(s, info, stype)
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
        if stype == socket.SOCK_DGRAM:
            try:
                peer = s.getpeername()
                n.peer_addr = socket.inet_pton(family, peer[0].split("%")[0])
                n.peer_port = peer[1]
            except OSError:
                pass
        for lname, level, oname, opt in _options_of(n):
            n.options[f"{lname}.{oname}"] = s.getsockopt(level, opt)
        n.rcvtimeo_us, n.sndtimeo_us = _timeo(s, SO_RCVTIMEO), _timeo(s, SO_SNDTIMEO)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).strip(b"\0"):
            return refuse(e, "socket", "a socket", "sockets bound to a device",
                          ctx.external, ", bound to a device (SO_BINDTODEVICE)")
        return e
    finally:
        if s is not None:
            s.close()


def _options_of(n):
    out = list(OPTIONS)
    if n.protocol == socket.IPPROTO_TCP:
        out += TCP_OPTIONS
    if n.family == socket.AF_INET6:
        out += V6_OPTIONS
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
    fd = R.fresh(R.call("socket", n.family, n.type | socket.SOCK_CLOEXEC, n.protocol, it=it))
    copy = R.own_copy(fd)
    try:
        with socket.socket(fileno=copy) as s:
            if n.family == socket.AF_INET6 and "IPPROTO_IPV6.IPV6_V6ONLY" in n.options:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                             n.options["IPPROTO_IPV6.IPV6_V6ONLY"])
            if n.addr:
                # for the bind alone: a dumped connection may linger in TIME_WAIT
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
                    raise R.fail(it, f"bind to {ip} port {n.port}: {os.strerror(-res)}{hint}")
            for lname, level, oname, opt in _options_of(n):
                key = f"{lname}.{oname}"
                if key not in n.options or key == "IPPROTO_IPV6.IPV6_V6ONLY":
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
            for opt, us in ((SO_RCVTIMEO, n.rcvtimeo_us), (SO_SNDTIMEO, n.sndtimeo_us)):
                if us:
                    s.setsockopt(socket.SOL_SOCKET, opt, TIMEVAL.pack(*divmod(us, 1_000_000)))
    except OSError as exc:
        raise R.fail(it, f"socket options: {exc.strerror or exc}") from None
    if n.listening:
        R.call("listen", fd, min(n.backlog, 1 << 16), it=it)
    if n.peer_addr:
        sa = _sockaddr(n.family, n.peer_addr, n.peer_port, n.scope_id)
        R.r.write(R.r.scratch + 2048, sa)
        R.call("connect", fd, R.r.scratch + 2048, len(sa), it=it)
    R.setfl(fd, it)
    R.place(fd, it)


KIND = FdKind("TCP or UDP socket", (files_pb2.FD_INET_SOCKET,), claims, dump, restore)
