"""The network lock (checkpoint/netlock.py) on real TCP traffic.

Each test gets a private network namespace (`ip netns add`, loopback up,
removed at the end whatever happens, with every nft table in it). The test
process works inside it from threads that setns(2) into it: a socket keeps
the namespace it was made in, so client and server are plain sockets of
the test process, and every lock call is made from such a thread. Proof
that a packet was dropped, not lost to timing: the sender's TCP_INFO
counts its retransmissions, and the receiver still has nothing.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest

from checkpoint import netlock
from checkpoint.errors import NetLockError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLONE_NEWNET = 0x40000000
TCP_REPAIR = 19            # include/uapi/linux/tcp.h
_libc = ctypes.CDLL(None, use_errno=True)
_seq = iter(range(1000000))


class Netns:
    """A named network namespace; ``run(fn, ...)`` calls fn in a thread inside it."""

    def __init__(self, name: str):
        self.name = name
        self.path = f"/run/netns/{name}"

    def run(self, fn, *args):
        box = {}

        def body():
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                box["value"] = fn(*args)
            except BaseException as exc:   # handed to the caller's thread
                box["error"] = exc

        t = threading.Thread(target=body)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def nft(self, *args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.name, "nft", *args],
                              capture_output=True, text=True, check=True).stdout

    def tables(self) -> list[str]:
        return [line.split()[-1] for line in self.nft("list", "tables").splitlines()]


@pytest.fixture
def ns():
    name = f"ckpt-nl-{os.getpid()}-{next(_seq)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
    n = Netns(name)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield n
    finally:
        netlock.close()    # its netlink socket would keep the namespace alive
        for table in n.tables():
            n.nft("delete", "table", "inet", table)
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture(params=["libnftables", "nft command"])
def backend(request, monkeypatch):
    """Each test runs once through libnftables and once through `nft -f -`."""
    if request.param == "nft command":
        monkeypatch.setitem(netlock._cache, "backend", netlock.NftCommand("nft"))
    return request.param


def connect(family: int):
    """A listener, a client connected to it and the accepted socket (on
    loopback of the calling thread's namespace)."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(1)
    cl = socket.create_connection(ls.getsockname()[:2])
    sv, _ = ls.accept()
    for s in (cl, sv):
        s.setblocking(False)
    return ls, cl, sv


def conn_of(s: socket.socket) -> netlock.Conn:
    """The Conn of a socket, from its own address and its peer's."""
    la, ra = s.getsockname(), s.getpeername()
    return netlock.Conn(s.family, socket.inet_pton(s.family, la[0]), la[1],
                        socket.inet_pton(s.family, ra[0]), ra[1])


def total_retrans(s: socket.socket) -> int:
    """tcpi_total_retrans from TCP_INFO (struct tcp_info: 8 bytes of u8
    fields, then u32s; total_retrans is the 24th)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 8 + 23 * 4)[0]


def dropped(ns: Netns, name: str) -> tuple[int, int]:
    """Packets the lock's (input, output) rules dropped: their counters."""
    listing = ns.nft("list", "table", "inet", name)
    counts = [int(n) for n in re.findall(r"counter packets (\d+) bytes \d+ drop", listing)]
    assert len(counts) == 2, listing
    return counts[0], counts[1]


def out_rsts() -> int:
    """Tcp OutRsts of the calling thread's namespace (/proc/net/snmp)."""
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutRsts")])


def wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def nothing_to_read(s: socket.socket) -> bool:
    try:
        s.recv(100)
    except BlockingIOError:
        return True
    return False


def recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    deadline = time.monotonic() + 30
    while len(got) < n:
        if not select.select([s], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"{n} bytes not delivered within 30 s (got {got!r})")
        got += s.recv(n - len(got))
    return got


@contextmanager
def closing(*socks):
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_lock_drops_both_directions_and_release_lets_retransmission_through(ns, backend,
                                                                              family):
    ls, cl, sv = ns.run(connect, family)
    with closing(ls, cl, sv):
        lk = ns.run(netlock.lock, [conn_of(sv)])
        assert ns.tables() == [lk.name]
        rsts = ns.run(out_rsts)
        cl.send(b"ping")
        sv.send(b"pong")
        # the client's segments went out and were dropped on input (it
        # retransmits them); the server's were dropped on output (its own
        # stack keeps them unsent and tries again)
        wait_for(lambda: total_retrans(cl) >= 2 and dropped(ns, lk.name)[1] >= 2,
                 "both directions dropped")
        assert dropped(ns, lk.name)[0] >= 2
        assert nothing_to_read(sv) and nothing_to_read(cl)
        assert ns.run(out_rsts) == rsts
        ns.run(lk.release)
        assert ns.tables() == []
        assert recv_exactly(sv, 4) == b"ping"
        assert recv_exactly(cl, 4) == b"pong"
        assert cl.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_socket_gone_in_repair_mode_peer_sees_no_reset_until_release(ns, family):
    """What a dump does: the socket closed in TCP_REPAIR mode (no FIN, no
    RST). Locked, the peer's segments are dropped and it waits; released,
    the same retransmission meets no socket and is reset: the lock was what
    kept the connection alive."""
    ls, cl, sv = ns.run(connect, family)
    with closing(ls, cl, sv):
        lk = ns.run(netlock.lock, [conn_of(sv)])
        sv.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        sv.close()
        rsts = ns.run(out_rsts)
        cl.send(b"data")
        wait_for(lambda: total_retrans(cl) >= 2, "client retransmitting")
        assert cl.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert nothing_to_read(cl)
        assert ns.run(out_rsts) == rsts
        ns.run(lk.release)

        def reset():
            try:
                cl.recv(100)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            raise AssertionError("the client read something")
        wait_for(reset, "the client reset once unlocked")
        assert ns.run(out_rsts) > rsts


def test_ipv4_mapped_connection_gets_ip_rules(ns):
    def mapped():
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.bind(("::", 0))
        ls.listen(1)
        cl = socket.create_connection(("::ffff:127.0.0.1", ls.getsockname()[1]))
        sv, _ = ls.accept()
        for s in (cl, sv):
            s.setblocking(False)
        return ls, cl, sv
    ls, cl, sv = ns.run(mapped)
    with closing(ls, cl, sv):
        assert sv.getsockname()[0] == "::ffff:127.0.0.1"
        lk = ns.run(netlock.lock, [conn_of(sv)])
        listing = ns.nft("list", "table", "inet", lk.name)
        port, peer = sv.getsockname()[1], sv.getpeername()[1]
        assert f"127.0.0.1 . {peer} . 127.0.0.1 . {port}" in listing
        assert "ip saddr . tcp sport . ip daddr . tcp dport @in4" in listing
        assert "ip6" not in listing
        cl.send(b"v4")
        wait_for(lambda: total_retrans(cl) >= 2, "client retransmitting")
        assert nothing_to_read(sv)
        ns.run(lk.release)
        assert recv_exactly(sv, 2) == b"v4"


def test_lock_is_idempotent_and_refuses_other_connections(ns, backend):
    ls, cl, sv = ns.run(connect, socket.AF_INET)
    with closing(ls, cl, sv):
        c = conn_of(sv)
        lk = ns.run(netlock.lock, [c, c])
        again = ns.run(lambda: netlock.lock([c], name=lk.name))
        assert again.name == lk.name and again.owner == os.getpid()
        listing = ns.nft("list", "table", "inet", lk.name)
        assert listing.count(" drop") == 2, listing
        with pytest.raises(NetLockError, match=f"{lk.name}: a table of that name exists with "
                                               "other connections"):
            ns.run(lambda: netlock.lock([replace(c, rport=c.rport % 65535 + 1)], name=lk.name))
        assert ns.nft("list", "table", "inet", lk.name) == listing
        with pytest.raises(NetLockError, match=f"{lk.name}: made in network namespace "
                                               r"net:\[\d+\], released from net:\[\d+\]"):
            lk.release()                         # from the test's own namespace
        assert ns.tables() == [lk.name]

        def scoped():
            with netlock.lock([c], name=lk.name) as held:
                assert held.name == lk.name
        ns.run(scoped)                           # the context manager released it
        assert ns.tables() == []


def test_release_of_a_missing_lock_and_bad_names(ns, backend):
    ns.run(netlock.release_lock, "checkpoint_0123456789ab")
    assert ns.tables() == []
    for bad in ("filter", "checkpoint_x; flush ruleset", "checkpoint_ABC", "checkpoint_"):
        with pytest.raises(NetLockError, match="is not a lock name"):
            ns.run(netlock.release_lock, bad)


_LOCKER = """
import ctypes, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
assert ctypes.CDLL(None).setns(fd, 0x40000000) == 0
from checkpoint import netlock
lk = netlock.lock([netlock.Conn(socket.AF_INET, bytes([127, 0, 0, 1]), int(sys.argv[2]),
                                bytes([127, 0, 0, 1]), 40000)])
if sys.argv[3] == "hand-over":
    lk.hand_over("/var/lib/images/job 1")
print(lk.name, flush=True)
sys.stdin.read()
"""


@contextmanager
def locker(ns: Netns, port: int, hand_over: bool):
    """A process that locks in ``ns`` and waits; SIGKILLed and reaped on exit."""
    p = subprocess.Popen([sys.executable, "-c", _LOCKER, ns.path, str(port),
                          "hand-over" if hand_over else "keep"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        line = p.stdout.readline().strip()
        assert line.startswith("checkpoint_"), line
        yield p, line
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def test_sweep_removes_locks_of_dead_owners_only(ns, backend):
    with locker(ns, 1001, hand_over=False) as (dead, stale), \
            locker(ns, 1002, hand_over=True) as (gone, kept), \
            locker(ns, 1003, hand_over=False) as (_, alive):
        mine = ns.run(netlock.lock, [netlock.Conn(socket.AF_INET, bytes([10, 0, 0, 1]), 1004,
                                                  bytes([10, 0, 0, 2]), 5)])
        assert ns.run(netlock.sweep) == []           # every owner lives
        for p in (dead, gone):
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert ns.run(netlock.sweep) == [stale]
        assert sorted(ns.tables()) == sorted([kept, alive, mine.name])
        listing = ns.nft("list", "table", "inet", kept)
        assert 'chain handed_over' in listing and "image /var/lib/images/job 1" in listing
        for name in (kept, alive, mine.name):
            ns.run(netlock.release_lock, name)
        assert ns.tables() == []
    assert ns.run(netlock.sweep) == []


def test_lock_of_a_dead_owner_is_taken_over(ns):
    with locker(ns, 2001, hand_over=False) as (p, name):
        before = ns.nft("list", "table", "inet", name)
        p.send_signal(signal.SIGKILL)
        p.wait()
        conn = netlock.Conn(socket.AF_INET, bytes([127, 0, 0, 1]), 2001,
                            bytes([127, 0, 0, 1]), 40000)
        lk = ns.run(lambda: netlock.lock([conn], name=name))
        assert lk.owner == os.getpid()
        after = ns.nft("list", "table", "inet", name)
        assert f"owner={os.getpid()}:" in after and f"owner={p.pid}:" in before
        assert after.count(" drop") == 2
        assert ns.run(netlock.sweep) == []
        ns.run(lk.release)
    assert ns.tables() == []


def test_without_cap_net_admin_one_line_error(ns, backend):
    """The kernel's refusal, as the engine would print it: one line naming
    the lock and nft's error."""
    code = ("import socket, sys\n"
            "from checkpoint import netlock\n"
            + ("netlock._cache['backend'] = netlock.NftCommand('nft')\n"
               if backend == "nft command" else "") +
            "from checkpoint.errors import CheckpointError\n"
            "try:\n"
            "    netlock.lock([netlock.Conn(socket.AF_INET, bytes(4), 1, bytes(4), 2)],"
            " name='checkpoint_eperm')\n"
            "except CheckpointError as exc:\n"
            "    sys.exit(f'{type(exc).__name__}: {exc}')\n")
    r = subprocess.run(["ip", "netns", "exec", ns.name, "setpriv", "--inh-caps=-all",
                        "--bounding-set=-net_admin", sys.executable, "-c", code],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("NetLockError: network lock checkpoint_eperm: cannot make the "
                               "table: nft: "), r.stderr
    assert "Operation not permitted" in r.stderr
    assert ns.tables() == []


_COUNT_NFNL = """
import os, socket
n = 0
for fd in os.listdir("/proc/self/fd"):
    try:
        with socket.socket(fileno=os.dup(int(fd))) as s:
            n += s.family == socket.AF_NETLINK and s.proto == 12
    except OSError:
        pass
print(n)
"""


def test_a_started_process_does_not_inherit_the_nft_socket(ns):
    """libnftables leaves its netlink socket inheritable; the engine's
    placeholders and hooks must not get it."""
    def locked_then_spawn():
        lk = netlock.lock([netlock.Conn(socket.AF_INET, bytes([127, 0, 0, 1]), 1,
                                        bytes([127, 0, 0, 1]), 2)])
        try:
            return subprocess.run([sys.executable, "-c", _COUNT_NFNL], close_fds=False,
                                  capture_output=True, text=True, check=True).stdout
        finally:
            lk.release()
    assert ns.run(locked_then_spawn) == "0\n"
    assert ns.tables() == []


def test_bad_connections_are_refused_by_name():
    with pytest.raises(NetLockError, match="local address .* is not 4 bytes"):
        netlock.Conn(socket.AF_INET, bytes(16), 1, bytes(4), 2)
    with pytest.raises(NetLockError, match="remote port 0 is not 1-65535"):
        netlock.Conn(socket.AF_INET6, bytes(16), 1, bytes(16), 0)
    with pytest.raises(NetLockError, match="not IPv4 or IPv6"):
        netlock.Conn(socket.AF_UNIX, b"", 1, b"", 2)
