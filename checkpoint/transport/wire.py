"""The migration stream: framed, versioned, authenticated messages over TCP.

Every message is a 16-byte header and a payload::

    u32 type | u32 flags (0) | u64 length        little-endian
    payload (length bytes; JSON for control messages, raw for DATA)
    [32-byte HMAC-SHA256 tag, once a pre-shared key authenticated the peers]

Control payloads are at most 64 KiB, DATA payloads at most 8 MiB: a reader
never allocates more for one message, whatever a peer sends.

**Authentication.** With a pre-shared key (``--auth-key FILE``) the peers run
a challenge-response before anything else is accepted: the client sends a
nonce in HELLO, the server answers CHALLENGE with its own, the client proves
the key with HMAC(key, "client" | server nonce | client nonce), the server
proves it back. The key never crosses the wire. Every later message carries
HMAC(session key, direction | sequence number | header | payload), the
session key derived from both nonces, so a message cannot be edited,
dropped, replayed or reordered without the receiver noticing. With TLS
(``--tls-cert/--tls-key/--tls-cacert``) the ``ssl`` module does both jobs:
mutual certificate authentication and an encrypted, integrity-protected
stream. Off loopback one of the two is mandatory.

Message types: see :class:`T`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import ssl
import stat
import struct
import time

from ..errors import CheckpointError, TransportError, UsageError

PROTO_VERSION = 1
HEADER = struct.Struct("<IIQ")
MAX_CONTROL = 64 << 10
MAX_DATA = 8 << 20
TAG = 32
DEFAULT_TIMEOUT = 60.0
MIN_KEY = 32


class T(enum.IntEnum):
    HELLO = 1        # client -> server: versions, nonce, source host facts
    CHALLENGE = 2    # server -> client: server nonce (pre-shared key)
    AUTH = 3         # client -> server: proof of the key
    WELCOME = 4      # server -> client: its proof, accepted; destination facts
    REFUSE = 5       # either way: why not (then the connection closes)
    LAYER = 6        # client: a layer begins {index, kind}
    DATA = 7         # client: layer bytes
    END = 8          # client: the layer ends {bytes[, sha256 on a plain stream]}
    ACK = 9          # server: the layer is published {index}
    RUNNING = 10     # server: the restored process runs {pid, ...}
    DONE = 11        # client: the source process is gone; keep yours
    BYE = 12         # either: clean end of the session
    ERROR = 13       # either: failure {error, kind}
    PING = 14
    PONG = 15
    APPLIED = 16     # server: the layer is applied to the staged copy {index, apply_ms}


def load_key(path: str) -> bytes:
    """A pre-shared key file: at least 32 bytes, readable by its owner only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"--auth-key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--auth-key {path}: not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"--auth-key {path}: readable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        key = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(key) < MIN_KEY:
        raise UsageError(f"--auth-key {path}: {len(key)} bytes, at least {MIN_KEY} needed "
                         "(head -c 32 /dev/urandom > FILE)")
    return key


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def tls_context(server: bool, cert: str | None, key: str | None,
                cacert: str | None) -> ssl.SSLContext:
    """Mutual TLS: each side presents a certificate and verifies the peer's
    against ``cacert``."""
    if not (cert and key and cacert):
        raise UsageError("TLS needs --tls-cert, --tls-key and --tls-cacert together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cacert)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS files: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False   # peers are named by address; the CA vouches
    return ctx


class Conn:
    """One end of a migration stream (blocking socket with a timeout)."""

    def __init__(self, sock: socket.socket, *, client: bool, timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.client = client
        self.sock.settimeout(timeout)
        self._mac_key: bytes | None = None
        self._tx = self._rx = 0
        import threading
        self._send_lock = threading.Lock()   # two threads of a page server send
        self.bytes_sent = self.bytes_received = 0
        self.peer = "?"
        try:
            self.peer = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            pass
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    # -- MAC ------------------------------------------------------------------
    def use_session_key(self, key: bytes) -> None:
        self._mac_key = key

    @property
    def protected(self) -> bool:
        """Every message is authenticated (a session MAC or TLS): a layer's
        bytes need no digest of their own at its END, only their count."""
        import ssl
        return self._mac_key is not None or isinstance(self.sock, ssl.SSLSocket)

    def _tag(self, outgoing: bool, seq: int, head: bytes, parts) -> bytes:
        direction = b"C" if outgoing == self.client else b"S"
        m = hmac.new(self._mac_key, direction + struct.pack("<Q", seq) + head, hashlib.sha256)
        for p in parts:
            m.update(p)
        return m.digest()

    # -- sending ----------------------------------------------------------------
    def send(self, mtype: T, payload=b"") -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload, sort_keys=True).encode()
        self.send_parts(mtype, [payload])

    def send_parts(self, mtype: T, parts) -> None:
        parts = [memoryview(p).cast("B") for p in parts]
        n = sum(len(p) for p in parts)
        limit = MAX_DATA if mtype == T.DATA else MAX_CONTROL
        if n > limit:
            raise TransportError(f"message of {n} bytes exceeds the {limit}-byte limit")
        head = HEADER.pack(int(mtype), 0, n)
        out = [head, *parts]
        try:
            with self._send_lock:
                if self._mac_key is not None:
                    out.append(self._tag(True, self._tx, head, parts))
                self._tx += 1
                if isinstance(self.sock, ssl.SSLSocket):
                    self.sock.sendall(b"".join(out))
                else:
                    _sendall_parts(self.sock, out)
        except (OSError, ssl.SSLError) as exc:
            reason = self._peer_reason()
            raise TransportError(f"sending to {self.peer}: {_why(exc)}"
                                 + (f"; it said: {reason}" if reason else "")) from None
        self.bytes_sent += HEADER.size + n

    # -- receiving -------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                raise TransportError(f"{self.peer} sent nothing for "
                                     f"{self.sock.gettimeout():g} s") from None
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"receiving from {self.peer}: {_why(exc)}") from None
            if k == 0:
                raise TransportError(f"{self.peer} closed the connection in the middle of "
                                     "the stream" if got or n else "closed")
            got += k
        return buf

    def recv(self, *expect: T) -> tuple[T, bytearray]:
        head = bytes(self._recv_exact(HEADER.size))
        mtype, flags, n = HEADER.unpack(head)
        try:
            mtype = T(mtype)
        except ValueError:
            raise TransportError(f"{self.peer}: unknown message type {mtype}") from None
        limit = MAX_DATA if mtype == T.DATA else MAX_CONTROL
        if flags or n > limit:
            raise TransportError(f"{self.peer}: bad {mtype.name} header (flags {flags}, "
                                 f"length {n}, limit {limit})")
        payload = self._recv_exact(n)
        if self._mac_key is not None:
            tag = bytes(self._recv_exact(TAG))
            if not hmac.compare_digest(tag, self._tag(False, self._rx, head, [payload])):
                raise TransportError(f"{self.peer}: message {self._rx} fails its "
                                     "authentication tag (edited, replayed or wrong key)")
        self._rx += 1
        self.bytes_received += HEADER.size + n
        if mtype == T.ERROR and T.ERROR not in expect:
            info = _json(payload, mtype)
            raise TransportError(f"{self.peer}: {info.get('error', 'failed')}")
        if mtype == T.REFUSE and T.REFUSE not in expect:
            info = _json(payload, mtype)
            raise TransportError(f"{self.peer} refused: {info.get('why', '?')}")
        if expect and mtype not in expect:
            raise TransportError(f"{self.peer}: expected "
                                 f"{'/'.join(e.name for e in expect)}, got {mtype.name}")
        return mtype, payload

    def _peer_reason(self) -> str:
        """After a failed send: the ERROR or REFUSE the peer sent before it
        closed, if one is waiting (best effort, half a second)."""
        try:
            self.sock.settimeout(0.5)
            mtype, payload = self.recv(T.ERROR, T.REFUSE, *T)
        except (CheckpointError, OSError, ValueError):
            return ""
        if mtype in (T.ERROR, T.REFUSE):
            info = _json(payload, mtype)
            return str(info.get("error") or info.get("why") or "")
        return ""

    def recv_json(self, *expect: T) -> tuple[T, dict]:
        mtype, payload = self.recv(*expect)
        return mtype, _json(payload, mtype)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _json(payload, mtype) -> dict:
    try:
        obj = json.loads(bytes(payload) or b"{}")
    except ValueError:
        raise TransportError(f"undecodable {T(mtype).name} message") from None
    if not isinstance(obj, dict):
        raise TransportError(f"{T(mtype).name} message is not an object")
    return obj


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _sendall_parts(sock: socket.socket, parts) -> None:
    parts = [p for p in parts if len(p)]
    while parts:
        n = sock.sendmsg(parts[:512])
        while n and parts:
            if n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            else:
                parts[0] = parts[0][n:]
                n = 0


# --------------------------------------------------------------------------
# the handshake

def _proof(key: bytes, who: bytes, a: bytes, b: bytes) -> str:
    return hmac.new(key, who + a + b, hashlib.sha256).hexdigest()


def _session(key: bytes, ns: bytes, nc: bytes) -> bytes:
    return hmac.new(key, b"ckpt-session" + ns + nc, hashlib.sha256).digest()


def client_handshake(conn: Conn, key: bytes | None, facts: dict) -> dict:
    """HELLO, then (with a key) the challenge-response; returns WELCOME's facts."""
    nc = secrets.token_bytes(16)
    conn.send(T.HELLO, {"proto": PROTO_VERSION, "nonce": nc.hex(),
                        "auth": "psk" if key else "none", **facts})
    if key is not None:
        _, ch = conn.recv_json(T.CHALLENGE)
        ns = _hex(ch.get("nonce"), "server nonce")
        conn.send(T.AUTH, {"proof": _proof(key, b"ckpt-client", ns, nc)})
        _, wel = conn.recv_json(T.WELCOME)
        if not hmac.compare_digest(str(wel.get("proof", "")), _proof(key, b"ckpt-server", nc, ns)):
            raise TransportError(f"{conn.peer} does not know the key (its proof is wrong)")
        conn.use_session_key(_session(key, ns, nc))
        _, wel = conn.recv_json(T.WELCOME)     # the facts, under the session MAC
    else:
        _, wel = conn.recv_json(T.WELCOME)
    if wel.get("proto") != PROTO_VERSION:
        raise TransportError(f"{conn.peer} speaks protocol {wel.get('proto')}, "
                             f"this engine {PROTO_VERSION}")
    return wel


def server_handshake(conn: Conn, key: bytes | None, need_auth: bool) -> dict:
    """Read HELLO, authenticate the client; returns HELLO's facts. The caller
    checks them and sends the facts WELCOME (or REFUSE)."""
    _, hello = conn.recv_json(T.HELLO)
    if hello.get("proto") != PROTO_VERSION:
        conn.send(T.REFUSE, {"why": f"protocol {hello.get('proto')} not spoken here "
                                    f"({PROTO_VERSION})"})
        raise TransportError(f"{conn.peer} speaks protocol {hello.get('proto')}")
    nc = _hex(hello.get("nonce"), "client nonce")
    if key is not None:
        if hello.get("auth") != "psk":
            conn.send(T.REFUSE, {"why": "this page server needs the pre-shared key"})
            raise TransportError(f"{conn.peer} came without the pre-shared key")
        ns = secrets.token_bytes(16)
        conn.send(T.CHALLENGE, {"nonce": ns.hex(), "proto": PROTO_VERSION})
        _, auth = conn.recv_json(T.AUTH)
        if not hmac.compare_digest(str(auth.get("proof", "")), _proof(key, b"ckpt-client", ns, nc)):
            time.sleep(0.2)  # no fast oracle
            conn.send(T.REFUSE, {"why": "authentication failed (not the pre-shared key this page "
                                        "server has)"})
            raise TransportError(f"{conn.peer} failed authentication (wrong key)")
        conn.send(T.WELCOME, {"proof": _proof(key, b"ckpt-server", nc, ns)})
        conn.use_session_key(_session(key, ns, nc))
    elif need_auth:
        conn.send(T.REFUSE, {"why": "authentication is mandatory off loopback "
                                    "(--auth-key or TLS)"})
        raise TransportError(f"{conn.peer} is not on loopback and did not authenticate")
    return hello


def _hex(v, what: str) -> bytes:
    try:
        b = bytes.fromhex(v)
    except (TypeError, ValueError):
        raise TransportError(f"bad {what}") from None
    if len(b) != 16:
        raise TransportError(f"bad {what}")
    return b
