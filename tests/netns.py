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


@dataclass
class Service:
    """Hosts A and B, a client host C routing between them, and a service
    address that lives on A or B (on lo); C routes it to where it lives."""
    a: Host
    b: Host
    client: str         # the client's namespace
    addr: str           # the service address (on A at first)

    def move_script(self, path) -> str:
        """A network-unlock action script moving the address to the other
        host: off the one it is on, onto the other, C's route after it."""
        lines = ["#!/bin/sh", "set -e",
                 '[ "$CHECKPOINT_ACTION" = network-unlock ] || exit 0',
                 f'if ip -n {self.a.ns} -o addr show dev lo | grep -q " {self.addr}/"; then',
                 f"  from={self.a.ns}; to={self.b.ns}; via={self.b.ip}",
                 "else",
                 f"  from={self.b.ns}; to={self.a.ns}; via={self.a.ip}",
                 "fi",
                 f'ip -n "$from" addr del {self.addr}/32 dev lo',
                 f'ip -n "$to" addr add {self.addr}/32 dev lo',
                 f'ip -n {self.client} route replace {self.addr}/32 via "$via"']
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o700)
        return str(path)


@contextmanager
def routed_hosts(tag: str | None = None):
    """``Service`` of three namespaces: C (the client, forwarding) joined
    to A and to B by a veth pair each; A and B reach each other through C.
    Everything is removed on exit."""
    tag = tag or f"{os.getpid() % 100000}"
    a, b, c = f"ckpt-a-{tag}", f"ckpt-b-{tag}", f"ckpt-c-{tag}"
    made = []
    try:
        for ns in (a, b, c):
            r = _ip("netns", "add", ns, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {r.stderr.strip()}")
            made.append(ns)
        hosts = []
        for i, ns in ((1, a), (2, b)):
            here, there = f"cka{i}{tag}", f"ckc{i}{tag}"
            _ip("link", "add", here, "type", "veth", "peer", "name", there)
            _ip("link", "set", here, "netns", ns)
            _ip("link", "set", there, "netns", c)
            _ip("-n", ns, "addr", "add", f"10.78.{i}.2/24", "dev", here)
            _ip("-n", c, "addr", "add", f"10.78.{i}.1/24", "dev", there)
            for n_, d in ((ns, here), (ns, "lo"), (c, there)):
                _ip("-n", n_, "link", "set", d, "up")
            _ip("-n", ns, "route", "add", "default", "via", f"10.78.{i}.1")
            hosts.append(Host(ns, f"10.78.{i}.2", here))
        _ip("-n", c, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", c, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        addr = "10.78.0.1"
        _ip("-n", a, "addr", "add", f"{addr}/32", "dev", "lo")
        _ip("-n", c, "route", "add", f"{addr}/32", "via", hosts[0].ip)
        yield Service(hosts[0], hosts[1], c, addr)
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)
