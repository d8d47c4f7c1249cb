"""Unix socketpairs: connected unix sockets without a name (socketpair(2):
Python's multiprocessing duplex pipes, asyncio's self-pipe, a parent and
its workers), stream, datagram or seqpacket, both ends in the dumped
processes (CRIU's sk-unix.c does all unix sockets; the others are refused
by name here, for now).

dump: sock_diag (kernel/sockdiag.py) says what the socket is connected to
and its shutdown state; the unread data is peeked from the engine's own copy
of the socket (pidfd_getfd) with SO_PEEK_OFF, message by message, never
consumed; buffer sizes, SO_PASSCRED, SO_PEEK_OFF and the timeouts by
getsockopt. The tree (objects/pstree.py) decides which process makes the
pair: the first in the tree's order holding either end; the other end's
state goes into its entry (``peer_state``), and a later holder's entry
names the maker.

restore: the maker calls socketpair, sets both ends' options, sends each
end's unread data again from its peer, then applies the shutdowns; an end a
later process holds stays open in the maker (a spare, closed once the tree
is built) until that process takes it (pidfd_getfd).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ...errors import UnsupportedObject
from ...images.pb import files_pb2
from ...kernel import sockdiag
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, refuse

SO_DOMAIN, SO_PEEK_OFF, SO_PASSCRED = 39, 42, 16
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
SO_RCVTIMEO, SO_SNDTIMEO = 20, 21
TCP_ESTABLISHED, TCP_LISTEN = 1, 10
TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram",
         socket.SOCK_SEQPACKET: "seqpacket"}
MAX_MESSAGE = 1 << 20
TIMEVAL = struct.Struct("=qq")
SEND_SHUTDOWN, RCV_SHUTDOWN = 2, 1


def claims(p: Probe) -> bool:
    return False    # inetsk.dump hands over the unix sockets


def _diag(ctx: DumpCtx) -> dict:
    cache = getattr(ctx, "_unix_diag", None)
    if cache is None:
        cache = ctx._unix_diag = sockdiag.unix_sockets()
    return cache


def dump(ctx: DumpCtx, p: Probe):
    from . import refused
    e = p.e
    fd = ctx.getfd(p.fd)
    s = socket.socket(fileno=fd)
    try:
        if s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN) != socket.AF_UNIX:
            return refused.dump(ctx, p)
        info = _diag(ctx).get(p.st.st_ino)
        waiting_on = _waiting_on(info, _diag(ctx))
        single = info is not None and not info.peer and waiting_on is None
        if waiting_on is not None:
            why = _unsupported_waiting(s, info)
        else:
            why = _unsupported_single(info) if single else _unsupported(info, _diag(ctx))
        if why:
            return refuse(e, "socket", "a unix socket", "unix sockets that are not an unnamed "
                          "connected pair, a listener or a bound or new socket",
                          ctx.external, f", {why}")
        e.type = files_pb2.FD_UNIX_SOCKET
        u = e.unix
        u.type, u.inode, u.peer, u.shutdown = info.type, info.inode, info.peer, info.shutdown
        if waiting_on is not None:   # a client not accepted yet: connects again
            u.pending_on = _name(waiting_on.name)
            single = True          # nothing queued, no peer to make
        elif not single:   # a connection accepted by a listener: its ends' names
            u.name = _name(info.name)
            u.peer_name = _name(_diag(ctx)[info.peer].name)
        if single and waiting_on is None:
            u.single, u.name, u.listening = True, _name(info.name), info.state == TCP_LISTEN
            u.backlog = info.wqlen if u.listening else 0
            u.pending.extend(info.icons)
            if u.name and u.name[0] != 0:
                why = _socket_file(u, info)
                if why:
                    return refuse(e, "socket", "a unix socket", "such unix sockets",
                                  ctx.external, f", {why}")
        u.rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        u.sndbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        u.passcred = bool(s.getsockopt(socket.SOL_SOCKET, SO_PASSCRED))
        u.peek_off = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        u.rcvtimeo_us = _timeo(s, SO_RCVTIMEO)
        u.sndtimeo_us = _timeo(s, SO_SNDTIMEO)
        try:   # a socket on its own has none (refused above otherwise)
            queue = [] if single else _peek_queue(s, info, p, ctx.max_content)
        except _InFlight:
            e.ClearField("unix")
            return refuse(e, "socket", "a unix socket", "unix sockets with file descriptors "
                          "in flight", ctx.external, ", with file descriptors in flight in its "
                          "receive queue (SCM_RIGHTS not received yet)")
        if queue and u.passcred:
            e.ClearField("unix")
            return refuse(e, "socket", "a unix socket", "the senders' credentials of unread "
                          "messages", ctx.external, ", with unread data and SO_PASSCRED")
        u.queue.extend(queue)
    finally:
        s.close()
    return e


def _name(raw: bytes) -> bytes:
    """sun_path as bound: a path loses the NUL the kernel keeps after it."""
    return raw.rstrip(b"\0") if raw and raw[0] != 0 else raw


def _waiting_on(info, diag):
    """The listener whose accept queue holds this client socket, or None."""
    if info is None or info.peer or info.state != TCP_ESTABLISHED:
        return None
    return next((d for d in diag.values() if d.state == TCP_LISTEN
                 and info.inode in d.icons), None)


def _unsupported_waiting(s: socket.socket, info) -> str:
    import fcntl
    import termios
    if info.type not in TYPES:
        return f"of type {info.type}"
    if info.rqlen:
        return "waiting to be accepted, with unread data"
    sent = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    if sent:
        return "waiting to be accepted, with data sent the server has not accepted yet"
    if info.shutdown:
        return "waiting to be accepted, shut down"
    return ""


def _unsupported_single(info) -> str:
    if info.type not in TYPES:
        return f"of type {info.type}"
    if info.state == TCP_LISTEN:
        return ""
    if info.rqlen:
        return "with unread data from unnamed senders" if info.name else "with unread data"
    return ""


def _socket_file(u, info) -> str:
    """The socket file of a path name, as the dumped process bound it."""
    path = u.name.decode("utf-8", "surrogateescape")
    if not path.startswith("/"):
        return f"bound to the relative path {path!r}"
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if info.vfs is not None:
        kdev, ino = info.vfs
        want = (os.makedev(kdev >> 20, kdev & 0xFFFFF), ino)
    else:
        want = None
    if st is None or want is None or (st.st_dev, st.st_ino) != want:
        return f"whose socket file {path} is gone or replaced"
    u.file_dev, u.file_ino = st.st_dev, st.st_ino
    u.file_mode, u.file_uid, u.file_gid = st.st_mode, st.st_uid, st.st_gid
    return ""


def _unsupported(info, diag) -> str:
    if info is None:
        return "which sock_diag does not show (another network namespace?)"
    if info.type not in TYPES:
        return f"of type {info.type}"
    if info.state != TCP_ESTABLISHED or not info.peer:
        return "listening" if info.state == 10 else "not connected"
    peer = diag.get(info.peer)
    if peer is None or peer.peer != info.inode:
        return "connected to a socket that is not connected back (a datagram server's?)"
    if info.name and peer.name:
        return "connected with a name on both ends"
    if (info.name or peer.name) and info.type == socket.SOCK_DGRAM:
        return "a datagram socket connected to a named one"
    return ""


class _InFlight(Exception):
    pass


def _timeo(s: socket.socket, opt: int) -> int:
    sec, usec = TIMEVAL.unpack(s.getsockopt(socket.SOL_SOCKET, opt, TIMEVAL.size))
    return sec * 1_000_000 + usec


def _peek_queue(s: socket.socket, info, p: Probe, cap: int) -> list[bytes]:
    """The receive queue, peeked message by message (SO_PEEK_OFF moves past
    what each peek returned); the socket's own peek offset is put back."""
    old = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    out: list[bytes] = []
    total = 0
    stream = info.type == socket.SOCK_STREAM
    s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        for _ in range(1 << 20):
            try:
                data, anc, flags, _ = s.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(253 * 4),
                                                socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if anc:
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        for fd in struct.unpack(f"{len(cdata) // 4}i", cdata[:len(cdata) // 4 * 4]):
                            os.close(fd)
                raise _InFlight()
            if flags & socket.MSG_TRUNC:
                raise UnsupportedObject(f"fd {p.fd} ({p.link}): a queued message is larger "
                                        f"than {MAX_MESSAGE} bytes")
            if not data and (stream or info.shutdown & RCV_SHUTDOWN):
                break   # end of file: the peer shut its side (and the queue is read)
            out.append(data)
            total += len(data)
            if total > cap:
                raise UnsupportedObject(f"fd {p.fd} ({p.link}) holds more than {cap} unread "
                                        "bytes, more than a socket may put in the image")
    finally:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
    return [b"".join(out)] if stream and out else out


# --------------------------------------------------------------------------
# restore


def restore(R: RestoreCore, it: Item) -> None:
    u = it.e.unix
    if u.pending_on:
        return _restore_waiting(R, it)
    if u.single:
        return _restore_single(R, it)
    if u.maker:   # the other process made it: taken with the tree's links
        raise R.fail(it, f"a unix socket made by process {u.maker} was not taken from it")
    peer_item = next((o for o in R.items if o.e.type == files_pb2.FD_UNIX_SOCKET
                      and o.e.unix.inode == u.peer and o.dup_of is None), None)
    peer = peer_item.e.unix if peer_item is not None else u.peer_state
    if peer is None or peer.inode != u.peer:
        raise R.fail(it, "the peer of this unix socket is in no entry")
    if u.name or u.peer_name:
        a, b = _connect_accept(R, it, u)
    else:
        addr = R.r.scratch
        R.call("socketpair", socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC, 0, addr, it=it)
        a, b = struct.unpack("ii", R.r.read(addr, 8))
        a, b = R.fresh(a), R.fresh(b)
    ca, cb = R.own_copy(a), R.own_copy(b)
    try:
        sa, sb = socket.socket(fileno=ca), socket.socket(fileno=cb)
        try:
            for s, st in ((sa, u), (sb, peer)):
                _options(R, it, s, st)
            # each end's unread data, sent again from its peer; then the shutdowns
            for dst, src in ((u, sb), (peer, sa)):
                for msg in dst.queue:
                    _send_all(R, it, src, msg, dst.type)
            for s, st in ((sa, u), (sb, peer)):
                if st.shutdown & SEND_SHUTDOWN:
                    s.shutdown(socket.SHUT_WR)
                elif st.shutdown & RCV_SHUTDOWN and not _peer_sends_shut(st, u, peer):
                    s.shutdown(socket.SHUT_RD)
        finally:
            sa.close()
            sb.close()
    except OSError as exc:
        raise R.fail(it, f"restoring the socket pair: {exc.strerror or exc}") from None
    R.setfl(a, it)
    R.place(a, it)
    if peer_item is not None:
        R.setfl(b, peer_item)
        R.place(b, peer_item)
    else:
        R.unix_spares[u.peer] = b   # a later process takes it; kept open until then
        R.keep.add(b)


def _connect_accept(R: RestoreCore, it: Item, u) -> tuple[int, int]:
    """A connection a listener accepted, made again the same way: a new
    socket connects to the restored listener (which this process holds:
    the server's), the listener accepts it. Returns (this end, its peer)."""
    name = u.name or u.peer_name
    lst = next((o for o in R.items if o.e.type == files_pb2.FD_UNIX_SOCKET
                and o.e.unix.single and o.e.unix.listening and o.e.unix.name == name
                and o.fd in R.placed), None)
    if lst is None:
        raise R.fail(it, "the listener it was accepted by is not in this process")
    c = R.fresh(R.call("socket", socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC, 0, it=it))
    addr = _sockaddr_un(name)
    R.r.write(R.r.scratch + 2048, addr)
    R.call("connect", c, R.r.scratch + 2048, len(addr), it=it)
    s = R.fresh(R.call("accept4", lst.fd, 0, 0, socket.SOCK_CLOEXEC, it=it))
    return (s, c) if u.name else (c, s)


AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
SUN_PATH_MAX = 108


def _restore_single(R: RestoreCore, it: Item) -> None:
    """A socket on its own: made, bound to its name (a path's stale socket
    file, the dumped one, removed first; then its mode and owner given
    back), listening with its backlog, with its options."""
    u = it.e.unix
    if u.type not in TYPES or len(u.name) > SUN_PATH_MAX:
        raise R.fail(it, f"unix socket of type {u.type} or name of {len(u.name)} bytes")
    fd = R.fresh(R.call("socket", socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC, 0, it=it))
    if u.name:
        path = None
        if u.name[0] != 0:
            path = u.name.decode("utf-8", "surrogateescape")
            if not path.startswith("/") or "\0" in path:
                raise R.fail(it, f"socket path {path!r} is not absolute")
            _remove_stale(R, it, path)
        addr = _sockaddr_un(u.name)
        R.r.write(R.r.scratch + 2048, addr)
        R.call("bind", fd, R.r.scratch + 2048, len(addr), it=it)
        if path is not None:
            at = R.stage(path, it)
            mode = u.file_mode & 0o7777
            R.call("fchmodat", AT_FDCWD, at, mode, 0, it=it)
            res = R.r.syscall("fchownat", AT_FDCWD, at, u.file_uid, u.file_gid,
                              AT_SYMLINK_NOFOLLOW)
            if res < 0 and res != -errno.EPERM:
                raise R.fail(it, f"chown of {path}: {os.strerror(-res)}")
    if u.listening:
        R.call("listen", fd, min(u.backlog, 1 << 16), it=it)
    _options_and_place(R, it, fd, u)


def _restore_waiting(R: RestoreCore, it: Item) -> None:
    """A client waiting in a listener's accept queue: a new socket connects
    to the restored listener again (after its accepted connections were
    made again, and in the queue's order: objects/pstree.py checks it)."""
    u = it.e.unix
    name = u.pending_on
    if u.type not in TYPES or not name or len(name) > SUN_PATH_MAX:
        raise R.fail(it, "waiting unix socket with an impossible type or listener name")
    fd = R.fresh(R.call("socket", socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC, 0, it=it))
    addr = _sockaddr_un(name)
    R.r.write(R.r.scratch + 2048, addr)
    R.call("connect", fd, R.r.scratch + 2048, len(addr), it=it)
    _options_and_place(R, it, fd, u)


def _options_and_place(R: RestoreCore, it: Item, fd: int, u) -> None:
    """``u``'s options (through the engine's own copy), flags, fd number."""
    copy = R.own_copy(fd)
    try:
        with socket.socket(fileno=copy) as s:
            _options(R, it, s, u)
    except OSError as exc:
        raise R.fail(it, f"socket options: {exc.strerror or exc}") from None
    R.setfl(fd, it)
    R.place(fd, it)


def _sockaddr_un(name: bytes) -> bytes:
    """sockaddr_un of a name as sock_diag gives it (a path gets its NUL back)."""
    return struct.pack("=H", socket.AF_UNIX) + name + (b"\0" if name[0] != 0 else b"")


def _remove_stale(R: RestoreCore, it: Item, path: str) -> None:
    """The socket file the dumped process bound outlives it: removed (by
    the placeholder, as the dumped user) only if it is that very file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise R.fail(it, f"socket path {path}: {exc.strerror}") from None
    if (st.st_mode & 0o170000) != 0o140000:
        raise R.fail(it, f"socket path {path} is taken by a file that is no socket")
    live = {(os.makedev(v[0] >> 20, v[0] & 0xFFFFF), v[1])
            for v in (i.vfs for i in sockdiag.unix_sockets().values()) if v is not None}
    if (st.st_dev, st.st_ino) in live:
        raise R.fail(it, f"socket path {path} is bound by a live socket (another server?)")
    R.call("unlinkat", AT_FDCWD, R.stage(path, it), 0, it=it)


def _peer_sends_shut(st, u, peer) -> bool:
    other = peer if st is u else u
    return bool(other.shutdown & SEND_SHUTDOWN)


def _options(R, it, s: socket.socket, st) -> None:
    # getsockopt gives twice what setsockopt took (the kernel's bookkeeping)
    if st.rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, st.rcvbuf // 2)
    if st.sndbuf:
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, st.sndbuf // 2)
    if st.passcred:
        s.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
    if st.peek_off >= 0:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, st.peek_off)
    for opt, us in ((SO_RCVTIMEO, st.rcvtimeo_us), (SO_SNDTIMEO, st.sndtimeo_us)):
        if us:
            s.setsockopt(socket.SOL_SOCKET, opt, TIMEVAL.pack(*divmod(us, 1_000_000)))


def _send_all(R, it, s: socket.socket, msg: bytes, stype: int) -> None:
    try:
        if stype != socket.SOCK_STREAM:
            s.send(msg, socket.MSG_DONTWAIT)
            return
        view = memoryview(msg)
        while view:
            view = view[s.send(view, socket.MSG_DONTWAIT):]
    except BlockingIOError:
        raise R.fail(it, f"the socket took only part of its {len(msg)} saved bytes") from None
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            raise R.fail(it, "a saved message is larger than the socket takes") from None
        raise


KIND = FdKind("unix socketpair", (files_pb2.FD_UNIX_SOCKET,), claims, dump, restore)
