"""Optional layer signing: a keyed MAC over every byte of a layer.

A signed layer's header says so (``Inventory.mac_alg``, ``mac_key_id``) and
names its parent's MAC (``parent_mac``), and its Trailer ends with the MAC:
HMAC-SHA256 keyed with the signing key over ``MAC_DOMAIN``, every file byte
before the trailer block and the trailer payload bytes before the MAC field.
The writer computes it on its I/O thread as the bytes go out (one pass, no
seek back); a reader with the key recomputes it in one sequential read.

The key is raw bytes (at least 32), read from a file only its owner can
read: ``head -c 32 /dev/urandom > key; chmod 600 key``. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

from ..errors import UsageError

MAC_ALG = "hmac-sha256"
MAC_LEN = 32
MAC_DOMAIN = b"checkpoint layer mac v1\0"
KEY_ID_INPUT = b"checkpoint key id v1"
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
# Trailer field 12 (`mac`, bytes, 32 long) as protobuf encodes it: the last
# MAC_SUFFIX_LEN bytes of a signed layer's trailer payload.
MAC_FIELD_PREFIX = bytes([(12 << 3) | 2, MAC_LEN])
MAC_SUFFIX_LEN = len(MAC_FIELD_PREFIX) + MAC_LEN


def check_key(key) -> bytes:
    """The key as bytes; ValueError unless it is bytes of a sane length."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise ValueError("a signing key is bytes")
    key = bytes(key)
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a signing key has {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, "
                         f"not {len(key)}")
    return key


def key_id(key: bytes) -> str:
    """16 hex digits naming the key without revealing it."""
    return hmac.new(key, KEY_ID_INPUT, hashlib.sha256).hexdigest()[:16]


def new_mac(key: bytes):
    """A fresh HMAC-SHA256 state, already fed the domain string."""
    return hmac.new(key, MAC_DOMAIN, hashlib.sha256)


def load_sign_key(path: str | os.PathLike) -> bytes:
    """Read a key file: a regular file of MIN_KEY_BYTES..MAX_KEY_BYTES raw
    bytes that no "other" user may read or write. Raises UsageError (one
    line, never quoting the file) otherwise."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise UsageError(f"cannot read the signing key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"signing key {path} is not a regular file")
        if st.st_mode & 0o007:
            raise UsageError(f"signing key {path} is accessible to every user (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        if not MIN_KEY_BYTES <= st.st_size <= MAX_KEY_BYTES:
            raise UsageError(f"signing key {path} has {st.st_size} bytes; a key has "
                             f"{MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                             f"(make one: head -c 32 /dev/urandom > KEY; chmod 600 KEY)")
        data = b""
        while len(data) <= MAX_KEY_BYTES:
            chunk = os.read(fd, MAX_KEY_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise UsageError(f"cannot read the signing key {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not MIN_KEY_BYTES <= len(data) <= MAX_KEY_BYTES:
        raise UsageError(f"signing key {path} changed size while read")
    return data
