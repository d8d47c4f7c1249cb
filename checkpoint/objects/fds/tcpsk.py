"""Established TCP connections through TCP_REPAIR (CRIU's sk-tcp.c and
libsoccr, done here with the kernel's socket options directly).

dump (``--tcp-established``): the connection's packets are dropped first
(checkpoint/netlock.py: a nftables table, both directions), then the
socket is put in repair mode on the engine's own copy (``save``): its
state, the sequence numbers after each queue, the queues themselves
(peeked, never consumed: the receive queue the program has not read, the
send queue the peer has not acknowledged, with how much of it was never
sent), MSS, window scaling, SACK, timestamps and the window
(TCP_REPAIR_WINDOW). A socket in repair mode sends nothing and closes
without a FIN or an RST, so the dumped process can be killed: the peer
sees a silent link whose packets are dropped until the restore.

restore (``load``): a new socket in repair mode is bound to the dumped
address (repair mode lets it share the port with a restored listener),
given its sequence numbers, connect(2)ed (in repair mode no SYN leaves:
the socket is ESTABLISHED at once), given its options, the receive queue
and the sent part of the send queue, and the window. Once every process
of the tree is built, ``Repairs.resume`` releases the lock, turns repair
off (the kernel sends a window probe: the peer answers and the
connection resumes, retransmitting what was lost in between) and queues
the never-sent bytes as a normal send.

``--tcp-close`` (CRIU's): the connection is neither locked nor repaired;
the restore gives the program a closed socket (a new one, never
connected: reads and writes fail), the dumped one closes as usual.

Half-closed connections (the program or its peer called shutdown) are
refused by name for now; a listener's connections not yet accepted are
refused by inetsk.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct

from ...errors import RestoreError, UnsupportedObject
from ...images.pb import files_pb2
from ... import netlock

log = logging.getLogger(__name__)

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
SO_PEEK_OFF = 42
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
# <netinet/tcp.h> states
ESTABLISHED, SYN_SENT, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE = 1, 2, 4, 5, 6, 7
CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING = 8, 9, 10, 11
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
               5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK",
               10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
SUPPORTED = (ESTABLISHED,)
TCP_CONNECTED = (1, 2, 4, 5, 8, 9, 11)   # the states an fd can hold but CLOSE and LISTEN
WINDOW = struct.Struct("=5I")   # struct tcp_repair_window
MAX_QUEUE = 64 << 20            # bytes of one queue in the image (the kernel's are far smaller)


def _int(s: socket.socket, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), req, b"\0" * 4))[0]


def describe(n) -> str:
    """"10.0.0.1:80 -> 10.0.0.2:5000" for an InetSocket with a peer."""
    def one(a, port):
        ip = ipaddress.ip_address(a)
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return f"{one(n.addr, n.port)} -> {one(n.peer_addr, n.peer_port)}"


# --------------------------------------------------------------------------
# dump


class Connections:
    """The established connections of one dump round: each locked (its own
    nftables table), then put in repair mode as it is dumped; the engine's
    copies kept so a round that does not kill the process can give them
    back (``resume``)."""

    def __init__(self, mode: str | None):
        if mode not in (None, "established", "close"):
            raise ValueError(mode)
        self.mode = mode
        self.locks: list[netlock.NetLock] = []
        self.repaired: list[tuple[socket.socket, int]] = []   # (copy, SO_REUSEADDR)

    def add(self, s: socket.socket, n, e) -> None:
        """Lock the connection of ``s`` and put it in repair mode; fill
        ``n.tcp`` (InetSocket) from it."""
        if not self.locks:   # the locks of engines killed mid-dump go first
            for name in netlock.sweep():
                log.warning("removed network lock %s, left by an engine that died", name)
        lk = netlock.lock([netlock.Conn(n.family, bytes(n.addr), n.port,
                                        bytes(n.peer_addr), n.peer_port)])
        self.locks.append(lk)
        reuse = s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        self.repaired.append((socket.socket(fileno=os.dup(s.fileno())), reuse))
        save(s, n.tcp, e)
        n.tcp.lock = lk.name

    def resume(self) -> None:
        """The round did not end with the process killed (a failure, ``-R``,
        a migration that fell back): repair off, the port's SO_REUSEADDR
        back, the locks released; the connections go on."""
        for s, reuse in self.repaired:
            try:
                _repair_off(s, reuse)
            except OSError as exc:
                log.warning("cannot take a dumped TCP socket out of repair mode: %s", exc)
            s.close()
        self.repaired = []
        self.release()

    def close(self, image: str = "") -> None:
        """The dumped processes were killed: their sockets, in repair mode,
        closed without a FIN or an RST; the locks stay for the restore of
        ``image``."""
        for s, _ in self.repaired:
            s.close()
        self.repaired = []
        for lk in self.locks:
            lk.hand_over(image)

    def release(self) -> None:
        """The locks go (a migration's source, once the address moved)."""
        locks, self.locks = self.locks, []
        for lk in locks:
            lk.release()


def _repair_off(s: socket.socket, reuse: int) -> None:
    s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
    if reuse:   # leaving repair mode clears the socket's reuse
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)


def save(s: socket.socket, t, e) -> None:
    """The TCP_REPAIR state of ``s`` (in repair mode) into ``t``
    (TcpConnection); ``e``: its FdEntry, for errors."""
    info = s.getsockopt(SOL_TCP, socket.TCP_INFO, 104)
    state, options, wscale = info[0], info[5], info[6]
    if state not in SUPPORTED:
        raise _refused(e, f"in state {STATE_NAMES.get(state, state)}: half-closed "
                          "connections are not supported yet; pass --tcp-close to restore "
                          "it closed")
    t.state = state
    outq, unsent, inq = _int(s, SIOCOUTQ), _int(s, SIOCOUTQNSD), _int(s, SIOCINQ)
    for what, n in (("receive", inq), ("send", outq)):
        if n > MAX_QUEUE:
            raise _refused(e, f"with {n} bytes in its {what} queue (more than {MAX_QUEUE})")
    t.mss_clamp = s.getsockopt(SOL_TCP, socket.TCP_MAXSEG)
    t.options = options
    if options & TCPI_OPT_WSCALE:
        t.snd_wscale, t.rcv_wscale = wscale & 0xF, wscale >> 4
    if options & TCPI_OPT_TIMESTAMPS:
        t.timestamp = struct.unpack("I", s.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0]
    try:
        w = WINDOW.unpack(s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, WINDOW.size))
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
    else:
        t.has_window = True
        t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup = w
    peek_off = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    if peek_off >= 0:   # a peek would start there and move it
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    try:
        t.inq_seq, t.inq = _queue(s, TCP_RECV_QUEUE, inq, e)
        t.outq_seq, t.outq = _queue(s, TCP_SEND_QUEUE, outq, e)
    finally:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        if peek_off >= 0:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)
    t.unsent = min(unsent, outq)


def _queue(s: socket.socket, queue: int, n: int, e) -> tuple[int, bytes]:
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    seq = struct.unpack("I", s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    data = b""
    if n:
        # one byte more than counted: the queue holds exactly n
        data = s.recv(n + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) != n:
            raise _refused(e, f"whose {'receive' if queue == TCP_RECV_QUEUE else 'send'} "
                              f"queue gave {len(data)} bytes where it holds {n}")
    return seq, data


def _refused(e, why: str) -> UnsupportedObject:
    return UnsupportedObject(f"fd {e.fd} is a TCP connection ({e.path}) {why}")


# --------------------------------------------------------------------------
# restore


class Repairs:
    """The connections a restore made in repair mode, until every process
    is built (``resume``) or the restore fails (``abort``)."""

    def __init__(self, transparent: bool = False, release_locks: bool = True):
        self.pending: list[tuple[socket.socket, object, str]] = []   # (copy, InetSocket, what)
        self.locks: set[str] = set()
        #: release the dump's locks (a restore on the dump's host); a
        #: migration's source releases its own
        self.release_locks = release_locks
        #: bind and connect without the address being local (``transparent``)
        self.transparent = transparent

    def expect(self, files) -> None:
        """The locks the image's connections name (FilesEntry records):
        released by ``resume`` or ``abort``, whatever happens between."""
        for entry in files:
            for e in entry.fds:
                if e.type == files_pb2.FD_INET_SOCKET and e.inet.tcp.lock:
                    self._want(e.inet.tcp.lock, f"fd {e.fd} ({e.path})")

    def _want(self, name: str, what: str) -> None:
        if not netlock.NAME_RE.fullmatch(name):
            raise RestoreError(f"{what}: {name[:40]!r} is not the name of a network lock")
        if self.release_locks:
            self.locks.add(name)

    def add(self, s: socket.socket, n, what: str) -> None:
        self.pending.append((s, n, what))
        if n.tcp.lock:
            self._want(n.tcp.lock, what)

    def resume(self) -> None:
        """Release the dump's locks, then repair off (a window probe goes
        out and the peer answers) and queue the bytes never sent."""
        self._unlock()
        try:
            for s, n, what in self.pending:
                t = n.tcp
                try:
                    _repair_off(s, n.options.get("SOL_SOCKET.SO_REUSEADDR", 0))
                    if t.unsent:
                        _send_all(s, t.outq[len(t.outq) - t.unsent:])
                except OSError as exc:
                    raise RestoreError(f"{what}: leaving repair mode: "
                                       f"{exc.strerror or exc}") from None
        finally:
            self._close()

    def abort(self) -> None:
        """The restore failed: its sockets go with the killed placeholders
        (in repair mode: silently); the locks are released, as a dump that
        fails leaves none either (the peer now sees the connection reset)."""
        self._close()
        self._unlock()

    def _unlock(self) -> None:
        for name in sorted(self.locks):
            netlock.release_lock(name)
        self.locks = set()

    def _close(self) -> None:
        for s, _, _ in self.pending:
            s.close()
        self.pending = []


def _send_all(s: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = s.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise OSError(errno.EAGAIN, "its send buffer is full") from None
        view = view[n:]


def transparent(s: socket.socket, family: int, on: bool) -> None:
    """IP_TRANSPARENT: bind and connect on an address that is not (yet)
    this host's (a migration's destination: the address moves there once
    the copy runs). Set by the engine (CAP_NET_ADMIN) for the restore only."""
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, int(on))
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, int(on))


def load(s: socket.socket, n, what: str) -> None:
    """Make ``s`` (new, in repair mode, bound) the connection ``n.tcp``
    describes, up to the window: connect in repair mode, options,
    timestamp, receive queue, the sent part of the send queue."""
    t = n.tcp
    if t.state not in SUPPORTED:
        raise RestoreError(f"{what}: TCP state {t.state} is not one the restore knows")
    if t.unsent > len(t.outq):
        raise RestoreError(f"{what}: {t.unsent} bytes unsent of a send queue of "
                           f"{len(t.outq)}")
    if t.snd_wscale > 14 or t.rcv_wscale > 14 or not 0 < t.mss_clamp <= 65535:
        raise RestoreError(f"{what}: window scale {t.snd_wscale}/{t.rcv_wscale} or MSS "
                           f"{t.mss_clamp} out of range")
    for queue, seq in ((TCP_RECV_QUEUE, t.inq_seq - len(t.inq)),
                       (TCP_SEND_QUEUE, t.outq_seq - len(t.outq))):
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", seq & 0xFFFFFFFF))
    peer = ipaddress.ip_address(bytes(n.peer_addr)).compressed
    s.connect((peer, n.peer_port, 0, n.scope_id) if n.family == socket.AF_INET6
              else (peer, n.peer_port))
    opts = []
    if t.options & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if t.options & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, t.snd_wscale | t.rcv_wscale << 16))
    if t.options & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    opts.append((TCPOPT_MAXSEG, t.mss_clamp))
    s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("=II", c, v)
                                                       for c, v in opts))
    if t.options & TCPI_OPT_TIMESTAMPS:
        s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("I", t.timestamp))
    if t.inq:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        _send_queue(s, t.inq)
    sent = len(t.outq) - t.unsent
    if sent:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _send_queue(s, t.outq[:sent])
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    if t.has_window:
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, WINDOW.pack(
            t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup))


def _send_queue(s: socket.socket, data: bytes) -> None:
    """Queue bytes in repair mode. The receive queue takes one linear
    buffer per send: a large one may fail (ENOMEM), so halve the chunk."""
    view, chunk = memoryview(data), len(data)
    while view:
        try:
            n = s.send(view[:chunk])
        except OSError as exc:
            if exc.errno not in (errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN) or chunk <= 1024:
                raise
            chunk //= 2
            continue
        view = view[n:]

