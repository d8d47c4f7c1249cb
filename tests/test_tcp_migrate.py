"""Live migration of a TCP server holding an established connection, between
two "hosts" (network namespaces A and B) with the client on a third (C,
routing between them): the service address moves with the server
(`migrate --tcp-established --action-script` at network-unlock), the
client streams through the connection the whole time and sees every byte
come back once, in order, with no reset; back and forth, many times."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from netns import routed_hosts
from test_migrate import reap  # noqa: F401 (fixture)
from tcp_helpers import ECHO_SERVER, Streamer, our_tables

CLI = str(Path(sys.executable).with_name("checkpoint"))
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
ROUNDS = int(os.environ.get("CHECKPOINT_TCP_MIGRATIONS", "100"))


def socket_in(ns: str, family=socket.AF_INET) -> socket.socket:
    """A socket of network namespace ``ns`` (made there, used from here)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    other = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(other, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(other)


def _page_server(host, images: str, key: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(host.wrap([CLI, "page-server", "-D", images, "--address", host.ip,
                                    "--port", "0", "--restore", "--pid-ns", "--json",
                                    "--auth-key", key]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return p, json.loads(line)["port"]


def test_tcp_server_migrates_back_and_forth_under_a_stream(tmp_path, reap):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    with routed_hosts() as net:
        servers = {}
        try:
            for h in (net.a, net.b):
                servers[h.ns] = _page_server(h, str(tmp_path / h.ns), str(key))
                reap.append(servers[h.ns][0].pid)
            port = 7000 + os.getpid() % 1000
            with open(os.devnull, "r+b") as null:
                p = subprocess.Popen(net.a.wrap([sys.executable, "-c", ECHO_SERVER, "4",
                                                 net.addr, str(port)]),
                                     stdin=null, stdout=null, stderr=null)
            reap.append(p.pid)
            c = socket_in(net.client)
            deadline = time.monotonic() + 10
            while True:
                try:
                    c.connect((net.addr, port))
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
                    c.close()
                    c = socket_in(net.client)
            st = Streamer(c)
            st.progress(1 << 18)
            move = net.move_script(tmp_path / "move.sh")
            pid, here, there = p.pid, net.a, net.b
            downtimes = []
            for i in range(ROUNDS):
                r = subprocess.run(here.wrap([CLI, "migrate", "-t", pid, "--to",
                                              f"{there.ip}:{servers[there.ns][1]}",
                                              "--auth-key", key, "--tcp-established",
                                              "--action-script", move, "--json"]),
                                   capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, f"migration {i + 1}: {r.stderr}"
                out = json.loads(r.stdout)
                pid = out["remote_pid"]
                reap.append(pid)
                downtimes.append(out["downtime_ms"])
                assert our_tables(here.ns) == [], f"migration {i + 1} left its lock"
                st.progress(1 << 16)    # the stream goes on through the copy
                here, there = there, here
            total = st.finish()
            print(f"{ROUNDS} migrations under a TCP stream: {total >> 20} MiB echoed byte-exact,"
                  f" downtime median {sorted(downtimes)[len(downtimes) // 2]:.1f} ms, "
                  f"max {max(downtimes):.1f} ms; the client's longest wait for an echo "
                  f"{st.max_stall * 1e3:.0f} ms")
        finally:
            for srv, _ in servers.values():
                srv.send_signal(signal.SIGTERM)
            for srv, _ in servers.values():
                try:
                    srv.wait(10)
                except subprocess.TimeoutExpired:
                    srv.kill()
                    srv.wait(10)
