"""NETLINK_SOCK_DIAG for AF_UNIX sockets (include/uapi/linux/unix_diag.h):
what a unix socket is connected to, its name, its pending connections and
its shutdown state, as the kernel knows them (``ss -x`` reads the same).

    info = unix_sockets()        # inode -> UnixInfo, every unix socket of
                                 # the engine's network namespace
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x01, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS = 0x01, 0x02, 0x04, 0x08
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 4, 6
NLMSG = struct.Struct("=IHHII")
REQ = struct.Struct("=BBHIII2I")
MSG = struct.Struct("=BBBBI2I")
RTA = struct.Struct("=HH")


@dataclass
class UnixInfo:
    inode: int
    type: int            # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    state: int           # TCP_ESTABLISHED (1), TCP_LISTEN (10), TCP_CLOSE (7)...
    peer: int = 0        # the peer's inode; 0: none
    name: bytes = b""    # sun_path as bound ("\0..." abstract); empty: unbound
    vfs: tuple[int, int] | None = None   # (dev, ino) of the bound socket file
    icons: list[int] = field(default_factory=list)   # connections not yet accepted
    rqlen: int = 0
    wqlen: int = 0
    shutdown: int = 0    # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2


def unix_sockets() -> dict[int, UnixInfo]:
    # the shutdown state comes with every message (UNIX_DIAG_SHUTDOWN)
    show = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | \
        UDIAG_SHOW_RQLEN
    req = REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    out: dict[int, UnixInfo] = {}
    for body in _dump(req):
        info = _parse(body)
        out[info.inode] = info
    return out


def _dump(req: bytes):
    """The bodies of the SOCK_DIAG_BY_FAMILY messages answering the dump
    request ``req`` (one netlink socket, read until NLMSG_DONE)."""
    msg = NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                     1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as s:
        s.sendto(msg, (0, 0))
        while True:
            data = s.recv(1 << 16)
            pos = 0
            while pos + NLMSG.size <= len(data):
                length, mtype, _, _, _ = NLMSG.unpack_from(data, pos)
                if length < NLMSG.size:
                    raise OSError(f"sock_diag: bad message length {length}")
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err = struct.unpack_from("=i", data, pos + NLMSG.size)[0]
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                if mtype == SOCK_DIAG_BY_FAMILY:
                    yield data[pos + NLMSG.size:pos + length]
                pos += (length + 3) & ~3


def _parse(body: bytes) -> UnixInfo:
    _, stype, state, _, ino, _, _ = MSG.unpack_from(body, 0)
    info = UnixInfo(inode=ino, type=stype, state=state)
    pos = MSG.size
    while pos + RTA.size <= len(body):
        rlen, rtype = RTA.unpack_from(body, pos)
        if rlen < RTA.size:
            break
        val = body[pos + RTA.size:pos + rlen]
        if rtype == UNIX_DIAG_NAME:
            info.name = bytes(val)
        elif rtype == UNIX_DIAG_VFS and len(val) >= 8:
            vino, vdev = struct.unpack_from("=II", val)
            info.vfs = (vdev, vino)
        elif rtype == UNIX_DIAG_PEER and len(val) >= 4:
            info.peer = struct.unpack_from("=I", val)[0]
        elif rtype == UNIX_DIAG_ICONS:
            info.icons = list(struct.unpack_from(f"={len(val) // 4}I", val))
        elif rtype == UNIX_DIAG_RQLEN and len(val) >= 8:
            info.rqlen, info.wqlen = struct.unpack_from("=II", val)
        elif rtype == UNIX_DIAG_SHUTDOWN and len(val) >= 1:
            info.shutdown = val[0]
        pos += (rlen + 3) & ~3
    return info


# --------------------------------------------------------------------------
# TCP and UDP (include/uapi/linux/inet_diag.h)

INET_REQ = struct.Struct("=BBBBI48s")
INET_MSG = struct.Struct("=BBBB48sIIIII")


@dataclass
class InetInfo:
    inode: int
    family: int
    state: int        # TCP_LISTEN 10, TCP_CLOSE 7, TCP_ESTABLISHED 1 ...
    rqueue: int       # a listener: connections waiting to be accepted
    wqueue: int       # a listener: its backlog


def inet_sockets(family: int, protocol: int) -> dict[int, InetInfo]:
    """inode -> InetInfo of every socket of ``family``/``protocol``
    (IPPROTO_TCP, IPPROTO_UDP) in the engine's network namespace."""
    req = INET_REQ.pack(family, protocol, 0, 0, 0xFFFFFFFF, bytes(48))
    out: dict[int, InetInfo] = {}
    for body in _dump(req):
        if len(body) >= INET_MSG.size:
            fam, state, _, _, _, _, rq, wq, _, ino = INET_MSG.unpack_from(body, 0)
            out[ino] = InetInfo(ino, fam, state, rq, wq)
    return out
