"""Two "hosts" on one machine: network namespaces joined by a veth pair.

    with two_hosts() as (src, dst):
        subprocess.run(src.wrap(["checkpoint", "migrate", ..., "--to", f"{dst.ip}:4000"]))

Every namespace, link and qdisc made here is removed on exit, also when the
body fails. ``shape(rate)`` puts a token-bucket filter on both veth ends (a
link of that many bits per second).
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass
class Host:
    ns: str
    ip: str
    dev: str

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@contextmanager
def two_hosts(tag: str | None = None):
    tag = tag or f"{os.getpid() % 100000}"
    a, b = f"ckpt-src-{tag}", f"ckpt-dst-{tag}"
    va, vb = f"cks{tag}", f"ckd{tag}"
    made = []
    try:
        for ns in (a, b):
            r = _ip("netns", "add", ns, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
            made.append(ns)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, ip in ((a, va, "10.77.0.1"), (b, vb, "10.77.0.2")):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Host(a, "10.77.0.1", va), Host(b, "10.77.0.2", vb)
    finally:
        for ns in made:   # deleting a namespace removes its veth end, and so the pair
            _ip("netns", "del", ns, check=False)


def shape(host: Host, rate: str) -> None:
    """A token-bucket filter of ``rate`` (e.g. "1gbit") on the host's veth."""
    subprocess.run(["ip", "netns", "exec", host.ns, "tc", "qdisc", "replace", "dev", host.dev,
                    "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"],
                   check=True, capture_output=True)
