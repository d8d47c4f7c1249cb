"""Netlink sockets (CRIU's sk-netlink.c): the route and uevent sockets
libraries keep open, made again with their protocol, port id, multicast
groups, peer and options. A socket with a message unread (a reply or an
event not read yet) is refused by name: its messages are the kernel's and
cannot be queued again.

dump: getsockname (port id), NETLINK_LIST_MEMBERSHIPS (every group, also
above 32), getpeername, the options below, all on the engine's own copy
(pidfd_getfd); unread messages by a MSG_PEEK that consumes nothing.
restore: socket(2), bind(2) to the port id (the dumped socket is gone, so
it is free unless another process took it: the restore then fails naming
it), NETLINK_ADD_MEMBERSHIP for each group, connect(2), the options.
"""

from __future__ import annotations

import os
import socket
import struct

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, refuse

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_LIST_MEMBERSHIPS = 1, 9
OPTIONS = {"NETLINK_PKTINFO": 3, "NETLINK_BROADCAST_ERROR": 4, "NETLINK_NO_ENOBUFS": 5,
           "NETLINK_LISTEN_ALL_NSID": 8, "NETLINK_CAP_ACK": 10, "NETLINK_EXT_ACK": 11,
           "NETLINK_GET_STRICT_CHK": 12}
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
MAX_GROUPS = 4096


def dump(ctx: DumpCtx, p: Probe, s: socket.socket):
    e = p.e
    proto = s.getsockopt(socket.SOL_SOCKET, 38)   # SO_PROTOCOL
    stype = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        unread = True
    except BlockingIOError:
        unread = False
    if unread:
        return refuse(e, "socket", "a netlink socket", "netlink sockets with unread "
                      "messages", ctx.external, ", with a message unread")
    e.type = files_pb2.FD_NETLINK_SOCKET
    n = e.netlink
    n.type, n.protocol = stype, proto
    n.portid = s.getsockname()[0]
    raw = s.getsockopt(SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, MAX_GROUPS // 8)
    words = struct.unpack(f"={len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    n.groups.extend(32 * i + b + 1 for i, w in enumerate(words) for b in range(32)
                    if w >> b & 1)
    try:
        n.peer_portid, n.peer_groups = s.getpeername()
    except OSError:
        pass
    for name, opt in OPTIONS.items():
        try:
            n.options[name] = s.getsockopt(SOL_NETLINK, opt)
        except OSError:
            pass   # not known to this kernel: not set either
    n.options["SO_RCVBUF"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    n.options["SO_SNDBUF"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return e


def restore(R: RestoreCore, it: Item) -> None:
    n = it.e.netlink
    if n.type not in (socket.SOCK_RAW, socket.SOCK_DGRAM) or not 0 <= n.protocol < 32 or \
            len(n.groups) > MAX_GROUPS or any(not 0 < g <= MAX_GROUPS for g in n.groups):
        raise R.fail(it, f"netlink socket of type {n.type}, protocol {n.protocol}, "
                         f"{len(n.groups)} groups")
    fd = R.fresh(R.call("socket", socket.AF_NETLINK, n.type | socket.SOCK_CLOEXEC,
                        n.protocol, it=it))
    if n.portid:
        sa = struct.pack("=HHII", socket.AF_NETLINK, 0, n.portid, 0)
        R.r.write(R.r.scratch + 2048, sa)
        res = R.r.syscall("bind", fd, R.r.scratch + 2048, len(sa))
        if res < 0:
            raise R.fail(it, f"bind to netlink port id {n.portid}: {os.strerror(-res)}"
                             " (another socket holds it?)")
    for g in n.groups:
        R.r.write(R.r.scratch + 2048, struct.pack("=I", g))
        R.call("setsockopt", fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, R.r.scratch + 2048, 4,
               it=it)
    if n.peer_portid or n.peer_groups:
        sa = struct.pack("=HHII", socket.AF_NETLINK, 0, n.peer_portid, n.peer_groups)
        R.r.write(R.r.scratch + 2048, sa)
        R.call("connect", fd, R.r.scratch + 2048, len(sa), it=it)
    copy = R.own_copy(fd)
    try:
        with socket.socket(fileno=copy) as s:
            for name, v in n.options.items():
                if name == "SO_RCVBUF":
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, v // 2)
                elif name == "SO_SNDBUF":
                    s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, v // 2)
                elif name in OPTIONS and v:
                    s.setsockopt(SOL_NETLINK, OPTIONS[name], v)
    except OSError as exc:
        raise R.fail(it, f"netlink socket options: {exc.strerror or exc}") from None
    R.setfl(fd, it)
    R.place(fd, it)


KIND = FdKind("netlink socket", (files_pb2.FD_NETLINK_SOCKET,), lambda p: False, None, restore)
